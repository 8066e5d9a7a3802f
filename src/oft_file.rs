//! Reading and writing `.oft` files (spec/oft-format.md §2–§8).

use crate::error::{Category, Error, Result};
use crate::model::*;
use crate::rotation::tri_len;
use crate::tensors::OwnedTensor;
use crate::tensors::{MappedFile, atomic_write, bytes_to_f64, from_f64, to_f64};
use safetensors::tensor::{Dtype, TensorView};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

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

/// The integrity digest of spec §7, fed one tensor at a time in name order, its data in as
/// many pieces as the caller reads it in.
struct Digest(blake3::Hasher);

impl Digest {
    fn new(manifest: &str) -> Self {
        let mut h = blake3::Hasher::new();
        h.update(b"oft-digest-v1\n");
        Digest::put(&mut h, manifest.as_bytes());
        Digest(h)
    }

    fn put(h: &mut blake3::Hasher, bytes: &[u8]) {
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }

    /// The next tensor's name, dtype and shape, and the length of the data that follows.
    fn tensor(&mut self, name: &str, dtype: &str, shape: &[usize], len: u64) {
        let h = &mut self.0;
        Digest::put(h, name.as_bytes());
        Digest::put(h, dtype.as_bytes());
        h.update(&(shape.len() as u64).to_le_bytes());
        for &d in shape {
            h.update(&(d as u64).to_le_bytes());
        }
        h.update(&len.to_le_bytes());
    }

    /// The next piece of the current tensor's data.
    fn data(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    fn finish(self) -> String {
        self.0.finalize().to_hex().to_string()
    }
}

/// The integrity digest of spec §7.
fn digest<'a>(
    manifest: &str,
    tensors: impl Iterator<Item = (&'a str, String, &'a [usize], &'a [u8])>,
) -> String {
    let mut sorted: Vec<_> = tensors.collect();
    sorted.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut d = Digest::new(manifest);
    for (name, dtype, shape, data) in sorted {
        d.tensor(name, &dtype, shape, data.len() as u64);
        d.data(data);
    }
    d.finish()
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
    if first_overlap(adapter.layers.iter().map(|l| &l.target)).is_some()
        && !requires.iter().any(|f| f == FEATURE_STACKED_LAYERS)
    {
        requires.push(FEATURE_STACKED_LAYERS.to_string());
    }
    if adapter.layers.iter().any(|l| l.target.rows.is_some()) {
        requires.push(FEATURE_ROW_SLICES.to_string());
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

/// Why a safetensors file that looks like a `.oft` file (its tensors are named
/// `layers.<i>.…`, or its metadata has `oft.` keys) is not one: no `__metadata__` (rule 4) or no
/// `format: oft` (rule 5). `None` for files that do not look like `.oft` files at all.
pub fn not_oft_reason(path: &Path) -> Option<Error> {
    let file = MappedFile::open(path).ok()?;
    if is_oft(&file.metadata) {
        return None;
    }
    let oft_keys = file.metadata.keys().any(|k| k.starts_with("oft."));
    let st = file.tensors();
    let oft_names = st.names().iter().any(|n| n.starts_with("layers."));
    if !(oft_keys || oft_names) {
        return None;
    }
    let has_metadata = file.header().metadata().is_some();
    Some(if has_metadata {
        invalid(
            path,
            Category::NotOft,
            5,
            "its tensors are named as in a .oft file, but its metadata has no `format: oft`",
        )
    } else {
        invalid(
            path,
            Category::Container,
            4,
            "its tensors are named as in a .oft file, but it has no `__metadata__`",
        )
    })
}

/// Parse the version string `MAJOR.MINOR` (spec §8.1: decimal, no sign, no leading zeros).
fn parse_version(v: &str) -> Option<(u32, u32)> {
    let number = |s: &str| {
        let canonical = !s.is_empty()
            && s.bytes().all(|c| c.is_ascii_digit())
            && (s == "0" || !s.starts_with('0'));
        canonical.then(|| s.parse().ok()).flatten()
    };
    let (a, b) = v.split_once('.')?;
    Some((number(a)?, number(b)?))
}

/// A JSON value parsed with every object's member names checked for duplicates (spec §3: a
/// manifest with two members of one name is invalid; `serde_json::Value` keeps the last).
struct Strict(serde_json::Value);

impl<'de> serde::Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = serde_json::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> std::result::Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_i64<E>(self, v: i64) -> std::result::Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> std::result::Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E>(self, v: f64) -> std::result::Result<Self::Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, Into::into))
    }
    fn visit_str<E>(self, v: &str) -> std::result::Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_string<E>(self, v: String) -> std::result::Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_unit<E>(self) -> std::result::Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> std::result::Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(out.into())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<Self::Value, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some(k) = map.next_key::<String>()? {
            if out.contains_key(&k) {
                return Err(serde::de::Error::custom(format!("duplicate member `{k}`")));
            }
            let Strict(v) = map.next_value()?;
            out.insert(k, v);
        }
        Ok(out.into())
    }
}

