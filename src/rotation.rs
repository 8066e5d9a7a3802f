//! Rotation math in f64: skew packing, the Cayley map, PEFT's Neumann polynomials, diagnostics.
//!
//! Matrices are dense row-major `b × b` slices; blocks are small, so clarity wins over tricks.

use crate::model::{NeumannVariant, RotationMap};
use nalgebra::DMatrix;

/// Length of the packed strict upper triangle of a `b × b` matrix.
pub fn tri_len(b: usize) -> usize {
    b * b.saturating_sub(1) / 2
}

/// The block size whose strict upper triangle has `n` entries, if `n` is triangular.
pub fn block_size_from_tri_len(n: usize) -> Option<usize> {
    // b(b−1)/2 = n  ⇒  b = (1 + √(1 + 8n)) / 2; check the integer candidate exactly.
    let guess = ((1.0 + (1.0 + 8.0 * n as f64).sqrt()) / 2.0).round() as usize;
    (guess.saturating_sub(1)..=guess + 1)
        .find(|&b| b >= 1 && tri_len(b) == n)
        .filter(|&b| b >= 2 || n == 0)
}

/// Expand a packed strict upper triangle (row-major) into the skew matrix `Q = M − Mᵀ`.
pub fn unpack_skew(tri: &[f64], b: usize) -> Vec<f64> {
    debug_assert_eq!(tri.len(), tri_len(b));
    let mut q = vec![0.0; b * b];
    let mut k = 0;
    for i in 0..b {
        for j in (i + 1)..b {
            q[i * b + j] = tri[k];
            q[j * b + i] = -tri[k];
            k += 1;
        }
    }
    q
}

/// Pack the strict upper triangle of a `b × b` matrix (row-major order).
pub fn pack_upper(m: &[f64], b: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(tri_len(b));
    for i in 0..b {
        for j in (i + 1)..b {
            out.push(m[i * b + j]);
        }
    }
    out
}

fn identity(b: usize) -> Vec<f64> {
    let mut m = vec![0.0; b * b];
    for i in 0..b {
        m[i * b + i] = 1.0;
    }
    m
}

/// `a · c` for `b × b` row-major matrices.
pub fn matmul(a: &[f64], c: &[f64], b: usize) -> Vec<f64> {
    assert!(
        a.len() >= b * b && c.len() >= b * b,
        "matmul operands smaller than b × b"
    );
    let mut out = vec![0.0; b * b];
    let s = b as isize;
    // SAFETY: all three matrices are dense b × b row-major (checked above), `out` is distinct.
    unsafe {
        matrixmultiply::dgemm(
            b,
            b,
            b,
            1.0,
            a.as_ptr(),
            s,
            1,
            c.as_ptr(),
            s,
            1,
            0.0,
            out.as_mut_ptr(),
            s,
            1,
        )
    };
    out
}

/// Exact Cayley transform `R = (I + Q)(I − Q)⁻¹`, by LU solve of `(I − Q) R = I + Q`
/// (the two factors commute). `I − Q` is invertible for every real skew `Q`.
///
/// faer's blocked LU with partial pivoting, single-threaded (callers run blocks in parallel):
/// at b = 256 about 4× nalgebra's unblocked LU, which set the pace of large-block bakes.
pub fn cayley(q: &[f64], b: usize) -> Vec<f64> {
    use faer::dyn_stack::{MemBuffer, MemStack};
    use faer::linalg::lu::partial_pivoting::{factor, solve};
    use faer::{Mat, MatMut, Par};

    let mut minus = Mat::<f64>::from_fn(b, b, |i, j| {
        if i == j {
            1.0 - q[i * b + j]
        } else {
            -q[i * b + j]
        }
    });
    let mut out: Vec<f64> = q.iter().take(b * b).copied().collect();
    for i in 0..b {
        out[i * b + i] += 1.0;
    }
    let par = Par::Seq;
    let need = factor::lu_in_place_scratch::<usize, f64>(b, b, par, Default::default())
        .or(solve::solve_in_place_scratch::<usize, f64>(b, b, par));
    let mut mem = MemBuffer::new(need);
    let stack = MemStack::new(&mut mem);
    let mut perm = vec![0usize; b];
    let mut perm_inv = vec![0usize; b];
    let (_, p) = factor::lu_in_place(
        minus.as_mut(),
        &mut perm,
        &mut perm_inv,
        par,
        stack,
        Default::default(),
    );
    let rhs = MatMut::from_row_major_slice_mut(&mut out, b, b);
    solve::solve_in_place(minus.as_ref(), minus.as_ref(), p, rhs, par, stack);
    out
}

