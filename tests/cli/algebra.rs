//! Rotation algebra through the binary: compose, strength (geodesic and tool parity), unmerge.

#[allow(unused_imports)]
use crate::common;

use crate::common::*;
use assert_cmd::Command;
use std::path::{Path, PathBuf};

fn oftool() -> Command {
    Command::cargo_bin("oftool").expect("binary built")
}

fn run(args: &[&std::ffi::OsStr]) -> std::process::Output {
    let o = oftool().args(args).output().unwrap();
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn os<P: AsRef<std::ffi::OsStr> + ?Sized>(p: &P) -> &std::ffi::OsStr {
    p.as_ref()
}

fn case(name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let dir = cases_dir().join(name);
    let c = read_json(&dir.join("case.json"));
    (
        dir.join(c["adapter"].as_str().unwrap()),
        dir.join(c["base"].as_str().unwrap()),
        dir.join(c["merged"].as_str().unwrap()),
    )
}

/// Every tensor of `a` within `ulps` units of the dtype (f32 bases: within `f32_tol`) of `b`.
fn assert_close(label: &str, a: &Path, b: &Path, ulps: f64, f32_tol: f64) {
    let fa = crate::common::MappedFile::open(a).unwrap();
    let names: Vec<String> = fa
        .tensors()
        .names()
        .into_iter()
        .map(|n| n.to_string())
        .collect();
    for k in names {
        let (x, _, d) = tensor(a, &k);
        let (y, _, _) = tensor(b, &k);
        for (i, (p, q)) in x.iter().zip(&y).enumerate() {
            let tol = match d {
                safetensors::Dtype::F16 | safetensors::Dtype::BF16 => ulp(*q, d) * ulps * 1.000_001,
                _ => f32_tol * (1.0 + q.abs()),
            };
            assert!((p - q).abs() <= tol, "{label} {k}[{i}]: {p} vs {q}");
        }
    }
}

/// `a` equals `b` within one rounding of the base dtype, measured at each row's largest element.
fn assert_row_close(label: &str, a: &Path, b: &Path) {
    let fa = crate::common::MappedFile::open(a).unwrap();
    let names: Vec<String> = fa
        .tensors()
        .names()
        .into_iter()
        .map(|n| n.to_string())
        .collect();
    for k in names {
        let (x, shape, d) = tensor(a, &k);
        let (y, _, _) = tensor(b, &k);
        let cols: usize = shape[1..].iter().product();
        for (r, (xr, yr)) in x.chunks(cols).zip(y.chunks(cols)).enumerate() {
            let big = yr.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            let tol = match d {
                safetensors::Dtype::F16 | safetensors::Dtype::BF16 => ulp(big, d) * 1.000_001,
                _ => 1e-6 * (1.0 + big),
            };
            for (i, (p, q)) in xr.iter().zip(yr).enumerate() {
                assert!(
                    (p - q).abs() <= tol + ulp(*q, d),
                    "{label} {k}[{r}, {i}]: {p} vs {q} (row max {big})"
                );
            }
        }
    }
}

#[test]
fn compose_equals_merging_one_after_the_other() {
    let tmp = tempfile::tempdir().unwrap();
    let t = |n: &str| tmp.path().join(n);
    // (first, second, base-from): same-side PEFT pair, same-side LyCORIS pair (with rescale,
    // stacked), mixed sides (LyCORIS output side, PEFT input side) on one UNet.
    let pairs = [
        (
            "peft-unet-neumann5-b4",
            "peft-unet-exact-r",
            "peft-unet-neumann5-b4",
        ),
        (
            "lyco-unet-rescale",
            "lyco-unet-constraint",
            "lyco-unet-rescale",
        ),
        ("lyco-unet-plain", "peft-unet-neumann3", "lyco-unet-plain"),
    ];
    for (a, b, from) in pairs {
        let (ad_a, _, _) = case(a);
        let (ad_b, _, _) = case(b);
        let (_, base, _) = case(from);
        let composed = t(&format!("{a}+{b}.oft"));
        let o = run(&[
            os("compose"),
            os(&ad_a),
            os(&ad_b),
            os("-o"),
            os(&composed),
            os("--base"),
            os(&base),
            os("--json"),
        ]);
        let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert!(s["layers"].as_u64().unwrap() > 0);
        let one = t(&format!("{a}+{b}.one.safetensors"));
        run(&[
            os("merge"),
            os(&base),
            os(&composed),
            os("-o"),
            os(&one),
            os("--skip-missing"),
            os("-q"),
        ]);
        let mid = t(&format!("{a}+{b}.mid.safetensors"));
        run(&[
            os("merge"),
            os(&base),
            os(&ad_a),
            os("-o"),
            os(&mid),
            os("--skip-missing"),
            os("-q"),
        ]);
        let two = t(&format!("{a}+{b}.two.safetensors"));
        run(&[
            os("merge"),
            os(&mid),
            os(&ad_b),
            os("-o"),
            os(&two),
            os("--skip-missing"),
            os("-q"),
        ]);
        assert_close(&format!("{a}+{b}"), &one, &two, 1.0, 1e-6);
    }
}

#[test]
fn composing_boft_adapters() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = repo().join("fixtures/blend/cases");
    let a = dir.join("lycoris-boft-plain-s10/adapter.safetensors");
    let b = dir.join("lycoris-boft-constraint-rescale-s10/adapter.safetensors");
    let base = dir.join("lycoris-boft-plain-s10/base.safetensors");
    let composed = tmp.path().join("boft.oft");
    run(&[os("compose"), os(&a), os(&b), os("-o"), os(&composed)]);
    let one = tmp.path().join("one.safetensors");
    run(&[
        os("merge"),
        os(&base),
        os(&composed),
        os("-o"),
        os(&one),
        os("-q"),
    ]);
    let mid = tmp.path().join("mid.safetensors");
    run(&[os("merge"), os(&base), os(&a), os("-o"), os(&mid), os("-q")]);
    let two = tmp.path().join("two.safetensors");
    run(&[os("merge"), os(&mid), os(&b), os("-o"), os(&two), os("-q")]);
    assert_close("boft", &one, &two, 1.0, 1e-6);
}

