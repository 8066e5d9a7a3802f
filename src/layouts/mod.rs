//! Adapter layouts: how each producer stores an OFT adapter, one module per producer, and the
//! one list of them, [`LAYOUTS`].
//!
//! A **layout** is a producer's way of writing adapters — tensor names, metadata, container —
//! and its id is the one name oftool uses for it everywhere: `inspect` reports it, `convert --to`
//! takes it, errors name it. A layout may come in **variants** (LyCORIS `diag-oft`, `boft`,
//! 2.0 `oft-diag`); `{id}-{variant}` (`lycoris-diag-oft`) names one in messages.
//!
//! Each layout module exports one `LAYOUT` descriptor: plain data plus function pointers
//! (`detect`, one `import` per variant, `export`). Function pointers rather than a trait object,
//! because a layout has no state: an entry is one `static` struct literal in its own module,
//! the registry a `static` slice of references, and nothing is allocated or registered at run
//! time; a layout that cannot be read or written says so in the data ([`Layout::reads`] is
//! `None`, [`Writes::No`] gives the reason), where a trait would need stub methods.
//!
//! **Detection** ([`detect`]): every readable layout's `detect` looks at the opened file (tensor
//! names, shapes, metadata, for a directory its `adapter_config.json`) and may claim it, with
//! [`Evidence`]: a producer's own *marker* (metadata it writes, a tensor only it writes) or the
//! tensor *names* alone. Exactly one layout and variant must claim a file: markers first, then
//! names; two claims on one tier are "mixed layouts", none is "no OFT tensors found", with what
//! was looked for taken from the registry. A `detect` may also refuse a file it recognises.
//!
//! Shared pieces, which no layout module reaches past: [`names`] (components and name
//! prefixes), [`common`] (reading helpers), [`container`] (files, pickles, PEFT-style
//! directories), [`codec`] (storage formats several producers share), [`report`] (what writers
//! return and the per-layer figures). `src/README.md` says how to add a layout.

pub(crate) mod authors;
pub(crate) mod codec;
pub(crate) mod comfyui;
pub(crate) mod common;
pub(crate) mod container;
pub mod fused;
pub(crate) mod kohya;
pub(crate) mod lora;
pub(crate) mod lycoris;
pub(crate) mod names;
pub(crate) mod oft;
pub(crate) mod onetrainer;
pub(crate) mod peft;
pub mod report;

pub use codec::blocks::Semantics;
pub use report::{Context, LayerReport, OutFile, Status, Written};

use crate::error::{Category, Error, Result};
use crate::model::Adapter;
use crate::tensors::MappedFile;
use safetensors::SafeTensors;
use std::path::Path;

/// Every layout oftool knows, in the order detection asks them and `--help` lists them.
pub static LAYOUTS: &[&Layout] = &[
    &oft::LAYOUT,
    &peft::LAYOUT,
    &comfyui::LAYOUT,
    &lycoris::LAYOUT,
    &kohya::LAYOUT,
    &onetrainer::LAYOUT,
    &lora::LAYOUT,
    &authors::LAYOUT,
];

/// One layout: its names, how it is read and written.
pub struct Layout {
    /// The one name: `inspect`'s `layout`, a `convert --to` value, what errors say.
    pub id: &'static str,
    /// Other names `convert --to` accepts (older or tool-given names).
    pub aliases: &'static [&'static str],
    /// One line for `convert --help`.
    pub about: &'static str,
    /// How files of this layout are recognised and read (`None`: oftool only writes it).
    pub reads: Option<Reader>,
    /// Whether and how `convert --to` writes it.
    pub writes: Writes,
    /// Metadata keys that describe this layout rather than the user's training: never carried
    /// into another layout (a key ending in `.` stands for every key it begins).
    pub metadata_keys: &'static [&'static str],
}

