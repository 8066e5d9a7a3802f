//! The name tables of `spec/names/` (spec Annex D), generated from the code that resolves
//! names, so that the spec and the resolver cannot disagree: the unit test below regenerates
//! them and fails on any difference (`OFTOOL_BLESS=1` rewrites them). Test-only code: the
//! resolver itself never needs the tables as text.
//!
//! Architectures of the canonical SD U-Nets are given here by their diffusers module names
//! (one weight per module is enough: [`UnetMap::derive`] reads the architecture from names);
//! the diffusion-transformer tables are [`dit::FAMILIES`]' own.

use super::clip::{self, Layout};
use super::dit::{self, Family, Kind};
use super::unet::{Naming, UnetMap, basic_modules, resnet_children};
use crate::layouts::names;

/// A U-Net's diffusers module names: per level the attention flag of each down res-block
/// (up levels have one res-block more and mirror the down path's attention).
fn unet_modules(down: &[&[bool]]) -> Vec<String> {
    let levels = down.len();
    let mut m = Vec::new();
    for (x, attn) in down.iter().enumerate() {
        for (i, &a) in attn.iter().enumerate() {
            m.push(format!("down_blocks.{x}.resnets.{i}.conv1"));
            if a {
                m.push(format!("down_blocks.{x}.attentions.{i}.proj_in"));
            }
        }
        if x + 1 < levels {
            m.push(format!("down_blocks.{x}.downsamplers.0.conv"));
        }
    }
    m.push("mid_block.resnets.0.conv1".into());
    m.push("mid_block.attentions.0.proj_in".into());
    m.push("mid_block.resnets.1.conv1".into());
    for (x, attn) in down.iter().rev().enumerate() {
        let a = attn.iter().any(|&a| a);
        for i in 0..=attn.len() {
            m.push(format!("up_blocks.{x}.resnets.{i}.conv1"));
            if a {
                m.push(format!("up_blocks.{x}.attentions.{i}.proj_in"));
            }
        }
        if x + 1 < levels {
            m.push(format!("up_blocks.{x}.upsamplers.0.conv"));
        }
    }
    m
}

fn tsv(header: &str, columns: &str, rows: impl IntoIterator<Item = String>) -> String {
    let mut s = format!(
        "# {header}\n# Generated from src/resolve/ by `OFTOOL_BLESS=1 cargo test --lib spec_names`; do not edit.\n{columns}\n"
    );
    for r in rows {
        s.push_str(&r);
        s.push('\n');
    }
    s
}

fn unet_table(what: &str, down: &[&[bool]]) -> String {
    let modules = unet_modules(down);
    let map = UnetMap::derive(Naming::Diffusers, modules.iter().map(String::as_str));
    let rows = map.map(|m| m.rows()).unwrap_or_default();
    tsv(
        &format!(
            "{what} U-Net: ldm/sgm block prefix (below `model.diffusion_model.`) <-> diffusers prefix (below `unet.`)"
        ),
        "ldm\tdiffusers\tbelow",
        rows.into_iter().map(|(l, d, b)| format!("{l}\t{d}\t{b}")),
    )
}

/// A diffusion-transformer family's table (spec Annex D.7): per original-layout module, how its
/// rows are made of diffusers tensors and those tensors in row order; then its markers.
fn dit_table(f: &Family) -> String {
    let kind = |k: Kind| match k {
        Kind::Rename => "rename",
        Kind::Thirds => "thirds",
        Kind::Linear1 => "qkv+mlp",
        Kind::Swap => "swap-halves",
        Kind::SwapIfTwo => "swap-halves-if-2-chunks",
    };
    let mut s = tsv(
        &format!(
            "{} ({}): original single-file module (`{{i}}` a block index), how its rows are made of diffusers tensors, those diffusers modules in row order",
            f.name, f.id
        ),
        "original\trows\tdiffusers",
        f.maps().map(|m| {
            format!(
                "{}\t{}\t{}",
                m.original,
                kind(m.kind),
                m.diffusers.join(" ")
            )
        }),
    );
    for t in f.markers {
        s.push_str(&format!("# marker (this family only): {t}\n"));
    }
    s
}

