//! Strength: `ADAPTER:S` on the command line.
//!
//! The default is the geodesic power (spec §10): each Cayley stage becomes `R^S` (its rotation
//! angles scaled by S), so S = 0 is the identity, S = 1 the adapter, S = −1 its exact inverse
//! and S = 2 the adapter applied twice; every S gives an orthogonal R. Parity modes reproduce a
//! tool's own rule for users who must match an image made there; they are not rotations, so
//! they exist only at bake time.

use crate::apply::Blend;
use crate::error::{Category, Error, Result};
use crate::model::{Adapter, Layer, RotationMap, ScalePosition, Stage};
use crate::rotation::cayley_power;
use std::path::PathBuf;

/// Whose strength rule to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BlendMode {
    /// R^S per stage (orthogonal for every S).
    #[default]
    Geodesic,
    /// kohya legacy OFT: each block `S·(R − I) + I`.
    Kohya,
    /// LyCORIS: each block (each BOFT stage) `S·R + (1 − S)·I`, `rescale` in full.
    Lycoris,
    /// AUTOMATIC1111: `W + S·(W' − W)`, kohya's clamp factor.
    A1111,
    /// ComfyUI: OFT blocks `S²·R + (1 − S²)·I` without `rescale`; BOFT stages interpolated by S,
    /// `rescale` applied, then `W + S·(W' − W)`; constraint radius = raw alpha.
    ComfyUi,
}

impl BlendMode {
    /// How `oft_blocks` files are read for this mode.
    pub fn semantics(self) -> crate::layouts::Semantics {
        use crate::layouts::Semantics;
        match self {
            BlendMode::A1111 => Semantics::A1111,
            BlendMode::ComfyUi => Semantics::ComfyUi,
            _ => Semantics::Producer,
        }
    }

    /// The bake-time rule for one layer at strength `s` (`None` for geodesic: pre-applied).
    pub fn layer_blend(self, layer: &Layer, s: f64) -> Blend {
        let butterfly = layer
            .stages
            .iter()
            .any(|st| !matches!(st.spec.wiring, crate::model::Wiring::Identity));
        match self {
            BlendMode::Geodesic => Blend::default(),
            BlendMode::Kohya | BlendMode::Lycoris => Blend {
                interpolate: Some(s),
                linear: None,
            },
            BlendMode::A1111 => Blend {
                interpolate: None,
                linear: Some(s),
            },
            BlendMode::ComfyUi if butterfly => Blend {
                interpolate: Some(s),
                linear: Some(s),
            },
            BlendMode::ComfyUi => Blend {
                interpolate: Some(s * s),
                linear: None,
            },
        }
    }
}

/// An adapter to bake or compose, with its optional strength (`ADAPTER:S` on the command line;
/// the binary parses that form).
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterArg {
    /// The adapter file (any layout).
    pub path: PathBuf,
    /// Its strength, if given (`None`: the adapter as stored).
    pub strength: Option<f64>,
}

impl std::fmt::Display for AdapterArg {
    /// `PATH` or `PATH:S`, as on the command line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.path.display())?;
        match self.strength {
            Some(s) => write!(f, ":{s}"),
            None => Ok(()),
        }
    }
}

fn stage_power(stage: &Stage, s: f64, layer: &str, j: usize) -> Result<Stage> {
    if stage.spec.truncated && s != 1.0 {
        return Err(Error::new(
            Category::Algebra,
            format!(
                "layer `{layer}` stage {j} is truncated (PEFT 0.7–0.13 cuts its block-diagonal \
                 matrix to the weight inside a block): the cut matrix is no rotation, so it has \
                 no strength {s} and no exact inverse; bake it at strength 1"
            ),
        )
        .hint("oftool merge BASE ADAPTER (no :S); unmerge cannot undo it"));
    }
    let b = stage.spec.block_size as usize;
    let n = stage.tri_len();
    let mut q = Vec::with_capacity(stage.q.len());
    for row in (0..stage.stored_blocks() as usize).map(|k| &stage.q[k * n..(k + 1) * n]) {
        let p = cayley_power(row, b, s).map_err(|e| {
            Error::new(Category::Algebra, format!("layer `{layer}` stage {j}: {e}"))
        })?;
        q.extend(p);
    }
    Ok(Stage {
        q,
        q_f64: true,
        ..stage.clone()
    })
}

/// `layer^S` (spec §10): stages powered; for S < 0 the inverse of `layer^|S|` (stages in reverse
/// order, Cayley stages negated, Neumann stages marked for exact inversion); row scales `s^S`.
pub fn layer_power(layer: &Layer, s: f64) -> Result<Layer> {
    let name = &layer.target.name;
    let mag = s.abs();
    let mut stages = layer
        .stages
        .iter()
        .enumerate()
        .map(|(j, st)| stage_power(st, mag, name, j))
        .collect::<Result<Vec<_>>>()?;
    let mut row_scale = layer.row_scale.clone();
    if let Some((_, v)) = &mut row_scale {
        if v.iter().any(|&x| x <= 0.0) && s.fract() != 0.0 {
            return Err(Error::new(
                Category::Algebra,
                format!("layer `{name}`: a row scale with non-positive entries has no power {s}"),
            ));
        }
        v.iter_mut().for_each(|x| *x = x.powf(s));
    }
    if s < 0.0 {
        stages.reverse();
        for st in &mut stages {
            match st.spec.map {
                RotationMap::Cayley => st.q.iter_mut().for_each(|x| *x = -*x),
                RotationMap::Neumann { .. } => st.inverse = !st.inverse,
            }
        }
        if let Some((pos, _)) = &mut row_scale {
            *pos = match pos {
                ScalePosition::Before => ScalePosition::After,
                ScalePosition::After => ScalePosition::Before,
            };
        }
    }
    Ok(Layer {
        stages,
        row_scale,
        row_scale_f64: true,
        constraint: None,
        ..layer.clone()
    })
}

/// The adapter at geodesic strength `s`.
pub fn adapter_power(adapter: &Adapter, s: f64) -> Result<Adapter> {
    if s == 1.0 {
        return Ok(adapter.clone());
    }
    Ok(Adapter {
        provenance: adapter.provenance.clone(),
        layers: adapter
            .layers
            .iter()
            .map(|l| layer_power(l, s))
            .collect::<Result<_>>()?,
        features: adapter.features.clone(),
    })
}

/// The exact inverse of an adapter (for `unmerge`): `adapter^(−1)`, layers in reverse order.
pub fn adapter_inverse(adapter: &Adapter) -> Result<Adapter> {
    let mut inv = adapter_power(adapter, -1.0)?;
    inv.layers.reverse();
    Ok(inv)
}
