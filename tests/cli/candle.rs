//! The candle tensor program (`src/candle_rotate.rs`) on candle's CPU device against the
//! native CPU kernels (`oftool::apply`, what `merge` runs) and the libraries' own merges.
//!
//! Everything in the program but the matrix products is exact; the products sum in another
//! order (candle's GEMM; cuBLAS on a GPU), so a result can differ from the native path by the
//! rounding of the compute type (f32 for F16/BF16 bases, f64 for F32), which the one final
//! rounding to the base dtype hides except when the value lies next to a rounding boundary.
//! Asserted: every element within one unit in the last place of the base dtype of the native
//! result, and within each fixture's tolerance of the library's merged weights (the bound the
//! native path is held to in tests/fixtures.rs). `cargo test --test cli candle:: -- --nocapture`
//! prints the measured differences.

use crate::common::*;
use crate::spec_vectors::{floats, layer_from};
use candle_core::Device;
use oftool::apply::{Blend, apply_layer_blended};
use oftool::base::RowSlice;
use oftool::candle_rotate::{DeviceChoice, Edit, Rotated, rotate};
use oftool::error::Category;
use oftool::model::{Adapter, Layer};
use safetensors::tensor::Dtype;
use std::path::Path;

/// A tensor of an open safetensors file: its raw bytes, values, shape and dtype.
struct Raw {
    bytes: Vec<u8>,
    values: Vec<f64>,
    shape: Vec<usize>,
    dtype: Dtype,
}

fn raw(f: &MappedFile, key: &str) -> Raw {
    let st = f.tensors();
    let v = st.tensor(key).expect("tensor present");
    Raw {
        bytes: v.data().to_vec(),
        values: to_f64(&v),
        shape: v.shape().to_vec(),
        dtype: v.dtype(),
    }
}

fn values(r: &Rotated) -> Vec<f64> {
    match r {
        Rotated::F16(v) => v.iter().map(|x| x.to_f64()).collect(),
        Rotated::Bf16(v) => v.iter().map(|x| x.to_f64()).collect(),
        Rotated::F32(v) => v.iter().map(|&x| x as f64).collect(),
        Rotated::F64(v) => v.clone(),
    }
}

/// What `merge` computes on the CPU: decode to f32 (16-bit bases) or f64, apply each edit on
/// its row slice, round once.
fn native(base: &[f64], dtype: Dtype, shape: &[usize], edits: &[Edit<'_>]) -> Vec<f64> {
    let rows = shape[0];
    let cols: usize = shape[1..].iter().product();
    fn run<T: oftool::apply::Real>(data: &mut [T], rows: usize, cols: usize, edits: &[Edit<'_>]) {
        for e in edits {
            let slice = e.rows.cloned().unwrap_or_else(|| RowSlice::whole(rows));
            let mut part: Vec<T> = Vec::with_capacity(slice.len() * cols);
            for r in slice.ranges().iter().cloned().flatten() {
                part.extend_from_slice(&data[r * cols..(r + 1) * cols]);
            }
            apply_layer_blended(e.layer, &mut part, slice.len(), cols, e.blend)
                .expect("native path applies");
            for (p, r) in slice.ranges().iter().cloned().flatten().enumerate() {
                data[r * cols..(r + 1) * cols].copy_from_slice(&part[p * cols..(p + 1) * cols]);
            }
        }
    }
    let out: Vec<f64> = match dtype {
        Dtype::F16 | Dtype::BF16 => {
            let mut d: Vec<f32> = base.iter().map(|&x| x as f32).collect();
            run(&mut d, rows, cols, edits);
            d.iter().map(|&x| x as f64).collect()
        }
        _ => {
            let mut d = base.to_vec();
            run(&mut d, rows, cols, edits);
            d
        }
    };
    round_to(&out, dtype)
}

/// Differences between the candle result and the native one.
#[derive(Default)]
struct Diff {
    elements: usize,
    differing: usize,
    /// Largest difference in units of the base dtype's last place (at the native value).
    max_ulps: f64,
    max_abs: f64,
}

impl Diff {
    fn add(&mut self, got: &[f64], want: &[f64], dtype: Dtype) {
        for (&g, &w) in got.iter().zip(want) {
            self.elements += 1;
            if g.to_bits() != w.to_bits() {
                self.differing += 1;
                let d = (g - w).abs();
                self.max_abs = self.max_abs.max(d);
                self.max_ulps = self.max_ulps.max(d / ulp(w, dtype));
            }
        }
    }

    fn merge(&mut self, o: &Diff) {
        self.elements += o.elements;
        self.differing += o.differing;
        self.max_ulps = self.max_ulps.max(o.max_ulps);
        self.max_abs = self.max_abs.max(o.max_abs);
    }
}

fn find_layer<'a>(adapter: &'a Adapter, name: &str) -> &'a Layer {
    let name = name.strip_prefix("base_model.model.").unwrap_or(name);
    adapter
        .layers
        .iter()
        .find(|l| l.target.name == name)
        .unwrap_or_else(|| panic!("adapter layer `{name}`"))
}

