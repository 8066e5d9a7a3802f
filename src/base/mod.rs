//! The base checkpoint an adapter is baked into, bound to or checked against.
//!
//! [`Base::open`] takes a single `.safetensors` file, a sharded checkpoint (its folder or its
//! `*.safetensors.index.json`) or a diffusers pipeline folder (`unet/`, `text_encoder/`, …) and
//! reads every header once. Each model (or pipeline component) is a group with its own
//! [`AliasTable`]; [`Base::locate`] finds the tensor a layer targets and the rows of it the layer
//! covers, [`Base::check`] says whether the layer fits it, [`Base::read_f64`] reads those rows.
//! Every command that takes a base (merge, unmerge, `validate --base`, `convert --base`,
//! `compose --base`) goes through here, so a base means the same thing everywhere.
//!
//! Tensor data is read with plain positioned reads when needed (binding hashes, reports); no
//! mapping is kept open, so a `Base` costs only its headers.

// Row-range lists often hold one range: that is a list, not a range to expand.
#![allow(clippy::single_range_in_vec_init)]

mod files;

pub use files::{COMPONENTS, Storage};

pub(crate) use files::list_dir;

use crate::apply::Matrix;
use crate::error::{Category, Error, Result};
use crate::model::{BaseBinding, Layer, RowRange, Side};
use crate::resolve::{AliasTable, Piece};
use crate::tensors::MappedFile;
use safetensors::tensor::Dtype;
use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// The rows of a base tensor that one layer covers, in the layer's order: row `i` of the layer
/// is row `i` of the ranges laid end to end. A whole tensor is one range `0..rows`; a slice of a
/// fused tensor (OpenCLIP's `in_proj_weight`) is one shorter range; a fused tensor stored in
/// another order than the layer's (e.g. two halves swapped) is several ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowSlice {
    ranges: Vec<Range<usize>>,
}

impl RowSlice {
    /// All `rows` rows, in order.
    pub fn whole(rows: usize) -> Self {
        Self::range(0..rows)
    }

    /// One contiguous range of rows.
    pub fn range(rows: Range<usize>) -> Self {
        RowSlice {
            ranges: std::iter::once(rows).collect(),
        }
    }

    /// The given ranges, in the layer's order (checked against a tensor by [`RowSlice::fits`]).
    pub fn new(ranges: Vec<Range<usize>>) -> Self {
        RowSlice { ranges }
    }

    /// The row ranges, in the layer's order.
    pub fn ranges(&self) -> &[Range<usize>] {
        &self.ranges
    }

    /// Rows covered in all.
    pub fn len(&self) -> usize {
        self.ranges.iter().map(|r| r.len()).sum()
    }

    /// Whether no row is covered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether this is every row of a tensor of `rows` rows, in order.
    pub fn is_whole(&self, rows: usize) -> bool {
        matches!(self.ranges.as_slice(), [r] if r.start == 0 && r.end == rows)
    }

    /// The one range, when the rows are contiguous and in order.
    pub fn contiguous(&self) -> Option<Range<usize>> {
        match self.ranges.as_slice() {
            [r] => Some(r.clone()),
            _ => None,
        }
    }

    /// The rows `ranges` of this slice (row `i` of the slice is row `i` of its ranges laid end
    /// to end), as rows of the tensor; `None` when a range reaches past [`RowSlice::len`].
    pub fn select(&self, ranges: &[RowRange]) -> Option<RowSlice> {
        let mut out = Vec::new();
        for r in ranges {
            let mut start = usize::try_from(r.start).ok()?;
            let mut left = usize::try_from(r.len).ok()?;
            for piece in &self.ranges {
                if left == 0 {
                    break;
                }
                if start >= piece.len() {
                    start -= piece.len();
                    continue;
                }
                let take = left.min(piece.len() - start);
                let begin = piece.start + start;
                out.push(begin..begin + take);
                left -= take;
                start = 0;
            }
            if left > 0 {
                return None;
            }
        }
        // Neighbouring pieces that continue each other are one range.
        let mut merged: Vec<Range<usize>> = Vec::with_capacity(out.len());
        for r in out {
            match merged.last_mut() {
                Some(last) if last.end == r.start => last.end = r.end,
                _ => merged.push(r),
            }
        }
        Some(RowSlice { ranges: merged })
    }

    /// The ranges as `[start, len]` pairs, as a manifest's `rows` lists them.
    pub fn to_row_ranges(&self) -> Vec<RowRange> {
        self.ranges
            .iter()
            .map(|r| RowRange {
                start: r.start as u64,
                len: r.len() as u64,
            })
            .collect()
    }

    /// Whether every range lies within `rows` rows, none is reversed and no two overlap.
    pub fn fits(&self, rows: usize) -> bool {
        if self.ranges.iter().any(|r| r.start > r.end || r.end > rows) {
            return false;
        }
        let mut sorted: Vec<&Range<usize>> = self.ranges.iter().collect();
        sorted.sort_by_key(|r| r.start);
        sorted.windows(2).all(|w| w[0].end <= w[1].start)
    }
}

