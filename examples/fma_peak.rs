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
//! * **Rotation**: oftool's input-side rotation ([`oftool::apply::PreparedStage`]) of an
//!   `R × C` f32 matrix (default 4096 × 4096, a Llama projection) by a Cayley stage of block
//!   size B (default 32 and 256) on a rayon pool of N threads, 2·B FLOP per weight, best of 5
//!   runs, four ways (see `rotation`): `apply` (whole matrix), `kernel` (oftool's packed AVX2
//!   kernel per chunk of rows), `gemm_crate` (the same chunks through the `gemm` crate, with the
//!   largest difference from `kernel`) and `bf16_bake` (what the bake runs on a BF16 tensor,
//!   conversions included). `of_peak` gives each against the N-thread peak.
//!
//! Prints one JSON object.

use oftool::apply::{INPUT_CHUNK_ROWS, PreparedStage, bf16_to_f32s, f32_to_bf16s};
use oftool::model::{RotationMap, Side, Stage, StageSpec, Wiring};
use rayon::prelude::*;
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

/// A Cayley stage of `cols / b` blocks of size `b` with small pseudo-random parameters.
fn stage(b: usize, cols: usize) -> Stage {
    let blocks = cols / b;
    let tri = b * (b - 1) / 2;
    let q: Vec<f64> = (0..blocks * tri)
        .map(|i| ((i as f64 * 0.618).fract() - 0.5) * 0.006)
        .collect();
    Stage {
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
    }
}

/// Best of 5 timings of `f`, in seconds.
fn best_of(mut f: impl FnMut()) -> f64 {
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let start = Instant::now();
        f();
        best = best.min(start.elapsed().as_secs_f64());
    }
    best
}

/// What each way of rotating a `rows × cols` f32 matrix by a stage of block size `b` achieves
/// (GFLOP/s; 2·b FLOP per weight):
/// * `apply`: [`PreparedStage::apply`] on the whole matrix in place (allocates per chunk);
/// * `kernel`: [`PreparedStage::apply_input_into`] chunk by chunk ([`INPUT_CHUNK_ROWS`] rows)
///   into a second buffer — what the bake's fused 16-bit path runs;
/// * `gemm_crate`: the same chunks through the `gemm` crate (one call per block, no
///   parallelism inside; the chunks are spread over the pool as above);
/// * `bf16_bake`: the bake's fused path with its conversions: per chunk and block, the BF16
///   columns widened into a contiguous f32 buffer, rotated by the kernel
///   ([`PreparedStage::rotate_blocks`], 256 columns at a time; `cols` a multiple of that), rounded back in place ([`oftool::apply::bf16_to_f32s`], [`oftool::apply::f32_to_bf16s`]).
fn rotation(b: usize, rows: usize, cols: usize) -> Result<serde_json::Value, String> {
    let prepared = PreparedStage::<f32>::new(&stage(b, cols), cols).map_err(|e| e.to_string())?;
    let blocks: Vec<Vec<f32>> = prepared.blocks().to_vec();
    let w: Vec<f32> = (0..rows * cols)
        .map(|i| ((i as f32 * 0.37).sin()) * 0.02)
        .collect();
    let flop = 2.0 * b as f64 * (rows * cols) as f64;
    let gflops = |secs: f64| (flop / secs / 1e8).round() / 10.0;
    let chunk = INPUT_CHUNK_ROWS * cols;

    let mut whole = w.clone();
    let apply = best_of(|| {
        let _ = prepared.apply(Side::Input, &mut whole, cols);
    });

    let mut out = vec![0f32; w.len()];
    let kernel = best_of(|| {
        out.par_chunks_mut(chunk)
            .zip(w.par_chunks(chunk))
            .for_each(|(d, s)| {
                prepared.apply_input_into(s, d, cols);
            })
    });
    let reference = out.clone();

    let gemm_crate = best_of(|| {
        out.par_chunks_mut(chunk)
            .zip(w.par_chunks(chunk))
            .for_each(|(d, s)| {
                let m = s.len() / cols;
                for (k, r) in blocks.iter().enumerate() {
                    // SAFETY: block k's columns of m rows of stride `cols` lie in s and d;
                    // R is b × b (Rᵀ read through its strides).
                    unsafe {
                        gemm::gemm(
                            m,
                            b,
                            b,
                            d.as_mut_ptr().add(k * b),
                            1,
                            cols as isize,
                            false,
                            s.as_ptr().add(k * b),
                            1,
                            cols as isize,
                            r.as_ptr(),
                            b as isize,
                            1,
                            0.0,
                            1.0,
                            false,
                            false,
                            false,
                            gemm::Parallelism::None,
                        )
                    }
                }
            })
    });
    let gemm_diff = out
        .iter()
        .zip(&reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);

    let halves: Vec<half::bf16> = w.iter().map(|&x| half::bf16::from_f32(x)).collect();
    let mut h = halves.clone();
    let bf16_bake = best_of(|| {
        h.copy_from_slice(&halves);
        h.par_chunks_mut(chunk).for_each_init(
            || (vec![0f32; chunk], vec![0f32; chunk]),
            |(a, d), c| {
                // As the bake does it (bake/backend/cpu.rs `rotate_blockwise`): 256 columns
                // (whole blocks) at a time, widened into a contiguous buffer, rotated, rounded back.
                let rows = c.len() / cols;
                let width = (256 / b).max(1) * b;
                let (a, d) = (&mut a[..rows * width], &mut d[..rows * width]);
                for g in 0..cols / width {
                    let lo = g * width;
                    for (r, s) in a.chunks_exact_mut(width).enumerate() {
                        bf16_to_f32s(&c[r * cols + lo..r * cols + lo + width], s);
                    }
                    prepared.rotate_blocks(lo / b, width / b, a, d);
                    for (r, v) in d.chunks_exact(width).enumerate() {
                        f32_to_bf16s(v, &mut c[r * cols + lo..r * cols + lo + width]);
                    }
                }
            },
        )
    });
    Ok(serde_json::json!({
        "apply": gflops(apply),
        "kernel": gflops(kernel),
        "gemm_crate": gflops(gemm_crate),
        "gemm_crate_max_abs_diff": gemm_diff,
        "bf16_bake": gflops(bf16_bake),
    }))
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
            Ok(mut g) => {
                let of_peak = |x: &serde_json::Value| {
                    x.as_f64()
                        .map(|v| (v / all * 1000.0).round() / 1000.0)
                        .unwrap_or(f64::NAN)
                };
                let share = serde_json::json!({
                    "kernel": of_peak(&g["kernel"]),
                    "gemm_crate": of_peak(&g["gemm_crate"]),
                    "bf16_bake": of_peak(&g["bf16_bake"]),
                });
                g["of_peak"] = share;
                rot.insert(format!("b{b}"), g);
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
