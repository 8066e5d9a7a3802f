//! `oftool extract BASE FINETUNED -o OUT.oft --block-size B`: a full finetune as an OFT adapter.
//!
//! Both checkpoints are opened as [`Base`]s (any layout `merge` accepts; the finetune must hold
//! the same tensors, shapes and dtypes). For each targeted weight — by default every weight of
//! two or more axes that differs, `--targets` globs on tensor names otherwise — one tensor at a
//! time: both read in f64, the best block-diagonal rotation fitted per block
//! ([`crate::procrustes::extract`]: orthogonal Procrustes restricted to what the Cayley map
//! reaches, Q by the inverse Cayley map in f64), and the layer kept with its residual
//! `‖W₁ − W₀R‖_F / ‖W₁ − W₀‖_F`. The result is a `.oft` bound to BASE (target shapes and blake3
//! of each tensor), so it validates, bakes, converts and composes like any adapter.

use crate::bake::Progress;
use crate::base::{Base, Located};
use crate::convert::{creation_time, refuse_overwriting_input};
use crate::error::{Category, Error, Result};
use crate::model::{Adapter, Layer, ModuleKind, Provenance, Side, Target, tool_name};
use crate::procrustes::{self, ExtractOptions};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

/// Options of `extract`.
pub struct Options {
    /// Features per rotation block.
    pub block_size: usize,
    /// The side the rotation acts on.
    pub side: Side,
    /// Glob patterns on tensor names (empty: every weight of ≥ 2 axes that differs).
    pub targets: Vec<String>,
    /// Worker threads (default: all cores); the output is the same for any value.
    pub threads: Option<usize>,
}

/// One extracted layer.
#[derive(Debug, Clone, Serialize)]
pub struct ExtractedLayer {
    /// The base tensor.
    pub tensor: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// The pipeline component, when the base has several.
    pub component: Option<String>,
    /// The tensor's full shape.
    pub shape: Vec<usize>,
    /// Number of blocks.
    pub blocks: usize,
    /// `‖W₁ − W₀R‖_F / ‖W₁ − W₀‖_F`: the part of the finetune that is no rotation.
    pub residual: f64,
    /// `‖W₁ − W₀R‖_F`.
    pub residual_abs: f64,
    /// `‖W₁ − W₀‖_F`.
    pub change: f64,
    /// Blocks whose best orthogonal fit was a reflection (the Cayley map reaches none).
    pub reflections: usize,
    /// Rotation planes turned back short of a half-turn.
    pub capped_planes: usize,
    /// Largest rotation angle of any block (radians).
    pub max_angle_rad: f64,
}

