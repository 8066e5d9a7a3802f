//! LyCORIS `oft_blocks` files under kohya names: what LyCORIS (`lycoris.kohya`), ComfyUI and
//! AUTOMATIC1111 load (formats.md §5, §6, §14 "Targeting runtimes").
//!
//! diag-oft: `oft_blocks [N, b, b]` with `B − Bᵀ = Q` (merge `BD(Cay+(Q))ᵀ·W`, the canonical
//! output side); BOFT: `oft_blocks [m, N, b, b]` with `B_i − B_iᵀ = −Q_i` on LyCORIS's wiring.
//! `alpha` is a power of two that no reader's clamp reaches (§14 note 1); `rescale` carries a
//! row scale applied after the rotation. ComfyUI ignores diag-oft `rescale` and squares the
//! strength slider: both are reported.

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    ComfyUi,
    Lycoris,
}

const OUTPUT_SIDE_ONLY: &str = "it rotates the input columns (PEFT ≥ 0.14, OneTrainer, kohya oft_v2, BOFT), \
     and an input-side rotation is no output-side one: LyCORIS/ComfyUI `oft_blocks` rotate output rows. \
     For ComfyUI use --to onetrainer (read by the ComfyUI-OFTv2 custom node) or bake the adapter \
     (oftool merge) and load the checkpoint";

/// Which LyCORIS module a layer's stages fit.
enum Shape {
    Diag,
    Boft,
}

fn fit(layer: &Layer) -> std::result::Result<Shape, String> {
    if layer.side != Side::Output {
        return Err(OUTPUT_SIDE_ONLY.to_string());
    }
    let identity = layer.stages.len() == 1 && layer.stages[0].spec.wiring == Wiring::Identity;
    let lycoris_bf = layer.stages.iter().enumerate().all(|(i, s)| {
        s.spec.wiring
            == Wiring::Butterfly {
                producer: WiringProducer::Lycoris,
                index: i as u32,
            }
    }) && layer.stages.windows(2).all(|w| {
        w[0].spec.block_size == w[1].spec.block_size && w[0].spec.blocks == w[1].spec.blocks
    });
    if identity {
        Ok(Shape::Diag)
    } else if lycoris_bf {
        Ok(Shape::Boft)
    } else if layer
        .stages
        .iter()
        .all(|s| s.spec.wiring == Wiring::Identity)
    {
        Err(format!(
            "{} stacked block-diagonal stages are no single LyCORIS module; \
             `oftool compose --collapse` first multiplies stages with one partition",
            layer.stages.len()
        ))
    } else {
        Err(
            "its butterfly wiring is not LyCORIS's (PEFT and LyCORIS BOFT pair different indices)"
                .into(),
        )
    }
}

fn map_layer(layer: &Layer, name: String, flavor: Flavor, alpha: f64, ctx: &Context<'_>) -> Mapped {
    let shape = match fit(layer) {
        Ok(s) => s,
        Err(e) => return Mapped::Impossible(e),
    };
    let axis = layer.target.rotated_dim;
    let mut lossy = Vec::new();
    let mut denoted = layer.clone();
    let mut values = Vec::new();
    let b = layer.stages[0].spec.block_size as usize;
    let mut blocks = 0;
    for (i, stage) in layer.stages.iter().enumerate() {
        let Some(mut q) = expanded_rows(stage, axis) else {
            return Mapped::Impossible(
                "a shared block whose repeat count is unknown; pass --base".into(),
            );
        };
        blocks = q.len() / (b * (b - 1) / 2).max(1);
        if matches!(shape, Shape::Boft) {
            q.iter_mut().for_each(|x| *x = -*x);
        }
        let (dense, mut back) = blocks_from_packed(&q, b);
        values.extend(dense);
        if matches!(shape, Shape::Boft) {
            back.iter_mut().for_each(|x| *x = -*x);
        }
        let ds = &mut denoted.stages[i];
        ds.q = back;
        ds.spec.shared = false;
        ds.spec.blocks = Some(blocks as u64);
        ds.q_f64 = true;
        if stage.spec.map != RotationMap::Cayley {
            ds.spec.map = RotationMap::Cayley;
            if !lossy.iter().any(|l: &String| l.contains("Cayley")) {
                lossy.push(format!(
                    "LyCORIS uses the exact Cayley map, the source the {}",
                    stage.spec.map.describe()
                ));
            }
        }
    }
    let m = layer.stages.len();
    let mut tensors = vec![];
    let block_shape = match shape {
        Shape::Diag => vec![blocks, b, b],
        Shape::Boft => vec![m, blocks, b, b],
    };
    let t = |suffix: &str, shape: Vec<usize>, v: &[f64]| {
        OwnedTensor::new(format!("{name}.{suffix}"), Dtype::F32, shape, v)
    };
    match t("oft_blocks", block_shape, &values) {
        Ok(x) => tensors.push(x),
        Err(e) => return Mapped::Impossible(e.to_string()),
    }
    match t("alpha", vec![], &[alpha]) {
        Ok(x) => tensors.push(x),
        Err(e) => return Mapped::Impossible(e.to_string()),
    }
    match &layer.row_scale {
        None => {}
        Some((ScalePosition::Before, _)) => {
            denoted.row_scale = None;
            lossy.push(
                "its row scale applies before the rotation (LyCORIS 2.0 `oft_diag`); `rescale` \
                 applies after it, so the scale is dropped"
                    .into(),
            );
        }
        Some((ScalePosition::After, s)) => {
            let conv = match super::is_conv(layer, ctx.sd1) {
                Ok(c) => c,
                Err(e) => {
                    return Mapped::Impossible(format!("`rescale` needs the weight's rank: {e}"));
                }
            };
            let mut shape = vec![s.len(), 1];
            if conv {
                shape.extend([1, 1]);
            }
            match t("rescale", shape, s) {
                Ok(x) => tensors.push(x),
                Err(e) => return Mapped::Impossible(e.to_string()),
            }
            let back: Vec<f64> = s.iter().map(|&v| v as f32 as f64).collect();
            denoted.row_scale = Some((ScalePosition::After, back));
            if flavor == Flavor::ComfyUi && matches!(shape_kind(layer), Shape::Diag) {
                denoted.row_scale = None;
                lossy.push("ComfyUI loads diag-oft `rescale` but never applies it".into());
            }
        }
    }
    denoted.row_scale_f64 = false;
    denoted.constraint = None;
    Mapped::Written {
        name,
        tensors,
        denoted: Box::new(denoted),
        lossy: (!lossy.is_empty()).then(|| lossy.join("; ")),
    }
}

