//! Resolving an adapter's target names to the keys of a base checkpoint.
//!
//! The alias table is built from the base's own key set; flattened names (`lora_unet_…`) are
//! never split on `_`: every alias is generated from a real key and looked up whole.
//!
//! * SD U-Nets ([`unet`]), in diffusers naming (bare or under `unet.`) or ldm/sgm naming (under
//!   `model.diffusion_model.`, ComfyUI's `diffusion_model.`, or bare): each module answers to
//!   its diffusers name and its ldm name (the correspondence derived from the base's own
//!   blocks), each also as `unet.D`, `diffusion_model.S`, `model.diffusion_model.S` and
//!   flattened under `lora_unet_`, `lycoris_`, `oft_unet_`.
//! * CLIP text encoders ([`clip`]), HF or OpenCLIP layout: each module answers to its HF name
//!   with and without `text_model.` (transformers 4 / 5), under `text_encoder.` /
//!   `text_encoder_2.`, and flattened under `lora_te_`/`lora_te1_` (first encoder) or
//!   `lora_te2_` (second). OpenCLIP's fused `attn.in_proj_weight` answers to q/k/v with a row
//!   slice (which needs the tensor's shape: [`AliasTable::with_shapes`]).
//! * Diffusion transformers ([`dit`]: FLUX.1, FLUX.2, Chroma, SD3/3.5, HunyuanVideo, Qwen-Image,
//!   Z-Image, HiDream, Wan), diffusers or original single-file layout under any of
//!   [`dit::ROOTS`]: each module answers to its own name
//!   and to the other layout's, dotted under `transformer.` / `diffusion_model.` /
//!   `model.diffusion_model.` and flattened. A diffusers name on an original base is rows of a
//!   fused tensor (`to_k` → rows 16..32 of `img_attn.qkv`; `norm_out.linear` → both halves of
//!   `final_layer.adaLN_modulation.1`, swapped); an original fused name on a diffusers base is
//!   several tensors ([`AliasTable::resolve_pieces`]).
//! * Any other `X.weight` (VAE, …) answers to `X` with common component prefixes
//!   stripped, flattened under every known prefix, and with PEFT's `base_model.model.` wrapper.
//!
//! The target's component (`unet`, `text_encoder`, `text_encoder_2`, `transformer`) narrows
//! the candidates: PEFT names carry no encoder index, so `text_model.encoder.layers.0…` in an
//! SDXL checkpoint is ambiguous until the component says which encoder.

// Row-range lists often hold one range: that is a list, not a range to expand.
#![allow(clippy::single_range_in_vec_init)]

mod clip;
pub mod dit;
#[cfg(test)]
mod dit_tests;
#[cfg(test)]
mod tables;
mod unet;

/// First path segments of SD U-Net modules, diffusers and ldm/sgm naming.
pub fn is_unet_module(name: &str) -> bool {
    let top = name.split('.').next().unwrap_or(name);
    DIFFUSERS_TOP.contains(&top) || LDM_TOP.contains(&top)
}

use crate::layouts::names;
use crate::model::Target;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;
use unet::{DIFFUSERS_TOP, LDM_TOP, Naming, UnetMap};

/// Where a target lives in the base: a weight key, and for fused tensors (SDXL OpenCLIP
/// `in_proj_weight`, Flux `qkv`) the row slice `[start, start + len)` of that key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Resolved {
    pub key: String,
    pub rows: Option<(usize, usize)>,
}

/// Which model of the checkpoint a key belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    Unet,
    TextEncoder(Slot),
    Other,
}

/// A text encoder's place: first / second of a checkpoint's encoders, a bare encoder file
/// (either), or a third or later one (no component names it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    First,
    Second,
    Either,
    Extra,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Rows {
    Whole,
    Slice(usize, usize),
    /// A row slice whose bounds need the tensor's shape, which the table was not given.
    Unsized,
    /// These rows of the key, in this order (a diffusers module on a fused or swapped tensor).
    Ranges(Vec<Range<usize>>),
    /// Rows of several keys laid end to end (a fused module on a split base); the entry's key
    /// is the first.
    Split(Vec<(String, Range<usize>)>),
}