/// How a layout's files are recognised and read.
pub struct Reader {
    /// Tensor-name suffixes that identify the layout (what detection looks for).
    pub keys: &'static [&'static str],
    /// Other tensor-name suffixes its files hold (`alpha`, `rescale`, …).
    pub companions: &'static [&'static str],
    /// Non-tensor evidence, as the "no OFT tensors found" message names it.
    pub markers: &'static [&'static str],
    /// Whether an adapter of this layout may come as a directory with `adapter_config.json`.
    pub directories: bool,
    /// Claims on an opened file (none: not this layout); an error refuses the file outright.
    pub detect: fn(&Probe<'_>) -> Result<Vec<Claim>>,
    /// The variants `detect` claims with.
    pub variants: &'static [&'static Variant],
}

/// A finer kind of file within a layout, with its importer.
pub struct Variant {
    /// `""` when the layout has one kind of file.
    pub name: &'static str,
    /// Reads a file of this variant into the canonical model.
    pub import: fn(&Source<'_>) -> Result<Adapter>,
}

impl Variant {
    /// A variant named `name` (`""` for the only one) read by `import`.
    pub const fn new(name: &'static str, import: fn(&Source<'_>) -> Result<Adapter>) -> Self {
        Variant { name, import }
    }
}

/// Whether and how `convert --to` writes a layout.
pub enum Writes {
    /// The `.oft` format itself, written by [`crate::oft_file`] (`convert -o X.oft`).
    Canonical,
    /// A foreign layout: the files and per-layer verdicts, nothing on disk yet.
    Writer(fn(&Adapter, &Context<'_>) -> Result<Written>),
    /// A LoRA approximating the bake: written from the adapter *and* the base, with a rank rule,
    /// by [`crate::bridge::lora`] (`convert --to lora --base BASE`).
    LowRank,
    /// Not written, because …
    No(&'static str),
}

/// What a claim rests on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Evidence {
    /// Something only this producer writes (a metadata key or value, a marker tensor).
    Marker,
    /// The tensor names and shapes alone.
    Names,
}

/// A layout's claim on a file.
pub struct Claim {
    /// The variant claimed.
    pub variant: &'static Variant,
    /// How strong the evidence is.
    pub evidence: Evidence,
}

impl Claim {
    /// A claim by a marker only this producer writes (metadata or a tensor).
    pub fn marker(variant: &'static Variant) -> Self {
        Claim {
            variant,
            evidence: Evidence::Marker,
        }
    }

    /// A claim by tensor names alone.
    pub fn names(variant: &'static Variant) -> Self {
        Claim {
            variant,
            evidence: Evidence::Names,
        }
    }
}

/// An opened file, as detection sees it.
pub struct Probe<'a> {
    /// The file the user named (for messages).
    pub path: &'a Path,
    /// The safetensors file.
    pub file: &'a MappedFile,
    /// Its tensors.
    pub tensors: &'a SafeTensors<'a>,
    /// Its tensor names.
    pub names: &'a [&'a str],
    /// The directory and its `adapter_config.json`, when the adapter is a directory.
    pub directory: Option<(&'a Path, &'a Path)>,
}

impl Probe<'_> {
    /// Whether any tensor name ends with `suffix`.
    pub fn has(&self, suffix: &str) -> bool {
        self.names.iter().any(|n| n.ends_with(suffix))
    }

    /// Whether any tensor name satisfies `pred`.
    pub fn any(&self, pred: impl Fn(&str) -> bool) -> bool {
        self.names.iter().any(|n| pred(n))
    }

    /// The rank of tensor `name` (0 when absent).
    pub fn rank(&self, name: &str) -> usize {
        self.tensors.tensor(name).map_or(0, |t| t.shape().len())
    }

    /// A metadata value.
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.file.metadata.get(key).map(String::as_str)
    }
}

/// What an importer reads.
pub struct Source<'a> {
    /// The safetensors file read: the user's, or a private converted copy of a pickle.
    pub path: &'a Path,
    /// The safetensors file.
    pub file: &'a MappedFile,
    /// A PEFT `adapter_config.json`: the directory's, or one beside a bare weights file.
    pub config: Option<&'a Path>,
    /// The diffusers component a PEFT directory is named for (`…/unet`).
    pub component: Option<String>,
    /// Whose reading of an `oft_blocks` file to reproduce.
    pub semantics: Semantics,
}

