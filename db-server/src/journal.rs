//! The journal: what makes the snapshot manager's tables survive a crash.
//!
//! An append-only file of checksummed records — pair state changes and
//! write intents — written by one thread that batches every request waiting
//! for it into one `fdatasync` (group commit). Rules (DESIGN.md §3):
//!
//! 1. An intent is durable before the write that dirties its range is sent
//!    to the array. Intents are rounded out to regions (64 KiB by default):
//!    copying more after a crash is safe, copying less is data loss. A write
//!    inside a region already durable costs no journal I/O.
//! 2. A state change is durable before it takes effect.
//!
//! Rules 4 and 5 are the subject of the sections below: a journal is used
//! only if the evidence says it is whole, and a failed append leaves the
//! file as if it had not been tried.
//!
//! Removals are not journaled one by one: a state change to Synchronized (or
//! Snapshot, which starts from an empty table, or Restoring) drops a
//! volume's intents; Resynchronizing and RestoringToSnapshot keep them.
//! When the file grows past a threshold it is rewritten from the current
//! state (write a new file, fsync, rename, fsync the directory).
//!
//! # Format
//!
//! ```text
//! offset 0   "SMJRNL02"
//! offset 8   commit block: committed_len_bytes u64 LE | first 8 bytes of BLAKE3 of it
//! offset 24  records: 0xA5 | len u32 | payload | first 8 bytes of BLAKE3(payload)
//! ```
//!
//! A state record's payload: `1` | volume u32 | origin u32 | mate u32 |
//! block count u64 | state code u8 | full resync u8 | holder (u16 length +
//! bytes) | ledger sequence u64 | snapshot id u64, and for code 3 alone a
//! second string (u16 length + bytes), the backup id. Codes: 0
//! Synchronized, 1 Snapshot (holder, sequence, non-zero id), 2
//! Resynchronizing (for 0 and 2 a holder, when not empty, names the
//! restore run this state change ended or abandoned), 3 Restoring (holder = the restore's run id, sequence
//! and id 0), 4 RestoringToSnapshot (as Snapshot), 5 CowSnapshot (as
//! Snapshot: a held copy-on-write snapshot; its save-area map is not
//! journaled, so a replay of it invalidates the snapshot), 6 a writable
//! Snapshot (as 1). Codes 3, 4, 5 and 6
//! were added without a format change: an older journal has none, and
//! every record it has decodes as before. An intent record: `3` | volume u32 | mate u32 |
//! start u64 | end u64. A volume may have several mates ([0020]): each
//! (volume, mate) is a pair with its own state and intents, so the replay
//! keys both by [`PairKey`] (a state record names its mate already). The
//! intent record of the single-mate format, `2` | volume u32 | start u64 |
//! end u64, is still read, as an intent of every pair of its volume known
//! at that point (copying more is safe); it is no longer written.
//!
//! # Why a committed length
//!
//! Position alone cannot tell a torn tail (the crash cut an append short:
//! harmless, it was never acknowledged) from a journal damaged later or cut
//! to half its length (acknowledged intents are gone: restoring the records
//! before the damage would leave regions written during a snapshot out of
//! the resync, and the pair would be reported Synchronized with origin and
//! mate different). So every group commit writes its records at the end,
//! then rewrites the commit block with the new length (a positioned write at
//! offset 8), then issues its one `fdatasync`, and only then acknowledges.
//! Replay trusts evidence, not position:
//!
//! - every record up to the committed length must be whole and pass its
//!   checksum, and the records must end exactly there; the file must be at
//!   least that long. Otherwise the journal is *unusable*;
//! - bytes after the committed length belong to a commit whose `fdatasync`
//!   never returned, so nothing in them was acknowledged: they are
//!   discarded (the file is cut back to the committed length) as if never
//!   tried.
//!
//! After `kill -9` the page cache keeps every write that returned, in
//! order: either the commit block was not rewritten (the batch's bytes are
//! discarded) or it was, after the records (the batch is whole and
//! replayed — harmless: an intent that was not acknowledged only copies
//! more, a state change not acknowledged is what a retry would make).
//! After a power loss the disk may have kept the commit block of the last,
//! unacknowledged commit without its records. That reads as damage below
//! the committed length, so the journal is unusable and every pair is
//! compared whole: safe, only slower. A second `fdatasync` between the
//! records and the commit block would rule that out, at the price of
//! doubling the latency of every intent; a full compare after a power loss
//! in the middle of a commit is the cheaper trade. The commit block is 16
//! bytes inside the first 512-byte sector; if a disk tears even that, its
//! checksum fails and the journal is unusable — again safe.
//!
//! # An unusable journal
//!
//! It is renamed aside intact (`journal.damaged-<unix-ms>`: the evidence is
//! kept byte for byte, never truncated in place), a WARN names the file and
//! the offset of the damage, and a fresh journal is started. The replay
//! then knows no volume, so the manager compares every pair whole before it
//! reports it Synchronized, and [`Journal::unusable_reason`] gives the
//! reason it shows in `Status`. A snapshot the damaged journal held is
//! dropped: without its intents nobody knows where the origin moved on,
//! nor whether the mate was still frozen at the crash, and the whole-volume
//! compare overwrites the mate anyway. A backup that was copying that mate
//! must fail when it confirms its snapshot with db-server. A file that is
//! not a journal, or a journal of another format version (`SMJRNL01` wrote
//! no committed length, so its tail cannot be judged), is treated the same
//! way.
//!
//! # A failed append
//!
//! A write or `fdatasync` error leaves the file in an unknown state: part
//! of the batch may be in it, the commit block may name the new length, and
//! after a failed `fsync` the page cache no longer says what reached the
//! disk. Before anything else is appended, the writer cuts the file back to
//! its committed length, rewrites the commit block with that length and
//! syncs; a successful sync after the cut is the repair. If the repair fails
//! too, the journal is broken: every later append (new intents, state
//! changes) fails at once, until db-server is restarted and replays what is
//! on disk by the rules above. Nothing is ever appended after bytes that
//! were not repaired; and since every write is positioned (records at the
//! committed length, the commit block at offset 8), no file position is
//! left behind by a failure either. A crash in the middle of the repair can
//! leave a commit block naming bytes the cut removed: unusable, again safe.
//! Writes inside regions that were already durable go on: their intents
//! were synced before the failure and nothing after it removes them.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rangemap::RangeSet;
use tokio::sync::{mpsc, oneshot};

use crate::array_port::PairInfo;
use crate::error::DbError;
use crate::lu_status::PairState;

/// The first bytes of every journal file this version writes.
const MAGIC: &[u8; 8] = b"SMJRNL02";
/// What every journal format version starts with.
const MAGIC_FAMILY: &[u8; 6] = b"SMJRNL";
/// Where the commit block sits: right after the magic.
const COMMIT_BLOCK_AT: u64 = 8;
/// `committed_len_bytes` u64 + the first 8 bytes of its BLAKE3.
const COMMIT_BLOCK_BYTES: usize = 16;
/// Where the first record starts.
const RECORDS_AT: u64 = COMMIT_BLOCK_AT + COMMIT_BLOCK_BYTES as u64;
const RECORD_MAGIC: u8 = 0xA5;
const DIGEST_BYTES: usize = 8;
/// Requests waiting for the journal thread.
const QUEUE_DEPTH: usize = 1024;
/// The file is rewritten from the current state when it grows past this.
const COMPACT_AT_BYTES: u64 = 1 << 20;
/// The journal's file name inside the data directory.
const FILE_NAME: &str = "journal.log";

/// Why the journal could not be opened or could not record.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// Reading, creating, cutting back or setting aside the journal file at
    /// open failed (a missing or read-only data directory, an I/O error).
    /// Not retryable until the disk or the directory is fixed.
    #[error("{}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The journal's writer thread could not be started. Not retryable.
    #[error("starting the journal thread: {0}")]
    StartThread(#[source] io::Error),
    /// An append failed (a full disk, an I/O error, or a journal broken by
    /// an earlier failure that could not be undone): nothing was recorded.
    /// Retryable once the disk is fixed; a broken journal only after a
    /// restart.
    #[error("appending: {0}")]
    Append(#[source] io::Error),
    /// The journal's writer thread has stopped (db-server is stopping).
    /// Not retryable against this process.
    #[error("the journal thread has stopped")]
    Stopped,
}

/// Which pair a record is about: a volume (its mirror LU) and one of its
/// mates (a volume may have up to three, [0020]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PairKey {
    pub volume: u32,
    pub mate_lu: u32,
}

impl PairKey {
    pub fn of(pair: &PairInfo) -> Self {
        Self {
            volume: pair.mirror_lu,
            mate_lu: pair.mate_lu,
        }
    }
}

