//! Faults: a bake killed with SIGKILL at many points never leaves a partial checkpoint at the
//! target path, and the next run removes what the killed one left; a full disk and an
//! unwritable folder are clean errors for bake and convert; a base truncated during a bake is
//! an error, not a crash.

#[allow(unused_imports)]
use crate::common;

use crate::common::*;
use assert_cmd::Command;
use safetensors::tensor::{Dtype, TensorView};
use std::path::{Path, PathBuf};
use std::time::Instant;

fn oftool() -> Command {
    Command::cargo_bin("oftool").expect("binary built")
}

/// A base of `n` f16 tensors `[rows, cols]` and a PEFT-style adapter (block size 32) on each.
fn big_pair(dir: &Path, n: usize, rows: usize, cols: usize) -> (PathBuf, PathBuf) {
    let data: Vec<u8> = (0..rows * cols)
        .flat_map(|i| half::f16::from_f32(((i * 37 % 101) as f32 - 50.0) / 64.0).to_le_bytes())
        .collect();
    let names: Vec<String> = (0..n).map(|i| format!("layers.{i}.proj.weight")).collect();
    let views: Vec<(String, TensorView)> = names
        .iter()
        .map(|k| {
            (
                k.clone(),
                TensorView::new(Dtype::F16, vec![rows, cols], &data).unwrap(),
            )
        })
        .collect();
    let base = dir.join("base.safetensors");
    std::fs::write(&base, safetensors::serialize(views, None).unwrap()).unwrap();
    let b = 32;
    let tri = b * (b - 1) / 2;
    let q: Vec<u8> = (0..cols / b * tri)
        .flat_map(|i| (0.002 * ((i % 13) as f32 - 6.0)).to_le_bytes())
        .collect();
    let anames: Vec<String> = (0..n)
        .map(|i| format!("base_model.model.layers.{i}.proj.oft_R.weight"))
        .collect();
    let aviews: Vec<(String, TensorView)> = anames
        .iter()
        .map(|k| {
            (
                k.clone(),
                TensorView::new(Dtype::F32, vec![cols / b, tri], &q).unwrap(),
            )
        })
        .collect();
    let adapter = dir.join("adapter.safetensors");
    std::fs::write(&adapter, safetensors::serialize(aviews, None).unwrap()).unwrap();
    (base, adapter)
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with(".oftool-tmp-"))
        .collect()
}

#[test]
fn kill_nine_never_leaves_a_partial_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, adapter) = big_pair(tmp.path(), 32, 512, 512); // 16 MiB of f16
    let out = tmp.path().join("out.safetensors");
    let bin = assert_cmd::cargo::cargo_bin("oftool");
    let run = || {
        std::process::Command::new(&bin)
            .arg("merge")
            .arg(&base)
            .arg(&adapter)
            .arg("-o")
            .arg(&out)
            .arg("-q")
            .arg("--threads")
            .arg("2")
            .spawn()
            .unwrap()
    };
    // How long a whole bake takes here.
    let t0 = Instant::now();
    assert!(run().wait().unwrap().success());
    let full = t0.elapsed();
    let reference = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();

    // Kill at spread-out points of the bake (a fixed sequence, so failures reproduce).
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut killed = 0;
    for _ in 0..10 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let at = full.mul_f64((seed % 1000) as f64 / 1000.0);
        let mut child = run();
        std::thread::sleep(at);
        let _ = child.kill(); // SIGKILL
        let status = child.wait().unwrap();
        if status.success() {
            // It finished first: the output must then be the complete checkpoint.
            assert_eq!(std::fs::read(&out).unwrap(), reference);
            std::fs::remove_file(&out).unwrap();
        } else {
            killed += 1;
            assert!(!out.exists(), "a killed bake left {}", out.display());
        }
    }
    assert!(
        killed >= 3,
        "only {killed} of 10 runs were killed mid-bake (bake took {full:?})"
    );
    // The next run cleans up after the killed ones and succeeds.
    assert!(run().wait().unwrap().success());
    assert_eq!(std::fs::read(&out).unwrap(), reference);
    assert_eq!(leftovers(tmp.path()), Vec::<String>::new());
}

