//! CLIP text encoders: where they sit in a checkpoint, and the transformers (HF) module name
//! each of their tensors stands for.
//!
//! Two layouts occur. HF `CLIPTextModel` (SD1.x `cond_stage_model.transformer.`, SDXL
//! `conditioner.embedders.0.transformer.`, diffusers `text_encoder/` files, with or without the
//! `text_model.` level that transformers 5 dropped from `CLIPTextModel`). OpenCLIP (SD2.x
//! `cond_stage_model.model.`, SDXL `conditioner.embedders.1.model.`): `transformer.resblocks.{i}`
//! with `attn.in_proj_weight` holding q, k, v as row blocks `[0,d)`, `[d,2d)`, `[2d,3d)`,
//! `attn.out_proj`, `ln_1`/`ln_2`, `mlp.c_fc`/`mlp.c_proj`, `token_embedding`,
//! `positional_embedding`, `ln_final`.

/// Naming inside one text encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Hf,
    OpenClip,
}

/// A checkpoint key that belongs to a text encoder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncoderKey<'a> {
    /// Prefix of the encoder in the file (`""` for a bare diffusers text-encoder file).
    pub root: &'a str,
    /// Position of the encoder among the file's encoders (the embedder index for SDXL).
    pub order: usize,
    pub layout: Layout,
    /// The key below `root`.
    pub inner: &'a str,
}

/// Which encoder, and in which layout, `key` belongs to.
pub fn split(key: &str) -> Option<EncoderKey<'_>> {
    let fixed: [(&str, usize, Layout); 7] = [
        ("cond_stage_model.transformer.", 0, Layout::Hf),
        ("cond_stage_model.model.", 0, Layout::OpenClip),
        ("text_encoder.", 0, Layout::Hf),
        ("text_encoder_2.", 1, Layout::Hf),
        ("clip_l.transformer.", 0, Layout::Hf),
        ("clip_h.transformer.", 0, Layout::Hf),
        ("clip_g.transformer.", 1, Layout::Hf),
    ];
    let found = fixed.iter().find_map(|&(root, order, layout)| {
        let inner = key.strip_prefix(root)?;
        Some(EncoderKey {
            root: &key[..root.len()],
            order,
            layout,
            inner,
        })
    });
    let found = found.or_else(|| {
        let tail = key.strip_prefix("conditioner.embedders.")?;
        let (n, rest) = tail.split_once('.')?;
        let order: usize = n.parse().ok()?;
        let (layout, inner) = if let Some(inner) = rest.strip_prefix("transformer.") {
            (Layout::Hf, inner)
        } else {
            (Layout::OpenClip, rest.strip_prefix("model.")?)
        };
        Some(EncoderKey {
            root: &key[..key.len() - inner.len()],
            order,
            layout,
            inner,
        })
    });
    let found = found.or_else(|| {
        // A bare transformers file: only names no other model here uses.
        let bare = [
            "text_model.",
            "encoder.layers.",
            "embeddings.token_embedding.",
            "embeddings.position_embedding.",
            "final_layer_norm.",
        ];
        bare.iter()
            .any(|p| key.starts_with(p))
            .then_some(EncoderKey {
                root: "",
                order: 0,
                layout: Layout::Hf,
                inner: key,
            })
    })?;
    recognised(&found).then_some(found)
}

fn recognised(k: &EncoderKey<'_>) -> bool {
    let heads: &[&str] = match k.layout {
        Layout::Hf => &[
            "text_model.",
            "encoder.",
            "embeddings.",
            "final_layer_norm.",
            "text_projection.",
        ],
        Layout::OpenClip => &[
            "transformer.resblocks.",
            "token_embedding.",
            "positional_embedding",
            "ln_final.",
            "text_projection",
            "logit_scale",
        ],
    };
    heads.iter().any(|h| k.inner.starts_with(h))
}

/// The HF module a tensor stands for: its path below `text_model.` (or at the top, for
/// `text_projection`), and for a fused tensor which third of its rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HfModule {
    pub path: String,
    /// Whether the path lives under `text_model.` (everything but `text_projection`).
    pub in_text_model: bool,
    /// `Some(j)`: rows `[j·d, (j+1)·d)` of a `[3d, d]` tensor (q, k, v for j = 0, 1, 2).
    pub third: Option<usize>,
}

