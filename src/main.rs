//! The `oftool` command line: parses arguments and calls the library.

use clap::{Parser, Subcommand, ValueEnum};
use oftool::{bake, convert, inspect, validate};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "oftool",
    version,
    about = "Inspect, validate, convert and bake OFT/BOFT adapters"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Target {
    /// The spec-defined `.oft` format (spec/oft-format.md).
    Oft,
}

#[derive(Subcommand)]
enum Command {
    /// Show what an adapter holds: per layer target, side, stages, angles, constraint use.
    Inspect {
        /// A `.oft` file, a PEFT adapter directory or file, or a LyCORIS file.
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
        /// Adapters (.oft, PEFT directory or file, LyCORIS file, or a folder of per-component PEFT directories).
        #[arg(required = true)]
        adapters: Vec<PathBuf>,
        /// Output file (or folder, for sharded and diffusers bases).
        #[arg(short, long)]
        output: PathBuf,
        /// Worker threads (default: all cores); the output is the same for any value.
        #[arg(long)]
        threads: Option<usize>,
        /// Bake the layers that resolve and report the others, instead of failing.
        #[arg(long)]
        skip_missing: bool,
        /// Bake even if the adapter's base-binding hashes do not match this base.
        #[arg(long)]
        force: bool,
        /// No progress bar.
        #[arg(short, long)]
        quiet: bool,
        /// Print a JSON summary (layers baked, bytes, seconds, peak memory).
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
        /// Bind the adapter to this base checkpoint: record each target's shape and a blake3 hash
        /// of its tensor, so `merge` and `validate --base` can prove they use the same base.
        #[arg(long)]
        base: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

fn print_json<T: serde::Serialize>(v: &T) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("oftool: cannot encode JSON: {e}"),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    oftool::init_process();
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
            output,
            threads,
            skip_missing,
            force,
            quiet,
            json,
        } => {
            let opts = bake::MergeOptions {
                threads,
                skip_missing,
                force,
                progress: !quiet && !json,
            };
            bake::run(&base, &adapters, &output, &opts).map(|s| {
                if json {
                    print_json(&s);
                } else if !quiet {
                    eprintln!(
                        "baked {} layer(s) into {} tensor(s) of {} → {} ({:.1} MB in {:.2} s){}",
                        s.layers_baked,
                        s.tensors_rotated,
                        s.base,
                        s.output,
                        s.bytes_written as f64 / 1e6,
                        s.seconds,
                        if s.layers_skipped.is_empty() {
                            String::new()
                        } else {
                            format!(
                                "; skipped {} without a target: {}",
                                s.layers_skipped.len(),
                                s.layers_skipped.join(", ")
                            )
                        }
                    );
                }
                0
            })
        }
        Command::Convert {
            input,
            output,
            to: Target::Oft,
            base,
            json,
        } => convert::run(&input, &output, base.as_deref()).map(|s| {
            if json {
                print_json(&s);
            } else {
                println!(
                    "{} ({}) → {}: {} layers, {} parameters",
                    s.input, s.layout, s.output, s.layers, s.parameters
                );
            }
            0
        }),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("oftool: error: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
