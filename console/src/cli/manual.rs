//! The commands an operator runs by hand: `snapshot`, `db`, `backup`,
//! `pair verify` and `status`. Each makes its calls once (no retry: the
//! operator sees the error and decides) and prints what happened.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use futures_util::StreamExt;
use splitmirror_console::clients::Clients;
use splitmirror_console::mates::{mate_or_first, of_mate};
use splitmirror_console::progress;
use splitmirror_console::run::{StoreCounts, state_name};
use splitmirror_console::status;
use splitmirror_proto::backup::v1 as bpb;
use splitmirror_proto::db::v1 as dpb;
use splitmirror_proto::node;
use splitmirror_proto::units::format_bytes;

use super::output::{exit, print, print_json, println, stdout_closed};

/// Why `snapshot acquire` is refused before any call.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AcquireArgsError {
    /// A copy-on-write snapshot leaves the pair whole: there is no mate of
    /// its own to write.
    #[error(
        "--writable needs a split snapshot: a copy-on-write snapshot keeps the pair whole, so it has no mate of its own to write (drop --writable or --snapshot-method cow)"
    )]
    WritableCow,
}

/// The request `snapshot acquire` sends: a new run id unless one is named;
/// `--writable` with `--snapshot-method cow` is refused here (db-server
/// would refuse it too, INVALID_ARGUMENT).
pub fn acquire_request(
    volume: u32,
    mate: u32,
    run_id: Option<String>,
    method: dpb::SnapshotMethod,
    writable: bool,
) -> Result<dpb::AcquireSnapshotRequest, AcquireArgsError> {
    if writable && method == dpb::SnapshotMethod::Cow {
        return Err(AcquireArgsError::WritableCow);
    }
    Ok(dpb::AcquireSnapshotRequest {
        volume,
        run_id: run_id.unwrap_or_else(|| uuid::Uuid::now_v7().to_string()),
        method: method.into(),
        writable,
        mate,
    })
}

