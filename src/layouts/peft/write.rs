//! PEFT ≥ 0.18 OFT adapter directories (formats.md §3.3, §3.5): `adapter_config.json` +
//! `adapter_model.safetensors` with `base_model.model.<module>.oft_R.weight`, one directory per
//! diffusers component (`unet/`, `text_encoder/`, …) when the adapter spans several.
//!
//! PEFT's config holds one setting for the whole adapter: the map (`use_cayley_neumann`,
//! `num_cayley_neumann_terms`), the block size (`oft_block_size`, adjusted per layer to the
//! nearest divisor) and `block_share`. The exact branch computes `Cay−(Q_p)`, so exact layers
//! store `Q_p = −Q`; Neumann layers store `Q`; Embedding layers (`W·BD(R)`) the other sign.

use super::major_minor;
use crate::error::{Category, Error, Result};
use crate::layouts::codec::butterfly::{self, Sizing};
use crate::layouts::names;
use crate::layouts::report::{
    self, Context, LayerOutcome, Mapped, Mapping, OutFile, OwnedTensor, Status, Written, f32_tensor,
};
use crate::model::*;
use serde_json::Value;
use std::path::PathBuf;

/// PEFT's `adjust_oft_parameters`: the block size a layer of `d` features gets for `wanted`.
fn peft_block_size(d: u64, wanted: u64) -> u64 {
    if wanted == 0 || (d.is_multiple_of(wanted) && wanted <= d) {
        return wanted;
    }
    if wanted >= d {
        return d;
    }
    let mut higher = wanted;
    while higher <= d && !d.is_multiple_of(higher) {
        higher += 1;
    }
    let mut lower = wanted;
    while lower > 1 && !d.is_multiple_of(lower) {
        lower -= 1;
    }
    if wanted - lower <= higher - wanted {
        lower
    } else {
        higher
    }
}

/// The settings one PEFT config applies to every layer of a component.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Settings {
    map: RotationMap,
    /// `oft_block_size`, or 0 when the config sets `r` (a block count) instead.
    block_size: u64,
    /// `r`: the number of blocks of every layer (0 when `oft_block_size` is set).
    r: u64,
    share: bool,
}

impl Settings {
    /// The block size PEFT gives a layer of `d` features under these settings.
    fn block_for(&self, d: u64) -> u64 {
        if self.r > 0 {
            let r = peft_block_size(d, self.r);
            d / r.max(1)
        } else {
            peft_block_size(d, self.block_size)
        }
    }
}

fn most_common<T: PartialEq + Copy>(items: impl Iterator<Item = T>) -> Option<T> {
    let mut counts: Vec<(T, usize)> = Vec::new();
    for x in items {
        match counts.iter_mut().find(|(y, _)| *y == x) {
            Some((_, n)) => *n += 1,
            None => counts.push((x, 1)),
        }
    }
    // First of the most frequent (stable for ties).
    let best = counts.iter().map(|(_, n)| *n).max()?;
    counts.into_iter().find(|(_, n)| *n == best).map(|(x, _)| x)
}

const OUTPUT_SIDE: &str = "it rotates the output rows (PEFT ≤ 0.13, kohya legacy, LyCORIS); PEFT ≥ 0.14 \
     rotates input columns, and an output-side rotation is no input-side one. Bake the adapter \
     (oftool merge), or write it for LyCORIS/ComfyUI (--to lycoris, --to comfyui)";

/// Why a layer can be no PEFT OFT layer whatever the config, if so.
fn never_oft(layer: &Layer) -> Option<&'static str> {
    if layer.side != Side::Input {
        return Some(OUTPUT_SIDE);
    }
    if layer.stages.len() != 1 || layer.stages[0].spec.wiring != Wiring::Identity {
        return Some(
            "several stages or a butterfly wiring (BOFT): a PEFT OFT layer is one block-diagonal \
             rotation",
        );
    }
    None
}