impl RowSlice {
    /// Whether the two slices share a row.
    pub fn overlaps(&self, other: &RowSlice) -> bool {
        self.ranges.iter().any(|a| {
            other
                .ranges
                .iter()
                .any(|b| a.start < b.end && b.start < a.end)
        })
    }
}

/// The first two layers (indices into `located`, in order) that act on common rows of one base
/// tensor. A file may hold such layers only with `stacked-layers` (spec §8.4); they then apply
/// in file order.
pub fn first_shared_rows(located: &[&Located]) -> Option<(usize, usize)> {
    let mut seen: HashMap<(usize, &str), Vec<usize>> = HashMap::new();
    for (i, loc) in located.iter().enumerate() {
        let earlier = seen.entry((loc.file, loc.key.as_str())).or_default();
        if let Some(&j) = earlier
            .iter()
            .find(|&&j| located[j].rows.overlaps(&loc.rows))
        {
            return Some((j, i));
        }
        earlier.push(i);
    }
    None
}

impl std::fmt::Display for RowSlice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self
            .ranges
            .iter()
            .map(|r| format!("{}..{}", r.start, r.end))
            .collect();
        f.write_str(&parts.join(", "))
    }
}

/// Where a layer lands in the base: the file, the tensor, its full shape and dtype, and the
/// rows the layer covers.
#[derive(Debug, Clone, PartialEq)]
pub struct Located {
    /// Index into [`Base::files`].
    pub file: usize,
    /// The tensor's key in that file.
    pub key: String,
    /// The tensor's full shape and dtype, as stored.
    pub shape: Vec<usize>,
    /// The tensor's dtype, as stored.
    pub dtype: Dtype,
    /// The rows of the tensor the layer covers, in the layer's row order.
    pub rows: RowSlice,
    /// Which of the layer's rows (ranges of its row indices, in order) land here, when the
    /// layer spans several tensors (a fused module on a split base); `None`: all of them.
    pub part: Option<Vec<Range<usize>>>,
    group: usize,
    /// Absolute byte offset and length of the tensor's data in its file.
    data: (u64, u64),
}

impl Located {
    /// Length of a row: the product of every axis but the first.
    pub fn cols(&self) -> usize {
        self.shape.iter().skip(1).product()
    }

    /// The shape of the covered rows (the full shape with the first axis replaced).
    pub fn covered_shape(&self) -> Vec<usize> {
        let mut s = self.shape.clone();
        if let Some(first) = s.first_mut() {
            *first = self.rows.len();
        }
        s
    }
}

/// One safetensors file of the base.
#[derive(Debug, Clone)]
pub struct BaseFile {
    /// Where the file is.
    pub path: PathBuf,
    /// Its path relative to the output root (a bare file name for a single-file base).
    pub relative: PathBuf,
    /// Tensors its header lists.
    pub tensors: usize,
}

struct TensorMeta {
    file: usize,
    shape: Vec<usize>,
    dtype: Dtype,
    data: (u64, u64),
}

/// One model, or one pipeline component: its files share one name space.
struct Group {
    component: Option<String>,
    table: AliasTable,
    tensors: HashMap<String, TensorMeta>,
}

/// A tensor a layer lands on: its key, its rows (in the layer's order) and the layer rows they are.
type PerTensor<'a> = (&'a str, Vec<Range<usize>>, Vec<Range<usize>>);

/// What a layer's name resolves to, before it becomes an error.
pub(crate) enum Lookup {
    Found(Located),
    /// Rows of several tensors (a fused module on a split base; on the output side only when
    /// each block lies in one tensor): one location each, with the layer rows it takes
    /// (`Located::part`).
    Split(Vec<Located>),
    Missing,
    /// The keys it could mean.
    Ambiguous(Vec<String>),
    /// It names tensors it cannot be applied to as named (`target-shape`): rows outside the
    /// named weight, or an output-side layer across tensors.
    Unfit(String),
}

/// A base checkpoint with every header read.
pub struct Base {
    path: PathBuf,
    storage: Storage,
    files: Vec<BaseFile>,
    groups: Vec<Group>,
}

impl Base {
    /// Open `path`: a `.safetensors` file, a sharded checkpoint (folder or index) or a diffusers
    /// pipeline folder. Every file's header is parsed and checked here.
    pub fn open(path: &Path) -> Result<Base> {
        let storage = files::classify(path)?;
        let mut files = Vec::new();
        let mut groups = Vec::new();
        for g in files::groups(&storage)? {
            let mut tensors = HashMap::new();
            for (p, relative) in g.files {
                let index = files.len();
                let f = MappedFile::open(&p)?;
                let start = f.data_start();
                let header = f.header();
                let infos = header.tensors();
                let count = infos.len();
                for (name, info) in infos {
                    let (b, e) = info.data_offsets;
                    let meta = TensorMeta {
                        file: index,
                        shape: info.shape.clone(),
                        dtype: info.dtype,
                        data: (start + b as u64, (e - b) as u64),
                    };
                    tensors.insert(name, meta);
                }
                files.push(BaseFile {
                    path: p,
                    relative,
                    tensors: count,
                });
            }
            let table = AliasTable::with_shapes(
                tensors
                    .iter()
                    .map(|(k, m)| (k.as_str(), m.shape.as_slice())),
            );
            groups.push(Group {
                component: g.component,
                table,
                tensors,
            });
        }
        Ok(Base {
            path: path.to_path_buf(),
            storage,
            files,
            groups,
        })
    }

