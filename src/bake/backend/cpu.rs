//! The CPU backend: the rotation kernels of [`crate::apply`] on a rayon pool of `--threads`
//! threads. F16/BF16 tensors are rotated in f32, F32/F64 tensors in f64; results are
//! bit-identical for any thread count.
//!
//! A 16-bit tensor whose edits all rotate whole rows on the input side takes a fused path:
//! chunks of rows are widened, rotated by every edit and rounded back one at a time, so no
//! tensor-sized f32 copy exists.

use super::{Backend, Edit, TensorBytes, TensorJob};
use crate::apply::{INPUT_CHUNK_ROWS, PreparedStage, Real, apply_layer_blended, check_fits};
use crate::bake::codec::{self, Half};
use crate::error::{Category, Error, Result};
use crate::model::Side;
use rayon::prelude::*;
use safetensors::tensor::Dtype;

/// The CPU backend and its thread pools.
pub(crate) struct Cpu {
    pool: rayon::ThreadPool,
    /// As many threads again, on which the reader thread evaluates the next tensor's stages
    /// (the main pool may be entirely taken by the compute stage, which waits there for its
    /// next tensor). At b = 256 the Cayley solves are ~6 % of the FLOP but, on one thread, set
    /// the pace of the whole bake.
    prep: rayon::ThreadPool,
}

impl Cpu {
    /// A backend on `threads` threads (default: all cores).
    pub fn new(threads: Option<usize>) -> Result<Self> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.unwrap_or(0))
            .build()
            .map_err(|e| Error::usage(format!("cannot start {threads:?} threads: {e}")))?;
        let prep = rayon::ThreadPoolBuilder::new()
            .num_threads(pool.current_num_threads())
            .build()
            .map_err(|e| Error::usage(format!("cannot start a thread: {e}")))?;
        Ok(Cpu { pool, prep })
    }
}

/// A tensor as the reader hands it on: F16/BF16 decoded to f32, F32/F64 to f64, or the raw
/// bytes of a 16-bit tensor that takes the fused path with its stages already evaluated (the
/// R blocks of the next tensor are built on the reader's side while the previous one rotates
/// on the pool: at b = 256 each block is an LU solve of ~45 MFLOP in f64).
pub(crate) enum Loaded {
    F32(Vec<f32>),
    F64(Vec<f64>),
    Raw(Vec<u8>, Vec<PreparedEdit>),
}

impl Backend for Cpu {
    type Loaded = Loaded;

    fn load(&self, t: &TensorJob<'_>, bytes: Vec<u8>) -> Result<Loaded> {
        let numel: usize = t.shape.iter().product();
        let width = match t.dtype {
            Dtype::F16 | Dtype::BF16 => 2,
            Dtype::F32 => 4,
            Dtype::F64 => 8,
            other => return Err(unsupported(t.key, other)),
        };
        if numel.checked_mul(width) != Some(bytes.len()) {
            return Err(Error::new(
                Category::Tensor,
                format!(
                    "{} bytes do not hold shape {:?} of {:?}",
                    bytes.len(),
                    t.shape,
                    t.dtype
                ),
            )
            .tensor(t.key));
        }
        Ok(match t.dtype {
            Dtype::F16 | Dtype::BF16 if fusable(t) => {
                let prepared = self.prep.install(|| prepare_fused(t))?;
                Loaded::Raw(bytes, prepared)
            }
            Dtype::F16 => Loaded::F32(codec::halves_to_f32::<half::f16>(&bytes)),
            Dtype::BF16 => Loaded::F32(codec::halves_to_f32::<half::bf16>(&bytes)),
            _ => Loaded::F64(codec::wide_to_f64(&bytes, t.dtype)),
        })
    }

    fn run_stage<R: Send>(&self, stage: impl FnOnce() -> R + Send) -> R {
        self.pool.install(stage)
    }

    fn compute(&self, t: &TensorJob<'_>, loaded: Loaded) -> Result<TensorBytes> {
        if self.pool.current_thread_index().is_some() {
            compute(t, loaded)
        } else {
            self.pool.install(|| compute(t, loaded))
        }
    }
}

fn unsupported(key: &str, dtype: Dtype) -> Error {
    Error::new(
        Category::TargetShape,
        format!("dtype {dtype:?} cannot be rotated (only F64, F32, F16 and BF16)"),
    )
    .tensor(key)
}

