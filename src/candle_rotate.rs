//! The rotation as a candle tensor program: the edits [`crate::apply`] makes on the CPU,
//! expressed as tensor operations that run on candle's CPU device or, with the cargo feature
//! `cuda`, on an NVIDIA GPU.
//!
//! One tensor's program (see `docs/gpu.md` for the costs):
//! 1. upload the base bytes as they are and widen once to the compute type — f32 for F16/BF16
//!    bases, f64 for F32/F64 bases, as the CPU path does;
//! 2. per layer, orient the weight so that the rotated axis comes first: the `(rows, cols)`
//!    view for the output side, its transpose `(cols, rows)` for the input side (one copy, kept
//!    across consecutive input-side layers). A stage is then `A' = M_k · A_k` on the block rows
//!    `A_k` of the oriented matrix `A (d × n)`, with `M_k = R_k` on the input side and `R_kᵀ` on
//!    the output side;
//! 3. per stage: a butterfly wiring gathers rows of `A` (`index_select` with σ), one batched
//!    matrix product `(blocks, b, b) × (blocks, b, n)` over a reshape of `A` (a shared block is
//!    broadcast with a zero batch stride; never a dense block-diagonal matrix), and the inverse
//!    gather puts rows back;
//! 4. row scales multiply the rows (before or after the stages), a linear blend
//!    `W + s·(W' − W)` is computed in f64 as on the CPU;
//! 5. turn back to `(rows, cols)`, round once to the base dtype, download, and check that
//!    every value is finite (the CPU path's messages).
//!
//! R blocks are built on the host in f64 by [`crate::apply::stage_blocks`] (the CPU kernels'
//! own function) and moved to the device in the compute type. Everything but the matrix
//! products is exact and bit-identical to the CPU path; the products sum in a different order
//! (candle's GEMM, cuBLAS), so results can differ from the CPU path by the rounding of the
//! compute type, which the final rounding to the base dtype hides except near a tie (then one
//! unit in the last place of the base dtype; `tests/cli/candle.rs` measures it on every fixture).

use crate::apply::{Blend, check_fits, stage_blocks};
use crate::base::RowSlice;
use crate::error::{Category, Error, Result};
use crate::model::{Layer, ScalePosition, Side};
use crate::wiring::gather;
use candle_core::{DType, Device, Tensor};
use safetensors::Dtype;

/// One adapter layer applied to one base tensor, optionally to some of its rows: row `i` of
/// the layer is row `i` of the slice's ranges laid end to end (a fused q/k/v tensor).
#[derive(Debug, Clone, Copy)]
pub struct Edit<'a> {
    pub layer: &'a Layer,
    pub rows: Option<&'a RowSlice>,
    pub blend: Blend,
}

/// A rotated tensor back on the host, in its base dtype.
#[derive(Debug, Clone, PartialEq)]
pub enum Rotated {
    F16(Vec<half::f16>),
    Bf16(Vec<half::bf16>),
    F32(Vec<f32>),
    F64(Vec<f64>),
}

impl Rotated {
    /// The little-endian bytes, as a safetensors file stores them.
    pub fn bytes(&self) -> &[u8] {
        match self {
            Rotated::F16(v) => bytemuck::cast_slice(v),
            Rotated::Bf16(v) => bytemuck::cast_slice(v),
            Rotated::F32(v) => bytemuck::cast_slice(v),
            Rotated::F64(v) => bytemuck::cast_slice(v),
        }
    }
}

/// Where `--device` asks the rotation to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// The native CPU kernels ([`crate::apply`]).
    #[default]
    Cpu,
    /// This tensor program on candle's CPU device (`candle-cpu`: tests the device path
    /// without a GPU).
    CandleCpu,
    /// CUDA device `N` through candle.
    Cuda(usize),
    /// CUDA device 0 when this build and machine have one, else the CPU.
    Auto,
}

impl std::str::FromStr for DeviceChoice {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::new(Category::Usage, format!("unknown device `{s}`"))
                .expected_found("cpu, cuda, cuda:N or auto", s)
        };
        match s {
            "cpu" => Ok(DeviceChoice::Cpu),
            "candle-cpu" => Ok(DeviceChoice::CandleCpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            "auto" => Ok(DeviceChoice::Auto),
            _ => match s.strip_prefix("cuda:") {
                Some(n) if !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()) => {
                    n.parse().map(DeviceChoice::Cuda).map_err(|_| bad())
                }
                _ => Err(bad()),
            },
        }
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::CandleCpu => f.write_str("candle-cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceChoice::Auto => f.write_str("auto"),
        }
    }
}

