//! Bulk writes that bypass the page cache (`O_DIRECT`): the chunk files of
//! a directory store and the image of an export.
//!
//! A buffered write of a 1 MiB chunk costs the kernel a copy into freshly
//! allocated page-cache pages (57 % of the backup server's CPU in a profile
//! of a 1 GiB backup) and keeps a page cache full of data that is read
//! again only by a verify or an export. With `O_DIRECT` the device reads
//! the bytes from the process's buffer, which must be aligned: the buffers
//! here are [`ALIGN_BYTES`]-aligned, come from a small pool (a backup never
//! allocates one per chunk), and a write's length is padded up to
//! [`ALIGN_BYTES`] with zeros, the file then cut back to its true length.
//!
//! A filesystem that refuses `O_DIRECT` (`EINVAL` at open or at the first
//! write: older tmpfs, some network filesystems) gets buffered writes, and
//! one warning per store.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// The alignment of the buffers, offsets and lengths of direct writes: the
/// page size, a multiple of every logical block size in use.
pub const ALIGN_BYTES: usize = 4096;

/// The capacity of a pooled buffer: a whole 1 MiB chunk, its 5-byte store
/// header and the padding up to the alignment.
pub const POOLED_CAPACITY_BYTES: usize = (1 << 20) + 2 * ALIGN_BYTES;

/// Buffers kept for reuse at most: the chunks of a backup in flight (4
/// streams × 4 chunks) and an export's fetches, with room to spare; 40 MiB.
const POOL_MAX_BUFFERS: usize = 40;

/// `n` rounded up to a multiple of [`ALIGN_BYTES`].
pub fn align_up(n: usize) -> usize {
    n.div_ceil(ALIGN_BYTES) * ALIGN_BYTES
}

/// A byte buffer aligned to [`ALIGN_BYTES`], with a length and a fixed
/// capacity (a multiple of [`ALIGN_BYTES`]): the aligned window of a
/// zeroed `Vec` one alignment longer (no unsafe code: the `Vec` never
/// grows, so its bytes never move). Buffers of [`POOLED_CAPACITY_BYTES`]
/// return to a pool when dropped.
pub struct AlignedBuf {
    memory: Vec<u8>,
    /// Where the aligned window starts in `memory`.
    start: usize,
    capacity: usize,
    len: usize,
}

fn pool() -> &'static Mutex<Vec<Vec<u8>>> {
    static POOL: OnceLock<Mutex<Vec<Vec<u8>>>> = OnceLock::new();
    POOL.get_or_init(|| Mutex::new(Vec::new()))
}

impl AlignedBuf {
    /// An empty buffer of at least `min_capacity_bytes`: a pooled one when
    /// that fits, else a new allocation.
    pub fn with_capacity(min_capacity_bytes: usize) -> Self {
        if min_capacity_bytes <= POOLED_CAPACITY_BYTES {
            let reused = pool().lock().expect("buffer pool").pop();
            let memory = reused.unwrap_or_else(|| vec![0; POOLED_CAPACITY_BYTES + ALIGN_BYTES]);
            return Self::over(memory, POOLED_CAPACITY_BYTES);
        }
        let capacity = align_up(min_capacity_bytes);
        Self::over(vec![0; capacity + ALIGN_BYTES], capacity)
    }

    fn over(memory: Vec<u8>, capacity: usize) -> Self {
        let start = memory.as_ptr().align_offset(ALIGN_BYTES);
        assert!(start + capacity <= memory.len(), "no aligned window");
        Self {
            memory,
            start,
            capacity,
            len: 0,
        }
    }

    /// A buffer holding a copy of `data`.
    pub fn copy_of(data: &[u8]) -> Self {
        let mut buf = Self::with_capacity(data.len());
        buf.extend_from_slice(data);
        buf
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.memory[self.start..self.start + self.len]
    }

    fn whole_mut(&mut self) -> &mut [u8] {
        &mut self.memory[self.start..self.start + self.capacity]
    }

