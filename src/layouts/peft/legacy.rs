//! PEFT OFT before 0.16 (formats.md §3.1–3.2): `<module>.oft_r` `[r, b, b]` (`[1, b, b]` with
//! `block_share`), and from 0.14 on `<module>.oft_s` `[out, 1]`.
//!
//! Both compute `S = ½(A − Aᵀ)` and `R = Cay−(S) = Cay+(−S)`, so the canonical `Q` is `−S`
//! (a halving and a subtraction of binary32 values: exact in f64).
//! * 0.7–0.13 (`oft_r` only) rotate the **output** rows: `W' = BD(R)ᵀ·W`, `b = ceil(out/r)`.
//! * 0.14–0.15 (`oft_r` + `oft_s`) rotate the **input** columns and scale rows:
//!   `W' = diag(s)·W̃·BD(R)ᵀ`.
//!
//! COFT (`coft`, `eps`) projects each raw block `A_k` onto a Frobenius ball before the skew
//! part is taken, at merge time too; the radius is `eps·ceil(out/r)²/√rows` in both versions.

use super::common::{self, OneStage};
use crate::error::{Error, Result};
use crate::model::*;
use crate::tensors::MappedFile;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

const WRAP_PREFIX: &str = "base_model.model.";

/// The settings of an old `adapter_config.json` that change the math.
#[derive(Debug, Clone, Default)]
struct OldConfig {
    r: u64,
    block_share: bool,
    coft: bool,
    eps: f64,
    raw: String,
}

fn read_config(path: Option<&Path>) -> Result<OldConfig> {
    let Some(path) = path else {
        return Ok(OldConfig {
            eps: 6e-5,
            ..OldConfig::default()
        });
    };
    let raw = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let v: Value = serde_json::from_str(&raw)
        .map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
    let num = |k: &str| v.get(k).and_then(Value::as_f64);
    let flag = |k: &str| v.get(k).and_then(Value::as_bool).unwrap_or(false);
    Ok(OldConfig {
        r: num("r").unwrap_or(0.0).max(0.0) as u64,
        block_share: flag("block_share"),
        coft: flag("coft"),
        eps: num("eps").unwrap_or(6e-5),
        raw,
    })
}

/// Import a PEFT ≤ 0.15 OFT file (`oft_r`, optional `oft_s`), with its config when known.
pub fn import(weights: &Path, config: Option<&Path>, component: Option<String>) -> Result<Adapter> {
    let cfg = read_config(config)?;
    let file = MappedFile::open(weights)?;
    let st = file.tensors();
    let modules = common::modules(weights, &st, &[".oft_r", ".oft_s"], "PEFT ≤ 0.15 OFT")?;
    let with_scale = st.names().iter().any(|n| n.ends_with(".oft_s"));
    let mut layers = Vec::new();
    for module in &modules {
        let r_name = format!("{module}.oft_r");
        if st.tensor(&r_name).is_err() {
            return Err(Error::format(
                weights,
                format!("`{module}` has `oft_s` but no `oft_r`"),
            ));
        }
        let (mut raw, shape) = common::read(weights, &st, &r_name)?;
        let (rows, b) = match shape.as_slice() {
            &[rows, b1, b2] if b1 == b2 && rows >= 1 && b1 >= 2 => (rows, b1),
            _ => {
                return Err(Error::format(
                    weights,
                    format!("`{r_name}` has shape {shape:?}; PEFT ≤ 0.15 stores [r, b, b]"),
                ));
            }
        };
        let scale = if with_scale {
            let s_name = format!("{module}.oft_s");
            let (s, s_shape) = common::read(weights, &st, &s_name).map_err(|_| {
                Error::format(
                    weights,
                    format!("`{module}` has no `oft_s` while other modules have one: mixed PEFT versions"),
                )
            })?;
            if s_shape.len() != 2 || s_shape[1] != 1 || s_shape[0] == 0 {
                return Err(Error::format(
                    weights,
                    format!("`{s_name}` has shape {s_shape:?}; PEFT stores [out, 1]"),
                ));
            }
            Some(s)
        } else {
            None
        };
        let (shared, blocks) =
            common::peft_blocks(weights, module, rows, cfg.block_share, cfg.r, b)?;
        let mut constraint = None;
        if cfg.coft {
            // PEFT: eps·ceil(out/r)² with r the number of blocks, then ÷√rows. Output side
            // (≤ 0.13) has out = r·b; 0.14–0.15 read `out` off `oft_s`.
            let out = match &scale {
                Some(s) => s.len() as f64,
                None => (blocks.unwrap_or(1) as usize * b) as f64,
            };
            let r = blocks.ok_or_else(|| {
                Error::unsupported(
                    weights,
                    format!("`{module}`: COFT with a shared block needs the config's `r`"),
                )
            })? as f64;
            let per = (out / r).ceil();
            let radius = cfg.eps * per * per / (rows as f64).sqrt();
            common::project_raw_blocks(&mut raw, b, radius);
            constraint = Some(Constraint {
                kind: "peft-coft".into(),
                radius,
                scope: "block".into(),
                alpha: None,
                eps: Some(cfg.eps),
            });
        }
        // Canonical Q = −½(A − Aᵀ).
        let q = common::skew_blocks(&raw, b, -0.5);
        layers.push(
            OneStage {
                name: module
                    .strip_prefix(WRAP_PREFIX)
                    .unwrap_or(module)
                    .to_string(),
                convention: "peft",
                component: component.clone(),
                module: ModuleKind::Unknown,
                side: if with_scale {
                    Side::Input
                } else {
                    Side::Output
                },
                blocks,
                block_size: b,
                shared,
                map: RotationMap::Cayley,
                q,
                q_f64: true,
                row_scale: scale,
                constraint,
            }
            .into_layer(),
        );
    }
    let (format, version) = if with_scale {
        ("peft-oft-0.14", "0.14–0.15")
    } else {
        ("peft-oft-0.7", "0.7–0.13")
    };
    let mut extra = BTreeMap::new();
    if !cfg.raw.is_empty() {
        extra.insert("peft.adapter_config".to_string(), cfg.raw.clone());
    }
    common::adapter(
        weights,
        &file,
        format,
        Some(version.to_string()),
        extra,
        layers,
    )
}
