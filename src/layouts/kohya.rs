//! kohya sd-scripts and OneTrainer files (formats.md §4, §8.1).
//!
//! * Input side → `lora_*_<name>.oft_R.weight` (kohya `networks.oft_v2`, OneTrainer `OFT_2`):
//!   PEFT's packed triangle, Neumann with 5 terms and PEFT ≥ 0.18 coefficients; Linear stores
//!   `Q`, Conv2d `−Q` (those trainers merge Conv2d as `W̃·BD(R)`).
//! * Output side → kohya's legacy `networks.oft` (`--to kohya` only): `oft_unet_<name>`
//!   `.oft_blocks [N, b, b]` + `.alpha`; U-Net modules only, one block count per file
//!   (`network_dim`), no row scale, kohya's always-on clamp made inert by a large `alpha`.

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Kohya,
    OneTrainer,
}

const NEUMANN5: RotationMap = RotationMap::Neumann {
    terms: 5,
    variant: NeumannVariant::Peft018,
};

fn map_input(layer: &Layer, name: String, ctx: &Context<'_>) -> Mapped {
    if layer.stages.len() != 1 || layer.stages[0].spec.wiring != Wiring::Identity {
        return Mapped::Impossible(
            "several stages or a butterfly wiring: OFT v2 files hold one block-diagonal rotation \
             per module"
                .into(),
        );
    }
    let stage = &layer.stages[0];
    let conv = match super::is_conv(layer, ctx.sd1) {
        Ok(c) => c,
        Err(e) => return Mapped::Impossible(e),
    };
    let sign = if conv { -1.0 } else { 1.0 };
    let values: Vec<f64> = stage.q.iter().map(|x| sign * x).collect();
    let rows = stage.stored_blocks() as usize;
    let tri = stage.tri_len();
    let t = match OwnedTensor::new(
        format!("{name}.oft_R.weight"),
        Dtype::F32,
        vec![rows, tri],
        &values,
    ) {
        Ok(t) => t,
        Err(e) => return Mapped::Impossible(e.to_string()),
    };
    let mut lossy = Vec::new();
    let mut denoted = layer.clone();
    let ds = &mut denoted.stages[0];
    ds.q = values.iter().map(|&x| sign * (x as f32 as f64)).collect();
    ds.q_f64 = false;
    if stage.spec.map != NEUMANN5 {
        ds.spec.map = NEUMANN5;
        lossy.push(format!(
            "these trainers use the 5-term Cayley–Neumann series (PEFT ≥ 0.18), the source the {}",
            stage.spec.map.describe()
        ));
    }
    if layer.row_scale.is_some() {
        denoted.row_scale = None;
        lossy.push("OFT v2 files have no row scale; it is dropped".into());
    }
    denoted.constraint = None;
    Mapped::Written {
        name,
        tensors: vec![t],
        denoted: Box::new(denoted),
        lossy: (!lossy.is_empty()).then(|| lossy.join("; ")),
    }
}

fn map_legacy(layer: &Layer, name: &str, alpha: f64, dim: usize) -> Mapped {
    let Some(rest) = name.strip_prefix("lora_unet_") else {
        return Mapped::Impossible(
            "kohya's legacy OFT (`networks.oft`) adapts U-Net modules only".into(),
        );
    };
    if layer.stages.len() != 1 || layer.stages[0].spec.wiring != Wiring::Identity {
        return Mapped::Impossible(
            "several stages or a butterfly wiring: kohya's legacy OFT holds one block-diagonal \
             rotation per module"
                .into(),
        );
    }
    let stage = &layer.stages[0];
    let Some(q) = expanded_rows(stage, layer.target.rotated_dim) else {
        return Mapped::Impossible(
            "a shared block whose repeat count is unknown; pass --base".into(),
        );
    };
    let b = stage.spec.block_size as usize;
    let blocks = q.len() / stage.tri_len().max(1);
    if blocks != dim {
        return Mapped::Impossible(format!(
            "{blocks} blocks, but kohya's loader takes one block count per file (`network_dim` = \
             {dim}, from the first module)"
        ));
    }
    let (dense, back) = blocks_from_packed(&q, b);
    let name = format!("oft_unet_{rest}");
    let mut tensors = Vec::new();
    for (suffix, shape, v) in [
        ("oft_blocks", vec![blocks, b, b], dense.as_slice()),
        ("alpha", vec![], &[alpha][..]),
    ] {
        match OwnedTensor::new(format!("{name}.{suffix}"), Dtype::F32, shape, v) {
            Ok(t) => tensors.push(t),
            Err(e) => return Mapped::Impossible(e.to_string()),
        }
    }
    let mut lossy = Vec::new();
    let mut denoted = layer.clone();
    let ds = &mut denoted.stages[0];
    ds.q = back;
    ds.spec.shared = false;
    ds.spec.blocks = Some(blocks as u64);
    ds.q_f64 = true;
    if stage.spec.map != RotationMap::Cayley {
        ds.spec.map = RotationMap::Cayley;
        lossy.push(format!(
            "kohya's legacy OFT uses the exact Cayley map, the source the {}",
            stage.spec.map.describe()
        ));
    }
    if layer.row_scale.is_some() {
        denoted.row_scale = None;
        lossy.push("kohya's legacy OFT has no row scale (`rescale`); it is dropped".into());
    }
    denoted.constraint = None;
    Mapped::Written {
        name,
        tensors,
        denoted: Box::new(denoted),
        lossy: (!lossy.is_empty()).then(|| lossy.join("; ")),
    }
}

