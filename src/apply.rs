//! Applying a layer to a weight held in memory, per the spec's per-side formulas.
//!
//! R is built in f64; the weight is rotated in f32 or f64 with one small GEMM per block (never a
//! dense block-diagonal matrix). Work is cut into chunks of a fixed size, so the result does not
//! depend on the number of threads. The fixtures check this exact code against PEFT and LyCORIS.

use crate::error::{Category, Error};
use crate::model::{Layer, ScalePosition, Side, Stage};
use crate::rotation::rotation_block;
use crate::wiring::gather;
use rayon::prelude::*;

/// Rows per unit of parallel work on the input side (fixed: results must not depend on threads).
pub const INPUT_CHUNK_ROWS: usize = 256;

/// Keeps [`Real`] to the types this module implements it for (its kernels take raw pointers).
mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

/// The element types the rotation runs in (`f32` and `f64`; sealed).
pub trait Real:
    sealed::Sealed + Copy + Send + Sync + Default + std::ops::MulAssign + 'static
{
    /// `R` (`b × b`, row-major) packed for this type's specialised kernel, if it has one for
    /// `b` on this CPU ([`Real::rows_times_packed`] then takes the packed block).
    fn pack(_r: &[Self], _b: usize) -> Option<Vec<Self>> {
        None
    }
    /// `dst = src · Rᵀ` on `m` rows of one `b × b` block with R as [`Real::pack`] packed it
    /// (returns whether it ran: false for a packing of another size).
    ///
    /// # Safety
    /// `m` rows of `b` elements, `stride` apart, must be valid at `src` and `dst`.
    unsafe fn rows_times_packed(
        _m: usize,
        _b: usize,
        _src: *const Self,
        _stride: usize,
        _packed: &[Self],
        _dst: *mut Self,
    ) -> bool {
        false
    }
    /// The nearest value of this type to `x`.
    fn from_f64(x: f64) -> Self;
    /// This value as f64 (exact).
    fn to_f64(self) -> f64;
    /// `C = A · B` for an `m × k` A and a `k × n` B with arbitrary strides.
    ///
    /// # Safety
    /// The pointers and strides must describe valid, non-overlapping (for C) memory.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm(
        m: usize,
        k: usize,
        n: usize,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    );
}

/// Output columns per panel of the packed AVX2 kernel (two 8-wide vectors).
const PANEL: usize = 16;

/// Rᵀ of one `b × b` block packed for [`rows_packed_fma`]: panel `p` (output columns
/// `16p .. 16p + 16`) holds, for each `u`, the 16 values `R[16p + j][u]` side by side, so the
/// kernel reads each panel front to back.
fn pack_rt(r: &[f32], b: usize) -> Vec<f32> {
    let mut packed = vec![0f32; b * b];
    for p in 0..b / PANEL {
        for u in 0..b {
            for j in 0..PANEL {
                packed[(p * b + u) * PANEL + j] = r[(p * PANEL + j) * b + u];
            }
        }
    }
    packed
}

/// `ROWS` rows times one packed panel: `dst[i][j] = Σ_u src[i][u] · panel[u][j]` for 16
/// columns, each output one FMA chain over `u = 0 .. b` in order from 0 (so the result of an
/// element does not depend on how rows are grouped or split between threads).
///
/// # Safety
/// `ROWS` rows of `b` elements, `stride` apart, readable at `src` and 16 writable at `dst`
/// (same stride); `panel` holds `b × 16` values; the CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_fma<const ROWS: usize>(
    b: usize,
    src: *const f32,
    stride: usize,
    panel: *const f32,
    dst: *mut f32,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); 2]; ROWS];
    for u in 0..b {
        // SAFETY (whole function): within the bounds the caller guarantees.
        let (r0, r1) = unsafe {
            (
                _mm256_loadu_ps(panel.add(u * PANEL)),
                _mm256_loadu_ps(panel.add(u * PANEL + 8)),
            )
        };
        for (i, a) in acc.iter_mut().enumerate() {
            let x = unsafe { _mm256_broadcast_ss(&*src.add(i * stride + u)) };
            a[0] = _mm256_fmadd_ps(x, r0, a[0]);
            a[1] = _mm256_fmadd_ps(x, r1, a[1]);
        }
    }
    for (i, a) in acc.iter().enumerate() {
        unsafe {
            _mm256_storeu_ps(dst.add(i * stride), a[0]);
            _mm256_storeu_ps(dst.add(i * stride + 8), a[1]);
        }
    }
}

