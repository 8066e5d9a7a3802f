//! `oftool convert ADAPTER --to lora --base BASE -o OUT`: an OFT adapter as a LoRA, for runtimes
//! that load only LoRA.
//!
//! The bake's plan ([`crate::bake::plan`]) locates every layer in the base and groups them per
//! tensor, in the order they apply. Then, one tensor at a time (base file order, key order):
//! read W (f64), apply every layer of that tensor with the bake's own code
//! ([`crate::apply::apply_layer_blended`]: every stage, row scales, either side) to get the exact
//! W′, take ΔW = W′ − W over the whole tensor and its best rank-k approximation
//! ([`crate::lowrank`]: `B = U_k√Σ_k`, `A = √Σ_k V_kᵀ`), and store B and A as binary32 with
//! `alpha = rank`, so a runtime adds exactly `B·A`. Only the factors stay in memory.
//!
//! Layouts: `peft` (a PEFT LoRA directory per diffusers component, as `--to diffusers` writes
//! OFT: `lora_A`/`lora_B`, Conv2d as a k×k `lora_A` and a 1×1 `lora_B`, Embedding as
//! `lora_embedding_A`/`lora_embedding_B`; per-layer ranks in `rank_pattern`/`alpha_pattern`) and
//! `kohya` (one safetensors file, `lora_unet_…​.lora_down.weight` / `lora_up.weight` / `alpha`
//! under the base's own names; a fused tensor is targeted whole).
//!
//! The report gives per tensor the rank, `‖ΔW − B·A‖_F / ‖ΔW‖_F`, and the largest change of any
//! merged weight against the exact bake, `max |W + B·A − W′|` with the stored factors.

use crate::apply::apply_layer_blended;
use crate::bake::plan::plan;
use crate::bake::{BakeInput, MergeOptions, Progress};
use crate::base::{Base, RowSlice};
use crate::convert::refuse_overwriting_input;
use crate::error::{Category, Error, Result};
use crate::layouts::report::{OutFile, OwnedTensor, Written, rel_path};
use crate::layouts::{self, names};
use crate::lowrank::{self, LowRank, Method, MethodUsed, RankRule};
use crate::model::{Layer, ModuleKind};
use crate::strength::BlendMode;
use faer::linalg::matmul::matmul;
use faer::{Accum, MatRef, Par};
use safetensors::Dtype;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The LoRA file layout to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LoraLayout {
    /// PEFT LoRA directories (`PeftModel.from_pretrained`, diffusers' `load_lora_weights`).
    Peft,
    /// kohya sd-scripts `networks.lora` safetensors (ComfyUI, A1111/Forge).
    Kohya,
}

/// Options of `convert --to lora`.
pub struct LoraOptions<'a> {
    /// The base checkpoint, as given.
    pub base: &'a Path,
    /// The rank rule.
    pub rule: RankRule,
    /// The input's layout id.
    pub layout: LoraLayout,
    /// Worker threads (default: all cores); the output is the same for any value.
    pub threads: Option<usize>,
    /// Pack a PEFT directory into one zip archive.
    pub zip: bool,
}

/// One LoRA module: a base tensor and the layers that change it.
#[derive(Debug, Clone, Serialize)]
pub struct LoraLayer {
    /// The adapter layers baked into this tensor, in the order they apply.
    pub layers: Vec<String>,
    /// The base tensor.
    pub tensor: String,
    /// The module name written (`null` when ΔW needed rank 0: nothing written).
    pub written_as: Option<String>,
    /// PEFT: the component directory it is written in (`null`: the output's root).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub component: Option<String>,
    /// The tensor's full shape.
    pub shape: Vec<usize>,
    /// Components kept.
    pub rank: usize,
    /// `‖ΔW − B·A‖_F / ‖ΔW‖_F` (0 when ΔW is zero).
    pub rel_error: f64,
    /// Fraction of `‖ΔW‖²_F` the approximation keeps.
    pub energy_kept: f64,
    /// `‖ΔW‖_F`.
    pub delta_norm: f64,
    /// Largest change of any merged weight vs the exact bake: `max |W + B·A − W′|`.
    pub max_weight_change: f64,
    /// `full` (thin SVD), `randomized`, or `zero` (ΔW was zero).
    pub method: &'static str,
    /// Stored parameters.
    pub parameters: u64,
}

