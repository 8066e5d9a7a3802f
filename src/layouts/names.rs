//! Module names: the one place that knows the diffusers pipeline components (`unet`,
//! `text_encoder`, …) and the prefixes adapters put before a module's name (`lora_unet_`,
//! `lycoris_`, `oft_unet_`, `diffusion_model.`, PEFT's `base_model.model.`, …), and how a name
//! is carried from one convention into another.
//!
//! A layer's name is kept when it already is in the target's convention. Otherwise dotted names
//! (PEFT, diffusers) are flattened under the trainer prefixes; flattened names can only be
//! turned back into dotted module paths through a base checkpoint's key set (never by splitting
//! on `_`, formats.md §10.3). Base-side key naming (checkpoint layouts) is `crate::resolve`'s.

use crate::model::{Adapter, Layer};
use crate::resolve::dit::BaseLayout;
use crate::resolve::{AliasTable, PipelineNames};

pub const UNET: &str = "unet";
pub const TEXT_ENCODER: &str = "text_encoder";
pub const TEXT_ENCODER_2: &str = "text_encoder_2";
pub const TRANSFORMER: &str = "transformer";

/// The diffusers pipeline components an adapter may target, in pipeline order (a folder of
/// per-component PEFT adapters, a diffusers base folder).
pub const COMPONENTS: [&str; 4] = [UNET, TEXT_ENCODER, TEXT_ENCODER_2, TRANSFORMER];

/// The components as dotted name prefixes (`unet.…`), in pipeline order.
pub const DOTTED_COMPONENTS: [&str; 4] =
    ["unet.", "text_encoder.", "text_encoder_2.", "transformer."];

/// PEFT's wrapper around every module name (`base_model.model.<module>`).
pub const PEFT_WRAPPER: &str = "base_model.model.";

pub const LORA_UNET: &str = "lora_unet_";
pub const LORA_TE: &str = "lora_te_";
pub const LORA_TE1: &str = "lora_te1_";
pub const LORA_TE2: &str = "lora_te2_";
pub const LORA_TRANSFORMER: &str = "lora_transformer_";
/// LyCORIS standalone / SimpleTuner.
pub const LYCORIS: &str = "lycoris_";
/// kohya's legacy `networks.oft` (U-Net only).
pub const KOHYA_OFT_UNET: &str = "oft_unet_";
/// ComfyUI's own names (`diffusion_model.<ldm module>`), dotted.
pub const COMFY_UNET: &str = "diffusion_model.";
/// What every kohya-style flattened name starts with.
pub const KOHYA_STYLE: &str = "lora_";

/// A flattened (or ComfyUI) prefix: the convention it belongs to and the component it names.
struct Flat {
    prefix: &'static str,
    convention: &'static str,
    component: Option<&'static str>,
}

const FLAT: [Flat; 8] = [
    flat(LORA_UNET, "kohya", Some(UNET)),
    flat(KOHYA_OFT_UNET, "kohya", Some(UNET)),
    flat(LORA_TE1, "kohya", Some(TEXT_ENCODER)),
    flat(LORA_TE2, "kohya", Some(TEXT_ENCODER_2)),
    flat(LORA_TE, "kohya", Some(TEXT_ENCODER)),
    flat(LORA_TRANSFORMER, "kohya", Some(TRANSFORMER)),
    flat(LYCORIS, "lycoris", None),
    flat(COMFY_UNET, "comfyui", Some(UNET)),
];

const fn flat(
    prefix: &'static str,
    convention: &'static str,
    component: Option<&'static str>,
) -> Flat {
    Flat {
        prefix,
        convention,
        component,
    }
}

/// Name prefixes of the trainers' `oft_R.weight` files (kohya `networks.oft_v2`, OneTrainer's
/// KOHYA, COMFY and OMI key layouts), as opposed to PEFT's.
pub const TRAINER_PREFIXES: [&str; 5] = [KOHYA_STYLE, COMFY_UNET, "clip_l.", "clip_g.", "unet."];