/// `dst = src · Rᵀ` for `m` rows of one `b × b` block (`b` a multiple of 16) with R packed by
/// [`pack_rt`]: panels of 16 output columns, each held in L1 while 6-row tiles stream past it
/// (12 accumulators in registers). Each output is one fixed-order FMA chain.
///
/// # Safety
/// `m` rows of `b` elements, `stride` apart, must be valid at `src` and `dst`; `packed` holds
/// `b × b` values; the CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_packed_fma(
    m: usize,
    b: usize,
    src: *const f32,
    stride: usize,
    packed: &[f32],
    dst: *mut f32,
) {
    for p in 0..b / PANEL {
        // SAFETY (whole loop): panel p lies in `packed`; rows and columns within the caller's.
        let panel = unsafe { packed.as_ptr().add(p * b * PANEL) };
        let (src, dst) = unsafe { (src, dst.add(p * PANEL)) };
        let mut row = 0;
        while row + 6 <= m {
            unsafe {
                tile_fma::<6>(
                    b,
                    src.add(row * stride),
                    stride,
                    panel,
                    dst.add(row * stride),
                )
            };
            row += 6;
        }
        let (s, d) = unsafe { (src.add(row * stride), dst.add(row * stride)) };
        unsafe {
            match m - row {
                5 => tile_fma::<5>(b, s, stride, panel, d),
                4 => tile_fma::<4>(b, s, stride, panel, d),
                3 => tile_fma::<3>(b, s, stride, panel, d),
                2 => tile_fma::<2>(b, s, stride, panel, d),
                1 => tile_fma::<1>(b, s, stride, panel, d),
                _ => {}
            }
        }
    }
}

impl Real for f32 {
    fn pack(r: &[f32], b: usize) -> Option<Vec<f32>> {
        #[cfg(target_arch = "x86_64")]
        if b.is_multiple_of(PANEL)
            && r.len() == b * b
            && std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
        {
            return Some(pack_rt(r, b));
        }
        let _ = (r, b);
        None
    }

    unsafe fn rows_times_packed(
        m: usize,
        b: usize,
        src: *const f32,
        stride: usize,
        packed: &[f32],
        dst: *mut f32,
    ) -> bool {
        #[cfg(target_arch = "x86_64")]
        if b.is_multiple_of(PANEL)
            && packed.len() == b * b
            && std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
        {
            // SAFETY: forwarded from the caller's contract; the CPU has the features.
            unsafe { rows_packed_fma(m, b, src, stride, packed, dst) };
            return true;
        }
        let _ = (m, b, src, stride, packed, dst);
        false
    }

    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    unsafe fn gemm(
        m: usize,
        k: usize,
        n: usize,
        a: *const f32,
        rsa: isize,
        csa: isize,
        b: *const f32,
        rsb: isize,
        csb: isize,
        c: *mut f32,
        rsc: isize,
        csc: isize,
    ) {
        // SAFETY: forwarded from the caller's contract.
        unsafe { matrixmultiply::sgemm(m, k, n, 1.0, a, rsa, csa, b, rsb, csb, 0.0, c, rsc, csc) }
    }
}

impl Real for f64 {
    fn from_f64(x: f64) -> Self {
        x
    }
    fn to_f64(self) -> f64 {
        self
    }
    unsafe fn gemm(
        m: usize,
        k: usize,
        n: usize,
        a: *const f64,
        rsa: isize,
        csa: isize,
        b: *const f64,
        rsb: isize,
        csb: isize,
        c: *mut f64,
        rsc: isize,
        csc: isize,
    ) {
        // SAFETY: forwarded from the caller's contract.
        unsafe { matrixmultiply::dgemm(m, k, n, 1.0, a, rsa, csa, b, rsb, csb, 0.0, c, rsc, csc) }
    }
}

