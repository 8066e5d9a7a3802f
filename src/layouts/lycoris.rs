//! LyCORIS (formats.md §5): diag-oft ≥ 2.2 (`oft_blocks [N, b, b]` + `alpha`, optional
//! `rescale`), 2.1 (no `alpha`: read as unconstrained), BOFT (`oft_blocks [m, N, b, b]`), and
//! 2.0's `oft_diag` (the rotation itself), under any prefix: kohya names (`lora_unet_…`, via
//! `lycoris.kohya`), `lycoris_…` (standalone, SimpleTuner) and ComfyUI's `diffusion_model.…`
//! (ComfyUI's own trainer): a ComfyUI-named `oft_blocks` file is a LyCORIS file with other
//! names, read here; [`super::comfyui`] only writes. The tensors are [`super::codec::blocks`]'s.
//!
//! `--to lycoris` writes `oft_blocks` / `alpha` / `rescale` under kohya names with
//! `ss_network_module = lycoris.kohya`.

use super::codec::blocks::{self, Family};
use super::common;
use super::report::{Context, Written};
use super::{Claim, Layout, Probe, Reader, Source, Variant, Writes, names};
use crate::error::{Error, Result};
use crate::model::*;
use crate::rotation::{inverse_cayley, orthogonality_error, pack_upper, rotation_block};
use safetensors::SafeTensors;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

pub static LAYOUT: Layout = Layout {
    id: "lycoris",
    aliases: &[],
    about: "LyCORIS (`lycoris.kohya`) diag-oft / BOFT `oft_blocks` under kohya names",
    reads: Some(Reader {
        keys: &[".oft_blocks", ".oft_diag"],
        companions: &[".alpha", ".rescale"],
        markers: &[],
        directories: false,
        detect,
        variants: &[&DIAG_OFT, &BOFT, &OFT_DIAG],
    }),
    writes: Writes::Writer(write),
    // LyCORIS trained through kohya writes kohya's `ss_network_*` keys (declared there).
    metadata_keys: &["lycoris_config"],
};

/// diag-oft (2.1 and ≥ 2.2).
static DIAG_OFT: Variant = Variant::new("diag-oft", import);

static BOFT: Variant = Variant::new("boft", import);

/// LyCORIS 2.0.x `oft_diag`.
static OFT_DIAG: Variant = Variant::new("oft-diag", import_oft_diag);

fn detect(probe: &Probe<'_>) -> Result<Vec<Claim>> {
    let mut claims = Vec::new();
    // kohya's legacy `oft_unet_` modules are [N, b, b] too: those are kohya's.
    let blocks: Vec<&str> = probe
        .names
        .iter()
        .copied()
        .filter(|n| n.ends_with(".oft_blocks"))
        .filter(|n| !n.starts_with(names::KOHYA_OFT_UNET) || probe.rank(n) == 4)
        .collect();
    if !blocks.is_empty() {
        let four_d = blocks.iter().any(|n| probe.rank(n) == 4);
        claims.push(Claim::names(if four_d { &BOFT } else { &DIAG_OFT }));
    }
    if probe.has(".oft_diag") {
        claims.push(Claim::names(&OFT_DIAG));
    }
    Ok(claims)
}

/// diag-oft or BOFT `oft_blocks` modules, as LyCORIS (or `src.semantics`' runtime) computes them.
fn import(src: &Source<'_>) -> Result<Adapter> {
    let st = src.file.tensors();
    let mut layers = Vec::new();
    let mut families = BTreeSet::new();
    let mut missing_alpha = 0;
    for module in &blocks::modules(src.path, &st)? {
        let rank = st
            .tensor(&format!("{module}.oft_blocks"))
            .map_or(0, |t| t.shape().len());
        let family = if rank == 4 {
            Family::Boft
        } else {
            Family::DiagOft
        };
        families.insert(family);
        let (layer, no_alpha) = blocks::read_layer(src, &st, module, family)?;
        missing_alpha += usize::from(no_alpha);
        layers.push(layer);
    }
    if families.len() > 1 {
        return Err(Error::format(
            src.path,
            "mixed layouts in one file (lycoris-diag-oft, lycoris-boft): refusing to guess",
        ));
    }
    let source_format = if families.contains(&Family::Boft) {
        "lycoris-boft"
    } else {
        "lycoris-diag-oft"
    };
    let mut extra = BTreeMap::new();
    let source_version = (missing_alpha > 0).then(|| {
        extra.insert(
            "oftool.note".to_string(),
            format!(
                "{missing_alpha} module(s) carry no `alpha` (LyCORIS 2.1): read as unconstrained"
            ),
        );
        "2.1".to_string()
    });
    common::adapter(
        src.path,
        src.file,
        source_format,
        source_version,
        extra,
        layers,
    )
}

