//! The `oftool` command line: parses arguments and calls the library.

use clap::{Parser, Subcommand, ValueEnum};
use oftool::strength::BlendMode;
use oftool::{bake, compose, convert, inspect, validate};
use std::path::PathBuf;
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

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum Target {
    /// The spec-defined `.oft` format (spec/oft-format.md).
    Oft,
    /// A PEFT ≥ 0.18 adapter directory per diffusers component (`PeftModel.from_pretrained`).
    #[value(alias = "peft")]
    Diffusers,
    /// LyCORIS `oft_blocks` under kohya names, as ComfyUI loads them.
    Comfyui,
    /// LyCORIS (`lycoris.kohya`) diag-oft / BOFT.
    Lycoris,
    /// kohya sd-scripts: `networks.oft` (output side) or `networks.oft_v2` (input side).
    Kohya,
    /// OneTrainer `OFT_2` (KOHYA key layout; also read by the ComfyUI-OFTv2 node).
    Onetrainer,
}

impl Target {
    fn export(self) -> Option<oftool::export::To> {
        use oftool::export::To;
        match self {
            Target::Oft => None,
            Target::Diffusers => Some(To::Peft),
            Target::Comfyui => Some(To::ComfyUi),
            Target::Lycoris => Some(To::Lycoris),
            Target::Kohya => Some(To::Kohya),
            Target::Onetrainer => Some(To::OneTrainer),
        }
    }
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
    /// Print a JSON summary (layers baked, bytes, seconds, peak memory).
    #[arg(long)]
    json: bool,
}