#[test]
fn full_disk_during_convert_is_a_clean_error() {
    let tmp = tempfile::tempdir().unwrap();
    let src = cases_dir().join("peft-unet-neumann5-b4/adapter");
    let bin = assert_cmd::cargo::cargo_bin("oftool");
    for (to, out, zip) in [
        ("oft", "x.oft", false),
        ("diffusers", "dir", false),
        ("diffusers", "x.zip", true),
    ] {
        let outdir = tmp.path().join(format!("o-{out}"));
        std::fs::create_dir(&outdir).unwrap();
        // A file-size limit of 4 KiB stands in for a full disk.
        let script = format!(
            "ulimit -f 4; exec '{}' convert '{}' --to {to} {} -o '{}'",
            bin.display(),
            src.display(),
            if zip { "--zip" } else { "" },
            outdir.join(out).display()
        );
        let o = std::process::Command::new("bash")
            .arg("-c")
            .arg(script)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{to}: {err}");
        assert!(err.contains("File too large"), "{to}: {err}");
        assert_eq!(
            std::fs::read_dir(&outdir).unwrap().count(),
            0,
            "{to}: left files behind"
        );
    }
}

#[test]
fn unwritable_output_folder_is_an_io_error() {
    // /sys refuses new files even to root (a read-only directory that root cannot bypass).
    if std::fs::write("/sys/oftool-probe", b"x").is_ok() {
        return;
    }
    let case = cases_dir().join("peft-unet-neumann5-b4");
    for args in [
        vec![
            "merge",
            "BASE",
            "ADAPTER",
            "-o",
            "/sys/oftool-x.safetensors",
        ],
        vec!["convert", "ADAPTER", "-o", "/sys/oftool-x.oft"],
        vec![
            "convert",
            "ADAPTER",
            "--to",
            "diffusers",
            "-o",
            "/sys/oftool-x",
        ],
    ] {
        let args: Vec<String> = args
            .iter()
            .map(|a| match *a {
                "BASE" => case.join("base.safetensors").to_string_lossy().to_string(),
                "ADAPTER" => case.join("adapter").to_string_lossy().to_string(),
                other => other.to_string(),
            })
            .collect();
        let o = oftool().args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("/sys"), "{args:?}: {err}");
    }
}

#[test]
fn base_truncated_during_a_bake_is_an_error_not_a_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, adapter) = big_pair(tmp.path(), 64, 512, 512); // 32 MiB
    let out = tmp.path().join("out.safetensors");
    let bin = assert_cmd::cargo::cargo_bin("oftool");
    let len = std::fs::metadata(&base).unwrap().len();
    let t0 = Instant::now();
    oftool()
        .arg("merge")
        .arg(&base)
        .arg(&adapter)
        .arg("-o")
        .arg(&out)
        .arg("-q")
        .assert()
        .success();
    let full = t0.elapsed();
    std::fs::remove_file(&out).unwrap();
    let mut outcomes = Vec::new();
    for frac in [0.3, 0.5, 0.7] {
        let delay = full.mul_f64(frac);
        // Restore the base, start a bake, cut the base to a third under it.
        let (b2, _) = big_pair(tmp.path(), 64, 512, 512);
        assert_eq!(b2, base);
        let child = std::process::Command::new(&bin)
            .arg("merge")
            .arg(&base)
            .arg(&adapter)
            .arg("-o")
            .arg(&out)
            .arg("-q")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&base)
            .unwrap()
            .set_len(len / 3)
            .unwrap();
        let o = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            o.status.signal(),
            None,
            "killed by a signal (SIGBUS?) after {delay:?}: {err}"
        );
        if o.status.success() {
            // It finished reading before the cut.
            assert!(out.exists());
            std::fs::remove_file(&out).unwrap();
        } else {
            assert!(!out.exists(), "a failed bake left {}", out.display());
            assert!(!err.contains("panicked"), "{err}");
        }
        outcomes.push((
            delay,
            o.status.code(),
            err.lines().next().map(str::to_string),
        ));
    }
    assert!(
        outcomes.iter().any(|(_, _, e)| e
            .as_deref()
            .is_some_and(|e| e.contains("became shorter while it was being read"))),
        "the truncation never landed mid-bake: {outcomes:?}"
    );
}
