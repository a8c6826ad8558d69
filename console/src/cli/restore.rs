//! `console restore`, `console restore abandon` and `console snapshot
//! restore`: the glue between clap and [`splitmirror_console::restore`],
//! and how their answers print.

use std::process::ExitCode;

use splitmirror_console::clients::Clients;
use splitmirror_console::progress;
use splitmirror_console::restore::{self, RestoreError, RestoreReport, RestoreRequest};

use super::output::{exit, print, print_json, println};

/// `console restore`: runs the restore and prints its report (or, when it
/// stopped, the report so far, the error and how to continue). Exits 0
/// only for a completed, verified restore.
pub async fn restore(
    clients: &Clients,
    request: &RestoreRequest,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let sink = progress::for_stderr();
    match restore::restore(clients, request, sink.as_ref()).await {
        Ok(report) => {
            print_restore_report(&report, json)?;
            Ok(exit(report.succeeded()))
        }
        Err(error) => match error.report() {
            Some(report) => {
                print_restore_report(report, json)?;
                Ok(ExitCode::FAILURE)
            }
            // Refused before anything was touched: the error alone says it.
            None => {
                if json {
                    print_json(&refusal_json(request, &error))?;
                    Ok(ExitCode::FAILURE)
                } else {
                    Err(anyhow::anyhow!("{error}"))
                }
            }
        },
    }
}

/// A report: one JSON line, or the text under a heading that says how the
/// restore ended.
fn print_restore_report(report: &RestoreReport, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(report);
    }
    let outcome = if report.succeeded() {
        "succeeded"
    } else {
        "FAILED"
    };
    println(&format!(
        "restore of backup {} onto {} {outcome}",
        report.backup_id, report.target
    ))?;
    print(&report.render())
}

/// A refusal made before any change, as the JSON a script reads.
fn refusal_json(request: &RestoreRequest, error: &RestoreError) -> serde_json::Value {
    serde_json::json!({
        "backup_id": request.backup_id,
        "target": request.target.to_string(),
        "run_id": request.run_id,
        "changed": false,
        "error": error.to_string(),
    })
}

/// `console restore abandon`.
pub async fn abandon(
    clients: &Clients,
    volume: u32,
    run_id: &str,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let report = restore::abandon(clients, volume, run_id).await?;
    if json {
        print_json(&report)?;
    } else {
        print(&report.render())?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `console snapshot restore`: the reverse resync.
pub async fn snapshot_restore(
    clients: &Clients,
    volume: u32,
    mate: u32,
    run_id: &str,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let sink = progress::for_stderr();
    let report = restore::restore_snapshot_of(clients, volume, mate, run_id, sink.as_ref()).await?;
    if json {
        print_json(&report)?;
    } else {
        println(&format!(
            "volume {volume} restored to the snapshot{} of run {run_id}",
            splitmirror_console::mates::of_mate(mate)
        ))?;
        print(&report.render())?;
    }
    // The copy is done either way; a ledger that did not reopen is a failure
    // the operator must see in the exit code.
    Ok(exit(report.ledger_error.is_none()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_in_json_says_nothing_changed() {
        let request = RestoreRequest::volume(0, "b1");
        let error = RestoreError::LedgerNotReachable {
            reason: "volume 0 holds the ledger and it is not running".into(),
        };
        let json = refusal_json(&request, &error);
        assert_eq!(json["changed"], false);
        assert_eq!(json["target"], "volume 0");
        assert!(
            json["error"]
                .as_str()
                .is_some_and(|e| e.contains("--force"))
        );
    }
}
