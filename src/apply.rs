//! Applying a layer to a weight held in memory (f64), per the spec's per-side formulas.
//!
//! The streaming bake builds on this; it is also what the fixtures check against PEFT and LyCORIS.

use crate::error::Error;
use crate::model::{Layer, ScalePosition, Side, Stage};
use crate::rotation::rotation_block;
use crate::wiring::gather;

/// A weight viewed as a row-major 2-D matrix `(rows, cols)`: Linear `(out, in)`, Conv
/// `(out, in·kh·kw)`, Embedding `(num_embeddings, dim)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f64>,
}

impl Matrix {
    /// View a tensor of `shape` as 2-D: the first axis against all others flattened.
    pub fn from_shape(shape: &[usize], data: Vec<f64>) -> Result<Self, Error> {
        let rows = *shape.first().ok_or_else(|| Error::Shape {
            what: "a weight".into(),
            detail: "a 0-dimensional tensor cannot be rotated".into(),
        })?;
        let cols: usize = shape[1..].iter().product();
        if rows * cols != data.len() {
            return Err(Error::Shape {
                what: "a weight".into(),
                detail: format!("{} values do not fill shape {shape:?}", data.len()),
            });
        }
        Ok(Matrix { rows, cols, data })
    }
}

/// The evaluated blocks of one stage with its gather list.
pub struct PreparedStage {
    pub b: usize,
    pub blocks: usize,
    /// One `b × b` block per stored block (1 when shared).
    pub rotations: Vec<Vec<f64>>,
    pub sigma: Vec<usize>,
}

impl PreparedStage {
    /// Evaluate `stage` for an axis of `axis` features (which fixes the block count of an
    /// unsized shared stage).
    pub fn new(stage: &Stage, axis: usize) -> Result<Self, Error> {
        let b = stage.spec.block_size as usize;
        let blocks = stage.blocks_on(axis as u64) as usize;
        let sigma = gather(&stage.spec.wiring, blocks, b).map_err(|e| Error::Invalid(e.0))?;
        let rotations = (0..stage.stored_blocks() as usize)
            .map(|k| rotation_block(stage.q_row(k), b, &stage.spec.map))
            .collect();
        Ok(PreparedStage {
            b,
            blocks,
            rotations,
            sigma,
        })
    }

    fn block(&self, k: usize) -> &[f64] {
        if self.rotations.len() == 1 {
            &self.rotations[0]
        } else {
            &self.rotations[k]
        }
    }

    /// `W ← W · Eᵀ`: `W'[:, σ[kb+t]] = Σ_u W[:, σ[kb+u]] · R_k[t][u]`.
    fn apply_input(&self, w: &mut Matrix) {
        let b = self.b;
        let mut x = vec![0.0; b];
        for row in w.data.chunks_exact_mut(w.cols) {
            for k in 0..self.blocks {
                let idx = &self.sigma[k * b..(k + 1) * b];
                for (xu, &i) in x.iter_mut().zip(idx) {
                    *xu = row[i];
                }
                let r = self.block(k);
                for (t, &i) in idx.iter().enumerate() {
                    let rt = &r[t * b..(t + 1) * b];
                    row[i] = rt.iter().zip(&x).map(|(a, c)| a * c).sum();
                }
            }
        }
    }

    /// `W ← Eᵀ · W`: `W'[σ[kb+t], :] = Σ_u R_k[u][t] · W[σ[kb+u], :]`.
    fn apply_output(&self, w: &mut Matrix) {
        let b = self.b;
        let cols = w.cols;
        let mut src = vec![0.0; b * cols];
        for k in 0..self.blocks {
            let idx = &self.sigma[k * b..(k + 1) * b];
            for (u, &i) in idx.iter().enumerate() {
                src[u * cols..(u + 1) * cols].copy_from_slice(&w.data[i * cols..(i + 1) * cols]);
            }
            let r = self.block(k);
            for (t, &i) in idx.iter().enumerate() {
                let dst = &mut w.data[i * cols..(i + 1) * cols];
                dst.fill(0.0);
                for u in 0..b {
                    let c = r[u * b + t];
                    if c == 0.0 {
                        continue;
                    }
                    for (d, &s) in dst.iter_mut().zip(&src[u * cols..(u + 1) * cols]) {
                        *d += c * s;
                    }
                }
            }
        }
    }

    pub fn apply(&self, side: Side, w: &mut Matrix) {
        match side {
            Side::Input => self.apply_input(w),
            Side::Output => self.apply_output(w),
        }
    }
}

/// Check that `layer` fits a weight of this 2-D view.
pub fn check_fits(layer: &Layer, w: &Matrix) -> Result<(), Error> {
    let axis = match layer.side {
        Side::Input => w.cols,
        Side::Output => w.rows,
    };
    for (j, s) in layer.stages.iter().enumerate() {
        let b = s.spec.block_size as usize;
        let blocks = s.blocks_on(axis as u64) as usize;
        if blocks * b != axis {
            return Err(Error::Shape {
                what: layer.target.name.clone(),
                detail: format!(
                    "stage {j} rotates {blocks} × {b} = {} {} features but the weight has {axis} ({} × {} view)",
                    blocks * b,
                    layer.side.as_str(),
                    w.rows,
                    w.cols
                ),
            });
        }
    }
    if let Some((_, s)) = &layer.row_scale
        && s.len() != w.rows
    {
        return Err(Error::Shape {
            what: layer.target.name.clone(),
            detail: format!(
                "row scale has {} entries but the weight has {} rows",
                s.len(),
                w.rows
            ),
        });
    }
    Ok(())
}

fn scale_rows(w: &mut Matrix, s: &[f64]) {
    for (row, &f) in w.data.chunks_exact_mut(w.cols).zip(s) {
        row.iter_mut().for_each(|x| *x *= f);
    }
}

/// Apply every stage of `layer` (and its row scale) to `w` in place.
pub fn apply_layer(layer: &Layer, w: &mut Matrix) -> Result<(), Error> {
    check_fits(layer, w)?;
    if let Some((ScalePosition::Before, s)) = &layer.row_scale {
        scale_rows(w, s);
    }
    let axis = match layer.side {
        Side::Input => w.cols,
        Side::Output => w.rows,
    };
    for stage in &layer.stages {
        PreparedStage::new(stage, axis)?.apply(layer.side, w);
    }
    if let Some((ScalePosition::After, s)) = &layer.row_scale {
        scale_rows(w, s);
    }
    Ok(())
}
