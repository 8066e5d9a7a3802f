//! The conformance cases (`fixtures/conformance/`, issue #12): adapters at the edges of what the
//! producers write (block size 1, PEFT 0.13 with `out % r != 0`, BOFT by block count), made and
//! merged by the libraries themselves. Every case is either checked like the `fixtures/cases/`
//! ones (`common::checked_cases()` feeds the fixture, merge and convert tests) or a known gap
//! (`common::KNOWN_GAPS`), refused with its reason; this module checks the second half.

#[allow(unused_imports)]
use crate::common;

use crate::common::*;
use assert_cmd::Command;
use oftool::apply::{Matrix, apply_layer};
use oftool::layouts;
use serde_json::Value;

/// The first error importing a case, or baking its layers onto its base in memory, gives.
fn first_error(dir: &std::path::Path) -> Option<String> {
    let case = read_json(&dir.join("case.json"));
    let adapter = match layouts::load(&dir.join(case["adapter"].as_str().unwrap())) {
        Ok(a) => a,
        Err(e) => return Some(e.to_string()),
    };
    let base = dir.join(case["base"].as_str().unwrap());
    for l in case["layers"].as_array().unwrap() {
        let name = l["adapter_name"].as_str().unwrap();
        let short = name.strip_prefix("base_model.model.").unwrap_or(name);
        let layer = adapter
            .layers
            .iter()
            .find(|x| x.target.name == short)
            .unwrap_or_else(|| panic!("{}: no layer {short}", dir.display()));
        let (w, shape, _) = tensor(&base, l["base_key"].as_str().unwrap());
        let mut m = Matrix::from_shape(&shape, w).unwrap();
        if let Err(e) = apply_layer(layer, &mut m) {
            return Some(e.to_string());
        }
    }
    None
}

#[test]
fn every_conformance_case_is_checked_or_a_known_gap() {
    let all = conformance_cases();
    assert!(
        all.len() >= 14,
        "expected the conformance cases, found {}",
        all.len()
    );
    for (gap, _) in KNOWN_GAPS {
        assert!(
            all.iter().any(|d| d.ends_with(gap)),
            "KNOWN_GAPS names `{gap}`, which is not a conformance case"
        );
    }
    let checked = checked_cases();
    for d in &all {
        assert!(
            known_gap(d).is_some() || checked.contains(d),
            "{} is neither checked nor a known gap",
            d.display()
        );
    }
}

#[test]
fn known_gaps_are_refused_with_their_reason() {
    let tmp = tempfile::tempdir().unwrap();
    for dir in conformance_cases() {
        let Some(why) = known_gap(&dir) else { continue };
        let label = dir.file_name().unwrap().to_string_lossy().to_string();
        let err = first_error(&dir).unwrap_or_else(|| {
            panic!("{label} imports and bakes now: take it off KNOWN_GAPS (tests/cli/common.rs)")
        });
        assert!(
            err.contains(why),
            "{label}: refused with `{err}`, expected `{why}`"
        );
        // The binary refuses it too, with a non-zero exit, and writes nothing.
        let case = read_json(&dir.join("case.json"));
        let out = tmp.path().join(format!("{label}.safetensors"));
        let o = Command::cargo_bin("oftool")
            .unwrap()
            .arg("merge")
            .arg(dir.join(case["base"].as_str().unwrap()))
            .arg(dir.join(case["adapter"].as_str().unwrap()))
            .arg("-o")
            .arg(&out)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1), "{label}");
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(stderr.contains(why), "{label}: {stderr}");
        assert!(!out.exists(), "{label}: refused but wrote its output");
    }
}

/// Rewrite the manifest of `.oft` `src` into `dst` through `edit` (the digest is left stale:
/// the manifest rules are checked before it).
fn with_manifest(src: &std::path::Path, dst: &std::path::Path, edit: impl FnOnce(&mut Value)) {
    let file = crate::common::MappedFile::open(src).unwrap();
    let mut meta = file.metadata.clone();
    let mut m: Value = serde_json::from_str(&meta["oft.manifest"]).unwrap();
    edit(&mut m);
    meta.insert("oft.manifest".into(), m.to_string());
    let st = file.tensors();
    let views = st.tensors();
    std::fs::write(dst, safetensors::serialize(views, Some(meta)).unwrap()).unwrap();
}

