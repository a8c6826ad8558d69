//! `console demo`: the whole scenario on one machine with no setup. It
//! starts array-node, db-server (with the ledger running) and backup-server
//! in-process on loopback, performs backup runs while the ledger runs, checks
//! each image with the ledger verifier and the digest comparison, and prints
//! the reports. The runs split the mirror pair; one more takes a
//! copy-on-write snapshot instead (volume 0 has a save area), so that the
//! demo shows both methods. Then the way back: it corrupts the volume, restores the last
//! backup (after a safety backup) and shows the ledger continuing from the
//! backup's sequence, restores the same backup onto a scratch LU, and puts
//! the volume back to a held snapshot with a reverse resync. Last, a second
//! small cluster whose array keeps the pairs' modes (db-server
//! `--array-mode stateful`, #19) makes one backup run, and the demo shows
//! the array's mode before, while the snapshot is held and after, and that
//! the array itself refuses a write to the mate alone.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use backup_server::store::{ChunkStore, DEFAULT_GC_GRACE};
use serde::Serialize;
use splitmirror_proto::units::format_bytes;
use tokio_util::sync::CancellationToken;

use crate::clients::Clients;
use crate::cluster::{Cluster, ClusterBuilder, SAVE_AREA_LU};
use crate::progress::ProgressSink;
use crate::restore::{RestoreReport, RestoreRequest, SnapshotRestoreReport};
use crate::run::{RunOptions, RunReport, backup_run_by};
use crate::status::pair_verify;
use db_server::manager::ArrayModeKeeping;
use splitmirror_proto::db::v1 as dpb;
use splitmirror_proto::reason::Reason;

/// What `console demo` runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub cycles: u32,
    /// Where the nodes keep their files; a temporary directory if `None`.
    pub dir: Option<PathBuf>,
    pub lu_size_bytes: u64,
    pub workload_tps: u32,
    pub workload_workers: u32,
    pub json: bool,
}

/// One demo cycle: the run's report and the ledger verifier's verdict.
#[derive(Debug, Clone, Serialize)]
pub struct DemoCycle {
    pub report: RunReport,
    pub ledger_ok: bool,
    pub ledger_highest_sequence: u64,
    pub ledger_violations: Vec<String>,
}

impl DemoCycle {
    pub fn succeeded(&self) -> bool {
        self.report.succeeded() && self.ledger_ok
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DemoSummary {
    /// The runs that split the pair.
    pub cycles: Vec<DemoCycle>,
    /// The run with a copy-on-write snapshot, after them (`None` when the
    /// demo did not get that far).
    pub cow_cycle: Option<DemoCycle>,
    pub verified_runs: usize,
    pub pair_equal_at_end: bool,
    pub transactions_committed: u64,
    pub data_dir: String,
    /// The way back, after the backup runs.
    pub way_back: WayBack,
    /// The run on a second cluster whose array keeps the modes (`None`
    /// when the demo did not get that far).
    pub stateful: Option<StatefulPart>,
}

impl DemoSummary {
    pub fn succeeded(&self) -> bool {
        self.verified_runs == self.cycles.len()
            && self.cow_cycle.as_ref().is_some_and(DemoCycle::succeeded)
            && self.pair_equal_at_end
            && self.way_back.succeeded()
            && self.stateful.as_ref().is_some_and(StatefulPart::succeeded)
    }
}

/// The pair's mode at one moment of the stateful run, as db-server
/// reports it and as the array's ModeSense page says.
#[derive(Debug, Clone, Serialize)]
pub struct ModeSeen {
    pub when: String,
    /// db-server's data mode.
    pub data_mode: String,
    /// The array's mode as db-server reports it (`VolumeStatus.array_mode`).
    pub db_server_says: String,
    /// The array's own mirroring management table (ModeSense of mirror LU
    /// 0), e.g. "SNAPSHOT".
    pub array_says: String,
}

/// One backup run on a cluster whose array keeps the pairs' modes.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StatefulPart {
    pub cycle: Option<DemoCycle>,
    /// Before the run, while its snapshot is held, after its delete.
    pub modes: Vec<ModeSeen>,
    /// The array refused a write naming the mate alone while the pair was
    /// Synchronized (reason mirror-mode).
    pub mate_write_refused: bool,
    pub pair_equal_at_end: bool,
    /// Volume 0 has three mates ([0020]): mate 1 and mate 2 split and
    /// backed up one after the other, resynced one at a time.
    pub three_mates: ThreeMates,
    pub errors: Vec<String>,
}

/// The three-mate sequence of the stateful part: split mate 1, later split
/// mate 2, back up both (each verified as a run verifies), delete mate 1
/// while mate 2 stays split, delete mate 2, compare every mate with the
/// origin.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ThreeMates {
    /// The runs of mate 1 and mate 2, each keeping its snapshot.
    pub cycles: Vec<DemoCycle>,
    /// Mate 2 was still split (its pair in Snapshot) after mate 1's resync.
    pub mate_2_split_while_mate_1_resynced: bool,
    /// Per mate, in order: origin == that mate (ChecksumRange) at the end.
    pub mates_equal_at_end: Vec<bool>,
}

