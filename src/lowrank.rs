//! Best low-rank approximations of a dense weight change ΔW (f64), for writing an adapter as a
//! LoRA: `ΔW ≈ B·A` with `B = U_k·√Σ_k` (`lora_B`, `rows × k`) and `A = √Σ_k·V_kᵀ` (`lora_A`,
//! `k × cols`), so that a LoRA runtime with `alpha = rank` applies exactly `B·A`.
//!
//! The rank is fixed ([`RankRule::Fixed`]) or the smallest that keeps a fraction of
//! `‖ΔW‖²_F` ([`RankRule::Energy`], optionally capped). Two ways to get there, both on faer
//! (chosen over nalgebra by measurement, `examples/svd_bench.rs`):
//!
//! * [`Method::Full`]: the thin SVD. Exact (the Eckart–Young optimum); the relative error comes
//!   from the tail singular values, `√(Σ_{i>k} σᵢ²) / ‖ΔW‖_F`.
//! * [`Method::Randomized`]: a randomized range finder (Halko, Martinsson & Tropp 2011, alg. 4.4:
//!   Gaussian sketch, power iterations re-orthonormalised by QR) and the SVD of the small
//!   projected matrix. Near-optimal, much faster on large layers; its error is measured
//!   directly, `‖ΔW − B·A‖_F / ‖ΔW‖_F`. The sketch is seeded by a fixed constant.
//!
//! The same input gives the same bits for any number of threads: faer splits its work a fixed
//! number of ways ([`FAER_SPLIT`]) whatever the size of the rayon pool it runs on.
//!
//! [`Method::Auto`] takes the full SVD up to [`AUTO_FULL_MAX_DIM`] and the randomized one beyond.
//! The input is the 2-D view of the weight (row-major, `rows × cols`): a Conv2d change
//! `[out, in, kh, kw]` is passed as `out × (in·kh·kw)` and the caller reshapes `A` into
//! `lora_down` `[k, in, kh, kw]` and `B` into `lora_up` `[out, k, 1, 1]`.

use crate::error::{Category, Error};
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};

/// How many components to keep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RankRule {
    /// Exactly `min(k, rows, cols)` components (zero ones included, so every layer of an adapter
    /// can share one rank).
    Fixed(usize),
    /// The smallest rank whose approximation keeps at least `fraction` of `‖ΔW‖²_F` (`0 ≤
    /// fraction ≤ 1`), at most `max_rank` when given (the cap wins over the fraction).
    Energy {
        /// Share of `‖ΔW‖²_F` to keep, in `[0, 1]`.
        fraction: f64,
        /// Largest rank to keep, whatever the fraction.
        max_rank: Option<usize>,
    },
}

/// Which decomposition computes the approximation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// [`Method::Full`] when `min(rows, cols) ≤ AUTO_FULL_MAX_DIM` or the rank needed is not small
    /// against it, or the rule is an uncapped energy fraction; else [`Method::Randomized`] with
    /// the default sketch ([`DEFAULT_OVERSAMPLE`], [`DEFAULT_POWER_ITERS`]).
    Auto,
    /// Thin SVD of the whole matrix.
    Full,
    /// Randomized range finder: sketch `k + oversample` columns, `power_iters` passes of `ΔWᵀ`
    /// and `ΔW`. Needs a bound on the rank: [`RankRule::Fixed`] or a capped energy rule.
    Randomized {
        /// Extra sketch columns beyond the rank.
        oversample: usize,
        /// Power iterations (passes of `ΔWᵀ` and `ΔW`).
        power_iters: usize,
    },
}

/// Largest `min(rows, cols)` for which [`Method::Auto`] takes the full SVD: every layer of
/// SD1.x/SDXL (≤ 1280 on the short side) gets the exact optimum; LLM layers (4096 and up) the
/// randomized one (the full SVD there takes about a minute each on two cores).
pub const AUTO_FULL_MAX_DIM: usize = 2048;
/// Extra sketch columns beyond the rank (Halko et al. recommend 5–10; more helps flat spectra).
pub const DEFAULT_OVERSAMPLE: usize = 16;
/// Power iterations: weight changes of OFT adapters have flat spectra, where each pass brings
/// the error noticeably closer to the optimum (bench: +1.7e-2 → +6e-3 from 2 to 4 at rank 128).
pub const DEFAULT_POWER_ITERS: usize = 4;

