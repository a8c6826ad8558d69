//! `console status` and `console pair verify`: what the db-server and the
//! backup server report, for people and as JSON.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{Value, json};
use splitmirror_proto::backup::v1 as bpb;
use splitmirror_proto::client::{ClientError, retry};
use splitmirror_proto::db::v1 as dpb;
use splitmirror_proto::pace::format_rate;
use splitmirror_proto::units::format_bytes;

use crate::clients::Clients;
use crate::mates;
use crate::run::{CHUNK_SIZE_BYTES, method_name, state_name};

/// Width of the one-line map of dirty blocks.
const MAP_WIDTH: usize = 64;

/// Why `status` or `pair verify` failed.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// A call to a node failed for good (after retrying a node that does
    /// not answer for the step deadline). Retryable later when
    /// [`ClientError::is_transient`] says so.
    #[error(transparent)]
    Call(#[from] ClientError),
    /// db-server has no such volume. Not retryable.
    #[error("volume {0} does not exist")]
    NoSuchVolume(u32),
    /// The volume has fewer mates than the one named. Not retryable.
    #[error("volume {volume} has {count} mate(s), not a mate {mate} (see `console status`)")]
    NoSuchMate { volume: u32, mate: u32, count: u32 },
}

/// What db-server and the backup server report, at one moment.
pub struct Snapshot {
    pub db: dpb::StatusResponse,
    /// `None` when the backup server did not answer.
    pub backups: Option<Vec<bpb::BackupInfo>>,
}

/// db-server's status (retried for the step deadline) and the backup
/// server's list (if it answers at once).
pub async fn fetch(clients: &Clients) -> Result<Snapshot, StatusError> {
    let db = &clients.db;
    let status = retry("Status", clients.step_deadline, || db.status(false)).await?;
    let backups = clients.backup.list_backups().await.ok();
    Ok(Snapshot {
        db: status,
        backups,
    })
}

fn mode_name(mode: dpb::Mode) -> &'static str {
    match mode {
        dpb::Mode::Synchronized => "Synchronized",
        dpb::Mode::Snapshot => "Snapshot",
        dpb::Mode::Resynchronizing => "Resynchronizing",
        dpb::Mode::Undefined => "Undefined",
        dpb::Mode::Unspecified => "?",
    }
}

/// A one-line map of where the dirty blocks lie: each character stands for
/// an equal share of the volume, `#` if any block in it is recorded.
pub fn dirty_map(ranges: &[dpb::BlockRange], block_count: u64) -> String {
    let width = MAP_WIDTH.min(block_count.max(1) as usize);
    let per_cell = block_count.div_ceil(width as u64).max(1);
    let mut cells = vec![false; width];
    for r in ranges {
        let first = (r.lba / per_cell) as usize;
        let last = ((r.lba + r.blocks.max(1) - 1) / per_cell) as usize;
        for cell in cells.iter_mut().take(last.min(width - 1) + 1).skip(first) {
            *cell = true;
        }
    }
    cells.iter().map(|&d| if d { '#' } else { '.' }).collect()
}

/// The "mate (LU)" cell of a volume's pair: which of its mates, of how
/// many, and that mate's LU ("2/3 (6)"); "1/1 (2)" for a volume with one.
pub fn mate_cell(volumes: &[dpb::VolumeStatus], v: &dpb::VolumeStatus) -> String {
    format!(
        "{}/{} ({})",
        mates::mate_of(v),
        mates::count(volumes, v.volume).max(1),
        v.mate_lu
    )
}