    /// The bytes after the length, to be filled and then claimed with
    /// [`AlignedBuf::set_len`].
    pub fn spare_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        &mut self.whole_mut()[len..]
    }

    /// Sets the length: the bytes below it are what was written there (or
    /// what a pooled buffer held before).
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.capacity, "{len} > capacity {}", self.capacity);
        self.len = len;
    }

    pub fn extend_from_slice(&mut self, data: &[u8]) {
        let end = self.len + data.len();
        assert!(
            end <= self.capacity,
            "{end} bytes > capacity {}",
            self.capacity
        );
        let start = self.len;
        self.whole_mut()[start..end].copy_from_slice(data);
        self.len = end;
    }

    /// The bytes padded with zeros up to a multiple of [`ALIGN_BYTES`]: what
    /// a direct write writes.
    pub fn padded(&mut self) -> &[u8] {
        let (len, padded) = (self.len, align_up(self.len));
        let whole = self.whole_mut();
        whole[len..padded].fill(0);
        &whole[..padded]
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.capacity == POOLED_CAPACITY_BYTES {
            let mut pool = pool().lock().expect("buffer pool");
            if pool.len() < POOL_MAX_BUFFERS {
                pool.push(std::mem::take(&mut self.memory));
            }
        }
    }
}

/// How the files of one store (or one export) were written.
#[derive(Debug, Default)]
pub struct WriteCounts {
    /// Files written with `O_DIRECT`.
    pub direct_files: AtomicU64,
    /// Files written through the page cache because the filesystem refused
    /// `O_DIRECT`.
    pub buffered_files: AtomicU64,
    /// Set once the filesystem refused `O_DIRECT`: later files go buffered
    /// without asking again, and the warning is logged once.
    refused: AtomicBool,
}

impl WriteCounts {
    pub fn direct_files(&self) -> u64 {
        self.direct_files.load(Ordering::Relaxed)
    }

    pub fn buffered_files(&self) -> u64 {
        self.buffered_files.load(Ordering::Relaxed)
    }

    /// True once the filesystem refused `O_DIRECT`.
    pub fn refused(&self) -> bool {
        self.refused.load(Ordering::Relaxed)
    }
}

/// The write counts of the directory store at `root`, shared by every
/// `DirBlobs` of that directory in this process (so that the fallback is
/// decided, and warned about, once per store).
pub fn store_write_counts(root: &Path) -> Arc<WriteCounts> {
    static STORES: OnceLock<Mutex<HashMap<PathBuf, Arc<WriteCounts>>>> = OnceLock::new();
    let key = std::path::absolute(root).unwrap_or_else(|_| root.to_path_buf());
    STORES
        .get_or_init(Default::default)
        .lock()
        .expect("store write counts")
        .entry(key)
        .or_default()
        .clone()
}

/// True when an error from an `O_DIRECT` open or write means the filesystem
/// does not do direct I/O (rather than that the write failed).
pub(crate) fn refuses_direct(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(code) if code == rustix::io::Errno::INVAL.raw_os_error()
            || code == rustix::io::Errno::OPNOTSUPP.raw_os_error()
    )
}

/// Directories below which `O_DIRECT` opens fail with `EINVAL`, as on a
/// filesystem that refuses direct I/O (tmpfs before Linux 6.6 did; this
/// kernel's may not), so that the tests can take the fallback path.
#[cfg(any(test, feature = "testing"))]
fn refused_roots() -> &'static Mutex<Vec<PathBuf>> {
    static ROOTS: OnceLock<Mutex<Vec<PathBuf>>> = OnceLock::new();
    ROOTS.get_or_init(Default::default)
}

/// Test hook: `O_DIRECT` opens of files below `root` fail with `EINVAL`,
/// as on a filesystem that refuses direct I/O.
#[cfg(any(test, feature = "testing"))]
pub fn refuse_direct_io_below(root: &Path) {
    let root = std::path::absolute(root).unwrap_or_else(|_| root.to_path_buf());
    refused_roots().lock().expect("refused roots").push(root);
}

/// Opens `path` for writing with `O_DIRECT` (`create_new`: a new file, or
/// `existing`: a file that is there).
pub fn open_direct(path: &Path, create_new: bool) -> io::Result<File> {
    #[cfg(any(test, feature = "testing"))]
    {
        let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let refused = refused_roots().lock().expect("refused roots");
        if refused.iter().any(|root| absolute.starts_with(root)) {
            return Err(io::Error::from_raw_os_error(
                rustix::io::Errno::INVAL.raw_os_error(),
            ));
        }
    }
    OpenOptions::new()
        .write(true)
        .create_new(create_new)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
        .open(path)
}

