//! splitmirror's cross-node tests: one test binary, a module per scenario,
//! each starting real nodes on `127.0.0.1:0` through the same entry points
//! the binaries use.
//!
//! - [`harness`]: starting nodes, clients, seeds, reading LUs back.
//! - `array_*`, `grpcurl`: the disk array (mirror I/O, bad input, the
//!   copy/write race, LUN masking over mTLS, grpcurl as an operator uses
//!   it); `array_modes`: the mode the array holds (#19), every cell of
//!   mode × target × operation, whoever sends it, and across kill -9.
//! - `db_*`: the snapshot manager (model test, resync race, the ledger,
//!   codes, limits and answers).
//! - `cow`: copy-on-write snapshots (#20) under the full-speed ledger:
//!   the image, the delete, a full save area, kill -9 while one is held.
//! - `crash`: kill -9 at named crash points, array loss, lost journal.
//! - `stateful`: db-server `--array-mode stateful` (#19) killed between
//!   its journal and the array's ModeSelect; the journal and the array
//!   agree after the restart, nothing lost; the array protects the mate
//!   when db-server is bypassed.
//! - `journal_damage`: a corrupted or truncated journal, a full journal
//!   filesystem.
//! - `first_start`: a new pair is INFO, a lost journal WARN.
//! - `restore`: restore from a backup and to a held snapshot (reverse
//!   resync), every refusal, kill -9 at the restore's crash points.
//! - `pace`: the array's adaptive pace of background copies yields to the
//!   foreground and takes back full speed (and a blind pace is caught).
//! - `resync_wait`: the console waits out a resync by db-server's reason
//!   trailer.
//! - `backup`: images, manifests, verification, node crashes.
//! - `console_cli`: the console binary end to end, the demo, the CLI.
//! - `compose`: the container scenario (when Docker is there).
//! - `bench_smoke`: every benchmark scenario once, tiny.
//! - `tracing_otlp`: one `console run` is one trace across the four
//!   programs (an in-process OTLP collector); nothing exported without an
//!   endpoint.
//! - [`soak`]: the nemesis (the `soak` binary) and its in-process model.

pub mod harness;
pub mod soak;

#[cfg(test)]
mod array_access;
#[cfg(test)]
mod array_direct;
#[cfg(test)]
mod array_io;
#[cfg(test)]
mod array_modes;
#[cfg(test)]
mod array_race;
#[cfg(test)]
mod backup;
#[cfg(test)]
mod backup_direct;
#[cfg(test)]
mod bench_smoke;
#[cfg(test)]
mod compose;
#[cfg(test)]
mod console_cli;
#[cfg(test)]
mod cow;
#[cfg(test)]
mod crash;
#[cfg(test)]
mod db_control;
#[cfg(test)]
mod db_ledger;
#[cfg(test)]
mod db_limits;
#[cfg(test)]
mod db_model;
#[cfg(test)]
mod db_race;
#[cfg(test)]
mod first_start;
#[cfg(test)]
mod generations;
#[cfg(test)]
mod grpcurl;
#[cfg(test)]
mod journal_damage;
#[cfg(test)]
mod ledger_crash;
#[cfg(test)]
mod mates;
#[cfg(test)]
mod pace;
#[cfg(test)]
mod restore;
#[cfg(test)]
mod resync_wait;
#[cfg(test)]
mod s3_blobs;
#[cfg(test)]
mod s3_server;
#[cfg(test)]
mod stateful;
#[cfg(test)]
mod store_gc;
#[cfg(test)]
mod tracing_otlp;