/// Totals over every tensor.
#[derive(Debug, Clone, Serialize)]
pub struct LoraTotals {
    /// Base tensors changed.
    pub tensors: usize,
    /// Layers (per-layer figures).
    pub layers: usize,
    /// Largest rank of any tensor.
    pub max_rank: usize,
    /// `√(Σ‖ΔW − B·A‖²_F / Σ‖ΔW‖²_F)` over all tensors.
    pub rel_error: f64,
    /// Worst relative error of any tensor.
    pub max_rel_error: f64,
    /// Largest change of any merged weight vs the exact bake.
    pub max_weight_change: f64,
    /// Stored parameters.
    pub parameters: u64,
    /// Bytes written (all files).
    pub bytes: u64,
    /// Wall time.
    pub seconds: f64,
}

/// What `convert --to lora` did.
#[derive(Debug, Clone, Serialize)]
pub struct LoraReport {
    /// The adapter, as given.
    pub input: String,
    /// The input's layout id and variant (as `inspect` reports them).
    pub layout: String,
    /// The input's variant.
    pub variant: Option<String>,
    /// `lora`.
    pub to: &'static str,
    /// The LoRA layout written.
    pub lora_layout: LoraLayout,
    /// The base checkpoint, as given.
    pub base: String,
    /// The output path, as given.
    pub output: String,
    /// `{"rank": k}` or `{"energy": e, "max_rank": k}`.
    pub rule: serde_json::Value,
    /// Files written, relative to `output` (directories only).
    pub files: Vec<String>,
    /// Totals over every layer.
    pub totals: LoraTotals,
    /// Layers (per-layer figures).
    pub layers: Vec<LoraLayer>,
}

