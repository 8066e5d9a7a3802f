//! Name resolution against realistic key sets: full SD1.5 / SD2 / SDXL single-file checkpoints
//! and diffusers U-Net / text-encoder files (`tests/data/keys/`, written by its `generate.py`
//! from diffusers/transformers models built on the meta device; the ldm↔diffusers pairs there
//! were checked against diffusers' own single-file converters).

#![allow(clippy::needless_range_loop)]

use crate::model::{ModuleKind, Target};
use crate::resolve::{AliasTable, Resolved};
use std::path::PathBuf;

fn data(name: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/keys")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// `key <TAB> d0,d1,…` lines.
fn keys(name: &str) -> Vec<(String, Vec<usize>)> {
    data(name)
        .lines()
        .map(|l| {
            let (k, s) = l.split_once('\t').expect("key<TAB>shape");
            let shape = s
                .split(',')
                .filter(|d| !d.is_empty())
                .map(|d| d.parse().expect("dimension"))
                .collect();
            (k.to_string(), shape)
        })
        .collect()
}

fn table(keys: &[(String, Vec<usize>)]) -> AliasTable {
    AliasTable::with_shapes(keys.iter().map(|(k, s)| (k.as_str(), s.as_slice())))
}

/// `diffusers key <TAB> ldm key` of every U-Net weight (module names, `.weight` stripped).
fn unet_pairs(name: &str) -> Vec<(String, String)> {
    data(name)
        .lines()
        .filter_map(|l| {
            let (d, s) = l.split_once('\t').expect("pair");
            Some((
                d.strip_suffix(".weight")?.to_string(),
                s.strip_suffix(".weight")?.to_string(),
            ))
        })
        .collect()
}

struct TePair {
    component: String,
    /// HF module name, with `text_model.` (or `text_projection`).
    module: String,
    key: String,
    rows: Option<(usize, usize)>,
}

fn te_pairs(name: &str) -> Vec<TePair> {
    data(name)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            let module = f[1].strip_suffix(".weight")?.to_string();
            let rows = (!f[3].is_empty()).then(|| (f[3].parse().unwrap(), f[4].parse().unwrap()));
            Some(TePair {
                component: f[0].to_string(),
                module,
                key: f[2].to_string(),
                rows,
            })
        })
        .collect()
}

fn target(name: &str, convention: &str, component: Option<&str>) -> Target {
    Target {
        name: name.to_string(),
        convention: convention.to_string(),
        component: component.map(str::to_string),
        module: ModuleKind::Unknown,
        shape: None,
        rotated_dim: None,
        rows: None,
    }
}

fn flat(s: &str) -> String {
    s.replace('.', "_")
}

fn at(key: &str) -> Result<Resolved, Vec<String>> {
    Ok(Resolved {
        key: key.to_string(),
        rows: None,
    })
}

/// Every name an adapter may give a U-Net module with diffusers name `d` / ldm name `s`.
fn unet_names(d: &str, s: &str) -> Vec<(String, &'static str, Option<&'static str>)> {
    vec![
        (d.to_string(), "peft", Some("unet")),
        (format!("base_model.model.{d}"), "peft", Some("unet")),
        (d.to_string(), "peft", None),
        (format!("unet.{d}"), "diffusers", None),
        (format!("lora_unet_{}", flat(d)), "kohya", Some("unet")),
        (format!("lycoris_{}", flat(d)), "lycoris", None),
        (format!("oft_unet_{}", flat(d)), "kohya", None),
        (format!("lora_unet_{}", flat(s)), "kohya", Some("unet")),
        (format!("lycoris_{}", flat(s)), "lycoris", None),
        (format!("diffusion_model.{s}"), "comfyui", Some("unet")),
        (s.to_string(), "ldm", None),
    ]
}

fn check_unet(
    base: &AliasTable,
    pairs: &[(String, String)],
    key_of: impl Fn(&str, &str) -> String,
) {
    assert!(pairs.len() > 300);
    for (d, s) in pairs {
        let want = at(&key_of(d, s));
        for (name, conv, comp) in unet_names(d, s) {
            assert_eq!(
                base.resolve(&target(&name, conv, comp)),
                want,
                "{name} ({conv}, {comp:?})"
            );
        }
    }
}

