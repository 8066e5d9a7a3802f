//! Diffusion transformers: every `fixtures/dit/` case baked by the real binary into its base
//! (diffusers or original single-file layout) equals the producer's merged weights. (The name
//! tables' tests on full-size key sets are unit tests: `src/resolve/dit_tests.rs`.)

#![allow(clippy::single_range_in_vec_init)]

#[allow(unused_imports)]
use crate::common;

use crate::common::*;
use assert_cmd::Command;
use safetensors::tensor::Dtype;
use std::collections::HashMap;
use std::path::PathBuf;

/// Every tensor of a safetensors file as (values, shape, dtype), read once.
fn all(path: &std::path::Path) -> HashMap<String, (Vec<f64>, Vec<usize>, Dtype)> {
    let f = MappedFile::open(path).expect("opens");
    f.tensors()
        .tensors()
        .into_iter()
        .map(|(k, v)| {
            let values = to_f64(&v);
            (k, (values, v.shape().to_vec(), v.dtype()))
        })
        .collect()
}

fn dit_cases() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(repo().join("fixtures").join("dit"))
        .expect("fixtures/dit exists")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.join("case.json").is_file())
        .collect();
    v.sort();
    v
}

#[test]
fn every_dit_case_bakes_to_its_reference_through_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = dit_cases();
    assert!(cases.len() >= 75, "found {} cases", cases.len());
    let mut failures = Vec::new();
    for dir in &cases {
        let label = dir.file_name().unwrap().to_string_lossy().to_string();
        let case = read_json(&dir.join("case.json"));
        let base = dir.join(case["base"].as_str().unwrap());
        let merged = dir.join(case["merged"].as_str().unwrap());
        let adapter = dir.join(case["adapter"].as_str().unwrap());
        let out = tmp.path().join(format!("{label}.safetensors"));
        let o = Command::cargo_bin("oftool")
            .unwrap()
            .arg("merge")
            .arg(&base)
            .arg(&adapter)
            .arg("-o")
            .arg(&out)
            .arg("--json")
            .output()
            .unwrap();
        if !o.status.success() {
            failures.push(format!("{label}: {}", String::from_utf8_lossy(&o.stderr)));
            continue;
        }
        // validate --base checks every slice; inspect names the family the names belong to.
        let v = Command::cargo_bin("oftool")
            .unwrap()
            .args(["validate", "--json", "--base"])
            .arg(&base)
            .arg(&adapter)
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&v.stdout).unwrap();
        if v["valid"] != true {
            failures.push(format!("{label}: validate --base: {}", v["problems"]));
        }
        let i = Command::cargo_bin("oftool")
            .unwrap()
            .args(["inspect", "--json"])
            .arg(&adapter)
            .output()
            .unwrap();
        let i: serde_json::Value = serde_json::from_slice(&i.stdout).unwrap();
        let family = match case["family"].as_str().unwrap() {
            "sd35" => "sd3",
            "qwen" => "qwen-image",
            "hunyuan" => "hunyuan-video",
            f => f,
        };
        let families = &i["model"]["families"];
        if !families
            .as_array()
            .is_some_and(|f| f.iter().any(|x| x == family))
        {
            failures.push(format!("{label}: inspect names {families}, not {family}"));
        }
        let (got_all, want_all, base_all) = (all(&out), all(&merged), all(&base));
        let mut keys: Vec<&String> = want_all.keys().collect();
        keys.sort();
        let touched: std::collections::BTreeSet<&str> = case["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["base_key"].as_str().unwrap())
            .collect();
        for key in keys {
            let (g, gs, gd) = &got_all[key];
            let (w, ws, wd) = &want_all[key];
            assert_eq!((gs, gd), (ws, wd), "{label} {key}");
            if touched.contains(key.as_str()) {
                let (ratio, i) = worst(g, w, *wd);
                if ratio > 1.0 {
                    failures.push(format!(
                        "{label} {key}: element {i}: oftool {} vs reference {} ({ratio:.2}× tolerance)",
                        g[i], w[i]
                    ));
                }
            } else if g
                .iter()
                .map(|x| x.to_bits())
                .ne(w.iter().map(|x| x.to_bits()))
            {
                failures.push(format!("{label} {key}: untouched tensor changed"));
            }
        }
        for key in &touched {
            assert!(
                base_all[*key].0 != want_all[*key].0,
                "{label} {key}: the reference equals the base"
            );
        }
    }
    assert!(
        failures.is_empty(),
        "{} problem(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// An adapter for another family: every layer is named as missing (validate and merge).
#[test]
fn another_familys_base_is_refused_naming_the_layers() {
    let dit = repo().join("fixtures/dit");
    let adapter = dit.join("flux1-kohya-original/adapter.safetensors");
    let base = dit.join("sd35-onetrainer-comfy/base.safetensors");
    let o = Command::cargo_bin("oftool")
        .unwrap()
        .args(["validate", "--json", "--base"])
        .arg(&base)
        .arg(&adapter)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let problems = v["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 40);
    assert!(problems.iter().all(|p| p["check"] == "target-missing"));
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.safetensors");
    let o = Command::cargo_bin("oftool")
        .unwrap()
        .arg("merge")
        .arg(&base)
        .arg(&adapter)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("target-missing") && err.contains("oft_unet_single_blocks_1_linear1"),
        "{err}"
    );
    assert!(!out.exists());
}

/// Adapters whose layers cover rows of a fused weight or land on several tensors keep that
/// through `.oft` and `compose` (kohya's splits share one name: they must not be stacked).
#[test]
fn row_slices_survive_oft_and_compose() {
    let tmp = tempfile::tempdir().unwrap();
    for case in [
        "flux1-kohya-diffusers",
        "flux1-kohya-original",
        "flux1-onetrainer-comfy-diffusers",
        "flux1-lyco-oft-full-rescaled-original",
    ] {
        let dir = repo().join("fixtures/dit").join(case);
        let json = read_json(&dir.join("case.json"));
        let adapter = dir.join(json["adapter"].as_str().unwrap());
        let base = dir.join("base.safetensors");
        let oft = tmp.path().join(format!("{case}.oft"));
        let run = |args: &[&std::ffi::OsStr]| {
            let o = Command::cargo_bin("oftool")
                .unwrap()
                .args(args)
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "{case}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        };
        run(&[
            "convert".as_ref(),
            adapter.as_os_str(),
            "-o".as_ref(),
            oft.as_os_str(),
        ]);
        let twice = tmp.path().join(format!("{case}.twice.oft"));
        run(&[
            "compose".as_ref(),
            oft.as_os_str(),
            adapter.as_os_str(),
            "-o".as_ref(),
            twice.as_os_str(),
        ]);
        let [a, b, c] = ["a", "b", "c"].map(|x| tmp.path().join(format!("{case}.{x}.safetensors")));
        run(&[
            "merge".as_ref(),
            base.as_os_str(),
            oft.as_os_str(),
            "-o".as_ref(),
            a.as_os_str(),
        ]);
        run(&[
            "merge".as_ref(),
            base.as_os_str(),
            adapter.as_os_str(),
            adapter.as_os_str(),
            "-o".as_ref(),
            b.as_os_str(),
        ]);
        run(&[
            "merge".as_ref(),
            base.as_os_str(),
            twice.as_os_str(),
            "-o".as_ref(),
            c.as_os_str(),
        ]);
        let merged = dir.join("merged.safetensors");
        let names = MappedFile::open(&merged).unwrap();
        for key in names.tensors().names() {
            let (want, _, dtype) = tensor(&merged, key);
            let (got, _, _) = tensor(&a, key);
            assert!(
                worst(&got, &want, dtype).0 <= 1.0,
                "{case} {key}: .oft bake"
            );
            let (twice_seq, _, _) = tensor(&b, key);
            let (twice_composed, _, _) = tensor(&c, key);
            assert!(
                worst(&twice_composed, &twice_seq, dtype).0 <= 1.0,
                "{case} {key}: composed ≠ applied twice"
            );
        }
    }
}

/// FLUX.1, FLUX.2 and Chroma share most block names: an adapter of one is refused on another's
/// base, naming the layers that do not fit (no silent partial bake).
#[test]
fn flux_family_adapters_do_not_fit_each_others_bases() {
    let dit = repo().join("fixtures/dit");
    for (adapter, base, missing) in [
        (
            "flux1-peft-oft-original/adapter",
            "flux2-peft-oft-original/base.safetensors",
            "transformer_blocks.1.norm1.linear",
        ),
        (
            "flux2-onetrainer-comfy-original/adapter.safetensors",
            "chroma-peft-oft-original/base.safetensors",
            "diffusion_model.single_stream_modulation.lin",
        ),
        (
            "chroma-onetrainer-comfy-original/adapter.safetensors",
            "flux2-peft-oft-original/base.safetensors",
            "diffusion_model.distilled_guidance_layer.layers.0.in_layer",
        ),
    ] {
        let o = Command::cargo_bin("oftool")
            .unwrap()
            .args(["validate", "--json", "--base"])
            .arg(dit.join(base))
            .arg(dit.join(adapter))
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1), "{adapter} on {base}");
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let problems = v["problems"].as_array().unwrap();
        assert!(
            problems.iter().any(|p| p["check"] == "target-missing"
                && p["message"].as_str().is_some_and(|m| m.contains(missing))),
            "{adapter} on {base}: {problems:?}"
        );
    }
}
