//! Extracting a block-diagonal rotation from a finetune: per block, the orthogonal Procrustes
//! problem in the spec's convention, restricted to what the Cayley map can express.
//!
//! Given the base weight `W₀` and the finetuned `W₁` (row-major 2-D views, `rows × cols`), a
//! block size `b` and a side, each block `k` is fitted independently (spec §4.6, identity
//! wiring, one stage):
//!
//! * side `input`: `W₁[:, blk] ≈ W₀[:, blk] · R_kᵀ` (columns `[k·b, (k+1)·b)`);
//! * side `output`: `W₁[blk, :] ≈ R_kᵀ · W₀[blk, :]` (rows `[k·b, (k+1)·b)`).
//!
//! Both are `min ‖Y − X·S‖_F` over orthogonal `S`, with `X, Y` the block's `len × b` panels of
//! `W₀, W₁` (input: the columns themselves, `S = R_kᵀ`; output: the rows transposed, `S = R_k`).
//! With `M = XᵀY = U·Σ·Vᵀ` the orthogonal optimum is `S = U·Vᵀ` (Schönemann 1966), residual
//! `‖X‖² + ‖Y‖² − 2·Σσᵢ`. The Cayley map reaches only part of it:
//!
//! * **reflections** (`det S = −1`): the rotation optimum flips the direction of the smallest
//!   singular value, `S = U·diag(1, …, 1, −1)·Vᵀ` (Kabsch 1976; Umeyama 1991), which costs
//!   `4·σ_min` of `tr(SᵀM)`;
//! * **half-turns** (eigenvalue −1, angle π, where `Q = (R − I)(R + I)⁻¹` does not exist):
//!   every rotation plane whose angle exceeds `max_angle` (default π − 10⁻³) is turned back to
//!   `±max_angle`, the sign nearest its own angle (for an exact half-turn, +), found from the
//!   real Schur form `S = P·T·Pᵀ`. The result is the rotation with no angle above `max_angle`
//!   nearest to `S`; `max_angle < π` keeps `R + I` invertible and `Q` finite.
//!
//! `Q_k` is then the inverse Cayley map of `R_k` in f64 (`R = Cay+(Q) = (I + Q)(I − Q)⁻¹`, spec
//! §4.3, the convention of [`crate::rotation`]), stored as its packed strict upper triangle. The
//! residuals are measured directly with the rotation the stored `Q` gives back, so they are what
//! a bake of the extracted adapter leaves.

use crate::error::{Category, Error};
use crate::model::{RotationMap, Side, Stage, StageSpec, Wiring};
use crate::rotation::{cayley, inverse_cayley, pack_upper, tri_len, unpack_skew};
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};
use rayon::prelude::*;

/// Default largest rotation angle of an extracted block: π − 10⁻³ rad (0.057° short of a
/// half-turn), where `‖Q‖` reaches `cot(5·10⁻⁴) ≈ 2000` and `Cay(Q)` is still accurate to ~10⁻¹².
pub const DEFAULT_MAX_ANGLE: f64 = std::f64::consts::PI - 1e-3;

/// What to extract.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExtractOptions {
    /// Which side of the weight the rotation acts on.
    pub side: Side,
    /// Block size of the extracted stage.
    pub block_size: usize,
    /// Largest rotation angle (radians, in `(0, π)`) of any plane of any block.
    pub max_angle: f64,
}

impl ExtractOptions {
    /// Options for `side` and `block_size`, with [`DEFAULT_MAX_ANGLE`].
    pub fn new(side: Side, block_size: usize) -> Self {
        ExtractOptions {
            side,
            block_size,
            max_angle: DEFAULT_MAX_ANGLE,
        }
    }
}

/// How one block was fitted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockFit {
    /// `‖W₁ − W₀·R‖²_F` over the block's panel, with R from the stored Q.
    pub residual_sq: f64,
    /// `‖W₁ − W₀‖²_F` over the block's panel (what no rotation at all leaves).
    pub baseline_sq: f64,
    /// How much larger `residual_sq` is than the best orthogonal matrix's (reflections
    /// included): the cost of the Cayley map's reach (reflection, half-turns), ≥ 0.
    pub constraint_loss_sq: f64,
    /// The best orthogonal matrix was a reflection (`det = −1`).
    pub reflection: bool,
    /// Rotation planes turned back to `max_angle`.
    pub capped_planes: usize,
    /// Largest rotation angle of the stored block (radians).
    pub angle: f64,
}

