//! Dtype codecs of the bake: stored little-endian bytes to the compute type and back, with the
//! one rounding at the end and the finite checks that go with it. No rotation here.
//!
//! F16/BF16 tensors are computed in f32, F32/F64 tensors in f64. Conversions of large tensors
//! run in parallel in fixed chunks, so their results do not depend on the thread count.

use crate::error::{Category, Error, Result};
use rayon::prelude::*;
use safetensors::tensor::Dtype;
use std::borrow::Cow;

#[cfg(target_endian = "big")]
compile_error!("oftool reads and writes little-endian tensor data in place");

/// Elements per unit of parallel dtype conversion.
const CONVERT_CHUNK: usize = 1 << 16;

/// A computed tensor in its stored dtype, ready to be written (kept in its element type, so
/// that no byte copy is needed to hand it to the writer).
pub(crate) enum TensorBytes {
    F64(Vec<f64>),
    F32(Vec<f32>),
    F16(Vec<half::f16>),
    Bf16(Vec<half::bf16>),
    /// Little-endian bytes as stored (a 16-bit tensor rotated over its own stored bytes).
    Bytes(Vec<u8>),
}

impl TensorBytes {
    /// The little-endian bytes as stored in a safetensors file.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            TensorBytes::F64(v) => bytemuck::cast_slice(v),
            TensorBytes::F32(v) => bytemuck::cast_slice(v),
            TensorBytes::F16(v) => bytemuck::cast_slice(v),
            TensorBytes::Bf16(v) => bytemuck::cast_slice(v),
            TensorBytes::Bytes(v) => v,
        }
    }
}

/// The 16-bit float types a base may hold: slice conversions (SIMD where the CPU has them)
/// and how a finished tensor is handed to the writer.
pub(crate) trait Half: bytemuck::Pod + Default + Send + Sync {
    fn to_f32s(h: &[Self], out: &mut [f32]);
    fn from_f32s(v: &[f32], out: &mut [Self]);
    fn finite(&self) -> bool;
    fn into_bytes(v: Vec<Self>) -> TensorBytes;
}

impl Half for half::f16 {
    fn to_f32s(h: &[Self], out: &mut [f32]) {
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(h, out)
    }
    fn from_f32s(v: &[f32], out: &mut [Self]) {
        half::slice::HalfFloatSliceExt::convert_from_f32_slice(out, v)
    }
    fn finite(&self) -> bool {
        self.is_finite()
    }
    fn into_bytes(v: Vec<Self>) -> TensorBytes {
        TensorBytes::F16(v)
    }
}

impl Half for half::bf16 {
    fn to_f32s(h: &[Self], out: &mut [f32]) {
        crate::apply::bf16_to_f32s(h, out)
    }
    fn from_f32s(v: &[f32], out: &mut [Self]) {
        crate::apply::f32_to_bf16s(v, out)
    }
    fn finite(&self) -> bool {
        self.is_finite()
    }
    fn into_bytes(v: Vec<Self>) -> TensorBytes {
        TensorBytes::Bf16(v)
    }
}

/// View little-endian bytes as 16-bit floats, copying only if they are misaligned.
pub(crate) fn as_halves<H: Half>(bytes: &[u8]) -> Cow<'_, [H]> {
    match bytemuck::try_cast_slice::<u8, H>(bytes) {
        Ok(h) => Cow::Borrowed(h),
        Err(_) => Cow::Owned(bytemuck::pod_collect_to_vec::<u8, H>(bytes)),
    }
}

/// Decode 16-bit floats to f32, in parallel.
pub(crate) fn halves_to_f32<H: Half>(bytes: &[u8]) -> Vec<f32> {
    let h = as_halves::<H>(bytes);
    let mut out = vec![0f32; h.len()];
    out.par_chunks_mut(CONVERT_CHUNK)
        .zip(h.par_chunks(CONVERT_CHUNK))
        .for_each(|(o, i)| H::to_f32s(i, o));
    out
}

/// Decode F32 or F64 bytes to f64.
pub(crate) fn wide_to_f64(bytes: &[u8], dtype: Dtype) -> Vec<f64> {
    match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
            .collect(),
        _ => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect(),
    }
}

/// Round f32 to the 16-bit type once, in parallel; fail on a NaN or infinity (from the
/// rotation, or an overflow of the rounding).
pub(crate) fn f32_to_halves<H: Half>(key: &str, data: &[f32], dtype: Dtype) -> Result<TensorBytes> {
    let mut out = vec![H::default(); data.len()];
    out.par_chunks_mut(CONVERT_CHUNK)
        .zip(data.par_chunks(CONVERT_CHUNK))
        .for_each(|(o, i)| H::from_f32s(i, o));
    halves_checked(key, out, dtype)
}

/// Hand over finished 16-bit values, failing on the first that is not finite.
pub(crate) fn halves_checked<H: Half>(key: &str, out: Vec<H>, dtype: Dtype) -> Result<TensorBytes> {
    match first_where(&out, |x| !x.finite()) {
        Some(i) => Err(overflow(key, i, dtype)),
        None => Ok(H::into_bytes(out)),
    }
}

/// Fail on the first 16-bit value that is not finite.
pub(crate) fn check_halves<H: Half>(key: &str, out: &[H], dtype: Dtype) -> Result<()> {
    match first_where(out, |x| !x.finite()) {
        Some(i) => Err(overflow(key, i, dtype)),
        None => Ok(()),
    }
}

/// Round f64 to F32 once; fail on a value that is not finite or overflows.
pub(crate) fn f64_to_f32(key: &str, data: &[f64]) -> Result<TensorBytes> {
    check_finite(key, data)?;
    let out: Vec<f32> = data.iter().map(|&v| v as f32).collect();
    match out.iter().position(|x| x.is_infinite()) {
        Some(i) => Err(overflow(key, i, Dtype::F32)),
        None => Ok(TensorBytes::F32(out)),
    }
}

/// F64 values as they are; fail on one that is not finite.
pub(crate) fn f64_checked(key: &str, data: Vec<f64>) -> Result<TensorBytes> {
    check_finite(key, &data)?;
    Ok(TensorBytes::F64(data))
}

/// Index of the first element matching `pred`, scanning chunks in parallel (a branch-free
/// pass per chunk; the position is looked up only in a chunk that has a match).
fn first_where<X: Sync>(data: &[X], pred: impl Fn(&X) -> bool + Sync) -> Option<usize> {
    data.par_chunks(CONVERT_CHUNK)
        .enumerate()
        .filter(|(_, chunk)| chunk.iter().fold(false, |acc, x| acc | pred(x)))
        .filter_map(|(c, chunk)| chunk.iter().position(&pred).map(|p| c * CONVERT_CHUNK + p))
        .min()
}

/// Fail if a computed value is not finite.
fn check_finite(key: &str, data: &[f64]) -> Result<()> {
    if let Some(i) = first_where(data, |v| !v.is_finite()) {
        return Err(Error::new(
            Category::NonFinite,
            format!("the merged value at element {i} is not finite"),
        )
        .tensor(key));
    }
    Ok(())
}

fn overflow(key: &str, i: usize, dtype: Dtype) -> Error {
    Error::new(
        Category::NonFinite,
        format!("the merged value at element {i} overflows {dtype:?}"),
    )
    .tensor(key)
}