    /// The path as given.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What kind of checkpoint this is, and where its files are.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// Every safetensors file, group by group.
    pub fn files(&self) -> &[BaseFile] {
        &self.files
    }

    /// The pipeline component a location belongs to (`None` outside a pipeline folder).
    pub fn component(&self, loc: &Located) -> Option<&str> {
        self.groups.get(loc.group)?.component.as_deref()
    }

    /// The alias table of a base that is one model (not a pipeline folder).
    pub fn single_table(&self) -> Option<&AliasTable> {
        match self.groups.as_slice() {
            [g] => Some(&g.table),
            _ => None,
        }
    }

    /// Every tensor, whole (all rows): group by group, keys sorted within a group.
    pub fn tensors(&self) -> Vec<Located> {
        let mut out = Vec::new();
        for (g, group) in self.groups.iter().enumerate() {
            let mut keys: Vec<&String> = group.tensors.keys().collect();
            keys.sort();
            for key in keys {
                if let Some(meta) = group.tensors.get(key) {
                    out.push(Located {
                        file: meta.file,
                        key: key.clone(),
                        shape: meta.shape.clone(),
                        dtype: meta.dtype,
                        rows: RowSlice::whole(meta.shape.first().copied().unwrap_or(0)),
                        part: None,
                        group: g,
                        data: meta.data,
                    });
                }
            }
        }
        out
    }

    /// The diffusion-transformer family, layout and key root of a one-model base.
    pub fn dit(&self) -> Option<crate::resolve::dit::Detected> {
        self.groups.iter().find_map(|g| g.table.dit())
    }

    /// Every tensor `layer` lands on: one, or (an input-side fused module on a split base)
    /// several, each with the layer rows it takes. Errors as [`Base::locate`].
    pub fn locate_all(&self, layer: &Layer) -> Result<Vec<Located>> {
        match self.lookup(layer) {
            Lookup::Split(locs) => Ok(locs),
            _ => self.locate(layer).map(|l| vec![l]),
        }
    }