#[test]
fn sd15_single_file_unet_every_name() {
    let base = table(&keys("sd15_single.txt"));
    check_unet(&base, &unet_pairs("sd15_unet_pairs.txt"), |_, s| {
        format!("model.diffusion_model.{s}.weight")
    });
}

#[test]
fn sdxl_single_file_unet_every_name() {
    let base = table(&keys("sdxl_single.txt"));
    check_unet(&base, &unet_pairs("sdxl_unet_pairs.txt"), |_, s| {
        format!("model.diffusion_model.{s}.weight")
    });
}

#[test]
fn sd2_single_file_unet_every_name() {
    // SD2's U-Net has SD1.5's names.
    let base = table(&keys("sd2_single.txt"));
    check_unet(&base, &unet_pairs("sd15_unet_pairs.txt"), |_, s| {
        format!("model.diffusion_model.{s}.weight")
    });
}

#[test]
fn comfyui_diffusion_model_file_every_name() {
    for model in ["sd15", "sdxl"] {
        let ks: Vec<(String, Vec<usize>)> = keys(&format!("{model}_single.txt"))
            .into_iter()
            .filter_map(|(k, s)| Some((k.strip_prefix("model.")?.to_string(), s)))
            .filter(|(k, _)| k.starts_with("diffusion_model."))
            .collect();
        let base = table(&ks);
        check_unet(
            &base,
            &unet_pairs(&format!("{model}_unet_pairs.txt")),
            |_, s| format!("diffusion_model.{s}.weight"),
        );
    }
}

#[test]
fn diffusers_unet_files_every_name() {
    for model in ["sd15", "sdxl"] {
        let bare = keys(&format!("{model}_diffusers_unet.txt"));
        let pairs = unet_pairs(&format!("{model}_unet_pairs.txt"));
        check_unet(&table(&bare), &pairs, |d, _| format!("{d}.weight"));
        let prefixed: Vec<(String, Vec<usize>)> = bare
            .iter()
            .map(|(k, s)| (format!("unet.{k}"), s.clone()))
            .collect();
        check_unet(&table(&prefixed), &pairs, |d, _| format!("unet.{d}.weight"));
        // Keys only (no shapes) resolve the same.
        let names = AliasTable::new(bare.iter().map(|(k, _)| k.as_str()));
        check_unet(&names, &pairs, |d, _| format!("{d}.weight"));
    }
}

#[test]
fn spot_checks_from_the_brief() {
    let sd15 = table(&keys("sd15_single.txt"));
    let sdxl = table(&keys("sdxl_single.txt"));
    let cases: [(&AliasTable, &str, Option<&str>, &str); 12] = [
        (
            &sd15,
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
            Some("unet"),
            "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
        ),
        (
            &sd15,
            "down_blocks.0.resnets.0.conv1",
            None,
            "input_blocks.1.0.in_layers.2",
        ),
        (
            &sd15,
            "down_blocks.0.resnets.1.conv2",
            None,
            "input_blocks.2.0.out_layers.3",
        ),
        (
            &sd15,
            "down_blocks.1.resnets.0.time_emb_proj",
            None,
            "input_blocks.4.0.emb_layers.1",
        ),
        (
            &sd15,
            "down_blocks.1.resnets.0.conv_shortcut",
            None,
            "input_blocks.4.0.skip_connection",
        ),
        (
            &sd15,
            "down_blocks.2.downsamplers.0.conv",
            None,
            "input_blocks.9.0.op",
        ),
        (
            &sd15,
            "up_blocks.0.upsamplers.0.conv",
            None,
            "output_blocks.2.1.conv",
        ),
        (
            &sd15,
            "up_blocks.1.upsamplers.0.conv",
            None,
            "output_blocks.5.2.conv",
        ),
        (&sd15, "conv_out", None, "out.2"),
        (
            &sdxl,
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
            Some("unet"),
            "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
        ),
        (&sdxl, "add_embedding.linear_2", None, "label_emb.0.2"),
        (
            &sdxl,
            "mid_block.attentions.0.transformer_blocks.9.ff.net.2",
            None,
            "middle_block.1.transformer_blocks.9.ff.net.2",
        ),
    ];
    for (base, name, comp, s) in cases {
        assert_eq!(
            base.resolve(&target(name, "x", comp)),
            at(&format!("model.diffusion_model.{s}.weight")),
            "{name}"
        );
    }
}

