//! OneTrainer `OFT_2` (formats.md §8.1) and kohya `networks.oft_v2` (§4.3): PEFT's packed
//! triangles under trainer prefixes (`lora_unet_…`, `lora_te1_…`, `diffusion_model.…`),
//! `<module>.oft_R.weight` `[r, b(b−1)/2]`, and in OneTrainer's scaled OFT a 0-dim
//! `<module>.oft_R.scaled_oft` marker.
//!
//! Both take `Q_p = (M − Mᵀ)/σ` (`σ = 2·√(b − 1)` when scaled, else 1), Neumann with 5 terms
//! and PEFT ≥ 0.18 coefficients, and merge Linear layers as `W·BD(R)ᵀ` (canonical `Q = Q_p`)
//! but Conv2d layers as `W̃·BD(R)` (canonical `Q = −Q_p`, because `N(Q)ᵀ = N(−Q)`). The file
//! does not say which modules are convolutions; their names do (see [`is_conv`]).

use super::common::{self, OneStage};
use crate::error::{Error, Result};
use crate::model::*;
use crate::rotation::block_size_from_tri_len;
use crate::tensors::MappedFile;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

const WEIGHT: &str = ".oft_R.weight";
/// Metadata key oftool writes: a JSON list of the modules that are Conv2d.
pub const CONV_LIST_KEY: &str = "oftool.conv2d";
const SCALED: &str = ".oft_R.scaled_oft";

/// Whether the file is one of these trainers' (rather than a bare PEFT state dict).
pub fn is_trainer_file(names: &[&str], metadata: &HashMap<String, String>) -> bool {
    metadata.contains_key("ot_config")
        || metadata
            .get("ss_network_module")
            .is_some_and(|m| m == "networks.oft_v2")
        || names.iter().any(|n| {
            n.ends_with(SCALED)
                || ["lora_", "diffusion_model.", "clip_l.", "clip_g.", "unet."]
                    .iter()
                    .any(|p| n.starts_with(p))
        })
}

/// The SD generation a file's metadata names: `Some(true)` for SD 1.x (whose attention
/// `proj_in`/`proj_out` are 1×1 convolutions), `Some(false)` for SD 2.x / SDXL / others.
pub fn sd1_from_metadata(metadata: &HashMap<String, String>) -> Option<bool> {
    if let Some(v) = metadata.get("ss_base_model_version") {
        return Some(v.starts_with("sd_v1"));
    }
    if metadata.get("ss_v2").is_some_and(|v| v == "True") {
        return Some(false);
    }
    let ot_model_type = metadata
        .get("ot_config")
        .and_then(|c| serde_json::from_str::<Value>(c).ok())
        .and_then(|cfg| {
            cfg.get("model_type")
                .and_then(Value::as_str)
                .map(str::to_string)
        });
    if let Some(t) = ot_model_type {
        return Some(t.starts_with("STABLE_DIFFUSION_1"));
    }
    if let Some(a) = metadata.get("modelspec.architecture") {
        return Some(a.starts_with("stable-diffusion-v1"));
    }
    None
}

