//! Diffusion transformers: every `fixtures/dit/` case baked by the real binary into its base
//! (diffusers or original single-file layout) equals the producer's merged weights, and the
//! name tables map every weight of real FLUX.1-dev / SD3.5 Large / Qwen-Image checkpoints
//! (`tests/data/keys/*.tsv`, from `../shared/keys/`) between the two layouts, full size.

#![allow(clippy::single_range_in_vec_init)]

#[allow(unused_imports)]
use crate::common;

use crate::common::*;
use assert_cmd::Command;
use oftool::model::{ModuleKind, RowRange, Target};
use oftool::resolve::AliasTable;
use oftool::resolve::dit::BaseLayout;
use safetensors::tensor::Dtype;
use std::collections::HashMap;
use std::path::PathBuf;

/// Every tensor of a safetensors file as (values, shape, dtype), read once.
fn all(path: &std::path::Path) -> HashMap<String, (Vec<f64>, Vec<usize>, Dtype)> {
    let f = oftool::tensors::MappedFile::open(path).expect("opens");
    f.tensors()
        .tensors()
        .into_iter()
        .map(|(k, v)| {
            let values = oftool::tensors::to_f64(&v, &k).expect("float tensor");
            (k, (values, v.shape().to_vec(), v.dtype()))
        })
        .collect()
}

fn dit_cases() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(repo().join("fixtures").join("dit"))
        .expect("fixtures/dit exists")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.join("case.json").is_file())
        .collect();
    v.sort();
    v
}

