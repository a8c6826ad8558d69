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

/// A sparse raw image file, readable by `qemu-img` and `cmp`.
pub struct FileStorage {
    file: File,
}

impl FileStorage {
    /// Opens `path`, creating it sparse at `size_bytes` if it does not
    /// exist. An existing file of another size is an error: growing or
    /// truncating it would change what the LU holds.
    pub fn open_or_create(path: &Path, size_bytes: u64) -> io::Result<Self> {
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
        Ok(Self { file })
    }
}

impl LuStorage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset_bytes: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset_bytes)
    }

    fn write_at(&self, data: &[u8], offset_bytes: u64) -> io::Result<()> {
        self.file.write_all_at(data, offset_bytes)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
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