/// Parse `json`, refusing duplicate member names in any object.
fn parse_strict(json: &str) -> std::result::Result<serde_json::Value, serde_json::Error> {
    serde_json::from_str::<Strict>(json).map(|s| s.0)
}

/// Read a `.oft` file; the digest is reported, not enforced (see [`read`]).
pub fn read_unverified(path: &Path) -> Result<(Adapter, DigestStatus)> {
    let file = MappedFile::open(path)?;
    read_mapped(path, &file)
}

pub(crate) fn read_mapped(path: &Path, file: &MappedFile) -> Result<(Adapter, DigestStatus)> {
    read_parsed(path, file, None).map(|(adapter, status, _)| (adapter, status))
}

/// [`read_mapped`]; with `lazy` (the file the map was made from), every stage's parameters
/// are left in the file: each `Stage::q` is empty, the returned list says where it lies, and
/// the digest is computed reading the data in pieces through `lazy` (the map's data pages are
/// never touched, so they do not become resident). Every check is the same.
fn read_parsed(
    path: &Path,
    file: &MappedFile,
    lazy: Option<&File>,
) -> Result<(Adapter, DigestStatus, Vec<Vec<StoredQ>>)> {
    let (manifest, manifest_json) = read_manifest(path, &file.metadata)?;
    let st = file.tensors();
    let header = file.header();
    let mut tensors = Referenced {
        path,
        st: &st,
        used: BTreeMap::new(),
        leave: lazy.map(|_| (&header, file.data_start())),
    };
    let (layers, stored): (Vec<Layer>, Vec<Vec<StoredQ>>) = (manifest.layers.iter().enumerate())
        .map(|(i, ls)| read_layer(&mut tensors, i, ls, &manifest.requires))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .unzip();
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

    let mut stored = stored;
    let status = match (file.metadata.get(META_DIGEST), lazy) {
        (None, _) => DigestStatus::Missing,
        (Some(stored_digest), None) => {
            let mut views: Vec<(String, TensorView<'_>)> = st.tensors();
            views.sort_by(|a, b| a.0.cmp(&b.0));
            let computed = digest(
                manifest_json,
                views
                    .iter()
                    .map(|(n, v)| (n.as_str(), dtype_name(v.dtype()), v.shape(), v.data())),
            );
            digest_status(stored_digest, computed)
        }
        (Some(stored_digest), Some(handle)) => {
            let computed = digest_read(
                path,
                handle,
                &header,
                file.data_start(),
                manifest_json,
                &mut stored,
            )?;
            digest_status(stored_digest, computed)
        }
    };
    Ok((
        Adapter {
            provenance: manifest.provenance,
            layers,
            features: manifest.requires,
        },
        status,
        stored,
    ))
}

fn digest_status(stored: &str, computed: String) -> DigestStatus {
    if computed == stored {
        DigestStatus::Ok
    } else {
        DigestStatus::Mismatch {
            stored: stored.to_string(),
            computed,
        }
    }
}

/// Bytes read at a time when a digest is computed through a file handle.
const DIGEST_PIECE: usize = 4 << 20;

/// The digest of spec §7 with the tensors' data read from `handle` in pieces (nothing held),
/// recording on the way the blake3 of each stage tensor listed in `stored`, so that its bytes
/// can be checked again when they are read for the bake.
fn digest_read(
    path: &Path,
    handle: &File,
    header: &safetensors::tensor::Metadata,
    data_start: u64,
    manifest_json: &str,
    stored: &mut [Vec<StoredQ>],
) -> Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut at: HashMap<String, (usize, usize)> = HashMap::new();
    for (i, layer) in stored.iter().enumerate() {
        for (j, q) in layer.iter().enumerate() {
            at.insert(q.name.clone(), (i, j));
        }
    }
    let mut infos: Vec<(String, &safetensors::tensor::TensorInfo)> =
        header.tensors().into_iter().collect();
    infos.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut d = Digest::new(manifest_json);
    let mut buf = vec![0u8; DIGEST_PIECE];
    let mut f = handle;
    for (name, info) in &infos {
        let (start, end) = info.data_offsets;
        let len = end.saturating_sub(start);
        d.tensor(name, &dtype_name(info.dtype), &info.shape, len as u64);
        let own_at = at.get(name.as_str()).copied();
        let mut own = own_at.map(|_| blake3::Hasher::new());
        f.seek(SeekFrom::Start(data_start + start as u64))
            .map_err(|e| Error::io(path, e))?;
        let mut left = len;
        while left > 0 {
            // Never empty while `left > 0` (`buf` holds DIGEST_PIECE bytes), so the loop ends.
            let piece = &mut buf[..left.min(DIGEST_PIECE)];
            f.read_exact(piece).map_err(|e| Error::io(path, e))?;
            d.data(piece);
            if let Some(h) = &mut own {
                h.update(piece);
            }
            left -= piece.len();
        }
        if let (Some(h), Some((i, j))) = (own, own_at)
            && let Some(q) = stored.get_mut(i).and_then(|l| l.get_mut(j))
        {
            q.blake3 = Some(h.finalize());
        }
    }
    Ok(d.finish())
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
    let value = parse_strict(manifest_json).map_err(|e| {
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
    if !value.is_object() {
        return Err(invalid(
            path,
            Category::Manifest,
            7,
            "the manifest is not a JSON object",
        ));
    }
    if let Some(um) = value
        .pointer("/provenance/user_metadata")
        .and_then(|m| m.as_object())
        && let Some((k, _)) = um.iter().find(|(_, v)| !v.is_string())
    {
        return Err(invalid(
            path,
            Category::Manifest,
            16,
            format!("provenance.user_metadata `{k}` is not a string"),
        ));
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
    check_targets(path, &manifest)?;
    Ok((manifest, manifest_json))
}

/// Spec §9.1 rules 13 and 15: the layers' targets — layers on common rows of one weight need
/// `stacked-layers`, no target name is empty, and `rows` need `row-slices` and are well formed.
fn check_targets(path: &Path, manifest: &Manifest) -> Result<()> {
    if let Some((_, dup)) = first_overlap(manifest.layers.iter().map(|l| &l.target))
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
                manifest.layers[dup].target.name
            ),
        ));
    }
    if let Some(i) = manifest
        .layers
        .iter()
        .position(|l| l.target.name.is_empty())
    {
        return Err(invalid(
            path,
            Category::Manifest,
            13,
            format!("layer {i} has an empty target name"),
        ));
    }
    if let Some(l) = manifest.layers.iter().find(|l| l.target.rows.is_some())
        && !manifest.requires.iter().any(|f| f == FEATURE_ROW_SLICES)
    {
        return Err(invalid(
            path,
            Category::Manifest,
            15,
            format!(
                "layer `{}` lists `rows` but the file does not require `{FEATURE_ROW_SLICES}`",
                l.target.name
            ),
        ));
    }
    if let Some((l, why)) = manifest
        .layers
        .iter()
        .find_map(|l| rows_problem(&l.target).map(|w| (l, w)))
    {
        return Err(invalid(
            path,
            Category::Manifest,
            15,
            format!("layer `{}`: {why}", l.target.name),
        ));
    }
    Ok(())
}