/// A layer on a base tensor, optionally on a row slice.
type Placed<'a> = (&'a Layer, Option<RowSlice>);

/// A fixture case's tensors with their edits, in case.json's order.
fn case_groups<'a>(dir: &Path, adapter: &'a Adapter) -> Vec<(String, Vec<Placed<'a>>)> {
    let case = read_json(&dir.join("case.json"));
    let mut groups: Vec<(String, Vec<Placed<'a>>)> = Vec::new();
    for l in case["layers"].as_array().expect("layers") {
        let key = l["base_key"].as_str().expect("base_key").to_string();
        let layer = find_layer(adapter, l["adapter_name"].as_str().expect("adapter_name"));
        let rows = l.get("rows").and_then(|r| r.as_array()).map(|r| {
            let start = r[0].as_u64().unwrap() as usize;
            RowSlice::range(start..start + r[1].as_u64().unwrap() as usize)
        });
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => v.push((layer, rows)),
            None => groups.push((key, vec![(layer, rows)])),
        }
    }
    groups
}

/// Run one tensor through both paths; returns (candle, native, dtype).
fn both(
    f: &MappedFile,
    key: &str,
    edits: &[Edit<'_>],
    device: &Device,
) -> (Vec<f64>, Vec<f64>, Dtype) {
    let t = raw(f, key);
    let got = rotate(key, &t.bytes, t.dtype, &t.shape, edits, device)
        .unwrap_or_else(|e| panic!("{key}: candle path: {e}"));
    assert_eq!(got.bytes().len(), t.bytes.len(), "{key}: output size");
    (
        values(&got),
        native(&t.values, t.dtype, &t.shape, edits),
        t.dtype,
    )
}

const BLEND_CASES: [&str; 9] = [
    "peft-unet-f16",
    "peft-unet-bf16",
    "lyco-unet-bf16",
    "lyco-unet-rescale",
    "peft-boft-unet",
    "kohya-boft-unet",
    "peft-unet-share",
    "peft-unet-neumann5-b4",
    "peft015-unet",
];

const BLENDS: [Blend; 4] = [
    Blend {
        interpolate: None,
        linear: None,
    },
    Blend {
        interpolate: Some(0.6),
        linear: None,
    },
    Blend {
        interpolate: None,
        linear: Some(0.7),
    },
    Blend {
        interpolate: Some(1.3),
        linear: Some(-0.4),
    },
];

#[test]
fn every_fixture_case_matches_the_native_path_and_the_library() {
    let device = Device::Cpu;
    let mut total = Diff::default();
    let mut per_dtype: std::collections::BTreeMap<String, Diff> = Default::default();
    let mut report = Vec::new();
    let mut cases_seen = 0;
    for dir in cases() {
        let label = dir.file_name().unwrap().to_string_lossy().to_string();
        let case = read_json(&dir.join("case.json"));
        let adapter = oftool::layouts::load(&dir.join(case["adapter"].as_str().unwrap()))
            .unwrap_or_else(|e| panic!("{label}: import: {e}"));
        let base = MappedFile::open(&dir.join(case["base"].as_str().unwrap())).unwrap();
        let merged = MappedFile::open(&dir.join(case["merged"].as_str().unwrap())).unwrap();
        let mut diff = Diff::default();
        for (key, group) in case_groups(&dir, &adapter) {
            // Every case plain; the blends on one case of each kind of layer (16-bit bases,
            // both sides, butterflies of both producers, shared blocks, row scales, Neumann).
            let blends = if BLEND_CASES.contains(&label.as_str()) {
                &BLENDS[..]
            } else {
                &BLENDS[..1]
            };
            for (bi, blend) in blends.iter().enumerate() {
                let edits: Vec<Edit<'_>> = group
                    .iter()
                    .map(|(layer, rows)| Edit {
                        layer,
                        rows: rows.as_ref(),
                        blend: *blend,
                    })
                    .collect();
                let (got, want, dtype) = both(&base, &key, &edits, &device);
                let mut d = Diff::default();
                d.add(&got, &want, dtype);
                assert!(
                    d.max_ulps <= 1.0,
                    "{label} {key} blend {bi}: candle differs from the native path by {} ulp",
                    d.max_ulps
                );
                if bi == 0 {
                    // The library's merge, at the fixture's tolerance.
                    let lib = raw(&merged, &key).values;
                    let (ratio, i) = worst(&got, &lib, dtype);
                    assert!(
                        ratio <= 1.0,
                        "{label} {key}: element {i}: candle {} vs library {}, {ratio:.2}× the tolerance",
                        got[i],
                        lib[i]
                    );
                }
                per_dtype.entry(format!("{dtype:?}")).or_default().merge(&d);
                diff.merge(&d);
            }
        }
        report.push(format!(
            "{label:28} {:>7} elements, {:>5} differ, max {:.2} ulp ({:.3e})",
            diff.elements, diff.differing, diff.max_ulps, diff.max_abs
        ));
        total.merge(&diff);
        cases_seen += 1;
    }
    assert!(cases_seen >= 10, "only {cases_seen} fixture cases");
    eprintln!(
        "candle (CPU device) vs native, every fixture × {} blends:",
        BLENDS.len()
    );
    for line in &report {
        eprintln!("  {line}");
    }
    for (dtype, d) in &per_dtype {
        eprintln!(
            "  {dtype}: {} of {} elements differ, max {:.2} ulp",
            d.differing, d.elements, d.max_ulps
        );
    }
}

/// `unmerge` bakes the inverse adapter (negated Cayley stages, inverted Neumann blocks, divided
/// row scales) in reverse order: the candle program runs it like the native path, and undoes
/// its own merge.
#[test]
fn unmerge_matches_the_native_path() {
    let device = Device::Cpu;
    for dir in cases() {
        let label = dir.file_name().unwrap().to_string_lossy().to_string();
        let case = read_json(&dir.join("case.json"));
        if case["single_file"].as_bool() == Some(true) {
            continue; // whole checkpoints: the merge test covers their row slices
        }
        let adapter = oftool::layouts::load(&dir.join(case["adapter"].as_str().unwrap())).unwrap();
        let inverse = oftool::strength::adapter_inverse(&adapter)
            .unwrap_or_else(|e| panic!("{label}: inverse: {e}"));
        let merged = MappedFile::open(&dir.join(case["merged"].as_str().unwrap())).unwrap();
        let base = MappedFile::open(&dir.join(case["base"].as_str().unwrap())).unwrap();
        for (key, group) in case_groups(&dir, &inverse) {
            let edits: Vec<Edit<'_>> = group
                .iter()
                .rev()
                .map(|(layer, rows)| Edit {
                    layer,
                    rows: rows.as_ref(),
                    blend: Blend::default(),
                })
                .collect();
            let (got, want, dtype) = both(&merged, &key, &edits, &device);
            let mut d = Diff::default();
            d.add(&got, &want, dtype);
            assert!(
                d.max_ulps <= 1.0,
                "{label} {key}: unmerge differs from the native path by {} ulp",
                d.max_ulps
            );
            // Back near the base: the library's merged weights were rounded once, so only
            // their rounding (and a Neumann block's conditioning) separates the two.
            let b0 = raw(&base, &key).values;
            let scale = b0.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            let err = got
                .iter()
                .zip(&b0)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(
                err <= 0.05 * scale.max(1e-3),
                "{label} {key}: unmerge is {err} from the base"
            );
        }
    }
}

/// The spec's vectors in f64 (an F64 base: f64 compute): to 1e-12, as the native path.
#[test]
fn spec_vectors_match_in_f64() {
    let dir = repo().join("spec").join("vectors");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let v = read_json(&path);
        if v.get("side").is_none() {
            continue;
        }
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let layer = layer_from(&v);
        let w = floats(&v["w"]);
        let rows = v["w"].as_array().unwrap().len();
        let shape = [rows, w.len() / rows];
        // A row-slice vector lists the rows of the fused weight the layer covers, in order.
        let listed = v.get("rows").map(|listed| {
            let ranges = listed.as_array().unwrap().iter().map(|r| {
                let (a, n) = (r[0].as_u64().unwrap(), r[1].as_u64().unwrap());
                a as usize..(a + n) as usize
            });
            RowSlice::new(ranges.collect())
        });
        let edits = [Edit {
            layer: &layer,
            rows: listed.as_ref(),
            blend: Blend::default(),
        }];
        let got = rotate(
            &name,
            bytemuck::cast_slice(&w),
            Dtype::F64,
            &shape,
            &edits,
            &Device::Cpu,
        );
        // Truncated stages (spec §8.7) are cut by the CPU kernels only: the candle program
        // refuses them rather than rotating the wrong rows.
        if v["stages"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["truncated"] == true)
        {
            let e = got
                .err()
                .unwrap_or_else(|| panic!("{name}: a truncated stage ran"));
            assert_eq!(e.category().id(), "unsupported", "{name}: {e}");
            continue;
        }
        let got = got.unwrap_or_else(|e| panic!("{name}: {e}"));
        let want = floats(&v["expected"]);
        let err = values(&got)
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(err < 1e-12, "{name}: W' differs by {err}");
        n += 1;
    }
    assert!(n >= 15, "only {n} vectors");
}