/// The status for people: the LU status table, the update location
/// tables, the ledger, the gate and the backups.
pub fn render(snapshot: &Snapshot) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "LU status table (Fig. 10)");
    let _ = writeln!(
        out,
        "  {:<7} {:<11} {:<16} {:<24} {:>5} {:>6} {:<16} {:>8}  holder",
        "volume",
        "mate (LU)",
        "data mode",
        "array mode",
        "READ",
        "WRITE",
        "snapshot mode",
        "snap LU"
    );
    for v in &snapshot.db.volumes {
        let _ = writeln!(
            out,
            "  {:<7} {:<11} {:<16} {:<24} {:>5} {:>6} {:<16} {:>8}  {}",
            v.volume,
            mate_cell(&snapshot.db.volumes, v),
            mode_name(v.data_mode()),
            array_mode_cell(v),
            v.data_read_lu,
            v.data_write_lu,
            mode_name(v.snapshot_mode()),
            v.snapshot_lu.map_or("-".into(), |lu| lu.to_string()),
            if v.snapshot_holder.is_empty() {
                "-"
            } else {
                &v.snapshot_holder
            }
        );
    }
    if !snapshot.db.volumes.is_empty() {
        let _ = writeln!(
            out,
            "  (array mode: \"stateless\" = db-server keeps the mode and routes the writes, the array \
             enforces nothing; otherwise the mode the array holds and enforces, db-server --array-mode stateful)"
        );
    }
    let _ = writeln!(out, "\nUpdate location tables (Fig. 3)");
    for v in &snapshot.db.volumes {
        let _ = writeln!(
            out,
            "  volume {}{} (mirror LU {} = origin {} + mate {}, {} blocks of {} B): {} ranges, {} blocks",
            v.volume,
            match mates::count(&snapshot.db.volumes, v.volume) {
                0 | 1 => String::new(),
                n => format!(" mate {}/{n}", mates::mate_of(v)),
            },
            v.mirror_lu,
            v.origin_lu,
            v.mate_lu,
            v.block_count,
            v.block_size_bytes,
            v.dirty_ranges.len(),
            v.dirty_blocks
        );
        let _ = writeln!(out, "    [{}]", dirty_map(&v.dirty_ranges, v.block_count));
        let shown: Vec<String> = v
            .dirty_ranges
            .iter()
            .take(8)
            .map(|r| format!("{}–{}", r.lba, r.lba + r.blocks - 1))
            .collect();
        if !shown.is_empty() {
            let more = v.dirty_ranges.len().saturating_sub(shown.len());
            let suffix = if more > 0 {
                format!(" … and {more} more")
            } else {
                String::new()
            };
            let _ = writeln!(out, "    ranges: {}{suffix}", shown.join(", "));
        }
        if let Some(r) = &v.resync
            && (r.running || r.ranges_done > 0)
        {
            let _ = writeln!(
                out,
                "    resync: {} of {} ranges, {} of {}{}",
                r.ranges_done,
                r.ranges_total,
                format_bytes(r.bytes_done),
                format_bytes(r.bytes_total),
                if r.running { " (running)" } else { "" }
            );
        }
        if !v.full_resync_reason.is_empty() {
            let _ = writeln!(out, "    full resync: {}", v.full_resync_reason);
        }
        for line in snapshot_lines(v) {
            let _ = writeln!(out, "    {line}");
        }
    }
    if let Some(l) = &snapshot.db.ledger {
        let _ = writeln!(
            out,
            "\nLedger on volume {}: sequence {}, {} transactions committed, {} failed writes retried, {} accounts",
            l.volume, l.sequence, l.transactions_committed, l.transactions_failed, l.accounts
        );
        if l.transactions_committed > 0 {
            let _ = writeln!(
                out,
                "  transaction latency since start: p50 {} µs, p90 {} µs, p99 {} µs, max {} µs",
                l.latency_p50_us, l.latency_p90_us, l.latency_p99_us, l.latency_max_us
            );
        }
    }
    if let Some(g) = &snapshot.db.gate {
        let _ = writeln!(
            out,
            "Database gate: {}, {} suspends, {} lease expiries",
            if g.suspended { "SUSPENDED" } else { "open" },
            g.suspends,
            g.lease_expiries
        );
    }
    match &snapshot.db.background_pace {
        Some(pace) => {
            let _ = writeln!(out, "{}", pace_line(pace));
        }
        None => {
            let _ = writeln!(
                out,
                "background copies: pace unknown (the array did not answer)"
            );
        }
    }
    if let Some(j) = snapshot.db.journal.as_ref().filter(|j| j.broken) {
        let _ = writeln!(
            out,
            "Journal: BROKEN — new snapshot writes and state changes are refused until \
             db-server restarts on a repaired disk: {}",
            j.broken_reason
        );
    }
    let _ = writeln!(out);
    out.push_str(&render_backups(snapshot));
    out
}

