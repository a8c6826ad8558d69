//! The snapshot manager's view of the disk array: a small trait, so that the
//! manager holds no gRPC types and a simulator can stand in for the array,
//! and its gRPC implementation, a thin wrapper over the shared
//! [`ArrayClient`] that counts the data crossing the network.
//!
//! Every call answers the shared [`ClientError`]: whether the array was
//! unreachable (retry) or failed (do not) is its
//! [`ErrorKind`](splitmirror_proto::client::ErrorKind), decided
//! from the gRPC code in one place, never from a message.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::StreamExt;
use splitmirror_proto::array::v1 as pb;
use splitmirror_proto::client::ArrayClient;
use splitmirror_proto::pace::{PaceReason, PaceReport};
use splitmirror_proto::security::Security;

/// The mirror pair row (1108) and the array error are the shared client's.
pub use splitmirror_proto::client::{ClientError, LuPage, PairInfo};

/// A boxed future, so that [`ArrayPort`] can be used as a trait object.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the snapshot manager asks of the array. A failed call's effect is
/// unknown to the caller, which is why a failed write leaves its range
/// recorded.
pub trait ArrayPort: Send + Sync + 'static {
    /// The mirror pairs the array defines.
    fn list_pairs(&self) -> BoxFuture<'_, Result<Vec<PairInfo>, ClientError>>;
    /// `blocks` blocks of `lu` from `lba`, in one buffer.
    fn read(&self, lu: u32, lba: u64, blocks: u64) -> BoxFuture<'_, Result<Vec<u8>, ClientError>>;
    /// Writes whole blocks at `lba`; a mirror LU writes both sides.
    fn write(&self, lu: u32, lba: u64, data: Vec<u8>) -> BoxFuture<'_, Result<(), ClientError>>;
    /// `CopyRange` inside the array (the offload of claim 4).
    fn copy_range(
        &self,
        src_lu: u32,
        dst_lu: u32,
        lba: u64,
        blocks: u64,
    ) -> BoxFuture<'_, Result<(), ClientError>>;
    /// [`ArrayPort::copy_range`] guaranteed `min_bytes_per_s` whatever the
    /// foreground load (db-server's `--resync-min-rate`): the array's
    /// adaptive pace never makes it wait longer than its bytes take at that
    /// rate. `None`: the array's own minimum. The default ignores the
    /// guarantee: only for ports over arrays that do not pace (simulators).
    fn copy_range_guaranteed(
        &self,
        src_lu: u32,
        dst_lu: u32,
        lba: u64,
        blocks: u64,
        min_bytes_per_s: Option<u64>,
    ) -> BoxFuture<'_, Result<(), ClientError>> {
        let _ = min_bytes_per_s;
        self.copy_range(src_lu, dst_lu, lba, blocks)
    }
    /// The array's adaptive pace of background copies now; `Ok(None)` for
    /// an array that does not pace (the default: simulators).
    fn pace(&self) -> BoxFuture<'_, Result<Option<PaceReport>, ClientError>> {
        Box::pin(async { Ok(None) })
    }
    /// The mode-sense page of one LU (its kind, block size and count), to
    /// check a save area at start-up. The default knows no LU: only for
    /// ports over arrays that have no save areas (simulators).
    fn lu_page(&self, lu: u32) -> BoxFuture<'_, Result<LuPage, ClientError>> {
        unsupported(
            splitmirror_proto::client::ErrorKind::NotFound,
            format!("mode sense of LU {lu}"),
            "this array describes no LU",
        )
    }
    /// Makes every acknowledged write to `lu` durable.
    fn flush(&self, lu: u32) -> BoxFuture<'_, Result<(), ClientError>>;
    /// BLAKE3 digests of each `chunk_blocks`-block chunk of a range.
    fn checksums(
        &self,
        lu: u32,
        lba: u64,
        blocks: u64,
        chunk_blocks: u64,
    ) -> BoxFuture<'_, Result<Vec<[u8; 32]>, ClientError>>;
    /// Data bytes this port has sent to and received from the array.
    fn traffic(&self) -> Traffic {
        Traffic::default()
    }
    /// The identity the array knows this port's calls by (the first DNS
    /// name of db-server's certificate), or `None` when the array masks
    /// nothing (`--insecure`): then [`ArrayPort::set_own_access`] must not be
    /// called.
    fn identity(&self) -> Option<&str>;
    /// LUN masking: this port's own access to `lu` from now on (the
    /// array's `SetAccess` for [`ArrayPort::identity`]). Idempotent: setting
    /// what is in force already changes nothing. `purpose` is for the
    /// array's log and `ListAccess`.
    fn set_own_access(
        &self,
        lu: u32,
        access: OwnAccess,
        purpose: &str,
    ) -> BoxFuture<'_, Result<(), ClientError>>;
    /// LUN masking for another identity: `identity`'s access to `lu` from
    /// now on (`None` withdraws what was set: the configuration's grant
    /// again). db-server, the pairs' owner, gives the backup server write
    /// access to one volume for one restore this way. Like
    /// [`ArrayPort::set_own_access`], only for an array that masks
    /// ([`ArrayPort::identity`] is `Some`); idempotent.
    ///
    /// The default answers that this port cannot grant: only ports that
    /// never mask (simulators) rely on it, and they are never asked.
    fn set_access(
        &self,
        identity: &str,
        lu: u32,
        access: Option<Access>,
        purpose: &str,
    ) -> BoxFuture<'_, Result<(), ClientError>> {
        unsupported(
            splitmirror_proto::client::ErrorKind::Internal,
            format!("setting {identity}'s access to LU {lu} to {access:?} ({purpose})"),
            "this array port cannot grant access to other identities",
        )
    }
    /// Sets the mode of the pair (its mirror LU and mate) in the array's mirroring management
    /// table (`ModeSelect`, the first embodiment); durable at the array
    /// when this answers, enforced from then on. Idempotent. The default
    /// answers that this port keeps no modes: only simulators without
    /// modes rely on it, and a stateless manager asks only at start-up,
    /// when the pair's page says it is not host-managed.
    fn mode_select(
        &self,
        pair: &PairInfo,
        mode: ArrayMirrorMode,
        purpose: &str,
    ) -> BoxFuture<'_, Result<(), ClientError>> {
        unsupported(
            splitmirror_proto::client::ErrorKind::Internal,
            format!(
                "setting the mode of mirror LU {} (mate LU {}) to {mode} ({purpose})",
                pair.mirror_lu, pair.mate_lu
            ),
            "this array port keeps no modes",
        )
    }
}

