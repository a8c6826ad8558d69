//! Where a real LU's blocks live. The array talks to this small trait, not to
//! files, so that a simulator (or a test) can swap in memory.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Byte-addressed storage of one real LU. Offsets and lengths are always
/// whole blocks inside the LU; the array checks that before calling.
pub trait LuStorage: Send + Sync + 'static {
    fn read_at(&self, buf: &mut [u8], offset_bytes: u64) -> io::Result<()>;
    fn write_at(&self, data: &[u8], offset_bytes: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn sync_data(&self) -> io::Result<()>;
    /// [`Self::read_at`] for bulk work (a backup's reads, copies,
    /// checksums): the same bytes, but without filling the page cache.
    fn read_bulk_at(&self, buf: &mut [u8], offset_bytes: u64) -> io::Result<()> {
        self.read_at(buf, offset_bytes)
    }
    /// [`Self::write_at`] for bulk work (a resync's or a restore's copies):
    /// the same durability as `write_at` (durable after `sync_data`), but
    /// without filling the page cache.
    fn write_bulk_at(&self, data: &[u8], offset_bytes: u64) -> io::Result<()> {
        self.write_at(data, offset_bytes)
    }
    /// Whether the range is known to be a hole (reads as zeros without
    /// touching the disk). `false` when unknown.
    fn is_hole(&self, _offset_bytes: u64, _len_bytes: u64) -> io::Result<bool> {
        Ok(false)
    }
}

/// The alignment (of buffers, offsets and lengths) with which bulk I/O
/// bypasses the page cache: 4096 satisfies every logical block size Linux
/// asks of `O_DIRECT` on the devices the array runs on.
pub const DIRECT_ALIGN_BYTES: usize = 4096;

/// Bulk I/O from or into a buffer that is not [`DIRECT_ALIGN_BYTES`]-aligned
/// (the array's `Vec`s are not) goes through scratch buffers of this size,
/// one copy per chunk.
const SCRATCH_BYTES: usize = 1 << 20;

/// Scratch buffers kept for reuse once returned; more may exist at a time
/// (one per bulk transfer in flight), the rest are freed.
const POOLED_SCRATCH_BUFFERS: usize = 4;

/// With the `testing` feature, set in the environment of an array node to
/// make it open every LU file as if the file system refused `O_DIRECT`
/// (the fallback, on a file system that does accept it).
#[cfg(any(test, feature = "testing"))]
pub const TEST_REFUSE_O_DIRECT_ENV: &str = "SPLITMIRROR_TEST_REFUSE_O_DIRECT";

/// A sparse raw image file, readable by `qemu-img` and `cmp`.
///
/// Small I/O (a database's writes and reads) goes through the page cache.
/// Bulk I/O ([`LuStorage::read_bulk_at`], [`LuStorage::write_bulk_at`]: a
/// backup's reads, a resync's copies, checksums) goes through a second
/// descriptor of the same file opened with `O_DIRECT`, so that streaming
/// a whole LU does not evict the database's working set from memory.
///
/// Why the two paths stay coherent: for every `O_DIRECT` read or write,
/// Linux first writes back the dirty page-cache pages of the range (so a
/// direct read sees every completed buffered write), and after a direct
/// write it invalidates the cached pages of the range (so a later buffered
/// read sees the direct write). What the kernel cannot order is a buffered
/// and a direct transfer of the same blocks running at the same time; the
/// array never lets them: its range locks keep a bulk copy, read or
/// checksum and a mirror write of overlapping blocks apart in time
/// (`tests/src/array_direct.rs` races them, and shows the checker fails
/// with the range lock disabled).
///
/// Durability is the same on both paths: [`LuStorage::sync_data`]
/// (`fdatasync` of the file) covers writes through either descriptor; a
/// direct write still needs it for the device's volatile cache and for the
/// metadata of blocks it allocated in the sparse file.
///
/// A file system that refuses `O_DIRECT` (tmpfs before Linux 6.6, some
/// FUSE file systems) gets `BulkIo::PageCacheDropped` instead, logged once
/// per LU file.
pub struct FileStorage {
    file: File,
    bulk: BulkIo,
}

