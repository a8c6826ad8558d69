//! The two restores of issue 17, on the snapshot manager's volumes.
//!
//! **From a backup** ([`SnapshotManager::begin_restore`] …
//! [`SnapshotManager::end_restore`]): the pair goes from Synchronized to
//! Restoring (journaled before anything else changes), and the array is
//! told to let the restore's writer (the backup server) read and write the
//! pair's mirror, origin and mate LUs. The backup server writes the mirror
//! LU; db-server serves no Read or Write of the volume meanwhile. The end
//! compares origin and mate whole (the array's digests of 1 MiB chunks)
//! with each other and, when given, with the backup's image digest, then
//! journals Synchronized and withdraws the grant. Abandoned, the pair is
//! resynchronized whole instead (Resynchronizing with the whole-volume
//! compare pending: chunks that differ are copied origin → mate).
//!
//! **To the held snapshot** ([`SnapshotManager::restore_snapshot`], the
//! reverse resync): the pair goes from Snapshot to RestoringToSnapshot,
//! which keeps the journaled intents — exactly the ranges written since
//! the split — and those ranges are copied mate → origin inside the array.
//! Then the mate is made writable again and Synchronized is journaled
//! (dropping the intents). A restart in RestoringToSnapshot copies the
//! ranges again (the mate stayed frozen, so copying twice is harmless)
//! before the volume is served.
//!
//! At start-up the array's grants are made to agree with the journal: a
//! Restoring volume's writer gets its grant again, every other volume's
//! writer grant is withdrawn, so a crash between the journal and a
//! `SetAccess` (in either order) is repaired.

use std::time::{Duration, Instant};

use splitmirror_proto::client::Backoff;
use splitmirror_proto::range_lock::LockMode;

use super::{PairRef, SnapshotManager, Volume};
use crate::array_port::{Access, OwnAccess, PairInfo};
use crate::crash;
use crate::error::DbError;
use crate::lu_status::{PairState, RestoreKind, VirtualLu};
use crate::update_location_table::UpdateLocationTable;

/// The chunk of the end-of-restore compare: the array's `ChecksumRange`
/// chunk and the chunk store's, so the digests are a backup's.
pub const RESTORE_CHUNK_BYTES: u64 = 1 << 20;
/// Chunks asked for in one `ChecksumRange` call per side (4 GiB).
const COMPARE_BATCH_CHUNKS: u64 = 4096;

/// What `Status` says about a volume's restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreStatus {
    pub run_id: String,
    pub kind: RestoreKind,
    /// The identity the array lets write the pair's LUs (a restore from a
    /// backup on a cluster with masking).
    pub writer_identity: Option<String>,
    /// The reverse resync's blocks copied mate → origin, of those recorded.
    pub blocks_done: u64,
    pub blocks_total: u64,
}

/// What BeginRestore finds before it changes anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BeginDecision {
    /// A Synchronized volume: take it offline.
    Begin,
    /// This run has it offline already (a retry, or a re-run after a crash).
    AlreadyRestoring,
    /// This run's restore has ended already: change nothing.
    AlreadyEnded,
}

/// What BeginRestore did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BeganRestore {
    pub pair: PairInfo,
    /// The same run had already taken the volume offline (a retry).
    pub already_restoring: bool,
    /// This run's restore has ended already (EndRestore, or abandoned):
    /// nothing was changed, and EndRestore answers how it ended. A re-run
    /// of a restore whose end was not heard must not restore again over
    /// what the database wrote since.
    pub already_ended: bool,
    pub writer_identity: Option<String>,
}

/// What EndRestore did (the ledger's part is the caller's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndedRestore {
    pub already_ended: bool,
    pub abandoned: bool,
    /// Chunks of each side compared (0 when abandoned).
    pub chunks_compared: u64,
    /// BLAKE3 of the volume's chunk digests as compared (not abandoned).
    pub image_digest: Option<[u8; 32]>,
    /// Whether it equals the expected image digest (false when none was
    /// given).
    pub image_digest_matches: bool,
    /// Chunks the abandoned restore's whole-volume resync found different
    /// and copied, once it has run (see `EndRestore`).
    pub chunks_resynced: u64,
}

/// What RestoreSnapshot did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReverseOutcome {
    pub already_restored: bool,
    pub ranges_copied: u64,
    pub blocks_copied: u64,
    pub bytes_copied: u64,
    pub duration_us: u64,
    pub snapshot_ledger_sequence: u64,
}

impl SnapshotManager {
    /// Whether a restore (of either kind, through any of its mates) holds
    /// the volume offline.
    pub fn is_restoring(&self, volume: u32) -> bool {
        self.restore_of(volume).is_some()
    }

    /// The restore that holds the volume, if one does: its run id and kind.
    pub fn restore_of(&self, volume: u32) -> Option<(String, RestoreKind)> {
        self.pairs_of(volume).into_iter().find_map(|vol| {
            vol.inner()
                .state
                .restore()
                .map(|(run_id, kind)| (run_id.to_string(), kind))
        })
    }

    /// Whether a BeginRestore of `volume` by `run_id` would be accepted,
    /// without changing anything: `Ok(true)` for a retry by the run that
    /// already restores it, `Ok(false)` for a Synchronized volume. The
    /// caller decides with it whether to stop the ledger; the decision is
    /// made again under the mode gate.
    pub fn check_begin_restore(&self, volume: u32, run_id: &str) -> Result<BeginDecision, DbError> {
        let vol = self.volume(volume)?;
        self.refuse_several_mates(volume)?;
        let inner = vol.inner();
        Self::begin_decision(vol, &inner, run_id)
    }

    fn begin_decision(
        vol: &Volume,
        inner: &super::VolumeInner,
        run_id: &str,
    ) -> Result<BeginDecision, DbError> {
        let ended_by_this_run = inner
            .last_restore_ended
            .as_ref()
            .is_some_and(|(ended_by, _)| ended_by == run_id);
        match &inner.state {
            PairState::Synchronized | PairState::Resynchronizing if ended_by_this_run => {
                Ok(BeginDecision::AlreadyEnded)
            }
            PairState::Synchronized => Ok(BeginDecision::Begin),
            PairState::Restoring { run_id: holder, .. } if holder == run_id => {
                Ok(BeginDecision::AlreadyRestoring)
            }
            PairState::Restoring { run_id: holder, .. }
            | PairState::RestoringToSnapshot { holder, .. } => Err(DbError::RestoreHeld {
                volume: vol.volume(),
                action: "restore",
                holder: holder.clone(),
            }),
            other => Err(DbError::WrongMode {
                volume: vol.volume(),
                action: "restore",
                mode: other.refusal_mode(&vol.pair),
            }),
        }
    }

