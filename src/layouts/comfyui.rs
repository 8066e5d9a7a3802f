//! ComfyUI (formats.md §6): `--to comfyui` writes LyCORIS `oft_blocks` / `alpha` / `rescale`
//! under kohya names, which ComfyUI's key map resolves (checked with ComfyUI's own loader:
//! `fixtures/clients/`). ComfyUI ignores diag-oft `rescale` (such layers are lossy) and squares
//! the strength slider (a warning).
//!
//! Not read as its own layout: a file with ComfyUI's names (`diffusion_model.….oft_blocks`) is a
//! LyCORIS file with other names, which [`super::lycoris`] reads; how ComfyUI itself reads
//! `oft_blocks` files is [`super::Semantics::ComfyUi`] (`merge --blend comfyui`).

use super::codec::blocks;
use super::report::{Context, Written};
use super::{Layout, Writes};
use crate::error::Result;
use crate::model::Adapter;

pub static LAYOUT: Layout = Layout {
    id: "comfyui",
    aliases: &[],
    about: "LyCORIS `oft_blocks` under kohya names, as ComfyUI loads them",
    reads: None,
    writes: Writes::Writer(write),
    metadata_keys: &[],
};

fn write(adapter: &Adapter, ctx: &Context<'_>) -> Result<Written> {
    let (mut written, holds) = blocks::write(
        adapter,
        ctx,
        Some("ComfyUI loads diag-oft `rescale` but never applies it"),
    );
    written.warnings.push(
        "ComfyUI squares the LoraLoader strength for diag-oft (W + s²·ΔW) and applies BOFT \
         strength per stage and again to the difference: only strength 1 gives this adapter's \
         rotation"
            .into(),
    );
    if holds.diag && holds.rescaled {
        written.warnings.push(
            "ComfyUI ignores diag-oft `rescale`: the scaled rows are not scaled in ComfyUI".into(),
        );
    }
    Ok(written)
}
