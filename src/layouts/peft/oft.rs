//! PEFT OFT ≥ 0.16: `<module>.oft_R.weight` (packed triangles), optional `adapter_config.json`.
//!
//! PEFT rotates the input side: `W' = W~ · BD(R_p)ᵀ` (Embedding: `W · BD(R_p)`). Its Neumann
//! branch approximates `Cay+(Q_p)`, its exact branch is `Cay-(Q_p) = Cay+(−Q_p)`; the canonical
//! map is `Cay+`, so exact Linear/Conv layers and Neumann Embedding layers store `−Q_p`.

use crate::error::{Error, Result};
use crate::model::*;
use crate::rotation::{block_size_from_tri_len, skew_norm, tri_len};
use crate::tensors::{MappedFile, to_f64};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

const SUFFIX_LINEAR: &str = ".oft_R.weight";
const SUFFIX_EMBEDDING: &str = ".oft_embedding_R.weight";
const WRAP_PREFIX: &str = "base_model.model.";

/// The settings of `adapter_config.json` that change the math.
#[derive(Debug, Clone, PartialEq)]
pub struct PeftOftConfig {
    pub use_cayley_neumann: bool,
    pub terms: u32,
    pub variant: NeumannVariant,
    pub block_share: bool,
    pub coft: bool,
    pub eps: f64,
    pub r: u64,
    pub peft_version: Option<String>,
    pub raw: String,
}

impl PeftOftConfig {
    /// What PEFT ≥ 0.18 assumes for a bare file without a config (formats.md §9.2).
    pub fn bare_default() -> Self {
        PeftOftConfig {
            use_cayley_neumann: true,
            terms: 5,
            variant: NeumannVariant::Peft018,
            block_share: false,
            coft: false,
            eps: 6e-5,
            r: 0,
            peft_version: None,
            raw: String::new(),
        }
    }
}

fn read_config_value(path: &Path) -> Result<(Value, String)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(Error::format(path, "expected a JSON object"));
    }
    Ok((v, text))
}

/// `(major, minor)` of a version string such as `0.18.2.dev0@UNKNOWN`.
fn major_minor(v: &str) -> Option<(u32, u32)> {
    let mut it = v.split(['.', '@', '+']);
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// The `peft_type` of an `adapter_config.json`.
pub fn peft_type(path: &Path) -> Result<String> {
    let (v, _) = read_config_value(path)?;
    v.get("peft_type")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| Error::format(path, "no `peft_type` in adapter_config.json"))
}

/// Refuse PEFT configs this importer cannot read faithfully, with the reason.
pub fn check_config_supported(path: &Path) -> Result<PeftOftConfig> {
    let (v, raw) = read_config_value(path)?;
    let peft_type = v.get("peft_type").and_then(Value::as_str).unwrap_or("");
    match peft_type {
        "OFT" => {}
        "BOFT" => {
            return Err(Error::format(
                path,
                "peft_type `BOFT` but the tensors are OFT `oft_R.weight`",
            ));
        }
        "" => return Err(Error::format(path, "no `peft_type` in adapter_config.json")),
        other => {
            return Err(Error::unsupported(
                path,
                format!("peft_type `{other}` is not an OFT adapter"),
            ));
        }
    }
    if v.get("oft_block_size").is_none() {
        return Err(Error::format(
            path,
            "this config has no `oft_block_size` (PEFT ≤ 0.13) but the tensors are PEFT ≥ 0.16 \
             `oft_R.weight`: the config and the weights disagree",
        ));
    }
    let peft_version = v
        .get("peft_version")
        .and_then(Value::as_str)
        .map(str::to_string);
    let variant = match peft_version.as_deref().and_then(major_minor) {
        Some(mm) if mm >= (0, 18) => NeumannVariant::Peft018,
        _ => NeumannVariant::Peft016,
    };
    let num = |k: &str| v.get(k).and_then(Value::as_f64);
    let terms = num("num_cayley_neumann_terms").unwrap_or(5.0);
    if terms < 1.0 || terms.fract() != 0.0 || terms > 64.0 {
        return Err(Error::format(
            path,
            format!("num_cayley_neumann_terms = {terms} is not an integer in 1..=64"),
        ));
    }
    Ok(PeftOftConfig {
        use_cayley_neumann: v
            .get("use_cayley_neumann")
            .and_then(Value::as_bool)
            .unwrap_or(true),
        terms: terms as u32,
        variant,
        block_share: v
            .get("block_share")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        coft: v.get("coft").and_then(Value::as_bool).unwrap_or(false),
        eps: num("eps").unwrap_or(6e-5),
        r: num("r").unwrap_or(0.0).max(0.0) as u64,
        peft_version,
        raw,
    })
}

