//! Safetensors access: memory-mapped reading, dtype conversion to f64 and back, atomic writing.

use crate::error::{Category, Error, Result};
use memmap2::Mmap;
use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, Metadata, TensorView};
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::Path;

/// A memory-mapped safetensors file whose header has been parsed and checked.
pub struct MappedFile {
    mmap: Mmap,
    pub metadata: HashMap<String, String>,
}

impl MappedFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        Self::from_file(path, &file)
    }

    /// [`MappedFile::open`] on a file already open (`path` names it in errors).
    pub fn from_file(path: &Path, file: &File) -> Result<Self> {
        // SAFETY: the mapping is read-only; a file truncated underneath us is reported by the
        // safetensors offset checks at parse time (later truncation is documented in SECURITY.md).
        let mmap = unsafe { Mmap::map(file) }.map_err(|e| Error::io(path, e))?;
        let (_, meta) = SafeTensors::read_metadata(&mmap)
            .map_err(|e| container(path, describe_st_error(&e)).rule(st_error_rule(&e)))?;
        // Parse the whole file once so every offset is checked before anyone reads a tensor.
        SafeTensors::deserialize(&mmap)
            .map_err(|e| container(path, describe_st_error(&e)).rule(st_error_rule(&e)))?;
        // serde keeps the last of duplicated JSON keys silently; a header that names a tensor
        // twice is ambiguous (two readers may disagree on which one is meant).
        let n = u64::from_le_bytes(mmap[..8].try_into().unwrap_or([0; 8])) as usize;
        if let Some(dup) = duplicate_key(&mmap[8..8 + n]) {
            return Err(container(path, format!("the header names `{dup}` twice")).rule(2));
        }
        let metadata = meta.metadata().clone().unwrap_or_default();
        Ok(MappedFile { mmap, metadata })
    }

    /// Absolute file offset where the data section (tensor offset 0) starts.
    pub fn data_start(&self) -> u64 {
        let n = u64::from_le_bytes(self.mmap[..8].try_into().unwrap_or([0; 8]));
        8 + n
    }

    /// Tell the kernel we read front to back (bigger read-ahead).
    pub fn advise_sequential(&self) {
        #[cfg(unix)]
        let _ = self.mmap.advise(memmap2::Advice::Sequential);
    }

    pub fn tensors(&self) -> SafeTensors<'_> {
        // ok: deserialize succeeded on the same bytes in `open`.
        SafeTensors::deserialize(&self.mmap).expect("header validated in open")
    }

    pub fn header(&self) -> Metadata {
        // ok: read_metadata succeeded on the same bytes in `open`.
        SafeTensors::read_metadata(&self.mmap)
            .expect("header validated in open")
            .1
    }
}

/// Not a readable safetensors file.
fn container(path: &Path, detail: String) -> Error {
    Error::new(
        Category::Container,
        format!("not a valid safetensors file: {detail}"),
    )
    .at(path)
}

/// The rule of spec §9.1 a safetensors error breaks: 1 (not a header), 2 (tensor entries and
/// data), 3 (header too large), 4 (`__metadata__` values not strings).
fn st_error_rule(e: &safetensors::SafeTensorError) -> u8 {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooSmall | E::InvalidHeaderLength | E::InvalidHeader(_) => 1,
        E::HeaderTooLarge => 3,
        E::InvalidHeaderDeserialization(m) => {
            let m = m.to_string();
            if m.contains("missing field") || m.contains("unknown variant") {
                2
            } else if m.contains("expected a string") {
                4
            } else {
                1
            }
        }
        _ => 2,
    }
}

fn describe_st_error(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooSmall => "the file is too short to hold a safetensors header".into(),
        E::HeaderTooLarge => "the header length is larger than the 100 MB cap".into(),
        E::InvalidHeaderLength => {
            "the header length runs past the end of the file (truncated?)".into()
        }
        E::InvalidHeader(_) => "the header is not valid UTF-8".into(),
        E::InvalidHeaderDeserialization(m) => format!("the header is not valid JSON: {m}"),
        E::InvalidOffset(name) => format!(
            "tensor `{name}` has offsets that overlap, leave gaps or run past the end of the file"
        ),
        E::MetadataIncompleteBuffer => {
            "the data section is shorter than the header says (truncated file?)".into()
        }
        E::TensorInvalidInfo => "a tensor's offsets do not match its dtype and shape".into(),
        E::ValidationOverflow => "a tensor's shape overflows".into(),
        other => other.to_string(),
    }
}

