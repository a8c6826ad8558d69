//! `docker compose up` as a user runs it: `scripts/compose-test.sh` builds
//! the image from this checkout, brings the four containers up, checks
//! verified reports, kills and restarts db-server, and cleans up. It runs
//! whenever `docker info` succeeds (as on the CI machine), and says so
//! loudly when it skips.

use std::path::Path;
use std::process::Command;

#[test]
fn compose_up_runs_verified_backups_and_survives_a_db_server_restart() {
    let docker = Command::new("docker").arg("info").output();
    if !docker.is_ok_and(|out| out.status.success()) {
        eprintln!("SKIPPED compose test: `docker info` failed (no Docker engine here)");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new("timeout")
        .arg("900")
        .arg(root.join("scripts/compose-test.sh"))
        .current_dir(&root)
        .output()
        .expect("run scripts/compose-test.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the compose scenario failed");
    assert!(stdout.contains("compose scenario: OK"));
}