/// `console snapshot acquire`: suspends, splits, resumes; prints the run id
/// that holds the snapshot.
pub async fn snapshot_acquire(
    clients: &Clients,
    request: dpb::AcquireSnapshotRequest,
) -> anyhow::Result<ExitCode> {
    let (volume, run_id, writable) = (request.volume, request.run_id.clone(), request.writable);
    let asked_mate = mate_or_first(request.mate);
    let a = clients.db.acquire_snapshot_with(request).await?;
    // A db-server that does not know several mates splits mate 1 whatever
    // it is asked (and answers mate 0): say so rather than print mate 1's
    // snapshot as the one asked for.
    let split_mate = mate_or_first(a.mate);
    if split_mate != asked_mate {
        anyhow::bail!(
            "asked for a snapshot of mate {asked_mate} of volume {volume}, db-server split mate {split_mate} (mate LU {}) for run {run_id}: it does not know several mates; `console snapshot delete --volume {volume} --run-id {run_id}` releases it",
            a.mate_lu
        );
    }
    let already = if a.already_held {
        " (already held)"
    } else {
        ""
    };
    let image = match a.method() {
        dpb::SnapshotMethod::Cow => format!(
            "copy-on-write (read the image through db-server's snapshot virtual LU; mate LU {} goes on being written)",
            a.mate_lu
        ),
        dpb::SnapshotMethod::Split | dpb::SnapshotMethod::Unspecified if writable => format!(
            "split, mate LU {} writable while held (the resync undoes its writes; it cannot be backed up)",
            a.mate_lu
        ),
        dpb::SnapshotMethod::Split | dpb::SnapshotMethod::Unspecified => {
            format!("split, mate LU {}", a.mate_lu)
        }
    };
    println(&format!(
        "snapshot of volume {volume}{} acquired by run {run_id}: {image}, freeze window {} µs, ledger sequence {}{already}",
        of_mate(split_mate),
        a.freeze_window_us,
        a.ledger_sequence,
    ))?;
    if writable && a.already_held {
        // A retry answers the snapshot held, whatever it asked.
        println(
            "  (a snapshot already held stays as it was acquired: `console status` says whether it is writable)",
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `console snapshot delete`: releases the snapshot and starts the resync.
pub async fn snapshot_delete(
    clients: &Clients,
    volume: u32,
    mate: u32,
    run_id: &str,
    force: bool,
) -> anyhow::Result<ExitCode> {
    let d = clients
        .db
        .delete_snapshot_of(volume, mate, run_id, force)
        .await?;
    let already = if d.already_deleted {
        " (already deleted)"
    } else {
        ""
    };
    println(&format!(
        "snapshot of volume {volume}{} deleted; resyncing {} ranges ({} blocks){already}",
        of_mate(mate),
        d.ranges_to_resync,
        d.blocks_to_resync,
    ))?;
    Ok(ExitCode::SUCCESS)
}

/// `console db suspend`: closes the write gate for at most `lease`.
pub async fn db_suspend(clients: &Clients, lease: Duration) -> anyhow::Result<ExitCode> {
    let lease_ms = u32::try_from(lease.as_millis()).unwrap_or(u32::MAX);
    let s = clients.db.suspend(lease_ms).await?;
    println(&format!(
        "database suspended at ledger sequence {}; it resumes by itself in {} ms",
        s.ledger_sequence, s.lease_ms
    ))?;
    Ok(ExitCode::SUCCESS)
}

/// `console db resume`: opens the write gate.
pub async fn db_resume(clients: &Clients) -> anyhow::Result<ExitCode> {
    let r = clients.db.resume().await?;
    if r.was_suspended {
        println(&format!("database resumed after {} µs", r.suspended_us))?;
    } else {
        println("the database was not suspended (a lease may have run out)")?;
    }
    Ok(ExitCode::SUCCESS)
}

/// What `console backup start` copies.
pub struct BackupStart {
    pub lu: u32,
    /// The snapshot that freezes the LU: its volume and holder run id.
    pub snapshot: Option<(u32, String)>,
    /// Which of the volume's mates the snapshot split (counted from 1).
    pub mate: u32,
    /// Copy without a snapshot.
    pub live: bool,
    pub label: String,
    pub max_bytes_per_s: Option<u64>,
    /// Read also the chunks the store holds (`StartBackupRequest.verify_read`).
    pub verify_read: bool,
}

/// `console backup start`: starts the backup, follows it (Ctrl-C cancels
/// it), and prints how it ended; exit 0 only if it completed.
pub async fn backup_start(clients: &Clients, start: BackupStart) -> anyhow::Result<ExitCode> {
    let lu = start.lu;
    let snapshot = start
        .snapshot
        .map(|(volume, holder_run_id)| bpb::SnapshotRef {
            volume,
            holder_run_id,
            mate: mate_or_first(start.mate),
        });
    let request = bpb::StartBackupRequest {
        // One backup per snapshot holder; a live copy gets its own.
        run_id: snapshot.as_ref().map_or_else(
            || uuid::Uuid::now_v7().to_string(),
            |s| s.holder_run_id.clone(),
        ),
        lu,
        expected_block_count: None,
        label: start.label,
        max_bytes_per_s: start.max_bytes_per_s,
        snapshot,
        live: start.live,
        verify_read: start.verify_read,
    };
    let backup = &clients.backup;
    let started = backup.start_backup(request).await?;
    let backup_id = started.backup_id.as_str();
    let mut stream = backup.watch_backup(backup_id).await?;
    let sink = progress::for_stderr();
    sink.phase(&format!("backing up LU {lu} as {backup_id}"));
    loop {
        let message = tokio::select! {
            message = stream.next() => message,
            () = node::shutdown_signal() => {
                let info = backup.cancel_backup(backup_id).await?;
                sink.finish();
                println(&format!("{}: {}", info.backup_id, state_name(info.state())))?;
                return Ok(ExitCode::FAILURE);
            }
        };
        match message {
            Some(Ok(p)) if p.bytes_total > 0 => {
                sink.backup(p.bytes_done, p.bytes_total, p.throughput_bytes_per_s)
            }
            Some(Ok(_)) => {}
            None => break,
            Some(Err(error)) => return Err(error.into()),
        }
    }
    sink.finish();
    let info = backup.get_backup(backup_id, false).await?;
    let error = if info.error.is_empty() {
        String::new()
    } else {
        format!(": {}", info.error)
    };
    println(&format!(
        "{}: {}, LU {}, {}, {}{error}",
        info.backup_id,
        state_name(info.state()),
        info.lu,
        format_bytes(info.bytes_done),
        info.consistency,
    ))?;
    if let Some(summary) = info
        .manifest
        .as_ref()
        .and_then(|m| StoreCounts::of(m).summary())
    {
        println(&format!("  {summary}"))?;
    }
    Ok(exit(info.state() == bpb::BackupState::Complete))
}

/// `console backup list`: the generations of each volume, the store, and
/// the jobs that did not complete.
pub async fn backup_list(clients: &Clients, json: bool) -> anyhow::Result<ExitCode> {
    let listed = clients.backup.list_backups_and_store().await?;
    let list = BackupList::of(&listed);
    if json {
        let flat = status::to_json(&status::Snapshot {
            db: dpb::StatusResponse::default(),
            backups: Some(listed.backups.clone()),
        })["backups"]
            .clone();
        let mut value = list.to_json();
        value["backups"] = flat;
        println(&value.to_string())?;
    } else {
        print(&list.render())?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Whose generation a complete backup is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Lineage {
    /// Frozen by a snapshot of this volume.
    Volume(u32),
    /// Copied live (not frozen).
    Live,
    /// Neither recorded (manifests of format 1).
    Unrecorded,
}

impl Lineage {
    fn of(b: &bpb::BackupInfo) -> Self {
        let snapshot = b
            .snapshot
            .as_ref()
            .or_else(|| b.manifest.as_ref().and_then(|m| m.snapshot.as_ref()));
        match snapshot {
            Some(s) => Self::Volume(s.volume),
            None if b.live || b.manifest.as_ref().is_some_and(|m| m.live) => Self::Live,
            None => Self::Unrecorded,
        }
    }

    fn heading(self) -> String {
        match self {
            Self::Volume(v) => format!("Volume {v}"),
            Self::Live => "Live copies, not frozen".into(),
            Self::Unrecorded => "No snapshot recorded".into(),
        }
    }
}

/// One complete backup as a generation of its volume.
struct Generation<'a> {
    info: &'a bpb::BackupInfo,
    manifest: &'a bpb::Manifest,
}

impl Generation<'_> {
    fn ledger_sequence(&self) -> Option<u64> {
        self.manifest
            .ledger_sequence
            .or_else(|| self.manifest.snapshot.as_ref().map(|s| s.ledger_sequence))
    }

    fn to_json(&self) -> serde_json::Value {
        let m = self.manifest;
        let counts = m.counts;
        serde_json::json!({
            "backup_id": self.info.backup_id,
            "run_id": m.run_id,
            "label": m.label,
            "lu": m.source_lu,
            "completed_at_unix_ms": m.completed_at_unix_ms,
            "completed_at_utc": utc(m.completed_at_unix_ms),
            "ledger_sequence": self.ledger_sequence(),
            "logical_bytes": m.size_bytes,
            "new_bytes_stored": counts.map(|c| c.new_bytes_stored),
            "chunks_read": counts.map(|c| c.chunks_read),
            "chunks_reused": counts.map(|c| c.chunks_reused),
            "chunks_zero": counts.map(|c| c.chunks_zero),
            "bytes_read": counts.map(|c| c.bytes_read),
            "verify_read": counts.map(|c| c.verify_read),
            "format_version": m.format_version,
            "consistency": self.info.consistency,
        })
    }
}

/// What `console backup list` shows, grouped and ordered.
struct BackupList<'a> {
    /// Each lineage's generations, oldest first.
    lineages: Vec<(Lineage, Vec<Generation<'a>>)>,
    store: Option<&'a bpb::StoreSummary>,
    /// Jobs that are not (or not yet) complete backups.
    jobs: Vec<&'a bpb::BackupInfo>,
}

impl<'a> BackupList<'a> {
    fn of(listed: &'a bpb::ListBackupsResponse) -> Self {
        let mut lineages: std::collections::BTreeMap<Lineage, Vec<Generation<'a>>> =
            std::collections::BTreeMap::new();
        let mut jobs = Vec::new();
        for info in &listed.backups {
            match (&info.manifest, info.state()) {
                (Some(manifest), bpb::BackupState::Complete) => lineages
                    .entry(Lineage::of(info))
                    .or_default()
                    .push(Generation { info, manifest }),
                _ => jobs.push(info),
            }
        }
        for generations in lineages.values_mut() {
            generations.sort_by(|a, b| {
                (a.manifest.completed_at_unix_ms, &a.info.backup_id)
                    .cmp(&(b.manifest.completed_at_unix_ms, &b.info.backup_id))
            });
        }
        Self {
            lineages: lineages.into_iter().collect(),
            store: listed.store.as_ref(),
            jobs,
        }
    }

    fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        if self.lineages.is_empty() {
            out.push_str("No complete backups\n");
        }
        for (lineage, generations) in &self.lineages {
            let _ = writeln!(
                out,
                "{} ({} {}, oldest first)",
                lineage.heading(),
                generations.len(),
                if generations.len() == 1 {
                    "generation"
                } else {
                    "generations"
                }
            );
            let _ = writeln!(
                out,
                "  {:<19}  {:>9}  {:>10}  {:>10}  {:<36}  consistency",
                "completed (UTC)", "sequence", "logical", "new stored", "backup id"
            );
            for g in generations {
                let _ = writeln!(
                    out,
                    "  {:<19}  {:>9}  {:>10}  {:>10}  {:<36}  {}",
                    utc(g.manifest.completed_at_unix_ms),
                    g.ledger_sequence().map_or("-".into(), |s| s.to_string()),
                    format_bytes(g.manifest.size_bytes),
                    g.manifest
                        .counts
                        .map_or("-".into(), |c| format_bytes(c.new_bytes_stored)),
                    g.info.backup_id,
                    g.info.consistency,
                );
            }
        }
        match self.store {
            Some(store) => {
                let _ = writeln!(
                    out,
                    "Store {}\n  {} chunks of {}: {} stored for {} of backups (deduplication {}); unreferenced chunks kept {} s before garbage collection",
                    store.location,
                    store.chunks,
                    format_bytes(store.chunk_size_bytes),
                    format_bytes(store.stored_bytes),
                    format_bytes(store.logical_bytes),
                    dedup_ratio(store).map_or("-".into(), |r| format!("{r:.2}×")),
                    store.gc_grace_s,
                );
            }
            None => out.push_str("Store: the backup server sent no summary\n"),
        }
        if !self.jobs.is_empty() {
            let _ = writeln!(out, "Jobs not complete ({})", self.jobs.len());
            for b in &self.jobs {
                let _ = writeln!(out, "{}", status::backup_line(b));
            }
        }
        out
    }

    fn to_json(&self) -> serde_json::Value {
        let generations = |wanted: &dyn Fn(Lineage) -> bool| -> Vec<serde_json::Value> {
            self.lineages
                .iter()
                .filter(|(l, _)| wanted(*l))
                .flat_map(|(_, gs)| gs.iter().map(Generation::to_json))
                .collect()
        };
        let volumes: Vec<serde_json::Value> = self
            .lineages
            .iter()
            .filter_map(|(lineage, gs)| match lineage {
                Lineage::Volume(v) => Some(serde_json::json!({
                    "volume": v,
                    "generations": gs.iter().map(Generation::to_json).collect::<Vec<_>>(),
                })),
                _ => None,
            })
            .collect();
        serde_json::json!({
            "volumes": volumes,
            "live": generations(&|l| l == Lineage::Live),
            "unrecorded": generations(&|l| l == Lineage::Unrecorded),
            "store": self.store.map(|s| serde_json::json!({
                "location": s.location,
                "chunk_size_bytes": s.chunk_size_bytes,
                "chunks": s.chunks,
                "stored_bytes": s.stored_bytes,
                "logical_bytes": s.logical_bytes,
                "dedup_ratio": dedup_ratio(s),
                "gc_grace_s": s.gc_grace_s,
            })),
            "jobs": self.jobs.iter().map(|b| serde_json::json!({
                "backup_id": b.backup_id,
                "run_id": b.run_id,
                "state": state_name(b.state()),
                "lu": b.lu,
                "bytes_done": b.bytes_done,
                "bytes_total": b.bytes_total,
                "consistency": b.consistency,
                "error": b.error,
            })).collect::<Vec<_>>(),
        })
    }
}

/// Logical ÷ stored bytes: how many times over the store would be without
/// deduplication; `None` for an empty store.
fn dedup_ratio(store: &bpb::StoreSummary) -> Option<f64> {
    (store.stored_bytes > 0).then(|| store.logical_bytes as f64 / store.stored_bytes as f64)
}

/// A Unix time in milliseconds as "2026-11-28 14:20:01" (UTC); "-" for 0.
fn utc(unix_ms: u64) -> String {
    if unix_ms == 0 {
        return "-".into();
    }
    let nanos = i128::from(unix_ms) * 1_000_000;
    match time::OffsetDateTime::from_unix_timestamp_nanos(nanos) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => format!("{unix_ms} ms"),
    }
}

/// What `console backup prune` asks.
pub struct Prune {
    pub volume: u32,
    pub keep_last: Option<u32>,
    pub keep_within: Option<Duration>,
    pub dry_run: bool,
    /// Collect garbage after a prune that removed something (not after a
    /// dry run).
    pub collect_garbage: bool,
}

/// `console backup prune`: applies the retention rules, prints each
/// decision, then (unless a dry run or told not to) collects garbage.
pub async fn backup_prune(
    clients: &Clients,
    prune: &Prune,
    json: bool,
) -> anyhow::Result<ExitCode> {
    if prune.keep_last.is_none() && prune.keep_within.is_none() {
        anyhow::bail!(
            "give a retention rule: --keep-last N and/or --keep-within DURATION \
             (without one, pruning would remove every backup of volume {})",
            prune.volume
        );
    }
    let request = bpb::PruneBackupsRequest {
        volume: prune.volume,
        keep_last: prune.keep_last,
        keep_within_s: prune.keep_within.map(|d| d.as_secs()),
        dry_run: prune.dry_run,
    };
    let pruned = clients.backup.prune_backups(request).await?;
    let gc = if prune.collect_garbage && !prune.dry_run {
        Some(clients.backup.collect_garbage().await?)
    } else {
        None
    };
    if json {
        println(
            &serde_json::json!({
                "volume": prune.volume,
                "keep_last": prune.keep_last,
                "keep_within_s": prune.keep_within.map(|d| d.as_secs()),
                "dry_run": pruned.dry_run,
                "kept": pruned.kept,
                "removed": pruned.removed,
                "decisions": pruned.decisions.iter().map(|d| serde_json::json!({
                    "backup_id": d.backup_id,
                    "completed_at_unix_ms": d.completed_at_unix_ms,
                    "completed_at_utc": utc(d.completed_at_unix_ms),
                    "ledger_sequence": d.ledger_sequence,
                    "keep": d.keep,
                    "reason": d.reason,
                })).collect::<Vec<_>>(),
                "garbage_collection": gc.as_ref().map(gc_json),
            })
            .to_string(),
        )?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut rules = Vec::new();
    if let Some(n) = prune.keep_last {
        rules.push(format!("keep the newest {n}"));
    }
    if let Some(age) = prune.keep_within {
        rules.push(format!("keep those within {}", format_age(age)));
    }
    let mut out = format!(
        "volume {}: {}{} (newest first)\n",
        prune.volume,
        rules.join(", "),
        if pruned.dry_run { " — dry run" } else { "" }
    );
    for d in &pruned.decisions {
        out.push_str(&format!(
            "  {:<36}  {}  sequence {:>9}  {:<6}  {}\n",
            d.backup_id,
            utc(d.completed_at_unix_ms),
            d.ledger_sequence.map_or("-".into(), |s| s.to_string()),
            if d.keep { "KEEP" } else { "REMOVE" },
            d.reason
        ));
    }
    out.push_str(&if pruned.dry_run {
        format!(
            "{} kept, {} would be removed (dry run: nothing removed)\n",
            pruned.kept, pruned.removed
        )
    } else {
        format!("{} kept, {} removed\n", pruned.kept, pruned.removed)
    });
    match &gc {
        Some(gc) => out.push_str(&render_gc(gc)),
        None if !pruned.dry_run => out.push_str(
            "garbage not collected (--no-gc): the removed backups' chunks stay until `console backup gc`\n",
        ),
        None => {}
    }
    print(&out)?;
    Ok(ExitCode::SUCCESS)
}

/// `console backup gc`: collects the store's garbage.
pub async fn backup_gc(clients: &Clients, json: bool) -> anyhow::Result<ExitCode> {
    let gc = clients.backup.collect_garbage().await?;
    if json {
        println(&gc_json(&gc).to_string())?;
    } else {
        print(&render_gc(&gc))?;
    }
    Ok(ExitCode::SUCCESS)
}

fn render_gc(gc: &bpb::CollectGarbageResponse) -> String {
    format!(
        "garbage collection: removed {} chunks ({}); kept {} unreferenced chunks younger than the grace period ({}) and {} protected by {} running backups; {} chunks listed, {} referenced{}\n",
        gc.chunks_removed,
        format_bytes(gc.bytes_removed),
        gc.chunks_young,
        format_age(Duration::from_secs(gc.gc_grace_s)),
        gc.chunks_protected,
        gc.writers_active,
        gc.chunks_listed,
        gc.chunks_referenced,
        if gc.writers_expired > 0 {
            format!(
                "; {} expired writer records removed (backups that never finished)",
                gc.writers_expired
            )
        } else {
            String::new()
        }
    )
}

fn gc_json(gc: &bpb::CollectGarbageResponse) -> serde_json::Value {
    serde_json::json!({
        "chunks_listed": gc.chunks_listed,
        "chunks_referenced": gc.chunks_referenced,
        "chunks_protected": gc.chunks_protected,
        "chunks_young": gc.chunks_young,
        "chunks_removed": gc.chunks_removed,
        "bytes_removed": gc.bytes_removed,
        "writers_active": gc.writers_active,
        "writers_expired": gc.writers_expired,
        "gc_grace_s": gc.gc_grace_s,
    })
}

/// Parses a retention age: a whole number and a unit, `s`, `m`, `h`, `d`
/// or `w` ("7d", "36h", "90m", "30s", "2w"); a bare number is seconds.
/// [`splitmirror_proto::units::parse_duration`] has no days, which
/// retention needs most.
pub fn parse_age(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits_end);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (examples: 7d, 36h, 90m, 30s)"))?;
    let unit_s: u64 = match unit.trim() {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?} (use s, m, h, d or w)"
            ));
        }
    };
    number
        .checked_mul(unit_s)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{text:?} is too long"))
}

