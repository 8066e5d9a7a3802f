//! Butterfly factors: `<module>.boft_R` `[m, N, b, b]` and `<module>.boft_s`, PEFT BOFT
//! (formats.md §3.4: `boft_s` `[out, 1]` Linear, `[1, out]` Conv2d; in PEFT 0.11–0.12 files a
//! `<module>.boft_P` permutation buffer) and kohya `networks.boft` (§4.3: `[out, 1]` for both).
//!
//! Both compute `R_i = Cay−(½(A_i − A_iᵀ))` per block, `M_i = P_i·BD(R_i)·P_iᵀ` and merge
//! `W' = diag(s)·W̃·M_0ᵀ·M_1ᵀ⋯` (spec Annex A.3): input side, stage `i` on PEFT's butterfly
//! wiring `i` (stage 0 is the identity wiring), canonical `Q = −½(A − Aᵀ)`, `s` a row scale.
//!
//! PEFT ≤ 0.13 merged Conv2d layers through a memory reinterpretation `W.view(in·k·k, out)`
//! that is no rotation of either side of the weight; a file that still carries `boft_P`
//! (0.11–0.12) is certainly from then, and its Conv2d layers are refused.

use crate::error::{Error, Result};
use crate::layouts::report::{self, Context, Mapped, Mapping, f32_tensor};
use crate::layouts::{Source, common, names};
use crate::model::*;
use safetensors::SafeTensors;
use std::path::Path;

/// The tensors of a BOFT module.
pub const SUFFIXES: [&str; 3] = [".boft_R", ".boft_s", ".boft_P"];

/// Every module of a BOFT file as a canonical layer named without PEFT's wrapper; `name`
/// sets the convention and component a producer's names give (from the module's full name).
pub fn read_file(
    src: &Source<'_>,
    stored: Scale,
    mut name: impl FnMut(&mut Layer, &str),
) -> Result<Vec<Layer>> {
    let legacy = src.has(".boft_P");
    common::read_modules(src, &SUFFIXES, "BOFT", |st, module| {
        let mut layer = read_layer(src.path, st, module, stored, legacy)?;
        layer.target.name = names::unwrap_peft(module).to_string();
        name(&mut layer, module);
        Ok(layer)
    })
}

/// How a producer stores `boft_s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// PEFT: Conv2d scales as `[1, out]` (which tells the module kind).
    Peft,
    /// kohya: `[out, 1]` for every module.
    Kohya,
}

/// The row scale and whether its shape says Conv2d.
fn read_scale(
    path: &Path,
    st: &SafeTensors<'_>,
    module: &str,
    stored: Scale,
) -> Result<(Option<Vec<f64>>, bool)> {
    let s_name = format!("{module}.boft_s");
    if st.tensor(&s_name).is_err() {
        return Ok((None, false));
    }
    let (s, s_shape) = common::read(path, st, &s_name)?;
    let transposed = match s_shape.as_slice() {
        [_, 1] => false,
        [1, _] => true,
        _ => {
            return Err(Error::format(
                path,
                format!("`{s_name}` has shape {s_shape:?}; BOFT stores [out, 1] or [1, out]"),
            ));
        }
    };
    // PEFT stores Conv2d scales as [1, out]; a [1, 1] scale says nothing.
    let conv = transposed && s_shape != [1, 1] && stored == Scale::Peft;
    Ok((Some(s), conv))
}

/// One BOFT module as a canonical layer, named `module`. `legacy`: the file carries `boft_P`
/// (PEFT 0.11–0.12).
fn read_layer(
    path: &Path,
    st: &SafeTensors<'_>,
    module: &str,
    stored: Scale,
    legacy: bool,
) -> Result<Layer> {
    let r_name = format!("{module}.boft_R");
    if st.tensor(&r_name).is_err() {
        return Err(Error::format(path, format!("`{module}` has no `boft_R`")));
    }
    let (raw, shape) = common::read(path, st, &r_name)?;
    let (m, n, b) = common::stacked_blocks(&shape).ok_or_else(|| {
        Error::format(
            path,
            format!("`{r_name}` has shape {shape:?}; BOFT stores [m, N, b, b]"),
        )
    })?;
    let (scale, conv) = read_scale(path, st, module, stored)?;
    if legacy && conv {
        return Err(Error::unsupported(
            path,
            format!(
                "`{module}` is a Conv2d layer of a PEFT 0.11–0.12 BOFT file (it has `boft_P`): \
                 those versions merged Conv2d weights through a memory reinterpretation that is \
                 not a rotation of the weight's rows or columns; bake it with PEFT ≤ 0.13 instead"
            ),
        ));
    }
    let q = common::skew_blocks(&raw, b, -0.5);
    let tri = b * (b - 1) / 2;
    let stages = (0..m)
        .map(|i| Stage {
            spec: StageSpec {
                truncated: false,
                blocks: Some(n as u64),
                block_size: b as u64,
                shared: false,
                // Stage 0 of PEFT's butterfly is the identity wiring; a one-factor BOFT is
                // then a plain block-diagonal rotation (odd b allowed).
                wiring: if m == 1 {
                    Wiring::Identity
                } else {
                    Wiring::Butterfly {
                        producer: WiringProducer::Peft,
                        index: i as u32,
                    }
                },
                map: RotationMap::Cayley,
                q: String::new(),
            },
            q: q[i * n * tri..(i + 1) * n * tri].to_vec(),
            q_f64: true,
            inverse: false,
        })
        .collect();
    Ok(Layer {
        target: Target {
            name: module.to_string(),
            convention: "peft".into(),
            component: None,
            module: if conv {
                ModuleKind::Conv
            } else {
                ModuleKind::Unknown
            },
            shape: None,
            rotated_dim: Some((n * b) as u64),
            rows: None,
        },
        side: Side::Input,
        stages,
        row_scale: scale.map(|s| (ScalePosition::After, s)),
        row_scale_f64: false,
        constraint: None,
        base_binding: None,
    })
}

