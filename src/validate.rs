//! `oftool validate`: every structural and numerical problem of an adapter, optionally
//! checked against the base checkpoint it is meant for (headers and bound tensors only).

use crate::base::Base;
use crate::error::{Category, Error, Result};
use crate::layouts;
use crate::model::{Adapter, Layer, ModuleKind, Side};
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

/// Whether `s` is 64 lowercase hexadecimal digits (a BLAKE3 hash as the spec writes it).
fn is_hash(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
}

/// Whether `s` is an RFC 3339 date-time in UTC with the `Z` suffix
/// (`YYYY-MM-DDTHH:MM:SS[.fraction]Z`, spec §3.2).
pub fn is_rfc3339_utc(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| -> Option<u32> {
        let part = b.get(r)?;
        part.iter()
            .all(u8::is_ascii_digit)
            .then(|| part.iter().fold(0, |a, &c| a * 10 + u32::from(c - b'0')))
    };
    let (Some(y), Some(mo), Some(d), Some(h), Some(mi), Some(sec)) = (
        digits(0..4),
        digits(5..7),
        digits(8..10),
        digits(11..13),
        digits(14..16),
        digits(17..19),
    ) else {
        return false;
    };
    let seps = b.get(4) == Some(&b'-')
        && b.get(7) == Some(&b'-')
        && b.get(10) == Some(&b'T')
        && b.get(13) == Some(&b':')
        && b.get(16) == Some(&b':');
    let tail = match b.get(19..) {
        Some([b'Z']) => true,
        Some([b'.', rest @ .., b'Z']) => !rest.is_empty() && rest.iter().all(u8::is_ascii_digit),
        _ => false,
    };
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days = match mo {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    seps && tail
        && (1..=12).contains(&mo)
        && (1..=days).contains(&d)
        && h < 24
        && mi < 60
        && sec <= 60
}

/// Manifest rules that need no tensor values (spec §9.1 rules 9, 15, 16), in rule order.
fn check_manifest(adapter: &Adapter, out: &mut Vec<Problem>) {
    let prov = &adapter.provenance;
    let file =
        |rule: u8, m: String| problem(None, "manifest", m).kind(Category::Manifest, Some(rule));
    for layer in &adapter.layers {
        let p = |rule: u8, m: String| {
            problem(Some(layer), "manifest", m).kind(Category::Manifest, Some(rule))
        };
        if let Some(c) = &layer.constraint {
            if !(c.radius.is_finite() && c.radius >= 0.0) {
                out.push(p(
                    9,
                    format!("constraint radius {} is not a finite number ≥ 0", c.radius),
                ));
            }
            let needs = match c.kind.as_str() {
                "lycoris" | "kohya" | "comfyui-raw" => Some(("alpha", c.alpha.is_some())),
                "peft-coft" => Some(("eps", c.eps.is_some())),
                _ => None,
            };
            if let Some((member, false)) = needs {
                out.push(p(9, format!("a `{}` constraint needs `{member}`", c.kind)));
            }
        }
        if let Some(shape) = &layer.target.shape {
            if shape.contains(&0) {
                out.push(p(9, format!("target shape {shape:?} has an entry 0")));
            }
            let need = match layer.target.module {
                ModuleKind::Linear | ModuleKind::Embedding => Some(("exactly 2", shape.len() == 2)),
                ModuleKind::Conv => Some(("at least 3", shape.len() >= 3)),
                ModuleKind::Unknown => None,
            };
            if let Some((n, false)) = need {
                out.push(p(
                    15,
                    format!(
                        "a `{}` target has {n} axes, not shape {shape:?}",
                        module_name(layer.target.module)
                    ),
                ));
            }
            if shape.len() < 2 {
                out.push(p(
                    15,
                    format!("a target weight has 2 or more axes (spec §1.3), not shape {shape:?}"),
                ));
            }
            if let Some(b) = &layer.base_binding
                && &b.shape != shape
            {
                out.push(p(
                    15,
                    format!(
                        "base_binding.shape {:?} differs from target.shape {shape:?}",
                        b.shape
                    ),
                ));
            }
        }
        if let Some(b) = &layer.base_binding
            && !is_hash(&b.blake3)
        {
            out.push(p(
                16,
                format!(
                    "base_binding.blake3 `{}` is not 64 lowercase hex digits",
                    b.blake3
                ),
            ));
        }
    }
    if let Some(c) = &prov.created
        && !is_rfc3339_utc(c)
    {
        out.push(file(
            16,
            format!("provenance.created `{c}` is not an RFC 3339 UTC time (`…Z`)"),
        ));
    }
    if let Some(d) = &prov.source_digest
        && !is_hash(d)
    {
        out.push(file(
            16,
            format!("provenance.source_digest `{d}` is not 64 lowercase hex digits"),
        ));
    }
}

fn module_name(m: ModuleKind) -> &'static str {
    match m {
        ModuleKind::Linear => "linear",
        ModuleKind::Conv => "conv",
        ModuleKind::Embedding => "embedding",
        ModuleKind::Unknown => "unknown",
    }
}

/// The checks that need only the adapter.
pub fn check_adapter(adapter: &Adapter) -> Vec<Problem> {
    let mut out = Vec::new();
    check_manifest(adapter, &mut out);
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
            if let Some(rows) = layer.target.view_rows()
                && rows != v.len() as u64
            {
                out.push(
                    p(
                        "partition",
                        format!(
                            "row scale has {} entries for a weight view of {rows} rows",
                            v.len()
                        ),
                    )
                    .kind(Category::Tensor, Some(22)),
                );
            }
        }
        if let Some(why) = oft_file::rows_problem(&layer.target) {
            out.push(p("manifest", why).kind(Category::Manifest, Some(15)));
        }
        if let (Some(shape), Some(d)) = (&layer.target.shape, layer.target.rotated_dim) {
            let axis = match (layer.side, layer.target.view_rows()) {
                (Side::Output, Some(rows)) => rows,
                _ => axis_len(layer.side, shape),
            };
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
    let mut located = Vec::new();
    for layer in &adapter.layers {
        // A fused module on a split base lands on several tensors: each part must fit.
        let found = base.locate_all(layer).and_then(|locs| {
            let mut problems = Vec::new();
            for loc in &locs {
                problems.extend(base.check(&crate::base::part_layer(layer, loc), loc)?);
            }
            located.extend(locs.into_iter().map(|loc| (layer, loc)));
            Ok(problems)
        });
        match found {
            Ok(problems) => out.extend(problems.iter().map(|e| as_problem(layer, e))),
            Err(e) if e.exit_code() == 2 => return Err(e),
            Err(e) => out.push(as_problem(layer, &e)),
        }
    }
    let stacked = adapter
        .features
        .iter()
        .any(|f| f == crate::model::FEATURE_STACKED_LAYERS);
    let locs: Vec<&crate::base::Located> = located.iter().map(|(_, l)| l).collect();
    if !stacked && let Some((a, b)) = crate::base::first_shared_rows(&locs) {
        let (la, lb) = (&located[a], &located[b]);
        out.push(problem(
            Some(lb.0),
            "target-ambiguous",
            format!(
                "`{}` and `{}` both act on `{}` rows {}, but the file does not require `stacked-layers`, so their order is not defined",
                la.0.target.name, lb.0.target.name, lb.1.key, lb.1.rows
            ),
        ));
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
            // A file named like a .oft file but not marked as one breaks rule 4 or 5.
            let e = match e.category() {
                Category::UnknownLayout => oft_file::not_oft_reason(path).unwrap_or(e),
                _ => e,
            };
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
