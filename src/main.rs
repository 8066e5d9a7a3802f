//! The `oftool` command line: parses arguments (including `PATH:S`), sets up the process,
//! calls the library, and renders its reports, errors and progress. A closed stdout (`| head`)
//! ends the program quietly.

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::{Parser, Subcommand, ValueEnum};
use oftool::bake::AdapterArg;
use oftool::error::Error;
use oftool::layouts::{self, LAYOUTS, Layout, Writes};
use oftool::lowrank::RankRule;
use oftool::strength::BlendMode;
use oftool::{bake, bridge, compose, convert, inspect, validate};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "oftool",
    version,
    about = "Inspect, validate, convert, compose and bake OFT/BOFT adapters"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// `--to`: the layouts of the registry, each with its one-line help and aliases; layouts oftool
/// only reads are accepted (to say why they are not written) but not listed.
fn layout_parser() -> impl TypedValueParser<Value = &'static Layout> {
    let values = LAYOUTS.iter().map(|l| {
        PossibleValue::new(l.id)
            .help(layouts::help_line(l))
            .aliases(l.aliases.iter().copied())
            .hide(matches!(l.writes, Writes::No(_)))
    });
    PossibleValuesParser::new(values)
        .try_map(|name: String| layouts::find(&name).ok_or_else(|| format!("no layout `{name}`")))
}

#[derive(Clone, Copy, ValueEnum)]
enum Blend {
    /// R^S per stage: every strength is a rotation (S = −1 undoes the adapter).
    Geodesic,
    /// kohya legacy OFT: each block S·(R − I) + I.
    Kohya,
    /// LyCORIS: each block (BOFT: each stage) S·R + (1 − S)·I, rescale in full.
    Lycoris,
    /// AUTOMATIC1111: W + S·(W' − W), kohya clamp.
    A1111,
    /// ComfyUI: S² for OFT (rescale ignored), per stage and ×S for BOFT, raw-alpha radius.
    Comfyui,
}

impl From<Blend> for BlendMode {
    fn from(b: Blend) -> Self {
        match b {
            Blend::Geodesic => BlendMode::Geodesic,
            Blend::Kohya => BlendMode::Kohya,
            Blend::Lycoris => BlendMode::Lycoris,
            Blend::A1111 => BlendMode::A1111,
            Blend::Comfyui => BlendMode::ComfyUi,
        }
    }
}

/// Options shared by `merge` and `unmerge`.
#[derive(clap::Args)]
struct BakeFlags {
    /// Output file (or folder, for sharded and diffusers bases).
    #[arg(short, long)]
    output: PathBuf,
    /// Worker threads (default: all cores); the output is the same for any value.
    #[arg(long)]
    threads: Option<usize>,
    /// Bake the layers that resolve and report the others, instead of failing.
    #[arg(long)]
    skip_missing: bool,
    /// Bake even if an adapter's base-binding hashes do not match this base.
    #[arg(long)]
    force: bool,
    /// No progress bar and no summary line.
    #[arg(short, long)]
    quiet: bool,
    /// Print a JSON summary (layers baked, bytes, seconds, peak memory, device).
    #[arg(long)]
    json: bool,
    /// Where the rotation runs: cpu (default), cuda or cuda:N (an NVIDIA GPU; needs the cuda
    /// build, see docs/gpu.md), or auto (the GPU if there is one, else the CPU, with a note).
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    device: String,
}

impl BakeFlags {
    fn options(&self) -> Result<bake::MergeOptions, Error> {
        Ok(bake::MergeOptions {
            threads: self.threads,
            skip_missing: self.skip_missing,
            force: self.force,
            device: self.device.parse()?,
        })
    }

    /// A progress bar on stderr when it is a terminal and no `--quiet`/`--json`.
    fn progress(&self) -> Box<dyn bake::Progress> {
        progress_bar(self.quiet || self.json)
    }
}

/// A progress bar on stderr when it is a terminal and `quiet` is not set.
fn progress_bar(quiet: bool) -> Box<dyn bake::Progress> {
    if !quiet && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        Box::new(Bar(indicatif::ProgressBar::new(0)))
    } else {
        Box::new(bake::NoProgress)
    }
}

/// The bake's progress as an indicatif bar on stderr.
struct Bar(indicatif::ProgressBar);

