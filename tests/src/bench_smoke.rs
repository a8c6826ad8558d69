//! Every `console bench` scenario once, tiny: its JSON is well-formed, every
//! figure is finite, and the figures that measure something are positive.
//! Speed itself is never asserted here.

use std::process::Command;

use serde_json::Value;

use crate::harness;

/// Runs a scenario tiny and answers its JSON.
fn bench(scenario: &str, plot: bool) -> Value {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("figures.json");
    let svg = dir.path().join("plot.svg");
    let mut command = harness::command("console");
    command
        .args([
            "bench",
            scenario,
            "--quick",
            "--size",
            "16MiB",
            "--seconds",
            "300ms",
            "--json",
        ])
        .arg(&json);
    if plot {
        command.arg("--plot").arg(&svg);
    }
    let out = command.output().expect("run console bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench {scenario}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(&format!("bench {scenario}")), "{stdout}");
    let figures: Value =
        serde_json::from_slice(&std::fs::read(&json).expect("JSON file")).expect("valid JSON");
    assert_eq!(figures["scenario"], scenario);
    assert!(figures["machine"]["cores"].as_u64().is_some_and(|c| c > 0));
    all_finite(&figures, scenario);
    if plot {
        let svg = std::fs::read_to_string(&svg).expect("SVG written");
        assert!(
            svg.starts_with("<svg") && svg.contains("</svg>"),
            "an SVG document"
        );
    }
    figures["figures"].clone()
}

fn all_finite(value: &Value, path: &str) {
    match value {
        Value::Number(n) => assert!(n.as_f64().is_some_and(f64::is_finite), "{path} = {n}"),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .for_each(|(i, v)| all_finite(v, &format!("{path}[{i}]"))),
        Value::Object(map) => map
            .iter()
            .for_each(|(k, v)| all_finite(v, &format!("{path}.{k}"))),
        _ => {}
    }
}

fn positive(figures: &Value, pointer: &str) {
    let value = figures.pointer(pointer).and_then(Value::as_f64);
    assert!(
        value.is_some_and(|v| v > 0.0 && v.is_finite()),
        "{pointer} = {value:?} in {figures}"
    );
}

/// The peers need qemu-utils: `.ci/run` installs them; elsewhere their
/// figures may be a reason instead of a number.
fn peer_expected() -> bool {
    let found = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "qemu-utils missing under CI: .ci/run must install them"
        );
        eprintln!("qemu-img missing: the peer figures are skipped");
    }
    found
}

#[test]
fn bench_array() {
    let f = bench("array", false);
    for key in [
        "read_to_file_mb_per_s",
        "read_to_nowhere_mb_per_s",
        "write_4k_ops_per_s_1_in_flight",
        "write_4k_ops_per_s_32_in_flight",
    ] {
        positive(&f, &format!("/{key}"));
    }
    if peer_expected() {
        positive(&f, "/peer_qemu_img_convert_mb_per_s");
        positive(&f, "/ratio_read_to_file_over_peer");
    }
}

#[test]
fn bench_backup() {
    let f = bench("backup", false);
    positive(&f, "/backup_mb_per_s");
    positive(&f, "/backup_server_cpu_seconds_per_gib");
    if peer_expected() {
        positive(&f, "/ratio/over_convert_and_fsync");
    }
}

#[test]
fn bench_freeze() {
    let f = bench("freeze", true);
    for key in ["p50", "p99", "max"] {
        positive(&f, &format!("/freeze_window_us/{key}"));
    }
    positive(&f, "/longest_ledger_stall_us");
    assert_eq!(
        f["freeze_window_us"]["all"].as_array().map(Vec::len),
        Some(5)
    );
}

