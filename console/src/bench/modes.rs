//! `bench modes`: the ledger's throughput and p99 latency in Synchronized,
//! Snapshot and Resynchronizing modes, and data bytes db-server sends per
//! logical byte written — with the pair mirrored by the array and, for
//! comparison, by the host ([0006]/[0009] against the claim of [0047]);
//! and a copy-on-write snapshot next to the split one (#20, [0072]-[0078]):
//! the ledger while each is held, the time from its delete until the pair
//! is redundant again, and the save area used per MiB the ledger wrote;
//! and the array keeping the pairs' modes (#19, db-server `--array-mode
//! stateful`) next to db-server keeping them (stateless, the default): the
//! same ledger on a second cluster that differs only by that, in each mode;
//! and, on a stateful array, each mirror LU with three mates against one
//! ([0020]) while Synchronized.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::json;
use splitmirror_proto::db::v1 as dpb;

use super::backup::met;
use super::common::{
    Bench, LedgerWindow, f1, f2, full_speed_ledger, measure, sample, table, window,
};
use super::{BenchOptions, BenchOutput};
use crate::cluster::ClusterBuilder;
use db_server::manager::ArrayModeKeeping;

/// The resync rate cap of the third measurement (`db-server
/// --resync-max-rate`).
const RESYNC_CAP_BYTES_PER_S: u64 = 100_000_000;

/// Bytes of the data volume dirtied (beyond the ledger) to make the resync
/// last through the measurement.
fn bulk_bytes(options: &BenchOptions) -> u64 {
    (options.size_bytes / 2).min(512 << 20)
}

