//! `oft_blocks` modules: `<module>.oft_blocks` `[N, b, b]` (LyCORIS diag-oft, kohya legacy) or
//! `[m, N, b, b]` (LyCORIS BOFT), `<module>.alpha` (the constraint), and (LyCORIS) an optional
//! `<module>.rescale` `[out, 1, …]`.
//!
//! Every producer computes `Q = B − Bᵀ`, clamps `‖Q‖_F` over the whole layer, and rotates the
//! output rows with `Cay+`. diag-oft and kohya merge `W' = BD(R)ᵀ·W`, which is the canonical
//! output side with `Q_c = Q`; LyCORIS BOFT applies each stage as `R_i` (not `R_iᵀ`) on its
//! wiring, so `Q_c = −Q`. The producer's clamp is pre-applied; `rescale` multiplies rows after
//! the stages.
//!
//! Runtimes read the same files differently ([`Semantics`]): A1111 uses kohya's clamp factor;
//! ComfyUI clamps to the raw `alpha` and ignores diag-oft `rescale`.
//!
//! Writing: `B` holds `Q` split in two binary32 halves ([`two_part`]) so that `B − Bᵀ` gives the
//! canonical `Q` back exactly; `alpha` is a power of two no reader's clamp reaches
//! ([`free_alpha`], formats.md §14 note 1).

use crate::error::{Error, Result};
use crate::layouts::Source;
use crate::layouts::common::{self, finite};
use crate::layouts::report::{self, Context, Mapped, Mapping, f32_tensor};
use crate::model::*;
use crate::rotation::skew_norm;
use crate::tensors::to_f64;
use safetensors::SafeTensors;
use safetensors::tensor::TensorView;
use std::path::Path;

/// The tensors of an `oft_blocks` module.
pub const SUFFIXES: [&str; 3] = [".oft_blocks", ".alpha", ".rescale"];
/// What messages call such a file.
pub const WHAT: &str = "`oft_blocks`";

/// Whose reading of an `oft_blocks` file to reproduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Semantics {
    /// The producer's own (LyCORIS, kohya).
    #[default]
    Producer,
    /// AUTOMATIC1111's `network_oft.py`: kohya's clamp factor, applied iff `alpha·out ≠ 0`.
    A1111,
    /// ComfyUI's weight adapters: radius = raw `alpha`; diag-oft `rescale` ignored.
    ComfyUi,
}

/// Which producer's module the blocks are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    /// LyCORIS diag-oft `[N, b, b]`.
    DiagOft,
    /// LyCORIS BOFT `[m, N, b, b]`.
    Boft,
    /// kohya's legacy `networks.oft` `[N, b, b]`, clamped always.
    KohyaLegacy,
}

/// The clamp each reader applies to the layer's `Q` (all blocks, all stages together).
fn clamp(
    q: &mut [f64],
    alpha: f64,
    out: f64,
    family: Family,
    semantics: Semantics,
) -> Option<Constraint> {
    let norm = skew_norm(q);
    let kohya_factor = |c: f64| (norm.min(c) + 1e-8) / (norm + 1e-8);
    let radius_factor = |c: f64| (c > 0.0 && norm + 1e-8 > c).then(|| c / (norm + 1e-8));
    let (kind, radius, factor) = match (family, semantics) {
        // kohya legacy clamps always (alpha 0 turns the rotation off).
        (Family::KohyaLegacy, Semantics::Producer) => {
            ("kohya", alpha * out, Some(kohya_factor(alpha * out)))
        }
        (_, Semantics::A1111) => {
            let c = alpha * out;
            ("kohya", c, (c != 0.0).then(|| kohya_factor(c)))
        }
        (_, Semantics::ComfyUi) => ("comfyui-raw", alpha, radius_factor(alpha)),
        (_, Semantics::Producer) => ("lycoris", alpha * out, radius_factor(alpha * out)),
    };
    if let Some(f) = factor {
        q.iter_mut().for_each(|x| *x *= f);
    }
    (radius != 0.0 || family == Family::KohyaLegacy).then(|| Constraint {
        kind: kind.into(),
        radius,
        scope: "layer".into(),
        alpha: Some(alpha),
        eps: None,
    })
}

/// The modules of an `oft_blocks` file; any other tensor is refused by name.
pub fn modules(path: &Path, st: &SafeTensors<'_>) -> Result<Vec<String>> {
    common::modules(path, st, &SUFFIXES, WHAT)
}

/// A module's `oft_blocks` as `(stages m, blocks N, block size b)`, checked against `family`.
fn block_shape(
    path: &Path,
    module: &str,
    family: Family,
    shape: &[usize],
) -> Result<(usize, usize, usize)> {
    let fits = match family {
        Family::Boft => common::stacked_blocks(shape),
        Family::DiagOft | Family::KohyaLegacy => {
            common::square_blocks(shape).map(|(n, b)| (1, n, b))
        }
    };
    fits.ok_or_else(|| {
        Error::format(
            path,
            format!(
                "`{module}.oft_blocks` has shape {shape:?}; expected [N, b, b] (diag-oft, kohya) or [m, N, b, b] (BOFT) with N, b ≥ 1"
            ),
        )
    })
}