/// PEFT's truncated Cayley–Neumann series with `n` terms.
pub fn neumann(q: &[f64], b: usize, n: u32, variant: NeumannVariant) -> Vec<f64> {
    let mut r = identity(b);
    let add = |r: &mut Vec<f64>, p: &[f64], c: f64| {
        for (x, &y) in r.iter_mut().zip(p) {
            *x += c * y;
        }
    };
    if n <= 1 {
        return r;
    }
    add(&mut r, q, 2.0);
    if n == 2 {
        return r;
    }
    // Highest power and whether its coefficient is 1 (PEFT ≥ 0.18) or 2 (PEFT 0.16–0.17).
    let (top, last_coef) = match variant {
        NeumannVariant::Peft016 => (n as usize - 1, 2.0),
        NeumannVariant::Peft018 => ((n as usize - 1).max(3), 1.0),
    };
    let mut p = q.to_vec();
    for k in 2..=top {
        p = matmul(&p, q, b);
        add(&mut r, &p, if k == top { last_coef } else { 2.0 });
    }
    r
}

/// The `b × b` block R for a packed triangle under `map`.
pub fn rotation_block(tri: &[f64], b: usize, map: &RotationMap) -> Vec<f64> {
    let q = unpack_skew(tri, b);
    match map {
        RotationMap::Cayley => cayley(&q, b),
        RotationMap::Neumann { terms, variant } => neumann(&q, b, *terms, *variant),
    }
}

/// Frobenius norm of the skew matrix encoded by a packed triangle (each entry counts twice).
pub fn skew_norm(tri: &[f64]) -> f64 {
    (2.0 * tri.iter().map(|x| x * x).sum::<f64>()).sqrt()
}

/// `‖RᵀR − I‖_F`: zero for an exact rotation, non-zero for Neumann blocks.
pub fn orthogonality_error(r: &[f64], b: usize) -> f64 {
    let mut acc = 0.0;
    for i in 0..b {
        for j in 0..b {
            let mut s = 0.0;
            for k in 0..b {
                s += r[k * b + i] * r[k * b + j];
            }
            if i == j {
                s -= 1.0;
            }
            acc += s * s;
        }
    }
    acc.sqrt()
}

/// Largest rotation angle (radians) of the Cayley rotation of `Q`: the eigenvalues of a skew
/// `Q` are `±iλ`, and the Cayley map turns each into the angle `2·atan(λ)`.
pub fn max_rotation_angle(tri: &[f64], b: usize) -> f64 {
    if b < 2 {
        return 0.0;
    }
    let q = unpack_skew(tri, b);
    let qm = DMatrix::from_row_slice(b, b, &q);
    // QᵀQ is symmetric positive semi-definite with eigenvalues λ².
    let qtq = qm.transpose() * &qm;
    let lambda_max = qtq
        .symmetric_eigenvalues()
        .iter()
        .fold(0.0f64, |m, &v| m.max(v))
        .max(0.0)
        .sqrt();
    2.0 * lambda_max.atan()
}

/// Inverse Cayley map `Q = (R − I)(R + I)⁻¹`, for rotations without eigenvalue −1.
pub fn inverse_cayley(r: &[f64], b: usize) -> Option<Vec<f64>> {
    // Q (R + I) = R − I  ⇔  (R + I)ᵀ Qᵀ = (R − I)ᵀ; R ± I commute, so solve (R + I) Q = R − I.
    let plus = DMatrix::from_fn(b, b, |i, j| r[i * b + j] + if i == j { 1.0 } else { 0.0 });
    let minus = DMatrix::from_fn(b, b, |i, j| r[i * b + j] - if i == j { 1.0 } else { 0.0 });
    let sol = plus.lu().solve(&minus)?;
    Some((0..b * b).map(|k| sol[(k / b, k % b)]).collect())
}

