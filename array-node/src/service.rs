//! The gRPC adapter: validates each `splitmirror.array.v1` request with its
//! caller ([`crate::validate`]), runs it on the [`Array`] core, and turns
//! its errors into status codes.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use splitmirror_proto::array::v1 as pb;
use splitmirror_proto::array::v1::array_service_server::ArrayService;
use splitmirror_proto::pace::{PaceReason, PaceReport};
use splitmirror_proto::reason::Reason;
use splitmirror_proto::security::Caller;
use splitmirror_proto::telemetry;
use tonic::{Request, Response, Status, Streaming};

use crate::access::{Access, Grant, GrantSource};
use crate::array::{Array, LuKind, MAX_REQUEST_BYTES, Visible};
use crate::error::ArrayError;
use crate::modes::MirrorMode;
use crate::validate;

/// A read is streamed in chunks of this size, with this many chunks read
/// ahead of the one being sent.
const READ_CHUNK_BYTES: u64 = 1 << 20;
const READ_AHEAD_CHUNKS: usize = 4;

pub struct ArrayGrpc {
    array: Arc<Array>,
}

impl ArrayGrpc {
    pub fn new(array: Arc<Array>) -> Self {
        Self { array }
    }
}

impl From<ArrayError> for Status {
    fn from(error: ArrayError) -> Self {
        let message = error.to_string();
        match error {
            ArrayError::UnknownLu(_) => Status::not_found(message),
            ArrayError::PermissionDenied { .. } | ArrayError::NotOwner { .. } => {
                Status::permission_denied(message)
            }
            ArrayError::InvalidArgument(_) => Status::invalid_argument(message),
            ArrayError::OutOfRange(_) => Reason::BeyondEnd.attach(Status::out_of_range(message)),
            ArrayError::MirrorMode { .. } => {
                Reason::MirrorMode.attach(Status::failed_precondition(message))
            }
            ArrayError::TooLarge { .. } => Status::resource_exhausted(message),
            ArrayError::Io { .. } => Status::internal(message),
        }
    }
}

/// The classification byte of the Fig. 11 page: a mirror LU, or any other.
const FIG11_MIRROR_LU: u32 = 0;
const FIG11_OTHER_LU: u32 = 1;

fn lu_kind_to_pb(kind: &LuKind) -> pb::LuKind {
    match kind {
        LuKind::Mirror { .. } => pb::LuKind::Mirror,
        LuKind::Origin => pb::LuKind::Origin,
        LuKind::Mate => pb::LuKind::Mate,
        LuKind::Plain => pb::LuKind::Plain,
    }
}

fn access_to_pb(access: Access) -> pb::Access {
    match access {
        Access::None => pb::Access::None,
        Access::Read => pb::Access::Read,
        Access::ReadWrite => pb::Access::ReadWrite,
    }
}

/// The wire's mode and `mate_writable` of a pair's mode.
fn mode_to_pb(mode: MirrorMode) -> (pb::MirrorMode, bool) {
    match mode {
        MirrorMode::HostManaged => (pb::MirrorMode::HostManaged, false),
        MirrorMode::Synchronized => (pb::MirrorMode::Synchronized, false),
        MirrorMode::Snapshot { mate_writable } => (pb::MirrorMode::Snapshot, mate_writable),
        MirrorMode::Resynchronizing => (pb::MirrorMode::Resynchronizing, false),
    }
}

fn grant_to_pb(grant: Grant) -> pb::Grant {
    let source = match grant.source {
        GrantSource::Configured => pb::GrantSource::Configured,
        GrantSource::Set => pb::GrantSource::Set,
    };
    pb::Grant {
        identity: grant.identity,
        lu: grant.lu,
        access: access_to_pb(grant.access).into(),
        source: source.into(),
        purpose: grant.purpose,
    }
}