    /// Takes a Synchronized volume offline for the restore run `run_id` of
    /// `backup_id`: Restoring is journaled (durable before anything else
    /// changes), then the writer gets read-write access to the mirror,
    /// origin and mate LUs. Every write is kept out by the mode gate
    /// meanwhile, and every later one is refused. A retry by the same run
    /// sets the grant again and answers `already_restoring`.
    pub async fn begin_restore(
        &self,
        volume: u32,
        run_id: &str,
        backup_id: &str,
    ) -> Result<BeganRestore, DbError> {
        let vol = self.volume(volume)?;
        self.refuse_several_mates(volume)?;
        let mode = vol.mode_gate.write().await;
        let decision = {
            let inner = vol.inner();
            Self::begin_decision(vol, &inner, run_id)?
        };
        if decision == BeginDecision::AlreadyEnded {
            tracing::info!(
                volume,
                run_id,
                "restore run {run_id} has ended already: nothing to begin"
            );
            return Ok(BeganRestore {
                pair: vol.pair,
                already_restoring: false,
                already_ended: true,
                writer_identity: None,
            });
        }
        let already_restoring = decision == BeginDecision::AlreadyRestoring;
        let purpose = format!("restore run {run_id} of backup {backup_id}");
        if !already_restoring {
            let state = PairState::Restoring {
                run_id: run_id.to_string(),
                backup_id: backup_id.to_string(),
            };
            self.journal_state(&vol.pair, &state).await?;
            crash::point("restore.after_journal");
            self.try_follow_array_mode(vol, &state, &purpose).await;
            let mut inner = vol.inner();
            inner.state = state;
            inner.last_restore_ended = None;
            inner.last_deleted_by = None;
        }
        drop(mode);
        self.set_writer_access(&vol.pair, Some(Access::ReadWrite), &purpose)
            .await?;
        crash::point("restore.after_grant");
        tracing::info!(
            volume,
            run_id,
            backup_id,
            already_restoring,
            "volume offline for a restore"
        );
        Ok(BeganRestore {
            pair: vol.pair,
            already_restoring,
            already_ended: false,
            writer_identity: self.restore_writer.clone(),
        })
    }

    /// Ends the restore run `run_id` of `volume` (see the module doc). Not
    /// abandoned: refused with [`DbError::RestoreIncomplete`] — the volume
    /// staying offline — unless origin and mate are equal chunk by chunk
    /// and, when `expected_image_digest` is given, hold that image. A retry
    /// after the end withdraws the grant again and answers the first end.
    pub async fn end_restore(
        &self,
        volume: u32,
        run_id: &str,
        abandon: bool,
        expected_image_digest: Option<[u8; 32]>,
    ) -> Result<EndedRestore, DbError> {
        let vol = self.volume(volume)?;
        let backup_id = match self.end_decision(vol, run_id)? {
            EndDecision::Ended(ended) => {
                self.set_writer_access(&vol.pair, None, &format!("restore run {run_id} ended"))
                    .await?;
                return Ok(EndedRestore {
                    already_ended: true,
                    chunks_resynced: self.chunks_resynced(vol, &ended),
                    ..ended
                });
            }
            EndDecision::Restoring { backup_id } => backup_id,
        };
        let ended = if abandon {
            let mode = vol.mode_gate.write().await;
            if let EndDecision::Ended(ended) = self.end_decision(vol, run_id)? {
                // A concurrent EndRestore of the same run got there first.
                return Ok(EndedRestore {
                    already_ended: true,
                    ..ended
                });
            }
            self.journal_state_ending(&vol.pair, &PairState::Resynchronizing, true, run_id)
                .await?;
            self.try_follow_array_mode(vol, &PairState::Resynchronizing, "restore abandoned")
                .await;
            let ended = EndedRestore {
                already_ended: false,
                abandoned: true,
                chunks_compared: 0,
                image_digest: None,
                image_digest_matches: false,
                chunks_resynced: 0,
            };
            let mut inner = vol.inner();
            inner.state = PairState::Resynchronizing;
            inner.full_resync_pending = true;
            inner.compare_copied_chunks = None;
            inner.full_resync_reason = Some(format!(
                "restore run {run_id} of backup {backup_id} was abandoned: origin and mate may \
                 differ anywhere"
            ));
            inner.resync = super::ResyncProgress::default();
            inner.last_restore_ended = Some((run_id.to_string(), ended.clone()));
            drop(inner);
            drop(mode);
            vol.resync_wakeup.notify_one();
            tracing::warn!(
                volume,
                run_id,
                backup_id,
                "restore abandoned: resynchronizing the whole volume"
            );
            ended
        } else {
            let (chunks_compared, image_digest) = self
                .compare_restored(vol, run_id, expected_image_digest)
                .await?;
            let mode = vol.mode_gate.write().await;
            if let EndDecision::Ended(ended) = self.end_decision(vol, run_id)? {
                return Ok(EndedRestore {
                    already_ended: true,
                    ..ended
                });
            }
            self.journal_state_ending(&vol.pair, &PairState::Synchronized, false, run_id)
                .await?;
            crash::point("end_restore.after_journal");
            self.try_follow_array_mode(vol, &PairState::Synchronized, "restore ended")
                .await;
            let ended = EndedRestore {
                already_ended: false,
                abandoned: false,
                chunks_compared,
                image_digest: Some(image_digest),
                image_digest_matches: expected_image_digest.is_some(),
                chunks_resynced: 0,
            };
            let mut inner = vol.inner();
            inner.state = PairState::Synchronized;
            inner.last_restore_ended = Some((run_id.to_string(), ended.clone()));
            drop(inner);
            drop(mode);
            tracing::info!(
                volume,
                run_id,
                backup_id,
                chunks_compared,
                "restore verified: origin and mate equal, pair synchronized"
            );
            ended
        };
        self.set_writer_access(&vol.pair, None, &format!("restore run {run_id} ended"))
            .await?;
        Ok(ended)
    }

    /// Whether `run_id` restores the volume now, or ended its restore.
    fn end_decision(&self, vol: &Volume, run_id: &str) -> Result<EndDecision, DbError> {
        let inner = vol.inner();
        match &inner.state {
            PairState::Restoring {
                run_id: holder,
                backup_id,
            } if holder == run_id => Ok(EndDecision::Restoring {
                backup_id: backup_id.clone(),
            }),
            PairState::Restoring { run_id: holder, .. }
            | PairState::RestoringToSnapshot { holder, .. } => Err(DbError::RestoreHeld {
                volume: vol.volume(),
                action: "end the restore of",
                holder: holder.clone(),
            }),
            other => match &inner.last_restore_ended {
                Some((ended_by, ended)) if ended_by == run_id => {
                    Ok(EndDecision::Ended(ended.clone()))
                }
                _ => Err(DbError::NotRestoring {
                    volume: vol.volume(),
                    run_id: run_id.to_string(),
                    mode: other.routing(&vol.pair).data_mode,
                }),
            },
        }
    }