/// A pair's durable state as replayed from the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurableVolume {
    pub origin_lu: u32,
    pub mate_lu: u32,
    pub block_count: u64,
    pub state: PairState,
    /// A whole-volume resync was pending (no usable journal before it).
    pub full_resync: bool,
    /// Journaled intents (regions) since the state change.
    pub regions: RangeSet<u64>,
    /// The run id of the last restore from a backup that ended (or was
    /// abandoned) on this volume, so that its EndRestore retried after a
    /// restart is answered rather than refused. Kept until the next
    /// restore begins (a compaction keeps it only while the pair is
    /// Synchronized or Resynchronizing, the states whose records carry it).
    pub ended_restore: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Record {
    State {
        volume: u32,
        origin_lu: u32,
        mate_lu: u32,
        block_count: u64,
        state: PairState,
        full_resync: bool,
        /// Codes 0 and 2 only: the restore this state change ended.
        ended_restore: Option<String>,
    },
    /// An intent of one pair.
    Intent { pair: PairKey, blocks: Range<u64> },
    /// An intent of the single-mate format (record type 2): of every pair
    /// of the volume. Read, never written.
    VolumeIntent { volume: u32, blocks: Range<u64> },
}

impl Record {
    fn encode(&self, out: &mut Vec<u8>) {
        let mut payload = Vec::with_capacity(64);
        match self {
            Record::State {
                volume,
                origin_lu,
                mate_lu,
                block_count,
                state,
                full_resync,
                ended_restore,
            } => {
                payload.push(1);
                payload.extend_from_slice(&volume.to_le_bytes());
                payload.extend_from_slice(&origin_lu.to_le_bytes());
                payload.extend_from_slice(&mate_lu.to_le_bytes());
                payload.extend_from_slice(&block_count.to_le_bytes());
                let ended = ended_restore.as_deref().unwrap_or("");
                let (code, holder, ledger_sequence, snapshot_id) = match state {
                    PairState::Synchronized => (0u8, ended, 0, 0),
                    PairState::Snapshot {
                        holder,
                        ledger_sequence,
                        snapshot_id,
                        writable,
                    } => (
                        if *writable { 6 } else { 1 },
                        holder.as_str(),
                        *ledger_sequence,
                        *snapshot_id,
                    ),
                    PairState::Resynchronizing => (2, ended, 0, 0),
                    PairState::Restoring { run_id, .. } => (3, run_id.as_str(), 0, 0),
                    PairState::RestoringToSnapshot {
                        holder,
                        ledger_sequence,
                        snapshot_id,
                    } => (4, holder.as_str(), *ledger_sequence, *snapshot_id),
                    PairState::CowSnapshot {
                        holder,
                        ledger_sequence,
                        snapshot_id,
                    } => (5, holder.as_str(), *ledger_sequence, *snapshot_id),
                };
                payload.push(code);
                payload.push(u8::from(*full_resync));
                push_short_string(&mut payload, holder);
                payload.extend_from_slice(&ledger_sequence.to_le_bytes());
                payload.extend_from_slice(&snapshot_id.to_le_bytes());
                // Only a restore from a backup has a second string: the
                // backup's id. Records of the other codes are as before.
                if let PairState::Restoring { backup_id, .. } = state {
                    push_short_string(&mut payload, backup_id);
                }
            }
            Record::Intent { pair, blocks } => {
                payload.push(3);
                payload.extend_from_slice(&pair.volume.to_le_bytes());
                payload.extend_from_slice(&pair.mate_lu.to_le_bytes());
                payload.extend_from_slice(&blocks.start.to_le_bytes());
                payload.extend_from_slice(&blocks.end.to_le_bytes());
            }
            Record::VolumeIntent { volume, blocks } => {
                payload.push(2);
                payload.extend_from_slice(&volume.to_le_bytes());
                payload.extend_from_slice(&blocks.start.to_le_bytes());
                payload.extend_from_slice(&blocks.end.to_le_bytes());
            }
        }
        out.push(RECORD_MAGIC);
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&payload);
        out.extend_from_slice(&blake3::hash(&payload).as_bytes()[..DIGEST_BYTES]);
    }

    fn decode(payload: &[u8]) -> Option<Record> {
        let u32_at = |at: usize| {
            Some(u32::from_le_bytes(
                payload.get(at..at + 4)?.try_into().ok()?,
            ))
        };
        let u64_at = |at: usize| {
            Some(u64::from_le_bytes(
                payload.get(at..at + 8)?.try_into().ok()?,
            ))
        };
        match *payload.first()? {
            1 => {
                let code = *payload.get(21)?;
                let full_resync = *payload.get(22)? != 0;
                let holder_len = u16::from_le_bytes(payload.get(23..25)?.try_into().ok()?) as usize;
                let holder = String::from_utf8(payload.get(25..25 + holder_len)?.to_vec()).ok()?;
                // Strict: the record is exactly as long as its fields, and
                // a snapshot has a non-zero id (0 is written for no snapshot).
                let ledger_sequence = u64_at(25 + holder_len)?;
                let snapshot_id = u64_at(33 + holder_len)?;
                let mut end = 41 + holder_len;
                let backup_id = if code == 3 {
                    let len =
                        u16::from_le_bytes(payload.get(end..end + 2)?.try_into().ok()?) as usize;
                    let backup_id =
                        String::from_utf8(payload.get(end + 2..end + 2 + len)?.to_vec()).ok()?;
                    end += 2 + len;
                    backup_id
                } else {
                    String::new()
                };
                if payload.len() != end {
                    return None;
                }
                let ended_restore =
                    (matches!(code, 0 | 2) && !holder.is_empty()).then(|| holder.clone());
                let state = match code {
                    0 => PairState::Synchronized,
                    1 | 6 if snapshot_id != 0 => PairState::Snapshot {
                        holder,
                        ledger_sequence,
                        snapshot_id,
                        writable: code == 6,
                    },
                    2 => PairState::Resynchronizing,
                    3 if !holder.is_empty() => PairState::Restoring {
                        run_id: holder,
                        backup_id,
                    },
                    4 if snapshot_id != 0 => PairState::RestoringToSnapshot {
                        holder,
                        ledger_sequence,
                        snapshot_id,
                    },
                    5 if snapshot_id != 0 => PairState::CowSnapshot {
                        holder,
                        ledger_sequence,
                        snapshot_id,
                    },
                    _ => return None,
                };
                Some(Record::State {
                    volume: u32_at(1)?,
                    origin_lu: u32_at(5)?,
                    mate_lu: u32_at(9)?,
                    block_count: u64_at(13)?,
                    state,
                    full_resync,
                    ended_restore,
                })
            }
            2 if payload.len() == 21 => {
                let (start, end) = (u64_at(5)?, u64_at(13)?);
                (start < end).then_some(Record::VolumeIntent {
                    volume: u32_at(1)?,
                    blocks: start..end,
                })
            }
            3 if payload.len() == 25 => {
                let (start, end) = (u64_at(9)?, u64_at(17)?);
                (start < end).then_some(Record::Intent {
                    pair: PairKey {
                        volume: u32_at(1)?,
                        mate_lu: u32_at(5)?,
                    },
                    blocks: start..end,
                })
            }
            _ => None,
        }
    }

    /// Reads the record at the start of `bytes`: the record and its encoded
    /// length, or `None` if it is torn, fails its checksum or makes no sense.
    fn read(bytes: &[u8]) -> Option<(Record, usize)> {
        if *bytes.first()? != RECORD_MAGIC {
            return None;
        }
        let len = u32::from_le_bytes(bytes.get(1..5)?.try_into().ok()?) as usize;
        let payload_end = 5usize.checked_add(len)?;
        let payload = bytes.get(5..payload_end)?;
        let digest = bytes.get(payload_end..payload_end.checked_add(DIGEST_BYTES)?)?;
        if &blake3::hash(payload).as_bytes()[..DIGEST_BYTES] != digest {
            return None;
        }
        Some((Record::decode(payload)?, payload_end + DIGEST_BYTES))
    }
}

/// Appends `text` as a u16 length and its bytes (cut at 65535 bytes; run
/// and backup ids are far shorter).
fn push_short_string(payload: &mut Vec<u8>, text: &str) {
    let bytes = &text.as_bytes()[..text.len().min(u16::MAX as usize)];
    payload.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
    payload.extend_from_slice(bytes);
}

/// The commit block naming `committed_len_bytes`.
fn commit_block(committed_len_bytes: u64) -> [u8; COMMIT_BLOCK_BYTES] {
    let len = committed_len_bytes.to_le_bytes();
    let mut block = [0u8; COMMIT_BLOCK_BYTES];
    block[..8].copy_from_slice(&len);
    block[8..].copy_from_slice(&blake3::hash(&len).as_bytes()[..DIGEST_BYTES]);
    block
}

/// Applies a record to the replayed state.
fn apply(state: &mut BTreeMap<PairKey, DurableVolume>, record: Record) {
    match record {
        Record::State {
            volume,
            origin_lu,
            mate_lu,
            block_count,
            state: pair_state,
            full_resync,
            ended_restore,
        } => {
            let keep_regions = pair_state.keeps_intents();
            let key = PairKey { volume, mate_lu };
            let old = state.remove(&key);
            let ended_restore = match (&pair_state, ended_restore) {
                (_, Some(run_id)) => Some(run_id),
                (PairState::Restoring { .. }, None) => None,
                (_, None) => old.as_ref().and_then(|old| old.ended_restore.clone()),
            };
            let regions = match old {
                Some(old) if keep_regions => old.regions,
                _ => RangeSet::new(),
            };
            state.insert(
                key,
                DurableVolume {
                    origin_lu,
                    mate_lu,
                    block_count,
                    state: pair_state,
                    full_resync,
                    regions,
                    ended_restore,
                },
            );
        }
        Record::Intent { pair, blocks } => {
            // An intent for a pair with no state record cannot be placed;
            // that pair gets a full resync anyway.
            if let Some(v) = state.get_mut(&pair) {
                v.regions.insert(blocks);
            }
        }
        Record::VolumeIntent { volume, blocks } => {
            let pairs = PairKey { volume, mate_lu: 0 }..=PairKey {
                volume,
                mate_lu: u32::MAX,
            };
            for (_, v) in state.range_mut(pairs) {
                v.regions.insert(blocks.clone());
            }
        }
    }
}

