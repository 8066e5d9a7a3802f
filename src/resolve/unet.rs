//! The SD1.x/SD2.x/SDXL U-Net in its two namings: diffusers (`down_blocks.0.resnets.1.conv1`)
//! and ldm/sgm (`input_blocks.2.0.in_layers.2`).
//!
//! The architecture (levels, res-blocks per level, which blocks carry a transformer, where the
//! samplers sit) is read from the base's own module names, in whichever naming it uses; the
//! block-level correspondence then follows the rules of ComfyUI's `unet_to_diffusers`
//! (research notes `formats.md` §10.2), re-derived here:
//!
//! * down level `x`, res-block `i` → `input_blocks.n.0` (resnet) / `input_blocks.n.1`
//!   (transformer), `n` counting from 1 over all res-blocks and downsamplers in order; a level's
//!   downsampler is `input_blocks.n.0.op`;
//! * the middle block's children alternate resnet, transformer, resnet, …;
//! * up level `x`, res-block `i` → `output_blocks.n.0` / `.1`, `n` counting from 0; the last
//!   res-block of a level carries the upsampler as its next child (`.1.conv` or `.2.conv`);
//! * inside a resnet `in_layers.{0,2}` ↔ `norm1`/`conv1`, `emb_layers.1` ↔ `time_emb_proj`,
//!   `out_layers.{0,3}` ↔ `norm2`/`conv2`, `skip_connection` ↔ `conv_shortcut`; inside a
//!   transformer the names are the same;
//! * `input_blocks.0.0` ↔ `conv_in`, `out.{0,2}` ↔ `conv_norm_out`/`conv_out`,
//!   `time_embed.{0,2}` ↔ `time_embedding.linear_{1,2}`, `label_emb.0.{0,2}` ↔
//!   `add_embedding.linear_{1,2}` (SDXL) or `class_embedding.linear_{1,2}`.
//!
//! A key set whose blocks are not numbered contiguously, or whose down and up paths do not
//! agree, yields no correspondence at all (each name then resolves only in its own naming):
//! guessing indices for a partial U-Net could map an adapter onto the wrong layer.

use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Top-level module names of an ldm/sgm U-Net.
pub const LDM_TOP: [&str; 6] = [
    "input_blocks",
    "middle_block",
    "output_blocks",
    "time_embed",
    "label_emb",
    "out",
];

/// Top-level module names of a diffusers `UNet2DConditionModel`.
pub const DIFFUSERS_TOP: [&str; 9] = [
    "down_blocks",
    "mid_block",
    "up_blocks",
    "conv_in",
    "conv_norm_out",
    "conv_out",
    "time_embedding",
    "add_embedding",
    "class_embedding",
];

/// Resnet children: (ldm, diffusers).
const RESNET_CHILDREN: [(&str, &str); 6] = [
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),
];

/// Whole modules outside the blocks: (ldm, diffusers).
const BASIC: [(&str, &str); 9] = [
    ("input_blocks.0.0", "conv_in"),
    ("out.0", "conv_norm_out"),
    ("out.2", "conv_out"),
    ("time_embed.0", "time_embedding.linear_1"),
    ("time_embed.2", "time_embedding.linear_2"),
    ("label_emb.0.0", "add_embedding.linear_1"),
    ("label_emb.0.2", "add_embedding.linear_2"),
    ("label_emb.0.0", "class_embedding.linear_1"),
    ("label_emb.0.2", "class_embedding.linear_2"),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    Ldm,
    Diffusers,
}

/// How the part of a module name below a mapped prefix carries over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inner {
    /// The prefix is the whole module (samplers, embeddings, conv_in/out).
    Exact,
    /// Same names below the prefix (transformer blocks).
    Same,
    /// Resnet children, renamed by `RESNET_CHILDREN`.
    Resnet,
}

/// One level of the down or up path: per res-block whether it has a transformer, and whether
/// the level ends in a sampler.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Level {
    attention: Vec<bool>,
    sampler: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MidChild {
    Resnet,
    Attention,
}

