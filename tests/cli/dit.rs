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
    // Skipping the missing layers cannot make another family's adapter fit: the hint says so.
    assert!(
        err.contains("are FLUX.1's, the base is SD3/SD3.5: bake it into a FLUX.1 base"),
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

/// Every `fixtures/dit` case × every `--to` layout (and OneTrainer's other key layout): the verdict
/// (exact / lossy / impossible counts, or the refusal's category) is the recorded one, and
/// every conversion that was written, read back and baked into the case's base, equals the
/// case's reference (ComfyUI's files read as ComfyUI reads them). In process: 250 conversions
/// as processes would cost CI a minute.
#[test]
fn every_dit_case_converts_with_its_verdict_and_bakes_back() {
    use oftool::bake::{BakeInput, MergeOptions, NoProgress};
    use oftool::convert::{ExportOptions, Names, run_to};
    use oftool::layouts::{Semantics, find};
    let tmp = tempfile::tempdir().unwrap();
    let mut table = String::new();
    let mut failures = Vec::new();
    let mut round_trips = 0;
    for dir in dit_cases() {
        let label = dir.file_name().unwrap().to_string_lossy().to_string();
        let case = read_json(&dir.join("case.json"));
        let base = dir.join(case["base"].as_str().unwrap());
        let adapter = dir.join(case["adapter"].as_str().unwrap());
        let want_all = all(&dir.join(case["merged"].as_str().unwrap()));
        // `--to onetrainer` names after the base's layout by default; `onetrainer-other` is
        // `--names` the other one (fused layers split, split layers fused).
        let other = if case["base_layout"] == "original" {
            Names::Diffusers
        } else {
            Names::Original
        };
        for target in [
            "diffusers",
            "comfyui",
            "lycoris",
            "kohya",
            "onetrainer",
            "onetrainer-other",
        ] {
            let (to, names) = match target {
                "onetrainer-other" => ("onetrainer", Some(other)),
                t => (t, None),
            };
            let out = tmp.path().join(format!("{label}.{target}"));
            let opts = ExportOptions {
                names,
                base: Some(&base),
                allow_lossy: false,
                zip: false,
            };
            let verdict = match run_to(&adapter, &out, find(to).unwrap(), &opts) {
                Err(e) => format!("error[{}]", e.category()),
                Ok(r) => format!(
                    "{}/{}/{}{}",
                    r.exact,
                    r.lossy,
                    r.impossible,
                    if r.refused.is_some() { " refused" } else { "" }
                ),
            };
            table.push_str(&format!("{label:<40} {target:<17} {verdict}\n"));
            if !out.exists() {
                continue;
            }
            let semantics = if to == "comfyui" {
                Semantics::ComfyUi
            } else {
                Semantics::Producer
            };
            let read = oftool::bake::load_adapter_with(&out, semantics).unwrap();
            let baked = tmp
                .path()
                .join(format!("{label}.{target}.baked.safetensors"));
            let input = BakeInput {
                label: out.display().to_string(),
                path: out.clone(),
                adapter: read,
                mode: Default::default(),
                runtime_strength: None,
                strength: None,
                params: Default::default(),
            };
            if let Err(e) = oftool::bake::merge(
                &base,
                vec![input],
                &baked,
                &MergeOptions::default(),
                &NoProgress,
            ) {
                failures.push(format!("{label} --to {target}: bake: {e}"));
                continue;
            }
            round_trips += 1;
            let got_all = all(&baked);
            for layer in case["layers"].as_array().unwrap() {
                let key = layer["base_key"].as_str().unwrap();
                let ((g, _, _), (w, _, wd)) = (&got_all[key], &want_all[key]);
                let (ratio, i) = worst(g, w, *wd);
                if ratio > 1.0 {
                    failures.push(format!(
                        "{label} --to {target} {key}: element {i}: {} vs reference {} ({ratio:.2}× tolerance)",
                        g[i], w[i]
                    ));
                    break;
                }
            }
        }
    }
    insta::assert_snapshot!("dit_convert_verdicts", table);
    assert!(round_trips >= 100, "only {round_trips} conversions written");
    assert!(
        failures.is_empty(),
        "{} problem(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Every file below `p` (or `p` itself), relative to `p`.
fn files_under(p: &std::path::Path) -> Vec<PathBuf> {
    if p.is_file() {
        return vec![PathBuf::new()];
    }
    let mut out = Vec::new();
    for e in std::fs::read_dir(p).unwrap() {
        let path = e.unwrap().path();
        let name = PathBuf::from(path.file_name().unwrap());
        out.extend(files_under(&path).into_iter().map(|f| {
            if f.as_os_str().is_empty() {
                name.clone()
            } else {
                name.join(f)
            }
        }));
    }
    out.sort();
    out
}

/// The real clients' checks of `convert` output (`fixtures/dit/clients/<case>.<layout>.json`,
/// written by `fixtures/clients_dit.py --oftool`: PEFT's `merge_and_unload` on the diffusers
/// `FluxTransformer2DModel`, ComfyUI's own loader on the fused Flux base): every recorded check
/// passed, oftool still writes the files the client loaded byte for byte, and oftool's bake of
/// them equals the client's merge.
#[test]
fn dit_client_checks_passed_and_still_hold() {
    use oftool::bake::{BakeInput, MergeOptions, NoProgress};
    let dir = repo().join("fixtures/dit/clients");
    let tmp = tempfile::tempdir().unwrap();
    let mut layouts = std::collections::BTreeSet::new();
    let mut failures = Vec::new();
    let mut records: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.ends_with(".json") && !n.ends_with(".report.json") && !n.ends_with(".selftest.json")
        })
        .collect();
    records.sort();
    for path in &records {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let record = read_json(path);
        if record["passed"] != true {
            failures.push(format!("{name}: the client check did not pass"));
            continue;
        }
        layouts.insert(record["layout"].as_str().unwrap().to_string());
        let cmd: Vec<String> = record["oftool"]["command"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        let o = cmd.iter().position(|a| a == "-o").expect("-o");
        let committed = repo().join(&cmd[o + 1]);
        let fresh = tmp.path().join(&name);
        let mut args = cmd[1..].to_vec();
        args[o] = fresh.to_string_lossy().to_string();
        args.retain(|a| a != "--json");
        let run = Command::cargo_bin("oftool")
            .unwrap()
            .current_dir(repo())
            .env("SOURCE_DATE_EPOCH", "0")
            .args(&args)
            .output()
            .unwrap();
        if !run.status.success() {
            failures.push(format!("{name}: {}", String::from_utf8_lossy(&run.stderr)));
            continue;
        }
        let (a, b) = (files_under(&committed), files_under(&fresh));
        if a != b {
            failures.push(format!("{name}: different file sets {a:?} vs {b:?}"));
            continue;
        }
        for f in &a {
            let at = |root: &std::path::Path| {
                if f.as_os_str().is_empty() {
                    root.to_path_buf()
                } else {
                    root.join(f)
                }
            };
            let x = std::fs::read(at(&committed)).unwrap();
            let y = std::fs::read(at(&fresh)).unwrap();
            if x != y {
                failures.push(format!(
                    "{name}: {} is no longer written byte for byte",
                    f.display()
                ));
            }
        }
        // oftool's bake of what the client loaded equals the client's merge.
        let case = repo()
            .join("fixtures/dit")
            .join(record["case"].as_str().unwrap());
        let base = case.join(read_json(&case.join("case.json"))["base"].as_str().unwrap());
        let semantics = if record["layout"] == "comfyui" {
            oftool::layouts::Semantics::ComfyUi
        } else {
            oftool::layouts::Semantics::Producer
        };
        let input = BakeInput {
            label: name.clone(),
            path: committed.clone(),
            adapter: oftool::bake::load_adapter_with(&committed, semantics).unwrap(),
            mode: Default::default(),
            runtime_strength: None,
            strength: None,
            params: Default::default(),
        };
        let baked = tmp.path().join(format!("{name}.baked.safetensors"));
        oftool::bake::merge(
            &base,
            vec![input],
            &baked,
            &MergeOptions::default(),
            &NoProgress,
        )
        .unwrap();
        let (got, client) = (
            all(&baked),
            all(&repo().join(record["merged"].as_str().unwrap())),
        );
        for (key, (w, _, wd)) in &client {
            let Some((g, _, _)) = got.get(key) else {
                failures.push(format!("{name}: the client's `{key}` is not in the base"));
                continue;
            };
            let (ratio, i) = worst(g, w, *wd);
            if ratio > 1.0 {
                failures.push(format!(
                    "{name} {key}: element {i}: oftool {} vs the client {} ({ratio:.2}× tolerance)",
                    g[i], w[i]
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} problem(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        layouts.contains("diffusers") && layouts.contains("comfyui"),
        "client checks for both clients: {layouts:?}"
    );
}
