//! `oftool convert --to <layout>`: every fixture written in every layout that can hold it, read
//! back, and compared with the source: exact conversions must give back the same canonical
//! rotation (bit-identical `Q`, which is what the `.oft` of either file stores), refusals must
//! say why and write nothing.

#[allow(unused_imports)]
use crate::common;

use crate::common::*;
use assert_cmd::Command;
use oftool::layouts;
use oftool::model::{Adapter, Layer};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Every layout `convert --to` writes besides `.oft`: the registry's writers.
fn foreign_layouts() -> Vec<&'static str> {
    layouts::writers().map(|(l, _)| l.id).collect()
}

fn oftool() -> Command {
    Command::cargo_bin("oftool").expect("binary built")
}

fn adapter_of(case: &Path) -> PathBuf {
    let dir = case.join("adapter");
    if dir.is_dir() {
        dir
    } else {
        case.join("adapter.safetensors")
    }
}

fn convert(args: &[&std::ffi::OsStr]) -> (i32, Value, String) {
    let out = oftool()
        .arg("convert")
        .args(args)
        .arg("--json")
        .output()
        .expect("runs");
    let report = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (
        out.status.code().unwrap_or(-1),
        report,
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn strip(name: &str) -> &str {
    name.strip_prefix("base_model.model.").unwrap_or(name)
}

fn layer<'a>(adapter: &'a Adapter, name: &str) -> Option<&'a Layer> {
    adapter
        .layers
        .iter()
        .find(|l| strip(&l.target.name) == strip(name))
}

/// Largest |a − b| over the stages' packed Q (None if the shapes differ).
fn q_diff(a: &Layer, b: &Layer) -> Option<f64> {
    if a.stages.len() != b.stages.len() || a.side != b.side {
        return None;
    }
    let mut worst = 0.0f64;
    for (sa, sb) in a.stages.iter().zip(&b.stages) {
        if sa.spec.block_size != sb.spec.block_size || sa.spec.map != sb.spec.map {
            return None;
        }
        // A shared block may come back expanded (LyCORIS/kohya have no sharing).
        let n = sa.q.len().max(sb.q.len());
        for k in 0..n {
            let x = sa.q[k % sa.q.len()];
            let y = sb.q[k % sb.q.len()];
            worst = worst.max((x - y).abs());
        }
    }
    Some(worst)
}

fn scale_diff(a: &Layer, b: &Layer) -> f64 {
    match (&a.row_scale, &b.row_scale) {
        (None, None) => 0.0,
        (Some((pa, x)), Some((pb, y))) if pa == pb => x
            .iter()
            .zip(y)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0, f64::max),
        _ => f64::INFINITY,
    }
}

