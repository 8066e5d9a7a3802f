//! kohya sd-scripts (formats.md §4): every network module oftool knows of it.
//!
//! * Legacy `networks.oft` (§4.1): `oft_unet_<name>.oft_blocks [N, b, b]` + `.alpha`, output
//!   side, U-Net only, one block count per file (`network_dim`), kohya's always-on clamp
//!   (pre-applied on read; made inert by a large `alpha` on write). Tensors:
//!   [`super::codec::blocks`].
//! * `networks.oft_v2` (§4.3): `lora_*_<name>.oft_R.weight`, input side, PEFT ≥ 0.18's 5-term
//!   series, `block_share`/`coft`/`coft_eps` in `ss_network_args`; OneTrainer's `OFT_2` shares
//!   the tensors ([`super::codec::packed`]). A trainer-prefixed `oft_R.weight` file without
//!   OneTrainer's marker is read as kohya's.
//! * `networks.boft` (§4.3): `lora_*.boft_R` / `.boft_s` ([`super::codec::butterfly`]), read.
//! * Legacy Flux `networks.oft_flux` (§4.2): `oft_unet_<BFL module>.oft_blocks.<i> [N, b_i, b_i]`
//!   and one `.alpha`, one output-side rotation per split of a fused weight (`img_attn.qkv`: q, k,
//!   v; `linear1`: q, k, v and the MLP input, of different sizes), each clamped to radius
//!   `alpha · rows of the split`. Each split is read as a layer of its own on its rows of the
//!   named weight (`Target::rows`: the splits laid end to end, in index order). The reference is
//!   the module's forward (its `merge_to` cannot merge, fixtures/README.md).
//!
//! `--to kohya` writes an adapter whose layers mostly rotate output rows as `networks.oft`,
//! else as `networks.oft_v2`; SDXL U-Net modules get sd-scripts' sgm names when the base says
//! the base is SDXL.

use super::codec::blocks::{self, Family, Shape};
use super::codec::butterfly::{self, Scale};
use super::codec::packed::{self, CONV_LIST_KEY, Trainer, WEIGHT};
use super::report::{self, Context, Mapped, Mapping, Written, f32_tensor};
use super::{Claim, Layout, Probe, Reader, Source, Variant, Writes, common, names};
use crate::error::{Error, Result};
use crate::model::*;
use serde_json::Value;
use std::collections::BTreeMap;

pub static LAYOUT: Layout = Layout {
    id: "kohya",
    aliases: &[],
    about: "kohya sd-scripts: `networks.oft` (output side) or `networks.oft_v2` (input side)",
    reads: Some(Reader {
        keys: &[".oft_blocks", FLUX, WEIGHT, ".boft_R"],
        companions: &[".alpha", ".boft_s"],
        markers: &[],
        directories: false,
        detect,
        variants: &[&OFT, &OFT_FLUX, &OFT_V2, &BOFT],
    }),
    writes: Writes::Writer(write),
    metadata_keys: &[
        "ss_network_module",
        "ss_network_args",
        "ss_network_dim",
        "ss_network_alpha",
        CONV_LIST_KEY,
    ],
};

/// Legacy Flux OFT's per-split blocks (`<i>` is the split's index).
const FLUX: &str = ".oft_blocks.<i>";

/// Legacy `networks.oft`.
static OFT: Variant = Variant::new("oft", import_legacy);

static OFT_V2: Variant = Variant::new("oft-v2", import_v2);

/// `networks.oft_flux`.
static OFT_FLUX: Variant = Variant::new("oft-flux", import_flux);

static BOFT: Variant = Variant::new("boft", import_boft);