/// How [`FileStorage`] does its bulk I/O.
enum BulkIo {
    /// Through this second descriptor of the file, opened with `O_DIRECT`.
    /// Transfers whose offset or length is not [`DIRECT_ALIGN_BYTES`]-aligned
    /// (possible on an LU of 512-byte blocks) are buffered like small I/O.
    Direct(File),
    /// The file system refused `O_DIRECT`: through the page cache, on this
    /// second buffered descriptor, then dropped from it with
    /// `posix_fadvise(DONTNEED)`. A write is written with `RWF_DSYNC` first,
    /// because `DONTNEED` cannot drop dirty pages. The descriptor is marked
    /// `POSIX_FADV_RANDOM` (no readahead, which is per descriptor): measured
    /// on ext4 (Linux 6.18), readahead's folios straddle the next range and
    /// kept 234 of 256 MiB read in 1 MiB reads cached despite `DONTNEED`;
    /// without readahead none stayed.
    PageCacheDropped(File),
}

impl FileStorage {
    /// Opens `path`, creating it sparse at `size_bytes` if it does not
    /// exist. An existing file of another size is an error: growing or
    /// truncating it would change what the LU holds.
    pub fn open_or_create(path: &Path, size_bytes: u64) -> io::Result<Self> {
        #[cfg(any(test, feature = "testing"))]
        let refuse_direct = std::env::var_os(TEST_REFUSE_O_DIRECT_ENV).is_some();
        #[cfg(not(any(test, feature = "testing")))]
        let refuse_direct = false;
        Self::open_with(path, size_bytes, refuse_direct)
    }

    /// [`Self::open_or_create`]; `refuse_direct` acts as if the file system
    /// refused `O_DIRECT` (for tests of the fallback).
    fn open_with(path: &Path, size_bytes: u64, refuse_direct: bool) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let len_bytes = file.metadata()?.len();
        if len_bytes == 0 {
            file.set_len(size_bytes)?;
            file.sync_all()?;
        } else if len_bytes != size_bytes {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} holds {len_bytes} bytes but the config says {size_bytes}; \
                     refusing to resize an existing LU",
                    path.display()
                ),
            ));
        }
        let direct = if refuse_direct {
            None
        } else {
            open_direct(path)?
        };
        let bulk = match direct {
            Some(direct) => BulkIo::Direct(direct),
            None => {
                let buffered = OpenOptions::new().read(true).write(true).open(path)?;
                rustix::fs::fadvise(&buffered, 0, None, rustix::fs::Advice::Random)?;
                tracing::warn!(
                    "LU file {}: the file system refuses O_DIRECT; bulk I/O goes through \
                     the page cache with posix_fadvise(DONTNEED)",
                    path.display()
                );
                BulkIo::PageCacheDropped(buffered)
            }
        };
        Ok(Self { file, bulk })
    }

    /// Whether bulk I/O bypasses the page cache (`O_DIRECT`) rather than
    /// taking the fallback.
    pub fn bulk_is_direct(&self) -> bool {
        matches!(self.bulk, BulkIo::Direct(_))
    }
}

/// A buffered read (on a descriptor without readahead) whose pages are then
/// dropped from the page cache.
fn read_uncached(file: &File, buf: &mut [u8], offset_bytes: u64) -> io::Result<()> {
    file.read_exact_at(buf, offset_bytes)?;
    drop_cached(file, offset_bytes, buf.len())
}

/// A buffered write, written back at once (`RWF_DSYNC`: only this range,
/// unlike `fdatasync`) so that its pages are clean and can be dropped from
/// the page cache.
fn write_uncached(file: &File, data: &[u8], offset_bytes: u64) -> io::Result<()> {
    let mut done = 0;
    while done < data.len() {
        let slice = [io::IoSlice::new(&data[done..])];
        match rustix::io::pwritev2(
            file,
            &slice,
            offset_bytes + done as u64,
            rustix::io::ReadWriteFlags::DSYNC,
        ) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            Ok(n) => done += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    drop_cached(file, offset_bytes, data.len())
}

/// Opens a second descriptor of `path` with `O_DIRECT`; `None` when the
/// file system refuses it.
fn open_direct(path: &Path) -> io::Result<Option<File>> {
    use rustix::fs::{Mode, OFlags};
    match rustix::fs::open(
        path,
        OFlags::RDWR | OFlags::DIRECT | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => Ok(Some(File::from(fd))),
        // open(2): EINVAL "the filesystem does not support O_DIRECT".
        Err(rustix::io::Errno::INVAL) => Ok(None),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("opening {} with O_DIRECT: {e}", path.display()),
        )),
    }
}