/// Which computation a [`LowRank`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MethodUsed {
    /// ΔW was zero: no decomposition ran.
    Zero,
    /// The thin SVD of the whole matrix.
    Full,
    /// The randomized range finder, with this sketch.
    Randomized {
        /// Extra sketch columns beyond the rank.
        oversample: usize,
        /// Power iterations.
        power_iters: usize,
    },
}

/// A rank-`rank` factorisation `ΔW ≈ B·A`.
#[derive(Debug, Clone, PartialEq)]
pub struct LowRank {
    /// Rows of ΔW (and of `b`).
    pub rows: usize,
    /// Columns of ΔW (and of `a`).
    pub cols: usize,
    /// The rank kept.
    pub rank: usize,
    /// `U_k·√Σ_k`, row-major `rows × rank` (`lora_B` / `lora_up`).
    pub b: Vec<f64>,
    /// `√Σ_k·V_kᵀ`, row-major `rank × cols` (`lora_A` / `lora_down`).
    pub a: Vec<f64>,
    /// Every singular value the decomposition produced, descending: all `min(rows, cols)` for
    /// the full SVD, the sketch's for the randomized one (the first `rank` are the kept ones).
    pub singular_values: Vec<f64>,
    /// `‖ΔW‖_F`.
    pub norm: f64,
    /// `‖ΔW − B·A‖_F / ‖ΔW‖_F`; 0 when ΔW is zero.
    pub rel_error: f64,
    /// Whether `rel_error` was measured directly (randomized) rather than derived from the tail
    /// singular values (full).
    pub error_measured: bool,
    /// The decomposition that ran.
    pub method: MethodUsed,
}

impl LowRank {
    /// Fraction of `‖ΔW‖²_F` the approximation keeps (1 when ΔW is zero).
    pub fn energy_kept(&self) -> f64 {
        1.0 - self.rel_error * self.rel_error
    }
}

/// Ways faer splits each factorisation and product (run on the current rayon pool). A
/// constant rather than the pool's size: faer's results depend on the split, and the output must
/// be the same for any `--threads`.
pub const FAER_SPLIT: usize = 4;

/// The parallelism for faer, set as its global one too (its factorisation methods read that).
pub(crate) fn faer_par() -> Par {
    let par = Par::rayon(FAER_SPLIT);
    faer::set_global_parallelism(par);
    par
}

/// Seed of the randomized sketch (fixed: reproducible output).
const SKETCH_SEED: u64 = 0x6f66_746f_6f6c_0015;

