//! The bridges through the real binary (issue #15): `convert --to lora` (ΔW of the exact bake as
//! a LoRA) and `extract` (a finetune as a block-diagonal rotation).

use crate::common::*;
use assert_cmd::Command;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn oftool() -> Command {
    Command::cargo_bin("oftool").expect("binary built")
}

/// Run oftool; return (exit code, stdout, stderr).
fn run(args: &[&str]) -> (i32, String, String) {
    let out = oftool().args(args).output().expect("runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `(case dir, adapter path, base path, merged path)` of every fixture case.
fn case_paths() -> Vec<(PathBuf, PathBuf, PathBuf, PathBuf)> {
    cases()
        .into_iter()
        .map(|dir| {
            let case = read_json(&dir.join("case.json"));
            let p = |k: &str| dir.join(case[k].as_str().expect(k));
            (dir.clone(), p("adapter"), p("base"), p("merged"))
        })
        .collect()
}

/// Row-major `up · down` (`rows × k` times `k × cols`), in f64 (faer: optimised even here).
fn product(up: &[f64], down: &[f64], rows: usize, k: usize) -> Vec<f64> {
    let cols = down.len().checked_div(k).unwrap_or(0);
    let mut out = vec![0.0; rows * cols];
    if k > 0 {
        let u = faer::MatRef::from_row_major_slice(up, rows, k);
        let d = faer::MatRef::from_row_major_slice(down, k, cols);
        let o = faer::MatMut::from_row_major_slice_mut(&mut out, rows, cols);
        faer::linalg::matmul::matmul(o, faer::Accum::Replace, u, d, 1.0, faer::Par::Seq);
    }
    out
}

/// Convert `adapter` to a LoRA in `layout`; the JSON report.
fn to_lora(
    adapter: &Path,
    base: &Path,
    out: &Path,
    layout: &str,
    rule: &[&str],
) -> serde_json::Value {
    let mut args = vec![
        "convert",
        s(adapter),
        "--to",
        "lora",
        "--base",
        s(base),
        "-o",
        s(out),
        "--layout",
        layout,
        "--json",
    ];
    args.extend_from_slice(rule);
    let (code, stdout, stderr) = run(&args);
    assert_eq!(code, 0, "{}: {stderr}", adapter.display());
    serde_json::from_str(&stdout).expect("JSON report")
}

/// The LoRA's `ΔW` per base tensor, from the written files (alpha / rank applied).
fn lora_deltas(out: &Path, layout: &str, report: &serde_json::Value) -> HashMap<String, Vec<f64>> {
    let mut deltas = HashMap::new();
    for l in report["layers"].as_array().expect("layers") {
        let Some(name) = l["written_as"].as_str() else {
            continue;
        };
        let key = l["tensor"].as_str().expect("tensor").to_string();
        let rows = l["shape"][0].as_u64().expect("shape") as usize;
        let rank = l["rank"].as_u64().expect("rank") as usize;
        let (up, down, scale) = match layout {
            "kohya" => {
                let (up, up_shape, _) = tensor(out, &format!("{name}.lora_up.weight"));
                let (down, down_shape, _) = tensor(out, &format!("{name}.lora_down.weight"));
                let (alpha, alpha_shape, _) = tensor(out, &format!("{name}.alpha"));
                assert!(alpha_shape.is_empty(), "{name}: alpha is a scalar");
                assert_eq!(up_shape[1], rank);
                assert_eq!(down_shape[0], rank);
                assert_eq!(alpha[0], rank as f64, "{name}: alpha = rank");
                (up, down, alpha[0] / rank as f64)
            }
            _ => {
                let file = match l["component"].as_str() {
                    Some(c) => out.join(c).join("adapter_model.safetensors"),
                    None => out.join("adapter_model.safetensors"),
                };
                let p = format!("base_model.model.{name}");
                let bytes = std::fs::read(&file).unwrap();
                let names: Vec<String> = safetensors::SafeTensors::deserialize(&bytes)
                    .unwrap()
                    .names()
                    .iter()
                    .map(|n| n.to_string())
                    .collect();
                if names.contains(&format!("{p}.lora_embedding_A")) {
                    // PEFT: ΔW = (B_e·A_e)ᵀ with A_e [k, num_embeddings], B_e [dim, k].
                    let (a, a_shape, _) = tensor(&file, &format!("{p}.lora_embedding_A"));
                    let (b, b_shape, _) = tensor(&file, &format!("{p}.lora_embedding_B"));
                    assert_eq!(a_shape[0], rank);
                    let (n, dim) = (a_shape[1], b_shape[0]);
                    let t = product(&b, &a, dim, rank);
                    let mut d = vec![0.0; n * dim];
                    for i in 0..dim {
                        for j in 0..n {
                            d[j * dim + i] = t[i * n + j];
                        }
                    }
                    deltas.insert(key, d);
                    continue;
                }
                let (a, a_shape, _) = tensor(&file, &format!("{p}.lora_A.weight"));
                let (b, _, _) = tensor(&file, &format!("{p}.lora_B.weight"));
                assert_eq!(a_shape[0], rank);
                (b, a, 1.0)
            }
        };
        let d: Vec<f64> = product(&up, &down, rows, rank)
            .into_iter()
            .map(|x| x * scale)
            .collect();
        deltas.insert(key, d);
    }
    deltas
}

/// `W + ΔW_lora`, rounded to the base dtype, equals the case's merged weights (the library's
/// own bake) within the fixtures' tolerance, for every tensor the LoRA writes.
fn check_full_rank(
    dir: &Path,
    base: &Path,
    merged: &Path,
    out: &Path,
    layout: &str,
    report: &serde_json::Value,
) {
    let deltas = lora_deltas(out, layout, report);
    assert!(!deltas.is_empty(), "{}: nothing written", dir.display());
    for (key, d) in &deltas {
        let (w, _, dtype) = tensor(base, key);
        let (want, _, _) = tensor(merged, key);
        let got: Vec<f64> = w.iter().zip(d).map(|(a, b)| a + b).collect();
        let (ratio, i) = worst(&round_to(&got, dtype), &want, dtype);
        assert!(
            ratio <= 1.0,
            "{} {layout} {key}: element {i}: W + B·A = {} vs merged {} ({ratio:.2}× the tolerance)",
            dir.display(),
            got[i],
            want[i]
        );
    }
}

#[test]
fn lora_at_full_rank_equals_the_exact_bake_for_every_fixture() {
    let tmp = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for (i, (dir, adapter, base, merged)) in case_paths().into_iter().enumerate() {
        // Each case in one layout, alternating (both layouts over the whole set, half the time).
        for layout in [["kohya", "peft"][i % 2]] {
            let out = tmp.path().join(format!("{i}-{layout}"));
            let mut args = vec![
                "convert",
                s(&adapter),
                "--to",
                "lora",
                "--base",
                s(&base),
                "-o",
                s(&out),
                "--layout",
                layout,
                "--json",
                "--rank",
                "100000",
            ];
            if layout == "kohya" {
                args.push("--threads");
                args.push("1");
            }
            let (code, stdout, stderr) = run(&args);
            if code != 0 {
                // PEFT names only what has a diffusers module (a fused text-encoder tensor has
                // none), kohya only diffusion pipelines (not an LLM): refused clearly.
                assert!(
                    (layout == "peft" && stderr.contains("fused"))
                        || (layout == "kohya" && stderr.contains("only for diffusion pipelines")),
                    "{} {layout}: {stderr}",
                    dir.display()
                );
                continue;
            }
            let report: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
            assert!(report["totals"]["rel_error"].as_f64().unwrap() < 1e-9);
            check_full_rank(&dir, &base, &merged, &out, layout, &report);
            checked += 1;
        }
    }
    assert!(checked >= 25, "only {checked} conversions checked");
}

#[test]
fn lora_rank_and_energy_rules_show_in_the_report_and_the_files() {
    let (_, adapter, base, _) = case_paths()
        .into_iter()
        .find(|(d, ..)| d.ends_with("peft-unet-exact-r"))
        .expect("case");
    let tmp = tempfile::tempdir().unwrap();

    // A fixed rank: every tensor gets min(K, rows, cols), the files hold exactly that.
    let out = tmp.path().join("r3.safetensors");
    let r = to_lora(&adapter, &base, &out, "kohya", &["--rank", "3"]);
    assert_eq!(r["rule"]["rank"], 3);
    for l in r["layers"].as_array().unwrap() {
        let shape: Vec<usize> = l["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        let short = shape[0].min(shape[1..].iter().product());
        assert_eq!(l["rank"].as_u64().unwrap() as usize, 3.min(short));
        let e = l["rel_error"].as_f64().unwrap();
        assert!((l["energy_kept"].as_f64().unwrap() - (1.0 - e * e)).abs() < 1e-12);
    }
    // The report's error is what the files give: ‖ΔW − B·A‖ from the stored factors.
    let deltas = lora_deltas(&out, "kohya", &r);
    assert_eq!(deltas.len(), r["layers"].as_array().unwrap().len());

    // An energy fraction: every layer keeps at least it, with the smallest such rank.
    let out = tmp.path().join("e.safetensors");
    let r = to_lora(&adapter, &base, &out, "kohya", &["--energy", "0.9"]);
    assert_eq!(r["rule"]["energy"], 0.9);
    let mut ranks = std::collections::BTreeSet::new();
    for l in r["layers"].as_array().unwrap() {
        assert!(l["energy_kept"].as_f64().unwrap() >= 0.9 - 1e-12, "{l}");
        ranks.insert(l["rank"].as_u64().unwrap());
    }
    assert!(ranks.len() > 1, "energy gives per-layer ranks: {ranks:?}");
    // One rank less would keep less than 0.9: compare with a fixed rank one lower.
    let out2 = tmp.path().join("e-1.safetensors");
    let capped = to_lora(
        &adapter,
        &base,
        &out2,
        "kohya",
        &["--energy", "0.9", "--max-rank", "2"],
    );
    for (a, b) in r["layers"]
        .as_array()
        .unwrap()
        .iter()
        .zip(capped["layers"].as_array().unwrap())
    {
        let (ka, kb) = (a["rank"].as_u64().unwrap(), b["rank"].as_u64().unwrap());
        assert_eq!(kb, ka.min(2), "{}", a["tensor"]);
        if ka > 2 {
            assert!(b["energy_kept"].as_f64().unwrap() < 0.9);
        }
    }
    // The table names the rule's result too.
    let out3 = tmp.path().join("t.safetensors");
    let (code, stdout, stderr) = run(&[
        "convert",
        s(&adapter),
        "--to",
        "lora",
        "--base",
        s(&base),
        "-o",
        s(&out3),
        "--layout",
        "kohya",
        "--rank",
        "2",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("rank ≤ 2") && stdout.contains("rel.error"),
        "{stdout}"
    );
}

#[test]
fn lora_output_is_the_same_for_any_thread_count() {
    let (_, adapter, base, _) = case_paths()
        .into_iter()
        .find(|(d, ..)| d.ends_with("peft-unet-exact-r"))
        .expect("case");
    let tmp = tempfile::tempdir().unwrap();
    let mut outs = Vec::new();
    for t in ["1", "2", "3"] {
        let out = tmp.path().join(format!("t{t}.safetensors"));
        let (code, _, stderr) = run(&[
            "convert",
            s(&adapter),
            "--to",
            "lora",
            "--base",
            s(&base),
            "-o",
            s(&out),
            "--layout",
            "kohya",
            "--rank",
            "5",
            "--threads",
            t,
        ]);
        assert_eq!(code, 0, "{stderr}");
        outs.push(std::fs::read(&out).unwrap());
    }
    assert_eq!(outs[0], outs[1]);
    assert_eq!(outs[0], outs[2]);
}

#[test]
fn lora_refuses_what_it_cannot_do_and_writes_nothing() {
    let (_, adapter, base, _) = case_paths()
        .into_iter()
        .find(|(d, ..)| d.ends_with("peft-unet-exact-r"))
        .expect("case");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.safetensors");
    let o = s(&out);
    let a = s(&adapter);
    let b = s(&base);
    for (args, needle) in [
        (vec!["convert", a, "--to", "lora", "-o", o], "needs --base"),
        (
            vec![
                "convert",
                a,
                "--to",
                "lora",
                "--base",
                b,
                "-o",
                o,
                "--allow-lossy",
            ],
            "no --allow-lossy",
        ),
        (
            vec![
                "convert", a, "--to", "lora", "--base", b, "-o", o, "--rank", "0",
            ],
            "at least 1",
        ),
        (
            vec![
                "convert", a, "--to", "lora", "--base", b, "-o", o, "--energy", "1.5",
            ],
            "outside [0, 1]",
        ),
        (
            vec![
                "convert", a, "--to", "peft", "--base", b, "-o", o, "--rank", "4",
            ],
            "--rank applies to --to lora",
        ),
        (
            vec![
                "convert", a, "--to", "lora", "--base", b, "-o", o, "--layout", "kohya", "--zip",
            ],
            "single file",
        ),
    ] {
        let (code, _, stderr) = run(&args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!out.exists(), "{args:?} left a file");
    }
    // --max-rank without --energy is a usage error from the parser.
    let (code, _, _) = run(&[
        "convert",
        a,
        "--to",
        "lora",
        "--base",
        b,
        "-o",
        o,
        "--max-rank",
        "4",
    ]);
    assert_eq!(code, 2);
}

fn extract_dir() -> PathBuf {
    repo().join("fixtures/extract")
}

/// Run `extract` with `extra` arguments; the JSON report (the command must succeed).
fn extract(base: &Path, tuned: &Path, out: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["extract", s(base), s(tuned), "-o", s(out), "--json"];
    args.extend_from_slice(extra);
    let (code, stdout, stderr) = run(&args);
    assert_eq!(code, 0, "{args:?}: {stderr}");
    serde_json::from_str(&stdout).expect("JSON report")
}

#[test]
fn extract_residual_equals_scipys_procrustes() {
    let dir = extract_dir();
    let expected = read_json(&dir.join("expected.json"));
    let tmp = tempfile::tempdir().unwrap();
    let (base, tuned) = (
        dir.join("base.safetensors"),
        dir.join("finetuned.safetensors"),
    );
    let cases = expected["cases"].as_array().unwrap();
    assert!(cases.len() >= 8);
    for (i, c) in cases.iter().enumerate() {
        // Every block's optimum is a rotation, which the Cayley map reaches.
        assert!(
            c["determinants"]
                .as_array()
                .unwrap()
                .iter()
                .all(|d| d.as_f64().unwrap() > 0.0)
        );
        let out = tmp.path().join(format!("{i}.oft"));
        let b = c["block_size"].to_string();
        let r = extract(
            &base,
            &tuned,
            &out,
            &[
                "--block-size",
                &b,
                "--side",
                c["side"].as_str().unwrap(),
                "--targets",
                c["tensor"].as_str().unwrap(),
            ],
        );
        let layers = r["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 1, "{c}");
        let l = &layers[0];
        assert_eq!(l["tensor"], c["tensor"]);
        assert_eq!(l["reflections"], 0);
        assert_eq!(l["capped_planes"], 0);
        for f in ["residual", "change", "residual_abs"] {
            let (got, want) = (l[f].as_f64().unwrap(), c[f].as_f64().unwrap());
            assert!(
                (got - want).abs() <= 1e-6,
                "{} {} b={b} {f}: oftool {got} vs SciPy {want}",
                c["tensor"],
                c["side"]
            );
        }
    }
}

#[test]
fn extracted_adapters_validate_bake_and_compose_like_any_other() {
    let dir = extract_dir();
    let tmp = tempfile::tempdir().unwrap();
    let (base, tuned) = (
        dir.join("base.safetensors"),
        dir.join("finetuned.safetensors"),
    );
    let out = tmp.path().join("all.oft");
    // Default targets: every weight of two or more axes that differs (b = 2 divides them all);
    // the unchanged matrix is counted, the 1-D norm weight never considered.
    let r = extract(
        &base,
        &tuned,
        &out,
        &["--block-size", "2", "--threads", "1"],
    );
    assert_eq!(r["totals"]["layers"], 4, "{r}");
    assert_eq!(r["totals"]["unchanged"], 1, "{r}");
    let t = r["totals"]["residual"].as_f64().unwrap();
    assert!(t > 0.0 && t < 1.0);
    // Same bytes for any thread count.
    let out2 = tmp.path().join("all2.oft");
    extract(
        &base,
        &tuned,
        &out2,
        &["--block-size", "2", "--threads", "2"],
    );
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&out2).unwrap());

    let (code, stdout, stderr) = run(&["validate", s(&out), "--base", s(&base)]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    // Baking it leaves exactly the reported residual.
    let merged = tmp.path().join("merged.safetensors");
    let (code, _, stderr) = run(&["merge", s(&base), s(&out), "-o", s(&merged), "--quiet"]);
    assert_eq!(code, 0, "{stderr}");
    for l in r["layers"].as_array().unwrap() {
        let key = l["tensor"].as_str().unwrap();
        let (w1, _, _) = tensor(&tuned, key);
        let (wm, _, _) = tensor(&merged, key);
        let res: f64 = w1
            .iter()
            .zip(&wm)
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f64>()
            .sqrt();
        let want = l["residual_abs"].as_f64().unwrap();
        assert!(
            (res - want).abs() <= 1e-5 * (1.0 + want),
            "{key}: baked residual {res} vs reported {want}"
        );
    }
    // Composes and converts.
    let twice = tmp.path().join("twice.oft");
    let (code, _, stderr) = run(&["compose", s(&out), s(&out), "-o", s(&twice)]);
    assert_eq!(code, 0, "{stderr}");
    let peft = tmp.path().join("peft");
    let (code, _, stderr) = run(&[
        "convert",
        s(&out),
        "--to",
        "peft",
        "--base",
        s(&base),
        "-o",
        s(&peft),
    ]);
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn extract_refuses_mismatched_checkpoints_and_bad_targets_and_writes_nothing() {
    let dir = extract_dir();
    let tmp = tempfile::tempdir().unwrap();
    let (base, tuned) = (
        dir.join("base.safetensors"),
        dir.join("finetuned.safetensors"),
    );
    let other = cases_dir().join("peft-unet-exact-r/base.safetensors");
    let out = tmp.path().join("x.oft");
    let o = s(&out);
    for (args, code, needle) in [
        (
            vec!["extract", s(&base), s(&other), "-o", o, "--block-size", "2"],
            1,
            "not the base's architecture",
        ),
        (
            vec![
                "extract",
                s(&base),
                s(&tuned),
                "-o",
                o,
                "--block-size",
                "2",
                "--targets",
                "[x",
            ],
            2,
            "not a glob",
        ),
        (
            vec![
                "extract",
                s(&base),
                s(&tuned),
                "-o",
                o,
                "--block-size",
                "2",
                "--targets",
                "nothing*",
            ],
            2,
            "matches no tensor",
        ),
        (
            vec![
                "extract",
                s(&base),
                s(&tuned),
                "-o",
                o,
                "--block-size",
                "5",
                "--targets",
                "*to_q*",
            ],
            1,
            "does not divide",
        ),
        (
            vec!["extract", s(&base), s(&tuned), "-o", o, "--block-size", "1"],
            2,
            "too small",
        ),
        (
            vec!["extract", s(&base), s(&base), "-o", o, "--block-size", "2"],
            1,
            "no weight to extract",
        ),
        (
            vec![
                "extract",
                s(&base),
                s(&tuned),
                "-o",
                s(&tuned),
                "--block-size",
                "2",
            ],
            2,
            "overwrite",
        ),
    ] {
        let (got, _, stderr) = run(&args);
        assert_eq!(got, code, "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!out.exists(), "{args:?} left a file");
    }
    // Without --targets, tensors the block size does not divide are skipped and reported.
    let r = extract(&base, &tuned, &out, &["--block-size", "8"]);
    let skipped = r["skipped"].as_array().unwrap();
    assert!(
        skipped
            .iter()
            .any(|s| s["reason"].as_str().unwrap().contains("does not divide")),
        "{r}"
    );
}

#[test]
fn merge_then_extract_recovers_every_single_stage_cayley_fixture() {
    use oftool::model::{RotationMap, Wiring};
    let tmp = tempfile::tempdir().unwrap();
    let mut recovered = 0;
    for (ci, (dir, adapter_path, base, _)) in case_paths().into_iter().enumerate() {
        let case = read_json(&dir.join("case.json"));
        if case["base_dtype"].as_str() != Some("f32") {
            continue;
        }
        let adapter = oftool::layouts::load(&adapter_path).unwrap();
        let mut per_key: HashMap<String, usize> = HashMap::new();
        let entries = case["layers"].as_array().unwrap();
        for e in entries {
            *per_key
                .entry(e["base_key"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
        // (side, b) → [(base key, layer index)] of the layers extraction must recover.
        let mut groups: std::collections::BTreeMap<(String, u64), Vec<(String, usize)>> =
            Default::default();
        for e in entries {
            let key = e["base_key"].as_str().unwrap();
            let name = e["adapter_name"].as_str().unwrap();
            let Some(i) = adapter.layers.iter().position(|l| {
                l.target.name == name
                    || l.target.name.ends_with(name)
                    || name.ends_with(&l.target.name)
            }) else {
                continue;
            };
            let l = &adapter.layers[i];
            let shape: Vec<usize> = e["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect();
            let (rows, cols) = (shape[0], shape[1..].iter().product::<usize>());
            let [st] = l.stages.as_slice() else { continue };
            let b = st.spec.block_size;
            let other = match l.side {
                oftool::model::Side::Input => rows,
                oftool::model::Side::Output => cols,
            };
            if per_key[key] != 1
                || e.get("rows").is_some()
                || st.spec.map != RotationMap::Cayley
                || st.spec.wiring != Wiring::Identity
                || l.row_scale
                    .as_ref()
                    .is_some_and(|(_, v)| v.iter().any(|&x| x != 1.0))
                || b as usize > other
                || b < 2
            {
                continue;
            }
            groups
                .entry((l.side.as_str().to_string(), b))
                .or_default()
                .push((key.to_string(), i));
        }
        if groups.is_empty() {
            continue;
        }
        let merged = tmp.path().join(format!("{ci}.safetensors"));
        let (code, _, stderr) = run(&[
            "merge",
            s(&base),
            s(&adapter_path),
            "-o",
            s(&merged),
            "--quiet",
        ]);
        assert_eq!(code, 0, "{}: {stderr}", dir.display());
        for ((side, b), members) in &groups {
            let out = tmp.path().join(format!("{ci}-{side}-{b}.oft"));
            let mut args = vec![
                "--block-size".to_string(),
                b.to_string(),
                "--side".into(),
                side.clone(),
                "--targets".into(),
            ];
            args.extend(members.iter().map(|(k, _)| k.clone()));
            let argv: Vec<&str> = args.iter().map(String::as_str).collect();
            let r = extract(&base, &merged, &out, &argv);
            let got = oftool::layouts::load(&out).unwrap();
            for (key, i) in members {
                let want = &adapter.layers[*i];
                let stem = key.strip_suffix(".weight").unwrap_or(key);
                let g = got
                    .layers
                    .iter()
                    .find(|l| l.target.name == stem)
                    .unwrap_or_else(|| panic!("{key}: not extracted: {r}"));
                let (sw, sg) = (&want.stages[0], &g.stages[0]);
                let axis = (sg.stored_blocks() * *b) as usize;
                let pw = oftool::apply::PreparedStage::<f64>::new(sw, axis).unwrap();
                let pg = oftool::apply::PreparedStage::<f64>::new(sg, axis).unwrap();
                let (bw, bg) = (pw.blocks(), pg.blocks());
                let mut worst = 0.0f64;
                for k in 0..bg.len() {
                    let rw = &bw[k.min(bw.len() - 1)];
                    for (x, y) in rw.iter().zip(&bg[k]) {
                        worst = worst.max((x - y).abs());
                    }
                }
                assert!(
                    worst <= 1e-5,
                    "{} {key}: R recovered to {worst:.2e}",
                    dir.display()
                );
                recovered += 1;
            }
        }
    }
    assert!(recovered >= 50, "only {recovered} layers recovered");
}

/// Every file below `p` (or `p` itself) with its bytes, relative to `p`.
fn file_bytes(p: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    if p.is_file() {
        return vec![(PathBuf::new(), std::fs::read(p).unwrap())];
    }
    let mut out = Vec::new();
    for e in std::fs::read_dir(p).unwrap() {
        let path = e.unwrap().path();
        let name = PathBuf::from(path.file_name().unwrap());
        for (f, b) in file_bytes(&path) {
            out.push((name.join(f), b));
        }
    }
    out.sort();
    out
}

/// fixtures/clients/lora/: LoRAs that PEFT (`merge_and_unload`) and ComfyUI (`load_lora` +
/// `calculate_weight`) merged to W + B·A, and at full rank to the exact bake
/// (fixtures/clients_lora.py). oftool must still write them byte for byte.
#[test]
fn lora_files_are_what_peft_and_comfyui_loaded() {
    let dir = repo().join("fixtures/clients/lora");
    let tmp = tempfile::tempdir().unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if !name.ends_with(".json") {
            continue;
        }
        let record = read_json(&path);
        assert_eq!(record["passed"], true, "{name}: the client check failed");
        seen.insert(record["client"]["name"].as_str().unwrap().to_string());
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
        let run = oftool()
            .current_dir(repo())
            .env("SOURCE_DATE_EPOCH", "0")
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(
            run.status.code(),
            Some(0),
            "{name}: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        assert!(
            file_bytes(&committed) == file_bytes(&fresh),
            "{name}: oftool now writes other bytes"
        );
    }
    assert!(
        seen.contains("peft") && seen.contains("ComfyUI"),
        "{seen:?}"
    );
}
