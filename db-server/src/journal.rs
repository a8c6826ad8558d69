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
//! Removals are not journaled one by one: a state change to Synchronized (or
//! Snapshot, which starts from an empty table) drops a volume's intents.
//! When the file grows past a threshold it is rewritten from the current
//! state (write a new file, fsync, rename, fsync the directory).
//!
//! Record: `0xA5 | len u32 | payload | first 8 bytes of BLAKE3(payload)`.
//! Replay stops at the first record that is torn or fails its checksum and
//! truncates the file there.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rangemap::RangeSet;
use tokio::sync::{mpsc, oneshot};

use crate::array_port::PairInfo;
use crate::error::DbError;
use crate::lu_status::PairState;

const HEADER: &[u8; 8] = b"SMJRNL01";
const RECORD_MAGIC: u8 = 0xA5;
const DIGEST_BYTES: usize = 8;
/// Requests waiting for the journal thread.
const QUEUE_DEPTH: usize = 1024;
/// The file is rewritten from the current state when it grows past this.
const COMPACT_AT_BYTES: u64 = 1 << 20;

/// A volume's durable state as replayed from the journal.
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
    },
    Intent {
        volume: u32,
        blocks: Range<u64>,
    },
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
            } => {
                payload.push(1);
                payload.extend_from_slice(&volume.to_le_bytes());
                payload.extend_from_slice(&origin_lu.to_le_bytes());
                payload.extend_from_slice(&mate_lu.to_le_bytes());
                payload.extend_from_slice(&block_count.to_le_bytes());
                let (code, holder, ledger_sequence) = match state {
                    PairState::Synchronized => (0u8, "", 0),
                    PairState::Snapshot {
                        holder,
                        ledger_sequence,
                    } => (1, holder.as_str(), *ledger_sequence),
                    PairState::Resynchronizing => (2, "", 0),
                };
                payload.push(code);
                payload.push(u8::from(*full_resync));
                let holder = &holder.as_bytes()[..holder.len().min(u16::MAX as usize)];
                payload.extend_from_slice(&(holder.len() as u16).to_le_bytes());
                payload.extend_from_slice(holder);
                payload.extend_from_slice(&ledger_sequence.to_le_bytes());
            }
            Record::Intent { volume, blocks } => {
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
                let state = match code {
                    0 => PairState::Synchronized,
                    1 => PairState::Snapshot {
                        holder,
                        ledger_sequence: u64_at(25 + holder_len)?,
                    },
                    2 => PairState::Resynchronizing,
                    _ => return None,
                };
                Some(Record::State {
                    volume: u32_at(1)?,
                    origin_lu: u32_at(5)?,
                    mate_lu: u32_at(9)?,
                    block_count: u64_at(13)?,
                    state,
                    full_resync,
                })
            }
            2 => {
                let (start, end) = (u64_at(5)?, u64_at(13)?);
                (start < end).then_some(Record::Intent {
                    volume: u32_at(1)?,
                    blocks: start..end,
                })
            }
            _ => None,
        }
    }
}

/// Applies a record to the replayed state.
fn apply(state: &mut BTreeMap<u32, DurableVolume>, record: Record) {
    match record {
        Record::State {
            volume,
            origin_lu,
            mate_lu,
            block_count,
            state: pair_state,
            full_resync,
        } => {
            let keep_regions = pair_state == PairState::Resynchronizing;
            let regions = match state.remove(&volume) {
                Some(old) if keep_regions => old.regions,
                _ => RangeSet::new(),
            };
            state.insert(
                volume,
                DurableVolume {
                    origin_lu,
                    mate_lu,
                    block_count,
                    state: pair_state,
                    full_resync,
                    regions,
                },
            );
        }
        Record::Intent { volume, blocks } => {
            // An intent for a volume with no state record cannot be placed;
            // that volume gets a full resync anyway.
            if let Some(v) = state.get_mut(&volume) {
                v.regions.insert(blocks);
            }
        }
    }
}