fn lu_info_to_pb(visible: Visible<'_>) -> pb::LuInfo {
    let info = visible.info;
    let (origin_lu, mate_lus) = match &info.kind {
        LuKind::Mirror { origin, mates } => (Some(*origin), mates.clone()),
        LuKind::Origin | LuKind::Mate | LuKind::Plain => (None, Vec::new()),
    };
    pb::LuInfo {
        id: info.id,
        kind: lu_kind_to_pb(&info.kind).into(),
        block_size_bytes: info.block_size_bytes,
        block_count: info.block_count,
        origin_lu,
        mate_lu: mate_lus.first().copied(),
        access: access_to_pb(visible.access).into(),
        mate_lus,
    }
}

/// How the log names a caller.
fn pace_to_pb(report: PaceReport) -> pb::BackgroundPace {
    let reason = match report.reason {
        PaceReason::Idle => pb::PaceReason::Idle,
        PaceReason::Sharing => pb::PaceReason::Sharing,
        PaceReason::Yielding => pb::PaceReason::Yielding,
        PaceReason::Minimum => pb::PaceReason::Minimum,
    };
    pb::BackgroundPace {
        rate_bytes_per_s: report.rate_bytes_per_s,
        reason: reason.into(),
        min_bytes_per_s: report.min_bytes_per_s,
        max_bytes_per_s: report.max_bytes_per_s,
        background_bytes_per_s: report.background_bytes_per_s,
        foreground_requests_per_s: report.foreground_requests_per_s,
        foreground_latency_us: report.foreground_latency_us,
        baseline_latency_us: report.baseline_latency_us,
        why: report.why,
    }
}

fn caller_name(caller: &Caller) -> &str {
    match caller {
        Caller::Identified(identity) => identity,
        Caller::Unauthenticated => "anyone (--insecure)",
        Caller::Anonymous => "a caller without a certificate",
    }
}

type ReadStream = Pin<Box<dyn Stream<Item = Result<pb::ReadChunk, Status>> + Send>>;

#[tonic::async_trait]
impl ArrayService for ArrayGrpc {
    async fn list_lus(
        &self,
        request: Request<pb::ListLusRequest>,
    ) -> Result<Response<pb::ListLusResponse>, Status> {
        let caller = Caller::of(&request);
        let lus = self
            .array
            .list_lus(&caller)
            .into_iter()
            .map(lu_info_to_pb)
            .collect();
        Ok(Response::new(pb::ListLusResponse { lus }))
    }

    async fn mode_sense(
        &self,
        request: Request<pb::ModeSenseRequest>,
    ) -> Result<Response<pb::ModeSenseResponse>, Status> {
        let caller = Caller::of(&request);
        let visible = validate::mode_sense(&self.array, &caller, request.get_ref())?;
        let page = Array::mode_sense(visible.info);
        // The same kind ListLus answers; the page itself only knows mirror
        // or not.
        let kind = lu_kind_to_pb(&visible.info.kind);
        // A mirror LU's page names its origin and mate 1; a mate's page
        // names the mate itself (whose pair's mode it gives).
        let (fig11_classification, origin_lu, mate_lu) = match (page.pair, &visible.info.kind) {
            (Some((origin, mate)), _) => (FIG11_MIRROR_LU, Some(origin), Some(mate)),
            (None, LuKind::Mate) => (FIG11_OTHER_LU, None, Some(visible.info.id)),
            (None, _) => (FIG11_OTHER_LU, None, None),
        };
        // A mate's own pair's mode; mate 1's for a mirror LU or its origin;
        // none for a plain LU. `mates` lists every pair of the mirror.
        let modes = self.array.modes();
        let mates = modes
            .pairs(visible.info.id)
            .into_iter()
            .map(|(mate_lu, mode)| {
                let (mode, mate_writable) = mode_to_pb(mode);
                pb::MatePair {
                    mate_lu,
                    mode: mode.into(),
                    mate_writable,
                }
            })
            .collect();
        let (mirror_mode, mate_writable) = match modes.mode(visible.info.id) {
            Some(mode) => mode_to_pb(mode),
            None => (pb::MirrorMode::Unspecified, false),
        };
        Ok(Response::new(pb::ModeSenseResponse {
            kind: kind.into(),
            fig11_classification,
            origin_lu,
            mate_lu,
            block_size_bytes: page.block_size_bytes,
            block_count: page.block_count,
            mirror_mode: mirror_mode.into(),
            mate_writable,
            mates,
        }))
    }

