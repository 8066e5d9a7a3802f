//! Writers: the canonical model in each producer's layout, with a per-layer verdict.
//!
//! Every layer is **exact** (the target computes the same rotation: parameters mapped by
//! negation, halving, packing, permutation, pre-applied clamps; values rounded at most once to
//! the binary32 the target stores), **lossy** (a different polynomial, a dropped row scale) or
//! **impossible** (the other side of the weight, a wiring the target does not have). The
//! reference is formats.md §14. Besides the files, each writer returns the canonical layer its
//! output denotes, from which the report measures what changed.

mod comfy;
mod kohya_v2;
pub mod names;
mod peft;

use crate::error::{Category, Error, Result};
use crate::model::*;
use crate::rotation::rotation_block;
use crate::tensors::MappedFile;
use safetensors::Dtype;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Layouts `convert --to` writes (besides `.oft`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum To {
    /// A PEFT ≥ 0.18 adapter directory (per diffusers component).
    Peft,
    /// LyCORIS keys under kohya names, as ComfyUI loads them.
    ComfyUi,
    /// LyCORIS (`lycoris.kohya`) diag-oft / BOFT.
    Lycoris,
    /// kohya sd-scripts: legacy `networks.oft` (output side) or `networks.oft_v2` (input side).
    Kohya,
    /// OneTrainer `OFT_2` (KOHYA key layout).
    OneTrainer,
}

impl To {
    pub fn name(self) -> &'static str {
        match self {
            To::Peft => "diffusers",
            To::ComfyUi => "comfyui",
            To::Lycoris => "lycoris",
            To::Kohya => "kohya",
            To::OneTrainer => "onetrainer",
        }
    }
}

/// What happens to one layer.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum Status {
    Exact,
    Lossy { reason: String },
    Impossible { reason: String },
}

#[derive(Debug, Clone, Serialize)]
pub struct LayerReport {
    pub layer: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub written_as: Option<String>,
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
    Safetensors {
        rel: PathBuf,
        tensors: Vec<OwnedTensor>,
        metadata: BTreeMap<String, String>,
    },
    Text {
        rel: PathBuf,
        text: String,
    },
}

pub use crate::tensors::OwnedTensor;

/// The outcome of one layer in a writer.
pub enum Mapped {
    /// Written under `name`; `denoted` is the canonical layer the target computes from it.
    Written {
        name: String,
        tensors: Vec<OwnedTensor>,
        denoted: Box<Layer>,
        lossy: Option<String>,
    },
    Impossible(String),
}

/// Everything a writer produced.
pub struct Written {
    pub files: Vec<OutFile>,
    /// Per source layer, in order.
    pub mapped: Vec<(Option<String>, Option<Layer>, Status)>,
    pub warnings: Vec<String>,
    /// Whether the output is a directory (PEFT) rather than one file.
    pub directory: bool,
}

pub struct Context<'a> {
    pub base: Option<&'a Path>,
    pub table: Option<(crate::resolve::AliasTable, crate::resolve::PipelineNames)>,
    pub sd1: Option<bool>,
}

impl Context<'_> {
    fn names(&self) -> Option<(&crate::resolve::AliasTable, &crate::resolve::PipelineNames)> {
        self.table.as_ref().map(|(t, n)| (t, n))
    }
}

/// Write `adapter` in layout `to`: the files and the per-layer verdicts (nothing on disk yet).
pub fn export(adapter: &Adapter, to: To, ctx: &Context<'_>) -> Result<Written> {
    match to {
        To::Peft => peft::write(adapter, ctx),
        To::ComfyUi => comfy::write(adapter, ctx, comfy::Flavor::ComfyUi),
        To::Lycoris => comfy::write(adapter, ctx, comfy::Flavor::Lycoris),
        To::Kohya => kohya_v2::write(adapter, ctx, kohya_v2::Flavor::Kohya),
        To::OneTrainer => kohya_v2::write(adapter, ctx, kohya_v2::Flavor::OneTrainer),
    }
}

/// Keys that describe the source's layout (not the user's training): never carried over, each
/// writer sets its own.
const LAYOUT_KEYS: [&str; 7] = [
    "ot_config",
    "ss_network_module",
    "ss_network_args",
    "ss_network_dim",
    "ss_network_alpha",
    "lycoris_config",
    crate::import::onetrainer::CONV_LIST_KEY,
];