impl ThreeMates {
    pub fn succeeded(&self) -> bool {
        self.cycles.len() == 2
            && self.cycles.iter().all(DemoCycle::succeeded)
            && self.mate_2_split_while_mate_1_resynced
            && self.mates_equal_at_end.len() == 3
            && self.mates_equal_at_end.iter().all(|&equal| equal)
    }
}

/// The array's modes the stateful run must show, in order.
const STATEFUL_MODES: [&str; 3] = ["SYNCHRONIZED", "SNAPSHOT", "SYNCHRONIZED"];

impl StatefulPart {
    pub fn succeeded(&self) -> bool {
        self.errors.is_empty()
            && self.cycle.as_ref().is_some_and(DemoCycle::succeeded)
            && self.mate_write_refused
            && self.pair_equal_at_end
            && self.three_mates.succeeded()
            && self.modes.len() == STATEFUL_MODES.len()
            && self
                .modes
                .iter()
                .zip(STATEFUL_MODES)
                .all(|(seen, want)| seen.db_server_says == want && seen.array_says == want)
    }
}

/// The demo's restores: of the last backup onto the corrupted volume, of
/// the same backup onto the scratch LU, and the reverse resync.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WayBack {
    /// The 1 MiB chunks of volume 0 overwritten with garbage.
    pub corrupted_chunks: Vec<u64>,
    pub restore: Option<RestoreReport>,
    /// The ledger's sequence a moment after the restore: it continues from
    /// the backup's.
    pub ledger_sequence_after: Option<u64>,
    pub to_lu: Option<RestoreReport>,
    pub snapshot_restore: Option<SnapshotRestoreReport>,
    pub errors: Vec<String>,
}

impl WayBack {
    pub fn succeeded(&self) -> bool {
        self.errors.is_empty()
            && self.restore.as_ref().is_some_and(RestoreReport::succeeded)
            && self.to_lu.as_ref().is_some_and(RestoreReport::succeeded)
            && self
                .snapshot_restore
                .as_ref()
                .is_some_and(|r| r.ledger_running)
    }
}

/// Exports backup `id` from the store as a raw image under the demo's
/// directory (`exports/<id>.raw`, the file `backup-server export` writes)
/// and answers its bytes, for the ledger verifier.
async fn export_and_read(cluster: &Cluster, id: &str) -> anyhow::Result<Vec<u8>> {
    let exports = cluster.dir.join("exports");
    std::fs::create_dir_all(&exports).with_context(|| format!("creating {}", exports.display()))?;
    let image = exports.join(format!("{id}.raw"));
    let store = ChunkStore::open(&cluster.store, DEFAULT_GC_GRACE)
        .await
        .with_context(|| format!("opening the store {}", cluster.store))?;
    store
        .export(id, &image)
        .await
        .with_context(|| format!("exporting backup {id} to {}", image.display()))?;
    std::fs::read(&image).with_context(|| format!("reading {}", image.display()))
}

/// Runs the demo: starts the cluster, performs the runs, stops the
/// cluster, and answers the summary. It fails only when the demo could not
/// run (a node did not start); failed runs are in the summary.
pub async fn demo(
    options: &DemoOptions,
    progress: &dyn ProgressSink,
) -> anyhow::Result<DemoSummary> {
    let say = |text: String| {
        if !options.json {
            // A reader that went away (`console demo | head`) must not
            // panic the demo; it runs to its end and cleans up.
            let _ = std::io::Write::write_fmt(&mut std::io::stdout(), format_args!("{text}\n"));
        }
    };
    let mut builder = ClusterBuilder::new()
        .lu_size_bytes(options.lu_size_bytes)
        .ledger(Some(db_server::ledger::LedgerConfig {
            target_tps: options.workload_tps,
            workers: options.workload_workers,
            ..db_server::ledger::LedgerConfig::default()
        }))
        // The pairs' first comparison is waited for below, with progress.
        .wait_synchronized(false)
        // A plain LU to show a restore elsewhere (--to-lu).
        .scratch_lu(true)
        // Volume 0's save area, as large as the volume: the copy-on-write
        // run cannot fill it.
        .save_area(None);
    if let Some(dir) = &options.dir {
        builder = builder.dir(dir);
    }
    say(
        "splitmirror demo: array-node, db-server (ledger running) and backup-server on loopback"
            .to_string(),
    );
    let cluster = builder.start().await.context("starting the nodes")?;
    let data_dir = cluster.dir.display().to_string();
    say(format!(
        "nodes up: array {} · db {} · backup {}; volume 0 is {} with 4096-byte blocks; data in {data_dir}",
        cluster.array.addr,
        cluster.db.addr,
        cluster.backup.addr,
        format_bytes(options.lu_size_bytes)
    ));
    let result = run_cycles(options, &cluster, progress, &say).await;
    let shutdown = cluster.shutdown().await;
    let summary = result?;
    shutdown.context("stopping the nodes")?;
    let stateful = stateful_part(options, progress, &say).await;
    say(format!("   the stateful run: {}", stateful.verdict()));
    Ok(DemoSummary {
        data_dir,
        stateful: Some(stateful),
        ..summary
    })
}

