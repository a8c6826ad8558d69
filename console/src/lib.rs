//! console: the management console (1540) and its backup instruction
//! program (1542). It holds no state of its own.
//!
//! - [`clients`]: connections to the three nodes and the retry rule.
//! - [`run`]: one backup run, its failure policy and its report.
//! - [`progress`]: bars on a terminal, plain lines elsewhere.
//! - [`status`]: `console status` and `console pair verify`.
//! - [`demo`]: the embedded demo (three nodes in-process on loopback).

pub mod bench;
pub mod clients;
pub mod demo;
pub mod progress;
pub mod run;
pub mod status;