#[test]
fn every_dit_case_bakes_to_its_reference_through_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = dit_cases();
    assert!(cases.len() >= 48, "found {} cases", cases.len());
    let mut failures = Vec::new();
    for dir in &cases {
        let label = dir.file_name().unwrap().to_string_lossy().to_string();
        let case = read_json(&dir.join("case.json"));
        let base = dir.join(case["base"].as_str().unwrap());
        let merged = dir.join(case["merged"].as_str().unwrap());
        let adapter = dir.join(case["adapter"].as_str().unwrap());
        let out = tmp.path().join(format!("{label}.safetensors"));
        let o = Command::cargo_bin("oftool")
            .unwrap()
            .arg("merge")
            .arg(&base)
            .arg(&adapter)
            .arg("-o")
            .arg(&out)
            .arg("--json")
            .output()
            .unwrap();
        if !o.status.success() {
            failures.push(format!("{label}: {}", String::from_utf8_lossy(&o.stderr)));
            continue;
        }
        // validate --base checks every slice; inspect names the family the names belong to.
        let v = Command::cargo_bin("oftool")
            .unwrap()
            .args(["validate", "--json", "--base"])
            .arg(&base)
            .arg(&adapter)
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&v.stdout).unwrap();
        if v["valid"] != true {
            failures.push(format!("{label}: validate --base: {}", v["problems"]));
        }
        let i = Command::cargo_bin("oftool")
            .unwrap()
            .args(["inspect", "--json"])
            .arg(&adapter)
            .output()
            .unwrap();
        let i: serde_json::Value = serde_json::from_slice(&i.stdout).unwrap();
        let family = match case["family"].as_str().unwrap() {
            "sd35" => "sd3",
            "qwen" => "qwen-image",
            "hunyuan" => "hunyuan-video",
            f => f,
        };
        let families = &i["model"]["families"];
        if !families
            .as_array()
            .is_some_and(|f| f.iter().any(|x| x == family))
        {
            failures.push(format!("{label}: inspect names {families}, not {family}"));
        }
        let (got_all, want_all, base_all) = (all(&out), all(&merged), all(&base));
        let mut keys: Vec<&String> = want_all.keys().collect();
        keys.sort();
        let touched: std::collections::BTreeSet<&str> = case["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["base_key"].as_str().unwrap())
            .collect();
        for key in keys {
            let (g, gs, gd) = &got_all[key];
            let (w, ws, wd) = &want_all[key];
            assert_eq!((gs, gd), (ws, wd), "{label} {key}");
            if touched.contains(key.as_str()) {
                let (ratio, i) = worst(g, w, *wd);
                if ratio > 1.0 {
                    failures.push(format!(
                        "{label} {key}: element {i}: oftool {} vs reference {} ({ratio:.2}× tolerance)",
                        g[i], w[i]
                    ));
                }
            } else if g
                .iter()
                .map(|x| x.to_bits())
                .ne(w.iter().map(|x| x.to_bits()))
            {
                failures.push(format!("{label} {key}: untouched tensor changed"));
            }
        }
        for key in &touched {
            assert!(
                base_all[*key].0 != want_all[*key].0,
                "{label} {key}: the reference equals the base"
            );
        }
    }
    assert!(
        failures.is_empty(),
        "{} problem(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// An adapter for another family: every layer is named as missing (validate and merge).
#[test]
fn another_familys_base_is_refused_naming_the_layers() {
    let dit = repo().join("fixtures/dit");
    let adapter = dit.join("flux1-kohya-original/adapter.safetensors");
    let base = dit.join("sd35-onetrainer-comfy/base.safetensors");
    let o = Command::cargo_bin("oftool")
        .unwrap()
        .args(["validate", "--json", "--base"])
        .arg(&base)
        .arg(&adapter)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let problems = v["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 40);
    assert!(problems.iter().all(|p| p["check"] == "target-missing"));
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.safetensors");
    let o = Command::cargo_bin("oftool")
        .unwrap()
        .arg("merge")
        .arg(&base)
        .arg(&adapter)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("target-missing") && err.contains("oft_unet_single_blocks_1_linear1"),
        "{err}"
    );
    assert!(!out.exists());
}

/// Adapters whose layers cover rows of a fused weight or land on several tensors keep that
/// through `.oft` and `compose` (kohya's splits share one name: they must not be stacked).
#[test]
fn row_slices_survive_oft_and_compose() {
    let tmp = tempfile::tempdir().unwrap();
    for case in [
        "flux1-kohya-diffusers",
        "flux1-kohya-original",
        "flux1-onetrainer-comfy-diffusers",
        "flux1-lyco-oft-full-rescaled-original",
    ] {
        let dir = repo().join("fixtures/dit").join(case);
        let json = read_json(&dir.join("case.json"));
        let adapter = dir.join(json["adapter"].as_str().unwrap());
        let base = dir.join("base.safetensors");
        let oft = tmp.path().join(format!("{case}.oft"));
        let run = |args: &[&std::ffi::OsStr]| {
            let o = Command::cargo_bin("oftool")
                .unwrap()
                .args(args)
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "{case}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        };
        run(&[
            "convert".as_ref(),
            adapter.as_os_str(),
            "-o".as_ref(),
            oft.as_os_str(),
        ]);
        let twice = tmp.path().join(format!("{case}.twice.oft"));
        run(&[
            "compose".as_ref(),
            oft.as_os_str(),
            adapter.as_os_str(),
            "-o".as_ref(),
            twice.as_os_str(),
        ]);
        let [a, b, c] = ["a", "b", "c"].map(|x| tmp.path().join(format!("{case}.{x}.safetensors")));
        run(&[
            "merge".as_ref(),
            base.as_os_str(),
            oft.as_os_str(),
            "-o".as_ref(),
            a.as_os_str(),
        ]);
        run(&[
            "merge".as_ref(),
            base.as_os_str(),
            adapter.as_os_str(),
            adapter.as_os_str(),
            "-o".as_ref(),
            b.as_os_str(),
        ]);
        run(&[
            "merge".as_ref(),
            base.as_os_str(),
            twice.as_os_str(),
            "-o".as_ref(),
            c.as_os_str(),
        ]);
        let merged = dir.join("merged.safetensors");
        let names = oftool::tensors::MappedFile::open(&merged).unwrap();
        for key in names.tensors().names() {
            let (want, _, dtype) = tensor(&merged, key);
            let (got, _, _) = tensor(&a, key);
            assert!(
                worst(&got, &want, dtype).0 <= 1.0,
                "{case} {key}: .oft bake"
            );
            let (twice_seq, _, _) = tensor(&b, key);
            let (twice_composed, _, _) = tensor(&c, key);
            assert!(
                worst(&twice_composed, &twice_seq, dtype).0 <= 1.0,
                "{case} {key}: composed ≠ applied twice"
            );
        }
    }
}

/// `name<TAB>[d0, d1, …]` lines.
fn keys(file: &str) -> Vec<(String, Vec<usize>)> {
    let text = std::fs::read_to_string(repo().join("tests/data/keys").join(file)).unwrap();
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (k, s) = l.split_once('\t').unwrap();
            let dims = s
                .trim_matches(|c| c == '[' || c == ']')
                .split(',')
                .filter(|d| !d.trim().is_empty())
                .map(|d| d.trim().parse().unwrap())
                .collect();
            (k.to_string(), dims)
        })
        .collect()
}