impl StatefulPart {
    /// One line for the demo's end.
    fn verdict(&self) -> String {
        let modes = self
            .modes
            .iter()
            .map(|m| m.array_says.as_str())
            .collect::<Vec<_>>()
            .join(" → ");
        if self.succeeded() {
            format!(
                "verified; the array's mode {modes}; it refused a write to the mate alone itself (reason mirror-mode); origin == mate after the resync; with three mates, mate 1 and mate 2 backed up and resynced one at a time, origin == every mate at the end"
            )
        } else {
            let mut why = self.errors.clone();
            if !self.cycle.as_ref().is_some_and(DemoCycle::succeeded) {
                why.push("the backup run did not verify".into());
            }
            if !self.mate_write_refused {
                why.push("the array did not refuse the write to the mate alone".into());
            }
            if !self.pair_equal_at_end {
                why.push("origin != mate after the resync".into());
            }
            if !self.three_mates.succeeded() {
                why.push(format!(
                    "the three-mate sequence did not verify (runs verified: {}, mate 2 split while mate 1 resynced: {}, origin == mate 1, 2, 3: {:?})",
                    self.three_mates.cycles.iter().filter(|c| c.succeeded()).count(),
                    self.three_mates.mate_2_split_while_mate_1_resynced,
                    self.three_mates.mates_equal_at_end
                ));
            }
            format!(
                "FAILED ({}); the array's mode {modes}, expected {}",
                why.join("; "),
                STATEFUL_MODES.join(" → ")
            )
        }
    }
}

/// The stateful part: a second cluster (small, no save area) whose
/// db-server runs `--array-mode stateful`, one split backup run that keeps
/// its snapshot, the modes before, while held and after the delete, and a
/// write to the mate alone that the array must refuse. Its failures are
/// recorded, never returned.
async fn stateful_part(
    options: &DemoOptions,
    progress: &dyn ProgressSink,
    say: &dyn Fn(String),
) -> StatefulPart {
    let mut part = StatefulPart::default();
    say(
        "\n== the array keeps the mode (#19): a second cluster, db-server --array-mode stateful: \
         db-server sets each pair's mode in the array (ModeSelect) and the array enforces it; \
         each mirror LU has three mates ([0020]), each (mirror LU, mate) a pair with its own mode"
            .to_string(),
    );
    let mut builder = ClusterBuilder::new()
        .lu_size_bytes(options.lu_size_bytes)
        .ledger(Some(db_server::ledger::LedgerConfig {
            target_tps: options.workload_tps,
            workers: options.workload_workers,
            ..db_server::ledger::LedgerConfig::default()
        }))
        .array_mode(ArrayModeKeeping::Stateful)
        .mates(3);
    if let Some(dir) = &options.dir {
        builder = builder.dir(dir.join("stateful"));
    }
    let cluster = match builder.start().await {
        Ok(cluster) => cluster,
        Err(error) => {
            part.errors
                .push(format!("starting the stateful cluster: {error}"));
            return part;
        }
    };
    if let Err(error) = stateful_run(&cluster, progress, say, &mut part).await {
        part.errors.push(format!("{error:#}"));
    } else if let Err(error) = three_mates(&cluster, progress, say, &mut part.three_mates).await {
        part.errors.push(format!("three mates: {error:#}"));
    }
    if let Err(error) = cluster.shutdown().await {
        part.errors
            .push(format!("stopping the stateful cluster: {error}"));
    }
    part
}

