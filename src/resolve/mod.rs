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
//! * Any other `X.weight` (Flux, VAE, …) answers to `X` with common component prefixes
//!   stripped, flattened under every known prefix, and with PEFT's `base_model.model.` wrapper.
//!
//! The target's component (`unet`, `text_encoder`, `text_encoder_2`, `transformer`) narrows
//! the candidates: PEFT names carry no encoder index, so `text_model.encoder.layers.0…` in an
//! SDXL checkpoint is ambiguous until the component says which encoder.

mod clip;
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rows {
    Whole,
    Slice(usize, usize),
    /// A row slice whose bounds need the tensor's shape, which the table was not given.
    Unsized,
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
}

/// Flattened prefixes of generic keys (old kohya/LyCORIS/ComfyUI conventions).
const FLAT_PREFIXES: [&str; 6] = [
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
        };
        let mut claimed: HashSet<usize> = HashSet::new();
        table.add_unets(&keys, &mut claimed);
        table.add_text_encoders(&keys, &mut claimed);
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
                    self.add(format!("{c}{n}"), key, rows, owner);
                }
                for p in flats {
                    self.add(format!("{p}{}", flat(&n)), key, rows, owner);
                }
                self.add(n, key, rows, owner);
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
            [e] => match e.rows {
                Rows::Whole => Ok(Resolved {
                    key: e.key.clone(),
                    rows: None,
                }),
                Rows::Slice(start, len) => Ok(Resolved {
                    key: e.key.clone(),
                    rows: Some((start, len)),
                }),
                Rows::Unsized => Err(vec![e.key.clone()]),
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
                let rows = match e.rows {
                    Rows::Whole => None,
                    Rows::Slice(a, b) => Some((a, b)),
                    Rows::Unsized => continue,
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