    /// What an abandoned restore's whole-volume resync has copied, once it
    /// has compared the volume (0 before, or for an end that was not an
    /// abandon).
    fn chunks_resynced(&self, vol: &Volume, ended: &EndedRestore) -> u64 {
        if !ended.abandoned {
            return 0;
        }
        vol.inner().compare_copied_chunks.unwrap_or(0)
    }

    /// Waits (at most `timeout`) for an abandoned restore's resync, and
    /// answers the chunks it copied so far.
    pub async fn wait_abandoned_resync(&self, volume: u32, timeout: Duration) -> u64 {
        if let Err(error) = self.wait_synchronized(volume, timeout).await {
            tracing::info!(
                volume,
                "answering before the abandoned restore's resync ends: {error}"
            );
        }
        self.volume(volume)
            .map_or(0, |vol| vol.inner().compare_copied_chunks.unwrap_or(0))
    }

    /// Compares origin and mate whole, chunk by chunk (both sides' digests
    /// asked for together), and answers the chunks compared and the image
    /// digest; a difference, or another image than the expected one, is
    /// [`DbError::RestoreIncomplete`].
    async fn compare_restored(
        &self,
        vol: &Volume,
        run_id: &str,
        expected_image_digest: Option<[u8; 32]>,
    ) -> Result<(u64, [u8; 32]), DbError> {
        let pair = vol.pair;
        let block_size_bytes = u64::from(pair.block_size_bytes);
        let chunk_blocks = (RESTORE_CHUNK_BYTES / block_size_bytes).max(1);
        let mut image = blake3::Hasher::new();
        let mut chunks = 0u64;
        let mut lba = 0;
        while lba < pair.block_count {
            if self.cancel.is_cancelled() {
                return Err(DbError::ShuttingDown);
            }
            let n = (chunk_blocks * COMPARE_BATCH_CHUNKS).min(pair.block_count - lba);
            let (origin, mate) = tokio::join!(
                self.array.checksums(pair.origin_lu, lba, n, chunk_blocks),
                self.array.checksums(pair.mate_lu, lba, n, chunk_blocks)
            );
            let (origin, mate) = (origin?, mate?);
            let expected_chunks = n.div_ceil(chunk_blocks) as usize;
            if origin.len() != expected_chunks || mate.len() != expected_chunks {
                return Err(DbError::RestoreIncomplete {
                    volume: vol.volume(),
                    first_differing_chunk: None,
                    why: format!(
                        "the array answered {} and {} digests for {expected_chunks} chunks",
                        origin.len(),
                        mate.len()
                    ),
                });
            }
            if let Some(index) = origin.iter().zip(&mate).position(|(o, m)| o != m) {
                let chunk = chunks + index as u64;
                return Err(DbError::RestoreIncomplete {
                    volume: vol.volume(),
                    first_differing_chunk: Some(chunk),
                    why: format!(
                        "origin LU {} and mate LU {} differ first in chunk {chunk} (1 MiB chunks); \
                         the volume stays offline for restore run {run_id}",
                        pair.origin_lu, pair.mate_lu
                    ),
                });
            }
            for digest in &origin {
                image.update(digest);
            }
            chunks += origin.len() as u64;
            lba += n;
        }
        let image_digest = *image.finalize().as_bytes();
        if let Some(expected) = expected_image_digest
            && expected != image_digest
        {
            return Err(DbError::RestoreIncomplete {
                volume: vol.volume(),
                first_differing_chunk: None,
                why: format!(
                    "origin and mate agree, but hold image {} where the backup's is {}; the \
                     volume stays offline for restore run {run_id}",
                    hex(&image_digest),
                    hex(&expected)
                ),
            });
        }
        Ok((chunks, image_digest))
    }

    /// A restore from a backup writes the mirror LU and compares origin
    /// and mate at its end: it is built for a volume with one mate.
    fn refuse_several_mates(&self, volume: u32) -> Result<(), DbError> {
        match self.mate_count(volume)? {
            1 => Ok(()),
            mates => Err(DbError::InvalidArgument(format!(
                "volume {volume} has {mates} mates: a restore from a backup is built for a \
                 volume with one (restore one of its split mates with RestoreSnapshot instead)"
            ))),
        }
    }

    /// Whether a RestoreSnapshot of the pair by `run_id` would be
    /// accepted, without changing anything: `Ok(Some(..))` answers a retry
    /// of a reverse resync that completed, `Ok(None)` means go on.
    pub fn check_restore_snapshot(
        &self,
        which: impl Into<PairRef>,
        run_id: &str,
    ) -> Result<Option<ReverseOutcome>, DbError> {
        let which = which.into();
        let volume = which.volume;
        let vol = self.volume(which)?;
        // Another mate's restore holds the volume.
        for other in self.pairs_of(volume) {
            if other.mate == vol.mate {
                continue;
            }
            if let Some((holder, _)) = other.inner().state.restore() {
                return Err(DbError::RestoreHeld {
                    volume,
                    action: "restore to its snapshot",
                    holder: holder.to_string(),
                });
            }
        }
        let inner = vol.inner();
        match &inner.state {
            PairState::Snapshot { holder, .. } | PairState::RestoringToSnapshot { holder, .. }
                if holder == run_id =>
            {
                Ok(None)
            }
            // The reverse resync copies the frozen mate back; a
            // copy-on-write snapshot has no frozen mate (its image is the
            // save area over the mate, which took every write).
            PairState::CowSnapshot { .. } => Err(DbError::WrongMode {
                volume,
                action: "restore to its snapshot (RestoreSnapshot reverses a split snapshot; a \
                         copy-on-write snapshot cannot be restored this way: restore its backup) \
                         ",
                mode: crate::lu_status::Mode::Snapshot,
            }),
            PairState::Snapshot { holder, .. } => Err(DbError::HeldByOther {
                volume,
                holder: holder.clone(),
                requester: run_id.to_string(),
            }),
            PairState::Restoring { run_id: holder, .. }
            | PairState::RestoringToSnapshot { holder, .. } => Err(DbError::RestoreHeld {
                volume,
                action: "restore to its snapshot",
                holder: holder.clone(),
            }),
            _ => match &inner.last_reverse {
                Some((by, outcome)) if by == run_id => Ok(Some(ReverseOutcome {
                    already_restored: true,
                    ..*outcome
                })),
                _ => Err(DbError::Undefined {
                    volume,
                    target: VirtualLu::Snapshot,
                }),
            },
        }
    }

