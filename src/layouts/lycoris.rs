//! `oft_blocks` files: LyCORIS diag-oft ≥ 2.2 (`[N, b, b]`), LyCORIS BOFT (`[m, N, b, b]`) and
//! kohya's legacy `networks.oft` (`oft_unet_…`, `[N, b, b]`), each with `alpha` and (LyCORIS)
//! an optional `rescale` `[out, 1, …]`.
//!
//! All three compute `Q = B − Bᵀ`, clamp `‖Q‖_F` over the whole layer, and rotate the output
//! rows with `Cay+`. diag-oft and kohya merge `W' = BD(R)ᵀ·W`, which is the canonical output
//! side with `Q_c = Q`; LyCORIS BOFT applies each stage as `R_i` (not `R_iᵀ`) on its wiring, so
//! `Q_c = −Q`. The producer's clamp is pre-applied; `rescale` multiplies rows after the stages.
//!
//! Runtimes read the same files differently ([`Semantics`]): A1111 uses kohya's clamp factor;
//! ComfyUI clamps to the raw `alpha` and ignores diag-oft `rescale`.

use super::common::{self, finite};
use crate::error::{Error, Result};
use crate::model::*;
use crate::rotation::{inverse_cayley, orthogonality_error, pack_upper, rotation_block, skew_norm};
use crate::tensors::{MappedFile, to_f64};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

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

/// Which file family the blocks come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    DiagOft,
    Boft,
    KohyaLegacy,
}