/// The architecture, as far as names depend on it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Architecture {
    down: Vec<Level>,
    mid: Vec<MidChild>,
    up: Vec<Level>,
}

/// Block-level correspondence between the two namings of one U-Net.
#[derive(Debug, Default)]
pub struct UnetMap {
    ldm_to_diffusers: HashMap<String, Vec<(String, Inner)>>,
    diffusers_to_ldm: HashMap<String, Vec<(String, Inner)>>,
}

impl UnetMap {
    /// Derive the correspondence from the module names (relative to the U-Net root, without
    /// `.weight`) of one U-Net in `naming`. `None` when the names do not describe a complete,
    /// consistent U-Net.
    pub fn derive<'a>(naming: Naming, modules: impl IntoIterator<Item = &'a str>) -> Option<Self> {
        let arch = match naming {
            Naming::Ldm => Architecture::from_ldm(modules)?,
            Naming::Diffusers => Architecture::from_diffusers(modules)?,
        };
        arch.consistent().then(|| arch.map())
    }

    /// The module's names in the other naming (several only for `label_emb`, which diffusers
    /// calls `add_embedding` or `class_embedding`).
    pub fn translate(&self, naming: Naming, module: &str) -> Vec<String> {
        let table = match naming {
            Naming::Ldm => &self.ldm_to_diffusers,
            Naming::Diffusers => &self.diffusers_to_ldm,
        };
        // Longest mapped prefix at a `.` boundary.
        let mut cut = Some(module.len());
        while let Some(end) = cut {
            let prefix = &module[..end];
            if let Some(targets) = table.get(prefix) {
                let rest = module.get(end + 1..).unwrap_or("");
                return targets
                    .iter()
                    .filter_map(|(other, inner)| carry(naming, other, *inner, rest))
                    .collect();
            }
            cut = prefix.rfind('.');
        }
        Vec::new()
    }
}

#[cfg(test)]
impl UnetMap {
    /// The block-level correspondence as rows `(ldm prefix, diffusers prefix, below)`, where
    /// `below` says how the names under the prefix carry over: `exact` (the prefix is the whole
    /// module), `same` (unchanged) or `resnet` (renamed by [`resnet_children`]).
    pub fn rows(&self) -> Vec<(String, String, &'static str)> {
        let mut out: Vec<(String, String, &'static str)> = self
            .ldm_to_diffusers
            .iter()
            .flat_map(|(l, ds)| {
                ds.iter().map(move |(d, inner)| {
                    let below = match inner {
                        Inner::Exact => "exact",
                        Inner::Same => "same",
                        Inner::Resnet => "resnet",
                    };
                    (l.clone(), d.clone(), below)
                })
            })
            .collect();
        out.sort_by(|a, b| natural(&a.0).cmp(&natural(&b.0)).then(a.1.cmp(&b.1)));
        out
    }
}

/// A sort key that orders numbered path segments by value (`input_blocks.2` before `.10`).
#[cfg(test)]
fn natural(name: &str) -> Vec<(u64, String)> {
    name.split('.')
        .map(|p| match p.parse::<u64>() {
            Ok(n) => (n, String::new()),
            Err(_) => (u64::MAX, p.to_string()),
        })
        .collect()
}

/// Resnet children: (ldm, diffusers).
#[cfg(test)]
pub fn resnet_children() -> &'static [(&'static str, &'static str)] {
    &RESNET_CHILDREN
}

/// Whole modules outside the blocks: (ldm, diffusers).
#[cfg(test)]
pub fn basic_modules() -> &'static [(&'static str, &'static str)] {
    &BASIC
}

/// `other` (the mapped prefix) extended by `rest` under the rule `inner`.
fn carry(from: Naming, other: &str, inner: Inner, rest: &str) -> Option<String> {
    match (inner, rest.is_empty()) {
        (Inner::Exact, true) | (Inner::Same, true) => Some(other.to_string()),
        (Inner::Exact, false) | (Inner::Resnet, true) => None,
        (Inner::Same, false) => Some(format!("{other}.{rest}")),
        (Inner::Resnet, false) => RESNET_CHILDREN
            .iter()
            .find_map(|&(l, d)| match from {
                Naming::Ldm => (l == rest).then_some(d),
                Naming::Diffusers => (d == rest).then_some(l),
            })
            .map(|child| format!("{other}.{child}")),
    }
}

