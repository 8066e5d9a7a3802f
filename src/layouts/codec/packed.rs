//! Packed triangles: `<module>.oft_R.weight` `[blocks, b(b−1)/2]`, the strict upper triangle of
//! each block's `Q_p` row by row (PEFT ≥ 0.16, formats.md §3.3), with PEFT ≥ 0.16's COFT
//! projection; and the trainers' files built on it (kohya `networks.oft_v2`, §4.3, and
//! OneTrainer `OFT_2`, §8.1), which share one reader and one writer here.
//!
//! The trainers take `Q_p = (M − Mᵀ)/σ` (`σ = 2·√(b − 1)` for OneTrainer's scaled OFT, else 1),
//! Neumann with 5 terms and PEFT ≥ 0.18 coefficients, and merge Linear layers as `W·BD(R)ᵀ`
//! (canonical `Q = Q_p`) but Conv2d layers as `W̃·BD(R)` (canonical `Q = −Q_p`, because
//! `N(Q)ᵀ = N(−Q)`). The file does not say which modules are convolutions; their names do
//! ([`names::is_conv_name`]), and oftool's own files list them ([`CONV_LIST_KEY`]).

use crate::error::{Error, Result};
use crate::layouts::common::{self, OneStage};
use crate::layouts::report::{self, Context, LayerOutcome, Mapped, Mapping, f32_tensor};
use crate::layouts::{Source, names};
use crate::model::*;
use crate::rotation::{block_size_from_tri_len, skew_norm};
use safetensors::SafeTensors;
use std::collections::BTreeMap;
use std::path::Path;

/// The rotation tensor of a module.
pub const WEIGHT: &str = ".oft_R.weight";
/// Metadata key oftool writes into trainer files: a JSON list of the modules that are Conv2d.
pub const CONV_LIST_KEY: &str = "oftool.conv2d";

/// One module's packed rows.
pub struct Packed {
    pub q: Vec<f64>,
    pub rows: usize,
    /// `b(b−1)/2`.
    pub tri: usize,
    pub b: usize,
}

/// Read `[rows ≥ 1, b(b−1)/2]` tensor `name` (finite); `expect` begins the shape complaint
/// (`PEFT stores`, `expected`). A row length of 0 is block size 1 (PEFT and OneTrainer store
/// `[r, 0]`: identity blocks, a zero-size tensor).
pub fn read_rows(path: &Path, st: &SafeTensors<'_>, name: &str, expect: &str) -> Result<Packed> {
    let (q, shape) = common::read(path, st, name)?;
    let (rows, tri) = match shape.as_slice() {
        &[rows, tri] if rows >= 1 => (rows, tri),
        _ => {
            return Err(Error::format(
                path,
                format!("`{name}` has shape {shape:?}; {expect} [blocks, b(b−1)/2]"),
            ));
        }
    };
    let b = block_size_from_tri_len(tri).ok_or_else(|| {
        Error::format(
            path,
            format!("`{name}`: a row length of {tri} is not b(b−1)/2 for any block size b ≥ 1"),
        )
    })?;
    Ok(Packed { q, rows, tri, b })
}

/// Project each block's `Q` onto the Frobenius ball PEFT's COFT uses (radius `eps/√rows`), as
/// PEFT does at merge time, so the stored `Q` needs no further clamp; the constraint recorded.
pub fn apply_coft(p: &mut Packed, eps: f64) -> Constraint {
    let radius = eps / (p.rows as f64).sqrt();
    // Blocks of size 1 hold nothing to project.
    for row in p.q.chunks_exact_mut(p.tri.max(1)) {
        let norm = skew_norm(row);
        if norm > radius {
            let f = radius / norm;
            row.iter_mut().for_each(|x| *x *= f);
        }
    }
    Constraint {
        kind: "peft-coft".into(),
        radius,
        scope: "block".into(),
        alpha: None,
        eps: Some(eps),
    }
}

/// What a trainer's metadata says about how to read its `oft_R.weight` file.
pub struct Trainer {
    /// `provenance.source_format`.
    pub source_format: &'static str,
    /// Whether one stored row is a shared block (`None`: not recorded; read as shared, which
    /// tiles the axis and so reads a one-block layer the same).
    pub block_share: Option<bool>,
    /// COFT's `eps`, when COFT is on.
    pub coft: Option<f64>,
    /// The marker tensor suffix of scaled OFT (OneTrainer's `.oft_R.scaled_oft`), if any.
    pub scaled: Option<&'static str>,
}

/// The trainers' 5-term series.
pub const NEUMANN5: RotationMap = RotationMap::Neumann {
    terms: 5,
    variant: NeumannVariant::Peft018,
};

/// Read a trainer's `oft_R.weight` file.
pub fn read_trainer(src: &Source<'_>, trainer: &Trainer) -> Result<Adapter> {
    let (path, file) = (src.path, src.file);
    let st = file.tensors();
    let mut suffixes = vec![WEIGHT];
    suffixes.extend(trainer.scaled);
    let modules = common::modules(path, &st, &suffixes, "OneTrainer/kohya OFT v2")?;
    let sd1 = common::sd1_from_metadata(&file.metadata);
    let conv_list: Option<Vec<String>> = file
        .metadata
        .get(CONV_LIST_KEY)
        .and_then(|v| serde_json::from_str(v).ok());
    let is_conv = |module: &str| match &conv_list {
        Some(list) => Ok(list.iter().any(|n| n == module)),
        None => names::is_conv_name(module, sd1).map_err(|m| Error::unsupported(path, m)),
    };
    let layers = modules
        .iter()
        .map(|m| read_trainer_layer(path, &st, m, trainer, &is_conv))
        .collect::<Result<Vec<_>>>()?;
    common::adapter(
        path,
        file,
        trainer.source_format,
        None,
        BTreeMap::new(),
        layers,
    )
}

