//! backup-server: the backup program (1526) and its communication program
//! (1525). It reads the frozen mate LU straight from the array ([0065]) and
//! writes a backup that can be proven equal to the snapshot; db-server, the
//! snapshot's owner, confirms that the snapshot holds the mate before the
//! first read and after the last one. It also writes a backup back onto
//! the array (a restore, issue #17).
//!
//! - [`manifest`]: a backup's index: chunk digests, the image digest, the
//!   snapshot the image was copied from (or that it was copied live), and
//!   what the copy read and stored.
//! - [`blobs`]: the objects a store is made of, in a directory; [`s3`]: in
//!   an S3 bucket.
//! - [`store`]: the chunk store — chunks by digest, indexes, verify,
//!   export; [`gc`]: garbage collection beside running backups;
//!   [`prune`]: retention; [`legacy`]: converting raw-image backups of
//!   earlier versions.
//! - [`source`]: the array as a source of blocks (trait + an adapter over
//!   the shared typed `ArrayClient`).
//! - [`owner`]: db-server as the snapshot's owner (trait + an adapter over
//!   the shared typed `DbClient`).
//! - [`job`]: one copy — the array's digests first, then only the chunks
//!   the store lacks, streams in flight.
//! - [`backups`]: the jobs, idempotent by run id.
//! - [`restore`]: the way back — a complete backup written onto a volume's
//!   mirror LU (offline for the run, as db-server confirms) or a plain LU:
//!   checks before any byte changes, the array's digests of every side
//!   first, every chunk to write checked before the first write, only the
//!   differing chunks written, verified by the array's digests after the
//!   flush. [`crash`]: its named crash points.
//! - [`service`]: the thin gRPC adapter (`splitmirror.backup.v1`), with the
//!   one conversion from `manifest.json` to the wire `Manifest`.

pub mod backups;
pub mod blobs;
pub mod crash;
pub mod direct;
pub mod gc;
pub mod job;
pub mod legacy;
pub mod manifest;
pub mod owner;
pub mod prune;
pub mod restore;
pub mod s3;
pub mod service;
pub mod source;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use splitmirror_proto::client::ClientError;
use splitmirror_proto::node::{self, NodeHandle};
use splitmirror_proto::security::{AccessPolicy, Security};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backups::Backups;
use crate::owner::GrpcOwner;
use crate::restore::Restores;
use crate::source::GrpcSource;
use crate::store::{ChunkStore, StoreError, StoreLocation};

#[derive(Debug, Clone)]
pub struct BackupServerConfig {
    /// Its certificates (for serving, and for calling the array and
    /// db-server), or `--insecure`.
    pub security: Security,
    /// The identities that may start, cancel and verify backups
    /// ([`service::CONTROL_METHODS`]); default: the console.
    pub control_identities: Vec<String>,
    pub array_url: String,
    /// The db-server that owns the snapshots backups copy.
    pub db_url: String,
    /// The chunk store: a directory or an S3 bucket.
    pub store: StoreLocation,
    /// How long unreferenced chunks and expired writer records are kept
    /// before garbage collection removes them.
    pub gc_grace: Duration,
    /// The rate cap (bytes per second) of jobs that do not ask for one.
    pub default_max_bytes_per_s: Option<u64>,
}

/// Why a backup server could not start ([`spawn`]). None is retryable as
/// it is: the listener, the store or the configuration must be fixed.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The listener's own address could not be read: the socket is
    /// unusable.
    #[error("reading the listener's address: {0}")]
    ListenerAddress(#[source] std::io::Error),
    /// The store could not be opened or created (no permission, a full
    /// disk, S3 unreachable or refusing, raw-image backups to convert).
    #[error("opening the backup store: {0}")]
    Store(#[from] StoreError),
    /// The address of the array or of db-server cannot be parsed.
    #[error("{0}")]
    Address(#[from] ClientError),
    /// The server stack could not be built (the certificate or key is
    /// unusable for TLS).
    #[error("{0}")]
    Serve(#[source] node::NodeError),
}

/// Opens the store (creating it if new) and serves on `listener`.
pub async fn spawn(
    config: BackupServerConfig,
    listener: TcpListener,
) -> Result<NodeHandle, SpawnError> {
    let addr = listener.local_addr().map_err(SpawnError::ListenerAddress)?;
    let store = Arc::new(ChunkStore::open(&config.store, config.gc_grace).await?);
    let source = Arc::new(GrpcSource::new(&config.array_url, &config.security)?);
    let owner = Arc::new(GrpcOwner::new(&config.db_url, &config.security)?);
    let cancel = CancellationToken::new();
    let tasks = TaskTracker::new();
    let backups = Arc::new(Backups::new(
        store.clone(),
        source.clone(),
        owner.clone(),
        tasks.clone(),
        cancel.clone(),
        config.default_max_bytes_per_s,
    ));
    let restores = Arc::new(Restores::new(
        store,
        source.clone(),
        source,
        owner,
        backups.clone(),
        tasks.clone(),
        cancel.clone(),
    ));
    let service = service::server(backups, restores);
    let policy = AccessPolicy::with_control(
        service::CONTROL_METHODS,
        config.control_identities.iter().cloned(),
    );
    let router = node::server_builder(&config.security, policy)
        .map_err(SpawnError::Serve)?
        .add_service(service);
    let handle_cancel = cancel.clone();
    let task = tokio::spawn(async move {
        let served = node::serve(
            router,
            &["splitmirror.backup.v1.BackupService"],
            listener,
            cancel.clone(),
        )
        .await;
        // Running jobs (backups and restores) are cancelled (a backup's
        // partial image removed) and awaited before the node reports that
        // it has stopped.
        cancel.cancel();
        tasks.close();
        tasks.wait().await;
        served
    });
    tracing::info!(%addr, "backup-server listening on {addr}");
    Ok(NodeHandle::new(addr, handle_cancel, task))
}
