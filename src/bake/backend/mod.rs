//! Compute backends of the bake: "apply these edits to this tensor's bytes".
//!
//! The stream ([`super::stream`]) reads each tensor that has edits, hands its stored bytes to
//! [`Backend::load`] on the reader thread, then to [`Backend::compute`] on the compute thread
//! (in file order, one tensor at a time), and writes what comes back. Everything else (which
//! tensors, which rows, in which order, I/O, atomic output, progress) is the bake's; a backend
//! only turns bytes into bytes. Two backends: [`cpu::Cpu`] (the native kernels, the default) and
//! [`candle::Candle`] (the tensor program of [`crate::candle_rotate`] on a CUDA device or on
//! candle's CPU device; `--device`).
//!
//! # Contract
//!
//! * **Input.** The tensor's bytes exactly as stored (little-endian, its [`TensorJob::dtype`],
//!   its full [`TensorJob::shape`]), and its edits in the order they apply. Each edit is one
//!   adapter layer, a strength rule ([`Blend`]) and the rows it covers ([`RowSlice`]): row `i`
//!   of the layer is row `i` of the ranges laid end to end, so a backend gathers those rows,
//!   applies the layer to the `(rows, cols)` matrix they form and scatters the result back.
//!   The plan has already checked that every layer fits its rows (`base::check_shape`); a
//!   backend still refuses, with an error and without panicking, bytes or rows that do not
//!   match the shape. A backend gets the layer with [`Edit::layer`], once per tensor: for a
//!   `.oft` input that reads the layer's parameters from the file (they are not in memory
//!   before), so it is called where the layer is needed and the result dropped with the
//!   tensor.
//! * **Output.** The new bytes of the whole tensor, in the same dtype and of the same length
//!   (the stream checks the length). Rows no edit covers are returned unchanged.
//! * **Precision and rounding.** R is built in f64 on the host ([`crate::apply::PreparedStage`];
//!   a device backend uploads those blocks). The CPU backend computes F32/F64 tensors in f64 and
//!   F16/BF16 tensors in f32 and rounds once, at the end, to the stored dtype (round to nearest
//!   even). Another backend must say what it computes in; its output is compared with the CPU
//!   backend's within the fixtures' tolerance, not bit for bit.
//! * **Determinism.** The CPU backend's output is bit-identical for any thread count (work is
//!   cut into fixed chunks). Any backend must give the same bytes for the same input on the same
//!   machine, whatever [`Backend::in_flight`] is.
//! * **Finiteness.** The backend checks its result before handing it back: a NaN or infinity,
//!   or a value that overflows the stored dtype, is a `non-finite` error naming the tensor and
//!   the element (the `codec` helpers do this as part of the final rounding pass).
//! * **Preparation.** Per-layer state (R blocks, gather lists) is built per tensor in
//!   [`Backend::compute`] (or `load`); every layer edits one tensor, so this is once per layer.
//!   The CPU backend builds the fused 16-bit path's in `load`, so that the next tensor's R
//!   blocks are built while the previous tensor rotates.
//!
//! # Adding a backend
//!
//! Implement [`Backend`] in a new file here (behind a cargo feature if it needs one), pick it in
//! `bake::merge` from an option, and give [`Backend::in_flight`] the number of tensors the stream
//! may hold between the reader and the writer (the reader reads ahead that many tensors while
//! one computes). Run the fixture bakes (`tests/merge.rs`) with it.

pub(crate) mod candle;
pub(crate) mod cpu;

use crate::error::Result;
use safetensors::tensor::Dtype;

pub(crate) use super::codec::TensorBytes;
pub(crate) use super::edit::Edit;

/// A tensor to compute: its key, dtype, full shape and its edits in order.
pub(crate) struct TensorJob<'a> {
    pub key: &'a str,
    pub dtype: Dtype,
    pub shape: &'a [usize],
    pub edits: &'a [Edit<'a>],
}

impl TensorJob<'_> {
    /// Rows (first axis) and row length (the other axes) of the tensor's 2-D view.
    pub fn view(&self) -> (usize, usize) {
        let rows = self.shape.first().copied().unwrap_or(0);
        (rows, self.shape.iter().skip(1).product())
    }
}

/// A compute backend (see the module documentation for the contract).
pub(crate) trait Backend: Sync {
    /// What the reader thread hands on: decoded values, a device buffer, or the bytes as read.
    type Loaded: Send;

    /// How many tensors may be in flight between the reader and the compute stage.
    fn in_flight(&self) -> usize {
        1
    }

    /// Run the compute stage of one file (the loop that calls [`Backend::compute`] for each of
    /// its tensors, in order) where the backend wants it: the CPU backend runs it on one thread
    /// of its pool, so that the buffers it allocates come from one thread's heap.
    fn run_stage<R: Send>(&self, stage: impl FnOnce() -> R + Send) -> R {
        stage()
    }

    /// Prepare a tensor's stored bytes for [`Backend::compute`] (on the reader thread, while
    /// the previous tensor computes): decode, or upload.
    fn load(&self, tensor: &TensorJob<'_>, bytes: Vec<u8>) -> Result<Self::Loaded>;

    /// Apply the tensor's edits and return its new bytes in the stored dtype.
    fn compute(&self, tensor: &TensorJob<'_>, loaded: Self::Loaded) -> Result<TensorBytes>;
}