    async fn mode_select(
        &self,
        request: Request<pb::ModeSelectRequest>,
    ) -> Result<Response<pb::ModeSelectResponse>, Status> {
        let caller = Caller::of(&request);
        let change = validate::mode_select(&self.array, &caller, request.get_ref())?;
        // On its own task: a caller that goes away while the mode is being
        // saved does not leave the file and the mode in force apart.
        let array = self.array.clone();
        let applied = {
            let change = change.clone();
            tokio::spawn(async move { array.modes().select(&change).await })
                .await
                .map_err(|e| {
                    Status::internal(format!(
                        "changing the mode of a mirror LU: task failed: {e}"
                    ))
                })?
        };
        let (previous, mode) = match applied {
            Ok(answer) => answer,
            Err(error) => {
                tracing::error!(
                    caller = caller_name(&caller),
                    lu = change.mirror,
                    mate = change.mate,
                    mode = %change.mode,
                    "changing the mode of mirror LU {} (mate LU {}) to {}: {error}; \
                     it stays as it was",
                    change.mirror,
                    change.mate,
                    change.mode,
                );
                return Err(error.into());
            }
        };
        tracing::info!(
            caller = caller_name(&caller),
            lu = change.mirror,
            mate = change.mate,
            %previous,
            %mode,
            purpose = %change.purpose,
            "mirroring management table: mirror LU {} with mate LU {} is now {mode} \
             (was {previous}): {}",
            change.mirror,
            change.mate,
            if change.purpose.is_empty() { "no purpose given" } else { &change.purpose },
        );
        let (previous, _) = mode_to_pb(previous);
        let (mode, mate_writable) = mode_to_pb(mode);
        Ok(Response::new(pb::ModeSelectResponse {
            previous: previous.into(),
            mode: mode.into(),
            mate_writable,
            mate_lu: change.mate,
        }))
    }

    type ReadStream = ReadStream;