/// Apply the edits to a loaded tensor and round once to the stored dtype.
fn compute(t: &TensorJob<'_>, loaded: Loaded) -> Result<TensorBytes> {
    match (loaded, t.dtype) {
        (Loaded::Raw(bytes, p), Dtype::F16) => fused_input::<half::f16>(t, bytes, &p),
        (Loaded::Raw(bytes, p), Dtype::BF16) => fused_input::<half::bf16>(t, bytes, &p),
        (Loaded::F32(mut data), Dtype::F16) => {
            apply_edits(t, &mut data)?;
            codec::f32_to_halves::<half::f16>(t.key, &data, t.dtype)
        }
        (Loaded::F32(mut data), Dtype::BF16) => {
            apply_edits(t, &mut data)?;
            codec::f32_to_halves::<half::bf16>(t.key, &data, t.dtype)
        }
        (Loaded::F64(mut data), Dtype::F32) => {
            apply_edits(t, &mut data)?;
            codec::f64_to_f32(t.key, &data)
        }
        (Loaded::F64(mut data), Dtype::F64) => {
            apply_edits(t, &mut data)?;
            codec::f64_checked(t.key, data)
        }
        (_, other) => Err(unsupported(t.key, other)),
    }
}

/// Whether a tensor's edits can run fused (decode, rotate and encode per chunk of rows): every
/// edit rotates all rows in order, on the input side, without a linear blend.
fn fusable(t: &TensorJob<'_>) -> bool {
    let (rows, _) = t.view();
    t.edits
        .iter()
        .all(|e| e.rows.is_whole(rows) && e.side() == Side::Input && e.blend.linear.is_none())
}

/// Apply every edit in place, each on its rows: a contiguous range in place, several ranges
/// gathered into one matrix, rotated and scattered back.
fn apply_edits<T: Real>(t: &TensorJob<'_>, data: &mut [T]) -> Result<()> {
    let (rows, cols) = t.view();
    if rows.checked_mul(cols) != Some(data.len()) {
        return Err(Error::new(
            Category::TargetShape,
            format!("{} values do not fill shape {:?}", data.len(), t.shape),
        )
        .tensor(t.key));
    }
    for e in t.edits {
        if !e.rows.fits(rows) {
            return Err(Error::new(
                Category::TargetShape,
                format!("rows {} are outside the {rows} rows", e.rows),
            )
            .tensor(t.key));
        }
        apply_edit(e, data, cols).map_err(|err| err.tensor(t.key))?;
    }
    Ok(())
}

/// One edit on rows that [`crate::base::RowSlice::fits`] the `data` matrix of `cols` columns.
fn apply_edit<T: Real>(e: &Edit<'_>, data: &mut [T], cols: usize) -> Result<()> {
    let layer = e.layer()?;
    let n = e.rows.len();
    if let Some(r) = e.rows.contiguous() {
        let slice = &mut data[r.start * cols..r.end * cols];
        return apply_layer_blended(&layer, slice, n, cols, e.blend);
    }
    let mut gathered = Vec::with_capacity(n * cols);
    for r in e.rows.ranges() {
        gathered.extend_from_slice(&data[r.start * cols..r.end * cols]);
    }
    apply_layer_blended(&layer, &mut gathered, n, cols, e.blend)?;
    let mut from = 0;
    for r in e.rows.ranges() {
        let len = r.len() * cols;
        data[r.start * cols..r.end * cols].copy_from_slice(&gathered[from..from + len]);
        from += len;
    }
    Ok(())
}

/// Input-side rotation of a 16-bit tensor in one pass over chunks of rows: each chunk is
/// widened to f32, rotated by every edit and rounded back, so no tensor-sized f32 copy exists.
/// Chunks are the rows [`INPUT_CHUNK_ROWS`] apart that the general path uses, so results are
/// bit-identical to it.
///
/// The result is written over the stored bytes (each chunk is widened before it is rounded
/// back), and the f32 work happens in two buffers per thread that are reused from chunk to
/// chunk and tensor to tensor: no tensor-sized allocation, no zeroing, no copy back.
fn fused_input<H: Half>(
    t: &TensorJob<'_>,
    mut bytes: Vec<u8>,
    prepared: &[PreparedEdit],
) -> Result<TensorBytes> {
    let (_, cols) = t.view();
    if prepared.len() != t.edits.len() {
        return Err(Error::new(
            Category::Tensor,
            "internal error: the stages prepared do not match the edits",
        )
        .tensor(t.key));
    }
    let prepared: Vec<StagesAndScale<'_>> = prepared
        .iter()
        .zip(t.edits)
        .map(|(p, e)| (p.as_slice(), e.row_scale()))
        .collect();
    let prepared = prepared.as_slice();
    let Ok(halves) = bytemuck::try_cast_slice_mut::<u8, H>(&mut bytes) else {
        // Misaligned bytes (not from this allocator): rotate a copy.
        let mut copy = codec::as_halves::<H>(&bytes).into_owned();
        rotate_chunks(prepared, &mut copy, cols).map_err(|err| err.tensor(t.key))?;
        return codec::halves_checked(t.key, copy, t.dtype);
    };
    rotate_chunks(prepared, halves, cols).map_err(|err| err.tensor(t.key))?;
    codec::check_halves(t.key, halves, t.dtype)?;
    Ok(TensorBytes::Bytes(bytes))
}

