//! The gRPC adapter: `splitmirror.db.v1` onto [`Db`].

use std::pin::Pin;
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use splitmirror_proto::db::v1 as pb;
use splitmirror_proto::db::v1::db_service_server::{DbService, DbServiceServer};
use splitmirror_proto::node;
use splitmirror_proto::pace::{PaceReason, format_rate};
use splitmirror_proto::reason::Reason;
use tonic::{Request, Response, Status};

/// The methods only the control identities (`--control-identity`, the
/// console by default) may call: they freeze, split, resynchronize, restore,
/// or write the volumes. Status, WatchStatus and GetSnapshot answer any
/// identity of the cluster's CA (the backup server asks GetSnapshot).
/// `Read` is decided per request by its handler ([`may_read`]): the data
/// virtual LU only for the control identities, the snapshot virtual LU
/// (read-only whatever the method) for any identity of the cluster's CA —
/// the backup server reads a copy-on-write snapshot's image there, since
/// its save-area map lives in db-server.
pub const CONTROL_METHODS: &[&str] = &[
    "/splitmirror.db.v1.DbService/AcquireSnapshot",
    "/splitmirror.db.v1.DbService/DeleteSnapshot",
    "/splitmirror.db.v1.DbService/Suspend",
    "/splitmirror.db.v1.DbService/Resume",
    "/splitmirror.db.v1.DbService/Write",
    "/splitmirror.db.v1.DbService/BeginRestore",
    "/splitmirror.db.v1.DbService/EndRestore",
    "/splitmirror.db.v1.DbService/RestoreSnapshot",
];

pub mod validate;

use crate::db::{Db, DbStatus};
use crate::error::DbError;
use crate::latency::quantile_us;
use crate::lu_status::{Mode, RestoreKind, VirtualLu};
use crate::manager::{PairRef, ResyncPace, SnapshotMethod};

/// Volume reads are streamed in chunks of this many bytes.
const READ_CHUNK_BYTES: u64 = 1 << 20;

/// The largest request message db-server decodes. Only `Write` carries
/// much (volume data); its own per-request cap is the array's request
/// limit ([`MAX_ARRAY_REQUEST_BYTES`](splitmirror_proto::node::MAX_ARRAY_REQUEST_BYTES),
/// 16 MiB), checked by [`validate::write`] with `RESOURCE_EXHAUSTED` and
/// a reason naming it. Messages are decoded up to what every typed client
/// may encode ([`node::MAX_MESSAGE_BYTES`], 64 MiB), so that any write a
/// client can send gets that reasoned answer, not a transport error; the
/// memory this can hold at once is bounded by the streams a connection
/// may open.
pub const MAX_REQUEST_MESSAGE_BYTES: usize = node::MAX_MESSAGE_BYTES;
/// The largest answer db-server encodes: a `Read` chunk is 1 MiB, a
/// `Status` with its histogram a few KiB; the shared cap leaves room.
pub const MAX_ANSWER_MESSAGE_BYTES: usize = node::MAX_MESSAGE_BYTES;

pub struct DbGrpc {
    db: Arc<Db>,
    /// The identities that may read the data virtual LU (`Read` is not a
    /// control method as a whole: see [`may_read`]).
    control_identities: Arc<[String]>,
}

impl DbGrpc {
    pub fn new(db: Arc<Db>, control_identities: impl IntoIterator<Item = String>) -> Self {
        Self {
            db,
            control_identities: control_identities.into_iter().collect(),
        }
    }
}

/// Whether `caller` may `Read` the `target` virtual LU: the snapshot
/// virtual LU (read-only) any identified caller, the data virtual LU only
/// the control identities. The stack refused anonymous callers already;
/// `--insecure` allows everything.
pub fn may_read(
    caller: &splitmirror_proto::security::Caller,
    target: VirtualLu,
    control_identities: &[String],
) -> Result<(), Status> {
    use splitmirror_proto::security::Caller;
    match (caller, target) {
        (Caller::Unauthenticated, _) => Ok(()),
        (Caller::Identified(_), VirtualLu::Snapshot) => Ok(()),
        (Caller::Identified(identity), VirtualLu::Data)
            if control_identities.contains(identity) =>
        {
            Ok(())
        }
        (Caller::Identified(identity), VirtualLu::Data) => Err(Status::permission_denied(format!(
            "{identity} may not Read the data virtual LU: only {} (any identity may Read \
                 the snapshot virtual LU)",
            control_identities.join(", ")
        ))),
        (Caller::Anonymous, _) => Err(Status::unauthenticated(
            "Read needs a client certificate of the cluster's CA",
        )),
    }
}