/// Whether this binary was built with the `cuda` feature.
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

/// Open CUDA device `ordinal`, or say why not (not built with CUDA, no driver, no such device).
pub fn open_cuda(ordinal: usize) -> Result<Device> {
    if !CUDA_BUILT {
        return Err(Error::new(
            Category::Unsupported,
            "this oftool was built without CUDA support",
        )
        .hint("build the cuda binary (scripts/build-cuda.sh, docs/gpu.md) or use --device cpu"));
    }
    // TF32 products would round R and W to 10 mantissa bits: keep cuBLAS in full f32.
    candle_core::cuda::set_gemm_reduced_precision_f32(false);
    Device::new_cuda(ordinal).map_err(|e| {
        Error::new(
            Category::Unsupported,
            format!("cannot open CUDA device {ordinal}: {e}"),
        )
        .hint("check `nvidia-smi`, the device number, and that the CUDA 13 libraries are found (docs/gpu.md); or use --device cpu")
    })
}

/// Resolve `--device`: `Ok(None)` means the native CPU kernels. For `auto` without a usable
/// GPU, the reason comes back as a note for the user, and the CPU is used.
pub fn resolve_device(choice: DeviceChoice) -> Result<(Option<Device>, Option<String>)> {
    match choice {
        DeviceChoice::Cpu => Ok((None, None)),
        DeviceChoice::CandleCpu => Ok((Some(Device::Cpu), None)),
        DeviceChoice::Cuda(n) => open_cuda(n).map(|d| (Some(d), None)),
        DeviceChoice::Auto => match open_cuda(0) {
            Ok(d) => Ok((Some(d), None)),
            Err(e) => Ok((
                None,
                Some(format!("no GPU used ({e}); rotating on the CPU")),
            )),
        },
    }
}

/// A candle failure while computing (device memory, a kernel, a transfer) as an [`Error`].
trait OnDevice<T> {
    fn on_device(self, key: &str) -> Result<T>;
}

impl<T> OnDevice<T> for candle_core::Result<T> {
    fn on_device(self, key: &str) -> Result<T> {
        self.map_err(|e| {
            Error::new(Category::Io, format!("the compute device failed: {e}"))
                .tensor(key)
                .hint("a GPU out of memory bakes with --device cpu")
        })
    }
}

/// The compute type for a base dtype, as on the CPU path.
fn compute_dtype(dtype: Dtype) -> Option<(DType, DType)> {
    match dtype {
        Dtype::F16 => Some((DType::F16, DType::F32)),
        Dtype::BF16 => Some((DType::BF16, DType::F32)),
        Dtype::F32 => Some((DType::F32, DType::F64)),
        Dtype::F64 => Some((DType::F64, DType::F64)),
        _ => None,
    }
}

/// A host f64 vector as a device tensor of the compute type (f32: rounded once, as
/// `Real::from_f64` does on the CPU path).
fn upload_f64(
    values: &[f64],
    shape: &[usize],
    compute: DType,
    device: &Device,
) -> candle_core::Result<Tensor> {
    if compute == DType::F32 {
        let v: Vec<f32> = values.iter().map(|&x| x as f32).collect();
        Tensor::from_vec(v, shape, device)
    } else {
        Tensor::from_vec(values.to_vec(), shape, device)
    }
}

/// The weight as the program holds it: `(rows, cols)` or transposed `(cols, rows)`, contiguous.
struct Oriented {
    t: Tensor,
    transposed: bool,
}

impl Oriented {
    fn to(self, transposed: bool) -> candle_core::Result<Oriented> {
        if self.transposed == transposed {
            return Ok(self);
        }
        Ok(Oriented {
            t: self.t.t()?.contiguous()?,
            transposed,
        })
    }

