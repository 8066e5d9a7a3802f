//! `oftool merge` and `unmerge`: bake adapters into a base checkpoint, streaming.
//!
//! From the arguments to the bytes on disk:
//!
//! 1. [`load_inputs`]: each [`AdapterArg`] is imported (any layout) and, for a geodesic strength,
//!    raised to its power here; a tool's own strength rule is kept for bake time.
//! 2. [`crate::base::Base::open`] reads the base's headers; `plan` locates every layer,
//!    checks it against its tensor and the binding hashes, and groups the edits per file and
//!    tensor. Every refusal happens here, before anything is written.
//! 3. `stream` reads each base file once in file order: untouched runs are copied in the
//!    kernel; each tensor with edits goes through the compute `backend` (today the CPU one)
//!    and is written in its own dtype. Output goes to a staging file or folder beside OUT,
//!    synced and renamed into place only when complete.
//!
//! The base is never held in memory: only the tensors in flight are. `src/README.md` draws the
//! data flow and says how to add a compute backend.

pub(crate) mod backend;
mod codec;
mod edit;
pub(crate) mod plan;
mod stream;

pub use crate::candle_rotate::DeviceChoice;
pub use crate::strength::AdapterArg;
pub use stream::{NoProgress, Progress};

use crate::base::{Base, Storage};
use crate::convert::refuse_overwriting_input;
use crate::error::{Error, Result};
use crate::layouts;
use crate::model::Adapter;
use crate::strength::BlendMode;
use backend::Backend;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Options of `merge` and `unmerge`.
#[derive(Debug, Clone, Default)]
pub struct MergeOptions {
    /// Worker threads for the rotation (default: all cores). Output does not depend on it.
    pub threads: Option<usize>,
    /// Skip adapter layers whose target the base lacks instead of failing.
    pub skip_missing: bool,
    /// Bake even where base-binding hashes do not match.
    pub force: bool,
    /// Where the rotation runs: the native CPU kernels (default), or the candle backend on a
    /// CUDA device or candle's CPU device. `Auto` falls back to the CPU with a note.
    pub device: DeviceChoice,
}

/// What a bake wrote (the `--json` summary of `merge` and `unmerge`).
#[derive(Debug, Serialize)]
pub struct MergeSummary {
    /// The base, as given.
    pub base: String,
    /// The output file or folder.
    pub output: String,
    /// The adapters, as given (`PATH` or `PATH:S`).
    pub adapters: Vec<String>,
    /// Files written (shards, or components of a pipeline).
    pub files_written: usize,
    /// Tensors written.
    pub tensors: usize,
    /// Tensors that at least one layer rotated.
    pub tensors_rotated: usize,
    /// Adapter layers baked.
    pub layers_baked: usize,
    /// Adapter layers skipped (`--skip-missing`), by name.
    pub layers_skipped: Vec<String>,
    /// Bytes written.
    pub bytes_written: u64,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Peak resident memory, where the system reports it.
    pub peak_rss_bytes: Option<u64>,
    /// Where the rotation ran: `cpu`, `candle-cpu` or `cuda:N`.
    pub device: String,
    /// Why `--device auto` did not use a GPU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_note: Option<String>,
}

/// One adapter to bake, already loaded.
pub struct BakeInput {
    /// How to name it in messages and metadata (its path as given).
    pub label: String,
    /// The adapter file.
    pub path: PathBuf,
    /// The adapter (strength already applied unless `runtime_strength` is set).
    pub adapter: Adapter,
    /// Parity strength rule, applied at bake time when `runtime_strength` is set.
    pub mode: BlendMode,
    /// The strength to apply per layer at bake time with `mode` (tool rules other than geodesic).
    pub runtime_strength: Option<f64>,
    /// The strength the user asked for (recorded in the output's metadata).
    pub strength: Option<f64>,
    /// Where the stages' parameters are.
    pub params: Params,
}