/// The extracted stage of one layer and how well it explains the finetune.
#[derive(Debug, Clone, PartialEq)]
pub struct Extraction {
    /// Which side of the weight the rotation acts on.
    pub side: Side,
    /// Block size.
    pub block_size: usize,
    /// Packed strict upper triangles of `Q_k`, row-major `[blocks, b(b−1)/2]`.
    pub q: Vec<f64>,
    /// How well each block fits, one per block.
    pub fits: Vec<BlockFit>,
}

impl Extraction {
    /// Number of blocks.
    pub fn blocks(&self) -> usize {
        self.fits.len()
    }

    /// `‖W₁ − W₀·R‖_F` over the whole weight.
    pub fn residual(&self) -> f64 {
        self.fits.iter().map(|f| f.residual_sq).sum::<f64>().sqrt()
    }

    /// `‖W₁ − W₀‖_F`.
    pub fn baseline(&self) -> f64 {
        self.fits.iter().map(|f| f.baseline_sq).sum::<f64>().sqrt()
    }

    /// `‖W₁ − W₀·R‖_F / ‖W₁ − W₀‖_F`: the part of the finetune that is no rotation (0 when the
    /// weights are equal).
    pub fn relative_residual(&self) -> f64 {
        let base = self.baseline();
        if base == 0.0 {
            0.0
        } else {
            self.residual() / base
        }
    }

    /// Blocks whose best orthogonal fit was a reflection, and planes capped short of a half-turn.
    pub fn constraint_counts(&self) -> (usize, usize) {
        let refl = self.fits.iter().filter(|f| f.reflection).count();
        let capped = self.fits.iter().map(|f| f.capped_planes).sum();
        (refl, capped)
    }

    /// The extraction as a single exact-Cayley stage with identity wiring (Q kept in f64).
    pub fn stage(&self, q_tensor: &str) -> Stage {
        Stage {
            spec: StageSpec {
                truncated: false,
                blocks: Some(self.blocks() as u64),
                block_size: self.block_size as u64,
                shared: false,
                wiring: Wiring::Identity,
                map: RotationMap::Cayley,
                q: q_tensor.to_string(),
            },
            q: self.q.clone(),
            q_f64: true,
            inverse: false,
        }
    }
}

/// The block-diagonal rotation that best maps `w0` onto `w1` (both row-major `rows × cols`).
pub fn extract(
    w0: &[f64],
    w1: &[f64],
    rows: usize,
    cols: usize,
    opts: &ExtractOptions,
) -> Result<Extraction, Error> {
    let n = rows.checked_mul(cols);
    if n != Some(w0.len()) || n != Some(w1.len()) {
        return Err(Error::new(
            Category::TargetShape,
            format!("the base and finetuned weights do not both fill a {rows} × {cols} matrix"),
        )
        .expected_found(
            format!("{rows} × {cols} values each"),
            format!("{} and {}", w0.len(), w1.len()),
        ));
    }
    let b = opts.block_size;
    let d = match opts.side {
        Side::Input => cols,
        Side::Output => rows,
    };
    if b == 0 || d % b != 0 {
        return Err(Error::new(
            Category::Partition,
            format!(
                "block size {b} does not divide the {} dimension {d}",
                opts.side.as_str()
            ),
        )
        .hint("choose a block size that divides it, or the other side"));
    }
    if !(opts.max_angle > 0.0 && opts.max_angle < std::f64::consts::PI) {
        return Err(Error::new(
            Category::Usage,
            format!("largest angle {} is outside (0, π)", opts.max_angle),
        ));
    }
    if w0.iter().chain(w1).any(|x| !x.is_finite()) {
        return Err(Error::new(
            Category::NonFinite,
            "a weight holds NaN or infinite values",
        ));
    }
    let blocks = d / b;
    // faer's factorisations read its global parallelism: fix it, so the output does not depend
    // on the number of threads.
    crate::lowrank::faer_par();
    // Panel of block k: element (i, j) of X (len × b) is w[off + i·ra + j·ca].
    let (len, ra, ca) = match opts.side {
        Side::Input => (rows, cols, 1),
        Side::Output => (cols, 1, cols),
    };
    let results = (0..blocks)
        .into_par_iter()
        .map(|k| {
            let off = match opts.side {
                Side::Input => k * b,
                Side::Output => k * b * cols,
            };
            let panel = Panel {
                len,
                b,
                ra,
                ca,
                x: &w0[off..],
                y: &w1[off..],
            };
            fit_block(&panel, opts.side, opts.max_angle)
        })
        .collect::<Result<Vec<_>, Error>>()?;
    let mut q = Vec::with_capacity(blocks * tri_len(b));
    let mut fits = Vec::with_capacity(blocks);
    for (tri, fit) in results {
        q.extend(tri);
        fits.push(fit);
    }
    Ok(Extraction {
        side: opts.side,
        block_size: b,
        q,
        fits,
    })
}