    /// Multiply row `i` of the `(rows, cols)` view by `s[i]` (`s` one-dimensional).
    fn scale_rows(self, s: &Tensor) -> candle_core::Result<Oriented> {
        let n = s.elem_count();
        let s = if self.transposed {
            s.reshape((1, n))?
        } else {
            s.reshape((n, 1))?
        };
        Ok(Oriented {
            t: self.t.broadcast_mul(&s)?,
            transposed: self.transposed,
        })
    }
}

/// One stage ready on the device: `M_k` blocks (`R_k` on the input side, `R_kᵀ` on the
/// output side), broadcast when one block serves all, and the gather lists of a butterfly.
struct DeviceStage {
    b: usize,
    blocks: usize,
    m: Tensor,
    /// (σ, σ⁻¹) as row indices; `None` for the identity wiring.
    gather: Option<(Tensor, Tensor)>,
}

/// The rows an edit covers, as the device program reaches them.
enum Rows {
    /// Every row, in order.
    All,
    /// One contiguous range `(start, len)`: `narrow`, then `cat` back.
    Range(usize, usize),
    /// Several ranges: `index_select` of the covered rows, then one `index_select` over
    /// `[whole; rotated part]` that takes each covered row from the part (`back`).
    Gather { rows: Tensor, back: Tensor },
}

/// One edit ready on the device.
struct DeviceEdit {
    rows: Rows,
    side: Side,
    stages: Vec<DeviceStage>,
    scale: Option<(ScalePosition, Tensor)>,
    linear: Option<f64>,
}

/// A tensor's edits with their blocks built on the host (f64, by the CPU path's own function)
/// and moved to the device in the compute type: the host half of the program, which can run
/// while the device works on another tensor.
pub struct Prepared {
    edits: Vec<DeviceEdit>,
}