#[test]
fn unit_blocks_are_format_1_2_and_only_where_used() {
    let tmp = tempfile::tempdir().unwrap();
    // LyCORIS with b = 1 on 39 layers: a 1.2 file requiring `unit-blocks`, q stored as [N, 0].
    let src = conformance_dir().join("lyco-b1-unet/adapter.safetensors");
    let adapter = layouts::load(&src).unwrap();
    let out = tmp.path().join("b1.oft");
    oftool::oft_file::write(&adapter, &out).unwrap();
    let file = crate::common::MappedFile::open(&out).unwrap();
    assert_eq!(file.metadata["oft.version"], "1.2");
    let m: Value = serde_json::from_str(&file.metadata["oft.manifest"]).unwrap();
    assert_eq!(m["requires"], serde_json::json!(["unit-blocks"]));
    let conv_out = m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .position(|l| l["target"]["name"] == "lora_unet_conv_out")
        .expect("conv_out layer");
    let q = file
        .tensors()
        .tensor(&format!("layers.{conv_out}.stages.0.q"))
        .unwrap()
        .shape()
        .to_vec();
    assert_eq!(q, vec![4, 0]);
    // Without the feature the same file is refused, naming it.
    let bad = tmp.path().join("no-feature.oft");
    with_manifest(&out, &bad, |m| {
        m["requires"] = serde_json::json!([]);
    });
    let e = oftool::oft_file::read_unverified(&bad)
        .map(|_| ())
        .expect_err("block size 1 without unit-blocks");
    assert!(e.to_string().contains("unit-blocks"), "{e}");
    // A block size of 0 is never a partition.
    let zero = tmp.path().join("zero.oft");
    with_manifest(&out, &zero, |m| {
        m["layers"][conv_out]["stages"][0]["block_size"] = 0.into();
    });
    let e = oftool::oft_file::read_unverified(&zero)
        .map(|_| ())
        .expect_err("block size 0");
    assert!(e.to_string().contains("not a partition"), "{e}");
    // An adapter without b = 1 is still written as 1.0.
    let plain =
        layouts::load(&conformance_dir().join("peft-boft-blocknum-uniform/adapter")).unwrap();
    let out2 = tmp.path().join("plain.oft");
    oftool::oft_file::write(&plain, &out2).unwrap();
    let file = crate::common::MappedFile::open(&out2).unwrap();
    assert_eq!(file.metadata["oft.version"], "1.0");
}

#[test]
fn peft_boft_round_trips_through_oft_with_its_sizing() {
    // PEFT BOFT → .oft → PEFT (`--to diffusers`): the config keeps the factor count and says
    // the block size (`boft_block_size`) or, where the layers differ in size but share a count,
    // the block count (`boft_block_num`); the written directory merges to the library's result.
    let tmp = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for dir in cases().into_iter().chain(conformance_cases()) {
        let src = dir.join("adapter");
        let cfg = src.join("adapter_config.json");
        if !cfg.is_file() || read_json(&cfg)["peft_type"] != "BOFT" {
            continue;
        }
        let label = dir.file_name().unwrap().to_string_lossy().to_string();
        let oft = tmp.path().join(format!("{label}.oft"));
        let out = tmp.path().join(&label);
        let base = dir.join("base.safetensors");
        Command::cargo_bin("oftool")
            .unwrap()
            .arg("convert")
            .arg(&src)
            .arg("-o")
            .arg(&oft)
            .assert()
            .success();
        Command::cargo_bin("oftool")
            .unwrap()
            .args(["convert", "--to", "diffusers", "--base"])
            .arg(&base)
            .arg("-o")
            .arg(&out)
            .arg(&oft)
            .assert()
            .success();
        let (a, b) = (read_json(&cfg), read_json(&out.join("adapter_config.json")));
        for k in [
            "boft_block_size",
            "boft_block_num",
            "boft_n_butterfly_factor",
        ] {
            assert_eq!(a[k], b[k], "{label}: {k}");
        }
        let back = layouts::load(&out).unwrap();
        crate::fixtures::check_case(&dir, &back, &format!("{label} (PEFT → .oft → PEFT)"))
            .unwrap_or_else(|e| panic!("{e}"));
        checked += 1;
    }
    assert!(checked >= 5, "only {checked} BOFT cases");
}