/// Whether a tensor name is under one of [`TRAINER_PREFIXES`].
pub fn has_trainer_prefix(name: &str) -> bool {
    TRAINER_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// A module name without PEFT's `base_model.model.` wrapper.
pub fn unwrap_peft(name: &str) -> &str {
    name.strip_prefix(PEFT_WRAPPER).unwrap_or(name)
}

/// Naming convention and component of a flattened LyCORIS/kohya/ComfyUI module name.
pub fn classify(name: &str) -> (&'static str, Option<&'static str>) {
    FLAT.iter()
        .find(|f| name.starts_with(f.prefix))
        .map_or(("unknown", None), |f| (f.convention, f.component))
}

/// Whether a name is a trainer's flattened (or ComfyUI `diffusion_model.`) name.
pub fn is_flat(name: &str) -> bool {
    FLAT.iter().any(|f| name.starts_with(f.prefix))
}

/// `(component, dotted module path)` of a layer whose name is dotted (PEFT / diffusers).
pub fn dotted(layer: &Layer) -> Option<(Option<String>, String)> {
    let name = layer.target.name.as_str();
    if is_flat(name) {
        return None;
    }
    let name = unwrap_peft(name);
    for (prefix, comp) in DOTTED_COMPONENTS.iter().zip(COMPONENTS) {
        if let Some(rest) = name.strip_prefix(prefix) {
            return Some((Some(comp.to_string()), rest.to_string()));
        }
    }
    Some((layer.target.component.clone(), name.to_string()))
}

/// The component a layer belongs to, from its recorded component or its name.
pub fn component(layer: &Layer) -> Option<String> {
    if let Some(c) = &layer.target.component {
        return Some(c.clone());
    }
    classify(&layer.target.name)
        .1
        .map(str::to_string)
        .or_else(|| dotted(layer).and_then(|(c, _)| c))
}

/// Number of text encoders the adapter touches (decides `lora_te_` vs `lora_te1_`/`lora_te2_`).
pub fn te_count(adapter: &Adapter) -> usize {
    let mut seen = std::collections::BTreeSet::new();
    for l in &adapter.layers {
        if let Some(c) = component(l)
            && c.starts_with(TEXT_ENCODER)
        {
            seen.insert(c);
        }
    }
    if seen.contains(TEXT_ENCODER_2) {
        2
    } else {
        seen.len()
    }
}

/// The dotted diffusers-pipeline name of a layer: its own when dotted, else through the base.
pub fn pipeline_name(
    layer: &Layer,
    base: Option<(&AliasTable, &PipelineNames)>,
) -> Result<(Option<String>, String), String> {
    if let Some(d) = dotted(layer) {
        return Ok(d);
    }
    let Some((table, names)) = base else {
        return Err(format!(
            "`{}` is a flattened name; dotted module paths can only be recovered from a base \
             checkpoint's keys: pass --base",
            layer.target.name
        ));
    };
    let r = table.resolve(&layer.target).map_err(|c| {
        if c.is_empty() {
            format!("`{}` has no tensor in the base", layer.target.name)
        } else {
            format!(
                "`{}` matches several tensors: {}",
                layer.target.name,
                c.join(", ")
            )
        }
    })?;
    // A bare text-encoder base answers to both encoder names: the layer's own decides.
    let own = component(layer);
    names
        .of(&r)
        .map(|(c, m)| match &own {
            Some(o) if o.starts_with(TEXT_ENCODER) && c.starts_with(TEXT_ENCODER) => {
                (Some(o.clone()), m.clone())
            }
            _ => (Some(c.clone()), m.clone()),
        })
        .ok_or_else(|| {
            format!(
                "`{}` resolves to `{}`, which has no diffusers-pipeline name",
                layer.target.name, r.key
            )
        })
}

/// A kohya-style flattened name (`lora_unet_…`, `lora_te1_…`): kept when the layer already has
/// one, else built from the dotted name and component. `te_count` is the number of text
/// encoders the adapter touches (two: `lora_te1_`/`lora_te2_`; one: `lora_te_`).
pub fn kohya_name(layer: &Layer, te_count: usize) -> Result<String, String> {
    let name = layer.target.name.as_str();
    if let Some(rest) = name.strip_prefix(KOHYA_OFT_UNET) {
        return Ok(format!("{LORA_UNET}{rest}"));
    }
    if let Some(rest) = name.strip_prefix(COMFY_UNET) {
        return Ok(format!("{LORA_UNET}{}", rest.replace('.', "_")));
    }
    if is_flat(name) {
        return Ok(name.to_string());
    }
    let (comp, module) = dotted(layer).ok_or_else(|| format!("`{name}`: no module path"))?;
    let flat = module.replace('.', "_");
    let te_flat = |f: &str| {
        // kohya names always carry `text_model_`; transformers 5 dropped that level.
        if f.starts_with("text_model_") {
            f.to_string()
        } else {
            format!("text_model_{f}")
        }
    };
    let is_te_module = module.starts_with("text_model.") || module.starts_with("encoder.layers.");
    let comp = match comp {
        Some(c) => c,
        None if is_te_module => TEXT_ENCODER.to_string(),
        None if crate::resolve::is_unet_module(&module) => UNET.to_string(),
        // A diffusion transformer's module: an original name is ComfyUI's own (`lora_unet_`
        // and the module, as its key map names every model key), a diffusers one the
        // transformer's (PEFT names say no component).
        None => match (crate::resolve::dit::place_as(&module, &[], BaseLayout::Diffusers))
            .or_else(|| crate::resolve::dit::place_as(&module, &[], BaseLayout::Original))
            .map(|p| p.layout())
        {
            Some(BaseLayout::Original) => {
                let bare = (crate::resolve::dit::ROOTS.iter())
                    .find_map(|r| module.strip_prefix(r))
                    .unwrap_or(&module);
                return Ok(format!("{LORA_UNET}{}", bare.replace('.', "_")));
            }
            Some(BaseLayout::Diffusers) => TRANSFORMER.to_string(),
            None => {
                return Err(format!(
                    "`{name}` is no Stable Diffusion U-Net or text-encoder module: the \
                     kohya-style names these tools use exist only for diffusion pipelines"
                ));
            }
        },
    };
    let prefix = match comp.as_str() {
        UNET => return Ok(format!("{LORA_UNET}{flat}")),
        TRANSFORMER => return Ok(format!("{LORA_TRANSFORMER}{flat}")),
        TEXT_ENCODER if te_count > 1 => LORA_TE1,
        TEXT_ENCODER => LORA_TE,
        TEXT_ENCODER_2 => LORA_TE2,
        other => return Err(format!("`{name}`: no kohya prefix for component `{other}`")),
    };
    Ok(format!("{prefix}{}", te_flat(&flat)))
}

/// Whether module `name` is a Conv2d, from its name: SD U-Net resnet, sampler and in/out
/// convolutions (diffusers and ldm names); `proj_in`/`proj_out` depend on the SD generation
/// (`sd1`: `Some(true)` for SD 1.x, whose attention projections are 1×1 convolutions).
pub fn is_conv_name(name: &str, sd1: Option<bool>) -> std::result::Result<bool, String> {
    let flat = name.replace('.', "_");
    const CONV_TAILS: [&str; 12] = [
        "conv1",
        "conv2",
        "conv_shortcut",
        "conv_in",
        "conv_out",
        "_conv",
        "in_layers_2",
        "out_layers_3",
        "skip_connection",
        "_op",
        "input_blocks_0_0",
        "out_2",
    ];
    if CONV_TAILS.iter().any(|t| flat.ends_with(t)) {
        return Ok(true);
    }
    if flat.ends_with("proj_in") || flat.ends_with("proj_out") {
        return sd1.ok_or_else(|| {
            format!(
                "`{name}` is a 1×1 Conv2d in SD 1.x and a Linear in SD 2.x/SDXL, which these \
                 trainers merge differently, and the file's metadata names no base model \
                 (`ss_base_model_version`, `ot_config.model_type`, `modelspec.architecture`)"
            )
        });
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conv_names() {
        assert_eq!(
            is_conv_name("lora_unet_down_blocks_0_resnets_0_conv1", None),
            Ok(true)
        );
        assert_eq!(
            is_conv_name("lora_unet_input_blocks_1_0_in_layers_2", None),
            Ok(true)
        );
        assert_eq!(
            is_conv_name("lora_unet_down_blocks_0_downsamplers_0_conv", None),
            Ok(true)
        );
        assert_eq!(
            is_conv_name(
                "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q",
                None
            ),
            Ok(false)
        );
        assert_eq!(
            is_conv_name("lora_te1_text_model_encoder_layers_0_mlp_fc1", None),
            Ok(false)
        );
        assert_eq!(
            is_conv_name("lora_unet_down_blocks_0_attentions_0_proj_in", Some(true)),
            Ok(true)
        );
        assert_eq!(
            is_conv_name("lora_unet_down_blocks_0_attentions_0_proj_in", Some(false)),
            Ok(false)
        );
        assert!(is_conv_name("lora_unet_down_blocks_0_attentions_0_proj_in", None).is_err());
    }

    #[test]
    fn prefixes_name_convention_and_component() {
        assert_eq!(classify("lora_te2_x"), ("kohya", Some(TEXT_ENCODER_2)));
        assert_eq!(classify("oft_unet_x"), ("kohya", Some(UNET)));
        assert_eq!(classify("lycoris_x"), ("lycoris", None));
        assert_eq!(classify("diffusion_model.x"), ("comfyui", Some(UNET)));
        assert_eq!(classify("base_model.model.x"), ("unknown", None));
        assert!(has_trainer_prefix("clip_g.x") && !has_trainer_prefix("base_model.model.x"));
    }
}