/// Writes all of `data` at `offset` (positional writes: many writers may
/// share the file).
pub fn write_all_at(file: &File, data: &[u8], offset: u64) -> io::Result<()> {
    file.write_all_at(data, offset)
}

/// How [`write_new_file`] wrote a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    Direct,
    Buffered,
}

/// Options of [`write_new_file`] for tests.
#[derive(Debug, Clone, Copy, Default)]
pub struct WriteHooks {
    /// Leaves a direct write's padding in the file (skips the truncation to
    /// the true length): the round-trip tests must catch it.
    pub skip_truncate: bool,
}

/// Writes `data` into the new file `path` and fsyncs it: with `O_DIRECT`
/// unless `counts` says the filesystem refused it, else (or when it refuses
/// now) through the page cache, logging once per `counts` why. The caller
/// renames the file into place and fsyncs the directory.
///
/// A direct write writes `data` padded with zeros to [`ALIGN_BYTES`], then
/// cuts the file to `data.len()` (ftruncate), then fsyncs: the fsync makes
/// the data (already on the device, not in the page cache) and the size
/// durable together.
pub fn write_new_file(
    path: &Path,
    data: &mut AlignedBuf,
    counts: &WriteCounts,
    what: &dyn std::fmt::Display,
    hooks: WriteHooks,
) -> io::Result<WriteMode> {
    if !counts.refused() {
        let refusal = match open_direct(path, true) {
            Ok(file) => {
                let len = data.len() as u64;
                match write_all_at(&file, data.padded(), 0) {
                    Ok(()) => {
                        if align_up(data.len()) as u64 != len && !hooks.skip_truncate {
                            file.set_len(len)?;
                        }
                        file.sync_all()?;
                        counts.direct_files.fetch_add(1, Ordering::Relaxed);
                        return Ok(WriteMode::Direct);
                    }
                    Err(e) if refuses_direct(&e) => {
                        drop(file);
                        std::fs::remove_file(path)?;
                        e
                    }
                    Err(e) => return Err(e),
                }
            }
            Err(e) if refuses_direct(&e) => e,
            Err(e) => return Err(e),
        };
        note_refusal(counts, what, path, &refusal);
    }
    let file = File::create_new(path)?;
    write_all_at(&file, data.as_slice(), 0)?;
    file.sync_all()?;
    counts.buffered_files.fetch_add(1, Ordering::Relaxed);
    Ok(WriteMode::Buffered)
}

/// Records that the filesystem of `what` refused `O_DIRECT`, and says so
/// the first time.
pub fn note_refusal(
    counts: &WriteCounts,
    what: &dyn std::fmt::Display,
    path: &Path,
    e: &io::Error,
) {
    if !counts.refused.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "the filesystem of {what} refused direct I/O (O_DIRECT on {}: {e}): writing through the page cache instead, which costs the backup server more CPU per GiB",
            path.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_padded_with_zeros_and_reused() {
        let mut buf = AlignedBuf::copy_of(&[7u8; 5000]);
        assert_eq!(buf.as_ptr() as usize % ALIGN_BYTES, 0);
        assert_eq!(buf.len(), 5000);
        let padded = buf.padded();
        assert_eq!(padded.len(), 8192);
        assert!(padded[5000..].iter().all(|&b| b == 0));
        assert!(padded[..5000].iter().all(|&b| b == 7));
        drop(buf);
        let again = AlignedBuf::with_capacity(1 << 20);
        assert_eq!(again.capacity(), POOLED_CAPACITY_BYTES);
        assert!(again.is_empty());
        let big = AlignedBuf::with_capacity(POOLED_CAPACITY_BYTES + 1);
        assert_eq!(big.capacity(), POOLED_CAPACITY_BYTES + ALIGN_BYTES);
        assert_eq!(big.as_ptr() as usize % ALIGN_BYTES, 0);
    }
}
