//! The canonical adapter model: what a `.oft` file holds, independent of any producer's layout.
//!
//! Every importer maps its producer's parameters onto these types exactly (see
//! `spec/oft-format.md`); every exporter and the bake path read only these types.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Which axis of the 2-D weight view a layer rotates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// Axis 1 (flattened columns): each stage does `W ← W · Eᵀ`.
    Input,
    /// Axis 0 (rows): each stage does `W ← Eᵀ · W`.
    Output,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Input => "input",
            Side::Output => "output",
        }
    }
}

/// Coefficient variant of PEFT's truncated Cayley–Neumann series.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NeumannVariant {
    /// PEFT 0.16–0.17: `I + 2·Σ_{k=1}^{n−1} Qᵏ`.
    #[serde(rename = "peft-0.16")]
    Peft016,
    /// PEFT ≥ 0.18: `I + 2·Σ_{k=1}^{n−2} Qᵏ + Q^{n−1}` (n ≥ 3).
    #[serde(rename = "peft-0.18")]
    Peft018,
}

/// How a stage turns its skew-symmetric Q into the block R.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum RotationMap {
    /// Exact Cayley transform `R = (I + Q)(I − Q)⁻¹`.
    Cayley,
    /// Truncated series approximating the Cayley transform (not orthogonal: reproduced as is).
    Neumann { terms: u32, variant: NeumannVariant },
}

impl RotationMap {
    pub fn describe(&self) -> String {
        match self {
            RotationMap::Cayley => "cayley".to_string(),
            RotationMap::Neumann { terms, variant } => {
                let v = match variant {
                    NeumannVariant::Peft016 => "peft-0.16",
                    NeumannVariant::Peft018 => "peft-0.18",
                };
                format!("neumann({terms}, {v})")
            }
        }
    }
}

/// Producer whose butterfly wiring a stage uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WiringProducer {
    Peft,
    Lycoris,
}

/// Which global indices each block of a stage acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Wiring {
    /// Block k acts on indices `[k·b, (k+1)·b)`.
    Identity,
    /// Stage `index` of a butterfly factorisation, as wired by `producer`.
    Butterfly {
        producer: WiringProducer,
        index: u32,
    },
}

impl Wiring {
    pub fn describe(&self) -> String {
        match self {
            Wiring::Identity => "identity".to_string(),
            Wiring::Butterfly { producer, index } => {
                let p = match producer {
                    WiringProducer::Peft => "peft",
                    WiringProducer::Lycoris => "lycoris",
                };
                format!("butterfly({p}, {index})")
            }
        }
    }
}

/// Kind of module the target weight belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ModuleKind {
    Linear,
    Conv,
    Embedding,
    #[default]
    Unknown,
}

/// The module a layer adapts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Target {
    /// Module name as the source names it (without the tensor suffix).
    pub name: String,
    /// Naming convention of `name`: diffusers, kohya, peft, comfyui, ldm, transformers, unknown.
    pub convention: String,
    /// Pipeline component (unet, text_encoder, text_encoder_2, transformer), when known.
    #[serde(default)]
    pub component: Option<String>,
    #[serde(default)]
    pub module: ModuleKind,
    /// Full expected weight shape, when the source records it.
    #[serde(default)]
    pub shape: Option<Vec<u64>>,
    /// Size of the rotated (flattened) axis; `None` only when every stage is shared and the
    /// source does not record the target's dimension (PEFT `block_share`).
    #[serde(default)]
    pub rotated_dim: Option<u64>,
    /// The rows of the named weight this layer covers, in this order (a split of a fused
    /// tensor, or rows stored in another order); `None`: every row, in stored order. With
    /// `rows`, `shape` is the named (whole) weight's shape and `rotated_dim` the size of the
    /// rotated axis of the sliced view.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<Vec<RowRange>>,
}

/// `len` rows starting at row `start` (serialised as `[start, len]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "[u64; 2]", into = "[u64; 2]")]
pub struct RowRange {
    pub start: u64,
    pub len: u64,
}

impl From<[u64; 2]> for RowRange {
    fn from([start, len]: [u64; 2]) -> Self {
        RowRange { start, len }
    }
}

impl From<RowRange> for [u64; 2] {
    fn from(r: RowRange) -> Self {
        [r.start, r.len]
    }
}

