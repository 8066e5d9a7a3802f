//! The bake's plan: every adapter layer located in the base and checked against its tensor,
//! binding hashes compared, and the edits grouped per base file and tensor. Every refusal
//! happens here, before anything is written.

use super::backend::Edit;
use super::{BakeInput, MergeOptions, Params};
use crate::apply::Blend;
use crate::base::{Base, Located, Lookup, check_shape, first_shared_rows, part_layer};
use crate::error::{Category, Error, Result};
use crate::model::{FEATURE_STACKED_LAYERS, Layer};
use crate::oft_file::DeferredParams;
use std::borrow::Cow;
use std::collections::BTreeMap;

/// One base file and the edits of its tensors, each tensor's in the order they apply.
pub(crate) struct FileJob<'a> {
    /// Index into [`Base::files`].
    pub file: usize,
    pub edits: BTreeMap<String, Vec<Edit<'a>>>,
}

/// What the bake will do.
pub(crate) struct Plan<'a> {
    /// One job per base file, in the base's file order (files without edits are copied).
    pub jobs: Vec<FileJob<'a>>,
    pub layers_baked: usize,
    /// `name (adapter)` of each layer skipped for want of a target (`--skip-missing`).
    pub skipped: Vec<String>,
}

impl Plan<'_> {
    /// Bytes of adapter parameters the edits hold in memory (counted once per edit, so a
    /// layer split across tensors counts once per part: an upper bound).
    pub fn resident_bytes(&self) -> u64 {
        self.jobs
            .iter()
            .flat_map(|j| j.edits.values().flatten())
            .map(Edit::resident_bytes)
            .sum()
    }
}

/// A layer (or the part of it that lands on one tensor) and where it lands.
struct Placement<'a> {
    loc: Located,
    layer: Cow<'a, Layer>,
    /// Where its parameters are, when they are still in a `.oft` file: that file's deferred
    /// parameters, the layer's index there and the layer as read (without values).
    deferred: Option<(&'a DeferredParams, usize, &'a Layer)>,
    blend: Blend,
    /// The first (or only) placement of its layer.
    first: bool,
}

/// Plan the bake of `inputs` (in order) into `base`; refuse with every problem at once.
pub(crate) fn plan<'a>(
    base: &Base,
    inputs: &'a [BakeInput],
    opts: &MergeOptions,
) -> Result<Plan<'a>> {
    let (placements, skipped) = place(base, inputs, opts)?;
    if !opts.force {
        check_bindings(base, &placements)?;
    }
    let mut jobs: Vec<FileJob<'a>> = (0..base.files().len())
        .map(|file| FileJob {
            file,
            edits: BTreeMap::new(),
        })
        .collect();
    let layers_baked = placements.iter().filter(|p| p.first).count();
    for p in placements {
        if let Some(job) = jobs.get_mut(p.loc.file) {
            let edit = match p.deferred {
                None => Edit::new(p.layer, p.loc.rows, p.blend),
                Some((params, index, whole)) => Edit::deferred(
                    p.layer,
                    p.loc.rows,
                    p.blend,
                    params,
                    index,
                    whole,
                    p.loc.part.clone(),
                ),
            };
            job.edits.entry(p.loc.key).or_default().push(edit);
        }
    }
    Ok(Plan {
        jobs,
        layers_baked,
        skipped,
    })
}