fn target(name: &str) -> Target {
    Target {
        name: name.into(),
        convention: "test".into(),
        component: None,
        module: ModuleKind::Unknown,
        shape: None,
        rotated_dim: None,
        rows: None,
    }
}

/// Every weight matrix of `from` resolves, by its module name (dotted under each root adapters
/// use, and flattened), in a table of `to` keys under `prefix`, to as many rows as it has.
fn resolves_across(from: &str, to: &str, prefix: &str, family: &str, layout: BaseLayout) {
    let to_keys = keys(to);
    let shapes: std::collections::HashMap<String, Vec<usize>> = to_keys
        .iter()
        .map(|(k, s)| (format!("{prefix}{k}"), s.clone()))
        .collect();
    let table = AliasTable::with_shapes(shapes.iter().map(|(k, s)| (k.as_str(), s.as_slice())));
    let d = table.dit().expect("a diffusion transformer");
    assert_eq!((d.family.id, d.layout, d.root), (family, layout, prefix));
    let mut n = 0;
    for (key, shape) in keys(from) {
        let Some(module) = key.strip_suffix(".weight") else {
            continue;
        };
        if shape.len() < 2 {
            continue;
        }
        for name in [
            module.to_string(),
            format!("transformer.{module}"),
            format!("diffusion_model.{module}"),
            format!("lycoris_{}", module.replace('.', "_")),
            format!("lora_unet_{}", module.replace('.', "_")),
        ] {
            let pieces = table
                .resolve_pieces(&target(&name))
                .unwrap_or_else(|c| panic!("{from} → {to}: `{name}` does not resolve: {c:?}"));
            let rows: usize = pieces
                .iter()
                .map(|p| match &p.rows {
                    None => shapes[&p.key][0],
                    Some(r) => r.iter().map(|r| r.len()).sum(),
                })
                .sum();
            assert_eq!(rows, shape[0], "{from} → {to}: `{name}` rows");
            for p in &pieces {
                let cols: usize = shapes[&p.key][1..].iter().product();
                assert_eq!(cols, shape[1..].iter().product::<usize>(), "`{name}` cols");
            }
        }
        n += 1;
    }
    assert!(n > 100, "{from}: only {n} weights");
}

#[test]
fn full_size_flux_and_sd35_names_resolve_in_the_other_layout() {
    use BaseLayout::*;
    let flux = ("flux1-dev.diffusers.tsv", "flux1-dev.original.tsv");
    resolves_across(flux.0, flux.1, "", "flux1", Original);
    resolves_across(flux.0, flux.1, "model.diffusion_model.", "flux1", Original);
    resolves_across(flux.1, flux.0, "", "flux1", Diffusers);
    resolves_across(flux.1, flux.0, "transformer.", "flux1", Diffusers);
    let sd = ("sd3.5-large.diffusers.tsv", "sd3.5-large.original.tsv");
    resolves_across(sd.0, sd.1, "model.diffusion_model.", "sd3", Original);
    resolves_across(sd.1, sd.0, "", "sd3", Diffusers);
    // Qwen-Image keeps its names: ComfyUI's checkpoint layout is the diffusers one, prefixed.
    let q = "qwen-image.diffusers.tsv";
    resolves_across(q, q, "", "qwen-image", Diffusers);
    resolves_across(q, q, "model.diffusion_model.", "qwen-image", Diffusers);
}