/// kohya trains SDXL on its sgm-named U-Net, so its SDXL files name U-Net modules the ldm/sgm
/// way (`lora_unet_input_blocks_4_1_…`); SD 1.x/2.x files use diffusers names. With a base, a
/// U-Net layer of an SDXL base is named the sgm way for kohya.
fn kohya_file_name(
    layer: &Layer,
    te_count: usize,
    flavor: Flavor,
    ctx: &Context<'_>,
) -> std::result::Result<String, String> {
    let name = names::kohya_name(layer, te_count)?;
    if flavor != Flavor::Kohya || !name.starts_with("lora_unet_") {
        return Ok(name);
    }
    let Some((table, pipeline)) = ctx.names() else {
        return Ok(name);
    };
    if !pipeline.sdxl {
        return Ok(name);
    }
    Ok(table
        .resolve(&layer.target)
        .ok()
        .and_then(|r| pipeline.ldm(&r).cloned())
        .map(|ldm| format!("lora_unet_{}", ldm.replace('.', "_")))
        .unwrap_or(name))
}

pub fn write(adapter: &Adapter, ctx: &Context<'_>, flavor: Flavor) -> Result<Written> {
    let te_count = super::comfy::te_count(adapter);
    // One file is one kohya network module: the side most layers use decides which.
    let outputs = adapter
        .layers
        .iter()
        .filter(|l| l.side == Side::Output)
        .count();
    let legacy = flavor == Flavor::Kohya && outputs * 2 > adapter.layers.len();
    let alpha = free_alpha_for(adapter);
    let dim = adapter
        .layers
        .iter()
        .find(|l| l.side == Side::Output && !l.stages.is_empty())
        .and_then(|l| {
            let s = &l.stages[0];
            s.spec
                .blocks
                .or_else(|| l.target.rotated_dim.map(|d| d / s.spec.block_size.max(1)))
        })
        .unwrap_or(0) as usize;
    let mut tensors = Vec::new();
    let mut mapped = Vec::new();
    let mut block_sizes = std::collections::BTreeMap::<u64, usize>::new();
    let mut shared = false;
    let (mut conv, mut all_linear) = (false, false);
    let mut conv_names = Vec::new();
    for layer in &adapter.layers {
        let name = match kohya_file_name(layer, te_count, flavor, ctx) {
            Ok(n) => n,
            Err(e) => {
                mapped.push((None, None, Status::Impossible { reason: e }));
                continue;
            }
        };
        let m = match (legacy, layer.side) {
            (true, Side::Output) => map_legacy(layer, &name, alpha, dim),
            (false, Side::Input) => map_input(layer, name, ctx),
            (true, Side::Input) => Mapped::Impossible(
                "an input-side layer in a file of output-side (legacy `networks.oft`) layers: \
                 one kohya file holds one network module; convert the input-side layers separately"
                    .into(),
            ),
            (false, Side::Output) => Mapped::Impossible(match flavor {
                Flavor::Kohya => "an output-side layer among input-side ones: one kohya file \
                                  holds one network module"
                    .into(),
                Flavor::OneTrainer => "OneTrainer's OFT_2 rotates input columns; an output-side \
                                       rotation is no input-side one (use --to comfyui or --to \
                                       lycoris, or bake the adapter)"
                    .into(),
            }),
        };
        if let Mapped::Written { .. } = &m {
            let s = &layer.stages[0];
            *block_sizes.entry(s.spec.block_size).or_default() += 1;
            shared |= s.spec.shared;
            let c = super::is_conv(layer, ctx.sd1).unwrap_or(false);
            conv |= c;
            if let (true, Mapped::Written { name, .. }) = (c, &m) {
                conv_names.push(name.trim_end_matches(".oft_R.weight").to_string());
            }
            all_linear |= layer.target.name.contains("_ff_") || layer.target.name.contains(".ff.");
        }
        let (n, d, st, t) = outcome(m);
        tensors.extend(t);
        mapped.push((n, d, st));
    }
    let b = block_sizes
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(b, _)| *b)
        .unwrap_or(0);
    let mut metadata = kept_metadata(adapter);
    // The file cannot say which modules are Conv2d (merged differently); record it for
    // readers that look (oftool's importer does), so the file is self-describing.
    if !legacy {
        metadata.insert(
            crate::import::onetrainer::CONV_LIST_KEY.into(),
            serde_json::to_string(&conv_names).unwrap_or_default(),
        );
    }
    let flag = |v: bool| if v { "True" } else { "False" };
    match (flavor, legacy) {
        (Flavor::Kohya, true) => {
            metadata.insert("ss_network_module".into(), "networks.oft".into());
            metadata.insert("ss_network_dim".into(), dim.to_string());
            metadata.insert("ss_network_alpha".into(), format!("{alpha}"));
            metadata.insert(
                "ss_network_args".into(),
                serde_json::json!({"enable_all_linear": flag(all_linear), "enable_conv": flag(conv)})
                    .to_string(),
            );
        }
        (Flavor::Kohya, false) => {
            metadata.insert("ss_network_module".into(), "networks.oft_v2".into());
            metadata.insert("ss_network_dim".into(), b.to_string());
            metadata.insert(
                "ss_network_args".into(),
                serde_json::json!({"block_share": flag(shared), "enable_conv": flag(conv)})
                    .to_string(),
            );
        }
        (Flavor::OneTrainer, _) => {
            metadata.insert(
                "ot_config".into(),
                serde_json::json!({
                    "peft_type": "OFT_2",
                    "oft_block_size": b,
                    "oft_block_share": shared,
                    "oft_scaled": false,
                })
                .to_string(),
            );
        }
    }
    Ok(Written::single(tensors, metadata, mapped, Vec::new()))
}