#[test]
fn unmerge_restores_the_base() {
    let tmp = tempfile::tempdir().unwrap();
    for name in [
        "peft-unet-neumann5-b4",
        "peft-unet-exact-r",
        "lyco-unet-rescale",
        "peft-unet-bf16",
        "peft-unet-f16",
        "lyco-te",
    ] {
        let (ad, base, _) = case(name);
        let merged = tmp.path().join(format!("{name}.m.safetensors"));
        run(&[
            os("merge"),
            os(&base),
            os(&ad),
            os("-o"),
            os(&merged),
            os("-q"),
        ]);
        let back = tmp.path().join(format!("{name}.b.safetensors"));
        run(&[
            os("unmerge"),
            os(&merged),
            os(&ad),
            os("-o"),
            os(&back),
            os("-q"),
        ]);
        // The merged weights were rounded once to the base dtype; the exact inverse rotation
        // carries that rounding (at most half an ulp of each element of the row) back to the
        // base, mixed within the row, then rounds again: bounded by one ulp of the row's
        // largest element, plus the final rounding.
        assert_row_close(name, &back, &base);
    }
}

#[test]
fn geodesic_strength_is_a_rotation_power() {
    let tmp = tempfile::tempdir().unwrap();
    let (ad, base, _) = case("lyco-unet-plain");
    let ad_s = ad.to_str().unwrap();
    // A:2 equals A applied twice; A:1 then A:-1 gives the base back; A:0 is the identity.
    let twice = tmp.path().join("twice.safetensors");
    run(&[
        os("merge"),
        os(&base),
        os(&format!("{ad_s}:2")),
        os("-o"),
        os(&twice),
        os("-q"),
    ]);
    let ref2 = tmp.path().join("ref2.safetensors");
    run(&[
        os("merge"),
        os(&base),
        os(&ad),
        os(&ad),
        os("-o"),
        os(&ref2),
        os("-q"),
    ]);
    assert_close("A:2", &twice, &ref2, 1.0, 1e-6);
    let undo = tmp.path().join("undo.safetensors");
    run(&[
        os("merge"),
        os(&base),
        os(&ad),
        os(&format!("{ad_s}:-1")),
        os("-o"),
        os(&undo),
        os("-q"),
    ]);
    assert_close("A then A:-1", &undo, &base, 1.0, 1e-6);
    let zero = tmp.path().join("zero.safetensors");
    run(&[
        os("merge"),
        os(&base),
        os(&format!("{ad_s}:0")),
        os("-o"),
        os(&zero),
        os("-q"),
    ]);
    assert_close("A:0", &zero, &base, 0.0, 1e-12);
    // compose A:0.5 A:0.5 equals A.
    let halves = tmp.path().join("halves.oft");
    run(&[
        os("compose"),
        os(&format!("{ad_s}:0.5")),
        os(&format!("{ad_s}:0.5")),
        os("-o"),
        os(&halves),
    ]);
    let h = tmp.path().join("h.safetensors");
    run(&[
        os("merge"),
        os(&base),
        os(&halves),
        os("-o"),
        os(&h),
        os("-q"),
    ]);
    let full = tmp.path().join("full.safetensors");
    run(&[
        os("merge"),
        os(&base),
        os(&ad),
        os("-o"),
        os(&full),
        os("-q"),
    ]);
    assert_close("A:0.5 ∘ A:0.5", &h, &full, 1.0, 1e-6);
}