/// The evaluated stages of one edit of the fused path.
pub(crate) type PreparedEdit = Vec<PreparedStage<f32>>;

/// Evaluate the stages of every edit of a tensor that takes the fused path.
fn prepare_fused(t: &TensorJob<'_>) -> Result<Vec<PreparedEdit>> {
    let (rows, cols) = t.view();
    t.edits
        .iter()
        .map(|e| {
            // A `.oft` input's parameters are read here, and dropped once R is built.
            let layer = e.layer().map_err(|err| err.tensor(t.key))?;
            check_fits(&layer, rows, cols).map_err(|err| err.tensor(t.key))?;
            layer
                .stages
                .iter()
                .map(|st| PreparedStage::<f32>::with_blend(st, cols, e.blend.interpolate))
                .collect::<Result<Vec<_>>>()
                .map_err(|err| err.tensor(t.key))
        })
        .collect()
}

/// The prepared stages of one edit and its row scale.
type StagesAndScale<'a> = (&'a [PreparedStage<f32>], Option<&'a [f64]>);

/// Prepared stages of each edit and its row scale.
type Prepared<'a> = [StagesAndScale<'a>];

thread_local! {
    /// The two f32 buffers a thread rotates chunks in (grown as needed, never shrunk or zeroed
    /// again; freed with the thread, i.e. with the backend's pool).
    static SCRATCH: std::cell::Cell<(Vec<f32>, Vec<f32>)> = const {
        std::cell::Cell::new((Vec::new(), Vec::new()))
    };
}

