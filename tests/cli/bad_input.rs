//! Bad input: each malformed file or argument gets its own clear message and a non-zero exit
//! code, never a panic, and leaves no output file behind.

#[allow(unused_imports)]
use crate::common;

use assert_cmd::Command;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn oftool() -> Command {
    Command::cargo_bin("oftool").expect("binary built")
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Write a safetensors file of f32 tensors with optional metadata.
fn write_st(
    path: &Path,
    tensors: &[(&str, Vec<usize>, Vec<f32>)],
    meta: Option<HashMap<String, String>>,
) {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, v)| (n.to_string(), s.clone(), f32_bytes(v)))
        .collect();
    let views: Vec<(String, TensorView)> = bytes
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, meta).unwrap()).unwrap();
}

/// A valid small PEFT OFT file: 2 layers, block size 4 (6-entry triangles), 2 blocks each.
fn peft_file(dir: &Path) -> PathBuf {
    let p = dir.join("peft.safetensors");
    let q: Vec<f32> = (0..12).map(|i| 0.01 * (i as f32 - 6.0)).collect();
    write_st(
        &p,
        &[
            (
                "base_model.model.a.to_q.oft_R.weight",
                vec![2, 6],
                q.clone(),
            ),
            ("base_model.model.a.to_k.oft_R.weight", vec![2, 6], q),
        ],
        None,
    );
    p
}

/// A valid `.oft` converted from `peft_file`.
fn oft_file(dir: &Path) -> PathBuf {
    let src = peft_file(dir);
    let out = dir.join("a.oft");
    oftool()
        .args(["convert"])
        .arg(&src)
        .arg("-o")
        .arg(&out)
        .assert()
        .success();
    out
}

/// Rewrite an .oft's manifest through `edit` (digest recomputed is NOT done: callers choose).
fn with_manifest(src: &Path, dst: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let file = crate::common::MappedFile::open(src).unwrap();
    let mut meta = file.metadata.clone();
    let mut m: serde_json::Value = serde_json::from_str(&meta["oft.manifest"]).unwrap();
    edit(&mut m);
    meta.insert("oft.manifest".into(), m.to_string());
    let st = file.tensors();
    let views: Vec<(String, TensorView)> = st.tensors();
    std::fs::write(dst, safetensors::serialize(views, Some(meta)).unwrap()).unwrap();
}

fn assert_fails(args: &[&str], paths: &[&Path], code: i32, needle: &str) {
    let mut cmd = oftool();
    cmd.args(args);
    for p in paths {
        cmd.arg(p);
    }
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(code),
        "{args:?}: stderr {stderr} stdout {stdout}"
    );
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    assert!(
        stderr.contains(needle) || stdout.contains(needle),
        "{args:?}: expected `{needle}` in output, got stderr: {stderr} stdout: {stdout}"
    );
}

#[test]
fn truncated_file() {
    let d = tempfile::tempdir().unwrap();
    let good = oft_file(d.path());
    let bytes = std::fs::read(&good).unwrap();
    let bad = d.path().join("trunc.oft");
    std::fs::write(&bad, &bytes[..bytes.len() - 10]).unwrap();
    assert_fails(&["inspect"], &[&bad], 1, "truncated");
    assert_fails(&["validate"], &[&bad], 1, "truncated");
    let out = d.path().join("out.oft");
    assert_fails(
        &["convert", "-o", out.to_str().unwrap()],
        &[&bad],
        1,
        "truncated",
    );
    assert!(!out.exists());
}

#[test]
fn header_length_past_end_of_file() {
    let d = tempfile::tempdir().unwrap();
    let bad = d.path().join("huge.safetensors");
    let mut b = 5000u64.to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    std::fs::write(&bad, b).unwrap();
    assert_fails(&["inspect"], &[&bad], 1, "header length runs past the end");
}

#[test]
fn tiny_file_and_directory_without_config() {
    let d = tempfile::tempdir().unwrap();
    let bad = d.path().join("tiny.safetensors");
    std::fs::write(&bad, b"abc").unwrap();
    assert_fails(&["inspect"], &[&bad], 1, "too short");
    assert_fails(&["inspect"], &[d.path()], 1, "adapter_config.json");
}

#[test]
fn overlapping_offsets() {
    let d = tempfile::tempdir().unwrap();
    let bad = d.path().join("overlap.safetensors");
    let header = r#"{"a.oft_R.weight":{"dtype":"F32","shape":[1,6],"data_offsets":[0,24]},"b.oft_R.weight":{"dtype":"F32","shape":[1,6],"data_offsets":[8,32]}}"#;
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.extend_from_slice(&[0u8; 32]);
    std::fs::write(&bad, b).unwrap();
    assert_fails(&["inspect"], &[&bad], 1, "offsets that overlap");
}

#[test]
fn manifest_not_json() {
    let d = tempfile::tempdir().unwrap();
    let bad = d.path().join("m.oft");
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "oft".to_string());
    meta.insert("oft.version".to_string(), "1.0".to_string());
    meta.insert("oft.manifest".to_string(), "{not json".to_string());
    write_st(
        &bad,
        &[("layers.0.stages.0.q", vec![1, 1], vec![0.1])],
        Some(meta),
    );
    assert_fails(&["inspect"], &[&bad], 1, "manifest is not valid JSON");
    assert_fails(&["validate"], &[&bad], 1, "manifest is not valid JSON");
}

