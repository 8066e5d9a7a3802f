//! `oftool validate`: every structural and numerical problem of an adapter, optionally
//! checked against the base checkpoint it is meant for (headers and bound tensors only).

use crate::base::Base;
use crate::error::{Category, Error, Result};
use crate::layouts;
use crate::model::{Adapter, Layer, Side};
use crate::oft_file::{self, DigestStatus};
use crate::rotation::skew_norm;
use crate::wiring::gather;
use serde::Serialize;
use std::path::Path;

/// One problem `validate` found.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Problem {
    /// Layer target name, or null for file-level problems.
    pub layer: Option<String>,
    /// Stable identifier: parse, digest, non-finite, partition, wiring, constraint, target-missing,
    /// target-ambiguous, target-shape, binding.
    pub check: String,
    /// What kind of problem it is (the same categories as errors).
    pub category: Category,
    /// The rule of spec §9.1 the adapter breaks (as a `.oft` file), where one applies.
    pub rule: Option<u8>,
    /// What is wrong, in words.
    pub message: String,
}

impl Problem {
    /// The same problem with another category and spec rule than its check's default.
    fn kind(self, category: Category, rule: Option<u8>) -> Self {
        Problem {
            category,
            rule,
            ..self
        }
    }
}

/// What `validate` found (its `--json` report).
#[derive(Debug, Serialize)]
pub struct Validation {
    /// The file validated, as given.
    pub file: String,
    /// Its layout id, once detected.
    pub layout: Option<String>,
    /// Whether no problem was found.
    pub valid: bool,
    /// Layers read.
    pub layers: usize,
    /// The base checked against, if any.
    pub base: Option<String>,
    /// Every problem found.
    pub problems: Vec<Problem>,
}

/// A problem of `check`, with the category and spec §9.1 rule that check usually is.
fn problem(layer: Option<&Layer>, check: &str, message: String) -> Problem {
    let (category, rule) = match check {
        "digest" => (Category::Digest, Some(8)),
        "non-finite" => (Category::NonFinite, Some(23)),
        "partition" => (Category::Partition, Some(17)),
        "wiring" => (Category::Wiring, Some(18)),
        "constraint" => (Category::Constraint, None),
        "target-missing" => (Category::TargetMissing, None),
        "target-ambiguous" => (Category::TargetAmbiguous, None),
        "target-shape" => (Category::TargetShape, None),
        "binding" => (Category::Binding, None),
        _ => (Category::Malformed, None),
    };
    Problem {
        layer: layer.map(|l| l.target.name.clone()),
        check: check.into(),
        category,
        rule,
        message,
    }
}

/// A problem from an error: its check is `check`, its category and rule the error's.
fn from_error(layer: Option<&Layer>, check: &str, e: &Error, message: String) -> Problem {
    problem(layer, check, message).kind(e.category(), e.spec_rule())
}