/// The first top-level key a JSON object repeats (also inside `__metadata__`), if any.
fn duplicate_key(header: &[u8]) -> Option<String> {
    use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
    struct Keys;
    impl<'de> Visitor<'de> for Keys {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut seen = std::collections::HashSet::new();
            let mut dup = None;
            while let Some(k) = map.next_key::<String>()? {
                if k == "__metadata__" {
                    let inner: std::collections::HashMap<String, String> = map.next_value()?;
                    let _ = inner;
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
                if !seen.insert(k.clone()) && dup.is_none() {
                    dup = Some(k);
                }
            }
            Ok(dup)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(header);
    de.deserialize_map(Keys).ok().flatten()
}

/// Decode a tensor's elements to f64. Refuses dtypes an adapter or weight never uses.
pub fn to_f64(view: &TensorView<'_>, what: &str) -> Result<Vec<f64>> {
    bytes_to_f64(view.data(), view.dtype(), what)
}

/// Decode little-endian elements of `dtype` to f64 (`what` names the tensor in errors).
pub fn bytes_to_f64(d: &[u8], dtype: Dtype, what: &str) -> Result<Vec<f64>> {
    Ok(match dtype {
        Dtype::F64 => d
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect(),
        Dtype::F32 => d
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap_or([0; 4])) as f64)
            .collect(),
        Dtype::F16 => d
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        Dtype::BF16 => d
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        Dtype::BOOL | Dtype::U8 => d.iter().map(|&b| b as f64).collect(),
        other => {
            return Err(Error::new(
                Category::Tensor,
                format!("dtype {other:?} is not a floating-point dtype"),
            )
            .tensor(what));
        }
    })
}

/// Encode f64 values in a floating dtype, rounding to nearest even.
pub fn from_f64(values: &[f64], dtype: Dtype) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(values.len() * dtype.bitsize() / 8);
    match dtype {
        Dtype::F64 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        Dtype::F32 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&(*v as f32).to_le_bytes())),
        Dtype::F16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&half::f16::from_f64(*v).to_le_bytes())),
        Dtype::BF16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&half::bf16::from_f64(*v).to_le_bytes())),
        other => {
            return Err(Error::new(
                Category::Unsupported,
                format!(
                    "cannot write dtype {other:?}: only F64, F32, F16 and BF16 weights are supported"
                ),
            ));
        }
    }
    Ok(out)
}

/// A safetensors header for tensors at the given offsets: the crate's own header type,
/// re-encoded through `serde_json` (whose maps are sorted, so the bytes are deterministic —
/// the crate writes `__metadata__` in `HashMap` order), padded to 8 bytes, length-prefixed.
pub fn encode_header(
    metadata: HashMap<String, String>,
    tensors: Vec<(String, safetensors::tensor::TensorInfo)>,
) -> Result<Vec<u8>> {
    let md = Metadata::new(Some(metadata), tensors)
        .map_err(|e| internal(format!("inconsistent tensor layout: {e}")))?;
    let value = serde_json::to_value(&md)
        .map_err(|e| internal(format!("cannot encode the header: {e}")))?;
    let mut json = serde_json::to_vec(&value)
        .map_err(|e| internal(format!("cannot encode the header: {e}")))?;
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    Ok(out)
}

/// A tensor ready to be written: name, dtype, shape, little-endian bytes.
#[derive(Debug, Clone)]
pub struct OwnedTensor {
    /// Its name in the file.
    pub name: String,
    /// Its element type.
    pub dtype: Dtype,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its elements, little-endian, `∏shape · size(dtype)` bytes.
    pub bytes: Vec<u8>,
}