/// A duration in the largest unit that divides it: "7d", "36h", "90m".
fn format_age(age: Duration) -> String {
    let s = age.as_secs();
    for (unit, unit_s) in [("d", 86_400), ("h", 3600), ("m", 60)] {
        if s >= unit_s && s.is_multiple_of(unit_s) {
            return format!("{}{unit}", s / unit_s);
        }
    }
    format!("{s}s")
}

/// `console backup verify`: re-hashes the image against its manifest and
/// says what that proves.
pub async fn backup_verify(clients: &Clients, backup_id: &str) -> anyhow::Result<ExitCode> {
    let v = clients.backup.verify_backup(backup_id).await?;
    let verdict = if v.ok { "OK" } else { "FAILED" };
    let mut out = format!(
        "{backup_id}: {verdict} ({} chunks, image digest {})\n  proved:      {}\n  not checked: {}\n",
        v.chunks, v.image_digest, v.proved, v.not_checked
    );
    if !v.error.is_empty() {
        out.push_str(&format!("  error:       {}\n", v.error));
    }
    if !v.problems.is_empty() {
        out.push_str(&format!("  problems ({}):\n", v.problems.len()));
        for p in &v.problems {
            let kind = match p.kind() {
                bpb::ChunkProblemKind::Missing => "missing",
                bpb::ChunkProblemKind::Corrupt => "corrupt",
                bpb::ChunkProblemKind::Unspecified => "bad",
            };
            out.push_str(&format!(
                "    chunk {:>8}  {kind:<7}  digest {}\n",
                p.index, p.digest
            ));
        }
    } else if !v.bad_chunks.is_empty() {
        out.push_str(&format!("  bad chunks:  {:?}\n", v.bad_chunks));
    }
    print(&out)?;
    Ok(exit(v.ok))
}

