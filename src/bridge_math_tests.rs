//! The numerical core of the bridges (issue #15): truncated SVD of a weight change
//! (`crate::lowrank`) and block-wise Procrustes extraction of a rotation (`crate::procrustes`),
//! checked against the crate's own bake math, closed forms and brute force. Sizes stay small:
//! these run in the debug profile.

#![allow(clippy::needless_range_loop)]

// Small dense matrices read best with explicit indices.

use crate::apply::PreparedStage;
use crate::error::Category;
use crate::lowrank::{Method, MethodUsed, RankRule, approximate};
use crate::model::{Side, Stage};
use crate::procrustes::{DEFAULT_MAX_ANGLE, ExtractOptions, extract};
use crate::rotation::{cayley, tri_len, unpack_skew};
use proptest::prelude::*;

fn max_diff(a: &[f64], c: &[f64]) -> f64 {
    assert_eq!(a.len(), c.len());
    a.iter()
        .zip(c)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// Deterministic pseudo-random values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 52) as f64 - 1.0
        })
        .collect()
}

fn stage(q: Vec<f64>, blocks: usize, b: usize) -> Stage {
    Stage::cayley(blocks as u64, b as u64, q)
}

/// `w` rotated by `st` on `side`, by the crate's bake code (spec §4.6).
fn rotate(st: &Stage, side: Side, w: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let axis = match side {
        Side::Input => cols,
        Side::Output => rows,
    };
    let mut out = w.to_vec();
    PreparedStage::<f64>::new(st, axis)
        .unwrap()
        .apply(side, &mut out, cols)
        .unwrap();
    out
}

fn dims(side: Side, d: usize, other: usize) -> (usize, usize) {
    match side {
        Side::Input => (other, d),
        Side::Output => (d, other),
    }
}

fn fro(a: &[f64]) -> f64 {
    a.iter().map(|x| x * x).sum::<f64>().sqrt()
}

// ---------------------------------------------------------------------------------------------
// Procrustes extraction

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// A random block-diagonal rotation baked by the spec's math is extracted back exactly.
    #[test]
    fn extraction_recovers_a_baked_rotation(
        b in 1usize..=8,
        blocks in 1usize..=3,
        extra in 0usize..4,
        output in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let side = if output { Side::Output } else { Side::Input };
        let d = b * blocks;
        // A tall panel (3b + 4 or more samples) keeps the cross-covariance well conditioned.
        let (rows, cols) = dims(side, d, 3 * b + 4 + extra);
        let w0 = values(rows * cols, seed);
        let scale = 0.6 / (b as f64).sqrt();
        let q: Vec<f64> = values(blocks * tri_len(b), seed ^ 0xabc).iter().map(|x| x * scale).collect();
        let st = stage(q.clone(), blocks, b);
        let w1 = rotate(&st, side, &w0, rows, cols);

        let ex = extract(&w0, &w1, rows, cols, &ExtractOptions::new(side, b)).unwrap();
        prop_assert_eq!(ex.blocks(), blocks);
        prop_assert!(max_diff(&ex.q, &q) <= 1e-9, "Q off by {}", max_diff(&ex.q, &q));
        for k in 0..blocks {
            let n = tri_len(b);
            let r_true = cayley(&unpack_skew(&q[k * n..(k + 1) * n], b), b);
            let r_back = cayley(&unpack_skew(&ex.q[k * n..(k + 1) * n], b), b);
            prop_assert!(max_diff(&r_true, &r_back) <= 1e-10);
        }
        prop_assert_eq!(ex.constraint_counts(), (0, 0));
        prop_assert!(ex.residual() <= 1e-10 * fro(&w0));
        prop_assert!(ex.relative_residual() <= 1e-8);
        // The extracted stage bakes W₀ into W₁ again.
        let again = rotate(&ex.stage("q"), side, &w0, rows, cols);
        prop_assert!(max_diff(&again, &w1) <= 1e-10);
    }

    /// For a finetune that is no rotation, no small turn of any block lowers the residual.
    #[test]
    fn extraction_is_locally_optimal(b in 2usize..=6, output in any::<bool>(), seed in any::<u64>()) {
        let side = if output { Side::Output } else { Side::Input };
        let (rows, cols) = dims(side, 2 * b, 2 * b + 3);
        let w0 = values(rows * cols, seed);
        let w1: Vec<f64> = values(rows * cols, seed ^ 77).iter().zip(&w0).map(|(n, w)| w + 0.7 * n).collect();
        let ex = extract(&w0, &w1, rows, cols, &ExtractOptions::new(side, b)).unwrap();
        let base = ex.residual();
        let recomputed = fro(&rotate(&ex.stage("q"), side, &w0, rows, cols)
            .iter().zip(&w1).map(|(a, c)| c - a).collect::<Vec<_>>());
        prop_assert!((recomputed - base).abs() <= 1e-12 * (1.0 + base));
        prop_assert!(base <= ex.baseline() * (1.0 + 1e-12));
        for trial in 0..4u64 {
            // Compose every block with a small random rotation.
            let n = tri_len(b);
            let mut q = Vec::new();
            for k in 0..2 {
                let r = cayley(&unpack_skew(&ex.q[k * n..(k + 1) * n], b), b);
                let dq: Vec<f64> = values(n, seed ^ ((trial + 1) * 991)).iter().map(|x| 1e-3 * x).collect();
                let dr = cayley(&unpack_skew(&dq, b), b);
                let r2 = crate::rotation::matmul(&r, &dr, b);
                let q2 = crate::rotation::inverse_cayley(&r2, b).unwrap();
                q.extend(crate::rotation::pack_upper(&q2, b));
            }
            let moved = rotate(&stage(q, 2, b), side, &w0, rows, cols);
            let res = fro(&moved.iter().zip(&w1).map(|(a, c)| c - a).collect::<Vec<_>>());
            prop_assert!(res >= base - 1e-12 * base, "perturbed {res} < optimum {base}");
        }
    }
}