/// What a child module of an ldm block is, by the first name below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum LdmChild {
    Resnet,
    Attention,
    Downsample,
    Upsample,
    /// The child is itself a weight-bearing module (`input_blocks.0.0`, conv_in).
    Bare,
}

fn ldm_child(rest: Option<&str>) -> Option<LdmChild> {
    let Some(rest) = rest else {
        return Some(LdmChild::Bare);
    };
    let first = rest.split('.').next().unwrap_or(rest);
    match first {
        "in_layers" | "out_layers" | "emb_layers" | "skip_connection" => Some(LdmChild::Resnet),
        "norm" | "proj_in" | "proj_out" | "transformer_blocks" => Some(LdmChild::Attention),
        "op" => Some(LdmChild::Downsample),
        "conv" => Some(LdmChild::Upsample),
        _ => None,
    }
}

/// `<head>.<n>.<rest>` with numeric `n`: (n, rest or None).
fn numbered<'a>(module: &'a str, head: &str) -> Option<(usize, Option<&'a str>)> {
    let tail = module.strip_prefix(head)?.strip_prefix('.')?;
    let (n, rest) = match tail.split_once('.') {
        Some((n, rest)) => (n, Some(rest)),
        None => (tail, None),
    };
    Some((n.parse().ok()?, rest))
}

/// Whether `set` is exactly `0..set.len()`.
fn contiguous<V>(set: &BTreeMap<usize, V>) -> bool {
    set.keys().enumerate().all(|(i, &k)| i == k)
}

fn contiguous_set(set: &BTreeSet<usize>) -> bool {
    set.iter().enumerate().all(|(i, &k)| i == k)
}

/// Blocks `n` → children `c` → kinds seen.
type Blocks = BTreeMap<usize, BTreeMap<usize, BTreeSet<LdmChild>>>;

/// The single kind of a child, or `None` when it mixes kinds.
fn only(kinds: &BTreeSet<LdmChild>) -> Option<LdmChild> {
    match kinds.len() {
        1 => kinds.first().copied(),
        _ => None,
    }
}

