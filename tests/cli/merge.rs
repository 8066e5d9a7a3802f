//! `oftool merge` end to end: the real binary on the real fixtures, compared with the merged
//! weights PEFT and LyCORIS computed; single files, sharded checkpoints and diffusers folders.

#[allow(unused_imports)]
use crate::common;

use crate::common::*;
use assert_cmd::Command;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn oftool() -> Command {
    Command::cargo_bin("oftool").expect("binary built")
}

/// All tensors of a safetensors file as (dtype, shape, bytes).
fn raw(path: &Path) -> HashMap<String, (Dtype, Vec<usize>, Vec<u8>)> {
    let f = crate::common::MappedFile::open(path).unwrap();
    f.tensors()
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect()
}

fn write_raw(
    path: &Path,
    t: &HashMap<String, (Dtype, Vec<usize>, Vec<u8>)>,
    meta: Option<HashMap<String, String>>,
) {
    let views: Vec<(String, TensorView)> = t
        .iter()
        .map(|(n, (d, s, b))| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, meta).unwrap()).unwrap();
}

/// An untouched tensor added to every test base: it must come out bit-identical.
fn add_untouched(t: &mut HashMap<String, (Dtype, Vec<usize>, Vec<u8>)>) {
    let bytes: Vec<u8> = (0..64u32)
        .flat_map(|i| (i as f32 * 0.37).to_le_bytes())
        .collect();
    t.insert(
        "extra.untouched.weight".into(),
        (Dtype::F32, vec![8, 8], bytes),
    );
}

/// Compare every key of `expected` (a fixture's merged file) with `got`, per the tolerance.
fn compare(label: &str, got: &Path, expected: &Path, keys_in: Option<&str>) -> usize {
    let want = raw(expected);
    let have = raw(got);
    let mut n = 0;
    for (k, (dtype, shape, _)) in &want {
        let key = match keys_in {
            Some(prefix) => format!("{prefix}{k}"),
            None => k.clone(),
        };
        let (hd, hs, _) = have
            .get(&key)
            .unwrap_or_else(|| panic!("{label}: output lacks {key}"));
        assert_eq!((hd, hs), (dtype, shape), "{label} {key}");
        let (g, _, _) = tensor(got, &key);
        let (w, _, _) = tensor(expected, k);
        let (ratio, i) = worst(&g, &w, *dtype);
        assert!(
            ratio <= 1.0,
            "{label} {key}: element {i}: oftool {} vs library {} ({ratio:.2}× tolerance)",
            g[i],
            w[i]
        );
        n += 1;
    }
    n
}

fn case_paths(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let case = read_json(&dir.join("case.json"));
    (
        dir.join(case["adapter"].as_str().unwrap()),
        dir.join(case["base"].as_str().unwrap()),
        dir.join(case["merged"].as_str().unwrap()),
    )
}

#[test]
fn merge_every_fixture_case_through_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let mut layers = 0;
    for dir in checked_cases() {
        let label = dir.file_name().unwrap().to_string_lossy().to_string();
        let (adapter, base, merged) = case_paths(&dir);
        let mut t = raw(&base);
        add_untouched(&mut t);
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        let base2 = tmp.path().join(format!("{label}.base.safetensors"));
        write_raw(&base2, &t, Some(meta));
        let out = tmp.path().join(format!("{label}.merged.safetensors"));
        let o = oftool()
            .arg("merge")
            .arg(&base2)
            .arg(&adapter)
            .arg("-o")
            .arg(&out)
            .arg("--json")
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{label}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        layers += compare(&label, &out, &merged, None);
        let case = read_json(&dir.join("case.json"));
        assert_eq!(
            summary["layers_baked"].as_u64().unwrap() as usize,
            case["layers"].as_array().unwrap().len(),
            "{label}"
        );
        let got = raw(&out);
        assert_eq!(
            got["extra.untouched.weight"], t["extra.untouched.weight"],
            "{label}: untouched tensor changed"
        );
        let f = crate::common::MappedFile::open(&out).unwrap();
        assert_eq!(
            f.metadata.get("format").map(String::as_str),
            Some("pt"),
            "base metadata kept"
        );
        assert!(f.metadata.contains_key("oftool.adapters"));
        // Also through a .oft file.
        let oft = tmp.path().join(format!("{label}.oft"));
        oftool()
            .arg("convert")
            .arg(&adapter)
            .arg("-o")
            .arg(&oft)
            .assert()
            .success();
        let out2 = tmp.path().join(format!("{label}.merged2.safetensors"));
        oftool()
            .arg("merge")
            .arg(&base2)
            .arg(&oft)
            .arg("-o")
            .arg(&out2)
            .arg("-q")
            .assert()
            .success();
        assert!(
            raw(&out2) == got,
            "{label}: .oft bake differs from the direct bake"
        );
    }
    assert!(layers >= 500, "only {layers} layers compared");
}