    async fn read(
        &self,
        request: Request<pb::ReadRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        let caller = Caller::of(&request);
        let request = request.get_ref();
        telemetry::record_blocks(request.lu, request.lba, request.blocks, None);
        // The whole range (and the caller's access) is checked before the
        // first byte is sent.
        let read = validate::read(&self.array, &caller, request)?;
        let array = self.array.clone();
        let stream = futures_util::stream::iter(read.chunks(READ_CHUNK_BYTES))
            .map(move |chunk| {
                let array = array.clone();
                async move {
                    let data = array.read(&chunk).await?;
                    Ok(pb::ReadChunk {
                        lba: chunk.lba(),
                        data,
                    })
                }
            })
            .buffered(READ_AHEAD_CHUNKS);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn write(
        &self,
        request: Request<pb::WriteRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        let caller = Caller::of(&request);
        let write = validate::write(&self.array, &caller, request.into_inner())?;
        let (lu, lba, bytes) = (write.lu(), write.lba(), write.data().len() as u64);
        let blocks_written = self.array.write(write).await?;
        telemetry::record_blocks(lu, lba, blocks_written, Some(bytes));
        telemetry::record_array_write(bytes);
        Ok(Response::new(pb::WriteResponse { blocks_written }))
    }

    async fn write_stream(
        &self,
        request: Request<Streaming<pb::WriteRequest>>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        let caller = Caller::of(&request);
        let mut stream = request.into_inner();
        let mut blocks_written = 0;
        while let Some(message) = stream.message().await? {
            let write = validate::write(&self.array, &caller, message)?;
            let bytes = write.data().len() as u64;
            blocks_written += self.array.write(write).await?;
            telemetry::record_array_write(bytes);
        }
        Ok(Response::new(pb::WriteResponse { blocks_written }))
    }

    async fn copy_range(
        &self,
        request: Request<pb::CopyRangeRequest>,
    ) -> Result<Response<pb::CopyRangeResponse>, Status> {
        let caller = Caller::of(&request);
        let request = request.get_ref();
        telemetry::record_blocks(request.dst_lu, request.lba, request.blocks, None);
        let copy = validate::copy_range(&self.array, &caller, request)?;
        let blocks_copied = self.array.copy_range(&copy).await?;
        Ok(Response::new(pb::CopyRangeResponse { blocks_copied }))
    }

    async fn checksum_range(
        &self,
        request: Request<pb::ChecksumRangeRequest>,
    ) -> Result<Response<pb::ChecksumRangeResponse>, Status> {
        let caller = Caller::of(&request);
        let request = request.get_ref();
        telemetry::record_blocks(request.lu, request.lba, request.blocks, None);
        let checksum = validate::checksum_range(&self.array, &caller, request)?;
        let digests = self
            .array
            .checksum_range(&checksum)
            .await?
            .into_iter()
            .map(|digest| digest.to_vec())
            .collect();
        Ok(Response::new(pb::ChecksumRangeResponse { digests }))
    }

    async fn flush(
        &self,
        request: Request<pb::FlushRequest>,
    ) -> Result<Response<pb::FlushResponse>, Status> {
        let caller = Caller::of(&request);
        let flush = validate::flush(&self.array, &caller, request.get_ref())?;
        self.array.flush(&flush).await?;
        Ok(Response::new(pb::FlushResponse {}))
    }

    async fn set_access(
        &self,
        request: Request<pb::SetAccessRequest>,
    ) -> Result<Response<pb::SetAccessResponse>, Status> {
        let caller = Caller::of(&request);
        let change = validate::set_access(&self.array, &caller, request.get_ref())?;
        let array = self.array.clone();
        let applied = {
            let change = change.clone();
            tokio::task::spawn_blocking(move || array.access().set(&change))
                .await
                .map_err(|e| Status::internal(format!("changing LUN masking: task failed: {e}")))?
        };
        let (previous, access) = match applied {
            Ok(answer) => answer,
            Err(error) => {
                tracing::error!(
                    caller = caller_name(&caller),
                    identity = %change.identity,
                    lu = change.lu,
                    "changing LUN masking: {error}"
                );
                return Err(error.into());
            }
        };
        tracing::info!(
            caller = caller_name(&caller),
            identity = %change.identity,
            lu = change.lu,
            %previous,
            %access,
            purpose = %change.purpose,
            "LUN masking: {}'s access to LU {} is now {access} (was {previous}){}: {}",
            change.identity,
            change.lu,
            if change.access.is_none() { ", as configured" } else { "" },
            if change.purpose.is_empty() { "no purpose given" } else { &change.purpose },
        );
        Ok(Response::new(pb::SetAccessResponse {
            previous: access_to_pb(previous).into(),
            access: access_to_pb(access).into(),
        }))
    }

    async fn list_access(
        &self,
        request: Request<pb::ListAccessRequest>,
    ) -> Result<Response<pb::ListAccessResponse>, Status> {
        let caller = Caller::of(&request);
        let grants = self
            .array
            .access()
            .list(&caller)
            .into_iter()
            .map(grant_to_pb)
            .collect();
        Ok(Response::new(pb::ListAccessResponse { grants }))
    }

    async fn pace(
        &self,
        _request: Request<pb::PaceRequest>,
    ) -> Result<Response<pb::PaceResponse>, Status> {
        let report = self.array.pace().report(tokio::time::Instant::now());
        Ok(Response::new(pb::PaceResponse {
            pace: Some(pace_to_pb(report)),
        }))
    }
}

/// The decoding limit of the service: a little over the largest request the
/// array accepts, so that an oversized write reaches the array's own check
/// and gets `RESOURCE_EXHAUSTED` with a reason.
pub const MAX_DECODING_BYTES: usize = (MAX_REQUEST_BYTES as usize) * 2;

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;
    use crate::config::ArrayConfig;