/// Volume 0 with three mates: mate 1 split and backed up, the ledger
/// writes, mate 2 split and backed up, the ledger writes; mate 1 deleted
/// and resynced while mate 2 stays split; mate 2 deleted and resynced;
/// then origin compared with every mate (ChecksumRange, quiesced).
async fn three_mates(
    cluster: &Cluster,
    progress: &dyn ProgressSink,
    say: &dyn Fn(String),
    part: &mut ThreeMates,
) -> anyhow::Result<()> {
    let clients = &cluster.clients;
    let status = clients.db.status(false).await?;
    let listed = crate::mates::count(&status.volumes, 0);
    anyhow::ensure!(
        listed == 3,
        "db-server lists {listed} mate(s) of volume 0, not 3"
    );
    say("\n  three mates: split mate 1, later mate 2; each backed up and verified".to_string());
    let mut run_ids = Vec::new();
    for mate in [1, 2] {
        let label = format!("demo run stateful, mate {mate}");
        let method = dpb::SnapshotMethod::Unspecified;
        let cycle = run_cycle_of_mate(cluster, &label, mate, method, true, progress, say).await;
        let kept = cycle.report.backup_id.is_some() && !cycle.report.snapshot_deleted;
        run_ids.push(cycle.report.run_id.clone());
        part.cycles.push(cycle);
        anyhow::ensure!(kept, "the run of mate {mate} did not keep its snapshot");
        // The ledger writes while the mate is split: recorded in the
        // table of every split mate.
        let committed = ledger_committed(clients).await?;
        cluster
            .wait_for_transactions(committed + 100, Duration::from_secs(30))
            .await
            .with_context(|| format!("the ledger while mate {mate} is split"))?;
    }
    let dirty = |status: &dpb::StatusResponse, mate| {
        crate::mates::pick(&status.volumes, 0, mate).map_or(0, |v| v.dirty_blocks)
    };
    let status = clients.db.status(false).await?;
    say(format!(
        "  {:<18} mate 1: {} blocks recorded, mate 2: {} (each split mate has its own table)",
        "both split",
        dirty(&status, 1),
        dirty(&status, 2)
    ));
    let deleted = clients
        .db
        .delete_snapshot_of(0, 1, &run_ids[0], false)
        .await?;
    crate::run::wait_synchronized_mate(clients, 0, 1, progress).await?;
    progress.finish();
    let mate_2 = crate::mates::volume_status_of(&clients.db, 0, 2).await?;
    part.mate_2_split_while_mate_1_resynced =
        mate_2.data_mode() == dpb::Mode::Snapshot && mate_2.snapshot_holder == run_ids[1];
    say(format!(
        "  {:<18} mate 1: {} blocks resynchronized; mate 2 still {:?}, held by its run",
        "delete mate 1",
        deleted.blocks_to_resync,
        mate_2.data_mode()
    ));
    let deleted = clients
        .db
        .delete_snapshot_of(0, 2, &run_ids[1], false)
        .await?;
    crate::run::wait_synchronized_mate(clients, 0, 2, progress).await?;
    progress.finish();
    say(format!(
        "  {:<18} mate 2: {} blocks resynchronized",
        "delete mate 2", deleted.blocks_to_resync
    ));
    for mate in 1..=3 {
        let pair = crate::status::pair_verify_mate(clients, 0, mate, true).await?;
        let equal = pair.differing_chunks.is_empty();
        part.mates_equal_at_end.push(equal);
        say(format!(
            "  {:<18} origin LU {} {} mate {mate} (LU {}), {} chunks compared by ChecksumRange",
            "pair",
            pair.origin_lu,
            if equal { "==" } else { "!=" },
            pair.mate_lu,
            pair.chunks - pair.skipped_chunks
        ));
    }
    Ok(())
}

/// Volume 0's mode, from db-server's status and the array's ModeSense.
async fn mode_seen(clients: &Clients, when: &str) -> anyhow::Result<ModeSeen> {
    let status = clients.db.volume_status(0).await?;
    let page = clients.array.mode_sense(status.mirror_lu).await?;
    let mut array_says = page
        .mirror_mode
        .as_str_name()
        .trim_start_matches("MIRROR_MODE_")
        .to_string();
    if page.mate_writable {
        array_says.push_str(" (mate writable)");
    }
    Ok(ModeSeen {
        when: when.to_string(),
        data_mode: format!("{:?}", status.data_mode()),
        db_server_says: crate::status::array_mode(&status)
            .unwrap_or("- (db-server reports the volume stateless)")
            .to_string(),
        array_says,
    })
}

/// The ledger's committed transactions.
async fn ledger_committed(clients: &Clients) -> anyhow::Result<u64> {
    Ok(clients
        .db
        .status(false)
        .await?
        .ledger
        .map_or(0, |l| l.transactions_committed))
}