#[test]
fn output_is_identical_for_any_thread_count() {
    let dir = cases_dir().join("peft-unet-bf16");
    let (adapter, base, _) = case_paths(&dir);
    let tmp = tempfile::tempdir().unwrap();
    let mut outs = Vec::new();
    for threads in ["1", "2", "3"] {
        let out = tmp.path().join(format!("t{threads}.safetensors"));
        oftool()
            .arg("merge")
            .arg(&base)
            .arg(&adapter)
            .arg("-o")
            .arg(&out)
            .args(["--threads", threads, "-q"])
            .assert()
            .success();
        outs.push(std::fs::read(&out).unwrap());
    }
    assert!(outs[0] == outs[1] && outs[1] == outs[2]);
}

#[test]
fn two_adapters_apply_in_order() {
    // LyCORIS (output side) then PEFT (input side) on the same UNet: the result must equal
    // applying the second library's rotation to the first library's merged weights.
    let tmp = tempfile::tempdir().unwrap();
    let a = cases_dir().join("lyco-unet-plain");
    let b = cases_dir().join("peft-unet-neumann5-b4");
    let (ad_a, base_a, merged_a) = case_paths(&a);
    let (ad_b, _, _) = case_paths(&b);
    let out = tmp.path().join("ab.safetensors");
    let o = oftool()
        .arg("merge")
        .arg(&base_a)
        .arg(&ad_a)
        .arg(&ad_b)
        .arg("-o")
        .arg(&out)
        .arg("--skip-missing")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Reference: bake B onto A's library-merged weights.
    let ref_out = tmp.path().join("ref.safetensors");
    let o = oftool()
        .arg("merge")
        .arg(&merged_a)
        .arg(&ad_b)
        .arg("-o")
        .arg(&ref_out)
        .arg("--skip-missing")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    compare("two adapters", &out, &ref_out, None);
}

