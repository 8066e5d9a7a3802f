//! `merge`/`unmerge --device` through the real binary. `candle-cpu` runs the candle backend
//! (the tensor program a GPU runs) on candle's CPU device, so the whole device path is tested
//! here without a GPU; `cuda` in a build without the `cuda` feature must fail cleanly.
//!
//! The candle backend's output equals the native backend's except where the matrix products,
//! which sum in another order, land next to a rounding boundary of the stored dtype: then one
//! unit in the last place (measured: F32 bases none; F16/BF16 a handful of elements per
//! thousand at most, `-- --nocapture` prints the counts). Asserted: ≤ 1 ulp of the stored dtype
//! everywhere, untouched tensors and metadata identical, and the fixture tolerance against the
//! library's merged weights (the bound the native backend is held to in `merge.rs`).

#[allow(unused_imports)]
use crate::common;

use crate::common::*;
use assert_cmd::Command;
use safetensors::tensor::Dtype;
use std::path::{Path, PathBuf};

fn oftool() -> Command {
    Command::cargo_bin("oftool").expect("binary built")
}

fn case_paths(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let case = read_json(&dir.join("case.json"));
    (
        dir.join(case["adapter"].as_str().unwrap()),
        dir.join(case["base"].as_str().unwrap()),
        dir.join(case["merged"].as_str().unwrap()),
    )
}

/// `oftool <cmd> <input> <adapter> -o <out> --json --device <device>`; the JSON summary.
fn bake(cmd: &str, input: &Path, adapter: &Path, out: &Path, device: &str) -> serde_json::Value {
    let o = oftool()
        .arg(cmd)
        .arg(input)
        .arg(adapter)
        .arg("-o")
        .arg(out)
        .arg("--json")
        .arg("--device")
        .arg(device)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{cmd} {} --device {device}: {}",
        input.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

/// Per-file comparison of two bakes: elements that differ, the largest difference in ulps of
/// the stored dtype; untouched tensors and the metadata must be identical.
fn differences(label: &str, got: &Path, want: &Path) -> (usize, usize, f64) {
    if std::fs::read(got).unwrap() == std::fs::read(want).unwrap() {
        let f = MappedFile::open(want).unwrap();
        let n = f
            .tensors()
            .tensors()
            .iter()
            .map(|(_, v)| v.shape().iter().product::<usize>())
            .sum();
        return (n, 0, 0.0);
    }
    let g = MappedFile::open(got).unwrap();
    let w = MappedFile::open(want).unwrap();
    assert_eq!(g.metadata, w.metadata, "{label}: metadata");
    let (gt, wt) = (g.tensors(), w.tensors());
    let mut names = wt.names();
    names.sort();
    let mut got_names = gt.names();
    got_names.sort();
    assert_eq!(names, got_names, "{label}: tensor names");
    let (mut n, mut differing, mut max_ulps) = (0, 0, 0.0f64);
    for name in names {
        let (a, b) = (gt.tensor(name).unwrap(), wt.tensor(name).unwrap());
        assert_eq!(
            (a.dtype(), a.shape()),
            (b.dtype(), b.shape()),
            "{label} {name}"
        );
        let av = to_f64(&a);
        let bv = to_f64(&b);
        n += av.len();
        for (&x, &y) in av.iter().zip(&bv) {
            if x.to_bits() != y.to_bits() {
                differing += 1;
                max_ulps = max_ulps.max((x - y).abs() / ulp(y, b.dtype()));
            }
        }
    }
    (n, differing, max_ulps)
}

/// Every fixture (PEFT OFT and BOFT incl. multi-stage butterflies, LyCORIS, kohya,
/// OneTrainer; F16, BF16 and F32 bases; whole single-file checkpoints with fused q/k/v row
/// slices): `--device candle-cpu` equals `--device cpu` within one ulp, and the library's
/// merged weights within the fixture tolerance.
#[test]
fn merge_on_candle_cpu_equals_the_cpu_on_every_fixture() {
    let tmp = tempfile::tempdir().unwrap();
    let mut per_dtype: std::collections::BTreeMap<String, (usize, usize, f64)> = Default::default();
    let mut seen = 0;
    for dir in cases() {
        let label = dir.file_name().unwrap().to_string_lossy().to_string();
        let (adapter, base, merged) = case_paths(&dir);
        let cpu = tmp.path().join(format!("{label}.cpu.safetensors"));
        let dev = tmp.path().join(format!("{label}.candle.safetensors"));
        let s_cpu = bake("merge", &base, &adapter, &cpu, "cpu");
        let s_dev = bake("merge", &base, &adapter, &dev, "candle-cpu");
        assert_eq!(s_cpu["device"], "cpu", "{label}");
        assert_eq!(s_dev["device"], "candle-cpu", "{label}");
        assert!(s_dev.get("device_note").is_none(), "{label}");
        for k in [
            "layers_baked",
            "tensors_rotated",
            "files_written",
            "bytes_written",
        ] {
            assert_eq!(s_cpu[k], s_dev[k], "{label}: {k}");
        }
        let (n, differing, max_ulps) = differences(&label, &dev, &cpu);
        assert!(
            max_ulps <= 1.0,
            "{label}: candle-cpu is {max_ulps} ulp from cpu"
        );
        // The library's merged weights, at the fixture tolerance (as merge.rs holds cpu).
        let lib = MappedFile::open(&merged).unwrap();
        let got = MappedFile::open(&dev).unwrap();
        let dtype = {
            let (lt, gt) = (lib.tensors(), got.tensors());
            let mut dtype = None;
            for name in lt.names() {
                let Ok(g) = gt.tensor(name) else { continue };
                let l = lt.tensor(name).unwrap();
                let gv = to_f64(&g);
                let lv = to_f64(&l);
                let (ratio, i) = worst(&gv, &lv, g.dtype());
                assert!(
                    ratio <= 1.0,
                    "{label} {name}: element {i}: candle {} vs library {}, {ratio:.2}× the tolerance",
                    gv[i],
                    lv[i]
                );
                dtype.get_or_insert(g.dtype());
            }
            dtype.unwrap_or(Dtype::F32)
        };
        let e = per_dtype.entry(format!("{dtype:?}")).or_default();
        e.0 += n;
        e.1 += differing;
        e.2 = e.2.max(max_ulps);
        seen += 1;
    }
    assert!(seen >= 10, "only {seen} fixture cases");
    eprintln!("merge --device candle-cpu vs --device cpu, every fixture:");
    for (dtype, (n, d, m)) in &per_dtype {
        eprintln!("  {dtype}: {d} of {n} elements differ, max {m:.2} ulp");
    }
}

/// `unmerge --device candle-cpu` equals `--device cpu` (inverse adapters in reverse order) on
/// one case of each kind, and a merge-unmerge round trip on the device comes back to the base.
#[test]
fn unmerge_on_candle_cpu_equals_the_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    for label in [
        "peft-unet-f16",
        "peft-unet-bf16",
        "peft-boft-m2-unet",
        "lyco-unet-rescale",
        "peft-unet-neumann5-b4",
        "single-sdxl-lyco",
    ] {
        let dir = cases_dir().join(label);
        let (adapter, _, merged) = case_paths(&dir);
        let cpu = tmp.path().join(format!("{label}.cpu.safetensors"));
        let dev = tmp.path().join(format!("{label}.candle.safetensors"));
        bake("unmerge", &merged, &adapter, &cpu, "cpu");
        let s = bake("unmerge", &merged, &adapter, &dev, "candle-cpu");
        assert_eq!(s["device"], "candle-cpu");
        let (_, _, max_ulps) = differences(label, &dev, &cpu);
        assert!(
            max_ulps <= 1.0,
            "{label}: unmerge candle-cpu is {max_ulps} ulp from cpu"
        );
    }
}