/// The answer of a default [`ArrayPort`] method that a port (a simulator)
/// does not provide.
fn unsupported<T>(
    kind: splitmirror_proto::client::ErrorKind,
    doing: String,
    why: &'static str,
) -> BoxFuture<'static, Result<T, ClientError>> {
    Box::pin(async move {
        Err(ClientError::local(
            kind,
            "array",
            "this array port",
            doing,
            why,
        ))
    })
}

/// A mirror LU's mode in the array's mirroring management table (Fig. 2),
/// as db-server sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArrayMirrorMode {
    /// The array enforces nothing: db-server routes (the stateless array).
    HostManaged,
    Synchronized,
    /// Mirror LU reads and writes go to the origin alone; the mate is
    /// readable, and writable only if `mate_writable`.
    Snapshot {
        mate_writable: bool,
    },
    /// Mirror LU writes go to both sides; the mate is neither read nor
    /// written by anyone but the array's own copy.
    Resynchronizing,
}

impl ArrayMirrorMode {
    /// The mode a mode-sense page reports (`None` for a plain LU, or a
    /// value this build does not know).
    pub fn of_page(page: &LuPage) -> Option<Self> {
        Some(match page.mirror_mode {
            pb::MirrorMode::HostManaged => ArrayMirrorMode::HostManaged,
            pb::MirrorMode::Synchronized => ArrayMirrorMode::Synchronized,
            pb::MirrorMode::Snapshot => ArrayMirrorMode::Snapshot {
                mate_writable: page.mate_writable,
            },
            pb::MirrorMode::Resynchronizing => ArrayMirrorMode::Resynchronizing,
            pb::MirrorMode::Unspecified => return None,
        })
    }

    fn to_pb(self) -> (pb::MirrorMode, bool) {
        match self {
            ArrayMirrorMode::HostManaged => (pb::MirrorMode::HostManaged, false),
            ArrayMirrorMode::Synchronized => (pb::MirrorMode::Synchronized, false),
            ArrayMirrorMode::Snapshot { mate_writable } => {
                (pb::MirrorMode::Snapshot, mate_writable)
            }
            ArrayMirrorMode::Resynchronizing => (pb::MirrorMode::Resynchronizing, false),
        }
    }
}

impl std::fmt::Display for ArrayMirrorMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ArrayMirrorMode::HostManaged => "HOST_MANAGED",
            ArrayMirrorMode::Synchronized => "SYNCHRONIZED",
            ArrayMirrorMode::Snapshot {
                mate_writable: false,
            } => "SNAPSHOT",
            ArrayMirrorMode::Snapshot {
                mate_writable: true,
            } => "SNAPSHOT (mate writable)",
            ArrayMirrorMode::Resynchronizing => "RESYNCHRONIZING",
        })
    }
}