/// Who keeps a volume's mode, as status names it: "stateless" or
/// "stateful"; `None` from a db-server older than issue 19 (stateless).
pub fn array_mode_keeping(v: &dpb::VolumeStatus) -> Option<&'static str> {
    match v.array_mode_keeping() {
        dpb::ArrayModeKeeping::Stateless => Some("stateless"),
        dpb::ArrayModeKeeping::Stateful => Some("stateful"),
        dpb::ArrayModeKeeping::Unspecified => None,
    }
}

/// The array's mode of a stateful volume as db-server last set or read it
/// ("SNAPSHOT", "unknown: ..."); `None` for a stateless one, which has
/// none. A stateful one that reports none is "?".
pub fn array_mode(v: &dpb::VolumeStatus) -> Option<&str> {
    if v.array_mode_keeping() != dpb::ArrayModeKeeping::Stateful {
        None
    } else if v.array_mode.is_empty() {
        Some("?")
    } else {
        Some(v.array_mode.as_str())
    }
}

/// The LU status table's "array mode" cell: the array's mode when it keeps
/// it (an unknown one shortened to "UNKNOWN", its cause on its own line),
/// "stateless" when db-server does ("-" from an older db-server).
fn array_mode_cell(v: &dpb::VolumeStatus) -> &str {
    match (array_mode_keeping(v), array_mode(v)) {
        (_, Some(mode)) if mode.starts_with("unknown") => "UNKNOWN",
        (_, Some(mode)) => mode,
        (Some(keeping), None) => keeping,
        (None, None) => "-",
    }
}

/// The method of the snapshot held on `v` as status names it ("split",
/// "cow"), `None` when none is held.
fn held_method(v: &dpb::VolumeStatus) -> Option<&'static str> {
    (v.snapshot_method() != dpb::SnapshotMethod::Unspecified)
        .then(|| method_name(v.snapshot_method()))
}

/// What status says of a volume's snapshot method, save area and
/// invalidation, one line each (none for a volume without a snapshot or a
/// save area).
pub fn snapshot_lines(v: &dpb::VolumeStatus) -> Vec<String> {
    let mut lines = Vec::new();
    match held_method(v) {
        Some("cow") => lines.push(
            "snapshot: copy-on-write (the pair is not split; read it through db-server)".into(),
        ),
        Some(method) if v.snapshot_writable => lines.push(format!(
            "snapshot: {method}, WRITABLE (its mate may be written while it is held; the resync \
             undoes those writes; not a frozen image, so the backup server refuses to back it up)"
        )),
        Some(method) => lines.push(format!("snapshot: {method}")),
        None => {}
    }
    if let Some(mode) = array_mode(v)
        && mode.starts_with("unknown")
    {
        lines.push(format!(
            "array mode UNKNOWN (a ModeSelect's outcome is unknown; writes are refused until the array answers again): {mode}"
        ));
    }
    if let Some(area) = &v.save_area {
        let percent = if area.capacity_blocks == 0 {
            0.0
        } else {
            area.used_blocks as f64 * 100.0 / area.capacity_blocks as f64
        };
        lines.push(format!(
            "save area: LU {}, {} of {} blocks used ({percent:.1} %)",
            area.lu, area.used_blocks, area.capacity_blocks
        ));
    }
    if !v.snapshot_invalidated_reason.is_empty() {
        lines.push(format!(
            "snapshot INVALIDATED (its reads are refused until {} deletes it): {}",
            if v.snapshot_holder.is_empty() {
                "its holder"
            } else {
                &v.snapshot_holder
            },
            v.snapshot_invalidated_reason
        ));
    }
    lines
}

