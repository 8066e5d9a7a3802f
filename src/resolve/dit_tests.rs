//! The diffusion-transformer name tables on real key sets: every weight of FLUX.1-dev, SD3.5
//! Large and Qwen-Image (`tests/data/keys/*.tsv`, from `../shared/keys/`), FLUX.2-dev, Chroma1 and
//! Z-Image (from the libraries' default configs: `tests/data/keys/dit_families.py`) resolves in
//! the other layout, full size; Wan on synthetic keys. (`spec/names/*.tsv`, these tables among them, are
//! tested in `tables.rs`.)

#![allow(clippy::single_range_in_vec_init)]

use super::AliasTable;
use super::dit::BaseLayout;
use crate::model::{ModuleKind, Target};
use std::path::PathBuf;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
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

/// FLUX.2-dev, Chroma1 and Z-Image at full size (the diffusers classes' default configs; original
/// layouts by OneTrainer's conversion, checked by diffusers' converters: `tests/data/keys/dit_families.py`):
/// every weight resolves in the other layout, under the roots checkpoints use.
#[test]
fn full_size_flux2_chroma_z_image_names_resolve_in_the_other_layout() {
    use BaseLayout::*;
    for (name, family) in [
        ("flux2-dev", "flux2"),
        ("chroma1", "chroma"),
        ("z-image", "z-image"),
    ] {
        let d = format!("{name}.diffusers.tsv");
        let o = format!("{name}.original.tsv");
        resolves_across(&d, &o, "", family, Original);
        resolves_across(&d, &o, "model.diffusion_model.", family, Original);
        resolves_across(&o, &d, "", family, Diffusers);
        resolves_across(&o, &d, "transformer.", family, Diffusers);
    }
}

/// The detector on every family's full key set, both layouts: FLUX.1, FLUX.2 and Chroma share
/// most block names; only the modules one of them has may decide.
#[test]
fn each_familys_key_set_is_detected_as_that_family() {
    use BaseLayout::*;
    for (file, family, layout) in [
        ("flux1-dev.diffusers.tsv", "flux1", Diffusers),
        ("flux1-dev.original.tsv", "flux1", Original),
        ("flux2-dev.diffusers.tsv", "flux2", Diffusers),
        ("flux2-dev.original.tsv", "flux2", Original),
        ("chroma1.diffusers.tsv", "chroma", Diffusers),
        ("chroma1.original.tsv", "chroma", Original),
        ("z-image.diffusers.tsv", "z-image", Diffusers),
        ("z-image.original.tsv", "z-image", Original),
        ("sd3.5-large.diffusers.tsv", "sd3", Diffusers),
        ("sd3.5-large.original.tsv", "sd3", Original),
        ("qwen-image.diffusers.tsv", "qwen-image", Diffusers),
    ] {
        let k = keys(file);
        for root in ["", "model.diffusion_model."] {
            let table = AliasTable::with_shapes(
                k.iter().map(|(n, s)| (format!("{root}{n}"), s.as_slice())),
            );
            let d = table.dit().expect("a diffusion transformer");
            assert_eq!(
                (d.family.id, d.layout, d.root),
                (family, layout, root),
                "{file} under `{root}`"
            );
        }
        // An adapter on every module of the family, in the base's own names, says the family.
        let modules: Vec<&str> = k
            .iter()
            .filter_map(|(n, s)| n.strip_suffix(".weight").filter(|_| s.len() == 2))
            .collect();
        let e = super::dit::expected(modules.iter().copied()).unwrap();
        assert!(
            e.families.iter().any(|f| f.id == family) && e.layout == layout,
            "{file}: adapter names say {:?} {:?}",
            e.families.iter().map(|f| f.id).collect::<Vec<_>>(),
            e.layout
        );
    }
}

/// FLUX.2's rows: the double blocks' fused qkv and the swapped final adaLN; the single block's
/// `linear1` is one module in both layouts (no slices).
#[test]
fn full_size_flux2_rows() {
    let orig = keys("flux2-dev.original.tsv");
    let table = AliasTable::with_shapes(orig.iter().map(|(k, s)| (k.as_str(), s.as_slice())));
    let rows = |name: &str| {
        let p = table.resolve_pieces(&target(name)).unwrap();
        assert_eq!(p.len(), 1, "{name}");
        (p[0].key.clone(), p[0].rows.clone())
    };
    assert_eq!(
        rows("transformer_blocks.7.attn.add_v_proj"),
        (
            "double_blocks.7.txt_attn.qkv.weight".into(),
            Some(vec![12288..18432])
        )
    );
    assert_eq!(
        rows("single_transformer_blocks.47.attn.to_qkv_mlp_proj"),
        ("single_blocks.47.linear1.weight".into(), None)
    );
    assert_eq!(
        rows("norm_out.linear"),
        (
            "final_layer.adaLN_modulation.1.weight".into(),
            Some(vec![6144..12288, 0..6144])
        )
    );
    let z = keys("z-image.original.tsv");
    let table = AliasTable::with_shapes(z.iter().map(|(k, s)| (k.as_str(), s.as_slice())));
    let p = table
        .resolve_pieces(&target("lycoris_context_refiner_1_attention_to_k"))
        .unwrap();
    assert_eq!(
        (p[0].key.as_str(), p[0].rows.clone()),
        (
            "context_refiner.1.attention.qkv.weight",
            Some(vec![3840..7680])
        )
    );
}

/// HiDream-I1 (names only, like Qwen-Image): the diffusers names on the ComfyUI checkpoint.
#[test]
fn hidream_names_resolve_under_comfyui_roots() {
    let modules = [
        "double_stream_blocks.0.block.attn1.to_q",
        "double_stream_blocks.0.block.attn1.to_k_t",
        "double_stream_blocks.0.block.ff_i.experts.3.w1",
        "single_stream_blocks.31.block.attn1.to_out",
        "final_layer.linear",
    ];
    let shape = [8usize, 8];
    let table = AliasTable::with_shapes(
        modules
            .iter()
            .map(|m| (format!("model.diffusion_model.{m}.weight"), shape)),
    );
    let d = table.dit().unwrap();
    assert_eq!((d.family.id, d.root), ("hidream", "model.diffusion_model."));
    for m in modules {
        for name in [
            format!("transformer.{m}"),
            format!("diffusion_model.{m}"),
            format!("lycoris_{}", m.replace('.', "_")),
        ] {
            let p = table.resolve_pieces(&target(&name)).unwrap();
            assert_eq!(p[0].key, format!("model.diffusion_model.{m}.weight"));
        }
    }
}
