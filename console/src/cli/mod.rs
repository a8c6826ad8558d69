//! The console's commands, below the clap definitions and the dispatch of
//! `main.rs`: what each command does and how it prints. Errors are
//! `anyhow` here, the top of the binary; the library modules below answer
//! typed errors.

pub mod certs;
pub mod manual;
pub mod output;
pub mod restore;
pub mod schedule;