/// The array's answer to `Pace` as plain Rust.
fn pace_from_pb(pace: pb::BackgroundPace) -> PaceReport {
    let reason = match pace.reason() {
        pb::PaceReason::Sharing => PaceReason::Sharing,
        pb::PaceReason::Yielding => PaceReason::Yielding,
        pb::PaceReason::Minimum => PaceReason::Minimum,
        // CAPPED is db-server's own reason, never the array's; an unknown
        // reason from a newer array reads as no limit from the array.
        pb::PaceReason::Idle | pb::PaceReason::Capped | pb::PaceReason::Unspecified => {
            PaceReason::Idle
        }
    };
    PaceReport {
        rate_bytes_per_s: pace.rate_bytes_per_s,
        reason,
        min_bytes_per_s: pace.min_bytes_per_s,
        max_bytes_per_s: pace.max_bytes_per_s,
        background_bytes_per_s: pace.background_bytes_per_s,
        foreground_requests_per_s: pace.foreground_requests_per_s,
        foreground_latency_us: pace.foreground_latency_us,
        baseline_latency_us: pace.baseline_latency_us,
        why: pace.why,
    }
}

/// An access db-server sets for another identity (the restore's writer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    ReadWrite,
}

/// What db-server asks the array to let itself do with an LU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnAccess {
    /// Read only: the mate LU under a snapshot, so that nobody, db-server
    /// included, writes the frozen image while it is held.
    Read,
    /// What the array's configuration grants (read-write on db-server's
    /// pairs): the grant set for a snapshot is withdrawn.
    Configured,
}

/// Data bytes that crossed the network between db-server and the array
/// (payloads only; framing is not counted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub write_calls: u64,
    pub copy_calls: u64,
}

/// The array reached over gRPC: the shared [`ArrayClient`] and the
/// counters behind [`ArrayPort::traffic`].
#[derive(Clone)]
pub struct GrpcArray {
    client: ArrayClient,
    counters: Arc<Counters>,
    /// db-server's identity, as the array knows it (none with
    /// `--insecure`).
    identity: Option<String>,
    /// The identities that may read the frozen mate while a snapshot is
    /// held (the control identities: the console compares the backup
    /// with the frozen mate's digests itself); withdrawn with db-server's
    /// own grant.
    snapshot_readers: Vec<String>,
}

#[derive(Default)]
struct Counters {
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
    write_calls: AtomicU64,
    copy_calls: AtomicU64,
}

impl GrpcArray {
    /// A client that connects lazily and reconnects after the array
    /// restarts. Fails only for an address that cannot be parsed.
    pub fn new(target: &str, security: &Security) -> Result<Self, ClientError> {
        Ok(Self {
            client: ArrayClient::new(target, security)?,
            counters: Arc::default(),
            identity: security.identity().map(str::to_string),
            snapshot_readers: Vec::new(),
        })
    }

    /// The identities that may read the frozen mate while a snapshot is
    /// held, besides the backup server (which the array's configuration
    /// lets read every mate): db-server grants them `read` on the mate with
    /// its own read-only grant and withdraws both together.
    pub fn with_snapshot_readers(mut self, readers: Vec<String>) -> Self {
        self.snapshot_readers = readers;
        self
    }

    /// The address of the array.
    pub fn target(&self) -> &str {
        self.client.target()
    }
}

