//! `oftool inspect`: what an adapter holds, per layer and in total.
//!
//! The JSON form (`--json`) is a stable interface documented in README.md; fields are only
//! ever added.

use crate::error::Result;
use crate::layouts;
use crate::model::{Adapter, Layer, Provenance, ScalePosition, Stage};
use crate::rotation::{max_rotation_angle, orthogonality_error, rotation_block, skew_norm};
use serde::Serialize;
use std::path::Path;

/// One stage of a layer, as `inspect` reports it.
#[derive(Debug, Serialize)]
pub struct StageReport {
    /// Blocks (`null`: a shared block tiling the axis).
    pub blocks: Option<u64>,
    /// Block size.
    pub block_size: u64,
    /// Whether one block is repeated.
    pub shared: bool,
    /// The rotation map (`cayley`, `neumann(5, peft-0.18)`).
    pub map: String,
    /// The wiring (`identity`, `butterfly(peft, 1)`).
    pub wiring: String,
    /// Cut to the rotated axis (format 1.2 `truncated-blocks`, PEFT 0.7–0.13).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

/// A layer's constraint and how much of it Q uses.
#[derive(Debug, Serialize)]
pub struct ConstraintReport {
    /// Whose constraint (`lycoris`, `peft-coft`, …).
    pub kind: String,
    /// `layer` or `block`.
    pub scope: String,
    /// Radius of the Frobenius ball.
    pub radius: f64,
    /// ‖Q‖_F over the layer (scope `layer`) or the largest block norm (scope `block`).
    pub norm: f64,
    /// `norm / radius`: 1.0 means the constraint binds.
    pub usage: f64,
}

/// A layer's row scale.
#[derive(Debug, Serialize)]
pub struct RowScaleReport {
    /// `before` or `after` the stages.
    pub position: String,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
}

/// One layer, as `inspect` reports it.
#[derive(Debug, Serialize)]
pub struct LayerReport {
    /// The target module's name.
    pub target: String,
    /// Its naming convention.
    pub convention: String,
    /// Its pipeline component, when known.
    pub component: Option<String>,
    /// Its module kind (`linear`, `conv`, …).
    pub module: String,
    /// `input` or `output`.
    pub side: String,
    /// Size of the rotated axis, when known.
    pub rotated_dim: Option<u64>,
    /// The rows of the named weight the layer covers (`[start, len]` ranges, in order), when
    /// not all of them (a split of a fused weight).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rows: Option<Vec<crate::model::RowRange>>,
    /// Its stages, in order.
    pub stages: Vec<StageReport>,
    /// Parameters (Q entries and row-scale values).
    pub parameters: u64,
    /// Largest rotation angle of any block, radians (Cayley angle of Q for Neumann stages).
    pub max_angle_rad: f64,
    /// Largest ‖RᵀR − I‖_F of any block (non-zero for Neumann stages), and of a truncated
    /// stage's cut block.
    pub orthogonality_error: f64,
    /// Why the layer's matrix is not orthogonal although its map is exact, when it is not: a
    /// truncated stage whose cut falls inside a block (or whose cut the file does not record).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_orthogonal: Option<String>,
    /// Its constraint, if recorded.
    pub constraint: Option<ConstraintReport>,
    /// Its row scale, if any.
    pub row_scale: Option<RowScaleReport>,
    /// Whether it is bound to a base tensor.
    pub base_binding: bool,
}

/// What an adapter's names say about the model it was trained on.
#[derive(Debug, Serialize)]
pub struct ModelReport {
    /// Family ids (`flux1`, `sd3`, `hunyuan-video`, `qwen-image`): several when the names are
    /// common to them.
    pub families: Vec<String>,
    /// `diffusers` (split q, k, v) or `original` (the single-file layout, fused qkv).
    pub names: String,
}

impl ModelReport {
    fn of(adapter: &Adapter) -> Option<Self> {
        let e =
            crate::resolve::dit::expected(adapter.layers.iter().map(|l| l.target.name.as_str()))?;
        Some(ModelReport {
            families: e.families.iter().map(|f| f.id.to_string()).collect(),
            names: e.layout.as_str().to_string(),
        })
    }
}

/// Figures over all layers.
#[derive(Debug, Serialize)]
pub struct Totals {
    /// Layers.
    pub layers: usize,
    /// Stages.
    pub stages: usize,
    /// Parameters.
    pub parameters: u64,
    /// Largest rotation angle of any block, radians.
    pub max_angle_rad: f64,
    /// Largest ‖RᵀR − I‖_F of any block.
    pub orthogonality_error: f64,
    /// Layers with a constraint.
    pub constrained_layers: usize,
    /// Layers with a row scale.
    pub row_scaled_layers: usize,
}

/// What `inspect` reports (its `--json` output, stable).
#[derive(Debug, Serialize)]
pub struct Report {
    /// The file, as given.
    pub file: String,
    /// The layout's registry id: a `convert --to` value whenever oftool writes that layout.
    pub layout: String,
    /// The finer kind of file within the layout (`diag-oft`), when it has several.
    pub variant: Option<String>,
    /// Where the adapter came from.
    pub provenance: Provenance,
    /// The diffusion-transformer family and base layout its names are in, when they are one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelReport>,
    /// Figures over all layers.
    pub totals: Totals,
    /// Things a user should know about how runtimes treat this adapter (README "Where each
    /// runtime computes something else").
    pub notes: Vec<String>,
    /// Every layer.
    pub layers: Vec<LayerReport>,
}

fn module_name(l: &Layer) -> String {
    serde_json::to_value(l.target.module)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The orthogonality error of a truncated stage's cut block on an axis of `d` features, and
/// the size `p` of the corner kept (`None`: the cut falls on a block boundary).
fn cut_error(s: &Stage, d: u64) -> Option<(f64, usize)> {
    let b = s.spec.block_size;
    let (k, p) = (d / b, (d % b) as usize);
    if p == 0 || s.spec.blocks.is_none_or(|r| k >= r) {
        return None;
    }
    let bs = b as usize;
    let r = rotation_block(s.q_row(k as usize), bs, &s.spec.map);
    let corner: Vec<f64> = (0..p)
        .flat_map(|i| r[i * bs..i * bs + p].to_vec())
        .collect();
    Some((orthogonality_error(&corner, p), p))
}

/// The report of one layer.
pub fn layer_report(layer: &Layer) -> LayerReport {
    let mut max_angle: f64 = 0.0;
    let mut orth: f64 = 0.0;
    let mut not_orthogonal = None;
    for s in &layer.stages {
        let b = s.spec.block_size as usize;
        for k in 0..s.stored_blocks() as usize {
            let tri = s.q_row(k);
            max_angle = max_angle.max(max_rotation_angle(tri, b));
            orth = orth.max(orthogonality_error(&rotation_block(tri, b, &s.spec.map), b));
        }
        if !s.spec.truncated {
            continue;
        }
        let width = s.dim().unwrap_or(0);
        match layer.target.rotated_dim {
            Some(d) => {
                if let Some((err, p)) = cut_error(s, d) {
                    orth = orth.max(err);
                    not_orthogonal = Some(format!(
                        "truncated: the {width}-wide block-diagonal matrix is cut to {d} × {d} \
                         (PEFT 0.7–0.13 with {d} not a multiple of its block size {b}); the cut \
                         keeps the top-left {p} × {p} corner of block {}, which is no rotation \
                         (‖DᵀD−I‖ {err:.2e})",
                        d / b as u64
                    ));
                }
            }
            None => {
                not_orthogonal = Some(format!(
                    "truncated: PEFT 0.7–0.13 cuts the {width}-wide block-diagonal matrix to the \
                     weight's size, which the file does not record; unless that is a multiple of \
                     the block size {b}, the cut block is no rotation (convert --base resolves it)"
                ));
            }
        }
    }
    let constraint = layer.constraint.as_ref().map(|c| {
        let norm = if c.scope == "block" {
            layer
                .stages
                .iter()
                .flat_map(|s| (0..s.stored_blocks() as usize).map(move |k| skew_norm(s.q_row(k))))
                .fold(0.0, f64::max)
        } else {
            let all: Vec<f64> = layer
                .stages
                .iter()
                .flat_map(|s| s.q.iter().copied())
                .collect();
            skew_norm(&all)
        };
        ConstraintReport {
            kind: c.kind.clone(),
            scope: c.scope.clone(),
            radius: c.radius,
            norm,
            usage: if c.radius > 0.0 { norm / c.radius } else { 0.0 },
        }
    });
    let row_scale = layer.row_scale.as_ref().map(|(pos, v)| RowScaleReport {
        position: match pos {
            ScalePosition::Before => "before".into(),
            ScalePosition::After => "after".into(),
        },
        min: v.iter().copied().fold(f64::INFINITY, f64::min),
        max: v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    });
    LayerReport {
        target: layer.target.name.clone(),
        convention: layer.target.convention.clone(),
        component: layer.target.component.clone(),
        module: module_name(layer),
        side: layer.side.as_str().into(),
        rotated_dim: layer.target.rotated_dim,
        rows: layer.target.rows.clone(),
        stages: layer
            .stages
            .iter()
            .map(|s| StageReport {
                blocks: s.spec.blocks,
                block_size: s.spec.block_size,
                shared: s.spec.shared,
                map: s.spec.map.describe(),
                wiring: s.spec.wiring.describe(),
                truncated: s.spec.truncated,
            })
            .collect(),
        parameters: layer.parameter_count(),
        max_angle_rad: max_angle,
        orthogonality_error: orth,
        not_orthogonal,
        constraint,
        row_scale,
        base_binding: layer.base_binding.is_some(),
    }
}

/// The report of `adapter`, read from `file` in `layout` (and `variant`).
pub fn report(file: &Path, layout: &str, variant: Option<&str>, adapter: &Adapter) -> Report {
    let layers: Vec<LayerReport> = adapter.layers.iter().map(layer_report).collect();
    let totals = Totals {
        layers: layers.len(),
        stages: layers.iter().map(|l| l.stages.len()).sum(),
        parameters: layers.iter().map(|l| l.parameters).sum(),
        max_angle_rad: layers.iter().map(|l| l.max_angle_rad).fold(0.0, f64::max),
        orthogonality_error: layers
            .iter()
            .map(|l| l.orthogonality_error)
            .fold(0.0, f64::max),
        constrained_layers: layers.iter().filter(|l| l.constraint.is_some()).count(),
        row_scaled_layers: layers.iter().filter(|l| l.row_scale.is_some()).count(),
    };
    let notes = notes(adapter, &layers);
    Report {
        file: file.display().to_string(),
        layout: layout.into(),
        variant: variant.map(str::to_string),
        provenance: adapter.provenance.clone(),
        model: ModelReport::of(adapter),
        totals,
        notes,
        layers,
    }
}

fn notes(adapter: &Adapter, layers: &[LayerReport]) -> Vec<String> {
    let mut out = Vec::new();
    let scaled = layers
        .iter()
        .filter(|l| l.row_scale.is_some() && l.side == "output")
        .count();
    if scaled > 0 && adapter.provenance.source_format.starts_with("lycoris") {
        out.push(format!(
            "{scaled} layer(s) carry a diag-oft `rescale`: ComfyUI ignores it, so ComfyUI's result differs from LyCORIS's and oftool's"
        ));
    }
    if adapter
        .layers
        .iter()
        .any(|l| l.constraint.as_ref().is_some_and(|c| c.kind == "lycoris"))
    {
        out.push(
            "LyCORIS constraint: the clamp (radius alpha·out_dim) is pre-applied here; ComfyUI reads alpha as a raw radius and clamps differently".into(),
        );
    }
    let fmt = adapter.provenance.source_format.as_str();
    if fmt.starts_with("lycoris") || fmt == "kohya-oft" {
        out.push(
            "ComfyUI squares the LoraLoader strength for diag-oft (W + s²·ΔW) and applies BOFT strength per stage and again to the difference: only strength 1 matches LyCORIS (`oftool merge --blend comfyui` reproduces ComfyUI)".into(),
        );
    }
    if fmt == "kohya-oft" {
        out.push(
            "ComfyUI does not load kohya's `oft_unet_` keys (\"lora key not loaded\"): `oftool convert --to comfyui` renames them exactly".into(),
        );
    }
    if adapter
        .layers
        .iter()
        .any(|l| l.side == crate::model::Side::Input)
    {
        out.push(
            "input-side OFT (PEFT ≥ 0.14, OneTrainer, kohya oft_v2, BOFT): ComfyUI has no native loader; `oftool convert --to onetrainer` is read by the ComfyUI-OFTv2 custom node, or bake it with `oftool merge`".into(),
        );
    }
    let neumann = adapter.layers.iter().any(|l| {
        l.stages
            .iter()
            .any(|s| matches!(s.spec.map, crate::model::RotationMap::Neumann { .. }))
    });
    if neumann {
        let err = layers
            .iter()
            .map(|l| l.orthogonality_error)
            .fold(0.0, f64::max);
        out.push(format!(
            "Cayley–Neumann blocks are not exactly orthogonal (‖RᵀR−I‖ up to {err:.1e}); oftool reproduces them as PEFT computes them"
        ));
    }
    let old_series = adapter.layers.iter().any(|l| {
        l.stages.iter().any(|s| {
            matches!(
                s.spec.map,
                crate::model::RotationMap::Neumann {
                    variant: crate::model::NeumannVariant::Peft016,
                    ..
                }
            )
        })
    });
    if old_series {
        out.push(
            "PEFT 0.16–0.17 Neumann polynomial (the config has no peft_version ≥ 0.18): PEFT ≥ 0.18 would load this file with its newer polynomial and merge slightly different weights".into(),
        );
    }
    out
}

/// Load any supported adapter and build its report.
pub fn run(path: &Path) -> Result<Report> {
    let (found, adapter) = layouts::read(path)?;
    Ok(report(path, found.id(), found.variant(), &adapter))
}

/// A layer's target as the table shows it: with its rows when it covers some of the weight.
fn label(l: &LayerReport) -> String {
    match &l.rows {
        None => l.target.clone(),
        Some(rows) => {
            let r: Vec<String> = rows
                .iter()
                .map(|r| format!("{}..{}", r.start, r.start.saturating_add(r.len)))
                .collect();
            format!("{} [rows {}]", l.target, r.join(", "))
        }
    }
}

/// The human-readable table.
pub fn render(r: &Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let p = &r.provenance;
    let _ = writeln!(s, "{}", r.file);
    let _ = writeln!(
        s,
        "  layout {}{}   source {}{}   {} layers, {} stages, {} parameters",
        r.layout,
        r.variant
            .as_ref()
            .map(|v| format!(" ({v})"))
            .unwrap_or_default(),
        p.source_format,
        p.source_version
            .as_ref()
            .map(|v| format!(" {v}"))
            .unwrap_or_default(),
        r.totals.layers,
        r.totals.stages,
        r.totals.parameters
    );
    let _ = writeln!(
        s,
        "  largest angle {:.4}°   largest ‖RᵀR−I‖ {:.2e}   constrained {}   row-scaled {}",
        r.totals.max_angle_rad.to_degrees(),
        r.totals.orthogonality_error,
        r.totals.constrained_layers,
        r.totals.row_scaled_layers
    );
    if let Some(m) = &r.model {
        let _ = writeln!(
            s,
            "  model {}   {} names (bakes into a diffusers or an original single-file base)",
            m.families.join(" / "),
            m.names
        );
    }
    for n in &r.notes {
        let _ = writeln!(s, "  note: {n}");
    }
    let _ = writeln!(s);
    let width = r
        .layers
        .iter()
        .map(|l| label(l).chars().count())
        .max()
        .unwrap_or(6)
        .clamp(6, 80);
    let _ = writeln!(
        s,
        "  {:<width$}  {:<6}  {:>6}  {:<22}  {:>8}  {:>9}  {:>8}  {:>10}  row scale",
        "target", "side", "dim", "stages (r×b map)", "params", "angle°", "‖RᵀR−I‖", "constraint"
    );
    for l in &r.layers {
        let stages = l
            .stages
            .iter()
            .map(|st| {
                let r = st
                    .blocks
                    .map(|n| n.to_string())
                    .unwrap_or_else(|| "*".into());
                let share = if st.shared { " shared" } else { "" };
                let wiring = if st.wiring == "identity" {
                    String::new()
                } else {
                    format!(" {}", st.wiring)
                };
                let cut = if st.truncated { " cut" } else { "" };
                format!("{r}×{} {}{share}{wiring}{cut}", st.block_size, st.map)
            })
            .collect::<Vec<_>>()
            .join(" → ");
        let constraint = l
            .constraint
            .as_ref()
            .map(|c| format!("{:.0}%", 100.0 * c.usage))
            .unwrap_or_else(|| "-".into());
        let row_scale = l
            .row_scale
            .as_ref()
            .map(|rs| format!("{:.4}..{:.4} {}", rs.min, rs.max, rs.position))
            .unwrap_or_else(|| "-".into());
        let mut target = label(l);
        if target.chars().count() > width {
            let tail: String = target
                .chars()
                .rev()
                .take(width - 1)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            target = format!("…{tail}");
        }
        let _ = writeln!(
            s,
            "  {:<width$}  {:<6}  {:>6}  {:<22}  {:>8}  {:>9.4}  {:>8.1e}  {:>10}  {}",
            target,
            l.side,
            l.rotated_dim
                .map(|d| d.to_string())
                .unwrap_or_else(|| "?".into()),
            stages,
            l.parameters,
            l.max_angle_rad.to_degrees(),
            l.orthogonality_error,
            constraint,
            row_scale
        );
        if let Some(why) = &l.not_orthogonal {
            let _ = writeln!(s, "  {:<width$}  ↳ not orthogonal: {why}", "");
        }
    }
    s
}