impl Source<'_> {
    /// Whether any tensor name ends with `suffix`.
    pub fn has(&self, suffix: &str) -> bool {
        self.file
            .tensors()
            .names()
            .iter()
            .any(|n| n.ends_with(suffix))
    }
}

/// The layout and variant of a file.
#[derive(Clone, Copy)]
pub struct Detected {
    /// The layout.
    pub layout: &'static Layout,
    /// The variant within it.
    pub variant: &'static Variant,
}

impl Detected {
    /// The layout's id (`lycoris`).
    pub fn id(&self) -> &'static str {
        self.layout.id
    }

    /// The variant (`diag-oft`), if the layout has several.
    pub fn variant(&self) -> Option<&'static str> {
        (!self.variant.name.is_empty()).then_some(self.variant.name)
    }

    /// What messages call it: `lycoris-diag-oft`, or the id alone.
    pub fn name(&self) -> String {
        match self.variant() {
            Some(v) => format!("{}-{v}", self.layout.id),
            None => self.layout.id.to_string(),
        }
    }

    /// Whether it is the `.oft` format itself.
    pub fn is_oft(&self) -> bool {
        matches!(self.layout.writes, Writes::Canonical)
    }
}

/// The layout named `name` (an id or an alias).
pub fn find(name: &str) -> Option<&'static Layout> {
    LAYOUTS
        .iter()
        .copied()
        .find(|l| l.id == name || l.aliases.contains(&name))
}

/// The layouts `convert --to` writes besides `.oft`, with their writers.
pub fn writers() -> impl Iterator<Item = (&'static Layout, WriteFn)> {
    LAYOUTS.iter().filter_map(|l| match l.writes {
        Writes::Writer(f) => Some((*l, f)),
        Writes::Canonical | Writes::LowRank | Writes::No(_) => None,
    })
}

/// A foreign layout's writer.
pub type WriteFn = fn(&Adapter, &Context<'_>) -> Result<Written>;

/// Every tensor-name suffix some layout reads (keys, then companions; each once), in registry
/// order: what the fuzzer builds names from.
pub fn tensor_suffixes() -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    for r in LAYOUTS.iter().filter_map(|l| l.reads.as_ref()) {
        for s in r.keys.iter().chain(r.companions) {
            if !out.contains(s) {
                out.push(s);
            }
        }
    }
    out
}

/// Whether a metadata key describes some layout ([`Layout::metadata_keys`]).
pub fn is_layout_key(key: &str) -> bool {
    LAYOUTS.iter().flat_map(|l| l.metadata_keys).any(|k| {
        if k.ends_with('.') {
            key.starts_with(k)
        } else {
            key == *k
        }
    })
}

/// Identify the layout of `path` (a file, a PEFT directory, or a folder of per-component PEFT
/// directories: the first component's).
pub fn detect(path: &Path) -> Result<Detected> {
    let input = container::locate(path)?.first()?;
    let opened = input.open()?;
    detect_opened(&input, &opened)
}

/// Read any supported adapter into the canonical model, as its producer computes it.
pub fn load(path: &Path) -> Result<Adapter> {
    read_with(path, Semantics::Producer).map(|(_, a)| a)
}

/// Read an adapter as a given runtime reads it (only `oft_blocks` files differ between readers).
pub fn load_with(path: &Path, semantics: Semantics) -> Result<Adapter> {
    read_with(path, semantics).map(|(_, a)| a)
}

/// Detect and read an adapter, opening it (and converting a pickle) once.
pub fn read(path: &Path) -> Result<(Detected, Adapter)> {
    read_with(path, Semantics::Producer)
}