/// A module's `alpha` (`None`: LyCORIS 2.1 wrote none).
fn read_alpha(path: &Path, module: &str, view: Option<TensorView<'_>>) -> Result<Option<f64>> {
    let Some(view) = view else { return Ok(None) };
    let name = format!("{module}.alpha");
    match finite(path, &name, to_f64(&view, module)?)?.as_slice() {
        [a] => Ok(Some(*a)),
        more => Err(Error::format(
            path,
            format!("`{name}` must hold one value, holds {}", more.len()),
        )),
    }
}

/// A row scale and where it applies.
type RowScale = (ScalePosition, Vec<f64>);

/// A module's `rescale` as a row scale (`None` where the reader ignores it) and the module kind
/// its rank tells.
fn read_rescale(
    path: &Path,
    module: &str,
    view: Option<TensorView<'_>>,
    out: usize,
    applied: bool,
) -> Result<(Option<RowScale>, ModuleKind)> {
    let Some(view) = view else {
        return Ok((None, ModuleKind::Unknown));
    };
    let rs = view.shape();
    if rs.first() != Some(&out) || rs.iter().skip(1).any(|&d| d != 1) {
        return Err(Error::format(
            path,
            format!("`{module}.rescale` has shape {rs:?}; expected [{out}, 1, …]"),
        ));
    }
    // LyCORIS 2.1 stored `rescale` as [out]; 2.1.0.post1 applies it to rows like the later
    // [out, 1, …] (2.1.0 itself broadcast it wrongly).
    let kind = match rs.len() {
        2 => ModuleKind::Linear,
        4 => ModuleKind::Conv,
        _ => ModuleKind::Unknown,
    };
    let vals = finite(path, &format!("{module}.rescale"), to_f64(&view, module)?)?;
    Ok((applied.then_some((ScalePosition::After, vals)), kind))
}

/// The canonical stages of a clamped `Q` of `m` stages of `nb` blocks of `b`.
fn stages(q: &[f64], m: usize, nb: usize, b: usize, family: Family) -> Vec<Stage> {
    let tri = b * (b - 1) / 2;
    (0..m)
        .map(|i| {
            let mut qi = q[i * nb * tri..(i + 1) * nb * tri].to_vec();
            let wiring = if family == Family::Boft {
                // LyCORIS applies R_i itself: the canonical stage stores −Q.
                qi.iter_mut().for_each(|x| *x = -*x);
                Wiring::Butterfly {
                    producer: WiringProducer::Lycoris,
                    index: i as u32,
                }
            } else {
                Wiring::Identity
            };
            Stage {
                spec: StageSpec {
                    truncated: false,
                    blocks: Some(nb as u64),
                    block_size: b as u64,
                    shared: false,
                    wiring,
                    map: RotationMap::Cayley,
                    q: String::new(),
                },
                q: qi,
                q_f64: true,
                inverse: false,
            }
        })
        .collect()
}

/// One module as its `family`'s producer (or `src.semantics`' runtime) computes it; `true` when
/// it carries no `alpha`.
pub fn read_layer(
    src: &Source<'_>,
    st: &SafeTensors<'_>,
    module: &str,
    family: Family,
) -> Result<(Layer, bool)> {
    read_blocks(src, st, module, "oft_blocks", family)
}