/// Every name an adapter may give a text-encoder module, for the encoder `component` of a
/// checkpoint with `encoders` text encoders.
fn te_names(module: &str, component: &str, encoders: usize) -> Vec<(String, Option<String>)> {
    let bare = module.strip_prefix("text_model.").unwrap_or(module);
    let comp = Some(component.to_string());
    let mut v = vec![
        (module.to_string(), comp.clone()),
        (format!("base_model.model.{module}"), comp.clone()),
        (bare.to_string(), comp.clone()),
        (format!("{component}.{module}"), None),
        (format!("{component}.{bare}"), None),
    ];
    let flats: &[&str] = match (component, encoders) {
        ("text_encoder", 1) => &["lora_te_", "lora_te1_"],
        ("text_encoder", _) => &["lora_te1_", "lora_te_"],
        _ => &["lora_te2_"],
    };
    for p in flats {
        v.push((format!("{p}{}", flat(module)), comp.clone()));
        v.push((format!("{p}{}", flat(module)), None));
    }
    v
}

fn check_te(
    base: &AliasTable,
    pairs: &[TePair],
    encoders: usize,
    key_of: impl Fn(&TePair) -> String,
) {
    assert!(!pairs.is_empty());
    for p in pairs {
        let want = Ok(Resolved {
            key: key_of(p),
            rows: p.rows,
        });
        for (name, comp) in te_names(&p.module, &p.component, encoders) {
            assert_eq!(
                base.resolve(&target(&name, "x", comp.as_deref())),
                want,
                "{name} ({comp:?})"
            );
        }
    }
}

#[test]
fn sd15_single_file_text_encoder() {
    let base = table(&keys("sd15_single.txt"));
    let pairs = te_pairs("sd15_te_pairs.txt");
    assert_eq!(pairs.len(), 12 * 8 + 3);
    check_te(&base, &pairs, 1, |p| p.key.clone());
}

#[test]
fn sd2_single_file_open_clip() {
    let base = table(&keys("sd2_single.txt"));
    let pairs = te_pairs("sd2_te_pairs.txt");
    check_te(&base, &pairs, 1, |p| p.key.clone());
    assert_eq!(
        base.resolve(&target(
            "lora_te_text_model_encoder_layers_22_self_attn_v_proj",
            "kohya",
            Some("text_encoder")
        )),
        Ok(Resolved {
            key: "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight".into(),
            rows: Some((2048, 1024)),
        })
    );
    // SD2 has one text encoder.
    assert_eq!(
        base.resolve(&target(
            "text_model.encoder.layers.0.mlp.fc1",
            "peft",
            Some("text_encoder_2")
        )),
        Err(vec![])
    );
}