impl ArrayPort for GrpcArray {
    fn list_pairs(&self) -> BoxFuture<'_, Result<Vec<PairInfo>, ClientError>> {
        Box::pin(self.client.list_pairs())
    }

    fn lu_page(&self, lu: u32) -> BoxFuture<'_, Result<LuPage, ClientError>> {
        Box::pin(self.client.mode_sense(lu))
    }

    fn read(&self, lu: u32, lba: u64, blocks: u64) -> BoxFuture<'_, Result<Vec<u8>, ClientError>> {
        Box::pin(async move {
            let mut stream = self.client.read_stream(lu, lba, blocks).await?;
            let mut data = Vec::new();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk?;
                self.counters
                    .bytes_received
                    .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                if data.is_empty() {
                    data = chunk;
                } else {
                    data.extend_from_slice(&chunk);
                }
            }
            Ok(data)
        })
    }

    fn write(&self, lu: u32, lba: u64, data: Vec<u8>) -> BoxFuture<'_, Result<(), ClientError>> {
        Box::pin(async move {
            self.counters.write_calls.fetch_add(1, Ordering::Relaxed);
            self.counters
                .bytes_sent
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            self.client.write(lu, lba, data).await?;
            Ok(())
        })
    }

    fn copy_range(
        &self,
        src_lu: u32,
        dst_lu: u32,
        lba: u64,
        blocks: u64,
    ) -> BoxFuture<'_, Result<(), ClientError>> {
        self.copy_range_guaranteed(src_lu, dst_lu, lba, blocks, None)
    }

    fn copy_range_guaranteed(
        &self,
        src_lu: u32,
        dst_lu: u32,
        lba: u64,
        blocks: u64,
        min_bytes_per_s: Option<u64>,
    ) -> BoxFuture<'_, Result<(), ClientError>> {
        Box::pin(async move {
            self.counters.copy_calls.fetch_add(1, Ordering::Relaxed);
            self.client
                .copy_range_guaranteed(src_lu, dst_lu, lba, blocks, min_bytes_per_s)
                .await?;
            Ok(())
        })
    }

    fn pace(&self) -> BoxFuture<'_, Result<Option<PaceReport>, ClientError>> {
        Box::pin(async move {
            let pace = self.client.pace().await?;
            Ok(Some(pace_from_pb(pace)))
        })
    }

    fn flush(&self, lu: u32) -> BoxFuture<'_, Result<(), ClientError>> {
        Box::pin(self.client.flush(lu))
    }

    fn checksums(
        &self,
        lu: u32,
        lba: u64,
        blocks: u64,
        chunk_blocks: u64,
    ) -> BoxFuture<'_, Result<Vec<[u8; 32]>, ClientError>> {
        Box::pin(self.client.checksums(lu, lba, blocks, chunk_blocks))
    }

    fn identity(&self) -> Option<&str> {
        self.identity.as_deref()
    }

    fn set_own_access(
        &self,
        lu: u32,
        access: OwnAccess,
        purpose: &str,
    ) -> BoxFuture<'_, Result<(), ClientError>> {
        let purpose = purpose.to_string();
        Box::pin(async move {
            let Some(identity) = self.identity.as_deref() else {
                // Masking is off on an insecure cluster: there is nothing to
                // set, and an insecure array would refuse to be asked.
                return Ok(());
            };
            let access = match access {
                OwnAccess::Read => Some(pb::Access::Read),
                OwnAccess::Configured => None,
            };
            // The readers first: once db-server's own grant says "held",
            // they can read; once it says "configured", they no longer
            // matter, and a failure here fails the whole step, which the
            // manager retries or undoes as it does for its own grant.
            for reader in self.snapshot_readers.iter().filter(|r| *r != identity) {
                self.client.set_access(reader, lu, access, &purpose).await?;
            }
            self.client
                .set_access(identity, lu, access, &purpose)
                .await?;
            Ok(())
        })
    }

    fn set_access(
        &self,
        identity: &str,
        lu: u32,
        access: Option<Access>,
        purpose: &str,
    ) -> BoxFuture<'_, Result<(), ClientError>> {
        let (identity, purpose) = (identity.to_string(), purpose.to_string());
        Box::pin(async move {
            if self.identity.is_none() {
                // Nothing is masked on an insecure cluster.
                return Ok(());
            }
            let access = access.map(|access| match access {
                Access::Read => pb::Access::Read,
                Access::ReadWrite => pb::Access::ReadWrite,
            });
            self.client
                .set_access(&identity, lu, access, &purpose)
                .await?;
            Ok(())
        })
    }

    fn mode_select(
        &self,
        pair: &PairInfo,
        mode: ArrayMirrorMode,
        purpose: &str,
    ) -> BoxFuture<'_, Result<(), ClientError>> {
        let (pair, purpose) = (*pair, purpose.to_string());
        Box::pin(async move {
            let (mode, mate_writable) = mode.to_pb();
            self.client
                .mode_select_mate(
                    pair.mirror_lu,
                    Some(pair.mate_lu),
                    mode,
                    mate_writable,
                    &purpose,
                )
                .await?;
            Ok(())
        })
    }

    fn traffic(&self) -> Traffic {
        Traffic {
            bytes_sent: self.counters.bytes_sent.load(Ordering::Relaxed),
            bytes_received: self.counters.bytes_received.load(Ordering::Relaxed),
            write_calls: self.counters.write_calls.load(Ordering::Relaxed),
            copy_calls: self.counters.copy_calls.load(Ordering::Relaxed),
        }
    }
}

#[cfg(any(test, feature = "testing"))]
mod memory;
#[cfg(any(test, feature = "testing"))]
pub use memory::{CopyCall, GrantCall, MemoryArray, OtherGrantCall};
