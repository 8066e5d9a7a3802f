//! The bake's stream: every base file read once in file order and written to a staging file
//! or folder beside the output, which is renamed into place only when complete and synced.
//!
//! Per file, three threads: a reader (`pread`s the next tensor to compute and hands it to the
//! backend's `load`), the compute stage (the backend's `compute`, in file order) and a writer
//! (untouched runs copied in the kernel with `copy_file_range`, computed bytes in small
//! `write()`s). Bounded channels between them keep only a few tensors in memory. Progress is
//! reported through [`Progress`]; drawing it is the caller's business.

use super::backend::{Backend, TensorBytes, TensorJob};
use super::plan::FileJob;
use crate::base::Base;
use crate::error::{Category, Error, Result};
use crate::tensors::MappedFile;
use safetensors::tensor::{Dtype, TensorInfo};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

/// Where a bake reports how far it is. Called from the writer thread.
pub trait Progress: Sync {
    /// The bake starts: `total` bytes of base files to go through.
    fn start(&self, _total: u64) {}
    /// Now writing the file at this path (relative to the output).
    fn file(&self, _relative: &Path) {}
    /// `bytes` more of the base are written out.
    fn advance(&self, _bytes: u64) {}
    /// Every file is written (also called when the bake fails).
    fn finish(&self) {}
}

/// No progress reporting.
pub struct NoProgress;

impl Progress for NoProgress {}

/// How the stream runs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StreamOptions {
    /// Tensors that may wait between the reader and the compute stage.
    pub in_flight: usize,
    /// Bytes of tensors that may be in flight ([`in_flight_limit`]).
    pub in_flight_bytes: u64,
}

/// What the stream wrote.
pub(crate) struct Written {
    pub bytes: u64,
    pub tensors_computed: usize,
}

/// Size of each write() of computed bytes.
const WRITE_PIECE: usize = 256 << 10;
/// Pieces queued for the writer: enough that computing and writing overlap.
const WRITER_QUEUE: usize = 6;
/// Writeback window: every this many bytes written, the writer starts the kernel writing them
/// to disk and waits for the window before (see [`Writeback`]).
const WRITEBACK_STEP: u64 = 64 << 20;
/// Bytes of tensor data a bake may hold at once: the adapter parameters it holds in memory
/// plus the tensors read for computing and not yet written (buffers kept for reuse included).
/// With the rest of the process (threads' scratch, R blocks, the allocator's slack) the bench's
/// bakes peaked at 104-470 MiB RSS (bench/README.md, fifth round), under the 512 MiB goal.
const MEMORY_BUDGET: u64 = 384 << 20;
/// The most bytes of tensors in flight. It must hold a FLUX.1 single block's `linear1` and
/// `linear2` at once (132 + 94 MB in BF16): with 192 MiB the reader waited for each `linear1`
/// to be written before it could read `linear2`, and a cold full-size Flux bake took 1.19 × cp
/// where 256 MiB took 1.01 × (3 alternating rounds; LLM-size 1.58 × against 1.22 ×;
/// bench/README.md, fifth round).
const MAX_IN_FLIGHT: u64 = 256 << 20;
/// The fewest bytes of tensors in flight, whatever the adapter holds (a tensor larger than the
/// limit still goes through, alone).
const MIN_IN_FLIGHT: u64 = 128 << 20;

/// Bytes of tensors the stream may have in flight beside `resident` bytes of adapter
/// parameters held in memory (a `.oft` file's are read per tensor: none).
pub(crate) fn in_flight_limit(resident: u64) -> u64 {
    MEMORY_BUDGET
        .saturating_sub(resident)
        .clamp(MIN_IN_FLIGHT, MAX_IN_FLIGHT)
}
/// How far ahead of the reader the base is requested from disk (`POSIX_FADV_WILLNEED`). Page
/// cache, not the process's memory. On a cold full-size Flux bake 1 GiB took 53.5-60.6 s
/// where 256 MiB took 56.5-71.0 s, faster in each of 3 alternating rounds (bench/README.md).
const READ_AHEAD: u64 = 1 << 30;