/// Where a [`BakeInput`]'s stage parameters are.
#[derive(Debug, Default)]
pub enum Params {
    /// In its adapter: every layout but `.oft`, a `.oft` raised to a geodesic strength, and
    /// `unmerge`'s inverses.
    #[default]
    Loaded,
    /// Still in the `.oft` file, already checked (structure, shapes, digest): the adapter's
    /// stages hold none (every `Stage::q` is empty) and nothing may read them there. The plan's
    /// edits read each layer's parameters when the bake reaches its tensor, so the bake holds
    /// only the layers in flight (an LLM-size adapter is 1.3 GB in f64).
    Deferred(crate::oft_file::DeferredParams),
}

/// Load one adapter argument: a file, a PEFT directory, or a folder of per-component PEFT
/// directories (`unet/`, `text_encoder/`, …).
pub fn load_adapter(path: &Path) -> Result<Adapter> {
    load_adapter_with(path, crate::layouts::Semantics::Producer)
}

/// [`load_adapter`], reading `oft_blocks` files as a given runtime does.
pub fn load_adapter_with(path: &Path, semantics: crate::layouts::Semantics) -> Result<Adapter> {
    layouts::load_with(path, semantics)
}

/// Load adapters for `merge`: geodesic strengths are applied to the adapter here, parity
/// strengths at bake time; `oft_blocks` files are read as the parity tool reads them. A `.oft`
/// file that needs no geodesic strength keeps its parameters in the file ([`Params::Deferred`]).
pub fn load_inputs(args: &[AdapterArg], mode: BlendMode, base: &Path) -> Result<Vec<BakeInput>> {
    load_inputs_with(args, mode, base, true)
}

/// [`load_inputs`]; `defer`: whether a `.oft` input may keep its parameters in the file.
fn load_inputs_with(
    args: &[AdapterArg],
    mode: BlendMode,
    base: &Path,
    defer: bool,
) -> Result<Vec<BakeInput>> {
    // Only a truncated stage (PEFT 0.7–0.13) needs the base before the plan: whether it is cut
    // decides whether a strength applies to it.
    let mut checkpoint = None;
    args.iter()
        .map(|a| {
            let geodesic = matches!((mode, a.strength), (BlendMode::Geodesic, Some(_)));
            let deferred = if defer && !geodesic {
                read_deferred(&a.path)?
            } else {
                None
            };
            let (mut adapter, params) = match deferred {
                Some((adapter, params)) => (adapter, Params::Deferred(params)),
                None => (
                    load_adapter_with(&a.path, mode.semantics())?,
                    Params::Loaded,
                ),
            };
            if adapter
                .layers
                .iter()
                .any(|l| l.stages.iter().any(|s| s.spec.truncated))
            {
                if checkpoint.is_none() {
                    checkpoint = Some(Base::open(base)?);
                }
                if let Some(b) = &checkpoint {
                    resolve_truncation(&mut adapter, b);
                }
            }
            let (adapter, runtime_strength) = match (mode, a.strength) {
                (_, None) => (adapter, None),
                (BlendMode::Geodesic, Some(s)) => {
                    (crate::strength::adapter_power(&adapter, s)?, None)
                }
                (_, Some(s)) => (adapter, Some(s)),
            };
            Ok(BakeInput {
                label: a.path.display().to_string(),
                path: a.path.clone(),
                adapter,
                mode,
                runtime_strength,
                strength: a.strength,
                params,
            })
        })
        .collect()
}

/// A `.oft` file read with its stage parameters left in it, or `None` for any other input
/// (read eagerly) and for a `.oft` with a truncated stage (cut to the base before the bake).
fn read_deferred(path: &Path) -> Result<Option<(Adapter, crate::oft_file::DeferredParams)>> {
    // A pickle is converted to find its layout; a `.oft` is never one.
    if path.is_dir()
        || layouts::container::is_pickle(path)
        || !matches!(layouts::detect(path), Ok(d) if d.id() == "oft")
    {
        return Ok(None);
    }
    let (adapter, params) = crate::oft_file::read_deferred(path)?;
    let truncated = (adapter.layers.iter()).any(|l| l.stages.iter().any(|s| s.spec.truncated));
    Ok((!truncated).then_some((adapter, params)))
}

