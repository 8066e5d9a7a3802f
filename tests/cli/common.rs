//! Helpers shared by the integration tests.

use oftool::model::*;
use oftool::tensors::{MappedFile, to_f64};
use safetensors::tensor::Dtype;
use serde_json::Value;
use std::path::{Path, PathBuf};

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
    (
        to_f64(&v, key).expect("float tensor"),
        v.shape().to_vec(),
        v.dtype(),
    )
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

/// Every number of a JSON value, flattened in order.
pub fn floats(v: &Value) -> Vec<f64> {
    match v {
        Value::Array(a) => a.iter().flat_map(floats).collect(),
        Value::Number(n) => vec![n.as_f64().expect("number")],
        other => panic!("expected numbers, got {other}"),
    }
}

/// A spec vector's layer (spec/vectors/*.json).
pub fn layer_from(v: &Value) -> Layer {
    let side: Side = serde_json::from_value(v["side"].clone()).expect("side");
    let stages = v["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .map(|s| Stage {
            spec: StageSpec {
                blocks: s["blocks"].as_u64(),
                block_size: s["block_size"].as_u64().expect("block_size"),
                shared: s["shared"].as_bool().unwrap_or(false),
                wiring: serde_json::from_value(s["wiring"].clone()).expect("wiring"),
                map: serde_json::from_value(s["map"].clone()).expect("map"),
                q: String::new(),
            },
            q: floats(&s["q"]),
            q_f64: true,
            inverse: false,
        })
        .collect();
    let row_scale = match &v["row_scale"] {
        Value::Null => None,
        rs => Some((
            serde_json::from_value(rs["position"].clone()).expect("position"),
            floats(&rs["values"]),
        )),
    };
    Layer {
        target: Target {
            name: "vector".into(),
            convention: "unknown".into(),
            component: None,
            module: ModuleKind::Unknown,
            shape: None,
            rotated_dim: None,
            rows: None,
        },
        side,
        stages,
        row_scale,
        row_scale_f64: true,
        constraint: None,
        base_binding: None,
    }
}