pub async fn run(options: &BenchOptions) -> anyhow::Result<BenchOutput> {
    let seconds = options.seconds;
    let stateless = ArrayModeKeeping::Stateless;
    let PerMode {
        windows: array,
        after: split_after,
        array_modes: _,
    } = per_mode(options, false, None, stateless, seconds).await?;
    let split_after = split_after.context("no split snapshot figures")?;
    // Right after the stateless cluster, so that the two are measured as
    // close together as the machine allows.
    let stateful = per_mode(options, false, None, ArrayModeKeeping::Stateful, seconds).await?;
    let host = per_mode(options, true, None, stateless, seconds)
        .await?
        .windows;
    let capped = per_mode(
        options,
        false,
        Some(RESYNC_CAP_BYTES_PER_S),
        stateless,
        seconds,
    )
    .await?
    .windows;
    let cow = cow_run(options, seconds).await?;
    let mates = mates_run(options, seconds).await?;
    let capped_resync = capped
        .last()
        .map(|(_, w)| w.clone())
        .context("no resync window")?;
    let sync = &array[0].1;
    let host_sync = &host[0].1;
    let mut rows: Vec<Vec<String>> = Vec::new();
    for (mirroring, results) in [("array", &array), ("host", &host)] {
        for (mode, w) in results.iter() {
            let mode = if mirroring == "array" && mode == "Resynchronizing" {
                "Resynchronizing, defaults (no cap)"
            } else {
                mode.as_str()
            };
            rows.push(vec![
                format!("{mirroring} mirroring, {mode}"),
                f1(w.tps),
                f1(w.p99_latency_us),
                f2(w.wire_bytes_per_logical_byte),
                f2(w.tps / sync.tps.max(1e-9)),
            ]);
        }
    }
    rows.push(vec![
        format!(
            "array mirroring, Resynchronizing, resync capped at {} MB/s",
            RESYNC_CAP_BYTES_PER_S / 1_000_000
        ),
        f1(capped_resync.tps),
        f1(capped_resync.p99_latency_us),
        f2(capped_resync.wire_bytes_per_logical_byte),
        f2(capped_resync.tps / sync.tps.max(1e-9)),
    ]);
    let capped_ratio = capped_resync.tps / sync.tps.max(1e-9);
    let snapshot_ratio = array[1].1.tps / sync.tps.max(1e-9);
    let resync_ratio = array[2].1.tps / sync.tps.max(1e-9);
    let tps_ratio = sync.tps / host_sync.tps.max(1e-9);
    let bytes_ratio =
        sync.wire_bytes_per_logical_byte / host_sync.wire_bytes_per_logical_byte.max(1e-9);
    let mut out = table(
        &[
            "ledger at full speed",
            "tps",
            "p99 µs",
            "wire B / logical B",
            "× array sync",
        ],
        &rows,
    );
    out.push_str(&format!(
        "\n  Snapshot / Synchronized {} (target ≥ 0.9: {})\n  Resynchronizing with defaults (no cap) / Synchronized {} (target ≥ 0.8: {}); resync capped at {} MB/s: {}\n  the uncapped resync window: {:.2} s, {} MiB dirtied before it\n  array / host mirroring: {}× tps (target ≥ 1.5), {}× bytes on the wire (target 0.5)\n",
        f2(snapshot_ratio),
        met(Some(snapshot_ratio >= 0.9)),
        f2(resync_ratio),
        met(Some(resync_ratio >= 0.8)),
        RESYNC_CAP_BYTES_PER_S / 1_000_000,
        f2(capped_ratio),
        array[2].1.seconds,
        bulk_bytes(options) >> 20,
        f2(tps_ratio),
        f2(bytes_ratio)
    ));
    // Copy-on-write against split, each against its own cluster's
    // Synchronized window (the clusters differ only by the save area).
    let split_snapshot = &array[1].1;
    let cow_tps_over_split = cow.snapshot.tps / split_snapshot.tps.max(1e-9);
    let cow_p99_over_split = cow.snapshot.p99_latency_us / split_snapshot.p99_latency_us.max(1e-9);
    let cow_snapshot_over_synchronized = cow.snapshot.tps / cow.synchronized.tps.max(1e-9);
    let cow_delete_to_redundant_over_split = cow.after_hold.delete_to_redundant_seconds
        / split_after.delete_to_redundant_seconds.max(1e-9);
    let cow_bulk_write_over_split =
        cow.after_hold.bulk_write_seconds / split_after.bulk_write_seconds.max(1e-9);
    let bulk_mib = bulk_bytes(options) as f64 / (1u64 << 20) as f64;
    let cow_rows = vec![
        vec![
            "split".to_string(),
            f1(split_snapshot.tps),
            f1(split_snapshot.p99_latency_us),
            f2(snapshot_ratio),
            f1(bulk_mib / split_after.bulk_write_seconds.max(1e-9)),
            f2(split_after.delete_to_redundant_seconds),
            "-".to_string(),
        ],
        vec![
            "copy-on-write".to_string(),
            f1(cow.snapshot.tps),
            f1(cow.snapshot.p99_latency_us),
            f2(cow_snapshot_over_synchronized),
            f1(bulk_mib / cow.after_hold.bulk_write_seconds.max(1e-9)),
            f2(cow.after_hold.delete_to_redundant_seconds),
            f1(cow.save_area_bytes_per_ledger_mib / 1024.0),
        ],
    ];
    out.push('\n');
    out.push_str(&table(
        &[
            "snapshot held",
            "tps",
            "p99 µs",
            "× own sync",
            "bulk MiB/s",
            "delete → redundant s",
            "save-area KiB / ledger MiB",
        ],
        &cow_rows,
    ));
    out.push_str(&format!(
        "\n  copy-on-write / split while held: {}× tps, {}× p99; bulk write ({} MiB) {}× the time\n  delete → redundant: copy-on-write {} s / split {} s = {}\n  save area: {} of {} blocks used after {:.1} MiB of ledger writes\n",
        f2(cow_tps_over_split),
        f2(cow_p99_over_split),
        bulk_bytes(options) >> 20,
        f2(cow_bulk_write_over_split),
        f2(cow.after_hold.delete_to_redundant_seconds),
        f2(split_after.delete_to_redundant_seconds),
        f2(cow_delete_to_redundant_over_split),
        cow.save_area_used_blocks,
        cow.save_area_capacity_blocks,
        cow.ledger_bytes_while_held as f64 / (1u64 << 20) as f64,
    ));
    let (stateful_table, stateful_over_stateless) = compare_stateful(&array, &stateful)?;
    out.push('\n');
    out.push_str(&stateful_table);
    let stateful_after = stateful
        .after
        .as_ref()
        .context("no stateful snapshot figures")?;
    out.push_str(&format!(
        "  the array's mode as db-server reported it at the end of each window: {}\n  delete → redundant: stateful {} s / stateless {} s; bulk write ({} MiB) while held: stateful {} s / stateless {} s\n",
        stateful
            .array_modes
            .iter()
            .map(|(mode, array_mode)| format!("{mode} → {array_mode}"))
            .collect::<Vec<_>>()
            .join(", "),
        f2(stateful_after.delete_to_redundant_seconds),
        f2(split_after.delete_to_redundant_seconds),
        bulk_bytes(options) >> 20,
        f2(stateful_after.bulk_write_seconds),
        f2(split_after.bulk_write_seconds),
    ));
    out.push('\n');
    out.push_str(&mates.render());
    let to_json = |results: &Vec<(String, LedgerWindow)>| {
        results
            .iter()
            .map(|(mode, w)| json!({"mode": mode, "window": w}))
            .collect::<Vec<_>>()
    };
    let stateful_json: Vec<_> = stateful
        .windows
        .iter()
        .zip(&stateful.array_modes)
        .map(|((mode, w), (_, array_mode))| {
            json!({"mode": mode, "array_mode": array_mode, "window": w})
        })
        .collect();
    Ok(BenchOutput {
        table: out,
        figures: json!({
            "array_mirroring": to_json(&array),
            "host_mirroring": to_json(&host),
            "snapshot_over_synchronized": snapshot_ratio,
            "resynchronizing_over_synchronized": resync_ratio,
            "resynchronizing_capped_over_synchronized": capped_ratio,
            "resync_cap_bytes_per_s": RESYNC_CAP_BYTES_PER_S,
            "capped_resync": capped_resync,
            "array_over_host_tps": tps_ratio,
            "array_over_host_wire_bytes": bytes_ratio,
            "split_after_hold": split_after,
            "cow": cow,
            "cow_over_split_snapshot_tps": cow_tps_over_split,
            "cow_over_split_snapshot_p99": cow_p99_over_split,
            "cow_snapshot_over_synchronized": cow_snapshot_over_synchronized,
            "cow_over_split_delete_to_redundant": cow_delete_to_redundant_over_split,
            "cow_over_split_bulk_write_seconds": cow_bulk_write_over_split,
            "stateful_array_mirroring": stateful_json,
            "stateful_after_hold": stateful_after,
            "stateful_over_stateless": stateful_over_stateless,
            "three_mates_vs_one": mates.to_json(),
        }),
    })
}

