//! array-node: the mirroring disk array of splitmirror (stateless unless
//! its pairs' owner hands it their modes).
//!
//! - [`config`]: the real LUs and the mirroring definition table (Fig. 9).
//! - [`storage`]: where an LU's blocks live (sparse raw files; memory in tests).
//! - [`array`]: the core — mirror writes to origin and mate, reads from the
//!   less busy side (both as the pair's mode routes them), range-locked
//!   `CopyRange`, `ChecksumRange`, `Flush`.
//! - [`access`]: LUN masking, deny by default — who may read or write which
//!   LU, configured and set by the pairs' owner, kept in `access.json`.
//! - [`modes`]: the mirroring management table (Fig. 2) — each mirror LU's
//!   mode (HostManaged until the owner's `ModeSelect`, Synchronized,
//!   Snapshot, Resynchronizing), kept in `modes.json`, its rules enforced
//!   on every request under a per-pair gate that `ModeSelect` waits on.
//! - [`state_file`]: how `access.json` and `modes.json` are written (atomic,
//!   durable, checksummed) and why a damaged one stops the start.
//! - [`validate`]: every request checked in one place per kind (size cap,
//!   whole blocks, range, access, the pair's mode) before any side effect.
//! - [`service`]: the thin gRPC adapter (`splitmirror.array.v1`).
//!
//! [`spawn`] starts a node on a listener; the binary and the tests both use it.

pub mod access;
pub mod array;
pub mod config;
pub mod error;
pub mod modes;
pub mod service;
pub mod state_file;
pub mod storage;
#[cfg(test)]
mod test_ops;
pub mod validate;

use std::path::PathBuf;
use std::sync::Arc;

use splitmirror_proto::array::v1::array_service_server::ArrayServiceServer;
use splitmirror_proto::node::{self, NodeHandle};
use splitmirror_proto::pace::{PaceConfig, PaceController};
use splitmirror_proto::security::{AccessPolicy, Security};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use access::{Access, AccessTable};
pub use array::{Array, ArrayTestHooks};
pub use config::{ArrayConfig, ConfigError};
pub use error::SpawnError;
pub use modes::{MirrorMode, ModeTable};

/// Everything an array node needs to start.
#[derive(Debug, Clone)]
pub struct ArrayNodeConfig {
    pub data_dir: PathBuf,
    pub array: ArrayConfig,
    pub hooks: ArrayTestHooks,
    /// Its certificates, or `--insecure`.
    pub security: Security,
}

/// Opens the LUs and serves them on `listener` until `cancel` is cancelled,
/// with the default adaptive pace of background copies.
pub async fn spawn(
    config: ArrayNodeConfig,
    listener: TcpListener,
) -> Result<NodeHandle, SpawnError> {
    let pace = PaceController::new(PaceConfig::default(), tokio::time::Instant::now());
    spawn_with_pace(config, pace, listener).await
}

/// [`spawn`] with `pace` pacing background copies (array-node's
/// `--background-min-rate` and `--background-max-rate`; tests pass a broken
/// one to show they catch it).
pub async fn spawn_with_pace(
    config: ArrayNodeConfig,
    pace: PaceController,
    listener: TcpListener,
) -> Result<NodeHandle, SpawnError> {
    let addr = listener.local_addr().map_err(SpawnError::ListenerAddress)?;
    // The masking first: a damaged file of set grants stops the start
    // before any LU file is touched.
    let access = AccessTable::open(&config.array, &config.data_dir).map_err(SpawnError::Access)?;
    // The modes too: a damaged table must not let a split mate be written.
    let modes = ModeTable::open(&config.array, &config.data_dir).map_err(SpawnError::Modes)?;
    let array = Arc::new(
        Array::open(&config.array, &config.data_dir, config.hooks, access, modes)
            .map_err(SpawnError::OpenLus)?
            .with_pace(pace),
    );
    let service = ArrayServiceServer::new(service::ArrayGrpc::new(array))
        .max_decoding_message_size(service::MAX_DECODING_BYTES)
        .max_encoding_message_size(node::MAX_MESSAGE_BYTES);
    let router = node::server_builder(&config.security, AccessPolicy::any_identified())
        .map_err(SpawnError::Serve)?
        .add_service(service);
    let cancel = CancellationToken::new();
    let task = tokio::spawn(node::serve(
        router,
        &["splitmirror.array.v1.ArrayService"],
        listener,
        cancel.clone(),
    ));
    tracing::info!(%addr, "array-node listening on {addr}");
    Ok(NodeHandle::new(addr, cancel, task))
}
