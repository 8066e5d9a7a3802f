//! LyCORIS diag-oft ≥ 2.2: `<name>.oft_blocks` `[N, b, b]`, `<name>.alpha`, optional
//! `<name>.rescale` `[out, 1, …]`.
//!
//! LyCORIS computes `Q = B − Bᵀ`, clamps `‖Q‖_F` (all blocks together) to `alpha·out` when that
//! is positive, and merges `W' = rescale ∘ (BD(Cay+(Q))ᵀ · W)`: output side, map `Cay+`, the
//! canonical `Q` is LyCORIS' own (clamp pre-applied), row scale after the rotation.

use crate::error::{Error, Result};
use crate::import::file_digest;
use crate::model::*;
use crate::rotation::{pack_upper, skew_norm};
use crate::tensors::{MappedFile, to_f64};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Split a flattened LyCORIS/kohya module name into naming convention and component.
pub fn classify_name(name: &str) -> (&'static str, Option<&'static str>) {
    let prefixes: [(&str, &str, Option<&str>); 7] = [
        ("lora_unet_", "kohya", Some("unet")),
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

pub fn import(path: &Path, file: &MappedFile) -> Result<Adapter> {
    let st = file.tensors();
    let mut modules = BTreeSet::new();
    for name in st.names() {
        let module = ["oft_blocks", "alpha", "rescale"]
            .iter()
            .find_map(|s| name.strip_suffix(&format!(".{s}")[..]))
            .ok_or_else(|| {
                Error::format(
                    path,
                    format!("unexpected tensor `{name}` in a LyCORIS diag-oft file (expected `.oft_blocks`, `.alpha`, `.rescale`)"),
                )
            })?;
        modules.insert(module.to_string());
    }

    let mut layers = Vec::new();
    for module in &modules {
        let get = |s: &str| st.tensor(&format!("{module}.{s}")).ok();
        let blocks_view = get("oft_blocks").ok_or_else(|| {
            Error::format(
                path,
                format!("`{module}` has `alpha`/`rescale` but no `oft_blocks`"),
            )
        })?;
        let shape = blocks_view.shape().to_vec();
        if shape.len() != 3 || shape[1] != shape[2] || shape[0] == 0 || shape[1] < 2 {
            return Err(Error::format(
                path,
                format!(
                    "`{module}.oft_blocks` has shape {shape:?}; diag-oft stores [N, b, b] with b ≥ 2"
                ),
            ));
        }
        let (nb, b) = (shape[0], shape[1]);
        let out = (nb * b) as u64;
        let raw = finite(
            path,
            &format!("{module}.oft_blocks"),
            to_f64(&blocks_view, module)?,
        )?;

        let alpha_view = get("alpha").ok_or_else(|| {
            Error::unsupported(
                path,
                format!(
                    "`{module}` has no `alpha`: files from LyCORIS 2.1 do not record their constraint, \
                     so their rotation cannot be reproduced exactly (not imported yet)"
                ),
            )
        })?;
        let alpha_vals = finite(
            path,
            &format!("{module}.alpha"),
            to_f64(&alpha_view, module)?,
        )?;
        let alpha = match alpha_vals.as_slice() {
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
        };

        // Q = B − Bᵀ per block, packed; then LyCORIS' global clamp.
        let mut q: Vec<f64> = Vec::with_capacity(nb * b * (b - 1) / 2);
        for blk in raw.chunks_exact(b * b) {
            let mut skew = vec![0.0; b * b];
            for i in 0..b {
                for j in 0..b {
                    skew[i * b + j] = blk[i * b + j] - blk[j * b + i];
                }
            }
            q.extend(pack_upper(&skew, b));
        }
        let radius = alpha * out as f64;
        let norm = skew_norm(&q) + 1e-8;
        if radius > 0.0 && norm > radius {
            let f = radius / norm;
            q.iter_mut().for_each(|x| *x *= f);
        }
        let constraint = (radius > 0.0).then(|| Constraint {
            kind: "lycoris".into(),
            radius,
            scope: "layer".into(),
            alpha: Some(alpha),
            eps: None,
        });

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
                if rs.len() == 1 {
                    return Err(Error::unsupported(
                        path,
                        format!("`{module}.rescale` is 1-D: a LyCORIS 2.1 file (not imported yet)"),
                    ));
                }
                module_kind = match rs.len() {
                    2 => ModuleKind::Linear,
                    4 => ModuleKind::Conv,
                    _ => ModuleKind::Unknown,
                };
                let vals = finite(path, &format!("{module}.rescale"), to_f64(&v, module)?)?;
                Some((ScalePosition::After, vals))
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
            stages: vec![Stage {
                spec: StageSpec {
                    blocks: Some(nb as u64),
                    block_size: b as u64,
                    shared: false,
                    wiring: Wiring::Identity,
                    map: RotationMap::Cayley,
                    q: String::new(),
                },
                q,
                q_f64: true,
            }],
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

    let user_metadata: BTreeMap<String, String> = file.metadata.clone().into_iter().collect();
    Ok(Adapter {
        provenance: Provenance {
            source_format: "lycoris-diag-oft".into(),
            source_version: None,
            tool: tool_name(),
            created: None,
            source_digest: Some(file_digest(path)?),
            user_metadata,
        },
        layers,
    })
}

fn finite(path: &Path, name: &str, v: Vec<f64>) -> Result<Vec<f64>> {
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