impl OwnedTensor {
    /// Encode f64 `values` in `dtype`.
    pub fn new(name: String, dtype: Dtype, shape: Vec<usize>, values: &[f64]) -> Result<Self> {
        Ok(OwnedTensor {
            bytes: from_f64(values, dtype)?,
            name,
            dtype,
            shape,
        })
    }
}

/// [`write_safetensors`] for owned tensors.
pub fn write_owned(
    w: &mut impl Write,
    tensors: &[OwnedTensor],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let views: Vec<(&str, Dtype, &[usize], &[u8])> = tensors
        .iter()
        .map(|t| {
            (
                t.name.as_str(),
                t.dtype,
                t.shape.as_slice(),
                t.bytes.as_slice(),
            )
        })
        .collect();
    write_safetensors(w, &views, metadata)
}

/// Write a safetensors file of `(name, dtype, shape, bytes)` tensors, deterministically: tensors
/// ordered by decreasing dtype alignment, then name (as the crate does), header keys sorted.
pub fn write_safetensors(
    w: &mut impl Write,
    tensors: &[(&str, Dtype, &[usize], &[u8])],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by(|&a, &b| {
        tensors[b]
            .1
            .cmp(&tensors[a].1)
            .then_with(|| tensors[a].0.cmp(tensors[b].0))
    });
    let mut offset = 0;
    let mut infos = Vec::with_capacity(tensors.len());
    for &i in &order {
        let (name, dtype, shape, bytes) = tensors[i];
        let expected = shape.iter().product::<usize>() * dtype.bitsize() / 8;
        if bytes.len() != expected {
            return Err(Error::new(
                Category::Tensor,
                format!("{} bytes for shape {shape:?} of {dtype:?}", bytes.len()),
            )
            .tensor(name));
        }
        infos.push((
            name.to_string(),
            safetensors::tensor::TensorInfo {
                dtype,
                shape: shape.to_vec(),
                data_offsets: (offset, offset + bytes.len()),
            },
        ));
        offset += bytes.len();
    }
    let header = encode_header(metadata, infos)?;
    // The caller names the file (see `Error::or_at`).
    let io = |e: std::io::Error| Error::new(Category::Io, format!("cannot write: {e}"));
    w.write_all(&header).map_err(io)?;
    for &i in &order {
        w.write_all(tensors[i].3).map_err(io)?;
    }
    Ok(())
}

/// Prefix of this process's temporary outputs: `.oftool-tmp-<pid>-`. A run that is killed
/// (kill -9, power loss) leaves its temporary file or folder behind under that name; the next
/// run writing to the same folder removes those whose process is gone ([`clean_stale`]).
pub fn staging_prefix() -> String {
    format!("{STAGING}{}-", std::process::id())
}

const STAGING: &str = ".oftool-tmp-";

/// Remove temporary outputs in `dir` left by oftool processes that no longer run. Entries of
/// live processes (another oftool writing there now) are left alone.
pub fn clean_stale(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(STAGING)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        if pid <= 0 || pid as u32 == std::process::id() || process_alive(pid) {
            continue;
        }
        let path = e.path();
        let _ = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
    }
}

#[cfg(unix)]
fn process_alive(pid: i32) -> bool {
    // kill(pid, 0) checks existence without signalling; EPERM still means it exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(not(unix))]
fn process_alive(_: i32) -> bool {
    true
}

/// Write `path` atomically: the bytes go to a temporary file in the same directory, which is
/// synced and renamed into place only when complete. A failure leaves nothing at `path`.
pub fn atomic_write(path: &Path, write: impl FnOnce(&mut File) -> Result<()>) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    clean_stale(dir);
    let mut tmp = tempfile::Builder::new()
        .prefix(&staging_prefix())
        .tempfile_in(dir)
        .map_err(|e| Error::io(dir, e))?;
    write(tmp.as_file_mut()).map_err(|e| e.or_at(path))?;
    tmp.as_file_mut().flush().map_err(|e| Error::io(path, e))?;
    tmp.as_file().sync_all().map_err(|e| Error::io(path, e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// An error that cannot come from a user's input (a broken invariant of our own).
fn internal(message: String) -> Error {
    Error::new(Category::Unsupported, format!("internal error: {message}"))
}