#[test]
fn sharded_base_gives_sharded_output() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = cases_dir().join("peft-unet-f16");
    let (adapter, base, merged) = case_paths(&dir);
    let t = raw(&base);
    let mut keys: Vec<&String> = t.keys().collect();
    keys.sort();
    let (first, second) = keys.split_at(keys.len() / 2);
    let shard_dir = tmp.path().join("sharded");
    std::fs::create_dir(&shard_dir).unwrap();
    let mut weight_map = serde_json::Map::new();
    for (name, part) in [
        ("model-00001-of-00002.safetensors", first),
        ("model-00002-of-00002.safetensors", second),
    ] {
        let sub: HashMap<_, _> = part.iter().map(|k| ((*k).clone(), t[*k].clone())).collect();
        write_raw(&shard_dir.join(name), &sub, None);
        for k in part {
            weight_map.insert((*k).clone(), serde_json::Value::String(name.into()));
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(
        shard_dir.join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    std::fs::write(shard_dir.join("config.json"), "{}").unwrap();
    let out = tmp.path().join("out");
    let o = oftool()
        .arg("merge")
        .arg(&shard_dir)
        .arg(&adapter)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "config.json",
    ] {
        assert!(out.join(f).is_file(), "missing {f}");
    }
    // Compare each shard's keys with the library result.
    let want = raw(&merged);
    let mut seen = 0;
    for name in [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ] {
        let p = out.join(name);
        for k in raw(&p).keys() {
            let (g, _, d) = tensor(&p, k);
            let (w, _, _) = tensor(&merged, k);
            assert!(worst(&g, &w, d).0 <= 1.0, "{k}");
            seen += 1;
        }
    }
    assert_eq!(seen, want.len());
    // Given the index file itself works too.
    let out2 = tmp.path().join("out2");
    oftool()
        .arg("merge")
        .arg(shard_dir.join("model.safetensors.index.json"))
        .arg(&adapter)
        .arg("-o")
        .arg(&out2)
        .assert()
        .success();
}

#[test]
fn diffusers_folder_with_per_component_peft_adapters() {
    let tmp = tempfile::tempdir().unwrap();
    let unet = cases_dir().join("peft-unet-neumann5-b4");
    let te = cases_dir().join("peft-te-exact");
    let (ad_u, base_u, merged_u) = case_paths(&unet);
    let (ad_t, base_t, merged_t) = case_paths(&te);
    // Pipeline folder.
    let pipe = tmp.path().join("pipe");
    for (sub, file, src) in [
        ("unet", "diffusion_pytorch_model.safetensors", &base_u),
        ("text_encoder", "model.safetensors", &base_t),
    ] {
        std::fs::create_dir_all(pipe.join(sub)).unwrap();
        std::fs::copy(src, pipe.join(sub).join(file)).unwrap();
        std::fs::write(pipe.join(sub).join("config.json"), "{}").unwrap();
    }
    std::fs::write(pipe.join("model_index.json"), "{}").unwrap();
    // Adapter folder: one PEFT directory per component, as PEFT's diffusers examples save them.
    let adapters = tmp.path().join("adapters");
    for (sub, src) in [("unet", &ad_u), ("text_encoder", &ad_t)] {
        std::fs::create_dir_all(adapters.join(sub)).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(src.join(f), adapters.join(sub).join(f)).unwrap();
        }
    }
    let out = tmp.path().join("out");
    let o = oftool()
        .arg("merge")
        .arg(&pipe)
        .arg(&adapters)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    compare(
        "unet",
        &out.join("unet/diffusion_pytorch_model.safetensors"),
        &merged_u,
        None,
    );
    compare(
        "text_encoder",
        &out.join("text_encoder/model.safetensors"),
        &merged_t,
        None,
    );
    assert!(out.join("model_index.json").is_file() && out.join("unet/config.json").is_file());
}

#[test]
fn failures_leave_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = cases_dir().join("peft-unet-neumann5-b4");
    let (adapter, base, _) = case_paths(&dir);
    let clean = |p: &Path| {
        let leftovers: Vec<_> = std::fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
    };
    let outdir = tmp.path().join("o");
    std::fs::create_dir(&outdir).unwrap();
    let out = outdir.join("x.safetensors");

    // A base missing some targets: error names them, nothing written.
    let mut t = raw(&base);
    let dropped: Vec<String> = t
        .keys()
        .filter(|k| k.contains("attn1.to_q"))
        .cloned()
        .collect();
    for k in &dropped {
        t.remove(k);
    }
    let partial = tmp.path().join("partial.safetensors");
    write_raw(&partial, &t, None);
    let o = oftool()
        .arg("merge")
        .arg(&partial)
        .arg(&adapter)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("no target in the base") && err.contains("attn1.to_q"),
        "{err}"
    );
    clean(&outdir);
    // --skip-missing bakes the rest and says what it skipped.
    let o = oftool()
        .arg("merge")
        .arg(&partial)
        .arg(&adapter)
        .arg("-o")
        .arg(&out)
        .arg("--skip-missing")
        .arg("--json")
        .output()
        .unwrap();
    assert!(o.status.success());
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(s["layers_skipped"].as_array().unwrap().len(), dropped.len());
    std::fs::remove_file(&out).unwrap();

    // A shape mismatch: a base tensor with other columns.
    let mut t = raw(&base);
    let k = t
        .keys()
        .find(|k| k.ends_with("attn1.to_q.weight"))
        .unwrap()
        .clone();
    t.insert(k.clone(), (Dtype::F32, vec![8, 12], vec![0u8; 8 * 12 * 4]));
    let wrong = tmp.path().join("wrong.safetensors");
    write_raw(&wrong, &t, None);
    let o = oftool()
        .arg("merge")
        .arg(&wrong)
        .arg(&adapter)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("shape mismatch") && err.contains(&k), "{err}");
    clean(&outdir);

    // A truncated base.
    let bytes = std::fs::read(&base).unwrap();
    let trunc = tmp.path().join("trunc.safetensors");
    std::fs::write(&trunc, &bytes[..bytes.len() / 2]).unwrap();
    let o = oftool()
        .arg("merge")
        .arg(&trunc)
        .arg(&adapter)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("truncated"));
    clean(&outdir);

    // Output into a missing folder, and over an input.
    let o = oftool()
        .arg("merge")
        .arg(&base)
        .arg(&adapter)
        .arg("-o")
        .arg(tmp.path().join("nope/x.safetensors"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("does not exist"));
    let before = std::fs::read(&base).unwrap();
    let o = oftool()
        .arg("merge")
        .arg(&base)
        .arg(&adapter)
        .arg("-o")
        .arg(&base)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("would overwrite the input"));
    assert_eq!(std::fs::read(&base).unwrap(), before);
}