/// One block-diagonal rotation stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageSpec {
    /// Number of blocks r; `None` only for a shared stage whose source does not say how many
    /// times the block repeats: it then tiles the whole rotated axis (d / b blocks).
    pub blocks: Option<u64>,
    pub block_size: u64,
    pub shared: bool,
    pub wiring: Wiring,
    pub map: RotationMap,
    /// Name of the tensor holding the packed strict upper triangles.
    pub q: String,
    /// Format 1.2 `truncated-blocks`: the block-diagonal matrix is `r·b` wide, more than the
    /// rotated axis `d`, and is cut to its top-left `d × d` corner (PEFT 0.7–0.13 with
    /// `d % r ≠ 0`); the cut matrix is in general not orthogonal. Identity wiring only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

/// Where the per-row scale is applied relative to the stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScalePosition {
    Before,
    After,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RowScaleSpec {
    pub tensor: String,
    pub position: ScalePosition,
}

/// The producer's constraint (COFT), informational: stored Q already satisfies it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Constraint {
    /// lycoris, peft-coft, kohya, comfyui-raw.
    pub kind: String,
    /// Radius of the Frobenius ball Q was clamped or projected onto.
    pub radius: f64,
    /// `layer` (one norm over all blocks) or `block` (per block).
    pub scope: String,
    /// The producer's raw parameter (alpha or eps) as recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpha: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eps: Option<f64>,
}

/// Proof of which base tensor an adapter layer was made for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseBinding {
    pub blake3: String,
    pub dtype: String,
    pub shape: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerSpec {
    pub target: Target,
    pub side: Side,
    pub stages: Vec<StageSpec>,
    #[serde(default)]
    pub row_scale: Option<RowScaleSpec>,
    #[serde(default)]
    pub constraint: Option<Constraint>,
    #[serde(default)]
    pub base_binding: Option<BaseBinding>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Provenance {
    pub source_format: String,
    #[serde(default)]
    pub source_version: Option<String>,
    pub tool: String,
    #[serde(default)]
    pub created: Option<String>,
    #[serde(default)]
    pub source_digest: Option<String>,
    #[serde(default)]
    pub user_metadata: BTreeMap<String, String>,
}

/// The JSON manifest stored in `oft.manifest`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: String,
    #[serde(default)]
    pub requires: Vec<String>,
    pub provenance: Provenance,
    pub layers: Vec<LayerSpec>,
}

/// Values of one stage: packed triangles, one row per stored block.
#[derive(Debug, Clone, PartialEq)]
pub struct Stage {
    pub spec: StageSpec,
    /// Row-major `[stored_blocks, b(b−1)/2]`.
    pub q: Vec<f64>,
    /// Whether `q` must be written as f64 (it is not exactly representable in f32).
    pub q_f64: bool,
    /// Apply the inverse of each block (runtime only, for `unmerge` of Neumann stages, whose
    /// inverse is no Neumann polynomial). Never written to a file.
    pub inverse: bool,
}

impl Stage {
    /// Number of stored Q rows (1 when shared).
    pub fn stored_blocks(&self) -> u64 {
        if self.spec.shared {
            1
        } else {
            self.spec.blocks.unwrap_or(1)
        }
    }

    /// Number of blocks on an axis of `axis` features: the recorded count, or for an unsized
    /// shared stage as many as tile the axis.
    pub fn blocks_on(&self, axis: u64) -> u64 {
        self.spec
            .blocks
            .unwrap_or(axis / self.spec.block_size.max(1))
    }

    pub fn tri_len(&self) -> usize {
        crate::rotation::tri_len(self.spec.block_size as usize)
    }

    /// Packed triangle of stored block `k`.
    pub fn q_row(&self, k: usize) -> &[f64] {
        let n = self.tri_len();
        let k = if self.spec.shared { 0 } else { k };
        &self.q[k * n..(k + 1) * n]
    }

    /// Rotated dimension r·b, when the block count is recorded (for a truncated stage, the
    /// width before the cut).
    pub fn dim(&self) -> Option<u64> {
        self.spec.blocks.map(|r| r * self.spec.block_size)
    }

    /// A truncated stage on an axis of `axis` features whose cut falls on a block boundary
    /// (`axis` a multiple of `b`) is an ordinary stage of `axis / b` blocks: the blocks past the
    /// cut have no effect and are dropped. Any other stage is left as it is.
    pub fn settle_cut(&mut self, axis: u64) {
        let b = self.spec.block_size;
        let Some(r) = self.spec.blocks else { return };
        if !self.spec.truncated || b == 0 || !axis.is_multiple_of(b) || axis / b > r || axis == 0 {
            return;
        }
        let keep = axis / b;
        if !self.spec.shared {
            self.q.truncate(keep as usize * self.tri_len());
        }
        self.spec.blocks = Some(keep);
        self.spec.truncated = false;
    }