/// `‖Y − X·S‖²` for a `len × 2` or `len × 3` panel pair, S row-major.
fn panel_residual_sq(x: &[[f64; 3]], y: &[[f64; 3]], s: &[[f64; 3]; 3], b: usize) -> f64 {
    let mut acc = 0.0;
    for (xr, yr) in x.iter().zip(y) {
        for j in 0..b {
            let fit: f64 = (0..b).map(|t| xr[t] * s[t][j]).sum();
            acc += (yr[j] - fit).powi(2);
        }
    }
    acc
}

/// The input-side panel of block 0: columns 0..b of a `rows × cols` matrix.
fn input_panel(w: &[f64], rows: usize, cols: usize, b: usize) -> Vec<[f64; 3]> {
    (0..rows)
        .map(|i| {
            let mut r = [0.0; 3];
            r[..b].copy_from_slice(&w[i * cols..i * cols + b]);
            r
        })
        .collect()
}

/// 2 × 2 blocks against brute force over every plane rotation (and reflection).
#[test]
fn two_by_two_blocks_match_brute_force() {
    for seed in 0..12u64 {
        let (rows, cols, b) = (7, 2, 2);
        let w0 = values(rows * cols, seed);
        let mut w1: Vec<f64> = values(rows * cols, seed + 100);
        if seed % 3 == 0 {
            // A reflection of W₀ plus a little noise: the best orthogonal fit has det −1.
            for i in 0..rows {
                w1[i * cols] = w0[i * cols + 1] + 0.01 * w1[i * cols];
                w1[i * cols + 1] = w0[i * cols] + 0.01 * w1[i * cols + 1];
            }
        }
        let ex = extract(&w0, &w1, rows, cols, &ExtractOptions::new(Side::Input, b)).unwrap();
        let (x, y) = (
            input_panel(&w0, rows, cols, b),
            input_panel(&w1, rows, cols, b),
        );
        // Brute force: the best of a 1/3600-turn grid, refined by ternary search around it.
        let brute = |make: &dyn Fn(f64) -> [[f64; 3]; 3]| {
            let f = |phi: f64| panel_residual_sq(&x, &y, &make(phi), b);
            let step = std::f64::consts::TAU / 3600.0;
            let start = (0..3600)
                .map(|t| t as f64 * step)
                .min_by(|p, q| f(*p).total_cmp(&f(*q)))
                .unwrap();
            let (mut lo, mut hi) = (start - step, start + step);
            for _ in 0..200 {
                let (m1, m2) = (lo + (hi - lo) / 3.0, hi - (hi - lo) / 3.0);
                if f(m1) < f(m2) {
                    hi = m2;
                } else {
                    lo = m1;
                }
            }
            f(0.5 * (lo + hi))
        };
        let rot = |phi: f64| {
            let (c, s) = (phi.cos(), phi.sin());
            [[c, -s, 0.0], [s, c, 0.0], [0.0; 3]]
        };
        let refl = |phi: f64| {
            let (c, s) = (phi.cos(), phi.sin());
            [[c, s, 0.0], [s, -c, 0.0], [0.0; 3]]
        };
        let best_rot = brute(&rot);
        let best_any = best_rot.min(brute(&refl));
        let fit = ex.fits[0];
        assert!(
            (fit.residual_sq - best_rot).abs() < 1e-10,
            "seed {seed}: {} vs brute force {best_rot}",
            fit.residual_sq
        );
        assert!(
            (fit.constraint_loss_sq - (best_rot - best_any)).abs() < 1e-10,
            "seed {seed}: loss {} vs {}",
            fit.constraint_loss_sq,
            best_rot - best_any
        );
        assert_eq!(fit.reflection, best_any < best_rot - 1e-9, "seed {seed}");
        if seed % 3 == 0 {
            assert!(fit.reflection);
        }
    }
}