/// Convert `input` to a LoRA against `opts.base` (see the module documentation).
pub fn run(
    input: &Path,
    output: &Path,
    opts: &LoraOptions<'_>,
    progress: &dyn Progress,
) -> Result<LoraReport> {
    let started = Instant::now();
    refuse_overwriting_input(output, &[input, opts.base])?;
    if opts.zip && opts.layout == LoraLayout::Kohya {
        return Err(Error::usage(
            "--zip packs a directory layout; --layout kohya writes a single file",
        ));
    }
    if let RankRule::Fixed(0) = opts.rule {
        return Err(Error::usage("--rank must be at least 1"));
    }
    let (found, adapter) = layouts::read(input)?;
    let te = names::te_count(&adapter);
    let base = Base::open(opts.base)?;
    let inputs = [BakeInput {
        label: input.display().to_string(),
        path: input.to_path_buf(),
        adapter,
        mode: BlendMode::Geodesic,
        runtime_strength: None,
        strength: None,
        params: crate::bake::Params::Loaded,
    }];
    // A LoRA is made for the base given: binding hashes of another base do not stop it.
    let merge_opts = MergeOptions {
        threads: opts.threads,
        skip_missing: false,
        force: true,
        // The LoRA is computed on the host from the exact bake's formula, not by a backend.
        device: Default::default(),
    };
    let planned = plan(&base, &inputs, &merge_opts)?;
    let pool = super::pool(opts.threads)?;
    let table = base.single_table().map(|t| (t.clone(), t.pipeline_names()));

    let mut units = Vec::new();
    for job in &planned.jobs {
        for (key, edits) in &job.edits {
            units.push((key, edits));
        }
    }
    let total_bytes: u64 = units
        .iter()
        .filter_map(|(_, e)| e.first())
        .filter_map(|e| e.layer().ok().and_then(|l| base.locate(&l).ok()))
        .map(|l| (l.shape.iter().product::<usize>() * l.dtype.bitsize() / 8) as u64)
        .sum();
    progress.start(total_bytes);
    let mut rows_out = Vec::new();
    let mut modules: Vec<Module> = Vec::new();
    let result = (|| -> Result<()> {
        for (key, edits) in &units {
            let Some(first) = edits.first() else {
                continue;
            };
            let mut loc = base.locate(&*first.layer()?)?;
            progress.file(Path::new(key.as_str()));
            let rows = loc.shape.first().copied().unwrap_or(0);
            loc.rows = RowSlice::whole(rows);
            let w = base.read_f64(&loc)?;
            let cols = w.cols;
            let mut changed = w.data.clone();
            for e in edits.iter() {
                let mut part = Vec::with_capacity(e.rows.len() * cols);
                for r in e.rows.ranges() {
                    part.extend_from_slice(&changed[r.start * cols..r.end * cols]);
                }
                apply_layer_blended(&*e.layer()?, &mut part, e.rows.len(), cols, e.blend)?;
                let mut at = 0;
                for r in e.rows.ranges() {
                    let n = r.len() * cols;
                    changed[r.start * cols..r.end * cols].copy_from_slice(&part[at..at + n]);
                    at += n;
                }
            }
            let delta: Vec<f64> = changed.iter().zip(&w.data).map(|(a, b)| a - b).collect();
            drop(changed);
            let layers = edits
                .iter()
                .map(|e| e.layer())
                .collect::<Result<Vec<_>>>()?;
            let layers: Vec<&Layer> = layers.iter().map(|l| &**l).collect();
            let whole = edits.iter().all(|e| e.rows.is_whole(rows));
            let name = module_name(opts.layout, &base, &loc, &layers, whole, te, table.as_ref())
                .map_err(|m| Error::new(Category::Conversion, m).tensor(key.as_str()))?;
            let lr = pool
                .install(|| lowrank::approximate(&delta, rows, cols, opts.rule, Method::Auto))
                .map_err(|e| e.tensor(key.as_str()))?;
            let b = stored(&lr.b);
            let a = stored(&lr.a);
            let max_change = pool.install(|| weight_change(&delta, &b, &a, rows, cols, lr.rank));
            let kind = module_kind(&layers, &loc.shape);
            let parameters = (lr.rank * (rows + cols)) as u64;
            rows_out.push(LoraLayer {
                layers: layers.iter().map(|l| l.target.name.clone()).collect(),
                tensor: key.to_string(),
                written_as: (lr.rank > 0).then(|| name.module.clone()),
                component: name.component.clone(),
                shape: loc.shape.clone(),
                rank: lr.rank,
                rel_error: lr.rel_error,
                energy_kept: lr.energy_kept(),
                delta_norm: lr.norm,
                max_weight_change: max_change,
                method: match lr.method {
                    MethodUsed::Zero => "zero",
                    MethodUsed::Full => "full",
                    MethodUsed::Randomized { .. } => "randomized",
                },
                parameters: if lr.rank > 0 { parameters } else { 0 },
            });
            if lr.rank > 0 {
                modules.push(Module {
                    name,
                    kind,
                    shape: loc.shape.clone(),
                    lr: LowRank { b, a, ..lr },
                });
            }
            progress
                .advance((loc.shape.iter().product::<usize>() * loc.dtype.bitsize() / 8) as u64);
        }
        Ok(())
    })();
    progress.finish();
    result?;

    let written = match opts.layout {
        LoraLayout::Peft => peft_files(&modules, &inputs[0].adapter)?,
        LoraLayout::Kohya => kohya_file(&modules, &inputs[0].adapter)?,
    };
    let files: Vec<String> = if written.directory {
        written
            .files
            .iter()
            .map(|f| rel_path(f).display().to_string())
            .collect()
    } else {
        Vec::new()
    };
    if modules.is_empty() {
        return Err(Error::new(
            Category::Conversion,
            "every weight change is zero (or needs rank 0 under --energy): no LoRA to write",
        ));
    }
    crate::convert::write_output(output, &written, opts.zip && written.directory)?;
    let bytes = output_bytes(output);
    let sq = |l: &LoraLayer| l.delta_norm * l.delta_norm;
    let total_sq: f64 = rows_out.iter().map(sq).sum();
    let err_sq: f64 = rows_out
        .iter()
        .map(|l| sq(l) * l.rel_error * l.rel_error)
        .sum();
    let totals = LoraTotals {
        tensors: rows_out.len(),
        layers: planned.layers_baked,
        max_rank: rows_out.iter().map(|l| l.rank).max().unwrap_or(0),
        rel_error: if total_sq > 0.0 {
            (err_sq / total_sq).sqrt()
        } else {
            0.0
        },
        max_rel_error: rows_out.iter().map(|l| l.rel_error).fold(0.0, f64::max),
        max_weight_change: rows_out
            .iter()
            .map(|l| l.max_weight_change)
            .fold(0.0, f64::max),
        parameters: rows_out.iter().map(|l| l.parameters).sum(),
        bytes,
        seconds: started.elapsed().as_secs_f64(),
    };
    Ok(LoraReport {
        input: input.display().to_string(),
        layout: found.id().into(),
        variant: found.variant().map(str::to_string),
        to: "lora",
        lora_layout: opts.layout,
        base: opts.base.display().to_string(),
        output: output.display().to_string(),
        rule: match opts.rule {
            RankRule::Fixed(k) => serde_json::json!({ "rank": k }),
            RankRule::Energy { fraction, max_rank } => {
                serde_json::json!({ "energy": fraction, "max_rank": max_rank })
            }
        },
        files,
        totals,
        layers: rows_out,
    })
}