    /// The reverse resync: while `run_id` holds the snapshot, journals
    /// RestoringToSnapshot (keeping the intents), copies mate → origin
    /// every range the update location table recorded, makes the mate
    /// writable again and journals Synchronized. A failure leaves the
    /// volume offline in RestoringToSnapshot; a retry by the same run goes
    /// on from there.
    pub async fn restore_snapshot(
        &self,
        which: impl Into<PairRef>,
        run_id: &str,
    ) -> Result<ReverseOutcome, DbError> {
        let started = Instant::now();
        let which = which.into();
        let (volume, mate) = (which.volume, which.mate);
        let vol = self.volume(which)?;
        {
            let mode = vol.mode_gate.write().await;
            if let Some(retried) = self.check_restore_snapshot(which, run_id)? {
                return Ok(retried);
            }
            let state = vol.inner().state.clone();
            if let PairState::Snapshot {
                holder,
                ledger_sequence,
                snapshot_id,
                ..
            } = state
            {
                let reverse = PairState::RestoringToSnapshot {
                    holder,
                    ledger_sequence,
                    snapshot_id,
                };
                self.journal_state(&vol.pair, &reverse).await?;
                crash::point("reverse.after_journal");
                self.try_follow_array_mode(vol, &reverse, "restoring to the snapshot")
                    .await;
                vol.inner().state = reverse;
                tracing::info!(
                    volume,
                    mate,
                    run_id,
                    snapshot_id,
                    blocks = vol.inner().table.block_count(),
                    "restoring the volume to its snapshot: copying the recorded ranges mate → origin"
                );
            }
            drop(mode);
        }
        let (ranges_copied, blocks_copied) = self.reverse_copy(vol).await?;
        let snapshot_ledger_sequence = self.finish_reverse(vol).await?;
        let outcome = ReverseOutcome {
            already_restored: false,
            ranges_copied,
            blocks_copied,
            bytes_copied: blocks_copied * u64::from(vol.pair.block_size_bytes),
            duration_us: started.elapsed().as_micros() as u64,
            snapshot_ledger_sequence,
        };
        vol.inner().last_reverse = Some((run_id.to_string(), outcome));
        tracing::info!(
            volume,
            run_id,
            ranges_copied,
            blocks_copied,
            "volume restored to its snapshot, pair synchronized"
        );
        Ok(outcome)
    }

    /// Copies mate → origin every range recorded in the table (in chunks of
    /// at most `resync_chunk_bytes`, paced like the resync, each under the
    /// range lock), and answers the ranges and blocks copied. The table is
    /// left as it is: it is dropped with the Synchronized state, and a
    /// crash before that copies it again.
    async fn reverse_copy(&self, vol: &Volume) -> Result<(u64, u64), DbError> {
        use futures_util::StreamExt;
        let pair = vol.pair;
        let block_size_bytes = u64::from(pair.block_size_bytes);
        let chunk_blocks = (self.config.resync_chunk_bytes / block_size_bytes).max(1);
        let ranges = {
            let mut inner = vol.inner();
            inner.reverse_blocks = (0, inner.table.block_count());
            inner.table.ranges()
        };
        // Each recorded range in pieces of at most one resync chunk; up to
        // as many copies in flight as the resync has (a database's scattered
        // small writes make many small ranges, and one copy at a time would
        // wait on a round trip for each).
        let mut pieces = Vec::new();
        for range in &ranges {
            let mut lba = range.start;
            while lba < range.end {
                let end = (lba + chunk_blocks).min(range.end);
                pieces.push(lba..end);
                lba = end;
            }
        }
        let blocks_copied = std::sync::atomic::AtomicU64::new(0);
        let copy_piece = |piece: std::ops::Range<u64>| {
            let blocks_copied = &blocks_copied;
            async move {
                if self.cancel.is_cancelled() {
                    return Err(DbError::ShuttingDown);
                }
                let n = piece.end - piece.start;
                let _blocks = vol.blocks.lock(piece.clone(), LockMode::Exclusive).await;
                if let Some(pace) = &self.resync_pace {
                    pace.take(n * block_size_bytes).await;
                }
                self.array
                    .copy_range_guaranteed(
                        pair.mate_lu,
                        pair.origin_lu,
                        piece.start,
                        n,
                        self.config.resync_min_bytes_per_s,
                    )
                    .await?;
                crash::point("reverse.after_copy");
                let done = blocks_copied.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n;
                let mut inner = vol.inner();
                inner.reverse_blocks.0 = inner.reverse_blocks.0.max(done);
                Ok::<(), DbError>(())
            }
        };
        let mut copies = futures_util::stream::iter(pieces)
            .map(copy_piece)
            .buffer_unordered(super::resync::RESYNC_RANGES_IN_FLIGHT);
        while let Some(copied) = copies.next().await {
            copied?;
        }
        drop(copies);
        self.spread_reverse_ranges(vol, &ranges).await?;
        Ok((ranges.len() as u64, blocks_copied.into_inner()))
    }

    /// After a reverse resync from one mate has copied its ranges onto the
    /// origin, every other mate of the volume differs from the origin
    /// there: the ranges are recorded (journaled first) in each other
    /// pair's table, and a Synchronized one becomes Resynchronizing, so
    /// that its resync copies them origin → its mate (a split one keeps
    /// them until its delete). Done after the copy, while the reversed
    /// pair is still journaled RestoringToSnapshot: a crash before it
    /// copies again at start-up and comes here again; a resync of another
    /// pair that copied a range before the reverse did copies it again.
    async fn spread_reverse_ranges(
        &self,
        vol: &Volume,
        ranges: &[std::ops::Range<u64>],
    ) -> Result<(), DbError> {
        for other in self.pairs_of(vol.volume()) {
            if other.mate == vol.mate || ranges.is_empty() {
                continue;
            }
            let _mode = other.mode_gate.write().await;
            let synchronized = other.inner().state == PairState::Synchronized;
            if synchronized {
                self.journal_state(&other.pair, &PairState::Resynchronizing)
                    .await?;
            }
            for range in ranges {
                self.journal_intent(&other.pair, range.clone()).await?;
            }
            {
                let mut inner = other.inner();
                if synchronized {
                    inner.state = PairState::Resynchronizing;
                    inner.resync = super::ResyncProgress::default();
                }
                for range in ranges {
                    inner.table.insert(range.clone());
                }
            }
            if synchronized {
                let purpose = format!(
                    "mate {} of the volume was restored onto the origin",
                    vol.mate
                );
                self.try_follow_array_mode(other, &PairState::Resynchronizing, &purpose)
                    .await;
            }
            tracing::info!(
                volume = vol.volume(),
                mate = other.mate,
                ranges = ranges.len(),
                "recorded the ranges a reverse resync of mate {} copied onto the origin",
                vol.mate
            );
            other.resync_wakeup.notify_one();
        }
        Ok(())
    }

