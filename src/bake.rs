//! `oftool merge`: bake adapters into a base checkpoint, streaming.
//!
//! The base is memory-mapped and read once in file order; untouched tensors are copied byte
//! for byte, adapted ones are rotated (R in f64; the weight in f64 for F32/F64 bases, f32 for
//! F16/BF16 bases, one rounding at the end) while a writer thread writes the previous piece.
//! At most a few tensors are in memory at once. Output goes to a temporary file (or folder)
//! beside OUT, synced and renamed into place only when complete.

use crate::apply::Real;
use crate::convert::refuse_overwriting_input;
use crate::error::{Category, Error, Result};
use crate::layouts;
use crate::model::{Adapter, Layer};
use crate::resolve::{AliasTable, Resolved};
use crate::strength::{BlendMode, parse_adapter_arg};
use crate::tensors::MappedFile;
use safetensors::tensor::{Dtype, TensorInfo};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;
use std::time::Instant;

#[derive(Debug, Clone, Default)]
pub struct MergeOptions {
    /// Worker threads for the rotation (default: all cores). Output does not depend on it.
    pub threads: Option<usize>,
    /// Skip adapter layers whose target the base lacks instead of failing.
    pub skip_missing: bool,
    /// Bake even where base-binding hashes do not match.
    pub force: bool,
    /// Draw a progress bar on stderr (only when it is a terminal).
    pub progress: bool,
}

#[derive(Debug, Serialize)]
pub struct MergeSummary {
    pub base: String,
    pub output: String,
    pub adapters: Vec<String>,
    pub files_written: usize,
    pub tensors: usize,
    pub tensors_rotated: usize,
    pub layers_baked: usize,
    pub layers_skipped: Vec<String>,
    pub bytes_written: u64,
    pub seconds: f64,
    pub peak_rss_bytes: Option<u64>,
}

/// One adapter layer applied to one base tensor (optionally to a row slice of it).
struct Edit<'a> {
    layer: &'a Layer,
    rows: Option<(usize, usize)>,
    blend: crate::apply::Blend,
}

/// One safetensors file of the base and the edits for its tensors.
struct FileJob<'a> {
    input: PathBuf,
    /// Path relative to the output root (a file name for single-file bases).
    relative: PathBuf,
    edits: BTreeMap<String, Vec<Edit<'a>>>,
}

/// What the base is: a file, a sharded checkpoint, or a diffusers pipeline folder.
enum BaseKind {
    Single(PathBuf),
    /// Index file; shards are beside it.
    Sharded(PathBuf),
    /// Pipeline root and its components (subfolder name → its safetensors files).
    Diffusers(PathBuf, Vec<(String, Vec<PathBuf>)>),
}

fn list_dir(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    v.sort();
    Ok(v)
}

fn is_index(p: &Path) -> bool {
    p.to_string_lossy().ends_with(".safetensors.index.json")
}

fn is_safetensors(p: &Path) -> bool {
    p.extension().is_some_and(|e| e == "safetensors")
}

/// The safetensors files of a model folder: its shards when it has an index, else its files.
fn model_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = list_dir(dir)?;
    if let Some(index) = entries.iter().find(|p| is_index(p)) {
        return shard_files(index);
    }
    Ok(entries.into_iter().filter(|p| is_safetensors(p)).collect())
}

fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(index, format!("not valid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::format(index, "no `weight_map` object"))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = Vec::new();
    for f in map.values() {
        let name = f
            .as_str()
            .filter(|n| !n.contains('/') && !n.contains('\\') && *n != ".." && !n.is_empty())
            .ok_or_else(|| {
                Error::format(index, format!("shard name {f} is not a plain file name"))
            })?;
        let p = dir.join(name);
        if !files.contains(&p) {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

use crate::layouts::names::COMPONENTS;

fn classify_base(base: &Path) -> Result<BaseKind> {
    if !base.exists() {
        return Err(Error::io(
            base,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
        ));
    }
    if base.is_file() {
        return Ok(if is_index(base) {
            BaseKind::Sharded(base.to_path_buf())
        } else {
            BaseKind::Single(base.to_path_buf())
        });
    }
    let entries = list_dir(base)?;
    let indexes: Vec<&PathBuf> = entries.iter().filter(|p| is_index(p)).collect();
    if indexes.len() == 1 {
        return Ok(BaseKind::Sharded(indexes[0].clone()));
    }
    let mut comps = Vec::new();
    for c in COMPONENTS {
        let d = base.join(c);
        if d.is_dir() {
            let files = model_files(&d)?;
            if !files.is_empty() {
                comps.push((c.to_string(), files));
            }
        }
    }
    if !comps.is_empty() {
        return Ok(BaseKind::Diffusers(base.to_path_buf(), comps));
    }
    let st: Vec<&PathBuf> = entries.iter().filter(|p| is_safetensors(p)).collect();
    match st.as_slice() {
        [one] => Ok(BaseKind::Single((*one).clone())),
        _ => Err(Error::usage(format!(
            "{}: not a checkpoint oftool understands (a .safetensors file, a sharded folder with a \
             *.safetensors.index.json, or a diffusers folder with unet/, text_encoder/, … subfolders)",
            base.display()
        ))),
    }
}

/// A group of base files that share one alias table (one model or pipeline component).
struct Group {
    component: Option<String>,
    files: Vec<(PathBuf, PathBuf)>, // (input, output relative path)
    table: AliasTable,
    key_file: HashMap<String, usize>,
    shapes: HashMap<String, (Vec<usize>, Dtype)>,
}

fn build_group(component: Option<String>, files: Vec<(PathBuf, PathBuf)>) -> Result<Group> {
    let mut key_file = HashMap::new();
    let mut shapes = HashMap::new();
    for (i, (path, _)) in files.iter().enumerate() {
        let f = MappedFile::open(path)?;
        for (name, info) in f.header().tensors() {
            shapes.insert(name.clone(), (info.shape.clone(), info.dtype));
            key_file.insert(name, i);
        }
    }
    let table =
        AliasTable::with_shapes(shapes.iter().map(|(k, (s, _))| (k.as_str(), s.as_slice())));
    Ok(Group {
        component,
        files,
        table,
        key_file,
        shapes,
    })
}

fn groups_for(kind: &BaseKind) -> Result<Vec<Group>> {
    let rel = |p: &Path, root: &Path| {
        p.strip_prefix(root)
            .map(Path::to_path_buf)
            .unwrap_or_else(|_| p.to_path_buf())
    };
    match kind {
        BaseKind::Single(p) => Ok(vec![build_group(
            None,
            vec![(p.clone(), PathBuf::from(p.file_name().unwrap_or_default()))],
        )?]),
        BaseKind::Sharded(index) => {
            let dir = index.parent().unwrap_or(Path::new(".")).to_path_buf();
            let files = shard_files(index)?.into_iter().map(|p| {
                let r = rel(&p, &dir);
                (p, r)
            });
            Ok(vec![build_group(None, files.collect())?])
        }
        BaseKind::Diffusers(root, comps) => comps
            .iter()
            .map(|(c, files)| {
                build_group(
                    Some(c.clone()),
                    files.iter().map(|p| (p.clone(), rel(p, root))).collect(),
                )
            })
            .collect(),
    }
}

/// Peak resident memory of this process, from /proc (Linux only).
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Where each adapter layer lands: (adapter index, layer) → (group, key, rows).
struct Placement<'a> {
    group: usize,
    key: String,
    edit: Edit<'a>,
}

fn place<'a>(
    adapters: &'a [BakeInput],
    groups: &[Group],
    opts: &MergeOptions,
) -> Result<(Vec<Placement<'a>>, Vec<String>)> {
    let mut placements = Vec::new();
    let mut missing = Vec::new();
    let mut problems = Vec::new();
    for input in adapters {
        let (path, adapter) = (&input.label, &input.adapter);
        for layer in &adapter.layers {
            let name = &layer.target.name;
            let candidates: Vec<usize> = (0..groups.len())
                .filter(|&g| match (&layer.target.component, &groups[g].component) {
                    (Some(a), Some(b)) => {
                        a == b || !groups.iter().any(|x| x.component.as_ref() == Some(a))
                    }
                    _ => true,
                })
                .collect();
            let mut hits: Vec<(usize, Resolved)> = Vec::new();
            let mut ambiguous = Vec::new();
            for g in candidates {
                match groups[g].table.resolve(&layer.target) {
                    Ok(r) => hits.push((g, r)),
                    Err(c) if !c.is_empty() => ambiguous.extend(c),
                    Err(_) => {}
                }
            }
            if !ambiguous.is_empty() || hits.len() > 1 {
                let mut keys: Vec<String> = hits.iter().map(|(_, r)| r.key.clone()).collect();
                keys.extend(ambiguous);
                problems.push((
                    Category::TargetAmbiguous,
                    format!(
                        "`{name}` ({}) matches several tensors: {}",
                        path,
                        keys.join(", ")
                    ),
                ));
                continue;
            }
            let Some((g, r)) = hits.pop() else {
                missing.push(format!("{name} ({})", path));
                continue;
            };
            // Shape check from the header before anything is written.
            let (shape, dtype) = &groups[g].shapes[&r.key];
            if !matches!(dtype, Dtype::F64 | Dtype::F32 | Dtype::F16 | Dtype::BF16) {
                problems.push((Category::TargetShape, format!(
                    "`{}` has dtype {dtype:?}; only F64, F32, F16 and BF16 weights can be rotated",
                    r.key
                )));
                continue;
            }
            let rows_total = shape.first().copied().unwrap_or(0);
            let cols: usize = shape.iter().skip(1).product();
            let rows = match r.rows {
                Some((start, len)) if start + len <= rows_total => len,
                Some((start, len)) => {
                    problems.push((
                        Category::TargetShape,
                        format!(
                            "`{}` rows {start}..{} are outside its {rows_total} rows",
                            r.key,
                            start + len
                        ),
                    ));
                    continue;
                }
                None => rows_total,
            };
            if shape.len() < 2 {
                problems.push((
                    Category::TargetShape,
                    format!("`{}` has shape {shape:?}, not a weight matrix", r.key),
                ));
                continue;
            }
            if let Err(e) = crate::apply::check_fits(layer, rows, cols) {
                problems.push((
                    e.category(),
                    format!("{e} (base tensor `{}` of shape {shape:?})", r.key),
                ));
                continue;
            }
            placements.push(Placement {
                group: g,
                key: r.key,
                edit: Edit {
                    layer,
                    rows: r.rows,
                    blend: match input.runtime_strength {
                        Some(st) => input.mode.layer_blend(layer, st),
                        None => crate::apply::Blend::default(),
                    },
                },
            });
        }
    }
    if !missing.is_empty() && !opts.skip_missing {
        problems.push((Category::TargetMissing, format!(
            "{} adapter layer(s) have no target in the base (use --skip-missing to bake the rest): {}",
            missing.len(),
            missing.join(", ")
        )));
    }
    if let Some((category, _)) = problems.first() {
        let text: Vec<&str> = problems.iter().map(|(_, m)| m.as_str()).collect();
        return Err(Error::new(
            *category,
            format!("cannot bake: {}", text.join("; ")),
        ));
    }
    Ok((placements, missing))
}

/// Check base-binding hashes of every bound layer before anything is written.
fn check_bindings(placements: &[Placement<'_>], groups: &[Group]) -> Result<()> {
    let mut bad = Vec::new();
    let mut open: HashMap<PathBuf, MappedFile> = HashMap::new();
    for p in placements {
        let Some(bind) = &p.edit.layer.base_binding else {
            continue;
        };
        let g = &groups[p.group];
        let path = &g.files[g.key_file[&p.key]].0;
        if !open.contains_key(path) {
            open.insert(path.clone(), MappedFile::open(path)?);
        }
        let f = &open[path];
        let st = f.tensors();
        let view = st
            .tensor(&p.key)
            .map_err(|e| Error::format(path, e.to_string()))?;
        let hash = blake3::hash(view.data()).to_hex().to_string();
        let dtype = format!("{:?}", view.dtype());
        let shape: Vec<u64> = view.shape().iter().map(|&d| d as u64).collect();
        if hash != bind.blake3 || dtype != bind.dtype || shape != bind.shape {
            bad.push(p.edit.layer.target.name.clone());
        }
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(Error::new(
            Category::Binding,
            format!(
                "the base is not the one these adapter layers were made for (binding hash mismatch): {}",
                bad.join(", ")
            ),
        )
        .hint("--force bakes anyway"))
    }
}

/// Size of each write() of computed bytes.
const WRITE_PIECE: usize = 256 << 10;
/// Pieces queued for the writer: enough that rotation and writing overlap.
const WRITER_QUEUE: usize = 6;

#[cfg(target_endian = "big")]
compile_error!("oftool reads and writes little-endian tensor data in place");

/// A piece of output data: a byte range of the base copied as is, or computed bytes.
enum Piece {
    /// `len` bytes at absolute `offset` of the base file (copied in the kernel where possible).
    Range {
        offset: u64,
        len: u64,
    },
    Bytes(Vec<u8>),
    F16(Vec<half::f16>),
    Bf16(Vec<half::bf16>),
}

impl Piece {
    /// The computed bytes (empty for a range).
    fn bytes(&self) -> &[u8] {
        match self {
            Piece::Range { .. } => &[],
            Piece::Bytes(v) => v,
            Piece::F16(v) => bytemuck::cast_slice(v),
            Piece::Bf16(v) => bytemuck::cast_slice(v),
        }
    }
}

/// The 16-bit float types a base may hold: slice conversions (SIMD where the CPU has them)
/// and how a finished tensor is handed to the writer.
trait Half: bytemuck::Pod + Default + Send + Sync {
    fn to_f32s(h: &[Self], out: &mut [f32]);
    fn from_f32s(v: &[f32], out: &mut [Self]);
    fn finite(&self) -> bool;
    fn piece(v: Vec<Self>) -> Piece;
}

impl Half for half::f16 {
    fn to_f32s(h: &[Self], out: &mut [f32]) {
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(h, out)
    }
    fn from_f32s(v: &[f32], out: &mut [Self]) {
        half::slice::HalfFloatSliceExt::convert_from_f32_slice(out, v)
    }
    fn finite(&self) -> bool {
        self.is_finite()
    }
    fn piece(v: Vec<Self>) -> Piece {
        Piece::F16(v)
    }
}

impl Half for half::bf16 {
    fn to_f32s(h: &[Self], out: &mut [f32]) {
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(h, out)
    }
    fn from_f32s(v: &[f32], out: &mut [Self]) {
        half::slice::HalfFloatSliceExt::convert_from_f32_slice(out, v)
    }
    fn finite(&self) -> bool {
        self.is_finite()
    }
    fn piece(v: Vec<Self>) -> Piece {
        Piece::Bf16(v)
    }
}

/// View little-endian bytes as 16-bit floats, copying only if they are misaligned.
fn as_halves<H: Half>(bytes: &[u8]) -> std::borrow::Cow<'_, [H]> {
    match bytemuck::try_cast_slice::<u8, H>(bytes) {
        Ok(h) => std::borrow::Cow::Borrowed(h),
        Err(_) => std::borrow::Cow::Owned(bytemuck::pod_collect_to_vec::<u8, H>(bytes)),
    }
}

/// Decode 16-bit floats to f32, in parallel.
fn halves_to_f32<H: Half>(bytes: &[u8]) -> Vec<f32> {
    use rayon::prelude::*;
    let h = as_halves::<H>(bytes);
    let mut out = vec![0f32; h.len()];
    out.par_chunks_mut(CONVERT_CHUNK)
        .zip(h.par_chunks(CONVERT_CHUNK))
        .for_each(|(o, i)| H::to_f32s(i, o));
    out
}

/// Round f32 to the 16-bit type once, in parallel; fail on a NaN or infinity (from the
/// rotation, or an overflow of the rounding).
fn f32_to_piece<H: Half>(key: &str, data: &[f32], dtype: Dtype) -> Result<Piece> {
    use rayon::prelude::*;
    let mut out = vec![H::default(); data.len()];
    out.par_chunks_mut(CONVERT_CHUNK)
        .zip(data.par_chunks(CONVERT_CHUNK))
        .for_each(|(o, i)| H::from_f32s(i, o));
    match first_where(&out, |x| !x.finite()) {
        Some(i) => Err(overflow(key, i, dtype)),
        None => Ok(H::piece(out)),
    }
}

/// Index of the first element matching `pred`, scanning chunks in parallel (a branch-free
/// pass per chunk; the position is looked up only in a chunk that has a match).
fn first_where<X: Sync>(data: &[X], pred: impl Fn(&X) -> bool + Sync) -> Option<usize> {
    use rayon::prelude::*;
    data.par_chunks(CONVERT_CHUNK)
        .enumerate()
        .filter(|(_, chunk)| chunk.iter().fold(false, |acc, x| acc | pred(x)))
        .filter_map(|(c, chunk)| chunk.iter().position(&pred).map(|p| c * CONVERT_CHUNK + p))
        .min()
}

/// Elements per unit of parallel dtype conversion.
const CONVERT_CHUNK: usize = 1 << 16;

/// Apply a tensor's edits in place (each on its row slice).
fn apply_edits<T: Real>(
    key: &str,
    data: &mut [T],
    shape: &[usize],
    edits: &[Edit<'_>],
) -> Result<()> {
    let cols: usize = shape.iter().skip(1).product();
    let rows = shape.first().copied().unwrap_or(0);
    for e in edits {
        let (start, len) = e.rows.unwrap_or((0, rows));
        crate::apply::apply_layer_blended(
            e.layer,
            &mut data[start * cols..(start + len) * cols],
            len,
            cols,
            e.blend,
        )
        .map_err(|err| err.tensor(key))?;
    }
    Ok(())
}

/// Fail if a computed value is not finite.
fn check_finite<T: Real>(key: &str, data: &[T]) -> Result<()> {
    if let Some(i) = first_where(data, |v| !v.to_f64().is_finite()) {
        return Err(Error::new(
            Category::NonFinite,
            format!("the merged value at element {i} is not finite"),
        )
        .tensor(key));
    }
    Ok(())
}

fn overflow(key: &str, i: usize, dtype: Dtype) -> Error {
    Error::new(
        Category::NonFinite,
        format!("the merged value at element {i} overflows {dtype:?}"),
    )
    .tensor(key)
}

/// A tensor decoded into its compute type: F16/BF16 in f32, F32/F64 in f64 — or, for a
/// 16-bit tensor whose edits all rotate whole rows on the input side, its raw bytes, which
/// [`fused_input`] converts chunk by chunk.
enum Decoded {
    F32(Vec<f32>),
    F64(Vec<f64>),
    Raw(Vec<u8>),
}

/// Whether a tensor's edits can run fused (decode, rotate and encode per chunk of rows).
fn fusable(dtype: Dtype, edits: &[Edit<'_>]) -> bool {
    matches!(dtype, Dtype::F16 | Dtype::BF16)
        && edits.iter().all(|e| {
            e.rows.is_none()
                && e.layer.side == crate::model::Side::Input
                && e.blend.linear.is_none()
        })
}

/// Input-side rotation of a 16-bit tensor in one pass over chunks of rows: each chunk is
/// widened to f32, rotated by every edit and rounded back, so no tensor-sized f32 copy exists.
/// Chunks are the rows [`crate::apply::INPUT_CHUNK_ROWS`] apart that the general path uses,
/// so results are bit-identical to it.
fn fused_input<H: Half>(
    key: &str,
    bytes: &[u8],
    dtype: Dtype,
    shape: &[usize],
    edits: &[Edit<'_>],
) -> Result<Piece> {
    use crate::apply::{INPUT_CHUNK_ROWS, PreparedStage, check_fits};
    use rayon::prelude::*;
    let rows = shape.first().copied().unwrap_or(0);
    let cols: usize = shape.iter().skip(1).product();
    let mut prepared = Vec::with_capacity(edits.len());
    for e in edits {
        check_fits(e.layer, rows, cols).map_err(|err| err.tensor(key))?;
        let stages = e
            .layer
            .stages
            .iter()
            .map(|st| PreparedStage::<f32>::with_blend(st, cols, e.blend.interpolate))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|err| err.tensor(key))?;
        prepared.push((
            stages,
            e.layer.row_scale.as_ref().map(|(_, v)| v.as_slice()),
        ));
    }
    let input = as_halves::<H>(bytes);
    let mut out = vec![H::default(); input.len()];
    let chunk = INPUT_CHUNK_ROWS * cols.max(1);
    out.par_chunks_mut(chunk)
        .zip(input.par_chunks(chunk))
        .enumerate()
        .for_each(|(c, (o, i))| {
            let mut buf = vec![0f32; i.len()];
            H::to_f32s(i, &mut buf);
            for (stages, scale) in &prepared {
                for st in stages {
                    st.apply(crate::model::Side::Input, &mut buf, cols);
                }
                if let Some(s) = scale {
                    for (r, row) in buf.chunks_exact_mut(cols).enumerate() {
                        let f = s[c * INPUT_CHUNK_ROWS + r] as f32;
                        row.iter_mut().for_each(|x| *x *= f);
                    }
                }
            }
            H::from_f32s(&buf, o);
        });
    match first_where(&out, |x| !x.finite()) {
        Some(i) => Err(overflow(key, i, dtype)),
        None => Ok(H::piece(out)),
    }
}

fn decode(bytes: &[u8], dtype: Dtype) -> Decoded {
    match dtype {
        Dtype::F16 => Decoded::F32(halves_to_f32::<half::f16>(bytes)),
        Dtype::BF16 => Decoded::F32(halves_to_f32::<half::bf16>(bytes)),
        Dtype::F32 => Decoded::F64(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
                .collect(),
        ),
        _ => Decoded::F64(
            bytes
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect(),
        ),
    }
}

/// Apply the edits to a decoded tensor and round once to the base dtype.
fn finish(
    key: &str,
    decoded: Decoded,
    dtype: Dtype,
    shape: &[usize],
    edits: &[Edit<'_>],
) -> Result<Piece> {
    match (decoded, dtype) {
        (Decoded::Raw(bytes), Dtype::F16) => {
            fused_input::<half::f16>(key, &bytes, dtype, shape, edits)
        }
        (Decoded::Raw(bytes), _) => fused_input::<half::bf16>(key, &bytes, dtype, shape, edits),
        (Decoded::F32(mut data), _) => {
            apply_edits(key, &mut data, shape, edits)?;
            match dtype {
                Dtype::F16 => f32_to_piece::<half::f16>(key, &data, dtype),
                _ => f32_to_piece::<half::bf16>(key, &data, dtype),
            }
        }
        (Decoded::F64(mut data), Dtype::F32) => {
            apply_edits(key, &mut data, shape, edits)?;
            check_finite(key, &data)?;
            let out: Vec<f32> = data.iter().map(|&v| v as f32).collect();
            match out.iter().position(|x| x.is_infinite()) {
                Some(i) => Err(overflow(key, i, dtype)),
                None => Ok(Piece::Bytes(bytemuck::cast_slice(&out).to_vec())),
            }
        }
        (Decoded::F64(mut data), _) => {
            apply_edits(key, &mut data, shape, edits)?;
            check_finite(key, &data)?;
            Ok(Piece::Bytes(bytemuck::cast_slice(&data).to_vec()))
        }
    }
}

/// What the reader hands to the rotation stage, in file order.
enum Work<'k> {
    Copy {
        offset: u64,
        len: u64,
    },
    Rotate {
        key: &'k str,
        decoded: Decoded,
        dtype: Dtype,
        shape: Vec<usize>,
    },
}

/// The header of the output: the input's tensors at the same offsets, metadata extended,
/// keys sorted (deterministic).
fn output_header(
    input: &MappedFile,
    extra: &BTreeMap<String, String>,
    path: &Path,
) -> Result<Vec<u8>> {
    let header = input.header();
    let mut meta = header.metadata().clone().unwrap_or_default();
    for (k, v) in extra {
        meta.insert(k.clone(), v.clone());
    }
    let infos = header.tensors();
    let tensors: Vec<(String, TensorInfo)> = header
        .offset_keys()
        .into_iter()
        .map(|k| {
            let info = (*infos[&k]).clone();
            (k, info)
        })
        .collect();
    crate::tensors::encode_header(meta, tensors).map_err(|e| Error::format(path, e.to_string()))
}

/// Read `len` bytes at `offset` into a fresh buffer (not zeroed first: `read_to_end` fills
/// spare capacity directly); a base truncated underneath us is an error.
fn read_range(file: &File, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = file;
    f.seek(SeekFrom::Start(offset))?;
    let mut buf = Vec::with_capacity(len);
    f.take(len as u64).read_to_end(&mut buf)?;
    if buf.len() != len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the file became shorter while it was being read",
        ));
    }
    Ok(buf)
}

/// Stream one base file to `out`, rotating the tensors that have edits.
fn bake_file(
    job: &FileJob<'_>,
    out: &Path,
    extra: &BTreeMap<String, String>,
    bar: &indicatif::ProgressBar,
) -> Result<(u64, usize)> {
    let input = MappedFile::open(&job.input)?;
    input.advise_sequential();
    let header_bytes = output_header(&input, extra, &job.input)?;
    let header = input.header();
    let order = header.offset_keys();
    let file = File::create(out).map_err(|e| Error::io(out, e))?;
    let source = File::open(&job.input).map_err(|e| Error::io(&job.input, e))?;
    let reader_file = File::open(&job.input).map_err(|e| Error::io(&job.input, e))?;
    let data_start = input.data_start();
    let mut rotated = 0;
    let written = std::thread::scope(|s| -> Result<u64> {
        let (tx, rx) = sync_channel::<Piece>(WRITER_QUEUE);
        let writer = s.spawn(move || -> Result<u64> {
            use std::io::{Read, Seek, SeekFrom};
            let mut w = BufWriter::with_capacity(1 << 20, file);
            let mut source = source;
            let mut n = 0u64;
            w.write_all(&header_bytes).map_err(|e| Error::io(out, e))?;
            n += header_bytes.len() as u64;
            for piece in rx {
                match piece {
                    Piece::Range { offset, len } => {
                        // Untouched tensors: std::io::copy between files uses copy_file_range
                        // (or sendfile) on Linux, so the bytes never pass through user space.
                        w.flush().map_err(|e| Error::io(out, e))?;
                        source
                            .seek(SeekFrom::Start(offset))
                            .map_err(|e| Error::io(&job.input, e))?;
                        let copied = std::io::copy(&mut (&mut source).take(len), w.get_mut())
                            .map_err(|e| Error::io(out, e))?;
                        if copied != len {
                            return Err(Error::format(
                                &job.input,
                                "the file became shorter while it was being read",
                            ));
                        }
                        n += len;
                        bar.inc(len);
                    }
                    other => {
                        // Computed bytes go out in small write()s: on this kind of machine one
                        // multi-MiB write costs several times the CPU of the same bytes in
                        // 256 KiB pieces (measured: bench/README.md).
                        let bytes = other.bytes();
                        w.flush().map_err(|e| Error::io(out, e))?;
                        for piece in bytes.chunks(WRITE_PIECE) {
                            w.get_mut()
                                .write_all(piece)
                                .map_err(|e| Error::io(out, e))?;
                            bar.inc(piece.len() as u64);
                        }
                        n += bytes.len() as u64;
                    }
                }
            }
            let f = w.into_inner().map_err(|e| Error::io(out, e.into_error()))?;
            f.sync_all().map_err(|e| Error::io(out, e))?;
            Ok(n)
        });
        // Reader: walks the tensors in file order, merges untouched runs into one range and
        // reads + decodes the next tensor to rotate while the previous one is being rotated.
        let (wtx, wrx) = sync_channel::<Work<'_>>(1);
        let edits = &job.edits;
        let input_path = &job.input;
        let order = &order;
        let header = &header;
        let reader = s.spawn(move || -> Result<()> {
            let mut pending: Option<(u64, u64)> = None;
            for key in order {
                let info = header
                    .info(key)
                    .ok_or_else(|| Error::format(input_path, format!("no tensor `{key}`")))?;
                let (begin, end) = info.data_offsets;
                let start = data_start + begin as u64;
                let len = (end - begin) as u64;
                if !edits.contains_key(key) {
                    pending = match pending {
                        Some((o, l)) if o + l == start => Some((o, l + len)),
                        Some((o, l)) => {
                            if wtx.send(Work::Copy { offset: o, len: l }).is_err() {
                                return Ok(()); // a later stage failed; its error is reported
                            }
                            Some((start, len))
                        }
                        None => Some((start, len)),
                    };
                    continue;
                }
                if let Some((o, l)) = pending.take()
                    && wtx.send(Work::Copy { offset: o, len: l }).is_err()
                {
                    return Ok(());
                }
                // pread rather than the mapping, so only the tensors in flight are resident.
                let bytes = read_range(&reader_file, start, end - begin)
                    .map_err(|e| Error::io(input_path, e))?;
                let decoded = if fusable(info.dtype, &edits[key]) {
                    Decoded::Raw(bytes)
                } else {
                    decode(&bytes, info.dtype)
                };
                let work = Work::Rotate {
                    key,
                    decoded,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                };
                if wtx.send(work).is_err() {
                    return Ok(());
                }
            }
            if let Some((o, l)) = pending {
                let _ = wtx.send(Work::Copy { offset: o, len: l });
            }
            Ok(())
        });
        let produce = || -> Result<()> {
            for work in wrx {
                let piece = match work {
                    Work::Copy { offset, len } => Piece::Range { offset, len },
                    Work::Rotate {
                        key,
                        decoded,
                        dtype,
                        shape,
                    } => {
                        rotated += 1;
                        finish(key, decoded, dtype, &shape, &edits[key])?
                    }
                };
                if tx.send(piece).is_err() {
                    return Ok(()); // the writer failed; its error is reported
                }
            }
            Ok(())
        };
        let produced = produce();
        drop(tx);
        let written = writer
            .join()
            .map_err(|_| Error::new(Category::Io, "the writer thread panicked"))?;
        let read = reader
            .join()
            .map_err(|_| Error::new(Category::Io, "the reader thread panicked"))?;
        read?;
        produced?;
        written
    })?;
    Ok((written, rotated))
}

/// Load one adapter argument: a file, a PEFT directory, or a folder of per-component PEFT
/// directories (`unet/`, `text_encoder/`, …).
pub fn load_adapter(path: &Path) -> Result<Adapter> {
    load_adapter_with(path, crate::layouts::Semantics::Producer)
}

/// [`load_adapter`], reading `oft_blocks` files as a given runtime does.
pub fn load_adapter_with(path: &Path, semantics: crate::layouts::Semantics) -> Result<Adapter> {
    layouts::load_with(path, semantics)
}

/// Copy everything of `src` except the files in `skip` into `dst` (recursively).
fn copy_tree(src: &Path, dst: &Path, skip: &[PathBuf]) -> Result<()> {
    std::fs::create_dir_all(dst).map_err(|e| Error::io(dst, e))?;
    for entry in list_dir(src)? {
        if skip.contains(&entry) {
            continue;
        }
        let target = dst.join(entry.file_name().unwrap_or_default());
        let meta = std::fs::symlink_metadata(&entry).map_err(|e| Error::io(&entry, e))?;
        if meta.is_dir() {
            copy_tree(&entry, &target, skip)?;
        } else if meta.is_file() {
            std::fs::copy(&entry, &target).map_err(|e| Error::io(&entry, e))?;
        }
    }
    Ok(())
}

/// One adapter to bake, already loaded.
pub struct BakeInput {
    /// How to name it in messages and metadata (its path as given).
    pub label: String,
    pub path: PathBuf,
    pub adapter: Adapter,
    /// Parity strength rule, applied at bake time when `runtime_strength` is set.
    pub mode: BlendMode,
    pub runtime_strength: Option<f64>,
    /// The strength the user asked for (recorded in the output's metadata).
    pub strength: Option<f64>,
}

/// Load `PATH[:S]` arguments for `merge`: geodesic strengths are applied to the adapter here,
/// parity strengths at bake time; `oft_blocks` files are read as the parity tool reads them.
pub fn load_inputs(args: &[String], mode: BlendMode) -> Result<Vec<BakeInput>> {
    args.iter()
        .map(|arg| {
            let a = parse_adapter_arg(arg)?;
            let adapter = load_adapter_with(&a.path, mode.semantics())?;
            let (adapter, runtime_strength) = match (mode, a.strength) {
                (_, None) => (adapter, None),
                (BlendMode::Geodesic, Some(s)) => {
                    (crate::strength::adapter_power(&adapter, s)?, None)
                }
                (_, Some(s)) => (adapter, Some(s)),
            };
            Ok(BakeInput {
                label: a.path.display().to_string(),
                path: a.path,
                adapter,
                mode,
                runtime_strength,
                strength: a.strength,
            })
        })
        .collect()
}

pub fn run(
    base: &Path,
    adapters: Vec<BakeInput>,
    out: &Path,
    opts: &MergeOptions,
) -> Result<MergeSummary> {
    let start = Instant::now();
    if adapters.is_empty() {
        return Err(Error::usage("give at least one adapter"));
    }
    let mut inputs: Vec<&Path> = vec![base];
    inputs.extend(adapters.iter().map(|a| a.path.as_path()));
    refuse_overwriting_input(out, &inputs)?;
    let kind = classify_base(base)?;
    if let BaseKind::Sharded(_) | BaseKind::Diffusers(..) = kind
        && out.exists()
    {
        return Err(Error::usage(format!(
            "{} already exists; a sharded or pipeline output is a new folder",
            out.display()
        )));
    }
    let groups = groups_for(&kind)?;
    let (placements, skipped) = place(&adapters, &groups, opts)?;
    if !opts.force {
        check_bindings(&placements, &groups)?;
    }

    // Jobs: one per base file, with its edits in adapter order.
    let mut jobs: Vec<FileJob<'_>> = Vec::new();
    let mut job_index: HashMap<(usize, usize), usize> = HashMap::new();
    for (g, group) in groups.iter().enumerate() {
        for (i, (input, relative)) in group.files.iter().enumerate() {
            job_index.insert((g, i), jobs.len());
            jobs.push(FileJob {
                input: input.clone(),
                relative: relative.clone(),
                edits: BTreeMap::new(),
            });
        }
    }
    let layers_baked = placements.len();
    for p in placements {
        let i = groups[p.group].key_file[&p.key];
        jobs[job_index[&(p.group, i)]]
            .edits
            .entry(p.key)
            .or_default()
            .push(p.edit);
    }

    let mut extra = BTreeMap::new();
    extra.insert("oftool.version".to_string(), crate::model::tool_name());
    let list: Vec<serde_json::Value> = adapters
        .iter()
        .map(|a| {
            serde_json::json!({
                "name": a.path.file_name().map(|n| n.to_string_lossy().to_string()),
                "source_format": a.adapter.provenance.source_format,
                "source_digest": a.adapter.provenance.source_digest,
                "layers": a.adapter.layers.len(),
                "strength": a.strength,
                "blend": format!("{:?}", a.mode).to_lowercase(),
            })
        })
        .collect();
    extra.insert(
        "oftool.adapters".to_string(),
        serde_json::Value::Array(list).to_string(),
    );

    let total: u64 = jobs
        .iter()
        .map(|j| std::fs::metadata(&j.input).map(|m| m.len()).unwrap_or(0))
        .sum();
    let bar = if opts.progress && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        let b = indicatif::ProgressBar::new(total);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    };

    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads.unwrap_or(0))
        .build()
        .map_err(|e| Error::usage(format!("cannot start {:?} threads: {e}", opts.threads)))?;

    // Write into a temporary file or folder beside OUT, then rename it into place.
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        return Err(Error::io(
            &parent,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the output folder does not exist",
            ),
        ));
    }
    let single = matches!(kind, BaseKind::Single(_));
    crate::tensors::clean_stale(&parent);
    let staging = tempfile::Builder::new()
        .prefix(&crate::tensors::staging_prefix())
        .tempdir_in(&parent)
        .map_err(|e| Error::io(&parent, e))?;
    let mut bytes_written = 0u64;
    let mut tensors = 0usize;
    let mut tensors_rotated = 0usize;
    pool.install(|| -> Result<()> {
        for job in &jobs {
            let dest = if single {
                staging.path().join("out.safetensors")
            } else {
                staging.path().join(&job.relative)
            };
            if let Some(d) = dest.parent() {
                std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
            }
            bar.set_message(job.relative.display().to_string());
            let (n, r) = bake_file(job, &dest, &extra, &bar)?;
            bytes_written += n;
            tensors_rotated += r;
            tensors += MappedFile::open(&job.input)?.header().tensors().len();
        }
        Ok(())
    })?;
    bar.finish_and_clear();

    if single {
        let tmp = staging.path().join("out.safetensors");
        std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
    } else {
        // Copy the rest of the folder (configs, index, other files), then move it into place.
        let (src_root, skip): (PathBuf, Vec<PathBuf>) = match &kind {
            BaseKind::Sharded(index) => (
                index.parent().unwrap_or(Path::new(".")).to_path_buf(),
                jobs.iter().map(|j| j.input.clone()).collect(),
            ),
            BaseKind::Diffusers(root, _) => {
                (root.clone(), jobs.iter().map(|j| j.input.clone()).collect())
            }
            BaseKind::Single(_) => unreachable!("handled above"),
        };
        copy_tree(&src_root, staging.path(), &skip)?;
        let kept = staging.keep();
        std::fs::rename(&kept, out).map_err(|e| {
            let _ = std::fs::remove_dir_all(&kept);
            Error::io(out, e)
        })?;
    }
    if let Ok(d) = File::open(&parent) {
        let _ = d.sync_all(); // make the rename durable where the platform allows
    }

    Ok(MergeSummary {
        base: base.display().to_string(),
        output: out.display().to_string(),
        adapters: adapters.iter().map(|a| a.label.clone()).collect(),
        files_written: jobs.len(),
        tensors,
        tensors_rotated,
        layers_baked,
        layers_skipped: skipped,
        bytes_written,
        seconds: start.elapsed().as_secs_f64(),
        peak_rss_bytes: peak_rss_bytes(),
    })
}

/// `oftool unmerge MERGED ADAPTER[:S]… -o BASE`: bake the exact inverse of each adapter, in
/// reverse order (Cayley stages negated, Neumann stages inverted by solving, row scales
/// divided out), with the same streaming and atomic-output rules as `merge`.
pub fn unmerge(
    merged: &Path,
    args: &[String],
    out: &Path,
    opts: &MergeOptions,
) -> Result<MergeSummary> {
    let mut inputs = load_inputs(args, BlendMode::Geodesic)?;
    for input in &mut inputs {
        input.adapter = crate::strength::adapter_inverse(&input.adapter)?;
    }
    inputs.reverse();
    run(merged, inputs, out, opts)
}
