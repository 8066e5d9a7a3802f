//! Reading and writing `.oft` files (spec/oft-format.md §2–§8).

use crate::error::{Category, Error, Result};
use crate::model::*;
use crate::rotation::tri_len;
use crate::tensors::OwnedTensor;
use crate::tensors::{MappedFile, atomic_write, from_f64, to_f64};
use safetensors::tensor::{Dtype, TensorView};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

pub const META_FORMAT: &str = "format";
pub const META_VERSION: &str = "oft.version";
pub const META_MANIFEST: &str = "oft.manifest";
pub const META_DIGEST: &str = "oft.digest";

/// Whether a safetensors header's metadata marks it as `.oft`.
pub fn is_oft(metadata: &HashMap<String, String>) -> bool {
    metadata.get(META_FORMAT).map(String::as_str) == Some(FORMAT_NAME)
}

fn dtype_name(d: Dtype) -> String {
    format!("{d:?}")
}

/// The integrity digest of spec §7.
fn digest<'a>(
    manifest: &str,
    tensors: impl Iterator<Item = (&'a str, String, &'a [usize], &'a [u8])>,
) -> String {
    let mut sorted: Vec<_> = tensors.collect();
    sorted.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut h = blake3::Hasher::new();
    let put = |h: &mut blake3::Hasher, bytes: &[u8]| {
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    h.update(b"oft-digest-v1\n");
    put(&mut h, manifest.as_bytes());
    for (name, dtype, shape, data) in sorted {
        put(&mut h, name.as_bytes());
        put(&mut h, dtype.as_bytes());
        h.update(&(shape.len() as u64).to_le_bytes());
        for &d in shape {
            h.update(&(d as u64).to_le_bytes());
        }
        put(&mut h, data);
    }
    h.finalize().to_hex().to_string()
}

fn fits_f32(values: &[f64]) -> bool {
    values.iter().all(|&v| (v as f32) as f64 == v)
}

/// Build the manifest and tensors for `adapter`, naming tensors canonically.
fn lay_out(adapter: &Adapter) -> Result<(Manifest, Vec<OwnedTensor>)> {
    let mut tensors = Vec::new();
    let mut layers = Vec::with_capacity(adapter.layers.len());
    for (i, layer) in adapter.layers.iter().enumerate() {
        let mut stages = Vec::with_capacity(layer.stages.len());
        for (j, stage) in layer.stages.iter().enumerate() {
            if stage.inverse {
                return Err(Error::new(
                    Category::Algebra,
                    format!(
                        "layer `{}` stage {j} is an inverted Neumann stage, which .oft cannot express",
                        layer.target.name
                    ),
                ));
            }
            let name = format!("layers.{i}.stages.{j}.q");
            let dtype = if stage.q_f64 || !fits_f32(&stage.q) {
                Dtype::F64
            } else {
                Dtype::F32
            };
            tensors.push(OwnedTensor {
                name: name.clone(),
                dtype,
                shape: vec![stage.stored_blocks() as usize, stage.tri_len()],
                bytes: from_f64(&stage.q, dtype)?,
            });
            stages.push(StageSpec {
                q: name,
                ..stage.spec.clone()
            });
        }
        let row_scale = match &layer.row_scale {
            None => None,
            Some((position, values)) => {
                let name = format!("layers.{i}.row_scale");
                let dtype = if layer.row_scale_f64 || !fits_f32(values) {
                    Dtype::F64
                } else {
                    Dtype::F32
                };
                tensors.push(OwnedTensor {
                    name: name.clone(),
                    dtype,
                    shape: vec![values.len()],
                    bytes: from_f64(values, dtype)?,
                });
                Some(RowScaleSpec {
                    tensor: name,
                    position: *position,
                })
            }
        };
        layers.push(LayerSpec {
            target: layer.target.clone(),
            side: layer.side,
            stages,
            row_scale,
            constraint: layer.constraint.clone(),
            base_binding: layer.base_binding.clone(),
        });
    }
    // Duplicate targets need the 1.1 `stacked-layers` feature; write the lowest version.
    let mut requires = adapter.features.clone();
    let mut seen = std::collections::HashSet::new();
    if !adapter
        .layers
        .iter()
        .all(|l| seen.insert((&l.target.name, &l.target.component)))
        && !requires.iter().any(|f| f == FEATURE_STACKED_LAYERS)
    {
        requires.push(FEATURE_STACKED_LAYERS.to_string());
    }
    // Blocks of size 1 need the 1.2 `unit-blocks` feature.
    if adapter
        .layers
        .iter()
        .any(|l| l.stages.iter().any(|s| s.spec.block_size == 1))
    {
        requires.push(FEATURE_UNIT_BLOCKS.to_string());
    }
    // Blocks cut to the weight need the 1.2 `truncated-blocks` feature.
    if adapter
        .layers
        .iter()
        .any(|l| l.stages.iter().any(|s| s.spec.truncated))
    {
        requires.push(FEATURE_TRUNCATED_BLOCKS.to_string());
    }
    requires.sort();
    requires.dedup();
    let manifest = Manifest {
        format: FORMAT_NAME.into(),
        version: version_for(&requires).into(),
        requires,
        provenance: adapter.provenance.clone(),
        layers,
    };
    Ok((manifest, tensors))
}

/// Serialize `adapter` as a `.oft` file into `out`.
pub fn write_to(adapter: &Adapter, out: &mut impl std::io::Write) -> Result<()> {
    let (manifest, tensors) = lay_out(adapter)?;
    let manifest_json = serde_json::to_string(&manifest).map_err(|e| {
        Error::new(
            Category::Manifest,
            format!("cannot encode the manifest: {e}"),
        )
    })?;
    let digest = digest(
        &manifest_json,
        tensors.iter().map(|t| {
            (
                t.name.as_str(),
                dtype_name(t.dtype),
                t.shape.as_slice(),
                t.bytes.as_slice(),
            )
        }),
    );
    let mut meta = HashMap::new();
    meta.insert(META_FORMAT.to_string(), FORMAT_NAME.to_string());
    meta.insert(META_VERSION.to_string(), manifest.version.clone());
    meta.insert(META_MANIFEST.to_string(), manifest_json);
    meta.insert(META_DIGEST.to_string(), digest);
    crate::tensors::write_owned(out, &tensors, meta)
}

/// Write `adapter` to `path` atomically.
pub fn write(adapter: &Adapter, path: &Path) -> Result<()> {
    atomic_write(path, |f| {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        write_to(adapter, &mut w)?;
        use std::io::Write;
        w.flush().map_err(|e| Error::io(path, e))
    })
}

/// Result of checking the stored integrity digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DigestStatus {
    Ok,
    Missing,
    Mismatch { stored: String, computed: String },
}

