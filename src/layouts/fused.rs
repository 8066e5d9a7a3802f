//! Fused and split layers of diffusion transformers, for `convert --to`: a layer named in one
//! base layout (`double_blocks.0.img_attn.qkv`, the original single-file names) rewritten in the
//! names of the layout a writer needs (`transformer_blocks.0.attn.to_q`, diffusers), through the
//! family tables' one query ([`crate::resolve::dit::counterparts`]).
//!
//! * An **input-side** rotation of a fused module (OneTrainer's COMFY layout: one `R` shared by
//!   q, k, v and, in Flux `linear1`, the MLP input) is the same rotation of each split module:
//!   it splits exactly, one layer per part with the same stages, a row scale cut by rows.
//! * Renamed modules are renamed; the final adaLN's swapped halves leave an input-side rotation
//!   alone and permute a row scale.
//! * Output-side layers and row slices are left to [`super::export`]'s row split and the
//!   writers' verdicts (an output-side rotation of a whole fused module stays under its fused
//!   name, which ComfyUI and LyCORIS load whole).

use crate::model::{Adapter, Layer, Side};
use crate::resolve::dit::{self, BaseLayout};

/// An adapter rewritten for a writer: its layers, and for each the source layer it came from.
pub struct Retargeted {
    /// The layers in the writer's names.
    pub adapter: Adapter,
    /// Per layer of `adapter`, the source layers it stands for (one, or the split layers one
    /// fused layer merges).
    pub origin: Vec<Vec<usize>>,
    /// Source layers that cannot be written in the names asked for, with the reason.
    pub refused: Vec<(usize, String)>,
}

/// The families an adapter's names belong to (every family when the names do not tell).
fn families(adapter: &Adapter) -> Vec<&'static dit::Family> {
    dit::expected(adapter.layers.iter().map(|l| l.target.name.as_str()))
        .map(|e| e.families)
        .unwrap_or_default()
}

/// Rewrite the whole input-side layers named in the original layout into diffusers names (`to`
/// is the base layout the writer names modules in). Layers of no diffusion-transformer family,
/// or already in `to`'s names, pass unchanged.
pub fn retarget(adapter: &Adapter, to: BaseLayout) -> Retargeted {
    let fams = families(adapter);
    let mut out = adapter.clone();
    out.layers.clear();
    let mut origin = Vec::new();
    for (i, layer) in adapter.layers.iter().enumerate() {
        let split = (to == BaseLayout::Diffusers && layer.side == Side::Input)
            .then(|| split_input(layer, &fams))
            .flatten();
        match split {
            Some(parts) => {
                origin.extend(std::iter::repeat_n(vec![i], parts.len()));
                out.layers.extend(parts);
            }
            None => {
                origin.push(vec![i]);
                out.layers.push(layer.clone());
            }
        }
    }
    Retargeted {
        adapter: out,
        origin,
        refused: Vec::new(),
    }
}