/// Geodesic power of a Cayley rotation: the packed `Q_S` with `Cay(Q_S) = Cay(Q)^S`.
///
/// The eigenvalues of a skew `Q` are `±iλ`; `Cay(Q)` rotates each plane by `θ = 2·atan(λ)`, and
/// `Cay(Q)^S` by `S·θ`, which is `Cay` of `λ_S = tan(S·atan(λ))`. As an odd function of `Q`,
/// `Q_S = Q · g(−Q²)` with `g(μ) = tan(S·atan(√μ)) / √μ` applied through the symmetric
/// eigen-decomposition of `−Q² = QᵀQ` (`g(0) = S`). Fails when some angle `S·θ` reaches ±180°,
/// which no Cayley rotation can represent.
pub fn cayley_power(tri: &[f64], b: usize, s: f64) -> Result<Vec<f64>, String> {
    if s == 1.0 {
        return Ok(tri.to_vec());
    }
    let q = DMatrix::from_row_slice(b, b, &unpack_skew(tri, b));
    let eig = (q.transpose() * &q).symmetric_eigen();
    let mut g = Vec::with_capacity(b);
    for &mu in eig.eigenvalues.iter() {
        let lambda = mu.max(0.0).sqrt();
        let half_angle = s * lambda.atan();
        if half_angle.abs() >= std::f64::consts::FRAC_PI_2 * (1.0 - 1e-9) {
            return Err(format!(
                "strength {s} turns a {:.1}° rotation to {:.1}°, past ±180°",
                (2.0 * lambda.atan()).to_degrees(),
                (2.0 * half_angle).to_degrees()
            ));
        }
        g.push(if lambda < 1e-150 {
            s
        } else {
            half_angle.tan() / lambda
        });
    }
    let v = &eig.eigenvectors;
    let gm = v * DMatrix::from_diagonal(&nalgebra::DVector::from_vec(g)) * v.transpose();
    let qs = &q * gm;
    let dense: Vec<f64> = (0..b * b).map(|k| qs[(k / b, k % b)]).collect();
    // Q·g(−Q²) is skew in exact arithmetic; take the upper triangle of its skew part.
    let mut skew = vec![0.0; b * b];
    for i in 0..b {
        for j in 0..b {
            skew[i * b + j] = 0.5 * (dense[i * b + j] - dense[j * b + i]);
        }
    }
    Ok(pack_upper(&skew, b))
}

/// Inverse of a `b × b` block (for Neumann blocks, which are not orthogonal).
pub fn invert_block(r: &[f64], b: usize) -> Option<Vec<f64>> {
    let m = DMatrix::from_row_slice(b, b, r).try_inverse()?;
    Some((0..b * b).map(|k| m[(k / b, k % b)]).collect())
}

/// Property tests of the maps (moved from the integration tests when `rotation` became private).
#[cfg(test)]
#[path = "rotation_props.rs"]
mod props;

#[cfg(test)]
mod tests {
    use super::*;

    /// The unblocked LU solve `cayley` used before (nalgebra), as a reference.
    fn cayley_reference(q: &[f64], b: usize) -> Vec<f64> {
        let minus = DMatrix::from_fn(b, b, |i, j| f64::from(u8::from(i == j)) - q[i * b + j]);
        let plus = DMatrix::from_fn(b, b, |i, j| f64::from(u8::from(i == j)) + q[i * b + j]);
        let sol = minus.lu().solve(&plus).expect("I − Q is invertible");
        (0..b * b).map(|k| sol[(k / b, k % b)]).collect()
    }