#[test]
fn errors_name_the_problem_and_never_panic() {
    let dir = cases_dir().join("peft-unet-f16");
    let case = read_json(&dir.join("case.json"));
    let adapter = oftool::layouts::load(&dir.join(case["adapter"].as_str().unwrap())).unwrap();
    let (key, group) = case_groups(&dir, &adapter).remove(0);
    let base = MappedFile::open(&dir.join("base.safetensors")).unwrap();
    let Raw {
        bytes,
        shape,
        dtype,
        ..
    } = raw(&base, &key);
    let edit = |rows| Edit {
        layer: group[0].0,
        rows,
        blend: Blend::default(),
    };
    let dev = Device::Cpu;
    // Too few bytes for the shape.
    let e = rotate(&key, &bytes[2..], dtype, &shape, &[edit(None)], &dev).unwrap_err();
    assert_eq!(e.category(), Category::Tensor, "{e}");
    // A dtype that cannot be rotated.
    let e = rotate(&key, &bytes, Dtype::I16, &shape, &[edit(None)], &dev).unwrap_err();
    assert_eq!(e.category(), Category::TargetShape, "{e}");
    // Rows outside the tensor, and a slice the layer does not fit.
    let e = rotate(
        &key,
        &bytes,
        dtype,
        &shape,
        &[edit(Some(&RowSlice::range(1..shape[0] + 1)))],
        &dev,
    )
    .unwrap_err();
    assert_eq!(e.category(), Category::TargetShape, "{e}");
    let one = RowSlice::range(0..1);
    let mut rows_layer = group[0].0.clone();
    rows_layer.side = oftool::model::Side::Output;
    let one_row = Edit {
        layer: &rows_layer,
        rows: Some(&one),
        blend: Blend::default(),
    };
    let e = rotate(&key, &bytes, dtype, &shape, &[one_row], &dev).unwrap_err();
    assert_eq!(e.category(), Category::TargetShape, "{e}");
    // An overflow of the base dtype names the element, as the native path does.
    let huge: Vec<u8> = bytes
        .chunks_exact(2)
        .flat_map(|_| half::f16::from_f32(65000.0).to_le_bytes())
        .collect();
    let mut layer = group[0].0.clone();
    layer.row_scale = Some((oftool::model::ScalePosition::After, vec![2.0; shape[0]]));
    let e = rotate(
        &key,
        &huge,
        dtype,
        &shape,
        &[Edit {
            layer: &layer,
            rows: None,
            blend: Blend::default(),
        }],
        &dev,
    )
    .unwrap_err();
    assert_eq!(e.category(), Category::NonFinite, "{e}");
    assert!(e.to_string().contains("overflows F16"), "{e}");
}

