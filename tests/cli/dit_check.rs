//! Diffusion transformers as users hold them (issue #13's independent check): bases derived
//! from the shipped `fixtures/dit` cases the way checkpoints are downloaded (prefixed single
//! files with VAE and text-encoder tensors beside the transformer, sharded diffusers folders,
//! fp8), adapters of two producers composed, and `convert --json` naming every layer one way.

use crate::common::*;
use assert_cmd::Command;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

type Raw = HashMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

fn dit(case: &str) -> PathBuf {
    repo().join("fixtures/dit").join(case)
}

fn raw(path: &Path) -> Raw {
    let f = MappedFile::open(path).unwrap();
    f.tensors()
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect()
}

fn write_raw(path: &Path, t: &Raw) {
    let views: Vec<(String, TensorView)> = t
        .iter()
        .map(|(n, (d, s, b))| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn oftool(args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::cargo_bin("oftool")
        .unwrap()
        .args(args)
        .output()
        .unwrap()
}

fn ok(o: &std::process::Output) {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Every tensor of `want` within one ulp of its dtype in `got`, under `prefix` + its bare key.
fn same_weights(got: &Path, want: &Path, prefix: &str) {
    let mut names: Vec<String> = raw(want).into_keys().collect();
    names.sort();
    for key in names {
        let (w, _, dtype) = tensor(want, &key);
        // The reference may carry its own prefix: `prefix` replaces it.
        let bare = match prefix {
            "" => key.as_str(),
            _ => (key.strip_prefix("model.").unwrap_or(&key))
                .strip_prefix("diffusion_model.")
                .unwrap_or(&key),
        };
        let (g, _, _) = tensor(got, &format!("{prefix}{bare}"));
        assert!(worst(&g, &w, dtype).0 <= 1.0, "{}: {key}", got.display());
    }
}

/// A full ComfyUI checkpoint (`model.diffusion_model.` transformer beside VAE and text-encoder
/// tensors) and a sharded diffusers transformer given as its index, its folder and the model
/// root: every producer's adapter bakes to its reference, the other tensors untouched.
#[test]
fn bases_as_downloaded_bake_every_producer() {
    let tmp = tempfile::tempdir().unwrap();
    // Original layout: one checkpoint holding more than the transformer.
    let mut full: Raw = raw(&dit("flux1-onetrainer-comfy-original/base.safetensors"))
        .into_iter()
        .map(|(k, v)| (format!("model.diffusion_model.{k}"), v))
        .collect();
    let other = (Dtype::F32, vec![2, 2], vec![0u8; 16]);
    for k in [
        "first_stage_model.decoder.conv_in.weight",
        "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight",
    ] {
        full.insert(k.into(), other.clone());
    }
    let ckpt = tmp.path().join("flux1-dev.safetensors");
    write_raw(&ckpt, &full);
    for case in [
        "flux1-onetrainer-comfy-original",
        "flux1-peft-oft-original",
        "flux1-kohya-original",
        "flux1-onetrainer-split-original",
    ] {
        let json = read_json(&dit(case).join("case.json"));
        let adapter = dit(case).join(json["adapter"].as_str().unwrap());
        let out = tmp.path().join(format!("{case}.safetensors"));
        ok(&oftool(&[
            "merge".as_ref(),
            ckpt.as_os_str(),
            adapter.as_os_str(),
            "-o".as_ref(),
            out.as_os_str(),
            "--quiet".as_ref(),
        ]));
        same_weights(
            &out,
            &dit(case).join("merged.safetensors"),
            "model.diffusion_model.",
        );
        let got = raw(&out);
        assert_eq!(got.len(), full.len(), "{case}");
        assert_eq!(got["first_stage_model.decoder.conv_in.weight"], other);
    }
    // Diffusers layout: FLUX.1-dev's transformer ships in shards with an index.
    let t = raw(&dit("flux1-peft-oft-diffusers/base.safetensors"));
    let mut keys: Vec<&String> = t.keys().collect();
    keys.sort();
    let root = tmp.path().join("FLUX.1-dev");
    let folder = root.join("transformer");
    std::fs::create_dir_all(&folder).unwrap();
    let mut weight_map = serde_json::Map::new();
    let half = keys.len() / 2;
    for (name, part) in [
        (
            "diffusion_pytorch_model-00001-of-00002.safetensors",
            &keys[..half],
        ),
        (
            "diffusion_pytorch_model-00002-of-00002.safetensors",
            &keys[half..],
        ),
    ] {
        let sub: Raw = part.iter().map(|k| ((*k).clone(), t[*k].clone())).collect();
        write_raw(&folder.join(name), &sub);
        for k in part {
            weight_map.insert((*k).clone(), name.into());
        }
    }
    let index = folder.join("diffusion_pytorch_model.safetensors.index.json");
    let json = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(&index, json.to_string()).unwrap();
    std::fs::write(folder.join("config.json"), "{}").unwrap();
    std::fs::write(root.join("model_index.json"), "{}").unwrap();
    for (case, base) in [
        ("flux1-peft-oft-diffusers", &index),
        ("flux1-onetrainer-comfy-diffusers", &folder),
        ("flux1-kohya-diffusers", &root),
        ("flux1-lyco-oft-diffusers", &root),
    ] {
        let json = read_json(&dit(case).join("case.json"));
        let adapter = dit(case).join(json["adapter"].as_str().unwrap());
        let out = tmp.path().join(format!("{case}-out"));
        ok(&oftool(&[
            "merge".as_ref(),
            base.as_os_str(),
            adapter.as_os_str(),
            "-o".as_ref(),
            out.as_os_str(),
            "--quiet".as_ref(),
        ]));
        let shards = if base == &root {
            out.join("transformer")
        } else {
            out.clone()
        };
        let mut got = Raw::new();
        for name in [
            "diffusion_pytorch_model-00001-of-00002.safetensors",
            "diffusion_pytorch_model-00002-of-00002.safetensors",
        ] {
            got.extend(raw(&shards.join(name)));
        }
        let merged = dit(case).join("merged.safetensors");
        for (key, (dtype, _, _)) in raw(&merged) {
            let (w, _, _) = tensor(&merged, &key);
            let (g, _, _) = tensor(&shards.join(weight_map[&key].as_str().unwrap()), &key);
            assert!(
                worst(&g, &w, dtype).0 <= 1.0,
                "{case} on {}: {key}",
                base.display()
            );
        }
        assert_eq!(got.len(), t.len());
    }
}

/// FLUX fp8 checkpoints store weights as F8_E4M3: the bake is refused once, as `unsupported`,
/// naming the dtype and a few tensors, with what to do instead; nothing is written.
#[test]
fn an_fp8_base_is_refused_naming_the_dtype() {
    let tmp = tempfile::tempdir().unwrap();
    let case = "flux1-onetrainer-comfy-original";
    let mut t = raw(&dit(case).join("base.safetensors"));
    for (name, (dtype, shape, bytes)) in t.iter_mut() {
        if name.ends_with(".weight") && shape.len() == 2 {
            *dtype = Dtype::F8_E4M3;
            *bytes = vec![0x38; shape.iter().product()];
        }
    }
    let base = tmp.path().join("flux1-dev-fp8.safetensors");
    write_raw(&base, &t);
    let out = tmp.path().join("out.safetensors");
    let o = oftool(&[
        "merge".as_ref(),
        base.as_os_str(),
        dit(case).join("adapter.safetensors").as_os_str(),
        "-o".as_ref(),
        out.as_os_str(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.starts_with("oftool: error[unsupported]: cannot bake: the base stores 36 targeted weight(s) as F8_E4M3")
            && err.contains("and 33 more")
            && err.contains("hint: oftool does not re-quantize"),
        "{err}"
    );
    assert!(err.len() < 600, "one line, not one per layer: {err}");
    assert!(!out.exists());
}

/// OneTrainer's COMFY adapter rotates the fused qkv (and the final adaLN in the original row
/// order); PEFT's rotates to_q, to_k, to_v apart (and norm_out in the diffusers order). Composed
/// with `--base`, the layers meet on common rows of one tensor without being one layer: the
/// file must stack them, and bakes as applying A then B.
#[test]
fn compose_of_fused_and_split_adapters_bakes_like_both_in_turn() {
    let tmp = tempfile::tempdir().unwrap();
    let a = dit("flux1-onetrainer-comfy-original/adapter.safetensors");
    let b = dit("flux1-peft-oft-original/adapter");
    // Stacked: the 6 fused qkv / linear1 and the final adaLN; split, their 18 q/k/v, 2
    // proj_mlp and norm_out.
    for (base, stacked) in [
        (dit("flux1-onetrainer-comfy-original/base.safetensors"), 7),
        (dit("flux1-peft-oft-diffusers/base.safetensors"), 21),
    ] {
        let ab = tmp.path().join("ab.oft");
        let [composed, in_turn] = ["c", "t"].map(|x| tmp.path().join(format!("{x}.safetensors")));
        for p in [&ab, &composed, &in_turn] {
            let _ = std::fs::remove_file(p);
        }
        let compose = oftool(&[
            "compose".as_ref(),
            a.as_os_str(),
            b.as_os_str(),
            "-o".as_ref(),
            ab.as_os_str(),
            "--base".as_ref(),
            base.as_os_str(),
            "--json".as_ref(),
        ]);
        ok(&compose);
        let summary: serde_json::Value = serde_json::from_slice(&compose.stdout).unwrap();
        assert_eq!(summary["stacked_targets"], stacked, "{}", base.display());
        ok(&oftool(&[
            "merge".as_ref(),
            base.as_os_str(),
            ab.as_os_str(),
            "-o".as_ref(),
            composed.as_os_str(),
        ]));
        ok(&oftool(&[
            "merge".as_ref(),
            base.as_os_str(),
            a.as_os_str(),
            b.as_os_str(),
            "-o".as_ref(),
            in_turn.as_os_str(),
        ]));
        same_weights(&composed, &in_turn, "");
    }
}

/// `convert --json` names every layer by the source's name, the written module in
/// `written_as` — whether the writer renamed it (a diffusers-named LyCORIS layer on its rows of
/// the fused qkv) or not — the same names `inspect --json` gives.
#[test]
fn convert_json_names_every_layer_by_its_source() {
    let tmp = tempfile::tempdir().unwrap();
    for (case, to, base) in [
        (
            "flux1-lyco-oft-diffusers",
            "comfyui",
            "flux1-lyco-oft-original",
        ),
        (
            "flux1-lyco-oft-diffusers",
            "lycoris",
            "flux1-lyco-oft-original",
        ),
        ("flux1-kohya-original", "comfyui", "flux1-kohya-original"),
        (
            "flux1-peft-oft-original",
            "onetrainer",
            "flux1-peft-oft-diffusers",
        ),
        (
            "flux1-onetrainer-comfy-original",
            "diffusers",
            "flux1-onetrainer-comfy-original",
        ),
    ] {
        let json = read_json(&dit(case).join("case.json"));
        let adapter = dit(case).join(json["adapter"].as_str().unwrap());
        let base = dit(base).join("base.safetensors");
        let out = tmp.path().join(format!("{case}-{to}"));
        let o = oftool(&[
            "convert".as_ref(),
            adapter.as_os_str(),
            "--to".as_ref(),
            to.as_ref(),
            "--base".as_ref(),
            base.as_os_str(),
            "-o".as_ref(),
            out.as_os_str(),
            "--json".as_ref(),
        ]);
        ok(&o);
        let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let i = oftool(&["inspect".as_ref(), "--json".as_ref(), adapter.as_os_str()]);
        ok(&i);
        let inspect: serde_json::Value = serde_json::from_slice(&i.stdout).unwrap();
        let mut want: Vec<&str> = inspect["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["target"].as_str().unwrap())
            .collect();
        let mut got: Vec<&str> = report["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                assert!(l["written_as"].is_string(), "{case} --to {to}: {l}");
                l["layer"].as_str().unwrap()
            })
            .collect();
        want.sort_unstable();
        want.dedup();
        got.sort_unstable();
        got.dedup();
        assert_eq!(got, want, "{case} --to {to}");
    }
}

/// A ComfyUI-saved LyCORIS file (`diffusion_model.` + original names, no metadata) with an
/// output-side rotation of the whole fused qkv whose blocks each lie in q, k or v: bakes into
/// the diffusers base tensor by tensor, as the split adapter it equals does. Blocks across
/// the q/k boundary are refused naming the tensors; a split layer that does not fit its rows
/// of the fused weight is named with those rows.
#[test]
fn an_output_side_fused_layer_bakes_into_split_tensors_when_its_blocks_allow() {
    let tmp = tempfile::tempdir().unwrap();
    let src = raw(&dit("flux1-lyco-oft-original/adapter.safetensors"));
    let mut blocks = Vec::new();
    for p in ["to_q", "to_k", "to_v"] {
        let (_, shape, b) = &src[&format!("lycoris_transformer_blocks_0_attn_{p}.oft_blocks")];
        assert_eq!(shape, &[4, 4, 4]);
        blocks.extend_from_slice(b);
    }
    let alpha = src["lycoris_transformer_blocks_0_attn_to_q.alpha"].clone();
    let fused = "diffusion_model.double_blocks.0.img_attn.qkv";
    let mut a = Raw::new();
    a.insert(
        format!("{fused}.oft_blocks"),
        (Dtype::F32, vec![12, 4, 4], blocks),
    );
    a.insert(format!("{fused}.alpha"), alpha.clone());
    let adapter = tmp.path().join("comfy-saved.safetensors");
    write_raw(&adapter, &a);
    for (case, keys) in [
        (
            "flux1-lyco-oft-diffusers",
            vec![
                "transformer_blocks.0.attn.to_q.weight",
                "transformer_blocks.0.attn.to_k.weight",
                "transformer_blocks.0.attn.to_v.weight",
            ],
        ),
        (
            "flux1-lyco-oft-original",
            vec!["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"],
        ),
    ] {
        let base = dit(case).join("base.safetensors");
        let out = tmp.path().join(format!("{case}.safetensors"));
        ok(&oftool(&[
            "merge".as_ref(),
            base.as_os_str(),
            adapter.as_os_str(),
            "-o".as_ref(),
            out.as_os_str(),
        ]));
        let merged = dit(case).join("merged.safetensors");
        for key in keys {
            let (w, _, dtype) = tensor(&merged, key);
            let (g, _, _) = tensor(&out, key);
            assert!(worst(&g, &w, dtype).0 <= 1.0, "{case}: {key}");
        }
        let v = oftool(&[
            "validate".as_ref(),
            "--base".as_ref(),
            base.as_os_str(),
            adapter.as_os_str(),
        ]);
        ok(&v);
    }
    // A binding names one tensor: `convert --base` on the split base says what works instead.
    let oft = tmp.path().join("bound.oft");
    let o = oftool(&[
        "convert".as_ref(),
        adapter.as_os_str(),
        "-o".as_ref(),
        oft.as_os_str(),
        "--base".as_ref(),
        dit("flux1-lyco-oft-diffusers/base.safetensors").as_os_str(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("spans several tensors") && err.contains("hint: convert without --base"),
        "{err}"
    );
    assert!(!oft.exists());
    // Blocks of 12 on 48 rows: the second holds rows of q and k.
    a.insert(
        format!("{fused}.oft_blocks"),
        (Dtype::F32, vec![4, 12, 12], vec![0; 4 * 144 * 4]),
    );
    write_raw(&adapter, &a);
    let out = tmp.path().join("refused.safetensors");
    let base = dit("flux1-lyco-oft-diffusers/base.safetensors");
    let o = oftool(&[
        "merge".as_ref(),
        base.as_os_str(),
        adapter.as_os_str(),
        "-o".as_ref(),
        out.as_os_str(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("error[target-shape]")
            && err.contains("its blocks mix rows of different tensors")
            && err.contains("transformer_blocks.0.attn.to_k.weight"),
        "{err}"
    );
    assert!(!out.exists());
    // A diffusers-named split (to_q: 3 blocks of 5 = 15 rows) on the original base's 16 q rows.
    let mut s = Raw::new();
    let q = "lycoris_transformer_blocks_0_attn_to_q";
    s.insert(
        format!("{q}.oft_blocks"),
        (Dtype::F32, vec![3, 5, 5], vec![0; 75 * 4]),
    );
    s.insert(format!("{q}.alpha"), alpha);
    write_raw(&adapter, &s);
    let base = dit("flux1-lyco-oft-original/base.safetensors");
    let o = oftool(&[
        "merge".as_ref(),
        base.as_os_str(),
        adapter.as_os_str(),
        "-o".as_ref(),
        out.as_os_str(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(
            "rotates 3 × 5 = 15 output features, but rows 0..16 of \
             `model.diffusion_model.double_blocks.0.img_attn.qkv.weight` have shape [16, 16]"
        ),
        "{err}"
    );
    assert!(!out.exists());
}

/// `convert -o .oft --base` binds each layer to one tensor: OneTrainer's COMFY rotation of a
/// fused qkv on a diffusers base becomes the q, k, v layers it is there, bound and baked as
/// the adapter itself bakes.
#[test]
fn a_fused_adapter_binds_to_a_diffusers_base() {
    let tmp = tempfile::tempdir().unwrap();
    let case = dit("flux1-onetrainer-comfy-diffusers");
    let base = case.join("base.safetensors");
    let oft = tmp.path().join("bound.oft");
    ok(&oftool(&[
        "convert".as_ref(),
        case.join("adapter.safetensors").as_os_str(),
        "-o".as_ref(),
        oft.as_os_str(),
        "--base".as_ref(),
        base.as_os_str(),
    ]));
    let out = tmp.path().join("out.safetensors");
    ok(&oftool(&[
        "merge".as_ref(),
        base.as_os_str(),
        oft.as_os_str(),
        "-o".as_ref(),
        out.as_os_str(),
    ]));
    same_weights(&out, &case.join("merged.safetensors"), "");
    let i = oftool(&["inspect".as_ref(), "--json".as_ref(), oft.as_os_str()]);
    let i: serde_json::Value = serde_json::from_slice(&i.stdout).unwrap();
    let layers = i["layers"].as_array().unwrap();
    assert!(layers.iter().all(|l| l["base_binding"] == true), "{i}");
    assert!(
        layers
            .iter()
            .any(|l| l["target"] == "transformer_blocks.0.attn.to_k")
    );
}