/// The gRPC service over `db`, with its message limits; `control_identities`
/// may read the data virtual LU. No compression is
/// enabled (tonic compresses nothing unless asked): volume data does not
/// compress well enough to pay for the CPU on the data path.
pub fn server(
    db: Arc<Db>,
    control_identities: impl IntoIterator<Item = String>,
) -> DbServiceServer<DbGrpc> {
    DbServiceServer::new(DbGrpc::new(db, control_identities))
        .max_decoding_message_size(MAX_REQUEST_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_ANSWER_MESSAGE_BYTES)
}

/// The code says what class of failure it is; the reason (metadata
/// [`REASON_KEY`](splitmirror_proto::reason::REASON_KEY)) says what a caller
/// can do about it, so that no caller has to read the message.
impl From<DbError> for Status {
    fn from(error: DbError) -> Self {
        let message = error.to_string();
        let (status, reason) = match error {
            DbError::UnknownVolume(_) => (Status::not_found(message), Some(Reason::UnknownVolume)),
            DbError::InvalidArgument(_) => (Status::invalid_argument(message), None),
            DbError::OutOfRange(_) => (Status::out_of_range(message), Some(Reason::BeyondEnd)),
            DbError::WrongMode { mode, .. } => (
                Status::failed_precondition(message),
                Some(match mode {
                    Mode::Resynchronizing => Reason::Resynchronizing,
                    Mode::Snapshot => Reason::SnapshotHeld,
                    Mode::Synchronized | Mode::Undefined => Reason::WrongMode,
                }),
            ),
            DbError::Undefined { .. } => (
                Status::failed_precondition(message),
                Some(Reason::NoSnapshot),
            ),
            // Masking, as the array would answer it: nobody may write the
            // frozen mate.
            DbError::SnapshotReadOnly { .. } => (Status::permission_denied(message), None),
            DbError::HeldByOther { .. } => (
                Status::failed_precondition(message),
                Some(Reason::SnapshotHeld),
            ),
            DbError::CowSnapshotReadOnly { .. } => (Status::permission_denied(message), None),
            DbError::SnapshotInvalidated { .. } => (
                Status::failed_precondition(message),
                Some(Reason::SnapshotInvalidated),
            ),
            DbError::NoSaveArea { .. } => (
                Status::failed_precondition(message),
                Some(Reason::WrongMode),
            ),
            DbError::SaveAreaConfig(_) => (Status::internal(message), None),
            DbError::QuiesceTimeout { .. } => {
                (Status::unavailable(message), Some(Reason::QuiesceTimeout))
            }
            DbError::NotSynchronized { .. } => {
                (Status::unavailable(message), Some(Reason::Resynchronizing))
            }
            // The array refused or failed a call db-server made: never the
            // caller's fault, whatever code the array answered.
            DbError::Array(ref array) if array.is_transient() => {
                (Status::unavailable(message), Some(Reason::ArrayUnavailable))
            }
            DbError::Array(_) => (Status::internal(message), Some(Reason::ArrayFailed)),
            DbError::Journal(_) => (Status::internal(message), Some(Reason::JournalBroken)),
            DbError::Ledger(_) => (Status::internal(message), Some(Reason::LedgerFailed)),
            DbError::ShuttingDown => (Status::unavailable(message), Some(Reason::ShuttingDown)),
            DbError::LeaseOverCap { .. } => (
                Status::invalid_argument(message),
                Some(Reason::LeaseOverCap),
            ),
            DbError::TooLarge { .. } => {
                (Status::resource_exhausted(message), Some(Reason::TooLarge))
            }
            DbError::InvalidRunId(_) => (Status::invalid_argument(message), None),
            DbError::Restoring { .. } => (Status::unavailable(message), Some(Reason::Restoring)),
            DbError::RestoreHeld { .. } => (
                Status::failed_precondition(message),
                Some(Reason::RestoreHeld),
            ),
            DbError::NotRestoring { .. } => (
                Status::failed_precondition(message),
                Some(Reason::WrongMode),
            ),
            DbError::RestoreIncomplete { .. } => (
                Status::failed_precondition(message),
                Some(Reason::RestoreIncomplete),
            ),
        };
        match reason {
            Some(reason) => reason.attach(status),
            None => status,
        }
    }
}