    /// Find the tensor `layer` targets: `target-missing` when nothing matches, `target-ambiguous`
    /// when several tensors do; a layer that spans several tensors is `unsupported` here
    /// ([`Base::locate_all`] gives each).
    pub fn locate(&self, layer: &Layer) -> Result<Located> {
        let name = &layer.target.name;
        match self.lookup(layer) {
            Lookup::Found(loc) => Ok(loc),
            Lookup::Split(locs) => Err(Error::new(
                Category::Unsupported,
                format!(
                    "`{name}` spans several tensors ({}); this command takes one per layer",
                    locs.iter()
                        .map(|l| l.key.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
            .tensor(name)),
            Lookup::Unfit(m) => Err(Error::new(Category::TargetShape, m).tensor(name)),
            Lookup::Missing => Err(Error::new(
                Category::TargetMissing,
                format!("no tensor in {} matches `{name}`", self.path.display()),
            )
            .tensor(name)),
            Lookup::Ambiguous(keys) => Err(Error::new(
                Category::TargetAmbiguous,
                format!("`{name}` matches several tensors: {}", keys.join(", ")),
            )
            .tensor(name)),
        }
    }

    /// [`Base::locate`] without the error wording (callers that list problems word their own).
    pub(crate) fn lookup(&self, layer: &Layer) -> Lookup {
        // A component the layer names narrows the groups, unless the base lacks it.
        let candidates = (0..self.groups.len()).filter(|&g| {
            match (&layer.target.component, &self.groups[g].component) {
                (Some(a), Some(b)) => {
                    a == b || !self.groups.iter().any(|x| x.component.as_ref() == Some(a))
                }
                _ => true,
            }
        });
        let mut hits: Vec<(usize, Vec<Piece>)> = Vec::new();
        let mut ambiguous = Vec::new();
        for g in candidates {
            match self.groups[g].table.resolve_pieces(&layer.target) {
                Ok(r) => hits.push((g, r)),
                Err(c) => ambiguous.extend(c),
            }
        }
        if !ambiguous.is_empty() || hits.len() > 1 {
            let mut keys: Vec<String> = hits
                .into_iter()
                .flat_map(|(_, r)| r.into_iter().map(|p| p.key))
                .collect();
            keys.extend(ambiguous);
            return Lookup::Ambiguous(keys);
        }
        let Some((g, pieces)) = hits.pop() else {
            return Lookup::Missing;
        };
        let group = &self.groups[g];
        // The named weight's rows as (key, rows of it) segments, laid end to end.
        let mut segments: Vec<(&str, Range<usize>)> = Vec::new();
        for p in &pieces {
            let Some(meta) = group.tensors.get(&p.key) else {
                return Lookup::Missing;
            };
            match &p.rows {
                None => segments.push((&p.key, 0..meta.shape.first().copied().unwrap_or(0))),
                Some(v) => segments.extend(v.iter().map(|r| (p.key.as_str(), r.clone()))),
            }
        }
        let name = &layer.target.name;
        let total: usize = segments.iter().map(|(_, r)| r.len()).sum();
        let wanted: Vec<Range<usize>> = match &layer.target.rows {
            None => std::iter::once(0..total).collect(),
            Some(rows) => {
                let mut v = Vec::new();
                for r in rows {
                    let end = r
                        .start
                        .checked_add(r.len)
                        .and_then(|e| usize::try_from(e).ok());
                    match (usize::try_from(r.start), end) {
                        (Ok(a), Some(b)) if b <= total => v.push(a..b),
                        _ => {
                            return Lookup::Unfit(format!(
                                "`{name}` covers rows {}..{} of a weight of {total} rows",
                                r.start,
                                r.start.saturating_add(r.len)
                            ));
                        }
                    }
                }
                v
            }
        };
        // The covered rows as (key, rows) in the layer's order, adjacent runs merged.
        let mut covered: Vec<(&str, Range<usize>)> = Vec::new();
        for w in &wanted {
            let mut offset = 0;
            for (key, seg) in &segments {
                let (lo, hi) = (w.start.max(offset), w.end.min(offset + seg.len()));
                if lo < hi {
                    let r = seg.start + (lo - offset)..seg.start + (hi - offset);
                    match covered.last_mut() {
                        Some((k, last)) if k == key && last.end == r.start => last.end = r.end,
                        _ => covered.push((key, r)),
                    }
                }
                offset += seg.len();
            }
        }
        // One location per tensor, in order of first appearance, with the layer rows it takes.
        let mut per: Vec<PerTensor<'_>> = Vec::new();
        let mut at = 0;
        for (key, r) in covered {
            let part = at..at + r.len();
            at += r.len();
            match per.iter_mut().find(|(k, _, _)| *k == key) {
                Some((_, rows, parts)) => {
                    rows.push(r);
                    parts.push(part);
                }
                None => per.push((key, vec![r], vec![part])),
            }
        }
        if per.len() > 1 && layer.side == Side::Output && !blocks_within(layer, &per) {
            let keys: Vec<&str> = per.iter().map(|(k, _, _)| *k).collect();
            return Lookup::Unfit(format!(
                "`{name}` rotates output rows that lie in several tensors ({}): its blocks mix \
                 rows of different tensors, which a tensor-by-tensor bake cannot apply; bake it \
                 into a base with the fused layout",
                keys.join(", ")
            ));
        }
        if per.is_empty()
            && let Some((key, r)) = segments.first()
            && layer.target.rows.is_none()
        {
            // A tensor without rows (0-dim or empty): located, for `check` to say why it fails.
            per.push((key, vec![r.clone()], std::iter::once(0..0).collect()));
        }
        let single = per.len() == 1;
        let mut locs = Vec::new();
        for (key, rows, parts) in per {
            let Some(meta) = group.tensors.get(key) else {
                return Lookup::Missing;
            };
            locs.push(Located {
                file: meta.file,
                key: key.to_string(),
                shape: meta.shape.clone(),
                dtype: meta.dtype,
                rows: RowSlice::new(rows),
                part: (!single).then_some(parts),
                group: g,
                data: meta.data,
            });
        }
        match locs.len() {
            0 => Lookup::Unfit(format!("`{name}` covers no rows")),
            1 => Lookup::Found(locs.remove(0)),
            _ => Lookup::Split(locs),
        }
    }

    /// A name of the whole tensor at `loc` in the base's own naming (its key without the
    /// `.weight` / `_weight` suffix) that resolves to that tensor, every row in stored order,
    /// for a layer of `component`.
    pub fn whole_name(&self, loc: &Located, component: Option<&str>) -> Option<String> {
        let group = self.groups.get(loc.group)?;
        let name = loc
            .key
            .strip_suffix(".weight")
            .or_else(|| loc.key.strip_suffix("_weight"))?;
        let target = crate::model::Target {
            name: name.to_string(),
            convention: "unknown".into(),
            component: component.map(str::to_string),
            module: crate::model::ModuleKind::Unknown,
            shape: None,
            rotated_dim: None,
            rows: None,
        };
        match group.table.resolve(&target) {
            Ok(r) if r.key == loc.key && r.rows.is_none() => Some(name.to_string()),
            _ => None,
        }
    }

    /// Every way `layer` does not fit the tensor it was located at (`target-shape`), and whether
    /// the tensor is the one the layer is bound to (`binding`). `Err` only when reading fails.
    pub fn check(&self, layer: &Layer, loc: &Located) -> Result<Vec<Error>> {
        let mut problems = check_shape(layer, loc);
        problems.extend(self.check_binding(layer, loc)?);
        Ok(problems)
    }

    /// The binding problem of `layer` at `loc`, if it is bound to another tensor. Reads (and
    /// hashes) the tensor only when the layer is bound.
    pub fn check_binding(&self, layer: &Layer, loc: &Located) -> Result<Option<Error>> {
        let Some(bound) = &layer.base_binding else {
            return Ok(None);
        };
        let found = self.binding(loc)?;
        if found == *bound {
            return Ok(None);
        }
        Ok(Some(
            Error::new(
                Category::Binding,
                format!(
                    "`{}` is not the tensor this adapter was made for (bound {} {:?} {}, found {} {:?} {})",
                    loc.key,
                    bound.dtype,
                    bound.shape,
                    bound.blake3,
                    found.dtype,
                    found.shape,
                    found.blake3
                ),
            )
            .tensor(&layer.target.name),
        ))
    }

    /// The binding record of the tensor at `loc`: dtype, full shape, blake3 of its bytes.
    pub fn binding(&self, loc: &Located) -> Result<BaseBinding> {
        let path = self.file_path(loc)?;
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let mut hasher = blake3::Hasher::new();
        let (offset, len) = loc.data;
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(HASH_PIECE);
            let bytes =
                read_range(&file, offset + done, n as usize).map_err(|e| Error::io(path, e))?;
            hasher.update(&bytes);
            done += n;
        }
        Ok(BaseBinding {
            blake3: hasher.finalize().to_hex().to_string(),
            dtype: format!("{:?}", loc.dtype),
            shape: loc.shape.iter().map(|&d| d as u64).collect(),
        })
    }

    /// The rows `loc` covers as f64, as a `(rows, cols)` matrix in the layer's row order.
    pub fn read_f64(&self, loc: &Located) -> Result<Matrix<f64>> {
        let name = loc.key.as_str();
        if loc.shape.is_empty() {
            return Err(Error::new(
                Category::TargetShape,
                format!("`{name}` has shape [], not a weight matrix"),
            ));
        }
        let rows = loc.shape[0];
        if !loc.rows.fits(rows) {
            return Err(Error::new(
                Category::TargetShape,
                format!("`{name}` rows {} are outside its {rows} rows", loc.rows),
            ));
        }
        let cols = loc.cols();
        let path = self.file_path(loc)?;
        let row_bytes = match loc.dtype {
            Dtype::F64 | Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::U8 | Dtype::BOOL => {
                cols * loc.dtype.bitsize() / 8
            }
            other => {
                return Err(Error::new(
                    Category::TargetShape,
                    format!("dtype {other:?} is not a floating-point dtype"),
                )
                .tensor(name));
            }
        };
        if (rows * row_bytes) as u64 != loc.data.1 {
            return Err(Error::new(
                Category::Container,
                "the tensor's byte length does not hold its rows",
            )
            .at(path)
            .tensor(name)
            .expected_found(
                format!("{} bytes", rows.saturating_mul(row_bytes)),
                format!("{} bytes", loc.data.1),
            ));
        }
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let mut data = Vec::with_capacity(loc.rows.len() * cols);
        for r in loc.rows.ranges() {
            let at = loc.data.0 + (r.start * row_bytes) as u64;
            let bytes =
                read_range(&file, at, r.len() * row_bytes).map_err(|e| Error::io(path, e))?;
            data.extend(crate::tensors::bytes_to_f64(&bytes, loc.dtype, name)?);
        }
        Matrix::from_shape(&[loc.rows.len(), cols], data)
    }

    fn file_path(&self, loc: &Located) -> Result<&Path> {
        self.files
            .get(loc.file)
            .map(|f| f.path.as_path())
            .ok_or_else(|| Error::usage("a location from another base"))
    }
}

/// Bytes hashed per read when computing a binding.
const HASH_PIECE: u64 = 4 << 20;

/// Whether an output-side layer's blocks each lie in one of the tensors its rows are split
/// over (`per`: the layer rows each takes): identity wiring, whole blocks, every part starting
/// and ending on a block boundary of every stage. It then bakes tensor by tensor, each tensor
/// rotated by the blocks on its rows.
fn blocks_within(layer: &Layer, per: &[PerTensor<'_>]) -> bool {
    layer.stages.iter().all(|s| {
        let b = usize::try_from(s.spec.block_size).unwrap_or(0);
        s.spec.wiring == crate::model::Wiring::Identity
            && !s.spec.truncated
            && b > 0
            && per
                .iter()
                .flat_map(|(_, _, parts)| parts)
                .all(|r| r.start % b == 0 && r.end % b == 0)
    })
}

/// `layer` as it applies at `loc`: itself, or, where it spans several tensors (a fused module
/// on a split base), the same rotation with its row scale cut to the layer rows this tensor
/// takes ([`Located::part`]); on the output side also its blocks cut to those on these rows
/// ([`Lookup`] splits an output-side layer only where each block lies in one tensor).
pub fn part_layer<'a>(layer: &'a Layer, loc: &Located) -> std::borrow::Cow<'a, Layer> {
    match &loc.part {
        None => std::borrow::Cow::Borrowed(layer),
        Some(part) => std::borrow::Cow::Owned(slice_part(layer, part)),
    }
}

/// The part of `layer` that rows `part` of its rotated axis take ([`part_layer`]).
pub fn slice_part(layer: &Layer, part: &[Range<usize>]) -> Layer {
    let mut l = layer.clone();
    if l.side == Side::Output {
        for st in &mut l.stages {
            let b = usize::try_from(st.spec.block_size).unwrap_or(1).max(1);
            let blocks: Vec<usize> = part.iter().flat_map(|r| r.start / b..r.end / b).collect();
            if !st.spec.shared {
                st.q = blocks.iter().flat_map(|&k| st.q_row(k).to_vec()).collect();
            }
            st.spec.blocks = Some(blocks.len() as u64);
        }
        let rows: usize = part.iter().map(|r| r.len()).sum();
        l.target.rotated_dim = l.target.rotated_dim.map(|_| rows as u64);
    }
    if let Some((_, scale)) = &mut l.row_scale {
        *scale = part
            .iter()
            .flat_map(|r| scale.get(r.clone()).unwrap_or_default().iter().copied())
            .collect();
    }
    l
}

/// Every way `layer` does not fit the tensor at `loc` (`target-shape`): a dtype that cannot be
/// rotated, fewer than two axes, rows outside the tensor, a stage partition or row scale that
/// does not match the covered rows.
pub fn check_shape(layer: &Layer, loc: &Located) -> Vec<Error> {
    let key = &loc.key;
    let shape = &loc.shape;
    let problem = |m: String| Error::new(Category::TargetShape, m).tensor(&layer.target.name);
    let mut out = Vec::new();
    if !matches!(
        loc.dtype,
        Dtype::F64 | Dtype::F32 | Dtype::F16 | Dtype::BF16
    ) {
        out.push(problem(format!(
            "`{key}` has dtype {:?}; only F64, F32, F16 and BF16 weights can be rotated",
            loc.dtype
        )));
    }
    if shape.len() < 2 {
        out.push(problem(format!(
            "`{key}` has shape {shape:?}, not a weight matrix"
        )));
        return out;
    }
    if !loc.rows.fits(shape[0]) {
        out.push(problem(format!(
            "`{key}` rows {} are outside its {} rows (or overlap)",
            loc.rows, shape[0]
        )));
        return out;
    }
    let covered = loc.covered_shape();
    // A row slice (q of a fused qkv) is named with its rows: the tensor itself is larger.
    let what = if loc.rows.is_whole(shape[0]) {
        format!("`{key}` has shape")
    } else {
        format!("rows {} of `{key}` have shape", loc.rows)
    };
    let rows = loc.rows.len() as u64;
    let axis = match layer.side {
        Side::Output => rows,
        Side::Input => loc.cols() as u64,
    };
    for (j, s) in layer.stages.iter().enumerate() {
        let (r, b) = (s.blocks_on(axis), s.spec.block_size);
        let n = r.checked_mul(b);
        if !s.fits_axis(axis) {
            out.push(problem(format!(
                "shape mismatch: stage {j} rotates {r} × {b} = {} {} features, but {what} {covered:?} ({axis} on that side)",
                n.map_or("more than 2^64".to_string(), |n| n.to_string()),
                layer.side.as_str()
            )));
        }
    }
    if let Some((_, v)) = &layer.row_scale
        && v.len() as u64 != rows
    {
        out.push(problem(format!(
            "shape mismatch: row scale has {} entries, `{key}` has {rows} rows",
            v.len()
        )));
    }
    out
}

/// Read `len` bytes at `offset` into a fresh buffer (not zeroed first: `read_to_end` fills
/// spare capacity directly); a file that is shorter than that is an error.
pub(crate) fn read_range(file: &File, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ModuleKind, Target};

