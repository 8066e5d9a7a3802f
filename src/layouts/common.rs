//! Small pieces every reader needs: reading a tensor as checked f64 values, the ½-skew rule of
//! the older producers, the shape of a one-stage layer, the provenance of an imported adapter,
//! and what a file's metadata says about its base model.

use crate::error::{Category, Error, Result};
use crate::model::*;
use crate::rotation::pack_upper;
use crate::tensors::{MappedFile, to_f64};
use safetensors::SafeTensors;
use std::collections::{BTreeMap, HashMap};
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
        Some(i) => Err(Error::new(
            Category::NonFinite,
            format!("holds a non-finite value ({}) at element {i}", v[i]),
        )
        .at(path)
        .tensor(name)),
        None => Ok(v),
    }
}

/// `(N, b)` of a `[N, b, b]` shape with `N ≥ 1` and `b ≥ 1` (square blocks; a block of size 1
/// is the identity rotation, which LyCORIS, kohya and PEFT ≤ 0.13 all write).
pub fn square_blocks(shape: &[usize]) -> Option<(usize, usize)> {
    match *shape {
        [n, b1, b2] if b1 == b2 && n >= 1 && b1 >= 1 => Some((n, b1)),
        _ => None,
    }
}

/// `(m, N, b)` of an `[m, N, b, b]` shape (`m ≥ 1` stacks of [`square_blocks`]).
pub fn stacked_blocks(shape: &[usize]) -> Option<(usize, usize, usize)> {
    match shape {
        [m, rest @ ..] if *m >= 1 && rest.len() == 3 => {
            square_blocks(rest).map(|(n, b)| (*m, n, b))
        }
        _ => None,
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
                rows: None,
            },
            side: self.side,
            stages: vec![Stage {
                spec: StageSpec {
                    truncated: false,
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
        return Err(Error::new(Category::UnknownLayout, "the file holds no OFT tensors").at(path));
    }
    let mut user_metadata: BTreeMap<String, String> = file.metadata.clone().into_iter().collect();
    user_metadata.extend(extra);
    Ok(Adapter {
        provenance: Provenance {
            source_format: source_format.into(),
            source_version,
            tool: tool_name(),
            created: None,
            source_digest: Some(file_digest(path)?),
            user_metadata,
        },
        layers,
        features: Vec::new(),
    })
}

/// The layers of a file whose tensors are `<module><suffix>` ([`modules`]): `read` for each
/// module, in name order.
pub fn read_modules(
    src: &crate::layouts::Source<'_>,
    suffixes: &[&str],
    layout: &str,
    mut read: impl FnMut(&SafeTensors<'_>, &str) -> Result<Layer>,
) -> Result<Vec<Layer>> {
    let st = src.file.tensors();
    modules(src.path, &st, suffixes, layout)?
        .iter()
        .map(|m| read(&st, m))
        .collect()
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

/// blake3 of a file's bytes, streamed.
pub fn file_digest(path: &Path) -> Result<String> {
    let mut h = blake3::Hasher::new();
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    h.update_reader(f).map_err(|e| Error::io(path, e))?;
    Ok(h.finalize().to_hex().to_string())
}

/// The SD generation a file's metadata names: `Some(true)` for SD 1.x (whose attention
/// `proj_in`/`proj_out` are 1×1 convolutions), `Some(false)` for SD 2.x / SDXL / others.
/// Trainers record it in their own keys (kohya `ss_*`, OneTrainer `ot_config`), anyone in
/// `modelspec.architecture`.
pub fn sd1_from_metadata(metadata: &HashMap<String, String>) -> Option<bool> {
    if let Some(v) = metadata.get("ss_base_model_version") {
        return Some(v.starts_with("sd_v1"));
    }
    if metadata.get("ss_v2").is_some_and(|v| v == "True") {
        return Some(false);
    }
    let ot_model_type = metadata
        .get("ot_config")
        .and_then(|c| serde_json::from_str::<serde_json::Value>(c).ok())
        .and_then(|cfg| cfg.get("model_type")?.as_str().map(str::to_string));
    if let Some(t) = ot_model_type {
        return Some(t.starts_with("STABLE_DIFFUSION_1"));
    }
    if let Some(a) = metadata.get("modelspec.architecture") {
        return Some(a.starts_with("stable-diffusion-v1"));
    }
    None
}