/// Give each truncated layer (spec §8.7) the rotated axis of its tensor in `base`, and make a
/// stage exactly as wide as that axis an ordinary one. Layers not found are left for the plan
/// to report.
pub fn resolve_truncation(adapter: &mut Adapter, base: &Base) {
    for layer in &mut adapter.layers {
        if !layer.stages.iter().any(|s| s.spec.truncated) {
            continue;
        }
        let crate::base::Lookup::Found(loc) = base.lookup(layer) else {
            continue;
        };
        let shape: Vec<u64> = loc.covered_shape().iter().map(|&d| d as u64).collect();
        let axis = crate::validate::axis_len(layer.side, &shape);
        if layer.target.rotated_dim.is_none() {
            layer.target.rotated_dim = Some(axis);
        }
        layer.stages.iter_mut().for_each(|st| st.settle_cut(axis));
    }
}

/// Bake `adapters`, in order, into the checkpoint at `base`, writing `out` (see the module
/// documentation for the steps).
pub fn merge(
    base: &Path,
    adapters: Vec<BakeInput>,
    out: &Path,
    opts: &MergeOptions,
    progress: &dyn Progress,
) -> Result<MergeSummary> {
    let start = Instant::now();
    if adapters.is_empty() {
        return Err(Error::usage("give at least one adapter"));
    }
    let mut inputs: Vec<&Path> = vec![base];
    inputs.extend(adapters.iter().map(|a| a.path.as_path()));
    refuse_overwriting_input(out, &inputs)?;
    let checkpoint = Base::open(base)?;
    if !matches!(checkpoint.storage(), Storage::File(_)) && out.exists() {
        return Err(Error::usage(format!(
            "{} already exists; a sharded or pipeline output is a new folder",
            out.display()
        )));
    }
    let plan = plan::plan(&checkpoint, &adapters, opts)?;
    let (device, device_note) = crate::candle_rotate::resolve_device(opts.device)?;
    let metadata = output_metadata(&adapters);
    let (written, device_name) = match device {
        None => {
            let cpu = backend::cpu::Cpu::new(opts.threads)?;
            let w = stream_with(&checkpoint, &plan, out, &metadata, &cpu, progress)?;
            (w, DeviceChoice::Cpu.to_string())
        }
        Some(device) => {
            let name = match &device {
                candle_core::Device::Cpu => DeviceChoice::CandleCpu.to_string(),
                _ => match opts.device {
                    DeviceChoice::Cuda(n) => DeviceChoice::Cuda(n).to_string(),
                    _ => DeviceChoice::Cuda(0).to_string(),
                },
            };
            let candle = backend::candle::Candle::new(device, opts.threads)?;
            let w = stream_with(&checkpoint, &plan, out, &metadata, &candle, progress)?;
            (w, name)
        }
    };
    Ok(MergeSummary {
        base: base.display().to_string(),
        output: out.display().to_string(),
        adapters: adapters.iter().map(|a| a.label.clone()).collect(),
        files_written: plan.jobs.len(),
        tensors: checkpoint.files().iter().map(|f| f.tensors).sum(),
        tensors_rotated: written.tensors_computed,
        layers_baked: plan.layers_baked,
        layers_skipped: plan.skipped,
        bytes_written: written.bytes,
        seconds: start.elapsed().as_secs_f64(),
        peak_rss_bytes: peak_rss_bytes(),
        device: device_name,
        device_note,
    })
}

/// Stream the planned jobs through `backend` into `out`.
fn stream_with<B: Backend>(
    checkpoint: &Base,
    plan: &plan::Plan<'_>,
    out: &Path,
    metadata: &BTreeMap<String, String>,
    backend: &B,
    progress: &dyn Progress,
) -> Result<stream::Written> {
    let stream_opts = stream::StreamOptions {
        in_flight: backend.in_flight(),
        in_flight_bytes: stream::in_flight_limit(plan.resident_bytes()),
    };
    stream::write(
        checkpoint,
        &plan.jobs,
        out,
        metadata,
        backend,
        progress,
        stream_opts,
    )
}