/// `console pair verify`: compares origin and mate outside the recorded
/// ranges; exit 1 if any chunk differs.
pub async fn pair_verify(
    clients: &Clients,
    volume: u32,
    mate: u32,
    quiesce: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let report = status::pair_verify_mate(clients, volume, mate, quiesce)
        .await
        .with_context(|| format!("comparing the pair of volume {volume}{}", of_mate(mate)))?;
    if json {
        print_json(&report)?;
    } else if report.differing_chunks.is_empty() {
        println(&format!(
            "volume {volume}: origin LU {} == mate LU {} ({} chunks compared, {} skipped as recorded)",
            report.origin_lu,
            report.mate_lu,
            report.chunks - report.skipped_chunks,
            report.skipped_chunks
        ))?;
    } else {
        println(&format!(
            "volume {volume}: origin LU {} and mate LU {} differ in chunks {:?}",
            report.origin_lu, report.mate_lu, report.differing_chunks
        ))?;
    }
    Ok(exit(report.differing_chunks.is_empty()))
}

/// `console status`: once, or refreshed every `interval` with `watch`.
pub async fn show_status(
    clients: &Clients,
    json: bool,
    watch: bool,
    interval: Duration,
) -> anyhow::Result<ExitCode> {
    loop {
        let snapshot = status::fetch(clients).await?;
        if json {
            println(&status::to_json(&snapshot).to_string())?;
        } else {
            if watch {
                // Clear the screen and go home, as `watch` does.
                print("\x1b[2J\x1b[H")?;
            }
            print(&status::render(&snapshot))?;
        }
        if !watch || stdout_closed() {
            return Ok(ExitCode::SUCCESS);
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = node::shutdown_signal() => return Ok(ExitCode::SUCCESS),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_writable_snapshot_is_asked_for_a_split_and_refused_with_copy_on_write() {
        let request = acquire_request(0, 1, Some("run-w".into()), dpb::SnapshotMethod::Split, true)
            .expect("a writable split");
        assert!(request.writable);
        assert_eq!(request.method(), dpb::SnapshotMethod::Split);
        assert_eq!(request.run_id, "run-w");
        assert_eq!(request.mate, 1);
        let of_mate_3 = acquire_request(0, 3, None, dpb::SnapshotMethod::Split, false)
            .expect("a snapshot of mate 3");
        assert_eq!(of_mate_3.mate, 3);
        // The server's default method: db-server decides (and refuses a
        // writable copy-on-write one itself).
        let request = acquire_request(3, 1, None, dpb::SnapshotMethod::Unspecified, true)
            .expect("the default method");
        assert!(request.writable && request.volume == 3);
        assert!(
            uuid::Uuid::parse_str(&request.run_id).is_ok(),
            "{request:?}"
        );
        let plain = acquire_request(0, 1, None, dpb::SnapshotMethod::Cow, false).expect("a cow");
        assert!(!plain.writable);
        let refused = acquire_request(0, 1, None, dpb::SnapshotMethod::Cow, true);
        assert_eq!(refused, Err(AcquireArgsError::WritableCow));
        let text = AcquireArgsError::WritableCow.to_string();
        assert!(text.contains("--writable needs a split snapshot"), "{text}");
    }

    #[test]
    fn ages_take_days_hours_minutes_seconds_and_weeks() {
        assert_eq!(parse_age("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_age("36h"), Ok(Duration::from_secs(36 * 3600)));
        assert_eq!(parse_age("90m"), Ok(Duration::from_secs(90 * 60)));
        assert_eq!(parse_age("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_age("45"), Ok(Duration::from_secs(45)));
        assert_eq!(parse_age("2w"), Ok(Duration::from_secs(14 * 86_400)));
        assert!(parse_age("soon").is_err());
        assert!(parse_age("7y").is_err());
        assert!(parse_age("d").is_err());
        assert!(parse_age("99999999999999999999d").is_err());
        assert!(parse_age("999999999999999999d").is_err());
    }

    #[test]
    fn ages_print_in_the_largest_whole_unit() {
        assert_eq!(format_age(Duration::from_secs(7 * 86_400)), "7d");
        assert_eq!(format_age(Duration::from_secs(36 * 3600)), "36h");
        assert_eq!(format_age(Duration::from_secs(5400)), "90m");
        assert_eq!(format_age(Duration::from_secs(61)), "61s");
        assert_eq!(format_age(Duration::ZERO), "0s");
    }

    #[test]
    fn times_print_in_utc() {
        assert_eq!(utc(0), "-");
        assert_eq!(utc(1_800_000_000_000), "2027-01-15 08:00:00");
    }

    fn complete(id: &str, volume: Option<u32>, completed_ms: u64) -> bpb::BackupInfo {
        bpb::BackupInfo {
            backup_id: id.into(),
            state: bpb::BackupState::Complete as i32,
            live: volume.is_none(),
            snapshot: volume.map(|volume| bpb::SnapshotRecord {
                volume,
                ledger_sequence: completed_ms / 1000,
                ..Default::default()
            }),
            manifest: Some(bpb::Manifest {
                completed_at_unix_ms: completed_ms,
                size_bytes: 64 << 20,
                counts: Some(bpb::ChunkCounts {
                    new_bytes_stored: 3 << 20,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn the_list_groups_generations_by_volume_oldest_first() {
        let listed = bpb::ListBackupsResponse {
            backups: vec![
                complete("c", Some(0), 3_000),
                complete("a", Some(0), 1_000),
                complete("live", None, 2_000),
                complete("b", Some(1), 2_000),
                bpb::BackupInfo {
                    backup_id: "running".into(),
                    state: bpb::BackupState::Running as i32,
                    ..Default::default()
                },
            ],
            store: Some(bpb::StoreSummary {
                location: "/store".into(),
                chunk_size_bytes: 1 << 20,
                chunks: 70,
                stored_bytes: 70 << 20,
                logical_bytes: 192 << 20,
                gc_grace_s: 3600,
            }),
        };
        let list = BackupList::of(&listed);
        let order: Vec<(Lineage, Vec<&str>)> = list
            .lineages
            .iter()
            .map(|(l, gs)| (*l, gs.iter().map(|g| g.info.backup_id.as_str()).collect()))
            .collect();
        assert_eq!(
            order,
            vec![
                (Lineage::Volume(0), vec!["a", "c"]),
                (Lineage::Volume(1), vec!["b"]),
                (Lineage::Live, vec!["live"]),
            ]
        );
        assert_eq!(list.jobs.len(), 1);
        let json = list.to_json();
        assert_eq!(json["volumes"][0]["generations"][1]["backup_id"], "c");
        assert_eq!(json["live"][0]["backup_id"], "live");
        assert_eq!(json["store"]["chunks"], 70);
        let ratio = json["store"]["dedup_ratio"].as_f64().expect("a ratio");
        assert!((ratio - 192.0 / 70.0).abs() < 1e-9, "{ratio}");
        let text = list.render();
        assert!(text.contains("Volume 0 (2 generations"), "{text}");
        assert!(text.contains("3.00 MiB"), "{text}");
        assert!(text.contains("deduplication 2.74×"), "{text}");
        assert!(text.contains("Jobs not complete (1)"), "{text}");
    }
}