fn mode_to_pb(mode: Mode) -> pb::Mode {
    match mode {
        Mode::Synchronized => pb::Mode::Synchronized,
        Mode::Snapshot => pb::Mode::Snapshot,
        Mode::Resynchronizing => pb::Mode::Resynchronizing,
        Mode::Undefined => pb::Mode::Undefined,
    }
}

fn method_to_pb(method: SnapshotMethod) -> pb::SnapshotMethod {
    match method {
        SnapshotMethod::Split => pb::SnapshotMethod::Split,
        SnapshotMethod::Cow => pb::SnapshotMethod::Cow,
    }
}

/// The `q`-quantile of a cumulative latency histogram in whole
/// microseconds (0 when it is empty).
fn latency_percentile_us(histogram: &[u64], q: f64) -> u64 {
    quantile_us(&[], histogram, q).map_or(0, |us| us.ceil() as u64)
}

/// `Status` for the wire. The 192 latency buckets go only to a caller that
/// asks for them (the bench, which subtracts two of them); people get the
/// percentiles.
pub fn status_to_pb(status: DbStatus, include_latency_histogram: bool) -> pb::StatusResponse {
    let volumes = status
        .volumes
        .into_iter()
        .map(|v| pb::VolumeStatus {
            volume: v.volume,
            mate: v.mate,
            mirror_lu: v.pair.mirror_lu,
            origin_lu: v.pair.origin_lu,
            mate_lu: v.pair.mate_lu,
            block_size_bytes: v.pair.block_size_bytes,
            block_count: v.pair.block_count,
            data_mode: mode_to_pb(v.routing.data_mode).into(),
            data_read_lu: v.routing.data_read_lu,
            data_write_lu: v.routing.data_write_lu,
            snapshot_mode: mode_to_pb(v.routing.snapshot_mode).into(),
            snapshot_lu: v.routing.snapshot_lu,
            snapshot_holder: v.holder.unwrap_or_default(),
            dirty_ranges: v
                .dirty_ranges
                .iter()
                .map(|r| pb::BlockRange {
                    lba: r.start,
                    blocks: r.end - r.start,
                })
                .collect(),
            dirty_blocks: v.dirty_blocks,
            resync: Some(pb::ResyncProgress {
                running: v.resync.running,
                ranges_done: v.resync.ranges_done,
                bytes_done: v.resync.bytes_done,
                ranges_total: v.resync.ranges_total,
                bytes_total: v.resync.bytes_total,
            }),
            snapshot_method: v
                .snapshot_method
                .map_or(pb::SnapshotMethod::Unspecified, method_to_pb)
                .into(),
            save_area: v.save_area.map(|area| pb::SaveAreaStatus {
                lu: area.lu,
                capacity_blocks: area.capacity_blocks,
                used_blocks: area.used_blocks,
            }),
            snapshot_invalidated_reason: v.snapshot_invalidated_reason.unwrap_or_default(),
            full_resync_reason: v.full_resync_reason.unwrap_or_default(),
            snapshot_writable: v.snapshot_writable,
            array_mode_keeping: match v.array_mode {
                Some(_) => pb::ArrayModeKeeping::Stateful,
                None => pb::ArrayModeKeeping::Stateless,
            }
            .into(),
            array_mode: v.array_mode.unwrap_or_default(),
            restore: v.restore.map(|r| pb::RestoreStatus {
                kind: match r.kind {
                    RestoreKind::FromBackup { .. } => pb::RestoreKind::FromBackup,
                    RestoreKind::ToSnapshot { .. } => pb::RestoreKind::ToSnapshot,
                }
                .into(),
                run_id: r.run_id,
                backup_id: match r.kind {
                    RestoreKind::FromBackup { backup_id } => backup_id,
                    RestoreKind::ToSnapshot { .. } => String::new(),
                },
                writer_identity: r.writer_identity.unwrap_or_default(),
                blocks_done: r.blocks_done,
                blocks_total: r.blocks_total,
            }),
        })
        .collect();
    let ledger = status.ledger.map(|l| pb::LedgerStatus {
        running: l.running,
        volume: l.volume,
        sequence: l.sequence,
        transactions_committed: l.committed,
        transactions_failed: l.failed_writes,
        accounts: l.accounts,
        latency_p50_us: latency_percentile_us(&l.latency_histogram, 0.5),
        latency_p90_us: latency_percentile_us(&l.latency_histogram, 0.9),
        latency_p99_us: latency_percentile_us(&l.latency_histogram, 0.99),
        latency_max_us: latency_percentile_us(&l.latency_histogram, 1.0),
        committed_sequence: l.committed_sequence,
        stopped_reason: l.stopped.clone().unwrap_or_default(),
        latency_histogram: if include_latency_histogram {
            l.latency_histogram
        } else {
            Vec::new()
        },
    });
    pb::StatusResponse {
        volumes,
        ledger,
        gate: Some(pb::GateStatus {
            suspended: status.gate.suspended,
            suspends: status.gate.suspends,
            lease_expiries: status.gate.lease_expiries,
        }),
        journal: Some(status.journal.map_or_else(pb::JournalStatus::default, |j| {
            pb::JournalStatus {
                enabled: true,
                records: j.records,
                bytes_written: j.bytes_written,
                fsyncs: j.fsyncs,
                broken: j.broken.is_some(),
                broken_reason: j.broken.unwrap_or_default(),
            }
        })),
        array_traffic: Some(pb::ArrayTraffic {
            bytes_sent: status.traffic.bytes_sent,
            bytes_received: status.traffic.bytes_received,
            write_calls: status.traffic.write_calls,
            copy_calls: status.traffic.copy_calls,
        }),
        // Asked of the array separately (see `with_background_pace`).
        background_pace: None,
    }
}

