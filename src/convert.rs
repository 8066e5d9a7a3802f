//! `oftool convert`: import any supported layout and write it as `.oft`.

use crate::error::{Error, Result};
use crate::import;
use crate::oft_file;
use crate::validate::check_adapter;
use serde::Serialize;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, Serialize)]
pub struct ConvertSummary {
    pub input: String,
    pub layout: String,
    pub output: String,
    pub layers: usize,
    pub parameters: u64,
}

/// Refuse an output that is one of the inputs (same path or same inode).
pub fn refuse_overwriting_input(output: &Path, inputs: &[&Path]) -> Result<()> {
    for input in inputs {
        let same = match (std::fs::canonicalize(output), std::fs::canonicalize(input)) {
            (Ok(a), Ok(b)) => a == b || same_inode(&a, &b),
            _ => false,
        };
        let inside = input.is_dir() && output.parent().is_some_and(|p| {
            matches!((std::fs::canonicalize(p), std::fs::canonicalize(input)), (Ok(a), Ok(b)) if a == b)
        }) && output.file_name().is_some_and(|n| n == "adapter_model.safetensors");
        if same || inside {
            return Err(Error::Usage(format!(
                "the output {} would overwrite the input {}",
                output.display(),
                input.display()
            )));
        }
    }
    Ok(())
}

#[cfg(unix)]
fn same_inode(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_inode(_: &Path, _: &Path) -> bool {
    false
}

/// RFC 3339 UTC time of `secs` since the epoch (civil-from-days, proleptic Gregorian).
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Creation time: `SOURCE_DATE_EPOCH` when set (reproducible builds), else now.
pub fn creation_time() -> String {
    let secs = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        });
    rfc3339(secs)
}

/// Record, per layer, the target's full shape and a base-binding hash of its tensor in `base`.
pub fn bind(adapter: &mut crate::model::Adapter, base: &Path) -> Result<()> {
    use crate::resolve::AliasTable;
    use crate::tensors::MappedFile;
    let file = MappedFile::open(base)?;
    let st = file.tensors();
    let table = AliasTable::with_shapes(st.iter().map(|(n, v)| (n, v.shape().to_vec())));
    let mut problems = Vec::new();
    for layer in &mut adapter.layers {
        let r = match table.resolve(&layer.target) {
            Ok(r) => r,
            Err(c) if c.is_empty() => {
                problems.push(format!("`{}` has no tensor in the base", layer.target.name));
                continue;
            }
            Err(c) => {
                problems.push(format!(
                    "`{}` matches several tensors: {}",
                    layer.target.name,
                    c.join(", ")
                ));
                continue;
            }
        };
        let view = st
            .tensor(&r.key)
            .map_err(|e| Error::format(base, e.to_string()))?;
        let full: Vec<u64> = view.shape().iter().map(|&d| d as u64).collect();
        let mut target_shape = full.clone();
        if let (Some((_, len)), Some(first)) = (r.rows, target_shape.first_mut()) {
            *first = len as u64;
        }
        let axis = crate::validate::axis_len(layer.side, &target_shape);
        if layer.target.rotated_dim.is_some_and(|d| d != axis) {
            problems.push(format!(
                "`{}` rotates {} features but `{}` has {axis} on that side (shape {target_shape:?})",
                layer.target.name,
                layer.target.rotated_dim.unwrap_or(0),
                r.key
            ));
            continue;
        }
        layer.target.rotated_dim = Some(axis);
        layer.target.shape = Some(target_shape);
        layer.base_binding = Some(crate::model::BaseBinding {
            blake3: blake3::hash(view.data()).to_hex().to_string(),
            dtype: format!("{:?}", view.dtype()),
            shape: full,
        });
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "cannot bind to {}: {}",
            base.display(),
            problems.join("; ")
        )))
    }
}

pub fn run(input: &Path, output: &Path, base: Option<&Path>) -> Result<ConvertSummary> {
    let mut inputs = vec![input];
    inputs.extend(base);
    refuse_overwriting_input(output, &inputs)?;
    let layout = import::detect(input)?;
    let mut adapter = import::load(input)?;
    if let Some(b) = base {
        bind(&mut adapter, b)?;
    }
    let problems = check_adapter(&adapter);
    if let Some(p) = problems.first() {
        return Err(Error::Invalid(format!(
            "{}: {} problem(s), first: {}: {}",
            input.display(),
            problems.len(),
            p.layer.as_deref().unwrap_or("file"),
            p.message
        )));
    }
    if adapter.provenance.created.is_none() {
        adapter.provenance.created = Some(creation_time());
    }
    oft_file::write(&adapter, output)?;
    Ok(ConvertSummary {
        input: input.display().to_string(),
        layout: layout.name().into(),
        output: output.display().to_string(),
        layers: adapter.layers.len(),
        parameters: adapter.layers.iter().map(|l| l.parameter_count()).sum(),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_known_instants() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(1_795_651_200), "2026-11-26T00:00:00Z");
        assert_eq!(super::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