/// Locate and check every layer of every input.
fn place<'a>(
    base: &Base,
    inputs: &'a [BakeInput],
    opts: &MergeOptions,
) -> Result<(Vec<Placement<'a>>, Vec<String>)> {
    let mut placements = Vec::new();
    let mut missing = Vec::new();
    let mut problems: Vec<(Category, String)> = Vec::new();
    // Targeted tensors of a dtype that cannot be rotated, by dtype.
    let mut unrotatable: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for input in inputs {
        let label = &input.label;
        let first = placements.len();
        for (index, layer) in input.adapter.layers.iter().enumerate() {
            let name = &layer.target.name;
            let deferred = match &input.params {
                Params::Loaded => None,
                Params::Deferred(params) => Some((params, index, layer)),
            };
            let locs = match base.lookup(layer) {
                Lookup::Found(loc) => vec![loc],
                Lookup::Split(locs) => locs,
                Lookup::Unfit(m) => {
                    problems.push((Category::TargetShape, format!("{m} ({label})")));
                    continue;
                }
                Lookup::Missing => {
                    missing.push(format!("{name} ({label})"));
                    continue;
                }
                Lookup::Ambiguous(keys) => {
                    problems.push((
                        Category::TargetAmbiguous,
                        format!(
                            "`{name}` ({label}) matches several tensors: {}",
                            keys.join(", ")
                        ),
                    ));
                    continue;
                }
            };
            for (n, loc) in locs.into_iter().enumerate() {
                if !rotatable(loc.dtype) {
                    let keys = unrotatable.entry(format!("{:?}", loc.dtype)).or_default();
                    if !keys.contains(&loc.key) {
                        keys.push(loc.key.clone());
                    }
                    continue;
                }
                let layer = part_layer(layer, &loc);
                let unfit = check_shape(&layer, &loc);
                if !unfit.is_empty() {
                    problems.extend(unfit.iter().map(|e| (e.category(), e.to_string())));
                    continue;
                }
                let blend = match input.runtime_strength {
                    Some(s) => input.mode.layer_blend(&layer, s),
                    None => Blend::default(),
                };
                placements.push(Placement {
                    loc,
                    layer,
                    deferred,
                    blend,
                    first: n == 0,
                });
            }
        }
        // Layers of one file on common rows of a tensor apply in file order, which the file
        // must say by requiring `stacked-layers` (spec §8.4).
        let stacked = input
            .adapter
            .features
            .iter()
            .any(|f| f == FEATURE_STACKED_LAYERS);
        let mine: Vec<&Located> = placements[first..].iter().map(|p| &p.loc).collect();
        if !stacked && let Some((a, b)) = first_shared_rows(&mine) {
            let (la, lb) = (&placements[first + a], &placements[first + b]);
            problems.push((
                Category::TargetAmbiguous,
                format!(
                    "layers `{}` and `{}` of {label} both act on `{}` rows {}, but the file does not require `{FEATURE_STACKED_LAYERS}`, so their order is not defined (compose the inputs again with --base)",
                    la.layer.target.name, lb.layer.target.name, lb.loc.key, lb.loc.rows
                ),
            ));
        }
    }
    // A quantized checkpoint (FLUX fp8 downloads: F8_E4M3) fails on every layer alike: one
    // refusal per dtype, not one line per layer.
    if let Some((dtype, keys)) = unrotatable.iter().next() {
        let shown: Vec<String> = keys.iter().take(3).map(|k| format!("`{k}`")).collect();
        let more = match keys.len().saturating_sub(shown.len()) {
            0 => String::new(),
            n => format!(" and {n} more"),
        };
        return Err(Error::new(
            Category::Unsupported,
            format!(
                "cannot bake: the base stores {} targeted weight(s) as {dtype} ({}{more}); only \
                 F64, F32, F16 and BF16 weights can be rotated",
                keys.len(),
                shown.join(", ")
            ),
        )
        .hint(
            "oftool does not re-quantize: bake into the model's BF16, F16 or F32 release and \
             quantize the result with the tool that made the quantized file",
        ));
    }
    if !missing.is_empty() && !opts.skip_missing {
        problems.push((
            Category::TargetMissing,
            format!(
                "{} adapter layer(s) have no target in the base: {}",
                missing.len(),
                missing.join(", ")
            ),
        ));
    }
    if let Some((category, _)) = problems.first() {
        let text: Vec<&str> = problems.iter().map(|(_, m)| m.as_str()).collect();
        let e = Error::new(*category, format!("cannot bake: {}", text.join("; ")));
        return Err(if let Some(why) = other_family(base, inputs) {
            e.hint(why)
        } else if missing.is_empty() || opts.skip_missing {
            e
        } else {
            e.hint("--skip-missing bakes the layers that resolve and lists the others")
        });
    }
    Ok((placements, missing))
}

/// Where an adapter's names belong to diffusion-transformer families the base is not (a FLUX.1
/// adapter on an SD3.5 base: both name `transformer_blocks.N.attn.to_q`, so layers resolve and
/// then fail on shapes), what to say instead of `--skip-missing`, which cannot help.
fn other_family(base: &Base, inputs: &[BakeInput]) -> Option<String> {
    let have = base.dit()?.family;
    inputs.iter().find_map(|input| {
        let names = input.adapter.layers.iter().map(|l| l.target.name.as_str());
        let fams = crate::resolve::dit::expected(names)?.families;
        if fams.is_empty() || fams.iter().any(|f| f.id == have.id) {
            return None;
        }
        let theirs: Vec<&str> = fams.iter().map(|f| f.name).collect();
        let theirs = theirs.join(" / ");
        Some(format!(
            "the module names of {} are {theirs}'s, the base is {}: bake it into a {theirs} base",
            input.label, have.name
        ))
    })
}

/// Check the base-binding hash of every bound layer.
fn check_bindings(base: &Base, placements: &[Placement<'_>]) -> Result<()> {
    let mut bad = Vec::new();
    for p in placements {
        if base.check_binding(&p.layer, &p.loc)?.is_some() {
            bad.push(p.layer.target.name.clone());
        }
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(Error::new(
            Category::Binding,
            format!(
                "the base is not the one these adapter layers were made for (binding hash mismatch): {}",
                bad.join(", ")
            ),
        )
        .hint("--force bakes anyway"))
    }
}

/// Whether a stored weight of this dtype can be rotated (read into floats and written back).
fn rotatable(dtype: safetensors::Dtype) -> bool {
    use safetensors::Dtype;
    matches!(dtype, Dtype::F64 | Dtype::F32 | Dtype::F16 | Dtype::BF16)
}