/// The report as a table.
pub fn render(r: &LoraReport) -> String {
    let mut out = format!(
        "{:<60} {:>5} {:>10} {:>10} {:>12}\n",
        "tensor", "rank", "rel.error", "energy", "max ΔW′"
    );
    for l in &r.layers {
        out.push_str(&format!(
            "{:<60} {:>5} {:>10.3e} {:>10.6} {:>12.3e}\n",
            l.tensor, l.rank, l.rel_error, l.energy_kept, l.max_weight_change
        ));
    }
    let t = &r.totals;
    out.push_str(&format!(
        "{} ({}) → {} (lora, {}): {} tensors from {} layers, rank ≤ {}, relative error {:.3e} \
         (worst {:.3e}), largest weight change {:.3e}, {} parameters, {:.1} MB in {:.2} s\n",
        r.input,
        match &r.variant {
            Some(v) => format!("{} {v}", r.layout),
            None => r.layout.clone(),
        },
        r.output,
        match r.lora_layout {
            LoraLayout::Peft => "peft",
            LoraLayout::Kohya => "kohya",
        },
        t.tensors,
        t.layers,
        t.max_rank,
        t.rel_error,
        t.max_rel_error,
        t.max_weight_change,
        t.parameters,
        t.bytes as f64 / 1e6,
        t.seconds
    ));
    out
}

/// Values as the binary32 the file stores, back in f64.
fn stored(v: &[f64]) -> Vec<f64> {
    v.iter().map(|&x| x as f32 as f64).collect()
}

/// `max |B·A − ΔW|`: how far `W + B·A` lands from the exact W′, in row panels.
fn weight_change(delta: &[f64], b: &[f64], a: &[f64], rows: usize, cols: usize, k: usize) -> f64 {
    use rayon::prelude::*;
    const PANEL: usize = 256;
    if rows == 0 || cols == 0 {
        return 0.0;
    }
    delta
        .par_chunks(PANEL * cols)
        .enumerate()
        .map(|(p, chunk)| {
            let m = chunk.len() / cols;
            let mut r = chunk.to_vec();
            if k > 0 {
                let bp = MatRef::from_row_major_slice(&b[p * PANEL * k..(p * PANEL + m) * k], m, k);
                let ap = MatRef::from_row_major_slice(a, k, cols);
                let rm = faer::MatMut::from_row_major_slice_mut(&mut r, m, cols);
                matmul(rm, Accum::Add, bp, ap, -1.0, Par::Seq);
            }
            r.iter().map(|x| x.abs()).fold(0.0, f64::max)
        })
        .collect::<Vec<f64>>()
        .into_iter()
        .fold(0.0, f64::max)
}

/// What a LoRA module adapts.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Linear,
    Conv,
    Embedding,
}

fn module_kind(layers: &[&Layer], shape: &[usize]) -> Kind {
    if shape.len() > 2 {
        Kind::Conv
    } else if layers
        .iter()
        .any(|l| l.target.module == ModuleKind::Embedding)
    {
        Kind::Embedding
    } else {
        Kind::Linear
    }
}

/// The name a module is written under.
#[derive(Debug, Clone)]
struct Name {
    /// PEFT: the diffusers component (its directory); kohya: none.
    component: Option<String>,
    /// PEFT: the dotted module path; kohya: the flattened `lora_unet_…` name.
    module: String,
}

struct Module {
    name: Name,
    kind: Kind,
    shape: Vec<usize>,
    lr: LowRank,
}

/// Prefixes single-file checkpoints put before U-Net module names (ComfyUI maps `lora_unet_` +
/// the rest, flattened).
const LDM_UNET: [&str; 2] = ["model.diffusion_model.", "diffusion_model."];

