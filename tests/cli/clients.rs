//! Real clients: `fixtures/clients/` holds files written by `oftool convert --to diffusers` and
//! `--to comfyui`, and the weights PEFT and ComfyUI themselves merged from them
//! (fixtures/clients.py). oftool must still write those files byte for byte, and oftool's own
//! merge of them must equal the client's.

#[allow(unused_imports)]
use crate::common;

use crate::common::*;
use assert_cmd::Command;
use std::path::{Path, PathBuf};

fn oftool() -> Command {
    Command::cargo_bin("oftool").expect("binary built")
}

/// Every file below `p` (or `p` itself), relative to `p`.
fn files(p: &Path) -> Vec<PathBuf> {
    if p.is_file() {
        return vec![PathBuf::new()];
    }
    let mut out = Vec::new();
    for e in std::fs::read_dir(p).unwrap() {
        let path = e.unwrap().path();
        let name = PathBuf::from(path.file_name().unwrap());
        for f in files(&path) {
            out.push(if f.as_os_str().is_empty() {
                name.clone()
            } else {
                name.join(f)
            });
        }
    }
    out.sort();
    out
}

#[test]
fn converted_files_are_what_clients_loaded_and_merge_alike() {
    let dir = repo().join("fixtures/clients");
    let tmp = tempfile::tempdir().unwrap();
    let mut pairs = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if !name.ends_with(".json") || name.ends_with(".report.json") {
            continue;
        }
        let record = read_json(&path);
        assert_eq!(
            record["passed"], true,
            "{name}: the client check failed when generated"
        );
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

        // 1. Byte-identical to what the client loaded.
        let (a, b) = (files(&committed), files(&fresh));
        assert_eq!(a, b, "{name}: different file sets");
        for f in &a {
            let at = |root: &Path| {
                if f.as_os_str().is_empty() {
                    root.to_path_buf()
                } else {
                    root.join(f)
                }
            };
            let x = std::fs::read(at(&committed)).unwrap();
            let y = std::fs::read(at(&fresh)).unwrap();
            assert!(
                x == y,
                "{name}: {} is no longer written byte for byte",
                f.display()
            );
        }

        // 2. oftool's merge of the converted file equals the client's merge.
        let source = record["source_case"].as_str().unwrap();
        let case = [cases_dir(), conformance_dir()]
            .into_iter()
            .map(|d| d.join(source))
            .find(|d| d.is_dir())
            .unwrap_or_else(|| panic!("no case {source}"));
        let out = tmp.path().join(format!("{name}.merged.safetensors"));
        let merge = oftool()
            .arg("merge")
            .arg(case.join("base.safetensors"))
            .arg(&committed)
            .arg("-o")
            .arg(&out)
            .arg("-q")
            .output()
            .unwrap();
        assert!(
            merge.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&merge.stderr)
        );
        let client = repo().join(record["merged"].as_str().unwrap());
        let f = crate::common::MappedFile::open(&client).unwrap();
        for (key, _) in f.tensors().iter() {
            let (want, _, dtype) = tensor(&client, key);
            let (got, _, _) = tensor(&out, key);
            let (ratio, i) = worst(&got, &want, dtype);
            assert!(
                ratio <= 1.0,
                "{name}: {key}[{i}]: oftool {} vs client {} ({ratio:.2}× the tolerance)",
                got[i],
                want[i]
            );
        }
        pairs += 1;
    }
    assert!(pairs >= 10, "only {pairs} client pairs");
}
