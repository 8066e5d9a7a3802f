//! The canonical adapter model: what a `.oft` file holds, independent of any producer's layout.
//!
//! Every importer maps its producer's parameters onto these types exactly (see
//! `spec/oft-format.md`); every exporter and the bake path read only these types.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

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
    /// `input` or `output`, as in the manifest.
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
    Neumann {
        /// Number of terms n (1 ≤ n ≤ [`MAX_NEUMANN_TERMS`]).
        terms: u32,
        /// Which coefficients.
        variant: NeumannVariant,
    },
}

impl RotationMap {
    /// `cayley` or `neumann(terms, variant)`, as `inspect` shows it.
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
    /// PEFT's `boft` wiring.
    Peft,
    /// LyCORIS's `boft` wiring.
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
        /// Whose wiring.
        producer: WiringProducer,
        /// The stage's place in the factorisation (0 first).
        index: u32,
    },
}

impl Wiring {
    /// `identity` or `butterfly(producer, index)`, as `inspect` shows it.
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
    /// `nn.Linear` (weight `[out, in]`).
    Linear,
    /// `nn.Conv2d` (weight `[out, in, kh, kw]`, rotated over `in·kh·kw`).
    Conv,
    /// `nn.Embedding` (weight `[num_embeddings, dim]`).
    Embedding,
    /// Not recorded: `unknown`, and any value this reader does not know (spec §3.4: treated
    /// as unknown).
    #[default]
    #[serde(other)]
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
    /// Kind of module, when known.
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
    /// First row.
    pub start: u64,
    /// Number of rows.
    pub len: u64,
}

impl RowRange {
    /// One past the last row (`None` on overflow).
    pub fn end(&self) -> Option<u64> {
        self.start.checked_add(self.len)
    }
}

impl Target {
    /// Rows of the layer's 2-D view: `Σ len` of `rows`, else the named weight's first axis
    /// (when its shape is known).
    pub fn view_rows(&self) -> Option<u64> {
        match &self.rows {
            Some(r) => Some(r.iter().fold(0u64, |a, r| a.saturating_add(r.len))),
            None => self.shape.as_ref().and_then(|s| s.first().copied()),
        }
    }
}

/// Whether two targets act on common rows of one weight: the same name and component, and
/// row sets that intersect (a target without `rows` covers every row). Disjoint row slices of
/// one fused weight are independent layers; overlapping ones need `stacked-layers`.
pub fn targets_overlap(a: &Target, b: &Target) -> bool {
    if a.name != b.name || a.component != b.component {
        return false;
    }
    let (Some(ra), Some(rb)) = (&a.rows, &b.rows) else {
        return true;
    };
    ra.iter().any(|x| {
        rb.iter().any(|y| {
            let (xe, ye) = (x.start.saturating_add(x.len), y.start.saturating_add(y.len));
            x.start < ye && y.start < xe
        })
    })
}

/// The first pair of targets (by index) that act on common rows of one weight.
pub fn first_overlap<'a>(targets: impl IntoIterator<Item = &'a Target>) -> Option<(usize, usize)> {
    type Key<'k> = (&'k str, Option<&'k str>);
    let mut by_name: HashMap<Key<'_>, Vec<(usize, &Target)>> = HashMap::new();
    for (i, t) in targets.into_iter().enumerate() {
        let seen = by_name
            .entry((t.name.as_str(), t.component.as_deref()))
            .or_default();
        if let Some(&(j, _)) = seen.iter().find(|(_, u)| targets_overlap(t, u)) {
            return Some((j, i));
        }
        seen.push((i, t));
    }
    None
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
    /// Block size b.
    pub block_size: u64,
    /// Whether one block is repeated along the axis (`block_share`).
    pub shared: bool,
    /// Which features each block acts on.
    pub wiring: Wiring,
    /// How Q becomes the block R.
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
    /// Scale the rows, then apply the stages.
    Before,
    /// Apply the stages, then scale the rows.
    After,
}

/// Where a layer's row scale is stored and applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RowScaleSpec {
    /// The tensor holding it.
    pub tensor: String,
    /// Before or after the stages.
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
    /// The producer's `eps` (PEFT COFT), as recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eps: Option<f64>,
}

/// Proof of which base tensor an adapter layer was made for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseBinding {
    /// blake3 of the tensor's stored bytes, 64 lowercase hex digits.
    pub blake3: String,
    /// The tensor's dtype (`F16`, `BF16`, …).
    pub dtype: String,
    /// The tensor's full shape.
    pub shape: Vec<u64>,
}

/// One layer of the manifest (spec §3.3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerSpec {
    /// The module it adapts.
    pub target: Target,
    /// Which side of the weight it rotates.
    pub side: Side,
    /// Its stages, applied in order.
    pub stages: Vec<StageSpec>,
    /// Its row scale, if any.
    #[serde(default)]
    pub row_scale: Option<RowScaleSpec>,
    /// The producer's constraint, if recorded.
    #[serde(default)]
    pub constraint: Option<Constraint>,
    /// The base tensor it was made for, if bound.
    #[serde(default)]
    pub base_binding: Option<BaseBinding>,
}