/// The modes that stateful and stateless are compared in, as
/// [`per_mode`] names its windows.
const COMPARED_MODES: [&str; 3] = ["Synchronized", "Snapshot", "Resynchronizing"];

/// The stateful cluster's windows against the stateless one's, mode by
/// mode: a table, and the ratios stateful ÷ stateless as JSON.
fn compare_stateful(
    stateless: &[(String, LedgerWindow)],
    stateful: &PerMode,
) -> anyhow::Result<(String, serde_json::Value)> {
    let find = |windows: &[(String, LedgerWindow)], mode: &str, which: &str| {
        windows
            .iter()
            .find(|(m, _)| m == mode)
            .map(|(_, w)| w.clone())
            .with_context(|| format!("no {mode} window of the {which} cluster"))
    };
    let mut rows = Vec::new();
    let mut ratios = serde_json::Map::new();
    for mode in COMPARED_MODES {
        let less = find(stateless, mode, "stateless")?;
        let ful = find(&stateful.windows, mode, "stateful")?;
        let tps = ful.tps / less.tps.max(1e-9);
        let p99 = ful.p99_latency_us / less.p99_latency_us.max(1e-9);
        rows.push(vec![
            if mode == "Snapshot" {
                "Snapshot (split held)".to_string()
            } else {
                mode.to_string()
            },
            f1(less.tps),
            f1(less.p99_latency_us),
            f1(ful.tps),
            f1(ful.p99_latency_us),
            f2(tps),
            f2(p99),
        ]);
        ratios.insert(mode.to_lowercase(), json!({"tps": tps, "p99": p99}));
    }
    let table = table(
        &[
            "who keeps the mode",
            "stateless tps",
            "p99 µs",
            "stateful tps",
            "p99 µs",
            "stateful / stateless tps",
            "p99",
        ],
        &rows,
    );
    Ok((table, serde_json::Value::Object(ratios)))
}

