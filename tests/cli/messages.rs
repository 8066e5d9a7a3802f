//! What users read: `--help` of `oftool` and every subcommand (snapshots), and error categories
//! that tell a corrupt file from an invalid or unsupported one, on stderr and in `--json`.
//! The bad-input corpus's messages are snapshot-tested in `bad_inputs.rs`.

use assert_cmd::Command;
use safetensors::tensor::{Dtype, TensorView};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn oftool() -> Command {
    let mut c = Command::cargo_bin("oftool").expect("binary built");
    c.env_remove("COLUMNS");
    c
}

fn help(args: &[&str]) -> String {
    let out = oftool().args(args).arg("--help").output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{args:?} --help");
    String::from_utf8(out.stdout).expect("UTF-8 help")
}

/// The subcommands `oftool --help` lists (so a new one gets its snapshot without a list here).
fn subcommands(top: &str) -> Vec<String> {
    top.split("Commands:\n")
        .nth(1)
        .expect("a Commands section")
        .lines()
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect()
}

#[test]
fn help_texts() {
    let top = help(&[]);
    insta::assert_snapshot!("help", top);
    let commands = subcommands(&top);
    assert!(commands.len() >= 6, "{commands:?}");
    for c in commands {
        insta::assert_snapshot!(format!("help-{c}"), help(&[&c]));
    }
}

fn write_st(path: &Path, name: &str, dtype: Dtype, shape: Vec<usize>, bytes: &[u8]) -> PathBuf {
    let view = TensorView::new(dtype, shape, bytes).unwrap();
    std::fs::write(path, safetensors::serialize([(name, view)], None).unwrap()).unwrap();
    path.to_path_buf()
}

fn peft(dir: &Path) -> PathBuf {
    let bytes: Vec<u8> = (0..6)
        .flat_map(|i| (0.01 * i as f32).to_le_bytes())
        .collect();
    write_st(
        &dir.join("peft.safetensors"),
        "base_model.model.a.oft_R.weight",
        Dtype::F32,
        vec![1, 6],
        &bytes,
    )
}

/// `oftool ARGS --json`: exit code, the `error` object on stdout, and stderr.
fn json_error(args: &[&Path]) -> (i32, Value, String) {
    let out = oftool()
        .arg("inspect")
        .arg("--json")
        .args(args)
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    (
        out.status.code().unwrap_or(-1),
        v["error"].clone(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn a_corrupt_file_and_an_invalid_or_unsupported_one_differ_by_category() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let good = peft(d);
    let oft = d.join("a.oft");
    oftool()
        .arg("convert")
        .arg(&good)
        .arg("-o")
        .arg(&oft)
        .assert()
        .success();

    // Cut short: a corrupt container.
    let bytes = std::fs::read(&oft).unwrap();
    let cut = d.join("cut.oft");
    std::fs::write(&cut, &bytes[..bytes.len() - 3]).unwrap();
    // One byte of a tensor changed: the digest catches it.
    let flipped = d.join("flipped.oft");
    let mut b = bytes.clone();
    let last = b.len() - 1;
    b[last] ^= 1;
    std::fs::write(&flipped, &b).unwrap();
    // A LoRA: not an OFT layout.
    let lora = write_st(
        &d.join("lora.safetensors"),
        "lora_unet_a.lora_down.weight",
        Dtype::F32,
        vec![1, 2],
        &[0; 8],
    );
    // A pre-1.6 pickle: recognised, not handled.
    let old = d.join("old.pt");
    std::fs::write(&old, b"\x80\x02}q\x00.").unwrap();

    for (path, category, rule) in [
        // Spec §9.1 rule 2: byte ranges that do not end at the end of the file.
        (&cut, "container", Some(2)),
        (&flipped, "digest", Some(8)),
        (&lora, "unknown-layout", None),
        (&old, "unsupported", None),
    ] {
        let (code, e, stderr) = json_error(&[path]);
        assert_eq!(code, 1, "{stderr}");
        assert_eq!(e["category"], category, "{e}");
        assert_eq!(e["path"], path.display().to_string(), "{e}");
        assert_eq!(e["rule"].as_u64(), rule, "{e}");
        assert!(stderr.contains(&format!("error[{category}]")), "{stderr}");
    }
    let (code, e, _) = json_error(&[&d.join("absent.oft")]);
    assert_eq!((code, e["category"].as_str()), (2, Some("io")));
}

#[test]
fn validate_json_gives_each_problem_a_category_and_rule() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let oft = d.join("a.oft");
    oftool()
        .arg("convert")
        .arg(peft(d))
        .arg("-o")
        .arg(&oft)
        .assert()
        .success();
    let mut bytes = std::fs::read(&oft).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&oft, &bytes).unwrap();
    let out = oftool()
        .args(["validate", "--json"])
        .arg(&oft)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let p = &v["problems"][0];
    assert_eq!(
        (&p["check"], &p["category"], &p["rule"]),
        (
            &Value::from("digest"),
            &Value::from("digest"),
            &Value::from(8)
        ),
        "{v}"
    );

    // A problem the file cannot even be read past: `parse`, with the error's category.
    let out = oftool()
        .args(["validate", "--json"])
        .arg(peft_with_nan(d))
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let p = &v["problems"][0];
    assert_eq!(p["check"], "parse", "{v}");
    assert_eq!(p["category"], "non-finite", "{v}");
    assert_eq!(p["rule"], Value::Null, "{v}");
}

fn peft_with_nan(dir: &Path) -> PathBuf {
    let mut bytes: Vec<u8> = (0..6)
        .flat_map(|i| (0.01 * i as f32).to_le_bytes())
        .collect();
    bytes[0..4].copy_from_slice(&f32::NAN.to_le_bytes());
    write_st(
        &dir.join("nan.safetensors"),
        "base_model.model.a.oft_R.weight",
        Dtype::F32,
        vec![1, 6],
        &bytes,
    )
}