    /// Whether the stage acts on an axis of `axis` features: `r·b = axis`, or for a truncated
    /// stage `r·b ≥ axis ≥ 1` (the cut keeps the top-left `axis × axis` corner).
    pub fn fits_axis(&self, axis: u64) -> bool {
        let n = self.blocks_on(axis).checked_mul(self.spec.block_size);
        n == Some(axis) || (self.spec.truncated && axis >= 1 && n.is_some_and(|n| n > axis))
    }
}

/// A layer with its values.
#[derive(Debug, Clone, PartialEq)]
pub struct Layer {
    pub target: Target,
    pub side: Side,
    pub stages: Vec<Stage>,
    pub row_scale: Option<(ScalePosition, Vec<f64>)>,
    pub row_scale_f64: bool,
    pub constraint: Option<Constraint>,
    pub base_binding: Option<BaseBinding>,
}

impl Layer {
    pub fn parameter_count(&self) -> u64 {
        let q: u64 = self.stages.iter().map(|s| s.q.len() as u64).sum();
        q + self.row_scale.as_ref().map_or(0, |(_, v)| v.len() as u64)
    }
}

/// A whole adapter in canonical form.
#[derive(Debug, Clone, PartialEq)]
pub struct Adapter {
    pub provenance: Provenance,
    pub layers: Vec<Layer>,
    /// Features beyond format 1.0 that the adapter uses (written to `requires`).
    pub features: Vec<String>,
}

/// Largest rotated dimension (blocks × block size) any reader accepts: far above any model's
/// layer (Flux's widest is 12 288 features, its `linear1` in·k·k 3 072), small enough that no
/// count a file claims can make a reader allocate without bound.
pub const MAX_DIM: u64 = 1 << 24;
/// Most Cayley–Neumann terms accepted (PEFT uses 5; each term is a b × b product).
pub const MAX_NEUMANN_TERMS: u32 = 64;

/// Whether `blocks × block_size` stays within [`MAX_DIM`].
pub fn dim_ok(blocks: Option<u64>, block_size: u64) -> bool {
    block_size <= MAX_DIM
        && blocks
            .unwrap_or(1)
            .checked_mul(block_size)
            .is_some_and(|d| d <= MAX_DIM)
}

pub const FORMAT_NAME: &str = "oft";
pub const FORMAT_VERSION: &str = "1.0";
/// Format 1.1 feature: several layers may act on the same weight; they apply in file order.
pub const FEATURE_STACKED_LAYERS: &str = "stacked-layers";
/// Format 1.2 feature: a stage may have block size 1 (`q` of shape `[r, 0]`): each block is
/// the 1 × 1 identity, so the stage leaves the weight unchanged and the layer's row scale, if
/// any, is its whole effect (LyCORIS, PEFT, OneTrainer and kohya write such layers).
pub const FEATURE_UNIT_BLOCKS: &str = "unit-blocks";
/// Format 1.2 feature: a stage may be `truncated`: its block-diagonal matrix, `r·b` wide, is cut
/// to the top-left `d × d` corner of the rotated axis (PEFT 0.7–0.13 with `d % r ≠ 0`).
pub const FEATURE_TRUNCATED_BLOCKS: &str = "truncated-blocks";
/// Every feature this reader implements, with the format version that defines it (a file whose
/// `requires` lists anything else is refused; a writer writes the highest version its features
/// need, `1.0` without any).
pub const FEATURES: &[(&str, &str)] = &[
    (FEATURE_STACKED_LAYERS, "1.1"),
    (FEATURE_UNIT_BLOCKS, "1.2"),
    (FEATURE_TRUNCATED_BLOCKS, "1.2"),
];
/// Features this reader implements (a file whose `requires` lists anything else is refused).
pub const KNOWN_FEATURES: &[&str] = &[
    FEATURE_STACKED_LAYERS,
    FEATURE_UNIT_BLOCKS,
    FEATURE_TRUNCATED_BLOCKS,
];

/// The lowest format version that defines every feature in `requires` (`1.0` for none).
pub fn version_for(requires: &[String]) -> &'static str {
    requires
        .iter()
        .filter_map(|f| FEATURES.iter().find(|(n, _)| n == f).map(|(_, v)| *v))
        .max_by_key(|v| v.split_once('.').and_then(|(_, m)| m.parse::<u32>().ok()))
        .unwrap_or(FORMAT_VERSION)
}

pub fn tool_name() -> String {
    format!("oftool {}", env!("CARGO_PKG_VERSION"))
}