/// How a PEFT BOFT config sizes every layer's blocks: one `boft_block_size` for the
/// directory, or one `boft_block_num` (PEFT then gives each layer the block size `d / N`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sizing {
    /// `boft_block_size = b`, `boft_block_num = 0`.
    BlockSize(u64),
    /// `boft_block_num = N`, `boft_block_size = 0`.
    BlockNum(u64),
}

impl Sizing {
    /// Whether a stage has this config's size.
    pub fn fits_layer(self, s: &Stage, d: Option<u64>) -> bool {
        match self {
            Sizing::BlockSize(b) => s.spec.block_size == b,
            Sizing::BlockNum(n) => {
                s.spec
                    .blocks
                    .or_else(|| d.map(|d| d / s.spec.block_size.max(1)))
                    == Some(n)
            }
        }
    }

    fn describe(self) -> String {
        match self {
            Sizing::BlockSize(b) => format!("one block size ({b})"),
            Sizing::BlockNum(n) => format!("one block count ({n})"),
        }
    }
}

/// Why a layer's stages are not `m` factors sized by `size` on PEFT's wiring, if they are not.
fn misfit(layer: &Layer, size: Sizing, m: usize) -> Option<String> {
    let d = layer.target.rotated_dim;
    if layer.stages.len() != m || layer.stages.iter().any(|s| !size.fits_layer(s, d)) {
        let first = layer.stages.first();
        return Some(format!(
            "{} stage(s) of {} block(s) of size {}, but PEFT's BOFT config holds {} and one \
             butterfly-factor count ({m}) for the directory, and neither one block size nor one \
             block count fits all its layers",
            layer.stages.len(),
            first
                .and_then(|s| s.spec.blocks)
                .map_or("a shared".to_string(), |n| n.to_string()),
            first.map_or(0, |s| s.spec.block_size),
            size.describe()
        ));
    }
    layer.stages.iter().enumerate().find_map(|(i, s)| {
        let ok = match s.spec.wiring {
            Wiring::Identity => i == 0 || m == 1,
            Wiring::Butterfly {
                producer: WiringProducer::Peft,
                index,
            } => index as usize == i,
            Wiring::Butterfly { .. } => false,
        };
        (!ok).then(|| {
            format!(
                "stage {i} is wired {}, not as PEFT's butterfly factor {i}",
                s.spec.wiring.describe()
            )
        })
    })
}

/// The stages as `boft_R` values (`A = −Q` as dense skew blocks: PEFT's `½(A − Aᵀ)` gives `A`
/// back exactly), and the layer they denote.
fn encode_stages(
    layer: &Layer,
    bs: usize,
) -> std::result::Result<(Vec<f64>, usize, Layer, Vec<String>), String> {
    let mut values = Vec::new();
    let mut denoted = layer.clone();
    let mut lossy = Vec::new();
    let mut blocks = 0;
    for (i, stage) in layer.stages.iter().enumerate() {
        let (q, n) =
            report::expanded_rows(stage, layer.target.rotated_dim).ok_or(report::UNKNOWN_REPEAT)?;
        blocks = n;
        let tri = stage.tri_len();
        let mut back = Vec::with_capacity(q.len());
        for k in 0..n {
            let row = &q[k * tri..(k + 1) * tri];
            let neg: Vec<f64> = row.iter().map(|x| -(*x as f32 as f64)).collect();
            values.extend(crate::rotation::unpack_skew(&neg, bs));
            back.extend(neg.iter().map(|x| -x));
        }
        let ds = &mut denoted.stages[i];
        report::cayley_stage(ds, back, blocks, false, "PEFT BOFT", &mut lossy);
    }
    Ok((values, blocks, denoted, lossy))
}

/// One input-side layer as PEFT BOFT tensors under `name`: `m` factors sized by `size`.
pub fn encode(layer: &Layer, name: String, size: Sizing, m: usize, ctx: &Context<'_>) -> Mapped {
    if layer.side != Side::Input {
        return Err(
            "it rotates the output rows; PEFT ≥ 0.14 rotates input columns, and an output-side \
             rotation is no input-side one. Bake the adapter (oftool merge)"
                .into(),
        );
    }
    if let Some(why) = misfit(layer, size, m) {
        return Err(why);
    }
    let b = layer.stages[0].spec.block_size;
    let conv = report::is_conv(layer, ctx.sd1)?;
    let out = match (&layer.row_scale, &layer.target.shape) {
        (Some((_, s)), _) => Some(s.len()),
        (None, Some(shape)) => shape.first().map(|&d| d as usize),
        (None, None) => None,
    }
    .ok_or(
        "BOFT stores a row scale of the output size, which this layer does not record; \
         pass --base",
    )?;
    let bs = b as usize;
    let (values, blocks, mut denoted, lossy) = encode_stages(layer, bs)?;
    let scale: Vec<f64> = match &layer.row_scale {
        Some((_, s)) => s.iter().map(|&v| v as f32 as f64).collect(),
        None => vec![1.0; out],
    };
    denoted.row_scale = layer.row_scale.as_ref().map(|(p, _)| (*p, scale.clone()));
    denoted.row_scale_f64 = false;
    denoted.constraint = None;
    let s_shape = if conv { vec![1, out] } else { vec![out, 1] };
    let tensors = vec![
        f32_tensor(format!("{name}.boft_R"), vec![m, blocks, bs, bs], &values)?,
        f32_tensor(format!("{name}.boft_s"), s_shape, &scale)?,
    ];
    Ok(Mapping {
        name,
        tensors,
        denoted,
        lossy,
    })
}