/// One tensor of what a name resolves to: its key and the rows of it, in the name's row order
/// (`None`: every row in stored order). A name's rows are its pieces' rows laid end to end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub key: String,
    pub rows: Option<Vec<Range<usize>>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    key: String,
    rows: Rows,
    owner: Owner,
}

/// Alias → base weight locations (more than one means the alias is ambiguous).
#[derive(Clone)]
pub struct AliasTable {
    map: HashMap<String, Vec<Entry>>,
    /// The diffusion-transformer family and layout the keys are in, when they are one.
    dit: Option<dit::Detected>,
}

/// Flattened prefixes of generic keys (old kohya/LyCORIS/ComfyUI conventions).
const FLAT_PREFIXES: [&str; 7] = [
    names::KOHYA_OFT_UNET,
    names::LORA_UNET,
    names::LORA_TE,
    names::LORA_TE1,
    names::LORA_TE2,
    names::LYCORIS,
    names::LORA_TRANSFORMER,
];

/// Flattened prefixes of U-Net modules (kohya/LyCORIS-via-kohya, LyCORIS standalone /
/// SimpleTuner, kohya's legacy OFT).
const UNET_FLAT: [&str; 3] = [names::LORA_UNET, names::LYCORIS, names::KOHYA_OFT_UNET];

const PEFT_WRAPPER: &str = names::PEFT_WRAPPER;

fn flat(name: &str) -> String {
    name.replace('.', "_")
}

