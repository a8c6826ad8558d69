//! The console binary against real nodes: a backup run end to end, the
//! failure policy, the demo, and the CLI's help and parsing.

use std::process::{Command, Output};

use array_node::ArrayTestHooks;
use db_server::ledger::LedgerConfig;
use db_server::manager::ManagerConfig;
use splitmirror_proto::db::v1 as pb;

use crate::harness::{self, db_client, start_array, start_backup, start_db};

fn console(args: &[&str]) -> Output {
    Command::new(harness::binary("console"))
        .args(args)
        .env_remove("SPLITMIRROR_DB")
        .env_remove("SPLITMIRROR_BACKUP")
        .env_remove("SPLITMIRROR_ARRAY")
        .output()
        .expect("run console")
}

/// Runs the console off the async threads (the nodes it talks to run on
/// them), with `addresses` followed by `args`.
async fn console_with(addresses: &[String], args: &[&str]) -> Output {
    let mut all: Vec<String> = addresses.to_vec();
    all.extend(args.iter().map(|a| a.to_string()));
    tokio::task::spawn_blocking(move || {
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        console(&all)
    })
    .await
    .expect("console task")
}

/// The console's flags naming the three nodes.
fn address_args(array: &str, db: &str, backup: &str) -> Vec<String> {
    ["--array", array, "--db", db, "--backup", backup]
        .map(str::to_string)
        .to_vec()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn ledger() -> LedgerConfig {
    LedgerConfig {
        accounts: 200,
        workers: 4,
        target_tps: 0,
        log_blocks: 256,
        ..LedgerConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_run_backs_up_verifies_and_resynchronizes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let array = start_array(
        &dir.path().join("array"),
        harness::small_array(16 << 20),
        ArrayTestHooks::default(),
    )
    .await;
    let db = start_db(
        &array.url(),
        &dir.path().join("db"),
        ManagerConfig::default(),
        Some(ledger()),
    )
    .await;
    let store = dir.path().join("store");
    let backup = start_backup(&array.url(), &db.url(), &store).await;
    let addrs = address_args(
        &array.addr.to_string(),
        &db.addr.to_string(),
        &backup.addr.to_string(),
    );
    let out = console_with(&addrs, &["run", "--volume", "0", "--json"]).await;
    assert!(
        out.status.success(),
        "stdout {} stderr {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(report["verified"], true, "{report}");
    assert_eq!(report["snapshot_deleted"], true);
    assert!(report["freeze_window_us"].as_u64().is_some());
    let backup_id = report["backup_id"].as_str().expect("backup id").to_string();
    let sequence = report["ledger_sequence"].as_u64().expect("sequence");

    // The image is a consistent ledger at the reported sequence, checked by
    // the real `db-server verify-image`.
    let image = store.join(&backup_id).join("image.raw");
    let verify = Command::new(harness::binary("db-server"))
        .args(["verify-image", "--expect-sequence", &sequence.to_string()])
        .arg(&image)
        .output()
        .expect("verify-image");
    assert!(verify.status.success(), "{}", text(&verify.stdout));

    // Synchronized afterwards, and origin == mate (compared with the
    // database suspended, as the ledger keeps writing).
    let mut client = db_client(&db.url()).await;
    let status = harness::volume_status(&mut client, 0).await;
    assert_eq!(status.data_mode(), pb::Mode::Synchronized);
    let out = console_with(
        &addrs,
        &["pair", "verify", "--volume", "0", "--quiesce", "--json"],
    )
    .await;
    assert!(
        out.status.success(),
        "{} {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let pair: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(pair["differing_chunks"], serde_json::json!([]));

    // status and backup list answer.
    let out = console_with(&addrs, &["status", "--json"]).await;
    assert!(out.status.success());
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(status["volumes"][0]["data_mode"], "Synchronized");
    assert_eq!(status["backups"][0]["backup_id"], backup_id.as_str());
    db.shutdown().await.expect("db");
    backup.shutdown().await.expect("backup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_backup_still_deletes_the_snapshot_unless_told_to_keep_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let array = start_array(
        &dir.path().join("array"),
        harness::small_array(8 << 20),
        ArrayTestHooks::default(),
    )
    .await;
    let db = start_db(
        &array.url(),
        &dir.path().join("db"),
        ManagerConfig::default(),
        Some(ledger()),
    )
    .await;
    // A backup server that is not there: a port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead_backup = closed.local_addr().expect("addr").to_string();
    drop(closed);
    let mut base = address_args(&array.addr.to_string(), &db.addr.to_string(), &dead_backup);
    base.extend(["--step-deadline".into(), "1s".into()]);
    let out = console_with(&base, &["run", "--volume", "0", "--json"]).await;
    assert!(
        !out.status.success(),
        "a run without a backup server must fail"
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert!(
        report["error"]
            .as_str()
            .expect("a reason")
            .contains("backup"),
        "{report}"
    );
    assert_eq!(report["snapshot_deleted"], true);
    let mut client = db_client(&db.url()).await;
    harness::wait_synchronized(&mut client, 0).await;

    let out = console_with(
        &base,
        &["run", "--volume", "0", "--json", "--keep-snapshot"],
    )
    .await;
    assert!(!out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(report["snapshot_deleted"], false);
    let status = harness::volume_status(&mut client, 0).await;
    assert_eq!(
        status.data_mode(),
        pb::Mode::Snapshot,
        "--keep-snapshot leaves it acquired"
    );
    assert_eq!(
        status.snapshot_holder,
        report["run_id"].as_str().expect("run id")
    );
    db.shutdown().await.expect("db");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_demo_runs_two_verified_cycles() {
    let out =
        tokio::task::spawn_blocking(|| console(&["demo", "--cycles", "2", "--lu-size", "16MiB"]))
            .await
            .expect("console");
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert_eq!(
        stdout.matches("verified           yes").count(),
        2,
        "{stdout}"
    );
    assert!(stdout.contains("2 of 2 runs verified"), "{stdout}");
    assert!(stdout.contains("origin == mate"), "{stdout}");
}

#[test]
fn help_explains_every_command_with_an_example() {
    let out = console(&["--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    for command in ["demo", "run", "status", "snapshot", "db", "backup", "pair"] {
        assert!(
            help.contains(&format!("  {command}")),
            "{command} missing from --help:\n{help}"
        );
    }
    assert!(help.contains("SPLITMIRROR_DB"));
    for command in [
        &["run", "--help"][..],
        &["demo", "--help"],
        &["status", "--help"],
        &["snapshot", "acquire", "--help"],
        &["db", "suspend", "--help"],
        &["pair", "verify", "--help"],
        &["backup", "verify", "--help"],
    ] {
        let out = console(command);
        assert!(out.status.success());
        assert!(
            text(&out.stdout).contains("Example:"),
            "{command:?} --help has no example"
        );
    }
}

#[test]
fn bad_arguments_are_rejected_with_a_reason() {
    let out = console(&["run", "--volume", "zero"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("invalid value"));
    let out = console(&["db", "suspend", "--lease", "soon"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("duration"));
    let out = console(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
}
