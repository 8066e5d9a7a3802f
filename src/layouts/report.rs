//! What every writer shares: the files it produces, the per-layer verdict, and the figures
//! the report gives.
//!
//! Every layer is **exact** (the target computes the same rotation: parameters mapped by
//! negation, halving, packing, permutation, pre-applied clamps; values rounded at most once to
//! the binary32 the target stores), **lossy** (a different polynomial, a dropped row scale) or
//! **impossible** (the other side of the weight, a wiring the target does not have). The
//! reference is formats.md §14. Besides the files, each writer returns the canonical layer its
//! output denotes, from which the report measures what changed.

use super::names;
use crate::error::{Category, Error, Result};
use crate::model::*;
use crate::rotation::rotation_block;
use crate::tensors::MappedFile;
use safetensors::Dtype;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// What happens to one layer.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum Status {
    /// Written as is.
    Exact,
    /// Written with a change.
    Lossy {
        /// What changes.
        reason: String,
    },
    /// Not expressible in the layout.
    Impossible {
        /// Why not.
        reason: String,
    },
}

/// One layer of a `convert --to` report.
#[derive(Debug, Clone, Serialize)]
pub struct LayerReport {
    /// The source layer's target name.
    pub layer: String,
    /// The name it was written under, if written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub written_as: Option<String>,
    /// Exact, lossy or impossible.
    #[serde(flatten)]
    pub status: Status,
    /// Largest change of any rotation entry (0 when bit-exact).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_rotation_change: Option<f64>,
    /// Largest change of any row-scale entry (a dropped scale counts against 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_scale_change: Option<f64>,
    /// Largest change of any merged weight (needs `--base`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_weight_change: Option<f64>,
}

/// One file of the output, relative to the output root.
pub enum OutFile {
    /// A safetensors file.
    Safetensors {
        /// Its path relative to the output root.
        rel: PathBuf,
        /// Its tensors.
        tensors: Vec<OwnedTensor>,
        /// Its metadata.
        metadata: BTreeMap<String, String>,
    },
    /// A text file (a JSON config).
    Text {
        /// Its path relative to the output root.
        rel: PathBuf,
        /// Its content.
        text: String,
    },
}

pub use crate::tensors::OwnedTensor;

/// One layer as a writer wrote it.
pub struct Mapping {
    /// The module name it is written under.
    pub name: String,
    /// Its tensors.
    pub tensors: Vec<OwnedTensor>,
    /// The canonical layer the target computes from what was written.
    pub denoted: Layer,
    /// Why the target computes something else (empty: exact).
    pub lossy: Vec<String>,
}

/// The outcome of one layer in a writer: written, or why the target cannot hold it.
pub type Mapped = std::result::Result<Mapping, String>;

/// A binary32 tensor for a writer (an error is the layer's reason for being impossible).
pub fn f32_tensor(
    name: String,
    shape: Vec<usize>,
    values: &[f64],
) -> std::result::Result<OwnedTensor, String> {
    OwnedTensor::new(name, Dtype::F32, shape, values).map_err(|e| e.to_string())
}

/// Record in a denoted stage what a target computes that stores `q` as `blocks` unshared blocks
/// under the exact Cayley map; a source on another map is lossy (`tool` names the target; one
/// reason per layer).
pub fn cayley_stage(
    ds: &mut Stage,
    q: Vec<f64>,
    blocks: usize,
    q_f64: bool,
    tool: &str,
    lossy: &mut Vec<String>,
) {
    ds.q = q;
    ds.q_f64 = q_f64;
    ds.spec.shared = false;
    ds.spec.blocks = Some(blocks as u64);
    if ds.spec.map != RotationMap::Cayley {
        if lossy.is_empty() {
            lossy.push(format!(
                "{tool} uses the exact Cayley map, the source the {}",
                ds.spec.map.describe()
            ));
        }
        ds.spec.map = RotationMap::Cayley;
    }
}

/// Why a layer is impossible when its shared block's repeat count is unknown.
pub const UNKNOWN_REPEAT: &str = "a shared block whose repeat count is unknown; pass --base";

/// Per source layer: the name it was written under, the layer it denotes, its verdict.
pub type LayerOutcome = (Option<String>, Option<Layer>, Status);

/// Everything a writer produced.
pub struct Written {
    /// The files to write.
    pub files: Vec<OutFile>,
    /// Per source layer, in order.
    pub mapped: Vec<LayerOutcome>,
    /// What the user should know about them.
    pub warnings: Vec<String>,
    /// Whether the output is a directory (PEFT) rather than one file.
    pub directory: bool,
}

/// What a writer may consult beyond the adapter.
pub struct Context<'a> {
    /// A diffusion transformer's module names in this base layout's key layout (OneTrainer's
    /// COMFY `diffusion_model.…` / DIFFUSERS `transformer.…`), when asked for.
    pub dit_names: Option<crate::resolve::dit::BaseLayout>,
    /// The base checkpoint, if given.
    pub base: Option<&'a Path>,
    /// Its names, to recover dotted module paths from flattened ones.
    pub table: Option<(crate::resolve::AliasTable, crate::resolve::PipelineNames)>,
    /// Whether the base model is SD 1.x (its `proj_in` is a 1×1 conv), when known.
    pub sd1: Option<bool>,
}