/// Reads a journal file: the state it describes and the length of its
/// valid prefix. `None` when the file is not a journal at all.
fn replay(file: &mut File) -> io::Result<Option<(BTreeMap<u32, DurableVolume>, u64)>> {
    let mut bytes = Vec::new();
    file.seek(SeekFrom::Start(0))?;
    file.read_to_end(&mut bytes)?;
    if bytes.get(..HEADER.len()) != Some(HEADER.as_slice()) {
        return Ok(None);
    }
    let mut state = BTreeMap::new();
    let mut at = HEADER.len();
    while let Some(&magic) = bytes.get(at) {
        if magic != RECORD_MAGIC {
            break;
        }
        let Some(len) = bytes
            .get(at + 1..at + 5)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
        else {
            break;
        };
        let Some(payload) = bytes.get(at + 5..at + 5 + len) else {
            break;
        };
        let Some(digest) = bytes.get(at + 5 + len..at + 5 + len + DIGEST_BYTES) else {
            break;
        };
        if &blake3::hash(payload).as_bytes()[..DIGEST_BYTES] != digest {
            break;
        }
        let Some(record) = Record::decode(payload) else {
            break;
        };
        apply(&mut state, record);
        at += 5 + len + DIGEST_BYTES;
    }
    if at < bytes.len() {
        tracing::warn!(
            "journal: ignoring {} bytes after the last good record at offset {at} (torn or corrupt tail)",
            bytes.len() - at
        );
    }
    Ok(Some((state, at as u64)))
}

/// What the journal has cost so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JournalStats {
    pub records: u64,
    pub bytes_written: u64,
    pub fsyncs: u64,
}

struct Append {
    records: Vec<Record>,
    done: oneshot::Sender<io::Result<()>>,
}

pub struct Journal {
    queue: Mutex<Option<mpsc::Sender<Append>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    region_bytes: u64,
    /// Regions durable in the journal, per volume: a write inside one costs
    /// no journal I/O.
    durable: Mutex<BTreeMap<u32, RangeSet<u64>>>,
    stats: Arc<Stats>,
}

#[derive(Default)]
struct Stats {
    records: AtomicU64,
    bytes_written: AtomicU64,
    fsyncs: AtomicU64,
}

impl Journal {
    /// Opens (or creates) the journal under `dir` and replays it. Answers
    /// the durable state per volume; a missing, foreign or unreadable
    /// journal answers an empty map (every volume then needs a full resync).
    pub fn open(
        dir: &Path,
        region_bytes: u64,
    ) -> Result<(Arc<Self>, BTreeMap<u32, DurableVolume>), DbError> {
        Self::open_compacting_at(dir, region_bytes, COMPACT_AT_BYTES)
    }

