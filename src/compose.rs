//! `oftool compose`: one adapter equal to applying A, then B, … (spec §10).
//!
//! Per target, the stages of B follow those of A in one layer where the spec's layer can
//! express it; where it cannot (a row scale between them, or the other side of the weight) the
//! layers are stacked, which the `stacked-layers` feature (format 1.1) allows. `--collapse`
//! multiplies consecutive Cayley stages with nesting partitions into one stage.

use crate::base::{Base, Located, Lookup};
use crate::error::{Category, Error, Result};
use crate::model::*;
use crate::rotation::{cayley, inverse_cayley, pack_upper, unpack_skew};
use crate::strength::{AdapterArg, adapter_power};
use serde::Serialize;
use std::collections::HashMap;
use std::path::Path;

/// One input of a composition.
pub struct ComposeInput {
    /// How the input is named in reports (its path as given).
    pub label: String,
    /// The adapter.
    pub adapter: Adapter,
    /// Its strength (`A:S`), if one was given.
    pub strength: Option<f64>,
}

/// What `--collapse` did.
#[derive(Debug, Serialize, Default)]
pub struct CollapseReport {
    /// Layers whose stages were multiplied into fewer stages.
    pub collapsed_layers: usize,
    /// Largest entry change of R caused by the f64 inverse-Cayley round trip.
    pub max_r_change: f64,
    /// Layers whose stages were kept, with the reason.
    pub kept: Vec<String>,
}

/// What `compose` wrote (its `--json` report).
#[derive(Debug, Serialize)]
pub struct ComposeSummary {
    /// The inputs, as given (`PATH` or `PATH:S`).
    pub inputs: Vec<String>,
    /// The `.oft` file written.
    pub output: String,
    /// Layers in the result.
    pub layers: usize,
    /// Stages in the result, over all layers.
    pub stages: usize,
    /// Targets that more than one layer of the result rotates (stacked layers, format 1.1).
    pub stacked_targets: usize,
    /// What `--collapse` did, when asked.
    pub collapse: Option<CollapseReport>,
}

/// The key two layers must share to act on the same weight.
fn match_key(layer: &Layer, base: Option<&Base>) -> String {
    if let Some(loc) = base.and_then(|b| b.locate(layer).ok()) {
        let component = base
            .and_then(|b| b.component(&loc))
            .map(|c| format!("{c}/"))
            .unwrap_or_default();
        return if loc.rows.is_whole(loc.shape.first().copied().unwrap_or(0)) {
            format!("{component}{}", loc.key)
        } else {
            format!("{component}{}[{}]", loc.key, loc.rows)
        };
    }
    let name = layer
        .target
        .name
        .strip_prefix("base_model.model.")
        .unwrap_or(&layer.target.name);
    format!(
        "{}/{name}{}",
        layer.target.component.as_deref().unwrap_or(""),
        rows_key(layer)
    )
}

/// Every base tensor (and its rows) a layer lands on; empty without a base or a fit.
fn landing(layer: &Layer, base: Option<&Base>) -> Vec<Located> {
    match base.map(|b| b.lookup(layer)) {
        Some(Lookup::Found(loc)) => vec![loc],
        Some(Lookup::Split(locs)) => locs,
        _ => Vec::new(),
    }
}

/// Whether two layers' landings share rows of one base tensor.
fn shares_rows(a: &[Located], b: &[Located]) -> bool {
    a.iter().any(|x| {
        b.iter()
            .any(|y| x.file == y.file && x.key == y.key && x.rows.overlaps(&y.rows))
    })
}

/// The rows a layer covers of its named weight, as part of a matching key (`""`: all).
fn rows_key(layer: &Layer) -> String {
    match &layer.target.rows {
        None => String::new(),
        Some(rows) => {
            let r: Vec<String> = rows
                .iter()
                .map(|r| format!("{}+{}", r.start, r.len))
                .collect();
            format!("[{}]", r.join(","))
        }
    }
}