fn detect(probe: &Probe<'_>) -> Result<Vec<Claim>> {
    let mut claims = Vec::new();
    if probe.any(|n| n.contains(".oft_blocks.")) {
        if probe.metadata("ss_network_module") == Some("networks.oft_flux") {
            claims.push(Claim::marker(&OFT_FLUX));
        } else {
            claims.push(Claim::names(&OFT_FLUX));
        }
    }
    if probe.any(|n| {
        n.ends_with(".oft_blocks") && n.starts_with(names::KOHYA_OFT_UNET) && probe.rank(n) != 4
    }) {
        claims.push(Claim::names(&OFT));
    }
    if probe.has(WEIGHT) {
        if probe.metadata("ss_network_module") == Some("networks.oft_v2") {
            claims.push(Claim::marker(&OFT_V2));
        } else if probe.any(names::has_trainer_prefix) {
            claims.push(Claim::names(&OFT_V2));
        }
    }
    if (probe.has(".boft_R") || probe.has(".boft_s"))
        && probe.any(|n| n.starts_with(names::KOHYA_STYLE))
    {
        claims.push(Claim::names(&BOFT));
    }
    Ok(claims)
}

fn import_legacy(src: &Source<'_>) -> Result<Adapter> {
    if src.semantics == blocks::Semantics::ComfyUi {
        return Err(Error::unsupported(
            src.path,
            "ComfyUI does not load kohya legacy `oft_unet_` files (it reports \"lora key not loaded\")",
        ));
    }
    let layers = common::read_modules(src, &blocks::SUFFIXES, blocks::WHAT, |st, m| {
        blocks::read_layer(src, st, m, Family::KohyaLegacy).map(|(l, _)| l)
    })?;
    common::adapter(
        src.path,
        src.file,
        "kohya-oft",
        None,
        BTreeMap::new(),
        layers,
    )
}

fn import_flux(src: &Source<'_>) -> Result<Adapter> {
    if src.semantics == blocks::Semantics::ComfyUi {
        return Err(Error::unsupported(
            src.path,
            "ComfyUI does not load kohya `networks.oft_flux` files (it reports \"lora key not loaded\")",
        ));
    }
    let st = src.file.tensors();
    // module → split indices present.
    let mut modules: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for name in st.names() {
        if let Some(m) = name.strip_suffix(".alpha") {
            modules.entry(m.to_string()).or_default();
            continue;
        }
        let split = name
            .rsplit_once(".oft_blocks.")
            .and_then(|(m, i)| Some((m, i.parse::<usize>().ok()?)));
        let Some((m, i)) = split else {
            return Err(Error::format(
                src.path,
                format!(
                    "unexpected tensor `{name}` in a kohya oft_flux file (expected `*.oft_blocks.<i>`, `*.alpha`)"
                ),
            ));
        };
        modules.entry(m.to_string()).or_default().push(i);
    }
    let mut layers = Vec::new();
    for (module, mut splits) in modules {
        splits.sort_unstable();
        if splits.is_empty() || splits.iter().enumerate().any(|(n, &i)| n != i) {
            return Err(Error::format(
                src.path,
                format!(
                    "`{module}` has splits {splits:?}; kohya oft_flux writes `oft_blocks.0` … `oft_blocks.<n−1>`"
                ),
            ));
        }
        let single = splits.len() == 1;
        let mut start = 0u64;
        for i in splits {
            let (mut layer, _) = blocks::read_blocks(
                src,
                &st,
                &module,
                &format!("oft_blocks.{i}"),
                Family::KohyaLegacy,
            )?;
            let len = layer.target.rotated_dim.unwrap_or(0);
            // One split covers the whole weight (kohya splits only qkv and linear1).
            if !single {
                layer.target.rows = Some(vec![RowRange { start, len }]);
            }
            start += len;
            layers.push(layer);
        }
    }
    common::adapter(
        src.path,
        src.file,
        "kohya-oft-flux",
        None,
        BTreeMap::new(),
        layers,
    )
}

