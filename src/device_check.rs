//! `oftool device-check` (hidden): the measurements `scripts/gpu-check.sh` makes on a lent GPU,
//! each printed as one JSON line. `--device` names where the candle program runs (`cpu` is
//! candle's CPU device here, so the script can be checked on a machine without a GPU); the
//! reference is always the native CPU kernels of [`crate::apply`].
//!
//! * `parity BASE ADAPTER [--merged M]`: every adapted tensor of BASE through both paths;
//!   the largest difference in units of the base dtype's last place, and against the
//!   library's merged weights the fixture tolerance (16-bit: one ulp; f32: 1e-6 + 1e-5·|w|).
//! * `bench`: one synthetic tensor and layer resident on the device; the median time of the
//!   tensor program (no transfers), upload and download times, the bytes and FLOP it stands
//!   for, and the native CPU path's time and difference on the same tensor.
//! * `compare A B`: two bakes of the same inputs (e.g. `merge --device cuda` and `--device
//!   cpu`) tensor by tensor: same names, dtypes, shapes and metadata, and the elements that
//!   differ with the largest difference in ulps of the stored dtype (≤ 1 passes).
//! * `ceilings`: what the device does at best: a device-to-device copy (bandwidth) and one
//!   large f32 matrix product (FP32 rate), through the same candle.

use crate::apply::{Blend, Real, apply_layer_blended};
use crate::candle_rotate::{self, DeviceChoice, Edit, Rotated};
use crate::error::{Category, Error, Result};
use crate::model::WiringProducer;
use crate::model::{Layer, ModuleKind, RotationMap, Side, Stage, StageSpec, Target, Wiring};
use candle_core::{DType, Device, Tensor};
use safetensors::Dtype;
use serde_json::{Value, json};
use std::path::Path;
use std::time::Instant;

/// `--device` for the checks: `cpu` is candle's CPU device.
pub fn device(choice: DeviceChoice) -> Result<Device> {
    match choice {
        DeviceChoice::Cpu | DeviceChoice::CandleCpu => Ok(Device::Cpu),
        DeviceChoice::Cuda(n) => candle_rotate::open_cuda(n),
        DeviceChoice::Auto => Ok(candle_rotate::open_cuda(0).unwrap_or(Device::Cpu)),
    }
}

fn describe(d: &Device) -> String {
    match d {
        Device::Cpu => "candle-cpu".into(),
        Device::Cuda(_) => "cuda".into(),
        Device::Metal(_) => "metal".into(),
    }
}