#[test]
fn device_choices_parse_and_cuda_fails_cleanly_without_it() {
    assert_eq!("cpu".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cpu);
    assert_eq!(
        "cuda".parse::<DeviceChoice>().unwrap(),
        DeviceChoice::Cuda(0)
    );
    assert_eq!(
        "cuda:3".parse::<DeviceChoice>().unwrap(),
        DeviceChoice::Cuda(3)
    );
    assert_eq!("auto".parse::<DeviceChoice>().unwrap(), DeviceChoice::Auto);
    assert_eq!(
        "candle-cpu".parse::<DeviceChoice>().unwrap(),
        DeviceChoice::CandleCpu
    );
    for d in ["cpu", "candle-cpu", "cuda:2", "auto"] {
        assert_eq!(d.parse::<DeviceChoice>().unwrap().to_string(), d);
    }
    for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", "CUDA", ""] {
        let e = bad.parse::<DeviceChoice>().unwrap_err();
        assert_eq!(e.category(), Category::Usage, "{bad}: {e}");
    }
    if !oftool::candle_rotate::CUDA_BUILT {
        let e = oftool::candle_rotate::open_cuda(0).unwrap_err();
        assert_eq!(e.category(), Category::Unsupported, "{e}");
        let (dev, note) = oftool::candle_rotate::resolve_device(DeviceChoice::Auto).unwrap();
        assert!(dev.is_none() && note.is_some());
    }
}
