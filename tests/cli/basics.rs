//! `inspect`, `validate` and `convert` on every fixture, through the binary.

#[allow(unused_imports)]
use crate::common;

use crate::common::*;
use assert_cmd::Command;
use serde_json::Value;

fn oftool() -> Command {
    Command::cargo_bin("oftool").expect("binary built")
}

fn json_of(args: &[&str], path: &std::path::Path) -> Value {
    let o = oftool().args(args).arg(path).output().unwrap();
    assert!(
        o.status.success(),
        "{args:?} {}: {}",
        path.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("JSON on stdout")
}

#[test]
fn convert_then_inspect_round_trips_the_layer_structure() {
    let tmp = tempfile::tempdir().unwrap();
    for dir in cases() {
        let case = read_json(&dir.join("case.json"));
        let label = dir.file_name().unwrap().to_string_lossy().to_string();
        let adapter = dir.join(case["adapter"].as_str().unwrap());
        let src = json_of(&["inspect", "--json"], &adapter);
        let oft = tmp.path().join(format!("{label}.oft"));
        let o = oftool()
            .arg("convert")
            .arg(&adapter)
            .arg("-o")
            .arg(&oft)
            .arg("--json")
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{label}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let back = json_of(&["inspect", "--json"], &oft);
        assert_eq!(back["layout"], "oft");
        assert_eq!(
            src["layers"], back["layers"],
            "{label}: layer structure changed through .oft"
        );
        assert_eq!(src["totals"], back["totals"], "{label}");
        let family = src["layout"]
            .as_str()
            .unwrap()
            .split('-')
            .next()
            .unwrap()
            .to_string();
        assert!(
            back["provenance"]["source_format"]
                .as_str()
                .is_some_and(|f| f.contains(&family)),
            "{label}: provenance names the source layout"
        );
        // The layer count and structure match what the library wrote.
        let layers = src["layers"].as_array().unwrap();
        assert_eq!(
            layers.len(),
            case["layers"].as_array().unwrap().len(),
            "{label}"
        );
        // Output rows: PEFT ≤ 0.13, LyCORIS, kohya legacy; input columns: everything since.
        let format = back["provenance"]["source_format"]
            .as_str()
            .unwrap()
            .to_string();
        let output_side =
            format.starts_with("lycoris") || format == "kohya-oft" || format == "peft-oft-0.7";
        for l in layers {
            let side = l["side"].as_str().unwrap();
            assert_eq!(
                side,
                if output_side { "output" } else { "input" },
                "{label}"
            );
            let orth = l["orthogonality_error"].as_f64().unwrap();
            let neumann = l["stages"][0]["map"]
                .as_str()
                .unwrap()
                .starts_with("neumann");
            // Exact Cayley rotations are orthogonal; PEFT's Neumann ones measurably not.
            if neumann {
                assert!(
                    orth > 1e-12,
                    "{label}: a Neumann block reports orthogonality error {orth}"
                );
            } else {
                assert!(
                    orth < 1e-12,
                    "{label}: a Cayley block reports orthogonality error {orth}"
                );
            }
        }
        // Human output: a table with one line per layer.
        let o = oftool().arg("inspect").arg(&oft).output().unwrap();
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(
            text.contains("largest angle") && text.lines().count() >= layers.len() + 4,
            "{label}: {text}"
        );
    }
}

#[test]
fn validate_every_fixture_against_its_base() {
    for dir in cases() {
        let case = read_json(&dir.join("case.json"));
        let label = dir.file_name().unwrap().to_string_lossy().to_string();
        let adapter = dir.join(case["adapter"].as_str().unwrap());
        let base = dir.join(case["base"].as_str().unwrap());
        let v = json_of(
            &["validate", "--json", "--base", base.to_str().unwrap()],
            &adapter,
        );
        assert_eq!(v["valid"], true, "{label}: {v}");
        assert_eq!(v["problems"].as_array().unwrap().len(), 0);
        oftool()
            .arg("validate")
            .arg(&adapter)
            .assert()
            .success()
            .stdout(predicates::str::contains("valid"));
    }
}

#[test]
fn constraint_use_is_reported() {
    // LyCORIS with a binding constraint: inspect shows usage 1.0 on clamped layers.
    let dir = cases_dir().join("lyco-unet-constraint");
    let case = read_json(&dir.join("case.json"));
    let v = json_of(&["inspect", "--json"], &dir.join("adapter.safetensors"));
    let layers = v["layers"].as_array().unwrap();
    let clamped: Vec<bool> = case["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["clamped"].as_bool().unwrap())
        .collect();
    let mut names: Vec<&str> = case["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["adapter_name"].as_str().unwrap())
        .collect();
    names.sort();
    assert!(clamped.iter().filter(|c| **c).count() >= 10);
    for l in layers {
        let c = &l["constraint"];
        let usage = c["usage"].as_f64().unwrap();
        assert!(usage <= 1.0 + 1e-9, "{l}");
        let i = case["layers"]
            .as_array()
            .unwrap()
            .iter()
            .position(|x| x["adapter_name"] == l["target"])
            .unwrap();
        if clamped[i] {
            assert!(
                (usage - 1.0).abs() < 1e-6,
                "clamped layer must sit on the radius: {usage}"
            );
        }
    }
}

#[test]
fn convert_can_bind_an_adapter_to_its_base() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = cases_dir().join("peft-unet-share");
    let adapter = dir.join("adapter");
    let base = dir.join("base.safetensors");
    let oft = tmp.path().join("bound.oft");
    oftool()
        .arg("convert")
        .arg(&adapter)
        .arg("-o")
        .arg(&oft)
        .arg("--base")
        .arg(&base)
        .assert()
        .success();
    let v = json_of(&["inspect", "--json"], &oft);
    for l in v["layers"].as_array().unwrap() {
        assert_eq!(l["base_binding"], true);
        // Shared PEFT blocks record no width; binding fills it from the base.
        assert!(l["rotated_dim"].as_u64().is_some(), "{l}");
    }
    let ok = json_of(
        &["validate", "--json", "--base", base.to_str().unwrap()],
        &oft,
    );
    assert_eq!(ok["valid"], true, "{ok}");
    // Another base (one element changed): validate reports the binding per layer.
    let other = tmp.path().join("other.safetensors");
    let f = crate::common::MappedFile::open(&base).unwrap();
    let st = f.tensors();
    let mut owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect();
    owned.sort_by(|a, b| a.0.cmp(&b.0));
    owned[0].3[1] ^= 0x10;
    let views: Vec<(String, safetensors::tensor::TensorView)> = owned
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::write(&other, safetensors::serialize(views, None).unwrap()).unwrap();
    let o = oftool()
        .arg("validate")
        .arg(&oft)
        .arg("--base")
        .arg(&other)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(out.matches("[binding]").count(), 1, "{out}");
}

/// A sharded copy of a fixture base: two shards, an index and a config file.
fn sharded_base(dir: &std::path::Path, base: &std::path::Path) -> std::path::PathBuf {
    use safetensors::tensor::TensorView;
    let f = crate::common::MappedFile::open(base).unwrap();
    let st = f.tensors();
    let mut all = st.tensors();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    let (first, second) = all.split_at(all.len() / 2);
    let out = dir.join("sharded");
    std::fs::create_dir(&out).unwrap();
    let mut weight_map = serde_json::Map::new();
    for (name, part) in [
        ("model-00001-of-00002.safetensors", first),
        ("model-00002-of-00002.safetensors", second),
    ] {
        let views: Vec<(String, TensorView)> = part.to_vec();
        std::fs::write(out.join(name), safetensors::serialize(views, None).unwrap()).unwrap();
        for (k, _) in part {
            weight_map.insert(k.clone(), Value::String(name.into()));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(out.join("model.safetensors.index.json"), index.to_string()).unwrap();
    std::fs::write(out.join("config.json"), "{}").unwrap();
    out
}

/// A diffusers pipeline folder with the U-Net and text encoder of two fixture cases.
fn pipeline(
    dir: &std::path::Path,
    unet: &std::path::Path,
    te: &std::path::Path,
) -> std::path::PathBuf {
    let pipe = dir.join("pipe");
    for (sub, file, src) in [
        ("unet", "diffusion_pytorch_model.safetensors", unet),
        ("text_encoder", "model.safetensors", te),
    ] {
        std::fs::create_dir_all(pipe.join(sub)).unwrap();
        std::fs::copy(src, pipe.join(sub).join(file)).unwrap();
        std::fs::write(pipe.join(sub).join("config.json"), "{}").unwrap();
    }
    std::fs::write(pipe.join("model_index.json"), "{}").unwrap();
    pipe
}

/// `validate --base`, `convert --base` and `compose --base` take every base `merge` takes: a
/// sharded folder, its index file, a diffusers pipeline folder (a directory base once failed
/// with "No such device").
#[test]
fn every_command_takes_a_sharded_or_pipeline_base() {
    let tmp = tempfile::tempdir().unwrap();
    let unet = cases_dir().join("peft-unet-f16");
    let te = cases_dir().join("peft-te-exact");
    let sharded = sharded_base(tmp.path(), &unet.join("base.safetensors"));
    let pipe = pipeline(
        tmp.path(),
        &unet.join("base.safetensors"),
        &te.join("base.safetensors"),
    );
    let index = sharded.join("model.safetensors.index.json");
    for (adapter, base) in [
        (unet.join("adapter"), &sharded),
        (unet.join("adapter"), &index),
        (unet.join("adapter"), &pipe),
        (te.join("adapter"), &pipe),
    ] {
        let what = format!("{} on {}", adapter.display(), base.display());
        let v = json_of(
            &["validate", "--json", "--base", base.to_str().unwrap()],
            &adapter,
        );
        assert_eq!(v["valid"], true, "{what}: {v}");
        // Bound to that base, the adapter validates and bakes against it.
        let oft = tmp.path().join("bound.oft");
        let _ = std::fs::remove_file(&oft);
        oftool()
            .arg("convert")
            .arg(&adapter)
            .arg("-o")
            .arg(&oft)
            .arg("--base")
            .arg(base)
            .assert()
            .success();
        let v = json_of(
            &["validate", "--json", "--base", base.to_str().unwrap()],
            &oft,
        );
        assert_eq!(v["valid"], true, "{what}: {v}");
        let out = tmp.path().join("merged");
        let _ = std::fs::remove_dir_all(&out);
        oftool()
            .arg("merge")
            .arg(base)
            .arg(&oft)
            .arg("-o")
            .arg(&out)
            .arg("-q")
            .assert()
            .success();
        let composed = tmp.path().join("composed.oft");
        let _ = std::fs::remove_file(&composed);
        let c = json_of(
            &[
                "compose",
                oft.to_str().unwrap(),
                "--base",
                base.to_str().unwrap(),
                "-o",
                composed.to_str().unwrap(),
                "--json",
            ],
            &adapter,
        );
        // Matched through the base, the two layers of each target compose into one.
        assert_eq!(c["stacked_targets"], 0, "{what}: {c}");
    }
}

/// `convert --base` records a layer on a row slice of a fused tensor (SDXL's OpenCLIP
/// `in_proj_weight`) in the base's terms: the fused tensor's name, the rows it covers, its full
/// shape, a binding of the whole tensor (format 1.2, `row-slices`); `validate --base` accepts
/// it and `merge` bakes it to the same bytes as the unbound adapter.
#[test]
fn validate_accepts_a_binding_to_a_fused_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = cases_dir().join("single-sdxl-lyco");
    let base = dir.join("base.safetensors");
    let oft = tmp.path().join("bound.oft");
    oftool()
        .arg("convert")
        .arg(dir.join("adapter.safetensors"))
        .arg("-o")
        .arg(&oft)
        .arg("--base")
        .arg(&base)
        .assert()
        .success();
    let v = json_of(
        &["validate", "--json", "--base", base.to_str().unwrap()],
        &oft,
    );
    assert_eq!(v["valid"], true, "{v}");
    let v = json_of(&["validate", "--json"], &oft);
    assert_eq!(v["valid"], true, "{v}");

    let f = crate::common::MappedFile::open(&oft).unwrap();
    assert_eq!(f.metadata["oft.version"], "1.2");
    let m: Value = serde_json::from_str(&f.metadata["oft.manifest"]).unwrap();
    assert_eq!(m["requires"], serde_json::json!(["row-slices"]));
    let fused = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj";
    let mut seen = Vec::new();
    for l in m["layers"].as_array().unwrap() {
        let t = &l["target"];
        assert_eq!(t["shape"], l["base_binding"]["shape"], "{l}");
        if t["name"].as_str().unwrap().ends_with(".attn.in_proj") {
            assert_eq!(t["shape"], serde_json::json!([72, 24]), "{l}");
            assert_eq!(t["component"], "text_encoder_2", "{l}");
            if t["name"] == fused {
                seen.push(t["rows"].clone());
            }
        } else {
            assert!(t.get("rows").is_none(), "{l}");
        }
    }
    seen.sort_by_key(|r| r[0][0].as_u64());
    assert_eq!(
        seen,
        [
            serde_json::json!([[0, 24]]),
            serde_json::json!([[24, 24]]),
            serde_json::json!([[48, 24]])
        ]
    );

    // Baking the bound file gives the bytes baking the adapter as imported gives.
    let a = tmp.path().join("a.safetensors");
    let b = tmp.path().join("b.safetensors");
    for (adapter, out) in [(dir.join("adapter.safetensors"), &a), (oft.clone(), &b)] {
        oftool()
            .arg("merge")
            .arg(&base)
            .arg(adapter)
            .arg("-o")
            .arg(out)
            .arg("--quiet")
            .assert()
            .success();
    }
    let (fa, fb) = (
        crate::common::MappedFile::open(&a).unwrap(),
        crate::common::MappedFile::open(&b).unwrap(),
    );
    let (ta, tb) = (fa.tensors(), fb.tensors());
    for name in ta.names() {
        assert_eq!(
            ta.tensor(name).unwrap().data(),
            tb.tensor(name).unwrap().data(),
            "{name}"
        );
    }

    // Other layouts name split modules: through the base, the rows become q/k/v again; without
    // it the conversion says why it cannot name them.
    let la = tmp.path().join("la.safetensors");
    let lb = tmp.path().join("lb.safetensors");
    for (adapter, out) in [(dir.join("adapter.safetensors"), &la), (oft.clone(), &lb)] {
        oftool()
            .arg("convert")
            .arg(adapter)
            .args(["--to", "lycoris", "--base"])
            .arg(&base)
            .arg("-o")
            .arg(out)
            .assert()
            .success();
    }
    let (fa, fb) = (
        crate::common::MappedFile::open(&la).unwrap(),
        crate::common::MappedFile::open(&lb).unwrap(),
    );
    let (sa, sb) = (fa.tensors(), fb.tensors());
    let (mut na, mut nb) = (sa.names(), sb.names());
    na.sort();
    nb.sort();
    assert_eq!(na, nb);
    let o = oftool()
        .arg("convert")
        .arg(&oft)
        .args(["--to", "lycoris", "-o"])
        .arg(tmp.path().join("lc.safetensors"))
        .assert()
        .failure()
        .get_output()
        .clone();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("cover rows of a fused weight"), "{err}");
}

/// A reader that goes away (`oftool inspect --json X | head -1`) ends the command quietly with
/// its own exit status, not a panic (exit 101).
#[test]
fn closed_stdout_ends_quietly() {
    use std::process::Stdio;
    let dir = cases_dir().join("single-sdxl-lyco");
    let adapter = dir.join("adapter.safetensors");
    let base = dir.join("base.safetensors");
    let bin = assert_cmd::cargo::cargo_bin("oftool");
    let runs: [&[&std::ffi::OsStr]; 3] = [
        &["inspect".as_ref(), "--json".as_ref(), adapter.as_os_str()],
        &["inspect".as_ref(), adapter.as_os_str()],
        &[
            "validate".as_ref(),
            "--json".as_ref(),
            adapter.as_os_str(),
            "--base".as_ref(),
            base.as_os_str(),
        ],
    ];
    for args in runs {
        let mut child = std::process::Command::new(&bin)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Close the read end before the command writes anything.
        drop(child.stdout.take());
        let o = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
    }
}
