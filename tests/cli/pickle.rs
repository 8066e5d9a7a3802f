//! PyTorch pickle adapters: a real PEFT `adapter_model.bin` reads exactly like its safetensors
//! twin; hostile archives and pickles are refused by name, and nothing runs.

#[allow(unused_imports)]
use crate::common;

use crate::common::*;
use assert_cmd::Command;
use oftool::layouts;
use std::io::Write;
use std::path::Path;

fn oftool() -> Command {
    Command::cargo_bin("oftool").expect("binary built")
}

#[test]
fn peft_bin_reads_like_its_safetensors_twin() {
    let bin = repo().join("fixtures/pickles/peft-bin");
    let st = cases_dir().join("peft-unet-neumann5-b4/adapter");
    let a = layouts::load(&bin).expect("pickle adapter loads");
    let b = layouts::load(&st).expect("safetensors adapter loads");
    assert_eq!(a.layers.len(), b.layers.len());
    for (x, y) in a.layers.iter().zip(&b.layers) {
        assert_eq!(x.target.name, y.target.name);
        assert_eq!(x.stages, y.stages, "{}", x.target.name);
    }
    assert_eq!(
        a.provenance
            .user_metadata
            .get("oftool.container")
            .map(String::as_str),
        Some("torch.save zip (pickle)")
    );
    // And it bakes to the library's merge.
    let tmp = tempfile::tempdir().unwrap();
    let case = cases_dir().join("peft-unet-neumann5-b4");
    let out = tmp.path().join("merged.safetensors");
    oftool()
        .arg("merge")
        .arg(case.join("base.safetensors"))
        .arg(&bin)
        .arg("-o")
        .arg(&out)
        .arg("-q")
        .assert()
        .success();
    let f = crate::common::MappedFile::open(&case.join("merged.safetensors")).unwrap();
    for (key, _) in f.tensors().iter() {
        let (want, _, dtype) = tensor(&case.join("merged.safetensors"), key);
        let (got, _, _) = tensor(&out, key);
        let (ratio, _) = worst(&got, &want, dtype);
        assert!(ratio <= 1.0, "{key}: {ratio}× the tolerance");
    }
}

/// A zip archive with the given members (stored or deflated).
fn zip_file(path: &Path, members: &[(&str, &[u8], bool)]) {
    let f = std::fs::File::create(path).unwrap();
    let mut z = zip::ZipWriter::new(f);
    for (name, bytes, deflate) in members {
        let method = if *deflate {
            zip::CompressionMethod::Deflated
        } else {
            zip::CompressionMethod::Stored
        };
        let opts = zip::write::SimpleFileOptions::default().compression_method(method);
        z.start_file(*name, opts).unwrap();
        z.write_all(bytes).unwrap();
    }
    z.finish().unwrap();
}

fn refused(path: &Path, needle: &str) {
    let out = oftool().arg("inspect").arg(path).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(needle), "expected `{needle}` in: {err}");
}

#[test]
fn hostile_pickles_and_archives_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let marker = d.join("ran");
    // A pickle that would call os.system("touch <marker>") under pickle.load.
    let cmd = format!("touch {}", marker.display());
    let mut evil = b"\x80\x02cos\nsystem\nq\x00X".to_vec();
    evil.extend((cmd.len() as u32).to_le_bytes());
    evil.extend(cmd.as_bytes());
    evil.extend(b"q\x01\x85q\x02Rq\x03.");
    let p = d.join("evil.bin");
    zip_file(&p, &[("archive/data.pkl", &evil, false)]);
    refused(&p, "asks for `os.system`");
    assert!(!marker.exists(), "the pickle's command ran");

    // The same through STACK_GLOBAL (protocol 4).
    let mut evil4 = b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93".to_vec();
    evil4.extend(b"\x8c\x011\x85R.");
    let p = d.join("eval.pt");
    zip_file(&p, &[("archive/data.pkl", &evil4, false)]);
    refused(&p, "asks for `builtins.eval`");

    // Member names that climb out or are absolute.
    let ok_pkl = b"\x80\x02}q\x00.";
    let p = d.join("dotdot.bin");
    zip_file(
        &p,
        &[
            ("archive/data.pkl", ok_pkl, false),
            ("../evil", b"x", false),
        ],
    );
    refused(&p, "climbs out with `..`");
    let p = d.join("abs.bin");
    zip_file(
        &p,
        &[
            ("archive/data.pkl", ok_pkl, false),
            ("/etc/evil", b"x", false),
        ],
    );
    refused(&p, "absolute path");

    // A bomb: 64 MiB of zeros deflated to a few KiB.
    let zeros = vec![0u8; 64 << 20];
    let p = d.join("bomb.bin");
    zip_file(
        &p,
        &[
            ("archive/data.pkl", ok_pkl, false),
            ("archive/data/0", &zeros, true),
        ],
    );
    refused(&p, "decompression bomb");

    // Not a state dict; no data.pkl; an empty dict; an unknown opcode.
    let p = d.join("list.bin");
    zip_file(&p, &[("archive/data.pkl", b"\x80\x02]q\x00.", false)]);
    refused(&p, "where a state dict");
    let p = d.join("nopkl.bin");
    zip_file(&p, &[("archive/other", b"x", false)]);
    refused(&p, "without `data.pkl`");
    let p = d.join("empty.bin");
    zip_file(&p, &[("archive/data.pkl", ok_pkl, false)]);
    refused(&p, "no OFT tensors found");
    let p = d.join("opcode.bin");
    zip_file(&p, &[("archive/data.pkl", b"\x80\x02I1\n.", false)]);
    refused(&p, "opcode 0x49");

    // A tensor that claims more elements than its storage holds.
    let mut pkl = b"\x80\x02}q\x00X\x03\x00\x00\x00a.Rq\x01ctorch._utils\n_rebuild_tensor_v2\nq\x02((X\x07\x00\x00\x00storageq\x03ctorch\nFloatStorage\nq\x04X\x01\x00\x00\x000q\x05X\x03\x00\x00\x00cpuq\x06K\x04tq\x07Q".to_vec();
    pkl.extend(b"K\x00K\x10K\x10\x86q\x08K\x10K\x01\x86q\tN\x89tq\nRq\x0bs.");
    let p = d.join("short.bin");
    zip_file(
        &p,
        &[
            ("archive/data.pkl", &pkl, false),
            ("archive/data/0", &[0u8; 16], false),
        ],
    );
    refused(&p, "larger than its storage");

    // A pre-1.6 (non-zip) pickle.
    let p = d.join("legacy.pt");
    std::fs::write(&p, b"\x80\x02\x8a\x0alz\xe8j\x19\x9c\xfd\x9c\x0c.").unwrap();
    refused(&p, "not a zip-format PyTorch file");
}