impl AliasTable {
    /// A table from key names alone: fused tensors then resolve to `Err(vec![key])` (their row
    /// slices need shapes).
    pub fn new<'a>(keys: impl IntoIterator<Item = &'a str>) -> Self {
        Self::build(keys.into_iter().map(|k| (k.to_string(), None)).collect())
    }

    /// A table from keys and their tensor shapes (row slices of fused tensors are computed).
    pub fn with_shapes<K: AsRef<str>, S: AsRef<[usize]>>(
        keys_and_shapes: impl IntoIterator<Item = (K, S)>,
    ) -> Self {
        Self::build(
            keys_and_shapes
                .into_iter()
                .map(|(k, s)| (k.as_ref().to_string(), Some(s.as_ref().to_vec())))
                .collect(),
        )
    }

    fn build(keys: Vec<(String, Option<Vec<usize>>)>) -> Self {
        let mut table = AliasTable {
            map: HashMap::new(),
            dit: None,
        };
        let mut claimed: HashSet<usize> = HashSet::new();
        table.add_unets(&keys, &mut claimed);
        table.add_text_encoders(&keys, &mut claimed);
        table.add_dit(&keys, &mut claimed);
        for (i, (key, _)) in keys.iter().enumerate() {
            if !claimed.contains(&i) {
                table.add_generic(key);
            }
        }
        table
    }

    fn add(&mut self, alias: String, key: &str, rows: Rows, owner: Owner) {
        let v = self.map.entry(alias).or_default();
        if !v.iter().any(|e| e.key == key && e.rows == rows) {
            v.push(Entry {
                key: key.to_string(),
                rows,
                owner,
            });
        }
    }

    fn add_unets(&mut self, keys: &[(String, Option<Vec<usize>>)], claimed: &mut HashSet<usize>) {
        let layouts: [(&str, Naming, &[&str]); 5] = [
            ("model.diffusion_model.", Naming::Ldm, &LDM_TOP),
            ("diffusion_model.", Naming::Ldm, &LDM_TOP),
            ("", Naming::Ldm, &LDM_TOP),
            ("unet.", Naming::Diffusers, &DIFFUSERS_TOP),
            ("", Naming::Diffusers, &DIFFUSERS_TOP),
        ];
        for (root, naming, tops) in layouts {
            let marker = format!("{root}{}", tops[0]);
            if !keys.iter().any(|(k, _)| k.starts_with(&marker)) {
                continue;
            }
            // (key index, module below the root) of this U-Net's weights.
            let mut modules: Vec<(usize, &str)> = Vec::new();
            for (i, (key, _)) in keys.iter().enumerate() {
                let Some(rest) = key.strip_prefix(root) else {
                    continue;
                };
                let top = rest.split('.').next().unwrap_or(rest);
                if !tops.contains(&top) || claimed.contains(&i) {
                    continue;
                }
                claimed.insert(i);
                if let Some(module) = rest.strip_suffix(".weight") {
                    modules.push((i, module));
                }
            }
            let map = UnetMap::derive(naming, modules.iter().map(|&(_, m)| m));
            for (i, module) in modules {
                let key = &keys[i].0;
                let other = map
                    .as_ref()
                    .map(|m| m.translate(naming, module))
                    .unwrap_or_default();
                let native = vec![module.to_string()];
                let (diffusers, ldm) = match naming {
                    Naming::Diffusers => (native, other),
                    Naming::Ldm => (other, native),
                };
                self.add_unet_module(key, &diffusers, &ldm);
            }
        }
    }

    fn add_unet_module(&mut self, key: &str, diffusers: &[String], ldm: &[String]) {
        let own = key.strip_suffix(".weight").unwrap_or(key);
        let mut aliases = vec![own.to_string()];
        for d in diffusers {
            aliases.push(d.clone());
            aliases.push(format!("unet.{d}"));
            aliases.extend(UNET_FLAT.iter().map(|p| format!("{p}{}", flat(d))));
        }
        for s in ldm {
            aliases.push(s.clone());
            aliases.push(format!("diffusion_model.{s}"));
            aliases.push(format!("model.diffusion_model.{s}"));
            aliases.extend(UNET_FLAT.iter().map(|p| format!("{p}{}", flat(s))));
        }
        for a in aliases {
            self.add(a, key, Rows::Whole, Owner::Unet);
        }
    }

    fn add_text_encoders(
        &mut self,
        keys: &[(String, Option<Vec<usize>>)],
        claimed: &mut HashSet<usize>,
    ) {
        let mut found = Vec::new();
        let mut roots: BTreeMap<(usize, &str), ()> = BTreeMap::new();
        for (i, (key, shape)) in keys.iter().enumerate() {
            if claimed.contains(&i) {
                continue;
            }
            let Some(k) = clip::split(key) else {
                continue;
            };
            claimed.insert(i);
            if !k.root.is_empty() {
                roots.insert((k.order, k.root), ());
            }
            found.push((key.as_str(), shape.as_deref(), k));
        }
        // Encoders in file order: the first answers to `text_encoder`/`lora_te_`/`lora_te1_`,
        // the second (when there are two or more) to `text_encoder_2`/`lora_te2_`.
        let rank: HashMap<&str, usize> = roots
            .keys()
            .enumerate()
            .map(|(r, &(_, root))| (root, r))
            .collect();
        for (key, shape, k) in found {
            let slot = match (k.root.is_empty(), rank.get(k.root)) {
                (true, _) => Slot::Either,
                (false, Some(0)) => Slot::First,
                (false, Some(1)) => Slot::Second,
                _ => Slot::Extra,
            };
            self.add_text_encoder_key(key, shape, &k, slot);
        }
    }

    fn add_text_encoder_key(
        &mut self,
        key: &str,
        shape: Option<&[usize]>,
        k: &clip::EncoderKey<'_>,
        slot: Slot,
    ) {
        let owner = Owner::TextEncoder(slot);
        let (own, modules) = clip::hf_modules(k.layout, k.inner);
        if let Some(own) = own {
            self.add(format!("{}{own}", k.root), key, Rows::Whole, owner);
        }
        let (components, flats): (&[&str], &[&str]) = match slot {
            Slot::First => (&["text_encoder."], &[names::LORA_TE, names::LORA_TE1]),
            Slot::Second => (&["text_encoder_2."], &[names::LORA_TE2]),
            Slot::Either => (
                &["text_encoder.", "text_encoder_2."],
                &[names::LORA_TE, names::LORA_TE1, names::LORA_TE2],
            ),
            Slot::Extra => (&[], &[]),
        };
        for m in modules {
            let rows = match m.third {
                None => Rows::Whole,
                Some(j) => match shape.and_then(|s| s.first()) {
                    Some(&n) if n % 3 == 0 => Rows::Slice(j * (n / 3), n / 3),
                    Some(_) => continue,
                    None => Rows::Unsized,
                },
            };
            let mut names = vec![m.path.clone()];
            if m.in_text_model {
                names.push(format!("text_model.{}", m.path));
            }
            for n in names {
                for c in components {
                    self.add(format!("{c}{n}"), key, rows.clone(), owner);
                }
                for p in flats {
                    self.add(format!("{p}{}", flat(&n)), key, rows.clone(), owner);
                }
                self.add(n, key, rows.clone(), owner);
            }
        }
    }

    /// Any other weight: the module itself, with component prefixes stripped, flattened.
    fn add_generic(&mut self, key: &str) {
        let Some(module) = key.strip_suffix(".weight") else {
            return;
        };
        let mut aliases = vec![module.to_string()];
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
        let flat_name = flat(stripped);
        aliases.extend(FLAT_PREFIXES.iter().map(|p| format!("{p}{flat_name}")));
        aliases.push(format!("diffusion_model.{stripped}"));
        aliases.push(format!("transformer.{stripped}"));
        aliases.push(stripped.to_string());
        for a in aliases {
            self.add(a, key, Rows::Whole, Owner::Other);
        }
    }

    /// Where a target resolves to: `Ok(location)`, or `Err(candidate keys)`: empty when nothing
    /// matches; several when the name is ambiguous; a single key when the name matches a row
    /// slice of a fused tensor whose shape the table was not given ([`AliasTable::new`]).
    pub fn resolve(&self, target: &Target) -> Result<Resolved, Vec<String>> {
        let name = target
            .name
            .strip_prefix(PEFT_WRAPPER)
            .unwrap_or(&target.name);
        let component = target.component.as_deref();
        let found: Vec<&Entry> = self
            .map
            .get(name)
            .map(|v| v.iter().filter(|e| fits(e.owner, component)).collect())
            .unwrap_or_default();
        match found[..] {
            [] => Err(Vec::new()),
            [e] => match &e.rows {
                Rows::Whole => Ok(Resolved {
                    key: e.key.clone(),
                    rows: None,
                }),
                &Rows::Slice(start, len) => Ok(Resolved {
                    key: e.key.clone(),
                    rows: Some((start, len)),
                }),
                Rows::Ranges(r) if r.len() == 1 => Ok(Resolved {
                    key: e.key.clone(),
                    rows: Some((r[0].start, r[0].len())),
                }),
                Rows::Unsized | Rows::Ranges(_) => Err(vec![e.key.clone()]),
                Rows::Split(parts) => Err(parts.iter().map(|(k, _)| k.clone()).collect()),
            },
            _ => {
                let mut keys: Vec<String> = found.iter().map(|e| e.key.clone()).collect();
                keys.sort();
                keys.dedup();
                Err(keys)
            }
        }
    }
}