impl BakeFlags {
    fn options(&self) -> bake::MergeOptions {
        bake::MergeOptions {
            threads: self.threads,
            skip_missing: self.skip_missing,
            force: self.force,
            progress: !self.quiet && !self.json,
        }
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
        /// Base checkpoint (safetensors) to check targets, shapes and binding hashes against.
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
    /// Import any supported adapter layout and write it in another layout.
    Convert {
        input: PathBuf,
        /// Output path.
        #[arg(short, long)]
        output: PathBuf,
        /// Layout to write.
        #[arg(long, value_enum, default_value = "oft")]
        to: Target,
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
        /// Print the per-layer report as JSON: exact / lossy (with figures) / impossible.
        #[arg(long)]
        json: bool,
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

fn device_check(check: DeviceCheck, device: &str) -> oftool::Result<u8> {
    use oftool::device_check as dc;
    use oftool::error::Error;
    let dev = dc::device(device.parse()?)?;
    let v = match check {
        DeviceCheck::Parity {
            base,
            adapter,
            merged,
        } => dc::parity(&base, &adapter, merged.as_deref(), &dev)?,
        DeviceCheck::ParityCases { dir } => {
            let all = dc::parity_cases(&dir, &dev)?;
            for v in &all {
                println!("{v}");
            }
            let ok = all.iter().all(|v| v["ok"] == serde_json::Value::Bool(true));
            serde_json::json!({ "mode": "parity-cases", "cases": all.len(), "ok": ok })
        }
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
    println!("{v}");
    Ok(if v["ok"] == serde_json::Value::Bool(false) {
        1
    } else {
        0
    })
}

impl Command {
    /// Whether the user asked for JSON output (errors are then reported in JSON too).
    fn json(&self) -> bool {
        match self {
            Command::Inspect { json, .. }
            | Command::Validate { json, .. }
            | Command::Compose { json, .. }
            | Command::Convert { json, .. } => *json,
            Command::Merge { flags, .. } | Command::Unmerge { flags, .. } => flags.json,
            Command::DeviceCheck { .. } => false,
        }
    }
}

fn print_json<T: serde::Serialize>(v: &T) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("oftool: cannot encode JSON: {e}"),
    }
}

fn report_export(r: &convert::ExportReport, json: bool) -> u8 {
    for w in &r.warnings {
        eprintln!("oftool: warning: {w}");
    }
    if json {
        print_json(r);
    } else if r.refused.is_none() {
        let lossy = if r.lossy > 0 {
            format!(
                ", {} lossy (largest rotation change {:.3e})",
                r.lossy, r.max_rotation_change
            )
        } else {
            String::new()
        };
        println!(
            "{} ({}) → {} ({}): {} layers exact{lossy}",
            r.input, r.layout, r.output, r.to, r.exact
        );
    }
    match &r.refused {
        Some(why) => {
            eprintln!("oftool: error: {why}; nothing was written");
            1
        }
        None => 0,
    }
}

fn report_bake(s: &bake::MergeSummary, flags: &BakeFlags) -> u8 {
    if flags.json {
        print_json(s);
    } else if !flags.quiet {
        let skipped = if s.layers_skipped.is_empty() {
            String::new()
        } else {
            format!(
                "; skipped {} without a target: {}",
                s.layers_skipped.len(),
                s.layers_skipped.join(", ")
            )
        };
        eprintln!(
            "baked {} layer(s) into {} tensor(s) of {} → {} ({:.1} MB in {:.2} s){skipped}",
            s.layers_baked,
            s.tensors_rotated,
            s.base,
            s.output,
            s.bytes_written as f64 / 1e6,
            s.seconds,
        );
    }
    0
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    oftool::init_process();
    let json = cli.command.json();
    let result = match cli.command {
        Command::Inspect { file, json } => inspect::run(&file).map(|r| {
            if json {
                print_json(&r);
            } else {
                print!("{}", inspect::render(&r));
            }
            0
        }),
        Command::Validate { file, base, json } => validate::run(&file, base.as_deref()).map(|v| {
            if json {
                print_json(&v);
            } else {
                print!("{}", validate::render(&v));
            }
            if v.valid { 0 } else { 1 }
        }),
        Command::Merge {
            base,
            adapters,
            blend,
            flags,
        } => bake::load_inputs(&adapters, blend.into())
            .and_then(|inputs| bake::run(&base, inputs, &flags.output, &flags.options()))
            .map(|s| report_bake(&s, &flags)),
        Command::Unmerge {
            merged,
            adapters,
            flags,
        } => bake::unmerge(&merged, &adapters, &flags.output, &flags.options())
            .map(|s| report_bake(&s, &flags)),
        Command::Compose {
            adapters,
            output,
            base,
            collapse,
            json,
        } => compose::run(&adapters, &output, base.as_deref(), collapse).map(|s| {
            if json {
                print_json(&s);
            } else {
                println!(
                    "composed {} adapter(s) → {}: {} layers, {} stages{}{}",
                    s.inputs.len(),
                    s.output,
                    s.layers,
                    s.stages,
                    if s.stacked_targets > 0 {
                        format!(", {} stacked target(s) (format 1.1)", s.stacked_targets)
                    } else {
                        String::new()
                    },
                    s.collapse
                        .as_ref()
                        .map(|c| format!(
                            "; collapsed {} layer(s), largest R change {:.2e}, kept stages in {}",
                            c.collapsed_layers,
                            c.max_r_change,
                            c.kept.len()
                        ))
                        .unwrap_or_default()
                );
            }
            0
        }),
        Command::Convert {
            input,
            output,
            to,
            base,
            allow_lossy,
            zip,
            json,
        } => match to.export() {
            None => {
                if zip || allow_lossy {
                    Err(oftool::error::Error::usage(
                        "--zip and --allow-lossy apply to foreign layouts, not --to oft",
                    ))
                } else {
                    convert::run(&input, &output, base.as_deref()).map(|s| {
                        if json {
                            print_json(&s);
                        } else {
                            println!(
                                "{} ({}) → {}: {} layers, {} parameters",
                                s.input, s.layout, s.output, s.layers, s.parameters
                            );
                        }
                        0
                    })
                }
            }
            Some(target) => {
                let opts = convert::ExportOptions {
                    base: base.as_deref(),
                    allow_lossy,
                    zip,
                };
                convert::run_to(&input, &output, target, &opts).map(|r| report_export(&r, json))
            }
        },
        Command::DeviceCheck { check, device } => device_check(check, &device),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            if json {
                print_json(&serde_json::json!({ "error": e.to_json() }));
            }
            eprintln!("oftool: error[{}]: {e}", e.category());
            if let Some(h) = e.hint_text() {
                eprintln!("hint: {h}");
            }
            ExitCode::from(e.exit_code())
        }
    }
}
