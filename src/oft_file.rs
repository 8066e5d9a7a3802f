//! Reading and writing `.oft` files (spec/oft-format.md §2–§8).

use crate::error::{Category, Error, Result};
use crate::model::*;
use crate::rotation::tri_len;
use crate::tensors::OwnedTensor;
use crate::tensors::{MappedFile, atomic_write, from_f64, to_f64};
use safetensors::tensor::{Dtype, TensorView};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Metadata key naming the format (value `oft`).
pub const META_FORMAT: &str = "format";
/// Metadata key of the format version (`MAJOR.MINOR`).
pub const META_VERSION: &str = "oft.version";
/// Metadata key of the manifest (JSON).
pub const META_MANIFEST: &str = "oft.manifest";
/// Metadata key of the integrity digest (spec §7).
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

/// `values` as a tensor: F32 when every value survives the round trip (and F64 is not asked
/// for), else F64.
fn stored(name: &str, values: &[f64], f64_asked: bool, shape: Vec<usize>) -> Result<OwnedTensor> {
    let dtype = if f64_asked || !fits_f32(values) {
        Dtype::F64
    } else {
        Dtype::F32
    };
    Ok(OwnedTensor {
        name: name.to_string(),
        dtype,
        shape,
        bytes: from_f64(values, dtype)?,
    })
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
            let shape = vec![stage.stored_blocks() as usize, stage.tri_len()];
            tensors.push(stored(&name, &stage.q, stage.q_f64, shape)?);
            stages.push(StageSpec {
                q: name,
                ..stage.spec.clone()
            });
        }
        let row_scale = match &layer.row_scale {
            None => None,
            Some((position, values)) => {
                let name = format!("layers.{i}.row_scale");
                let shape = vec![values.len()];
                tensors.push(stored(&name, values, layer.row_scale_f64, shape)?);
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
    /// The stored digest matches.
    Ok,
    /// The file has no `oft.digest`.
    Missing,
    /// The stored digest differs from the one computed.
    Mismatch {
        /// The digest the file holds.
        stored: String,
        /// The digest of its content.
        computed: String,
    },
}

/// A `.oft` file that breaks `rule` of spec §9.1.
fn invalid(path: &Path, category: Category, rule: u8, message: impl Into<String>) -> Error {
    Error::new(category, message).at(path).rule(rule)
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

pub(crate) fn read_mapped(path: &Path, file: &MappedFile) -> Result<(Adapter, DigestStatus)> {
    let (manifest, manifest_json) = read_manifest(path, &file.metadata)?;
    let st = file.tensors();
    let mut tensors = Referenced {
        path,
        st: &st,
        used: BTreeMap::new(),
    };
    let layers = (manifest.layers.iter().enumerate())
        .map(|(i, ls)| read_layer(&mut tensors, i, ls, &manifest.requires))
        .collect::<Result<Vec<_>>>()?;
    let used = tensors.used;
    let stray: Vec<String> = st
        .names()
        .into_iter()
        .filter(|n| !used.contains_key(*n))
        .map(|n| n.to_string())
        .collect();
    if !stray.is_empty() {
        return Err(invalid(
            path,
            Category::Tensor,
            20,
            format!(
                "tensors not referenced by the manifest: {}",
                stray.join(", ")
            ),
        ));
    }

    let status = match file.metadata.get(META_DIGEST) {
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

/// Spec §9.1 rule 6: `oft.version`, of a MAJOR this oftool reads.
fn read_version<'m>(path: &Path, meta: &'m HashMap<String, String>) -> Result<&'m String> {
    let version = meta.get(META_VERSION).ok_or_else(|| {
        invalid(
            path,
            Category::Version,
            6,
            "missing `oft.version` in the metadata",
        )
    })?;
    let (major, _minor) = parse_version(version).ok_or_else(|| {
        invalid(path, Category::Version, 6, "malformed `oft.version`")
            .expected_found("MAJOR.MINOR", format!("`{version}`"))
    })?;
    if major != 1 {
        return Err(invalid(
            path,
            Category::Version,
            6,
            format!("format version {version}; this oftool reads version 1.x"),
        )
        .hint("upgrade oftool"));
    }
    Ok(version)
}

/// Spec §9.1 rules 4–13: the metadata and the manifest; returns the manifest and its JSON text.
fn read_manifest<'m>(
    path: &Path,
    meta: &'m HashMap<String, String>,
) -> Result<(Manifest, &'m str)> {
    if !is_oft(meta) {
        return Err(invalid(
            path,
            Category::NotOft,
            5,
            "not an .oft file (its metadata has no `format: oft`)",
        )
        .hint("`oftool inspect` reads other layouts; `oftool convert` turns them into .oft"));
    }
    let version = read_version(path, meta)?;
    let manifest_json = meta.get(META_MANIFEST).ok_or_else(|| {
        invalid(
            path,
            Category::Manifest,
            7,
            "missing `oft.manifest` in the metadata",
        )
    })?;
    let value: serde_json::Value = serde_json::from_str(manifest_json).map_err(|e| {
        invalid(
            path,
            Category::Manifest,
            7,
            format!("the manifest is not valid JSON: {e}"),
        )
    })?;
    if let Some(req) = value.get("requires").and_then(|r| r.as_array()) {
        let unknown: Vec<String> = req
            .iter()
            .map(|f| f.as_str().unwrap_or("<non-string>").to_string())
            .filter(|f| !KNOWN_FEATURES.contains(&f.as_str()))
            .collect();
        if !unknown.is_empty() {
            return Err(invalid(
                path,
                Category::Version,
                11,
                format!(
                    "the file requires features this oftool does not implement: {}",
                    unknown.join(", ")
                ),
            )
            .hint("upgrade oftool"));
        }
    }
    let manifest: Manifest = serde_json::from_value(value).map_err(|e| {
        // §8.3: an unknown value of a closed enum is rule 12; anything else is rule 9.
        let rule = if e.to_string().contains("unknown variant") {
            12
        } else {
            9
        };
        invalid(
            path,
            Category::Manifest,
            rule,
            format!("the manifest does not follow the v1 schema: {e}"),
        )
    })?;

    if manifest.format != FORMAT_NAME || &manifest.version != version {
        return Err(invalid(
            path,
            Category::Manifest,
            10,
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
        return Err(invalid(
            path,
            Category::Manifest,
            13,
            format!(
                "two layers target `{}` but the file does not require `{FEATURE_STACKED_LAYERS}`",
                dup.target.name
            ),
        ));
    }
    Ok((manifest, manifest_json))
}

/// The tensors of a `.oft` file, and which of them the manifest referenced so far.
struct Referenced<'a> {
    path: &'a Path,
    st: &'a safetensors::SafeTensors<'a>,
    used: BTreeMap<String, ()>,
}

impl Referenced<'_> {
    /// Spec §9.1 rules 20–21: the tensor `name` that `what` refers to, as f64.
    fn take(&mut self, name: &str, what: &str) -> Result<(Vec<f64>, Vec<usize>, Dtype)> {
        let (path, st) = (self.path, self.st);
        let view = st.tensor(name).map_err(|_| {
            invalid(
                path,
                Category::Tensor,
                20,
                format!("{what} refers to tensor `{name}`, which the file does not hold"),
            )
        })?;
        if !matches!(view.dtype(), Dtype::F32 | Dtype::F64) {
            return Err(invalid(
                path,
                Category::Tensor,
                21,
                format!(
                    "tensor `{name}` has dtype {:?}; .oft tensors are F32 or F64",
                    view.dtype()
                ),
            ));
        }
        self.used.insert(name.to_string(), ());
        Ok((to_f64(&view, name)?, view.shape().to_vec(), view.dtype()))
    }
}

/// Spec §9.1 rules 9 and 14 for one stage, and oftool's limits (`unsupported`).
fn check_stage_spec(
    path: &Path,
    what: &str,
    ss: &StageSpec,
    requires: &[String],
    rotated_dim: Option<u64>,
) -> Result<()> {
    let has = |f: &str| requires.iter().any(|r| r == f);
    if ss.block_size == 0 || ss.blocks == Some(0) {
        return Err(invalid(
            path,
            Category::Manifest,
            9,
            format!(
                "{what}: {:?} blocks of size {} is not a partition (need ≥ 1 block of size ≥ 1)",
                ss.blocks, ss.block_size
            ),
        ));
    }
    if ss.block_size == 1 && !has(FEATURE_UNIT_BLOCKS) {
        return Err(invalid(
            path,
            Category::Manifest,
            9,
            format!(
                "{what}: block size 1 needs the `{FEATURE_UNIT_BLOCKS}` feature in `requires` (format 1.2)"
            ),
        ));
    }
    if ss.truncated {
        if !has(FEATURE_TRUNCATED_BLOCKS) {
            return Err(invalid(
                path,
                Category::Manifest,
                14,
                format!(
                    "{what}: a truncated stage needs the `{FEATURE_TRUNCATED_BLOCKS}` feature in `requires` (format 1.2)"
                ),
            ));
        }
        let fits = match (ss.blocks, rotated_dim) {
            (Some(r), Some(d)) => r.checked_mul(ss.block_size).is_some_and(|n| n >= d),
            (Some(_), None) => true,
            (None, _) => false,
        };
        if ss.wiring != Wiring::Identity || !fits {
            return Err(invalid(
                path,
                Category::Manifest,
                14,
                format!(
                    "{what}: a truncated stage needs a block count, r·b ≥ rotated_dim and the identity wiring"
                ),
            ));
        }
    }
    if !dim_ok(ss.blocks, ss.block_size) {
        return Err(Error::unsupported(
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
        return Err(Error::unsupported(
            path,
            format!("{what}: {terms} Neumann terms (at most {MAX_NEUMANN_TERMS})"),
        ));
    }
    if ss.blocks.is_none() && !ss.shared {
        return Err(invalid(
            path,
            Category::Manifest,
            14,
            format!("{what}: `blocks` may only be null for a shared stage"),
        ));
    }
    if let RotationMap::Neumann { terms: 0, .. } = ss.map {
        return Err(invalid(
            path,
            Category::Manifest,
            9,
            format!("{what}: a Neumann map needs at least 1 term"),
        ));
    }
    Ok(())
}

/// Spec §9.1 rules 13, 9, 14, 19 and 22 for layer `i`: its stages and row scale, read.
fn read_layer(
    tensors: &mut Referenced<'_>,
    i: usize,
    ls: &LayerSpec,
    requires: &[String],
) -> Result<Layer> {
    let path = tensors.path;
    let lname = &ls.target.name;
    let mut stages = Vec::with_capacity(ls.stages.len());
    if ls.stages.is_empty() {
        return Err(invalid(
            path,
            Category::Manifest,
            13,
            format!("layer {i} (`{lname}`) has no stages"),
        ));
    }
    for (j, ss) in ls.stages.iter().enumerate() {
        let what = format!("layer {i} (`{lname}`) stage {j}");
        check_stage_spec(path, &what, ss, requires, ls.target.rotated_dim)?;
        let expected = format!("layers.{i}.stages.{j}.q");
        if ss.q != expected {
            return Err(invalid(
                path,
                Category::Tensor,
                19,
                format!(
                    "{what}: its tensor must be named `{expected}`, not `{}`",
                    ss.q
                ),
            ));
        }
        let (q, shape, dtype) = tensors.take(&ss.q, &what)?;
        let stored = if ss.shared {
            1
        } else {
            ss.blocks.unwrap_or(1) as usize
        };
        let tri = tri_len(ss.block_size as usize);
        if shape != [stored, tri] {
            return Err(invalid(
                path,
                Category::Tensor,
                22,
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
                return Err(invalid(
                    path,
                    Category::Tensor,
                    19,
                    format!(
                        "layer {i}: its row scale must be named `{expected}`, not `{}`",
                        rs.tensor
                    ),
                ));
            }
            let (v, shape, dtype) =
                tensors.take(&rs.tensor, &format!("layer {i} (`{lname}`) row scale"))?;
            if shape.len() != 1 {
                return Err(invalid(
                    path,
                    Category::Tensor,
                    22,
                    format!("row scale `{}` must be 1-D, has shape {shape:?}", rs.tensor),
                ));
            }
            (Some((rs.position, v)), dtype == Dtype::F64)
        }
    };
    Ok(Layer {
        target: ls.target.clone(),
        side: ls.side,
        stages,
        row_scale,
        row_scale_f64,
        constraint: ls.constraint.clone(),
        base_binding: ls.base_binding.clone(),
    })
}

/// Read a `.oft` file and refuse it if its integrity digest is missing or wrong.
pub fn read(path: &Path) -> Result<Adapter> {
    let (adapter, status) = read_unverified(path)?;
    match status {
        DigestStatus::Ok => Ok(adapter),
        DigestStatus::Missing => Err(invalid(
            path,
            Category::Digest,
            8,
            "missing `oft.digest`: the file's integrity cannot be checked",
        )),
        DigestStatus::Mismatch { stored, computed } => Err(invalid(
            path,
            Category::Digest,
            8,
            "integrity digest mismatch: the file was modified or corrupted",
        )
        .expected_found(stored, computed)),
    }
}
