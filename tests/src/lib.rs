//! splitmirror's cross-node tests: one test binary, a module per scenario,
//! each starting real nodes on `127.0.0.1:0` through the same entry points
//! the binaries use.
//!
//! - [`harness`]: starting nodes, clients, seeds, reading LUs back.
//! - `array_*`: the disk array (mirror I/O, bad input, the copy/write race,
//!   grpcurl against the real binary-less server).

pub mod harness;

#[cfg(test)]
mod array_io;
#[cfg(test)]
mod array_race;
#[cfg(test)]
mod backup;
#[cfg(test)]
mod compose;
#[cfg(test)]
mod console_cli;
#[cfg(test)]
mod crash;
#[cfg(test)]
mod db_ledger;
#[cfg(test)]
mod db_model;
#[cfg(test)]
mod db_race;
#[cfg(test)]
mod grpcurl;