    fn layer(name: &str, side: Side) -> Layer {
        Layer {
            target: Target {
                name: name.into(),
                convention: "unknown".into(),
                component: None,
                module: ModuleKind::Unknown,
                shape: None,
                rotated_dim: None,
                rows: None,
            },
            side,
            stages: Vec::new(),
            row_scale: Some((crate::model::ScalePosition::After, vec![1.0; 4])),
            row_scale_f64: true,
            constraint: None,
            base_binding: None,
        }
    }

    /// A base file with `w.weight` (4 × 2, F32, row r = [r, r + 0.5]) and a 0-dim `s.weight`.
    fn base_file(dir: &Path) -> PathBuf {
        let w: Vec<u8> = (0..4)
            .flat_map(|r| [r as f32, r as f32 + 0.5])
            .flat_map(f32::to_le_bytes)
            .collect();
        let s = 1f32.to_le_bytes();
        let path = dir.join("base.safetensors");
        let mut f = File::create(&path).unwrap();
        crate::tensors::write_safetensors(
            &mut f,
            &[
                ("w.weight", Dtype::F32, &[4, 2], &w),
                ("s.weight", Dtype::F32, &[], &s),
            ],
            HashMap::new(),
        )
        .unwrap();
        path
    }

    #[test]
    fn locate_read_rows_in_layer_order_and_bind() {
        let tmp = tempfile::tempdir().unwrap();
        let path = base_file(tmp.path());
        let base = Base::open(&path).unwrap();
        let mut loc = base.locate(&layer("w", Side::Output)).unwrap();
        assert_eq!(
            (loc.key.as_str(), loc.shape.as_slice()),
            ("w.weight", &[4, 2][..])
        );
        assert!(loc.rows.is_whole(4));
        assert!(check_shape(&layer("w", Side::Output), &loc).is_empty());
        loc.rows = RowSlice::new(vec![3..4, 0..2]);
        let m = base.read_f64(&loc).unwrap();
        assert_eq!((m.rows, m.cols), (3, 2));
        assert_eq!(m.data, [3.0, 3.5, 0.0, 0.5, 1.0, 1.5]);
        // The binding hashes the whole tensor, whatever rows the layer covers.
        let b = base.binding(&loc).unwrap();
        assert_eq!((b.dtype.as_str(), b.shape.as_slice()), ("F32", &[4, 2][..]));
        let f = MappedFile::open(&path).unwrap();
        let st = f.tensors();
        let bytes = st.tensor("w.weight").unwrap();
        assert_eq!(b.blake3, blake3::hash(bytes.data()).to_hex().to_string());
        let mut bound = layer("w", Side::Output);
        bound.base_binding = Some(b);
        loc.rows = RowSlice::whole(4);
        assert!(base.check(&bound, &loc).unwrap().is_empty());
        // Another tensor is not the bound one.
        let other = base.locate(&layer("s", Side::Output)).unwrap();
        let e = base.check_binding(&bound, &other).unwrap().unwrap();
        assert_eq!(e.category(), Category::Binding);
    }

