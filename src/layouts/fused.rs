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
    /// Per layer of `adapter`, the index of the source layer it comes from.
    pub origin: Vec<usize>,
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
                origin.extend(std::iter::repeat_n(i, parts.len()));
                out.layers.extend(parts);
            }
            None => {
                origin.push(i);
                out.layers.push(layer.clone());
            }
        }
    }
    Retargeted {
        adapter: out,
        origin,
    }
}

/// A whole input-side layer on an original-named module as the diffusers modules it is made
/// of (`None`: not such a layer, or a row scale that does not divide as the map says).
fn split_input(layer: &Layer, fams: &[&'static dit::Family]) -> Option<Vec<Layer>> {
    if layer.target.rows.is_some() {
        return None;
    }
    let place = dit::place(&layer.target.name, fams)?;
    if place.layout() != BaseLayout::Original {
        return None;
    }
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