/// Source metadata worth keeping in another layout: the user's and trainer's training record,
/// without `.oft` container keys and the source layout's own keys.
pub fn kept_metadata(adapter: &Adapter) -> BTreeMap<String, String> {
    adapter
        .provenance
        .user_metadata
        .iter()
        .filter(|(k, _)| {
            k.as_str() != crate::oft_file::META_FORMAT
                && !k.starts_with("oft.")
                && !k.starts_with("peft.")
                && !LAYOUT_KEYS.contains(&k.as_str())
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Split `q` into two binary32 arrays `hi`, `lo` with `hi − lo = q`: `hi = f32(q)` and
/// `lo = hi − q`, which is exactly representable whenever `q` is the difference of two
/// binary32 values (the rounding error of a sum is a float, Knuth's TwoSum). Readers that take
/// `B − Bᵀ` with `B = hi` above and `lo` below the diagonal then recover `q` exactly.
pub fn two_part(q: f64) -> (f64, f64) {
    let hi = q as f32 as f64;
    let lo = (hi - q) as f32 as f64;
    (hi, lo)
}

/// Dense `b × b` blocks `B` with `B − Bᵀ` = the skew matrix of each packed row of `q`.
pub fn blocks_from_packed(q: &[f64], b: usize) -> (Vec<f64>, Vec<f64>) {
    let tri = b * (b - 1) / 2;
    let mut dense = Vec::with_capacity(q.len() / tri.max(1) * b * b);
    let mut denoted = Vec::with_capacity(q.len());
    for row in q.chunks_exact(tri.max(1)) {
        let mut blk = vec![0.0; b * b];
        let mut k = 0;
        for i in 0..b {
            for j in (i + 1)..b {
                let (hi, lo) = two_part(row[k]);
                blk[i * b + j] = hi;
                blk[j * b + i] = lo;
                denoted.push(hi - lo);
                k += 1;
            }
        }
        dense.extend(blk);
    }
    (dense, denoted)
}

/// A stage's packed rows with a shared block repeated over the whole axis.
pub fn expanded_rows(stage: &Stage, axis: Option<u64>) -> Option<Vec<f64>> {
    if !stage.spec.shared {
        return Some(stage.q.clone());
    }
    let blocks = stage
        .spec
        .blocks
        .or_else(|| axis.map(|d| d / stage.spec.block_size.max(1)))?;
    // A count from a file is bounded before it sizes an allocation.
    dim_ok(Some(blocks), stage.spec.block_size).then(|| stage.q.repeat(blocks as usize))
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
    crate::import::onetrainer::is_conv(&name, sd1).map_err(|m| format!("{m}; pass --base"))
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

/// Collect writer outcomes into the `Written` shape shared by all writers.
pub fn outcome(m: Mapped) -> (Option<String>, Option<Layer>, Status, Vec<OwnedTensor>) {
    match m {
        Mapped::Written {
            name,
            tensors,
            denoted,
            lossy,
        } => {
            let status = match lossy {
                Some(reason) => Status::Lossy { reason },
                None => Status::Exact,
            };
            (Some(name), Some(*denoted), status, tensors)
        }
        Mapped::Impossible(reason) => (None, None, Status::Impossible { reason }, Vec::new()),
    }
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
        mapped: Vec<(Option<String>, Option<Layer>, Status)>,
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

/// [`free_alpha`] over every layer of an adapter (‖Q‖_F summed over a layer's stages).
pub fn free_alpha_for(adapter: &Adapter) -> f64 {
    free_alpha(adapter.layers.iter().map(|l| {
        l.stages
            .iter()
            .map(|s| crate::rotation::skew_norm(&s.q))
            .sum::<f64>()
    }))
}

/// A non-binding `alpha` for every reader: a power of two ≥ 1024 and ≥ 2·‖Q‖_F of any layer
/// (ComfyUI reads it as a raw radius, LyCORIS/kohya as `alpha·out`), exact in fp16/bf16.
pub fn free_alpha(norms: impl Iterator<Item = f64>) -> f64 {
    let worst = norms.fold(0.0, f64::max);
    let mut a = 1024.0;
    while a < 2.0 * worst && a < 1e30 {
        a *= 2.0;
    }
    a
}

/// Error for a conversion that cannot be done, with what works instead.
pub fn refuse(to: To, impossible: &[(String, String)], lossy: &[(String, String)]) -> Error {
    let mut msg = String::new();
    if !impossible.is_empty() {
        msg.push_str(&format!(
            "{} layer(s) cannot be written as {}: ",
            impossible.len(),
            to.name()
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
            to.name(),
            if lossy.len() > 1 { " (and more)" } else { "" }
        ));
    }
    Error::new(Category::Conversion, msg)
}
