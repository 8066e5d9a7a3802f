//! Small pieces every importer needs: reading a tensor as checked f64 values, the ½-skew rule
//! of the older producers, and the shared shape of a one-stage layer.

use crate::error::{Error, Result};
use crate::model::*;
use crate::rotation::pack_upper;
use crate::tensors::{MappedFile, to_f64};
use safetensors::SafeTensors;
use std::collections::BTreeMap;
use std::path::Path;

/// A tensor's values (checked finite) and shape.
pub fn read(path: &Path, st: &SafeTensors<'_>, name: &str) -> Result<(Vec<f64>, Vec<usize>)> {
    let view = st
        .tensor(name)
        .map_err(|e| Error::format(path, format!("`{name}`: {e}")))?;
    let shape = view.shape().to_vec();
    let values = finite(path, name, to_f64(&view, name)?)?;
    Ok((values, shape))
}

/// Refuse NaN or infinite parameters, naming the first.
pub fn finite(path: &Path, name: &str, v: Vec<f64>) -> Result<Vec<f64>> {
    match v.iter().position(|x| !x.is_finite()) {
        Some(i) => Err(Error::format(
            path,
            format!(
                "`{name}` holds a non-finite value ({}) at element {i}",
                v[i]
            ),
        )),
        None => Ok(v),
    }
}

/// Packed `scale·(A − Aᵀ)` of each `b × b` block of `raw` (row-major blocks).
pub fn skew_blocks(raw: &[f64], b: usize, scale: f64) -> Vec<f64> {
    let mut q = Vec::with_capacity(raw.len() / (b * b) * b * (b - 1) / 2);
    for blk in raw.chunks_exact(b * b) {
        let mut skew = vec![0.0; b * b];
        for i in 0..b {
            for j in 0..b {
                skew[i * b + j] = scale * (blk[i * b + j] - blk[j * b + i]);
            }
        }
        q.extend(pack_upper(&skew, b));
    }
    q
}

/// PEFT's `(shared, blocks)` for `rows` stored blocks of size `b`: one row under `block_share`
/// repeats `r` times (unknown without a config), else each row is a block. A count whose
/// dimension no model has is refused before it sizes anything.
pub fn peft_blocks(
    path: &Path,
    module: &str,
    rows: usize,
    block_share: bool,
    r: u64,
    b: usize,
) -> Result<(bool, Option<u64>)> {
    let shared = rows == 1 && block_share;
    let blocks = if shared {
        (r > 0).then_some(r)
    } else {
        Some(rows as u64)
    };
    if dim_ok(blocks, b as u64) {
        return Ok((shared, blocks));
    }
    Err(Error::format(
        path,
        format!(
            "`{module}`: {} blocks of size {b} (the config's `r`) exceed the largest dimension oftool accepts ({MAX_DIM})",
            blocks.unwrap_or(0)
        ),
    ))
}

/// Project each `b × b` block of the raw parameter onto the Frobenius ball of `radius` (the
/// COFT rule of PEFT ≤ 0.15 and of the OFT authors: the distance to the zero matrix).
pub fn project_raw_blocks(raw: &mut [f64], b: usize, radius: f64) {
    for blk in raw.chunks_exact_mut(b * b) {
        let norm = blk.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm > radius {
            let f = radius / norm;
            blk.iter_mut().for_each(|x| *x *= f);
        }
    }
}

/// A one-stage block-diagonal layer (identity wiring, Cayley unless told otherwise).
pub struct OneStage {
    pub name: String,
    pub convention: &'static str,
    pub component: Option<String>,
    pub module: ModuleKind,
    pub side: Side,
    pub blocks: Option<u64>,
    pub block_size: usize,
    pub shared: bool,
    pub map: RotationMap,
    pub q: Vec<f64>,
    pub q_f64: bool,
    pub row_scale: Option<Vec<f64>>,
    pub constraint: Option<Constraint>,
}

impl OneStage {
    pub fn into_layer(self) -> Layer {
        let b = self.block_size as u64;
        Layer {
            target: Target {
                name: self.name,
                convention: self.convention.into(),
                component: self.component,
                module: self.module,
                shape: None,
                rotated_dim: self.blocks.map(|r| r * b),
            },
            side: self.side,
            stages: vec![Stage {
                spec: StageSpec {
                    blocks: self.blocks,
                    block_size: b,
                    shared: self.shared,
                    wiring: Wiring::Identity,
                    map: self.map,
                    q: String::new(),
                },
                q: self.q,
                q_f64: self.q_f64,
                inverse: false,
            }],
            row_scale: self.row_scale.map(|v| (ScalePosition::After, v)),
            row_scale_f64: false,
            constraint: self.constraint,
            base_binding: None,
        }
    }
}

/// The adapter around imported layers, with the file's metadata kept as user metadata.
pub fn adapter(
    path: &Path,
    file: &MappedFile,
    source_format: &str,
    source_version: Option<String>,
    extra: BTreeMap<String, String>,
    layers: Vec<Layer>,
) -> Result<Adapter> {
    if layers.is_empty() {
        return Err(Error::format(path, "the file holds no OFT tensors"));
    }
    let mut user_metadata: BTreeMap<String, String> = file.metadata.clone().into_iter().collect();
    user_metadata.extend(extra);
    Ok(Adapter {
        provenance: Provenance {
            source_format: source_format.into(),
            source_version,
            tool: tool_name(),
            created: None,
            source_digest: Some(crate::import::file_digest(path)?),
            user_metadata,
        },
        layers,
        features: Vec::new(),
    })
}

/// Module names of a file: the tensor names with one of `suffixes` stripped; anything else is
/// refused by name (a file mixing layouts is not guessed at).
pub fn modules(
    path: &Path,
    st: &SafeTensors<'_>,
    suffixes: &[&str],
    layout: &str,
) -> Result<Vec<String>> {
    let mut out = std::collections::BTreeSet::new();
    for name in st.names() {
        let module = suffixes
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .ok_or_else(|| {
                Error::format(
                    path,
                    format!(
                        "unexpected tensor `{name}` in a {layout} file (expected {})",
                        suffixes
                            .iter()
                            .map(|s| format!("`*{s}`"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            })?;
        out.insert(module.to_string());
    }
    Ok(out.into_iter().collect())
}