#[test]
fn bench_modes() {
    let f = bench("modes", false);
    for key in [
        "snapshot_over_synchronized",
        "resynchronizing_over_synchronized",
        "array_over_host_tps",
        "array_over_host_wire_bytes",
    ] {
        positive(&f, &format!("/{key}"));
    }
    positive(&f, "/array_mirroring/0/window/tps");
    // Stateful against stateless (#19): the ledger in each mode on a
    // cluster whose array keeps the modes, and the ratios.
    for mode in ["synchronized", "snapshot"] {
        for figure in ["tps", "p99"] {
            positive(&f, &format!("/stateful_over_stateless/{mode}/{figure}"));
        }
    }
    positive(&f, "/stateful_array_mirroring/1/window/tps");
    positive(&f, "/stateful_after_hold/delete_to_redundant_seconds");
    let seen: Vec<&str> = f["stateful_array_mirroring"]
        .as_array()
        .expect("the stateful windows")
        .iter()
        .map(|w| w["array_mode"].as_str().unwrap_or("none"))
        .collect();
    assert_eq!(
        seen.get(..2),
        Some(&["SYNCHRONIZED", "SNAPSHOT"][..]),
        "the array's mode at the end of the stateful windows: {seen:?}"
    );
}

#[test]
fn bench_resync() {
    let f = bench("resync", false);
    let runs = f["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 4, "two sizes × two methods × one dirty size");
    for (i, _) in runs.iter().enumerate() {
        positive(&f, &format!("/runs/{i}/resync_seconds"));
        positive(&f, &format!("/runs/{i}/copied_over_distinct"));
    }
}

#[test]
fn bench_journal() {
    let f = bench("journal", false);
    positive(&f, "/with_over_without_tps");
    positive(&f, "/journal_fsyncs_per_1000_transactions");
    positive(&f, "/journal_bytes_per_1000_transactions");
}

#[test]
fn bench_timeline() {
    let f = bench("timeline", true);
    positive(&f, "/tps_before");
    assert!(f["series"].as_array().is_some_and(|s| s.len() > 3));
    let phases: Vec<&str> = f["phases"]
        .as_array()
        .expect("phases")
        .iter()
        .filter_map(|p| p["phase"].as_str())
        .collect();
    assert_eq!(
        phases,
        ["acquire", "backup", "compare", "dirty", "delete", "resync"],
        "{f}"
    );
}

#[test]
fn bench_run() {
    let f = bench("run", false);
    positive(&f, "/run_total_ms");
    positive(&f, "/parts_ms/sum");
}

#[test]
fn bench_tls() {
    let f = bench("tls", false);
    for figure in ["backup_mb_per_s", "ledger_tps"] {
        for key in ["mutual_tls", "insecure", "ratio"] {
            positive(&f, &format!("/{figure}/{key}"));
        }
    }
    assert_eq!(
        f["samples"].as_array().map(Vec::len),
        Some(2),
        "one round: mutual TLS, then --insecure"
    );
}

#[test]
fn bench_generations() {
    let f = bench("generations", false);
    let legs = f["legs"].as_array().expect("legs");
    let file = &legs[0];
    assert_eq!(file["store"], "file", "{f}");
    let generations = file["generations"].as_array().expect("file generations");
    assert_eq!(generations.len(), 4, "full, 0 %, 1 %, 10 %: {f}");
    positive(&generations[0], "/bytes_read");
    positive(&generations[0], "/new_bytes_stored");
    positive(&generations[0], "/seconds");
    // An unchanged volume reads no data: the store holds every digest.
    assert_eq!(generations[1]["bytes_read"], 0, "{f}");
    assert_eq!(generations[1]["new_bytes_stored"], 0, "{f}");
    positive(&generations[2], "/bytes_read");
    // The S3 leg needs s3s-fs: `.ci/run` installs it; elsewhere it may be
    // skipped with its reason.
    let s3 = &legs[1];
    if s3.get("skipped").is_some() {
        assert!(
            std::env::var_os("CI").is_none(),
            "s3s-fs missing under CI: .ci/run must install it ({s3})"
        );
        eprintln!("s3s-fs missing: the S3 leg is skipped");
    } else {
        assert_eq!(s3["generations"][1]["bytes_read"], 0, "{f}");
        positive(&s3["generations"][0], "/new_bytes_stored");
    }
    if peer_expected() {
        positive(&f, "/peer/seconds");
    }
}