    #[test]
    fn blocked_cayley_matches_the_unblocked_solve() {
        for &b in &[1usize, 2, 3, 5, 16, 17, 63, 64, 65, 130, 256] {
            for &scale in &[1e-3, 0.1, 3.0, 40.0] {
                let q = unpack_skew(&sample_tri(b, scale), b);
                let fast = cayley(&q, b);
                let slow = cayley_reference(&q, b);
                let worst = fast
                    .iter()
                    .zip(&slow)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0, f64::max);
                assert!(
                    worst < 1e-12,
                    "b = {b}, scale {scale}: differs by {worst:e}"
                );
                assert!(
                    orthogonality_error(&fast, b) < 1e-11,
                    "b = {b}, scale {scale}"
                );
            }
        }
    }

    #[test]
    #[ignore = "timing, run by hand: cargo test --release --lib cayley_speed -- --ignored --nocapture"]
    fn cayley_speed() {
        let b = 256;
        let q = unpack_skew(&sample_tri(b, 0.01), b);
        let time = |f: &dyn Fn() -> f64| {
            let t = std::time::Instant::now();
            let mut s = 0.0;
            for _ in 0..20 {
                s += f();
            }
            (t.elapsed().as_secs_f64() / 20.0, s)
        };
        let (fast, _) = time(&|| cayley(&q, b)[5]);
        let (slow, _) = time(&|| cayley_reference(&q, b)[5]);
        println!(
            "b = 256: faer {:.2} ms, nalgebra {:.2} ms per block",
            fast * 1e3,
            slow * 1e3
        );
    }

    fn sample_tri(b: usize, scale: f64) -> Vec<f64> {
        (0..tri_len(b))
            .map(|k| scale * (((k * 37 + 11) % 17) as f64 - 8.0) / 8.0)
            .collect()
    }

    #[test]
    fn triangle_sizes_round_trip() {
        for b in 2..300 {
            assert_eq!(block_size_from_tri_len(tri_len(b)), Some(b));
        }
        assert_eq!(block_size_from_tri_len(4), None);
        assert_eq!(block_size_from_tri_len(7), None);
    }

    #[test]
    fn cayley_is_orthogonal_and_transpose_is_negation() {
        let b = 6;
        let t = sample_tri(b, 0.3);
        let r = cayley(&unpack_skew(&t, b), b);
        assert!(orthogonality_error(&r, b) < 1e-13);
        let neg: Vec<f64> = t.iter().map(|x| -x).collect();
        let rn = cayley(&unpack_skew(&neg, b), b);
        for i in 0..b {
            for j in 0..b {
                assert!((r[i * b + j] - rn[j * b + i]).abs() < 1e-14);
            }
        }
        let back = inverse_cayley(&r, b).expect("invertible");
        assert!((pack_upper(&back, b).iter().zip(&t)).all(|(a, c)| (a - c).abs() < 1e-12));
    }

    #[test]
    fn neumann_approaches_cayley_and_variants_differ() {
        let b = 4;
        let t = sample_tri(b, 0.02);
        let q = unpack_skew(&t, b);
        let exact = cayley(&q, b);
        let n18 = neumann(&q, b, 12, NeumannVariant::Peft018);
        let n16 = neumann(&q, b, 5, NeumannVariant::Peft016);
        let n18_5 = neumann(&q, b, 5, NeumannVariant::Peft018);
        let diff = |a: &[f64], c: &[f64]| {
            a.iter()
                .zip(c)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f64::max)
        };
        assert!(diff(&exact, &n18) < 1e-12);
        assert!(diff(&n16, &n18_5) > 0.0);
        // n = 3 and n = 4 coincide in the PEFT ≥ 0.18 series.
        assert_eq!(
            neumann(&q, b, 3, NeumannVariant::Peft018),
            neumann(&q, b, 4, NeumannVariant::Peft018)
        );
    }

    #[test]
    fn max_angle_of_a_plane_rotation() {
        // Q = [[0, t], [−t, 0]] rotates by 2·atan(t).
        let a = max_rotation_angle(&[0.5], 2);
        assert!((a - 2.0 * 0.5f64.atan()).abs() < 1e-12);
    }
}