impl AliasTable {
    /// The diffusion-transformer family, base layout and key root of the table's keys.
    pub fn dit(&self) -> Option<dit::Detected> {
        self.dit
    }

    /// Where a target resolves to, as the tensors its rows lie in (in its row order): one piece
    /// for a tensor or rows of one; several for a fused module on a split base. `Err` as
    /// [`AliasTable::resolve`].
    pub fn resolve_pieces(&self, target: &Target) -> Result<Vec<Piece>, Vec<String>> {
        let name = target
            .name
            .strip_prefix(PEFT_WRAPPER)
            .unwrap_or(&target.name);
        let component = target.component.as_deref();
        let found: Vec<&Entry> = self
            .map
            .get(name)
            .map(|v| v.iter().filter(|e| fits(e.owner, component)).collect())
            .unwrap_or_default();
        let e = match found[..] {
            [] => return Err(Vec::new()),
            [e] => e,
            _ => {
                let mut keys: Vec<String> = found.iter().map(|e| e.key.clone()).collect();
                keys.sort();
                keys.dedup();
                return Err(keys);
            }
        };
        let piece = |rows| Piece {
            key: e.key.clone(),
            rows,
        };
        Ok(match &e.rows {
            Rows::Whole => vec![piece(None)],
            &Rows::Slice(start, len) => vec![piece(Some(vec![start..start + len]))],
            Rows::Ranges(r) => vec![piece(Some(r.clone()))],
            Rows::Unsized => return Err(vec![e.key.clone()]),
            Rows::Split(parts) => parts
                .iter()
                .map(|(k, r)| Piece {
                    key: k.clone(),
                    rows: Some(vec![r.clone()]),
                })
                .collect(),
        })
    }