/// Project each block's `Q` onto the Frobenius ball PEFT's COFT uses (radius `eps/√rows`), as
/// PEFT does at merge time, so the stored `Q` needs no further clamp.
pub(crate) fn apply_coft(q: &mut [f64], rows: usize, n: usize, eps: f64) -> f64 {
    let radius = eps / (rows as f64).sqrt();
    for row in q.chunks_exact_mut(n) {
        let norm = skew_norm(row);
        if norm > radius {
            let f = radius / norm;
            row.iter_mut().for_each(|x| *x *= f);
        }
    }
    radius
}

/// Import a PEFT OFT safetensors file, with its config when there is one.
pub fn import(weights: &Path, config: Option<&Path>, component: Option<String>) -> Result<Adapter> {
    let cfg = match config {
        Some(c) => check_config_supported(c)?,
        None => PeftOftConfig::bare_default(),
    };
    let file = MappedFile::open(weights)?;
    let st = file.tensors();
    let mut names: Vec<&str> = st.names().into_iter().collect();
    names.sort_unstable();

    let mut layers = Vec::new();
    for name in names {
        let (module, embedding) = if let Some(m) = name.strip_suffix(SUFFIX_LINEAR) {
            (m, false)
        } else if let Some(m) = name.strip_suffix(SUFFIX_EMBEDDING) {
            (m, true)
        } else {
            return Err(Error::format(
                weights,
                format!(
                    "unexpected tensor `{name}` in a PEFT OFT file (expected `*.oft_R.weight`)"
                ),
            ));
        };
        let view = st
            .tensor(name)
            .map_err(|e| Error::format(weights, e.to_string()))?;
        let shape = view.shape();
        if shape.len() != 2 || shape[0] == 0 {
            return Err(Error::format(
                weights,
                format!("`{name}` has shape {shape:?}; PEFT stores [blocks, b(b−1)/2]"),
            ));
        }
        let (rows, n) = (shape[0], shape[1]);
        let b = block_size_from_tri_len(n)
            .filter(|&b| b >= 2)
            .ok_or_else(|| {
                Error::format(
                    weights,
                    format!(
                        "`{name}`: a row length of {n} is not b(b−1)/2 for any block size b ≥ 2"
                    ),
                )
            })?;
        debug_assert_eq!(tri_len(b), n);
        let mut q = to_f64(&view, name)?;
        if let Some(bad) = q.iter().position(|x| !x.is_finite()) {
            return Err(Error::format(
                weights,
                format!(
                    "`{name}` holds a non-finite value ({}) at element {bad}",
                    q[bad]
                ),
            ));
        }
        let mut constraint = None;
        if cfg.coft {
            let radius = apply_coft(&mut q, rows, n, cfg.eps);
            constraint = Some(Constraint {
                kind: "peft-coft".into(),
                radius,
                scope: "block".into(),
                alpha: None,
                eps: Some(cfg.eps),
            });
        }
        // Canonical Q: negate where PEFT's rotation is the transpose of Cay+(Q_p) / N(Q_p).
        let negate = cfg.use_cayley_neumann == embedding;
        if negate {
            q.iter_mut().for_each(|x| *x = -*x);
        }
        let (shared, blocks) =
            super::common::peft_blocks(weights, module, rows, cfg.block_share, cfg.r, b)?;
        let map = if cfg.use_cayley_neumann {
            RotationMap::Neumann {
                terms: cfg.terms,
                variant: cfg.variant,
            }
        } else {
            RotationMap::Cayley
        };
        let target_name = module
            .strip_prefix(WRAP_PREFIX)
            .unwrap_or(module)
            .to_string();
        layers.push(Layer {
            target: Target {
                name: target_name,
                convention: "peft".into(),
                component: component.clone(),
                module: if embedding {
                    ModuleKind::Embedding
                } else {
                    ModuleKind::Unknown
                },
                shape: None,
                rotated_dim: blocks.map(|r| r * b as u64),
            },
            side: Side::Input,
            stages: vec![Stage {
                spec: StageSpec {
                    blocks,
                    block_size: b as u64,
                    shared,
                    wiring: Wiring::Identity,
                    map,
                    q: String::new(),
                },
                q,
                q_f64: cfg.coft,
                inverse: false,
            }],
            row_scale: None,
            row_scale_f64: false,
            constraint,
            base_binding: None,
        });
    }
    let mut extra = BTreeMap::new();
    if !cfg.raw.is_empty() {
        extra.insert("peft.adapter_config".to_string(), cfg.raw.clone());
    }
    super::common::adapter(
        weights,
        &file,
        "peft-oft",
        cfg.peft_version.clone(),
        extra,
        layers,
    )
}