fn read_trainer_layer(
    path: &Path,
    st: &SafeTensors<'_>,
    module: &str,
    trainer: &Trainer,
    is_conv: &dyn Fn(&str) -> Result<bool>,
) -> Result<Layer> {
    let w_name = format!("{module}{WEIGHT}");
    if st.tensor(&w_name).is_err() {
        return Err(Error::format(
            path,
            format!("`{module}` has `scaled_oft` but no `oft_R.weight`"),
        ));
    }
    let mut p = read_rows(path, st, &w_name, "expected")?;
    let scaled = match trainer.scaled.map(|s| format!("{module}{s}")) {
        Some(s) if st.tensor(&s).is_ok() => common::read(path, st, &s)?
            .0
            .first()
            .is_some_and(|&x| x != 0.0),
        _ => false,
    };
    if scaled {
        let sigma = 2.0 * ((p.b - 1) as f64).sqrt();
        p.q.iter_mut().for_each(|x| *x /= sigma);
    }
    let constraint = trainer.coft.map(|eps| apply_coft(&mut p, eps));
    let conv = is_conv(module)?;
    if conv {
        p.q.iter_mut().for_each(|x| *x = -*x);
    }
    let (convention, component) = names::classify(module);
    // One stored row: shared, or a single block; tiling the axis covers both.
    let shared = p.rows == 1 && trainer.block_share != Some(false);
    Ok(OneStage {
        name: module.to_string(),
        convention,
        component: component.map(str::to_string),
        module: if conv {
            ModuleKind::Conv
        } else {
            ModuleKind::Linear
        },
        side: Side::Input,
        blocks: (!shared).then_some(p.rows as u64),
        block_size: p.b,
        shared,
        map: NEUMANN5,
        q: p.q,
        q_f64: scaled || trainer.coft.is_some(),
        row_scale: None,
        constraint,
    }
    .into_layer())
}

/// One input-side layer as a trainer's `<name>.oft_R.weight` (Linear `Q`, Conv2d `−Q`).
pub fn encode_input(layer: &Layer, name: String, ctx: &Context<'_>) -> Mapped {
    if layer.stages.len() != 1 || layer.stages[0].spec.wiring != Wiring::Identity {
        return Err(
            "several stages or a butterfly wiring: OFT v2 files hold one block-diagonal rotation \
             per module"
                .into(),
        );
    }
    let stage = &layer.stages[0];
    let sign = if report::is_conv(layer, ctx.sd1)? {
        -1.0
    } else {
        1.0
    };
    let values: Vec<f64> = stage.q.iter().map(|x| sign * x).collect();
    let rows = stage.stored_blocks() as usize;
    let t = f32_tensor(
        format!("{name}{WEIGHT}"),
        vec![rows, stage.tri_len()],
        &values,
    )?;
    let mut lossy = Vec::new();
    let mut denoted = layer.clone();
    let ds = &mut denoted.stages[0];
    ds.q = values.iter().map(|&x| sign * (x as f32 as f64)).collect();
    ds.q_f64 = false;
    if stage.spec.map != NEUMANN5 {
        ds.spec.map = NEUMANN5;
        lossy.push(format!(
            "these trainers use the 5-term Cayley–Neumann series (PEFT ≥ 0.18), the source the {}",
            stage.spec.map.describe()
        ));
    }
    if layer.row_scale.is_some() {
        denoted.row_scale = None;
        lossy.push("OFT v2 files have no row scale; it is dropped".into());
    }
    denoted.constraint = None;
    Ok(Mapping {
        name,
        tensors: vec![t],
        denoted,
        lossy,
    })
}

/// What a trainer file's metadata records about the layers written into it.
#[derive(Debug, Default)]
pub struct Summary {
    /// The most common block size (the larger one of a tie).
    pub block_size: u64,
    pub shared: bool,
    pub conv: bool,
    /// The names the Conv2d layers were written under.
    pub conv_names: Vec<String>,
    /// Whether feed-forward layers are adapted (kohya's `enable_all_linear`).
    pub all_linear: bool,
}

impl Summary {
    pub fn of(adapter: &Adapter, mapped: &[LayerOutcome], ctx: &Context<'_>) -> Self {
        let mut s = Summary::default();
        let mut block_sizes = BTreeMap::<u64, usize>::new();
        for (layer, name) in report::written(adapter, mapped) {
            let stage = &layer.stages[0];
            *block_sizes.entry(stage.spec.block_size).or_default() += 1;
            s.shared |= stage.spec.shared;
            let conv = report::is_conv(layer, ctx.sd1).unwrap_or(false);
            s.conv |= conv;
            if conv {
                s.conv_names.push(name.to_string());
            }
            s.all_linear |=
                layer.target.name.contains("_ff_") || layer.target.name.contains(".ff.");
        }
        s.block_size = block_sizes
            .iter()
            .max_by_key(|(_, n)| **n)
            .map_or(0, |(b, _)| *b);
        s
    }

    /// The [`CONV_LIST_KEY`] entry: the file cannot say which modules are Conv2d (merged
    /// differently); oftool's reader looks here, so the file is self-describing.
    pub fn conv_list(&self) -> (String, String) {
        (
            CONV_LIST_KEY.into(),
            serde_json::to_string(&self.conv_names).unwrap_or_default(),
        )
    }
}