    /// The names a transformer module answers to: dotted as is, under the roots adapters use,
    /// and flattened under every trainer prefix.
    fn add_dit_module(&mut self, module: &str, key: &str, rows: &Rows) {
        let mut aliases = vec![module.to_string()];
        for root in ["transformer.", "diffusion_model.", "model.diffusion_model."] {
            aliases.push(format!("{root}{module}"));
        }
        let flat_name = flat(module);
        aliases.extend(FLAT_PREFIXES.iter().map(|p| format!("{p}{flat_name}")));
        for a in aliases {
            self.add(a, key, rows.clone(), Owner::Other);
        }
    }

    /// Diffusion-transformer keys: detect the family and layout, then give every module its
    /// own names and the other layout's (rows of fused tensors, pieces of split ones).
    fn add_dit(&mut self, keys: &[(String, Option<Vec<usize>>)], claimed: &mut HashSet<usize>) {
        let weights: Vec<(usize, &str)> = keys
            .iter()
            .enumerate()
            .filter(|(i, _)| !claimed.contains(i))
            .filter_map(|(i, (k, _))| k.strip_suffix(".weight").map(|m| (i, m)))
            .collect();
        let Some(d) = dit::detect(weights.iter().map(|&(_, m)| m)) else {
            return;
        };
        self.dit = Some(d);
        // Module below the root → key index.
        let under: BTreeMap<&str, usize> = weights
            .iter()
            .filter_map(|&(i, m)| m.strip_prefix(d.root).map(|rest| (rest, i)))
            .collect();
        let shape = |i: usize| -> Option<(usize, usize)> {
            let s = keys[i].1.as_ref()?;
            Some((*s.first()?, s.iter().skip(1).product()))
        };
        for (&module, &i) in &under {
            claimed.insert(i);
            let key = keys[i].0.clone();
            self.add(
                key.strip_suffix(".weight").unwrap_or(&key).to_string(),
                &key,
                Rows::Whole,
                Owner::Other,
            );
            self.add_dit_module(module, &key, &Rows::Whole);
        }
        for map in d.family.maps() {
            match d.layout {
                dit::BaseLayout::Original => {
                    for (&module, &i) in &under {
                        let Some(index) = dit::matches(map.original, module) else {
                            continue;
                        };
                        let key = keys[i].0.clone();
                        for (j, rows) in original_rows(map, shape(i)) {
                            let name = dit::fill(map.diffusers[j], index);
                            self.add_dit_module(&name, &key, &rows);
                        }
                    }
                }
                dit::BaseLayout::Diffusers => {
                    let Some(first) = map.diffusers.first() else {
                        continue;
                    };
                    for &module in under.keys() {
                        let Some(index) = dit::matches(first, module) else {
                            continue;
                        };
                        let parts: Vec<Option<usize>> = map
                            .diffusers
                            .iter()
                            .map(|t| under.get(dit::fill(t, index).as_str()).copied())
                            .collect();
                        let shapes: Vec<Option<(usize, usize)>> =
                            parts.iter().map(|p| p.and_then(shape)).collect();
                        let Some(found) = dit::diffusers_parts(map, &shapes) else {
                            continue;
                        };
                        let pieces: Vec<(String, Range<usize>)> = found
                            .into_iter()
                            .filter_map(|(j, r)| Some((keys[parts[j]?].0.clone(), r)))
                            .collect();
                        let Some((key, _)) = pieces.first().cloned() else {
                            continue;
                        };
                        let rows = if pieces.iter().all(|(k, _)| *k == key) {
                            let ranges: Vec<Range<usize>> =
                                pieces.into_iter().map(|(_, r)| r).collect();
                            match shape(parts[0].unwrap_or(0)) {
                                Some((n, _)) if ranges == [0..n] => Rows::Whole,
                                _ => Rows::Ranges(ranges),
                            }
                        } else {
                            Rows::Split(pieces)
                        };
                        let name = dit::fill(map.original, index);
                        self.add_dit_module(&name, &key, &rows);
                    }
                }
            }
        }
    }
}