/// What the bytes found under the journal's name turned out to be.
#[derive(Debug)]
enum Replayed {
    /// No file or an empty one: nothing was ever committed to it.
    Empty,
    /// A whole journal: the state its committed records describe.
    Usable {
        volumes: BTreeMap<PairKey, DurableVolume>,
        committed_len_bytes: u64,
        /// Bytes after the committed length: a commit cut short.
        discarded_bytes: u64,
    },
    /// Not usable, and why (naming the offset of the damage).
    Unusable(String),
}

/// Judges a journal file's bytes by the rules of the module doc.
fn replay(bytes: &[u8]) -> Replayed {
    if bytes.is_empty() {
        return Replayed::Empty;
    }
    let magic = &bytes[..bytes.len().min(MAGIC.len())];
    if magic != MAGIC.as_slice() {
        return Replayed::Unusable(if magic.starts_with(MAGIC_FAMILY) {
            format!(
                "journal format {:?} at offset 0 is not {:?} (written by another version of db-server)",
                String::from_utf8_lossy(magic),
                String::from_utf8_lossy(MAGIC)
            )
        } else {
            format!(
                "not a splitmirror journal: {:?} at offset 0",
                String::from_utf8_lossy(magic)
            )
        });
    }
    let Some(block) = bytes.get(COMMIT_BLOCK_AT as usize..RECORDS_AT as usize) else {
        return Replayed::Unusable(format!(
            "truncated: the file is {} bytes, shorter than its header",
            bytes.len()
        ));
    };
    let committed_len_bytes = u64::from_le_bytes(block[..8].try_into().expect("8 bytes"));
    if block != commit_block(committed_len_bytes) || committed_len_bytes < RECORDS_AT {
        return Replayed::Unusable(format!("corrupt commit block at offset {COMMIT_BLOCK_AT}"));
    }
    let file_len_bytes = bytes.len() as u64;
    if file_len_bytes < committed_len_bytes {
        return Replayed::Unusable(format!(
            "truncated: the file is {file_len_bytes} bytes, shorter than the \
             {committed_len_bytes} bytes durably committed"
        ));
    }
    let committed = &bytes[..committed_len_bytes as usize];
    let mut volumes = BTreeMap::new();
    let mut at = RECORDS_AT as usize;
    while at < committed.len() {
        let Some((record, len)) = Record::read(&committed[at..]) else {
            return Replayed::Unusable(format!(
                "corrupt record at offset {at} (of {committed_len_bytes} bytes committed)"
            ));
        };
        apply(&mut volumes, record);
        at += len;
    }
    Replayed::Usable {
        volumes,
        committed_len_bytes,
        discarded_bytes: file_len_bytes - committed_len_bytes,
    }
}

/// The journal thread's view of its file: positioned writes, cutting back,
/// syncing. A seam, so that tests can make the file fail.
trait JournalFile: Send {
    fn write_all_at(&mut self, bytes: &[u8], offset: u64) -> io::Result<()>;
    fn set_len(&mut self, len_bytes: u64) -> io::Result<()>;
    fn sync_data(&mut self) -> io::Result<()>;
}

impl JournalFile for File {
    fn write_all_at(&mut self, bytes: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, bytes, offset)
    }

    fn set_len(&mut self, len_bytes: u64) -> io::Result<()> {
        File::set_len(self, len_bytes)
    }

    fn sync_data(&mut self) -> io::Result<()> {
        File::sync_data(self)
    }
}

/// Makes the writer's view of a journal file (the plain file, or a test's
/// failing one).
type WrapFile = Box<dyn Fn(File) -> Box<dyn JournalFile> + Send>;

/// What the journal has cost so far, and whether it still accepts appends.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JournalStats {
    pub records: u64,
    pub bytes_written: u64,
    pub fsyncs: u64,
    /// Why every append is refused until db-server restarts (a failed
    /// append that could not be cut back, a compaction not made durable);
    /// `None` while the journal accepts appends.
    pub broken: Option<String>,
}

struct Append {
    records: Vec<Record>,
    done: oneshot::Sender<io::Result<()>>,
}

pub struct Journal {
    queue: Mutex<Option<mpsc::Sender<Append>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    region_bytes: u64,
    /// Regions durable in the journal, per pair: a write inside one costs
    /// no journal I/O.
    durable: Mutex<BTreeMap<PairKey, RangeSet<u64>>>,
    /// Why the journal found at open could not be used, if it could not.
    unusable_reason: Option<String>,
    stats: Arc<Stats>,
}

#[derive(Default)]
struct Stats {
    records: AtomicU64,
    bytes_written: AtomicU64,
    fsyncs: AtomicU64,
    /// The writer's first reason for refusing appends, for `Status`.
    broken: std::sync::OnceLock<String>,
}

impl Journal {
    /// Opens (or creates) the journal under `dir` and replays it. Answers
    /// the durable state per volume. A missing journal answers an empty map
    /// (every volume then needs a full resync); so does an unusable one,
    /// which is set aside intact first (see
    /// [`unusable_reason`](Self::unusable_reason)).
    pub fn open(
        dir: &Path,
        region_bytes: u64,
    ) -> Result<(Arc<Self>, BTreeMap<PairKey, DurableVolume>), JournalError> {
        Self::open_compacting_at(dir, region_bytes, COMPACT_AT_BYTES)
    }

    /// [`open`](Self::open) with a chosen compaction threshold.
    pub fn open_compacting_at(
        dir: &Path,
        region_bytes: u64,
        compact_at_bytes: u64,
    ) -> Result<(Arc<Self>, BTreeMap<PairKey, DurableVolume>), JournalError> {
        Self::open_with(
            dir,
            region_bytes,
            compact_at_bytes,
            Box::new(|file| Box::new(file)),
        )
    }

    fn open_with(
        dir: &Path,
        region_bytes: u64,
        compact_at_bytes: u64,
        wrap: WrapFile,
    ) -> Result<(Arc<Self>, BTreeMap<PairKey, DurableVolume>), JournalError> {
        let path = dir.join(FILE_NAME);
        let journal_error = |source: io::Error| JournalError::Open {
            path: path.clone(),
            source,
        };
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(journal_error(e)),
        };
        let mut unusable_reason = None;
        let (file, state, committed_len_bytes) = match replay(&bytes) {
            Replayed::Empty => {
                let file = write_journal_file(dir, &path, &[])
                    .map_err(|e| journal_error(e.into_error()))?;
                (file, BTreeMap::new(), RECORDS_AT)
            }
            Replayed::Usable {
                volumes,
                committed_len_bytes,
                discarded_bytes,
            } => {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(journal_error)?;
                if discarded_bytes > 0 {
                    // Never acknowledged (see the module doc): cut off, so
                    // that the next commit starts from the committed length.
                    tracing::info!(
                        "journal: discarding {discarded_bytes} bytes after the committed length \
                         {committed_len_bytes} of {} (a commit cut short by the crash, never \
                         acknowledged)",
                        path.display()
                    );
                    file.set_len(committed_len_bytes).map_err(journal_error)?;
                    file.sync_data().map_err(journal_error)?;
                }
                (file, volumes, committed_len_bytes)
            }
            Replayed::Unusable(why) => {
                let aside = set_aside(dir, &path).map_err(journal_error)?;
                tracing::warn!(
                    "journal unusable: {} ({why}); set aside intact as {}; starting a fresh \
                     journal: every volume is resynchronized whole and any snapshot it held \
                     is dropped",
                    path.display(),
                    aside.display()
                );
                unusable_reason = Some(format!("{why}; set aside as {}", aside.display()));
                let file = write_journal_file(dir, &path, &[])
                    .map_err(|e| journal_error(e.into_error()))?;
                (file, BTreeMap::new(), RECORDS_AT)
            }
        };
        let durable = state
            .iter()
            .map(|(&pair, v)| (pair, v.regions.clone()))
            .collect();
        let stats = Arc::new(Stats::default());
        let (sender, receiver) = mpsc::channel(QUEUE_DEPTH);
        let writer = Writer {
            file: wrap(file),
            wrap,
            path: path.clone(),
            dir: dir.to_path_buf(),
            committed_len_bytes,
            compact_at_bytes,
            state: state.clone(),
            broken: None,
            stats: stats.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("journal".into())
            .spawn(move || writer.run(receiver))
            .map_err(JournalError::StartThread)?;
        let journal = Arc::new(Self {
            queue: Mutex::new(Some(sender)),
            thread: Mutex::new(Some(thread)),
            region_bytes,
            durable: Mutex::new(durable),
            unusable_reason,
            stats,
        });
        Ok((journal, state))
    }

