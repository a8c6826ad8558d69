//! console: the management console (1540) and its backup instruction
//! program (1542). It holds no state of its own.
//!
//! - [`clients`]: the typed clients of the three nodes.
//! - [`run`]: one backup run, its failure policy and its report.
//! - [`progress`]: bars on a terminal, plain lines elsewhere.
//! - [`restore`]: a restore from a backup (onto a volume or a plain LU),
//!   its abandon, and the reverse resync to a held snapshot; their reports.
//! - [`status`]: `console status` and `console pair verify`.
//! - [`mates`]: which of a volume's mates (up to three, [0020]); picks a
//!   volume's Status entry by (volume, mate).
//!
//! With the `embedded` feature (on by default), the parts that run the
//! nodes in-process, and so depend on the node crates:
//!
//! - [`cluster`]: the one builder that starts array-node, db-server and
//!   backup-server on loopback (the demo, the benchmarks and the tests).
//! - [`demo`]: the embedded demo.
//! - [`bench`]: the benchmarks.
//!
//! Errors: the modules other code builds on ([`run`], [`restore`], [`status`],
//! [`cluster`]) answer typed errors, so that a caller decides on a variant
//! or a [`ClientError`](splitmirror_proto::client::ClientError) kind;
//! [`demo`] and [`bench`] are commands that only report to a person, and
//! answer `anyhow::Error` as the binary does.

#[cfg(feature = "embedded")]
pub mod bench;
pub mod certs;
pub mod clients;
#[cfg(feature = "embedded")]
pub mod cluster;
#[cfg(feature = "embedded")]
pub mod demo;
pub mod mates;
pub mod progress;
pub mod restore;
pub mod run;
pub mod status;
