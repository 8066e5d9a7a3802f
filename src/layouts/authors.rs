//! The OFT authors' attention-processor files (Zeju1997/oft `oft-db`/`oft-t2i`, formats.md
//! §8.2): `<attention>.processor.to_{q,k,v,out}_oft.R`, `[r, b, b]` or `[b, b]` (block share),
//! saved with diffusers' `save_attn_procs` (usually a `.bin` pickle).
//!
//! Both paths take `S = ½(A − Aᵀ)` and rotate the input columns (`W' = W·BD(R)ᵀ`), but with
//! opposite Cayley directions: the per-block path computes `Cay−(S)` (canonical `Q = −S`), the
//! block-share path `Cay+(S)` (canonical `Q = +S`).

use super::common::{self, OneStage};
use super::{Claim, Layout, Probe, Reader, Source, Variant, Writes, names};
use crate::error::{Error, Result};
use crate::model::*;
use safetensors::SafeTensors;
use std::collections::BTreeMap;
use std::path::Path;

pub static LAYOUT: Layout = Layout {
    id: "oft-authors",
    aliases: &[],
    about: "The OFT authors' attention-processor files (`processor.to_q_oft.R`)",
    reads: Some(Reader {
        keys: &[".processor.to_q_oft.R"],
        companions: &[
            ".processor.to_k_oft.R",
            ".processor.to_v_oft.R",
            ".processor.to_out_oft.R",
        ],
        markers: &[],
        directories: false,
        detect,
        variants: &[&FILE],
    }),
    writes: Writes::No(
        "these are the research code's own checkpoints, which only its scripts load; \
         `--to peft` writes the same input-side rotation for PEFT",
    ),
    metadata_keys: &[],
};

static FILE: Variant = Variant::new("", import);

/// The processor's name for each projection, and the module it rotates.
const PROJECTIONS: [(&str, &str); 4] = [
    ("processor.to_q_oft", "to_q"),
    ("processor.to_k_oft", "to_k"),
    ("processor.to_v_oft", "to_v"),
    ("processor.to_out_oft", "to_out.0"),
];

fn detect(probe: &Probe<'_>) -> Result<Vec<Claim>> {
    let ours = PROJECTIONS
        .iter()
        .any(|(p, _)| probe.has(&format!("{p}.R")));
    Ok(if ours {
        vec![Claim::names(&FILE)]
    } else {
        Vec::new()
    })
}

fn import(src: &Source<'_>) -> Result<Adapter> {
    let layers = common::read_modules(src, &[".R"], "OFT authors' processor", |st, module| {
        read_layer(src.path, st, module)
    })?;
    common::adapter(
        src.path,
        src.file,
        "oft-authors",
        None,
        BTreeMap::new(),
        layers,
    )
}

/// One processor rotation `<attention>.processor.to_*_oft.R`.
fn read_layer(path: &Path, st: &SafeTensors<'_>, module: &str) -> Result<Layer> {
    let (stem, target) = PROJECTIONS
        .iter()
        .find_map(|(p, t)| module.strip_suffix(p).map(|s| (s, *t)))
        .ok_or_else(|| {
            Error::format(
                path,
                format!(
                    "`{module}.R` is not one of the processor's to_q/to_k/to_v/to_out rotations"
                ),
            )
        })?;
    let (raw, shape) = common::read(path, st, &format!("{module}.R"))?;
    // `[b, b]`: one block shared by the whole axis.
    let (rows, b, shared) = match *shape.as_slice() {
        [b1, b2] => common::square_blocks(&[1, b1, b2]).map(|(_, b)| (1, b, true)),
        _ => common::square_blocks(&shape).map(|(r, b)| (r, b, false)),
    }
    .ok_or_else(|| {
        Error::format(
            path,
            format!("`{module}.R` has shape {shape:?}; expected [r, b, b] or [b, b]"),
        )
    })?;
    let sign = if shared { 0.5 } else { -0.5 };
    Ok(OneStage {
        name: format!("{stem}{target}"),
        convention: "diffusers",
        component: Some(names::UNET.into()),
        module: ModuleKind::Linear,
        side: Side::Input,
        blocks: (!shared).then_some(rows as u64),
        block_size: b,
        shared,
        map: RotationMap::Cayley,
        q: common::skew_blocks(&raw, b, sign),
        q_f64: true,
        row_scale: None,
        constraint: None,
    }
    .into_layer())
}
