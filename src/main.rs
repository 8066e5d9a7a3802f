//! The `oftool` command line: parses arguments and calls the library.

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::{Parser, Subcommand, ValueEnum};
use oftool::layouts::{self, LAYOUTS, Layout, Writes};
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
        /// Print the per-layer report as JSON: exact / lossy (with figures) / impossible.
        #[arg(long)]
        json: bool,
    },
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
        }
    }
}

fn print_json<T: serde::Serialize>(v: &T) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("oftool: cannot encode JSON: {e}"),
    }
}

/// A layout and its variant for people: `lycoris diag-oft`.
fn layout_name(layout: &str, variant: &Option<String>) -> String {
    match variant {
        Some(v) => format!("{layout} {v}"),
        None => layout.to_string(),
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
            r.input,
            layout_name(&r.layout, &r.variant),
            r.output,
            r.to,
            r.exact
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
        } => match to.writes {
            Writes::Canonical => {
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
                                s.input,
                                layout_name(&s.layout, &s.variant),
                                s.output,
                                s.layers,
                                s.parameters
                            );
                        }
                        0
                    })
                }
            }
            Writes::Writer(_) => {
                let opts = convert::ExportOptions {
                    base: base.as_deref(),
                    allow_lossy,
                    zip,
                };
                convert::run_to(&input, &output, to, &opts).map(|r| report_export(&r, json))
            }
            Writes::No(why) => Err(layouts::not_writable(to, why)),
        },
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

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
                Writes::Canonical | Writes::Writer(_) => {
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
            Cli::try_parse_from(["oftool", "convert", "x", "-o", "y", "--to", "lora"]).is_err()
        );
    }
}