/// How a layer's target is named, for telling whether two names can be compared without a
/// base: its component, and its convention with whether the name is flattened (no dots).
fn naming(layer: &Layer) -> (Option<String>, (String, bool)) {
    let t = &layer.target;
    (
        t.component.clone(),
        (t.convention.clone(), !t.name.contains('.')),
    )
}

/// Append `next`'s stages to `prev` when one layer can express `prev` then `next`.
fn try_extend(prev: &mut Layer, next: &Layer) -> bool {
    if prev.side != next.side {
        return false;
    }
    let (p, n) = (&prev.row_scale, &next.row_scale);
    let combined = match (p, n) {
        (None, None) => None,
        // Input-side stages act on columns and commute with any row scale.
        _ if prev.side == Side::Input => {
            let rows = p
                .as_ref()
                .map(|x| x.1.len())
                .or(n.as_ref().map(|x| x.1.len()))
                .unwrap_or(0);
            let mut v = vec![1.0; rows];
            for (_, s) in [p, n].into_iter().flatten() {
                if s.len() != rows {
                    return false;
                }
                v.iter_mut().zip(s).for_each(|(a, b)| *a *= b);
            }
            Some((ScalePosition::After, v))
        }
        (Some((ScalePosition::Before, s)), None) => Some((ScalePosition::Before, s.clone())),
        (None, Some((ScalePosition::After, s))) => Some((ScalePosition::After, s.clone())),
        _ => return false,
    };
    if prev.target.rotated_dim.is_some()
        && next.target.rotated_dim.is_some()
        && prev.target.rotated_dim != next.target.rotated_dim
    {
        return false;
    }
    prev.stages.extend_from_slice(&next.stages);
    prev.row_scale = combined;
    prev.row_scale_f64 = true;
    prev.target.rotated_dim = prev.target.rotated_dim.or(next.target.rotated_dim);
    if prev.base_binding != next.base_binding {
        prev.base_binding = None;
    }
    prev.constraint = None; // the product no longer satisfies one producer's constraint
    true
}

/// Compose inputs in order. With `base`, targets are matched by the base tensor they resolve
/// to (so PEFT and kohya names of one module meet); without, by component and name.
pub fn compose(inputs: Vec<ComposeInput>, base: Option<&Base>) -> Result<Adapter> {
    let mut layers: Vec<Layer> = Vec::new();
    let mut last: HashMap<String, usize> = HashMap::new();
    let mut stacked = false;
    let mut namings = std::collections::BTreeSet::new();
    let mut record = Vec::new();
    // Where each layer of `layers` lands in the base (empty without one, or if it lands nowhere).
    let mut spots: Vec<Vec<Located>> = Vec::new();
    for (order, input) in inputs.into_iter().enumerate() {
        record.push(serde_json::json!({
            "order": order,
            "name": input.label,
            "source_format": input.adapter.provenance.source_format,
            "source_digest": input.adapter.provenance.source_digest,
            "strength": input.strength.unwrap_or(1.0),
        }));
        let adapter = match input.strength {
            Some(s) => adapter_power(&input.adapter, s)?,
            None => input.adapter,
        };
        for layer in adapter.layers {
            if layer.stages.iter().any(|s| s.inverse) {
                return Err(Error::new(
                    Category::Algebra,
                    format!(
                        "`{}` in {}: a negative strength on a Cayley–Neumann layer has no Neumann form",
                        layer.target.name, input.label
                    ),
                )
                .hint("bake it with `merge` (or `unmerge`) instead"));
            }
            let key = match_key(&layer, base);
            let here = landing(&layer, base);
            // A layer after `i` on common rows (a fused layer and a split one of another
            // producer, or adaLN rows in another order) must keep applying between them.
            let between = |i: usize| spots.iter().skip(i + 1).any(|s| shares_rows(s, &here));
            match last.get(&key) {
                Some(&i) if !between(i) && try_extend(&mut layers[i], &layer) => {}
                seen => {
                    stacked |= seen.is_some() || spots.iter().any(|s| shares_rows(s, &here));
                    last.insert(key, layers.len());
                    namings.insert((order, naming(&layer)));
                    layers.push(layer);
                    spots.push(here);
                }
            }
        }
    }
    // Without a base, names of different conventions (kohya's `lora_unet_…` and PEFT's dotted
    // diffusers paths) may be one tensor: the layers then apply in file order, which the file
    // must say (spec §8.4).
    if base.is_none() {
        stacked |= namings.iter().any(|(i, (c, n))| {
            namings
                .iter()
                .any(|(j, (d, m))| i != j && n != m && (c == d || c.is_none() || d.is_none()))
        });
    }
    let mut user_metadata = std::collections::BTreeMap::new();
    user_metadata.insert(
        "oftool.compose".to_string(),
        serde_json::Value::Array(record).to_string(),
    );
    Ok(Adapter {
        provenance: Provenance {
            source_format: "oft-compose".into(),
            source_version: None,
            tool: tool_name(),
            created: None,
            source_digest: None,
            user_metadata,
        },
        layers,
        features: if stacked {
            vec![FEATURE_STACKED_LAYERS.to_string()]
        } else {
            Vec::new()
        },
    })
}