/// The best rank-k factorisation of the row-major `rows × cols` matrix `delta` under `rule`.
pub fn approximate(
    delta: &[f64],
    rows: usize,
    cols: usize,
    rule: RankRule,
    method: Method,
) -> Result<LowRank, Error> {
    if rows.checked_mul(cols) != Some(delta.len()) {
        return Err(Error::new(
            Category::TargetShape,
            format!(
                "{} values do not fill a {rows} × {cols} matrix",
                delta.len()
            ),
        ));
    }
    if let RankRule::Energy { fraction, .. } = rule
        && !(0.0..=1.0).contains(&fraction)
    {
        return Err(Error::new(
            Category::Usage,
            format!("energy fraction {fraction} is outside [0, 1]"),
        )
        .hint("pass a fraction such as 0.9 (keep 90% of ‖ΔW‖²)"));
    }
    if delta.iter().any(|x| !x.is_finite()) {
        return Err(Error::new(
            Category::NonFinite,
            "the weight change holds NaN or infinite values",
        ));
    }
    let short = rows.min(cols);
    let total: f64 = delta.iter().map(|x| x * x).sum();
    if !total.is_finite() {
        return Err(Error::new(
            Category::NonFinite,
            "the weight change is too large to square in f64",
        ));
    }
    if total == 0.0 || short == 0 {
        let rank = match rule {
            RankRule::Fixed(k) => k.min(short),
            RankRule::Energy { .. } => 0,
        };
        return Ok(LowRank {
            rows,
            cols,
            rank,
            b: vec![0.0; rows * rank],
            a: vec![0.0; rank * cols],
            singular_values: vec![0.0; short],
            norm: total.sqrt(),
            rel_error: 0.0,
            error_measured: false,
            method: MethodUsed::Zero,
        });
    }
    // Work on the tall orientation (faer's SVD is several times slower on wide matrices): the
    // row-major buffer of a wide ΔW is the column-major buffer of its tall transpose.
    let wide = rows < cols;
    let view = if wide {
        MatRef::from_column_major_slice(delta, cols, rows)
    } else {
        MatRef::from_row_major_slice(delta, rows, cols)
    };
    let bound = match rule {
        RankRule::Fixed(k) => Some(k.min(short)),
        RankRule::Energy { max_rank, .. } => max_rank.map(|k| k.min(short)),
    };
    let method = match (method, bound) {
        (Method::Auto, Some(k)) if short > AUTO_FULL_MAX_DIM && 4 * k <= short => {
            Method::Randomized {
                oversample: DEFAULT_OVERSAMPLE,
                power_iters: DEFAULT_POWER_ITERS,
            }
        }
        (Method::Auto, _) => Method::Full,
        (Method::Randomized { .. }, None) => {
            return Err(Error::new(
                Category::Usage,
                "a randomized decomposition needs a rank bound",
            )
            .hint("give a fixed rank or a maximum rank with the energy fraction"));
        }
        (m, _) => m,
    };
    let par = faer_par();
    // Tall factors: view (≈ u·diag(s)·vᵀ), u `long × n`, v `short × n`.
    let (u, s, v, used) = match method {
        Method::Randomized {
            oversample,
            power_iters,
        } => {
            let l = bound
                .unwrap_or(short)
                .saturating_add(oversample)
                .clamp(1, short);
            let Thin { u, s, v } = randomized(view, l, power_iters, par)?;
            (
                u,
                s,
                v,
                MethodUsed::Randomized {
                    oversample,
                    power_iters,
                },
            )
        }
        _ => {
            let svd = view.thin_svd().map_err(no_convergence)?;
            let s: Vec<f64> = svd.S().column_vector().iter().copied().collect();
            (svd.U().to_owned(), s, svd.V().to_owned(), MethodUsed::Full)
        }
    };
    // tail[k] = Σ_{i ≥ k} σᵢ², summed from the smallest for accuracy.
    let mut tail = vec![0.0; s.len() + 1];
    for i in (0..s.len()).rev() {
        tail[i] = tail[i + 1] + s[i] * s[i];
    }
    let randomized_used = matches!(used, MethodUsed::Randomized { .. });
    let rank = match rule {
        RankRule::Fixed(k) => k.min(s.len()),
        RankRule::Energy { fraction, max_rank } => {
            let cap = max_rank.unwrap_or(s.len()).min(s.len());
            // Energy left out by keeping k components: the tail for a full SVD; for a sketch,
            // everything outside the kept components (what the sketch missed included).
            let left_out = |k: usize| {
                if randomized_used {
                    total - (tail[0] - tail[k])
                } else {
                    tail[k]
                }
            };
            let reference = if randomized_used { total } else { tail[0] };
            (0..=cap)
                .find(|&k| left_out(k) <= (1.0 - fraction) * reference)
                .unwrap_or(cap)
        }
    };
    let (b, a) = factors(&u, &s, &v, rank, wide);
    let (rel_error, error_measured) = if randomized_used {
        (measured_error(delta, cols, &b, &a, rank, total), true)
    } else {
        ((tail[rank] / tail[0]).sqrt(), false)
    };
    Ok(LowRank {
        rows,
        cols,
        rank,
        b,
        a,
        singular_values: s,
        norm: total.sqrt(),
        rel_error,
        error_measured,
        method: used,
    })
}

fn no_convergence(_: faer::linalg::svd::SvdError) -> Error {
    Error::new(
        Category::Algebra,
        "the singular value decomposition did not converge",
    )
}