/// Write the baked base to `out` (a file for a single-file base, else a folder mirroring the
/// base's, with its other files copied), atomically.
pub(crate) fn write<B: Backend>(
    base: &Base,
    jobs: &[FileJob<'_>],
    out: &Path,
    metadata: &BTreeMap<String, String>,
    backend: &B,
    progress: &dyn Progress,
    opts: StreamOptions,
) -> Result<Written> {
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
    crate::tensors::clean_stale(&parent);
    let staging = tempfile::Builder::new()
        .prefix(&crate::tensors::staging_prefix())
        .tempdir_in(&parent)
        .map_err(|e| Error::io(&parent, e))?;
    let single = base.storage().root().is_none();
    let total: u64 = base
        .files()
        .iter()
        .map(|f| std::fs::metadata(&f.path).map(|m| m.len()).unwrap_or(0))
        .sum();
    progress.start(total);
    let mut written = Written {
        bytes: 0,
        tensors_computed: 0,
    };
    let result = jobs.iter().try_for_each(|job| -> Result<()> {
        let file = base
            .files()
            .get(job.file)
            .ok_or_else(|| Error::usage("a plan for another base"))?;
        let dest = if single {
            staging.path().join("out.safetensors")
        } else {
            staging.path().join(&file.relative)
        };
        if let Some(d) = dest.parent() {
            std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
        }
        progress.file(&file.relative);
        let stream = FileStream {
            input: &file.path,
            edits: &job.edits,
            out: &dest,
            metadata,
            progress,
            opts,
        };
        let (n, computed) = stream.run(backend)?;
        written.bytes += n;
        written.tensors_computed += computed;
        Ok(())
    });
    progress.finish();
    result?;
    publish(base, staging, out, &parent)?;
    Ok(written)
}

/// Move the finished staging output into place: the file, or the folder once the rest of the
/// base's folder (configs, index, other files) is copied beside the written shards.
fn publish(base: &Base, staging: tempfile::TempDir, out: &Path, parent: &Path) -> Result<()> {
    match base.storage().root() {
        None => {
            let tmp = staging.path().join("out.safetensors");
            std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
        }
        Some(root) => {
            let skip: Vec<PathBuf> = base.files().iter().map(|f| f.path.clone()).collect();
            copy_tree(root, staging.path(), &skip)?;
            let kept = staging.keep();
            std::fs::rename(&kept, out).map_err(|e| {
                let _ = std::fs::remove_dir_all(&kept);
                Error::io(out, e)
            })?;
        }
    }
    if let Ok(d) = File::open(parent) {
        let _ = d.sync_all(); // make the rename durable where the platform allows
    }
    Ok(())
}

/// Copy everything of `src` except the files in `skip` into `dst` (recursively).
fn copy_tree(src: &Path, dst: &Path, skip: &[PathBuf]) -> Result<()> {
    std::fs::create_dir_all(dst).map_err(|e| Error::io(dst, e))?;
    for entry in crate::base::list_dir(src)? {
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

/// A piece of output data: a byte range of the base copied as is, or computed bytes.
enum Piece {
    /// `len` bytes at absolute `offset` of the base file (copied in the kernel where possible).
    Range { offset: u64, len: u64 },
    /// Computed bytes and what the budget charged for them.
    Computed(TensorBytes, u64),
}

/// What the reader hands to the compute stage, in file order.
enum Work<'k, L> {
    Copy {
        offset: u64,
        len: u64,
    },
    Compute {
        key: &'k str,
        loaded: L,
        dtype: Dtype,
        shape: Vec<usize>,
        /// Stored byte length, which the computed bytes must match.
        len: usize,
        /// What the budget charged for it (released once it is written).
        charge: u64,
    },
}

/// One base file streamed to one output file.
struct FileStream<'s, 'a> {
    input: &'s Path,
    edits: &'s BTreeMap<String, Vec<super::backend::Edit<'a>>>,
    out: &'s Path,
    metadata: &'s BTreeMap<String, String>,
    progress: &'s dyn Progress,
    opts: StreamOptions,
}

impl FileStream<'_, '_> {
    /// Stream the file; returns the bytes written and the number of tensors computed.
    fn run<B: Backend>(&self, backend: &B) -> Result<(u64, usize)> {
        let mapped = MappedFile::open(self.input)?;
        mapped.advise_sequential();
        let header_bytes = output_header(&mapped, self.metadata, self.input)?;
        let header = mapped.header();
        let order = header.offset_keys();
        let data_start = mapped.data_start();
        let file = File::create(self.out).map_err(|e| Error::io(self.out, e))?;
        let source = File::open(self.input).map_err(|e| Error::io(self.input, e))?;
        let reader_file = File::open(self.input).map_err(|e| Error::io(self.input, e))?;
        let budget = Budget::new(self.opts.in_flight_bytes);
        let budget = &budget;
        std::thread::scope(|s| -> Result<(u64, usize)> {
            let (tx, rx) = sync_channel::<Piece>(WRITER_QUEUE);
            let writer = s.spawn(move || {
                let _close = budget.closer();
                self.write(rx, file, source, &header_bytes, budget)
            });
            let (wtx, wrx) = sync_channel(self.opts.in_flight.max(1));
            let (order, header) = (&order, &header);
            let reader = s.spawn(move || {
                self.read(
                    backend,
                    wtx,
                    &reader_file,
                    order,
                    header,
                    data_start,
                    budget,
                )
            });
            let computed = backend.run_stage(|| {
                let _close = budget.closer();
                self.compute(backend, wrx, &tx)
            });
            drop(tx);
            let written = writer
                .join()
                .map_err(|_| Error::new(Category::Io, "the writer thread panicked"))?;
            let read = reader
                .join()
                .map_err(|_| Error::new(Category::Io, "the reader thread panicked"))?;
            read?;
            let computed = computed?;
            Ok((written?, computed))
        })
    }

    /// Reader: walks the tensors in file order, merges untouched runs into one range and reads
    /// and loads the next tensor to compute while the previous one computes.
    #[allow(clippy::too_many_arguments)]
    fn read<'k, B: Backend>(
        &self,
        backend: &B,
        tx: SyncSender<Work<'k, B::Loaded>>,
        file: &File,
        order: &'k [String],
        header: &safetensors::tensor::Metadata,
        data_start: u64,
        budget: &Budget,
    ) -> Result<()> {
        let mut pending: Option<(u64, u64)> = None;
        let mut ahead = ReadAhead::new(file);
        for key in order {
            let info = header.info(key).ok_or_else(|| {
                Error::new(Category::Container, "the base no longer holds this tensor")
                    .at(self.input)
                    .tensor(key.as_str())
            })?;
            let (begin, end) = info.data_offsets;
            let start = data_start + begin as u64;
            let len = (end - begin) as u64;
            ahead.at(start);
            let Some(edits) = self.edits.get(key) else {
                pending = match pending {
                    Some((o, l)) if o + l == start => Some((o, l + len)),
                    Some((o, l)) => {
                        if tx.send(Work::Copy { offset: o, len: l }).is_err() {
                            return Ok(()); // a later stage failed; its error is reported
                        }
                        Some((start, len))
                    }
                    None => Some((start, len)),
                };
                continue;
            };
            if let Some((o, l)) = pending.take()
                && tx.send(Work::Copy { offset: o, len: l }).is_err()
            {
                return Ok(());
            }
            let Some((buf, charge)) = budget.acquire_buffer(len) else {
                return Ok(()); // a later stage failed; its error is reported
            };
            // pread rather than the mapping, so only the tensors in flight are resident; into
            // a buffer already written out where one fits (no fresh pages to fault in and zero).
            let bytes =
                read_into(file, start, end - begin, buf).map_err(|e| Error::io(self.input, e))?;
            let job = TensorJob {
                key,
                dtype: info.dtype,
                shape: &info.shape,
                edits,
            };
            let loaded = backend.load(&job, bytes)?;
            let work = Work::Compute {
                key,
                loaded,
                dtype: info.dtype,
                shape: info.shape.clone(),
                len: end - begin,
                charge,
            };
            if tx.send(work).is_err() {
                return Ok(());
            }
        }
        if let Some((o, l)) = pending {
            let _ = tx.send(Work::Copy { offset: o, len: l });
        }
        Ok(())
    }

    /// Compute stage: each loaded tensor through the backend, in file order; returns how many.
    fn compute<B: Backend>(
        &self,
        backend: &B,
        rx: Receiver<Work<'_, B::Loaded>>,
        tx: &SyncSender<Piece>,
    ) -> Result<usize> {
        let mut computed = 0;
        for work in rx {
            let piece = match work {
                Work::Copy { offset, len } => Piece::Range { offset, len },
                Work::Compute {
                    key,
                    loaded,
                    dtype,
                    shape,
                    len,
                    charge,
                } => {
                    let edits = self.edits.get(key).map(Vec::as_slice).unwrap_or(&[]);
                    let job = TensorJob {
                        key,
                        dtype,
                        shape: &shape,
                        edits,
                    };
                    let bytes = backend.compute(&job, loaded)?;
                    if bytes.as_bytes().len() != len {
                        return Err(Error::new(
                            Category::Tensor,
                            format!(
                                "internal error: the backend returned {} bytes for {len}",
                                bytes.as_bytes().len()
                            ),
                        )
                        .tensor(key));
                    }
                    computed += 1;
                    Piece::Computed(bytes, charge)
                }
            };
            if tx.send(piece).is_err() {
                break; // the writer failed; its error is reported
            }
        }
        Ok(computed)
    }

    /// Writer: the header, then every piece in order; syncs the file. Returns bytes written.
    fn write(
        &self,
        rx: Receiver<Piece>,
        file: File,
        mut source: File,
        header: &[u8],
        budget: &Budget,
    ) -> Result<u64> {
        let out = self.out;
        let mut wb = Writeback::new(&file);
        let mut w = BufWriter::with_capacity(1 << 20, file);
        w.write_all(header).map_err(|e| Error::io(out, e))?;
        let mut n = header.len() as u64;
        for piece in rx {
            w.flush().map_err(|e| Error::io(out, e))?;
            match piece {
                Piece::Range { offset, len } => {
                    // Untouched tensors: std::io::copy between files uses copy_file_range
                    // (or sendfile) on Linux, so the bytes never pass through user space.
                    source
                        .seek(SeekFrom::Start(offset))
                        .map_err(|e| Error::io(self.input, e))?;
                    let mut left = len;
                    while left > 0 {
                        let step = left.min(WRITEBACK_STEP);
                        let copied = std::io::copy(&mut (&mut source).take(step), w.get_mut())
                            .map_err(|e| Error::io(out, e))?;
                        if copied != step {
                            return Err(Error::new(
                                Category::Container,
                                "the file became shorter while it was being read",
                            )
                            .at(self.input));
                        }
                        left -= step;
                        n += step;
                        self.progress.advance(step);
                        wb.written(n).map_err(|e| Error::io(out, e))?;
                    }
                }
                Piece::Computed(bytes, charge) => {
                    // Computed bytes go out in small write()s: on this kind of machine one
                    // multi-MiB write costs several times the CPU of the same bytes in
                    // 256 KiB pieces (measured: bench/README.md).
                    for piece in bytes.as_bytes().chunks(WRITE_PIECE) {
                        w.get_mut()
                            .write_all(piece)
                            .map_err(|e| Error::io(out, e))?;
                        self.progress.advance(piece.len() as u64);
                        n += piece.len() as u64;
                        wb.written(n).map_err(|e| Error::io(out, e))?;
                    }
                    match bytes {
                        TensorBytes::Bytes(v) => budget.release_buffer(charge, Some(v)),
                        _ => budget.release_buffer(charge, None),
                    }
                }
            }
        }
        let f = w.into_inner().map_err(|e| Error::io(out, e.into_error()))?;
        f.sync_all().map_err(|e| Error::io(out, e))?;
        Ok(n)
    }
}

/// `len` bytes at `offset` of `file`, read into `buf` (its contents dropped; its capacity
/// used without zeroing where it suffices).
fn read_into(file: &File, offset: u64, len: usize, mut buf: Vec<u8>) -> std::io::Result<Vec<u8>> {
    let mut f = file;
    f.seek(SeekFrom::Start(offset))?;
    buf.clear();
    buf.reserve_exact(len);
    f.take(len as u64).read_to_end(&mut buf)?;
    if buf.len() != len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the file became shorter while it was being read",
        ));
    }
    Ok(buf)
}