/// A tensor's values (as f64), shape and dtype.
type Values = (Vec<f64>, Vec<usize>, Dtype);

/// The tensors of a `.oft` file, and which of them the manifest referenced so far.
struct Referenced<'a> {
    path: &'a Path,
    st: &'a safetensors::SafeTensors<'a>,
    used: BTreeMap<String, ()>,
    /// Leave stage parameters in the file ([`read_parsed`]): the header and where the data
    /// section starts.
    leave: Option<(&'a safetensors::tensor::Metadata, u64)>,
}

impl Referenced<'_> {
    /// Spec §9.1 rules 20–21: the tensor `name` that `what` refers to.
    fn view(&mut self, name: &str, what: &str) -> Result<TensorView<'_>> {
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
        Ok(view)
    }

    /// [`Referenced::view`], as f64.
    fn take(&mut self, name: &str, what: &str) -> Result<Values> {
        let view = self.view(name, what)?;
        Ok((to_f64(&view, name)?, view.shape().to_vec(), view.dtype()))
    }

    /// A stage's parameters: [`Referenced::take`], or, when they are left in the file, no
    /// values and where they lie.
    fn take_q(&mut self, name: &str, what: &str) -> Result<(Values, Option<StoredQ>)> {
        let Some((header, data_start)) = self.leave else {
            return Ok((self.take(name, what)?, None));
        };
        let view = self.view(name, what)?;
        let (shape, dtype) = (view.shape().to_vec(), view.dtype());
        let (start, end) = header.info(name).map(|i| i.data_offsets).ok_or_else(|| {
            invalid(
                self.path,
                Category::Tensor,
                20,
                format!("{what} refers to tensor `{name}`, which the file does not hold"),
            )
        })?;
        let at = StoredQ {
            name: name.to_string(),
            offset: data_start + start as u64,
            len: end.saturating_sub(start),
            dtype,
            blake3: None,
        };
        Ok(((Vec::new(), shape, dtype), Some(at)))
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
) -> Result<(Layer, Vec<StoredQ>)> {
    let path = tensors.path;
    let lname = &ls.target.name;
    let mut stages = Vec::with_capacity(ls.stages.len());
    let mut left = Vec::new();
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
        let ((q, shape, dtype), at) = tensors.take_q(&ss.q, &what)?;
        left.extend(at);
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
    let layer = Layer {
        target: ls.target.clone(),
        side: ls.side,
        stages,
        row_scale,
        row_scale_f64,
        constraint: ls.constraint.clone(),
        base_binding: ls.base_binding.clone(),
    };
    Ok((layer, left))
}