#[test]
fn peft_boft_without_one_size_or_count_is_refused_by_layer() {
    // Two layers with different block sizes and block counts: neither setting says both.
    let src = conformance_dir().join("peft-boft-blocknum/adapter");
    let mut a = layouts::load(&src).unwrap();
    let keep = |l: &oftool::model::Layer| l.stages[0].spec.block_size;
    let (i, j) = (
        a.layers.iter().position(|l| keep(l) == 1).unwrap(),
        a.layers.iter().position(|l| keep(l) == 9).unwrap(),
    );
    // Re-partition layer j's axis (72) into 36 blocks of 2: neither size 1 nor count 8.
    let l = &mut a.layers[j];
    l.stages[0].spec.blocks = Some(36);
    l.stages[0].spec.block_size = 2;
    l.stages[0].q = vec![0.01; 36];
    let tmp = tempfile::tempdir().unwrap();
    let oft = tmp.path().join("mixed.oft");
    oftool::oft_file::write(&a, &oft).unwrap();
    let out = tmp.path().join("peft");
    let o = Command::cargo_bin("oftool")
        .unwrap()
        .args(["convert", "--to", "diffusers", "--json", "--base"])
        .arg(conformance_dir().join("peft-boft-blocknum/base.safetensors"))
        .arg("-o")
        .arg(&out)
        .arg(&oft)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let report: Value = serde_json::from_slice(&o.stdout).unwrap();
    let reason = report["layers"][j]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("neither one block size nor one block count"),
        "{report}"
    );
    assert_eq!(report["layers"][i]["status"], "exact", "{report}");
    assert!(!out.exists());
}

fn oftool() -> Command {
    Command::cargo_bin("oftool").unwrap()
}

#[test]
fn truncated_layers_are_reported_not_orthogonal_with_the_cut_error() {
    // PEFT 0.13.2 with out % r != 0: bound to its base, each layer whose cut falls inside a
    // block is `truncated`, and inspect reports the cut matrix's ‖DᵀD − I‖_F, which
    // generate_conformance.py recorded from PEFT's own tensors.
    let tmp = tempfile::tempdir().unwrap();
    for label in [
        "peft013-unet-uneven",
        "peft013-unet-uneven-share",
        "peft013-unet-r5",
    ] {
        let dir = conformance_dir().join(label);
        let oft = tmp.path().join(format!("{label}.oft"));
        oftool()
            .arg("convert")
            .arg(dir.join("adapter"))
            .arg("--base")
            .arg(dir.join("base.safetensors"))
            .arg("-o")
            .arg(&oft)
            .assert()
            .success();
        let file = crate::common::MappedFile::open(&oft).unwrap();
        let o = oftool()
            .args(["inspect", "--json"])
            .arg(&oft)
            .output()
            .unwrap();
        assert!(o.status.success());
        let report: Value = serde_json::from_slice(&o.stdout).unwrap();
        let case = read_json(&dir.join("case.json"));
        let mut cut = 0;
        for l in case["layers"].as_array().unwrap() {
            let name = l["adapter_name"].as_str().unwrap();
            let name = name.strip_prefix("base_model.model.").unwrap();
            let r = report["layers"]
                .as_array()
                .unwrap()
                .iter()
                .find(|x| x["target"] == name)
                .unwrap();
            let inside = l["partial_block_size"].as_u64().unwrap() > 0;
            assert_eq!(
                r["stages"][0]["truncated"] == true,
                inside,
                "{label} {name}"
            );
            if inside {
                cut += 1;
                let want = l["cut_RtR_minus_I_fro"].as_f64().unwrap();
                let got = r["orthogonality_error"].as_f64().unwrap();
                assert!((got - want).abs() < 1e-9, "{label} {name}: {got} vs {want}");
                let why = r["not_orthogonal"].as_str().unwrap();
                assert!(why.contains("truncated") && why.contains("corner"), "{why}");
            } else {
                assert!(r.get("not_orthogonal").is_none(), "{label} {name}");
            }
        }
        assert!(cut > 0, "{label}: no layer cut inside a block");
        // Only files that keep a cut need format 1.2 `truncated-blocks`.
        assert_eq!(file.metadata["oft.version"], "1.2", "{label}");
        let text = oftool().arg("inspect").arg(&oft).output().unwrap();
        let text = String::from_utf8_lossy(&text.stdout);
        assert!(
            text.contains("cut") && text.contains("not orthogonal"),
            "{text}"
        );
        // Without the base the cut is unknown; inspect says so.
        let o = oftool()
            .args(["inspect", "--json"])
            .arg(dir.join("adapter"))
            .output()
            .unwrap();
        let unbound: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert!(
            unbound["layers"][0]["not_orthogonal"]
                .as_str()
                .is_some_and(|w| w.contains("does not record")),
            "{unbound}"
        );
    }
}