/// The bytes of computed tensors in flight (read, not yet written), shared by the reader (which
/// waits for room before reading a tensor) and the writer (which frees it). Closed when the
/// compute stage or the writer ends, so a reader waiting for room never waits for a stage that
/// failed.
///
/// It also keeps the buffers of written tensors for the reader to read the next tensors into:
/// a fresh multi-MiB allocation is fresh pages, which the kernel faults in and zeroes one by
/// one (on a cold Flux-size bake ~12 % of all CPU samples were page faults and page clearing).
/// Kept buffers count against the same limit, so the memory held stays what the limit says: a
/// buffer is kept only where it fits beside the bytes in flight, a reused buffer is charged its
/// whole capacity (not the smaller tensor read into it, which let the memory held outgrow the
/// limit), and a reader waiting for room frees the other kept buffers before it waits.
struct Budget {
    limit: u64,
    state: std::sync::Mutex<BudgetState>,
    room: std::sync::Condvar,
}

#[derive(Default)]
struct BudgetState {
    in_flight: u64,
    closed: bool,
    kept: Vec<Vec<u8>>,
}

impl BudgetState {
    fn kept_bytes(&self) -> u64 {
        self.kept.iter().map(|v| v.capacity() as u64).sum()
    }
}

impl Budget {
    fn new(limit: u64) -> Self {
        Budget {
            limit,
            state: std::sync::Mutex::new(BudgetState::default()),
            room: std::sync::Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BudgetState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wait until `n` more bytes fit (or nothing is in flight); false once closed.
    #[cfg(test)]
    fn acquire(&self, n: u64) -> bool {
        self.acquire_buffer(n).is_some()
    }

    /// Wait until `n` more bytes fit (or nothing is in flight) and return a buffer to read
    /// them into, with what it is charged: the smallest kept buffer that holds them (charged
    /// its whole capacity, which is what it holds) where that fits, else a new empty one
    /// (charged `n`); `None` once closed. The charge is handed back to
    /// [`Budget::release_buffer`].
    fn acquire_buffer(&self, n: u64) -> Option<(Vec<u8>, u64)> {
        let mut st = self.lock();
        loop {
            if st.closed {
                return None;
            }
            // (Again after each wait: the writer may have handed one back meanwhile.)
            let best = st
                .kept
                .iter()
                .enumerate()
                .filter(|(_, v)| v.capacity() as u64 >= n)
                .min_by_key(|(_, v)| v.capacity())
                .map(|(i, v)| (i, v.capacity() as u64));
            let kept = st.kept_bytes();
            let charge = best.map_or(n, |(_, cap)| cap);
            let others = kept - best.map_or(0, |(_, cap)| cap);
            if st.in_flight + others + charge <= self.limit {
                let buf = best.map(|(i, _)| st.kept.swap_remove(i));
                st.in_flight += charge;
                return Some((buf.unwrap_or_default(), charge));
            }
            if others > 0 {
                // Room before reuse: free the kept buffers but the one that holds `n`.
                let keep = best.map(|(i, _)| st.kept.swap_remove(i));
                st.kept.clear();
                st.kept.extend(keep);
            } else if best.is_some() && st.in_flight + n <= self.limit {
                st.kept.clear(); // the one that holds `n` is too large: a fresh one fits
            } else if st.in_flight == 0 {
                st.kept.clear();
                st.in_flight += n; // larger than the limit: alone
                return Some((Vec::new(), n));
            } else {
                st = self.room.wait(st).unwrap_or_else(|p| p.into_inner());
            }
        }
    }

    /// A tensor charged `charge` is written; keep its buffer if it fits beside what is in
    /// flight.
    fn release_buffer(&self, charge: u64, buf: Option<Vec<u8>>) {
        let mut st = self.lock();
        st.in_flight = st.in_flight.saturating_sub(charge);
        if let Some(v) = buf
            && st.in_flight + st.kept_bytes() + v.capacity() as u64 <= self.limit
        {
            st.kept.push(v);
        }
        self.room.notify_all();
    }

    #[cfg(test)]
    fn release(&self, n: u64) {
        self.release_buffer(n, None)
    }

    fn close(&self) {
        let mut st = self.lock();
        st.closed = true;
        st.kept.clear();
        self.room.notify_all();
    }

    /// Closes the budget when dropped (at the end of a stage, also when it fails or panics).
    fn closer(&self) -> impl Drop + '_ {
        struct Closer<'b>(&'b Budget);
        impl Drop for Closer<'_> {
            fn drop(&mut self) {
                self.0.close();
            }
        }
        Closer(self)
    }
}