/// Why `set` gives a layer of this stage's axis another block size, if it does.
fn block_misfit(stage: &Stage, d: Option<u64>, set: Settings) -> Option<String> {
    let b = stage.spec.block_size;
    match d {
        Some(d) if set.block_for(d) != b => Some(format!(
            "block size {b}, but PEFT's config holds one setting for all layers ({}) and gives a \
             layer of {d} features blocks of {}",
            if set.r > 0 {
                format!("r = {}", set.r)
            } else {
                format!("oft_block_size = {}", set.block_size)
            },
            set.block_for(d)
        )),
        None if set.r > 0 || b != set.block_size => Some(format!(
            "block size {b} on an axis of unknown length, but PEFT's config holds one \
             `oft_block_size` ({}); pass --base",
            set.block_size
        )),
        _ => None,
    }
}

/// The stored rows of a stage under the config's `block_share`, and how many they are.
fn shared_rows(
    stage: &Stage,
    d: Option<u64>,
    share: bool,
) -> std::result::Result<(Vec<f64>, usize), String> {
    if stage.spec.shared == share {
        return Ok((stage.q.clone(), stage.stored_blocks() as usize));
    }
    if stage.spec.shared {
        return report::expanded_rows(stage, d).ok_or_else(|| report::UNKNOWN_REPEAT.into());
    }
    let first = stage.q_row(0);
    let n = stage.stored_blocks() as usize;
    if (0..n).all(|k| stage.q_row(k) == first) {
        Ok((first.to_vec(), 1))
    } else {
        Err(
            "distinct blocks, but the PEFT config shares one block per layer (`block_share`) \
             for this adapter's other layers"
                .into(),
        )
    }
}

/// What PEFT ≥ 0.18 computes from a layer written under `set`, with the reasons it differs.
fn denote(
    layer: &Layer,
    values: &[f64],
    sign: f64,
    n_rows: usize,
    set: Settings,
) -> (Layer, Vec<String>) {
    let stage = &layer.stages[0];
    let mut lossy = Vec::new();
    let mut denoted = layer.clone();
    let ds = &mut denoted.stages[0];
    ds.q = values.iter().map(|&x| sign * (x as f32 as f64)).collect();
    ds.q_f64 = false;
    ds.spec.shared = set.share;
    if !set.share {
        ds.spec.blocks = Some(n_rows as u64);
    }
    if stage.spec.map != set.map {
        ds.spec.map = set.map;
        lossy.push(format!(
            "PEFT's config sets one map for the adapter ({}), this layer has the {}",
            set.map.describe(),
            stage.spec.map.describe()
        ));
    }
    if let RotationMap::Neumann {
        terms,
        variant: NeumannVariant::Peft016,
    } = set.map
        && terms >= 3
    {
        ds.spec.map = RotationMap::Neumann {
            terms,
            variant: NeumannVariant::Peft018,
        };
        lossy.push(
            "PEFT ≥ 0.18 evaluates the Neumann series with its new coefficients (the source \
                 used PEFT 0.16–0.17's)"
                .into(),
        );
    }
    if let Some((_, s)) = &layer.row_scale {
        if s.iter().any(|&v| v != 1.0) {
            lossy.push("PEFT ≥ 0.16 OFT has no row scale (`oft_s`); it is dropped".into());
        }
        denoted.row_scale = None;
    }
    denoted.constraint = None;
    (denoted, lossy)
}

fn map_layer(layer: &Layer, module: &str, set: Settings) -> Mapped {
    if let Some(why) = never_oft(layer) {
        return Err(why.into());
    }
    let stage = &layer.stages[0];
    let d = layer.target.rotated_dim.or(stage.dim());
    if let Some(why) = block_misfit(stage, d, set) {
        return Err(why);
    }
    let (rows, n_rows) = shared_rows(stage, d, set.share)?;
    let embedding = layer.target.module == ModuleKind::Embedding;
    let exact = set.map == RotationMap::Cayley;
    // Canonical Cay+(Q): PEFT exact = Cay+(−Q_p); Neumann ≈ Cay+(Q_p); Embedding transposes.
    let sign = if exact != embedding { -1.0 } else { 1.0 };
    let values: Vec<f64> = rows.iter().map(|x| sign * x).collect();
    let suffix = if embedding {
        super::oft::SUFFIX_EMBEDDING
    } else {
        super::oft::SUFFIX_LINEAR
    };
    let name = format!("{}{module}", names::PEFT_WRAPPER);
    let t = f32_tensor(
        format!("{name}{suffix}"),
        vec![n_rows, stage.tri_len()],
        &values,
    )?;
    let (denoted, lossy) = denote(layer, &values, sign, n_rows, set);
    Ok(Mapping {
        name,
        tensors: vec![t],
        denoted,
        lossy,
    })
}