/// At least `n` elements of a reused buffer (zeroed only where it grows).
fn scratch(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

/// Rotate 16-bit rows in place, chunk by chunk ([`fused_input`]).
fn rotate_chunks<H: Half>(prepared: &Prepared<'_>, halves: &mut [H], cols: usize) -> Result<()> {
    if let [(stages, scale)] = prepared
        && let [st] = stages
        && st.blockwise(cols)
    {
        return rotate_blockwise(st, *scale, halves, cols);
    }
    let chunk = INPUT_CHUNK_ROWS * cols.max(1);
    halves
        .par_chunks_mut(chunk)
        .enumerate()
        .try_for_each(|(c, h)| -> Result<()> {
            // Taken out of the cell (not borrowed) while in use, so a nested use on this
            // thread would find empty buffers rather than a borrowed cell.
            let (mut a, mut b) = SCRATCH.with(|cell| cell.take());
            let (mut cur, mut other) = (scratch(&mut a, h.len()), scratch(&mut b, h.len()));
            H::to_f32s(h, cur);
            for (stages, scale) in prepared {
                for st in *stages {
                    if st.apply_input_into(cur, other, cols) {
                        std::mem::swap(&mut cur, &mut other);
                    } else {
                        st.apply(Side::Input, cur, cols)?;
                    }
                }
                if let Some(s) = scale {
                    for (r, row) in cur.chunks_exact_mut(cols).enumerate() {
                        let f = s.get(c * INPUT_CHUNK_ROWS + r).copied().unwrap_or(1.0) as f32;
                        row.iter_mut().for_each(|x| *x *= f);
                    }
                }
            }
            H::from_f32s(cur, h);
            SCRATCH.with(|cell| cell.replace((a, b)));
            Ok(())
        })
}

/// Columns gathered at a time by [`rotate_blockwise`] (rounded to whole blocks; at least one):
/// 256 rows of 256 f32 values are 256 KiB, in L2 beside their result.
const GROUP_COLS: usize = 256;

/// [`rotate_chunks`] for the common case of one stage that [`PreparedStage::blockwise`] runs
/// (and its row scale): per chunk of rows, the columns of a few blocks at a time are widened
/// into a contiguous buffer, rotated into another and rounded back in place, so the f32 work
/// stays in cache. The same bits as the general path: each output is the same FMA chain,
/// scaled and rounded the same way.
fn rotate_blockwise<H: Half>(
    st: &PreparedStage<f32>,
    scale: Option<&[f64]>,
    halves: &mut [H],
    cols: usize,
) -> Result<()> {
    let b = st.b;
    let group = (GROUP_COLS / b).max(1);
    let chunk = INPUT_CHUNK_ROWS * cols;
    halves
        .par_chunks_mut(chunk)
        .enumerate()
        .try_for_each(|(c, h)| -> Result<()> {
            let rows = h.len() / cols;
            let (mut a, mut d) = SCRATCH.with(|cell| cell.take());
            let mut first = 0;
            let mut ok = true;
            while ok && first < st.blocks {
                let count = group.min(st.blocks - first);
                let (lo, width) = (first * b, count * b);
                let src = scratch(&mut a, rows * width);
                let dst = scratch(&mut d, rows * width);
                for (r, s) in src.chunks_exact_mut(width).enumerate() {
                    H::to_f32s(&h[r * cols + lo..r * cols + lo + width], s);
                }
                ok = st.rotate_blocks(first, count, src, dst);
                for (r, v) in dst.chunks_exact_mut(width).enumerate() {
                    if let Some(s) = scale {
                        let f = s.get(c * INPUT_CHUNK_ROWS + r).copied().unwrap_or(1.0) as f32;
                        v.iter_mut().for_each(|x| *x *= f);
                    }
                    H::from_f32s(v, &mut h[r * cols + lo..r * cols + lo + width]);
                }
                first += count;
            }
            SCRATCH.with(|cell| cell.replace((a, d)));
            if ok {
                Ok(())
            } else {
                Err(Error::new(
                    Category::TargetShape,
                    "internal error: a blockwise stage refused its blocks",
                ))
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::{Blend, Matrix, apply_layer};
    use crate::base::RowSlice;
    use crate::model::{Layer, ScalePosition, Stage, Target};

    /// An output-side layer on 4 rows (two 2 × 2 blocks) with a row scale: the order of the
    /// rows it is given matters.
    fn layer(side: Side, dim: usize) -> Layer {
        let b = 2;
        let blocks = dim / b;
        Layer {
            target: Target {
                name: "t".into(),
                convention: "unknown".into(),
                component: None,
                module: Default::default(),
                shape: None,
                rotated_dim: Some(dim as u64),
                rows: None,
            },
            side,
            stages: vec![Stage::cayley(
                blocks as u64,
                b as u64,
                (0..blocks).map(|k| 0.1 + 0.2 * k as f64).collect(),
            )],
            row_scale: (side == Side::Output)
                .then(|| (ScalePosition::After, vec![1.5, 0.5, 2.0, 0.25])),
            row_scale_f64: true,
            constraint: None,
            base_binding: None,
        }
    }

    fn f32_bytes(v: &[f64]) -> Vec<u8> {
        v.iter().flat_map(|&x| (x as f32).to_le_bytes()).collect()
    }

    fn run(shape: &[usize], edits: &[Edit<'_>], w: &[f64]) -> Vec<f64> {
        let cpu = Cpu::new(Some(2)).unwrap();
        let job = TensorJob {
            key: "w",
            dtype: Dtype::F32,
            shape,
            edits,
        };
        let loaded = cpu.load(&job, f32_bytes(w)).unwrap();
        let out = cpu.compute(&job, loaded).unwrap();
        crate::tensors::bytes_to_f64(out.as_bytes(), Dtype::F32, "w").unwrap()
    }

    /// Layer rows 0..2 are tensor rows 4..6 and layer rows 2..4 are tensor rows 0..2 (halves
    /// swapped, as in Flux's adaLN): the result is the layer applied to those rows in that
    /// order, put back where they came from; rows 2..4 are untouched.
    #[test]
    fn multi_range_row_slice_gathers_applies_and_scatters() {
        let (rows, cols) = (6, 3);
        let w: Vec<f64> = (0..rows * cols).map(|i| (i as f64 * 0.37).sin()).collect();
        let l = layer(Side::Output, 4);
        let edit = Edit::new(
            std::borrow::Cow::Borrowed(&l),
            RowSlice::new(vec![4..6, 0..2]),
            Blend::default(),
        );
        let got = run(&[rows, cols], &[edit], &w);
        // Reference: the layer on the 4 × 3 matrix of rows [4, 5, 0, 1], in f64, rounded.
        let order = [4, 5, 0, 1];
        let mut m = Matrix {
            rows: 4,
            cols,
            data: order
                .iter()
                .flat_map(|&r| w[r * cols..(r + 1) * cols].iter().map(|&x| x as f32 as f64))
                .collect(),
        };
        apply_layer(&l, &mut m).unwrap();
        let mut want: Vec<f64> = w.iter().map(|&x| x as f32 as f64).collect();
        for (i, &r) in order.iter().enumerate() {
            for c in 0..cols {
                want[r * cols + c] = m.data[i * cols + c] as f32 as f64;
            }
        }
        assert_eq!(got, want);
        assert_eq!(got[2 * cols..4 * cols], want[2 * cols..4 * cols]);
    }

    /// Two adjacent ranges in order are the same rows as one range: bit-identical results.
    #[test]
    fn adjacent_ranges_equal_one_range() {
        let (rows, cols) = (6, 4);
        let w: Vec<f64> = (0..rows * cols).map(|i| (i as f64 * 0.91).cos()).collect();
        for side in [Side::Output, Side::Input] {
            let l = layer(side, 4);
            let one = Edit::new(
                std::borrow::Cow::Borrowed(&l),
                RowSlice::range(1..5),
                Blend::default(),
            );
            let two = Edit::new(
                std::borrow::Cow::Borrowed(&l),
                RowSlice::new(vec![1..3, 3..5]),
                Blend::default(),
            );
            assert_eq!(
                run(&[rows, cols], &[one], &w),
                run(&[rows, cols], &[two], &w)
            );
        }
    }

    /// The blockwise fused path (groups of whole blocks, a last short group, a last short
    /// chunk of rows, a row scale) gives the bits of the general one: widen, rotate the whole
    /// rows, scale, round.
    #[test]
    fn blockwise_matches_whole_rows() {
        let (b, blocks) = (32, 10);
        let (rows, cols) = (INPUT_CHUNK_ROWS + 37, b * blocks);
        let tri = b * (b - 1) / 2;
        let q: Vec<f64> = (0..blocks * tri)
            .map(|i| ((i * 7919 % 997) as f64 / 997.0 - 0.5) * 0.02)
            .collect();
        let st =
            PreparedStage::<f32>::new(&Stage::cayley(blocks as u64, b as u64, q), cols).unwrap();
        if !st.blockwise(cols) {
            return; // no packed kernel on this CPU: the general path runs
        }
        let h: Vec<half::bf16> = (0..rows * cols)
            .map(|i| half::bf16::from_f32((i * 104729 % 1009) as f32 / 1009.0 - 0.5))
            .collect();
        let scale: Vec<f64> = (0..rows).map(|r| 1.0 + r as f64 / 1000.0).collect();
        let mut got = h.clone();
        rotate_blockwise(&st, Some(&scale), &mut got, cols).unwrap();
        let mut w: Vec<f32> = h.iter().map(|x| x.to_f32()).collect();
        st.apply(Side::Input, &mut w, cols).unwrap();
        for (row, &f) in w.chunks_exact_mut(cols).zip(&scale) {
            row.iter_mut().for_each(|x| *x *= f as f32);
        }
        let want: Vec<half::bf16> = w.iter().map(|&x| half::bf16::from_f32(x)).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn rows_outside_the_tensor_are_an_error() {
        let l = layer(Side::Output, 4);
        let edit = Edit::new(
            std::borrow::Cow::Borrowed(&l),
            RowSlice::range(4..8),
            Blend::default(),
        );
        let cpu = Cpu::new(Some(1)).unwrap();
        let job = TensorJob {
            key: "w",
            dtype: Dtype::F32,
            shape: &[6, 2],
            edits: std::slice::from_ref(&edit),
        };
        let loaded = cpu.load(&job, f32_bytes(&[0.5; 12])).unwrap();
        let e = cpu.compute(&job, loaded).err().unwrap();
        assert_eq!(e.category(), Category::TargetShape);
        // And bytes that do not fill the shape are refused on load.
        assert!(cpu.load(&job, vec![0; 40]).is_err());
    }
}