/// [`read`], reading `oft_blocks` files as a given runtime does.
pub fn read_with(path: &Path, semantics: Semantics) -> Result<(Detected, Adapter)> {
    let mut read: Option<(Detected, Adapter)> = None;
    for input in container::locate(path)?.inputs() {
        let opened = input.open()?;
        let found = detect_opened(&input, &opened)?;
        let src = Source {
            path: &opened.path,
            file: &opened.mapped,
            config: input.config.as_deref(),
            component: input.component.clone(),
            semantics,
        };
        let mut adapter = (found.variant.import)(&src)?;
        opened.record_container(&mut adapter)?;
        // A folder of per-component directories is one adapter, layers in component order.
        match &mut read {
            None => read = Some((found, adapter)),
            Some((_, a)) => a.layers.extend(adapter.layers),
        }
    }
    read.ok_or_else(|| Error::new(Category::UnknownLayout, "holds no adapter").at(path))
}

fn detect_opened(input: &container::Input, opened: &container::Weights) -> Result<Detected> {
    let tensors = opened.mapped.tensors();
    let names = tensors.names();
    let probe = Probe {
        path: &input.weights,
        file: &opened.mapped,
        tensors: &tensors,
        names: &names,
        directory: input.directory.as_deref().zip(input.config.as_deref()),
    };
    let mut claims = Vec::new();
    for layout in LAYOUTS {
        if let Some(reader) = &layout.reads {
            for claim in (reader.detect)(&probe)? {
                claims.push((*layout, claim));
            }
        }
    }
    let found = choose(&probe, &claims)?;
    if let Some((dir, _)) = probe.directory
        && !found.layout.reads.as_ref().is_some_and(|r| r.directories)
    {
        return Err(Error::format(
            dir,
            format!(
                "a directory adapter holds a PEFT adapter_config.json, but the tensors are {}",
                found.name()
            ),
        ));
    }
    Ok(found)
}