#[test]
fn sdxl_single_file_both_text_encoders() {
    let base = table(&keys("sdxl_single.txt"));
    let pairs = te_pairs("sdxl_te_pairs.txt");
    assert!(pairs.iter().any(|p| p.rows.is_some()));
    check_te(&base, &pairs, 2, |p| p.key.clone());
    let q = |i: usize, d: usize| {
        base.resolve(&target(
            &format!(
                "lora_te2_text_model_encoder_layers_{i}_self_attn_{}_proj",
                ["q", "k", "v"][d]
            ),
            "kohya",
            Some("text_encoder_2"),
        ))
    };
    for (d, start) in [(0, 0), (1, 1280), (2, 2560)] {
        assert_eq!(
            q(31, d),
            Ok(Resolved {
                key: "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"
                    .into(),
                rows: Some((start, 1280)),
            })
        );
    }
    assert_eq!(
        base.resolve(&target(
            "lora_te2_text_model_encoder_layers_0_mlp_fc1",
            "kohya",
            None
        )),
        at("conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight")
    );
    assert_eq!(
        base.resolve(&target(
            "encoder.layers.0.mlp.fc2",
            "peft",
            Some("text_encoder_2")
        )),
        at("conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_proj.weight")
    );
    assert_eq!(
        base.resolve(&target(
            "encoder.layers.5.self_attn.out_proj",
            "peft",
            Some("text_encoder")
        )),
        at(
            "conditioner.embedders.0.transformer.text_model.encoder.layers.5.self_attn.out_proj.weight"
        )
    );
    // Without a component a PEFT name fits both encoders' layers 0..11.
    let both = base.resolve(&target("text_model.encoder.layers.3.mlp.fc1", "peft", None));
    assert_eq!(
        both,
        Err(vec![
            "conditioner.embedders.0.transformer.text_model.encoder.layers.3.mlp.fc1.weight"
                .to_string(),
            "conditioner.embedders.1.model.transformer.resblocks.3.mlp.c_fc.weight".to_string(),
        ])
    );
    // The first encoder has 12 layers only.
    assert_eq!(
        base.resolve(&target(
            "lora_te1_text_model_encoder_layers_20_mlp_fc1",
            "kohya",
            None
        )),
        Err(vec![])
    );
}

#[test]
fn fused_slices_need_shapes() {
    let ks = keys("sdxl_single.txt");
    let names = AliasTable::new(ks.iter().map(|(k, _)| k.as_str()));
    let fused = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight";
    assert_eq!(
        names.resolve(&target(
            "lora_te2_text_model_encoder_layers_0_self_attn_k_proj",
            "kohya",
            Some("text_encoder_2")
        )),
        Err(vec![fused.to_string()])
    );
    // Unfused modules resolve without shapes.
    assert_eq!(
        names.resolve(&target(
            "lora_te2_text_model_encoder_layers_0_self_attn_out_proj",
            "kohya",
            None
        )),
        at("conditioner.embedders.1.model.transformer.resblocks.0.attn.out_proj.weight")
    );
    // The fused tensor is reachable whole by its own name.
    let shaped = table(&ks);
    assert_eq!(
        shaped.resolve(&target(
            "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj",
            "x",
            None
        )),
        at(fused)
    );
}

#[test]
fn diffusers_text_encoder_files_tf4_and_tf5() {
    let pairs = te_pairs("sd15_te_pairs.txt");
    let prefix = "cond_stage_model.transformer.";
    // transformers 4 keeps `text_model.`; transformers 5's CLIPTextModel drops it.
    let tf4: Vec<(String, Vec<usize>)> = keys("sd15_single.txt")
        .into_iter()
        .filter_map(|(k, s)| Some((k.strip_prefix(prefix)?.to_string(), s)))
        .collect();
    let tf5: Vec<(String, Vec<usize>)> = tf4
        .iter()
        .map(|(k, s)| {
            (
                k.strip_prefix("text_model.").unwrap_or(k).to_string(),
                s.clone(),
            )
        })
        .collect();
    for (base, strip) in [(table(&tf4), false), (table(&tf5), true)] {
        for component in ["text_encoder", "text_encoder_2"] {
            for p in &pairs {
                let key = p.key.strip_prefix(prefix).unwrap();
                let key = if strip {
                    key.strip_prefix("text_model.").unwrap_or(key)
                } else {
                    key
                };
                let bare = p.module.strip_prefix("text_model.").unwrap();
                for (name, comp) in [
                    (p.module.clone(), Some(component)),
                    (bare.to_string(), Some(component)),
                    (p.module.clone(), None),
                    (format!("{component}.{}", p.module), None),
                    (format!("lora_te_{}", flat(&p.module)), None),
                    (format!("lora_te1_{}", flat(&p.module)), None),
                    (format!("lora_te2_{}", flat(&p.module)), None),
                ] {
                    assert_eq!(base.resolve(&target(&name, "x", comp)), at(key), "{name}");
                }
                assert_eq!(
                    base.resolve(&target(&p.module, "x", Some("unet"))),
                    Err(vec![])
                );
            }
        }
    }
}