/// A status answer with the pace of background copies (asked of the array
/// with a short timeout: left unset when the array does not answer).
async fn status_with_pace(db: &Db, include_latency_histogram: bool) -> pb::StatusResponse {
    let mut status = status_to_pb(db.status(), include_latency_histogram);
    status.background_pace = db.manager.background_pace().await.map(pace_to_pb);
    status
}

fn pace_to_pb(pace: ResyncPace) -> pb::BackgroundPace {
    let guaranteed_min_bytes_per_s = pace.guaranteed_min_bytes_per_s();
    let reason = if pace.capped {
        pb::PaceReason::Capped
    } else {
        match pace.array.reason {
            PaceReason::Idle => pb::PaceReason::Idle,
            PaceReason::Sharing => pb::PaceReason::Sharing,
            PaceReason::Yielding => pb::PaceReason::Yielding,
            PaceReason::Minimum => pb::PaceReason::Minimum,
        }
    };
    let why = match (pace.capped, pace.resync_max_bytes_per_s) {
        (true, Some(max)) => format!(
            "{} — capped by --resync-max-rate (the array allows {})",
            format_rate(max),
            pace.array
                .rate_bytes_per_s
                .map_or_else(|| "full speed".to_string(), format_rate)
        ),
        _ => pace.array.why,
    };
    pb::BackgroundPace {
        rate_bytes_per_s: pace.rate_bytes_per_s,
        reason: reason.into(),
        resync_min_bytes_per_s: guaranteed_min_bytes_per_s,
        resync_max_bytes_per_s: pace.resync_max_bytes_per_s,
        background_bytes_per_s: pace.array.background_bytes_per_s,
        foreground_requests_per_s: pace.array.foreground_requests_per_s,
        foreground_latency_us: pace.array.foreground_latency_us,
        baseline_latency_us: pace.array.baseline_latency_us,
        why,
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl DbService for DbGrpc {
    async fn begin_restore(
        &self,
        request: Request<pb::BeginRestoreRequest>,
    ) -> Result<Response<pb::BeginRestoreResponse>, Status> {
        let request = request.into_inner();
        let span = tracing::Span::current();
        span.record("volume", request.volume);
        span.record("run_id", request.run_id.as_str());
        span.record("backup_id", request.backup_id.as_str());
        let request = validate::begin_restore(&self.db, request)?;
        let begun = self.db.begin_restore(&request).await?;
        let pair = begun.began.pair;
        Ok(Response::new(pb::BeginRestoreResponse {
            volume: request.volume,
            mirror_lu: pair.mirror_lu,
            origin_lu: pair.origin_lu,
            mate_lu: pair.mate_lu,
            block_size_bytes: pair.block_size_bytes,
            block_count: pair.block_count,
            already_restoring: begun.began.already_restoring,
            already_ended: begun.began.already_ended,
            ledger_sequence_stopped: begun.ledger_sequence_stopped,
            writer_identity: begun.began.writer_identity.unwrap_or_default(),
        }))
    }

    async fn end_restore(
        &self,
        request: Request<pb::EndRestoreRequest>,
    ) -> Result<Response<pb::EndRestoreResponse>, Status> {
        let request = request.into_inner();
        let span = tracing::Span::current();
        span.record("volume", request.volume);
        span.record("run_id", request.run_id.as_str());
        let request = validate::end_restore(&self.db, request)?;
        let ended = self.db.end_restore(&request).await?;
        Ok(Response::new(pb::EndRestoreResponse {
            volume: request.volume,
            already_ended: ended.ended.already_ended,
            abandoned: ended.ended.abandoned,
            chunks_compared: ended.ended.chunks_compared,
            image_digest: ended
                .ended
                .image_digest
                .map_or_else(Vec::new, |digest| digest.to_vec()),
            image_digest_matches: ended.ended.image_digest_matches,
            chunks_resynced: ended.ended.chunks_resynced,
            ledger_running: ended.ledger.running,
            ledger_sequence: ended.ledger.sequence,
            ledger_error: ended.ledger.error,
        }))
    }

    async fn restore_snapshot(
        &self,
        request: Request<pb::RestoreSnapshotRequest>,
    ) -> Result<Response<pb::RestoreSnapshotResponse>, Status> {
        let request = request.into_inner();
        let span = tracing::Span::current();
        span.record("volume", request.volume);
        span.record("run_id", request.run_id.as_str());
        let request = validate::restore_snapshot(&self.db, request)?;
        let restored = self.db.restore_snapshot(&request).await?;
        let outcome = restored.outcome;
        Ok(Response::new(pb::RestoreSnapshotResponse {
            volume: request.volume,
            already_restored: outcome.already_restored,
            ranges_copied: outcome.ranges_copied,
            blocks_copied: outcome.blocks_copied,
            bytes_copied: outcome.bytes_copied,
            duration_us: outcome.duration_us,
            snapshot_ledger_sequence: outcome.snapshot_ledger_sequence,
            ledger_running: restored.ledger.running,
            ledger_sequence: restored.ledger.sequence,
            ledger_error: restored.ledger.error,
        }))
    }

    async fn acquire_snapshot(
        &self,
        request: Request<pb::AcquireSnapshotRequest>,
    ) -> Result<Response<pb::AcquireSnapshotResponse>, Status> {
        let request = request.into_inner();
        let span = tracing::Span::current();
        span.record("volume", request.volume);
        span.record("run_id", request.run_id.as_str());
        let request = validate::acquire_snapshot(&self.db, request)?;
        let a = self.db.acquire_snapshot(&request).await?;
        Ok(Response::new(pb::AcquireSnapshotResponse {
            volume: a.volume,
            mate: a.mate,
            mate_lu: a.mate_lu,
            freeze_window_us: a.freeze_window_us,
            ledger_sequence: a.ledger_sequence,
            already_held: a.already_held,
            block_size_bytes: a.block_size_bytes,
            block_count: a.block_count,
            snapshot_id: a.snapshot_id,
            method: method_to_pb(a.method).into(),
        }))
    }

    async fn delete_snapshot(
        &self,
        request: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        let request = request.into_inner();
        let span = tracing::Span::current();
        span.record("volume", request.volume);
        span.record("run_id", request.run_id.as_str());
        let request = validate::delete_snapshot(&self.db, request)?;
        let outcome = self.db.delete_snapshot(&request).await?;
        Ok(Response::new(pb::DeleteSnapshotResponse {
            ranges_to_resync: outcome.ranges_to_resync,
            blocks_to_resync: outcome.blocks_to_resync,
            already_deleted: outcome.already_deleted,
        }))
    }

    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let include_latency_histogram = request.into_inner().include_latency_histogram;
        Ok(Response::new(
            status_with_pace(&self.db, include_latency_histogram).await,
        ))
    }

    type WatchStatusStream = BoxStream<pb::StatusResponse>;

    async fn watch_status(
        &self,
        request: Request<pb::WatchStatusRequest>,
    ) -> Result<Response<Self::WatchStatusStream>, Status> {
        let validate::WatchStatus {
            interval,
            include_latency_histogram,
            ..
        } = validate::watch_status(request.into_inner());
        let db = self.db.clone();
        let ticks = tokio_stream::wrappers::IntervalStream::new(tokio::time::interval(interval));
        let stream = ticks.then(move |_| {
            let db = db.clone();
            async move { Ok(status_with_pace(&db, include_latency_histogram).await) }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn suspend(
        &self,
        request: Request<pb::SuspendRequest>,
    ) -> Result<Response<pb::SuspendResponse>, Status> {
        let request = validate::suspend(&self.db, request.into_inner())?;
        let (suspended, ledger_sequence) = self.db.suspend(request).await?;
        Ok(Response::new(pb::SuspendResponse {
            ledger_sequence,
            // The cap keeps a lease far below u32::MAX milliseconds.
            lease_ms: u32::try_from(suspended.lease.as_millis()).unwrap_or(u32::MAX),
            already_suspended: suspended.renewed,
        }))
    }

    async fn resume(
        &self,
        _request: Request<pb::ResumeRequest>,
    ) -> Result<Response<pb::ResumeResponse>, Status> {
        let suspended = self.db.resume().await;
        Ok(Response::new(pb::ResumeResponse {
            was_suspended: suspended.is_some(),
            suspended_us: suspended.map_or(0, |d| d.as_micros() as u64),
        }))
    }

    type ReadStream = BoxStream<pb::VolumeReadChunk>;

    async fn read(
        &self,
        request: Request<pb::VolumeReadRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        let caller = splitmirror_proto::security::Caller::of(&request);
        let request = request.into_inner();
        let span = tracing::Span::current();
        span.record("volume", request.volume);
        span.record("lba", request.lba);
        span.record("blocks", request.blocks);
        let validate::VolumeRead {
            volume,
            mate,
            target,
            blocks: range,
            block_size_bytes,
            ..
        } = validate::read(&self.db, request)?;
        span.record("mode", tracing::field::debug(target));
        may_read(&caller, target, &self.control_identities)?;
        // Each chunk is refused too if a restore begins meanwhile (or the
        // copy-on-write snapshot is invalidated).
        self.db.manager.check_online(volume)?;
        let pair = PairRef::new(volume, mate);
        if target == VirtualLu::Snapshot {
            self.db.manager.check_snapshot_valid(pair)?;
        }
        let (lba, blocks) = (range.start, range.end - range.start);
        let chunk_blocks = (READ_CHUNK_BYTES / u64::from(block_size_bytes)).max(1);
        let db = self.db.clone();
        let chunks = (0..blocks.div_ceil(chunk_blocks)).map(move |i| {
            let chunk_lba = lba + i * chunk_blocks;
            (chunk_lba, chunk_blocks.min(lba + blocks - chunk_lba))
        });
        let stream = futures_util::stream::iter(chunks).then(move |(chunk_lba, n)| {
            let db = db.clone();
            async move {
                let data = db.manager.read(pair, target, chunk_lba, n).await?;
                Ok(pb::VolumeReadChunk {
                    lba: chunk_lba,
                    data,
                })
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn write(
        &self,
        request: Request<pb::VolumeWriteRequest>,
    ) -> Result<Response<pb::VolumeWriteResponse>, Status> {
        let request = request.into_inner();
        let span = tracing::Span::current();
        span.record("volume", request.volume);
        span.record("lba", request.lba);
        span.record("bytes", request.data.len() as u64);
        let request = validate::write(&self.db, request)?;
        span.record("mode", tracing::field::debug(request.target));
        let blocks_written = self.db.write(request).await?;
        Ok(Response::new(pb::VolumeWriteResponse { blocks_written }))
    }

    async fn get_snapshot(
        &self,
        request: Request<pb::GetSnapshotRequest>,
    ) -> Result<Response<pb::GetSnapshotResponse>, Status> {
        let validate::GetSnapshot { volume, mate, .. } =
            validate::get_snapshot(&self.db, request.into_inner())?;
        let pair = PairRef::new(volume, mate);
        // An invalidated copy-on-write snapshot: FAILED_PRECONDITION with
        // reason snapshot-invalidated, saying why.
        self.db.manager.check_snapshot_valid(pair)?;
        // No snapshot: the snapshot virtual LU is Undefined, which callers
        // already know as FAILED_PRECONDITION.
        let held = self
            .db
            .manager
            .snapshot_of(pair)?
            .ok_or(DbError::Undefined {
                volume,
                target: VirtualLu::Snapshot,
            })?;
        Ok(Response::new(pb::GetSnapshotResponse {
            volume,
            mate,
            holder_run_id: held.holder,
            mate_lu: held.pair.mate_lu,
            ledger_sequence: held.ledger_sequence,
            block_size_bytes: held.pair.block_size_bytes,
            block_count: held.pair.block_count,
            snapshot_id: held.snapshot_id,
            method: method_to_pb(held.method).into(),
            writable: held.writable,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unspecified_or_unknown_target_is_refused_not_defaulted() {
        let target = |target| validate::target(target).map_err(Status::from);
        let refused = target(pb::VirtualLu::Unspecified.into()).expect_err("unspecified");
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        assert!(refused.message().contains("VIRTUAL_LU_DATA"));
        assert_eq!(
            target(99).expect_err("unknown").code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            target(pb::VirtualLu::Data.into()).ok(),
            Some(VirtualLu::Data)
        );
        assert_eq!(
            target(pb::VirtualLu::Snapshot.into()).ok(),
            Some(VirtualLu::Snapshot)
        );
    }

    #[test]
    fn an_array_fault_is_unavailable_or_internal_never_the_callers_fault() {
        use splitmirror_proto::client::{ClientError, ErrorKind};
        use splitmirror_proto::reason::reason;
        let array_error = |kind| {
            Status::from(DbError::Array(ClientError::local(
                kind,
                "array",
                "x:1",
                "writing LU 1 at LBA 0",
                "anything",
            )))
        };
        for kind in [
            ErrorKind::Unavailable,
            ErrorKind::DeadlineExceeded,
            ErrorKind::Broken,
        ] {
            let status = array_error(kind);
            assert_eq!(status.code(), tonic::Code::Unavailable, "{kind}");
            assert_eq!(reason(&status), Some(Reason::ArrayUnavailable));
        }
        // The array refusing db-server's own request is db-server's
        // problem, not a malformed request of the caller's.
        for kind in [
            ErrorKind::InvalidArgument,
            ErrorKind::OutOfRange,
            ErrorKind::NotFound,
            ErrorKind::Internal,
        ] {
            let status = array_error(kind);
            assert_eq!(status.code(), tonic::Code::Internal, "{kind}");
            assert_eq!(reason(&status), Some(Reason::ArrayFailed));
        }
    }

    #[test]
    fn a_refusal_says_its_reason_in_metadata_whatever_the_mode() {
        use splitmirror_proto::reason::reason;
        let refusal = |mode| {
            Status::from(DbError::WrongMode {
                volume: 1,
                action: "acquire a snapshot of",
                mode,
            })
        };
        let resync = refusal(Mode::Resynchronizing);
        assert_eq!(resync.code(), tonic::Code::FailedPrecondition);
        assert_eq!(reason(&resync), Some(Reason::Resynchronizing));
        assert_eq!(reason(&refusal(Mode::Snapshot)), Some(Reason::SnapshotHeld));
        assert_eq!(
            reason(&refusal(Mode::Synchronized)),
            Some(Reason::WrongMode)
        );
        let held = Status::from(DbError::HeldByOther {
            volume: 1,
            holder: "a".into(),
            requester: "b".into(),
        });
        assert_eq!(reason(&held), Some(Reason::SnapshotHeld));
        let disk_full = crate::journal::JournalError::Append(std::io::Error::from_raw_os_error(28));
        assert_eq!(
            reason(&Status::from(DbError::Journal(disk_full))),
            Some(Reason::JournalBroken)
        );
        assert_eq!(
            reason(&Status::from(DbError::InvalidArgument("x".into()))),
            None
        );
    }

    #[test]
    fn restore_refusals_have_their_codes_and_reasons() {
        use splitmirror_proto::reason::reason;
        let restoring = Status::from(DbError::Restoring {
            volume: 0,
            run_id: "restore-1".into(),
            backup_id: Some("backup-b".into()),
        });
        assert_eq!(restoring.code(), tonic::Code::Unavailable);
        assert_eq!(reason(&restoring), Some(Reason::Restoring));
        assert!(restoring.message().contains("restore-1"));
        assert!(restoring.message().contains("backup-b"));
        let held = Status::from(DbError::RestoreHeld {
            volume: 0,
            action: "acquire a snapshot of",
            holder: "restore-1".into(),
        });
        assert_eq!(held.code(), tonic::Code::FailedPrecondition);
        assert_eq!(reason(&held), Some(Reason::RestoreHeld));
        let not_restoring = Status::from(DbError::NotRestoring {
            volume: 0,
            run_id: "r".into(),
            mode: Mode::Synchronized,
        });
        assert_eq!(not_restoring.code(), tonic::Code::FailedPrecondition);
        assert_eq!(reason(&not_restoring), Some(Reason::WrongMode));
        let incomplete = Status::from(DbError::RestoreIncomplete {
            volume: 0,
            first_differing_chunk: Some(3),
            why: "chunk 3".into(),
        });
        assert_eq!(incomplete.code(), tonic::Code::FailedPrecondition);
        assert_eq!(reason(&incomplete), Some(Reason::RestoreIncomplete));
    }

    /// The backup server (any identity of the CA) reads the snapshot
    /// virtual LU — a copy-on-write snapshot is only readable there — but
    /// only the control identities read the data virtual LU.
    #[test]
    fn any_identity_reads_the_snapshot_lu_only_control_reads_the_data_lu() {
        use splitmirror_proto::security::Caller;
        let control = ["console".to_string()];
        let backup = Caller::Identified("backup-server".into());
        assert!(may_read(&backup, VirtualLu::Snapshot, &control).is_ok());
        let refused = may_read(&backup, VirtualLu::Data, &control).expect_err("data");
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
        let console = Caller::Identified("console".into());
        assert!(may_read(&console, VirtualLu::Data, &control).is_ok());
        assert!(may_read(&Caller::Unauthenticated, VirtualLu::Data, &control).is_ok());
        assert_eq!(
            may_read(&Caller::Anonymous, VirtualLu::Snapshot, &control)
                .expect_err("anonymous")
                .code(),
            tonic::Code::Unauthenticated
        );
        assert!(!CONTROL_METHODS.contains(&"/splitmirror.db.v1.DbService/Read"));
        assert!(CONTROL_METHODS.contains(&"/splitmirror.db.v1.DbService/Write"));
    }

    #[test]
    fn the_restore_methods_are_control_methods() {
        for method in ["BeginRestore", "EndRestore", "RestoreSnapshot"] {
            let path = format!("/splitmirror.db.v1.DbService/{method}");
            assert!(CONTROL_METHODS.contains(&path.as_str()), "{method}");
        }
    }
}