/// The checks that need only the adapter.
pub fn check_adapter(adapter: &Adapter) -> Vec<Problem> {
    let mut out = Vec::new();
    for layer in &adapter.layers {
        let p = |check: &str, m: String| problem(Some(layer), check, m);
        for (j, s) in layer.stages.iter().enumerate() {
            if let Some(i) = s.q.iter().position(|x| !x.is_finite()) {
                out.push(p(
                    "non-finite",
                    format!("stage {j}: Q element {i} is {}", s.q[i]),
                ));
            }
            let b = s.spec.block_size;
            if s.spec.truncated
                && (s.spec.blocks.is_none() || s.spec.wiring != crate::model::Wiring::Identity)
            {
                out.push(p(
                    "partition",
                    format!(
                        "stage {j}: a truncated stage needs a block count and the identity wiring"
                    ),
                ));
            }
            match (s.spec.blocks, layer.target.rotated_dim) {
                (Some(r), Some(d)) if s.spec.truncated && r * b < d => out.push(p(
                    "partition",
                    format!(
                        "stage {j}: {r} blocks × {b} = {} is less than the rotated dimension {d}, which a cut cannot make up",
                        r * b
                    ),
                )),
                (Some(_), Some(_)) if s.spec.truncated => {}
                (Some(r), Some(d)) if r * b != d => out.push(p(
                    "partition",
                    format!(
                        "stage {j}: {r} blocks × {b} = {} does not equal the rotated dimension {d}",
                        r * b
                    ),
                )),
                (None, Some(d)) if d % b != 0 => out.push(p(
                    "partition",
                    format!(
                        "stage {j}: shared blocks of size {b} do not tile the rotated dimension {d}"
                    ),
                )),
                _ => {}
            }
            if let Some(r) = s.spec.blocks
                && let Err(e) = gather(&s.spec.wiring, r as usize, b as usize)
            {
                out.push(p("wiring", format!("stage {j}: {}", e.0)));
            }
        }
        if let Some((_, v)) = &layer.row_scale {
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                out.push(p(
                    "non-finite",
                    format!("row scale element {i} is {}", v[i]),
                ));
            }
            if let Some(shape) = &layer.target.shape
                && shape.first() != Some(&(v.len() as u64))
            {
                out.push(
                    p(
                        "partition",
                        format!(
                            "row scale has {} entries for a weight of shape {shape:?}",
                            v.len()
                        ),
                    )
                    .kind(Category::Tensor, Some(22)),
                );
            }
        }
        if let (Some(shape), Some(d)) = (&layer.target.shape, layer.target.rotated_dim) {
            let axis = axis_len(layer.side, shape);
            if axis != d {
                out.push(
                    p(
                        "partition",
                        format!("rotated dimension {d} does not match the target shape {shape:?}"),
                    )
                    .kind(Category::Manifest, Some(15)),
                );
            }
        }
        let dims: Vec<u64> = layer
            .stages
            .iter()
            .filter(|s| !s.spec.truncated)
            .filter_map(|s| s.dim())
            .collect();
        if dims.windows(2).any(|w| w[0] != w[1]) {
            out.push(p(
                "partition",
                format!("stages rotate different dimensions: {dims:?}"),
            ));
        }
        if layer.target.rotated_dim.is_none() && !dims.is_empty() {
            out.push(
                p(
                    "partition",
                    "`rotated_dim` is null although a stage records its block count".into(),
                )
                .kind(Category::Manifest, Some(14)),
            );
        }
        if let Some(b) = &layer.base_binding
            && !(b.blake3.len() == 64
                && b.blake3
                    .bytes()
                    .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)))
        {
            out.push(
                p(
                    "binding",
                    format!(
                        "base_binding.blake3 `{}` is not 64 lowercase hex digits",
                        b.blake3
                    ),
                )
                .kind(Category::Manifest, Some(16)),
            );
        }
        if let Some(c) = &layer.constraint {
            // Stored Q must already satisfy the constraint (allow rounding of the stored dtype).
            let tol = c.radius * 1e-6 + 1e-12;
            if c.scope == "block" {
                for s in &layer.stages {
                    for k in 0..s.stored_blocks() as usize {
                        let n = skew_norm(s.q_row(k));
                        if n > c.radius + tol {
                            out.push(p(
                                "constraint",
                                format!(
                                    "block {k}: ‖Q‖ = {n:.6e} exceeds the {} radius {:.6e}",
                                    c.kind, c.radius
                                ),
                            ));
                        }
                    }
                }
            } else {
                let all: Vec<f64> = layer
                    .stages
                    .iter()
                    .flat_map(|s| s.q.iter().copied())
                    .collect();
                let n = skew_norm(&all);
                if c.radius > 0.0 && n > c.radius + tol {
                    out.push(p(
                        "constraint",
                        format!(
                            "‖Q‖ = {n:.6e} exceeds the {} radius {:.6e}",
                            c.kind, c.radius
                        ),
                    ));
                }
            }
        }
    }
    out
}