#[test]
fn collapse_multiplies_nesting_stages() {
    let tmp = tempfile::tempdir().unwrap();
    let (ad, base, _) = case("lyco-unet-plain");
    let (ad_c, _, _) = case("lyco-unet-constraint");
    let out = tmp.path().join("c.oft");
    let o = run(&[
        os("compose"),
        os(&ad),
        os(&ad_c),
        os("-o"),
        os(&out),
        os("--collapse"),
        os("--json"),
    ]);
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let c = &s["collapse"];
    assert!(c["collapsed_layers"].as_u64().unwrap() > 0, "{s}");
    assert!(c["max_r_change"].as_f64().unwrap() < 1e-12, "{s}");
    assert_eq!(
        s["stages"], s["layers"],
        "every layer collapsed to one stage: {s}"
    );
    let one = tmp.path().join("one.safetensors");
    run(&[
        os("merge"),
        os(&base),
        os(&out),
        os("-o"),
        os(&one),
        os("-q"),
    ]);
    let two = tmp.path().join("two.safetensors");
    run(&[
        os("merge"),
        os(&base),
        os(&ad),
        os(&ad_c),
        os("-o"),
        os(&two),
        os("-q"),
    ]);
    assert_close("collapse", &one, &two, 1.0, 1e-6);
    // Neumann stages are never collapsed, and say so.
    let (p, _, _) = case("peft-unet-neumann5-b4");
    let out2 = tmp.path().join("n.oft");
    let o = run(&[
        os("compose"),
        os(&p),
        os(&p),
        os("-o"),
        os(&out2),
        os("--collapse"),
        os("--json"),
    ]);
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(s["collapse"]["collapsed_layers"], 0);
    assert!(
        s["collapse"]["kept"][0]
            .as_str()
            .unwrap()
            .contains("Neumann")
    );
}

#[test]
fn stacked_layers_need_format_1_1() {
    let tmp = tempfile::tempdir().unwrap();
    let (ad, _, _) = case("lyco-unet-rescale");
    let out = tmp.path().join("s.oft");
    let o = run(&[
        os("compose"),
        os(&ad),
        os(&ad),
        os("-o"),
        os(&out),
        os("--json"),
    ]);
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        s["stacked_targets"].as_u64().unwrap() > 0,
        "rescale between rotations stacks layers: {s}"
    );
    let f = crate::common::MappedFile::open(&out).unwrap();
    assert_eq!(f.metadata["oft.version"], "1.1");
    let m: serde_json::Value = serde_json::from_str(&f.metadata["oft.manifest"]).unwrap();
    assert_eq!(m["requires"], serde_json::json!(["stacked-layers"]));
    oftool().arg("validate").arg(&out).assert().success();
}