/// While the pair is Synchronized, a write naming the mate alone would
/// break the mirror: the array itself must refuse it (reason mirror-mode),
/// even from the pair's owner (the cluster's array client acts as
/// db-server, which LUN masking lets write the mate). The block written is
/// the one the mate holds, so that an array that accepted it changes
/// nothing.
async fn mate_write_refused(
    clients: &Clients,
    say: &dyn Fn(String),
    part: &mut StatefulPart,
) -> anyhow::Result<()> {
    let volume = clients.db.volume_status(0).await?;
    let mate = volume.mate_lu;
    let held = clients.array.read(mate, 0, 1).await?;
    match clients.array.write(mate, 0, held).await {
        Err(error) if error.reason == Some(Reason::MirrorMode) => {
            part.mate_write_refused = true;
            say(format!(
                "  {:<18} refused by the array: {error}",
                format!("write to mate {mate}")
            ));
        }
        Err(error) => part.errors.push(format!(
            "a write to mate LU {mate} alone while Synchronized was refused for another reason than mirror-mode: {error}"
        )),
        Ok(_) => part.errors.push(format!(
            "the array accepted a write to mate LU {mate} alone while the pair was Synchronized"
        )),
    }
    Ok(())
}

async fn stateful_run(
    cluster: &Cluster,
    progress: &dyn ProgressSink,
    say: &dyn Fn(String),
    part: &mut StatefulPart,
) -> anyhow::Result<()> {
    let clients = &cluster.clients;
    cluster
        .wait_for_transactions(100, Duration::from_secs(30))
        .await?;
    let show = |seen: &ModeSeen| {
        say(format!(
            "  {:<18} db-server: {}, the array's mode {} (db-server says {})",
            seen.when, seen.data_mode, seen.array_says, seen.db_server_says
        ))
    };
    let before = mode_seen(clients, "before the run").await?;
    show(&before);
    part.modes.push(before);
    mate_write_refused(clients, say, part).await?;
    // The run keeps its snapshot, so that the mode while it is held can be
    // shown; the demo deletes it after.
    let cycle = run_cycle_keeping(cluster, "demo run stateful", true, progress, say).await;
    let run_id = cycle.report.run_id.clone();
    let kept = cycle.report.backup_id.is_some() && !cycle.report.snapshot_deleted;
    part.cycle = Some(cycle);
    anyhow::ensure!(kept, "the stateful run did not keep its snapshot");
    let held = mode_seen(clients, "snapshot held").await?;
    show(&held);
    part.modes.push(held);
    // db-server writes the mirror LU in every mode: the array sends the
    // ledger's writes to the origin alone while the snapshot is held.
    let committed = ledger_committed(clients).await?;
    cluster
        .wait_for_transactions(committed + 100, Duration::from_secs(30))
        .await
        .context("the ledger while the snapshot is held")?;
    let dirty = clients.db.volume_status(0).await?.dirty_blocks;
    say(format!(
        "  {:<18} committed {} more transactions, written through the mirror LU (the array kept them on the origin: {dirty} blocks recorded)",
        "ledger while held",
        ledger_committed(clients).await?.saturating_sub(committed)
    ));
    let deleted = clients.db.delete_snapshot(0, &run_id, false).await?;
    crate::run::wait_synchronized(clients, 0, progress).await?;
    progress.finish();
    let after = mode_seen(clients, "after the resync").await?;
    say(format!(
        "  {:<18} {} blocks resynchronized (while the pair resynchronizes the array refuses reads and writes naming the mate)",
        "delete", deleted.blocks_to_resync
    ));
    show(&after);
    part.modes.push(after);
    let pair = pair_verify(clients, 0, true).await?;
    part.pair_equal_at_end = pair.differing_chunks.is_empty();
    say(format!(
        "  {:<18} origin {} mate",
        "pair",
        if part.pair_equal_at_end { "==" } else { "!=" }
    ));
    Ok(())
}

