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
use std::collections::BTreeMap;

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

static FILE: Variant = Variant { name: "", import };

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
    let (path, file) = (src.path, src.file);
    let st = file.tensors();
    let modules = common::modules(path, &st, &[".R"], "OFT authors' processor")?;
    let mut layers = Vec::new();
    for module in &modules {
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
        let (raw, shape) = common::read(path, &st, &format!("{module}.R"))?;
        let (rows, b, shared) = match *shape.as_slice() {
            [r, b1, b2] if b1 == b2 && r >= 1 && b1 >= 2 => (r, b1, false),
            [b1, b2] if b1 == b2 && b1 >= 2 => (1, b1, true),
            _ => {
                return Err(Error::format(
                    path,
                    format!("`{module}.R` has shape {shape:?}; expected [r, b, b] or [b, b]"),
                ));
            }
        };
        let sign = if shared { 0.5 } else { -0.5 };
        layers.push(
            OneStage {
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
            .into_layer(),
        );
    }
    common::adapter(path, file, "oft-authors", None, BTreeMap::new(), layers)
}