fn sync(d: &Device) -> Result<()> {
    d.synchronize()
        .map_err(|e| Error::new(Category::Io, format!("the device failed: {e}")))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Distance to the next representable value above |x| in `dtype`.
fn ulp(x: f64, dtype: Dtype) -> f64 {
    let (mantissa, min_exp) = match dtype {
        Dtype::F16 => (10, -14),
        Dtype::BF16 => (7, -126),
        Dtype::F32 => (23, -126),
        _ => (52, -1022),
    };
    let e = if x == 0.0 {
        min_exp
    } else {
        (x.abs().log2().floor() as i32).max(min_exp)
    };
    2f64.powi(e - mantissa)
}

fn values(r: &Rotated) -> Vec<f64> {
    match r {
        Rotated::F16(v) => v.iter().map(|x| x.to_f64()).collect(),
        Rotated::Bf16(v) => v.iter().map(|x| x.to_f64()).collect(),
        Rotated::F32(v) => v.iter().map(|&x| x as f64).collect(),
        Rotated::F64(v) => v.clone(),
    }
}

fn decode(bytes: &[u8], dtype: Dtype) -> Vec<f64> {
    match dtype {
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
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

fn round_to(x: f64, dtype: Dtype) -> f64 {
    match dtype {
        Dtype::F16 => half::f16::from_f64(x).to_f64(),
        Dtype::BF16 => half::bf16::from_f64(x).to_f64(),
        Dtype::F32 => x as f32 as f64,
        _ => x,
    }
}

/// What `merge` computes on the CPU for these edits (decode, rotate in f32 or f64, round once).
fn native(base: &[f64], dtype: Dtype, shape: &[usize], edits: &[Edit<'_>]) -> Result<Vec<f64>> {
    fn run<T: Real>(data: &mut [T], rows: usize, cols: usize, edits: &[Edit<'_>]) -> Result<()> {
        for e in edits {
            let Some(slice) = e.rows else {
                apply_layer_blended(e.layer, data, rows, cols, e.blend)?;
                continue;
            };
            // The slice's rows gathered into one matrix, rotated, and put back.
            let mut part: Vec<T> = Vec::with_capacity(slice.len() * cols);
            for r in slice.ranges().iter().cloned().flatten() {
                part.extend_from_slice(data.get(r * cols..(r + 1) * cols).ok_or_else(|| {
                    Error::new(
                        Category::TargetShape,
                        format!("row {r} is outside the tensor"),
                    )
                })?);
            }
            apply_layer_blended(e.layer, &mut part, slice.len(), cols, e.blend)?;
            for (p, r) in slice.ranges().iter().cloned().flatten().enumerate() {
                data[r * cols..(r + 1) * cols].copy_from_slice(&part[p * cols..(p + 1) * cols]);
            }
        }
        Ok(())
    }
    let rows = shape.first().copied().unwrap_or(0);
    let cols: usize = shape.iter().skip(1).product();
    let out: Vec<f64> = match dtype {
        Dtype::F16 | Dtype::BF16 => {
            let mut d: Vec<f32> = base.iter().map(|&x| x as f32).collect();
            run(&mut d, rows, cols, edits)?;
            d.iter().map(|&x| x as f64).collect()
        }
        _ => {
            let mut d = base.to_vec();
            run(&mut d, rows, cols, edits)?;
            d
        }
    };
    Ok(out.into_iter().map(|x| round_to(x, dtype)).collect())
}

/// Elements that differ, and the largest difference in ulps of the base dtype.
fn compare(got: &[f64], want: &[f64], dtype: Dtype) -> (usize, f64) {
    got.iter()
        .zip(want)
        .filter(|(g, w)| g.to_bits() != w.to_bits())
        .fold((0, 0.0), |(n, m), (&g, &w)| {
            (n + 1, f64::max(m, (g - w).abs() / ulp(w, dtype)))
        })
}

/// Worst ratio of |got − library| to the fixture tolerance (≤ 1 passes).
fn tolerance_ratio(got: &[f64], lib: &[f64], dtype: Dtype) -> f64 {
    got.iter().zip(lib).fold(0.0, |m, (&g, &w)| {
        let tol = match dtype {
            Dtype::F16 | Dtype::BF16 => ulp(w, dtype) * 1.000_001,
            _ => 1e-6 + 1e-5 * w.abs(),
        };
        let r = (g - w).abs() / tol;
        if r.is_nan() { f64::INFINITY } else { m.max(r) }
    })
}

/// `device-check parity`.
pub fn parity(base: &Path, adapter: &Path, merged: Option<&Path>, dev: &Device) -> Result<Value> {
    let adapter = crate::layouts::load(adapter)?;
    let located: Vec<(&Layer, crate::base::Located)> = {
        let checkpoint = crate::base::Base::open(base)?;
        adapter
            .layers
            .iter()
            .map(|layer| Ok((layer, checkpoint.locate(layer)?)))
            .collect::<Result<_>>()?
    };
    let file = crate::tensors::MappedFile::open(base)?;
    let lib = merged.map(crate::tensors::MappedFile::open).transpose()?;
    let st = file.tensors();
    let mut groups: Vec<(String, Vec<Edit<'_>>)> = Vec::new();
    for (layer, loc) in &located {
        let edit = Edit {
            layer,
            rows: Some(&loc.rows).filter(|r| !r.is_whole(loc.shape.first().copied().unwrap_or(0))),
            blend: Blend::default(),
        };
        match groups.iter_mut().find(|(k, _)| *k == loc.key) {
            Some((_, v)) => v.push(edit),
            None => groups.push((loc.key.clone(), vec![edit])),
        }
    }
    let (mut elements, mut differing, mut max_ulp, mut worst) = (0, 0, 0.0f64, 0.0f64);
    let (mut device_s, mut cpu_s) = (0.0, 0.0);
    for (key, edits) in &groups {
        let view = st
            .tensor(key)
            .map_err(|e| Error::new(Category::Tensor, e.to_string()).tensor(key))?;
        let dtype = view.dtype();
        let t = Instant::now();
        let got = candle_rotate::rotate(key, view.data(), dtype, view.shape(), edits, dev)?;
        device_s += t.elapsed().as_secs_f64();
        let got = values(&got);
        let t = Instant::now();
        let want = native(&decode(view.data(), dtype), dtype, view.shape(), edits)?;
        cpu_s += t.elapsed().as_secs_f64();
        let (n, m) = compare(&got, &want, dtype);
        elements += got.len();
        differing += n;
        max_ulp = max_ulp.max(m);
        if let Some(lib) = &lib {
            let lst = lib.tensors();
            let lv = lst
                .tensor(key)
                .map_err(|e| Error::new(Category::Tensor, e.to_string()).tensor(key))?;
            worst = worst.max(tolerance_ratio(&got, &decode(lv.data(), lv.dtype()), dtype));
        }
    }
    Ok(json!({
        "mode": "parity",
        "device": describe(dev),
        "base": base.display().to_string(),
        "tensors": groups.len(),
        "elements": elements,
        "differing": differing,
        "max_ulp_vs_cpu": max_ulp,
        "worst_vs_library": lib.as_ref().map(|_| worst),
        "device_s": device_s,
        "cpu_s": cpu_s,
        "ok": max_ulp <= 1.0 && worst <= 1.0,
    }))
}

/// `device-check compare A B` (single safetensors files).
pub fn compare_files(a: &Path, b: &Path) -> Result<Value> {
    let fa = crate::tensors::MappedFile::open(a)?;
    let fb = crate::tensors::MappedFile::open(b)?;
    let (ta, tb) = (fa.tensors(), fb.tensors());
    let mut names: Vec<String> = tb.names().into_iter().map(String::from).collect();
    names.sort();
    let mut names_a: Vec<String> = ta.names().into_iter().map(String::from).collect();
    names_a.sort();
    let same_layout = names == names_a && fa.metadata == fb.metadata;
    let (mut elements, mut differing, mut max_ulp) = (0usize, 0usize, 0.0f64);
    let mut mismatched = Vec::new();
    for name in &names {
        let y = tb
            .tensor(name)
            .map_err(|e| Error::new(Category::Tensor, e.to_string()).tensor(name))?;
        let Ok(x) = ta.tensor(name) else {
            mismatched.push(name.clone());
            continue;
        };
        if x.dtype() != y.dtype() || x.shape() != y.shape() {
            mismatched.push(name.clone());
            continue;
        }
        if x.data() == y.data() {
            elements += y.shape().iter().product::<usize>();
            continue;
        }
        let (xv, yv) = (decode(x.data(), x.dtype()), decode(y.data(), y.dtype()));
        let (n, m) = compare(&xv, &yv, y.dtype());
        elements += yv.len();
        differing += n;
        max_ulp = max_ulp.max(m);
    }
    Ok(json!({
        "mode": "compare",
        "a": a.display().to_string(),
        "b": b.display().to_string(),
        "tensors": names.len(),
        "elements": elements,
        "differing": differing,
        "max_ulp": max_ulp,
        "mismatched": mismatched,
        "ok": same_layout && mismatched.is_empty() && max_ulp <= 1.0,
    }))
}

/// `device-check parity-cases DIR`: [`parity`] for every `DIR/*/case.json` (fixtures/cases).
pub fn parity_cases(dir: &Path, dev: &Device) -> Result<Vec<Value>> {
    let mut cases: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("case.json").is_file())
        .collect();
    cases.sort();
    let mut out = Vec::with_capacity(cases.len());
    for case in cases {
        let text =
            std::fs::read_to_string(case.join("case.json")).map_err(|e| Error::io(&case, e))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::new(Category::Malformed, e.to_string()).at(&case))?;
        let field = |k: &str| v[k].as_str().map(|s| case.join(s));
        let (Some(base), Some(adapter)) = (field("base"), field("adapter")) else {
            continue;
        };
        let mut r = parity(&base, &adapter, field("merged").as_deref(), dev)?;
        r["case"] = json!(case.file_name().map(|n| n.to_string_lossy().to_string()));
        out.push(r);
    }
    Ok(out)
}

/// What `device-check bench` rotates.
#[derive(Debug, Clone)]
pub struct BenchSpec {
    pub dtype: Dtype,
    pub rows: usize,
    pub cols: usize,
    pub block: usize,
    /// 1: one OFT stage; more: a BOFT with that many butterfly stages (PEFT wiring).
    pub stages: usize,
    pub side: Side,
    pub runs: usize,
    /// Also run the native CPU path on the same tensor (time and difference).
    pub cpu: bool,
}

/// xorshift64*: deterministic filler.
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64 - 0.5
    }
}

fn synthetic_layer(spec: &BenchSpec, rng: &mut Rng) -> Layer {
    let d = match spec.side {
        Side::Input => spec.cols,
        Side::Output => spec.rows,
    };
    let b = spec.block;
    let blocks = d / b.max(1);
    let stages = (0..spec.stages)
        .map(|i| Stage {
            spec: StageSpec {
                blocks: Some(blocks as u64),
                block_size: b as u64,
                shared: false,
                wiring: if spec.stages > 1 {
                    Wiring::Butterfly {
                        producer: WiringProducer::Peft,
                        index: i as u32,
                    }
                } else {
                    Wiring::Identity
                },
                map: RotationMap::Cayley,
                q: String::new(),
                truncated: false,
            },
            q: (0..blocks * crate::rotation::tri_len(b))
                .map(|_| 0.02 * rng.uniform())
                .collect(),
            q_f64: false,
            inverse: false,
        })
        .collect();
    Layer {
        target: Target {
            name: "synthetic".into(),
            convention: "unknown".into(),
            component: None,
            module: ModuleKind::Linear,
            shape: Some(vec![spec.rows as u64, spec.cols as u64]),
            rotated_dim: Some(d as u64),
            rows: None,
        },
        side: spec.side,
        stages,
        row_scale: None,
        row_scale_f64: false,
        constraint: None,
        base_binding: None,
    }
}

fn synthetic_bytes(spec: &BenchSpec, rng: &mut Rng) -> Vec<u8> {
    let n = spec.rows * spec.cols;
    let mut out = Vec::with_capacity(n * spec.dtype.bitsize() / 8);
    for _ in 0..n {
        let x = 0.1 * rng.uniform();
        match spec.dtype {
            Dtype::F16 => out.extend(half::f16::from_f64(x).to_le_bytes()),
            Dtype::BF16 => out.extend(half::bf16::from_f64(x).to_le_bytes()),
            Dtype::F32 => out.extend((x as f32).to_le_bytes()),
            _ => out.extend(x.to_le_bytes()),
        }
    }
    out
}

/// `device-check bench`.
pub fn bench(spec: &BenchSpec, dev: &Device) -> Result<Value> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let layer = synthetic_layer(spec, &mut rng);
    let bytes = synthetic_bytes(spec, &mut rng);
    let shape = [spec.rows, spec.cols];
    let edits = [Edit {
        layer: &layer,
        rows: None,
        blend: Blend::default(),
    }];
    let key = "synthetic";
    let t = Instant::now();
    let w = candle_rotate::upload(key, &bytes, spec.dtype, &shape, dev)?;
    sync(dev)?;
    let upload_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let p = candle_rotate::prepare(key, &w, &edits)?;
    sync(dev)?;
    let prepare_s = t.elapsed().as_secs_f64();
    let mut c = candle_rotate::program(key, &w, &p)?; // warm-up: kernels load, cuBLAS plans
    sync(dev)?;
    let mut times = Vec::with_capacity(spec.runs);
    for _ in 0..spec.runs.max(1) {
        drop(c);
        let t = Instant::now();
        c = candle_rotate::program(key, &w, &p)?;
        sync(dev)?;
        times.push(t.elapsed().as_secs_f64());
    }
    let all = times.clone();
    let program_s = median(&mut times);
    drop(w);
    let t = Instant::now();
    let out = candle_rotate::finish(key, c)?;
    let download_s = t.elapsed().as_secs_f64();
    let numel = (spec.rows * spec.cols) as f64;
    let bytes_moved = 2.0 * numel * (spec.dtype.bitsize() / 8) as f64;
    let flop = 2.0 * spec.block as f64 * numel * spec.stages as f64;
    let mut v = json!({
        "mode": "bench",
        "device": describe(dev),
        "dtype": format!("{:?}", spec.dtype),
        "shape": shape,
        "block": spec.block,
        "stages": spec.stages,
        "side": spec.side.as_str(),
        "program_s": program_s,
        "program_s_runs": all,
        "upload_s": upload_s,
        "prepare_s": prepare_s,
        "download_s": download_s,
        "bytes": bytes_moved,
        "flop": flop,
        "effective_gb_s": bytes_moved / program_s / 1e9,
        "tflop_s": flop / program_s / 1e12,
    });
    if spec.cpu {
        let t = Instant::now();
        let want = native(&decode(&bytes, spec.dtype), spec.dtype, &shape, &edits)?;
        let cpu_s = t.elapsed().as_secs_f64();
        let (n, m) = compare(&values(&out), &want, spec.dtype);
        v["cpu_s"] = json!(cpu_s);
        v["differing"] = json!(n);
        v["max_ulp_vs_cpu"] = json!(m);
    }
    Ok(v)
}

/// `device-check ceilings`: a device copy of `copy_bytes` and an `n × n × n` f32 product.
pub fn ceilings(dev: &Device, copy_bytes: usize, n: usize, runs: usize) -> Result<Value> {
    let fail = |e: candle_core::Error| Error::new(Category::Io, format!("the device failed: {e}"));
    let elems = copy_bytes / 4;
    let a = Tensor::zeros(elems, DType::F32, dev).map_err(fail)?;
    let mut copy = Vec::new();
    for i in 0..=runs {
        let t = Instant::now();
        let b = a.force_contiguous().map_err(fail)?;
        sync(dev)?;
        if i > 0 {
            copy.push(t.elapsed().as_secs_f64());
        }
        drop(b);
    }
    drop(a);
    let m = Tensor::randn(0f32, 1f32, (n, n), dev).map_err(fail)?;
    let mut gemm = Vec::new();
    for i in 0..=runs {
        let t = Instant::now();
        let p = m.matmul(&m).map_err(fail)?;
        sync(dev)?;
        if i > 0 {
            gemm.push(t.elapsed().as_secs_f64());
        }
        drop(p);
    }
    let copy_s = median(&mut copy);
    let gemm_s = median(&mut gemm);
    Ok(json!({
        "mode": "ceilings",
        "device": describe(dev),
        "copy_bytes": copy_bytes,
        "copy_s": copy_s,
        "copy_gb_s": 2.0 * (elems * 4) as f64 / copy_s / 1e9,
        "sgemm_n": n,
        "sgemm_s": gemm_s,
        "sgemm_tflop_s": 2.0 * (n as f64).powi(3) / gemm_s / 1e12,
    }))
}