    /// Why the journal found at open could not be used (it was set aside
    /// and a fresh one started, so every volume needs a whole-volume
    /// resync), e.g. "corrupt record at offset 520 (of 1224 bytes
    /// committed); set aside as …". `None` when it was usable or absent.
    pub fn unusable_reason(&self) -> Option<&str> {
        self.unusable_reason.as_deref()
    }

    /// Makes `blocks` of `pair` durable as an intent (rounded out to
    /// regions). Answers at once, without I/O, when already durable.
    pub async fn record_intent(&self, pair: &PairInfo, blocks: Range<u64>) -> Result<(), DbError> {
        let (key, block_size_bytes, block_count) =
            (PairKey::of(pair), pair.block_size_bytes, pair.block_count);
        let region_blocks = (self.region_bytes / u64::from(block_size_bytes)).max(1);
        let start = blocks.start / region_blocks * region_blocks;
        let end = blocks
            .end
            .div_ceil(region_blocks)
            .saturating_mul(region_blocks)
            .min(block_count);
        let region = start..end;
        if self.is_durable(key, &region) {
            return Ok(());
        }
        self.append(vec![Record::Intent {
            pair: key,
            blocks: region.clone(),
        }])
        .await?;
        self.durable
            .lock()
            .expect("journal poisoned")
            .entry(key)
            .or_default()
            .insert(region);
        Ok(())
    }

    fn is_durable(&self, key: PairKey, region: &Range<u64>) -> bool {
        self.durable
            .lock()
            .expect("journal poisoned")
            .get(&key)
            .is_some_and(|set| set.gaps(region).next().is_none())
    }

    /// Makes a state change durable (before the caller lets it take effect).
    pub async fn record_state(
        &self,
        pair: &PairInfo,
        state: &PairState,
        full_resync: bool,
    ) -> Result<(), DbError> {
        self.record_state_ending(pair, state, full_resync, None)
            .await
    }

    /// [`Journal::record_state`] for the state that ends (Synchronized) or
    /// abandons (Resynchronizing) the restore run `ended_restore`, which
    /// the replay then remembers.
    pub async fn record_state_ending(
        &self,
        pair: &PairInfo,
        state: &PairState,
        full_resync: bool,
        ended_restore: Option<&str>,
    ) -> Result<(), DbError> {
        self.append(vec![Record::State {
            volume: pair.mirror_lu,
            origin_lu: pair.origin_lu,
            mate_lu: pair.mate_lu,
            block_count: pair.block_count,
            state: state.clone(),
            full_resync,
            ended_restore: ended_restore.map(str::to_string),
        }])
        .await?;
        if !state.keeps_intents() {
            self.durable
                .lock()
                .expect("journal poisoned")
                .remove(&PairKey::of(pair));
        }
        Ok(())
    }

    async fn append(&self, records: Vec<Record>) -> Result<(), DbError> {
        let queue = self
            .queue
            .lock()
            .expect("journal poisoned")
            .clone()
            .ok_or(DbError::ShuttingDown)?;
        let (done, answer) = oneshot::channel();
        queue
            .send(Append { records, done })
            .await
            .map_err(|_| JournalError::Stopped)?;
        answer
            .await
            .map_err(|_| JournalError::Stopped)?
            .map_err(|e| JournalError::Append(e).into())
    }

    pub fn stats(&self) -> JournalStats {
        JournalStats {
            records: self.stats.records.load(Ordering::Relaxed),
            bytes_written: self.stats.bytes_written.load(Ordering::Relaxed),
            fsyncs: self.stats.fsyncs.load(Ordering::Relaxed),
            broken: self.stats.broken.get().cloned(),
        }
    }

    /// Stops the journal thread after it has answered every request queued.
    pub fn close(&self) {
        self.queue.lock().expect("journal poisoned").take();
        if let Some(thread) = self.thread.lock().expect("journal poisoned").take()
            && thread.join().is_err()
        {
            tracing::error!("the journal thread panicked");
        }
    }
}

/// The journal thread: owns the file.
struct Writer {
    file: Box<dyn JournalFile>,
    wrap: WrapFile,
    path: PathBuf,
    dir: PathBuf,
    /// Where the records end and what the commit block on disk says: every
    /// byte before it was synced by a commit that succeeded.
    committed_len_bytes: u64,
    compact_at_bytes: u64,
    state: BTreeMap<PairKey, DurableVolume>,
    /// Why every append is refused: a failed append that could not be
    /// undone (or a compaction that could not be made durable).
    broken: Option<String>,
    stats: Arc<Stats>,
}

impl Writer {
    /// From now on every append is refused, and `Status` says why.
    fn mark_broken(&mut self, why: String) {
        // The first reason is the one that matters; a later one cannot
        // happen (nothing is written once broken).
        let _ = self.stats.broken.set(why.clone());
        self.broken = Some(why);
    }

    fn run(mut self, mut receiver: mpsc::Receiver<Append>) {
        while let Some(first) = receiver.blocking_recv() {
            // Group commit: everything that queued up while the last batch
            // was being synced goes out with one fdatasync.
            let mut batch = vec![first];
            while let Ok(more) = receiver.try_recv() {
                batch.push(more);
            }
            let mut bytes = Vec::new();
            let mut count = 0;
            for append in &batch {
                for record in &append.records {
                    record.encode(&mut bytes);
                    count += 1;
                }
            }
            let result = self.commit(&bytes);
            if result.is_ok() {
                self.stats.records.fetch_add(count, Ordering::Relaxed);
                self.stats
                    .bytes_written
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                self.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
                for append in &batch {
                    for record in &append.records {
                        apply(&mut self.state, record.clone());
                    }
                }
            }
            let error = result.as_ref().err().map(|e| (e.kind(), e.to_string()));
            for append in batch {
                let answer = match &error {
                    None => Ok(()),
                    Some((kind, text)) => Err(io::Error::new(*kind, text.clone())),
                };
                let _ = append.done.send(answer);
            }
            if error.is_none() && self.committed_len_bytes > self.compact_at_bytes {
                self.compact();
            }
        }
    }

    /// Appends `bytes` durably: records, then the commit block naming the
    /// new length, then one fdatasync. On failure the file is cut back
    /// before this returns (or the journal is marked broken).
    fn commit(&mut self, bytes: &[u8]) -> io::Result<()> {
        if let Some(broken) = &self.broken {
            return Err(io::Error::other(format!(
                "the journal is broken and refuses every append until db-server is \
                 restarted: {broken}"
            )));
        }
        let new_len_bytes = self.committed_len_bytes + bytes.len() as u64;
        let written = self
            .file
            .write_all_at(bytes, self.committed_len_bytes)
            .and_then(|()| {
                self.file
                    .write_all_at(&commit_block(new_len_bytes), COMMIT_BLOCK_AT)
            })
            .and_then(|()| self.file.sync_data());
        match written {
            Ok(()) => {
                self.committed_len_bytes = new_len_bytes;
                Ok(())
            }
            Err(error) => {
                self.undo(bytes.len(), &error);
                Err(error)
            }
        }
    }

    /// Leaves the file as if the failed commit had not been tried: cut back
    /// to the committed length, the commit block saying so, synced. If that
    /// fails as well, nothing more may be appended.
    fn undo(&mut self, batch_bytes: usize, error: &io::Error) {
        let len_bytes = self.committed_len_bytes;
        let repaired = self
            .file
            .set_len(len_bytes)
            .and_then(|()| {
                self.file
                    .write_all_at(&commit_block(len_bytes), COMMIT_BLOCK_AT)
            })
            .and_then(|()| self.file.sync_data());
        match repaired {
            Ok(()) => tracing::warn!(
                "journal: appending {batch_bytes} bytes to {} failed ({error}); cut it back to \
                 its committed {len_bytes} bytes",
                self.path.display()
            ),
            Err(repair_error) => {
                let broken = format!(
                    "appending to {} failed ({error}) and cutting it back to {len_bytes} bytes \
                     failed too ({repair_error})",
                    self.path.display()
                );
                tracing::error!(
                    "journal broken: {broken}; snapshot writes needing a new intent and state \
                     changes are refused until db-server is restarted"
                );
                self.mark_broken(broken);
            }
        }
    }

    /// Rewrites the journal as the current state: one state record and the
    /// regions of each volume.
    fn compact(&mut self) {
        let mut records = Vec::new();
        for (&pair, v) in &self.state {
            Record::State {
                volume: pair.volume,
                origin_lu: v.origin_lu,
                mate_lu: v.mate_lu,
                block_count: v.block_count,
                state: v.state.clone(),
                full_resync: v.full_resync,
                ended_restore: v.ended_restore.clone(),
            }
            .encode(&mut records);
            for blocks in v.regions.iter() {
                Record::Intent {
                    pair,
                    blocks: blocks.clone(),
                }
                .encode(&mut records);
            }
        }
        match write_journal_file(&self.dir, &self.path, &records) {
            Ok(file) => {
                self.file = (self.wrap)(file);
                self.committed_len_bytes = RECORDS_AT + records.len() as u64;
                tracing::debug!("journal compacted to {} bytes", self.committed_len_bytes);
            }
            Err(NotWritten::BeforeRename(e)) => {
                // The old file is untouched and still the journal.
                tracing::error!(
                    "journal: compacting {}: {e}; going on with it as it is",
                    self.path.display()
                );
            }
            Err(NotWritten::AfterRename(e, file)) => {
                // The name points at the new file now, but after a power
                // loss it may point at the old one again: appends to either
                // could be lost.
                let broken = format!(
                    "compacting {}: the new file is in place but not durably ({e})",
                    self.path.display()
                );
                tracing::error!("journal broken: {broken}");
                self.file = (self.wrap)(file);
                self.committed_len_bytes = RECORDS_AT + records.len() as u64;
                self.mark_broken(broken);
            }
        }
    }
}