/// The rows of an original-layout tensor (of `shape`, when known) that each diffusers module
/// of `map` covers, in the diffusers module's row order: `(index into map.diffusers, rows)`.
fn original_rows(map: &dit::Map, shape: Option<(usize, usize)>) -> Vec<(usize, Rows)> {
    let Some((rows, cols)) = shape else {
        return match map.kind {
            dit::Kind::Rename => vec![(0, Rows::Whole)],
            _ => (0..map.diffusers.len())
                .map(|j| (j, Rows::Unsized))
                .collect(),
        };
    };
    let Some(parts) = dit::original_parts(map, rows, cols) else {
        return Vec::new();
    };
    let mut per: BTreeMap<usize, Vec<(usize, Range<usize>)>> = BTreeMap::new();
    for (j, original, diffusers) in parts {
        per.entry(j).or_default().push((diffusers.start, original));
    }
    per.into_iter()
        .map(|(j, mut v)| {
            v.sort_by_key(|(start, _)| *start);
            let ranges: Vec<Range<usize>> = v.into_iter().map(|(_, r)| r).collect();
            let r = if ranges == [0..rows] {
                Rows::Whole
            } else {
                Rows::Ranges(ranges)
            };
            (j, r)
        })
        .collect()
}

/// Diffusers-pipeline names of base locations: for each weight (and row slice), the pipeline
/// component and the module path inside it (`unet` + `down_blocks.0.…`, `text_encoder` +
/// `text_model.encoder.layers.0.…`), whatever naming the base itself uses.
pub struct PipelineNames {
    names: HashMap<Location, (String, String)>,
    /// ldm/sgm module name of each U-Net weight (what kohya trains SDXL with).
    ldm: HashMap<Location, String>,
    /// Whether the U-Net is SDXL's (it has the `add_embedding` / `label_emb` class embedding).
    pub sdxl: bool,
}

/// A weight key and an optional row slice of it.
type Location = (String, Option<(usize, usize)>);

impl PipelineNames {
    pub fn of(&self, r: &Resolved) -> Option<&(String, String)> {
        self.names.get(&(r.key.clone(), r.rows))
    }

    /// The ldm/sgm name of a U-Net location.
    pub fn ldm(&self, r: &Resolved) -> Option<&String> {
        self.ldm.get(&(r.key.clone(), r.rows))
    }
}