/// An `adapter_config.json` of `peft_type` for `modules`: PEFT's common fields plus `own`.
fn peft_config(peft_type: &str, modules: &[String], own: Value) -> Value {
    let mut v = serde_json::json!({
        "peft_type": peft_type,
        "task_type": null,
        "base_model_name_or_path": null,
        "revision": null,
        "inference_mode": true,
        "target_modules": modules,
        "exclude_modules": null,
        "fan_in_fan_out": false,
        "bias": "none",
        "init_weights": true,
        "layers_to_transform": null,
        "layers_pattern": null,
        "modules_to_save": null,
        "peft_version": "0.18.0",
    });
    if let (Value::Object(all), Value::Object(own)) = (&mut v, own) {
        all.extend(own);
    }
    v
}

fn config_json(set: Settings, modules: &[String], source: Option<&str>) -> String {
    let (neumann, terms) = match set.map {
        RotationMap::Cayley => (false, 5),
        RotationMap::Neumann { terms, .. } => (true, terms),
    };
    let v = peft_config(
        "OFT",
        modules,
        serde_json::json!({
            "r": set.r,
            "oft_block_size": set.block_size,
            "module_dropout": 0.0,
            "coft": false,
            "eps": 6e-5,
            "block_share": set.share,
            "use_cayley_neumann": neumann,
            "num_cayley_neumann_terms": terms,
        }),
    );
    // Keep a PEFT source's own settings (base model, task, auto_mapping, …); the math keys and
    // a pre-0.18 version are ours.
    let mut out = v.clone();
    if let Some(Value::Object(src)) = source.and_then(|s| serde_json::from_str::<Value>(s).ok())
        && src.get("peft_type").and_then(Value::as_str) == Some("OFT")
    {
        let mut merged = src.clone();
        let keep_version = src
            .get("peft_version")
            .and_then(Value::as_str)
            .and_then(major_minor)
            .is_some_and(|mm| mm >= (0, 18));
        if let Value::Object(ours) = &v {
            for (k, val) in ours {
                let math = !matches!(
                    k.as_str(),
                    "task_type" | "base_model_name_or_path" | "revision" | "inference_mode"
                );
                if (math && !(k == "peft_version" && keep_version)) || !merged.contains_key(k) {
                    merged.insert(k.clone(), val.clone());
                }
            }
        }
        out = Value::Object(merged);
    }
    serde_json::to_string_pretty(&out).unwrap_or_default() + "\n"
}

/// `--to peft`: one PEFT directory per diffusers component.
pub fn write(adapter: &Adapter, ctx: &Context<'_>) -> Result<Written> {
    let mut mapped: Vec<LayerOutcome> = vec![(None, None, Status::Exact); adapter.layers.len()];
    let groups = group(adapter, ctx, &mut mapped)?;
    let mut md = report::kept_metadata(adapter);
    md.insert("format".into(), "pt".into());
    let mut files = Vec::new();
    for (comp, members) in &groups {
        let dir = comp.as_deref().map(PathBuf::from).unwrap_or_default();
        // A row scale or a butterfly needs PEFT's BOFT (`boft_s`, `boft_R` per factor).
        let needs_boft = members.iter().any(|(i, _)| {
            let l = &adapter.layers[*i];
            l.side == Side::Input
                && (l.stages.len() > 1
                    || l.row_scale
                        .as_ref()
                        .is_some_and(|(_, s)| s.iter().any(|&v| v != 1.0)))
        });
        let written = if needs_boft {
            Some(write_boft(adapter, members, ctx, &mut mapped))
        } else {
            write_oft(adapter, members, &mut mapped)
        };
        let Some((config, tensors)) = written else {
            continue;
        };
        files.push(OutFile::Text {
            rel: dir.join("adapter_config.json"),
            text: config,
        });
        files.push(OutFile::Safetensors {
            rel: dir.join("adapter_model.safetensors"),
            tensors,
            metadata: md.clone(),
        });
    }
    Ok(Written {
        files,
        mapped,
        warnings: Vec::new(),
        directory: true,
    })
}