#[test]
fn full_size_rows_of_fused_and_swapped_tensors() {
    let orig: Vec<(String, Vec<usize>)> = keys("flux1-dev.original.tsv");
    let table = AliasTable::with_shapes(orig.iter().map(|(k, s)| (k.as_str(), s.as_slice())));
    let rows = |name: &str| {
        let p = table.resolve_pieces(&target(name)).unwrap();
        assert_eq!(p.len(), 1, "{name}");
        (p[0].key.clone(), p[0].rows.clone())
    };
    assert_eq!(
        rows("transformer_blocks.18.attn.to_k"),
        (
            "double_blocks.18.img_attn.qkv.weight".into(),
            Some(vec![3072..6144])
        )
    );
    assert_eq!(
        rows("single_transformer_blocks.37.proj_mlp"),
        (
            "single_blocks.37.linear1.weight".into(),
            Some(vec![9216..21504])
        )
    );
    assert_eq!(
        rows("norm_out.linear"),
        (
            "final_layer.adaLN_modulation.1.weight".into(),
            Some(vec![3072..6144, 0..3072])
        )
    );
    // The other way: a fused name is the split tensors, end to end.
    let diff = keys("flux1-dev.diffusers.tsv");
    let table = AliasTable::with_shapes(diff.iter().map(|(k, s)| (k.as_str(), s.as_slice())));
    let p = table
        .resolve_pieces(&target("oft_unet_single_blocks_0_linear1"))
        .unwrap();
    let got: Vec<(&str, Option<Vec<std::ops::Range<usize>>>)> =
        p.iter().map(|p| (p.key.as_str(), p.rows.clone())).collect();
    assert_eq!(
        got,
        [
            (
                "single_transformer_blocks.0.attn.to_q.weight",
                Some(vec![0..3072])
            ),
            (
                "single_transformer_blocks.0.attn.to_k.weight",
                Some(vec![0..3072])
            ),
            (
                "single_transformer_blocks.0.attn.to_v.weight",
                Some(vec![0..3072])
            ),
            (
                "single_transformer_blocks.0.proj_mlp.weight",
                Some(vec![0..12288])
            ),
        ]
    );
    // SD3.5 Large: only the last block's context adaLN is swapped (two chunks).
    let sd = keys("sd3.5-large.original.tsv");
    let table = AliasTable::with_shapes(sd.iter().map(|(k, s)| (k.as_str(), s.as_slice())));
    let p = table
        .resolve_pieces(&target("transformer_blocks.37.norm1_context.linear"))
        .unwrap();
    assert_eq!(p[0].rows, Some(vec![2432..4864, 0..2432]));
    let p = table
        .resolve_pieces(&target("transformer_blocks.36.norm1_context.linear"))
        .unwrap();
    assert_eq!(p[0].rows, None);
    let _ = RowRange { start: 0, len: 0 };
}

/// Wan 2.x (names only): SimpleTuner's diffusers names on a Wan-AI / ComfyUI checkpoint, and
/// the original names on a diffusers one.
#[test]
fn wan_names_resolve_both_ways() {
    let original = [
        ("blocks.0.self_attn.q.weight", "blocks.0.attn1.to_q"),
        ("blocks.0.cross_attn.o.weight", "blocks.0.attn2.to_out.0"),
        ("blocks.1.ffn.0.weight", "blocks.1.ffn.net.0.proj"),
        ("head.head.weight", "proj_out"),
        ("time_projection.1.weight", "condition_embedder.time_proj"),
    ];
    let shape = [8usize, 8];
    let table = AliasTable::with_shapes(
        original
            .iter()
            .map(|(k, _)| (format!("model.diffusion_model.{k}"), shape)),
    );
    assert_eq!(table.dit().unwrap().family.id, "wan");
    let diffusers =
        AliasTable::with_shapes(original.iter().map(|(_, d)| (format!("{d}.weight"), shape)));
    assert_eq!(diffusers.dit().unwrap().layout, BaseLayout::Diffusers);
    for (key, d) in original {
        let p = table
            .resolve_pieces(&target(&format!("lycoris_{}", d.replace('.', "_"))))
            .unwrap();
        assert_eq!(p[0].key, format!("model.diffusion_model.{key}"));
        let o = key.strip_suffix(".weight").unwrap();
        let p = diffusers
            .resolve_pieces(&target(&format!("diffusion_model.{o}")))
            .unwrap();
        assert_eq!(p[0].key, format!("{d}.weight"));
    }
}

/// `spec/names/<family>.tsv` is the name table the code uses.
#[test]
fn spec_name_tables_match_the_code() {
    let dir = repo().join("spec/names");
    for family in oftool::resolve::dit::FAMILIES {
        let path = dir.join(format!("{}.tsv", family.id));
        let want = family.table();
        if std::env::var_os("OFTOOL_BLESS").is_some() {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, &want).unwrap();
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert_eq!(
            have,
            want,
            "{} differs from the code (OFTOOL_BLESS=1 rewrites)",
            path.display()
        );
    }
}
