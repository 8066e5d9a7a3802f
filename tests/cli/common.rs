//! Helpers shared by the integration tests.

use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A safetensors file read whole, through the `safetensors` crate (not oftool's reader): its
/// metadata and its tensors.
pub struct MappedFile {
    bytes: Vec<u8>,
    /// The header's `__metadata__` (empty when absent).
    pub metadata: HashMap<String, String>,
}

impl MappedFile {
    pub fn open(path: &Path) -> Result<Self, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let (_, header) =
            SafeTensors::read_metadata(&bytes).map_err(|e| format!("{}: {e:?}", path.display()))?;
        let metadata = header.metadata().clone().unwrap_or_default();
        SafeTensors::deserialize(&bytes).map_err(|e| format!("{}: {e:?}", path.display()))?;
        Ok(MappedFile { bytes, metadata })
    }

    pub fn tensors(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("checked in open")
    }
}

/// A float tensor's elements as f64.
pub fn to_f64(view: &TensorView<'_>) -> Vec<f64> {
    let d = view.data();
    match view.dtype() {
        Dtype::F64 => d
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        Dtype::F32 => d
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        Dtype::F16 => d
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        Dtype::BF16 => d
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        other => panic!("not a float tensor: {other:?}"),
    }
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn cases_dir() -> PathBuf {
    repo().join("fixtures").join("cases")
}

/// Every fixture case directory, sorted.
pub fn cases() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(cases_dir())
        .expect("fixtures/cases exists")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.join("case.json").is_file())
        .collect();
    v.sort();
    v
}

/// The conformance cases (`fixtures/conformance/`, issue #12): adapters at the edges of what
/// the producers write, each made and merged by the producing library itself.
pub fn conformance_dir() -> PathBuf {
    repo().join("fixtures").join("conformance")
}

/// Every conformance case directory, sorted (known gaps included).
pub fn conformance_cases() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(conformance_dir())
        .expect("fixtures/conformance exists")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.join("case.json").is_file())
        .collect();
    v.sort();
    v
}

/// Conformance cases oftool does not handle yet, each with a piece of the error its import or
/// bake must give (`conformance::known_gaps_are_refused_with_their_reason` checks it). A case
/// leaves this list when it imports and bakes to the library's result; every other case is
/// checked like the `fixtures/cases/` ones.
pub const KNOWN_GAPS: &[(&str, &str)] = &[];

/// Why a conformance case is a known gap, if it is one.
pub fn known_gap(dir: &Path) -> Option<&'static str> {
    let name = dir.file_name()?.to_str()?;
    KNOWN_GAPS.iter().find(|(c, _)| *c == name).map(|(_, w)| *w)
}

/// The cases every fixture test checks: `fixtures/cases/` and the conformance cases that are
/// not known gaps.
pub fn checked_cases() -> Vec<PathBuf> {
    let mut v = cases();
    v.extend(
        conformance_cases()
            .into_iter()
            .filter(|d| known_gap(d).is_none()),
    );
    v
}

pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("readable")).expect("valid JSON")
}

/// A tensor of a safetensors file as (values, shape, dtype).
pub fn tensor(path: &Path, key: &str) -> (Vec<f64>, Vec<usize>, Dtype) {
    let f = MappedFile::open(path).expect("fixture opens");
    let st = f.tensors();
    let v = st
        .tensor(key)
        .unwrap_or_else(|_| panic!("{} has no tensor {key}", path.display()));
    (to_f64(&v), v.shape().to_vec(), v.dtype())
}

/// Distance to the next representable value above |x| in `dtype`.
pub fn ulp(x: f64, dtype: Dtype) -> f64 {
    let mantissa_bits = match dtype {
        Dtype::F16 => 10,
        Dtype::BF16 => 7,
        Dtype::F32 => 23,
        _ => 52,
    };
    let min_normal_exp = match dtype {
        Dtype::F16 => -14,
        Dtype::BF16 | Dtype::F32 => -126,
        _ => -1022,
    };
    let e = if x == 0.0 {
        min_normal_exp
    } else {
        (x.abs().log2().floor() as i32).max(min_normal_exp)
    };
    2f64.powi(e - mantissa_bits)
}

/// Compare per the fixture tolerance: f32 atol 1e-6 + rtol 1e-5; f16/bf16 one ulp.
/// Returns the worst violation ratio (≤ 1 passes) and its index.
pub fn worst(got: &[f64], want: &[f64], dtype: Dtype) -> (f64, usize) {
    assert_eq!(got.len(), want.len());
    let mut worst = (0.0, 0);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let tol = match dtype {
            Dtype::F16 | Dtype::BF16 => ulp(w, dtype) * 1.000_001,
            _ => 1e-6 + 1e-5 * w.abs(),
        };
        let r = (g - w).abs() / tol;
        if r > worst.0 || r.is_nan() {
            worst = (if r.is_nan() { f64::INFINITY } else { r }, i);
        }
    }
    worst
}

/// f64 values as BF16 bytes (round to nearest even, once), little-endian.
pub fn bf16_bytes(v: &[f64]) -> Vec<u8> {
    v.iter()
        .flat_map(|&x| half::bf16::from_f64(x).to_le_bytes())
        .collect()
}

/// Round f64 values through `dtype` (round to nearest even), back to f64.
pub fn round_to(v: &[f64], dtype: Dtype) -> Vec<f64> {
    v.iter()
        .map(|&x| match dtype {
            Dtype::F16 => half::f16::from_f64(x).to_f64(),
            Dtype::BF16 => half::bf16::from_f64(x).to_f64(),
            Dtype::F32 => x as f32 as f64,
            _ => x,
        })
        .collect()
}