/// Largest eigenvalue of a symmetric 4 × 4 matrix (Jacobi sweeps), for Davenport's q-method.
fn sym4_max_eigenvalue(mut a: [[f64; 4]; 4]) -> f64 {
    for _ in 0..100 {
        for p in 0..4 {
            for q in p + 1..4 {
                if a[p][q].abs() < 1e-300 {
                    continue;
                }
                let theta = 0.5 * (2.0 * a[p][q]).atan2(a[q][q] - a[p][p]);
                let (c, s) = (theta.cos(), theta.sin());
                for k in 0..4 {
                    let (akp, akq) = (a[k][p], a[k][q]);
                    a[k][p] = c * akp - s * akq;
                    a[k][q] = s * akp + c * akq;
                }
                for k in 0..4 {
                    let (apk, aqk) = (a[p][k], a[q][k]);
                    a[p][k] = c * apk - s * aqk;
                    a[q][k] = s * apk + c * aqk;
                }
            }
        }
    }
    (0..4).map(|i| a[i][i]).fold(f64::NEG_INFINITY, f64::max)
}

/// 3 × 3 blocks against an independent closed form: Davenport's q-method gives
/// `max_{S ∈ SO(3)} tr(SᵀM)` as the largest eigenvalue of a 4 × 4 symmetric matrix.
#[test]
fn three_by_three_blocks_match_davenport() {
    for seed in 0..16u64 {
        let (rows, cols, b) = (9, 3, 3);
        let w0 = values(rows * cols, seed);
        let mut w1 = values(rows * cols, seed + 1000);
        if seed % 4 == 0 {
            // Mirror W₀ (one column negated) plus noise: a reflection is the best orthogonal fit.
            for i in 0..rows {
                for j in 0..3 {
                    let sign = if j == 2 { -1.0 } else { 1.0 };
                    w1[i * cols + j] = sign * w0[i * cols + j] + 0.05 * w1[i * cols + j];
                }
            }
        }
        let (x, y) = (
            input_panel(&w0, rows, cols, b),
            input_panel(&w1, rows, cols, b),
        );
        let mut m = [[0.0; 3]; 3];
        for (xr, yr) in x.iter().zip(&y) {
            for i in 0..3 {
                for j in 0..3 {
                    m[i][j] += xr[i] * yr[j];
                }
            }
        }
        let tr = m[0][0] + m[1][1] + m[2][2];
        let z = [m[1][2] - m[2][1], m[2][0] - m[0][2], m[0][1] - m[1][0]];
        let mut k = [[0.0; 4]; 4];
        for i in 0..3 {
            for j in 0..3 {
                k[i][j] = m[i][j] + m[j][i] - if i == j { tr } else { 0.0 };
            }
            k[i][3] = z[i];
            k[3][i] = z[i];
        }
        k[3][3] = tr;
        let best_trace = sym4_max_eigenvalue(k);
        let norms: f64 = x
            .iter()
            .chain(&y)
            .map(|r| r.iter().map(|v| v * v).sum::<f64>())
            .sum();
        let expected = norms - 2.0 * best_trace;
        let ex = extract(&w0, &w1, rows, cols, &ExtractOptions::new(Side::Input, b)).unwrap();
        let fit = ex.fits[0];
        assert!(
            (fit.residual_sq - expected).abs() < 1e-10 * norms,
            "seed {seed}: {} vs Davenport {expected}",
            fit.residual_sq
        );
        if seed % 4 == 0 {
            assert!(fit.reflection, "seed {seed}");
            assert!(fit.constraint_loss_sq > 0.0);
        }
    }
}