/// A whole input-side layer on an original-named module as the diffusers modules it is made
/// of (`None`: not such a layer, or a row scale that does not divide as the map says).
fn split_input(layer: &Layer, fams: &[&'static dit::Family]) -> Option<Vec<Layer>> {
    if layer.target.rows.is_some() {
        return None;
    }
    let place = dit::place_as(&layer.target.name, fams, BaseLayout::Original)?;
    let parts = dit::counterparts(&place, BaseLayout::Diffusers);
    let cols = layer.target.rotated_dim.map(|d| d as usize);
    // The fused module's rows: from its recorded shape, else from a row scale.
    let rows = layer
        .target
        .shape
        .as_ref()
        .and_then(|s| s.first())
        .map(|&r| r as usize)
        .or_else(|| layer.row_scale.as_ref().map(|(_, v)| v.len()));
    let row_parts = match (rows, cols) {
        (Some(r), Some(c)) => dit::original_parts(place.map, r, c),
        _ => None,
    };
    let mut out = Vec::new();
    for (j, cp) in parts.iter().enumerate() {
        let mut l = layer.clone();
        l.target.name = cp.module.clone();
        l.target.convention = "diffusers".into();
        if l.target.component.is_some() {
            l.target.component = Some(crate::layouts::names::TRANSFORMER.into());
        }
        l.base_binding = None;
        // This part's rows of the fused module, in the diffusers tensor's order.
        let mut mine: Vec<(std::ops::Range<usize>, std::ops::Range<usize>)> = row_parts
            .iter()
            .flatten()
            .filter(|(k, _, _)| *k == j)
            .map(|(_, o, d)| (o.clone(), d.clone()))
            .collect();
        mine.sort_by_key(|(_, d)| d.start);
        let part_rows: Option<usize> =
            (!mine.is_empty()).then(|| mine.iter().map(|(o, _)| o.len()).sum());
        if let (Some(shape), Some(n)) = (l.target.shape.as_mut(), part_rows)
            && let Some(first) = shape.first_mut()
        {
            *first = n as u64;
        } else if parts.len() > 1 {
            l.target.shape = None;
        }
        if let Some((pos, scale)) = &layer.row_scale {
            if mine.is_empty() {
                return None;
            }
            let mut v = Vec::new();
            for (o, _) in &mine {
                v.extend_from_slice(scale.get(o.clone())?);
            }
            l.row_scale = Some((*pos, v));
        }
        out.push(l);
    }
    Some(out)
}

/// Why split layers cannot become one fused layer, and what works instead.
const NO_FUSED: &str = "the original layout fuses these modules into one weight, and one \
     input-side rotation of it is the same rotation of every part: the parts' rotations differ \
     (or some part has none). Bake the adapter (oftool merge), keep the diffusers names \
     (--names diffusers), or write a LoRA (convert --to lora --base BASE)";

/// Rewrite diffusers-named layers into the original layout's names: renamed modules renamed; the
/// input-side layers on every part of a fused module (q, k, v and Flux's `proj_mlp`) merged into
/// one layer when their rotations are identical (same stages, same Q), else refused
/// ([`Retargeted::refused`]). Output-side layers of fused parts pass unchanged (their verdict is
/// the writer's).
pub fn fuse(adapter: &Adapter) -> Retargeted {
    let fams = families(adapter);
    let mut out = adapter.clone();
    out.layers.clear();
    let mut origin = Vec::new();
    let mut refused = Vec::new();
    // Fused groups: (original module) → [(part, source index)].
    type Group = (String, &'static dit::Map, Vec<(usize, usize)>);
    let mut groups: Vec<Group> = Vec::new();
    for (i, layer) in adapter.layers.iter().enumerate() {
        let place = dit::place_as(&layer.target.name, &fams, BaseLayout::Diffusers)
            .filter(|_| layer.target.rows.is_none());
        let Some(place) = place else {
            origin.push(vec![i]);
            out.layers.push(layer.clone());
            continue;
        };
        let cp = dit::counterparts(&place, BaseLayout::Original);
        let Some(first) = cp.first() else {
            origin.push(vec![i]);
            out.layers.push(layer.clone());
            continue;
        };
        match first.part {
            None => {
                let mut l = renamed(layer, &first.module);
                // The swapped halves: a row scale follows its rows.
                if let Some((pos, scale)) = &layer.row_scale
                    && let Some(cols) = layer.target.rotated_dim
                    && let Some(parts) = dit::original_parts(place.map, scale.len(), cols as usize)
                {
                    let mut v = Vec::with_capacity(scale.len());
                    for (_, _, d) in &parts {
                        v.extend_from_slice(scale.get(d.clone()).unwrap_or_default());
                    }
                    if v.len() == scale.len() {
                        l.row_scale = Some((*pos, v));
                    }
                }
                origin.push(vec![i]);
                out.layers.push(l);
            }
            Some(_) if layer.side != Side::Input => {
                origin.push(vec![i]);
                out.layers.push(layer.clone());
            }
            Some(part) => match groups.iter_mut().find(|g| g.0 == first.module) {
                Some(g) => g.2.push((part, i)),
                None => groups.push((first.module.clone(), place.map, vec![(part, i)])),
            },
        }
    }
    for (module, map, mut members) in groups {
        members.sort();
        let layers: Vec<&Layer> = members.iter().map(|&(_, i)| &adapter.layers[i]).collect();
        let complete = members.iter().map(|m| m.0).eq(0..map.diffusers.len());
        let same = layers.windows(2).all(|w| {
            w[0].stages == w[1].stages
                && w[0].row_scale.as_ref().map(|s| s.0) == w[1].row_scale.as_ref().map(|s| s.0)
                && w[0].target.rotated_dim == w[1].target.rotated_dim
        });
        let scaled = layers.iter().filter(|l| l.row_scale.is_some()).count();
        let (Some(first), true, true, true) = (
            layers.first(),
            complete,
            same,
            scaled == 0 || scaled == layers.len(),
        ) else {
            refused.extend(members.iter().map(|&(_, i)| (i, NO_FUSED.to_string())));
            continue;
        };
        let mut l = renamed(first, &module);
        if let Some((pos, _)) = &first.row_scale {
            let v: Vec<f64> = layers
                .iter()
                .filter_map(|l| l.row_scale.as_ref())
                .flat_map(|(_, s)| s.iter().copied())
                .collect();
            l.row_scale = Some((*pos, v));
        }
        let rows: Option<u64> = layers
            .iter()
            .map(|l| l.target.shape.as_ref().and_then(|s| s.first().copied()))
            .sum();
        l.target.shape = match (rows, first.target.shape.as_ref()) {
            (Some(r), Some(s)) => Some(
                std::iter::once(r)
                    .chain(s.iter().skip(1).copied())
                    .collect(),
            ),
            _ => None,
        };
        // The fused layer stands for every member.
        origin.push(members.iter().map(|&(_, i)| i).collect());
        out.layers.push(l);
    }
    Retargeted {
        adapter: out,
        origin,
        refused,
    }
}

/// `layer` under the original-layout module `module`.
fn renamed(layer: &Layer, module: &str) -> Layer {
    let mut l = layer.clone();
    l.target.name = module.to_string();
    l.target.convention = "unknown".into();
    if l.target.component.is_some() {
        l.target.component = Some(crate::layouts::names::TRANSFORMER.into());
    }
    l.base_binding = None;
    l
}