/// Drops the (clean) cached pages of a range.
fn drop_cached(file: &File, offset_bytes: u64, len_bytes: usize) -> io::Result<()> {
    let Some(len) = std::num::NonZeroU64::new(len_bytes as u64) else {
        return Ok(());
    };
    rustix::fs::fadvise(file, offset_bytes, Some(len), rustix::fs::Advice::DontNeed)
        .map_err(io::Error::from)
}

/// Whether `offset_bytes` and `len_bytes` suit `O_DIRECT`.
fn direct_aligned(offset_bytes: u64, len_bytes: usize) -> bool {
    offset_bytes.is_multiple_of(DIRECT_ALIGN_BYTES as u64)
        && len_bytes.is_multiple_of(DIRECT_ALIGN_BYTES)
}

/// Whether a buffer's address suits `O_DIRECT`.
fn buffer_aligned(buf: &[u8]) -> bool {
    (buf.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN_BYTES)
}

/// A [`SCRATCH_BYTES`] buffer whose start is [`DIRECT_ALIGN_BYTES`]-aligned:
/// a plain `Vec` one alignment longer, used from its first aligned byte.
struct ScratchBuffer {
    bytes: Vec<u8>,
    start: usize,
}

impl ScratchBuffer {
    fn new() -> Self {
        let bytes = vec![0u8; SCRATCH_BYTES + DIRECT_ALIGN_BYTES];
        let start = bytes.as_ptr().align_offset(DIRECT_ALIGN_BYTES);
        Self { bytes, start }
    }

    fn slice_mut(&mut self, len: usize) -> &mut [u8] {
        &mut self.bytes[self.start..self.start + len]
    }
}

/// Scratch buffers returned by finished bulk transfers, for the next ones:
/// a bulk transfer allocates nothing in the steady state.
static SCRATCH_POOL: std::sync::Mutex<Vec<ScratchBuffer>> = std::sync::Mutex::new(Vec::new());

/// Runs `f` with a scratch buffer from the pool (or a new one), then gives
/// it back.
fn with_scratch<T>(f: impl FnOnce(&mut ScratchBuffer) -> T) -> T {
    let pooled = SCRATCH_POOL
        .lock()
        .map(|mut pool| pool.pop())
        .ok()
        .flatten();
    let mut scratch = pooled.unwrap_or_else(ScratchBuffer::new);
    let answer = f(&mut scratch);
    if let Ok(mut pool) = SCRATCH_POOL.lock()
        && pool.len() < POOLED_SCRATCH_BUFFERS
    {
        pool.push(scratch);
    }
    answer
}

/// An `O_DIRECT` read of an aligned range into `buf`, through scratch
/// buffers when `buf` itself is not aligned.
fn read_direct(direct: &File, buf: &mut [u8], offset_bytes: u64) -> io::Result<()> {
    if buffer_aligned(buf) {
        return direct.read_exact_at(buf, offset_bytes);
    }
    with_scratch(|scratch| {
        let mut offset = offset_bytes;
        for piece in buf.chunks_mut(SCRATCH_BYTES) {
            let aligned = scratch.slice_mut(piece.len());
            direct.read_exact_at(aligned, offset)?;
            piece.copy_from_slice(aligned);
            offset += piece.len() as u64;
        }
        Ok(())
    })
}

/// An `O_DIRECT` write of an aligned range from `data`, through scratch
/// buffers when `data` itself is not aligned.
fn write_direct(direct: &File, data: &[u8], offset_bytes: u64) -> io::Result<()> {
    if buffer_aligned(data) {
        return direct.write_all_at(data, offset_bytes);
    }
    with_scratch(|scratch| {
        let mut offset = offset_bytes;
        for piece in data.chunks(SCRATCH_BYTES) {
            let aligned = scratch.slice_mut(piece.len());
            aligned.copy_from_slice(piece);
            direct.write_all_at(aligned, offset)?;
            offset += piece.len() as u64;
        }
        Ok(())
    })
}