/// What is wrong with a target's `rows` on its own (spec §3.4): an empty list, an empty range,
/// ranges that overlap, or (when the named weight's shape is known) a range past its rows.
pub fn rows_problem(target: &Target) -> Option<String> {
    let rows = target.rows.as_ref()?;
    if rows.is_empty() {
        return Some("`rows` is an empty list (null means every row)".into());
    }
    if let Some(r) = rows.iter().find(|r| r.len == 0) {
        return Some(format!("`rows` has an empty range [{}, 0]", r.start));
    }
    let Some(ends) = rows.iter().map(|r| r.end()).collect::<Option<Vec<u64>>>() else {
        return Some("a `rows` range ends past 2^64".into());
    };
    let mut sorted: Vec<(u64, u64)> = rows.iter().map(|r| r.start).zip(ends).collect();
    sorted.sort_unstable();
    if let Some(w) = sorted.windows(2).find(|w| w[0].1 > w[1].0) {
        return Some(format!(
            "`rows` ranges [{}, {}) and [{}, {}) overlap",
            w[0].0, w[0].1, w[1].0, w[1].1
        ));
    }
    if let Some(n) = target.shape.as_ref().and_then(|s| s.first())
        && let Some(&(a, b)) = sorted.iter().find(|r| r.1 > *n)
    {
        return Some(format!(
            "`rows` range [{a}, {b}) lies outside the {n} rows of the named weight"
        ));
    }
    None
}