/// Length of the rotated axis of a weight of `shape`.
pub fn axis_len(side: Side, shape: &[u64]) -> u64 {
    match side {
        Side::Output => shape.first().copied().unwrap_or(0),
        Side::Input => shape.iter().skip(1).product(),
    }
}

/// Check every target against the base (a file, sharded folder or pipeline folder, as for
/// `merge`): it exists once, fits the layer, and is the tensor the layer is bound to.
pub fn check_base(adapter: &Adapter, base: &Path) -> Result<Vec<Problem>> {
    let base = Base::open(base)?;
    let mut out = Vec::new();
    for layer in &adapter.layers {
        let found = base.locate(layer).and_then(|loc| base.check(layer, &loc));
        match found {
            Ok(problems) => out.extend(problems.iter().map(|e| as_problem(layer, e))),
            Err(e) if e.exit_code() == 2 => return Err(e),
            Err(e) => out.push(as_problem(layer, &e)),
        }
    }
    Ok(out)
}

fn as_problem(layer: &Layer, e: &Error) -> Problem {
    from_error(Some(layer), e.category().id(), e, e.message().to_string())
}

/// Validate `path` (any importable layout); `Err` only for usage and I/O problems.
pub fn run(path: &Path, base: Option<&Path>) -> Result<Validation> {
    if !path.exists() {
        return Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
        ));
    }
    if let Some(b) = base
        && !b.exists()
    {
        return Err(Error::io(
            b,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
        ));
    }
    let mut v = Validation {
        file: path.display().to_string(),
        layout: None,
        valid: false,
        layers: 0,
        base: base.map(|b| b.display().to_string()),
        problems: Vec::new(),
    };
    let loaded = layouts::detect(path).and_then(|layout| {
        v.layout = Some(layout.id().into());
        if layout.is_oft() {
            let (adapter, status) = oft_file::read_unverified(path)?;
            match status {
                DigestStatus::Ok => {}
                DigestStatus::Missing => {
                    v.problems
                        .push(problem(None, "digest", "missing `oft.digest`".into()))
                }
                DigestStatus::Mismatch { stored, computed } => v.problems.push(problem(
                    None,
                    "digest",
                    format!("integrity digest mismatch: stored {stored}, computed {computed}"),
                )),
            }
            Ok(adapter)
        } else {
            layouts::load(path)
        }
    });
    let adapter = match loaded {
        Ok(a) => a,
        Err(e) if e.is_io() => return Err(e),
        Err(e) => {
            v.problems
                .push(from_error(None, "parse", &e, e.to_string()));
            return Ok(v);
        }
    };
    v.layers = adapter.layers.len();
    v.problems.extend(check_adapter(&adapter));
    if let Some(b) = base {
        match check_base(&adapter, b) {
            Ok(p) => v.problems.extend(p),
            Err(e) if e.exit_code() == 2 => return Err(e),
            Err(e) => v.problems.push(from_error(None, "base", &e, e.to_string())),
        }
    }
    v.valid = v.problems.is_empty();
    Ok(v)
}

/// The report as text: one line when valid, else one line per problem.
pub fn render(v: &Validation) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    if v.valid {
        let _ = writeln!(
            s,
            "{}: valid ({} layers, {}{})",
            v.file,
            v.layers,
            v.layout.as_deref().unwrap_or("?"),
            v.base
                .as_ref()
                .map(|b| format!(", checked against {b}"))
                .unwrap_or_default()
        );
    } else {
        let _ = writeln!(s, "{}: invalid, {} problem(s):", v.file, v.problems.len());
        for p in &v.problems {
            match &p.layer {
                Some(l) => {
                    let _ = writeln!(s, "  [{}] {l}: {}", p.check, p.message);
                }
                None => {
                    let _ = writeln!(s, "  [{}] {}", p.check, p.message);
                }
            }
        }
    }
    s
}