fn module_name(
    layout: LoraLayout,
    base: &Base,
    loc: &crate::base::Located,
    layers: &[&Layer],
    whole: bool,
    te: usize,
    table: Option<&(crate::resolve::AliasTable, crate::resolve::PipelineNames)>,
) -> std::result::Result<Name, String> {
    let key = loc.key.as_str();
    let module = key.strip_suffix(".weight").unwrap_or(key);
    let Some(first) = layers.first() else {
        return Err(format!("`{key}`: no layer"));
    };
    match layout {
        LoraLayout::Kohya => {
            for p in LDM_UNET {
                if let Some(rest) = module.strip_prefix(p) {
                    return Ok(Name {
                        component: None,
                        module: format!("{}{}", names::LORA_UNET, rest.replace('.', "_")),
                    });
                }
            }
            // The base's own name, in the component the layer (or the base folder) gives.
            let mut named = (*first).clone();
            named.target.name = module.to_string();
            named.target.component = base
                .component(loc)
                .map(str::to_string)
                .or_else(|| names::component(first));
            if whole {
                names::kohya_name(first, te).or_else(|_| names::kohya_name(&named, te))
            } else {
                names::kohya_name(&named, te)
            }
            .map(|module| Name {
                component: None,
                module,
            })
        }
        LoraLayout::Peft => {
            if !whole {
                return Err(format!(
                    "the adapter rotates part of the fused tensor `{key}`, which has no PEFT module \
                     of its own; write --layout kohya (it targets the fused tensor) or convert \
                     against a diffusers base"
                ));
            }
            if let Some(c) = base.component(loc) {
                return Ok(Name {
                    component: Some(c.to_string()),
                    module: module.to_string(),
                });
            }
            let names = table.map(|(t, n)| (t, n));
            names::pipeline_name(first, names).map(|(component, module)| Name { component, module })
        }
    }
}

fn f32_tensor(name: String, shape: Vec<usize>, values: &[f64]) -> Result<OwnedTensor> {
    OwnedTensor::new(name, Dtype::F32, shape, values)
}

/// `B` (`rows × k`) and `A` (`k × cols`) of a module as the two tensors a LoRA stores, shaped
/// for its kind: Linear `[out, k]`/`[k, in]`; Conv2d `[out, k, 1, 1]`/`[k, in, kh, kw]`.
fn up_down_shapes(m: &Module) -> (Vec<usize>, Vec<usize>) {
    let k = m.lr.rank;
    let out = m.lr.rows;
    match m.kind {
        Kind::Conv => {
            let mut down = m.shape.clone();
            down[0] = k;
            (vec![out, k, 1, 1], down)
        }
        Kind::Linear | Kind::Embedding => (vec![out, k], vec![k, m.lr.cols]),
    }
}

/// Transpose a row-major `rows × cols` matrix.
fn transpose(v: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let mut t = vec![0.0; v.len()];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = v[i * cols + j];
        }
    }
    t
}