/// Read a `.oft` file and refuse it if its integrity digest is missing or wrong.
pub fn read(path: &Path) -> Result<Adapter> {
    let (adapter, status) = read_unverified(path)?;
    verified(path, status)?;
    Ok(adapter)
}

/// Refuse a digest that is missing or wrong.
fn verified(path: &Path, status: DigestStatus) -> Result<()> {
    match status {
        DigestStatus::Ok => Ok(()),
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

/// [`read`], leaving every stage's parameters in the file for [`DeferredParams::load`]: the
/// returned adapter's `Stage::q` are all empty and must not be used as values. Every check of
/// [`read`] runs here, the digest reading the data in pieces (neither held nor mapped), so a
/// file `read` refuses is refused here; the bake (`crate::bake`) reads a layer's parameters
/// when it reaches that layer's tensor, so an LLM-size adapter is never in memory at once.
pub(crate) fn read_deferred(path: &Path) -> Result<(Adapter, DeferredParams)> {
    let handle = File::open(path).map_err(|e| Error::io(path, e))?;
    let mapped = MappedFile::from_file(path, &handle)?;
    let (adapter, status, layers) = read_parsed(path, &mapped, Some(&handle))?;
    verified(path, status)?;
    let params = DeferredParams {
        path: path.to_path_buf(),
        file: Mutex::new(handle),
        layers,
    };
    Ok((adapter, params))
}

/// Where one stage's parameters lie in a `.oft` file.
#[derive(Debug)]
struct StoredQ {
    /// The tensor's name.
    name: String,
    /// Absolute offset and length of its data.
    offset: u64,
    len: usize,
    dtype: Dtype,
    /// blake3 of its data as the digest check read it.
    blake3: Option<blake3::Hash>,
}

/// The stage parameters of a `.oft` file read with [`read_deferred`], left in the file (kept
/// open) until a layer is loaded. Each load checks the bytes against those the digest covered.
#[derive(Debug)]
pub struct DeferredParams {
    path: PathBuf,
    file: Mutex<File>,
    /// Per layer of the file, per stage.
    layers: Vec<Vec<StoredQ>>,
}

impl DeferredParams {
    /// Layer `index` of the file with its parameters: `skeleton` is that layer as
    /// [`read_deferred`] returned it (empty `q`).
    pub(crate) fn load(&self, index: usize, skeleton: &Layer) -> Result<Layer> {
        let internal = |m: &str| {
            Error::new(Category::Tensor, format!("internal error: {m}"))
                .at(&self.path)
                .tensor(&skeleton.target.name)
        };
        let stored = self
            .layers
            .get(index)
            .filter(|s| s.len() == skeleton.stages.len())
            .ok_or_else(|| internal("a deferred layer does not match the file it was read from"))?;
        let mut layer = skeleton.clone();
        for (stage, at) in layer.stages.iter_mut().zip(stored) {
            if !stage.q.is_empty() {
                return Err(internal("a deferred stage already holds parameters"));
            }
            let bytes = self.read(at)?;
            if at.blake3 != Some(blake3::hash(&bytes)) {
                return Err(invalid(
                    &self.path,
                    Category::Digest,
                    8,
                    format!(
                        "tensor `{}` changed after the file's integrity digest was checked",
                        at.name
                    ),
                )
                .hint("do not modify an adapter while a bake reads it; run the bake again"));
            }
            stage.q = bytes_to_f64(&bytes, at.dtype, &at.name)?;
        }
        Ok(layer)
    }

    /// The bytes of one stored tensor.
    fn read(&self, at: &StoredQ) -> Result<Vec<u8>> {
        use std::io::{Read, Seek, SeekFrom};
        let mut file = self.file.lock().map_err(|_| {
            Error::new(
                Category::Io,
                "internal error: a thread reading the adapter failed",
            )
            .at(&self.path)
        })?;
        let mut bytes = vec![0u8; at.len];
        file.seek(SeekFrom::Start(at.offset))
            .and_then(|_| file.read_exact(&mut bytes))
            .map_err(|e| Error::io(&self.path, e))?;
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adapter(rows: Option<Vec<RowRange>>) -> Adapter {
        let q = vec![0.25; 2];
        Adapter {
            provenance: Provenance {
                source_format: "oft".into(),
                tool: tool_name(),
                ..Provenance::default()
            },
            layers: vec![Layer {
                target: Target {
                    name: "final_layer.adaLN_modulation.1".into(),
                    convention: "unknown".into(),
                    component: None,
                    module: ModuleKind::Linear,
                    shape: Some(vec![8, 3]),
                    rotated_dim: Some(4),
                    rows,
                },
                side: Side::Output,
                stages: vec![Stage {
                    spec: StageSpec {
                        blocks: Some(2),
                        block_size: 2,
                        shared: false,
                        wiring: Wiring::Identity,
                        map: RotationMap::Cayley,
                        q: String::new(),
                        truncated: false,
                    },
                    q,
                    q_f64: false,
                    inverse: false,
                }],
                row_scale: None,
                row_scale_f64: false,
                constraint: None,
                base_binding: None,
            }],
            features: Vec::new(),
        }
    }

    #[test]
    fn rows_are_written_as_format_1_2_and_read_back() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("a.oft");
        let rows = vec![RowRange { start: 6, len: 2 }, RowRange { start: 0, len: 2 }];
        let a = adapter(Some(rows.clone()));
        write(&a, &path).unwrap();
        let f = MappedFile::open(&path).unwrap();
        assert_eq!(f.metadata[META_VERSION], "1.2");
        assert!(f.metadata[META_MANIFEST].contains(r#""rows":[[6,2],[0,2]]"#));
        let back = read(&path).unwrap();
        assert_eq!(back.layers[0].target.rows, Some(rows));
        assert_eq!(back.features, [FEATURE_ROW_SLICES]);
        // Without rows: 1.0, and no `rows` member.
        write(&adapter(None), &path).unwrap();
        let f = MappedFile::open(&path).unwrap();
        assert_eq!(f.metadata[META_VERSION], "1.0");
        assert!(!f.metadata[META_MANIFEST].contains("rows"));
    }

    #[test]
    fn rows_problems() {
        let mut t = adapter(None).layers[0].target.clone();
        let r = |v: &[(u64, u64)]| {
            Some(
                v.iter()
                    .map(|&(start, len)| RowRange { start, len })
                    .collect(),
            )
        };
        for (rows, want) in [
            (r(&[]), "empty list"),
            (r(&[(0, 0)]), "empty range"),
            (r(&[(0, 4), (3, 2)]), "overlap"),
            (r(&[(6, 4)]), "outside the 8 rows"),
            (r(&[(u64::MAX, 2)]), "past 2^64"),
        ] {
            t.rows = rows;
            let p = rows_problem(&t).unwrap_or_default();
            assert!(p.contains(want), "{p}");
        }
        t.rows = r(&[(4, 4), (0, 4)]);
        assert_eq!(rows_problem(&t), None);
    }
}