/// `--device cuda` in a build without the `cuda` feature: `unsupported`, with a hint, exit 1,
/// nothing written; `auto` notes it and bakes on the CPU; an unknown device is a usage error.
#[test]
fn cuda_without_the_feature_is_a_clean_error_and_auto_falls_back() {
    if oftool::candle_rotate::CUDA_BUILT {
        return; // a cuda build: scripts/gpu-check.sh checks the device
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = cases_dir().join("peft-unet-f16");
    let (adapter, base, _) = case_paths(&dir);
    let out = tmp.path().join("o.safetensors");
    for cmd in ["merge", "unmerge"] {
        for device in ["cuda", "cuda:0", "cuda:3"] {
            let o = oftool()
                .args([cmd, base.to_str().unwrap(), adapter.to_str().unwrap(), "-o"])
                .arg(&out)
                .args(["--device", device])
                .output()
                .unwrap();
            assert_eq!(o.status.code(), Some(1), "{cmd} --device {device}");
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(
                err.contains("error[unsupported]")
                    && err.contains("built without CUDA support")
                    && err.contains("hint:"),
                "{err}"
            );
            assert!(!err.contains("panicked"), "{err}");
            // In JSON too.
            let o = oftool()
                .args([cmd, base.to_str().unwrap(), adapter.to_str().unwrap(), "-o"])
                .arg(&out)
                .args(["--device", device, "--json"])
                .output()
                .unwrap();
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            assert_eq!(v["error"]["category"], "unsupported");
            assert!(v["error"]["hint"].is_string());
            let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
            assert!(left.is_empty(), "{cmd} --device {device} left {left:?}");
        }
        for bad in ["gpu", "cuda:", "cuda:x", "CPU"] {
            let o = oftool()
                .args([cmd, base.to_str().unwrap(), adapter.to_str().unwrap(), "-o"])
                .arg(&out)
                .args(["--device", bad])
                .output()
                .unwrap();
            assert_eq!(o.status.code(), Some(2), "--device {bad}");
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(
                err.contains("error[usage]") && err.contains("unknown device"),
                "{err}"
            );
        }
    }
    // auto: a note on stderr, the CPU, the same bytes as --device cpu.
    let o = oftool()
        .args([
            "merge",
            base.to_str().unwrap(),
            adapter.to_str().unwrap(),
            "-o",
        ])
        .arg(&out)
        .args(["--device", "auto", "--json"])
        .output()
        .unwrap();
    assert!(o.status.success());
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(s["device"], "cpu");
    assert!(
        s["device_note"].as_str().unwrap().contains("without CUDA"),
        "{s}"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("note:") && err.contains("rotating on the CPU"),
        "{err}"
    );
    let cpu = tmp.path().join("cpu.safetensors");
    bake("merge", &base, &adapter, &cpu, "cpu");
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&cpu).unwrap());
    // The human summary names a device other than the CPU.
    let o = oftool()
        .args([
            "merge",
            base.to_str().unwrap(),
            adapter.to_str().unwrap(),
            "-o",
        ])
        .arg(tmp.path().join("h.safetensors"))
        .args(["--device", "candle-cpu"])
        .output()
        .unwrap();
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("on candle-cpu"));
}