    #[test]
    fn problems_are_categorised_not_panics() {
        let tmp = tempfile::tempdir().unwrap();
        let base = Base::open(&base_file(tmp.path())).unwrap();
        let e = base.locate(&layer("nope", Side::Input)).unwrap_err();
        assert_eq!(e.category(), Category::TargetMissing);
        // A 0-dim tensor under a row-scaled layer: a target-shape problem.
        let l = layer("s", Side::Output);
        let loc = base.locate(&l).unwrap();
        let p = check_shape(&l, &loc);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].category(), Category::TargetShape);
        assert!(base.read_f64(&loc).is_err());
        // A row scale of the wrong length, and rows past the end.
        let mut l = layer("w", Side::Output);
        l.row_scale = Some((crate::model::ScalePosition::After, vec![1.0; 3]));
        let mut loc = base.locate(&l).unwrap();
        assert!(
            check_shape(&l, &loc)[0]
                .message()
                .contains("row scale has 3 entries")
        );
        loc.rows = RowSlice::range(2..6);
        assert!(check_shape(&l, &loc)[0].message().contains("outside"));
    }

    /// A split (diffusers) FLUX.1 attention: `to_q`, `to_k`, `to_v`, 4 × 2 each.
    fn split_qkv(dir: &Path) -> PathBuf {
        let w: Vec<u8> = (0..8).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let keys: Vec<String> = ["to_q", "to_k", "to_v"]
            .iter()
            .map(|p| format!("transformer_blocks.0.attn.{p}.weight"))
            .collect();
        let tensors: Vec<(&str, Dtype, &[usize], &[u8])> = keys
            .iter()
            .map(|k| (k.as_str(), Dtype::F32, &[4usize, 2][..], w.as_slice()))
            .collect();
        let path = dir.join("split.safetensors");
        let mut f = File::create(&path).unwrap();
        crate::tensors::write_safetensors(&mut f, &tensors, HashMap::new()).unwrap();
        path
    }

    #[test]
    fn a_fused_module_on_a_split_base() {
        let tmp = tempfile::tempdir().unwrap();
        let base = Base::open(&split_qkv(tmp.path())).unwrap();
        // Input side: one location per tensor, each with its layer rows and row-scale part.
        let mut l = layer("diffusion_model.double_blocks.0.img_attn.qkv", Side::Input);
        l.row_scale = Some((
            crate::model::ScalePosition::After,
            (0..12).map(f64::from).collect(),
        ));
        let locs = base.locate_all(&l).unwrap();
        let keys: Vec<&str> = locs.iter().map(|l| l.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "transformer_blocks.0.attn.to_q.weight",
                "transformer_blocks.0.attn.to_k.weight",
                "transformer_blocks.0.attn.to_v.weight"
            ]
        );
        assert_eq!(locs[1].part, Some(vec![4..8]));
        assert!(locs[1].rows.is_whole(4));
        let part = part_layer(&l, &locs[1]);
        assert_eq!(part.row_scale.as_ref().unwrap().1, [4.0, 5.0, 6.0, 7.0]);
        assert!(check_shape(&part, &locs[1]).is_empty());
        assert_eq!(
            base.locate(&l).unwrap_err().category(),
            Category::Unsupported
        );
        // Rows of the fused name (kohya's splits) land on one tensor.
        l.target.rows = Some(vec![crate::model::RowRange { start: 6, len: 2 }]);
        l.row_scale = None;
        let loc = base.locate(&l).unwrap();
        assert_eq!(loc.key, "transformer_blocks.0.attn.to_k.weight");
        assert_eq!(loc.rows, RowSlice::range(2..4));
        // Rows past the fused weight, and output-side blocks across tensors: refused.
        l.target.rows = Some(vec![crate::model::RowRange { start: 10, len: 4 }]);
        let e = base.locate(&l).unwrap_err();
        assert_eq!(e.category(), Category::TargetShape);
        assert!(e.message().contains("rows 10..14 of a weight of 12 rows"));
        let mut out = layer("double_blocks.0.img_attn.qkv", Side::Output);
        out.stages = vec![crate::model::Stage::cayley(1, 4, vec![0.1; 6])];
        out.target.rows = Some(vec![crate::model::RowRange { start: 2, len: 4 }]);
        let e = base.locate_all(&out).unwrap_err();
        assert!(e.message().contains("several tensors"), "{e}");
        // Blocks that each lie in one tensor: split, each tensor rotated by its own blocks.
        out.target.rows = None;
        out.row_scale = None;
        let q: Vec<f64> = (0..6).map(f64::from).collect();
        out.stages = vec![crate::model::Stage::cayley(6, 2, q)];
        let locs = base.locate_all(&out).unwrap();
        assert_eq!(locs.len(), 3);
        let k = part_layer(&out, &locs[1]);
        assert_eq!(k.stages[0].spec.blocks, Some(2));
        assert_eq!(k.stages[0].q, [2.0, 3.0]);
        assert!(check_shape(&k, &locs[1]).is_empty());
    }

    #[test]
    fn listed_rows_compose_with_the_resolved_rows() {
        let tmp = tempfile::tempdir().unwrap();
        let base = Base::open(&base_file(tmp.path())).unwrap();
        // Rows listed out of order are taken in the listed order.
        let mut l = layer("w", Side::Output);
        l.target.rows = Some(vec![
            RowRange { start: 2, len: 2 },
            RowRange { start: 0, len: 2 },
        ]);
        let loc = base.locate(&l).unwrap();
        assert_eq!(loc.rows, RowSlice::new(vec![2..4, 0..2]));
        assert!(check_shape(&l, &loc).is_empty());
        let m = base.read_f64(&loc).unwrap();
        assert_eq!(m.data, [2.0, 2.5, 3.0, 3.5, 0.0, 0.5, 1.0, 1.5]);
        // Past the named weight's rows: a target-shape problem naming them.
        l.target.rows = Some(vec![RowRange { start: 3, len: 2 }]);
        let e = base.locate(&l).unwrap_err();
        assert_eq!(e.category(), Category::TargetShape);
        assert!(e.message().contains("of a weight of 4 rows"), "{e}");
        // Rows of a slice are rows within it.
        let s = RowSlice::new(vec![10..14, 0..4]);
        let pick = |v: &[(u64, u64)]| {
            s.select(
                &v.iter()
                    .map(|&(start, len)| RowRange { start, len })
                    .collect::<Vec<_>>(),
            )
        };
        assert_eq!(pick(&[(2, 4)]), Some(RowSlice::new(vec![12..14, 0..2])));
        assert_eq!(
            pick(&[(4, 4), (0, 4)]),
            Some(RowSlice::new(vec![0..4, 10..14]))
        );
        assert_eq!(pick(&[(0, 8)]), Some(RowSlice::new(vec![10..14, 0..4])));
        assert_eq!(pick(&[(6, 3)]), None);
        assert_eq!(
            RowSlice::range(4..8).select(&[RowRange { start: 1, len: 2 }]),
            Some(RowSlice::range(5..7))
        );
    }

    #[test]
    fn row_slices() {
        let s = RowSlice::new(vec![4..6, 0..2]);
        assert_eq!(s.len(), 4);
        assert!(s.fits(6) && !s.fits(5));
        assert!(!RowSlice::new(vec![0..3, 2..4]).fits(8), "overlap");
        assert!(RowSlice::whole(5).is_whole(5) && !s.is_whole(6));
        assert_eq!(s.contiguous(), None);
        assert_eq!(s.to_string(), "4..6, 0..2");
    }
}