    /// After the reverse copy: the mate writable again (set before the
    /// journal record, so that a Synchronized pair never has a read-only
    /// mate; a crash in between copies again at start-up), then
    /// Synchronized journaled, which drops the intents. Answers the
    /// snapshot's ledger sequence.
    async fn finish_reverse(&self, vol: &Volume) -> Result<u64, DbError> {
        let (holder, ledger_sequence) = match &vol.inner().state {
            PairState::RestoringToSnapshot {
                holder,
                ledger_sequence,
                ..
            } => (holder.clone(), *ledger_sequence),
            other => {
                return Err(DbError::WrongMode {
                    volume: vol.volume(),
                    action: "finish the reverse resync of",
                    mode: other.routing(&vol.pair).data_mode,
                });
            }
        };
        let purpose = format!("snapshot of run {holder} restored onto the origin");
        self.ensure_mate_access(vol, OwnAccess::Configured, &purpose)
            .await?;
        let _mode = vol.mode_gate.write().await;
        self.journal_state(&vol.pair, &PairState::Synchronized)
            .await?;
        self.try_follow_array_mode(vol, &PairState::Synchronized, &purpose)
            .await;
        let mut inner = vol.inner();
        inner.state = PairState::Synchronized;
        inner.table = UpdateLocationTable::new();
        inner.full_resync_reason = None;
        inner.last_deleted_by = None;
        Ok(ledger_sequence)
    }

