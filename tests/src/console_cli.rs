//! The console binary against real nodes: a backup run end to end, the
//! failure policy, the demo, and the CLI's help and parsing.

use std::process::{ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use array_node::ArrayTestHooks;
use db_server::ledger::LedgerConfig;
use db_server::manager::ManagerConfig;
use splitmirror_proto::db::v1 as pb;

use crate::harness::{self, db_client, start_array, start_backup, start_db};

fn console(args: &[&str]) -> Output {
    harness::command("console")
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
    let image = dir.path().join("export.raw");
    let exported = harness::command("backup-server")
        .args(["export", "--store"])
        .arg(&store)
        .arg(&backup_id)
        .arg(&image)
        .output()
        .expect("backup-server export");
    assert!(
        exported.status.success(),
        "{}",
        String::from_utf8_lossy(&exported.stderr)
    );
    let verify = harness::command("db-server")
        .args(["verify-image", "--expect-sequence", &sequence.to_string()])
        .arg(&image)
        .output()
        .expect("verify-image");
    assert!(verify.status.success(), "{}", text(&verify.stdout));

    // Synchronized afterwards, and origin == mate (compared with the
    // database suspended, as the ledger keeps writing).
    let client = db_client(&db.url());
    let status = harness::volume_status(&client, 0).await;
    assert_eq!(status.data_mode(), pb::Mode::Synchronized);
    let out = console_with(
        &addrs,
        // The console's own certificate may read no LU of the array (LUN
        // masking): the comparison reads origin and mate as db-server.
        &[
            "--array-identity",
            "db-server",
            "pair",
            "verify",
            "--volume",
            "0",
            "--quiesce",
            "--json",
        ],
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

    // A second run is a generation: its report says what it read, reused
    // and skipped, and every chunk of the 16 MiB volume is one of those
    // (the ledger rewrites the few chunks it uses, so both runs read them).
    let out = console_with(&addrs, &["run", "--volume", "0", "--json"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let second: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(second["verified"], true, "{second}");
    let count = |field: &str| {
        second[field]
            .as_u64()
            .unwrap_or_else(|| panic!("{field} in {second}"))
    };
    assert_eq!(
        count("chunks_read") + count("chunks_reused") + count("chunks_zero"),
        16,
        "{second}"
    );
    assert!(
        count("new_bytes_stored") > 0 && count("chunks_zero") > 0,
        "{second}"
    );

    // backup list shows both generations of volume 0 and the store.
    let out = console_with(&addrs, &["backup", "list", "--json"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(
        listed["volumes"][0]["generations"].as_array().map(Vec::len),
        Some(2),
        "{listed}"
    );
    assert!(
        listed["store"]["stored_bytes"].as_u64() > Some(0),
        "{listed}"
    );

    // prune: without a rule it refuses; a dry run keeping one removes
    // nothing and says the older one would go; the real prune removes it.
    let out = console_with(&addrs, &["backup", "prune", "--volume", "0"]).await;
    assert!(!out.status.success(), "a prune without a rule must refuse");
    let out = console_with(
        &addrs,
        &[
            "backup",
            "prune",
            "--volume",
            "0",
            "--keep-last",
            "1",
            "--dry-run",
            "--json",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let dry: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(
        (dry["removed"].as_u64(), dry["dry_run"].as_bool()),
        (Some(1), Some(true)),
        "{dry}"
    );
    let out = console_with(
        &addrs,
        &["backup", "prune", "--volume", "0", "--keep-last", "1"],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = console_with(&addrs, &["backup", "list", "--json"]).await;
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(
        listed["volumes"][0]["generations"].as_array().map(Vec::len),
        Some(1),
        "{listed}"
    );
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
    let client = db_client(&db.url());
    harness::wait_synchronized(&client, 0).await;

    let out = console_with(
        &base,
        &["run", "--volume", "0", "--json", "--keep-snapshot"],
    )
    .await;
    assert!(!out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(report["snapshot_deleted"], false);
    let status = harness::volume_status(&client, 0).await;
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
    // Two split runs, the copy-on-write run (#20), then the run on the
    // cluster whose array keeps the modes (#19) and its three-mate runs of
    // mate 1 and mate 2 ([0020]).
    assert_eq!(
        stdout.matches("verified           yes").count(),
        6,
        "{stdout}"
    );
    assert!(
        stdout.contains("with three mates, mate 1 and mate 2 backed up and resynced one at a time, origin == every mate at the end"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "the stateful run: verified; the array's mode SYNCHRONIZED → SNAPSHOT → SYNCHRONIZED; it refused a write to the mate alone itself (reason mirror-mode)"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("2 of 2 split runs verified"), "{stdout}");
    assert!(
        stdout.contains("the copy-on-write run: verified"),
        "{stdout}"
    );
    assert!(
        stdout.contains("resync after its delete: 0 blocks"),
        "{stdout}"
    );
    assert!(stdout.contains("origin == mate"), "{stdout}");
}

/// A writable snapshot on a db-server whose array keeps the modes (#19):
/// `snapshot acquire --writable` takes it, `status` shows who keeps the
/// mode, the array's mode and "writable", the backup server refuses to
/// back it up before reading anything, and `--writable` with copy-on-write
/// is refused by the console before any call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writable_snapshot_is_shown_by_status_and_refused_by_the_backup_server() {
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
        ManagerConfig {
            array_mode: db_server::manager::ArrayModeKeeping::Stateful,
            ..ManagerConfig::default()
        },
        Some(ledger()),
    )
    .await;
    let backup = start_backup(&array.url(), &db.url(), &dir.path().join("store")).await;
    let addrs = address_args(
        &array.addr.to_string(),
        &db.addr.to_string(),
        &backup.addr.to_string(),
    );
    let status_json = |out: Output| -> serde_json::Value {
        assert!(out.status.success(), "{}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("status JSON")
    };
    let status = status_json(console_with(&addrs, &["status", "--json"]).await);
    let volume = &status["volumes"][0];
    assert_eq!(volume["array_mode_keeping"], "stateful", "{volume}");
    assert_eq!(volume["array_mode"], "SYNCHRONIZED", "{volume}");
    assert_eq!(volume["snapshot_writable"], false, "{volume}");
    let mate_lu = volume["mate_lu"].as_u64().expect("mate LU").to_string();

    // Copy-on-write cannot be writable: refused here, before any call
    // (db-server holds no snapshot after it).
    let out = console_with(
        &addrs,
        &[
            "snapshot",
            "acquire",
            "--volume",
            "0",
            "--writable",
            "--snapshot-method",
            "cow",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("--writable needs a split snapshot"),
        "{}",
        text(&out.stderr)
    );
    let client = db_client(&db.url());
    assert!(
        harness::volume_status(&client, 0)
            .await
            .snapshot_holder
            .is_empty()
    );

    let out = console_with(
        &addrs,
        &[
            "snapshot",
            "acquire",
            "--volume",
            "0",
            "--run-id",
            "run-w",
            "--writable",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("writable while held"),
        "{}",
        text(&out.stdout)
    );
    let status = status_json(console_with(&addrs, &["status", "--json"]).await);
    let volume = &status["volumes"][0];
    assert_eq!(volume["snapshot_writable"], true, "{volume}");
    assert_eq!(volume["array_mode"], "SNAPSHOT (mate writable)", "{volume}");
    let out = console_with(&addrs, &["status"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(shown.contains("SNAPSHOT (mate writable)"), "{shown}");
    assert!(shown.contains("snapshot: split, WRITABLE"), "{shown}");

    // The backup server asks db-server before the first read and refuses.
    let out = console_with(
        &addrs,
        &[
            "backup", "start", "--lu", &mate_lu, "--volume", "0", "--run-id", "run-w",
        ],
    )
    .await;
    assert!(!out.status.success(), "{}", text(&out.stdout));
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        said.contains(&format!(
            "held by run \"run-w\" is writable: its mate (LU {mate_lu}) is not a frozen image"
        )),
        "{said}"
    );
    let listed = status_json(console_with(&addrs, &["backup", "list", "--json"]).await);
    assert_eq!(
        listed["volumes"].as_array().map(Vec::len).unwrap_or(0),
        0,
        "no backup was made: {listed}"
    );

    let out = console_with(
        &addrs,
        &["snapshot", "delete", "--volume", "0", "--run-id", "run-w"],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    harness::wait_synchronized(&client, 0).await;
    let status = status_json(console_with(&addrs, &["status", "--json"]).await);
    let volume = &status["volumes"][0];
    assert_eq!(volume["array_mode"], "SYNCHRONIZED", "{volume}");
    assert_eq!(volume["snapshot_writable"], false, "{volume}");
    db.shutdown().await.expect("db");
    backup.shutdown().await.expect("backup");
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
    // What a writable snapshot is, where an operator asks for one.
    let help = text(&console(&["snapshot", "acquire", "--help"]).stdout);
    for said in [
        "--writable",
        "undone by the resync",
        "backup server refuses to back it up",
        "refused with --snapshot-method cow",
    ] {
        assert!(help.contains(said), "{said:?} missing:\n{help}");
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

#[test]
fn a_mate_is_counted_from_one_to_three_and_its_help_says_so() {
    let commands: [&[&str]; 6] = [
        &["run"],
        &["snapshot", "acquire"],
        &["snapshot", "delete", "--run-id", "r"],
        &["snapshot", "restore", "--run-id", "r"],
        &[
            "backup", "start", "--lu", "2", "--volume", "0", "--run-id", "r",
        ],
        &["pair", "verify"],
    ];
    for command in commands {
        for refused in ["0", "4"] {
            let mut args = command.to_vec();
            args.extend(["--mate", refused]);
            let out = console(&args);
            let stderr = text(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
            assert!(
                stderr.contains(
                    "mates are counted from 1 and a volume has at most 3: give 1, 2 or 3"
                ),
                "{args:?}: {stderr}"
            );
        }
        let mut args = command.to_vec();
        args.push("--help");
        let help = text(&console(&args).stdout);
        assert!(
            help.contains("Which of the volume's mates")
                && help.contains("counted from 1; see `console status`"),
            "{args:?} --help says nothing of --mate:\n{help}"
        );
        assert!(help.contains("[default: 1]"), "{args:?}:\n{help}");
    }
    let out = console(&["run", "--mate", "two"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("\"two\" is not a mate number"),
        "{}",
        text(&out.stderr)
    );
}

/// Reads `child`'s stderr on a thread and hands its lines over a channel,
/// so a test can wait for one with a timeout.
fn stderr_lines(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let stderr = child.stderr.take().expect("stderr piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Waits (bounded) for the child to exit.
fn wait_exit(child: &mut std::process::Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// Every binary logs to stderr; with stderr a pipe (a log file, `2>&1 |
/// less`), the lines carry no ANSI escape codes, even without `NO_COLOR`.
#[test]
fn logs_on_a_pipe_carry_no_colour_codes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    // Nobody listens here: db-server waits for it, the console retries it,
    // and both say so in their logs.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let nowhere = closed.local_addr().expect("addr").to_string();
    drop(closed);
    let runs: [(&str, Vec<String>, &str); 4] = [
        (
            "array-node",
            vec![
                "--data-dir".into(),
                data("array"),
                "--lu-size".into(),
                "1MiB".into(),
            ],
            "listening on",
        ),
        (
            "db-server",
            vec![
                "--array".into(),
                nowhere.clone(),
                "--data-dir".into(),
                data("db"),
                "--no-ledger".into(),
            ],
            "waiting for the array",
        ),
        (
            "backup-server",
            vec![
                "--array".into(),
                nowhere.clone(),
                "--store".into(),
                data("store"),
            ],
            "listening on",
        ),
        (
            "console",
            vec![
                "--db".into(),
                nowhere.clone(),
                "--step-deadline".into(),
                "1s".into(),
                "status".into(),
            ],
            "retrying",
        ),
    ];
    for (binary, args, awaited) in runs {
        let mut command = harness::command(binary);
        if binary != "console" {
            command.args(["--listen", "127.0.0.1:0"]);
        }
        let mut child = command
            .args(&args)
            .env("RUST_LOG", "info")
            .env_remove("NO_COLOR")
            .env_remove("SPLITMIRROR_CRASH_AT")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {binary}: {e}"));
        let lines = stderr_lines(&mut child);
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !seen.iter().any(|l: &String| l.contains(awaited)) {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) => seen.push(line),
                Err(_) => panic!("{binary} never logged {awaited:?}: {seen:?}"),
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            !seen.iter().any(|l| l.contains('\x1b')),
            "{binary} wrote escape codes to a pipe: {seen:?}"
        );
    }
}

/// After its report, the console exits at once, even if a node it used
/// earlier in the run (the array) has stopped answering: nothing of the
/// run may still be waiting on it. The array is stopped (SIGSTOP) right
/// after the backup, so the rest of the run (delete, resync of nothing,
/// report) needs only db-server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_exits_promptly_after_its_report_while_the_array_is_stopped() {
    use rustix::process::{Pid, Signal, kill_process};
    let dir = tempfile::tempdir().expect("tempdir");
    let array_dir = dir.path().join("array");
    let array = harness::NodeProcess::start(
        "array-node",
        &[
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            array_dir.to_str().expect("utf-8 path"),
            "--lu-size",
            "64MiB",
        ],
    );
    // No ledger: nothing writes to the array once the backup is done.
    let db = start_db(
        &array.url(),
        &dir.path().join("db"),
        ManagerConfig::default(),
        None,
    )
    .await;
    let backup = start_backup(&array.url(), &db.url(), &dir.path().join("store")).await;
    let addrs = address_args(&array.addr, &db.addr.to_string(), &backup.addr.to_string());
    let array_pid = Pid::from_child(&array.child);
    let outcome = tokio::task::spawn_blocking(move || {
        let mut child = harness::command("console")
            .args(&addrs)
            .args(["run", "--volume", "0", "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start console");
        let lines = stderr_lines(&mut child);
        let mut stopped = false;
        let mut stderr = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while let Ok(line) = lines.recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            // Stopped once the snapshot is deleted: the delete itself needs
            // the array (db-server gives itself write access to the mate
            // back before the pair resynchronizes), the resync's wait does
            // not end before the array returns.
            if !stopped && line.contains("· resynchronizing") {
                kill_process(array_pid, Signal::STOP).expect("SIGSTOP the array");
                stopped = true;
            }
            stderr.push(line);
            if stopped {
                break;
            }
        }
        // The report is one JSON line on stdout.
        let mut report = String::new();
        let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        std::io::BufRead::read_line(&mut stdout, &mut report).expect("read the report");
        let reported = Instant::now();
        let exited = wait_exit(&mut child, Duration::from_secs(10));
        let exit_after = reported.elapsed();
        let _ = kill_process(array_pid, Signal::CONT);
        if exited.is_none() {
            let _ = child.kill();
        }
        let _ = child.wait();
        (stopped, report, exited, exit_after, stderr)
    })
    .await
    .expect("console task");
    let (stopped, report, exited, exit_after, stderr) = outcome;
    assert!(stopped, "the run never reached the delete: {stderr:?}");
    let report: serde_json::Value = serde_json::from_str(&report)
        .unwrap_or_else(|e| panic!("a JSON report ({e}): {report:?} {stderr:?}"));
    assert_eq!(report["verified"], true, "{report}");
    let status = exited.unwrap_or_else(|| {
        panic!("the console did not exit within 10 s of its report while the array was stopped")
    });
    assert!(status.success(), "{report}");
    assert!(
        exit_after < Duration::from_secs(3),
        "the console exited {exit_after:?} after its report"
    );
    db.shutdown().await.expect("db");
    backup.shutdown().await.expect("backup");
}

/// Runs `binary args` with stdout a pipe whose reader has gone (closed at
/// once, or after the first line), as `… | head -1` does, and answers how
/// it ended and what it said on stderr.
fn run_with_stdout_closed(
    binary: &str,
    args: &[String],
    after_first_line: bool,
) -> (ExitStatus, String) {
    let mut child = harness::command(binary)
        .args(args)
        .env_remove("SPLITMIRROR_DB")
        .env_remove("SPLITMIRROR_BACKUP")
        .env_remove("SPLITMIRROR_ARRAY")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {binary}: {e}"));
    let stdout = child.stdout.take().expect("stdout piped");
    if after_first_line {
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line);
    } else {
        drop(stdout);
    }
    let lines = stderr_lines(&mut child);
    let status = wait_exit(&mut child, Duration::from_secs(20)).unwrap_or_else(|| {
        let _ = child.kill();
        panic!("{binary} {args:?} kept running with its stdout closed")
    });
    let stderr: Vec<String> = lines.iter().collect();
    (status, stderr.join("\n"))
}

/// No program panics when its reader goes away (`console status | head
/// -1`): a closed stdout ends the output quietly, 20 times in a row for
/// every printing command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stdout_never_panics_a_program() {
    let dir = tempfile::tempdir().expect("tempdir");
    let array = start_array(
        &dir.path().join("array"),
        harness::small_array(1 << 20),
        ArrayTestHooks::default(),
    )
    .await;
    let db = start_db(
        &array.url(),
        &dir.path().join("db"),
        ManagerConfig::default(),
        None,
    )
    .await;
    let backup = start_backup(&array.url(), &db.url(), &dir.path().join("store")).await;
    let image = dir.path().join("zeros.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).expect("write an image");
    let addrs = address_args(
        &array.addr.to_string(),
        &db.addr.to_string(),
        &backup.addr.to_string(),
    );
    let with_nodes = |args: &[&str]| -> Vec<String> {
        let mut all = addrs.clone();
        all.extend(args.iter().map(|a| a.to_string()));
        all
    };
    let cases: Vec<(&str, Vec<String>, bool)> = vec![
        ("console", vec!["--help".into()], false),
        ("console", vec!["run".into(), "--help".into()], false),
        ("console", with_nodes(&["status"]), false),
        ("console", with_nodes(&["status", "--json"]), false),
        ("console", with_nodes(&["backup", "list"]), false),
        (
            "console",
            with_nodes(&[
                "--array-identity",
                "db-server",
                "pair",
                "verify",
                "--volume",
                "0",
            ]),
            false,
        ),
        (
            "console",
            with_nodes(&["status", "--watch", "--interval", "50ms"]),
            true,
        ),
        (
            "db-server",
            vec!["verify-image".into(), image.to_string_lossy().into_owned()],
            false,
        ),
        ("db-server", vec!["--help".into()], false),
        ("array-node", vec!["--help".into()], false),
    ];
    let outcomes = tokio::task::spawn_blocking(move || {
        let mut outcomes = Vec::new();
        for (binary, args, after_first_line) in &cases {
            for _ in 0..20 {
                let (status, stderr) = run_with_stdout_closed(binary, args, *after_first_line);
                outcomes.push((binary.to_string(), args.clone(), status, stderr));
            }
        }
        outcomes
    })
    .await
    .expect("runs");
    for (binary, args, status, stderr) in outcomes {
        assert!(
            status.code() != Some(101) && !stderr.contains("panicked"),
            "{binary} {args:?} with its stdout closed: {status}, {stderr}"
        );
    }
    db.shutdown().await.expect("db");
    backup.shutdown().await.expect("backup");
}