/// `B = U_k·√Σ_k` and `A = √Σ_k·V_kᵀ` in the caller's orientation, each singular pair signed so
/// that the largest entry of its right vector is positive (a deterministic choice).
fn factors(u: &Mat<f64>, s: &[f64], v: &Mat<f64>, k: usize, wide: bool) -> (Vec<f64>, Vec<f64>) {
    // Tall view = u·Σ·vᵀ. Not wide: ΔW = view, left = u, right = v.
    // Wide: ΔW = viewᵀ = v·Σ·uᵀ, left = v, right = u.
    let (left, right) = if wide { (v, u) } else { (u, v) };
    let (rows, cols) = (left.nrows(), right.nrows());
    let mut b = vec![0.0; rows * k];
    let mut a = vec![0.0; k * cols];
    for j in 0..k {
        let root = s[j].max(0.0).sqrt();
        let col = right.col(j);
        let (mut big, mut sign) = (0.0f64, 1.0);
        for x in col.iter() {
            if x.abs() > big {
                big = x.abs();
                sign = x.signum();
            }
        }
        let f = root * sign;
        for i in 0..rows {
            b[i * k + j] = left[(i, j)] * f;
        }
        for (c, x) in col.iter().enumerate() {
            a[j * cols + c] = x * f;
        }
    }
    (b, a)
}

/// `‖ΔW − B·A‖_F / ‖ΔW‖_F`, computed in row panels (no second full-size buffer).
fn measured_error(delta: &[f64], cols: usize, b: &[f64], a: &[f64], k: usize, total: f64) -> f64 {
    use rayon::prelude::*;
    const PANEL: usize = 256;
    let sum: f64 = delta
        .par_chunks(PANEL * cols)
        .enumerate()
        .map(|(p, chunk)| {
            let m = chunk.len() / cols;
            let mut r = chunk.to_vec();
            let bp = MatRef::from_row_major_slice(&b[p * PANEL * k..(p * PANEL + m) * k], m, k);
            let ap = MatRef::from_row_major_slice(a, k, cols);
            let rm = faer::MatMut::from_row_major_slice_mut(&mut r, m, cols);
            matmul(rm, Accum::Add, bp, ap, -1.0, Par::Seq);
            r.iter().map(|x| x * x).sum::<f64>()
        })
        .collect::<Vec<f64>>()
        .iter()
        .sum();
    (sum / total).sqrt()
}

/// Halko–Martinsson–Tropp randomized SVD of a tall `m × n` view with an `l`-column sketch:
/// returns `u` (`m × l`), the singular values, `v` (`n × l`).
fn randomized(x: MatRef<'_, f64>, l: usize, power_iters: usize, par: Par) -> Result<Thin, Error> {
    let (m, n) = (x.nrows(), x.ncols());
    let mut rng = SplitMix(SKETCH_SEED);
    let omega = Mat::<f64>::from_fn(n, l, |_, _| rng.gaussian());
    let mut y = Mat::<f64>::zeros(m, l);
    matmul(y.as_mut(), Accum::Replace, x, omega.as_ref(), 1.0, par);
    let mut q = y.qr().compute_thin_Q();
    let mut z = Mat::<f64>::zeros(n, l);
    for _ in 0..power_iters {
        matmul(
            z.as_mut(),
            Accum::Replace,
            x.transpose(),
            q.as_ref(),
            1.0,
            par,
        );
        let qz = z.qr().compute_thin_Q();
        matmul(y.as_mut(), Accum::Replace, x, qz.as_ref(), 1.0, par);
        q = y.qr().compute_thin_Q();
    }
    // Xᵀ·Q (n × l, tall) = Ũ·S·Ṽᵀ  ⇒  Q·Qᵀ·X = (Q·Ṽ)·S·Ũᵀ.
    matmul(
        z.as_mut(),
        Accum::Replace,
        x.transpose(),
        q.as_ref(),
        1.0,
        par,
    );
    let svd = z.thin_svd().map_err(no_convergence)?;
    let s: Vec<f64> = svd.S().column_vector().iter().copied().collect();
    let mut u = Mat::<f64>::zeros(m, l);
    matmul(u.as_mut(), Accum::Replace, q.as_ref(), svd.V(), 1.0, par);
    Ok(Thin {
        u,
        s,
        v: svd.U().to_owned(),
    })
}

/// A thin SVD `u·diag(s)·vᵀ` of a tall matrix (`u` `m × l`, `v` `n × l`).
struct Thin {
    u: Mat<f64>,
    s: Vec<f64>,
    v: Mat<f64>,
}

/// SplitMix64 with Box–Muller: a small fixed generator for the sketch (its statistical quality
/// is ample for a range finder; its point is reproducibility).
struct SplitMix(u64);

impl SplitMix {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1).
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64)
    }

    fn gaussian(&mut self) -> f64 {
        let (u1, u2) = (self.uniform(), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}
