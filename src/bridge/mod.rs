//! The bridges between OFT and the other ways of storing a finetune (issue #15):
//!
//! * [`lora`]: `convert ADAPTER --to lora --base BASE`: per base tensor the exact weight change
//!   of the bake, ΔW = W′ − W (spec §4, through [`crate::apply`]), written as its best rank-k
//!   approximation ([`crate::lowrank`]) in PEFT's or kohya's LoRA layout.
//! * [`extract`]: `extract BASE FINETUNED`: per weight the block-diagonal rotation that best
//!   explains the finetune ([`crate::procrustes`]), written as a `.oft` adapter bound to BASE.
//!
//! Both stream: one tensor (its weight, its change) in memory at a time, in the base's file
//! and key order, so the output does not depend on the number of threads.

pub mod extract;
pub mod lora;

use crate::error::{Error, Result};

/// A rayon pool of `threads` workers (default: all cores).
pub(crate) fn pool(threads: Option<usize>) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads.unwrap_or(0))
        .build()
        .map_err(|e| Error::usage(format!("cannot start {threads:?} worker threads: {e}")))
}