impl bake::Progress for Bar {
    fn start(&self, total: u64) {
        self.0.set_length(total);
        self.0.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
    }
    fn file(&self, relative: &Path) {
        self.0.set_message(relative.display().to_string());
    }
    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }
    fn finish(&self) {
        self.0.finish_and_clear();
    }
}

#[derive(Subcommand)]
enum Command {
    /// Show what an adapter holds: per layer target, side, stages, angles, constraint use.
    Inspect {
        /// A `.oft` file, a PEFT adapter directory or file, or a LyCORIS/kohya file.
        file: PathBuf,
        /// Print the stable JSON report instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Check an adapter (and optionally that it fits a base checkpoint). Exit 0 valid, 1 invalid, 2 usage or I/O error.
    Validate {
        file: PathBuf,
        /// Base checkpoint to check targets, shapes and binding hashes against: a .safetensors
        /// file, a sharded folder or its *.safetensors.index.json, or a diffusers folder.
        #[arg(long)]
        base: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Bake adapters into a base checkpoint (applied in the order given), streaming.
    Merge {
        /// Base checkpoint: a .safetensors file, a sharded folder or its *.safetensors.index.json, or a diffusers folder.
        base: PathBuf,
        /// Adapters as PATH or PATH:STRENGTH (.oft, PEFT directory or file, LyCORIS/kohya file, or a folder of per-component PEFT directories).
        #[arg(required = true)]
        adapters: Vec<String>,
        /// How a strength is applied: geodesic (default, a rotation for every S) or a tool's own rule.
        #[arg(long, value_enum, default_value = "geodesic")]
        blend: Blend,
        #[command(flatten)]
        flags: BakeFlags,
    },
    /// Undo a bake exactly: apply the inverse of each adapter, in reverse order.
    Unmerge {
        /// The merged checkpoint.
        merged: PathBuf,
        /// The adapters that were baked, in the order they were baked (PATH or PATH:STRENGTH).
        #[arg(required = true)]
        adapters: Vec<String>,
        #[command(flatten)]
        flags: BakeFlags,
    },
    /// One adapter equal to applying A, then B, … (rotations multiplied, not blended).
    Compose {
        /// Adapters as PATH or PATH:STRENGTH, in the order they apply.
        #[arg(required = true)]
        adapters: Vec<String>,
        /// Output `.oft` file.
        #[arg(short, long)]
        output: PathBuf,
        /// Match layers of differently named adapters through this base's tensor names.
        #[arg(long)]
        base: Option<PathBuf>,
        /// Multiply consecutive Cayley stages with nesting block partitions into one stage.
        #[arg(long)]
        collapse: bool,
        #[arg(long)]
        json: bool,
    },
    /// A full finetune as an OFT adapter: per weight the block-diagonal rotation that best maps
    /// the base onto the finetune (orthogonal Procrustes per block), with how much it explains.
    Extract {
        /// Base checkpoint: a .safetensors file, a sharded folder or its *.safetensors.index.json, or a diffusers folder.
        base: PathBuf,
        /// The finetuned checkpoint, in the same layout (same tensor names, shapes and dtypes).
        finetuned: PathBuf,
        /// Output `.oft` file (bound to BASE).
        #[arg(short, long)]
        output: PathBuf,
        /// Features per rotation block; must divide the rotated dimension of each weight.
        #[arg(long, value_name = "B")]
        block_size: usize,
        /// Which side the rotation acts on: input (columns; PEFT ≥ 0.14, kohya oft_v2) or output
        /// (rows; LyCORIS, kohya legacy).
        #[arg(long, value_enum, default_value = "input")]
        side: SideArg,
        /// Tensor names to extract, as globs (default: every weight of two or more axes that differs).
        #[arg(long, value_name = "GLOB", num_args = 1..)]
        targets: Vec<String>,
        /// Worker threads (default: all cores); the output is the same for any value.
        #[arg(long)]
        threads: Option<usize>,
        /// No progress bar.
        #[arg(short, long)]
        quiet: bool,
        /// Print the per-layer report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Import any supported adapter layout and write it in another layout.
    Convert {
        input: PathBuf,
        /// Output path.
        #[arg(short, long)]
        output: PathBuf,
        /// Layout to write.
        #[arg(long, default_value = "oft", value_parser = layout_parser())]
        to: &'static Layout,
        /// The base checkpoint: `--to oft` binds the adapter to it (each target's shape and a
        /// blake3 hash of its tensor); other layouts use it to name modules, tell Conv2d from
        /// Linear, and measure how much a lossy conversion changes the merged weights.
        #[arg(long)]
        base: Option<PathBuf>,
        /// Write layers whose rotation the target can only approximate (the report says by how
        /// much) instead of refusing.
        #[arg(long)]
        allow_lossy: bool,
        /// Pack a directory layout (diffusers/PEFT) into one zip archive at the output path.
        #[arg(long)]
        zip: bool,
        /// --to onetrainer, diffusion transformers: OneTrainer's DIFFUSERS key layout
        /// (`transformer.transformer_blocks.0.attn.to_q`; fused layers split exactly) or its COMFY
        /// one (`diffusion_model.double_blocks.0.img_attn.qkv`; q, k, v layers with identical
        /// rotations fused). Default: the layout of --base; without it, the adapter's own names.
        #[arg(long, value_enum)]
        names: Option<NamesArg>,
        /// Print the per-layer report as JSON: exact / lossy (with figures) / impossible.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        lora: LoraFlags,
    },
    /// Developer checks of the candle compute path (scripts/gpu-check.sh, docs/gpu.md).
    #[command(hide = true)]
    DeviceCheck {
        #[command(subcommand)]
        check: DeviceCheck,
        /// Where the candle program runs: cpu (candle's CPU device), cuda, cuda:N or auto.
        #[arg(long, default_value = "cuda", global = true)]
        device: String,
    },
}

#[derive(Subcommand)]
enum DeviceCheck {
    /// Every adapted tensor of BASE through the candle program and the native CPU path.
    Parity {
        base: PathBuf,
        adapter: PathBuf,
        /// The library's merged weights, compared at the fixture tolerance.
        #[arg(long)]
        merged: Option<PathBuf>,
    },
    /// `parity` for every fixture case under DIR (its case.json names base, adapter, merged).
    ParityCases { dir: PathBuf },
    /// Two bakes of the same inputs, tensor by tensor (differences in ulps of the dtype).
    Compare { a: PathBuf, b: PathBuf },
    /// The candle program on one synthetic tensor resident on the device.
    Bench {
        /// f16, bf16, f32 or f64.
        #[arg(long, default_value = "f16")]
        dtype: String,
        #[arg(long)]
        rows: usize,
        #[arg(long)]
        cols: usize,
        #[arg(long, default_value_t = 32)]
        block: usize,
        /// Butterfly stages (1: plain OFT).
        #[arg(long, default_value_t = 1)]
        stages: usize,
        /// input or output.
        #[arg(long, default_value = "input")]
        side: String,
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Also time the native CPU path on the same tensor and compare.
        #[arg(long)]
        cpu: bool,
    },
    /// Device copy bandwidth and f32 matrix-product rate through candle.
    Ceilings {
        #[arg(long, default_value_t = 4 << 30)]
        copy_bytes: usize,
        #[arg(long, default_value_t = 8192)]
        n: usize,
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
}

/// `convert --to lora`: how many components to keep and which LoRA layout to write.
#[derive(clap::Args)]
struct LoraFlags {
    /// --to lora: keep K components per layer (default 32 when --energy is not given).
    #[arg(long, value_name = "K", conflicts_with = "energy")]
    rank: Option<usize>,
    /// --to lora: keep the smallest rank that holds a fraction E (0–1) of ‖ΔW‖²_F per layer.
    #[arg(long, value_name = "E")]
    energy: Option<f64>,
    /// --to lora with --energy: at most K components per layer.
    #[arg(long, value_name = "K", requires = "energy")]
    max_rank: Option<usize>,
    /// --to lora: the LoRA layout: a PEFT directory per component, or one kohya file.
    #[arg(long, value_enum)]
    layout: Option<LoraLayoutArg>,
    /// --to lora: worker threads (default: all cores); the output is the same for any value.
    #[arg(long)]
    threads: Option<usize>,
}

impl LoraFlags {
    fn given(&self) -> Option<&'static str> {
        if self.rank.is_some() {
            Some("--rank")
        } else if self.energy.is_some() {
            Some("--energy")
        } else if self.layout.is_some() {
            Some("--layout")
        } else if self.threads.is_some() {
            Some("--threads")
        } else {
            None
        }
    }

    fn rule(&self) -> Result<RankRule, Error> {
        match (self.rank, self.energy) {
            (Some(k), _) => Ok(RankRule::Fixed(k)),
            (None, Some(e)) if (0.0..=1.0).contains(&e) => Ok(RankRule::Energy {
                fraction: e,
                max_rank: self.max_rank,
            }),
            (None, Some(e)) => Err(Error::usage(format!(
                "--energy {e} is outside [0, 1] (the fraction of ‖ΔW‖² to keep, e.g. 0.9)"
            ))),
            (None, None) => Ok(RankRule::Fixed(DEFAULT_LORA_RANK)),
        }
    }
}

/// The rank `--to lora` keeps when neither `--rank` nor `--energy` is given.
const DEFAULT_LORA_RANK: usize = 32;

#[derive(Clone, Copy, ValueEnum)]
enum SideArg {
    Input,
    Output,
}

/// `convert --names`.
#[derive(Clone, Copy, ValueEnum)]
enum NamesArg {
    /// The diffusers transformer's module names.
    Diffusers,
    /// The original single-file layout's (fused attention) names.
    Original,
}

#[derive(Clone, Copy, ValueEnum)]
enum LoraLayoutArg {
    /// PEFT LoRA directories (PeftModel.from_pretrained; diffusers), one per component.
    Peft,
    /// A kohya `lora_unet_…` safetensors file (ComfyUI, A1111/Forge).
    Kohya,
}

impl Command {
    /// Whether the user asked for JSON output (errors are then reported in JSON too).
    fn json(&self) -> bool {
        match self {
            Command::Inspect { json, .. }
            | Command::Validate { json, .. }
            | Command::Compose { json, .. }
            | Command::Extract { json, .. }
            | Command::Convert { json, .. } => *json,
            Command::Merge { flags, .. } | Command::Unmerge { flags, .. } => flags.json,
            Command::DeviceCheck { .. } => false,
        }
    }
}

/// What a command prints on stdout, and its exit status.
struct Output {
    stdout: String,
    code: u8,
}

impl Output {
    fn new(stdout: String, code: u8) -> Self {
        Output { stdout, code }
    }
}

fn json<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_string_pretty(v) {
        Ok(s) => s + "\n",
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "oftool: cannot encode JSON: {e}");
            String::new()
        }
    }
}