/// The `B × B` block `c` of a stage seen at the coarser block size `big` (identity wiring).
fn coarse_block(stage: &Stage, c: usize, big: usize) -> Vec<f64> {
    let b = stage.spec.block_size as usize;
    let mut m = vec![0.0; big * big];
    let per = big / b;
    for sub in 0..per {
        let k = c * per + sub;
        let r = crate::rotation::rotation_block(stage.q_row(k), b, &stage.spec.map);
        for i in 0..b {
            for j in 0..b {
                m[(sub * b + i) * big + sub * b + j] = r[i * b + j];
            }
        }
    }
    m
}

/// Multiply consecutive Cayley stages with nesting identity-wired partitions into one stage.
pub fn collapse(adapter: &mut Adapter) -> CollapseReport {
    let mut report = CollapseReport::default();
    for layer in &mut adapter.layers {
        if layer.stages.len() < 2 {
            continue;
        }
        let mut out: Vec<Stage> = vec![layer.stages[0].clone()];
        let mut changed = false;
        for next in layer.stages[1..].iter() {
            let prev = out.last().cloned().unwrap_or_else(|| next.clone());
            match collapse_pair(&prev, next, layer.side) {
                Ok((stage, change)) => {
                    report.max_r_change = report.max_r_change.max(change);
                    out.pop();
                    out.push(stage);
                    changed = true;
                }
                Err(why) => {
                    report.kept.push(format!("{}: {why}", layer.target.name));
                    out.push(next.clone());
                }
            }
        }
        if changed {
            report.collapsed_layers += 1;
            layer.stages = out;
        }
    }
    report
}