/// [`read_layer`] with the blocks under `module.<blocks>` (kohya's Flux splits:
/// `oft_blocks.<i>`, each read as a layer of its own).
pub fn read_blocks(
    src: &Source<'_>,
    st: &SafeTensors<'_>,
    module: &str,
    blocks: &str,
    family: Family,
) -> Result<(Layer, bool)> {
    let path = src.path;
    let get = |s: &str| st.tensor(&format!("{module}.{s}")).ok();
    let blocks_view = get(blocks).ok_or_else(|| {
        Error::format(
            path,
            format!("`{module}` has `alpha`/`rescale` but no `{blocks}`"),
        )
    })?;
    let (m, nb, b) = block_shape(path, module, family, blocks_view.shape())?;
    let out = nb * b;
    let raw = finite(
        path,
        &format!("{module}.{blocks}"),
        to_f64(&blocks_view, module)?,
    )?;
    // LyCORIS 2.1 wrote no `alpha`: it clamped with the training-time `constraint`, which
    // defaults to 0 (no clamp); such files are read as unconstrained.
    let alpha = read_alpha(path, module, get("alpha"))?;
    let mut q = common::skew_blocks(&raw, b, 1.0);
    let constraint = clamp(
        &mut q,
        alpha.unwrap_or(0.0),
        out as f64,
        family,
        src.semantics,
    );
    // ComfyUI loads diag-oft `rescale` but never applies it (BOFT it does apply).
    let applied = src.semantics != Semantics::ComfyUi || family == Family::Boft;
    let (row_scale, module_kind) = read_rescale(path, module, get("rescale"), out, applied)?;
    let (convention, component) = crate::layouts::names::classify(module);
    let layer = Layer {
        target: Target {
            name: module.to_string(),
            convention: convention.into(),
            component: component.map(str::to_string),
            module: module_kind,
            shape: None,
            rotated_dim: Some(out as u64),
            rows: None,
        },
        side: Side::Output,
        stages: stages(&q, m, nb, b, family),
        row_scale,
        row_scale_f64: false,
        constraint,
        base_binding: None,
    };
    Ok((layer, alpha.is_none()))
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

/// Dense `b × b` blocks `B` with `B − Bᵀ` = the skew matrix of each of the `n` packed rows of
/// `q`, and the packed rows `B − Bᵀ` gives back (blocks of size 1 are a zero `[[0]]`).
pub fn blocks_from_packed(q: &[f64], b: usize, n: usize) -> (Vec<f64>, Vec<f64>) {
    let tri = b * (b - 1) / 2;
    let mut dense = Vec::with_capacity(n * b * b);
    let mut denoted = Vec::with_capacity(q.len());
    for row in (0..n).map(|k| &q[k * tri..(k + 1) * tri]) {
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

/// Which `oft_blocks` module a layer's stages fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// One block-diagonal stage: `[N, b, b]`.
    Diag,
    /// LyCORIS's butterfly: `[m, N, b, b]`.
    Boft,
}

const OUTPUT_SIDE_ONLY: &str = "it rotates the input columns (PEFT ≥ 0.14, OneTrainer, kohya oft_v2, BOFT), \
     and an input-side rotation is no output-side one: LyCORIS/ComfyUI `oft_blocks` rotate output rows. \
     For ComfyUI use --to onetrainer (read by the ComfyUI-OFTv2 custom node), bake the adapter \
     (oftool merge) and load the checkpoint, or write a LoRA (convert --to lora --base BASE)";

/// The module shape a layer fits, or why none does.
pub fn fit(layer: &Layer) -> std::result::Result<Shape, String> {
    if layer.side != Side::Output {
        return Err(OUTPUT_SIDE_ONLY.to_string());
    }
    let identity = layer.stages.len() == 1 && layer.stages[0].spec.wiring == Wiring::Identity;
    let lycoris_bf = layer.stages.iter().enumerate().all(|(i, s)| {
        s.spec.wiring
            == Wiring::Butterfly {
                producer: WiringProducer::Lycoris,
                index: i as u32,
            }
    }) && layer.stages.windows(2).all(|w| {
        w[0].spec.block_size == w[1].spec.block_size && w[0].spec.blocks == w[1].spec.blocks
    });
    if identity {
        Ok(Shape::Diag)
    } else if lycoris_bf {
        Ok(Shape::Boft)
    } else if layer
        .stages
        .iter()
        .all(|s| s.spec.wiring == Wiring::Identity)
    {
        Err(format!(
            "{} stacked block-diagonal stages are no single LyCORIS module; \
             `oftool compose --collapse` first multiplies stages with one partition",
            layer.stages.len()
        ))
    } else {
        Err(
            "its butterfly wiring is not LyCORIS's (PEFT and LyCORIS BOFT pair different indices)"
                .into(),
        )
    }
}

/// A layer's stages as `oft_blocks` values of `shape`.
pub struct Encoded {
    /// `[m ·] N · b · b` values, stage after stage.
    pub values: Vec<f64>,
    /// Blocks per stage (a shared block expanded over the axis).
    pub blocks: usize,
    pub block_size: usize,
    /// The layer with the stages its `oft_blocks` denote (exact Cayley; rounding of the halves).
    pub denoted: Layer,
    pub lossy: Vec<String>,
}

/// Encode a layer's stages as `oft_blocks` of `shape` for `tool` (named in a lossy reason: it
/// computes the exact Cayley map).
pub fn encode(layer: &Layer, shape: Shape, tool: &str) -> std::result::Result<Encoded, String> {
    let mut lossy = Vec::new();
    let mut denoted = layer.clone();
    let mut values = Vec::new();
    let b = layer.stages[0].spec.block_size as usize;
    let mut blocks = 0;
    for (i, stage) in layer.stages.iter().enumerate() {
        let (mut q, n) =
            report::expanded_rows(stage, layer.target.rotated_dim).ok_or(report::UNKNOWN_REPEAT)?;
        blocks = n;
        let sign = if shape == Shape::Boft { -1.0 } else { 1.0 };
        q.iter_mut().for_each(|x| *x *= sign);
        let (dense, back) = blocks_from_packed(&q, b, n);
        values.extend(dense);
        let back = back.iter().map(|x| sign * x).collect();
        report::cayley_stage(&mut denoted.stages[i], back, blocks, true, tool, &mut lossy);
    }
    denoted.row_scale_f64 = false;
    denoted.constraint = None;
    Ok(Encoded {
        values,
        blocks,
        block_size: b,
        denoted,
        lossy,
    })
}

/// One layer as a LyCORIS module under `name` (`alpha` inert); `diag_rescale_ignored` is the
/// reason a reader that does not apply diag-oft `rescale` gives (ComfyUI), `None` for LyCORIS.
pub fn map_layer(
    layer: &Layer,
    name: String,
    alpha: f64,
    ctx: &Context<'_>,
    diag_rescale_ignored: Option<&str>,
) -> Mapped {
    let shape = fit(layer)?;
    let mut e = encode(layer, shape, "LyCORIS")?;
    let (m, n, b) = (layer.stages.len(), e.blocks, e.block_size);
    let block_shape = match shape {
        Shape::Diag => vec![n, b, b],
        Shape::Boft => vec![m, n, b, b],
    };
    let mut tensors = vec![
        f32_tensor(format!("{name}.oft_blocks"), block_shape, &e.values)?,
        f32_tensor(format!("{name}.alpha"), vec![], &[alpha])?,
    ];
    match &layer.row_scale {
        None => {}
        Some((ScalePosition::Before, _)) => {
            e.denoted.row_scale = None;
            e.lossy.push(
                "its row scale applies before the rotation (LyCORIS 2.0 `oft_diag`); `rescale` \
                 applies after it, so the scale is dropped"
                    .into(),
            );
        }
        Some((ScalePosition::After, s)) => {
            let conv = report::is_conv(layer, ctx.sd1)
                .map_err(|e| format!("`rescale` needs the weight's rank: {e}"))?;
            let mut rs_shape = vec![s.len(), 1];
            if conv {
                rs_shape.extend([1, 1]);
            }
            tensors.push(f32_tensor(format!("{name}.rescale"), rs_shape, s)?);
            let back: Vec<f64> = s.iter().map(|&v| v as f32 as f64).collect();
            e.denoted.row_scale = Some((ScalePosition::After, back));
            if let (Some(why), Shape::Diag) = (diag_rescale_ignored, shape) {
                e.denoted.row_scale = None;
                e.lossy.push(why.into());
            }
        }
    }
    Ok(Mapping {
        name,
        tensors,
        denoted: e.denoted,
        lossy: e.lossy,
    })
}

/// What an `oft_blocks` file holds, for its metadata and warnings.
#[derive(Debug, Default)]
pub struct Holds {
    pub diag: bool,
    pub boft: bool,
    pub rescaled: bool,
}

/// Every layer of `adapter` as LyCORIS modules under kohya names (one module per weight), with
/// `lycoris.kohya` metadata: what LyCORIS and ComfyUI load. See [`map_layer`] for
/// `diag_rescale_ignored`.
pub fn write(
    adapter: &Adapter,
    ctx: &Context<'_>,
    diag_rescale_ignored: Option<&str>,
) -> (report::Written, Holds) {
    let te_count = crate::layouts::names::te_count(adapter);
    let alpha = free_alpha_for(adapter);
    let mut seen = std::collections::HashSet::new();
    let (tensors, mapped) = report::map_layers(adapter, |layer| {
        let name = crate::layouts::names::kohya_name(layer, te_count)?;
        if !seen.insert(name.clone()) {
            return Err(format!(
                "a second layer on `{name}`: one LyCORIS module per weight"
            ));
        }
        map_layer(layer, name, alpha, ctx, diag_rescale_ignored)
    });
    let mut holds = Holds::default();
    for (layer, _) in report::written(adapter, &mapped) {
        match fit(layer) {
            Ok(Shape::Diag) => holds.diag = true,
            Ok(Shape::Boft) => holds.boft = true,
            Err(_) => {}
        }
        holds.rescaled |= layer.row_scale.is_some();
    }
    let mut metadata = report::kept_metadata(adapter);
    let algo = if holds.boft && !holds.diag {
        "boft"
    } else {
        "diag-oft"
    };
    metadata.insert("ss_network_module".into(), "lycoris.kohya".into());
    metadata.insert(
        "ss_network_args".into(),
        serde_json::json!({
            "algo": algo,
            "constraint": "0",
            "rescaled": if holds.rescaled { "True" } else { "False" },
        })
        .to_string(),
    );
    metadata.insert("ss_network_alpha".into(), format!("{alpha}"));
    (
        report::Written::single(tensors, metadata, mapped, Vec::new()),
        holds,
    )
}