/// Parse the version string `MAJOR.MINOR`.
fn parse_version(v: &str) -> Option<(u32, u32)> {
    let (a, b) = v.split_once('.')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Read a `.oft` file; the digest is reported, not enforced (see [`read`]).
pub fn read_unverified(path: &Path) -> Result<(Adapter, DigestStatus)> {
    let file = MappedFile::open(path)?;
    read_mapped(path, &file)
}

pub fn read_mapped(path: &Path, file: &MappedFile) -> Result<(Adapter, DigestStatus)> {
    let meta = &file.metadata;
    if !is_oft(meta) {
        return Err(Error::format(
            path,
            "not an .oft file (its metadata has no `format: oft`)",
        ));
    }
    let version = meta
        .get(META_VERSION)
        .ok_or_else(|| Error::format(path, "missing `oft.version` in the metadata"))?;
    let (major, _minor) = parse_version(version).ok_or_else(|| {
        Error::format(
            path,
            format!("`oft.version` is `{version}`, expected MAJOR.MINOR"),
        )
    })?;
    if major != 1 {
        return Err(Error::unsupported(
            path,
            format!("format version {version}; this oftool reads version 1.x (upgrade oftool)"),
        ));
    }
    let manifest_json = meta
        .get(META_MANIFEST)
        .ok_or_else(|| Error::format(path, "missing `oft.manifest` in the metadata"))?;
    let value: serde_json::Value = serde_json::from_str(manifest_json)
        .map_err(|e| Error::format(path, format!("the manifest is not valid JSON: {e}")))?;
    if let Some(req) = value.get("requires").and_then(|r| r.as_array()) {
        let unknown: Vec<String> = req
            .iter()
            .map(|f| f.as_str().unwrap_or("<non-string>").to_string())
            .filter(|f| !KNOWN_FEATURES.contains(&f.as_str()))
            .collect();
        if !unknown.is_empty() {
            return Err(Error::unsupported(
                path,
                format!(
                    "the file requires features this oftool does not implement: {}",
                    unknown.join(", ")
                ),
            ));
        }
    }
    let manifest: Manifest = serde_json::from_value(value).map_err(|e| {
        Error::format(
            path,
            format!("the manifest does not follow the v1 schema: {e}"),
        )
    })?;

    if manifest.format != FORMAT_NAME || &manifest.version != version {
        return Err(Error::format(
            path,
            format!(
                "the manifest says format `{}` version `{}`, the metadata `oft` version `{version}`",
                manifest.format, manifest.version
            ),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = manifest
        .layers
        .iter()
        .find(|l| !seen.insert((&l.target.name, &l.target.component)))
        && !manifest
            .requires
            .iter()
            .any(|f| f == FEATURE_STACKED_LAYERS)
    {
        return Err(Error::format(
            path,
            format!(
                "two layers target `{}` but the file does not require `{FEATURE_STACKED_LAYERS}`",
                dup.target.name
            ),
        ));
    }
    let st = file.tensors();
    let mut used: BTreeMap<String, ()> = BTreeMap::new();
    let mut take = |name: &str, what: &str| -> Result<(Vec<f64>, Vec<usize>, Dtype)> {
        let view = st.tensor(name).map_err(|_| {
            Error::format(
                path,
                format!("{what} refers to tensor `{name}`, which the file does not hold"),
            )
        })?;
        if !matches!(view.dtype(), Dtype::F32 | Dtype::F64) {
            return Err(Error::format(
                path,
                format!(
                    "tensor `{name}` has dtype {:?}; .oft tensors are F32 or F64",
                    view.dtype()
                ),
            ));
        }
        used.insert(name.to_string(), ());
        Ok((to_f64(&view, name)?, view.shape().to_vec(), view.dtype()))
    };

    let mut layers = Vec::with_capacity(manifest.layers.len());
    for (i, ls) in manifest.layers.iter().enumerate() {
        let lname = &ls.target.name;
        let mut stages = Vec::with_capacity(ls.stages.len());
        if ls.stages.is_empty() {
            return Err(Error::format(
                path,
                format!("layer {i} (`{lname}`) has no stages"),
            ));
        }
        for (j, ss) in ls.stages.iter().enumerate() {
            let what = format!("layer {i} (`{lname}`) stage {j}");
            if ss.block_size == 0 || ss.blocks == Some(0) {
                return Err(Error::format(
                    path,
                    format!(
                        "{what}: {:?} blocks of size {} is not a partition (need ≥ 1 block of size ≥ 1)",
                        ss.blocks, ss.block_size
                    ),
                ));
            }
            if ss.block_size == 1 && !manifest.requires.iter().any(|f| f == FEATURE_UNIT_BLOCKS) {
                return Err(Error::format(
                    path,
                    format!(
                        "{what}: block size 1 needs the `{FEATURE_UNIT_BLOCKS}` feature in `requires` (format 1.2)"
                    ),
                ));
            }
            if ss.truncated {
                if !manifest
                    .requires
                    .iter()
                    .any(|f| f == FEATURE_TRUNCATED_BLOCKS)
                {
                    return Err(Error::format(
                        path,
                        format!(
                            "{what}: a truncated stage needs the `{FEATURE_TRUNCATED_BLOCKS}` feature in `requires` (format 1.2)"
                        ),
                    ));
                }
                let fits = match (ss.blocks, ls.target.rotated_dim) {
                    (Some(r), Some(d)) => r.checked_mul(ss.block_size).is_some_and(|n| n >= d),
                    (Some(_), None) => true,
                    (None, _) => false,
                };
                if ss.wiring != Wiring::Identity || !fits {
                    return Err(Error::format(
                        path,
                        format!(
                            "{what}: a truncated stage needs a block count, r·b ≥ rotated_dim and the identity wiring"
                        ),
                    ));
                }
            }
            if !dim_ok(ss.blocks, ss.block_size) {
                return Err(Error::format(
                    path,
                    format!(
                        "{what}: {:?} blocks of size {} exceed the largest dimension oftool accepts ({MAX_DIM})",
                        ss.blocks, ss.block_size
                    ),
                ));
            }
            if let RotationMap::Neumann { terms, .. } = ss.map
                && terms > MAX_NEUMANN_TERMS
            {
                return Err(Error::format(
                    path,
                    format!("{what}: {terms} Neumann terms (at most {MAX_NEUMANN_TERMS})"),
                ));
            }
            if ss.blocks.is_none() && !ss.shared {
                return Err(Error::format(
                    path,
                    format!("{what}: `blocks` may only be null for a shared stage"),
                ));
            }
            if let RotationMap::Neumann { terms: 0, .. } = ss.map {
                return Err(Error::format(
                    path,
                    format!("{what}: a Neumann map needs at least 1 term"),
                ));
            }
            let expected = format!("layers.{i}.stages.{j}.q");
            if ss.q != expected {
                return Err(Error::format(
                    path,
                    format!(
                        "{what}: its tensor must be named `{expected}`, not `{}`",
                        ss.q
                    ),
                ));
            }
            let (q, shape, dtype) = take(&ss.q, &what)?;
            let stored = if ss.shared {
                1
            } else {
                ss.blocks.unwrap_or(1) as usize
            };
            let tri = tri_len(ss.block_size as usize);
            if shape != [stored, tri] {
                return Err(Error::format(
                    path,
                    format!(
                        "{what}: tensor `{}` has shape {shape:?}, expected [{stored}, {tri}] for {} block(s) of size {} (b(b−1)/2 = {tri})",
                        ss.q,
                        ss.blocks.map_or("shared".to_string(), |r| r.to_string()),
                        ss.block_size
                    ),
                ));
            }
            stages.push(Stage {
                spec: ss.clone(),
                q,
                q_f64: dtype == Dtype::F64,
                inverse: false,
            });
        }
        let (row_scale, row_scale_f64) = match &ls.row_scale {
            None => (None, false),
            Some(rs) => {
                let expected = format!("layers.{i}.row_scale");
                if rs.tensor != expected {
                    return Err(Error::format(
                        path,
                        format!(
                            "layer {i}: its row scale must be named `{expected}`, not `{}`",
                            rs.tensor
                        ),
                    ));
                }
                let (v, shape, dtype) =
                    take(&rs.tensor, &format!("layer {i} (`{lname}`) row scale"))?;
                if shape.len() != 1 {
                    return Err(Error::format(
                        path,
                        format!("row scale `{}` must be 1-D, has shape {shape:?}", rs.tensor),
                    ));
                }
                (Some((rs.position, v)), dtype == Dtype::F64)
            }
        };
        layers.push(Layer {
            target: ls.target.clone(),
            side: ls.side,
            stages,
            row_scale,
            row_scale_f64,
            constraint: ls.constraint.clone(),
            base_binding: ls.base_binding.clone(),
        });
    }
    let stray: Vec<String> = st
        .names()
        .into_iter()
        .filter(|n| !used.contains_key(*n))
        .map(|n| n.to_string())
        .collect();
    if !stray.is_empty() {
        return Err(Error::format(
            path,
            format!(
                "tensors not referenced by the manifest: {}",
                stray.join(", ")
            ),
        ));
    }

    let status = match meta.get(META_DIGEST) {
        None => DigestStatus::Missing,
        Some(stored) => {
            let mut views: Vec<(String, TensorView<'_>)> = st.tensors();
            views.sort_by(|a, b| a.0.cmp(&b.0));
            let computed = digest(
                manifest_json,
                views
                    .iter()
                    .map(|(n, v)| (n.as_str(), dtype_name(v.dtype()), v.shape(), v.data())),
            );
            if &computed == stored {
                DigestStatus::Ok
            } else {
                DigestStatus::Mismatch {
                    stored: stored.clone(),
                    computed,
                }
            }
        }
    };
    Ok((
        Adapter {
            provenance: manifest.provenance,
            layers,
            features: manifest.requires,
        },
        status,
    ))
}

/// Read a `.oft` file and refuse it if its integrity digest is missing or wrong.
pub fn read(path: &Path) -> Result<Adapter> {
    let (adapter, status) = read_unverified(path)?;
    match status {
        DigestStatus::Ok => Ok(adapter),
        DigestStatus::Missing => Err(Error::format(
            path,
            "missing `oft.digest`: the file's integrity cannot be checked",
        )),
        DigestStatus::Mismatch { stored, computed } => Err(Error::format(
            path,
            format!(
                "integrity digest mismatch (stored {stored}, computed {computed}): the file was modified or corrupted"
            ),
        )),
    }
}