/// A component and its members: `(layer index, module path)`.
type Group = (Option<String>, Vec<(usize, String)>);

/// Layers by component, each group one PEFT directory; layers that can be in none get their
/// reason in `mapped`.
fn group(adapter: &Adapter, ctx: &Context<'_>, mapped: &mut [LayerOutcome]) -> Result<Vec<Group>> {
    let mut groups: Vec<Group> = Vec::new();
    for (i, layer) in adapter.layers.iter().enumerate() {
        // The side decides before the name: an output-side layer is impossible whatever it is
        // called.
        if layer.side != Side::Input {
            mapped[i].2 = Status::Impossible {
                reason: OUTPUT_SIDE.into(),
            };
            continue;
        }
        match names::pipeline_name(layer, ctx.names()) {
            Ok((comp, module)) => match groups.iter_mut().find(|(c, _)| *c == comp) {
                Some((_, v)) => v.push((i, module)),
                None => groups.push((comp, vec![(i, module)])),
            },
            Err(e) => mapped[i].2 = Status::Impossible { reason: e },
        }
    }
    // A diffusion transformer's layers naming no component beside `transformer` ones are the
    // transformer's (a PEFT name beside a `transformer.`-prefixed one, a row slice renamed by
    // the base).
    if groups.len() == 2
        && groups
            .iter()
            .any(|(c, _)| c.as_deref() == Some(names::TRANSFORMER))
        && let Some(k) = groups.iter().position(|(c, _)| c.is_none())
    {
        let (_, loose) = groups.remove(k);
        if let Some((_, v)) = groups.first_mut() {
            v.extend(loose);
            v.sort_by_key(|(i, _)| *i);
        }
    }
    if groups.len() > 1 && groups.iter().any(|(c, _)| c.is_none()) {
        return Err(Error::new(
            Category::Conversion,
            "the adapter spans several pipeline components but some layers name none; cannot tell \
             which PEFT directory they belong to",
        ));
    }
    Ok(groups)
}

/// The one setting PEFT's config holds for the layers that can be PEFT OFT layers: the most
/// common map, block size and sharing; one block count (`r`) instead of a block size where only
/// that fits every layer.
fn settings<'a>(layers: impl Iterator<Item = &'a Layer> + Clone) -> Option<Settings> {
    let usable = || {
        layers
            .clone()
            .filter(|l| l.side == Side::Input && l.stages.len() == 1)
            .map(|l| &l.stages[0])
    };
    let mut set = Settings {
        map: most_common(usable().map(|s| s.spec.map))?,
        block_size: most_common(usable().map(|s| s.spec.block_size)).unwrap_or(0),
        r: 0,
        share: most_common(usable().map(|s| s.spec.shared)).unwrap_or(false),
    };
    let fits = |set: &Settings| {
        usable().all(|s| match s.dim() {
            Some(d) => set.block_for(d) == s.spec.block_size,
            None => set.r == 0 && s.spec.block_size == set.block_size,
        })
    };
    if !fits(&set)
        && let Some(r) = most_common(usable().filter_map(|s| s.spec.blocks))
    {
        let by_count = Settings {
            block_size: 0,
            r,
            ..set
        };
        if fits(&by_count) {
            set = by_count;
        }
    }
    Some(set)
}

/// A PEFT OFT directory's config and tensors (`None` when no member can be written).
fn write_oft(
    adapter: &Adapter,
    members: &[(usize, String)],
    mapped: &mut [LayerOutcome],
) -> Option<(String, Vec<OwnedTensor>)> {
    let Some(set) = settings(members.iter().map(|(i, _)| &adapter.layers[*i])) else {
        for (i, _) in members {
            let reason = never_oft(&adapter.layers[*i]).unwrap_or(OUTPUT_SIDE);
            mapped[*i] = (
                None,
                None,
                Status::Impossible {
                    reason: reason.into(),
                },
            );
        }
        return None;
    };
    let mut tensors = Vec::new();
    let mut modules = Vec::new();
    for (i, module) in members {
        let (n, d, st, t) = report::outcome(map_layer(&adapter.layers[*i], module, set));
        if n.is_some() {
            modules.push(module.clone());
        }
        tensors.extend(t);
        mapped[*i] = (n, d, st);
    }
    modules.sort();
    let source = adapter
        .provenance
        .user_metadata
        .get("peft.adapter_config")
        .map(String::as_str);
    Some((config_json(set, &modules, source), tensors))
}