/// One block's `len × b` panels of `W₀` (`x`) and `W₁` (`y`), strided into the weights.
struct Panel<'a> {
    len: usize,
    b: usize,
    ra: usize,
    ca: usize,
    x: &'a [f64],
    y: &'a [f64],
}

fn fit_block(p: &Panel<'_>, side: Side, max_angle: f64) -> Result<(Vec<f64>, BlockFit), Error> {
    let b = p.b;
    let (x, y) = (panel_matrix(p, p.x), panel_matrix(p, p.y));
    let mut m = Mat::<f64>::zeros(b, b);
    matmul(
        m.as_mut(),
        Accum::Replace,
        x.transpose(),
        y.as_ref(),
        1.0,
        Par::Seq,
    );
    let fit = nearest_rotation(m.as_ref(), max_angle)?;
    // R = S (output side) or Sᵀ (input side); store Q = Cay⁻¹(R).
    let r: Vec<f64> = match side {
        Side::Output => fit.s.clone(),
        Side::Input => transpose(&fit.s, b),
    };
    let q_dense = inverse_cayley(&r, b).ok_or_else(|| {
        Error::new(
            Category::Algebra,
            "an extracted block has no Cayley parameter (a half-turn was left)",
        )
    })?;
    let mut skew = vec![0.0; b * b];
    for i in 0..b {
        for j in 0..b {
            skew[i * b + j] = 0.5 * (q_dense[i * b + j] - q_dense[j * b + i]);
        }
    }
    let tri = pack_upper(&skew, b);
    // The rotation the stored Q gives back, as S again.
    let r_back = cayley(&unpack_skew(&tri, b), b);
    let s_back = match side {
        Side::Output => r_back,
        Side::Input => transpose(&r_back, b),
    };
    let s_mat = MatRef::from_row_major_slice(&s_back, b, b);
    let mut fitted = Mat::<f64>::zeros(p.len, b);
    matmul(
        fitted.as_mut(),
        Accum::Replace,
        x.as_ref(),
        s_mat,
        1.0,
        Par::Seq,
    );
    let (mut residual_sq, mut baseline_sq) = (0.0, 0.0);
    for j in 0..b {
        for i in 0..p.len {
            let yv = y[(i, j)];
            residual_sq += (yv - fitted[(i, j)]).powi(2);
            baseline_sq += (yv - x[(i, j)]).powi(2);
        }
    }
    // tr(SᵀM) of the stored rotation against the orthogonal optimum Σσ.
    let mut trace = 0.0;
    for i in 0..b {
        for j in 0..b {
            trace += s_back[i * b + j] * m[(i, j)];
        }
    }
    let angle = if fit.capped_planes > 0 {
        max_angle
    } else {
        fit.angle
    };
    Ok((
        tri,
        BlockFit {
            residual_sq,
            baseline_sq,
            constraint_loss_sq: (2.0 * (fit.sigma_sum - trace)).max(0.0),
            reflection: fit.reflection,
            capped_planes: fit.capped_planes,
            angle,
        },
    ))
}

fn panel_matrix(p: &Panel<'_>, w: &[f64]) -> Mat<f64> {
    Mat::from_fn(p.len, p.b, |i, j| w[i * p.ra + j * p.ca])
}

fn transpose(a: &[f64], b: usize) -> Vec<f64> {
    (0..b * b).map(|k| a[(k % b) * b + k / b]).collect()
}

/// The rotation `S` maximising `tr(SᵀM)` among those with no angle above `max_angle`.
#[derive(Debug, Clone, PartialEq)]
pub struct RotationFit {
    /// Row-major `b × b`.
    pub s: Vec<f64>,
    /// `Σσᵢ(M)`: `tr(SᵀM)` of the best orthogonal matrix.
    pub sigma_sum: f64,
    /// The best orthogonal matrix had `det = −1` (the smallest direction was flipped).
    pub reflection: bool,
    /// Planes turned back to `max_angle`.
    pub capped_planes: usize,
    /// Largest rotation angle of `s` before capping (radians).
    pub angle: f64,
}