#[test]
fn missing_targets() {
    let base = table(&keys("sd15_single.txt"));
    for (name, comp) in [
        ("down_blocks.9.resnets.0.conv1", None),
        ("lora_unet_down_blocks_0_resnets_0_conv9", None),
        ("down_blocks.0.resnets.0", None),
        // a U-Net name under a text-encoder component
        ("down_blocks.0.resnets.0.conv1", Some("text_encoder")),
        ("text_model.encoder.layers.0.mlp.fc1", Some("unet")),
        ("lora_te2_text_model_encoder_layers_0_mlp_fc1", None),
        // flattened names are looked up whole, never split on `_`
        (
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to",
            None,
        ),
        ("", None),
    ] {
        assert_eq!(
            base.resolve(&target(name, "x", comp)),
            Err(vec![]),
            "{name}"
        );
    }
}

#[test]
fn ambiguous_targets() {
    // A file that holds the same U-Net twice (bare and under `unet.`).
    let bare = keys("sd15_diffusers_unet.txt");
    let mut both = bare.clone();
    both.extend(bare.iter().map(|(k, s)| (format!("unet.{k}"), s.clone())));
    let base = table(&both);
    let got = base.resolve(&target(
        "lora_unet_down_blocks_0_resnets_0_conv1",
        "kohya",
        None,
    ));
    assert_eq!(
        got,
        Err(vec![
            "down_blocks.0.resnets.0.conv1.weight".to_string(),
            "unet.down_blocks.0.resnets.0.conv1.weight".to_string(),
        ])
    );
    // Each stays reachable by its full name.
    assert_eq!(
        base.resolve(&target("unet.down_blocks.0.resnets.0.conv1", "x", None)),
        Err(vec![
            "down_blocks.0.resnets.0.conv1.weight".to_string(),
            "unet.down_blocks.0.resnets.0.conv1.weight".to_string(),
        ])
    );
}

#[test]
fn partial_unet_resolves_only_in_its_own_naming() {
    // A key set with a hole in the block numbering gives no ldm↔diffusers table: guessing
    // indices could land on the wrong layer.
    let ks: Vec<(String, Vec<usize>)> = keys("sd15_single.txt")
        .into_iter()
        .filter(|(k, _)| !k.starts_with("model.diffusion_model.input_blocks.3."))
        .collect();
    let base = table(&ks);
    assert_eq!(
        base.resolve(&target("lora_unet_input_blocks_4_1_proj_in", "kohya", None)),
        at("model.diffusion_model.input_blocks.4.1.proj_in.weight")
    );
    assert_eq!(
        base.resolve(&target("down_blocks.1.attentions.0.proj_in", "peft", None)),
        Err(vec![])
    );
}

#[test]
fn vae_and_other_keys_do_not_interfere() {
    let base = table(&keys("sdxl_single.txt"));
    assert_eq!(
        base.resolve(&target("first_stage_model.decoder.mid.attn_1.q", "x", None)),
        at("first_stage_model.decoder.mid.attn_1.q.weight")
    );
}

#[test]
fn with_shapes_from_a_safetensors_header() {
    use safetensors::tensor::{Dtype, TensorView};
    let d = 4;
    let bytes = vec![0u8; 3 * d * d * 4];
    let view = TensorView::new(Dtype::F32, vec![3 * d, d], &bytes).expect("view");
    let key = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight";
    let file = safetensors::serialize([(key, view)], None).expect("serialize");
    let st = safetensors::SafeTensors::deserialize(&file).expect("deserialize");
    let base = AliasTable::with_shapes(st.iter().map(|(n, v)| (n, v.shape().to_vec())));
    assert_eq!(
        base.resolve(&target(
            "lora_te_text_model_encoder_layers_0_self_attn_k_proj",
            "kohya",
            None
        )),
        Ok(Resolved {
            key: key.to_string(),
            rows: Some((d, d)),
        })
    );
}