/// The one claim detection settles on: markers first, then names (module doc).
fn choose(probe: &Probe<'_>, claims: &[(&'static Layout, Claim)]) -> Result<Detected> {
    let tier = if claims.iter().any(|(_, c)| c.evidence == Evidence::Marker) {
        Evidence::Marker
    } else {
        Evidence::Names
    };
    let mut found: Vec<Detected> = Vec::new();
    for (layout, claim) in claims.iter().filter(|(_, c)| c.evidence == tier) {
        if !found
            .iter()
            .any(|d| std::ptr::eq(d.layout, *layout) && std::ptr::eq(d.variant, claim.variant))
        {
            found.push(Detected {
                layout,
                variant: claim.variant,
            });
        }
    }
    match found.as_slice() {
        [one] => Ok(*one),
        [] => Err(not_found(probe.path)),
        many => Err(Error::format(
            probe.path,
            format!(
                "mixed layouts in one file ({}): refusing to guess",
                many.iter()
                    .map(Detected::name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

/// "No OFT tensors found", naming what every readable layout looks for.
fn not_found(path: &Path) -> Error {
    let mut keys: Vec<String> = Vec::new();
    let mut markers: Vec<String> = Vec::new();
    for r in LAYOUTS.iter().filter_map(|l| l.reads.as_ref()) {
        for k in r.keys {
            let k = format!("`{}`", k.trim_start_matches('.'));
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
        markers.extend(r.markers.iter().map(|m| m.to_string()));
    }
    let readable: Vec<&str> = LAYOUTS
        .iter()
        .filter(|l| l.reads.is_some())
        .map(|l| l.id)
        .collect();
    Error::new(
        Category::UnknownLayout,
        format!(
            "no OFT tensors found (looked for {}, and {}); is this an OFT adapter?",
            keys.join(", "),
            markers.join(", ")
        ),
    )
    .at(path)
    .hint(format!(
        "oftool reads these layouts: {}",
        readable.join(", ")
    ))
}

/// Write `adapter` in `layout`: the files and the per-layer verdicts (nothing on disk yet).
pub fn export(adapter: &Adapter, layout: &Layout, ctx: &Context<'_>) -> Result<Written> {
    match layout.writes {
        Writes::Writer(write) => {
            match split_row_layers(adapter, ctx, matches!(layout.id, "comfyui" | "kohya"))? {
                Some(split) => write(&split, ctx),
                None => write(adapter, ctx),
            }
        }
        Writes::Canonical => Err(Error::usage(format!(
            "`{}` is written by `oftool convert IN -o OUT.oft`",
            layout.id
        ))),
        Writes::LowRank => Err(Error::usage(format!(
            "`{}` is written by `oftool convert IN --to lora --base BASE -o OUT`",
            layout.id
        ))),
        Writes::No(why) => Err(not_writable(layout, why)),
    }
}

/// What [`split_rows`] gives: the adapter with its row-slice layers renamed (`None`: none
/// changed) and the layers left out, by index, with the reason.
pub type SplitRows = (Option<Adapter>, Vec<(usize, String)>);

/// [`export`]'s renaming of row-slice layers, for a caller that reports on the layers as
/// written (`None`: no layer lists rows).
/// Layers that cannot be put in their tensor's stored row order come back apart, by index,
/// with the reason (the caller reports them impossible and leaves them out).
pub fn split_rows(adapter: &Adapter, layout: &Layout, ctx: &Context<'_>) -> Result<SplitRows> {
    let mut refused = Vec::new();
    let whole_reordered = matches!(layout.id, "comfyui" | "kohya");
    let mut kept = adapter.clone();
    if whole_reordered {
        kept.layers.clear();
        for (i, layer) in adapter.layers.iter().enumerate() {
            let mut l = layer.clone();
            match in_stored_order(&mut l) {
                Some(Err(why)) => refused.push((i, why)),
                _ => kept.layers.push(layer.clone()),
            }
        }
    }
    let split = split_row_layers(&kept, ctx, whole_reordered)?;
    Ok(match (split, refused.is_empty()) {
        (Some(a), _) => (Some(a), refused),
        (None, true) => (None, refused),
        (None, false) => (Some(kept), refused),
    })
}

/// Other layouts name whole modules: a layer on rows of a fused tensor (`target.rows`, e.g. q
/// of OpenCLIP's `in_proj_weight`) is renamed to the split module those rows are in the
/// diffusers pipeline (`text_encoder_2` `…self_attn.q_proj`), found through the base. `None`
/// when no layer lists rows; an error when the base is missing or names no such module.
///
/// `whole_reordered`: a layer on every row of a tensor in another order (the final adaLN's
/// swapped halves) stays on that tensor, its blocks and row scale put in the tensor's row order
/// (ComfyUI, whose diffusers-name map swaps the halves of the difference instead of rotating
/// the rows it holds).
fn split_row_layers(
    adapter: &Adapter,
    ctx: &Context<'_>,
    whole_reordered: bool,
) -> Result<Option<Adapter>> {
    if adapter.layers.iter().all(|l| l.target.rows.is_none()) {
        return Ok(None);
    }
    let mut out = adapter.clone();
    let mut problems = Vec::new();
    for layer in out.layers.iter_mut().filter(|l| l.target.rows.is_some()) {
        if whole_reordered && let Some(done) = in_stored_order(layer) {
            if let Err(why) = done {
                problems.push(why);
            }
            continue;
        }
        let t = &layer.target;

        let listed = t.rows.as_deref().unwrap_or_default();
        let shown: Vec<String> = listed
            .iter()
            .map(|r| format!("[{}, {}]", r.start, r.len))
            .collect();
        if let Some((module, rows)) = dit_split(t) {
            layer.target.name = module;
            // A trainer's name said `unet` for want of a better word; PEFT's names say none.
            if layer.target.component.is_some() {
                layer.target.component = Some(names::TRANSFORMER.into());
            }
            layer.target.convention = "diffusers".into();
            if let (Some(shape), Some(n)) = (layer.target.shape.as_mut(), rows)
                && let Some(first) = shape.first_mut()
            {
                *first = n;
            }
            layer.target.rows = None;
            layer.base_binding = None;
            continue;
        }
        let split = ctx.names().and_then(|(table, names)| {
            let [only] = listed else { return None };
            let whole = crate::model::Target {
                rows: None,
                ..t.clone()
            };
            let r = table.resolve(&whole).ok()?;
            let (start, len) = match r.rows {
                None => (
                    usize::try_from(only.start).ok()?,
                    usize::try_from(only.len).ok()?,
                ),
                Some((s0, l0)) => {
                    let (s, l) = (
                        usize::try_from(only.start).ok()?,
                        usize::try_from(only.len).ok()?,
                    );
                    (s.checked_add(l)? <= l0).then_some((s0 + s, l))?
                }
            };
            let at = crate::resolve::Resolved {
                key: r.key,
                rows: Some((start, len)),
            };
            names.of(&at).cloned()
        });
        let Some((component, module)) = split else {
            problems.push(format!(
                "`{}` covers rows {} of a fused weight, which {} names by no module of its own",
                t.name,
                shown.join(", "),
                if ctx.names().is_some() {
                    "the base"
                } else {
                    "without --base nothing"
                }
            ));
            continue;
        };
        // The split module's shape: the fused one with its rows replaced.
        let rows = t.view_rows();
        if let (Some(shape), Some(rows)) = (layer.target.shape.as_mut(), rows)
            && let Some(first) = shape.first_mut()
        {
            *first = rows;
        }
        layer.target.name = module;
        layer.target.component = Some(component);
        layer.target.convention = "diffusers".into();
        layer.target.rows = None;
        layer.base_binding = None;
    }
    if problems.is_empty() {
        Ok(Some(out))
    } else {
        Err(Error::new(
            Category::Conversion,
            format!(
                "{} layer(s) cover rows of a fused weight, which other layouts cannot say: {}",
                problems.len(),
                problems.join("; ")
            ),
        )
        .hint("pass --base with the checkpoint the layers are bound to, or keep them in .oft and bake them with oftool merge"))
    }
}

/// A diffusion-transformer layer on rows of a module (`target.rows`, with the module's shape)
/// that are exactly one diffusers module, in that module's row order: its name and rows. The
/// rows may be a whole diffusers tensor already (a kohya split bound to a diffusers base), one
/// part of a fused original module (`img_attn.qkv` rows 16..32: `to_k`), or a reordered one
/// (the final adaLN's swapped halves).
fn dit_split(t: &crate::model::Target) -> Option<(String, Option<u64>)> {
    use crate::resolve::dit;
    let listed = t.rows.as_deref()?;
    let shape = t.shape.as_ref()?;
    let rows = usize::try_from(*shape.first()?).ok()?;
    let cols: usize = shape
        .iter()
        .skip(1)
        .try_fold(1usize, |a, &d| a.checked_mul(usize::try_from(d).ok()?))?;
    let place = dit::place(&t.name, &[])?;
    let total: u64 = listed.iter().map(|r| r.len).sum();
    let whole = matches!(listed, [r] if r.start == 0 && r.len == rows as u64);
    if place.layout() == dit::BaseLayout::Diffusers {
        return whole.then(|| {
            (
                dit::counterparts(&place, dit::BaseLayout::Diffusers)[0]
                    .module
                    .clone(),
                Some(total),
            )
        });
    }
    // Each listed range as (part, rows of that part); together one part, in order, every row.
    let parts = dit::original_parts(place.map, rows, cols)?;
    let mut part = None;
    let mut next = 0usize;
    for r in listed {
        let (start, len) = (usize::try_from(r.start).ok()?, usize::try_from(r.len).ok()?);
        let (j, o, d) = parts.iter().find(|(_, o, _)| {
            o.start <= start && start.checked_add(len).is_some_and(|e| e <= o.end)
        })?;
        if part.is_some_and(|p| p != *j) {
            return None;
        }
        part = Some(*j);
        let from = d.start + (start - o.start);
        if from != next {
            return None;
        }
        next = from + len;
    }
    let j = part?;
    let full = parts
        .iter()
        .filter(|(k, _, _)| *k == j)
        .map(|(_, o, _)| o.len())
        .sum::<usize>();
    if next != full {
        return None;
    }
    let names = dit::counterparts(&place, dit::BaseLayout::Diffusers);
    names.get(j).map(|c| (c.module.clone(), Some(total)))
}

/// A layer on every row of its tensor in another order (`rows` a permutation of whole ranges)
/// rewritten on the tensor in stored order: its blocks reordered with the rows, and its row
/// scale. `None`: not such a layer; an error: a layer whose blocks straddle the ranges or whose
/// stages are wired (a butterfly does not commute with the reordering).
fn in_stored_order(layer: &mut crate::model::Layer) -> Option<std::result::Result<(), String>> {
    let t = &layer.target;
    let listed = t.rows.clone()?;
    let n = t.shape.as_ref()?.first().copied()?;
    if listed.len() < 2 || listed.iter().map(|r| r.len).sum::<u64>() != n {
        return None;
    }
    let mut sorted = listed.clone();
    sorted.sort_by_key(|r| r.start);
    let mut at = 0;
    for r in &sorted {
        if r.start != at {
            return None;
        }
        at = r.end()?;
    }
    let name = t.name.clone();
    let fail = |why: &str| Some(Err(format!("`{name}`: {why}")));
    if layer.side != crate::model::Side::Output {
        return None;
    }
    // Each stored range's offset in the layer's (view) row order.
    let mut offset = 0u64;
    let mut view: Vec<(u64, u64, u64)> = Vec::new();
    for r in &listed {
        view.push((r.start, offset, r.len));
        offset += r.len;
    }
    view.sort_by_key(|v| v.0);
    for st in &mut layer.stages {
        if st.spec.wiring != crate::model::Wiring::Identity {
            return fail(
                "its rows are stored in another order than it rotates them, and a butterfly \
                 stage does not carry through the reordering (ComfyUI's own name map for it \
                 swaps the halves of the difference instead); bake the adapter (oftool merge)",
            );
        }
        if st.spec.shared {
            continue;
        }
        let b = st.spec.block_size.max(1);
        if view.iter().any(|&(_, o, l)| o % b != 0 || l % b != 0) {
            return fail("its blocks straddle the reordered row ranges");
        }
        let mut q = Vec::with_capacity(st.q.len());
        for &(_, o, l) in &view {
            for k in (o / b)..((o + l) / b) {
                q.extend_from_slice(st.q_row(k as usize));
            }
        }
        if q.len() != st.q.len() {
            return fail("its blocks do not cover its rows");
        }
        st.q = q;
    }
    if let Some((_, scale)) = layer.row_scale.as_mut() {
        let mut v = Vec::with_capacity(scale.len());
        for &(_, o, l) in &view {
            match scale.get(o as usize..(o + l) as usize) {
                Some(s) => v.extend_from_slice(s),
                None => return fail("its row scale does not cover its rows"),
            }
        }
        *scale = v;
    }
    layer.target.rows = None;
    layer.base_binding = None;
    Some(Ok(()))
}

/// The error for `--to` a layout oftool only reads.
pub fn not_writable(layout: &Layout, why: &str) -> Error {
    let writable: Vec<&str> = LAYOUTS
        .iter()
        .filter(|l| !matches!(l.writes, Writes::No(_)))
        .map(|l| l.id)
        .collect();
    Error::usage(format!("`{}` is not written: {why}", layout.id))
        .hint(format!("--to takes {}", writable.join(", ")))
}

/// The one-line `--help` text of a layout: its description and its aliases.
pub fn help_line(layout: &Layout) -> String {
    match layout.aliases {
        [] => layout.about.to_string(),
        aliases => format!("{} (also: {})", layout.about, aliases.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_aliases_name_one_layout_each() {
        let mut seen = std::collections::HashSet::new();
        for l in LAYOUTS {
            for n in std::iter::once(&l.id).chain(l.aliases) {
                assert!(seen.insert(*n), "`{n}` names two layouts");
                assert!(std::ptr::eq(find(n).unwrap(), *l));
            }
            if let Some(r) = &l.reads {
                assert!(!r.variants.is_empty(), "{}", l.id);
            }
        }
        assert_eq!(find("oft-v2").map(|l| l.id), Some("onetrainer"));
        assert_eq!(find("diffusers").map(|l| l.id), Some("peft"));
    }

    #[test]
    fn not_found_names_what_every_layout_looks_for() {
        let msg = not_found(Path::new("x")).to_string();
        for r in LAYOUTS.iter().filter_map(|l| l.reads.as_ref()) {
            for k in r.keys {
                assert!(msg.contains(k.trim_start_matches('.')), "{k}: {msg}");
            }
            for m in r.markers {
                assert!(msg.contains(m), "{m}: {msg}");
            }
        }
    }

    /// Detect a one-tensor-per-name file of zeros (`name`, shape) with `metadata`.
    fn detect_file(tensors: &[(&str, Vec<usize>)], metadata: &[(&str, &str)]) -> Result<String> {
        let dir = tempfile::tempdir().map_err(|e| Error::io(Path::new("."), e))?;
        let path = dir.path().join("a.safetensors");
        let owned: Vec<crate::tensors::OwnedTensor> = tensors
            .iter()
            .map(|(n, shape)| {
                let len: usize = shape.iter().product();
                crate::tensors::OwnedTensor {
                    name: n.to_string(),
                    dtype: safetensors::Dtype::F32,
                    shape: shape.clone(),
                    bytes: vec![0; 4 * len],
                }
            })
            .collect();
        let md = metadata
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut f = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
        crate::tensors::write_owned(&mut f, &owned, md)?;
        detect(&path).map(|d| d.name())
    }

    #[test]
    fn markers_decide_between_producers_and_names_between_layouts() {
        let v2 = || vec![("lora_unet_a.oft_R.weight", vec![2, 6])];
        let ot = [("ot_config", "{}")];
        let kohya = [("ss_network_module", "networks.oft_v2")];
        assert_eq!(detect_file(&v2(), &[]).unwrap(), "kohya-oft-v2");
        assert_eq!(detect_file(&v2(), &ot).unwrap(), "onetrainer-oft2");
        assert_eq!(detect_file(&v2(), &kohya).unwrap(), "kohya-oft-v2");
        let both = [ot[0], kohya[0]];
        assert!(
            detect_file(&v2(), &both)
                .unwrap_err()
                .to_string()
                .contains("mixed layouts in one file (kohya-oft-v2, onetrainer-oft2)")
        );
        let peft = vec![("base_model.model.a.oft_R.weight", vec![2, 6])];
        assert_eq!(detect_file(&peft, &[]).unwrap(), "peft-oft");
        // A marker outranks names: PEFT names under OneTrainer's metadata are OneTrainer's.
        assert_eq!(detect_file(&peft, &ot).unwrap(), "onetrainer-oft2");

        let legacy = ("oft_unet_a.oft_blocks", vec![2, 2, 2]);
        let lyco = ("lora_unet_b.oft_blocks", vec![2, 2, 2]);
        assert_eq!(
            detect_file(std::slice::from_ref(&legacy), &[]).unwrap(),
            "kohya-oft"
        );
        assert_eq!(
            detect_file(std::slice::from_ref(&lyco), &[]).unwrap(),
            "lycoris-diag-oft"
        );
        assert!(
            detect_file(&[legacy, lyco], &[])
                .unwrap_err()
                .to_string()
                .contains("mixed layouts in one file (lycoris-diag-oft, kohya-oft)")
        );
        let boft = |n: &'static str| vec![(n, vec![1, 2, 4, 4])];
        assert_eq!(
            detect_file(&boft("lora_unet_a.boft_R"), &[]).unwrap(),
            "kohya-boft"
        );
        assert_eq!(
            detect_file(&boft("base_model.model.a.boft_R"), &[]).unwrap(),
            "peft-boft"
        );
        let none = detect_file(&[("a.lora_down.weight", vec![2, 2])], &[]).unwrap_err();
        assert_eq!(none.category(), Category::UnknownLayout);
    }
}