fn collapse_pair(a: &Stage, b: &Stage, side: Side) -> std::result::Result<(Stage, f64), String> {
    if a.spec.wiring != Wiring::Identity || b.spec.wiring != Wiring::Identity {
        return Err("butterfly stages do not share a block partition".into());
    }
    if a.spec.truncated || b.spec.truncated {
        return Err("a truncated stage is cut to the weight, which its product with another stage is not; kept as it is".into());
    }
    if a.spec.map != RotationMap::Cayley || b.spec.map != RotationMap::Cayley {
        return Err("Cayley–Neumann stages are not rotations; kept as they are".into());
    }
    let (ba, bb) = (a.spec.block_size as usize, b.spec.block_size as usize);
    let big = ba.max(bb);
    if big % ba.min(bb) != 0 {
        return Err(format!("block sizes {ba} and {bb} do not nest"));
    }
    let d = match (a.dim(), b.dim()) {
        (Some(x), Some(y)) if x == y => x as usize,
        _ => return Err("the stages' dimensions are unknown or differ".into()),
    };
    let blocks = d / big;
    let mut q = Vec::with_capacity(blocks * big * (big - 1) / 2);
    let mut change: f64 = 0.0;
    for c in 0..blocks {
        let (ra, rb) = (coarse_block(a, c, big), coarse_block(b, c, big));
        // Input side applies W·Eaᵀ then ·Ebᵀ = W·(Eb·Ea)ᵀ; output side Eaᵀ then Ebᵀ = (Ea·Eb)ᵀ.
        let r = match side {
            Side::Input => crate::rotation::matmul(&rb, &ra, big),
            Side::Output => crate::rotation::matmul(&ra, &rb, big),
        };
        let qm = inverse_cayley(&r, big).ok_or("a block has an eigenvalue −1 (a half turn)")?;
        if qm.iter().any(|x| !x.is_finite() || x.abs() > 1e6) {
            return Err("a block is too close to a half turn for the Cayley map".into());
        }
        let tri = pack_upper(&qm, big);
        let back = cayley(&unpack_skew(&tri, big), big);
        change = change.max(
            back.iter()
                .zip(&r)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f64::max),
        );
        q.extend(tri);
    }
    Ok((Stage::cayley(blocks as u64, big as u64, q), change))
}

/// How many targets have more than one layer (stacked): with a base, the tensors on common
/// rows of which several layers act (whatever names they use); without, the names.
pub fn stacked_targets(adapter: &Adapter, base: Option<&Base>) -> usize {
    if base.is_some() {
        let mut on: HashMap<(usize, String), Vec<(usize, crate::base::RowSlice)>> = HashMap::new();
        for (i, l) in adapter.layers.iter().enumerate() {
            for loc in landing(l, base) {
                on.entry((loc.file, loc.key))
                    .or_default()
                    .push((i, loc.rows));
            }
        }
        return on
            .values()
            .filter(|v| {
                v.iter()
                    .enumerate()
                    .any(|(n, (i, a))| v[n + 1..].iter().any(|(j, b)| i != j && a.overlaps(b)))
            })
            .count();
    }
    let mut seen: HashMap<(String, Option<String>), usize> = HashMap::new();
    for l in &adapter.layers {
        *seen
            .entry((
                format!("{}{}", l.target.name, rows_key(l)),
                l.target.component.clone(),
            ))
            .or_default() += 1;
    }
    seen.values().filter(|&&n| n > 1).count()
}

/// `oftool compose A[:S] B[:S] … -o OUT.oft [--base BASE] [--collapse]`.
pub fn run(
    args: &[AdapterArg],
    out: &Path,
    base: Option<&Path>,
    do_collapse: bool,
) -> Result<ComposeSummary> {
    if args.is_empty() {
        return Err(Error::usage("give at least one adapter to compose"));
    }
    let mut paths: Vec<&Path> = args.iter().map(|a| a.path.as_path()).collect();
    paths.extend(base);
    crate::convert::refuse_overwriting_input(out, &paths)?;
    let inputs = args
        .iter()
        .map(|a| {
            Ok(ComposeInput {
                label: a.path.display().to_string(),
                adapter: crate::bake::load_adapter(&a.path)?,
                strength: a.strength,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let base = base.map(Base::open).transpose()?;
    let mut adapter = compose(inputs, base.as_ref())?;
    let collapse_report = do_collapse.then(|| collapse(&mut adapter));
    adapter.provenance.created = Some(crate::convert::creation_time(&paths));
    crate::oft_file::write(&adapter, out)?;
    Ok(ComposeSummary {
        inputs: args.iter().map(|a| a.to_string()).collect(),
        output: out.display().to_string(),
        layers: adapter.layers.len(),
        stages: adapter.layers.iter().map(|l| l.stages.len()).sum(),
        stacked_targets: stacked_targets(&adapter, base.as_ref()),
        collapse: collapse_report,
    })
}
