//! How the console prints its answers: to stdout, never a panic on a
//! closed stdout, and the exit code that says whether a command succeeded.

use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use splitmirror_console::run::RunReport;

/// Set once a write to stdout found the reader gone; loops that only
/// print (`status --watch`, `schedule`) stop then.
static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);

/// Whether a reader of stdout went away.
pub fn stdout_closed() -> bool {
    STDOUT_CLOSED.load(Ordering::Relaxed)
}

/// Writes `text` to stdout. A reader that went away (`console backup list |
/// head -1`) ends the output quietly instead of a panic.
pub fn print(text: &str) -> anyhow::Result<()> {
    if stdout_closed() {
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            STDOUT_CLOSED.store(true, Ordering::Relaxed);
            Ok(())
        }
        other => other.context("writing to stdout"),
    }
}

/// [`print`] and a newline.
pub fn println(text: &str) -> anyhow::Result<()> {
    print(&format!("{text}\n"))
}

/// Prints `value` as one line of JSON.
pub fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println(&serde_json::to_string(value).context("encoding JSON")?)
}

/// Prints a run's report: one JSON line, or the human-readable form under
/// a heading that says whether the run succeeded.
pub fn print_report(report: &RunReport, heading: &str, json: bool) -> anyhow::Result<()> {
    if json {
        print_json(report)
    } else {
        let outcome = if report.succeeded() {
            "succeeded"
        } else {
            "FAILED"
        };
        println(&format!("{heading} {outcome}"))?;
        print(&report.render())
    }
}

/// Success or failure, as an exit code.
pub fn exit(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