/// `oftool unmerge MERGED ADAPTER[:S]… -o BASE`: bake the exact inverse of each adapter, in
/// reverse order (Cayley stages negated, Neumann stages inverted by solving, row scales
/// divided out), with the same streaming and atomic-output rules as [`merge`].
pub fn unmerge(
    merged: &Path,
    args: &[AdapterArg],
    out: &Path,
    opts: &MergeOptions,
    progress: &dyn Progress,
) -> Result<MergeSummary> {
    // The inverse is computed from the parameters: every input is read whole.
    let mut inputs = load_inputs_with(args, BlendMode::Geodesic, merged, false)?;
    for input in &mut inputs {
        input.adapter = crate::strength::adapter_inverse(&input.adapter)?;
    }
    inputs.reverse();
    merge(merged, inputs, out, opts, progress)
}

/// Metadata oftool adds to every output file: its version and the adapters baked.
fn output_metadata(adapters: &[BakeInput]) -> BTreeMap<String, String> {
    let mut extra = BTreeMap::new();
    extra.insert("oftool.version".to_string(), crate::model::tool_name());
    let list: Vec<serde_json::Value> = adapters
        .iter()
        .map(|a| {
            serde_json::json!({
                "name": a.path.file_name().map(|n| n.to_string_lossy().to_string()),
                "source_format": a.adapter.provenance.source_format,
                "source_digest": a.adapter.provenance.source_digest,
                "layers": a.adapter.layers.len(),
                "strength": a.strength,
                "blend": format!("{:?}", a.mode).to_lowercase(),
            })
        })
        .collect();
    extra.insert(
        "oftool.adapters".to_string(),
        serde_json::Value::Array(list).to_string(),
    );
    extra
}