/// Read-ahead of the base (Linux): the kernel is asked for the next [`READ_AHEAD`] bytes
/// ahead of the reader (`POSIX_FADV_WILLNEED`, which queues the reads without waiting), so a
/// base that is not in the page cache streams from disk while tensors compute and the writer
/// copies. Elsewhere this does nothing.
struct ReadAhead {
    #[cfg(target_os = "linux")]
    fd: std::os::fd::RawFd,
    /// Requested up to this offset.
    asked: u64,
}

impl ReadAhead {
    fn new(file: &File) -> Self {
        #[cfg(target_os = "linux")]
        let fd = std::os::fd::AsRawFd::as_raw_fd(file);
        #[cfg(target_os = "linux")]
        // SAFETY: an advice on a file descriptor the reader owns; no memory is passed.
        unsafe {
            libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_SEQUENTIAL);
        }
        #[cfg(not(target_os = "linux"))]
        let _ = file;
        ReadAhead {
            #[cfg(target_os = "linux")]
            fd,
            asked: 0,
        }
    }

    /// The reader is at `offset`.
    fn at(&mut self, offset: u64) {
        let want = offset + READ_AHEAD;
        if want < self.asked + READ_AHEAD / 4 {
            return;
        }
        let from = self.asked.max(offset);
        #[cfg(target_os = "linux")]
        // SAFETY: as in `new`; an advice never fails in a way that matters (it is a hint).
        unsafe {
            libc::posix_fadvise(
                self.fd,
                from as i64,
                (want - from) as i64,
                libc::POSIX_FADV_WILLNEED,
            );
        }
        let _ = from;
        self.asked = want;
    }
}