/// `W₁ = −W₀`: every 2-D plane is a half-turn, which the Cayley map cannot reach; the result is
/// the rotation by the largest angle, and the residual has a closed form.
#[test]
fn half_turns_are_capped_with_the_closed_form_loss() {
    for (b, side) in [(2, Side::Input), (2, Side::Output), (4, Side::Input)] {
        let (rows, cols) = dims(side, 2 * b, 11);
        let w0 = values(rows * cols, 5);
        let w1: Vec<f64> = w0.iter().map(|x| -x).collect();
        let ex = extract(&w0, &w1, rows, cols, &ExtractOptions::new(side, b)).unwrap();
        assert!(ex.q.iter().all(|x| x.is_finite()));
        let (refl, capped) = ex.constraint_counts();
        assert_eq!((refl, capped), (0, 2 * b / 2), "b = {b}");
        let delta = std::f64::consts::PI - DEFAULT_MAX_ANGLE;
        // S = −cos δ·I + sin δ·J per plane, M = −XᵀX: residual² = 2(1 − cos δ)‖X‖², and
        // ‖W₁ − W₀‖ = 2‖X‖, so the relative residual is sin(δ/2).
        let rel = ex.relative_residual();
        assert!(
            (rel - (delta / 2.0).sin()).abs() < 1e-12,
            "b = {b}: {rel} vs {}",
            (delta / 2.0).sin()
        );
        for fit in &ex.fits {
            assert!((fit.angle - DEFAULT_MAX_ANGLE).abs() < 1e-12);
            assert!(fit.constraint_loss_sq > 0.0);
        }
    }
}

