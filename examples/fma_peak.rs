//! This CPU's measured f32 FMA peak, and what oftool's rotation kernel achieves against it
//! (bench/run.sh `--llm` prints both; see bench/README.md).
//!
//! ```sh
//! cargo run --release --example fma_peak -- [--threads N] [--block B ...] [--rows R] [--cols C]
//! ```
//!
//! * **Peak**: every thread runs 12 independent chains of 8-wide AVX2 FMAs on registers (enough
//!   chains to cover the FMA latency on both FMA ports), for about half a second; 16 FLOP per
//!   FMA instruction. Measured on 1 thread and on N threads (default: all cores).
//! * **Rotation**: oftool's input-side rotation ([`oftool::apply::PreparedStage`], the kernel the
//!   CPU backend runs per chunk of rows) of an `R × C` f32 matrix (default 4096 × 4096, a Llama
//!   projection) by a Cayley stage of block size B (default 32 and 256) on a rayon pool of N
//!   threads: 2·B FLOP per weight, best of 5 runs.
//!
//! Prints one JSON object.

use oftool::apply::PreparedStage;
use oftool::model::{RotationMap, Side, Stage, StageSpec, Wiring};
use std::time::Instant;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_chains(iters: u64) -> f32 {
    use std::arch::x86_64::*;
    let a = _mm256_set1_ps(0.999_999);
    let b = _mm256_set1_ps(1e-7);
    let mut acc = [_mm256_set1_ps(1.0); 12];
    for _ in 0..iters {
        for x in acc.iter_mut() {
            *x = _mm256_fmadd_ps(*x, a, b);
        }
    }
    let mut s = _mm256_setzero_ps();
    for x in acc {
        s = _mm256_add_ps(s, x);
    }
    let mut out = [0f32; 8];
    // SAFETY: `out` holds 8 f32.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), s) };
    out.iter().sum()
}

/// GFLOP/s of `threads` threads running FMA chains at once.
fn peak(threads: usize) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        let iters: u64 = 40_000_000;
        let start = Instant::now();
        let sink: f32 = std::thread::scope(|s| {
            let hs: Vec<_> = (0..threads)
                // SAFETY: the CPU has AVX2 and FMA (checked above).
                .map(|_| s.spawn(move || unsafe { fma_chains(iters) }))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
        });
        let secs = start.elapsed().as_secs_f64();
        std::hint::black_box(sink);
        return threads as f64 * iters as f64 * 12.0 * 16.0 / secs / 1e9;
    }
    let _ = threads;
    f64::NAN
}

/// GFLOP/s of oftool's input-side rotation with block size `b` on a `rows × cols` matrix.
fn rotation(b: usize, rows: usize, cols: usize) -> Result<f64, String> {
    let blocks = cols / b;
    let tri = b * (b - 1) / 2;
    let q: Vec<f64> = (0..blocks * tri)
        .map(|i| ((i as f64 * 0.618).fract() - 0.5) * 0.006)
        .collect();
    let stage = Stage {
        spec: StageSpec {
            blocks: Some(blocks as u64),
            block_size: b as u64,
            shared: false,
            wiring: Wiring::Identity,
            map: RotationMap::Cayley,
            q: String::new(),
            truncated: false,
        },
        q,
        q_f64: false,
        inverse: false,
    };
    let prepared = PreparedStage::<f32>::new(&stage, cols).map_err(|e| e.to_string())?;
    let mut w: Vec<f32> = (0..rows * cols)
        .map(|i| ((i as f32 * 0.37).sin()) * 0.02)
        .collect();
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let start = Instant::now();
        prepared
            .apply(Side::Input, &mut w, cols)
            .map_err(|e| e.to_string())?;
        best = best.min(start.elapsed().as_secs_f64());
    }
    std::hint::black_box(&w);
    Ok(2.0 * b as f64 * (rows * cols) as f64 / best / 1e9)
}

fn main() {
    let mut threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (mut rows, mut cols) = (4096, 4096);
    let mut blocks = Vec::new();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    let usage = || -> ! {
        eprintln!("usage: fma_peak [--threads N] [--block B ...] [--rows R] [--cols C]");
        std::process::exit(2)
    };
    while let Some(a) = it.next() {
        let mut val = || -> usize {
            it.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| usage())
        };
        match a.as_str() {
            "--threads" => threads = val().max(1),
            "--block" => blocks.push(val().max(2)),
            "--rows" => rows = val(),
            "--cols" => cols = val(),
            _ => usage(),
        }
    }
    if blocks.is_empty() {
        blocks = vec![32, 256];
    }
    let one = peak(1);
    let all = peak(threads);
    let pool = match rayon::ThreadPoolBuilder::new().num_threads(threads).build() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("fma_peak: {e}");
            std::process::exit(1)
        }
    };
    let mut rot = serde_json::Map::new();
    for b in blocks {
        if !cols.is_multiple_of(b) {
            eprintln!("fma_peak: block {b} does not divide {cols} columns");
            std::process::exit(2);
        }
        match pool.install(|| rotation(b, rows, cols)) {
            Ok(g) => {
                rot.insert(
                    format!("b{b}"),
                    serde_json::json!({
                        "gflops": (g * 10.0).round() / 10.0,
                        "of_peak": (g / all * 1000.0).round() / 1000.0,
                    }),
                );
            }
            Err(e) => {
                eprintln!("fma_peak: {e}");
                std::process::exit(1)
            }
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "threads": threads,
            "peak_gflops_1_thread": (one * 10.0).round() / 10.0,
            "peak_gflops": (all * 10.0).round() / 10.0,
            "rotation": { "rows": rows, "cols": cols, "blocks": rot },
        })
    );
}
