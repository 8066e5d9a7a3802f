//! OneTrainer `OFT_2` (formats.md §8.1): PEFT's packed triangles `<module>.oft_R.weight` under
//! trainer prefixes (KOHYA `lora_unet_…`, COMFY `diffusion_model.…`, OMI `unet.…` key layouts),
//! in scaled OFT with a 0-dim `<module>.oft_R.scaled_oft` marker, and `ot_config` metadata.
//! Read and written through [`super::codec::packed`], which kohya's `networks.oft_v2` shares;
//! what the ComfyUI-OFTv2 custom node reads.
//!
//! Its marker is `ot_config` or a `scaled_oft` tensor; a trainer file with neither is kohya's
//! ([`super::kohya`]). Scaled OFT stores `σ·Q_p` with `σ = 2·√(b − 1)`.

use super::codec::packed::{self, CONV_LIST_KEY, Trainer, WEIGHT};
use super::report::{self, Context, Written};
use super::{Claim, Layout, Probe, Reader, Source, Variant, Writes, names};
use crate::error::Result;
use crate::model::{Adapter, Layer, Side};
use serde_json::Value;

pub static LAYOUT: Layout = Layout {
    id: "onetrainer",
    aliases: &["oft-v2"],
    about: "OneTrainer `OFT_2` (KOHYA key layout; also read by the ComfyUI-OFTv2 node)",
    reads: Some(Reader {
        keys: &[WEIGHT, SCALED],
        companions: &[],
        markers: &[],
        directories: false,
        detect,
        variants: &[&OFT2],
    }),
    writes: Writes::Writer(write),
    metadata_keys: &["ot_config", CONV_LIST_KEY],
};

/// The marker of a scaled-OFT module.
const SCALED: &str = ".oft_R.scaled_oft";

static OFT2: Variant = Variant::new("oft2", import);

fn detect(probe: &Probe<'_>) -> Result<Vec<Claim>> {
    let scaled = probe.has(SCALED);
    let ours = scaled || (probe.has(WEIGHT) && probe.metadata("ot_config").is_some());
    Ok(if ours {
        vec![Claim::marker(&OFT2)]
    } else {
        Vec::new()
    })
}

fn import(src: &Source<'_>) -> Result<Adapter> {
    // Whether one stored row means a shared block (else: a layer of one block).
    let block_share = src
        .file
        .metadata
        .get("ot_config")
        .and_then(|c| serde_json::from_str::<Value>(c).ok())
        .and_then(|c| c.get("oft_block_share").and_then(Value::as_bool));
    let trainer = Trainer {
        source_format: "onetrainer-oft2",
        block_share,
        coft: None,
        scaled: Some(SCALED),
    };
    packed::read_trainer(src, &trainer)
}

/// A diffusion transformer's layer in OneTrainer's COMFY (`diffusion_model.` + original name)
/// or DIFFUSERS (`transformer.` + diffusers name) key layout, when `--names` (or the base) asks
/// for one and the layer's name is in that layout.
fn dit_name(layer: &Layer, ctx: &Context<'_>) -> Option<String> {
    use crate::resolve::dit::{self, BaseLayout};
    let want = ctx.dit_names?;
    let place = dit::place_as(&layer.target.name, &[], want)?;
    let module = dit::counterparts(&place, want).into_iter().next()?.module;
    Some(match want {
        BaseLayout::Original => format!("{}{module}", names::COMFY_UNET),
        BaseLayout::Diffusers => format!("{}.{module}", names::TRANSFORMER),
    })
}

/// `--to onetrainer`: input-side layers only, under kohya names.
fn write(adapter: &Adapter, ctx: &Context<'_>) -> Result<Written> {
    let te_count = names::te_count(adapter);
    let (tensors, mapped) = report::map_layers(adapter, |layer| {
        let name = match dit_name(layer, ctx) {
            Some(n) => n,
            None => names::kohya_name(layer, te_count)?,
        };
        if layer.side == Side::Output {
            return Err(
                "OneTrainer's OFT_2 rotates input columns; an output-side rotation is no \
                        input-side one (use --to comfyui or --to lycoris, or bake the adapter)"
                    .into(),
            );
        }
        packed::encode_input(layer, name, ctx)
    });
    let summary = packed::Summary::of(adapter, &mapped, ctx);
    let mut metadata = report::kept_metadata(adapter);
    let (key, conv) = summary.conv_list();
    metadata.insert(key, conv);
    metadata.insert(
        "ot_config".into(),
        serde_json::json!({
            "peft_type": "OFT_2",
            "oft_block_size": summary.block_size,
            "oft_block_share": summary.shared,
            "oft_scaled": false,
        })
        .to_string(),
    );
    Ok(Written::single(tensors, metadata, mapped, Vec::new()))
}