async fn run_cycles(
    options: &DemoOptions,
    cluster: &Cluster,
    progress: &dyn ProgressSink,
    say: &dyn Fn(String),
) -> anyhow::Result<DemoSummary> {
    let clients: &Clients = &cluster.clients;
    // A first start compares origin and mate of each pair (no journal knew
    // them) before the pair is Synchronized; then let the ledger get going,
    // so that the first snapshot freezes a busy database.
    crate::run::wait_synchronized(clients, 0, progress)
        .await
        .context("waiting for volume 0 to be Synchronized")?;
    progress.finish();
    cluster
        .wait_for_transactions(100, Duration::from_secs(30))
        .await?;
    let mut cycles = Vec::new();
    for cycle in 1..=options.cycles {
        say(format!(
            "\n== backup run {cycle} of {} (split snapshot)",
            options.cycles
        ));
        let label = format!("demo run {cycle}");
        let cycle_result =
            run_cycle(cluster, &label, dpb::SnapshotMethod::Split, progress, say).await;
        cycles.push(cycle_result);
    }
    say(format!(
        "\n== backup run with a copy-on-write snapshot (save area LU {SAVE_AREA_LU}): the pair stays whole, \
         the backup reads the snapshot through db-server, nothing to resync"
    ));
    let cow_cycle = run_cycle(
        cluster,
        "demo run copy-on-write",
        dpb::SnapshotMethod::Cow,
        progress,
        say,
    )
    .await;
    finish_cycles(options, cluster, cycles, cow_cycle, progress, say).await
}

/// One backup run by `method`, its report and the ledger verifier's
/// verdict on its exported image, printed.
async fn run_cycle(
    cluster: &Cluster,
    label: &str,
    method: dpb::SnapshotMethod,
    progress: &dyn ProgressSink,
    say: &dyn Fn(String),
) -> DemoCycle {
    run_cycle_by(cluster, label, method, false, progress, say).await
}

/// [`run_cycle`] by the server's default method (split), keeping the
/// snapshot after the backup with `keep_snapshot`.
async fn run_cycle_keeping(
    cluster: &Cluster,
    label: &str,
    keep_snapshot: bool,
    progress: &dyn ProgressSink,
    say: &dyn Fn(String),
) -> DemoCycle {
    let method = dpb::SnapshotMethod::Unspecified;
    run_cycle_of_mate(cluster, label, 1, method, keep_snapshot, progress, say).await
}

async fn run_cycle_by(
    cluster: &Cluster,
    label: &str,
    method: dpb::SnapshotMethod,
    keep_snapshot: bool,
    progress: &dyn ProgressSink,
    say: &dyn Fn(String),
) -> DemoCycle {
    run_cycle_of_mate(cluster, label, 1, method, keep_snapshot, progress, say).await
}

/// [`run_cycle_by`] of volume 0's mate `mate` (counted from 1).
async fn run_cycle_of_mate(
    cluster: &Cluster,
    label: &str,
    mate: u32,
    method: dpb::SnapshotMethod,
    keep_snapshot: bool,
    progress: &dyn ProgressSink,
    say: &dyn Fn(String),
) -> DemoCycle {
    let clients: &Clients = &cluster.clients;
    let run_options = RunOptions {
        volume: 0,
        mate,
        keep_snapshot,
        label: label.to_string(),
        max_bytes_per_s: None,
        cancel: CancellationToken::new(),
        verify_read: false,
    };
    let report = backup_run_by(clients, &run_options, method, progress).await;
    let mut cycle_result = DemoCycle {
        ledger_ok: false,
        ledger_highest_sequence: 0,
        ledger_violations: Vec::new(),
        report,
    };
    if let Some(id) = &cycle_result.report.backup_id {
        match export_and_read(cluster, id).await {
            Ok(bytes) => {
                let verdict = db_server::ledger_format::verify_image(
                    &bytes,
                    cycle_result.report.ledger_sequence,
                );
                cycle_result.ledger_ok = verdict.ok;
                cycle_result.ledger_highest_sequence = verdict.highest_sequence;
                cycle_result.ledger_violations = verdict.violations;
            }
            Err(e) => cycle_result.ledger_violations.push(format!("{e:#}")),
        }
    }
    say(cycle_result.report.render().trim_end().to_string());
    // The array's pace of background copies just after the backup's
    // reads: the last second it reports is the backup's tail.
    match clients.array.pace().await {
        Ok(pace) => say(format!(
            "  {:<18} {} (moved {} over the last second)",
            "background pace",
            pace.why,
            splitmirror_proto::pace::format_rate(pace.background_bytes_per_s)
        )),
        Err(e) => say(format!("  {:<18} unknown: {e}", "background pace")),
    }
    say(format!(
        "  {:<18} {}",
        "ledger image",
        if cycle_result.ledger_ok {
            format!(
                "consistent at sequence {} (exported image, db-server verify-image)",
                cycle_result.ledger_highest_sequence
            )
        } else {
            format!("INCONSISTENT: {:?}", cycle_result.ledger_violations)
        }
    ));
    cycle_result
}

