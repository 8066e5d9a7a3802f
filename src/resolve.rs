//! Resolving an adapter's target names to the keys of a base checkpoint.
//!
//! The alias table is built from the base's own key set (never by splitting flattened names on
//! `_`): every `X.weight` is reachable as `X`, as the flattened kohya/LyCORIS names
//! `lora_unet_…`, `lora_te…_…`, `lycoris_…` and with PEFT's `base_model.model.` wrapper.

use crate::model::Target;
use std::collections::HashMap;

/// Where a target lives in the base: a weight key, and for fused tensors (SDXL OpenCLIP
/// `in_proj_weight`, Flux `qkv`) the row slice `[start, start + len)` of that key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Resolved {
    pub key: String,
    pub rows: Option<(usize, usize)>,
}

/// Alias → base weight locations (more than one means the alias is ambiguous).
pub struct AliasTable {
    map: HashMap<String, Vec<Resolved>>,
}

const FLAT_PREFIXES: [&str; 6] = [
    "lora_unet_",
    "lora_te_",
    "lora_te1_",
    "lora_te2_",
    "lycoris_",
    "lora_transformer_",
];

impl AliasTable {
    pub fn new<'a>(keys: impl IntoIterator<Item = &'a str>) -> Self {
        let mut map: HashMap<String, Vec<Resolved>> = HashMap::new();
        for key in keys {
            let Some(module) = key.strip_suffix(".weight") else {
                continue;
            };
            let mut aliases = vec![module.to_string()];
            // Component prefixes of bare diffusers/ldm files and single-file checkpoints.
            let stripped = [
                "unet.",
                "text_encoder.",
                "text_encoder_2.",
                "transformer.",
                "model.diffusion_model.",
                "diffusion_model.",
            ]
            .iter()
            .find_map(|p| module.strip_prefix(p))
            .unwrap_or(module);
            // transformers 5 dropped the `text_model.` level of CLIP module names: alias both.
            let mut variants = vec![stripped.to_string()];
            if let Some(rest) = stripped.strip_prefix("text_model.") {
                variants.push(rest.to_string());
            } else if ["encoder.", "embeddings.", "final_layer_norm"]
                .iter()
                .any(|p| stripped.starts_with(p))
            {
                variants.push(format!("text_model.{stripped}"));
            }
            for v in variants {
                let flat = v.replace('.', "_");
                for p in FLAT_PREFIXES {
                    aliases.push(format!("{p}{flat}"));
                }
                aliases.push(format!("diffusion_model.{v}"));
                aliases.push(v);
            }
            aliases.sort();
            aliases.dedup();
            for a in aliases {
                let v = map.entry(a).or_default();
                if !v.iter().any(|k| k.key == key) {
                    v.push(Resolved { key: key.to_string(), rows: None });
                }
            }
        }
        AliasTable { map }
    }

    /// Where a target resolves to: `Ok(location)`, or `Err(candidate keys)` (empty: not found).
    pub fn resolve(&self, target: &Target) -> Result<Resolved, Vec<String>> {
        let name = target
            .name
            .strip_prefix("base_model.model.")
            .unwrap_or(&target.name);
        match self.map.get(name) {
            Some(keys) if keys.len() == 1 => Ok(keys[0].clone()),
            Some(keys) => Err(keys.iter().map(|k| k.key.clone()).collect()),
            None => Err(Vec::new()),
        }
    }
}