/// PEFT BOFT (formats.md §3.4): `boft_R [m, N, b, b]` on PEFT's butterfly wiring, `boft_s`
/// the row scale ([`butterfly::encode`]). One `boft_n_butterfly_factor` per directory, and
/// one `boft_block_size` where every layer has that size, else one `boft_block_num` where every
/// layer has that count (PEFT then sizes each layer's blocks `d / N`); else whichever of the
/// two fits more layers, the others refused.
fn write_boft(
    adapter: &Adapter,
    members: &[(usize, String)],
    ctx: &Context<'_>,
    mapped: &mut [LayerOutcome],
) -> (String, Vec<OwnedTensor>) {
    let inputs = || {
        members
            .iter()
            .map(|(i, _)| &adapter.layers[*i])
            .filter(|l| l.side == Side::Input)
    };
    let m = most_common(inputs().map(|l| l.stages.len())).unwrap_or(1);
    let b =
        most_common(inputs().filter_map(|l| Some(l.stages.first()?.spec.block_size))).unwrap_or(0);
    let n = most_common(inputs().filter_map(|l| {
        let s = l.stages.first()?;
        s.spec
            .blocks
            .or_else(|| Some(l.target.rotated_dim? / s.spec.block_size.max(1)))
    }));
    let fitting = |size: Sizing| {
        inputs()
            .filter(|l| {
                l.stages.len() == m
                    && l.stages
                        .iter()
                        .all(|s| size.fits_layer(s, l.target.rotated_dim))
            })
            .count()
    };
    // Where both fit equally, a PEFT BOFT source's own choice is kept (PEFT computes the same
    // tensors from either).
    let source_by_num = adapter
        .provenance
        .user_metadata
        .get("peft.adapter_config")
        .and_then(|s| serde_json::from_str::<Value>(s).ok())
        .is_some_and(|c| {
            c["peft_type"] == "BOFT" && c["boft_block_num"].as_u64().is_some_and(|n| n > 0)
        });
    let size = match n.map(Sizing::BlockNum) {
        Some(by_num) => {
            let (fn_, fs) = (fitting(by_num), fitting(Sizing::BlockSize(b)));
            if fn_ > fs || (fn_ == fs && source_by_num) {
                by_num
            } else {
                Sizing::BlockSize(b)
            }
        }
        None => Sizing::BlockSize(b),
    };
    let (block_size, block_num) = match size {
        Sizing::BlockSize(b) => (b, 0),
        Sizing::BlockNum(n) => (0, n),
    };
    let mut tensors = Vec::new();
    let mut modules = Vec::new();
    for (i, module) in members {
        let name = format!("{}{module}", names::PEFT_WRAPPER);
        let (n, d, st, t) =
            report::outcome(butterfly::encode(&adapter.layers[*i], name, size, m, ctx));
        if n.is_some() {
            modules.push(module.clone());
        }
        tensors.extend(t);
        mapped[*i] = (n, d, st);
    }
    modules.sort();
    let v = peft_config(
        "BOFT",
        &modules,
        serde_json::json!({
            "boft_block_size": block_size,
            "boft_block_num": block_num,
            "boft_n_butterfly_factor": m,
            "boft_dropout": 0.0,
        }),
    );
    (
        serde_json::to_string_pretty(&v).unwrap_or_default() + "\n",
        tensors,
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn peft_adjusts_block_sizes_like_peft() {
        use super::peft_block_size as f;
        assert_eq!(f(320, 32), 32);
        assert_eq!(f(2880, 32), 32);
        assert_eq!(f(72, 32), 36);
        assert_eq!(f(16, 32), 16);
        assert_eq!(f(100, 30), 25);
    }
}