/// BF16 to f32, element for element as [`half::bf16::to_f32`] (a NaN comes out quiet), in
/// one branch-free pass that the compiler vectorises (AVX2 where the CPU has it; `half`'s own
/// slice conversion is a scalar loop for BF16).
pub fn bf16_to_f32s(h: &[half::bf16], out: &mut [f32]) {
    #[inline(always)]
    fn body(h: &[half::bf16], out: &mut [f32]) {
        for (o, x) in out.iter_mut().zip(h) {
            let i = x.to_bits() as u32;
            let nan = (i & 0x7FFF) > 0x7F80;
            *o = f32::from_bits(if nan { (i | 0x40) << 16 } else { i << 16 });
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn wide(h: &[half::bf16], out: &mut [f32]) {
        body(h, out)
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        return unsafe { wide(h, out) };
    }
    body(h, out)
}

/// f32 to BF16, rounding to nearest even exactly as [`half::bf16::from_f32`] (a NaN keeps its
/// high mantissa bits and comes out quiet), in one branch-free, vectorised pass.
pub fn f32_to_bf16s(v: &[f32], out: &mut [half::bf16]) {
    #[inline(always)]
    fn body(v: &[f32], out: &mut [half::bf16]) {
        for (o, x) in out.iter_mut().zip(v) {
            let x = x.to_bits();
            let nan = (x & 0x7FFF_FFFF) > 0x7F80_0000;
            // Adding 0x7FFF plus the kept part's lowest bit carries into it exactly when the
            // dropped half is above one half, or exactly one half and the kept part is odd.
            let rounded = x.wrapping_add(0x7FFF + ((x >> 16) & 1)) >> 16;
            let bits = if nan { (x >> 16) | 0x40 } else { rounded };
            *o = half::bf16::from_bits(bits as u16);
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn wide(v: &[f32], out: &mut [half::bf16]) {
        body(v, out)
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        return unsafe { wide(v, out) };
    }
    body(v, out)
}

/// A weight viewed as a row-major 2-D matrix `(rows, cols)`: Linear `(out, in)`, Conv
/// `(out, in·kh·kw)`, Embedding `(num_embeddings, dim)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix<T = f64> {
    /// Rows (output features).
    pub rows: usize,
    /// Columns (input features, times the kernel size for a convolution).
    pub cols: usize,
    /// The `rows × cols` elements, row-major.
    pub data: Vec<T>,
}

impl<T> Matrix<T> {
    /// View a tensor of `shape` as 2-D: the first axis against all others flattened.
    pub fn from_shape(shape: &[usize], data: Vec<T>) -> Result<Self, Error> {
        let rows = *shape.first().ok_or_else(|| {
            Error::new(
                Category::TargetShape,
                "a 0-dimensional tensor cannot be rotated",
            )
        })?;
        let cols: usize = shape[1..].iter().product();
        if rows * cols != data.len() {
            return Err(Error::new(
                Category::TargetShape,
                format!("{} values do not fill shape {shape:?}", data.len()),
            ));
        }
        Ok(Matrix { rows, cols, data })
    }
}

/// The `b × b` blocks of a stage in f64, row-major, one per stored block (1 when shared): R
/// from Q under the stage's map, inverted for an `inverse` stage, and with `interpolate = s`
/// replaced by `s·R + (1 − s)·I`. Every compute path (the CPU kernels here, the candle tensor
/// program) rotates with exactly these blocks.
pub fn stage_blocks(stage: &Stage, interpolate: Option<f64>) -> Result<Vec<Vec<f64>>, Error> {
    let b = stage.spec.block_size as usize;
    (0..stage.stored_blocks() as usize)
        .into_par_iter()
        .map(|k| {
            let mut r = rotation_block(stage.q_row(k), b, &stage.spec.map);
            if stage.inverse {
                r = crate::rotation::invert_block(&r, b).ok_or_else(|| {
                    Error::new(
                        Category::Algebra,
                        format!("stage block {k} is singular and cannot be inverted"),
                    )
                })?;
            }
            if let Some(s) = interpolate {
                for (i, x) in r.iter_mut().enumerate() {
                    *x = s * *x + if i / b == i % b { 1.0 - s } else { 0.0 };
                }
            }
            Ok(r)
        })
        .collect()
}

/// The evaluated blocks of one stage with its gather list.
pub struct PreparedStage<T> {
    /// Block size.
    pub b: usize,
    /// Blocks along the rotated axis (`blocks × b` features).
    pub blocks: usize,
    /// One `b × b` block per stored block (1 when shared), row-major.
    rotations: Vec<Vec<T>>,
    /// The same blocks packed for the type's specialised kernel ([`Real::pack`]); empty where
    /// it has none for this block size.
    packed: Vec<Vec<T>>,
    /// Gather list; `None` for the identity wiring.
    sigma: Option<Vec<usize>>,
    /// The block-diagonal matrix is cut to the axis it is applied to (spec §8.7).
    truncated: bool,
}

impl<T: Real> PreparedStage<T> {
    /// Evaluate `stage` for an axis of `axis` features (which fixes the block count of an
    /// unsized shared stage).
    pub fn new(stage: &Stage, axis: usize) -> Result<Self, Error> {
        Self::with_blend(stage, axis, None)
    }

    /// Like [`PreparedStage::new`], with each block replaced by `s·R + (1 − s)·I` (the linear
    /// interpolation toward the identity that LyCORIS, kohya and ComfyUI use for strength).
    /// A stage whose `q` does not hold its stored blocks, or whose block size is 0, is a
    /// `tensor` or `partition` error (a [`Stage`] built by hand may be inconsistent).
    pub fn with_blend(stage: &Stage, axis: usize, interpolate: Option<f64>) -> Result<Self, Error> {
        let b = stage.spec.block_size as usize;
        if b == 0 || b > crate::model::MAX_DIM as usize {
            return Err(Error::new(
                Category::Partition,
                format!(
                    "block size {b} is not between 1 and {}",
                    crate::model::MAX_DIM
                ),
            ));
        }
        let want = (stage.stored_blocks() as usize).checked_mul(stage.tri_len());
        if want != Some(stage.q.len()) {
            return Err(Error::new(
                Category::Tensor,
                "the stage's parameters do not fill its stored blocks",
            )
            .expected_found(
                want.map_or("more than fit in memory".into(), |n| n.to_string()),
                stage.q.len(),
            ));
        }
        if axis as u64 > crate::model::MAX_DIM {
            return Err(Error::new(
                Category::TargetShape,
                format!(
                    "an axis of {axis} features is larger than oftool accepts ({})",
                    crate::model::MAX_DIM
                ),
            ));
        }
        let blocks = stage.blocks_on(axis as u64) as usize;
        let sigma =
            gather(&stage.spec.wiring, blocks, b).map_err(|e| Error::new(Category::Wiring, e.0))?;
        let identity = sigma.iter().enumerate().all(|(i, &s)| i == s);
        let rotations: Vec<Vec<T>> = stage_blocks(stage, interpolate)?
            .into_iter()
            .map(|r| r.into_iter().map(T::from_f64).collect())
            .collect();
        let packed = rotations
            .iter()
            .map(|r| T::pack(r, b))
            .collect::<Option<Vec<_>>>()
            .unwrap_or_default();
        Ok(PreparedStage {
            b,
            blocks,
            rotations,
            packed,
            sigma: (!identity).then_some(sigma),
            truncated: stage.spec.truncated,
        })
    }

    /// The evaluated `b × b` blocks, row-major: one per stored block (a single one when the
    /// stage is shared). What a device backend uploads.
    pub fn blocks(&self) -> &[Vec<T>] {
        &self.rotations
    }

    /// The stage's gather list (`None` for the identity wiring): feature `σ[kb + t]` is row `t`
    /// of block `k`.
    pub fn gather_list(&self) -> Option<&[usize]> {
        self.sigma.as_deref()
    }

    fn block(&self, k: usize) -> &[T] {
        if self.rotations.len() == 1 {
            &self.rotations[0]
        } else {
            &self.rotations[k]
        }
    }

    /// `W ← W · Eᵀ`: `W'[:, σ[kb+t]] = Σ_u W[:, σ[kb+u]] · R_k[t][u]`.
    fn apply_input(&self, data: &mut [T], cols: usize) {
        data.par_chunks_mut(INPUT_CHUNK_ROWS * cols)
            .for_each(|chunk| {
                // Identity wiring reads the chunk in place; a butterfly gathers columns first.
                let gathered: Option<Vec<T>> = self.sigma.as_ref().map(|s| {
                    chunk
                        .chunks_exact(cols)
                        .flat_map(|row| s.iter().map(move |&j| row[j]))
                        .collect()
                });
                let src: &[T] = gathered.as_deref().unwrap_or(chunk);
                let mut dst = vec![T::default(); chunk.len()];
                self.rotate_rows(src, &mut dst, cols);
                match &self.sigma {
                    None => chunk.copy_from_slice(&dst),
                    Some(s) => {
                        for (row, drow) in chunk.chunks_exact_mut(cols).zip(dst.chunks_exact(cols))
                        {
                            for (&j, &v) in s.iter().zip(drow) {
                                row[j] = v;
                            }
                        }
                    }
                }
            });
    }

    /// Input side, identity wiring, one chunk of rows: `dst = src · Eᵀ` into another buffer
    /// (every element of `dst` is written). The same arithmetic as [`PreparedStage::apply`] on
    /// a chunk of at most [`INPUT_CHUNK_ROWS`] rows, without its scratch buffer and copy back:
    /// the fused 16-bit bake ping-pongs between two reused buffers. Returns false, touching
    /// nothing, where the stage needs [`PreparedStage::apply`] (a butterfly wiring, a truncated
    /// stage, or sizes that do not fit).
    pub fn apply_input_into(&self, src: &[T], dst: &mut [T], cols: usize) -> bool {
        let stored = self.rotations.len();
        let fits = self.sigma.is_none()
            && !self.truncated
            && self.b > 0
            && (stored == 1 || stored == self.blocks)
            && self.blocks.checked_mul(self.b) == Some(cols)
            && cols > 0
            && src.len() == dst.len()
            && src.len().is_multiple_of(cols)
            && src.len() / cols <= INPUT_CHUNK_ROWS;
        if !fits {
            return false;
        }
        self.rotate_rows(src, dst, cols);
        true
    }

    /// Whether [`PreparedStage::rotate_blocks`] runs this stage on rows of `cols` features:
    /// identity wiring, not truncated, exactly `cols` features, and the type's packed kernel
    /// for this block size on this CPU.
    pub fn blockwise(&self, cols: usize) -> bool {
        let stored = self.rotations.len();
        !self.packed.is_empty()
            && self.packed.len() == stored
            && self.sigma.is_none()
            && !self.truncated
            && (stored == 1 || stored == self.blocks)
            && self.blocks.checked_mul(self.b) == Some(cols)
    }

    /// Blocks `first .. first + count` alone, on their columns gathered contiguously:
    /// `dst = src · E_partᵀ` for `src.len() / (count·b)` rows of `count·b` values each. The
    /// same bits as [`PreparedStage::apply_input_into`] gives those columns, whatever the
    /// number of rows: a caller that gathers a few blocks' columns at a time keeps its work in
    /// cache (rows a power of two apart in memory all fall in the same cache sets). Returns
    /// false, touching nothing, where the stage is not [`PreparedStage::blockwise`] or the
    /// sizes do not fit.
    pub fn rotate_blocks(&self, first: usize, count: usize, src: &[T], dst: &mut [T]) -> bool {
        let b = self.b;
        let width = count * b;
        let fits = self.blockwise(self.blocks * b)
            && count > 0
            && first
                .checked_add(count)
                .is_some_and(|end| end <= self.blocks)
            && src.len() == dst.len()
            && src.len().is_multiple_of(width);
        if !fits {
            return false;
        }
        let m = src.len() / width;
        (0..count).all(|j| {
            let packed = match self.packed.len() {
                1 => self.packed.first(),
                _ => self.packed.get(first + j),
            };
            packed.is_some_and(|p| {
                // SAFETY: block j's columns [jb, jb+b) of m rows of stride `width` lie in
                // src and dst.
                unsafe {
                    T::rows_times_packed(
                        m,
                        b,
                        src.as_ptr().add(j * b),
                        width,
                        p,
                        dst.as_mut_ptr().add(j * b),
                    )
                }
            })
        })
    }

    /// `dst = src · Eᵀ` on the gathered columns of `src.len() / cols` rows (identity order):
    /// the packed kernel per block where the type has one for this block size, else one small
    /// GEMM per block.
    fn rotate_rows(&self, src: &[T], dst: &mut [T], cols: usize) {
        let b = self.b;
        let m = src.len() / cols;
        let shared = self.rotations.len() == 1;
        if !self.packed.is_empty() {
            let done = if shared {
                // One shared block: the chunk is an (m·blocks × b) matrix of stride b.
                // SAFETY: src/dst hold m·cols = m·blocks·b elements.
                unsafe {
                    T::rows_times_packed(
                        m * self.blocks,
                        b,
                        src.as_ptr(),
                        b,
                        self.packed.first().map_or(&[][..], Vec::as_slice),
                        dst.as_mut_ptr(),
                    )
                }
            } else {
                (0..self.blocks).all(|k| {
                    self.packed.get(k).is_some_and(|packed| {
                        // SAFETY: block k's columns [kb, kb+b) of m rows of stride `cols` lie
                        // in src/dst.
                        unsafe {
                            T::rows_times_packed(
                                m,
                                b,
                                src.as_ptr().add(k * b),
                                cols,
                                packed,
                                dst.as_mut_ptr().add(k * b),
                            )
                        }
                    })
                })
            };
            if done {
                return;
            }
        }
        if shared {
            // One shared block: the chunk is an (m·blocks × b) matrix times Rᵀ.
            let r = self.block(0);
            // SAFETY: src/dst hold m·cols = m·blocks·b elements; R is b × b.
            unsafe {
                T::gemm(
                    m * self.blocks,
                    b,
                    b,
                    src.as_ptr(),
                    b as isize,
                    1,
                    r.as_ptr(),
                    1,
                    b as isize,
                    dst.as_mut_ptr(),
                    b as isize,
                    1,
                )
            };
            return;
        }
        for k in 0..self.blocks {
            let r = self.block(k);
            // SAFETY: block k's columns [kb, kb+b) of m rows of stride `cols` lie in src/dst.
            unsafe {
                T::gemm(
                    m,
                    b,
                    b,
                    src.as_ptr().add(k * b),
                    cols as isize,
                    1,
                    r.as_ptr(),
                    1,
                    b as isize,
                    dst.as_mut_ptr().add(k * b),
                    cols as isize,
                    1,
                )
            };
        }
    }

    /// `W ← Eᵀ · W`: `W'[σ[kb+t], :] = Σ_u R_k[u][t] · W[σ[kb+u], :]`.
    fn apply_output(&self, data: &mut [T], cols: usize) {
        let b = self.b;
        let src: Vec<T> = match &self.sigma {
            None => data.to_vec(),
            Some(s) => s
                .iter()
                .flat_map(|&i| data[i * cols..(i + 1) * cols].iter().copied())
                .collect(),
        };
        let compute = |k: usize, out: &mut [T]| {
            let r = self.block(k);
            // SAFETY: A = Rᵀ (b × b, via strides), B = block k of src (b × cols), C = out (b × cols).
            unsafe {
                T::gemm(
                    b,
                    b,
                    cols,
                    r.as_ptr(),
                    1,
                    b as isize,
                    src.as_ptr().add(k * b * cols),
                    cols as isize,
                    1,
                    out.as_mut_ptr(),
                    cols as isize,
                    1,
                )
            };
        };
        match &self.sigma {
            None => data
                .par_chunks_mut(b * cols)
                .enumerate()
                .for_each(|(k, out)| compute(k, out)),
            Some(s) => {
                let mut dst = vec![T::default(); data.len()];
                dst.par_chunks_mut(b * cols)
                    .enumerate()
                    .for_each(|(k, out)| compute(k, out));
                for (p, &i) in s.iter().enumerate() {
                    data[i * cols..(i + 1) * cols].copy_from_slice(&dst[p * cols..(p + 1) * cols]);
                }
            }
        }
    }

    /// A truncated stage: `E[:d, :d]` applied to an axis of `d < full = r·b` features. The axis
    /// is padded with zeros to `full`, the whole stage applied, and the first `d` kept: a zero
    /// adds exactly nothing, so this is the cut matrix's product, entry for entry.
    fn apply_cut(&self, side: Side, data: &mut [T], cols: usize, full: usize) -> Result<(), Error> {
        let misfit = || {
            Error::new(
                Category::TargetShape,
                format!(
                    "a truncated stage of {} × {} blocks does not fit {} values of {cols} columns ({} side)",
                    self.blocks,
                    self.b,
                    data.len(),
                    side.as_str()
                ),
            )
        };
        if self.sigma.is_some() || cols == 0 || !data.len().is_multiple_of(cols) {
            return Err(misfit());
        }
        let rows = data.len() / cols;
        let d = match side {
            Side::Input => cols,
            Side::Output => rows,
        };
        if d == 0 || d > full {
            return Err(misfit());
        }
        let whole = PreparedStage {
            b: self.b,
            blocks: self.blocks,
            rotations: self.rotations.clone(),
            packed: self.packed.clone(),
            sigma: None,
            truncated: false,
        };
        match side {
            _ if d == full => whole.apply(side, data, cols)?,
            Side::Output => {
                let mut padded = data.to_vec();
                padded.resize(full * cols, T::default());
                whole.apply(side, &mut padded, cols)?;
                data.copy_from_slice(&padded[..rows * cols]);
            }
            Side::Input => {
                let mut padded = vec![T::default(); rows * full];
                for (p, row) in padded.chunks_exact_mut(full).zip(data.chunks_exact(cols)) {
                    p[..cols].copy_from_slice(row);
                }
                whole.apply(side, &mut padded, full)?;
                for (row, p) in data.chunks_exact_mut(cols).zip(padded.chunks_exact(full)) {
                    row.copy_from_slice(&p[..cols]);
                }
            }
        }
        Ok(())
    }

    /// Rotate a row-major matrix of `cols` columns in place: its columns (input side), whose
    /// count must be this stage's `blocks × b`, or its rows (output side), whose count must be.
    /// Sizes that do not fit are a `target-shape` error, never a read out of bounds.
    pub fn apply(&self, side: Side, data: &mut [T], cols: usize) -> Result<(), Error> {
        let axis = self.blocks.checked_mul(self.b);
        if self.truncated
            && let Some(full) = axis
        {
            return self.apply_cut(side, data, cols, full);
        }
        let fits = match side {
            Side::Input => axis == Some(cols) && cols > 0 && data.len().is_multiple_of(cols),
            Side::Output => cols == 0 || axis.and_then(|n| n.checked_mul(cols)) == Some(data.len()),
        };
        let stored = self.rotations.len();
        if !fits || self.b == 0 || !(stored == 1 || stored == self.blocks) {
            return Err(Error::new(
                Category::TargetShape,
                format!(
                    "a stage of {} × {} blocks does not fit {} values of {cols} columns ({} side)",
                    self.blocks,
                    self.b,
                    data.len(),
                    side.as_str()
                ),
            ));
        }
        if data.is_empty() {
            return Ok(());
        }
        match side {
            Side::Input => self.apply_input(data, cols),
            Side::Output => self.apply_output(data, cols),
        }
        Ok(())
    }
}

/// Check that `layer` fits a weight of this 2-D view.
pub fn check_fits(layer: &Layer, rows: usize, cols: usize) -> Result<(), Error> {
    let axis = match layer.side {
        Side::Input => cols,
        Side::Output => rows,
    };
    for (j, s) in layer.stages.iter().enumerate() {
        let b = s.spec.block_size as usize;
        let blocks = s.blocks_on(axis as u64) as usize;
        if !s.fits_axis(axis as u64) {
            return Err(Error::new(
                Category::TargetShape,
                format!(
                    "shape mismatch: stage {j} rotates {blocks} × {b} = {} {} features but the weight has {axis} ({rows} × {cols} view)",
                    blocks.saturating_mul(b),
                    layer.side.as_str(),
                ),
            )
            .tensor(&layer.target.name));
        }
    }
    if let Some((_, s)) = &layer.row_scale
        && s.len() != rows
    {
        return Err(Error::new(
            Category::TargetShape,
            format!(
                "shape mismatch: row scale has {} entries but the weight has {rows} rows",
                s.len()
            ),
        )
        .tensor(&layer.target.name));
    }
    Ok(())
}

fn scale_rows<T: Real>(data: &mut [T], cols: usize, s: &[f64]) {
    for (row, &f) in data.chunks_exact_mut(cols).zip(s) {
        let f = T::from_f64(f);
        row.iter_mut().for_each(|x| *x *= f);
    }
}

/// How a strength other than the geodesic one is applied at bake time (parity with a tool).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Blend {
    /// Replace every block by `s·R + (1 − s)·I` (LyCORIS, ComfyUI).
    pub interpolate: Option<f64>,
    /// Then blend the result linearly: `W + s·(W' − W)` (kohya, A1111, ComfyUI BOFT).
    pub linear: Option<f64>,
}

/// Apply every stage of `layer` (and its row scale) to a `(rows, cols)` row-major weight.
pub fn apply_layer_to<T: Real>(
    layer: &Layer,
    data: &mut [T],
    rows: usize,
    cols: usize,
) -> Result<(), Error> {
    apply_layer_blended(layer, data, rows, cols, Blend::default())
}

/// [`apply_layer_to`] with a tool's strength rule.
pub fn apply_layer_blended<T: Real>(
    layer: &Layer,
    data: &mut [T],
    rows: usize,
    cols: usize,
    blend: Blend,
) -> Result<(), Error> {
    check_fits(layer, rows, cols)?;
    if rows.checked_mul(cols) != Some(data.len()) {
        return Err(Error::new(
            Category::TargetShape,
            format!("{} values do not fill a {rows} × {cols} weight", data.len()),
        )
        .tensor(&layer.target.name));
    }
    let original = blend.linear.map(|_| data.to_vec());
    if let Some((ScalePosition::Before, s)) = &layer.row_scale {
        scale_rows(data, cols, s);
    }
    let axis = match layer.side {
        Side::Input => cols,
        Side::Output => rows,
    };
    for stage in &layer.stages {
        PreparedStage::<T>::with_blend(stage, axis, blend.interpolate)?
            .apply(layer.side, data, cols)?;
    }
    if let Some((ScalePosition::After, s)) = &layer.row_scale {
        scale_rows(data, cols, s);
    }
    if let (Some(s), Some(w)) = (blend.linear, original) {
        let s = T::from_f64(s);
        for (x, w0) in data.iter_mut().zip(w) {
            // W + s·(W' − W), in the compute type.
            *x = T::from_f64(w0.to_f64() + s.to_f64() * (x.to_f64() - w0.to_f64()));
        }
    }
    Ok(())
}

/// Apply `layer` to `w` in place.
pub fn apply_layer<T: Real>(layer: &Layer, w: &mut Matrix<T>) -> Result<(), Error> {
    apply_layer_to(layer, &mut w.data, w.rows, w.cols)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The f32 path (with the 32 × 32 FMA kernel where the CPU has it) against the f64 path.
    #[test]
    fn f32_kernel_matches_f64() {
        let b = 32;
        let blocks = 3;
        let tri = b * (b - 1) / 2;
        let q: Vec<f64> = (0..blocks * tri)
            .map(|i| ((i * 7919 % 997) as f64 / 997.0 - 0.5) * 0.02)
            .collect();
        let stage = Stage::cayley(blocks as u64, b as u64, q);
        let (rows, cols) = (301, blocks * b); // an odd row count exercises the single-row tail
        let w: Vec<f64> = (0..rows * cols)
            .map(|i| (i * 104729 % 1009) as f64 / 1009.0 - 0.5)
            .collect();
        let mut w64 = w.clone();
        PreparedStage::<f64>::new(&stage, cols)
            .unwrap()
            .apply(Side::Input, &mut w64, cols)
            .unwrap();
        let mut w32: Vec<f32> = w.iter().map(|&x| x as f32).collect();
        PreparedStage::<f32>::new(&stage, cols)
            .unwrap()
            .apply(Side::Input, &mut w32, cols)
            .unwrap();
        let err = w64
            .iter()
            .zip(&w32)
            .map(|(a, b)| (a - *b as f64).abs())
            .fold(0.0, f64::max);
        assert!(err < 2e-6, "f32 path off by {err}");
    }

    /// The vectorised BF16 conversions give `half`'s bits: every BF16 value to f32, and f32
    /// values around every rounding boundary (ties, NaNs, infinities, overflow) to BF16.
    #[test]
    fn bf16_conversions_match_half() {
        let all: Vec<half::bf16> = (0..=u16::MAX).map(half::bf16::from_bits).collect();
        let mut wide = vec![0f32; all.len()];
        bf16_to_f32s(&all, &mut wide);
        for (h, w) in all.iter().zip(&wide) {
            assert_eq!(w.to_bits(), h.to_f32().to_bits(), "{:#06x}", h.to_bits());
        }
        let v: Vec<f32> = (0..=u16::MAX as u32)
            .flat_map(|hi| {
                [0u32, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x4000, 0xC000]
                    .map(|lo| f32::from_bits((hi << 16) | lo))
            })
            .collect();
        let mut narrow = vec![half::bf16::ZERO; v.len()];
        f32_to_bf16s(&v, &mut narrow);
        for (x, n) in v.iter().zip(&narrow) {
            assert_eq!(
                n.to_bits(),
                half::bf16::from_f32(*x).to_bits(),
                "{:#010x}",
                x.to_bits()
            );
        }
    }

    /// The packed kernel (every block size a multiple of 16, tails of 1–5 rows) against the
    /// general GEMM path on the same blocks, and each output one FMA chain in order.
    #[test]
    fn packed_kernel_matches_fma_chains() {
        for (b, blocks, rows) in [(16, 2, 7), (32, 3, 13), (48, 1, 6), (64, 2, 11)] {
            let tri = b * (b - 1) / 2;
            let q: Vec<f64> = (0..blocks * tri)
                .map(|i| ((i * 7919 % 997) as f64 / 997.0 - 0.5) * 0.02)
                .collect();
            let stage = Stage::cayley(blocks as u64, b as u64, q);
            let cols = blocks * b;
            let w: Vec<f32> = (0..rows * cols)
                .map(|i| (i * 104729 % 1009) as f32 / 1009.0 - 0.5)
                .collect();
            let st = PreparedStage::<f32>::new(&stage, cols).unwrap();
            let mut got = vec![f32::NAN; w.len()];
            assert!(st.apply_input_into(&w, &mut got, cols));
            for r in 0..rows {
                for k in 0..blocks {
                    let rk = st.block(k);
                    for t in 0..b {
                        let mut acc = 0f32;
                        for u in 0..b {
                            acc = w[r * cols + k * b + u].mul_add(rk[t * b + u], acc);
                        }
                        assert_eq!(got[r * cols + k * b + t], acc, "b = {b}, row {r}");
                    }
                }
            }
        }
    }

    /// `apply_input_into` (the fused bake's path) gives the bits `apply` gives, chunk by chunk,
    /// for the 32 × 32 kernel and the general GEMM; and refuses what it does not handle.
    #[test]
    fn apply_input_into_matches_apply() {
        for (b, blocks) in [(32, 2), (8, 3), (128, 1)] {
            let tri = b * (b - 1) / 2;
            let q: Vec<f64> = (0..blocks * tri)
                .map(|i| ((i * 7919 % 997) as f64 / 997.0 - 0.5) * 0.02)
                .collect();
            let stage = Stage::cayley(blocks as u64, b as u64, q);
            let cols = blocks * b;
            let rows = INPUT_CHUNK_ROWS + 45;
            let w: Vec<f32> = (0..rows * cols)
                .map(|i| (i * 104729 % 1009) as f32 / 1009.0 - 0.5)
                .collect();
            let st = PreparedStage::<f32>::new(&stage, cols).unwrap();
            let mut want = w.clone();
            st.apply(Side::Input, &mut want, cols).unwrap();
            let mut got = vec![f32::NAN; w.len()];
            for (src, dst) in w
                .chunks(INPUT_CHUNK_ROWS * cols)
                .zip(got.chunks_mut(INPUT_CHUNK_ROWS * cols))
            {
                assert!(st.apply_input_into(src, dst, cols));
            }
            assert_eq!(got, want, "b = {b}");
            // Too many rows for one chunk, or a length that is no whole row: refused.
            let mut dst = vec![0f32; w.len()];
            assert!(!st.apply_input_into(&w, &mut dst, cols));
            assert!(!st.apply_input_into(&w[..cols + 1], &mut dst[..cols + 1], cols));
            assert!(!st.apply_input_into(&w[..cols], &mut dst[..2 * cols], cols));
        }
    }
}