impl Architecture {
    fn from_ldm<'a>(modules: impl IntoIterator<Item = &'a str>) -> Option<Self> {
        let mut input: Blocks = BTreeMap::new();
        let mut middle: BTreeMap<usize, BTreeSet<LdmChild>> = BTreeMap::new();
        let mut output: Blocks = BTreeMap::new();
        for m in modules {
            if let Some((n, rest)) = numbered(m, "middle_block") {
                let kind = ldm_child(rest)?;
                middle.entry(n).or_default().insert(kind);
                continue;
            }
            for (head, blocks) in [("input_blocks", &mut input), ("output_blocks", &mut output)] {
                if let Some((n, Some(rest))) = numbered(m, head) {
                    let (c, below) = match rest.split_once('.') {
                        Some((c, below)) => (c, Some(below)),
                        None => (rest, None),
                    };
                    let c: usize = c.parse().ok()?;
                    let kind = ldm_child(below)?;
                    blocks
                        .entry(n)
                        .or_default()
                        .entry(c)
                        .or_default()
                        .insert(kind);
                }
            }
        }
        if !contiguous(&input) || !contiguous(&middle) || !contiguous(&output) {
            return None;
        }
        let mut arch = Architecture::default();

        // Down path: block 0 is conv_in; then res-blocks, a downsampler closing each level.
        let mut blocks = input.values();
        let first = blocks.next()?;
        if first.len() != 1 || only(first.get(&0)?)? != LdmChild::Bare {
            return None;
        }
        let mut level = Level::default();
        for children in blocks {
            let kinds: Vec<LdmChild> = children.values().map(only).collect::<Option<_>>()?;
            if !contiguous(children) {
                return None;
            }
            match kinds[..] {
                [LdmChild::Downsample] => {
                    level.sampler = true;
                    arch.down.push(std::mem::take(&mut level));
                }
                [LdmChild::Resnet] => level.attention.push(false),
                [LdmChild::Resnet, LdmChild::Attention] => level.attention.push(true),
                _ => return None,
            }
        }
        if !level.attention.is_empty() {
            arch.down.push(level);
        }

        for kinds in middle.values() {
            arch.mid.push(match only(kinds)? {
                LdmChild::Resnet => MidChild::Resnet,
                LdmChild::Attention => MidChild::Attention,
                _ => return None,
            });
        }

        // Up path: res-blocks, an upsampler (as the block's last child) closing each level.
        let mut level = Level::default();
        for children in output.values() {
            let kinds: Vec<LdmChild> = children.values().map(only).collect::<Option<_>>()?;
            if !contiguous(children) {
                return None;
            }
            let (attention, sampler) = match kinds[..] {
                [LdmChild::Resnet] => (false, false),
                [LdmChild::Resnet, LdmChild::Attention] => (true, false),
                [LdmChild::Resnet, LdmChild::Upsample] => (false, true),
                [LdmChild::Resnet, LdmChild::Attention, LdmChild::Upsample] => (true, true),
                _ => return None,
            };
            level.attention.push(attention);
            if sampler {
                level.sampler = true;
                arch.up.push(std::mem::take(&mut level));
            }
        }
        if !level.attention.is_empty() {
            arch.up.push(level);
        }
        Some(arch)
    }

    fn from_diffusers<'a>(modules: impl IntoIterator<Item = &'a str>) -> Option<Self> {
        #[derive(Default)]
        struct Raw {
            resnets: BTreeSet<usize>,
            attentions: BTreeSet<usize>,
            sampler: bool,
        }
        let mut down: BTreeMap<usize, Raw> = BTreeMap::new();
        let mut up: BTreeMap<usize, Raw> = BTreeMap::new();
        let mut mid = Raw::default();
        for m in modules {
            let (raw, rest) = if let Some((x, rest)) = numbered(m, "down_blocks") {
                (down.entry(x).or_default(), rest)
            } else if let Some((x, rest)) = numbered(m, "up_blocks") {
                (up.entry(x).or_default(), rest)
            } else if let Some(rest) = m.strip_prefix("mid_block.") {
                (&mut mid, Some(rest))
            } else {
                continue;
            };
            let rest = rest?;
            if let Some((i, _)) = numbered(rest, "resnets") {
                raw.resnets.insert(i);
            } else if let Some((i, _)) = numbered(rest, "attentions") {
                raw.attentions.insert(i);
            } else if rest == "downsamplers.0.conv" || rest == "upsamplers.0.conv" {
                raw.sampler = true;
            } else {
                return None;
            }
        }
        let level = |raw: &Raw| -> Option<Level> {
            if raw.resnets.is_empty()
                || !contiguous_set(&raw.resnets)
                || !raw.attentions.is_subset(&raw.resnets)
            {
                return None;
            }
            Some(Level {
                attention: raw
                    .resnets
                    .iter()
                    .map(|i| raw.attentions.contains(i))
                    .collect(),
                sampler: raw.sampler,
            })
        };
        if !contiguous(&down) || !contiguous(&up) {
            return None;
        }
        let mut arch = Architecture {
            down: down.values().map(level).collect::<Option<_>>()?,
            up: up.values().map(level).collect::<Option<_>>()?,
            mid: Vec::new(),
        };
        // Middle: resnet, (transformer, resnet)*.
        if !contiguous_set(&mid.resnets) || !contiguous_set(&mid.attentions) || mid.sampler {
            return None;
        }
        let (r, a) = (mid.resnets.len(), mid.attentions.len());
        if r > 0 && a >= r {
            return None;
        }
        for k in 0..r {
            arch.mid.push(MidChild::Resnet);
            if k < a {
                arch.mid.push(MidChild::Attention);
            }
        }
        Some(arch)
    }

    /// Down and up paths mirror each other: same number of levels, one more res-block per up
    /// level than its down level, samplers on every level but the innermost.
    fn consistent(&self) -> bool {
        let levels = self.down.len();
        levels > 0
            && self.up.len() == levels
            && self.down.iter().enumerate().all(|(x, l)| {
                l.sampler == (x + 1 < levels)
                    && self.up[levels - 1 - x].attention.len() == l.attention.len() + 1
            })
            && self
                .up
                .iter()
                .enumerate()
                .all(|(x, l)| l.sampler == (x + 1 < levels))
            && self.mid.first() == Some(&MidChild::Resnet)
            && self.mid.last() == Some(&MidChild::Resnet)
    }

    fn map(&self) -> UnetMap {
        let mut pairs: Vec<(String, String, Inner)> = Vec::new();
        let mut n = 1;
        for (x, level) in self.down.iter().enumerate() {
            for (i, &attention) in level.attention.iter().enumerate() {
                let d = format!("down_blocks.{x}");
                pairs.push((
                    format!("input_blocks.{n}.0"),
                    format!("{d}.resnets.{i}"),
                    Inner::Resnet,
                ));
                if attention {
                    pairs.push((
                        format!("input_blocks.{n}.1"),
                        format!("{d}.attentions.{i}"),
                        Inner::Same,
                    ));
                }
                n += 1;
            }
            if level.sampler {
                pairs.push((
                    format!("input_blocks.{n}.0.op"),
                    format!("down_blocks.{x}.downsamplers.0.conv"),
                    Inner::Exact,
                ));
                n += 1;
            }
        }
        let (mut r, mut a) = (0, 0);
        for (j, child) in self.mid.iter().enumerate() {
            let (d, inner) = match child {
                MidChild::Resnet => {
                    r += 1;
                    (format!("mid_block.resnets.{}", r - 1), Inner::Resnet)
                }
                MidChild::Attention => {
                    a += 1;
                    (format!("mid_block.attentions.{}", a - 1), Inner::Same)
                }
            };
            pairs.push((format!("middle_block.{j}"), d, inner));
        }
        let mut n = 0;
        for (x, level) in self.up.iter().enumerate() {
            let last = level.attention.len() - 1;
            for (i, &attention) in level.attention.iter().enumerate() {
                let d = format!("up_blocks.{x}");
                pairs.push((
                    format!("output_blocks.{n}.0"),
                    format!("{d}.resnets.{i}"),
                    Inner::Resnet,
                ));
                let mut child = 1;
                if attention {
                    pairs.push((
                        format!("output_blocks.{n}.1"),
                        format!("{d}.attentions.{i}"),
                        Inner::Same,
                    ));
                    child = 2;
                }
                if level.sampler && i == last {
                    pairs.push((
                        format!("output_blocks.{n}.{child}.conv"),
                        format!("{d}.upsamplers.0.conv"),
                        Inner::Exact,
                    ));
                }
                n += 1;
            }
        }
        for (l, d) in BASIC {
            pairs.push((l.to_string(), d.to_string(), Inner::Exact));
        }
        let mut map = UnetMap::default();
        for (l, d, inner) in pairs {
            map.ldm_to_diffusers
                .entry(l.clone())
                .or_default()
                .push((d.clone(), inner));
            map.diffusers_to_ldm.entry(d).or_default().push((l, inner));
        }
        map
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny SD-like U-Net in ldm names: 2 levels, 1 res-block each, attention on level 0 only.
    fn tiny_ldm() -> Vec<&'static str> {
        vec![
            "input_blocks.0.0",
            "input_blocks.1.0.in_layers.2",
            "input_blocks.1.0.out_layers.3",
            "input_blocks.1.1.proj_in",
            "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
            "input_blocks.2.0.op",
            "input_blocks.3.0.in_layers.2",
            "input_blocks.3.0.skip_connection",
            "middle_block.0.in_layers.2",
            "middle_block.1.proj_in",
            "middle_block.2.in_layers.2",
            "output_blocks.0.0.in_layers.2",
            "output_blocks.1.0.in_layers.2",
            "output_blocks.1.1.conv",
            "output_blocks.2.0.in_layers.2",
            "output_blocks.2.1.transformer_blocks.0.attn2.to_k",
            "output_blocks.3.0.emb_layers.1",
            "output_blocks.3.1.proj_out",
            "time_embed.0",
            "out.2",
        ]
    }

    #[test]
    fn tiny_ldm_translates_both_ways() {
        let m = UnetMap::derive(Naming::Ldm, tiny_ldm()).expect("consistent");
        let cases = [
            ("input_blocks.0.0", "conv_in"),
            (
                "input_blocks.1.0.in_layers.2",
                "down_blocks.0.resnets.0.conv1",
            ),
            (
                "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
                "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
            ),
            ("input_blocks.2.0.op", "down_blocks.0.downsamplers.0.conv"),
            (
                "input_blocks.3.0.skip_connection",
                "down_blocks.1.resnets.0.conv_shortcut",
            ),
            ("middle_block.1.proj_in", "mid_block.attentions.0.proj_in"),
            ("middle_block.2.in_layers.2", "mid_block.resnets.1.conv1"),
            ("output_blocks.1.1.conv", "up_blocks.0.upsamplers.0.conv"),
            (
                "output_blocks.2.1.transformer_blocks.0.attn2.to_k",
                "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
            ),
            (
                "output_blocks.3.0.emb_layers.1",
                "up_blocks.1.resnets.1.time_emb_proj",
            ),
            ("time_embed.0", "time_embedding.linear_1"),
            ("out.2", "conv_out"),
        ];
        for (l, d) in cases {
            assert_eq!(m.translate(Naming::Ldm, l), vec![d.to_string()], "{l}");
            assert_eq!(
                m.translate(Naming::Diffusers, d),
                vec![l.to_string()],
                "{d}"
            );
        }
        // Unknown children and partial names translate to nothing.
        assert!(
            m.translate(Naming::Ldm, "input_blocks.1.0.bogus")
                .is_empty()
        );
        assert!(m.translate(Naming::Ldm, "input_blocks.1.0").is_empty());
        assert!(m.translate(Naming::Ldm, "input_blocks.2.0.op.x").is_empty());
        assert_eq!(
            m.translate(Naming::Ldm, "label_emb.0.0"),
            vec!["add_embedding.linear_1", "class_embedding.linear_1"]
        );
    }

    #[test]
    fn diffusers_names_give_the_same_map() {
        let ldm = UnetMap::derive(Naming::Ldm, tiny_ldm()).expect("consistent");
        let diffusers: Vec<String> = tiny_ldm()
            .into_iter()
            .flat_map(|l| ldm.translate(Naming::Ldm, l))
            .collect();
        let d = UnetMap::derive(Naming::Diffusers, diffusers.iter().map(String::as_str))
            .expect("consistent");
        for l in tiny_ldm() {
            let dn = ldm.translate(Naming::Ldm, l);
            assert_eq!(d.translate(Naming::Diffusers, &dn[0]), vec![l.to_string()]);
        }
    }

    #[test]
    fn gaps_and_mismatches_give_no_map() {
        let mut gap = tiny_ldm();
        gap.retain(|m| !m.starts_with("input_blocks.2."));
        assert!(UnetMap::derive(Naming::Ldm, gap).is_none());
        let mut no_up = tiny_ldm();
        no_up.retain(|m| !m.starts_with("output_blocks.3."));
        assert!(UnetMap::derive(Naming::Ldm, no_up).is_none());
        let mut odd = tiny_ldm();
        odd.push("input_blocks.1.0.op");
        assert!(UnetMap::derive(Naming::Ldm, odd).is_none());
        assert!(UnetMap::derive(Naming::Diffusers, ["down_blocks.0.resnets.1.conv1"]).is_none());
        assert!(UnetMap::derive(Naming::Ldm, Vec::<&str>::new()).is_none());
    }
}