/// One line for the pace of background copies: the array's `why` (rate,
/// reason, foreground latency against its baseline), what moved over the
/// last second, and db-server's resync limits.
pub fn pace_line(pace: &dpb::BackgroundPace) -> String {
    let limits = match pace.resync_max_bytes_per_s {
        Some(max) => format!(
            "resync {}..{}",
            format_rate(pace.resync_min_bytes_per_s),
            format_rate(max)
        ),
        None => format!(
            "resync at least {}",
            format_rate(pace.resync_min_bytes_per_s)
        ),
    };
    format!(
        "background copies: {} (moved {} over the last second beside {} foreground requests/s; {limits})",
        pace.why,
        format_rate(pace.background_bytes_per_s),
        pace.foreground_requests_per_s,
    )
}

/// The backups section of [`render`]: one line per backup, frozen by its
/// snapshot or "live (not frozen)".
pub fn render_backups(snapshot: &Snapshot) -> String {
    let mut out = String::new();
    match &snapshot.backups {
        Some(backups) => {
            let _ = writeln!(out, "Backups ({})", backups.len());
            for b in backups {
                let _ = writeln!(out, "{}", backup_line(b));
            }
        }
        None => {
            let _ = writeln!(out, "Backups: the backup server did not answer");
        }
    }
    out
}

/// One backup as the status and `backup list` show it: id, state, LU,
/// progress, consistency, run, and the error if it failed.
pub fn backup_line(b: &bpb::BackupInfo) -> String {
    format!(
        "  {}  {:<9} LU {}  {} / {}  {}  run {}{}",
        b.backup_id,
        state_name(b.state()),
        b.lu,
        format_bytes(b.bytes_done),
        format_bytes(b.bytes_total),
        b.consistency,
        b.run_id,
        if b.error.is_empty() {
            String::new()
        } else {
            format!("  ({})", b.error)
        }
    )
}