/// Why [`write_journal_file`] failed.
enum NotWritten {
    /// Nothing changed under the journal's name.
    BeforeRename(io::Error),
    /// The new file (answered) is in place, but the directory could not be
    /// synced.
    AfterRename(io::Error, File),
}

impl NotWritten {
    fn into_error(self) -> io::Error {
        match self {
            NotWritten::BeforeRename(e) | NotWritten::AfterRename(e, _) => e,
        }
    }
}

/// Writes a whole journal file (header, commit block, `records`) under a
/// temporary name, syncs it, renames it to `path` and syncs `dir`. Answers
/// the new file, open for writing (so that no reopen after the rename can
/// fail). Leaves no temporary file behind when it fails.
fn write_journal_file(dir: &Path, path: &Path, records: &[u8]) -> Result<File, NotWritten> {
    let tmp = dir.join("journal.new");
    let committed_len_bytes = RECORDS_AT + records.len() as u64;
    let mut bytes = Vec::with_capacity(committed_len_bytes as usize);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&commit_block(committed_len_bytes));
    bytes.extend_from_slice(records);
    let written = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .and_then(|mut file| {
            file.write_all(&bytes)?;
            file.sync_all()?;
            Ok(file)
        });
    let file = match written {
        Ok(file) => file,
        Err(e) => {
            // A half-written file must not hold on to space the journal
            // needs.
            let _ = std::fs::remove_file(&tmp);
            return Err(NotWritten::BeforeRename(e));
        }
    };
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(NotWritten::BeforeRename(e));
    }
    match sync_dir(dir) {
        Ok(()) => Ok(file),
        Err(e) => Err(NotWritten::AfterRename(e, file)),
    }
}