/// A failure inside the device program (a NaN in the base makes the rotation non-finite)
/// leaves nothing behind and reads as on the CPU; so does a truncated base.
#[test]
fn device_failures_leave_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = cases_dir().join("peft-unet-f16");
    let (adapter, base, _) = case_paths(&dir);
    let f = MappedFile::open(&base).unwrap();
    let st = f.tensors();
    let case = read_json(&dir.join("case.json"));
    let layers = case["layers"].as_array().unwrap();
    let key = layers[layers.len() - 1]["base_key"].as_str().unwrap();
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    let t = owned.iter_mut().find(|t| t.0 == key).unwrap();
    assert_eq!(t.1, Dtype::F16);
    t.3[0..2].copy_from_slice(&half::f16::NAN.to_le_bytes());
    let views: Vec<(String, safetensors::tensor::TensorView)> = owned
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    let nan = tmp.path().join("nan.safetensors");
    std::fs::write(&nan, safetensors::serialize(views, None).unwrap()).unwrap();
    let bytes = std::fs::read(&base).unwrap();
    let trunc = tmp.path().join("trunc.safetensors");
    std::fs::write(&trunc, &bytes[..bytes.len() / 2]).unwrap();
    let outdir = tmp.path().join("o");
    std::fs::create_dir(&outdir).unwrap();
    for (input, what) in [(&nan, "non-finite"), (&trunc, "truncated")] {
        let mut errs = Vec::new();
        for device in ["cpu", "candle-cpu"] {
            let o = oftool()
                .arg("merge")
                .arg(input)
                .arg(&adapter)
                .arg("-o")
                .arg(outdir.join("x.safetensors"))
                .args(["--device", device])
                .output()
                .unwrap();
            assert_eq!(o.status.code(), Some(1), "{what} --device {device}");
            let err = String::from_utf8_lossy(&o.stderr).to_string();
            assert!(err.contains(what), "{err}");
            let left: Vec<_> = std::fs::read_dir(&outdir).unwrap().collect();
            assert!(left.is_empty(), "{what} --device {device} left {left:?}");
            errs.push(err);
        }
        assert_eq!(errs[0], errs[1], "{what}: the devices word it alike");
    }
}

/// Stages cut to the weight (PEFT ≤ 0.13 with `out % r != 0`) are baked by the native kernels
/// only: the device path refuses them by name, writes nothing, and the CPU bakes them.
#[test]
fn truncated_blocks_are_refused_on_the_device_and_baked_on_the_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = repo().join("fixtures/conformance/peft013-unet-uneven");
    let (base, adapter) = (dir.join("base.safetensors"), dir.join("adapter"));
    let out = tmp.path().join("o.safetensors");
    let o = oftool()
        .args([
            "merge",
            base.to_str().unwrap(),
            adapter.to_str().unwrap(),
            "-o",
        ])
        .arg(&out)
        .args(["--device", "candle-cpu"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("error[unsupported]") && err.contains("CPU backend only"),
        "{err}"
    );
    assert!(err.contains("--device cpu"), "{err}");
    assert!(!out.exists());
    let o = oftool()
        .args([
            "merge",
            base.to_str().unwrap(),
            adapter.to_str().unwrap(),
            "-o",
        ])
        .arg(&out)
        .args(["--device", "cpu"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