#[test]
fn truncated_layers_convert_only_to_oft_and_have_no_strength() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = conformance_dir().join("peft013-unet-uneven");
    let base = dir.join("base.safetensors");
    for to in ["lycoris", "kohya", "comfyui"] {
        let out = tmp.path().join(format!("x.{to}.safetensors"));
        let o = oftool()
            .args(["convert", "--json", "--to", to, "--base"])
            .arg(&base)
            .arg("-o")
            .arg(&out)
            .arg(dir.join("adapter"))
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1), "{to}");
        let report: Value = serde_json::from_slice(&o.stdout).unwrap();
        let first = &report["layers"][0];
        assert_eq!(first["status"], "impossible", "{to}: {report}");
        assert!(
            first["reason"]
                .as_str()
                .is_some_and(|r| r.contains("not orthogonal") && r.contains("inside a block")),
            "{to}: {first}"
        );
        assert!(!out.exists());
    }
    // A strength other than 1 (and unmerge) would need a power of the cut matrix.
    let out = tmp.path().join("half.safetensors");
    let o = oftool()
        .arg("merge")
        .arg(&base)
        .arg(format!("{}:0.5", dir.join("adapter").display()))
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no strength 0.5"));
    assert!(!out.exists());
    // Where every cut falls on a block boundary, the layer is an ordinary one: r5's out-8 and
    // out-16 layers merge at any strength once the base is known.
    let r5 = conformance_dir().join("peft013-unet-r5");
    let mut a = layouts::load(&r5.join("adapter")).unwrap();
    let b = oftool::base::Base::open(&r5.join("base.safetensors")).unwrap();
    oftool::bake::resolve_truncation(&mut a, &b);
    let l = a
        .layers
        .iter()
        .find(|l| l.target.name == "conv_in")
        .unwrap();
    assert!(!l.stages[0].spec.truncated);
    assert_eq!(l.stages[0].spec.blocks, Some(4));
    oftool::strength::adapter_power(
        &oftool::model::Adapter {
            layers: vec![l.clone()],
            ..a.clone()
        },
        0.5,
    )
    .unwrap();
}