/// `--to lycoris`.
fn write(adapter: &Adapter, ctx: &Context<'_>) -> Result<Written> {
    Ok(blocks::write(adapter, ctx, None).0)
}

/// LyCORIS 2.0.x `oft_diag` files (formats.md §5.2): each `[N, b, b]` tensor is the rotation
/// itself, its rows scaled when the module was trained `rescaled`, merged `W' = BD(D)ᵀ·W`.
///
/// `D_k = diag(s)·R_k` with `R_k` orthogonal, so `s` is the norm of each row of `D_k` and the
/// merge is `BD(R)ᵀ·diag(s)·W`: canonical output side, row scale *before* the stage, and
/// `Q = (R − I)(R + I)⁻¹` (inverse Cayley, in f64). This recovers the stored rotation to within
/// the rounding of the stored values, not bit-exactly; a block that is not a scaled rotation
/// (or has an eigenvalue −1) is refused.
fn import_oft_diag(src: &Source<'_>) -> Result<Adapter> {
    let layers = common::read_modules(src, &[".oft_diag"], "LyCORIS 2.0 `oft_diag`", |st, m| {
        read_oft_diag(src.path, st, m)
    })?;
    let mut extra = BTreeMap::new();
    extra.insert(
        "oftool.note".to_string(),
        "LyCORIS 2.0 `oft_diag` stores rotations; Q recovered by the inverse Cayley map in f64"
            .to_string(),
    );
    common::adapter(
        src.path,
        src.file,
        "lycoris-oft-diag",
        Some("2.0".into()),
        extra,
        layers,
    )
}

/// One `oft_diag` module.
fn read_oft_diag(path: &Path, st: &SafeTensors<'_>, module: &str) -> Result<Layer> {
    let name = format!("{module}.oft_diag");
    let (d, shape) = common::read(path, st, &name)?;
    let (n, b) = common::square_blocks(&shape).ok_or_else(|| {
        Error::format(
            path,
            format!("`{name}` has shape {shape:?}; expected [N, b, b]"),
        )
    })?;
    let mut scale = Vec::with_capacity(n * b);
    let mut q = Vec::with_capacity(n * b * (b - 1) / 2);
    for (k, blk) in d.chunks_exact(b * b).enumerate() {
        let (tri, rows) = recover_block(path, &name, k, blk, b)?;
        q.extend(tri);
        scale.extend(rows);
    }
    // Unscaled modules store rows of norm 1 to within binary32 rounding.
    let scaled = scale.iter().any(|s| (s - 1.0).abs() > 1e-6);
    let (convention, component) = names::classify(module);
    let mut layer = common::OneStage {
        name: module.to_string(),
        convention,
        component: component.map(str::to_string),
        module: ModuleKind::Unknown,
        side: Side::Output,
        blocks: Some(n as u64),
        block_size: b,
        shared: false,
        map: RotationMap::Cayley,
        q,
        q_f64: true,
        row_scale: None,
        constraint: None,
    }
    .into_layer();
    if scaled {
        layer.row_scale = Some((ScalePosition::Before, scale));
        layer.row_scale_f64 = true;
    }
    Ok(layer)
}

/// Block `k` (`b × b`, row-major) of `oft_diag` tensor `name` as `diag(s)·R`: the packed `Q` of
/// `R` and the row norms `s`.
fn recover_block(
    path: &Path,
    name: &str,
    k: usize,
    blk: &[f64],
    b: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let mut r = blk.to_vec();
    let mut scale = Vec::with_capacity(b);
    for row in r.chunks_exact_mut(b) {
        let norm = row.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm == 0.0 {
            return Err(Error::format(
                path,
                format!("`{name}` block {k} has a zero row: not a scaled rotation"),
            ));
        }
        row.iter_mut().for_each(|x| *x /= norm);
        scale.push(norm);
    }
    let not_rotation = |what: &str| {
        Error::format(
            path,
            format!("`{name}` block {k} is not a rotation ({what}); cannot recover its Q"),
        )
    };
    if orthogonality_error(&r, b) > 1e-3 {
        return Err(not_rotation("its rows are not orthogonal"));
    }
    let dense = inverse_cayley(&r, b).ok_or_else(|| not_rotation("eigenvalue −1"))?;
    let mut skew = vec![0.0; b * b];
    for i in 0..b {
        for j in 0..b {
            skew[i * b + j] = 0.5 * (dense[i * b + j] - dense[j * b + i]);
        }
    }
    let tri = pack_upper(&skew, b);
    let back = rotation_block(&tri, b, &RotationMap::Cayley);
    let err = back
        .iter()
        .zip(&r)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    if !err.is_finite() || err > 1e-4 {
        return Err(not_rotation("a reflection or a rotation by 180°"));
    }
    Ok((tri, scale))
}
