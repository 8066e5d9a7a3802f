//! PEFT OFT ≥ 0.16: `<module>.oft_R.weight` (packed triangles), optional `adapter_config.json`.
//!
//! PEFT rotates the input side: `W' = W~ · BD(R_p)ᵀ` (Embedding: `W · BD(R_p)`). Its Neumann
//! branch approximates `Cay+(Q_p)`, its exact branch is `Cay-(Q_p) = Cay+(−Q_p)`; the canonical
//! map is `Cay+`, so exact Linear/Conv layers and Neumann Embedding layers store `−Q_p`.

use super::{kept_config, major_minor, read_config_value};
use crate::error::{Error, Result};
use crate::layouts::codec::packed::{self, WEIGHT};
use crate::layouts::{Source, common, names};
use crate::model::*;
use serde_json::Value;
use std::path::Path;

pub const SUFFIX_LINEAR: &str = WEIGHT;
pub const SUFFIX_EMBEDDING: &str = ".oft_embedding_R.weight";

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

/// Refuse PEFT configs this importer cannot read faithfully, with the reason.
fn check_config_supported(path: &Path) -> Result<PeftOftConfig> {
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

/// Import a PEFT OFT ≥ 0.16 file, with its config when there is one.
pub fn import(src: &Source<'_>) -> Result<Adapter> {
    let cfg = match src.config {
        Some(c) => check_config_supported(c)?,
        None => PeftOftConfig::bare_default(),
    };
    let st = src.file.tensors();
    let mut names: Vec<&str> = st.names().into_iter().collect();
    names.sort_unstable();
    let layers = names
        .into_iter()
        .map(|name| read_layer(src, &st, name, &cfg))
        .collect::<Result<Vec<_>>>()?;
    common::adapter(
        src.path,
        src.file,
        "peft-oft",
        cfg.peft_version.clone(),
        kept_config(&cfg.raw),
        layers,
    )
}

/// The layer of tensor `name` (`<module>.oft_R.weight` or `.oft_embedding_R.weight`).
fn read_layer(
    src: &Source<'_>,
    st: &safetensors::SafeTensors<'_>,
    name: &str,
    cfg: &PeftOftConfig,
) -> Result<Layer> {
    let path = src.path;
    let (module, embedding) = if let Some(m) = name.strip_suffix(SUFFIX_LINEAR) {
        (m, false)
    } else if let Some(m) = name.strip_suffix(SUFFIX_EMBEDDING) {
        (m, true)
    } else {
        return Err(Error::format(
            path,
            format!("unexpected tensor `{name}` in a PEFT OFT file (expected `*.oft_R.weight`)"),
        ));
    };
    let mut p = packed::read_rows(path, st, name, "PEFT stores")?;
    let constraint = cfg.coft.then(|| packed::apply_coft(&mut p, cfg.eps));
    // Canonical Q: negate where PEFT's rotation is the transpose of Cay+(Q_p) / N(Q_p).
    if cfg.use_cayley_neumann == embedding {
        p.q.iter_mut().for_each(|x| *x = -*x);
    }
    let (shared, blocks) = super::peft_blocks(path, module, p.rows, cfg.block_share, cfg.r, p.b)?;
    let map = if cfg.use_cayley_neumann {
        RotationMap::Neumann {
            terms: cfg.terms,
            variant: cfg.variant,
        }
    } else {
        RotationMap::Cayley
    };
    Ok(common::OneStage {
        name: names::unwrap_peft(module).to_string(),
        convention: "peft",
        component: src.component.clone(),
        module: if embedding {
            ModuleKind::Embedding
        } else {
            ModuleKind::Unknown
        },
        side: Side::Input,
        blocks,
        block_size: p.b,
        shared,
        map,
        q: p.q,
        q_f64: cfg.coft,
        row_scale: None,
        constraint,
    }
    .into_layer())
}