fn shape_kind(layer: &Layer) -> Shape {
    if layer.stages.len() == 1 && layer.stages[0].spec.wiring == Wiring::Identity {
        Shape::Diag
    } else {
        Shape::Boft
    }
}

pub fn write(adapter: &Adapter, ctx: &Context<'_>, flavor: Flavor) -> Result<Written> {
    let te_count = te_count(adapter);
    let alpha = free_alpha_for(adapter);
    let mut tensors = Vec::new();
    let mut mapped = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let (mut diag, mut boft, mut rescaled) = (false, false, false);
    for layer in &adapter.layers {
        let name = match names::kohya_name(layer, te_count) {
            Ok(n) => n,
            Err(e) => {
                mapped.push((None, None, Status::Impossible { reason: e }));
                continue;
            }
        };
        if !seen.insert(name.clone()) {
            mapped.push((
                None,
                None,
                Status::Impossible {
                    reason: format!("a second layer on `{name}`: one LyCORIS module per weight"),
                },
            ));
            continue;
        }
        let (n, d, s, t) = outcome(map_layer(layer, name, flavor, alpha, ctx));
        if d.is_some() {
            match shape_kind(layer) {
                Shape::Diag => diag = true,
                Shape::Boft => boft = true,
            }
            rescaled |= layer.row_scale.is_some();
        }
        tensors.extend(t);
        mapped.push((n, d, s));
    }
    let mut metadata = kept_metadata(adapter);
    let algo = if boft && !diag { "boft" } else { "diag-oft" };
    metadata.insert("ss_network_module".into(), "lycoris.kohya".into());
    metadata.insert(
        "ss_network_args".into(),
        serde_json::json!({
            "algo": algo,
            "constraint": "0",
            "rescaled": if rescaled { "True" } else { "False" },
        })
        .to_string(),
    );
    metadata.insert("ss_network_alpha".into(), format!("{alpha}"));
    let mut warnings = Vec::new();
    if flavor == Flavor::ComfyUi {
        warnings.push(
            "ComfyUI squares the LoraLoader strength for diag-oft (W + s²·ΔW) and applies BOFT \
             strength per stage and again to the difference: only strength 1 gives this adapter's \
             rotation"
                .into(),
        );
        if diag && rescaled {
            warnings.push(
                "ComfyUI ignores diag-oft `rescale`: the scaled rows are not scaled in ComfyUI"
                    .into(),
            );
        }
    }
    Ok(Written::single(tensors, metadata, mapped, warnings))
}

/// Number of text encoders the adapter touches (decides `lora_te_` vs `lora_te1_`/`lora_te2_`).
pub fn te_count(adapter: &Adapter) -> usize {
    let mut seen = std::collections::BTreeSet::new();
    for l in &adapter.layers {
        if let Some(c) = names::component(l)
            && c.starts_with("text_encoder")
        {
            seen.insert(c);
        }
    }
    if seen.contains("text_encoder_2") {
        2
    } else {
        seen.len()
    }
}
