//! Hugging Face PEFT (formats.md §3): an adapter directory (`adapter_config.json` +
//! `adapter_model.safetensors`, one directory per diffusers component) or its bare weights,
//! module names under `base_model.model.`.
//!
//! Variants: OFT ≥ 0.16 (`oft_R.weight`, [`oft`]), OFT 0.7–0.15 (`oft_r`, `oft_s`,
//! [`legacy`]), BOFT (`boft_R`, `boft_s`, [`super::codec::butterfly`]). `--to peft` writes
//! PEFT ≥ 0.18 directories, as BOFT where a layer needs butterfly factors or a row scale
//! ([`write`]). In a directory, the config's `peft_type` must agree with the tensors.

mod legacy;
mod oft;
mod write;

use super::codec::butterfly::{self, Scale};
use super::{Claim, Layout, Probe, Reader, Source, Variant, Writes, common, names};
use crate::error::{Error, Result};
use crate::model::{Adapter, MAX_DIM, dim_ok};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

pub static LAYOUT: Layout = Layout {
    id: "peft",
    aliases: &["diffusers"],
    about: "A PEFT ≥ 0.18 adapter directory per diffusers component (`PeftModel.from_pretrained`)",
    reads: Some(Reader {
        keys: &[
            oft::SUFFIX_LINEAR,
            oft::SUFFIX_EMBEDDING,
            ".oft_r",
            ".oft_s",
            ".boft_R",
            ".boft_s",
        ],
        companions: &[".boft_P"],
        markers: &[],
        directories: true,
        detect,
        variants: &[&OFT, &OFT_LEGACY, &BOFT],
    }),
    writes: Writes::Writer(write::write),
    // oftool keeps a PEFT source's config as `peft.adapter_config`.
    metadata_keys: &["peft."],
};

/// OFT ≥ 0.16.
static OFT: Variant = Variant::new("oft", oft::import);

/// OFT 0.7–0.15.
static OFT_LEGACY: Variant = Variant::new("oft-legacy", legacy::import);

static BOFT: Variant = Variant::new("boft", import_boft);

fn detect(probe: &Probe<'_>) -> Result<Vec<Claim>> {
    let mut claims = Vec::new();
    // The trainers' `oft_R.weight` files carry their own prefixes (kohya, OneTrainer).
    if (probe.has(oft::SUFFIX_LINEAR) || probe.has(oft::SUFFIX_EMBEDDING))
        && !probe.any(names::has_trainer_prefix)
    {
        claims.push(Claim::names(&OFT));
    }
    if probe.has(".oft_r") || probe.has(".oft_s") {
        claims.push(Claim::names(&OFT_LEGACY));
    }
    if (probe.has(".boft_R") || probe.has(".boft_s"))
        && !probe.any(|n| n.starts_with(names::KOHYA_STYLE))
    {
        claims.push(Claim::names(&BOFT));
    }
    if let Some((dir, config)) = probe.directory {
        check_peft_type(dir, config, &claims)?;
    }
    Ok(claims)
}

/// In a directory, the config's `peft_type` must name what the tensors are.
fn check_peft_type(dir: &Path, config: &Path, claims: &[Claim]) -> Result<()> {
    let peft_type = peft_type(config)?;
    let fits = |v: &Variant| match peft_type.as_str() {
        "OFT" => std::ptr::eq(v, &OFT) || std::ptr::eq(v, &OFT_LEGACY),
        "BOFT" => std::ptr::eq(v, &BOFT),
        _ => false,
    };
    if !matches!(peft_type.as_str(), "OFT" | "BOFT") {
        return Err(Error::unsupported(
            config,
            format!("peft_type `{peft_type}` is not an OFT or BOFT adapter"),
        ));
    }
    match claims.iter().find(|c| !fits(c.variant)) {
        Some(c) => Err(Error::format(
            dir,
            format!(
                "adapter_config.json says peft_type `{peft_type}` but the tensors are peft-{}",
                c.variant.name
            ),
        )),
        None => Ok(()),
    }
}

/// An `adapter_config.json` as a JSON object, and its text.
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
fn peft_type(path: &Path) -> Result<String> {
    let (v, _) = read_config_value(path)?;
    v.get("peft_type")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| Error::format(path, "no `peft_type` in adapter_config.json"))
}

/// PEFT's `(shared, blocks)` for `rows` stored blocks of size `b`: one row under `block_share`
/// repeats `r` times (unknown without a config), else each row is a block. A count whose
/// dimension no model has is refused before it sizes anything.
fn peft_blocks(
    path: &Path,
    module: &str,
    rows: usize,
    block_share: bool,
    r: u64,
    b: usize,
) -> Result<(bool, Option<u64>)> {
    let shared = rows == 1 && block_share;
    let blocks = if shared {
        (r > 0).then_some(r)
    } else {
        Some(rows as u64)
    };
    if dim_ok(blocks, b as u64) {
        return Ok((shared, blocks));
    }
    Err(Error::unsupported(
        path,
        format!(
            "`{module}`: {} blocks of size {b} (the config's `r`) exceed the largest dimension oftool accepts ({MAX_DIM})",
            blocks.unwrap_or(0)
        ),
    ))
}

/// The config's text, kept in the provenance (`peft.adapter_config`) for `--to peft`.
fn kept_config(raw: &str) -> BTreeMap<String, String> {
    let mut extra = BTreeMap::new();
    if !raw.is_empty() {
        extra.insert("peft.adapter_config".to_string(), raw.to_string());
    }
    extra
}

/// PEFT BOFT (any number of butterfly factors), with its config when there is one.
fn import_boft(src: &Source<'_>) -> Result<Adapter> {
    let layers = butterfly::read_file(src, Scale::Peft, |layer, _| {
        layer.target.component = src.component.clone();
    })?;
    let raw = match src.config {
        Some(c) => std::fs::read_to_string(c).map_err(|e| Error::io(c, e))?,
        None => String::new(),
    };
    common::adapter(
        src.path,
        src.file,
        "peft-boft",
        None,
        kept_config(&raw),
        layers,
    )
}
