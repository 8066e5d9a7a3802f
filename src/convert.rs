//! `oftool convert`: import any supported layout and write it as `.oft` or, through the
//! layout registry ([`crate::layouts`]), in another tool's layout.

use crate::base::{Base, Lookup, Storage};
use crate::error::{Category, Error, Result};
use crate::layouts::{self, Layout, report};
use crate::oft_file;
use crate::validate::check_adapter;
use serde::Serialize;
use std::path::Path;
use std::time::UNIX_EPOCH;

/// What `convert` to `.oft` wrote (its `--json` report).
#[derive(Debug, Serialize)]
pub struct ConvertSummary {
    /// The input, as given.
    pub input: String,
    /// The input's layout id and variant (as `inspect` reports them).
    pub layout: String,
    /// The input layout's variant, when it has several.
    pub variant: Option<String>,
    /// The `.oft` file written.
    pub output: String,
    /// Layers written.
    pub layers: usize,
    /// Parameters written (Q entries and row-scale values).
    pub parameters: u64,
}

/// Refuse an output that is one of the inputs (same path or same inode).
pub fn refuse_overwriting_input(output: &Path, inputs: &[&Path]) -> Result<()> {
    for input in inputs {
        let same = match (std::fs::canonicalize(output), std::fs::canonicalize(input)) {
            (Ok(a), Ok(b)) => a == b || same_inode(&a, &b),
            _ => false,
        };
        let inside = input.is_dir() && output.parent().is_some_and(|p| {
            matches!((std::fs::canonicalize(p), std::fs::canonicalize(input)), (Ok(a), Ok(b)) if a == b)
        }) && output.file_name().is_some_and(|n| n == "adapter_model.safetensors");
        if same || inside {
            return Err(Error::usage(format!(
                "the output {} would overwrite the input {}",
                output.display(),
                input.display()
            )));
        }
    }
    Ok(())
}