/// The status as one JSON object (what `status --json` prints).
pub fn to_json(snapshot: &Snapshot) -> Value {
    let volumes: Vec<Value> = snapshot
        .db
        .volumes
        .iter()
        .map(|v| {
            json!({
                "volume": v.volume,
                "mate": mates::mate_of(v),
                "mates": mates::count(&snapshot.db.volumes, v.volume),
                "mirror_lu": v.mirror_lu,
                "origin_lu": v.origin_lu,
                "mate_lu": v.mate_lu,
                "block_size_bytes": v.block_size_bytes,
                "block_count": v.block_count,
                "data_mode": mode_name(v.data_mode()),
                "data_read_lu": v.data_read_lu,
                "data_write_lu": v.data_write_lu,
                "snapshot_mode": mode_name(v.snapshot_mode()),
                "snapshot_lu": v.snapshot_lu,
                "snapshot_holder": v.snapshot_holder,
                "dirty_ranges": v.dirty_ranges.iter().map(|r| json!({"lba": r.lba, "blocks": r.blocks})).collect::<Vec<_>>(),
                "dirty_blocks": v.dirty_blocks,
                "dirty_map": dirty_map(&v.dirty_ranges, v.block_count),
                "resync": v.resync.as_ref().map(|r| json!({
                    "running": r.running,
                    "ranges_done": r.ranges_done,
                    "ranges_total": r.ranges_total,
                    "bytes_done": r.bytes_done,
                    "bytes_total": r.bytes_total,
                })),
                "full_resync_reason": v.full_resync_reason,
                "snapshot_method": held_method(v),
                "save_area": v.save_area.as_ref().map(|a| json!({
                    "lu": a.lu,
                    "capacity_blocks": a.capacity_blocks,
                    "used_blocks": a.used_blocks,
                })),
                "snapshot_invalidated_reason": (!v.snapshot_invalidated_reason.is_empty())
                    .then_some(v.snapshot_invalidated_reason.as_str()),
                "snapshot_writable": v.snapshot_writable,
                "array_mode_keeping": array_mode_keeping(v),
                "array_mode": array_mode(v),
            })
        })
        .collect();
    json!({
        "volumes": volumes,
        "ledger": snapshot.db.ledger.as_ref().map(|l| json!({
            "volume": l.volume,
            "sequence": l.sequence,
            "transactions_committed": l.transactions_committed,
            "failed_writes": l.transactions_failed,
            "accounts": l.accounts,
            "latency_p50_us": l.latency_p50_us,
            "latency_p90_us": l.latency_p90_us,
            "latency_p99_us": l.latency_p99_us,
            "latency_max_us": l.latency_max_us,
        })),
        "gate": snapshot.db.gate.as_ref().map(|g| json!({
            "suspended": g.suspended,
            "suspends": g.suspends,
            "lease_expiries": g.lease_expiries,
        })),
        "journal": snapshot.db.journal.as_ref().map(|j| json!({
            "enabled": j.enabled,
            "records": j.records,
            "broken": j.broken,
            "broken_reason": j.broken_reason,
        })),
        "backups": snapshot.backups.as_ref().map(|bs| bs.iter().map(|b| json!({
            "backup_id": b.backup_id,
            "run_id": b.run_id,
            "state": state_name(b.state()),
            "lu": b.lu,
            "bytes_done": b.bytes_done,
            "bytes_total": b.bytes_total,
            "live": b.live,
            "snapshot": b.snapshot.as_ref().map(|s| json!({
                "volume": s.volume,
                "holder_run_id": s.holder_run_id,
                "ledger_sequence": s.ledger_sequence,
            })),
            "consistency": b.consistency,
            "error": b.error,
            "failure": (b.failure() != bpb::BackupFailure::Unspecified)
                .then(|| b.failure().as_str_name()),
        })).collect::<Vec<_>>()),
    })
}

/// The outcome of comparing origin and mate of a pair.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PairReport {
    pub volume: u32,
    /// Which of the volume's mates was compared with the origin.
    pub mate: u32,
    pub origin_lu: u32,
    pub mate_lu: u32,
    pub chunks: u64,
    /// Chunks overlapping recorded ranges (they may differ by design).
    pub skipped_chunks: u64,
    pub differing_chunks: Vec<u64>,
    pub quiesced: bool,
}

/// Compares origin and mate with `ChecksumRange`, chunk by chunk, outside
/// the recorded ranges. With `quiesce`, the database is suspended for the
/// comparison so that writes in flight cannot show as differences; without
/// it, differing chunks are checked again a few times before they count.
pub async fn pair_verify(
    clients: &Clients,
    volume: u32,
    quiesce: bool,
) -> Result<PairReport, StatusError> {
    pair_verify_mate(clients, volume, 1, quiesce).await
}

/// [`pair_verify`] of the pair of the volume's mate `mate` (counted from
/// 1): the origin against that mate LU, skipping that pair's recorded
/// ranges.
pub async fn pair_verify_mate(
    clients: &Clients,
    volume: u32,
    mate: u32,
    quiesce: bool,
) -> Result<PairReport, StatusError> {
    if quiesce {
        clients.db.suspend(30_000).await?;
    }
    let result = compare_pair(clients, volume, mate, quiesce).await;
    if quiesce && let Err(error) = clients.db.resume().await {
        tracing::warn!("{error}");
    }
    result
}

