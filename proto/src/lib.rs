//! splitmirror's wire protocol and the gRPC stack every node shares.
//!
//! - [`array`], [`db`], [`backup`]: the messages and services generated from
//!   `proto/*.proto` (compiled by protox at build time, no system `protoc`).
//! - [`client`]: one typed client per service, the one error type and the
//!   one retry rule every caller uses.
//! - [`node`]: how every node serves (health, reflection, HTTP/2 windows,
//!   limits, graceful shutdown) and how every client connects, assembled once
//!   so that a call gets the same treatment whichever node it reaches.
//! - [`range_lock`]: ordering of overlapping block ranges, used by the array
//!   and the snapshot manager.
//! - [`telemetry`]: logs, traces and metrics set up once for every
//!   program; W3C trace context on every call between nodes.
//! - [`security`]: mutual TLS, node identities and who may call what.
//! - [`pace`]: pacing bulk work (backups, resyncs) to a byte rate.
//! - [`units`]: parsing of human sizes and durations for the command lines.
//! - [`run_id`]: what a run id may be, checked alike by every node.
//! - [`reason`]: why db-server refused a call, as metadata a program can
//!   act on (never the message's text).

pub mod client;
pub mod crash;
pub mod node;
pub mod pace;
pub mod range_lock;
pub mod reason;
pub mod run_id;
pub mod security;
pub mod telemetry;
pub mod units;

/// `splitmirror.array.v1`: the disk array.
pub mod array {
    pub mod v1 {
        tonic::include_proto!("splitmirror.array.v1");
    }
}

/// `splitmirror.db.v1`: the snapshot manager and ledger database.
pub mod db {
    pub mod v1 {
        tonic::include_proto!("splitmirror.db.v1");
    }
}

/// `splitmirror.backup.v1`: the backup server.
pub mod backup {
    pub mod v1 {
        tonic::include_proto!("splitmirror.backup.v1");
    }
}

/// The chunk size of backup images: each manifest digest covers one chunk
/// of this many bytes (the last may be shorter). In the shared crate so that
/// the backup server hashes and the console checksums the frozen mate with
/// the same size.
pub const BACKUP_CHUNK_SIZE_BYTES: u64 = 1 << 20;

/// The encoded `FileDescriptorSet` of every splitmirror service, served by
/// gRPC reflection so that grpcurl needs no `.proto` files.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/splitmirror_descriptor.bin"));