impl AliasTable {
    /// Build the diffusers-pipeline name index from the aliases (`unet.X`, `text_encoder.X`, …).
    pub fn pipeline_names(&self) -> PipelineNames {
        let mut names = HashMap::new();
        let mut ldm = HashMap::new();
        let mut sdxl = false;
        for (alias, entries) in &self.map {
            let Some(module) = alias.strip_prefix("diffusion_model.") else {
                continue;
            };
            for e in entries.iter().filter(|e| e.owner == Owner::Unet) {
                sdxl |= module.starts_with("label_emb.");
                let slot = ldm
                    .entry((e.key.clone(), None))
                    .or_insert_with(|| module.to_string());
                if module < slot.as_str() {
                    *slot = module.to_string();
                }
            }
        }
        // Earlier components win where a bare encoder answers to both `text_encoder` names.
        let components = names::DOTTED_COMPONENTS;
        let rank = |c: &str| components.iter().position(|p| p.trim_end_matches('.') == c);
        for (alias, entries) in &self.map {
            let Some((comp, module)) = components
                .iter()
                .find_map(|c| alias.strip_prefix(c).map(|m| (c.trim_end_matches('.'), m)))
            else {
                continue;
            };
            for e in entries {
                let rows = match &e.rows {
                    Rows::Whole => None,
                    &Rows::Slice(a, b) => Some((a, b)),
                    Rows::Ranges(r) if r.len() == 1 => Some((r[0].start, r[0].len())),
                    Rows::Unsized | Rows::Ranges(_) | Rows::Split(_) => continue,
                };
                let slot = names
                    .entry((e.key.clone(), rows))
                    .or_insert_with(|| (comp.to_string(), module.to_string()));
                // Prefer the earlier component, then transformers-4 `text_model.` names
                // (diffusers checkpoints), then the shortest, then the first in byte order, so
                // the choice does not depend on hash order.
                let key = |c: &str, m: &str| {
                    (
                        std::cmp::Reverse(rank(c)),
                        m.starts_with("text_model."),
                        std::cmp::Reverse(m.len()),
                        std::cmp::Reverse(m.to_string()),
                    )
                };
                if key(comp, module) > key(&slot.0, &slot.1) {
                    *slot = (comp.to_string(), module.to_string());
                }
            }
        }
        PipelineNames { names, ldm, sdxl }
    }
}

/// Whether a key of `owner` can be the target of an adapter for pipeline `component`.
fn fits(owner: Owner, component: Option<&str>) -> bool {
    let Some(component) = component else {
        return true;
    };
    match owner {
        Owner::Other => true,
        Owner::Unet => !component.starts_with("text_encoder"),
        Owner::TextEncoder(slot) => match component {
            "unet" | "transformer" => false,
            "text_encoder" => matches!(slot, Slot::First | Slot::Either),
            "text_encoder_2" => matches!(slot, Slot::Second | Slot::Either),
            _ => true,
        },
    }
}

/// Resolution against realistic key sets (moved from the integration tests when `resolve` became
/// private).
#[cfg(test)]
mod keys_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModuleKind;

    fn target(name: &str, component: Option<&str>) -> Target {
        Target {
            name: name.to_string(),
            convention: "test".to_string(),
            component: component.map(str::to_string),
            module: ModuleKind::Unknown,
            shape: None,
            rotated_dim: None,
            rows: None,
        }
    }

    #[test]
    fn generic_keys_keep_their_aliases() {
        let t = AliasTable::new([
            "model.diffusion_model.double_blocks.0.img_attn.qkv.weight",
            "model.diffusion_model.double_blocks.0.img_attn.qkv.bias",
        ]);
        let want = Ok(Resolved {
            key: "model.diffusion_model.double_blocks.0.img_attn.qkv.weight".into(),
            rows: None,
        });
        for name in [
            "lora_unet_double_blocks_0_img_attn_qkv",
            "diffusion_model.double_blocks.0.img_attn.qkv",
            "double_blocks.0.img_attn.qkv",
            "base_model.model.double_blocks.0.img_attn.qkv",
        ] {
            assert_eq!(t.resolve(&target(name, None)), want, "{name}");
        }
        assert_eq!(
            t.resolve(&target("double_blocks.0.img_attn.proj", None)),
            Err(vec![])
        );
    }

    #[test]
    fn component_filter() {
        let te = Owner::TextEncoder(Slot::First);
        assert!(fits(te, None));
        assert!(fits(te, Some("text_encoder")));
        assert!(!fits(te, Some("text_encoder_2")));
        assert!(!fits(te, Some("unet")));
        assert!(fits(
            Owner::TextEncoder(Slot::Either),
            Some("text_encoder_2")
        ));
        assert!(!fits(Owner::Unet, Some("text_encoder")));
        assert!(fits(Owner::Other, Some("text_encoder")));
    }
}