fn peft_files(modules: &[Module], adapter: &crate::model::Adapter) -> Result<Written> {
    let mut groups: BTreeMap<Option<String>, Vec<&Module>> = BTreeMap::new();
    for m in modules {
        groups.entry(m.name.component.clone()).or_default().push(m);
    }
    if groups.len() > 1 && groups.contains_key(&None) {
        return Err(Error::new(
            Category::Conversion,
            "the adapter spans several pipeline components but some layers name none; cannot tell \
             which PEFT directory they belong to",
        ));
    }
    let mut md = crate::layouts::report::kept_metadata(adapter);
    md.insert("format".into(), "pt".into());
    let mut files = Vec::new();
    for (comp, members) in &groups {
        let dir = comp.as_deref().map(PathBuf::from).unwrap_or_default();
        let mut tensors = Vec::new();
        let mut targets = Vec::new();
        let mut ranks: BTreeMap<String, usize> = BTreeMap::new();
        for m in members {
            let prefix = format!("{}{}", names::PEFT_WRAPPER, m.name.module);
            let k = m.lr.rank;
            match m.kind {
                Kind::Embedding => {
                    // PEFT: ΔW = (lora_embedding_B · lora_embedding_A)ᵀ, A `[k, num_embeddings]`,
                    // B `[dim, k]`; so A = Bᵀ and B = Aᵀ of ΔW = B·A.
                    let a = transpose(&m.lr.b, m.lr.rows, k);
                    let b = transpose(&m.lr.a, k, m.lr.cols);
                    tensors.push(f32_tensor(
                        format!("{prefix}.lora_embedding_A"),
                        vec![k, m.lr.rows],
                        &a,
                    )?);
                    tensors.push(f32_tensor(
                        format!("{prefix}.lora_embedding_B"),
                        vec![m.lr.cols, k],
                        &b,
                    )?);
                }
                Kind::Linear | Kind::Conv => {
                    let (up, down) = up_down_shapes(m);
                    tensors.push(f32_tensor(
                        format!("{prefix}.lora_A.weight"),
                        down,
                        &m.lr.a,
                    )?);
                    tensors.push(f32_tensor(format!("{prefix}.lora_B.weight"), up, &m.lr.b)?);
                }
            }
            targets.push(m.name.module.clone());
            ranks.insert(m.name.module.clone(), k);
        }
        targets.sort();
        // r: the most common rank; the others by pattern (alpha = rank everywhere).
        let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
        for k in ranks.values() {
            *counts.entry(*k).or_default() += 1;
        }
        let r = counts
            .iter()
            .max_by_key(|(k, n)| (**n, std::cmp::Reverse(**k)))
            .map(|(k, _)| *k)
            .unwrap_or(1);
        let pattern: serde_json::Map<String, serde_json::Value> = ranks
            .iter()
            .filter(|(_, k)| **k != r)
            .map(|(m, k)| (format!("^{}$", regex_escape(m)), serde_json::json!(k)))
            .collect();
        let config = serde_json::json!({
            "peft_type": "LORA",
            "task_type": null,
            "base_model_name_or_path": null,
            "revision": null,
            "inference_mode": true,
            "r": r,
            "lora_alpha": r,
            "target_modules": targets,
            "exclude_modules": null,
            "rank_pattern": pattern,
            "alpha_pattern": pattern,
            "lora_dropout": 0.0,
            "fan_in_fan_out": false,
            "bias": "none",
            "use_rslora": false,
            "use_dora": false,
            "init_lora_weights": true,
            "layers_to_transform": null,
            "layers_pattern": null,
            "modules_to_save": null,
            "peft_version": "0.18.0",
        });
        files.push(OutFile::Text {
            rel: dir.join("adapter_config.json"),
            text: serde_json::to_string_pretty(&config).unwrap_or_default() + "\n",
        });
        files.push(OutFile::Safetensors {
            rel: dir.join("adapter_model.safetensors"),
            tensors,
            metadata: md.clone(),
        });
    }
    Ok(Written {
        files,
        mapped: Vec::new(),
        warnings: Vec::new(),
        directory: true,
    })
}

/// A module path as a regular expression matching only itself.
fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn kohya_file(modules: &[Module], adapter: &crate::model::Adapter) -> Result<Written> {
    let mut tensors = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for m in modules {
        let name = &m.name.module;
        if !seen.insert(name.clone()) {
            return Err(Error::new(
                Category::Conversion,
                format!("two base tensors would both be written as `{name}`"),
            ));
        }
        let (up, down) = up_down_shapes(m);
        tensors.push(f32_tensor(
            format!("{name}.lora_down.weight"),
            down,
            &m.lr.a,
        )?);
        tensors.push(f32_tensor(format!("{name}.lora_up.weight"), up, &m.lr.b)?);
        tensors.push(f32_tensor(
            format!("{name}.alpha"),
            Vec::new(),
            &[m.lr.rank as f64],
        )?);
    }
    let mut md = crate::layouts::report::kept_metadata(adapter);
    let max_rank = modules.iter().map(|m| m.lr.rank).max().unwrap_or(0);
    md.insert("ss_network_module".into(), "networks.lora".into());
    md.insert("ss_network_dim".into(), max_rank.to_string());
    md.insert("ss_network_alpha".into(), max_rank.to_string());
    md.insert(
        "oftool.source".into(),
        "oft → lora (ΔW of the exact bake, truncated SVD)".into(),
    );
    Ok(Written::single(tensors, md, Vec::new(), Vec::new()))
}

/// Total size of what was written at `output` (a file, or a directory's files).
fn output_bytes(output: &Path) -> u64 {
    fn walk(p: &Path) -> u64 {
        match std::fs::metadata(p) {
            Ok(m) if m.is_file() => m.len(),
            Ok(m) if m.is_dir() => std::fs::read_dir(p)
                .map(|rd| rd.flatten().map(|e| walk(&e.path())).sum())
                .unwrap_or(0),
            _ => 0,
        }
    }
    walk(output)
}
