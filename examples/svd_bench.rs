//! Timing and accuracy of the truncated SVD behind `convert --to lora` (issue #15): nalgebra's
//! full SVD against faer's full thin SVD and faer's randomized range finder
//! (`oftool::lowrank`), on OFT-like weight changes of SD/SDXL and LLM layer sizes.
//!
//! ```sh
//! RAYON_NUM_THREADS=2 cargo run --release --example svd_bench -- [SIZES] [--nalgebra] [--no-full]
//! # SIZES: comma-separated ROWSxCOLS (default 320x320,1280x1280,5120x1280,1280x5120,4096x4096,14336x4096)
//! cargo run --release --example svd_bench -- 1280x1280 --threads-check   # same bits on 1, 2 and 5 threads?
//! ```
//!
//! Each ΔW is `W·(BD(R)ᵀ − I)` (input side, block size 32, Q entries ~ N(0, 0.02²)) with `W`
//! Gaussian (a flat spectrum: the hardest case for a randomized sketch). Per size it prints one
//! markdown row per method and rank: wall seconds, CPU seconds (all threads), and the relative
//! error `‖ΔW − B·A‖_F / ‖ΔW‖_F` with its excess over the optimum (the full SVD's tail).

use oftool::lowrank::{LowRank, Method, RankRule, approximate};
use std::time::Instant;

const RANKS: [usize; 3] = [32, 64, 128];

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 * 1e-6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, f64, f64) {
    let (c0, t0) = (cpu_seconds(), Instant::now());
    let out = f();
    (out, t0.elapsed().as_secs_f64(), cpu_seconds() - c0)
}

struct Rng(u64);

impl Rng {
    fn gaussian(&mut self) -> f64 {
        let mut next = || {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64 + 0.5 / (1u64 << 53) as f64
        };
        let (u1, u2) = (next(), next());
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// Row-major ΔW = W·(BD(R)ᵀ − I) on the input side, b = 32, through the crate's own bake.
fn oft_delta(rows: usize, cols: usize) -> Vec<f64> {
    use oftool::apply::PreparedStage;
    use oftool::model::{RotationMap, Side, Stage, StageSpec, Wiring};
    let b = 32;
    let mut rng = Rng(7);
    let scale = 1.0 / (cols as f64).sqrt();
    let w: Vec<f64> = (0..rows * cols).map(|_| rng.gaussian() * scale).collect();
    let blocks = cols / b;
    let q: Vec<f64> = (0..blocks * b * (b - 1) / 2)
        .map(|_| 0.02 * rng.gaussian())
        .collect();
    let stage = Stage {
        spec: StageSpec {
            truncated: false,
            blocks: Some(blocks as u64),
            block_size: b as u64,
            shared: false,
            wiring: Wiring::Identity,
            map: RotationMap::Cayley,
            q: "q".into(),
        },
        q,
        q_f64: true,
        inverse: false,
    };
    let mut rotated = w.clone();
    PreparedStage::<f64>::new(&stage, cols)
        .expect("a valid stage")
        .apply(Side::Input, &mut rotated, cols)
        .expect("sizes fit");
    rotated.iter().zip(&w).map(|(a, c)| a - c).collect()
}

fn row(size: &str, method: &str, k: &str, wall: f64, cpu: f64, err: Option<f64>, opt: Option<f64>) {
    let err_s = err.map_or("–".into(), |e| format!("{e:.5}"));
    let excess = match (err, opt) {
        (Some(e), Some(o)) => format!("{:+.1e}", e - o),
        _ => "–".into(),
    };
    println!("| {size} | {method} | {k} | {wall:.2} | {cpu:.2} | {err_s} | {excess} |");
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let nalgebra_too = args.iter().any(|a| a == "--nalgebra");
    let full_too = !args.iter().any(|a| a == "--no-full");
    let sizes: Vec<(usize, usize)> = args
        .iter()
        .find(|a| !a.starts_with("--"))
        .map(String::as_str)
        .unwrap_or("320x320,1280x1280,5120x1280,1280x5120,4096x4096,14336x4096")
        .split(',')
        .filter_map(|s| {
            let (r, c) = s.split_once('x')?;
            Some((r.parse().ok()?, c.parse().ok()?))
        })
        .collect();
    eprintln!("threads: {}", rayon::current_num_threads());
    if args.iter().any(|a| a == "--threads-check") {
        for &(rows, cols) in &sizes {
            let delta = oft_delta(rows, cols);
            for method in [
                Method::Full,
                Method::Randomized {
                    oversample: 16,
                    power_iters: 4,
                },
            ] {
                let run = |threads| {
                    rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .expect("a thread pool")
                        .install(|| {
                            approximate(&delta, rows, cols, RankRule::Fixed(64), method)
                                .expect("decomposition")
                        })
                };
                let one = run(1);
                let same = one == run(2) && one == run(5);
                println!(
                    "{rows}×{cols} {method:?}: 1, 2 and 5 threads give identical output: {same}"
                );
            }
        }
        return;
    }
    println!("| size | method | rank | wall s | cpu s | rel. error | vs optimum |");
    println!("|---|---|---|---|---|---|---|");
    for (rows, cols) in sizes {
        let size = format!("{rows}×{cols}");
        let delta = oft_delta(rows, cols);
        let mut optimum: Option<LowRank> = None;
        if full_too {
            let (lr, wall, cpu) = timed(|| {
                approximate(&delta, rows, cols, RankRule::Fixed(0), Method::Full).expect("full SVD")
            });
            row(&size, "faer full SVD", "all", wall, cpu, None, None);
            optimum = Some(lr);
        }
        if nalgebra_too {
            let (s, wall, cpu) = timed(|| {
                let m = nalgebra::DMatrix::from_row_slice(rows, cols, &delta);
                m.svd(true, true).singular_values
            });
            row(&size, "nalgebra full SVD", "all", wall, cpu, None, None);
            if let Some(o) = &optimum {
                let mut s: Vec<f64> = s.iter().copied().collect();
                s.sort_by(|x, y| y.total_cmp(x));
                let d = s
                    .iter()
                    .zip(&o.singular_values)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0, f64::max);
                eprintln!("{size}: nalgebra vs faer singular values differ by at most {d:.1e}");
            }
        }
        for k in RANKS {
            // The optimum at rank k, from the full SVD's singular values.
            let opt = optimum.as_ref().map(|o| {
                let s = &o.singular_values;
                let tail: f64 = s[k.min(s.len())..].iter().map(|x| x * x).sum();
                let all: f64 = s.iter().map(|x| x * x).sum();
                (tail / all).sqrt()
            });
            if let Some(o) = opt {
                row(
                    &size,
                    "faer full SVD (optimum)",
                    &k.to_string(),
                    0.0,
                    0.0,
                    Some(o),
                    opt,
                );
            }
            for (oversample, power_iters) in [(10, 2), (16, 4), (k, 2)] {
                let method = Method::Randomized {
                    oversample,
                    power_iters,
                };
                let (lr, wall, cpu) = timed(|| {
                    approximate(&delta, rows, cols, RankRule::Fixed(k), method).expect("randomized")
                });
                row(
                    &size,
                    &format!("faer randomized p={oversample} q={power_iters}"),
                    &k.to_string(),
                    wall,
                    cpu,
                    Some(lr.rel_error),
                    opt,
                );
            }
        }
    }
}