async fn compare_pair(
    clients: &Clients,
    volume: u32,
    mate: u32,
    quiesced: bool,
) -> Result<PairReport, StatusError> {
    let snapshot = fetch(clients).await?;
    let v = mates::pick(&snapshot.db.volumes, volume, mate).ok_or(
        match mates::count(&snapshot.db.volumes, volume) {
            0 => StatusError::NoSuchVolume(volume),
            count => StatusError::NoSuchMate {
                volume,
                mate,
                count,
            },
        },
    )?;
    let chunk_blocks = CHUNK_SIZE_BYTES / u64::from(v.block_size_bytes.max(1));
    let chunks = v.block_count.div_ceil(chunk_blocks);
    let skipped: Vec<bool> = (0..chunks)
        .map(|c| {
            let (start, end) = (c * chunk_blocks, (c + 1) * chunk_blocks);
            v.dirty_ranges
                .iter()
                .any(|r| r.lba < end && start < r.lba + r.blocks)
        })
        .collect();
    let array = &clients.array;
    let sums = |lu: u32, lba: u64, blocks: u64| array.checksums(lu, lba, blocks, chunk_blocks);
    let (origin, mate) = tokio::join!(
        sums(v.origin_lu, 0, v.block_count),
        sums(v.mate_lu, 0, v.block_count)
    );
    let (origin, mate) = (origin?, mate?);
    let mut differing: Vec<u64> = (0..chunks)
        .filter(|&c| !skipped[c as usize] && origin.get(c as usize) != mate.get(c as usize))
        .collect();
    if !quiesced {
        // Writes in flight land on origin and mate a moment apart; a real
        // difference survives being looked at again.
        for _ in 0..3 {
            if differing.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            let mut still = Vec::new();
            for &c in &differing {
                let lba = c * chunk_blocks;
                let blocks = chunk_blocks.min(v.block_count - lba);
                let (o, m) =
                    tokio::join!(sums(v.origin_lu, lba, blocks), sums(v.mate_lu, lba, blocks));
                if o? != m? {
                    still.push(c);
                }
            }
            differing = still;
        }
    }
    Ok(PairReport {
        volume,
        mate: mates::mate_of(v),
        origin_lu: v.origin_lu,
        mate_lu: v.mate_lu,
        chunks,
        skipped_chunks: skipped.iter().filter(|&&s| s).count() as u64,
        differing_chunks: differing,
        quiesced,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_shows_latency_percentiles_without_the_buckets() {
        let snapshot = Snapshot {
            db: dpb::StatusResponse {
                ledger: Some(dpb::LedgerStatus {
                    transactions_committed: 10,
                    latency_p50_us: 150,
                    latency_p90_us: 300,
                    latency_p99_us: 900,
                    latency_max_us: 2000,
                    ..dpb::LedgerStatus::default()
                }),
                ..dpb::StatusResponse::default()
            },
            backups: None,
        };
        let text = render(&snapshot);
        assert!(
            text.contains("p50 150 µs, p90 300 µs, p99 900 µs, max 2000 µs"),
            "{text}"
        );
        let json = to_json(&snapshot);
        assert_eq!(json["ledger"]["latency_p99_us"], 900);
    }

    #[test]
    fn status_shows_the_snapshot_method_the_save_area_and_an_invalidation() {
        let cow = dpb::VolumeStatus {
            volume: 0,
            snapshot_holder: "run-1".into(),
            snapshot_method: dpb::SnapshotMethod::Cow.into(),
            save_area: Some(dpb::SaveAreaStatus {
                lu: 6,
                capacity_blocks: 1000,
                used_blocks: 250,
            }),
            snapshot_invalidated_reason: "the save area (LU 6, 1000 blocks) filled up".into(),
            ..dpb::VolumeStatus::default()
        };
        let plain = dpb::VolumeStatus {
            volume: 3,
            ..dpb::VolumeStatus::default()
        };
        let snapshot = Snapshot {
            db: dpb::StatusResponse {
                volumes: vec![cow, plain],
                ..dpb::StatusResponse::default()
            },
            backups: None,
        };
        let text = render(&snapshot);
        assert!(text.contains("snapshot: copy-on-write"), "{text}");
        assert!(
            text.contains("save area: LU 6, 250 of 1000 blocks used (25.0 %)"),
            "{text}"
        );
        assert!(
            text.contains("snapshot INVALIDATED (its reads are refused until run-1 deletes it): the save area (LU 6, 1000 blocks) filled up"),
            "{text}"
        );
        assert_eq!(text.matches("save area:").count(), 1, "{text}");
        let json = to_json(&snapshot);
        let (cow, plain) = (&json["volumes"][0], &json["volumes"][1]);
        assert_eq!(cow["snapshot_method"], "cow");
        assert_eq!(cow["save_area"]["lu"], 6);
        assert_eq!(cow["save_area"]["used_blocks"], 250);
        assert_eq!(cow["save_area"]["capacity_blocks"], 1000);
        assert!(
            cow["snapshot_invalidated_reason"]
                .as_str()
                .unwrap_or("")
                .contains("filled up")
        );
        assert!(plain["snapshot_method"].is_null());
        assert!(plain["save_area"].is_null());
        assert!(plain["snapshot_invalidated_reason"].is_null());
    }

    #[test]
    fn status_shows_who_keeps_the_mode_the_arrays_mode_and_a_writable_snapshot() {
        let stateful = dpb::VolumeStatus {
            volume: 0,
            data_mode: dpb::Mode::Snapshot.into(),
            snapshot_holder: "run-w".into(),
            snapshot_method: dpb::SnapshotMethod::Split.into(),
            snapshot_writable: true,
            array_mode_keeping: dpb::ArrayModeKeeping::Stateful.into(),
            array_mode: "SNAPSHOT (mate writable)".into(),
            ..dpb::VolumeStatus::default()
        };
        let stateless = dpb::VolumeStatus {
            volume: 3,
            data_mode: dpb::Mode::Synchronized.into(),
            array_mode_keeping: dpb::ArrayModeKeeping::Stateless.into(),
            ..dpb::VolumeStatus::default()
        };
        let unknown = dpb::VolumeStatus {
            volume: 5,
            data_mode: dpb::Mode::Synchronized.into(),
            array_mode_keeping: dpb::ArrayModeKeeping::Stateful.into(),
            array_mode: "unknown: the array did not answer the ModeSelect".into(),
            ..dpb::VolumeStatus::default()
        };
        // A db-server older than issue 19 says nothing of it.
        let older = dpb::VolumeStatus {
            volume: 6,
            ..dpb::VolumeStatus::default()
        };
        let snapshot = Snapshot {
            db: dpb::StatusResponse {
                volumes: vec![stateful, stateless, unknown, older],
                ..dpb::StatusResponse::default()
            },
            backups: None,
        };
        let text = render(&snapshot);
        let row = |volume: &str| {
            text.lines()
                .find(|l| l.trim_start().starts_with(&format!("{volume} ")))
                .unwrap_or_else(|| panic!("no row of volume {volume}:\n{text}"))
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        };
        // The array's mode stands next to db-server's data mode.
        assert!(
            row("0").starts_with("0 1/1 (0) Snapshot SNAPSHOT (mate writable) "),
            "{text}"
        );
        assert!(
            row("3").starts_with("3 1/1 (0) Synchronized stateless "),
            "{text}"
        );
        assert!(
            row("5").starts_with("5 1/1 (0) Synchronized UNKNOWN "),
            "{text}"
        );
        assert!(row("6").starts_with("6 1/1 (0) ? - "), "{text}");
        assert!(text.contains("snapshot: split, WRITABLE"), "{text}");
        assert!(text.contains("the backup server refuses"), "{text}");
        assert_eq!(text.matches("WRITABLE").count(), 1, "{text}");
        assert!(
            text.contains("array mode UNKNOWN (a ModeSelect's outcome is unknown; writes are refused until the array answers again): unknown: the array did not answer the ModeSelect"),
            "{text}"
        );
        let json = to_json(&snapshot);
        let v = &json["volumes"];
        assert_eq!(v[0]["array_mode_keeping"], "stateful");
        assert_eq!(v[0]["array_mode"], "SNAPSHOT (mate writable)");
        assert_eq!(v[0]["snapshot_writable"], true);
        assert_eq!(v[1]["array_mode_keeping"], "stateless");
        assert!(v[1]["array_mode"].is_null());
        assert_eq!(v[1]["snapshot_writable"], false);
        assert!(
            v[2]["array_mode"]
                .as_str()
                .unwrap_or("")
                .starts_with("unknown: ")
        );
        assert!(v[3]["array_mode_keeping"].is_null());
        assert!(v[3]["array_mode"].is_null());
    }

    #[test]
    fn status_shows_one_row_per_mate_with_its_own_modes_holder_and_dirty_blocks() {
        let pair = |mate: u32, mate_lu: u32, mode: dpb::Mode, holder: &str, dirty: u64| {
            dpb::VolumeStatus {
                volume: 1,
                mate,
                mirror_lu: 4,
                origin_lu: 5,
                mate_lu,
                block_count: 1024,
                block_size_bytes: 4096,
                data_mode: mode.into(),
                snapshot_holder: holder.into(),
                dirty_blocks: dirty,
                array_mode_keeping: dpb::ArrayModeKeeping::Stateful.into(),
                array_mode: match mode {
                    dpb::Mode::Snapshot => "SNAPSHOT".into(),
                    _ => "SYNCHRONIZED".into(),
                },
                ..dpb::VolumeStatus::default()
            }
        };
        let snapshot = Snapshot {
            db: dpb::StatusResponse {
                volumes: vec![
                    pair(1, 6, dpb::Mode::Snapshot, "run-a", 16),
                    pair(2, 7, dpb::Mode::Snapshot, "run-b", 40),
                    pair(3, 8, dpb::Mode::Synchronized, "", 0),
                ],
                ..dpb::StatusResponse::default()
            },
            backups: None,
        };
        let text = render(&snapshot);
        let rows: Vec<String> = text
            .lines()
            .filter(|l| l.trim_start().starts_with("1 "))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        assert_eq!(rows.len(), 3, "{text}");
        assert!(
            rows[0].starts_with("1 1/3 (6) Snapshot SNAPSHOT "),
            "{text}"
        );
        assert!(rows[0].ends_with(" run-a"), "{text}");
        assert!(
            rows[1].starts_with("1 2/3 (7) Snapshot SNAPSHOT "),
            "{text}"
        );
        assert!(rows[1].ends_with(" run-b"), "{text}");
        assert!(
            rows[2].starts_with("1 3/3 (8) Synchronized SYNCHRONIZED "),
            "{text}"
        );
        assert!(
            text.contains("volume 1 mate 2/3 (mirror LU 4 = origin 5 + mate 7, 1024 blocks of 4096 B): 0 ranges, 40 blocks"),
            "{text}"
        );
        let json = to_json(&snapshot);
        let v = &json["volumes"];
        assert_eq!(
            (v[0]["mate"].clone(), v[0]["mates"].clone()),
            (json!(1), json!(3))
        );
        assert_eq!(
            (v[2]["mate"].clone(), v[2]["mate_lu"].clone()),
            (json!(3), json!(8))
        );
        assert_eq!(v[1]["dirty_blocks"], 40);
    }

    #[test]
    fn the_dirty_map_marks_where_ranges_lie() {
        let r = |lba, blocks| dpb::BlockRange { lba, blocks };
        assert_eq!(dirty_map(&[], 640), ".".repeat(64));
        let map = dirty_map(&[r(0, 1), r(639, 1), r(100, 25)], 640);
        assert_eq!(map.len(), 64);
        assert_eq!(&map[..1], "#");
        assert_eq!(&map[63..], "#");
        assert_eq!(&map[10..13], "###");
        assert_eq!(map.matches('#').count(), 5);
        assert_eq!(dirty_map(&[r(2, 1)], 4), "..#.");
    }
}