/// Split a flattened LyCORIS/kohya module name into naming convention and component.
pub fn classify_name(name: &str) -> (&'static str, Option<&'static str>) {
    let prefixes: [(&str, &str, Option<&str>); 8] = [
        ("lora_unet_", "kohya", Some("unet")),
        ("oft_unet_", "kohya", Some("unet")),
        ("lora_te1_", "kohya", Some("text_encoder")),
        ("lora_te2_", "kohya", Some("text_encoder_2")),
        ("lora_te_", "kohya", Some("text_encoder")),
        ("lora_transformer_", "kohya", Some("transformer")),
        ("lycoris_", "lycoris", None),
        ("diffusion_model.", "comfyui", Some("unet")),
    ];
    prefixes
        .iter()
        .find(|(p, _, _)| name.starts_with(p))
        .map(|&(_, conv, comp)| (conv, comp))
        .unwrap_or(("unknown", None))
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
    let (kind, radius, factor) = match (family, semantics) {
        // kohya legacy clamps always (alpha 0 turns the rotation off).
        (Family::KohyaLegacy, Semantics::Producer) => {
            ("kohya", alpha * out, Some(kohya_factor(alpha * out)))
        }
        (_, Semantics::A1111) => {
            let c = alpha * out;
            ("kohya", c, (c != 0.0).then(|| kohya_factor(c)))
        }
        (_, Semantics::ComfyUi) => {
            let c = alpha;
            (
                "comfyui-raw",
                c,
                (c > 0.0 && norm + 1e-8 > c).then(|| c / (norm + 1e-8)),
            )
        }
        (_, Semantics::Producer) => {
            let c = alpha * out;
            (
                "lycoris",
                c,
                (c > 0.0 && norm + 1e-8 > c).then(|| c / (norm + 1e-8)),
            )
        }
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

pub fn import(path: &Path, file: &MappedFile, semantics: Semantics) -> Result<Adapter> {
    let st = file.tensors();
    let mut modules = BTreeSet::new();
    for name in st.names() {
        let module = ["oft_blocks", "alpha", "rescale"]
            .iter()
            .find_map(|s| name.strip_suffix(&format!(".{s}")[..]))
            .ok_or_else(|| {
                Error::format(
                    path,
                    format!(
                        "unexpected tensor `{name}` in an `oft_blocks` file (expected `.oft_blocks`, `.alpha`, `.rescale`)"
                    ),
                )
            })?;
        modules.insert(module.to_string());
    }

    let mut layers = Vec::new();
    let mut families = BTreeSet::new();
    let mut missing_alpha = Vec::new();
    for module in &modules {
        let get = |s: &str| st.tensor(&format!("{module}.{s}")).ok();
        let blocks_view = get("oft_blocks").ok_or_else(|| {
            Error::format(
                path,
                format!("`{module}` has `alpha`/`rescale` but no `oft_blocks`"),
            )
        })?;
        let shape = blocks_view.shape().to_vec();
        let family = match shape.len() {
            3 if module.starts_with("oft_unet_") => Family::KohyaLegacy,
            3 => Family::DiagOft,
            4 => Family::Boft,
            _ => Family::DiagOft,
        };
        families.insert(format!("{family:?}"));
        let (m, nb, b) = match (family, shape.as_slice()) {
            (Family::Boft, &[m, n, b1, b2]) if b1 == b2 && m >= 1 && n >= 1 && b1 >= 2 => {
                (m, n, b1)
            }
            (Family::DiagOft | Family::KohyaLegacy, &[n, b1, b2])
                if b1 == b2 && n >= 1 && b1 >= 2 =>
            {
                (1, n, b1)
            }
            _ => {
                return Err(Error::format(
                    path,
                    format!(
                        "`{module}.oft_blocks` has shape {shape:?}; expected [N, b, b] (diag-oft, kohya) or [m, N, b, b] (BOFT) with b ≥ 2"
                    ),
                ));
            }
        };
        if family == Family::KohyaLegacy && semantics == Semantics::ComfyUi {
            return Err(Error::unsupported(
                path,
                "ComfyUI does not load kohya legacy `oft_unet_` files (it reports \"lora key not loaded\")",
            ));
        }
        let out = (nb * b) as u64;
        let raw = finite(
            path,
            &format!("{module}.oft_blocks"),
            to_f64(&blocks_view, module)?,
        )?;

        // LyCORIS 2.1 wrote no `alpha`: it clamped with the training-time `constraint`, which
        // defaults to 0 (no clamp); such files are read as unconstrained.
        let alpha = match get("alpha") {
            None => 0.0,
            Some(alpha_view) => {
                let alpha_vals = finite(
                    path,
                    &format!("{module}.alpha"),
                    to_f64(&alpha_view, module)?,
                )?;
                match alpha_vals.as_slice() {
                    [a] => *a,
                    _ => {
                        return Err(Error::format(
                            path,
                            format!(
                                "`{module}.alpha` must hold one value, holds {}",
                                alpha_vals.len()
                            ),
                        ));
                    }
                }
            }
        };
        if get("alpha").is_none() {
            missing_alpha.push(module.clone());
        }

        let mut q = common::skew_blocks(&raw, b, 1.0);
        let constraint = clamp(&mut q, alpha, out as f64, family, semantics);
        let tri = b * (b - 1) / 2;
        let stages: Vec<Stage> = (0..m)
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
            .collect();

        let mut module_kind = ModuleKind::Unknown;
        let row_scale = match get("rescale") {
            None => None,
            Some(v) => {
                let rs = v.shape();
                if rs.first() != Some(&(out as usize)) || rs.iter().skip(1).any(|&d| d != 1) {
                    return Err(Error::format(
                        path,
                        format!("`{module}.rescale` has shape {rs:?}; expected [{out}, 1, …]"),
                    ));
                }
                // LyCORIS 2.1 stored `rescale` as [out]; 2.1.0.post1 applies it to rows
                // like the later [out, 1, …] (2.1.0 itself broadcast it wrongly).
                module_kind = match rs.len() {
                    2 => ModuleKind::Linear,
                    4 => ModuleKind::Conv,
                    _ => ModuleKind::Unknown,
                };
                let vals = finite(path, &format!("{module}.rescale"), to_f64(&v, module)?)?;
                // ComfyUI loads diag-oft `rescale` but never applies it (BOFT it does apply).
                (semantics != Semantics::ComfyUi || family == Family::Boft)
                    .then_some((ScalePosition::After, vals))
            }
        };

        let (convention, component) = classify_name(module);
        layers.push(Layer {
            target: Target {
                name: module.clone(),
                convention: convention.into(),
                component: component.map(str::to_string),
                module: module_kind,
                shape: None,
                rotated_dim: Some(out),
            },
            side: Side::Output,
            stages,
            row_scale,
            row_scale_f64: false,
            constraint,
            base_binding: None,
        });
    }
    if layers.is_empty() {
        return Err(Error::format(
            path,
            "the file holds no `oft_blocks` tensors",
        ));
    }
    if families.len() > 1 {
        return Err(Error::format(
            path,
            format!(
                "mixed layouts in one file ({}): refusing to guess",
                families.into_iter().collect::<Vec<_>>().join(", ")
            ),
        ));
    }
    let source_format = match families.iter().next().map(String::as_str) {
        Some("Boft") => "lycoris-boft",
        Some("KohyaLegacy") => "kohya-oft",
        _ => "lycoris-diag-oft",
    };

    let mut extra = BTreeMap::new();
    let source_version = if missing_alpha.is_empty() {
        None
    } else {
        extra.insert(
            "oftool.note".to_string(),
            format!(
                "{} module(s) carry no `alpha` (LyCORIS 2.1): read as unconstrained",
                missing_alpha.len()
            ),
        );
        Some("2.1".to_string())
    };
    common::adapter(path, file, source_format, source_version, extra, layers)
}

/// LyCORIS 2.0.x `oft_diag` files (formats.md §5.2): each `[N, b, b]` tensor is the rotation
/// itself, its rows scaled when the module was trained `rescaled`, merged `W' = BD(D)ᵀ·W`.
///
/// `D_k = diag(s)·R_k` with `R_k` orthogonal, so `s` is the norm of each row of `D_k` and the
/// merge is `BD(R)ᵀ·diag(s)·W`: canonical output side, row scale *before* the stage, and
/// `Q = (R − I)(R + I)⁻¹` (inverse Cayley, in f64). This recovers the stored rotation to within
/// the rounding of the stored values, not bit-exactly; a block that is not a scaled rotation
/// (or has an eigenvalue −1) is refused.
pub fn import_oft_diag(path: &Path, file: &MappedFile) -> Result<Adapter> {
    let st = file.tensors();
    let modules = common::modules(path, &st, &[".oft_diag"], "LyCORIS 2.0 `oft_diag`")?;
    let mut layers = Vec::new();
    for module in &modules {
        let name = format!("{module}.oft_diag");
        let (d, shape) = common::read(path, &st, &name)?;
        let (n, b) = match shape.as_slice() {
            &[n, b1, b2] if b1 == b2 && n >= 1 && b1 >= 2 => (n, b1),
            _ => {
                return Err(Error::format(
                    path,
                    format!("`{name}` has shape {shape:?}; expected [N, b, b]"),
                ));
            }
        };
        let mut scale = Vec::with_capacity(n * b);
        let mut q = Vec::with_capacity(n * b * (b - 1) / 2);
        for (k, blk) in d.chunks_exact(b * b).enumerate() {
            let mut r = blk.to_vec();
            for i in 0..b {
                let norm = r[i * b..(i + 1) * b]
                    .iter()
                    .map(|x| x * x)
                    .sum::<f64>()
                    .sqrt();
                if norm == 0.0 {
                    return Err(Error::format(
                        path,
                        format!("`{name}` block {k} has a zero row: not a scaled rotation"),
                    ));
                }
                r[i * b..(i + 1) * b].iter_mut().for_each(|x| *x /= norm);
                scale.push(norm);
            }
            let not_rotation = |what: &str| {
                Error::format(
                    path,
                    format!("`{name}` block {k} is not a rotation ({what}); cannot recover its Q"),
                )
            };
            if orthogonality_error(&r, b) > 1e-3 {
                return Err(not_rotation("its rows are not orthogonal"));
            }
            let dense = inverse_cayley(&r, b).ok_or_else(|| not_rotation("eigenvalue −1"))?;
            let mut skew = vec![0.0; b * b];
            for i in 0..b {
                for j in 0..b {
                    skew[i * b + j] = 0.5 * (dense[i * b + j] - dense[j * b + i]);
                }
            }
            let tri = pack_upper(&skew, b);
            let back = rotation_block(&tri, b, &RotationMap::Cayley);
            let err = back
                .iter()
                .zip(&r)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f64::max);
            if !err.is_finite() || err > 1e-4 {
                return Err(not_rotation("a reflection or a rotation by 180°"));
            }
            q.extend(tri);
        }
        // Unscaled modules store rows of norm 1 to within binary32 rounding.
        let scaled = scale.iter().any(|s| (s - 1.0).abs() > 1e-6);
        let (convention, component) = classify_name(module);
        let mut layer = common::OneStage {
            name: module.clone(),
            convention,
            component: component.map(str::to_string),
            module: ModuleKind::Unknown,
            side: Side::Output,
            blocks: Some(n as u64),
            block_size: b,
            shared: false,
            map: RotationMap::Cayley,
            q,
            q_f64: true,
            row_scale: None,
            constraint: None,
        }
        .into_layer();
        if scaled {
            layer.row_scale = Some((ScalePosition::Before, scale));
            layer.row_scale_f64 = true;
        }
        layers.push(layer);
    }
    let mut extra = BTreeMap::new();
    extra.insert(
        "oftool.note".to_string(),
        "LyCORIS 2.0 `oft_diag` stores rotations; Q recovered by the inverse Cayley map in f64"
            .to_string(),
    );
    common::adapter(
        path,
        file,
        "lycoris-oft-diag",
        Some("2.0".into()),
        extra,
        layers,
    )
}