#[test]
fn exact_conversions_round_trip_every_fixture() {
    let tmp = tempfile::tempdir().unwrap();
    let mut written = 0;
    let mut bit_exact = 0;
    let mut failures = Vec::new();
    for case in checked_cases() {
        let label = case.file_name().unwrap().to_string_lossy().to_string();
        let src_path = adapter_of(&case);
        let src = layouts::load(&src_path).unwrap_or_else(|e| panic!("{label}: {e}"));
        let base = case.join("base.safetensors");
        for to in foreign_layouts() {
            let out = tmp.path().join(format!("{label}.{to}"));
            let (code, report, stderr) = convert(&[
                src_path.as_os_str(),
                "--to".as_ref(),
                to.as_ref(),
                "-o".as_ref(),
                out.as_os_str(),
                "--base".as_ref(),
                base.as_os_str(),
            ]);
            if code != 0 {
                // A refusal names its reason for every layer it concerns, and writes nothing.
                assert_eq!(code, 1, "{label} → {to}: {stderr}");
                assert!(report["refused"].is_string(), "{label} → {to}: {stderr}");
                assert!(
                    !out.exists(),
                    "{label} → {to}: refused but wrote {}",
                    out.display()
                );
                for l in report["layers"].as_array().unwrap() {
                    if l["status"] != "exact" {
                        assert!(l["reason"].as_str().is_some_and(|r| r.len() > 10), "{l}");
                    }
                }
                continue;
            }
            written += 1;
            assert_eq!(
                report["lossy"], 0,
                "{label} → {to}: lossy without --allow-lossy"
            );
            let back = layouts::load(&out).unwrap_or_else(|e| panic!("{label} → {to}: {e}"));
            assert_eq!(back.layers.len(), src.layers.len(), "{label} → {to}");
            for (l, r) in src.layers.iter().zip(report["layers"].as_array().unwrap()) {
                let name = r["written_as"].as_str().expect("written_as");
                let Some(b) = layer(&back, name) else {
                    failures.push(format!("{label} → {to}: `{name}` not in the output"));
                    continue;
                };
                let dq = q_diff(l, b);
                let ds = scale_diff(l, b);
                // Stored parameters map exactly; values that are not binary32 (a pre-applied
                // clamp, a scaled-OFT division, an inverse Cayley) round once to it.
                let scale = l
                    .stages
                    .iter()
                    .flat_map(|s| &s.q)
                    .fold(0.0f64, |m, x| m.max(x.abs()));
                let rounded = l.stages.iter().any(|s| s.q_f64) || l.row_scale_f64;
                let tol = if rounded {
                    1e-6 * scale.max(1e-30)
                } else {
                    0.0
                };
                match dq {
                    Some(d) if d <= tol && ds <= 1e-6 => {
                        if d == 0.0 {
                            bit_exact += 1;
                        }
                    }
                    _ => failures.push(format!(
                        "{label} → {to}: `{}` came back different (ΔQ {dq:?}, Δscale {ds}, tol {tol})",
                        l.target.name
                    )),
                }
                // The report's own figure agrees.
                let fig = r["max_rotation_change"].as_f64().unwrap_or(0.0);
                assert!(
                    fig <= 1e-5,
                    "{label} → {to}: exact layer with rotation change {fig}"
                );
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(foreign_layouts().len() >= 5, "{:?}", foreign_layouts());
    assert!(written >= 20, "only {written} conversions were written");
    assert!(
        bit_exact > 100,
        "only {bit_exact} layers came back bit-exact"
    );
}

#[test]
fn peft_sources_come_back_byte_identical() {
    // PEFT ≥ 0.16 files store canonical parameters: `--to diffusers` must reproduce every
    // tensor byte for byte (COFT aside, which is pre-applied).
    let tmp = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for case in checked_cases() {
        let src = case.join("adapter");
        let cfg = src.join("adapter_config.json");
        if !cfg.is_file() {
            continue;
        }
        let cfg_v = read_json(&cfg);
        let old_series = cfg_v["use_cayley_neumann"] == true
            && !cfg_v["peft_version"].as_str().is_some_and(|v| {
                v.starts_with("0.18") || v.starts_with("0.19") || v.starts_with("0.2")
            });
        if cfg_v["coft"] == true || cfg_v.get("use_cayley_neumann").is_none() || old_series {
            continue;
        }
        let out = tmp.path().join(case.file_name().unwrap());
        oftool()
            .args(["convert", "--to", "peft", "-o"])
            .arg(&out)
            .arg(&src)
            .assert()
            .success();
        let a = std::fs::read(src.join("adapter_model.safetensors")).unwrap();
        let b = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
        let sa = safetensors::SafeTensors::deserialize(&a).unwrap();
        let sb = safetensors::SafeTensors::deserialize(&b).unwrap();
        let mut na = sa.names();
        let mut nb = sb.names();
        na.sort();
        nb.sort();
        assert_eq!(na, nb, "{}", case.display());
        for n in na {
            let (x, y) = (sa.tensor(n).unwrap(), sb.tensor(n).unwrap());
            assert_eq!(x.dtype(), y.dtype(), "{n}");
            assert_eq!(x.shape(), y.shape(), "{n}");
            assert_eq!(x.data(), y.data(), "{}: {n}", case.display());
        }
        let cb = read_json(&out.join("adapter_config.json"));
        for k in [
            "peft_type",
            "use_cayley_neumann",
            "num_cayley_neumann_terms",
            "block_share",
        ] {
            assert_eq!(cfg_v[k], cb[k], "{}: {k}", case.display());
        }
        checked += 1;
    }
    assert!(checked >= 8, "only {checked} PEFT cases");
}

#[test]
fn refusals_explain_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let lyco = cases_dir().join("lyco-unet-rescale/adapter.safetensors");
    let peft = cases_dir().join("peft-te-exact/adapter");

    // Output side → PEFT: impossible, names the way out.
    let out = tmp.path().join("x");
    let (code, report, stderr) = convert(&[
        lyco.as_os_str(),
        "--to".as_ref(),
        "diffusers".as_ref(),
        "-o".as_ref(),
        out.as_os_str(),
        "--base".as_ref(),
        cases_dir()
            .join("lyco-unet-rescale/base.safetensors")
            .as_os_str(),
    ]);
    assert_eq!(code, 1);
    assert!(stderr.contains("nothing was written"), "{stderr}");
    assert!(
        stderr.contains("output-side rotation is no input-side one"),
        "{stderr}"
    );
    assert!(stderr.contains("oftool merge"), "{stderr}");
    assert_eq!(
        report["impossible"].as_u64(),
        report["layers"].as_array().map(|l| l.len() as u64)
    );
    assert!(!out.exists());

    // ComfyUI ignores diag-oft rescale: lossy, refused without --allow-lossy.
    let out = tmp.path().join("c.safetensors");
    let (code, _, stderr) = convert(&[
        lyco.as_os_str(),
        "--to".as_ref(),
        "comfyui".as_ref(),
        "-o".as_ref(),
        out.as_os_str(),
    ]);
    assert_eq!(code, 1);
    assert!(stderr.contains("never applies it"), "{stderr}");
    assert!(stderr.contains("--allow-lossy"), "{stderr}");
    assert!(!out.exists());
    let (code, report, stderr) = convert(&[
        lyco.as_os_str(),
        "--to".as_ref(),
        "comfyui".as_ref(),
        "-o".as_ref(),
        out.as_os_str(),
        "--allow-lossy".as_ref(),
        "--base".as_ref(),
        cases_dir()
            .join("lyco-unet-rescale/base.safetensors")
            .as_os_str(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("ComfyUI ignores diag-oft `rescale`"),
        "{stderr}"
    );
    assert!(out.is_file());
    assert!(report["lossy"].as_u64().unwrap() > 0);
    // The dropped scale shows in the figures: scale change and merged-weight change.
    let l0 = &report["layers"][0];
    assert!(l0["max_scale_change"].as_f64().unwrap() > 1e-3, "{l0}");
    assert!(l0["max_weight_change"].as_f64().unwrap() > 1e-4, "{l0}");
    assert_eq!(l0["max_rotation_change"].as_f64(), Some(0.0), "{l0}");

    // Exact Cayley → the trainers' 5-term series: lossy, with the size of the change.
    let out = tmp.path().join("k.safetensors");
    let (code, report, _) = convert(&[
        peft.as_os_str(),
        "--to".as_ref(),
        "onetrainer".as_ref(),
        "-o".as_ref(),
        out.as_os_str(),
        "--allow-lossy".as_ref(),
    ]);
    assert_eq!(code, 0);
    let change = report["max_rotation_change"].as_f64().unwrap();
    assert!(change > 1e-9 && change < 0.5, "{change}");
    assert!(
        report["layers"][1]["reason"]
            .as_str()
            .unwrap()
            .contains("5-term Cayley–Neumann")
    );

    // An existing output directory is never overwritten.
    let dir = tmp.path().join("exists");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("keep.txt"), "x").unwrap();
    let (code, _, stderr) = convert(&[
        peft.as_os_str(),
        "--to".as_ref(),
        "diffusers".as_ref(),
        "-o".as_ref(),
        dir.as_os_str(),
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("already exists"), "{stderr}");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
}

#[test]
fn zip_packs_the_peft_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let peft = cases_dir().join("peft-unet-neumann5-b4/adapter");
    let out = tmp.path().join("adapter.zip");
    oftool()
        .args(["convert", "--to", "diffusers", "--zip", "-o"])
        .arg(&out)
        .arg(&peft)
        .assert()
        .success();
    let f = std::fs::File::open(&out).unwrap();
    let mut z = zip::ZipArchive::new(f).unwrap();
    let mut names: Vec<String> = (0..z.len())
        .map(|i| z.by_index(i).unwrap().name().unwrap().to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["adapter_config.json", "adapter_model.safetensors"]);
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(
        &mut z.by_name("adapter_model.safetensors").unwrap(),
        &mut bytes,
    )
    .unwrap();
    let orig = std::fs::read(peft.join("adapter_model.safetensors")).unwrap();
    let a = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let b = safetensors::SafeTensors::deserialize(&orig).unwrap();
    assert_eq!(a.len(), b.len());
    // --zip for a single-file layout is a usage error.
    oftool()
        .args(["convert", "--to", "comfyui", "--zip", "-o"])
        .arg(tmp.path().join("c.zip"))
        .arg(cases_dir().join("lyco-unet-plain/adapter.safetensors"))
        .assert()
        .code(2);
}

/// Write a bare PEFT-style OFT file (`base_model.model.<module>.oft_R.weight`, one block of b).
fn peft_like(path: &Path, modules: &[(String, usize)], b: usize) {
    let tri = b * (b - 1) / 2;
    let mut data: Vec<(String, Vec<u8>, Vec<usize>)> = Vec::new();
    for (i, (m, d)) in modules.iter().enumerate() {
        let rows = d / b;
        let vals: Vec<u8> = (0..rows * tri)
            .flat_map(|k| (0.01 * ((k * 7 + i) % 11) as f32 - 0.05).to_le_bytes())
            .collect();
        data.push((
            format!("base_model.model.{m}.oft_R.weight"),
            vals,
            vec![rows, tri],
        ));
    }
    let views: Vec<(&str, safetensors::Dtype, &[usize], &[u8])> = data
        .iter()
        .map(|(n, v, s)| {
            (
                n.as_str(),
                safetensors::Dtype::F32,
                s.as_slice(),
                v.as_slice(),
            )
        })
        .collect();
    let views: Vec<(&str, safetensors::tensor::TensorView<'_>)> = views
        .iter()
        .map(|(n, d, s, b)| {
            (
                *n,
                safetensors::tensor::TensorView::new(*d, s.to_vec(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

#[test]
fn names_follow_each_tool_for_an_sdxl_single_file_base() {
    // diffusers-named input-side layers of the tiny SDXL, against its sgm single-file base.
    let case = cases_dir().join("single-sdxl-lyco");
    let base = case.join("base.safetensors");
    let meta = read_json(&case.join("case.json"));
    let mut modules = Vec::new();
    let mut sgm = Vec::new();
    for l in meta["layers"].as_array().unwrap() {
        if l["component"] != "unet" || l["module"] != "linear" {
            continue;
        }
        let hf = l["hf_key"]
            .as_str()
            .unwrap()
            .trim_end_matches(".weight")
            .to_string();
        let key = l["base_key"].as_str().unwrap();
        let d = l["shape"][1].as_u64().unwrap() as usize;
        if !d.is_multiple_of(4) || modules.iter().any(|(m, _)| *m == hf) {
            continue;
        }
        sgm.push(
            key.trim_start_matches("model.diffusion_model.")
                .trim_end_matches(".weight")
                .replace('.', "_"),
        );
        modules.push((hf, d));
    }
    assert!(modules.len() >= 8, "{modules:?}");
    let tmp = tempfile::tempdir().unwrap();
    let unet = tmp.path().join("unet");
    std::fs::create_dir(&unet).unwrap();
    let src = unet.join("adapter_model.safetensors");
    peft_like(&src, &modules, 4);

    // kohya: sgm names (sd-scripts trains SDXL on its sgm U-Net).
    let k = tmp.path().join("k.safetensors");
    let (code, report, stderr) = convert(&[
        src.as_os_str(),
        "--to".as_ref(),
        "kohya".as_ref(),
        "-o".as_ref(),
        k.as_os_str(),
        "--base".as_ref(),
        base.as_os_str(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let written: Vec<String> = report["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["written_as"].as_str().unwrap().to_string())
        .collect();
    let mut expected: Vec<String> = sgm.iter().map(|s| format!("lora_unet_{s}")).collect();
    let mut got = written.clone();
    expected.sort();
    got.sort();
    assert_eq!(got, expected);

    // OneTrainer keeps diffusers names; both go back to the same PEFT names through the base.
    let o = tmp.path().join("o.safetensors");
    let (code, report_o, stderr) = convert(&[
        src.as_os_str(),
        "--to".as_ref(),
        "onetrainer".as_ref(),
        "-o".as_ref(),
        o.as_os_str(),
        "--base".as_ref(),
        base.as_os_str(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        report_o["layers"][0]["written_as"]
            .as_str()
            .unwrap()
            .starts_with("lora_unet_down_blocks_")
            || report_o["layers"][0]["written_as"]
                .as_str()
                .unwrap()
                .starts_with("lora_unet_mid_block")
            || report_o["layers"][0]["written_as"]
                .as_str()
                .unwrap()
                .starts_with("lora_unet_up_blocks")
    );
    let original = layouts::load(&src).unwrap();
    for (from, label) in [(&k, "kohya"), (&o, "onetrainer")] {
        let back_dir = tmp.path().join(format!("back-{label}"));
        let (code, _, stderr) = convert(&[
            from.as_os_str(),
            "--to".as_ref(),
            "diffusers".as_ref(),
            "-o".as_ref(),
            back_dir.as_os_str(),
            "--base".as_ref(),
            base.as_os_str(),
        ]);
        assert_eq!(code, 0, "{label}: {stderr}");
        let back = layouts::load(&back_dir).unwrap();
        let mut a: Vec<(&str, &Vec<f64>)> = original
            .layers
            .iter()
            .map(|l| (l.target.name.as_str(), &l.stages[0].q))
            .collect();
        let mut b: Vec<(&str, &Vec<f64>)> = back
            .layers
            .iter()
            .map(|l| (l.target.name.as_str(), &l.stages[0].q))
            .collect();
        a.sort_by(|x, y| x.0.cmp(y.0));
        b.sort_by(|x, y| x.0.cmp(y.0));
        assert_eq!(
            a, b,
            "{label}: names or values changed through the round trip"
        );
        assert!(back_dir.join("unet/adapter_config.json").is_file());
    }
}

#[test]
fn outputs_are_byte_identical_across_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let peft = cases_dir().join("peft-unet-neumann5-b4/adapter");
    let lyco = cases_dir().join("lyco-unet-constraint/adapter.safetensors");
    let te = cases_dir().join("peft-te-neumann/adapter");
    for (src, to, file) in [
        (&peft, "oft", "x.oft"),
        (&peft, "diffusers", "d/adapter_model.safetensors"),
        (&te, "kohya", "k.safetensors"),
        (&lyco, "comfyui", "c.safetensors"),
        (&lyco, "oft", "l.oft"),
    ] {
        let mut outs = Vec::new();
        for run in 0..2 {
            let root = tmp
                .path()
                .join(format!("{to}-{file}-{run}").replace('/', "_"));
            std::fs::create_dir(&root).unwrap();
            let target = root.join(file.split('/').next().unwrap());
            oftool()
                .env_remove("SOURCE_DATE_EPOCH")
                .args(["convert", "--to", to, "-o"])
                .arg(&target)
                .arg(src)
                .assert()
                .success();
            outs.push(std::fs::read(root.join(file)).unwrap());
            // The clock moves between the runs; the output must not.
            if run == 0 {
                std::thread::sleep(std::time::Duration::from_millis(1100));
            }
        }
        assert!(outs[0] == outs[1], "{to}: two runs differ");
    }
}
