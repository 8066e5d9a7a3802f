//! `lora`: not an OFT layout but where `convert --to` writes a LoRA approximating the bake
//! ([`crate::bridge::lora`]): it needs the base (ΔW = W′ − W) and a rank rule, so it has no
//! [`super::Writes::Writer`] of its own. Listed here so that `--to` has one list of choices.

use super::{Layout, Writes};

pub static LAYOUT: Layout = Layout {
    id: "lora",
    aliases: &[],
    about: "a LoRA approximating the exact bake (needs --base; --rank K or --energy E; --layout peft or kohya)",
    reads: None,
    writes: Writes::LowRank,
    metadata_keys: &[],
};