/// A rotation with one half-turn plane and one ordinary plane: only the half-turn moves, by
/// exactly the capped angle.
#[test]
fn capping_leaves_other_planes_alone() {
    let b = 4;
    // R = P·diag(rot(π), rot(0.7))·Pᵀ with a random orthogonal P (Cayley of a random skew).
    let p = cayley(&unpack_skew(&values(tri_len(b), 9), b), b);
    let mut core = vec![0.0; 16];
    let set = |m: &mut Vec<f64>, i: usize, th: f64| {
        let (c, s) = (th.cos(), th.sin());
        m[i * 4 + i] = c;
        m[i * 4 + i + 1] = -s;
        m[(i + 1) * 4 + i] = s;
        m[(i + 1) * 4 + i + 1] = c;
    };
    set(&mut core, 0, std::f64::consts::PI);
    set(&mut core, 2, 0.7);
    let pt: Vec<f64> = (0..16).map(|k| p[(k % 4) * 4 + k / 4]).collect();
    let mm = crate::rotation::matmul;
    let r = mm(&mm(&p, &core, b), &pt, b);
    // Output side with block = the whole axis: W₁ = Rᵀ·W₀.
    let (rows, cols) = (4, 12);
    let w0 = values(rows * cols, 3);
    let mut w1 = vec![0.0; rows * cols];
    for i in 0..4 {
        for c in 0..cols {
            w1[i * cols + c] = (0..4).map(|u| r[u * 4 + i] * w0[u * cols + c]).sum();
        }
    }
    let ex = extract(&w0, &w1, rows, cols, &ExtractOptions::new(Side::Output, b)).unwrap();
    assert_eq!(ex.constraint_counts(), (0, 1));
    let r_back = cayley(&unpack_skew(&ex.q, b), b);
    let diff = fro(&r_back
        .iter()
        .zip(&r)
        .map(|(a, c)| a - c)
        .collect::<Vec<_>>());
    // ‖rot(π − δ) − rot(π)‖_F = 2√2·sin(δ/2).
    let delta = std::f64::consts::PI - DEFAULT_MAX_ANGLE;
    let expected = 2.0 * 2f64.sqrt() * (delta / 2.0).sin();
    assert!((diff - expected).abs() < 1e-9, "{diff} vs {expected}");
}

#[test]
fn extraction_rejects_bad_input() {
    let w = values(24, 1);
    let opts = ExtractOptions::new(Side::Input, 5);
    let e = extract(&w, &w, 4, 6, &opts).unwrap_err();
    assert_eq!(e.category(), Category::Partition);
    let e = extract(&w, &w[..20], 4, 6, &ExtractOptions::new(Side::Input, 3)).unwrap_err();
    assert_eq!(e.category(), Category::TargetShape);
    let mut bad = w.clone();
    bad[3] = f64::NAN;
    let e = extract(&w, &bad, 4, 6, &ExtractOptions::new(Side::Input, 3)).unwrap_err();
    assert_eq!(e.category(), Category::NonFinite);
    let e = extract(&w, &w, 4, 6, &ExtractOptions::new(Side::Input, 0)).unwrap_err();
    assert_eq!(e.category(), Category::Partition);
    // Equal weights: the identity, nothing left over, no NaN.
    let ex = extract(&w, &w, 4, 6, &ExtractOptions::new(Side::Output, 2)).unwrap();
    assert!(ex.q.iter().all(|x| x.abs() < 1e-12));
    assert_eq!(ex.relative_residual(), 0.0);
}

// ---------------------------------------------------------------------------------------------
// Low-rank approximation

/// Singular values by an independent route: nalgebra's SVD.
fn reference_singular_values(a: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let m = nalgebra::DMatrix::from_row_slice(rows, cols, a);
    let mut s: Vec<f64> = m.singular_values().iter().copied().collect();
    s.sort_by(|x, y| y.total_cmp(x));
    s
}

fn product(b: &[f64], a: &[f64], rows: usize, k: usize, cols: usize) -> Vec<f64> {
    let mut out = vec![0.0; rows * cols];
    for i in 0..rows {
        for t in 0..k {
            let bv = b[i * k + t];
            for j in 0..cols {
                out[i * cols + j] += bv * a[t * cols + j];
            }
        }
    }
    out
}