#[test]
fn read_only_output_folder_is_an_io_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = cases_dir().join("peft-unet-neumann5-b4");
    let (adapter, base, _) = case_paths(&dir);
    let ro = tmp.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    let mut perm = std::fs::metadata(&ro).unwrap().permissions();
    perm.set_readonly(true);
    std::fs::set_permissions(&ro, perm).unwrap();
    // root ignores directory permissions; only check when the folder really is read-only.
    if std::fs::write(ro.join("probe"), b"x").is_ok() {
        return;
    }
    let o = oftool()
        .arg("merge")
        .arg(&base)
        .arg(&adapter)
        .arg("-o")
        .arg(ro.join("x.safetensors"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(std::fs::read_dir(&ro).unwrap().count(), 0);
}

#[test]
fn binding_mismatch_is_refused_unless_forced() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = cases_dir().join("lyco-unet-plain");
    let (adapter, base, _) = case_paths(&dir);
    // Bind the adapter to the base, then bake it onto a different base.
    let mut a = oftool::layouts::load(&adapter).unwrap();
    let f = crate::common::MappedFile::open(&base).unwrap();
    let st = f.tensors();
    let checkpoint = oftool::base::Base::open(&base).unwrap();
    for l in &mut a.layers {
        let key = checkpoint.locate(l).unwrap().key;
        let v = st.tensor(&key).unwrap();
        l.base_binding = Some(oftool::model::BaseBinding {
            blake3: blake3::hash(v.data()).to_hex().to_string(),
            dtype: format!("{:?}", v.dtype()),
            shape: v.shape().iter().map(|&d| d as u64).collect(),
        });
    }
    let oft = tmp.path().join("bound.oft");
    oftool::oft_file::write(&a, &oft).unwrap();
    oftool()
        .arg("merge")
        .arg(&base)
        .arg(&oft)
        .arg("-o")
        .arg(tmp.path().join("ok.safetensors"))
        .assert()
        .success();
    let mut t = raw(&base);
    let k = t.keys().next().unwrap().clone();
    t.get_mut(&k).unwrap().2[0] ^= 1;
    let other = tmp.path().join("other.safetensors");
    write_raw(&other, &t, None);
    let out = tmp.path().join("x.safetensors");
    let o = oftool()
        .arg("merge")
        .arg(&other)
        .arg(&oft)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("binding hash mismatch"));
    assert!(!out.exists());
    oftool()
        .arg("merge")
        .arg(&other)
        .arg(&oft)
        .arg("-o")
        .arg(&out)
        .arg("--force")
        .assert()
        .success();
}

#[test]
fn full_disk_is_a_clean_error() {
    // A file-size limit stands in for a full disk: the write fails midway.
    let tmp = tempfile::tempdir().unwrap();
    let dir = cases_dir().join("peft-unet-exact-r");
    let (adapter, base, _) = case_paths(&dir);
    let outdir = tmp.path().join("o");
    std::fs::create_dir(&outdir).unwrap();
    let out = outdir.join("x.safetensors");
    let bin = assert_cmd::cargo::cargo_bin("oftool");
    let script = format!(
        "ulimit -f 64; exec '{}' merge '{}' '{}' -o '{}' -q",
        bin.display(),
        base.display(),
        adapter.display(),
        out.display()
    );
    let o = std::process::Command::new("bash")
        .arg("-c")
        .arg(script)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("File too large"), "{err}");
    assert_eq!(
        std::fs::read_dir(&outdir).unwrap().count(),
        0,
        "nothing may be left behind"
    );
}