/// One cluster's windows, what follows its snapshot's hold, and the
/// array's mode db-server reported at the end of each window (stateful
/// only).
struct PerMode {
    windows: Vec<(String, LedgerWindow)>,
    after: Option<AfterHold>,
    /// (the window's mode, the array's mode then), one per window.
    array_modes: Vec<(String, String)>,
}

/// Volume 0's array mode as db-server reports it, checked against who
/// should keep it: a cluster asked to be stateful that reports otherwise
/// fails the bench rather than measuring the wrong thing.
async fn array_mode_of(bench: &Bench, keeping: ArrayModeKeeping) -> anyhow::Result<String> {
    let status = bench.clients.db.status(false).await?;
    let volume =
        crate::mates::pick(&status.volumes, 0, 1).context("no volume 0 in db-server's status")?;
    let reported = crate::status::array_mode_keeping(volume).unwrap_or("stateless");
    anyhow::ensure!(
        reported == keeping.to_string(),
        "db-server was started --array-mode {keeping} but reports volume 0 {reported}"
    );
    Ok(crate::status::array_mode(volume).unwrap_or("-").to_string())
}

/// Measures the modes of one cluster. With host mirroring only the
/// Synchronized mode differs from the array's, so only it is measured.
async fn per_mode(
    options: &BenchOptions,
    host_mirroring: bool,
    resync_cap: Option<u64>,
    array_mode: ArrayModeKeeping,
    seconds: Duration,
) -> anyhow::Result<PerMode> {
    let manager = db_server::manager::ManagerConfig {
        host_mirroring,
        resync_max_bytes_per_s: resync_cap,
        array_mode,
        ..db_server::manager::ManagerConfig::default()
    };
    let bench = Bench::start(
        options.size_bytes,
        Some(full_speed_ledger()),
        manager,
        Some(db_server::DEFAULT_JOURNAL_REGION_BYTES),
    )
    .await?;
    let mut array_modes = Vec::new();
    let mut results = vec![("Synchronized".to_string(), measure(&bench, seconds).await?)];
    array_modes.push((
        "Synchronized".to_string(),
        array_mode_of(&bench, array_mode).await?,
    ));
    if host_mirroring {
        bench.shutdown().await?;
        return Ok(PerMode {
            windows: results,
            after: None,
            array_modes,
        });
    }
    let db = &bench.clients.db;
    db.acquire_snapshot(0, "modes").await?;
    results.push(("Snapshot".to_string(), measure(&bench, seconds).await?));
    array_modes.push((
        "Snapshot".to_string(),
        array_mode_of(&bench, array_mode).await?,
    ));
    // Dirty the second half of the volume, so that the resync has enough to
    // copy while the ledger is measured.
    let bulk_write_seconds = write_bulk(&bench, options).await?;
    let delete_started = Instant::now();
    db.delete_snapshot(0, "modes", false).await?;
    // Measured while the pair is Resynchronizing, up to `seconds`.
    let before = sample(&bench).await?;
    let deadline = Instant::now() + seconds;
    let mut synced = loop {
        tokio::time::sleep(Duration::from_millis(POLL_MS)).await;
        let synced = redundant(&bench).await?;
        if synced || Instant::now() >= deadline {
            break synced;
        }
    };
    let after = sample(&bench).await?;
    results.push(("Resynchronizing".to_string(), window(&before, &after, 4096)));
    array_modes.push((
        "Resynchronizing".to_string(),
        array_mode_of(&bench, array_mode).await?,
    ));
    // The pair is redundant again once the resync is done.
    while !synced {
        anyhow::ensure!(
            delete_started.elapsed() < REDUNDANT_TIMEOUT,
            "volume 0 not Synchronized {REDUNDANT_TIMEOUT:?} after the snapshot's delete"
        );
        tokio::time::sleep(Duration::from_millis(POLL_MS)).await;
        synced = redundant(&bench).await?;
    }
    let delete_to_redundant_seconds = delete_started.elapsed().as_secs_f64();
    bench.shutdown().await?;
    Ok(PerMode {
        windows: results,
        after: Some(AfterHold {
            bulk_write_seconds,
            delete_to_redundant_seconds,
        }),
        array_modes,
    })
}

/// How often the bench asks whether the pair is redundant again, which is
/// the resolution of the delete → redundant times.
const POLL_MS: u64 = 50;