    /// At start-up, before the volumes are served: every reverse resync a
    /// crash interrupted is copied again and finished. A failing array is
    /// retried after the backoff's waits, until shutdown.
    pub(super) async fn finish_interrupted_reverse_resyncs(&self) -> Result<(), DbError> {
        for vol in self.volumes.values() {
            let holder = match &vol.inner().state {
                PairState::RestoringToSnapshot { holder, .. } => holder.clone(),
                _ => continue,
            };
            tracing::warn!(
                volume = vol.volume(),
                run_id = holder,
                "a reverse resync was interrupted: copying the recorded ranges mate → origin again"
            );
            let mut backoff = Backoff::standard();
            loop {
                let started = Instant::now();
                let attempt = match self.reverse_copy(vol).await {
                    Ok(copied) => self
                        .finish_reverse(vol)
                        .await
                        .map(|sequence| (copied, sequence)),
                    Err(error) => Err(error),
                };
                match attempt {
                    Ok(((ranges_copied, blocks_copied), snapshot_ledger_sequence)) => {
                        let outcome = ReverseOutcome {
                            already_restored: false,
                            ranges_copied,
                            blocks_copied,
                            bytes_copied: blocks_copied * u64::from(vol.pair.block_size_bytes),
                            duration_us: started.elapsed().as_micros() as u64,
                            snapshot_ledger_sequence,
                        };
                        vol.inner().last_reverse = Some((holder.clone(), outcome));
                        tracing::info!(
                            volume = vol.volume(),
                            run_id = holder,
                            ranges_copied,
                            blocks_copied,
                            "interrupted reverse resync finished, pair synchronized"
                        );
                        break;
                    }
                    Err(_) if self.cancel.is_cancelled() => return Err(DbError::ShuttingDown),
                    Err(error) => {
                        let wait = backoff.next_wait();
                        tracing::warn!(
                            volume = vol.volume(),
                            "finishing the reverse resync: {error}; retrying in {wait:?}"
                        );
                        tokio::select! {
                            () = tokio::time::sleep(wait) => {}
                            () = self.cancel.cancelled() => return Err(DbError::ShuttingDown),
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Makes the array's grants for the restore writer agree with the
    /// journal, at start-up: a Restoring volume's writer may read and write
    /// its LUs again; every other volume's grant is withdrawn. A failure
    /// stops the start, as for db-server's own masking.
    pub(super) async fn reconcile_restore_access(&self) -> Result<(), DbError> {
        if self.restore_writer.is_none() {
            return Ok(());
        }
        for vol in self.volumes.values() {
            let restoring = match &vol.inner().state {
                PairState::Restoring { run_id, backup_id } => Some(format!(
                    "restore run {run_id} of backup {backup_id} (restored at start-up)"
                )),
                _ => None,
            };
            match restoring {
                Some(purpose) => {
                    self.set_writer_access(&vol.pair, Some(Access::ReadWrite), &purpose)
                        .await?
                }
                None => {
                    self.set_writer_access(&vol.pair, None, "no restore running")
                        .await?
                }
            }
        }
        Ok(())
    }

    /// The restore writer's access to the pair's three LUs. A grant goes to
    /// the sides first and the mirror LU last, a withdrawal to the mirror LU
    /// first: the mirror LU's access is the least of the three, so the
    /// writer can write it only while both sides let it. Nothing to do when
    /// the array masks nothing.
    async fn set_writer_access(
        &self,
        pair: &PairInfo,
        access: Option<Access>,
        purpose: &str,
    ) -> Result<(), DbError> {
        let Some(writer) = &self.restore_writer else {
            return Ok(());
        };
        let lus = match access {
            Some(_) => [pair.origin_lu, pair.mate_lu, pair.mirror_lu],
            None => [pair.mirror_lu, pair.origin_lu, pair.mate_lu],
        };
        for lu in lus {
            if let Err(error) = self.array.set_access(writer, lu, access, purpose).await {
                tracing::warn!(
                    volume = pair.mirror_lu,
                    lu,
                    writer,
                    ?access,
                    purpose,
                    "setting the restore writer's access failed: {error}"
                );
                return Err(error.into());
            }
        }
        tracing::info!(
            volume = pair.mirror_lu,
            writer,
            ?access,
            purpose,
            "restore writer's access set"
        );
        Ok(())
    }

    /// `Status`'s view of the volume's restore, if one holds it.
    pub(super) fn restore_status(&self, inner: &super::VolumeInner) -> Option<RestoreStatus> {
        let (run_id, kind) = inner.state.restore()?;
        let (blocks_done, blocks_total) = match kind {
            RestoreKind::ToSnapshot { .. } => inner.reverse_blocks,
            RestoreKind::FromBackup { .. } => (0, 0),
        };
        let writer_identity = match kind {
            RestoreKind::FromBackup { .. } => self.restore_writer.clone(),
            RestoreKind::ToSnapshot { .. } => None,
        };
        Some(RestoreStatus {
            run_id: run_id.to_string(),
            kind,
            writer_identity,
            blocks_done,
            blocks_total,
        })
    }

    /// [`Self::journal_state`] for the state that ends or abandons the
    /// restore run `run_id` (the journal remembers the run, so that its
    /// EndRestore retried after a restart is answered).
    async fn journal_state_ending(
        &self,
        pair: &PairInfo,
        state: &PairState,
        full_resync: bool,
        run_id: &str,
    ) -> Result<(), DbError> {
        match &self.journal {
            Some(journal) => {
                journal
                    .record_state_ending(pair, state, full_resync, Some(run_id))
                    .await
            }
            None => Ok(()),
        }
    }

    /// What a retried EndRestore is answered after a restart: the journal
    /// kept only the run id (and, from the state, whether it abandoned),
    /// not the compare's figures.
    pub(super) fn ended_before_restart(state: &PairState) -> EndedRestore {
        EndedRestore {
            already_ended: true,
            abandoned: *state == PairState::Resynchronizing,
            chunks_compared: 0,
            image_digest: None,
            image_digest_matches: false,
            chunks_resynced: 0,
        }
    }
}

/// Where an EndRestore stands.
enum EndDecision {
    /// The run restores the volume now.
    Restoring { backup_id: String },
    /// The run ended its restore already: the answer it got.
    Ended(EndedRestore),
}

/// Lower-case hex, for messages.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    use super::*;
    use crate::array_port::{ArrayPort, CopyCall, MemoryArray};
    use crate::journal::Journal;
    use crate::lu_status::Mode;
    use crate::manager::ManagerConfig;

    /// Three 1 MiB chunks of 4 KiB blocks.
    const PAIR: PairInfo = PairInfo {
        mirror_lu: 0,
        origin_lu: 1,
        mate_lu: 2,
        block_size_bytes: 4096,
        block_count: 768,
    };
    const WRITER: &str = "backup-server";

    fn masked_array() -> Arc<MemoryArray> {
        Arc::new(MemoryArray::new(vec![PAIR]).with_identity("db-server"))
    }

    async fn start(
        array: Arc<MemoryArray>,
        dir: &std::path::Path,
        config: ManagerConfig,
    ) -> (Arc<SnapshotManager>, CancellationToken) {
        let cancel = CancellationToken::new();
        let journal = Journal::open(dir, 4096).expect("journal");
        let manager = SnapshotManager::start(
            array,
            vec![PAIR],
            Some(journal),
            config,
            cancel.clone(),
            TaskTracker::new(),
        )
        .await
        .expect("start");
        (manager, cancel)
    }

    /// Stops a manager as a crash would leave its journal: closed, nothing
    /// more written.
    fn crash(manager: Arc<SnapshotManager>, cancel: CancellationToken) {
        cancel.cancel();
        manager.close_journal();
    }

    fn mode(manager: &SnapshotManager) -> Mode {
        manager.status()[0].routing.data_mode
    }

    /// The image digest of a volume image: BLAKE3 of its 1 MiB chunks'
    /// digests, as a backup's manifest has it.
    fn image_digest(image: &[u8]) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new();
        for chunk in image.chunks(RESTORE_CHUNK_BYTES as usize) {
            hasher.update(blake3::hash(chunk).as_bytes());
        }
        *hasher.finalize().as_bytes()
    }

    /// What a restore's writes do: the image onto both sides.
    fn restore_image(array: &MemoryArray, image: &[u8]) {
        array.overwrite(PAIR.origin_lu, 0, image);
        array.overwrite(PAIR.mate_lu, 0, image);
    }

    fn image(seed: u8) -> Vec<u8> {
        (0..PAIR.block_count as usize * 4096)
            .map(|i| (i / 4096) as u8 ^ seed)
            .collect()
    }

    fn writer_access(array: &MemoryArray) -> Vec<Option<Access>> {
        [PAIR.mirror_lu, PAIR.origin_lu, PAIR.mate_lu]
            .iter()
            .map(|&lu| array.access_of(WRITER, lu))
            .collect()
    }

    #[tokio::test]
    async fn a_restore_takes_the_volume_offline_and_ends_when_the_image_is_on_both_sides() {
        let dir = tempfile::tempdir().expect("tempdir");
        let array = masked_array();
        let (manager, _cancel) = start(array.clone(), dir.path(), ManagerConfig::default()).await;
        manager
            .wait_synchronized(0, Duration::from_secs(5))
            .await
            .expect("synchronized");
        manager
            .write(0, VirtualLu::Data, 3, vec![1; 4096])
            .await
            .expect("write");

        let began = manager
            .begin_restore(0, "restore-1", "backup-b")
            .await
            .expect("begin");
        assert!(!began.already_restoring);
        assert_eq!(began.writer_identity.as_deref(), Some(WRITER));
        assert_eq!(writer_access(&array), vec![Some(Access::ReadWrite); 3]);
        assert_eq!(mode(&manager), Mode::Undefined);
        let status = manager.status()[0].restore.clone().expect("restore status");
        assert_eq!(status.run_id, "restore-1");
        assert_eq!(
            status.kind,
            RestoreKind::FromBackup {
                backup_id: "backup-b".into()
            }
        );

        // Offline: every Read and Write names the restore.
        for target in [VirtualLu::Data, VirtualLu::Snapshot] {
            let refused = manager
                .write(0, target, 0, vec![2; 4096])
                .await
                .expect_err("offline");
            assert!(
                matches!(&refused, DbError::Restoring { run_id, backup_id: Some(b), .. }
                    if run_id == "restore-1" && b == "backup-b"),
                "{refused:?}"
            );
            assert!(matches!(
                manager.read(0, target, 0, 1).await,
                Err(DbError::Restoring { .. })
            ));
        }
        // Snapshots and other runs' restores are refused; a retry is not.
        assert!(matches!(
            manager.acquire(0, "backup-run", 0).await,
            Err(DbError::RestoreHeld { .. })
        ));
        assert!(matches!(
            manager.delete(0, "backup-run", true).await,
            Err(DbError::RestoreHeld { .. })
        ));
        assert!(matches!(
            manager.begin_restore(0, "restore-2", "backup-c").await,
            Err(DbError::RestoreHeld { .. })
        ));
        assert!(matches!(
            manager.end_restore(0, "restore-2", false, None).await,
            Err(DbError::RestoreHeld { .. })
        ));
        assert!(
            manager
                .begin_restore(0, "restore-1", "backup-b")
                .await
                .expect("retry")
                .already_restoring
        );

        // Half restored (only the origin has it): refused, still offline.
        let restored = image(0x5a);
        array.overwrite(PAIR.origin_lu, 0, &restored);
        let incomplete = manager
            .end_restore(0, "restore-1", false, Some(image_digest(&restored)))
            .await
            .expect_err("the sides differ");
        assert!(
            matches!(
                incomplete,
                DbError::RestoreIncomplete {
                    first_differing_chunk: Some(0),
                    ..
                }
            ),
            "{incomplete:?}"
        );
        assert_eq!(mode(&manager), Mode::Undefined);
        // Both sides hold it, but another image was expected: refused.
        restore_image(&array, &restored);
        let wrong = manager
            .end_restore(0, "restore-1", false, Some([7; 32]))
            .await
            .expect_err("another image");
        assert!(
            matches!(
                wrong,
                DbError::RestoreIncomplete {
                    first_differing_chunk: None,
                    ..
                }
            ),
            "{wrong:?}"
        );
        assert!(manager.is_restoring(0));
        assert_eq!(writer_access(&array), vec![Some(Access::ReadWrite); 3]);

        let ended = manager
            .end_restore(0, "restore-1", false, Some(image_digest(&restored)))
            .await
            .expect("end");
        assert_eq!(ended.chunks_compared, 3);
        assert_eq!(ended.image_digest, Some(image_digest(&restored)));
        assert!(ended.image_digest_matches && !ended.abandoned && !ended.already_ended);
        assert_eq!(mode(&manager), Mode::Synchronized);
        assert_eq!(writer_access(&array), vec![None; 3], "grant withdrawn");
        assert_eq!(
            manager.read(0, VirtualLu::Data, 0, 2).await.expect("read"),
            restored[..8192]
        );
        let retried = manager
            .end_restore(0, "restore-1", false, None)
            .await
            .expect("retry");
        assert!(retried.already_ended);
        assert_eq!(retried.image_digest, ended.image_digest);
        assert!(matches!(
            manager.end_restore(0, "restore-3", false, None).await,
            Err(DbError::NotRestoring { .. })
        ));
        // A re-run of the ended run (its EndRestore answer lost) begins
        // nothing: the volume stays online, no grant is set.
        let rerun = manager
            .begin_restore(0, "restore-1", "backup-1")
            .await
            .expect("re-run");
        assert!(rerun.already_ended && !rerun.already_restoring);
        assert_eq!(mode(&manager), Mode::Synchronized);
        assert_eq!(writer_access(&array), vec![None; 3]);
    }

    /// A BeginRestore refused changes nothing: no journal record, no grant,
    /// no byte.
    #[tokio::test]
    async fn a_refused_begin_restore_changes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let array = masked_array();
        let (manager, _cancel) = start(array.clone(), dir.path(), ManagerConfig::default()).await;
        manager
            .wait_synchronized(0, Duration::from_secs(5))
            .await
            .expect("synchronized");
        manager.acquire(0, "run-a", 0).await.expect("acquire");
        manager
            .write(0, VirtualLu::Data, 5, vec![3; 4096])
            .await
            .expect("write");
        let before = (array.lu(1), array.lu(2), manager.journal_stats());
        let held = manager
            .begin_restore(0, "restore-1", "b")
            .await
            .expect_err("held");
        assert!(
            matches!(
                held,
                DbError::WrongMode {
                    mode: Mode::Snapshot,
                    ..
                }
            ),
            "{held:?}"
        );
        // Resynchronizing (held there by copies that fail).
        array.fail_copies.store(true, Ordering::SeqCst);
        manager.delete(0, "run-a", false).await.expect("delete");
        let resync = manager
            .begin_restore(0, "restore-1", "b")
            .await
            .expect_err("resynchronizing");
        assert!(
            matches!(
                resync,
                DbError::WrongMode {
                    mode: Mode::Resynchronizing,
                    ..
                }
            ),
            "{resync:?}"
        );
        assert!(
            array.other_grants().iter().all(|g| g.access.is_none()),
            "no grant was ever given: {:?}",
            array.other_grants()
        );
        assert_eq!((array.lu(1), array.lu(2)), (before.0, before.1));
        assert_eq!(mode(&manager), Mode::Resynchronizing);
        assert!(matches!(
            manager.restore_snapshot(0, "run-a").await,
            Err(DbError::Undefined { .. })
        ));
        array.fail_copies.store(false, Ordering::SeqCst);
        manager
            .wait_synchronized(0, Duration::from_secs(5))
            .await
            .expect("synchronized");
        assert!(matches!(
            manager.end_restore(0, "restore-1", false, None).await,
            Err(DbError::NotRestoring { .. })
        ));
    }

    /// Abandoned: the pair is resynchronized whole (origin → mate), the
    /// grant withdrawn.
    #[tokio::test]
    async fn an_abandoned_restore_resynchronizes_the_whole_volume() {
        let dir = tempfile::tempdir().expect("tempdir");
        let array = masked_array();
        let (manager, _cancel) = start(array.clone(), dir.path(), ManagerConfig::default()).await;
        manager
            .wait_synchronized(0, Duration::from_secs(5))
            .await
            .expect("synchronized");
        manager
            .begin_restore(0, "restore-1", "backup-b")
            .await
            .expect("begin");
        // Half a restore: one chunk reached the origin only.
        array.overwrite(PAIR.origin_lu, 2 << 20, &[9; 4096]);
        let ended = manager
            .end_restore(0, "restore-1", true, None)
            .await
            .expect("abandon");
        assert!(ended.abandoned && !ended.already_ended);
        assert_eq!(writer_access(&array), vec![None; 3]);
        assert_eq!(
            manager
                .wait_abandoned_resync(0, Duration::from_secs(5))
                .await,
            1
        );
        assert_eq!(mode(&manager), Mode::Synchronized);
        assert_eq!(array.lu(1), array.lu(2), "origin == mate");
        let retried = manager
            .end_restore(0, "restore-1", true, None)
            .await
            .expect("retry");
        assert!(retried.already_ended && retried.abandoned);
        assert_eq!(retried.chunks_resynced, 1);
    }

    /// The reverse resync copies mate → origin exactly the ranges recorded
    /// since the split (in chunks of at most `resync_chunk_bytes`), and
    /// leaves origin == mate == the frozen image.
    #[tokio::test]
    async fn the_reverse_resync_copies_exactly_the_recorded_ranges() {
        let dir = tempfile::tempdir().expect("tempdir");
        let array = masked_array();
        let config = ManagerConfig {
            resync_chunk_bytes: 8 * 4096,
            // Sent with each copy (`--resync-min-rate`).
            resync_min_bytes_per_s: Some(7 << 20),
            ..ManagerConfig::default()
        };
        let (manager, _cancel) = start(array.clone(), dir.path(), config).await;
        manager
            .wait_synchronized(0, Duration::from_secs(5))
            .await
            .expect("synchronized");
        manager
            .write(0, VirtualLu::Data, 0, vec![1; 40 * 4096])
            .await
            .expect("before the split");
        manager.acquire(0, "run-a", 41).await.expect("acquire");
        let frozen = array.lu(2);
        manager
            .write(0, VirtualLu::Data, 2, vec![2; 3 * 4096])
            .await
            .expect("write");
        manager
            .write(0, VirtualLu::Data, 100, vec![3; 20 * 4096])
            .await
            .expect("write");
        assert_ne!(array.lu(1), frozen);
        let recorded = manager.status()[0].dirty_ranges.clone();
        assert_eq!(recorded, vec![2..5, 100..120]);

        let outcome = manager.restore_snapshot(0, "run-a").await.expect("restore");
        assert_eq!(
            (outcome.ranges_copied, outcome.blocks_copied),
            (2, 23),
            "{outcome:?}"
        );
        assert_eq!(outcome.bytes_copied, 23 * 4096);
        assert_eq!(outcome.snapshot_ledger_sequence, 41);
        let copy = |lba, blocks| CopyCall {
            src_lu: 2,
            dst_lu: 1,
            lba,
            blocks,
            min_bytes_per_s: Some(7 << 20),
        };
        assert_eq!(
            array.copies(),
            vec![copy(2, 3), copy(100, 8), copy(108, 8), copy(116, 4)]
        );
        assert_eq!(array.lu(1), frozen, "origin is the frozen mate again");
        assert_eq!(array.lu(2), frozen);
        assert_eq!(mode(&manager), Mode::Synchronized);
        assert!(manager.status()[0].dirty_ranges.is_empty());
        assert!(
            !array.is_read_only(PAIR.mate_lu),
            "the mate is writable again"
        );
        let retried = manager.restore_snapshot(0, "run-a").await.expect("retry");
        assert!(retried.already_restored);
        assert_eq!(array.copies().len(), 4, "a retry copies nothing");
        // Writes go on through the mirror LU.
        manager
            .write(0, VirtualLu::Data, 2, vec![4; 4096])
            .await
            .expect("write");
        assert_eq!(array.lu(1), array.lu(2));
    }

    /// RestoreSnapshot refusals: another run's snapshot, no snapshot.
    #[tokio::test]
    async fn restore_snapshot_refusals_change_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let array = masked_array();
        let (manager, _cancel) = start(array.clone(), dir.path(), ManagerConfig::default()).await;
        manager
            .wait_synchronized(0, Duration::from_secs(5))
            .await
            .expect("synchronized");
        assert!(matches!(
            manager.restore_snapshot(0, "run-a").await,
            Err(DbError::Undefined { .. })
        ));
        manager.acquire(0, "run-a", 0).await.expect("acquire");
        manager
            .write(0, VirtualLu::Data, 1, vec![5; 4096])
            .await
            .expect("write");
        assert!(matches!(
            manager.restore_snapshot(0, "run-b").await,
            Err(DbError::HeldByOther { .. })
        ));
        assert_eq!(mode(&manager), Mode::Snapshot);
        assert!(array.copies().is_empty());
        assert_eq!(manager.status()[0].dirty_ranges, vec![1..2]);
    }

    /// A restart mid-restore keeps the volume offline and gives the writer
    /// its grant again (a crash between the journal and SetAccess); a
    /// restart after the end withdraws a grant left behind.
    #[tokio::test]
    async fn a_restart_keeps_a_restoring_volume_offline_and_repairs_the_grant() {
        let dir = tempfile::tempdir().expect("tempdir");
        let array = masked_array();
        let (manager, cancel) = start(array.clone(), dir.path(), ManagerConfig::default()).await;
        manager
            .wait_synchronized(0, Duration::from_secs(5))
            .await
            .expect("synchronized");
        manager
            .begin_restore(0, "restore-1", "backup-b")
            .await
            .expect("begin");
        crash(manager, cancel);

        // A new array that never heard of the grant.
        let second = masked_array();
        let (manager, cancel) = start(second.clone(), dir.path(), ManagerConfig::default()).await;
        assert_eq!(mode(&manager), Mode::Undefined);
        assert_eq!(
            manager.restore_of(0).map(|(run, _)| run).as_deref(),
            Some("restore-1")
        );
        assert!(matches!(
            manager.write(0, VirtualLu::Data, 0, vec![0; 4096]).await,
            Err(DbError::Restoring { .. })
        ));
        assert_eq!(writer_access(&second), vec![Some(Access::ReadWrite); 3]);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            mode(&manager),
            Mode::Undefined,
            "the resync leaves it alone"
        );
        manager
            .end_restore(0, "restore-1", false, None)
            .await
            .expect("end (zeros on both sides)");
        crash(manager, cancel);

        // The journal says Synchronized; this array still grants the writer.
        let third = masked_array();
        for lu in [0, 1, 2] {
            third
                .set_access(
                    WRITER,
                    lu,
                    Some(Access::ReadWrite),
                    "a crash before the withdrawal",
                )
                .await
                .expect("grant");
        }
        let (manager, _cancel) = start(third.clone(), dir.path(), ManagerConfig::default()).await;
        assert_eq!(mode(&manager), Mode::Synchronized);
        assert_eq!(writer_access(&third), vec![None; 3]);
        // The journal remembers which run ended: its retry is answered.
        let retried = manager
            .end_restore(0, "restore-1", false, None)
            .await
            .expect("a retry after the restart");
        assert!(retried.already_ended && !retried.abandoned);
        assert!(matches!(
            manager.end_restore(0, "restore-2", false, None).await,
            Err(DbError::NotRestoring { .. })
        ));
    }

    /// A restart in the middle of a reverse resync copies the recorded
    /// ranges again before the manager is up, then the pair is
    /// Synchronized with origin == the frozen mate.
    #[tokio::test]
    async fn a_restart_mid_reverse_resync_finishes_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let array = masked_array();
        let (manager, cancel) = start(array.clone(), dir.path(), ManagerConfig::default()).await;
        manager
            .wait_synchronized(0, Duration::from_secs(5))
            .await
            .expect("synchronized");
        manager.acquire(0, "run-a", 9).await.expect("acquire");
        let frozen = array.lu(2);
        manager
            .write(0, VirtualLu::Data, 7, vec![6; 2 * 4096])
            .await
            .expect("write");
        // The copy fails: the volume stays offline in the reverse state.
        array.fail_copies.store(true, Ordering::SeqCst);
        assert!(matches!(
            manager.restore_snapshot(0, "run-a").await,
            Err(DbError::Array(_))
        ));
        assert!(matches!(
            manager.status()[0].restore.as_ref().map(|r| &r.kind),
            Some(RestoreKind::ToSnapshot { .. })
        ));
        assert!(matches!(
            manager.read(0, VirtualLu::Data, 7, 1).await,
            Err(DbError::Restoring {
                backup_id: None,
                ..
            })
        ));
        crash(manager, cancel);

        array.fail_copies.store(false, Ordering::SeqCst);
        let (manager, _cancel) = start(array.clone(), dir.path(), ManagerConfig::default()).await;
        assert_eq!(mode(&manager), Mode::Synchronized, "finished at start-up");
        assert_eq!(array.lu(1), frozen);
        assert_eq!(array.lu(2), frozen);
        // The journal's region (4 KiB = one block here) is what was copied.
        let copied: u64 = array.copies().iter().map(|c| c.blocks).sum();
        assert_eq!(copied, 2);
        let retried = manager.restore_snapshot(0, "run-a").await.expect("retry");
        assert!(retried.already_restored);
        assert_eq!(retried.snapshot_ledger_sequence, 9);
    }
}