/// Whether module `name` is a Conv2d, from its name: SD U-Net resnet, sampler and in/out
/// convolutions (diffusers and ldm names); `proj_in`/`proj_out` depend on the SD generation.
pub fn is_conv(name: &str, sd1: Option<bool>) -> std::result::Result<bool, String> {
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

pub fn import(path: &Path, file: &MappedFile) -> Result<Adapter> {
    let st = file.tensors();
    let modules = common::modules(path, &st, &[WEIGHT, SCALED], "OneTrainer/kohya OFT v2")?;
    let sd1 = sd1_from_metadata(&file.metadata);
    let conv_list: Option<Vec<String>> = file
        .metadata
        .get(CONV_LIST_KEY)
        .and_then(|v| serde_json::from_str(v).ok());
    let args: Value = file
        .metadata
        .get("ss_network_args")
        .and_then(|a| serde_json::from_str(a).ok())
        .unwrap_or(Value::Null);
    let arg = |k: &str| {
        args.get(k).and_then(|v| match v {
            Value::String(s) => Some(s.clone()),
            Value::Bool(b) => Some(b.to_string()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        })
    };
    // Whether one stored row means a shared block (else: a layer of one block). OneTrainer
    // records it in `ot_config`, kohya in `ss_network_args`; unknown → shared, which tiles
    // the axis and so reads both cases the same.
    let ot_share = file
        .metadata
        .get("ot_config")
        .and_then(|c| serde_json::from_str::<Value>(c).ok())
        .and_then(|c| c.get("oft_block_share").and_then(Value::as_bool));
    let declared_share =
        ot_share.or_else(|| arg("block_share").map(|v| v.eq_ignore_ascii_case("true")));
    let coft = arg("coft").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let coft_eps = arg("coft_eps")
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(6e-5);
    let mut layers = Vec::new();
    for module in &modules {
        let w_name = format!("{module}{WEIGHT}");
        if st.tensor(&w_name).is_err() {
            return Err(Error::format(
                path,
                format!("`{module}` has `scaled_oft` but no `oft_R.weight`"),
            ));
        }
        let (mut q, shape) = common::read(path, &st, &w_name)?;
        let (rows, n) = match shape.as_slice() {
            &[rows, n] if rows >= 1 => (rows, n),
            _ => {
                return Err(Error::format(
                    path,
                    format!("`{w_name}` has shape {shape:?}; expected [blocks, b(b−1)/2]"),
                ));
            }
        };
        let b = block_size_from_tri_len(n)
            .filter(|&b| b >= 2)
            .ok_or_else(|| {
                Error::format(
                    path,
                    format!(
                        "`{w_name}`: a row length of {n} is not b(b−1)/2 for any block size b ≥ 2"
                    ),
                )
            })?;
        let scaled = match st.tensor(&format!("{module}{SCALED}")) {
            Err(_) => false,
            Ok(_) => {
                let (v, _) = common::read(path, &st, &format!("{module}{SCALED}"))?;
                v.first().is_some_and(|&x| x != 0.0)
            }
        };
        if scaled {
            let sigma = 2.0 * ((b - 1) as f64).sqrt();
            q.iter_mut().for_each(|x| *x /= sigma);
        }
        let mut constraint = None;
        if coft {
            let radius = super::peft::apply_coft(&mut q, rows, n, coft_eps);
            constraint = Some(Constraint {
                kind: "peft-coft".into(),
                radius,
                scope: "block".into(),
                alpha: None,
                eps: Some(coft_eps),
            });
        }
        let conv = match &conv_list {
            Some(list) => list.iter().any(|n| n == module),
            None => is_conv(module, sd1).map_err(|m| Error::unsupported(path, m))?,
        };
        if conv {
            q.iter_mut().for_each(|x| *x = -*x);
        }
        let (convention, component) = super::lycoris::classify_name(module);
        // One stored row: shared, or a single block; tiling the axis covers both.
        let shared = rows == 1 && declared_share != Some(false);
        layers.push(
            OneStage {
                name: module.clone(),
                convention,
                component: component.map(str::to_string),
                module: if conv {
                    ModuleKind::Conv
                } else {
                    ModuleKind::Linear
                },
                side: Side::Input,
                blocks: (!shared).then_some(rows as u64),
                block_size: b,
                shared,
                map: RotationMap::Neumann {
                    terms: 5,
                    variant: NeumannVariant::Peft018,
                },
                q,
                q_f64: scaled || coft,
                row_scale: None,
                constraint,
            }
            .into_layer(),
        );
    }
    let onetrainer =
        file.metadata.contains_key("ot_config") || st.names().iter().any(|n| n.ends_with(SCALED));
    let format = if onetrainer {
        "onetrainer-oft2"
    } else {
        "kohya-oft-v2"
    };
    common::adapter(path, file, format, None, BTreeMap::new(), layers)
}

#[cfg(test)]
mod tests {
    use super::is_conv;

    #[test]
    fn conv_names() {
        assert_eq!(
            is_conv("lora_unet_down_blocks_0_resnets_0_conv1", None),
            Ok(true)
        );
        assert_eq!(
            is_conv("lora_unet_input_blocks_1_0_in_layers_2", None),
            Ok(true)
        );
        assert_eq!(
            is_conv("lora_unet_down_blocks_0_downsamplers_0_conv", None),
            Ok(true)
        );
        assert_eq!(
            is_conv(
                "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q",
                None
            ),
            Ok(false)
        );
        assert_eq!(
            is_conv("lora_te1_text_model_encoder_layers_0_mlp_fc1", None),
            Ok(false)
        );
        assert_eq!(
            is_conv("lora_unet_down_blocks_0_attentions_0_proj_in", Some(true)),
            Ok(true)
        );
        assert_eq!(
            is_conv("lora_unet_down_blocks_0_attentions_0_proj_in", Some(false)),
            Ok(false)
        );
        assert!(is_conv("lora_unet_down_blocks_0_attentions_0_proj_in", None).is_err());
    }
}