/// After the runs: the pair compared, the summary, the way back.
async fn finish_cycles(
    options: &DemoOptions,
    cluster: &Cluster,
    cycles: Vec<DemoCycle>,
    cow_cycle: DemoCycle,
    progress: &dyn ProgressSink,
    say: &dyn Fn(String),
) -> anyhow::Result<DemoSummary> {
    let clients: &Clients = &cluster.clients;
    let pair = pair_verify(clients, 0, true)
        .await
        .context("comparing origin and mate at the end")?;
    let status = crate::status::fetch(clients).await?;
    let transactions_committed = status.db.ledger.map_or(0, |l| l.transactions_committed);
    let verified_runs = cycles.iter().filter(|c| c.succeeded()).count();
    let mut freeze: Vec<u64> = cycles
        .iter()
        .filter_map(|c| c.report.freeze_window_us)
        .collect();
    freeze.sort_unstable();
    let cow_verdict = if cow_cycle.succeeded() {
        "verified (backup = the snapshot re-read through db-server, ledger consistent)".to_string()
    } else {
        format!(
            "FAILED: {}",
            cow_cycle
                .report
                .error
                .clone()
                .unwrap_or_else(|| format!("ledger violations {:?}", cow_cycle.ledger_violations))
        )
    };
    say(format!(
        "\n== summary: {verified_runs} of {} split runs verified (backup = frozen mate, ledger consistent); \
         origin {} mate after the last resync; freeze window max {} µs; {transactions_committed} ledger transactions meanwhile",
        cycles.len(),
        if pair.differing_chunks.is_empty() {
            "=="
        } else {
            "!="
        },
        freeze.last().copied().unwrap_or(0),
    ));
    say(format!(
        "   the copy-on-write run: {cow_verdict}; freeze window {} µs, resync after its delete: {} blocks",
        cow_cycle.report.freeze_window_us.unwrap_or(0),
        cow_cycle.report.resync_blocks
    ));
    // What each run read and stored: after the first, only what changed.
    for (i, cycle) in cycles.iter().enumerate() {
        let c = &cycle.report.counts;
        if let (Some(read), Some(reused), Some(zero), Some(stored)) = (
            c.chunks_read,
            c.chunks_reused,
            c.chunks_zero,
            c.new_bytes_stored,
        ) {
            say(format!(
                "   run {} read {read} of {} chunks, stored {} new ({reused} already stored, {zero} zero)",
                i + 1,
                read + reused + zero,
                format_bytes(stored)
            ));
        }
    }
    let last_backup = cycles
        .iter()
        .rev()
        .find(|c| c.succeeded())
        .and_then(|c| c.report.backup_id.clone());
    let way_back = match last_backup {
        Some(backup_id) => way_back(options, cluster, &backup_id, progress, say).await,
        None => WayBack {
            errors: vec!["no verified backup to restore".into()],
            ..WayBack::default()
        },
    };
    Ok(DemoSummary {
        cycles,
        cow_cycle: Some(cow_cycle),
        verified_runs,
        pair_equal_at_end: pair.differing_chunks.is_empty(),
        transactions_committed,
        data_dir: String::new(),
        way_back,
        stateful: None,
    })
}

/// How many chunks of volume 0 the demo corrupts.
const CORRUPTED_CHUNKS: u64 = 3;