#[test]
fn truncated_stages_are_refused_where_the_spec_forbids_them() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = conformance_dir().join("peft013-unet-uneven");
    let good = tmp.path().join("good.oft");
    oftool()
        .arg("convert")
        .arg(dir.join("adapter"))
        .arg("--base")
        .arg(dir.join("base.safetensors"))
        .arg("-o")
        .arg(&good)
        .assert()
        .success();
    oftool::oft_file::read(&good).unwrap();
    type Edit = fn(&mut Value);
    let cases: [(&str, Edit, &str); 4] = [
        (
            "no feature",
            |m| m["requires"] = serde_json::json!([]),
            "`truncated-blocks` feature",
        ),
        (
            "butterfly",
            |m| {
                m["layers"][0]["stages"][0]["wiring"] =
                    serde_json::json!({"kind": "butterfly", "producer": "peft", "index": 0})
            },
            "identity wiring",
        ),
        (
            "narrower than the axis",
            |m| m["layers"][0]["target"]["rotated_dim"] = 10.into(),
            "r·b ≥ rotated_dim",
        ),
        (
            "no block count",
            |m| {
                m["layers"][0]["stages"][0]["blocks"] = Value::Null;
                m["layers"][0]["stages"][0]["shared"] = true.into();
            },
            "needs a block count",
        ),
    ];
    for (what, edit, needle) in cases {
        let bad = tmp.path().join("bad.oft");
        with_manifest(&good, &bad, edit);
        let e = oftool::oft_file::read_unverified(&bad)
            .map(|_| ())
            .expect_err(what);
        assert!(e.to_string().contains(needle), "{what}: {e}");
    }
}

#[test]
fn conversion_verdicts_at_the_edges() {
    // (case, --to, exact, lossy, impossible) with the base given. Blocks of size 1 convert
    // wherever the side and map allow; a cut inside a block converts nowhere but `.oft`.
    let table: &[(&str, &str, u64, u64, u64)] = &[
        ("lyco-b1-unet", "lycoris", 61, 0, 0),
        ("lyco-b1-unet", "comfyui", 0, 61, 0), // ComfyUI ignores diag-oft `rescale`
        ("lyco-b1-unet", "peft", 0, 0, 61),    // output side
        ("kohya-oft-unet-b1", "kohya", 36, 0, 0),
        ("kohya-oft-unet-b1", "lycoris", 36, 0, 0),
        ("kohya-oft-unet-b1", "comfyui", 36, 0, 0),
        ("peft-unet-r8-b1", "peft", 46, 0, 0),
        ("peft-unet-r8-b1", "onetrainer", 46, 0, 0),
        ("peft-unet-r8-b1", "kohya", 46, 0, 0),
        ("onetrainer-unet-b1", "peft", 44, 0, 0),
        ("onetrainer-unet-b1", "onetrainer", 44, 0, 0),
        ("peft-boft-blocknum", "peft", 44, 0, 0),
        ("peft-boft-blocknum", "onetrainer", 0, 44, 0), // 5-term series
        ("peft013-unet-r5", "lycoris", 43, 0, 3),       // 3 layers cut inside a block
        ("peft013-unet-r5", "comfyui", 43, 0, 3),
        ("peft013-unet-uneven", "lycoris", 1, 0, 45), // only conv_out's cut drops a whole block
        ("peft013-unet-uneven", "peft", 0, 0, 46),
    ];
    let tmp = tempfile::tempdir().unwrap();
    for (case, to, exact, lossy, impossible) in table {
        let dir = conformance_dir().join(case);
        let adapter = [dir.join("adapter"), dir.join("adapter.safetensors")]
            .into_iter()
            .find(|p| p.exists())
            .unwrap();
        let out = tmp.path().join(format!("{case}.{to}"));
        let o = oftool()
            .args(["convert", "--json", "--to", to, "--base"])
            .arg(dir.join("base.safetensors"))
            .arg("-o")
            .arg(&out)
            .arg(&adapter)
            .output()
            .unwrap();
        let r: Value = serde_json::from_slice(&o.stdout).unwrap();
        let got = (&r["exact"], &r["lossy"], &r["impossible"]);
        assert_eq!(
            got,
            (&(*exact).into(), &(*lossy).into(), &(*impossible).into()),
            "{case} → {to}: {}",
            r["refused"]
        );
        assert_eq!(o.status.success(), lossy + impossible == 0, "{case} → {to}");
        assert_eq!(out.exists(), lossy + impossible == 0, "{case} → {to}");
    }
}