fn measured(delta: &[f64], lr: &crate::lowrank::LowRank) -> f64 {
    let ba = product(&lr.b, &lr.a, lr.rows, lr.rank, lr.cols);
    fro(&delta
        .iter()
        .zip(&ba)
        .map(|(x, y)| x - y)
        .collect::<Vec<_>>())
        / fro(delta)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// The rank-k error is √(Σ_{i>k} σᵢ²)/‖ΔW‖, and B·A achieves it.
    #[test]
    fn fixed_rank_error_is_the_tail(rows in 1usize..14, cols in 1usize..14, seed in any::<u64>()) {
        let delta = values(rows * cols, seed);
        let sigma = reference_singular_values(&delta, rows, cols);
        let norm = fro(&delta);
        for k in 0..=rows.min(cols) + 1 {
            let lr = approximate(&delta, rows, cols, RankRule::Fixed(k), Method::Full).unwrap();
            let kk = k.min(rows.min(cols));
            prop_assert_eq!(lr.rank, kk);
            prop_assert_eq!((lr.b.len(), lr.a.len()), (rows * kk, kk * cols));
            let tail = sigma[kk..].iter().map(|s| s * s).sum::<f64>().sqrt() / norm;
            prop_assert!((lr.rel_error - tail).abs() < 1e-12, "k {}: {} vs {}", k, lr.rel_error, tail);
            prop_assert!((measured(&delta, &lr) - tail).abs() < 1e-12);
            prop_assert!(max_diff(&lr.singular_values, &sigma) < 1e-12);
            // Balanced factors: BᵀB = A·Aᵀ = diag(σ_1..σ_k).
            for t in 0..kk {
                let bb: f64 = (0..rows).map(|i| lr.b[i * kk + t].powi(2)).sum();
                let aa: f64 = (0..cols).map(|j| lr.a[t * cols + j].powi(2)).sum();
                prop_assert!((bb - sigma[t]).abs() < 1e-12 && (aa - sigma[t]).abs() < 1e-12);
            }
        }
    }

    /// The smallest rank keeping a fraction E of ‖ΔW‖², capped when asked.
    #[test]
    fn energy_rank_is_the_smallest_sufficient(rows in 2usize..12, cols in 2usize..12, e in 0.0f64..=1.0, seed in any::<u64>()) {
        let delta = values(rows * cols, seed);
        let sigma = reference_singular_values(&delta, rows, cols);
        let total: f64 = sigma.iter().map(|s| s * s).sum();
        let kept = |k: usize| sigma[..k].iter().map(|s| s * s).sum::<f64>() / total;
        let lr = approximate(&delta, rows, cols, RankRule::Energy { fraction: e, max_rank: None }, Method::Auto).unwrap();
        let k = lr.rank;
        prop_assert!(kept(k) >= e - 1e-12);
        if k > 0 {
            prop_assert!(kept(k - 1) < e + 1e-12);
        }
        prop_assert!((lr.energy_kept() - kept(k)).abs() < 1e-12);
        let capped = approximate(&delta, rows, cols, RankRule::Energy { fraction: e, max_rank: Some(1) }, Method::Full).unwrap();
        prop_assert_eq!(capped.rank, k.min(1));
    }
}

#[test]
fn energy_edge_cases() {
    let (rows, cols) = (6, 5);
    let delta = values(rows * cols, 42);
    let all = |fraction| RankRule::Energy {
        fraction,
        max_rank: None,
    };
    let zero = approximate(&delta, rows, cols, all(0.0), Method::Full).unwrap();
    assert_eq!(zero.rank, 0);
    assert!((zero.rel_error - 1.0).abs() < 1e-15);
    assert!(zero.b.is_empty() && zero.a.is_empty());
    let full = approximate(&delta, rows, cols, all(1.0), Method::Full).unwrap();
    assert_eq!(full.rank, 5);
    assert!(full.rel_error < 1e-15);
    assert!(measured(&delta, &full) < 1e-14);

    // ΔW = 0: rank 0 by energy, zero factors at a fixed rank, never NaN.
    let z = vec![0.0; rows * cols];
    for rule in [all(0.0), all(0.5), all(1.0)] {
        let lr = approximate(&z, rows, cols, rule, Method::Auto).unwrap();
        assert_eq!((lr.rank, lr.rel_error, lr.norm), (0, 0.0, 0.0));
        assert_eq!(lr.method, MethodUsed::Zero);
    }
    let lr = approximate(&z, rows, cols, RankRule::Fixed(3), Method::Auto).unwrap();
    assert_eq!(lr.rank, 3);
    assert!(lr.b.iter().chain(&lr.a).all(|&x| x == 0.0));
    assert_eq!(lr.rel_error, 0.0);
    assert_eq!(lr.energy_kept(), 1.0);
    // An exactly rank-2 ΔW keeps all its energy at rank 2 (E = 1).
    let u = values(rows * 2, 1);
    let v = values(2 * cols, 2);
    let low = product(&u, &v, rows, 2, cols);
    let lr = approximate(&low, rows, cols, all(0.999_999), Method::Full).unwrap();
    assert_eq!(lr.rank, 2);
    assert!(lr.rel_error < 1e-7);
}