fn import_v2(src: &Source<'_>) -> Result<Adapter> {
    let args: Value = src
        .file
        .metadata
        .get("ss_network_args")
        .and_then(|a| serde_json::from_str(a).ok())
        .unwrap_or(Value::Null);
    // sd-scripts writes every argument as a string.
    let arg = |k: &str| {
        args.get(k).and_then(|v| match v {
            Value::String(s) => Some(s.clone()),
            Value::Bool(b) => Some(b.to_string()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        })
    };
    let is_true = |k: &str| arg(k).map(|v| v.eq_ignore_ascii_case("true"));
    let coft_eps = arg("coft_eps")
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(6e-5);
    let trainer = Trainer {
        source_format: "kohya-oft-v2",
        block_share: is_true("block_share"),
        coft: is_true("coft").unwrap_or(false).then_some(coft_eps),
        scaled: None,
    };
    packed::read_trainer(src, &trainer)
}

fn import_boft(src: &Source<'_>) -> Result<Adapter> {
    let layers = butterfly::read_file(src, Scale::Kohya, |layer, module| {
        let (convention, component) = names::classify(module);
        layer.target.convention = convention.into();
        layer.target.component = component.map(str::to_string);
    })?;
    common::adapter(
        src.path,
        src.file,
        "kohya-boft",
        None,
        BTreeMap::new(),
        layers,
    )
}

/// One output-side layer as a legacy `networks.oft` module (`oft_unet_<name>`, `dim` blocks).
fn map_legacy(layer: &Layer, name: &str, alpha: f64, dim: usize) -> Mapped {
    let rest = name
        .strip_prefix(names::LORA_UNET)
        .ok_or("kohya's legacy OFT (`networks.oft`) adapts U-Net modules only")?;
    if layer.stages.len() != 1 || layer.stages[0].spec.wiring != Wiring::Identity {
        return Err(
            "several stages or a butterfly wiring: kohya's legacy OFT holds one block-diagonal \
             rotation per module"
                .into(),
        );
    }
    let mut e = blocks::encode(layer, Shape::Diag, "kohya's legacy OFT")?;
    let (n, b) = (e.blocks, e.block_size);
    if n != dim {
        return Err(format!(
            "{n} blocks, but kohya's loader takes one block count per file (`network_dim` = \
             {dim}, from the first module)"
        ));
    }
    let name = format!("{}{rest}", names::KOHYA_OFT_UNET);
    let tensors = vec![
        f32_tensor(format!("{name}.oft_blocks"), vec![n, b, b], &e.values)?,
        f32_tensor(format!("{name}.alpha"), vec![], &[alpha])?,
    ];
    if layer.row_scale.is_some() {
        e.denoted.row_scale = None;
        e.lossy
            .push("kohya's legacy OFT has no row scale (`rescale`); it is dropped".into());
    }
    Ok(Mapping {
        name,
        tensors,
        denoted: e.denoted,
        lossy: e.lossy,
    })
}

/// One layer of a `networks.oft_flux` file: the BFL module and which of its splits.
struct FluxSplit {
    /// The original-layout module (`double_blocks.0.img_attn.qkv`).
    module: String,
    /// The split's index (`oft_blocks.<i>`).
    index: usize,
}

/// FLUX.1 layers as kohya's `networks.oft_flux` splits (`None`: not a FLUX.1 adapter): per
/// layer, its module and split, or why it is none. kohya splits a fused module into its q, k, v
/// (and `linear1`'s MLP input) rows, each its own rotation, and stores every split of it.
fn flux_splits(adapter: &Adapter) -> Option<Vec<std::result::Result<FluxSplit, String>>> {
    use crate::resolve::dit::{self, BaseLayout};
    let fams = [&dit::FLUX1];
    let flux = dit::expected(adapter.layers.iter().map(|l| l.target.name.as_str()))
        .is_some_and(|e| e.families.iter().any(|f| f.id == dit::FLUX1.id));
    if !flux {
        return None;
    }
    let mut out: Vec<std::result::Result<(String, usize, usize), String>> = Vec::new();
    for layer in &adapter.layers {
        let name = &layer.target.name;
        let found = if layer.target.rows.is_some() {
            None
        } else if let Some(p) = dit::place_as(name, &fams, BaseLayout::Original) {
            let parts = p.map.diffusers.len();
            (parts == 1).then(|| (dit::fill(p.map.original, &p.index), 0, 1))
        } else {
            // The final adaLN's halves are swapped between the layouts: output-side blocks in
            // diffusers row order are no blocks of the original weight.
            let swapped =
                |p: &dit::Place| matches!(p.map.kind, dit::Kind::Swap | dit::Kind::SwapIfTwo);
            dit::place_as(name, &fams, BaseLayout::Diffusers)
                .filter(|p| !swapped(p))
                .and_then(|p| {
                    let cp = dit::counterparts(&p, BaseLayout::Original)
                        .into_iter()
                        .next()?;
                    let parts = p.map.diffusers.len();
                    Some((cp.module, cp.part.unwrap_or(0), parts))
                })
        };
        out.push(found.ok_or_else(|| {
            format!(
                "`{name}` is no FLUX.1 module kohya's oft_flux adapts whole or as one split of \
                 a fused one (a rotation of a whole fused module is no rotation per split)"
            )
        }));
    }
    // Every split of a fused module, once each.
    let mut res = Vec::new();
    for o in &out {
        res.push(match o {
            Err(e) => Err(e.clone()),
            Ok((module, index, parts)) => {
                let mine: Vec<usize> = out
                    .iter()
                    .filter_map(|x| x.as_ref().ok())
                    .filter(|x| &x.0 == module)
                    .map(|x| x.1)
                    .collect();
                let mut sorted = mine.clone();
                sorted.sort_unstable();
                if sorted.iter().copied().ne(0..*parts) {
                    Err(format!(
                        "kohya's oft_flux stores every split of `{module}` ({parts} splits), \
                         one each; the adapter has splits {sorted:?}"
                    ))
                } else {
                    Ok(FluxSplit {
                        module: module.clone(),
                        index: *index,
                    })
                }
            }
        });
    }
    Some(res)
}

/// One output-side FLUX.1 layer as a split of a `networks.oft_flux` module.
fn map_flux(layer: &Layer, split: &FluxSplit, alpha: f64, dim: usize) -> Mapped {
    if layer.stages.len() != 1 || layer.stages[0].spec.wiring != Wiring::Identity {
        return Err(
            "several stages or a butterfly wiring: kohya's oft_flux holds one block-diagonal \
             rotation per split"
                .into(),
        );
    }
    let mut e = blocks::encode(layer, Shape::Diag, "kohya's oft_flux")?;
    let (n, b) = (e.blocks, e.block_size);
    if n != dim {
        return Err(format!(
            "{n} blocks, but kohya's oft_flux takes one block count per file (`network_dim` = \
             {dim}, from the first module)"
        ));
    }
    let module = format!(
        "{}{}",
        names::KOHYA_OFT_UNET,
        split.module.replace('.', "_")
    );
    let mut tensors = vec![f32_tensor(
        format!("{module}.oft_blocks.{}", split.index),
        vec![n, b, b],
        &e.values,
    )?];
    if split.index == 0 {
        tensors.push(f32_tensor(format!("{module}.alpha"), vec![], &[alpha])?);
    }
    if layer.row_scale.is_some() {
        e.denoted.row_scale = None;
        e.lossy
            .push("kohya's oft_flux has no row scale (`rescale`); it is dropped".into());
    }
    Ok(Mapping {
        name: format!("{module}.oft_blocks.{}", split.index),
        tensors,
        denoted: e.denoted,
        lossy: e.lossy,
    })
}

/// kohya trains SDXL on its sgm-named U-Net, so its SDXL files name U-Net modules the ldm/sgm
/// way (`lora_unet_input_blocks_4_1_…`); SD 1.x/2.x files use diffusers names. With a base, a
/// U-Net layer of an SDXL base is named the sgm way.
fn file_name(
    layer: &Layer,
    te_count: usize,
    ctx: &Context<'_>,
) -> std::result::Result<String, String> {
    let name = names::kohya_name(layer, te_count)?;
    let Some((table, pipeline)) = ctx.names() else {
        return Ok(name);
    };
    if !name.starts_with(names::LORA_UNET) || !pipeline.sdxl {
        return Ok(name);
    }
    Ok(table
        .resolve(&layer.target)
        .ok()
        .and_then(|r| pipeline.ldm(&r).cloned())
        .map(|ldm| format!("{}{}", names::LORA_UNET, ldm.replace('.', "_")))
        .unwrap_or(name))
}

/// `network_dim` of a legacy file: the block count of the first output-side layer.
fn legacy_dim(adapter: &Adapter) -> usize {
    adapter
        .layers
        .iter()
        .find(|l| l.side == Side::Output && !l.stages.is_empty())
        .and_then(|l| {
            let s = &l.stages[0];
            s.spec
                .blocks
                .or_else(|| l.target.rotated_dim.map(|d| d / s.spec.block_size.max(1)))
        })
        .unwrap_or(0) as usize
}

/// `--to kohya`: one file is one kohya network module, so the side most layers use decides
/// which (`networks.oft` for output rows, `networks.oft_v2` for input columns).
fn write(adapter: &Adapter, ctx: &Context<'_>) -> Result<Written> {
    let te_count = names::te_count(adapter);
    let outputs = adapter
        .layers
        .iter()
        .filter(|l| l.side == Side::Output)
        .count();
    let legacy = outputs * 2 > adapter.layers.len();
    let alpha = blocks::free_alpha_for(adapter);
    let dim = legacy_dim(adapter);
    let flux = legacy.then(|| flux_splits(adapter)).flatten();
    let mut index = 0;
    let (tensors, mapped) = report::map_layers(adapter, |layer| {
        let i = index;
        index += 1;
        if let Some(splits) = &flux {
            return match (layer.side, splits.get(i)) {
                (Side::Output, Some(Ok(split))) => map_flux(layer, split, alpha, dim),
                (Side::Output, Some(Err(why))) => Err(why.clone()),
                _ => Err(
                    "an input-side layer in a file of output-side (`networks.oft_flux`) \
                          layers: one kohya file holds one network module; convert the \
                          input-side layers separately"
                        .into(),
                ),
            };
        }
        let name = file_name(layer, te_count, ctx)?;
        match (legacy, layer.side) {
            (true, Side::Output) => map_legacy(layer, &name, alpha, dim),
            (false, Side::Input) => packed::encode_input(layer, name, ctx),
            (true, Side::Input) => Err(
                "an input-side layer in a file of output-side (legacy `networks.oft`) layers: \
                 one kohya file holds one network module; convert the input-side layers separately"
                    .into(),
            ),
            (false, Side::Output) => Err("an output-side layer among input-side ones: one kohya \
                                          file holds one network module"
                .into()),
        }
    });
    let summary = packed::Summary::of(adapter, &mapped, ctx);
    let mut metadata = report::kept_metadata(adapter);
    let flag = |v: bool| if v { "True" } else { "False" };
    let (module, args) = if flux.is_some() {
        metadata.insert("ss_network_dim".into(), dim.to_string());
        metadata.insert("ss_network_alpha".into(), format!("{alpha}"));
        (
            "networks.oft_flux",
            serde_json::json!({"enable_all_linear": flag(summary.all_linear)}),
        )
    } else if legacy {
        metadata.insert("ss_network_dim".into(), dim.to_string());
        metadata.insert("ss_network_alpha".into(), format!("{alpha}"));
        (
            "networks.oft",
            serde_json::json!({"enable_all_linear": flag(summary.all_linear), "enable_conv": flag(summary.conv)}),
        )
    } else {
        let (key, conv) = summary.conv_list();
        metadata.insert(key, conv);
        metadata.insert("ss_network_dim".into(), summary.block_size.to_string());
        (
            "networks.oft_v2",
            serde_json::json!({"block_share": flag(summary.shared), "enable_conv": flag(summary.conv)}),
        )
    };
    metadata.insert("ss_network_module".into(), module.into());
    metadata.insert("ss_network_args".into(), args.to_string());
    Ok(Written::single(tensors, metadata, mapped, Vec::new()))
}