/// The way back: corrupt, restore, restore elsewhere, reverse resync. Each
/// failure is recorded and the next step still runs where it can.
async fn way_back(
    options: &DemoOptions,
    cluster: &Cluster,
    backup_id: &str,
    progress: &dyn ProgressSink,
    say: &dyn Fn(String),
) -> WayBack {
    let mut way_back = WayBack::default();
    let clients = &cluster.clients;
    let chunk_bytes = crate::run::CHUNK_SIZE_BYTES;
    let chunks = (options.lu_size_bytes / chunk_bytes).max(1);
    // The first chunk (the ledger's superblock and first accounts), one in
    // the middle and the last: spread over the volume, and the ledger's
    // image would fail its check.
    let mut picked: Vec<u64> = [0, chunks / 2, chunks - 1]
        .into_iter()
        .take(CORRUPTED_CHUNKS as usize)
        .collect();
    picked.dedup();
    say(format!(
        "\n== the way back: corrupting volume 0 ({} chunks of 1 MiB overwritten with garbage through the array)",
        picked.len()
    ));
    for &chunk in &picked {
        // Random garbage: no chunk of a backup holds it.
        let mut data = vec![0u8; chunk_bytes as usize];
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let mut rng = <rand::rngs::SmallRng as rand::SeedableRng>::seed_from_u64(seed ^ chunk);
        rand::Rng::fill(&mut rng, &mut data[..]);
        // The cluster's array client acts as db-server, the owner: it may
        // write the mirror LU (origin and mate both get the garbage).
        let lba = chunk * chunk_bytes / 4096;
        if let Err(error) = clients.array.write(0, lba, data).await {
            way_back
                .errors
                .push(format!("corrupting chunk {chunk}: {error}"));
            return way_back;
        }
    }
    way_back.corrupted_chunks = picked;
    say(format!(
        "   chunks {:?} corrupted; the ledger keeps running from memory, but its volume no longer holds it",
        way_back.corrupted_chunks
    ));
    say(format!(
        "\n== restoring backup {backup_id} onto volume 0 (safety backup first; only the chunks that differ are written)"
    ));
    match crate::restore::restore(clients, &RestoreRequest::volume(0, backup_id), progress).await {
        Ok(report) => {
            say(report.render().trim_end().to_string());
            way_back.restore = Some(report);
        }
        Err(error) => {
            if let Some(report) = error.report() {
                say(report.render().trim_end().to_string());
            }
            way_back.errors.push(format!("restore: {error}"));
            return way_back;
        }
    }
    // What was written beyond the corruption: the chunks the ledger changed
    // after the backup was taken, put back too.
    if let Some(report) = &way_back.restore {
        let corrupted = way_back.corrupted_chunks.len() as u64;
        say(format!(
            "   {} chunks written: the {corrupted} corrupted and {} the ledger had changed since the backup; the other {} were left alone",
            report.chunks_written,
            report.chunks_written.saturating_sub(corrupted),
            report.chunks_total.saturating_sub(report.chunks_written),
        ));
    }
    // The ledger continues from the backup's sequence.
    let backup_sequence = way_back
        .restore
        .as_ref()
        .and_then(|r| r.backup_ledger_sequence);
    tokio::time::sleep(Duration::from_millis(500)).await;
    match clients.db.status(false).await {
        Ok(status) => {
            let now = status.ledger.as_ref().map(|l| l.sequence);
            way_back.ledger_sequence_after = now;
            say(format!(
                "   ledger: reopened from the backup's sequence {}, at {} half a second later",
                backup_sequence.map_or("-".into(), |s| s.to_string()),
                now.map_or("-".into(), |s| s.to_string()),
            ));
        }
        Err(error) => way_back
            .errors
            .push(format!("status after the restore: {error}")),
    }
    say(format!(
        "\n== restoring backup {backup_id} elsewhere: onto the plain LU {} (no volume touched)",
        crate::cluster::SCRATCH_LU
    ));
    let request = RestoreRequest::to_lu(crate::cluster::SCRATCH_LU, backup_id);
    match crate::restore::restore(clients, &request, progress).await {
        Ok(report) => {
            say(report.render().trim_end().to_string());
            way_back.to_lu = Some(report);
        }
        Err(error) => {
            if let Some(report) = error.report() {
                say(report.render().trim_end().to_string());
            }
            way_back.errors.push(format!("restore to LU 6: {error}"));
        }
    }
    if let Err(error) = reverse_resync(cluster, progress, say, &mut way_back).await {
        way_back.errors.push(format!("reverse resync: {error:#}"));
    }
    way_back
}

/// Acquires a snapshot, lets the ledger write, and puts the volume back to
/// the snapshot (the reverse resync).
async fn reverse_resync(
    cluster: &Cluster,
    progress: &dyn ProgressSink,
    say: &dyn Fn(String),
    way_back: &mut WayBack,
) -> anyhow::Result<()> {
    let clients = &cluster.clients;
    let run_id = uuid::Uuid::now_v7().to_string();
    say("\n== reverse resync: acquire a snapshot, let the ledger write, put the volume back to the snapshot".to_string());
    let acquired = clients.db.acquire_snapshot(0, &run_id).await?;
    let committed = clients
        .db
        .status(false)
        .await?
        .ledger
        .map_or(0, |l| l.transactions_committed);
    cluster
        .wait_for_transactions(committed + 300, Duration::from_secs(30))
        .await?;
    let before = clients.db.volume_status(0).await?;
    say(format!(
        "   snapshot at ledger sequence {}; since then the ledger wrote {} blocks ({} ranges recorded)",
        acquired.ledger_sequence,
        before.dirty_blocks,
        before.dirty_ranges.len()
    ));
    let report = crate::restore::restore_snapshot(clients, 0, &run_id, progress).await?;
    say(report.render().trim_end().to_string());
    say(format!(
        "   the volume is back at the snapshot: the ledger reopened from sequence {} (the {} blocks written since were undone by copying {} back)",
        report.snapshot_ledger_sequence,
        before.dirty_blocks,
        format_bytes(report.bytes_copied)
    ));
    way_back.snapshot_restore = Some(report);
    Ok(())
}