/// Writeback that overlaps the bake (Linux): every [`WRITEBACK_STEP`] bytes the writer asks
/// the kernel to start writing the new window to disk (`sync_file_range`, asynchronous), then
/// waits for the window before it and drops it from the page cache. So the final fsync has at
/// most two windows left, dirty pages never pile up, and an output larger than the page cache
/// does not push the base out of it: the bake streams at the disk's speed instead of paying one
/// long fsync at the end. Elsewhere this does nothing and the final fsync does it all.
struct Writeback {
    #[cfg(target_os = "linux")]
    fd: std::os::fd::RawFd,
    /// Bytes handed to the kernel's writeback so far.
    started: u64,
    /// Bytes known to be on disk (and dropped from the cache).
    done: u64,
}

impl Writeback {
    fn new(file: &File) -> Self {
        #[cfg(target_os = "linux")]
        let fd = std::os::fd::AsRawFd::as_raw_fd(file);
        #[cfg(not(target_os = "linux"))]
        let _ = file;
        Writeback {
            #[cfg(target_os = "linux")]
            fd,
            started: 0,
            done: 0,
        }
    }

    /// `written` bytes of the file are written (with write() or copy_file_range).
    fn written(&mut self, written: u64) -> std::io::Result<()> {
        if written < self.started + WRITEBACK_STEP {
            return Ok(());
        }
        #[cfg(target_os = "linux")]
        {
            let (done, started) = (self.done as i64, self.started as i64);
            // SAFETY: plain syscalls on a file descriptor this writer owns for the whole loop;
            // no memory is passed.
            unsafe {
                if libc::sync_file_range(
                    self.fd,
                    started,
                    written as i64 - started,
                    libc::SYNC_FILE_RANGE_WRITE,
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                if started > done {
                    // An error here (EIO) is reported once; fsync would not see it again.
                    if libc::sync_file_range(
                        self.fd,
                        done,
                        started - done,
                        libc::SYNC_FILE_RANGE_WAIT_BEFORE
                            | libc::SYNC_FILE_RANGE_WRITE
                            | libc::SYNC_FILE_RANGE_WAIT_AFTER,
                    ) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    libc::posix_fadvise(self.fd, done, started - done, libc::POSIX_FADV_DONTNEED);
                }
            }
            self.done = self.started;
        }
        self.started = written;
        Ok(())
    }
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
        .filter_map(|k| {
            let info = (*infos.get(&k)?).clone();
            Some((k, info))
        })
        .collect();
    crate::tensors::encode_header(meta, tensors).map_err(|e| e.or_at(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Kept buffers: kept only beside what is in flight within the limit; the smallest that
    /// fits is handed out and charged its capacity; a reader short of room frees them before
    /// waiting.
    #[test]
    fn budget_keeps_buffers_within_the_limit() {
        let b = Budget::new(1000);
        let (x, cx) = b.acquire_buffer(300).unwrap();
        let (_, cy) = b.acquire_buffer(300).unwrap();
        let (_, cz) = b.acquire_buffer(300).unwrap();
        assert_eq!((x.capacity(), cx), (0, 300)); // nothing kept yet: a new buffer
        b.release_buffer(cx, Some(Vec::with_capacity(300))); // 600 in flight + 300 kept
        b.release_buffer(cy, Some(Vec::with_capacity(200))); // 300 + 500
        // The smallest kept buffer that holds 150 bytes, charged its capacity: 500 + 300.
        let (v, c) = b.acquire_buffer(150).unwrap();
        assert_eq!((v.capacity(), c), (200, 200));
        // 500 in flight + 300 kept + 400 > 1000: the kept 300 (too small) is freed, then it fits.
        let (v, c) = b.acquire_buffer(400).unwrap();
        assert_eq!((v.capacity(), c), (0, 400)); // 900 in flight, nothing kept
        b.release_buffer(c, Some(Vec::with_capacity(5000))); // too large to keep: 500
        b.release_buffer(cz, Some(Vec::with_capacity(450))); // 200 + 450 kept
        // 100 bytes into the kept 450: charged 450, what it holds (650 in flight), not 100 ...
        let (v, c) = b.acquire_buffer(100).unwrap();
        assert_eq!((v.capacity(), c), (450, 450));
        // ... so 400 more wait until it is written (650 + 400 > 1000).
        std::thread::scope(|s| {
            let waiter = s.spawn(|| b.acquire_buffer(400).map(|(_, c)| c));
            std::thread::sleep(std::time::Duration::from_millis(20));
            assert!(!waiter.is_finished());
            b.release_buffer(c, None);
            assert_eq!(waiter.join().unwrap(), Some(400));
        });
        let file = tempfile::tempfile().unwrap();
        (&file).write_all(b"0123456789").unwrap();
        let got = read_into(&file, 3, 4, Vec::with_capacity(64)).unwrap();
        assert_eq!(got, b"3456");
        assert!(read_into(&file, 8, 4, Vec::new()).is_err());
    }

    /// Adapter parameters held in memory leave less room for tensors in flight, within bounds.
    #[test]
    fn in_flight_limit_shares_the_memory_budget() {
        assert_eq!(in_flight_limit(0), MAX_IN_FLIGHT);
        assert_eq!(
            in_flight_limit(MEMORY_BUDGET - MAX_IN_FLIGHT),
            MAX_IN_FLIGHT
        );
        // A OneTrainer Flux adapter read whole: 23.5 M values in f64.
        let held = 8 * 23_500_000;
        assert_eq!(in_flight_limit(held), MEMORY_BUDGET - held);
        assert!(in_flight_limit(held) < MAX_IN_FLIGHT);
        assert_eq!(in_flight_limit(u64::MAX), MIN_IN_FLIGHT);
    }

    /// The in-flight budget lets a tensor larger than the limit through alone, waits for room
    /// otherwise, and stops a waiting reader once a stage has ended.
    #[test]
    fn budget_bounds_and_closes() {
        let b = Budget::new(100);
        assert!(b.acquire(150)); // alone: allowed although over the limit
        b.release(150);
        assert!(b.acquire(60));
        std::thread::scope(|s| {
            let waiter = s.spawn(|| b.acquire(60)); // 120 > 100: waits for the release
            std::thread::sleep(std::time::Duration::from_millis(20));
            b.release(60);
            assert!(waiter.join().unwrap());
        });
        std::thread::scope(|s| {
            let waiter = s.spawn(|| b.acquire(60)); // waits, then the budget closes
            std::thread::sleep(std::time::Duration::from_millis(20));
            drop(b.closer());
            assert!(!waiter.join().unwrap());
        });
    }
}