/// Peak resident memory of this process, from /proc (Linux only).
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::PreparedStage;
    use crate::error::Category;
    use crate::model::*;
    use crate::tensors::{MappedFile, OwnedTensor, from_f64};

    /// A layer of one Cayley stage of 2 blocks of size 2 on `name` (a 4 × 4 weight).
    fn layer(name: &str, side: Side, q: [f64; 2]) -> Layer {
        Layer {
            target: Target {
                name: name.into(),
                convention: "unknown".into(),
                component: None,
                module: ModuleKind::Linear,
                shape: Some(vec![4, 4]),
                rotated_dim: Some(4),
                rows: None,
            },
            side,
            stages: vec![Stage {
                spec: StageSpec {
                    blocks: Some(2),
                    block_size: 2,
                    shared: false,
                    wiring: Wiring::Identity,
                    map: RotationMap::Cayley,
                    q: String::new(),
                    truncated: false,
                },
                q: q.to_vec(),
                q_f64: false,
                inverse: false,
            }],
            row_scale: None,
            row_scale_f64: false,
            constraint: None,
            base_binding: None,
        }
    }

    /// A `.oft` input is read without its parameters; the plan's edits read each layer's when
    /// asked (the fused 16-bit path in `load`, the general path in `compute`), the bake's bytes
    /// are those of the same adapter read whole, and a file changed after its digest was
    /// checked is refused when the layer is read, leaving no output.
    #[test]
    fn oft_parameters_are_read_per_tensor() {
        let tmp = tempfile::tempdir().unwrap();
        let oft = tmp.path().join("a.oft");
        let adapter = Adapter {
            provenance: Provenance {
                source_format: "oft".into(),
                tool: tool_name(),
                ..Provenance::default()
            },
            layers: vec![
                layer("blocks.0.a", Side::Input, [0.25, -0.125]),
                layer("blocks.0.b", Side::Output, [0.5, 0.375]),
            ],
            features: Vec::new(),
        };
        crate::oft_file::write(&adapter, &oft).unwrap();
        let adapter = crate::oft_file::read(&oft).unwrap();
        let values: Vec<f64> = (0..16).map(|i| (i as f64 * 0.37).sin()).collect();
        let tensor = |name: &str, dtype| OwnedTensor {
            name: name.into(),
            dtype,
            shape: vec![4, 4],
            bytes: from_f64(&values, dtype).unwrap(),
        };
        let base = tmp.path().join("base.safetensors");
        let tensors = [
            tensor("blocks.0.a.weight", safetensors::Dtype::BF16),
            tensor("blocks.0.b.weight", safetensors::Dtype::F32),
        ];
        let mut file = std::fs::File::create(&base).unwrap();
        crate::tensors::write_owned(&mut file, &tensors, Default::default()).unwrap();
        drop(file);

        let arg = AdapterArg {
            path: oft.clone(),
            strength: None,
        };
        let lazy = load_inputs(std::slice::from_ref(&arg), BlendMode::Geodesic, &base).unwrap();
        assert!(matches!(lazy[0].params, Params::Deferred(_)));
        let stages = || lazy[0].adapter.layers.iter().flat_map(|l| &l.stages);
        assert!(stages().all(|s| s.q.is_empty()));
        // A stage without its values cannot be rotated by mistake.
        for st in stages() {
            assert!(PreparedStage::<f64>::with_blend(st, 4, None).is_err());
        }
        // Read whole: `unmerge`'s inputs, and a geodesic strength.
        let whole = load_inputs_with(
            std::slice::from_ref(&arg),
            BlendMode::Geodesic,
            &base,
            false,
        )
        .unwrap();
        assert!(matches!(whole[0].params, Params::Loaded));
        assert_eq!(whole[0].adapter, adapter);
        let strong = AdapterArg {
            strength: Some(0.5),
            ..arg.clone()
        };
        let strong = load_inputs(&[strong], BlendMode::Geodesic, &base).unwrap();
        assert!(matches!(strong[0].params, Params::Loaded));

        let checkpoint = Base::open(&base).unwrap();
        let opts = MergeOptions {
            threads: Some(1),
            ..MergeOptions::default()
        };
        let planned = plan::plan(&checkpoint, &lazy, &opts).unwrap();
        let edits: Vec<&backend::Edit<'_>> = (planned.jobs.iter())
            .flat_map(|j| j.edits.values().flatten())
            .collect();
        assert_eq!(edits.len(), 2);
        for (e, want) in edits.iter().zip(&adapter.layers) {
            assert!(e.is_deferred());
            assert_eq!(&*e.layer().unwrap(), want);
        }
        // Nothing held in memory: the stream gets the whole in-flight budget.
        assert_eq!(planned.resident_bytes(), 0);
        drop(planned);
        // Read whole, the parameters are held (8 bytes per value) and counted.
        let held = plan::plan(&checkpoint, &whole, &opts).unwrap();
        let values: usize = (adapter.layers.iter())
            .flat_map(|l| &l.stages)
            .map(|s| s.q.len())
            .sum();
        assert!(values > 0);
        assert_eq!(held.resident_bytes(), 8 * values as u64);
        drop(held);

        let (lazy_out, whole_out) = (tmp.path().join("lazy.st"), tmp.path().join("whole.st"));
        merge(&base, lazy, &lazy_out, &opts, &NoProgress).unwrap();
        merge(&base, whole, &whole_out, &opts, &NoProgress).unwrap();
        let (a, b) = (
            std::fs::read(&lazy_out).unwrap(),
            std::fs::read(&whole_out).unwrap(),
        );
        assert!(
            a == b,
            "a deferred .oft bakes other bytes than one read whole"
        );
        assert_ne!(a, std::fs::read(&base).unwrap());

        // Checked, then changed on disk: refused when the layer's parameters are read.
        let lazy = load_inputs(std::slice::from_ref(&arg), BlendMode::Geodesic, &base).unwrap();
        let mapped = MappedFile::open(&oft).unwrap();
        let header = mapped.header();
        let at =
            mapped.data_start() + header.info("layers.1.stages.0.q").unwrap().data_offsets.0 as u64;
        drop(mapped);
        let mut bytes = std::fs::read(&oft).unwrap();
        bytes[at as usize] ^= 1;
        let mut f = std::fs::OpenOptions::new().write(true).open(&oft).unwrap();
        std::io::Write::write_all(&mut f, &bytes).unwrap();
        drop(f);
        let changed_out = tmp.path().join("changed.st");
        let err = merge(&base, lazy, &changed_out, &opts, &NoProgress)
            .expect_err("a changed file is refused");
        assert_eq!(err.category(), Category::Digest, "{err}");
        assert!(err.to_string().contains("layers.1.stages.0.q"), "{err}");
        assert!(!changed_out.exists());
    }
}