/// Build and upload the blocks, gather lists and row scales of `edits` for `w`.
pub fn prepare(key: &str, w: &Resident, edits: &[Edit<'_>]) -> Result<Prepared> {
    let (rows, cols) = (w.rows, w.cols);
    let (_, compute) = compute_dtype(w.dtype).unwrap_or((DType::F64, DType::F64));
    let dev = w.t.device();
    let mut out = Vec::with_capacity(edits.len());
    for e in edits {
        let len = match e.rows {
            Some(slice) if !slice.fits(rows) => {
                return Err(Error::new(
                    Category::TargetShape,
                    format!("rows {slice} are outside the tensor's {rows} rows or overlap"),
                )
                .tensor(key));
            }
            Some(slice) => slice.len(),
            None => rows,
        };
        let layer = e.layer;
        check_fits(layer, len, cols).map_err(|err| err.tensor(key))?;
        let axis = match layer.side {
            Side::Input => cols,
            Side::Output => len,
        };
        let mut stages = Vec::with_capacity(layer.stages.len());
        for stage in &layer.stages {
            let b = stage.spec.block_size as usize;
            let blocks = stage.blocks_on(axis as u64) as usize;
            if blocks.saturating_mul(b) != axis {
                // A truncated stage (spec §8.7) whose blocks overhang the axis: only the CPU
                // kernels cut the block-diagonal matrix.
                return Err(Error::new(
                    Category::Unsupported,
                    format!(
                        "a truncated stage of {blocks} × {b} blocks cut to {axis} features runs on the CPU backend only"
                    ),
                )
                .tensor(key)
                .hint("bake this adapter with `--device cpu`"));
            }
            let sigma = gather(&stage.spec.wiring, blocks, b)
                .map_err(|err| Error::new(Category::Wiring, err.0).tensor(key))?;
            let identity = sigma.iter().enumerate().all(|(i, &s)| i == s);
            let mut m = stage_blocks(stage, e.blend.interpolate).map_err(|err| err.tensor(key))?;
            if layer.side == Side::Output {
                for r in &mut m {
                    for i in 0..b {
                        for j in (i + 1)..b {
                            r.swap(i * b + j, j * b + i);
                        }
                    }
                }
            }
            let stored = m.len();
            let m = upload_f64(&m.concat(), &[stored, b, b], compute, dev).on_device(key)?;
            // A shared block (or one stored block) serves every block: a zero batch stride.
            let m = if stored == blocks {
                m
            } else {
                m.broadcast_as((blocks, b, b)).on_device(key)?
            };
            let gather = if identity {
                None
            } else {
                let mut inv = vec![0u32; sigma.len()];
                for (p, &i) in sigma.iter().enumerate() {
                    inv[i] = p as u32;
                }
                let fwd: Vec<u32> = sigma.iter().map(|&i| i as u32).collect();
                let n = fwd.len();
                Some((
                    Tensor::from_vec(fwd, n, dev).on_device(key)?,
                    Tensor::from_vec(inv, n, dev).on_device(key)?,
                ))
            };
            stages.push(DeviceStage {
                b,
                blocks,
                m,
                gather,
            });
        }
        let scale = match &layer.row_scale {
            Some((pos, s)) => Some((
                *pos,
                upload_f64(s, &[s.len()], compute, dev).on_device(key)?,
            )),
            None => None,
        };
        out.push(DeviceEdit {
            rows: device_rows(key, e.rows, rows, dev)?,
            side: layer.side,
            stages,
            scale,
            linear: e.blend.linear,
        });
    }
    Ok(Prepared { edits: out })
}

/// How the program reaches an edit's rows of a tensor of `rows` rows (already checked to fit).
fn device_rows(key: &str, slice: Option<&RowSlice>, rows: usize, dev: &Device) -> Result<Rows> {
    let Some(slice) = slice.filter(|s| !s.is_whole(rows)) else {
        return Ok(Rows::All);
    };
    if let Some(r) = slice.contiguous() {
        return Ok(Rows::Range(r.start, r.len()));
    }
    let index = |v: Vec<u32>| {
        let n = v.len();
        Tensor::from_vec(v, n, dev).on_device(key)
    };
    let too_many = || {
        Error::new(
            Category::Unsupported,
            format!("{rows} rows are too many to index on the device"),
        )
        .tensor(key)
    };
    let mut back: Vec<u32> = (0..rows)
        .map(|r| u32::try_from(r).map_err(|_| too_many()))
        .collect::<Result<_>>()?;
    let mut covered = Vec::with_capacity(slice.len());
    for (p, r) in slice.ranges().iter().cloned().flatten().enumerate() {
        covered.push(u32::try_from(r).map_err(|_| too_many())?);
        back[r] = u32::try_from(rows + p).map_err(|_| too_many())?;
    }
    Ok(Rows::Gather {
        rows: index(covered)?,
        back: index(back)?,
    })
}

/// The device half for one edit on a `(rows, cols)` weight.
fn run_edit(w: Oriented, e: &DeviceEdit, compute: DType) -> candle_core::Result<Oriented> {
    let original = e.linear.map(|_| (w.t.clone(), w.transposed));
    let mut w = w;
    if let Some((ScalePosition::Before, s)) = &e.scale {
        w = w.scale_rows(s)?;
    }
    w = w.to(e.side == Side::Input)?;
    let (axis, n) = match w.t.dims() {
        [a, n] => (*a, *n),
        _ => (0, 0),
    };
    for st in &e.stages {
        let a = match &st.gather {
            Some((fwd, _)) => w.t.index_select(fwd, 0)?,
            None => w.t.clone(),
        };
        let out =
            st.m.matmul(&a.reshape((st.blocks, st.b, n))?)?
                .reshape((axis, n))?;
        w.t = match &st.gather {
            Some((_, inv)) => out.index_select(inv, 0)?,
            None => out,
        };
    }
    if let Some((ScalePosition::After, s)) = &e.scale {
        w = w.scale_rows(s)?;
    }
    if let (Some(s), Some((t0, transposed0))) = (e.linear, original) {
        // W + s·(W' − W) in f64, s first rounded to the compute type (as on the CPU path).
        let s = if compute == DType::F32 {
            s as f32 as f64
        } else {
            s
        };
        let w0 = Oriented {
            t: t0,
            transposed: transposed0,
        }
        .to(w.transposed)?
        .t
        .to_dtype(DType::F64)?;
        let diff = w.t.to_dtype(DType::F64)?.sub(&w0)?;
        let diff = diff.broadcast_mul(&Tensor::new(s, w0.device())?)?;
        w.t = w0.add(&diff)?.to_dtype(compute)?;
    }
    Ok(w)
}

/// A base tensor on the device in its own dtype, viewed as `(rows, cols)`.
pub struct Resident {
    t: Tensor,
    dtype: Dtype,
    rows: usize,
    cols: usize,
}

impl Resident {
    /// Bytes of the tensor in its base dtype.
    pub fn byte_len(&self) -> usize {
        self.rows * self.cols * self.dtype.bitsize() / 8
    }
}

/// The result of [`program`] on the device: the values in the compute type and rounded to
/// the base dtype (both `(rows, cols)`).
pub struct Computed {
    wide: Tensor,
    out: Tensor,
    dtype: Dtype,
}

/// Check `bytes` against `dtype` and `shape` and copy them to `device` as they are.
pub fn upload(
    key: &str,
    bytes: &[u8],
    dtype: Dtype,
    shape: &[usize],
    device: &Device,
) -> Result<Resident> {
    let (base, _) = compute_dtype(dtype).ok_or_else(|| {
        Error::new(
            Category::TargetShape,
            format!("dtype {dtype:?} cannot be rotated; only F64, F32, F16 and BF16"),
        )
        .tensor(key)
    })?;
    let rows = *shape.first().ok_or_else(|| {
        Error::new(
            Category::TargetShape,
            "a 0-dimensional tensor cannot be rotated",
        )
        .tensor(key)
    })?;
    let cols: usize = shape[1..].iter().product();
    let numel = rows.checked_mul(cols);
    if numel.and_then(|n| n.checked_mul(dtype.bitsize() / 8)) != Some(bytes.len()) {
        return Err(Error::new(
            Category::Tensor,
            format!(
                "{} bytes do not hold a {dtype:?} tensor of shape {shape:?}",
                bytes.len()
            ),
        )
        .tensor(key));
    }
    let t = Tensor::from_raw_buffer(bytes, base, &[rows, cols], device).on_device(key)?;
    Ok(Resident {
        t,
        dtype,
        rows,
        cols,
    })
}

/// Run the device half of the program: the prepared edits in order, each on its row slice,
/// one rounding to the base dtype at the end. The input stays on the device unchanged.
pub fn program(key: &str, w: &Resident, p: &Prepared) -> Result<Computed> {
    let (rows, cols, dtype) = (w.rows, w.cols, w.dtype);
    let (base, compute) = compute_dtype(dtype).unwrap_or((DType::F64, DType::F64));
    let run = || -> candle_core::Result<Computed> {
        // Widen once; when the first edit rotates the input side, transpose in the same pass.
        let transposed = p
            .edits
            .first()
            .is_some_and(|e| e.side == Side::Input && matches!(e.rows, Rows::All));
        let t = if transposed { w.t.t()? } else { w.t.clone() };
        let mut w = Oriented {
            t: t.to_dtype(compute)?.contiguous()?,
            transposed,
        };
        if rows * cols > 0 {
            for e in &p.edits {
                let (start, len) = match &e.rows {
                    Rows::All => {
                        w = run_edit(w, e, compute)?;
                        continue;
                    }
                    Rows::Gather { rows, back } => {
                        // Rows from several ranges: gather them, rotate, take them back.
                        let whole = w.to(false)?.t;
                        let part = Oriented {
                            t: whole.index_select(rows, 0)?,
                            transposed: false,
                        };
                        let part = run_edit(part, e, compute)?.to(false)?;
                        w = Oriented {
                            t: Tensor::cat(&[&whole, &part.t], 0)?.index_select(back, 0)?,
                            transposed: false,
                        };
                        continue;
                    }
                    Rows::Range(start, len) => (*start, *len),
                };
                // A row slice (a fused q/k/v tensor): rotate it alone, then put it back.
                let whole = w.to(false)?.t;
                let part = Oriented {
                    t: whole.narrow(0, start, len)?,
                    transposed: false,
                };
                let part = run_edit(part, e, compute)?.to(false)?;
                let mut pieces = Vec::with_capacity(3);
                if start > 0 {
                    pieces.push(whole.narrow(0, 0, start)?);
                }
                pieces.push(part.t);
                if start + len < rows {
                    pieces.push(whole.narrow(0, start + len, rows - start - len)?);
                }
                w = Oriented {
                    t: Tensor::cat(&pieces, 0)?,
                    transposed: false,
                };
            }
        }
        // Round once to the base dtype, turning back to (rows, cols) in the same pass.
        let wide = if w.transposed { w.t.t()? } else { w.t };
        let out = wide.to_dtype(base)?.contiguous()?;
        Ok(Computed { wide, out, dtype })
    };
    run().on_device(key)
}

/// Download a computed tensor and check, as the CPU path does, that every value is finite.
pub fn finish(key: &str, c: Computed) -> Result<Rotated> {
    let host = download(&c.out).on_device(key)?;
    check(key, c.dtype, host, &c.wide)
}

/// Apply `edits` (in order, each on its row slice) to a tensor of `dtype` and `shape` given by
/// its little-endian `bytes`, on `device`; one rounding to `dtype` at the end.
pub fn rotate(
    key: &str,
    bytes: &[u8],
    dtype: Dtype,
    shape: &[usize],
    edits: &[Edit<'_>],
    device: &Device,
) -> Result<Rotated> {
    let w = upload(key, bytes, dtype, shape, device)?;
    let p = prepare(key, &w, edits)?;
    let c = program(key, &w, &p)?;
    drop(w);
    finish(key, c)
}

/// A contiguous device tensor's values on the host, moved out of its storage without a
/// second copy.
fn download(t: &Tensor) -> candle_core::Result<candle_core::CpuStorage> {
    use candle_core::backend::BackendStorage;
    let (storage, layout) = t.storage_and_layout();
    let whole = layout.contiguous_offsets() == Some((0, t.elem_count()));
    let host = match &*storage {
        candle_core::Storage::Cpu(s) if whole => s.clone(),
        candle_core::Storage::Cuda(s) if whole => s.to_cpu_storage()?,
        _ => {
            drop(storage);
            let flat = t.flatten_all()?;
            return match t.dtype() {
                DType::F16 => flat.to_vec1().map(candle_core::CpuStorage::F16),
                DType::BF16 => flat.to_vec1().map(candle_core::CpuStorage::BF16),
                DType::F32 => flat.to_vec1().map(candle_core::CpuStorage::F32),
                _ => flat.to_vec1().map(candle_core::CpuStorage::F64),
            };
        }
    };
    Ok(host)
}

/// Index of the first value that is not finite.
fn first_non_finite<X: Copy + Sync>(v: &[X], finite: impl Fn(X) -> bool + Sync) -> Option<usize> {
    use rayon::prelude::*;
    v.par_iter().position_first(|&x| !finite(x))
}

/// The CPU path's finiteness rules: a value that is not finite in the compute type is
/// `non-finite`, one that overflows the rounding to the base dtype too (naming the dtype).
fn check(
    key: &str,
    dtype: Dtype,
    out: candle_core::CpuStorage,
    computed: &Tensor,
) -> Result<Rotated> {
    use candle_core::CpuStorage as S;
    let overflow = |i: usize| {
        Error::new(
            Category::NonFinite,
            format!("the merged value at element {i} overflows {dtype:?}"),
        )
        .tensor(key)
    };
    let not_finite = |i: usize| {
        Error::new(
            Category::NonFinite,
            format!("the merged value at element {i} is not finite"),
        )
        .tensor(key)
    };
    match out {
        S::F16(v) => match first_non_finite(&v, |x| x.is_finite()) {
            Some(i) => Err(overflow(i)),
            None => Ok(Rotated::F16(v)),
        },
        S::BF16(v) => match first_non_finite(&v, |x| x.is_finite()) {
            Some(i) => Err(overflow(i)),
            None => Ok(Rotated::Bf16(v)),
        },
        S::F32(v) => match first_non_finite(&v, |x| x.is_finite()) {
            None => Ok(Rotated::F32(v)),
            // Only now look at the f64 values: a NaN or infinity there comes first.
            Some(i) => {
                let wide = computed
                    .flatten_all()
                    .and_then(|t| t.to_vec1::<f64>())
                    .on_device(key)?;
                Err(match first_non_finite(&wide, |x| x.is_finite()) {
                    Some(j) => not_finite(j),
                    None => overflow(i),
                })
            }
        },
        S::F64(v) => match first_non_finite(&v, |x| x.is_finite()) {
            Some(i) => Err(not_finite(i)),
            None => Ok(Rotated::F64(v)),
        },
        _ => Err(Error::new(
            Category::Tensor,
            "the device returned values of another dtype",
        )
        .tensor(key)),
    }
}