/// Renames an unusable journal aside, intact, under a name no earlier one
/// holds; answers the new name.
fn set_aside(dir: &Path, path: &Path) -> io::Result<PathBuf> {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let mut aside = dir.join(format!("journal.damaged-{now_ms}"));
    let mut n = 1;
    while aside.exists() {
        aside = dir.join(format!("journal.damaged-{now_ms}-{n}"));
        n += 1;
    }
    std::fs::rename(path, &aside)?;
    sync_dir(dir)?;
    Ok(aside)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// A journal on a disk that can be made full, for the tests of what the
/// journal's callers do while appends fail.
#[cfg(test)]
pub(crate) mod full_disk {
    use std::sync::atomic::AtomicBool;

    use super::*;

    /// The disk under the journal: while full, an append (a write past the
    /// committed length) fails with `ENOSPC` and writes nothing, and is
    /// counted; rewriting the commit block in place, cutting back and
    /// syncing still work, as on a real full disk. So every refused append
    /// is undone cleanly and the next one is tried again.
    #[derive(Default)]
    pub(crate) struct Disk {
        full: AtomicBool,
        refused_appends: AtomicU64,
    }

    impl Disk {
        pub(crate) fn fill(&self) {
            self.full.store(true, Ordering::SeqCst);
        }

        pub(crate) fn free(&self) {
            self.full.store(false, Ordering::SeqCst);
        }

        /// Appends refused since the journal was opened.
        pub(crate) fn refused_appends(&self) -> u64 {
            self.refused_appends.load(Ordering::SeqCst)
        }
    }

    struct FileOnDisk {
        file: File,
        disk: Arc<Disk>,
    }

    impl JournalFile for FileOnDisk {
        fn write_all_at(&mut self, bytes: &[u8], offset: u64) -> io::Result<()> {
            if offset != COMMIT_BLOCK_AT && self.disk.full.load(Ordering::SeqCst) {
                self.disk.refused_appends.fetch_add(1, Ordering::SeqCst);
                return Err(io::Error::from_raw_os_error(28)); // ENOSPC
            }
            FileExt::write_all_at(&self.file, bytes, offset)
        }

        fn set_len(&mut self, len_bytes: u64) -> io::Result<()> {
            self.file.set_len(len_bytes)
        }

        fn sync_data(&mut self) -> io::Result<()> {
            self.file.sync_data()
        }
    }

    /// Opens (or creates) the journal under `dir` on a [`Disk`] that is not
    /// full yet.
    pub(crate) fn open(
        dir: &Path,
        region_bytes: u64,
    ) -> (Arc<Journal>, BTreeMap<PairKey, DurableVolume>, Arc<Disk>) {
        let disk = Arc::new(Disk::default());
        let shared = disk.clone();
        let (journal, state) = Journal::open_with(
            dir,
            region_bytes,
            COMPACT_AT_BYTES,
            Box::new(move |file| {
                Box::new(FileOnDisk {
                    file,
                    disk: shared.clone(),
                })
            }),
        )
        .expect("open the journal");
        (journal, state, disk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAIR: PairInfo = PairInfo {
        mirror_lu: 0,
        origin_lu: 1,
        mate_lu: 2,
        block_size_bytes: 4096,
        block_count: 1024,
    };
    const KEY: PairKey = PairKey {
        volume: 0,
        mate_lu: 2,
    };

    fn split(holder: &str) -> PairState {
        PairState::Snapshot {
            holder: holder.into(),
            ledger_sequence: 1,
            snapshot_id: 0x5eed,
            writable: false,
        }
    }

    fn regions(volume: &DurableVolume) -> Vec<Range<u64>> {
        volume.regions.iter().cloned().collect()
    }

    fn journal_path(dir: &tempfile::TempDir) -> PathBuf {
        dir.path().join(FILE_NAME)
    }

    /// The files an unusable journal was set aside as.
    fn set_aside_files(dir: &tempfile::TempDir) -> Vec<PathBuf> {
        std::fs::read_dir(dir.path())
            .expect("read dir")
            .map(|entry| entry.expect("entry").path())
            .filter(|path| {
                path.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("journal.damaged-"))
            })
            .collect()
    }

    /// A snapshot of volume 0 with intents in regions 1, 9, 17, …: enough
    /// records that the middle of the file falls among them.
    async fn journal_with_a_snapshot(dir: &tempfile::TempDir) -> Vec<Range<u64>> {
        let (journal, _) = Journal::open(dir.path(), 4096).expect("open");
        journal
            .record_state(&PAIR, &split("a"), false)
            .await
            .expect("state");
        let mut written = Vec::new();
        for i in 0..12u64 {
            let lba = 1 + 8 * i;
            journal
                .record_intent(&PAIR, lba..lba + 1)
                .await
                .expect("intent");
            written.push(lba..lba + 1);
        }
        journal.close();
        written
    }

    /// Reopens a journal that must be found unusable: the replay knows no
    /// volume, the damaged file is set aside byte for byte, the reason
    /// names the damage, and the fresh journal works.
    async fn assert_unusable(dir: &tempfile::TempDir, damaged: &[u8], why: &str) {
        let (journal, state) = Journal::open(dir.path(), 4096).expect("reopen");
        assert!(
            state.is_empty(),
            "nothing restored from a damaged journal: {state:?}"
        );
        let reason = journal.unusable_reason().expect("a reason").to_string();
        assert!(reason.contains(why), "{reason}");
        let aside = set_aside_files(dir);
        assert_eq!(aside.len(), 1, "{aside:?}");
        assert!(reason.contains(&aside[0].display().to_string()), "{reason}");
        assert!(
            std::fs::read(&aside[0]).expect("read aside") == damaged,
            "the damaged journal is kept intact"
        );
        journal
            .record_state(&PAIR, &PairState::Resynchronizing, true)
            .await
            .expect("the fresh journal takes appends");
        journal.close();
        let (journal, state) = Journal::open(dir.path(), 4096).expect("reopen fresh");
        assert!(journal.unusable_reason().is_none());
        assert!(state[&KEY].full_resync);
        journal.close();
    }

    #[tokio::test]
    async fn a_snapshot_and_its_intents_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (journal, state) = Journal::open(dir.path(), 64 << 10).expect("open");
        assert!(state.is_empty(), "a new journal knows no volume");
        assert!(
            journal.unusable_reason().is_none(),
            "a missing journal is no damage"
        );
        let snapshot = PairState::Snapshot {
            holder: "run-7".into(),
            ledger_sequence: 4711,
            snapshot_id: 0xfeed_f00d_dead_beef,
            writable: false,
        };
        journal
            .record_state(&PAIR, &snapshot, false)
            .await
            .expect("state");
        journal.record_intent(&PAIR, 5..6).await.expect("intent");
        journal
            .record_intent(&PAIR, 6..9)
            .await
            .expect("same region");
        journal
            .record_intent(&PAIR, 100..101)
            .await
            .expect("intent");
        let stats = journal.stats();
        assert_eq!(
            stats.records, 3,
            "the write inside a durable region cost nothing"
        );
        journal.close();
        let (journal, state) = Journal::open(dir.path(), 64 << 10).expect("reopen");
        assert!(journal.unusable_reason().is_none());
        let v = &state[&KEY];
        assert_eq!(v.state, snapshot);
        // Rounded out to 16-block (64 KiB) regions.
        assert_eq!(regions(v), vec![0..16, 96..112]);
    }

    #[tokio::test]
    async fn a_snapshot_acquired_again_by_the_same_run_keeps_its_new_id_across_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (journal, _) = Journal::open(dir.path(), 4096).expect("open");
        let first = PairState::Snapshot {
            holder: "run-r".into(),
            ledger_sequence: 0,
            snapshot_id: 11,
            writable: false,
        };
        // Deleted by force and acquired again by the same run, ledger off:
        // only the id tells the two snapshots apart.
        let second = PairState::Snapshot {
            holder: "run-r".into(),
            ledger_sequence: 0,
            snapshot_id: 12,
            writable: false,
        };
        journal
            .record_state(&PAIR, &first, false)
            .await
            .expect("first");
        journal
            .record_state(&PAIR, &PairState::Resynchronizing, false)
            .await
            .expect("delete");
        journal
            .record_state(&PAIR, &second, false)
            .await
            .expect("second");
        journal.close();
        let (journal, state) = Journal::open(dir.path(), 4096).expect("reopen");
        assert!(journal.unusable_reason().is_none());
        assert_eq!(state[&KEY].state.snapshot_id(), Some(12));
        assert_eq!(state[&KEY].state, second);
    }

    #[test]
    fn a_state_record_with_a_missing_or_extra_or_zero_snapshot_id_is_refused() {
        let record = Record::State {
            volume: 0,
            origin_lu: 1,
            mate_lu: 2,
            block_count: 1024,
            state: split("run"),
            full_resync: false,
            ended_restore: None,
        };
        let mut framed = Vec::new();
        record.encode(&mut framed);
        // Frame: magic, u32 length, payload, digest.
        let payload = framed[5..framed.len() - DIGEST_BYTES].to_vec();
        assert_eq!(Record::decode(&payload), Some(record));
        assert_eq!(Record::decode(&payload[..payload.len() - 8]), None);
        let mut longer = payload.clone();
        longer.push(0);
        assert_eq!(Record::decode(&longer), None);
        let mut zero = payload.clone();
        let at = zero.len() - 8;
        zero[at..].copy_from_slice(&0u64.to_le_bytes());
        assert_eq!(Record::decode(&zero), None);
    }

    #[tokio::test]
    async fn synchronized_drops_the_intents_and_resync_keeps_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (journal, _) = Journal::open(dir.path(), 4096).expect("open");
        journal
            .record_state(&PAIR, &split("a"), false)
            .await
            .expect("state");
        journal.record_intent(&PAIR, 1..2).await.expect("intent");
        journal
            .record_state(&PAIR, &PairState::Resynchronizing, false)
            .await
            .expect("state");
        journal.close();
        let (journal, state) = Journal::open(dir.path(), 4096).expect("reopen");
        assert_eq!(regions(&state[&KEY]), vec![1..2]);
        journal
            .record_state(&PAIR, &PairState::Synchronized, false)
            .await
            .expect("state");
        journal.close();
        let (_, state) = Journal::open(dir.path(), 4096).expect("reopen");
        assert_eq!(state[&KEY].state, PairState::Synchronized);
        assert!(state[&KEY].regions.is_empty());
    }

    fn payload_of(record: &Record) -> Vec<u8> {
        let mut framed = Vec::new();
        record.encode(&mut framed);
        framed[5..framed.len() - DIGEST_BYTES].to_vec()
    }

    /// A volume with two mates: each pair's state and intents are its own,
    /// across a replay and a compaction.
    #[tokio::test]
    async fn each_mate_of_a_volume_has_its_own_state_and_intents() {
        let dir = tempfile::tempdir().expect("tempdir");
        let second = PairInfo { mate_lu: 7, ..PAIR };
        let second_key = PairKey::of(&second);
        let (journal, _) = Journal::open(dir.path(), 4096).expect("open");
        journal
            .record_state(&PAIR, &split("run-1"), false)
            .await
            .expect("mate 1 split");
        journal
            .record_state(&second, &split("run-2"), false)
            .await
            .expect("mate 2 split");
        journal.record_intent(&PAIR, 1..2).await.expect("intent 1");
        journal
            .record_intent(&second, 5..6)
            .await
            .expect("intent 2");
        journal
            .record_state(&PAIR, &PairState::Synchronized, false)
            .await
            .expect("mate 1 synchronized");
        journal.close();
        let (journal, state) = Journal::open(dir.path(), 4096).expect("reopen");
        assert_eq!(state[&KEY].state, PairState::Synchronized);
        assert!(state[&KEY].regions.is_empty(), "mate 1's intents dropped");
        assert_eq!(state[&second_key].state, split("run-2"));
        assert_eq!(
            regions(&state[&second_key]),
            vec![5..6],
            "mate 2 keeps its own"
        );
        journal.close();
        // A compaction writes each pair back as it was.
        let (journal, state_again) =
            Journal::open_compacting_at(dir.path(), 4096, 1).expect("compact");
        journal.record_intent(&second, 9..10).await.expect("intent");
        journal.close();
        let (_, compacted) = Journal::open(dir.path(), 4096).expect("reopen");
        assert_eq!(state_again, state);
        assert_eq!(regions(&compacted[&second_key]), vec![5..6, 9..10]);
        assert_eq!(compacted[&KEY].state, PairState::Synchronized);
    }

    /// The single-mate format's intent record (type 2) names a volume, not
    /// a mate: it is read as an intent of every pair of that volume.
    #[test]
    fn an_intent_of_the_single_mate_format_applies_to_every_pair_of_its_volume() {
        let mut state = BTreeMap::new();
        for mate_lu in [2, 7] {
            let Record::State {
                volume,
                origin_lu,
                block_count,
                state: pair_state,
                full_resync,
                ended_restore,
                ..
            } = state_record(split("run"))
            else {
                unreachable!("a state record")
            };
            apply(
                &mut state,
                Record::State {
                    volume,
                    origin_lu,
                    mate_lu,
                    block_count,
                    state: pair_state,
                    full_resync,
                    ended_restore,
                },
            );
        }
        let mut framed = Vec::new();
        Record::VolumeIntent {
            volume: 0,
            blocks: 3..4,
        }
        .encode(&mut framed);
        let payload = framed[5..framed.len() - DIGEST_BYTES].to_vec();
        let record = Record::decode(&payload).expect("a type-2 record decodes");
        apply(&mut state, record);
        for mate_lu in [2, 7] {
            let key = PairKey { volume: 0, mate_lu };
            assert_eq!(regions(&state[&key]), vec![3..4], "mate LU {mate_lu}");
        }
    }

    fn state_record(state: PairState) -> Record {
        Record::State {
            volume: 0,
            origin_lu: 1,
            mate_lu: 2,
            block_count: 1024,
            state,
            full_resync: false,
            ended_restore: None,
        }
    }

    #[test]
    fn restore_states_round_trip_and_are_decoded_strictly() {
        let restoring = state_record(PairState::Restoring {
            run_id: "restore-1".into(),
            backup_id: "0190abcd-backup".into(),
        });
        let payload = payload_of(&restoring);
        assert_eq!(Record::decode(&payload), Some(restoring));
        // The backup id is the record's last field: cut or lengthened, the
        // record is refused.
        assert_eq!(Record::decode(&payload[..payload.len() - 1]), None);
        let mut longer = payload.clone();
        longer.push(b'x');
        assert_eq!(Record::decode(&longer), None);
        // A restore without a run id makes no sense.
        let nameless = payload_of(&state_record(PairState::Restoring {
            run_id: String::new(),
            backup_id: "b".into(),
        }));
        assert_eq!(Record::decode(&nameless), None);

        let reverse = state_record(PairState::RestoringToSnapshot {
            holder: "run-9".into(),
            ledger_sequence: 77,
            snapshot_id: 0xabc,
        });
        let payload = payload_of(&reverse);
        assert_eq!(Record::decode(&payload), Some(reverse));
        let mut zero = payload.clone();
        let at = zero.len() - 8;
        zero[at..].copy_from_slice(&0u64.to_le_bytes());
        assert_eq!(Record::decode(&zero), None, "a snapshot id of 0");
        let mut unknown = payload;
        unknown[21] = 7;
        assert_eq!(Record::decode(&unknown), None, "an unknown state code");

        // A writable split snapshot is code 6 and round-trips.
        let writable = state_record(PairState::Snapshot {
            holder: "run-w".into(),
            ledger_sequence: 3,
            snapshot_id: 0x77,
            writable: true,
        });
        let payload = payload_of(&writable);
        assert_eq!(payload[21], 6);
        assert_eq!(Record::decode(&payload), Some(writable));

        // A held copy-on-write snapshot (code 5) round-trips, and is
        // refused without its id as a split snapshot is.
        let cow = state_record(PairState::CowSnapshot {
            holder: "run-c".into(),
            ledger_sequence: 12,
            snapshot_id: 0xdef,
        });
        let payload = payload_of(&cow);
        assert_eq!(payload[21], 5);
        assert_eq!(Record::decode(&payload), Some(cow));
        let mut zero = payload;
        let at = zero.len() - 8;
        zero[at..].copy_from_slice(&0u64.to_le_bytes());
        assert_eq!(Record::decode(&zero), None, "a snapshot id of 0");
    }

    /// A state record as the encoder before the restore states wrote it
    /// (codes 0 to 2, no second string) still decodes.
    #[test]
    fn records_written_before_the_restore_states_still_decode() {
        let old = |code: u8, holder: &str, sequence: u64, id: u64| {
            let mut payload = vec![1];
            payload.extend_from_slice(&0u32.to_le_bytes());
            payload.extend_from_slice(&1u32.to_le_bytes());
            payload.extend_from_slice(&2u32.to_le_bytes());
            payload.extend_from_slice(&1024u64.to_le_bytes());
            payload.push(code);
            payload.push(1);
            payload.extend_from_slice(&(holder.len() as u16).to_le_bytes());
            payload.extend_from_slice(holder.as_bytes());
            payload.extend_from_slice(&sequence.to_le_bytes());
            payload.extend_from_slice(&id.to_le_bytes());
            payload
        };
        let decoded = |payload: Vec<u8>| match Record::decode(&payload) {
            Some(Record::State {
                state, full_resync, ..
            }) => (state, full_resync),
            other => panic!("not a state record: {other:?}"),
        };
        assert_eq!(decoded(old(0, "", 0, 0)), (PairState::Synchronized, true));
        assert_eq!(
            decoded(old(2, "", 0, 0)),
            (PairState::Resynchronizing, true)
        );
        assert_eq!(
            decoded(old(1, "run", 5, 9)),
            (
                PairState::Snapshot {
                    holder: "run".into(),
                    ledger_sequence: 5,
                    snapshot_id: 9,
                    writable: false,
                },
                true
            )
        );
    }

    /// Restoring survives a reopen with its backup id; the reverse resync's
    /// state keeps the snapshot's intents (the ranges it must copy) across
    /// a reopen, and Synchronized drops them.
    #[tokio::test]
    async fn restore_states_replay_and_the_reverse_resync_keeps_the_intents() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (journal, _) = Journal::open(dir.path(), 4096).expect("open");
        let restoring = PairState::Restoring {
            run_id: "restore-1".into(),
            backup_id: "backup-b".into(),
        };
        journal
            .record_state(&PAIR, &restoring, false)
            .await
            .expect("restoring");
        journal.close();
        let (journal, state) = Journal::open(dir.path(), 4096).expect("reopen");
        assert_eq!(state[&KEY].state, restoring);
        assert!(state[&KEY].regions.is_empty());
        journal
            .record_state(&PAIR, &PairState::Synchronized, false)
            .await
            .expect("synchronized");
        journal
            .record_state(&PAIR, &split("r"), false)
            .await
            .expect("split");
        journal.record_intent(&PAIR, 3..4).await.expect("intent");
        let reverse = PairState::RestoringToSnapshot {
            holder: "r".into(),
            ledger_sequence: 1,
            snapshot_id: 0x5eed,
        };
        journal
            .record_state(&PAIR, &reverse, false)
            .await
            .expect("reverse");
        // Still durable: a write there would cost nothing (none comes:
        // the volume is offline), and a compaction keeps it.
        assert!(journal.is_durable(KEY, &(3..4)));
        journal.close();
        let (journal, state) = Journal::open(dir.path(), 4096).expect("reopen");
        assert_eq!(state[&KEY].state, reverse);
        assert_eq!(regions(&state[&KEY]), vec![3..4]);
        journal
            .record_state(&PAIR, &PairState::Synchronized, false)
            .await
            .expect("synchronized");
        journal.close();
        let (_, state) = Journal::open(dir.path(), 4096).expect("reopen");
        assert_eq!(state[&KEY].state, PairState::Synchronized);
        assert!(state[&KEY].regions.is_empty());
    }

    /// The run that ended (or abandoned) a restore is remembered across a
    /// reopen and a compaction, through later state changes, until the
    /// next restore begins.
    #[tokio::test]
    async fn the_run_that_ended_a_restore_is_remembered_until_the_next_restore() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (journal, _) = Journal::open(dir.path(), 4096).expect("open");
        let restoring = |run: &str| PairState::Restoring {
            run_id: run.into(),
            backup_id: "b".into(),
        };
        journal
            .record_state(&PAIR, &restoring("restore-1"), false)
            .await
            .expect("restoring");
        journal
            .record_state_ending(&PAIR, &PairState::Synchronized, false, Some("restore-1"))
            .await
            .expect("ended");
        journal
            .record_state(&PAIR, &PairState::Resynchronizing, false)
            .await
            .expect("a failed write");
        journal.close();
        let (journal, state) = Journal::open(dir.path(), 4096).expect("reopen");
        assert_eq!(state[&KEY].ended_restore.as_deref(), Some("restore-1"));
        assert_eq!(state[&KEY].state, PairState::Resynchronizing);
        journal
            .record_state(&PAIR, &restoring("restore-2"), false)
            .await
            .expect("the next restore");
        journal.close();
        let (journal, state) = Journal::open(dir.path(), 4096).expect("reopen");
        assert_eq!(state[&KEY].ended_restore, None);
        journal
            .record_state_ending(&PAIR, &PairState::Resynchronizing, true, Some("restore-2"))
            .await
            .expect("abandoned");
        journal.close();
        // Compacted at every append: the state record carries the run.
        let (journal, state) =
            Journal::open_compacting_at(dir.path(), 4096, 0).expect("reopen compacting");
        assert_eq!(state[&KEY].ended_restore.as_deref(), Some("restore-2"));
        assert!(state[&KEY].full_resync);
        journal
            .record_intent(&PAIR, 1..2)
            .await
            .expect("an append that compacts");
        journal.close();
        let (_, state) = Journal::open(dir.path(), 4096).expect("reopen");
        assert_eq!(state[&KEY].ended_restore.as_deref(), Some("restore-2"));
        assert_eq!(regions(&state[&KEY]), vec![1..2]);
    }

    /// The old rule took any bad record for a torn tail. Now only bytes
    /// after the committed length are a torn tail; a bad record before it
    /// (even the last one) is damage.
    #[tokio::test]
    async fn only_bytes_after_the_committed_length_are_a_torn_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let written = journal_with_a_snapshot(&dir).await;
        let path = journal_path(&dir);
        let committed = std::fs::read(&path).expect("read");
        // A commit cut short: a torn record, then a whole record the commit
        // block does not cover (its fsync never returned).
        let mut bytes = committed.clone();
        bytes.extend_from_slice(&[RECORD_MAGIC, 200, 0, 0, 0, 1, 2]);
        Record::Intent {
            pair: KEY,
            blocks: 500..501,
        }
        .encode(&mut bytes);
        std::fs::write(&path, &bytes).expect("write");
        let (journal, state) = Journal::open(dir.path(), 4096).expect("reopen");
        assert!(journal.unusable_reason().is_none());
        assert!(set_aside_files(&dir).is_empty());
        assert_eq!(
            regions(&state[&KEY]),
            written,
            "nothing lost, nothing invented"
        );
        assert_eq!(
            std::fs::read(&path).expect("read"),
            committed,
            "the uncommitted tail is cut off"
        );
        // Appends continue after the committed records.
        journal
            .record_intent(&PAIR, 700..701)
            .await
            .expect("intent");
        journal.close();
        let (_, state) = Journal::open(dir.path(), 4096).expect("reopen");
        let mut want = written;
        want.push(700..701);
        assert_eq!(regions(&state[&KEY]), want);

        // A bit flipped in the last committed record: damage, not a tail.
        let mut bytes = std::fs::read(&path).expect("read");
        let len = bytes.len();
        bytes[len - 12] ^= 0x10;
        std::fs::write(&path, &bytes).expect("write");
        assert_unusable(&dir, &bytes, "corrupt record at offset").await;
    }

    #[tokio::test]
    async fn a_journal_overwritten_in_the_middle_is_unusable_and_kept_aside() {
        let dir = tempfile::tempdir().expect("tempdir");
        journal_with_a_snapshot(&dir).await;
        let path = journal_path(&dir);
        let mut bytes = std::fs::read(&path).expect("read");
        let middle = bytes.len() / 2;
        for byte in &mut bytes[middle..middle + 8] {
            *byte ^= 0xFF;
        }
        std::fs::write(&path, &bytes).expect("write");
        assert_unusable(&dir, &bytes, "corrupt record at offset").await;
    }

    #[tokio::test]
    async fn a_journal_cut_to_half_is_unusable() {
        let dir = tempfile::tempdir().expect("tempdir");
        journal_with_a_snapshot(&dir).await;
        let path = journal_path(&dir);
        let mut bytes = std::fs::read(&path).expect("read");
        bytes.truncate(bytes.len() / 2);
        std::fs::write(&path, &bytes).expect("write");
        assert_unusable(&dir, &bytes, "truncated").await;
    }

    #[tokio::test]
    async fn a_corrupt_commit_block_makes_the_journal_unusable() {
        let dir = tempfile::tempdir().expect("tempdir");
        journal_with_a_snapshot(&dir).await;
        let path = journal_path(&dir);
        let mut bytes = std::fs::read(&path).expect("read");
        bytes[COMMIT_BLOCK_AT as usize] ^= 0x01;
        std::fs::write(&path, &bytes).expect("write");
        assert_unusable(&dir, &bytes, "corrupt commit block").await;
    }

    #[tokio::test]
    async fn an_old_format_journal_is_set_aside() {
        let dir = tempfile::tempdir().expect("tempdir");
        let old = b"SMJRNL01\xA5\x03\x00\x00\x00abc".to_vec();
        std::fs::write(journal_path(&dir), &old).expect("write");
        assert_unusable(&dir, &old, "another version").await;
    }

    #[tokio::test]
    async fn a_foreign_file_is_set_aside() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(journal_path(&dir), b"not a journal").expect("write");
        assert_unusable(&dir, b"not a journal", "not a splitmirror journal").await;
    }

    #[tokio::test]
    async fn concurrent_intents_share_fsyncs_and_compaction_keeps_the_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (journal, _) = Journal::open_compacting_at(dir.path(), 4096, 8192).expect("open");
        journal
            .record_state(&PAIR, &split("a"), false)
            .await
            .expect("state");
        let mut tasks = Vec::new();
        for i in 0..64u64 {
            let journal = journal.clone();
            tasks.push(tokio::spawn(async move {
                journal.record_intent(&PAIR, i * 2..i * 2 + 1).await
            }));
        }
        for task in tasks {
            task.await.expect("task").expect("intent");
        }
        let stats = journal.stats();
        assert_eq!(stats.records, 65);
        assert!(stats.fsyncs < 65, "group commit shared fsyncs: {stats:?}");
        // Many snapshot cycles: the file is compacted instead of growing.
        let snapshot = split("b");
        for cycle in 0..300u64 {
            journal
                .record_state(&PAIR, &snapshot, false)
                .await
                .expect("state");
            journal
                .record_intent(&PAIR, cycle..cycle + 1)
                .await
                .expect("intent");
            journal
                .record_state(&PAIR, &PairState::Resynchronizing, false)
                .await
                .expect("state");
            journal
                .record_state(&PAIR, &PairState::Synchronized, false)
                .await
                .expect("state");
        }
        // The last cycle leaves intents that must survive the compactions.
        journal
            .record_state(&PAIR, &snapshot, false)
            .await
            .expect("state");
        journal.record_intent(&PAIR, 40..41).await.expect("intent");
        let written = journal.stats().bytes_written;
        let on_disk = std::fs::metadata(journal_path(&dir)).expect("meta").len();
        assert!(written > 4 * 8192, "the cycles wrote {written} bytes");
        assert!(on_disk <= 8192 + 256, "compacted to {on_disk} bytes");
        assert!(!dir.path().join("journal.new").exists());
        journal.close();
        let (journal, state) = Journal::open(dir.path(), 4096).expect("reopen");
        assert!(
            journal.unusable_reason().is_none(),
            "compaction writes the current format with its commit block"
        );
        assert_eq!(state[&KEY].state, snapshot);
        assert_eq!(regions(&state[&KEY]), vec![40..41]);
    }

    /// Which of the next operations on the journal file fail.
    #[derive(Default)]
    struct Faults {
        /// Writes that put half their bytes in the file, then fail as a
        /// full filesystem does.
        torn_writes: u32,
        /// fdatasyncs that fail (after which the page cache says nothing).
        failed_syncs: u32,
        /// Cuts that fail.
        failed_set_lens: u32,
    }

    /// The journal file with [`Faults`] armed by the test.
    struct FaultyFile {
        file: File,
        faults: Arc<Mutex<Faults>>,
    }

    impl JournalFile for FaultyFile {
        fn write_all_at(&mut self, bytes: &[u8], offset: u64) -> io::Result<()> {
            let mut faults = self.faults.lock().expect("faults");
            if faults.torn_writes > 0 {
                faults.torn_writes -= 1;
                FileExt::write_all_at(&self.file, &bytes[..bytes.len() / 2], offset)?;
                return Err(io::Error::from_raw_os_error(28)); // ENOSPC
            }
            FileExt::write_all_at(&self.file, bytes, offset)
        }

        fn set_len(&mut self, len_bytes: u64) -> io::Result<()> {
            let mut faults = self.faults.lock().expect("faults");
            if faults.failed_set_lens > 0 {
                faults.failed_set_lens -= 1;
                return Err(io::Error::from_raw_os_error(5)); // EIO
            }
            self.file.set_len(len_bytes)
        }

        fn sync_data(&mut self) -> io::Result<()> {
            let mut faults = self.faults.lock().expect("faults");
            if faults.failed_syncs > 0 {
                faults.failed_syncs -= 1;
                return Err(io::Error::from_raw_os_error(5)); // EIO
            }
            self.file.sync_data()
        }
    }

    fn open_faulty(dir: &tempfile::TempDir) -> (Arc<Journal>, Arc<Mutex<Faults>>) {
        let faults = Arc::new(Mutex::new(Faults::default()));
        let shared = faults.clone();
        let (journal, _) = Journal::open_with(
            dir.path(),
            4096,
            COMPACT_AT_BYTES,
            Box::new(move |file| {
                Box::new(FaultyFile {
                    file,
                    faults: shared.clone(),
                })
            }),
        )
        .expect("open");
        (journal, faults)
    }

    #[tokio::test]
    async fn a_failed_append_is_cut_back_and_later_intents_survive() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (journal, faults) = open_faulty(&dir);
        journal
            .record_state(&PAIR, &split("a"), false)
            .await
            .expect("state");
        journal.record_intent(&PAIR, 1..2).await.expect("intent");
        faults.lock().expect("faults").torn_writes = 1;
        journal
            .record_intent(&PAIR, 3..4)
            .await
            .expect_err("a torn write fails the append");
        faults.lock().expect("faults").failed_syncs = 1;
        journal
            .record_intent(&PAIR, 5..6)
            .await
            .expect_err("a failed fsync fails the append");
        // Space (and the disk) are back: these are acknowledged.
        journal.record_intent(&PAIR, 7..8).await.expect("intent");
        journal.record_intent(&PAIR, 9..10).await.expect("intent");
        journal.close();
        let (journal, state) = Journal::open(dir.path(), 4096).expect("reopen");
        assert!(journal.unusable_reason().is_none());
        assert_eq!(
            regions(&state[&KEY]),
            vec![1..2, 7..8, 9..10],
            "every acknowledged intent, and only those"
        );
    }

    #[tokio::test]
    async fn a_failed_repair_breaks_the_journal_until_it_is_reopened() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (journal, faults) = open_faulty(&dir);
        journal
            .record_state(&PAIR, &split("a"), false)
            .await
            .expect("state");
        journal.record_intent(&PAIR, 1..2).await.expect("intent");
        {
            let mut faults = faults.lock().expect("faults");
            faults.torn_writes = 1;
            faults.failed_set_lens = 1;
        }
        journal
            .record_intent(&PAIR, 3..4)
            .await
            .expect_err("a torn write fails the append");
        // The faults are gone, but the torn bytes were never cut off:
        // nothing may be appended after them.
        let refused = journal
            .record_intent(&PAIR, 5..6)
            .await
            .expect_err("a broken journal refuses appends");
        assert!(refused.to_string().contains("broken"), "{refused}");
        assert!(
            journal.stats().broken.is_some(),
            "Status must say the journal is broken"
        );
        journal
            .record_state(&PAIR, &PairState::Resynchronizing, false)
            .await
            .expect_err("and state changes");
        journal
            .record_intent(&PAIR, 1..2)
            .await
            .expect("a region already durable needs no append");
        journal.close();
        let (journal, state) = Journal::open(dir.path(), 4096).expect("reopen");
        assert!(
            journal.unusable_reason().is_none(),
            "the torn bytes were never committed"
        );
        assert_eq!(state[&KEY].state, split("a"));
        assert_eq!(regions(&state[&KEY]), vec![1..2]);
        journal
            .record_intent(&PAIR, 5..6)
            .await
            .expect("a restart repairs the journal");
        journal.close();
    }

    #[tokio::test]
    async fn an_unusable_journal_drops_the_snapshot_and_says_why_in_status() {
        use crate::array_port::MemoryArray;
        use crate::lu_status::Mode;
        use crate::manager::{ManagerConfig, SnapshotManager};

        let dir = tempfile::tempdir().expect("tempdir");
        journal_with_a_snapshot(&dir).await;
        let path = journal_path(&dir);
        let mut bytes = std::fs::read(&path).expect("read");
        bytes.truncate(bytes.len() / 2);
        std::fs::write(&path, &bytes).expect("write");
        let opened = Journal::open(dir.path(), 4096).expect("reopen");
        let journal = opened.0.clone();
        let array = Arc::new(MemoryArray::new(vec![PAIR]));
        let manager = SnapshotManager::start(
            array,
            vec![PAIR],
            Some(opened),
            ManagerConfig::default(),
            tokio_util::sync::CancellationToken::new(),
            tokio_util::task::TaskTracker::new(),
        )
        .await
        .expect("start");
        // The resync task has not run yet on this single-threaded runtime.
        let status = &manager.status()[0];
        assert_eq!(status.routing.data_mode, Mode::Resynchronizing);
        assert_eq!(status.holder, None, "the snapshot is dropped");
        let reason = status.full_resync_reason.clone().expect("a reason");
        assert!(reason.contains("journal unusable: truncated"), "{reason}");
        journal.close();
    }
}