impl LuStorage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset_bytes: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset_bytes)
    }

    fn write_at(&self, data: &[u8], offset_bytes: u64) -> io::Result<()> {
        self.file.write_all_at(data, offset_bytes)
    }

    fn sync_data(&self) -> io::Result<()> {
        // fdatasync writes back and flushes what either descriptor wrote:
        // both are the same inode.
        self.file.sync_data()
    }

    fn read_bulk_at(&self, buf: &mut [u8], offset_bytes: u64) -> io::Result<()> {
        match &self.bulk {
            BulkIo::Direct(direct) if direct_aligned(offset_bytes, buf.len()) => {
                read_direct(direct, buf, offset_bytes)
            }
            // An unaligned range (an LU of 512-byte blocks) stays in the
            // page cache, as small I/O does: dropping its pages would cost
            // the written ones a write-back each.
            BulkIo::Direct(_) => self.read_at(buf, offset_bytes),
            BulkIo::PageCacheDropped(buffered) => read_uncached(buffered, buf, offset_bytes),
        }
    }

    fn write_bulk_at(&self, data: &[u8], offset_bytes: u64) -> io::Result<()> {
        match &self.bulk {
            BulkIo::Direct(direct) if direct_aligned(offset_bytes, data.len()) => {
                write_direct(direct, data, offset_bytes)
            }
            BulkIo::Direct(_) => self.write_at(data, offset_bytes),
            BulkIo::PageCacheDropped(buffered) => write_uncached(buffered, data, offset_bytes),
        }
    }

    /// Asks the file system where the next data after `offset_bytes` is
    /// (`SEEK_DATA`): none before the end of the range means a hole.
    fn is_hole(&self, offset_bytes: u64, len_bytes: u64) -> io::Result<bool> {
        match rustix::fs::seek(&self.file, rustix::fs::SeekFrom::Data(offset_bytes)) {
            Ok(next_data) => Ok(next_data >= offset_bytes + len_bytes),
            // No data at or after the offset at all.
            Err(rustix::io::Errno::NXIO) => Ok(true),
            // A file system without SEEK_DATA: unknown, so read it.
            Err(_) => Ok(false),
        }
    }
}

/// An LU in memory, for unit tests.
#[cfg(any(test, feature = "testing"))]
pub struct MemoryStorage {
    bytes: std::sync::Mutex<Vec<u8>>,
}

#[cfg(any(test, feature = "testing"))]
impl MemoryStorage {
    pub fn new(size_bytes: usize) -> Self {
        Self {
            bytes: std::sync::Mutex::new(vec![0; size_bytes]),
        }
    }
}

#[cfg(any(test, feature = "testing"))]
impl LuStorage for MemoryStorage {
    fn read_at(&self, buf: &mut [u8], offset_bytes: u64) -> io::Result<()> {
        let bytes = self.bytes.lock().expect("memory LU poisoned");
        let start = usize::try_from(offset_bytes).map_err(io::Error::other)?;
        let source = bytes
            .get(start..start + buf.len())
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(source);
        Ok(())
    }