#[test]
fn triangle_length_not_triangular() {
    let d = tempfile::tempdir().unwrap();
    let bad = d.path().join("tri.safetensors");
    write_st(
        &bad,
        &[(
            "base_model.model.x.oft_R.weight",
            vec![2, 7],
            vec![0.01; 14],
        )],
        None,
    );
    assert_fails(&["inspect"], &[&bad], 1, "row length of 7 is not b(b−1)/2");
    assert_fails(&["validate"], &[&bad], 1, "not b(b−1)/2");
}

#[test]
fn partition_that_does_not_fit_the_base() {
    let d = tempfile::tempdir().unwrap();
    let adapter = peft_file(d.path()); // 2 blocks × 4 = 8 input features
    let base = d.path().join("base.safetensors");
    write_st(
        &base,
        &[
            ("a.to_q.weight", vec![4, 10], vec![0.5; 40]),
            ("a.to_k.weight", vec![4, 8], vec![0.5; 32]),
        ],
        None,
    );
    let out = oftool()
        .arg("validate")
        .arg(&adapter)
        .arg("--base")
        .arg(&base)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.contains("[target-shape] a.to_q") && s.contains("2 × 4 = 8"),
        "{s}"
    );
    assert!(
        !s.contains("a.to_k:"),
        "to_k fits and must not be listed: {s}"
    );
    // A target the base lacks.
    let base2 = d.path().join("base2.safetensors");
    write_st(
        &base2,
        &[("a.to_q.weight", vec![4, 8], vec![0.5; 32])],
        None,
    );
    assert_fails(
        &["validate", "--base", base2.to_str().unwrap()],
        &[&adapter],
        1,
        "[target-missing] a.to_k",
    );
}

#[test]
fn non_finite_values() {
    let d = tempfile::tempdir().unwrap();
    let bad = d.path().join("nan.safetensors");
    let mut q = vec![0.01f32; 12];
    q[5] = f32::NAN;
    write_st(
        &bad,
        &[("base_model.model.x.oft_R.weight", vec![2, 6], q)],
        None,
    );
    assert_fails(
        &["validate"],
        &[&bad],
        1,
        "non-finite value (NaN) at element 5",
    );
    let mut q = vec![0.01f32; 8];
    q[1] = f32::INFINITY;
    let bad2 = d.path().join("inf.safetensors");
    write_st(
        &bad2,
        &[
            ("lora_unet_x.oft_blocks", vec![2, 2, 2], q),
            ("lora_unet_x.alpha", vec![], vec![0.0]),
        ],
        None,
    );
    assert_fails(&["inspect"], &[&bad2], 1, "non-finite value (inf)");
}

#[test]
fn unknown_required_feature_and_version_and_enum() {
    let d = tempfile::tempdir().unwrap();
    let good = oft_file(d.path());
    let req = d.path().join("req.oft");
    with_manifest(&good, &req, |m| {
        m["requires"] = serde_json::json!(["hyperbolic-stages"])
    });
    assert_fails(
        &["inspect"],
        &[&req],
        1,
        "requires features this oftool does not implement: hyperbolic-stages",
    );

    let ver = d.path().join("ver.oft");
    let file = crate::common::MappedFile::open(&good).unwrap();
    let mut meta = file.metadata.clone();
    meta.insert("oft.version".into(), "2.0".into());
    std::fs::write(
        &ver,
        safetensors::serialize(file.tensors().tensors(), Some(meta)).unwrap(),
    )
    .unwrap();
    assert_fails(&["inspect"], &[&ver], 1, "format version 2.0");

    let en = d.path().join("enum.oft");
    with_manifest(&good, &en, |m| {
        m["layers"][0]["stages"][0]["map"] = serde_json::json!({"kind": "exponential"})
    });
    assert_fails(&["validate"], &[&en], 1, "does not follow the v1 schema");

    // Tensor names are prescribed by position (spec §2.3).
    let misnamed = d.path().join("misnamed.oft");
    with_manifest(&good, &misnamed, |m| {
        m["layers"][0]["stages"][0]["q"] = serde_json::json!("layers.1.stages.0.q")
    });
    assert_fails(
        &["inspect"],
        &[&misnamed],
        1,
        "must be named `layers.0.stages.0.q`",
    );

    // Unknown optional members are ignored (but the digest covers the manifest text).
    let extra = d.path().join("extra.oft");
    with_manifest(&good, &extra, |m| {
        m["layers"][0]["comment"] = serde_json::json!("hello")
    });
    assert_fails(
        &["validate"],
        &[&extra],
        1,
        "[digest] integrity digest mismatch",
    );
    assert_fails(&["inspect"], &[&extra], 1, "integrity digest mismatch");
}