#[cfg(unix)]
fn same_inode(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_inode(_: &Path, _: &Path) -> bool {
    false
}

/// RFC 3339 UTC time of `secs` since the epoch (civil-from-days, proleptic Gregorian).
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Creation time recorded in outputs: `SOURCE_DATE_EPOCH` when set (reproducible builds), else
/// the newest modification time of the inputs — never the clock, so that the same inputs give
/// byte-identical outputs.
pub fn creation_time(inputs: &[&Path]) -> String {
    let newest = inputs
        .iter()
        .filter_map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .filter_map(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
        .max();
    let secs = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse().ok())
        .or(newest)
        .unwrap_or(0);
    rfc3339(secs)
}

/// Record, per layer, the target's covered shape and a base-binding hash of its tensor in
/// `base` (dtype, full shape, blake3 of its bytes).
pub fn bind(adapter: &mut crate::model::Adapter, base: &Base) -> Result<()> {
    let mut problems = Vec::new();
    let mut spans = false;
    for layer in &mut adapter.layers {
        let loc = match base.lookup(layer) {
            Lookup::Found(loc) => loc,
            Lookup::Split(locs) => {
                spans = true;
                problems.push(format!(
                    "`{}` spans several tensors ({}): a binding names one",
                    layer.target.name,
                    locs.iter()
                        .map(|l| l.key.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
                continue;
            }
            Lookup::Unfit(m) => {
                problems.push(m);
                continue;
            }
            Lookup::Missing => {
                problems.push(format!("`{}` has no tensor in the base", layer.target.name));
                continue;
            }
            Lookup::Ambiguous(keys) => {
                problems.push(format!(
                    "`{}` matches several tensors: {}",
                    layer.target.name,
                    keys.join(", ")
                ));
                continue;
            }
        };
        let covered: Vec<u64> = loc.covered_shape().iter().map(|&d| d as u64).collect();
        let axis = crate::validate::axis_len(layer.side, &covered);
        if layer.target.rotated_dim.is_some_and(|d| d != axis) {
            problems.push(format!(
                "`{}` rotates {} features but `{}` has {axis} on that side (shape {covered:?})",
                layer.target.name,
                layer.target.rotated_dim.unwrap_or(0),
                loc.key
            ));
            continue;
        }
        // A layer on some rows of a fused tensor (OpenCLIP's `in_proj_weight`) is recorded in
        // the base's terms: the whole tensor's name with the rows it covers, so that the
        // target shape and the binding both describe the tensor as stored (spec §3.4, §3.8).
        let whole_tensor = loc
            .shape
            .first()
            .is_some_and(|&n| loc.rows.is_whole(n) && layer.target.rows.is_none());
        if !whole_tensor {
            let Some(name) = base.whole_name(&loc, layer.target.component.as_deref()) else {
                problems.push(format!(
                    "`{}` covers rows {} of `{}`, which has no name of its own in the base",
                    layer.target.name, loc.rows, loc.key
                ));
                continue;
            };
            if name != layer.target.name {
                layer.target.convention = base_convention(&loc.key).into();
                layer.target.name = name;
            }
            layer.target.rows = Some(loc.rows.to_row_ranges());
        }
        layer.target.rotated_dim = Some(axis);
        layer.target.shape = Some(loc.shape.iter().map(|&d| d as u64).collect());
        // A stage that may be cut (PEFT 0.7–0.13) and turns out exactly as wide as the weight
        // is an ordinary stage.
        layer.stages.iter_mut().for_each(|st| st.settle_cut(axis));
        layer.base_binding = Some(base.binding(&loc)?);
    }
    if problems.is_empty() {
        return Ok(());
    }
    let e = Error::new(
        Category::TargetShape,
        format!(
            "cannot bind to {}: {}",
            base.path().display(),
            problems.join("; ")
        ),
    );
    Err(if spans {
        e.hint(
            "convert without --base (the file is then unbound); merge and validate --base still \
             place it on these tensors",
        )
    } else {
        e
    })
}

/// The naming convention of a base key used as a target name: ldm/sgm for the original
/// checkpoints' prefixes, else unknown (resolved by name alone).
fn base_convention(key: &str) -> &'static str {
    const LDM: [&str; 3] = ["conditioner.", "cond_stage_model.", "model."];
    if LDM.iter().any(|p| key.starts_with(p)) {
        "ldm"
    } else {
        "unknown"
    }
}

/// Convert any readable adapter at `input` to `.oft` at `output`, bound to `base` when given.
pub fn run(input: &Path, output: &Path, base: Option<&Path>) -> Result<ConvertSummary> {
    let mut inputs = vec![input];
    inputs.extend(base);
    refuse_overwriting_input(output, &inputs)?;
    let (found, mut adapter) = layouts::read(input)?;
    if let Some(b) = base {
        let base = Base::open(b)?;
        // A binding names one tensor: on a diffusers base, an input-side rotation of a fused
        // module (OneTrainer's COMFY names) becomes its split modules' layers first, as
        // `merge` applies it.
        use crate::resolve::dit::BaseLayout;
        if base
            .dit()
            .is_some_and(|d| d.layout == BaseLayout::Diffusers)
        {
            adapter = layouts::fused::retarget(&adapter, BaseLayout::Diffusers).adapter;
        }
        bind(&mut adapter, &base)?;
    }
    let problems = check_adapter(&adapter);
    if let Some(p) = problems.first() {
        let e = Error::new(
            p.category,
            format!(
                "{} problem(s), first: {}: {}",
                problems.len(),
                p.layer.as_deref().unwrap_or("file"),
                p.message
            ),
        )
        .at(input)
        .hint("`oftool validate` lists every problem");
        return Err(match p.rule {
            Some(r) => e.rule(r),
            None => e,
        });
    }
    if adapter.provenance.created.is_none() {
        adapter.provenance.created = Some(creation_time(&inputs));
    }
    oft_file::write(&adapter, output)?;
    Ok(ConvertSummary {
        input: input.display().to_string(),
        layout: found.id().into(),
        variant: found.variant().map(str::to_string),
        output: output.display().to_string(),
        layers: adapter.layers.len(),
        parameters: adapter.layers.iter().map(|l| l.parameter_count()).sum(),
    })
}

/// What `convert --to <layout>` did (or would have done, when it refused).
#[derive(Debug, Serialize)]
pub struct ExportReport {
    /// The input, as given.
    pub input: String,
    /// The input's layout id and variant (as `inspect` reports them).
    pub layout: String,
    /// The input layout's variant, when it has several.
    pub variant: Option<String>,
    /// The layout written (its id, whichever alias `--to` named).
    pub to: String,
    /// The file or folder written (or that would have been).
    pub output: String,
    /// Files written, relative to `output` for directories.
    pub files: Vec<String>,
    /// Layers written exactly.
    pub exact: usize,
    /// Layers written with a change (`--allow-lossy`).
    pub lossy: usize,
    /// Layers the layout cannot express.
    pub impossible: usize,
    /// Largest change of any rotation entry over all layers.
    pub max_rotation_change: f64,
    /// With `--base`: largest change of any merged weight entry.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_weight_change: Option<f64>,
    /// What the user should know about the written files.
    pub warnings: Vec<String>,
    /// Why nothing was written, when the conversion was refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    /// Per layer: how it maps, or why it cannot.
    pub layers: Vec<report::LayerReport>,
}

/// Which of a diffusion transformer's base layouts `--to` names its modules in (`--names`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Names {
    /// The diffusers transformer's (`transformer_blocks.0.attn.to_q`): fused layers split.
    Diffusers,
    /// The original single-file layout's (`double_blocks.0.img_attn.qkv`): split layers fused.
    Original,
}

/// Options of `convert --to <layout>`.
pub struct ExportOptions<'a> {
    /// `--names`: a diffusion transformer's module names (default: the base's layout for
    /// `onetrainer`, the adapter's own without `--base`).
    pub names: Option<Names>,
    /// A base checkpoint, to recover names and measure the weight change.
    pub base: Option<&'a Path>,
    /// Write layers that would change.
    pub allow_lossy: bool,
    /// Pack a directory layout into one zip file.
    pub zip: bool,
}

/// Convert `input` to a foreign layout. A refused conversion returns its report with
/// `refused` set and writes nothing.
pub fn run_to(
    input: &Path,
    output: &Path,
    to: &Layout,
    opts: &ExportOptions<'_>,
) -> Result<ExportReport> {
    let mut inputs = vec![input];
    inputs.extend(opts.base);
    refuse_overwriting_input(output, &inputs)?;
    let (found, source) = layouts::read(input)?;
    let opened = opts.base.map(Base::open).transpose()?;
    // A diffusion transformer's layers in the names the target layout's tool loads: PEFT's
    // are the diffusers transformer's, and a diffusers base's names are every layout's (a
    // fused input-side layer split into its q, k, v modules): reported per source layer.
    use crate::resolve::dit::BaseLayout;
    let base_layout = opened.as_ref().and_then(Base::dit).map(|d| d.layout);
    let names = match (to.id, opts.names) {
        ("peft", _) => Some(BaseLayout::Diffusers),
        (_, Some(Names::Diffusers)) => Some(BaseLayout::Diffusers),
        (_, Some(Names::Original)) => Some(BaseLayout::Original),
        ("onetrainer", None) => base_layout,
        (_, None) => base_layout.filter(|&l| l == BaseLayout::Diffusers),
    };
    // Either way the layers are bound in diffusers names first (a fused layer binds to no
    // split base), then fused for the original names.
    let retargeted = match names {
        Some(_) => layouts::fused::retarget(&source, BaseLayout::Diffusers),
        None => layouts::fused::Retargeted {
            origin: (0..source.layers.len()).map(|i| vec![i]).collect(),
            adapter: source.clone(),
            refused: Vec::new(),
        },
    };
    let mut origin = retargeted.origin;
    let mut refused_layers = retargeted.refused;
    let mut adapter = retargeted.adapter;
    let mut table = None;
    // The writers' name lookup and weight-change figures read one model: a file, or the one
    // group of a sharded base (figures then need a single file). A pipeline folder binds, but
    // its layers are named without it.
    let mut base_file = None;
    if let Some(base) = opened {
        bind(&mut adapter, &base)?;
        if let Some(t) = base.single_table() {
            let names = t.pipeline_names();
            table = Some((t.clone(), names));
        }
        if let Storage::File(f) = base.storage() {
            base_file = Some(f.clone());
        }
    }
    // A "shared" stage whose axis holds a single block is just one block.
    for layer in &mut adapter.layers {
        let d = layer.target.rotated_dim;
        for st in &mut layer.stages {
            if st.spec.shared && d == Some(st.spec.block_size) {
                st.spec.shared = false;
                st.spec.blocks = Some(1);
            }
        }
    }
    let metadata: std::collections::HashMap<String, String> = adapter
        .provenance
        .user_metadata
        .clone()
        .into_iter()
        .collect();
    let ctx = report::Context {
        dit_names: names.filter(|_| to.id == "onetrainer"),
        base: base_file.as_deref(),
        table,
        sd1: layouts::common::sd1_from_metadata(&metadata),
    };
    if matches!(to.writes, layouts::Writes::Writer(_)) {
        let (split, apart) = layouts::split_rows(&adapter, to, &ctx)?;
        if let Some(split) = split {
            adapter = split;
        }
        for (j, why) in apart.iter().rev() {
            for &i in origin.get(*j).into_iter().flatten() {
                refused_layers.push((i, why.clone()));
            }
            if *j < origin.len() {
                origin.remove(*j);
            }
        }
    }
    if names == Some(BaseLayout::Original) {
        let fused = layouts::fused::fuse(&adapter);
        let sources = |js: &[usize]| -> Vec<usize> {
            let mut v: Vec<usize> = js
                .iter()
                .filter_map(|&j| origin.get(j))
                .flatten()
                .copied()
                .collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        for (j, why) in &fused.refused {
            for i in sources(&[*j]) {
                if !refused_layers.iter().any(|(k, _)| *k == i) {
                    refused_layers.push((i, why.clone()));
                }
            }
        }
        origin = fused.origin.iter().map(|js| sources(js)).collect();
        adapter = fused.adapter;
    }
    // No other layout cuts a block-diagonal matrix: a truncated layer is impossible there.
    let truncated: Vec<usize> = (adapter.layers.iter().enumerate())
        .filter(|(_, l)| l.stages.iter().any(|s| s.spec.truncated))
        .map(|(i, _)| i)
        .collect();
    let mut written = if truncated.is_empty() {
        layouts::export(&adapter, to, &ctx)?
    } else {
        let mut plain = adapter.clone();
        for &i in &truncated {
            plain.layers[i]
                .stages
                .iter_mut()
                .for_each(|s| s.spec.truncated = false);
        }
        layouts::export(&plain, to, &ctx)?
    };
    for &i in &truncated {
        let l = &adapter.layers[i];
        let reason = match l.target.rotated_dim {
            Some(d) => format!(
                "its block-diagonal matrix ({} wide) is cut to the weight's {d} × {d} inside a \
                 block, as PEFT 0.7–0.13 does, which leaves a matrix that is not orthogonal; {} \
                 stores whole blocks only. Bake the adapter (oftool merge) or keep it as .oft",
                l.stages
                    .iter()
                    .filter_map(|s| s.dim())
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                to.id
            ),
            None => format!(
                "PEFT 0.7–0.13 cuts its block-diagonal matrix to the weight's size, which the file \
                 does not record; {} stores whole blocks only. Pass --base: where the blocks fit \
                 the weight exactly, the layer converts",
                to.id
            ),
        };
        if let Some(m) = written.mapped.get_mut(i) {
            *m = (None, None, report::Status::Impossible { reason });
        }
    }
    let layers = fold_reports(
        &source,
        &origin,
        &refused_layers,
        report::reports(&adapter, &written, &ctx)?,
    );
    let count = |f: fn(&report::Status) -> bool| layers.iter().filter(|l| f(&l.status)).count();
    let impossible: Vec<(String, String)> = layers
        .iter()
        .filter_map(|l| match &l.status {
            report::Status::Impossible { reason } => Some((l.layer.clone(), reason.clone())),
            _ => None,
        })
        .collect();
    let lossy: Vec<(String, String)> = layers
        .iter()
        .filter_map(|l| match &l.status {
            report::Status::Lossy { reason } => Some((l.layer.clone(), reason.clone())),
            _ => None,
        })
        .collect();
    let refused = if !impossible.is_empty() || (!lossy.is_empty() && !opts.allow_lossy) {
        Some(report::refuse(to.id, &impossible, &lossy).to_string())
    } else {
        None
    };
    let zip = opts.zip && written.directory;
    if opts.zip && !written.directory {
        return Err(Error::usage(format!(
            "--zip packs a directory layout; {} is a single file",
            to.id
        )));
    }
    let files: Vec<String> = written
        .files
        .iter()
        .map(|f| report::rel_path(f).display().to_string())
        .collect();
    if refused.is_none() {
        write_output(output, &written, zip)?;
    }
    Ok(ExportReport {
        input: input.display().to_string(),
        layout: found.id().into(),
        variant: found.variant().map(str::to_string),
        to: to.id.into(),
        output: output.display().to_string(),
        files: if written.directory { files } else { Vec::new() },
        exact: count(|s| matches!(s, report::Status::Exact)),
        lossy: count(|s| matches!(s, report::Status::Lossy { .. })),
        impossible: impossible.len(),
        max_rotation_change: layers
            .iter()
            .filter_map(|l| l.max_rotation_change)
            .fold(0.0, f64::max),
        max_weight_change: layers
            .iter()
            .filter_map(|l| l.max_weight_change)
            .reduce(f64::max),
        warnings: written.warnings.clone(),
        refused,
        layers,
    })
}

/// One report row per source layer: the rows of the layers it was split into (`origin[i]` is
/// the source layer of row `i`) folded into one, its worst verdict, its largest changes and
/// every name it was written under.
fn fold_reports(
    source: &crate::model::Adapter,
    origin: &[Vec<usize>],
    refused: &[(usize, String)],
    rows: Vec<report::LayerReport>,
) -> Vec<report::LayerReport> {
    let identity = origin.len() == source.layers.len()
        && origin.iter().enumerate().all(|(i, o)| o.as_slice() == [i]);
    if identity && refused.is_empty() {
        // Writers may have renamed a layer (a row slice to its split module): the row still
        // names the source layer, the written name is in `written_as`.
        return rows
            .into_iter()
            .zip(&source.layers)
            .map(|(row, layer)| report::LayerReport {
                layer: layer.target.name.clone(),
                ..row
            })
            .collect();
    }
    let mut out: Vec<report::LayerReport> = Vec::new();
    for (i, layer) in source.layers.iter().enumerate() {
        if let Some((_, reason)) = refused.iter().find(|(j, _)| *j == i) {
            out.push(report::LayerReport {
                layer: layer.target.name.clone(),
                written_as: None,
                status: report::Status::Impossible {
                    reason: reason.clone(),
                },
                max_rotation_change: None,
                max_scale_change: None,
                max_weight_change: None,
            });
            continue;
        }
        let mine: Vec<&report::LayerReport> = origin
            .iter()
            .zip(&rows)
            .filter(|(o, _)| o.contains(&i))
            .map(|(_, r)| r)
            .collect();
        let worst = |f: fn(&report::Status) -> bool| {
            mine.iter()
                .filter(|r| f(&r.status))
                .map(|r| r.status.clone())
                .next()
        };
        let status = worst(|s| matches!(s, report::Status::Impossible { .. }))
            .or_else(|| worst(|s| matches!(s, report::Status::Lossy { .. })))
            .unwrap_or(report::Status::Exact);
        let names: Vec<&str> = mine
            .iter()
            .filter_map(|r| r.written_as.as_deref())
            .collect();
        let max = |f: fn(&report::LayerReport) -> Option<f64>| {
            mine.iter().filter_map(|r| f(r)).reduce(f64::max)
        };
        out.push(report::LayerReport {
            layer: layer.target.name.clone(),
            written_as: (!names.is_empty()).then(|| names.join(", ")),
            status,
            max_rotation_change: max(|r| r.max_rotation_change),
            max_scale_change: max(|r| r.max_scale_change),
            max_weight_change: max(|r| r.max_weight_change),
        });
    }
    out
}

/// Write the files: one file atomically; a directory built beside the target and renamed into
/// place (the target must not exist yet, or be an empty directory); or one zip archive.
pub(crate) fn write_output(output: &Path, written: &report::Written, zip: bool) -> Result<()> {
    use std::io::Write;
    if !written.directory {
        let bytes = match written.files.first() {
            Some(f) => report::file_bytes(f)?,
            None => Vec::new(),
        };
        return crate::tensors::atomic_write(output, |f| {
            f.write_all(&bytes).map_err(|e| Error::io(output, e))
        });
    }
    if zip {
        let mut entries = Vec::new();
        for f in &written.files {
            entries.push((report::rel_path(f).to_path_buf(), report::file_bytes(f)?));
        }
        return crate::tensors::atomic_write(output, |f| {
            let mut z = zip::ZipWriter::new(f);
            let options = zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Stored)
                .last_modified_time(zip::DateTime::default());
            for (rel, bytes) in &entries {
                let name = rel.to_string_lossy().replace('\\', "/");
                z.start_file(name, options).map_err(|e| {
                    Error::new(Category::Io, format!("cannot write the zip: {e}")).at(output)
                })?;
                z.write_all(bytes).map_err(|e| Error::io(output, e))?;
            }
            z.finish().map_err(|e| {
                Error::new(Category::Io, format!("cannot write the zip: {e}")).at(output)
            })?;
            Ok(())
        });
    }
    if output.exists() {
        let empty = output.is_dir()
            && std::fs::read_dir(output)
                .map_err(|e| Error::io(output, e))?
                .next()
                .is_none();
        if !empty {
            return Err(Error::usage(format!(
                "{} already exists; choose a new directory (nothing is overwritten)",
                output.display()
            )));
        }
    }
    let parent = output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    crate::tensors::clean_stale(parent);
    let tmp = tempfile::Builder::new()
        .prefix(&crate::tensors::staging_prefix())
        .tempdir_in(parent)
        .map_err(|e| Error::io(parent, e))?;
    for f in &written.files {
        let path = tmp.path().join(report::rel_path(f));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let bytes = report::file_bytes(f)?;
        std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))?;
    }
    if output.is_dir() {
        std::fs::remove_dir(output).map_err(|e| Error::io(output, e))?;
    }
    let kept = tmp.keep();
    std::fs::rename(&kept, output).map_err(|e| {
        let _ = std::fs::remove_dir_all(&kept);
        Error::io(output, e)
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_known_instants() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(1_795_651_200), "2026-11-26T00:00:00Z");
        assert_eq!(super::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
