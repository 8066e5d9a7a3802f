//! PEFT OFT before 0.16 (formats.md §3.1–3.2): `<module>.oft_r` `[r, b, b]` (`[1, b, b]` with
//! `block_share`), and from 0.14 on `<module>.oft_s` `[out, 1]`.
//!
//! Both compute `S = ½(A − Aᵀ)` and `R = Cay−(S) = Cay+(−S)`, so the canonical `Q` is `−S`
//! (a halving and a subtraction of binary32 values: exact in f64).
//! * 0.7–0.13 (`oft_r` only) rotate the **output** rows: `W' = BD(R)ᵀ·W`, `b = ceil(out/r)`.
//! * 0.14–0.15 (`oft_r` + `oft_s`) rotate the **input** columns and scale rows:
//!   `W' = diag(s)·W̃·BD(R)ᵀ`.
//!
//! COFT (`coft`, `eps`) projects each raw block `A_k` onto a Frobenius ball before the skew
//! part is taken, at merge time too; the radius is `eps·ceil(out/r)²/√rows` in both versions.

use super::{kept_config, read_config_value};
use crate::error::{Error, Result};
use crate::layouts::common::{self, OneStage};
use crate::layouts::{Source, names};
use crate::model::*;
use safetensors::SafeTensors;
use serde_json::Value;
use std::path::Path;

/// The settings of an old `adapter_config.json` that change the math.
#[derive(Debug, Clone, Default)]
struct OldConfig {
    r: u64,
    block_share: bool,
    coft: bool,
    eps: f64,
    raw: String,
}

fn read_config(path: Option<&Path>) -> Result<OldConfig> {
    let Some(path) = path else {
        return Ok(OldConfig {
            eps: 6e-5,
            ..OldConfig::default()
        });
    };
    let (v, raw) = read_config_value(path)?;
    let num = |k: &str| v.get(k).and_then(Value::as_f64);
    let flag = |k: &str| v.get(k).and_then(Value::as_bool).unwrap_or(false);
    Ok(OldConfig {
        r: num("r").unwrap_or(0.0).max(0.0) as u64,
        block_share: flag("block_share"),
        coft: flag("coft"),
        eps: num("eps").unwrap_or(6e-5),
        raw,
    })
}

/// Import a PEFT ≤ 0.15 OFT file (`oft_r`, optional `oft_s`), with its config when known.
pub fn import(src: &Source<'_>) -> Result<Adapter> {
    let cfg = read_config(src.config)?;
    let with_scale = src.has(".oft_s");
    let layers = common::read_modules(src, &[".oft_r", ".oft_s"], "PEFT ≤ 0.15 OFT", |st, m| {
        read_layer(src, st, m, &cfg, with_scale)
    })?;
    let (format, version) = if with_scale {
        ("peft-oft-0.14", "0.14–0.15")
    } else {
        ("peft-oft-0.7", "0.7–0.13")
    };
    common::adapter(
        src.path,
        src.file,
        format,
        Some(version.to_string()),
        kept_config(&cfg.raw),
        layers,
    )
}

/// A module's `oft_s` `[out, 1]`, which every module has when any has (0.14–0.15).
fn read_scale(path: &Path, st: &SafeTensors<'_>, module: &str) -> Result<Vec<f64>> {
    let s_name = format!("{module}.oft_s");
    let (s, s_shape) = common::read(path, st, &s_name).map_err(|_| {
        Error::format(
            path,
            format!("`{module}` has no `oft_s` while other modules have one: mixed PEFT versions"),
        )
    })?;
    if s_shape.len() != 2 || s_shape[1] != 1 || s_shape[0] == 0 {
        return Err(Error::format(
            path,
            format!("`{s_name}` has shape {s_shape:?}; PEFT stores [out, 1]"),
        ));
    }
    Ok(s)
}

/// PEFT's COFT radius: `eps·ceil(out/r)²/√rows` with `r` the number of blocks. Output side
/// (≤ 0.13) has `out = r·b`; 0.14–0.15 read `out` off `oft_s`.
fn coft_radius(
    path: &Path,
    module: &str,
    cfg: &OldConfig,
    scale: Option<&[f64]>,
    blocks: Option<u64>,
    rows: usize,
    b: usize,
) -> Result<f64> {
    let r = blocks.ok_or_else(|| {
        Error::unsupported(
            path,
            format!("`{module}`: COFT with a shared block needs the config's `r`"),
        )
    })?;
    let out = match scale {
        Some(s) => s.len() as f64,
        None => (r as usize * b) as f64,
    };
    let per = (out / r as f64).ceil();
    Ok(cfg.eps * per * per / (rows as f64).sqrt())
}

fn read_layer(
    src: &Source<'_>,
    st: &SafeTensors<'_>,
    module: &str,
    cfg: &OldConfig,
    with_scale: bool,
) -> Result<Layer> {
    let path = src.path;
    let r_name = format!("{module}.oft_r");
    if st.tensor(&r_name).is_err() {
        return Err(Error::format(
            path,
            format!("`{module}` has `oft_s` but no `oft_r`"),
        ));
    }
    let (mut raw, shape) = common::read(path, st, &r_name)?;
    let (rows, b) = common::square_blocks(&shape).ok_or_else(|| {
        Error::format(
            path,
            format!("`{r_name}` has shape {shape:?}; PEFT ≤ 0.15 stores [r, b, b]"),
        )
    })?;
    let scale = with_scale
        .then(|| read_scale(path, st, module))
        .transpose()?;
    let (shared, blocks) = super::peft_blocks(path, module, rows, cfg.block_share, cfg.r, b)?;
    let mut constraint = None;
    if cfg.coft {
        let radius = coft_radius(path, module, cfg, scale.as_deref(), blocks, rows, b)?;
        project_raw_blocks(&mut raw, b, radius);
        constraint = Some(Constraint {
            kind: "peft-coft".into(),
            radius,
            scope: "block".into(),
            alpha: None,
            eps: Some(cfg.eps),
        });
    }
    Ok(OneStage {
        name: names::unwrap_peft(module).to_string(),
        convention: "peft",
        component: src.component.clone(),
        module: ModuleKind::Unknown,
        side: if with_scale {
            Side::Input
        } else {
            Side::Output
        },
        blocks,
        block_size: b,
        shared,
        map: RotationMap::Cayley,
        // Canonical Q = −½(A − Aᵀ).
        q: common::skew_blocks(&raw, b, -0.5),
        q_f64: true,
        row_scale: scale,
        constraint,
    }
    .into_layer())
    .map(|mut layer| {
        // PEFT 0.7–0.13 builds blocks of ceil(out/r) and cuts BD(R) to out × out: the stored
        // blocks may be wider than the weight, which the file cannot say (formats.md §3.1).
        if !with_scale && layer.stages[0].spec.blocks.is_some() {
            layer.stages[0].spec.truncated = true;
            layer.target.rotated_dim = None;
        }
        layer
    })
}

/// Project each `b × b` block of the raw parameter onto the Frobenius ball of `radius` (the
/// COFT rule of PEFT ≤ 0.15 and of the OFT authors: the distance to the zero matrix).
fn project_raw_blocks(raw: &mut [f64], b: usize, radius: f64) {
    for blk in raw.chunks_exact_mut(b * b) {
        let norm = blk.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm > radius {
            let f = radius / norm;
            blk.iter_mut().for_each(|x| *x *= f);
        }
    }
}