/// Where an adapter came from (spec §3.2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Provenance {
    /// The layout it was read from.
    pub source_format: String,
    /// The producer's version, when known.
    #[serde(default)]
    pub source_version: Option<String>,
    /// The tool that wrote the `.oft` (`oftool X.Y.Z`).
    pub tool: String,
    /// When the `.oft` was written (RFC 3339 UTC).
    #[serde(default)]
    pub created: Option<String>,
    /// blake3 of the source file, when known.
    #[serde(default)]
    pub source_digest: Option<String>,
    /// The source's own metadata (training settings), kept as text.
    #[serde(default)]
    pub user_metadata: BTreeMap<String, String>,
}

/// The JSON manifest stored in `oft.manifest`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always `oft`.
    pub format: String,
    /// `MAJOR.MINOR`.
    pub version: String,
    /// Features beyond 1.0 the file uses.
    #[serde(default)]
    pub requires: Vec<String>,
    /// Where the adapter came from.
    pub provenance: Provenance,
    /// Its layers.
    pub layers: Vec<LayerSpec>,
}

/// Values of one stage: packed triangles, one row per stored block.
#[derive(Debug, Clone, PartialEq)]
pub struct Stage {
    /// Its structure.
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
    /// A stage of `blocks` blocks of size `block_size`, not shared, identity wiring, Cayley
    /// map, holding `q` (`blocks · b(b−1)/2` values; not checked here: whatever reads the stage
    /// checks it) as f64.
    pub fn cayley(blocks: u64, block_size: u64, q: Vec<f64>) -> Stage {
        Stage {
            spec: StageSpec {
                blocks: Some(blocks),
                block_size,
                shared: false,
                truncated: false,
                wiring: Wiring::Identity,
                map: RotationMap::Cayley,
                q: String::new(),
            },
            q,
            q_f64: true,
            inverse: false,
        }
    }

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

    /// Length of one packed triangle, `b(b−1)/2`.
    pub fn tri_len(&self) -> usize {
        crate::rotation::tri_len(self.spec.block_size as usize)
    }

    /// Packed triangle of stored block `k` (empty when `q` holds no such block).
    pub fn q_row(&self, k: usize) -> &[f64] {
        let n = self.tri_len();
        let k = if self.spec.shared { 0 } else { k };
        k.checked_mul(n)
            .and_then(|start| self.q.get(start..start.checked_add(n)?))
            .unwrap_or(&[])
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
    /// The module it adapts.
    pub target: Target,
    /// Which side of the weight it rotates.
    pub side: Side,
    /// Its stages, applied in order.
    pub stages: Vec<Stage>,
    /// Its row scale and where it applies, if any.
    pub row_scale: Option<(ScalePosition, Vec<f64>)>,
    /// Whether the row scale must be written as f64.
    pub row_scale_f64: bool,
    /// The producer's constraint, if recorded.
    pub constraint: Option<Constraint>,
    /// The base tensor it was made for, if bound.
    pub base_binding: Option<BaseBinding>,
}

impl Layer {
    /// Parameters: Q entries and row-scale values.
    pub fn parameter_count(&self) -> u64 {
        let q: u64 = self.stages.iter().map(|s| s.q.len() as u64).sum();
        q + self.row_scale.as_ref().map_or(0, |(_, v)| v.len() as u64)
    }
}

/// A whole adapter in canonical form.
#[derive(Debug, Clone, PartialEq)]
pub struct Adapter {
    /// Where it came from.
    pub provenance: Provenance,
    /// Its layers.
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

/// The `format` value of a `.oft` file.
pub const FORMAT_NAME: &str = "oft";
/// The version this oftool writes when no feature needs more.
pub const FORMAT_VERSION: &str = "1.0";
/// Format 1.1 feature: several layers may act on the same weight; they apply in file order.
pub const FEATURE_STACKED_LAYERS: &str = "stacked-layers";
/// Format 1.2 feature: a layer covers listed rows of the weight it names (`target.rows`).
pub const FEATURE_ROW_SLICES: &str = "row-slices";
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
    (FEATURE_ROW_SLICES, "1.2"),
    (FEATURE_UNIT_BLOCKS, "1.2"),
    (FEATURE_TRUNCATED_BLOCKS, "1.2"),
];
/// Features this reader implements (a file whose `requires` lists anything else is refused).
pub const KNOWN_FEATURES: &[&str] = &[
    FEATURE_STACKED_LAYERS,
    FEATURE_ROW_SLICES,
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

/// `oftool X.Y.Z`, as recorded in `provenance.tool`.
pub fn tool_name() -> String {
    format!("oftool {}", env!("CARGO_PKG_VERSION"))
}
