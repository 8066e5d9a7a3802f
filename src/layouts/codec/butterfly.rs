//! PEFT BOFT (formats.md §3.4) and kohya `networks.boft` (§4.3): `<module>.boft_R`
//! `[m, N, b, b]`, `<module>.boft_s` (PEFT: `[out, 1]` Linear, `[1, out]` Conv2d; kohya:
//! `[out, 1]` for both), and in PEFT 0.11–0.12 files a `<module>.boft_P` permutation buffer.
//!
//! Both compute `R_i = Cay−(½(A_i − A_iᵀ))` per block, `M_i = P_i·BD(R_i)·P_iᵀ` and merge
//! `W' = diag(s)·W̃·M_0ᵀ·M_1ᵀ⋯` (spec Annex A.3): input side, stage `i` on PEFT's butterfly
//! wiring `i` (stage 0 is the identity wiring), canonical `Q = −½(A − Aᵀ)`, `s` a row scale.
//!
//! PEFT ≤ 0.13 merged Conv2d layers through a memory reinterpretation `W.view(in·k·k, out)`
//! that is no rotation of either side of the weight; a file that still carries `boft_P`
//! (0.11–0.12) is certainly from then, and its Conv2d layers are refused.

use super::common;
use crate::error::{Error, Result};
use crate::model::*;
use crate::tensors::MappedFile;
use std::collections::BTreeMap;
use std::path::Path;

const WRAP_PREFIX: &str = "base_model.model.";

pub fn import(weights: &Path, config: Option<&Path>, component: Option<String>) -> Result<Adapter> {
    let file = MappedFile::open(weights)?;
    let st = file.tensors();
    let modules = common::modules(weights, &st, &[".boft_R", ".boft_s", ".boft_P"], "BOFT")?;
    let legacy = st.names().iter().any(|n| n.ends_with(".boft_P"));
    let kohya = modules.iter().any(|m| m.starts_with("lora_"));
    let mut layers = Vec::new();
    for module in &modules {
        let r_name = format!("{module}.boft_R");
        let s_name = format!("{module}.boft_s");
        if st.tensor(&r_name).is_err() {
            return Err(Error::format(
                weights,
                format!("`{module}` has no `boft_R`"),
            ));
        }
        let (raw, shape) = common::read(weights, &st, &r_name)?;
        let (m, n, b) = match shape.as_slice() {
            &[m, n, b1, b2] if b1 == b2 && m >= 1 && n >= 1 && b1 >= 2 => (m, n, b1),
            _ => {
                return Err(Error::format(
                    weights,
                    format!("`{r_name}` has shape {shape:?}; BOFT stores [m, N, b, b]"),
                ));
            }
        };
        let out_dim_rows = |s: &[usize]| match s {
            [out, 1] => Some((*out, false)),
            [1, out] => Some((*out, true)),
            _ => None,
        };
        let (scale, conv) = match st.tensor(&s_name) {
            Err(_) => (None, false),
            Ok(_) => {
                let (s, s_shape) = common::read(weights, &st, &s_name)?;
                let (_, transposed) = out_dim_rows(&s_shape).ok_or_else(|| {
                    Error::format(
                        weights,
                        format!(
                            "`{s_name}` has shape {s_shape:?}; BOFT stores [out, 1] or [1, out]"
                        ),
                    )
                })?;
                // PEFT stores Conv2d scales as [1, out]; a [1, 1] scale says nothing.
                (Some(s), transposed && s_shape != [1, 1] && !kohya)
            }
        };
        if legacy && conv {
            return Err(Error::unsupported(
                weights,
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
                    blocks: Some(n as u64),
                    block_size: b as u64,
                    shared: false,
                    // Stage 0 of PEFT's butterfly is the identity wiring; a one-factor BOFT
                    // is then a plain block-diagonal rotation (odd b allowed).
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
        let (convention, comp) = if kohya {
            let (c, comp) = super::lycoris::classify_name(module);
            (c, comp.map(str::to_string))
        } else {
            ("peft", component.clone())
        };
        layers.push(Layer {
            target: Target {
                name: module
                    .strip_prefix(WRAP_PREFIX)
                    .unwrap_or(module)
                    .to_string(),
                convention: convention.into(),
                component: comp,
                module: if conv {
                    ModuleKind::Conv
                } else {
                    ModuleKind::Unknown
                },
                shape: None,
                rotated_dim: Some((n * b) as u64),
            },
            side: Side::Input,
            stages,
            row_scale: scale.map(|s| (ScalePosition::After, s)),
            row_scale_f64: false,
            constraint: None,
            base_binding: None,
        });
    }
    let mut extra = BTreeMap::new();
    if let Some(c) = config {
        let raw = std::fs::read_to_string(c).map_err(|e| Error::io(c, e))?;
        extra.insert("peft.adapter_config".to_string(), raw);
    }
    let format = if kohya { "kohya-boft" } else { "peft-boft" };
    common::adapter(weights, &file, format, None, extra, layers)
}
