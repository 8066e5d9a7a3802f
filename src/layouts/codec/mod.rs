//! Tensor codecs: how a rotation is stored in tensors, for the storage formats that more than one
//! producer uses. A layout module chooses names, metadata and sign conventions; a codec turns
//! one module's tensors into canonical stages and back.
//!
//! * [`blocks`]: `oft_blocks` (+ `alpha`, `rescale`): LyCORIS, kohya's legacy `networks.oft`,
//!   and what ComfyUI loads.
//! * [`packed`]: packed strict upper triangles `oft_R.weight` `[blocks, b(b−1)/2]`: PEFT ≥ 0.16,
//!   kohya `networks.oft_v2`, OneTrainer `OFT_2` (the trainers' files share one reader and one
//!   writer here).
//! * [`butterfly`]: `boft_R` / `boft_s`: PEFT BOFT and kohya `networks.boft`.

pub mod blocks;
pub mod butterfly;
pub mod packed;