    fn write_at(&self, data: &[u8], offset_bytes: u64) -> io::Result<()> {
        let mut bytes = self.bytes.lock().expect("memory LU poisoned");
        let start = usize::try_from(offset_bytes).map_err(io::Error::other)?;
        let target = bytes
            .get_mut(start..start + data.len())
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        target.copy_from_slice(data);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    /// A recognisable pattern: every 8-byte word holds its offset xor `tag`.
    fn pattern(offset_bytes: u64, len: usize, tag: u64) -> Vec<u8> {
        (0..len / 8)
            .flat_map(|i| ((offset_bytes + 8 * i as u64) ^ tag).to_le_bytes())
            .collect()
    }

    /// Bulk and small I/O of one file agree, whichever path bulk I/O takes:
    /// a bulk read sees buffered writes still dirty in the page cache, a
    /// buffered read after a cached read sees a later bulk write, aligned
    /// and unaligned buffers, ranges longer than a scratch buffer, and
    /// ranges that are not 4096-aligned.
    fn bulk_and_small_io_agree(storage: &FileStorage) {
        let size = 8 * MIB;
        // Buffered, not synced: dirty pages the direct read must see.
        let first = pattern(0, size, 1);
        storage.write_at(&first, 0).expect("buffered write");
        let mut unaligned = vec![0u8; 3 * MIB + 4096 + 1];
        let unaligned = &mut unaligned[1..];
        assert!(!buffer_aligned(unaligned));
        storage
            .read_bulk_at(unaligned, MIB as u64)
            .expect("bulk read, unaligned buffer");
        assert!(unaligned == &first[MIB..4 * MIB + 4096]);
        let mut aligned = ScratchBuffer::new();
        let aligned = aligned.slice_mut(MIB);
        storage
            .read_bulk_at(aligned, 2 * MIB as u64)
            .expect("bulk read, aligned buffer");
        assert!(aligned == &first[2 * MIB..3 * MIB]);

        // Cache the range, then overwrite it in bulk: the cached pages must
        // not be what a buffered read answers afterwards.
        let mut cached = vec![0u8; 2 * MIB];
        storage.read_at(&mut cached, 0).expect("buffered read");
        let second = pattern(0, 2 * MIB + 8192, 2);
        let mut unaligned = vec![0u8; second.len() + 1];
        unaligned[1..].copy_from_slice(&second);
        storage
            .write_bulk_at(&unaligned[1..], 4096)
            .expect("bulk write, unaligned buffer");
        storage.read_at(&mut cached, 4096).expect("buffered read");
        assert!(cached == second[..2 * MIB]);

        // A range that O_DIRECT cannot take (512-byte aligned only).
        let third = pattern(512, 256 * 1024, 3);
        storage
            .write_bulk_at(&third, 5 * MIB as u64 + 512)
            .expect("bulk write, 512-aligned");
        let mut back = vec![0u8; third.len()];
        storage
            .read_bulk_at(&mut back, 5 * MIB as u64 + 512)
            .expect("bulk read, 512-aligned");
        assert!(back == third);
        storage
            .read_at(&mut back, 5 * MIB as u64 + 512)
            .expect("read");
        assert!(back == third);
        storage.sync_data().expect("sync");
    }

    #[test]
    fn bulk_io_on_a_disk_file_system_is_direct_and_coherent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = FileStorage::open_with(&dir.path().join("lu.img"), 8 * MIB as u64, false)
            .expect("open");
        if !storage.bulk_is_direct() {
            eprintln!(
                "skipping the O_DIRECT half: {} refuses O_DIRECT (the fallback is still checked)",
                dir.path().display()
            );
        }
        bulk_and_small_io_agree(&storage);
    }

    #[test]
    fn the_fallback_without_o_direct_is_coherent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage =
            FileStorage::open_with(&dir.path().join("lu.img"), 8 * MIB as u64, true).expect("open");
        assert!(!storage.bulk_is_direct());
        bulk_and_small_io_agree(&storage);
    }

    /// tmpfs refuses O_DIRECT before Linux 6.6 and accepts it since; either
    /// way the bulk path answers the same bytes.
    #[test]
    fn bulk_io_on_tmpfs_is_coherent() {
        let shm = Path::new("/dev/shm");
        if !shm.is_dir() {
            eprintln!("skipping: no /dev/shm (tmpfs) on this machine");
            return;
        }
        let dir = tempfile::tempdir_in(shm).expect("tempdir in /dev/shm");
        let storage = FileStorage::open_with(&dir.path().join("lu.img"), 8 * MIB as u64, false)
            .expect("open");
        eprintln!(
            "/dev/shm: bulk I/O is {}",
            if storage.bulk_is_direct() {
                "O_DIRECT (Linux 6.6 or later)"
            } else {
                "the page-cache fallback"
            }
        );
        bulk_and_small_io_agree(&storage);
    }

    #[test]
    fn scratch_buffers_are_aligned() {
        for _ in 0..3 {
            let mut scratch = ScratchBuffer::new();
            assert!(buffer_aligned(scratch.slice_mut(SCRATCH_BYTES)));
        }
        with_scratch(|s| assert!(buffer_aligned(s.slice_mut(SCRATCH_BYTES))));
        with_scratch(|s| assert!(buffer_aligned(s.slice_mut(SCRATCH_BYTES))));
    }
}