/// A targeted tensor that was not extracted, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    /// The base tensor.
    pub tensor: String,
    /// Why it was not extracted.
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
/// Totals of an extraction.
pub struct ExtractTotals {
    /// Layers (per-layer figures).
    pub layers: usize,
    /// Targeted tensors equal in both checkpoints (nothing to extract).
    pub unchanged: usize,
    /// Targeted tensors not extracted (listed in `skipped`).
    pub skipped: usize,
    /// `√(Σ‖W₁ − W₀R‖² / Σ‖W₁ − W₀‖²)` over the extracted layers.
    pub residual: f64,
    /// The largest per-layer residual.
    pub max_residual: f64,
    /// Blocks whose best orthogonal fit was a reflection.
    pub reflections: usize,
    /// Rotation planes capped short of a half-turn.
    pub capped_planes: usize,
    /// Stored parameters.
    pub parameters: u64,
    /// Bytes written.
    pub bytes: u64,
    /// Wall time.
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
/// What `extract` did.
pub struct ExtractReport {
    /// The base checkpoint, as given.
    pub base: String,
    /// The finetuned checkpoint, as given.
    pub finetuned: String,
    /// The output path, as given.
    pub output: String,
    /// Features per rotation block.
    pub block_size: usize,
    /// The side the rotation acts on.
    pub side: Side,
    /// Totals over every layer.
    pub totals: ExtractTotals,
    /// Layers (per-layer figures).
    pub layers: Vec<ExtractedLayer>,
    /// Targeted tensors not extracted (listed in `skipped`).
    pub skipped: Vec<Skipped>,
}

/// A tensor's name as a layer target: the key without its `.weight`.
fn module_name(key: &str) -> &str {
    key.strip_suffix(".weight").unwrap_or(key)
}

fn compile(targets: &[String]) -> Result<Vec<glob::Pattern>> {
    targets
        .iter()
        .map(|t| {
            glob::Pattern::new(t).map_err(|e| {
                Error::usage(format!("--targets `{t}` is not a glob pattern: {e}"))
                    .hint("`*` matches any run of characters, `?` one, `[…]` a set")
            })
        })
        .collect()
}

/// The tensors of both checkpoints, paired by component and key; every difference in keys,
/// shapes or dtypes refused at once.
fn pair(base: &Base, tuned: &Base) -> Result<Vec<(Located, Located)>> {
    let key = |l: &Located, b: &Base| (b.component(l).map(str::to_string), l.key.clone());
    let theirs: BTreeMap<(Option<String>, String), Located> = tuned
        .tensors()
        .into_iter()
        .map(|l| (key(&l, tuned), l))
        .collect();
    let mut problems = Vec::new();
    let mut pairs = Vec::new();
    let ours: std::collections::BTreeSet<_> = base.tensors().iter().map(|l| key(l, base)).collect();
    for l in base.tensors() {
        let k = key(&l, base);
        match theirs.get(&k) {
            None => problems.push(format!("`{}` is missing from the finetune", k.1)),
            Some(t) if t.shape != l.shape || t.dtype != l.dtype => problems.push(format!(
                "`{}` is {:?} {:?} in the base but {:?} {:?} in the finetune",
                k.1, l.dtype, l.shape, t.dtype, t.shape
            )),
            Some(t) => pairs.push((l, t.clone())),
        }
    }
    for k in theirs.keys().filter(|k| !ours.contains(*k)) {
        problems.push(format!("`{}` is in the finetune but not in the base", k.1));
    }
    if problems.is_empty() {
        return Ok(pairs);
    }
    let shown: Vec<&str> = problems.iter().take(5).map(String::as_str).collect();
    let more = if problems.len() > 5 {
        format!(" (and {} more)", problems.len() - 5)
    } else {
        String::new()
    };
    Err(Error::new(
        Category::TargetShape,
        format!(
            "the finetune is not the base's architecture: {}{more}",
            shown.join("; ")
        ),
    )
    .at(tuned.path())
    .hint("extract takes the base and its finetune in the same layout (same tensor names, shapes and dtypes)"))
}

/// Extract the rotation that best explains `tuned` from `base` (see the module documentation).
pub fn run(
    base_path: &Path,
    tuned_path: &Path,
    output: &Path,
    opts: &Options,
    progress: &dyn Progress,
) -> Result<ExtractReport> {
    let started = Instant::now();
    refuse_overwriting_input(output, &[base_path, tuned_path])?;
    if opts.block_size < 2 {
        return Err(Error::usage(format!(
            "--block-size {} is too small: a rotation block has at least 2 features",
            opts.block_size
        )));
    }
    let patterns = compile(&opts.targets)?;
    let base = Base::open(base_path)?;
    let tuned = Base::open(tuned_path)?;
    let pairs = pair(&base, &tuned)?;
    let explicit = !patterns.is_empty();
    let chosen: Vec<&(Located, Located)> = pairs
        .iter()
        .filter(|(l, _)| {
            if explicit {
                patterns.iter().any(|p| p.matches(&l.key))
            } else {
                l.shape.len() >= 2
            }
        })
        .collect();
    for (p, t) in patterns.iter().zip(&opts.targets) {
        if !pairs.iter().any(|(l, _)| p.matches(&l.key)) {
            return Err(
                Error::usage(format!("--targets `{t}` matches no tensor of the base"))
                    .hint("globs match whole tensor names, e.g. `*attn*.weight`"),
            );
        }
    }
    let pool = super::pool(opts.threads)?;
    let bytes = |l: &Located| (l.shape.iter().product::<usize>() * l.dtype.bitsize() / 8) as u64;
    progress.start(chosen.iter().map(|(l, _)| 2 * bytes(l)).sum());
    let mut layers = Vec::new();
    let mut rows_out = Vec::new();
    let mut skipped = Vec::new();
    let mut unchanged = 0;
    let ex_opts = ExtractOptions::new(opts.side, opts.block_size);
    let result = (|| -> Result<()> {
        for (l0, l1) in &chosen {
            progress.file(Path::new(&l0.key));
            let refuse = |reason: String| -> Result<Option<Skipped>> {
                if explicit {
                    Err(Error::new(Category::TargetShape, reason.clone()).tensor(&l0.key))
                } else {
                    Ok(Some(Skipped {
                        tensor: l0.key.clone(),
                        reason,
                    }))
                }
            };
            let skip = if l0.shape.len() < 2 {
                refuse(format!(
                    "`{}` has {} axis; a rotation needs a weight matrix",
                    l0.key,
                    l0.shape.len()
                ))?
            } else if !matches!(
                l0.dtype,
                safetensors::Dtype::F16
                    | safetensors::Dtype::BF16
                    | safetensors::Dtype::F32
                    | safetensors::Dtype::F64
            ) {
                refuse(format!(
                    "`{}` is {:?}, not a floating-point weight",
                    l0.key, l0.dtype
                ))?
            } else {
                let rows = l0.shape[0];
                let cols = l0.cols();
                let d = match opts.side {
                    Side::Input => cols,
                    Side::Output => rows,
                };
                if d % opts.block_size != 0 {
                    refuse(format!(
                        "block size {} does not divide the {} dimension {d} of `{}`",
                        opts.block_size,
                        opts.side.as_str(),
                        l0.key
                    ))?
                } else {
                    None
                }
            };
            if let Some(s) = skip {
                skipped.push(s);
                progress.advance(2 * bytes(l0));
                continue;
            }
            let w0 = base.read_f64(l0)?;
            let w1 = tuned.read_f64(l1)?;
            if w0.data == w1.data {
                unchanged += 1;
                progress.advance(2 * bytes(l0));
                continue;
            }
            let ex = pool
                .install(|| procrustes::extract(&w0.data, &w1.data, w0.rows, w0.cols, &ex_opts))
                .map_err(|e| e.tensor(&l0.key))?;
            let (reflections, capped) = ex.constraint_counts();
            let component = base.component(l0).map(str::to_string);
            let axis = match opts.side {
                Side::Input => w0.cols,
                Side::Output => w0.rows,
            } as u64;
            let layer = Layer {
                target: Target {
                    name: module_name(&l0.key).to_string(),
                    convention: "unknown".into(),
                    component: component.clone(),
                    module: if l0.shape.len() > 2 {
                        ModuleKind::Conv
                    } else {
                        ModuleKind::Linear
                    },
                    shape: Some(l0.shape.iter().map(|&d| d as u64).collect()),
                    rotated_dim: Some(axis),
                    rows: None,
                },
                side: opts.side,
                stages: vec![ex.stage("")],
                row_scale: None,
                row_scale_f64: false,
                constraint: None,
                base_binding: Some(base.binding(l0)?),
            };
            rows_out.push(ExtractedLayer {
                tensor: l0.key.clone(),
                component,
                shape: l0.shape.clone(),
                blocks: ex.blocks(),
                residual: ex.relative_residual(),
                residual_abs: ex.residual(),
                change: ex.baseline(),
                reflections,
                capped_planes: capped,
                max_angle_rad: ex.fits.iter().map(|f| f.angle).fold(0.0, f64::max),
            });
            layers.push(layer);
            progress.advance(2 * bytes(l0));
        }
        Ok(())
    })();
    progress.finish();
    result?;
    if layers.is_empty() {
        let why = match skipped.first() {
            Some(s) => format!(" ({} skipped, first: {})", skipped.len(), s.reason),
            None => String::new(),
        };
        return Err(Error::new(
            Category::Conversion,
            format!(
                "no weight to extract: every targeted tensor is equal in both checkpoints{why}"
            ),
        )
        .hint("check the two paths, or choose --targets and a --block-size that divides them"));
    }
    let adapter = Adapter {
        provenance: Provenance {
            source_format: "extract".into(),
            source_version: None,
            tool: tool_name(),
            created: Some(creation_time(&[base_path, tuned_path])),
            source_digest: None,
            user_metadata: BTreeMap::from([(
                "oftool.extract".to_string(),
                serde_json::json!({
                    "block_size": opts.block_size,
                    "side": opts.side.as_str(),
                    "targets": opts.targets,
                })
                .to_string(),
            )]),
        },
        layers,
        features: Vec::new(),
    };
    crate::oft_file::write(&adapter, output)?;
    let sq = |x: f64| x * x;
    let change_sq: f64 = rows_out.iter().map(|l| sq(l.change)).sum();
    let residual_sq: f64 = rows_out.iter().map(|l| sq(l.residual_abs)).sum();
    let totals = ExtractTotals {
        layers: rows_out.len(),
        unchanged,
        skipped: skipped.len(),
        residual: if change_sq > 0.0 {
            (residual_sq / change_sq).sqrt()
        } else {
            0.0
        },
        max_residual: rows_out.iter().map(|l| l.residual).fold(0.0, f64::max),
        reflections: rows_out.iter().map(|l| l.reflections).sum(),
        capped_planes: rows_out.iter().map(|l| l.capped_planes).sum(),
        parameters: adapter.layers.iter().map(|l| l.parameter_count()).sum(),
        bytes: std::fs::metadata(output).map(|m| m.len()).unwrap_or(0),
        seconds: started.elapsed().as_secs_f64(),
    };
    Ok(ExtractReport {
        base: base_path.display().to_string(),
        finetuned: tuned_path.display().to_string(),
        output: output.display().to_string(),
        block_size: opts.block_size,
        side: opts.side,
        totals,
        layers: rows_out,
        skipped,
    })
}

/// The report as a table.
pub fn render(r: &ExtractReport) -> String {
    let mut out = format!(
        "{:<60} {:>7} {:>10} {:>10} {:>5} {:>6}\n",
        "tensor", "blocks", "residual", "‖W₁−W₀‖", "refl", "capped"
    );
    for l in &r.layers {
        out.push_str(&format!(
            "{:<60} {:>7} {:>10.3e} {:>10.3e} {:>5} {:>6}\n",
            l.tensor, l.blocks, l.residual, l.change, l.reflections, l.capped_planes
        ));
    }
    for s in &r.skipped {
        out.push_str(&format!("skipped {}: {}\n", s.tensor, s.reason));
    }
    let t = &r.totals;
    out.push_str(&format!(
        "{} → {} ({} side, b = {}): {} layers ({} unchanged, {} skipped), residual {:.3e} \
         (worst {:.3e}), {} reflection block(s), {} capped plane(s), {} parameters, {:.1} MB in \
         {:.2} s\n",
        r.finetuned,
        r.output,
        r.side.as_str(),
        r.block_size,
        t.layers,
        t.unchanged,
        t.skipped,
        t.residual,
        t.max_residual,
        t.reflections,
        t.capped_planes,
        t.parameters,
        t.bytes as f64 / 1e6,
        t.seconds
    ));
    out
}