/// Special-orthogonal Procrustes for a `b × b` cross-covariance `M = XᵀY`, with angles capped
/// at `max_angle` (see the module documentation).
pub fn nearest_rotation(m: MatRef<'_, f64>, max_angle: f64) -> Result<RotationFit, Error> {
    let b = m.nrows();
    let svd = m.svd().map_err(|_| {
        Error::new(
            Category::Algebra,
            "the singular value decomposition of a block did not converge",
        )
    })?;
    let (u, v) = (svd.U(), svd.V());
    let sigma: Vec<f64> = svd.S().column_vector().iter().copied().collect();
    let sigma_sum = sigma.iter().sum();
    let mut s = Mat::<f64>::zeros(b, b);
    matmul(s.as_mut(), Accum::Replace, u, v.transpose(), 1.0, Par::Seq);
    let reflection = b > 0 && s.determinant() < 0.0;
    if reflection {
        // Flip the last (smallest) singular direction: S −= 2·u_last·v_lastᵀ.
        let (ul, vl) = (u.col(b - 1), v.col(b - 1));
        for i in 0..b {
            for j in 0..b {
                s[(i, j)] -= 2.0 * ul[i] * vl[j];
            }
        }
    }
    let mut dense: Vec<f64> = (0..b * b).map(|k| s[(k / b, k % b)]).collect();
    let angle = largest_angle(&dense, b);
    let mut capped_planes = 0;
    if angle > max_angle {
        capped_planes = cap_angles(&mut dense, b, max_angle)?;
    }
    Ok(RotationFit {
        s: dense,
        sigma_sum,
        reflection,
        capped_planes,
        angle,
    })
}

/// Largest rotation angle of a rotation `S`: the eigenvalues of `(S + Sᵀ)/2` are the cosines of
/// its angles.
pub fn largest_angle(s: &[f64], b: usize) -> f64 {
    if b < 2 {
        return 0.0;
    }
    let sym = nalgebra::DMatrix::from_fn(b, b, |i, j| 0.5 * (s[i * b + j] + s[j * b + i]));
    let c = sym
        .symmetric_eigenvalues()
        .iter()
        .fold(1.0f64, |m, &v| m.min(v));
    c.clamp(-1.0, 1.0).acos()
}

/// Turn every plane of the rotation `s` whose angle exceeds `max_angle` back to `±max_angle`
/// (the sign of its own angle; + for an exact half-turn), leaving every other plane as it is.
/// Returns the number of planes changed.
fn cap_angles(s: &mut [f64], b: usize, max_angle: f64) -> Result<usize, Error> {
    let schur = nalgebra::DMatrix::from_row_slice(b, b, s)
        .try_schur(f64::EPSILON, 10_000)
        .ok_or_else(|| {
            Error::new(
                Category::Algebra,
                "the Schur decomposition of a block did not converge",
            )
        })?;
    let (p, t) = schur.unpack();
    // Planes to replace: (i, j, their current 2 × 2 block of T, the new angle).
    let mut planes: Vec<(usize, usize, f64)> = Vec::new();
    let mut half_turns: Vec<usize> = Vec::new();
    let mut i = 0;
    while i < b {
        // A 2 × 2 diagonal block of T is one rotation plane; for a normal S the rest of T is zero
        // up to rounding. A half-turn shows as two 1 × 1 blocks of −1.
        if i + 1 < b && t[(i + 1, i)].abs() > 1e-12 {
            let theta = (0.5 * (t[(i + 1, i)] - t[(i, i + 1)]))
                .atan2(0.5 * (t[(i, i)] + t[(i + 1, i + 1)]));
            if theta.abs() > max_angle {
                planes.push((i, i + 1, max_angle.copysign(theta)));
            }
            i += 2;
        } else {
            if t[(i, i)] < 0.0 {
                half_turns.push(i);
            }
            i += 1;
        }
    }
    if half_turns.len() % 2 == 1 {
        return Err(Error::new(
            Category::Algebra,
            "a block has an odd number of half-turn directions (not a rotation)",
        ));
    }
    for pair in half_turns.chunks_exact(2) {
        planes.push((pair[0], pair[1], max_angle));
    }
    // S += P_plane·(rot(θ') − T_plane)·P_planeᵀ for each plane.
    for &(a, c, theta) in &planes {
        let (cs, sn) = (theta.cos(), theta.sin());
        let new = [[cs, -sn], [sn, cs]];
        let idx = [a, c];
        let mut delta = [[0.0; 2]; 2];
        for (r, &ir) in idx.iter().enumerate() {
            for (q, &iq) in idx.iter().enumerate() {
                delta[r][q] = new[r][q] - t[(ir, iq)];
            }
        }
        for row in 0..b {
            for col in 0..b {
                let mut acc = 0.0;
                for (r, &ir) in idx.iter().enumerate() {
                    for (q, &iq) in idx.iter().enumerate() {
                        acc += p[(row, ir)] * delta[r][q] * p[(col, iq)];
                    }
                }
                s[row * b + col] += acc;
            }
        }
    }
    Ok(planes.len())
}

/// Properties of the bridges' numerical core (`lowrank`, `procrustes`) against the rotation maps
/// (moved from the integration tests when `rotation` became private).
#[cfg(test)]
#[path = "bridge_math_tests.rs"]
mod bridge_math_tests;
