//! Stage wirings: which global indices each block of a stage acts on.
//!
//! A wiring is a gather list σ of length d = blocks·b: local index `t` of block `k` is global
//! index `σ[k·b + t]`. Butterfly wirings are defined in `spec/oft-format.md` §5.

use crate::model::{Wiring, WiringProducer};

/// Why a wiring cannot be built for a stage's partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WiringError(pub String);

/// Gather list for `wiring` on a stage of `blocks` blocks of size `b`.
pub fn gather(wiring: &Wiring, blocks: usize, b: usize) -> Result<Vec<usize>, WiringError> {
    let d = blocks * b;
    match wiring {
        Wiring::Identity => Ok((0..d).collect()),
        Wiring::Butterfly { producer, index } => {
            let i = *index as usize;
            if !b.is_multiple_of(2) {
                return Err(WiringError(format!(
                    "a butterfly stage needs an even block size, got {b}"
                )));
            }
            // Stage i pairs half-blocks inside chunks of 2^i·b indices.
            let chunk = b
                .checked_shl(i as u32)
                .filter(|&c| c <= d && c > 0 && d.is_multiple_of(c))
                .ok_or_else(|| {
                    WiringError(format!(
                        "butterfly stage {i} needs chunks of 2^{i}·{b} that divide the dimension {d}"
                    ))
                })?;
            Ok(match producer {
                WiringProducer::Peft => peft_gather(d, chunk, b / 2),
                WiringProducer::Lycoris => lycoris_gather(d, chunk / 2),
            })
        }
    }
}

/// PEFT BOFT: inside each chunk, sub-chunks of length `half` are reordered even-indexed first,
/// then odd (`perm`); PEFT applies `P·BD·Pᵀ` with `P[a, perm[a]] = 1`, so σ = perm⁻¹.
fn peft_gather(d: usize, chunk: usize, half: usize) -> Vec<usize> {
    let subs = chunk / half;
    let order: Vec<usize> = (0..subs).step_by(2).chain((1..subs).step_by(2)).collect();
    let mut perm = Vec::with_capacity(d);
    for base in (0..d).step_by(chunk) {
        for &s in &order {
            perm.extend((0..half).map(|t| base + s * half + t));
        }
    }
    let mut sigma = vec![0; d];
    for (a, &p) in perm.iter().enumerate() {
        sigma[p] = a;
    }
    sigma
}

/// LyCORIS BOFT: rows viewed as `(c, 2, k)` are regrouped as `(c, k, 2)` and cut into blocks,
/// so position `p = c·2k + 2j + g` holds original row `c·2k + g·k + j`.
fn lycoris_gather(d: usize, k: usize) -> Vec<usize> {
    (0..d)
        .map(|p| {
            let (c, rest) = (p / (2 * k), p % (2 * k));
            let (j, g) = (rest / 2, rest % 2);
            c * 2 * k + g * k + j
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bf(producer: WiringProducer, index: u32) -> Wiring {
        Wiring::Butterfly { producer, index }
    }

    #[test]
    fn peft_stage_zero_is_identity_and_later_stages_pair_half_blocks() {
        let g0 = gather(&bf(WiringProducer::Peft, 0), 8, 4).unwrap();
        assert_eq!(g0, (0..32).collect::<Vec<_>>());
        // formats.md §11: PEFT stage-1 perm starts [0,1,4,5,2,3,6,7]; σ is its inverse (an involution here).
        let g1 = gather(&bf(WiringProducer::Peft, 1), 8, 4).unwrap();
        assert_eq!(&g1[..8], &[0, 1, 4, 5, 2, 3, 6, 7]);
    }

    #[test]
    fn lycoris_stage_zero_interleaves_within_blocks() {
        let g0 = gather(&bf(WiringProducer::Lycoris, 0), 8, 4).unwrap();
        assert_eq!(&g0[..8], &[0, 2, 1, 3, 4, 6, 5, 7]);
        let g1 = gather(&bf(WiringProducer::Lycoris, 1), 8, 4).unwrap();
        assert_eq!(&g1[..8], &[0, 4, 1, 5, 2, 6, 3, 7]);
    }

    #[test]
    fn gathers_are_permutations() {
        for p in [WiringProducer::Peft, WiringProducer::Lycoris] {
            for i in 0..4 {
                let mut g = gather(&bf(p, i), 16, 4).unwrap();
                g.sort_unstable();
                assert_eq!(g, (0..64).collect::<Vec<_>>());
            }
        }
    }

    #[test]
    fn odd_blocks_and_oversized_stages_are_refused() {
        assert!(gather(&bf(WiringProducer::Peft, 0), 4, 3).is_err());
        assert!(gather(&bf(WiringProducer::Peft, 3), 4, 4).is_err());
    }
}