/// Every strength fixture made by the tools' own code: `merge base adapter:S --blend TOOL`.
#[test]
fn blend_modes_match_each_tool() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = repo().join("fixtures/blend/cases");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    cases.sort();
    assert!(cases.len() >= 40, "{}", cases.len());
    let mut failures = Vec::new();
    for c in &cases {
        let j = read_json(&c.join("case.json"));
        let label = c.file_name().unwrap().to_string_lossy().to_string();
        let tool = j["tool"].as_str().unwrap();
        let s = j["strength"].as_f64().unwrap();
        let adapter = format!("{}:{s}", c.join(j["adapter"].as_str().unwrap()).display());
        let out = tmp.path().join(format!("{label}.safetensors"));
        let o = oftool()
            .arg("merge")
            .arg(c.join(j["base"].as_str().unwrap()))
            .arg(&adapter)
            .args(["--blend", tool, "-q", "-o"])
            .arg(&out)
            .output()
            .unwrap();
        if !o.status.success() {
            failures.push(format!("{label}: {}", String::from_utf8_lossy(&o.stderr)));
            continue;
        }
        let merged = c.join(j["merged"].as_str().unwrap());
        for l in j["layers"].as_array().unwrap() {
            let k = l["base_key"].as_str().unwrap();
            let (g, _, d) = tensor(&out, k);
            let (w, _, _) = tensor(&merged, k);
            let (ratio, i) = worst(&g, &w, d);
            if ratio > 1.0 {
                failures.push(format!(
                    "{label} {k}[{i}]: oftool {} vs {tool} {} ({ratio:.1}×)",
                    g[i], w[i]
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failure(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// A kohya-named and a PEFT-named adapter on one U-Net composed without `--base`: the names
/// cannot be compared, so the layers stay separate, apply in file order and the file requires
/// `stacked-layers` (format 1.1). Baking it equals baking the two one after the other; the same
/// layers in a file that does not require `stacked-layers` are refused (their order would not
/// be defined), by `merge` and by `validate --base`.
#[test]
fn layers_on_one_tensor_apply_in_file_order_and_need_stacked_layers() {
    let tmp = tempfile::tempdir().unwrap();
    let t = |n: &str| tmp.path().join(n);
    let (ad_a, base, _) = case("lyco-unet-plain");
    let (ad_b, _, _) = case("peft-unet-neumann3");
    let composed = t("ab.oft");
    run(&[os("compose"), os(&ad_a), os(&ad_b), os("-o"), os(&composed)]);
    let f = crate::common::MappedFile::open(&composed).unwrap();
    assert_eq!(f.metadata["oft.version"], "1.1");
    let m: serde_json::Value = serde_json::from_str(&f.metadata["oft.manifest"]).unwrap();
    assert_eq!(m["requires"], serde_json::json!(["stacked-layers"]));
    let one = t("one.safetensors");
    run(&[
        os("merge"),
        os(&base),
        os(&composed),
        os("-o"),
        os(&one),
        os("--skip-missing"),
        os("-q"),
    ]);
    let two = t("two.safetensors");
    run(&[
        os("merge"),
        os(&base),
        os(&ad_a),
        os(&ad_b),
        os("-o"),
        os(&two),
        os("--skip-missing"),
        os("-q"),
    ]);
    assert_close("file order", &one, &two, 0.0, 0.0);

    // The same layers without `stacked-layers`: refused.
    let mut a = oftool::oft_file::read(&composed).unwrap();
    a.features.clear();
    let flat = t("flat.oft");
    oftool::oft_file::write(&a, &flat).unwrap();
    let f = crate::common::MappedFile::open(&flat).unwrap();
    assert_eq!(f.metadata["oft.version"], "1.0");
    let o = oftool()
        .arg("merge")
        .arg(&base)
        .arg(&flat)
        .args(["-o"])
        .arg(t("x.safetensors"))
        .arg("-q")
        .assert()
        .code(1)
        .get_output()
        .clone();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("stacked-layers") && err.contains("target-ambiguous"),
        "{err}"
    );
    let o = oftool()
        .args(["validate", "--json", "--base"])
        .arg(&base)
        .arg(&flat)
        .assert()
        .code(1)
        .get_output()
        .clone();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        v["problems"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["category"] == "target-ambiguous"),
        "{v}"
    );
}
