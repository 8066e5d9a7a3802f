//! Properties of the geodesic strength (issue: rotation algebra): R^S·R^T = R^(S+T), R^0 = I,
//! R^1 = R, R^(−1) = Rᵀ, and every power orthogonal, for random Q and block sizes 2–128.

#![allow(clippy::needless_range_loop)]

use crate::rotation::{cayley, cayley_power, matmul, orthogonality_error, tri_len, unpack_skew};
use proptest::prelude::*;

fn rot(tri: &[f64], b: usize) -> Vec<f64> {
    cayley(&unpack_skew(tri, b), b)
}

fn max_diff(a: &[f64], c: &[f64]) -> f64 {
    a.iter()
        .zip(c)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

fn block_and_q() -> impl Strategy<Value = (usize, Vec<f64>)> {
    prop_oneof![2usize..=16, 17usize..=48, Just(64usize), Just(128usize)].prop_flat_map(|b| {
        // Entries scaled so the largest angle stays well below 180°/|S+T|.
        let scale = 0.3 / (b as f64).sqrt();
        (Just(b), prop::collection::vec(-scale..scale, tri_len(b)))
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn powers_compose_and_stay_orthogonal((b, q) in block_and_q(), s in -1.5f64..1.5, t in -1.5f64..1.5) {
        let qs = cayley_power(&q, b, s).unwrap();
        let qt = cayley_power(&q, b, t).unwrap();
        let qst = cayley_power(&q, b, s + t).unwrap();
        let (rs, rt, rst) = (rot(&qs, b), rot(&qt, b), rot(&qst, b));
        prop_assert!(max_diff(&matmul(&rs, &rt, b), &rst) < 1e-12);
        prop_assert!(orthogonality_error(&rs, b) < 1e-12);
        prop_assert!(orthogonality_error(&rst, b) < 1e-12);
    }

    #[test]
    fn special_strengths((b, q) in block_and_q()) {
        let r = rot(&q, b);
        let r0 = rot(&cayley_power(&q, b, 0.0).unwrap(), b);
        let ident: Vec<f64> = (0..b * b).map(|k| if k / b == k % b { 1.0 } else { 0.0 }).collect();
        prop_assert!(max_diff(&r0, &ident) < 1e-12);
        prop_assert!(max_diff(&rot(&cayley_power(&q, b, 1.0).unwrap(), b), &r) < 1e-12);
        let rinv = rot(&cayley_power(&q, b, -1.0).unwrap(), b);
        let rt: Vec<f64> = (0..b * b).map(|k| r[(k % b) * b + k / b]).collect();
        prop_assert!(max_diff(&rinv, &rt) < 1e-12);
        let r2 = rot(&cayley_power(&q, b, 2.0).unwrap(), b);
        prop_assert!(max_diff(&r2, &matmul(&r, &r, b)) < 1e-12);
    }
}

#[test]
fn strengths_past_half_a_turn_are_refused() {
    // A 120° plane rotation (λ = tan 60°) at strength 2 would reach 240°.
    let q = [3f64.sqrt()];
    assert!(cayley_power(&q, 2, 2.0).is_err());
    assert!(cayley_power(&q, 2, 1.4).is_ok());
}