    fn service() -> ArrayGrpc {
        let config = ArrayConfig::default_pairs(16 * 4096).expect("config");
        ArrayGrpc::new(Arc::new(Array::in_memory(&config).expect("array")))
    }

    /// A request as the server stack hands it on: its caller in the
    /// extensions.
    fn from<T>(identity: &str, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request
            .extensions_mut()
            .insert(Caller::Identified(identity.to_string()));
        request
    }

    fn write(lu: u32) -> pb::WriteRequest {
        pb::WriteRequest {
            lu,
            lba: 0,
            data: vec![1; 4096],
            fua: false,
        }
    }

    #[tokio::test]
    async fn list_lus_shows_each_identity_its_own_lus_and_access() {
        let service = service();
        let listed = |identity: &'static str| {
            let service = &service;
            async move {
                let lus = service
                    .list_lus(from(identity, pb::ListLusRequest {}))
                    .await
                    .expect("list")
                    .into_inner()
                    .lus;
                lus.iter()
                    .map(|lu| (lu.id, lu.access()))
                    .collect::<Vec<_>>()
            }
        };
        let rw = pb::Access::ReadWrite;
        assert_eq!(
            listed("db-server").await,
            vec![(0, rw), (1, rw), (2, rw), (3, rw), (4, rw), (5, rw)]
        );
        let read = pb::Access::Read;
        assert_eq!(listed("backup-server").await, vec![(2, read), (5, read)]);
        assert!(listed("console").await.is_empty());
        // A request without a caller (no layer) sees nothing.
        let bare = service
            .list_lus(Request::new(pb::ListLusRequest {}))
            .await
            .expect("list");
        assert!(bare.into_inner().lus.is_empty());
    }

    #[tokio::test]
    async fn masked_is_not_found_with_the_text_of_missing_and_too_little_is_denied() {
        let service = service();
        let masked = service
            .write(from("console", write(0)))
            .await
            .expect_err("masked");
        let missing = service
            .write(from("db-server", write(7)))
            .await
            .expect_err("missing");
        assert_eq!(
            (masked.code(), missing.code()),
            (Code::NotFound, Code::NotFound)
        );
        assert_eq!(masked.message(), "LU 0 does not exist");
        assert_eq!(missing.message(), "LU 7 does not exist");
        let denied = service
            .write(from("backup-server", write(2)))
            .await
            .expect_err("read-only");
        assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
        let sense = service
            .mode_sense(from("backup-server", pb::ModeSenseRequest { lu: 0 }))
            .await
            .expect_err("the mirror is masked");
        assert_eq!(sense.code(), Code::NotFound);
    }

    #[tokio::test]
    async fn set_access_answers_before_and_after_and_list_access_shows_it() {
        let service = service();
        let request = |access: Option<pb::Access>| pb::SetAccessRequest {
            identity: "db-server".into(),
            lu: 2,
            access: access.map(Into::into),
            purpose: "snapshot of run R".into(),
        };
        let refused = service
            .set_access(from("backup-server", request(Some(pb::Access::Read))))
            .await
            .expect_err("not the owner");
        assert_eq!(refused.code(), Code::PermissionDenied);
        let answer = service
            .set_access(from("db-server", request(Some(pb::Access::Read))))
            .await
            .expect("set")
            .into_inner();
        assert_eq!(
            (answer.previous(), answer.access()),
            (pb::Access::ReadWrite, pb::Access::Read)
        );
        let denied = service
            .write(from("db-server", write(0)))
            .await
            .expect_err("the mate is read-only now");
        assert_eq!(denied.code(), Code::PermissionDenied);
        let grants = service
            .list_access(from("db-server", pb::ListAccessRequest {}))
            .await
            .expect("list")
            .into_inner()
            .grants;
        let mate = grants
            .iter()
            .find(|g| g.identity == "db-server" && g.lu == 2)
            .expect("listed");
        assert_eq!(
            (mate.access(), mate.source(), mate.purpose.as_str()),
            (pb::Access::Read, pb::GrantSource::Set, "snapshot of run R")
        );
        let own = service
            .list_access(from("backup-server", pb::ListAccessRequest {}))
            .await
            .expect("list")
            .into_inner()
            .grants;
        assert!(own.iter().all(|g| g.identity == "backup-server"), "{own:?}");
        let answer = service
            .set_access(from("db-server", request(None)))
            .await
            .expect("unset")
            .into_inner();
        assert_eq!(
            (answer.previous(), answer.access()),
            (pb::Access::Read, pb::Access::ReadWrite)
        );
        service
            .write(from("db-server", write(0)))
            .await
            .expect("writable again");
    }

    fn select(lu: u32, mode: pb::MirrorMode, mate_writable: bool) -> pb::ModeSelectRequest {
        pb::ModeSelectRequest {
            mate_lu: None,
            lu,
            mode: mode.into(),
            mate_writable,
            purpose: "snapshot of run R".into(),
        }
    }

    #[tokio::test]
    async fn mode_select_is_the_owners_and_mode_sense_reports_it_on_every_lu_of_the_pair() {
        let mut config = ArrayConfig::default_pairs(16 * 4096).expect("config");
        config.lus.push(crate::config::RealLuConfig {
            id: 9,
            block_size_bytes: 4096,
            block_count: 16,
        });
        config.grants.push(crate::access::GrantConfig {
            identity: "db-server".into(),
            lu: 9,
            access: Access::ReadWrite,
        });
        let service = ArrayGrpc::new(Arc::new(Array::in_memory(&config).expect("array")));
        let sense = |lu: u32| {
            let service = &service;
            async move {
                let page = service
                    .mode_sense(from("db-server", pb::ModeSenseRequest { lu }))
                    .await
                    .expect("sense")
                    .into_inner();
                (page.mirror_mode(), page.mate_writable)
            }
        };
        for lu in [0, 1, 2, 3, 4, 5] {
            assert_eq!(
                sense(lu).await,
                (pb::MirrorMode::HostManaged, false),
                "LU {lu}"
            );
        }
        assert_eq!(sense(9).await, (pb::MirrorMode::Unspecified, false));
        let refused = service
            .mode_select(from(
                "backup-server",
                select(0, pb::MirrorMode::Snapshot, false),
            ))
            .await
            .expect_err("not the owner");
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
        let invalid = service
            .mode_select(from(
                "db-server",
                select(2, pb::MirrorMode::Snapshot, false),
            ))
            .await
            .expect_err("the mate");
        assert_eq!(invalid.code(), Code::InvalidArgument, "{invalid:?}");
        let answer = service
            .mode_select(from("db-server", select(0, pb::MirrorMode::Snapshot, true)))
            .await
            .expect("select")
            .into_inner();
        assert_eq!(
            (answer.previous(), answer.mode(), answer.mate_writable),
            (pb::MirrorMode::HostManaged, pb::MirrorMode::Snapshot, true)
        );
        for lu in [0, 1, 2] {
            assert_eq!(sense(lu).await, (pb::MirrorMode::Snapshot, true), "LU {lu}");
        }
        assert_eq!(sense(3).await, (pb::MirrorMode::HostManaged, false));
        service
            .write(from("db-server", write(2)))
            .await
            .expect("a writable snapshot's mate");
        service
            .mode_select(from(
                "db-server",
                select(0, pb::MirrorMode::Synchronized, false),
            ))
            .await
            .expect("select");
        let refused = service
            .write(from("db-server", write(2)))
            .await
            .expect_err("the mate of a synchronized pair");
        assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
        assert_eq!(
            splitmirror_proto::reason::reason(&refused),
            Some(Reason::MirrorMode),
            "{refused:?}"
        );
        assert!(refused.message().contains("SYNCHRONIZED"), "{refused:?}");
    }
}