/// A line on stderr (never panics, even when stderr is closed).
fn warn(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Split `PATH:S`. A path that exists as written is taken whole, so file names with colons
/// still work; otherwise a numeric suffix after the last `:` is the strength.
fn parse_adapter_arg(arg: &str) -> Result<AdapterArg, Error> {
    if Path::new(arg).exists() {
        return Ok(AdapterArg {
            path: arg.into(),
            strength: None,
        });
    }
    if let Some((head, tail)) = arg.rsplit_once(':')
        && let Ok(s) = tail.trim().parse::<f64>()
    {
        if !s.is_finite() {
            return Err(Error::usage(format!(
                "strength `{tail}` in `{arg}` is not a finite number"
            )));
        }
        return Ok(AdapterArg {
            path: head.into(),
            strength: Some(s),
        });
    }
    if let Some((head, tail)) = arg.rsplit_once(':')
        && Path::new(head).exists()
    {
        return Err(Error::usage(format!(
            "`{tail}` in `{arg}` is not a strength (ADAPTER:S takes a number, e.g. `{head}:0.5`)"
        )));
    }
    Ok(AdapterArg {
        path: arg.into(),
        strength: None,
    })
}

fn adapter_args(args: &[String]) -> Result<Vec<AdapterArg>, Error> {
    args.iter().map(|a| parse_adapter_arg(a)).collect()
}

/// A layout and its variant for people: `lycoris diag-oft`.
fn layout_name(layout: &str, variant: &Option<String>) -> String {
    match variant {
        Some(v) => format!("{layout} {v}"),
        None => layout.to_string(),
    }
}

fn report_export(r: &convert::ExportReport, as_json: bool) -> Output {
    for w in &r.warnings {
        warn(&format!("oftool: warning: {w}"));
    }
    let mut stdout = String::new();
    if as_json {
        stdout = json(r);
    } else if r.refused.is_none() {
        let lossy = if r.lossy > 0 {
            format!(
                ", {} lossy (largest rotation change {:.3e})",
                r.lossy, r.max_rotation_change
            )
        } else {
            String::new()
        };
        stdout = format!(
            "{} ({}) → {} ({}): {} layers exact{lossy}\n",
            r.input,
            layout_name(&r.layout, &r.variant),
            r.output,
            r.to,
            r.exact
        );
    }
    match &r.refused {
        Some(why) => {
            warn(&format!(
                "oftool: error[{}]: {why}; nothing was written",
                oftool::error::Category::Conversion
            ));
            Output::new(stdout, 1)
        }
        None => Output::new(stdout, 0),
    }
}

fn report_bake(s: &bake::MergeSummary, flags: &BakeFlags) -> Output {
    if let Some(note) = s.device_note.as_ref().filter(|_| !flags.quiet) {
        warn(&format!("oftool: note: {note}"));
    }
    if flags.json {
        return Output::new(json(s), 0);
    }
    if !flags.quiet {
        let skipped = if s.layers_skipped.is_empty() {
            String::new()
        } else {
            format!(
                "; skipped {} without a target: {}",
                s.layers_skipped.len(),
                s.layers_skipped.join(", ")
            )
        };
        let on = if s.device == "cpu" {
            String::new()
        } else {
            format!(" on {}", s.device)
        };
        warn(&format!(
            "baked {} layer(s) into {} tensor(s) of {} → {} ({:.1} MB in {:.2} s{on}){skipped}",
            s.layers_baked,
            s.tensors_rotated,
            s.base,
            s.output,
            s.bytes_written as f64 / 1e6,
            s.seconds,
        ));
    }
    Output::new(String::new(), 0)
}

fn report_compose(s: &compose::ComposeSummary, as_json: bool) -> Output {
    if as_json {
        return Output::new(json(s), 0);
    }
    let stacked = if s.stacked_targets > 0 {
        format!(", {} stacked target(s) (format 1.1)", s.stacked_targets)
    } else {
        String::new()
    };
    let collapsed = s
        .collapse
        .as_ref()
        .map(|c| {
            format!(
                "; collapsed {} layer(s), largest R change {:.2e}, kept stages in {}",
                c.collapsed_layers,
                c.max_r_change,
                c.kept.len()
            )
        })
        .unwrap_or_default();
    let line = format!(
        "composed {} adapter(s) → {}: {} layers, {} stages{stacked}{collapsed}\n",
        s.inputs.len(),
        s.output,
        s.layers,
        s.stages,
    );
    Output::new(line, 0)
}

#[allow(clippy::too_many_arguments)]
fn convert_command(
    input: &Path,
    output: &Path,
    to: &'static Layout,
    base: Option<&Path>,
    (allow_lossy, zip, names): (bool, bool, Option<NamesArg>),
    as_json: bool,
    lora: &LoraFlags,
) -> Result<Output, Error> {
    if names.is_some() && to.id != "onetrainer" {
        return Err(Error::usage(format!(
            "--names applies to --to onetrainer, not --to {}: PEFT takes the diffusers names, \
             ComfyUI and LyCORIS the names their loaders map onto either base",
            to.id
        )));
    }
    if let Writes::LowRank = to.writes {
        let Some(base) = base else {
            return Err(Error::usage(
                "--to lora needs --base BASE: a LoRA stores the weight change W′ − W, which \
                 depends on the base",
            ));
        };
        if allow_lossy {
            return Err(Error::usage(
                "--to lora needs no --allow-lossy: a LoRA is an approximation, and the report \
                 says how far it is",
            ));
        }
        let opts = bridge::lora::LoraOptions {
            base,
            rule: lora.rule()?,
            layout: match lora.layout {
                None | Some(LoraLayoutArg::Peft) => bridge::lora::LoraLayout::Peft,
                Some(LoraLayoutArg::Kohya) => bridge::lora::LoraLayout::Kohya,
            },
            threads: lora.threads,
            zip,
        };
        let progress = progress_bar(as_json);
        let r = bridge::lora::run(input, output, &opts, progress.as_ref())?;
        let text = if as_json {
            json(&r)
        } else {
            bridge::lora::render(&r)
        };
        return Ok(Output::new(text, 0));
    }
    if let Some(flag) = lora.given() {
        return Err(Error::usage(format!(
            "{flag} applies to --to lora, not --to {}",
            to.id
        )));
    }
    match to.writes {
        Writes::LowRank => {}
        Writes::Canonical => {}
        Writes::No(why) => return Err(layouts::not_writable(to, why)),
        Writes::Writer(_) => {
            let opts = convert::ExportOptions {
                names: names.map(|n| match n {
                    NamesArg::Diffusers => convert::Names::Diffusers,
                    NamesArg::Original => convert::Names::Original,
                }),
                base,
                allow_lossy,
                zip,
            };
            return convert::run_to(input, output, to, &opts).map(|r| report_export(&r, as_json));
        }
    }
    if zip || allow_lossy {
        return Err(Error::usage(
            "--zip and --allow-lossy apply to foreign layouts, not --to oft",
        ));
    }
    let s = convert::run(input, output, base)?;
    let text = if as_json {
        json(&s)
    } else {
        format!(
            "{} ({}) → {}: {} layers, {} parameters\n",
            s.input,
            layout_name(&s.layout, &s.variant),
            s.output,
            s.layers,
            s.parameters
        )
    };
    Ok(Output::new(text, 0))
}

fn run(command: Command) -> Result<Output, Error> {
    match command {
        Command::Inspect { file, json: j } => inspect::run(&file)
            .map(|r| Output::new(if j { json(&r) } else { inspect::render(&r) }, 0)),
        Command::Validate {
            file,
            base,
            json: j,
        } => validate::run(&file, base.as_deref()).map(|v| {
            let text = if j { json(&v) } else { validate::render(&v) };
            Output::new(text, if v.valid { 0 } else { 1 })
        }),
        Command::Merge {
            base,
            adapters,
            blend,
            flags,
        } => {
            let opts = flags.options()?;
            let inputs = bake::load_inputs(&adapter_args(&adapters)?, blend.into(), &base)?;
            let progress = flags.progress();
            bake::merge(&base, inputs, &flags.output, &opts, progress.as_ref())
                .map(|s| report_bake(&s, &flags))
        }
        Command::Unmerge {
            merged,
            adapters,
            flags,
        } => {
            let opts = flags.options()?;
            let args = adapter_args(&adapters)?;
            let progress = flags.progress();
            bake::unmerge(&merged, &args, &flags.output, &opts, progress.as_ref())
                .map(|s| report_bake(&s, &flags))
        }
        Command::Compose {
            adapters,
            output,
            base,
            collapse,
            json: j,
        } => compose::run(
            &adapter_args(&adapters)?,
            &output,
            base.as_deref(),
            collapse,
        )
        .map(|s| report_compose(&s, j)),
        Command::Extract {
            base,
            finetuned,
            output,
            block_size,
            side,
            targets,
            threads,
            quiet,
            json: j,
        } => {
            let opts = bridge::extract::Options {
                block_size,
                side: match side {
                    SideArg::Input => oftool::model::Side::Input,
                    SideArg::Output => oftool::model::Side::Output,
                },
                targets,
                threads,
            };
            let progress = progress_bar(quiet || j);
            bridge::extract::run(&base, &finetuned, &output, &opts, progress.as_ref()).map(|r| {
                let text = if j {
                    json(&r)
                } else {
                    bridge::extract::render(&r)
                };
                Output::new(text, 0)
            })
        }
        Command::Convert {
            input,
            output,
            to,
            base,
            allow_lossy,
            zip,
            names,
            json: j,
            lora,
        } => convert_command(
            &input,
            &output,
            to,
            base.as_deref(),
            (allow_lossy, zip, names),
            j,
            &lora,
        ),
        Command::DeviceCheck { check, device } => device_check(check, &device),
    }
}

fn device_check(check: DeviceCheck, device: &str) -> Result<Output, Error> {
    use oftool::device_check as dc;
    let dev = dc::device(device.parse()?)?;
    let mut lines = String::new();
    let v = match check {
        DeviceCheck::Parity {
            base,
            adapter,
            merged,
        } => dc::parity(&base, &adapter, merged.as_deref(), &dev)?,
        DeviceCheck::ParityCases { dir } => {
            let all = dc::parity_cases(&dir, &dev)?;
            for v in &all {
                lines.push_str(&format!("{v}\n"));
            }
            let ok = all.iter().all(|v| v["ok"] == serde_json::Value::Bool(true));
            serde_json::json!({ "mode": "parity-cases", "cases": all.len(), "ok": ok })
        }
        DeviceCheck::Compare { a, b } => dc::compare_files(&a, &b)?,
        DeviceCheck::Bench {
            dtype,
            rows,
            cols,
            block,
            stages,
            side,
            runs,
            cpu,
        } => {
            let dtype = match dtype.as_str() {
                "f16" => safetensors::Dtype::F16,
                "bf16" => safetensors::Dtype::BF16,
                "f32" => safetensors::Dtype::F32,
                "f64" => safetensors::Dtype::F64,
                _ => return Err(Error::usage(format!("unknown dtype `{dtype}`"))),
            };
            let side = match side.as_str() {
                "input" => oftool::model::Side::Input,
                "output" => oftool::model::Side::Output,
                _ => return Err(Error::usage(format!("unknown side `{side}`"))),
            };
            let spec = dc::BenchSpec {
                dtype,
                rows,
                cols,
                block,
                stages,
                side,
                runs,
                cpu,
            };
            dc::bench(&spec, &dev)?
        }
        DeviceCheck::Ceilings {
            copy_bytes,
            n,
            runs,
        } => dc::ceilings(&dev, copy_bytes, n, runs)?,
    };
    lines.push_str(&format!("{v}\n"));
    let failed = v["ok"] == serde_json::Value::Bool(false);
    Ok(Output::new(lines, u8::from(failed)))
}

/// Process setup: a file-size limit (`ulimit -f`) must surface as an ordinary write error
/// ("File too large"), not kill the process with SIGXFSZ midway; and freed tensor buffers stay
/// in the heap for reuse.
fn init_process() {
    #[cfg(unix)]
    // SAFETY: setting a signal disposition to SIG_IGN at startup, before any thread exists.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    // Bakes allocate a few tensor-sized buffers per tensor: keep freed memory in the heap for
    // reuse instead of returning it to the kernel and faulting fresh zeroed pages each time.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes glibc's allocator; called once at startup.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 512 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// Write `text` to stdout. A reader that went away (`| head`) is not an error: the output
/// simply has nobody to go to.
fn write_stdout(text: &str) -> Result<(), Error> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(Error::new(
            oftool::error::Category::Io,
            format!("cannot write to stdout: {e}"),
        )),
        _ => Ok(()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_process();
    let as_json = cli.command.json();
    let result = run(cli.command).and_then(|o| write_stdout(&o.stdout).map(|()| o.code));
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            if as_json {
                let _ = write_stdout(&json(&serde_json::json!({ "error": e.to_json() })));
            }
            warn(&format!("oftool: error[{}]: {e}", e.category()));
            if let Some(h) = e.hint_text() {
                warn(&format!("hint: {h}"));
            }
            ExitCode::from(e.exit_code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn adapter_arguments() {
        assert_eq!(
            parse_adapter_arg("style.oft:0.6").unwrap(),
            AdapterArg {
                path: "style.oft".into(),
                strength: Some(0.6)
            }
        );
        assert_eq!(parse_adapter_arg("a:b.oft").unwrap().strength, None);
        assert_eq!(parse_adapter_arg("x.oft:-1").unwrap().strength, Some(-1.0));
        assert!(parse_adapter_arg("x.oft:inf").is_err());
    }

    fn convert_help() -> String {
        let mut cmd = Cli::command();
        cmd.build();
        let convert = cmd
            .find_subcommand_mut("convert")
            .expect("convert subcommand");
        convert.render_long_help().to_string()
    }

    #[test]
    fn to_choices_and_their_help_come_from_the_registry() {
        let help = convert_help();
        for l in LAYOUTS {
            let listed = help.contains(&format!("- {}: ", l.id));
            match l.writes {
                Writes::No(_) => assert!(!listed, "{} is listed: {help}", l.id),
                Writes::Canonical | Writes::Writer(_) | Writes::LowRank => {
                    assert!(listed, "{} missing: {help}", l.id);
                    assert!(help.contains(l.about), "{}'s help line: {help}", l.id);
                }
            }
        }
    }

    #[test]
    fn to_accepts_every_id_and_alias() {
        for l in LAYOUTS {
            for name in std::iter::once(&l.id).chain(l.aliases) {
                let cli = Cli::try_parse_from(["oftool", "convert", "x", "-o", "y", "--to", name])
                    .unwrap_or_else(|e| panic!("--to {name}: {e}"));
                let Command::Convert { to, .. } = cli.command else {
                    panic!("not convert");
                };
                assert!(std::ptr::eq(to, *l), "--to {name}");
            }
        }
        assert!(
            Cli::try_parse_from(["oftool", "convert", "x", "-o", "y", "--to", "lokr"]).is_err()
        );
    }
}