/// How long a delete may take to leave the pair Synchronized.
const REDUNDANT_TIMEOUT: Duration = Duration::from_secs(600);

/// What follows a snapshot's hold, split or copy-on-write alike.
#[derive(Debug, Clone, serde::Serialize)]
struct AfterHold {
    /// Writing [`bulk_bytes`] to the data volume while the snapshot is held.
    bulk_write_seconds: f64,
    /// From the DeleteSnapshot call to the first status that shows volume 0
    /// Synchronized with no snapshot held (polled every [`POLL_MS`] ms; a
    /// copy-on-write pair never stopped being Synchronized).
    delete_to_redundant_seconds: f64,
}

/// Dirties the second half of the volume (beyond the ledger) in 1 MiB
/// writes, so that the split's resync has enough to copy while the ledger
/// is measured; answers the seconds it took.
async fn write_bulk(bench: &Bench, options: &BenchOptions) -> anyhow::Result<f64> {
    let started = Instant::now();
    let start_lba = options.size_bytes / 2 / 4096;
    let chunk = 1 << 20;
    let mut offset = 0;
    while offset < bulk_bytes(options) {
        bench
            .clients
            .db
            .write(
                0,
                dpb::VirtualLu::Data,
                start_lba + offset / 4096,
                vec![0x5A; chunk as usize],
            )
            .await?;
        offset += chunk;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// Whether volume 0 is Synchronized with no snapshot held: every one of
/// its mates' pairs (one Status entry each).
async fn redundant(bench: &Bench) -> anyhow::Result<bool> {
    let status = bench.clients.db.status(false).await?;
    let mut pairs = status.volumes.iter().filter(|v| v.volume == 0).peekable();
    Ok(pairs.peek().is_some()
        && pairs.all(|v| v.data_mode() == dpb::Mode::Synchronized && v.snapshot_lu.is_none()))
}

/// The ledger while Synchronized on a stateful array, with each mirror LU
/// having one mate and then three ([0020]): a write to the mirror LU lands
/// on the origin and every mate, so three mates cost two more writes per
/// block inside the array.
#[derive(Debug, Clone, serde::Serialize)]
struct MatesRun {
    one_mate: LedgerWindow,
    three_mates: LedgerWindow,
}

impl MatesRun {
    fn tps_ratio(&self) -> f64 {
        self.three_mates.tps / self.one_mate.tps.max(1e-9)
    }

    fn p99_ratio(&self) -> f64 {
        self.three_mates.p99_latency_us / self.one_mate.p99_latency_us.max(1e-9)
    }

    fn render(&self) -> String {
        let row = |name: &str, w: &LedgerWindow| {
            vec![
                name.to_string(),
                f1(w.tps),
                f1(w.p99_latency_us),
                f2(w.wire_bytes_per_logical_byte),
            ]
        };
        let mut out = table(
            &[
                "Synchronized, stateful array",
                "tps",
                "p99 µs",
                "wire B / logical B",
            ],
            &[
                row("one mate", &self.one_mate),
                row("three mates", &self.three_mates),
            ],
        );
        out.push_str(&format!(
            "  three mates / one mate: {}× tps, {}× p99\n",
            f2(self.tps_ratio()),
            f2(self.p99_ratio())
        ));
        out
    }

    fn to_json(&self) -> serde_json::Value {
        json!({
            "one_mate": self.one_mate,
            "three_mates": self.three_mates,
            "three_over_one_tps": self.tps_ratio(),
            "three_over_one_p99": self.p99_ratio(),
        })
    }
}

/// [`MatesRun`]: two stateful clusters, one after the other, that differ
/// only by their mates per mirror LU.
async fn mates_run(options: &BenchOptions, seconds: Duration) -> anyhow::Result<MatesRun> {
    let mut windows = Vec::new();
    for mates in [1, 3] {
        let builder = ClusterBuilder::new()
            .lu_size_bytes(options.size_bytes)
            .ledger(Some(full_speed_ledger()))
            .journal_region_bytes(Some(db_server::DEFAULT_JOURNAL_REGION_BYTES))
            .array_mode(ArrayModeKeeping::Stateful)
            .mates(mates);
        let bench = Bench::start_from(builder, true).await?;
        let status = bench.clients.db.status(false).await?;
        let listed = crate::mates::count(&status.volumes, 0);
        anyhow::ensure!(
            listed == mates,
            "a cluster of {mates} mates per mirror LU, but db-server lists {listed} for volume 0"
        );
        windows.push(measure(&bench, seconds).await?);
        bench.shutdown().await?;
    }
    let three_mates = windows.pop().context("no three-mate window")?;
    let one_mate = windows.pop().context("no one-mate window")?;
    Ok(MatesRun {
        one_mate,
        three_mates,
    })
}

/// The copy-on-write snapshot's figures, from one cluster whose volume 0
/// has a save area as large as the volume (so that it cannot fill up).
#[derive(Debug, Clone, serde::Serialize)]
struct CowRun {
    synchronized: LedgerWindow,
    /// The ledger while the copy-on-write snapshot is held.
    snapshot: LedgerWindow,
    /// Bytes the ledger wrote from the acquire to the save-area reading
    /// (three blocks per transaction).
    ledger_bytes_while_held: u64,
    /// The save area's used blocks then, before the bulk write.
    save_area_used_blocks: u64,
    save_area_capacity_blocks: u64,
    /// Save-area bytes per MiB the ledger wrote while the snapshot was held.
    save_area_bytes_per_ledger_mib: f64,
    after_hold: AfterHold,
}

async fn cow_run(options: &BenchOptions, seconds: Duration) -> anyhow::Result<CowRun> {
    let builder = ClusterBuilder::new()
        .lu_size_bytes(options.size_bytes)
        .ledger(Some(full_speed_ledger()))
        .journal_region_bytes(Some(db_server::DEFAULT_JOURNAL_REGION_BYTES))
        .save_area(None);
    let bench = Bench::start_from(builder, true).await?;
    let synchronized = measure(&bench, seconds).await?;
    let db = &bench.clients.db;
    let at_acquire = sample(&bench).await?;
    db.acquire_snapshot_by(0, "modes-cow", dpb::SnapshotMethod::Cow)
        .await?;
    let snapshot = measure(&bench, seconds).await?;
    // One status for both: the transactions and the save area.
    let status = bench.status().await?;
    let committed = status.ledger.unwrap_or_default().transactions_committed;
    let volume =
        crate::mates::pick(&status.volumes, 0, 1).context("no volume 0 in db-server's status")?;
    anyhow::ensure!(
        volume.snapshot_method() == dpb::SnapshotMethod::Cow,
        "volume 0's snapshot is {:?}, not copy-on-write",
        volume.snapshot_method()
    );
    anyhow::ensure!(
        volume.snapshot_invalidated_reason.is_empty(),
        "the copy-on-write snapshot was invalidated: {}",
        volume.snapshot_invalidated_reason
    );
    let save_area = volume
        .save_area
        .context("volume 0 has no save area in db-server's status")?;
    let block_size_bytes = u64::from(volume.block_size_bytes);
    let ledger_bytes_while_held =
        committed.saturating_sub(at_acquire.committed) * 3 * block_size_bytes;
    let save_area_bytes_per_ledger_mib = (save_area.used_blocks * block_size_bytes) as f64
        / (ledger_bytes_while_held as f64 / (1u64 << 20) as f64).max(1e-9);
    let bulk_write_seconds = write_bulk(&bench, options).await?;
    let delete_started = Instant::now();
    db.delete_snapshot(0, "modes-cow", false).await?;
    while !redundant(&bench).await? {
        anyhow::ensure!(
            delete_started.elapsed() < REDUNDANT_TIMEOUT,
            "volume 0 not Synchronized {REDUNDANT_TIMEOUT:?} after the copy-on-write snapshot's delete"
        );
        tokio::time::sleep(Duration::from_millis(POLL_MS)).await;
    }
    let delete_to_redundant_seconds = delete_started.elapsed().as_secs_f64();
    bench.shutdown().await?;
    Ok(CowRun {
        synchronized,
        snapshot,
        ledger_bytes_while_held,
        save_area_used_blocks: save_area.used_blocks,
        save_area_capacity_blocks: save_area.capacity_blocks,
        save_area_bytes_per_ledger_mib,
        after_hold: AfterHold {
            bulk_write_seconds,
            delete_to_redundant_seconds,
        },
    })
}