#[test]
fn lowrank_rejects_bad_input() {
    let delta = values(12, 3);
    let energy = |fraction| RankRule::Energy {
        fraction,
        max_rank: None,
    };
    let e = approximate(&delta, 3, 4, energy(1.5), Method::Full).unwrap_err();
    assert_eq!(e.category(), Category::Usage);
    let e = approximate(&delta, 3, 4, energy(f64::NAN), Method::Full).unwrap_err();
    assert_eq!(e.category(), Category::Usage);
    let e = approximate(&delta, 3, 5, RankRule::Fixed(1), Method::Full).unwrap_err();
    assert_eq!(e.category(), Category::TargetShape);
    let randomized = Method::Randomized {
        oversample: 4,
        power_iters: 1,
    };
    let e = approximate(&delta, 3, 4, energy(0.5), randomized).unwrap_err();
    assert_eq!(e.category(), Category::Usage);
    let mut bad = delta.clone();
    bad[0] = f64::INFINITY;
    let e = approximate(&bad, 3, 4, RankRule::Fixed(1), Method::Full).unwrap_err();
    assert_eq!(e.category(), Category::NonFinite);
}

/// The randomized path: exact on an exactly low-rank ΔW, near the optimum on a full-rank one,
/// its error measured, and its output the same for any number of threads.
#[test]
fn randomized_matches_the_full_svd() {
    let (rows, cols) = (90, 70);
    let u = values(rows * 5, 11);
    let v = values(5 * cols, 12);
    let low = product(&u, &v, rows, 5, cols);
    let randomized = Method::Randomized {
        oversample: 5,
        power_iters: 2,
    };
    let lr = approximate(&low, rows, cols, RankRule::Fixed(5), randomized).unwrap();
    assert!(lr.error_measured);
    assert!(lr.rel_error < 1e-12, "{}", lr.rel_error);
    let full = approximate(&low, rows, cols, RankRule::Fixed(5), Method::Full).unwrap();
    assert!(max_diff(&lr.singular_values[..5], &full.singular_values[..5]) < 1e-12);

    // Full rank, both orientations, against the optimum.
    for (r, c) in [(rows, cols), (cols, rows)] {
        let delta = values(r * c, 13);
        let opt = approximate(&delta, r, c, RankRule::Fixed(10), Method::Full).unwrap();
        let run = || {
            approximate(
                &delta,
                r,
                c,
                RankRule::Fixed(10),
                Method::Randomized {
                    oversample: 10,
                    power_iters: 3,
                },
            )
            .unwrap()
        };
        let lr = run();
        assert!((measured(&delta, &lr) - lr.rel_error).abs() < 1e-12);
        assert!(lr.rel_error >= opt.rel_error - 1e-12);
        assert!(
            lr.rel_error <= opt.rel_error + 0.05,
            "{} vs {}",
            lr.rel_error,
            opt.rel_error
        );
        // Energy with a cap through the sketch keeps what it claims.
        let capped = approximate(
            &delta,
            r,
            c,
            RankRule::Energy {
                fraction: 0.3,
                max_rank: Some(12),
            },
            Method::Randomized {
                oversample: 10,
                power_iters: 3,
            },
        )
        .unwrap();
        assert!(capped.energy_kept() >= 0.3 - 1e-12 || capped.rank == 12);
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(run);
        let two = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap()
            .install(run);
        assert_eq!(one, two, "output depends on the thread count");
        assert_eq!(one, lr);
    }
}
