//! The candle backend (`--device cuda[:N]`, and `candle-cpu` for tests): each tensor's edits
//! as the tensor program of [`crate::candle_rotate`], on a CUDA device (cargo feature `cuda`)
//! or on candle's CPU device.
//!
//! * **load** (reader thread): the stored bytes are checked against dtype and shape and copied
//!   to the device as they are — a tensor is read from disk and uploaded while the previous
//!   one computes.
//! * **compute** (compute thread): R blocks, gathers and row scales built on the host in f64
//!   (the CPU backend's own function) and uploaded; the device program; the result rounded
//!   once on the device, downloaded and checked for finiteness with the CPU backend's messages.
//! * **Device memory is bounded**: the stream holds at most [`Backend::in_flight`] loaded
//!   tensors in its queue, plus the one the reader is uploading and the one computing (with
//!   its intermediates: the widened weight and a few copies of it in the compute type), so a
//!   checkpoint larger than the card bakes; the largest single tensor sets the peak.
//! * **Precision**: F16/BF16 tensors are computed in f32, F32/F64 in f64, as on the CPU, with
//!   one rounding to the stored dtype at the end. cuBLAS runs f32 products in full f32 (no
//!   TF32). Everything but the matrix products is the same operation as on the CPU; the
//!   products sum in another order (cuBLAS, or candle's `gemm` on its CPU device), so a value
//!   may differ from the CPU backend's by the compute type's rounding, which the final rounding
//!   hides except next to a rounding boundary (then one unit in the last place of the stored
//!   dtype; `tests/cli/candle.rs` measures it on every fixture). Results are deterministic on
//!   one machine for any number of tensors in flight.

use super::{Backend, Edit, TensorBytes, TensorJob};
use crate::candle_rotate::{self as program, Resident, Rotated};
use crate::error::{Error, Result};
use candle_core::Device;

/// Tensors the stream may queue between reader and compute (each resident on the device).
const IN_FLIGHT: usize = 1;

/// The candle backend on one device.
pub(crate) struct Candle {
    device: Device,
    /// candle's CPU device runs its kernels on rayon: the `--threads` pool.
    pool: rayon::ThreadPool,
}

impl Candle {
    /// A backend on `device`; `threads` sizes the pool the host work (and candle's CPU device)
    /// runs on.
    pub fn new(device: Device, threads: Option<usize>) -> Result<Self> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.unwrap_or(0))
            .build()
            .map_err(|e| Error::usage(format!("cannot start {threads:?} threads: {e}")))?;
        Ok(Candle { device, pool })
    }
}

impl Backend for Candle {
    type Loaded = Resident;

    fn in_flight(&self) -> usize {
        IN_FLIGHT
    }

    fn run_stage<R: Send>(&self, stage: impl FnOnce() -> R + Send) -> R {
        self.pool.install(stage)
    }

    fn load(&self, t: &TensorJob<'_>, bytes: Vec<u8>) -> Result<Resident> {
        program::upload(t.key, &bytes, t.dtype, t.shape, &self.device)
    }

    fn compute(&self, t: &TensorJob<'_>, w: Resident) -> Result<TensorBytes> {
        // A `.oft` input's parameters are read here, and dropped with this tensor.
        let layers = t
            .edits
            .iter()
            .map(|e| e.layer())
            .collect::<Result<Vec<_>>>()?;
        let edits: Vec<program::Edit<'_>> = t.edits.iter().zip(&layers).map(edit).collect();
        let run = || -> Result<TensorBytes> {
            let p = program::prepare(t.key, &w, &edits)?;
            let c = program::program(t.key, &w, &p)?;
            Ok(match program::finish(t.key, c)? {
                Rotated::F16(v) => TensorBytes::F16(v),
                Rotated::Bf16(v) => TensorBytes::Bf16(v),
                Rotated::F32(v) => TensorBytes::F32(v),
                Rotated::F64(v) => TensorBytes::F64(v),
            })
        };
        if self.pool.current_thread_index().is_some() {
            run()
        } else {
            self.pool.install(run)
        }
    }
}

/// A bake edit (with its layer, parameters read) as the tensor program takes it.
fn edit<'a>(
    (e, layer): (&'a Edit<'a>, &'a std::borrow::Cow<'a, crate::model::Layer>),
) -> program::Edit<'a> {
    program::Edit {
        layer,
        rows: Some(&e.rows),
        blend: e.blend,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::Blend;
    use crate::base::RowSlice;
    use crate::model::{Layer, ModuleKind, RotationMap, Side, Stage, StageSpec, Target, Wiring};
    use safetensors::tensor::Dtype;

    fn layer(b: u64, side: Side) -> Layer {
        Layer {
            target: Target {
                name: "w".into(),
                convention: "unknown".into(),
                component: None,
                module: ModuleKind::Linear,
                shape: None,
                rotated_dim: None,
                rows: None,
            },
            side,
            stages: vec![Stage {
                spec: StageSpec {
                    blocks: Some(2),
                    block_size: b,
                    shared: false,
                    wiring: Wiring::Identity,
                    map: RotationMap::Cayley,
                    q: String::new(),
                    truncated: false,
                },
                q: vec![0.3, -0.2],
                q_f64: true,
                inverse: false,
            }],
            row_scale: None,
            row_scale_f64: true,
            constraint: None,
            base_binding: None,
        }
    }

    /// Scattered row ranges (the contract's gather/scatter case) give what the CPU backend
    /// gives, rows outside the slice untouched; a slice that does not fit is an error.
    #[test]
    fn row_ranges_match_the_cpu_backend() {
        let (rows, cols) = (8, 4);
        let values: Vec<f32> = (0..rows * cols).map(|i| (i as f32 * 0.37).sin()).collect();
        let bytes: Vec<u8> = bytemuck::cast_slice(&values).to_vec();
        let shape = [rows, cols];
        for side in [Side::Input, Side::Output] {
            let l = layer(2, side);
            let edits = [Edit::new(
                std::borrow::Cow::Borrowed(&l),
                RowSlice::new(vec![5..7, 0..2]),
                Blend::default(),
            )];
            let job = TensorJob {
                key: "w",
                dtype: Dtype::F32,
                shape: &shape,
                edits: &edits,
            };
            let cpu = super::super::cpu::Cpu::new(Some(1)).unwrap();
            let want = cpu
                .compute(&job, cpu.load(&job, bytes.clone()).unwrap())
                .unwrap();
            let candle = Candle::new(Device::Cpu, Some(1)).unwrap();
            let got = candle
                .compute(&job, candle.load(&job, bytes.clone()).unwrap())
                .unwrap();
            assert_eq!(got.as_bytes(), want.as_bytes(), "{side:?}");
            assert_eq!(
                &got.as_bytes()[8 * cols..16 * cols],
                &bytes[8 * cols..16 * cols]
            );
        }
        let l = layer(2, Side::Input);
        let edits = [Edit::new(
            std::borrow::Cow::Borrowed(&l),
            RowSlice::range(7..9),
            Blend::default(),
        )];
        let job = TensorJob {
            key: "w",
            dtype: Dtype::F32,
            shape: &shape,
            edits: &edits,
        };
        let candle = Candle::new(Device::Cpu, Some(1)).unwrap();
        let err = candle
            .compute(&job, candle.load(&job, bytes).unwrap())
            .err()
            .expect("rows outside the tensor are refused");
        assert!(err.to_string().contains("outside"), "{err}");
    }
}