#[test]
fn corrupted_tensor_bytes_fail_the_digest() {
    let d = tempfile::tempdir().unwrap();
    let good = oft_file(d.path());
    let mut bytes = std::fs::read(&good).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x40;
    let bad = d.path().join("flip.oft");
    std::fs::write(&bad, bytes).unwrap();
    assert_fails(&["validate", "--json"], &[&bad], 1, "\"check\": \"digest\"");
}

#[test]
fn peft_configs_that_disagree_with_the_tensors() {
    let d = tempfile::tempdir().unwrap();
    // A PEFT ≤ 0.13 config (no `oft_block_size`) beside PEFT ≥ 0.16 tensors.
    let dir = d.path().join("p13cfg");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(
        dir.join("adapter_config.json"),
        r#"{"peft_type":"OFT","r":8,"coft":false}"#,
    )
    .unwrap();
    write_st(
        &dir.join("adapter_model.safetensors"),
        &[("base_model.model.x.oft_R.weight", vec![2, 6], vec![0.0; 12])],
        None,
    );
    assert_fails(
        &["inspect"],
        &[&dir],
        1,
        "the config and the weights disagree",
    );

    // peft_type BOFT beside OFT tensors.
    let dir = d.path().join("boftcfg");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(
        dir.join("adapter_config.json"),
        r#"{"peft_type":"BOFT","boft_block_size":4}"#,
    )
    .unwrap();
    write_st(
        &dir.join("adapter_model.safetensors"),
        &[("base_model.model.x.oft_r", vec![2, 4, 4], vec![0.0; 32])],
        None,
    );
    assert_fails(
        &["validate"],
        &[&dir],
        1,
        "says peft_type `BOFT` but the tensors are peft-oft-legacy",
    );

    // A LoRA config.
    std::fs::write(dir.join("adapter_config.json"), r#"{"peft_type":"LORA"}"#).unwrap();
    assert_fails(&["inspect"], &[&dir], 1, "is not an OFT or BOFT adapter");
}

#[test]
fn mixed_layouts_in_one_file() {
    let d = tempfile::tempdir().unwrap();
    let mixed = d.path().join("mixed.safetensors");
    write_st(
        &mixed,
        &[
            ("base_model.model.x.oft_r", vec![2, 4, 4], vec![0.0; 32]),
            ("lora_unet_y.oft_blocks", vec![2, 2, 2], vec![0.01; 8]),
        ],
        None,
    );
    assert_fails(
        &["inspect"],
        &[&mixed],
        1,
        "mixed layouts in one file (peft-oft-legacy, lycoris-diag-oft)",
    );
    let flux = d.path().join("flux.safetensors");
    write_st(
        &flux,
        &[(
            "oft_unet_double_blocks_0_img_attn_qkv.oft_blocks.1",
            vec![2, 2, 2],
            vec![0.01; 8],
        )],
        None,
    );
    assert_fails(
        &["inspect"],
        &[&flux],
        1,
        "kohya oft_flux writes `oft_blocks.0`",
    );
}

#[test]
fn not_an_adapter_and_missing_files() {
    let d = tempfile::tempdir().unwrap();
    let model = d.path().join("model.safetensors");
    write_st(&model, &[("a.weight", vec![2, 2], vec![1.0; 4])], None);
    assert_fails(&["inspect"], &[&model], 1, "no OFT tensors found");
    let missing = d.path().join("nope.oft");
    assert_fails(&["inspect"], &[&missing], 2, "No such file");
    assert_fails(&["validate"], &[&missing], 2, "no such file");
}

#[test]
fn output_may_not_overwrite_the_input() {
    let d = tempfile::tempdir().unwrap();
    let good = oft_file(d.path());
    let before = std::fs::read(&good).unwrap();
    assert_fails(
        &["convert", "-o", good.to_str().unwrap()],
        &[&good],
        2,
        "would overwrite the input",
    );
    let link = d.path().join("link.oft");
    std::fs::hard_link(&good, &link).unwrap();
    assert_fails(
        &["convert", "-o", link.to_str().unwrap()],
        &[&good],
        2,
        "would overwrite the input",
    );
    assert_eq!(std::fs::read(&good).unwrap(), before);
}

#[test]
fn lycoris_2_1_files_read_as_unconstrained() {
    let d = tempfile::tempdir().unwrap();
    let r1 = d.path().join("r1.safetensors");
    write_st(
        &r1,
        &[
            ("lora_unet_x.oft_blocks", vec![2, 2, 2], vec![0.01; 8]),
            ("lora_unet_x.rescale", vec![4], vec![1.0; 4]),
        ],
        None,
    );
    let out = oftool()
        .arg("inspect")
        .arg("--json")
        .arg(&r1)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("read as unconstrained"), "{text}");
    // A rescale of the wrong length is still refused.
    let bad = d.path().join("bad.safetensors");
    write_st(
        &bad,
        &[
            ("lora_unet_x.oft_blocks", vec![2, 2, 2], vec![0.01; 8]),
            ("lora_unet_x.rescale", vec![3], vec![1.0; 3]),
        ],
        None,
    );
    assert_fails(
        &["inspect"],
        &[&bad],
        1,
        "`lora_unet_x.rescale` has shape [3]",
    );
}