/// The HF modules `inner` (a key below the encoder's root) stands for, and the module name
/// of the key itself in the file's own naming. Empty for non-weight tensors.
pub fn hf_modules(layout: Layout, inner: &str) -> (Option<String>, Vec<HfModule>) {
    match layout {
        Layout::Hf => {
            let Some(module) = inner.strip_suffix(".weight") else {
                return (None, Vec::new());
            };
            let m = if module == "text_projection" {
                HfModule {
                    path: module.to_string(),
                    in_text_model: false,
                    third: None,
                }
            } else {
                HfModule {
                    path: module
                        .strip_prefix("text_model.")
                        .unwrap_or(module)
                        .to_string(),
                    in_text_model: true,
                    third: None,
                }
            };
            (Some(module.to_string()), vec![m])
        }
        Layout::OpenClip => open_clip(inner),
    }
}

fn open_clip(inner: &str) -> (Option<String>, Vec<HfModule>) {
    let whole = |path: String| HfModule {
        path,
        in_text_model: true,
        third: None,
    };
    if inner == "positional_embedding" {
        return (
            Some(inner.to_string()),
            vec![whole("embeddings.position_embedding".into())],
        );
    }
    if let Some(layer) = inner.strip_prefix("transformer.resblocks.") {
        let Some((i, rest)) = layer.split_once('.') else {
            return (None, Vec::new());
        };
        if i.parse::<usize>().is_err() {
            return (None, Vec::new());
        }
        let hf_layer = format!("encoder.layers.{i}");
        if rest == "attn.in_proj_weight" {
            let own = format!("transformer.resblocks.{i}.attn.in_proj");
            let parts = ["q_proj", "k_proj", "v_proj"]
                .iter()
                .enumerate()
                .map(|(j, p)| HfModule {
                    path: format!("{hf_layer}.self_attn.{p}"),
                    in_text_model: true,
                    third: Some(j),
                })
                .collect();
            return (Some(own), parts);
        }
        let Some(module) = rest.strip_suffix(".weight") else {
            return (None, Vec::new());
        };
        let own = Some(format!("transformer.resblocks.{i}.{module}"));
        let hf = match module {
            "attn.out_proj" => "self_attn.out_proj",
            "ln_1" => "layer_norm1",
            "ln_2" => "layer_norm2",
            "mlp.c_fc" => "mlp.fc1",
            "mlp.c_proj" => "mlp.fc2",
            _ => return (own, Vec::new()),
        };
        return (own, vec![whole(format!("{hf_layer}.{hf}"))]);
    }
    let Some(module) = inner.strip_suffix(".weight") else {
        return (None, Vec::new());
    };
    let hf = match module {
        "token_embedding" => vec![whole("embeddings.token_embedding".into())],
        "ln_final" => vec![whole("final_layer_norm".into())],
        _ => Vec::new(),
    };
    (Some(module.to_string()), hf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roots() {
        let k = split("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight")
            .expect("encoder key");
        assert_eq!(k.root, "conditioner.embedders.1.model.");
        assert_eq!((k.order, k.layout), (1, Layout::OpenClip));
        let k = split("cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight")
            .expect("encoder key");
        assert_eq!(
            (k.root, k.layout),
            ("cond_stage_model.transformer.", Layout::Hf)
        );
        let k = split("encoder.layers.3.self_attn.q_proj.weight").expect("bare tf5 key");
        assert_eq!(
            (k.root, k.inner),
            ("", "encoder.layers.3.self_attn.q_proj.weight")
        );
        // A diffusers VAE's encoder and other models' keys are not text encoders.
        assert!(split("encoder.down_blocks.0.resnets.0.conv1.weight").is_none());
        assert!(split("first_stage_model.encoder.conv_in.weight").is_none());
        assert!(split("conditioner.embedders.2.model.visual.proj").is_none());
    }

    #[test]
    fn open_clip_names() {
        let (own, hf) = hf_modules(
            Layout::OpenClip,
            "transformer.resblocks.7.attn.in_proj_weight",
        );
        assert_eq!(own.as_deref(), Some("transformer.resblocks.7.attn.in_proj"));
        assert_eq!(hf.len(), 3);
        assert_eq!(hf[2].path, "encoder.layers.7.self_attn.v_proj");
        assert_eq!(hf[2].third, Some(2));
        let (_, hf) = hf_modules(
            Layout::OpenClip,
            "transformer.resblocks.7.mlp.c_proj.weight",
        );
        assert_eq!(hf[0].path, "encoder.layers.7.mlp.fc2");
        let (own, hf) = hf_modules(
            Layout::OpenClip,
            "transformer.resblocks.7.attn.in_proj_bias",
        );
        assert!(own.is_none() && hf.is_empty());
        let (own, hf) = hf_modules(Layout::OpenClip, "text_projection");
        assert!(own.is_none() && hf.is_empty());
    }
}