impl Context<'_> {
    /// The base's names, when a base was given.
    pub fn names(&self) -> Option<(&crate::resolve::AliasTable, &crate::resolve::PipelineNames)> {
        self.table.as_ref().map(|(t, n)| (t, n))
    }
}

/// Source metadata worth keeping in another layout: the user's and trainer's training record,
/// without the keys any layout uses to describe itself ([`super::Layout::metadata_keys`]):
/// each writer sets its own.
pub fn kept_metadata(adapter: &Adapter) -> BTreeMap<String, String> {
    adapter
        .provenance
        .user_metadata
        .iter()
        .filter(|(k, _)| !super::is_layout_key(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// A stage's packed rows with a shared block repeated over the whole axis, and how many blocks
/// they are (counted, not divided out: blocks of size 1 have empty rows).
pub fn expanded_rows(stage: &Stage, axis: Option<u64>) -> Option<(Vec<f64>, usize)> {
    if !stage.spec.shared {
        return Some((stage.q.clone(), stage.stored_blocks() as usize));
    }
    let blocks = stage
        .spec
        .blocks
        .or_else(|| axis.map(|d| d / stage.spec.block_size.max(1)))?;
    // A count from a file is bounded before it sizes an allocation.
    dim_ok(Some(blocks), stage.spec.block_size)
        .then(|| (stage.q.repeat(blocks as usize), blocks as usize))
}

/// Whether a layer's module is a Conv2d: recorded kind, full shape, or (SD U-Nets) its name.
pub fn is_conv(layer: &Layer, sd1: Option<bool>) -> std::result::Result<bool, String> {
    match layer.target.module {
        ModuleKind::Conv => return Ok(true),
        ModuleKind::Linear | ModuleKind::Embedding => return Ok(false),
        ModuleKind::Unknown => {}
    }
    if let Some(shape) = &layer.target.shape {
        return Ok(shape.len() > 2);
    }
    let name = names::dotted(layer)
        .map(|(_, m)| m)
        .unwrap_or_else(|| layer.target.name.clone());
    names::is_conv_name(&name, sd1).map_err(|m| format!("{m}; pass --base"))
}

/// Largest change of any rotation entry between two layers with the same stage partitions.
pub fn rotation_change(a: &Layer, b: &Layer) -> Option<f64> {
    if a.stages.len() != b.stages.len() {
        return None;
    }
    let mut worst = 0.0f64;
    for (sa, sb) in a.stages.iter().zip(&b.stages) {
        let bs = sa.spec.block_size as usize;
        if bs != sb.spec.block_size as usize || sa.spec.wiring != sb.spec.wiring {
            return None;
        }
        let n = sa.stored_blocks().max(sb.stored_blocks()) as usize;
        for k in 0..n {
            let ra = rotation_block(
                sa.q_row(k.min(sa.stored_blocks() as usize - 1)),
                bs,
                &sa.spec.map,
            );
            let rb = rotation_block(
                sb.q_row(k.min(sb.stored_blocks() as usize - 1)),
                bs,
                &sb.spec.map,
            );
            for (x, y) in ra.iter().zip(&rb) {
                worst = worst.max((x - y).abs());
            }
        }
    }
    Some(worst)
}

/// Largest change of a row scale (absent = all ones; a different position counts in full).
pub fn scale_change(a: &Layer, b: &Layer) -> Option<f64> {
    let ones = |l: &Layer| l.row_scale.as_ref().map(|(_, v)| v.len());
    let n = ones(a).or(ones(b))?;
    let get = |l: &Layer, i: usize| l.row_scale.as_ref().map_or(1.0, |(_, v)| v[i]);
    Some(
        (0..n)
            .map(|i| (get(a, i) - get(b, i)).abs())
            .fold(0.0, f64::max),
    )
}

/// Largest change of the merged weight of `a` vs `b` on the base tensor they target.
fn weight_change(a: &Layer, b: &Layer, base: &MappedFile, ctx: &Context<'_>) -> Option<f64> {
    use crate::apply::{Matrix, apply_layer};
    let (table, _) = ctx.names()?;
    let r = table.resolve(&a.target).ok()?;
    let st = base.tensors();
    let view = st.tensor(&r.key).ok()?;
    let shape = view.shape().to_vec();
    if shape.is_empty() {
        return None;
    }
    let cols: usize = shape[1..].iter().product();
    let all = crate::tensors::to_f64(&view, &r.key).ok()?;
    let (start, len) = r.rows.unwrap_or((0, shape[0]));
    let slice = all[start * cols..(start + len) * cols].to_vec();
    let mut ma = Matrix::from_shape(&[len, cols], slice.clone()).ok()?;
    let mut mb = Matrix::from_shape(&[len, cols], slice).ok()?;
    apply_layer(a, &mut ma).ok()?;
    apply_layer(b, &mut mb).ok()?;
    Some(
        ma.data
            .iter()
            .zip(&mb.data)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max),
    )
}

/// Turn the writer's per-layer outcomes into report rows (figures included).
pub fn reports(
    adapter: &Adapter,
    written: &Written,
    ctx: &Context<'_>,
) -> Result<Vec<LayerReport>> {
    let base = ctx.base.map(MappedFile::open).transpose()?;
    Ok(adapter
        .layers
        .iter()
        .zip(&written.mapped)
        .map(|(src, (name, denoted, status))| {
            let (rot, scale, weight) = match denoted {
                Some(d) => (
                    rotation_change(src, d),
                    scale_change(src, d),
                    base.as_ref().and_then(|b| weight_change(src, d, b, ctx)),
                ),
                None => (None, None, None),
            };
            LayerReport {
                layer: src.target.name.clone(),
                written_as: name.clone(),
                status: status.clone(),
                max_rotation_change: rot,
                max_scale_change: scale,
                max_weight_change: weight,
            }
        })
        .collect())
}

/// One layer's outcome as report inputs: its name, the layer it denotes, its verdict, and
/// its tensors.
pub fn outcome(m: Mapped) -> (Option<String>, Option<Layer>, Status, Vec<OwnedTensor>) {
    match m {
        Ok(w) => {
            let status = if w.lossy.is_empty() {
                Status::Exact
            } else {
                Status::Lossy {
                    reason: w.lossy.join("; "),
                }
            };
            (Some(w.name), Some(w.denoted), status, w.tensors)
        }
        Err(reason) => (None, None, Status::Impossible { reason }, Vec::new()),
    }
}

/// Map every layer of `adapter` with `map`: the tensors of the written ones, and per layer
/// what the report needs (see [`Written::mapped`]).
pub fn map_layers(
    adapter: &Adapter,
    mut map: impl FnMut(&Layer) -> Mapped,
) -> (Vec<OwnedTensor>, Vec<LayerOutcome>) {
    let mut tensors = Vec::new();
    let mut mapped = Vec::new();
    for layer in &adapter.layers {
        let (n, d, s, t) = outcome(map(layer));
        tensors.extend(t);
        mapped.push((n, d, s));
    }
    (tensors, mapped)
}

/// The layers of `adapter` that a writer wrote, with the name it wrote each under.
pub fn written<'a>(
    adapter: &'a Adapter,
    mapped: &'a [LayerOutcome],
) -> impl Iterator<Item = (&'a Layer, &'a str)> {
    adapter
        .layers
        .iter()
        .zip(mapped)
        .filter_map(|(l, (n, _, _))| n.as_deref().map(|n| (l, n)))
}

/// Serialise one output file into bytes.
pub fn file_bytes(file: &OutFile) -> Result<Vec<u8>> {
    match file {
        OutFile::Text { text, .. } => Ok(text.as_bytes().to_vec()),
        OutFile::Safetensors {
            tensors, metadata, ..
        } => {
            let mut out = Vec::new();
            let md: HashMap<String, String> = metadata.clone().into_iter().collect();
            crate::tensors::write_owned(&mut out, tensors, md)?;
            Ok(out)
        }
    }
}

/// The path of `file` relative to the output root.
pub fn rel_path(file: &OutFile) -> &Path {
    match file {
        OutFile::Safetensors { rel, .. } | OutFile::Text { rel, .. } => rel,
    }
}

impl Written {
    /// A one-file layout.
    pub fn single(
        tensors: Vec<OwnedTensor>,
        metadata: BTreeMap<String, String>,
        mapped: Vec<LayerOutcome>,
        warnings: Vec<String>,
    ) -> Self {
        Written {
            files: vec![OutFile::Safetensors {
                rel: PathBuf::new(),
                tensors,
                metadata,
            }],
            mapped,
            warnings,
            directory: false,
        }
    }
}

/// Error for a conversion that cannot be done, with what works instead.
pub fn refuse(to: &str, impossible: &[(String, String)], lossy: &[(String, String)]) -> Error {
    let mut msg = String::new();
    if !impossible.is_empty() {
        msg.push_str(&format!(
            "{} layer(s) cannot be written as {}: ",
            impossible.len(),
            to
        ));
        let (l, why) = &impossible[0];
        msg.push_str(&format!("`{l}`: {why}"));
        if impossible.len() > 1 {
            msg.push_str(&format!(
                " (and {} more; --json lists them)",
                impossible.len() - 1
            ));
        }
    } else if !lossy.is_empty() {
        let (l, why) = &lossy[0];
        msg.push_str(&format!(
            "{} layer(s) would change as {}: `{l}`: {why}{}; pass --allow-lossy to write them anyway \
             (the report gives the size of the change)",
            lossy.len(),
            to,
            if lossy.len() > 1 { " (and more)" } else { "" }
        ));
    }
    Error::new(Category::Conversion, msg)
}