/// Every table of `spec/names/`: (file name, contents).
pub(crate) fn spec_tables() -> Vec<(String, String)> {
    let sd1: [&[bool]; 4] = [&[true, true], &[true, true], &[true, true], &[false, false]];
    let sdxl: [&[bool]; 3] = [&[false, false], &[true, true], &[true, true]];
    let children = tsv(
        "U-Net names below a resnet prefix (`resnet` rows of unet-*.tsv), then whole modules outside the blocks",
        "ldm\tdiffusers\tkind",
        resnet_children()
            .iter()
            .map(|(l, d)| format!("{l}\t{d}\tresnet-child"))
            .chain(
                basic_modules()
                    .iter()
                    .map(|(l, d)| format!("{l}\t{d}\tmodule")),
            ),
    );
    // OpenCLIP keys of block `{i}` (and the others) and the transformers module each stands for.
    let open_clip_keys = [
        "transformer.resblocks.{i}.attn.in_proj_weight",
        "transformer.resblocks.{i}.attn.out_proj.weight",
        "transformer.resblocks.{i}.ln_1.weight",
        "transformer.resblocks.{i}.ln_2.weight",
        "transformer.resblocks.{i}.mlp.c_fc.weight",
        "transformer.resblocks.{i}.mlp.c_proj.weight",
        "token_embedding.weight",
        "positional_embedding",
        "ln_final.weight",
    ];
    let open_clip = tsv(
        "OpenCLIP text encoder key (below its root) -> transformers CLIPTextModel module (below `text_model.`); rows: which third of a fused [3d, d] tensor (q, k, v)",
        "openclip_key\ttransformers_module\trows",
        open_clip_keys.iter().flat_map(|k| {
            let key = k.replace("{i}", "7");
            let (_, modules) = clip::hf_modules(Layout::OpenClip, &key);
            modules.into_iter().map(move |m| {
                let rows = match m.third {
                    Some(j) => format!("{j}/3"),
                    None => "all".to_string(),
                };
                format!(
                    "{}\t{}\t{rows}",
                    k,
                    m.path.replace("layers.7.", "layers.{i}.")
                )
            })
        }),
    );
    // Where each model of a single-file checkpoint sits, and the encoder's place.
    let roots = [
        ("model.diffusion_model.", "unet", "ldm/sgm U-Net"),
        (
            "diffusion_model.",
            "unet",
            "ldm U-Net under ComfyUI's prefix",
        ),
        ("unet.", "unet", "diffusers U-Net"),
        (
            "cond_stage_model.transformer.",
            "",
            "SD1.x CLIP (transformers naming)",
        ),
        ("cond_stage_model.model.", "", "SD2.x OpenCLIP"),
        (
            "conditioner.embedders.0.transformer.",
            "",
            "SDXL first encoder (transformers naming)",
        ),
        (
            "conditioner.embedders.1.model.",
            "",
            "SDXL second encoder (OpenCLIP)",
        ),
        ("text_encoder.", "", "diffusers first text encoder"),
        ("text_encoder_2.", "", "diffusers second text encoder"),
        (
            "clip_l.transformer.",
            "",
            "CLIP-L (SD3/Flux-style single files)",
        ),
        ("clip_g.transformer.", "", "CLIP-G (SD3-style single files)"),
    ];
    let prefixes = tsv(
        "Component prefixes of single-file checkpoints: prefix, component, what it holds. Text encoders present are ranked by order: the first answers to `text_encoder`, the second to `text_encoder_2`",
        "prefix\tcomponent\twhat",
        roots.iter().map(|(p, c, w)| {
            let component = if c.is_empty() {
                // Encoders are ranked by this order among those in the file: the first present
                // answers to `text_encoder`, the second to `text_encoder_2`.
                let probe = format!("{p}text_model.encoder.layers.0.mlp.fc1.weight");
                let probe = if p.ends_with("model.") && !p.ends_with("diffusion_model.") {
                    format!("{p}transformer.resblocks.0.mlp.c_fc.weight")
                } else {
                    probe
                };
                match clip::split(&probe) {
                    Some(k) => format!("text encoder, order {}", k.order),
                    None => "?".to_string(),
                }
            } else {
                c.to_string()
            };
            format!("{p}\t{component}\t{w}")
        }),
    );
    let adapter = tsv(
        "Prefixes adapters put before module names: prefix, component, naming of the rest",
        "prefix\tcomponent\tnaming",
        [
            (
                names::LORA_UNET,
                "unet",
                "flattened (`.` -> `_`) diffusers or ldm module",
            ),
            (names::LYCORIS, "unet", "flattened diffusers or ldm module"),
            (
                names::KOHYA_OFT_UNET,
                "unet",
                "flattened diffusers module (kohya legacy OFT)",
            ),
            (names::COMFY_UNET, "unet", "dotted ldm module (ComfyUI)"),
            (
                names::LORA_TE,
                "text_encoder",
                "flattened transformers module",
            ),
            (
                names::LORA_TE1,
                "text_encoder",
                "flattened transformers module",
            ),
            (
                names::LORA_TE2,
                "text_encoder_2",
                "flattened transformers module",
            ),
            (names::LORA_TRANSFORMER, "transformer", "flattened module"),
            (
                names::PEFT_WRAPPER,
                "",
                "dotted module, stripped before resolving",
            ),
        ]
        .iter()
        .map(|(p, c, n)| format!("{p}\t{c}\t{n}")),
    );
    let sd = [
        ("unet-sd1.tsv", unet_table("SD 1.x / 2.x", &sd1)),
        ("unet-sdxl.tsv", unet_table("SDXL", &sdxl)),
        ("unet-modules.tsv", children),
        ("openclip.tsv", open_clip),
        ("checkpoint-prefixes.tsv", prefixes),
        ("adapter-prefixes.tsv", adapter),
    ];
    sd.into_iter()
        .map(|(file, text)| (file.to_string(), text))
        .chain(
            dit::FAMILIES
                .iter()
                .map(|f| (format!("{}.tsv", f.id), dit_table(f))),
        )
        .collect()
}

#[cfg(test)]
mod tests {
    /// `spec/names/*.tsv` are what `src/resolve/` resolves with: regenerated here from the code,
    /// any difference fails (`OFTOOL_BLESS=1` rewrites them).
    #[test]
    fn spec_names_are_the_resolvers_tables() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("spec/names");
        let bless = std::env::var_os("OFTOOL_BLESS").is_some();
        let mut stale = Vec::new();
        for (file, text) in super::spec_tables() {
            let path = dir.join(&file);
            if bless {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &text).unwrap();
            } else if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
                stale.push(file);
            }
        }
        assert!(
            stale.is_empty(),
            "spec/names differs from src/resolve/ for {stale:?}: run OFTOOL_BLESS=1 cargo test --lib spec_names"
        );
    }
}