    /// [`open`](Self::open) with a chosen compaction threshold.
    pub fn open_compacting_at(
        dir: &Path,
        region_bytes: u64,
        compact_at_bytes: u64,
    ) -> Result<(Arc<Self>, BTreeMap<u32, DurableVolume>), DbError> {
        let path = dir.join("journal.log");
        let journal_error = |e: io::Error| DbError::Journal(format!("{}: {e}", path.display()));
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(journal_error)?;
        let (state, valid_len) = match replay(&mut file).map_err(journal_error)? {
            Some(replayed) => replayed,
            None => {
                if file.metadata().map_err(journal_error)?.len() > 0 {
                    let aside = dir.join("journal.unreadable");
                    tracing::warn!(
                        "journal: {} is not a journal; moving it to {}",
                        path.display(),
                        aside.display()
                    );
                    std::fs::rename(&path, &aside).map_err(journal_error)?;
                    file = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .open(&path)
                        .map_err(journal_error)?;
                }
                file.set_len(0).map_err(journal_error)?;
                file.write_all(HEADER).map_err(journal_error)?;
                file.sync_all().map_err(journal_error)?;
                sync_dir(dir).map_err(journal_error)?;
                (BTreeMap::new(), HEADER.len() as u64)
            }
        };
        file.set_len(valid_len).map_err(journal_error)?;
        file.seek(SeekFrom::Start(valid_len))
            .map_err(journal_error)?;
        let durable = state
            .iter()
            .map(|(&volume, v)| (volume, v.regions.clone()))
            .collect();
        let stats = Arc::new(Stats::default());
        let (sender, receiver) = mpsc::channel(QUEUE_DEPTH);
        let writer = Writer {
            file,
            path: path.clone(),
            dir: dir.to_path_buf(),
            len_bytes: valid_len,
            compact_at_bytes,
            state: state.clone(),
            stats: stats.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("journal".into())
            .spawn(move || writer.run(receiver))
            .map_err(|e| DbError::Journal(format!("starting the journal thread: {e}")))?;
        let journal = Arc::new(Self {
            queue: Mutex::new(Some(sender)),
            thread: Mutex::new(Some(thread)),
            region_bytes,
            durable: Mutex::new(durable),
            stats,
        });
        Ok((journal, state))
    }

    /// Makes `blocks` of `volume` durable as an intent (rounded out to
    /// regions). Answers at once, without I/O, when already durable.
    pub async fn record_intent(
        &self,
        volume: u32,
        block_size_bytes: u32,
        blocks: Range<u64>,
        block_count: u64,
    ) -> Result<(), DbError> {
        let region_blocks = (self.region_bytes / u64::from(block_size_bytes)).max(1);
        let start = blocks.start / region_blocks * region_blocks;
        let end = blocks
            .end
            .div_ceil(region_blocks)
            .saturating_mul(region_blocks)
            .min(block_count);
        let region = start..end;
        if self.is_durable(volume, &region) {
            return Ok(());
        }
        self.append(vec![Record::Intent {
            volume,
            blocks: region.clone(),
        }])
        .await?;
        self.durable
            .lock()
            .expect("journal poisoned")
            .entry(volume)
            .or_default()
            .insert(region);
        Ok(())
    }

    fn is_durable(&self, volume: u32, region: &Range<u64>) -> bool {
        self.durable
            .lock()
            .expect("journal poisoned")
            .get(&volume)
            .is_some_and(|set| set.gaps(region).next().is_none())
    }

    /// Makes a state change durable (before the caller lets it take effect).
    pub async fn record_state(
        &self,
        pair: &PairInfo,
        state: &PairState,
        full_resync: bool,
    ) -> Result<(), DbError> {
        self.append(vec![Record::State {
            volume: pair.mirror_lu,
            origin_lu: pair.origin_lu,
            mate_lu: pair.mate_lu,
            block_count: pair.block_count,
            state: state.clone(),
            full_resync,
        }])
        .await?;
        if *state != PairState::Resynchronizing {
            self.durable
                .lock()
                .expect("journal poisoned")
                .remove(&pair.mirror_lu);
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
            .map_err(|_| DbError::Journal("the journal thread has stopped".into()))?;
        answer
            .await
            .map_err(|_| DbError::Journal("the journal thread has stopped".into()))?
            .map_err(|e| DbError::Journal(format!("appending: {e}")))
    }

    pub fn stats(&self) -> JournalStats {
        JournalStats {
            records: self.stats.records.load(Ordering::Relaxed),
            bytes_written: self.stats.bytes_written.load(Ordering::Relaxed),
            fsyncs: self.stats.fsyncs.load(Ordering::Relaxed),
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
    file: File,
    path: PathBuf,
    dir: PathBuf,
    len_bytes: u64,
    compact_at_bytes: u64,
    state: BTreeMap<u32, DurableVolume>,
    stats: Arc<Stats>,
}

impl Writer {
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
            let result = self
                .file
                .write_all(&bytes)
                .and_then(|()| self.file.sync_data());
            if result.is_ok() {
                self.len_bytes += bytes.len() as u64;
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
            if error.is_none()
                && self.len_bytes > self.compact_at_bytes
                && let Err(e) = self.compact()
            {
                tracing::error!("journal: compacting {}: {e}", self.path.display());
            }
        }
    }

    /// Rewrites the journal as the current state: one state record and the
    /// regions of each volume.
    fn compact(&mut self) -> io::Result<()> {
        let mut bytes = HEADER.to_vec();
        for (&volume, v) in &self.state {
            Record::State {
                volume,
                origin_lu: v.origin_lu,
                mate_lu: v.mate_lu,
                block_count: v.block_count,
                state: v.state.clone(),
                full_resync: v.full_resync,
            }
            .encode(&mut bytes);
            for blocks in v.regions.iter() {
                Record::Intent {
                    volume,
                    blocks: blocks.clone(),
                }
                .encode(&mut bytes);
            }
        }
        let tmp = self.dir.join("journal.compact");
        let mut file = File::create(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        sync_dir(&self.dir)?;
        let mut reopened = OpenOptions::new().read(true).write(true).open(&self.path)?;
        reopened.seek(SeekFrom::End(0))?;
        self.file = reopened;
        self.len_bytes = bytes.len() as u64;
        tracing::debug!("journal compacted to {} bytes", bytes.len());
        Ok(())
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
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

    fn split(holder: &str) -> PairState {
        PairState::Snapshot {
            holder: holder.into(),
            ledger_sequence: 1,
        }
    }

    fn regions(volume: &DurableVolume) -> Vec<Range<u64>> {
        volume.regions.iter().cloned().collect()
    }

    #[tokio::test]
    async fn a_snapshot_and_its_intents_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (journal, state) = Journal::open(dir.path(), 64 << 10).expect("open");
        assert!(state.is_empty(), "a new journal knows no volume");
        let snapshot = PairState::Snapshot {
            holder: "run-7".into(),
            ledger_sequence: 4711,
        };
        journal
            .record_state(&PAIR, &snapshot, false)
            .await
            .expect("state");
        journal
            .record_intent(0, 4096, 5..6, 1024)
            .await
            .expect("intent");
        journal
            .record_intent(0, 4096, 6..9, 1024)
            .await
            .expect("same region");
        journal
            .record_intent(0, 4096, 100..101, 1024)
            .await
            .expect("intent");
        let stats = journal.stats();
        assert_eq!(
            stats.records, 3,
            "the write inside a durable region cost nothing"
        );
        journal.close();
        let (_, state) = Journal::open(dir.path(), 64 << 10).expect("reopen");
        let v = &state[&0];
        assert_eq!(v.state, snapshot);
        // Rounded out to 16-block (64 KiB) regions.
        assert_eq!(regions(v), vec![0..16, 96..112]);
    }

    #[tokio::test]
    async fn synchronized_drops_the_intents_and_resync_keeps_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (journal, _) = Journal::open(dir.path(), 4096).expect("open");
        journal
            .record_state(&PAIR, &split("a"), false)
            .await
            .expect("state");
        journal
            .record_intent(0, 4096, 1..2, 1024)
            .await
            .expect("intent");
        journal
            .record_state(&PAIR, &PairState::Resynchronizing, false)
            .await
            .expect("state");
        journal.close();
        let (journal, state) = Journal::open(dir.path(), 4096).expect("reopen");
        assert_eq!(regions(&state[&0]), vec![1..2]);
        journal
            .record_state(&PAIR, &PairState::Synchronized, false)
            .await
            .expect("state");
        journal.close();
        let (_, state) = Journal::open(dir.path(), 4096).expect("reopen");
        assert_eq!(state[&0].state, PairState::Synchronized);
        assert!(state[&0].regions.is_empty());
    }

    #[tokio::test]
    async fn a_torn_or_corrupt_tail_is_ignored_up_to_the_last_good_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (journal, _) = Journal::open(dir.path(), 4096).expect("open");
        journal
            .record_state(&PAIR, &split("a"), false)
            .await
            .expect("state");
        journal
            .record_intent(0, 4096, 1..2, 1024)
            .await
            .expect("intent");
        journal
            .record_intent(0, 4096, 9..10, 1024)
            .await
            .expect("intent");
        journal.close();
        let path = dir.path().join("journal.log");
        let mut bytes = std::fs::read(&path).expect("read");
        let len = bytes.len();
        // Flip a bit in the last record's payload, then add a torn record.
        bytes[len - 12] ^= 0x10;
        bytes.extend_from_slice(&[RECORD_MAGIC, 200, 0, 0, 0, 1, 2]);
        std::fs::write(&path, &bytes).expect("write");
        let (journal, state) = Journal::open(dir.path(), 4096).expect("reopen");
        assert_eq!(regions(&state[&0]), vec![1..2]);
        // Appends continue after the last good record.
        journal
            .record_intent(0, 4096, 20..21, 1024)
            .await
            .expect("intent");
        journal.close();
        let (_, state) = Journal::open(dir.path(), 4096).expect("reopen");
        assert_eq!(regions(&state[&0]), vec![1..2, 20..21]);
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
                journal.record_intent(0, 4096, i * 2..i * 2 + 1, 1024).await
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
                .record_intent(0, 4096, cycle..cycle + 1, 1024)
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
        let written = journal.stats().bytes_written;
        let on_disk = std::fs::metadata(dir.path().join("journal.log"))
            .expect("meta")
            .len();
        assert!(written > 4 * 8192, "the cycles wrote {written} bytes");
        assert!(on_disk <= 8192 + 256, "compacted to {on_disk} bytes");
        journal.close();
        let (_, state) = Journal::open(dir.path(), 4096).expect("reopen");
        assert_eq!(state[&0].state, PairState::Synchronized);
    }

    #[test]
    fn a_foreign_file_is_set_aside() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("journal.log"), b"not a journal").expect("write");
        let (journal, state) = Journal::open(dir.path(), 4096).expect("open");
        assert!(state.is_empty());
        assert!(dir.path().join("journal.unreadable").exists());
        journal.close();
    }
}
