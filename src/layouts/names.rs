//! Module names in each target's convention.
//!
//! A layer's name is kept when it already is in the target's convention. Otherwise dotted names
//! (PEFT, diffusers) are flattened under the trainer prefixes; flattened names can only be
//! turned back into dotted module paths through a base checkpoint's key set (never by splitting
//! on `_`, formats.md §10.3).

use crate::model::Layer;
use crate::resolve::{AliasTable, PipelineNames};

const COMPONENT_PREFIXES: [(&str, &str); 4] = [
    ("unet.", "unet"),
    ("text_encoder_2.", "text_encoder_2"),
    ("text_encoder.", "text_encoder"),
    ("transformer.", "transformer"),
];

const FLAT_PREFIXES: [&str; 8] = [
    "lora_unet_",
    "lora_te1_",
    "lora_te2_",
    "lora_te_",
    "lora_transformer_",
    "lycoris_",
    "oft_unet_",
    "diffusion_model.",
];

/// Whether a name is a trainer's flattened (or ComfyUI `diffusion_model.`) name.
pub fn is_flat(name: &str) -> bool {
    FLAT_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// `(component, dotted module path)` of a layer whose name is dotted (PEFT / diffusers).
pub fn dotted(layer: &Layer) -> Option<(Option<String>, String)> {
    let name = layer.target.name.as_str();
    if is_flat(name) {
        return None;
    }
    let name = name.strip_prefix("base_model.model.").unwrap_or(name);
    for (prefix, comp) in COMPONENT_PREFIXES {
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
    let n = layer.target.name.as_str();
    let by_prefix = [
        ("lora_unet_", "unet"),
        ("oft_unet_", "unet"),
        ("diffusion_model.", "unet"),
        ("lora_te1_", "text_encoder"),
        ("lora_te2_", "text_encoder_2"),
        ("lora_te_", "text_encoder"),
        ("lora_transformer_", "transformer"),
    ];
    by_prefix
        .iter()
        .find(|(p, _)| n.starts_with(p))
        .map(|(_, c)| c.to_string())
        .or_else(|| dotted(layer).and_then(|(c, _)| c))
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
            Some(o) if o.starts_with("text_encoder") && c.starts_with("text_encoder") => {
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
    if let Some(rest) = name.strip_prefix("oft_unet_") {
        return Ok(format!("lora_unet_{rest}"));
    }
    if let Some(rest) = name.strip_prefix("diffusion_model.") {
        return Ok(format!("lora_unet_{}", rest.replace('.', "_")));
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
        None if is_te_module => "text_encoder".to_string(),
        None if crate::resolve::is_unet_module(&module) => "unet".to_string(),
        None => {
            return Err(format!(
                "`{name}` is no Stable Diffusion U-Net or text-encoder module: the kohya-style \
                 names these tools use exist only for diffusion pipelines"
            ));
        }
    };
    match comp.as_str() {
        "unet" => Ok(format!("lora_unet_{flat}")),
        "text_encoder" => Ok(format!(
            "{}{}",
            if te_count > 1 {
                "lora_te1_"
            } else {
                "lora_te_"
            },
            te_flat(&flat)
        )),
        "text_encoder_2" => Ok(format!("lora_te2_{}", te_flat(&flat))),
        "transformer" => Ok(format!("lora_transformer_{flat}")),
        other => Err(format!("`{name}`: no kohya prefix for component `{other}`")),
    }
}
