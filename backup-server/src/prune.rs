//! Retention: which of a volume's backups to keep. Pruning removes only
//! indexes; the chunks they alone referenced go at the next garbage
//! collection (`gc.rs`), after the grace period.

use std::time::Duration;

use crate::manifest::Manifest;

/// The rules, at least one of them set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Keep the newest N (at least 1).
    pub keep_last: Option<u32>,
    /// Keep every backup that completed within this long.
    pub keep_within: Option<Duration>,
}

/// One backup and what the rules decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub backup_id: String,
    pub completed_at_unix_ms: u64,
    pub ledger_sequence: Option<u64>,
    pub keep: bool,
    pub reason: String,
}

/// Decides, newest first, over the complete frozen backups of `volume`
/// (live backups and other volumes' are not touched).
pub fn decide(
    manifests: &[&Manifest],
    volume: u32,
    retention: Retention,
    now_unix_ms: u64,
) -> Vec<Decision> {
    let mut of_volume: Vec<&Manifest> = manifests
        .iter()
        .copied()
        .filter(|m| m.snapshot.as_ref().is_some_and(|s| s.volume == volume))
        .collect();
    of_volume.sort_by(|a, b| {
        (b.completed_at_unix_ms, &b.backup_id).cmp(&(a.completed_at_unix_ms, &a.backup_id))
    });
    of_volume
        .into_iter()
        .enumerate()
        .map(|(newest_rank, m)| {
            let by_count = retention
                .keep_last
                .is_some_and(|n| (newest_rank as u64) < u64::from(n));
            let age = Duration::from_millis(now_unix_ms.saturating_sub(m.completed_at_unix_ms));
            let by_age = retention.keep_within.is_some_and(|within| age <= within);
            let reason = match (by_count, by_age) {
                (true, _) => format!(
                    "one of the newest {}",
                    retention.keep_last.unwrap_or_default()
                ),
                (false, true) => format!(
                    "completed {} ago, within {}",
                    humanize(age),
                    humanize(retention.keep_within.unwrap_or_default())
                ),
                (false, false) => match (retention.keep_last, retention.keep_within) {
                    (Some(n), Some(within)) => format!(
                        "not one of the newest {n}, and completed {} ago (over {})",
                        humanize(age),
                        humanize(within)
                    ),
                    (Some(n), None) => format!("not one of the newest {n}"),
                    (None, Some(within)) => format!(
                        "completed {} ago (over {})",
                        humanize(age),
                        humanize(within)
                    ),
                    (None, None) => "no rule keeps it".into(),
                },
            };
            Decision {
                backup_id: m.backup_id.clone(),
                completed_at_unix_ms: m.completed_at_unix_ms,
                ledger_sequence: m.ledger_sequence,
                keep: by_count || by_age,
                reason,
            }
        })
        .collect()
}

/// "3d 4h", "25m", "12s".
fn humanize(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86400, s % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{SnapshotMethod, SnapshotRecord};

    fn backup(id: &str, volume: u32, completed_at_unix_ms: u64) -> Manifest {
        Manifest {
            format_version: 3,
            backup_id: id.into(),
            run_id: id.into(),
            label: String::new(),
            source_array: String::new(),
            source_lu: 2,
            block_size_bytes: 4096,
            block_count: 256,
            size_bytes: 1 << 20,
            started_at_unix_ms: completed_at_unix_ms - 1,
            completed_at_unix_ms,
            ledger_sequence: Some(completed_at_unix_ms),
            snapshot: Some(SnapshotRecord {
                volume,
                holder_run_id: id.into(),
                ledger_sequence: completed_at_unix_ms,
                snapshot_id: 1,
                owner: String::new(),
                confirmed_before_unix_ms: 0,
                confirmed_after_unix_ms: 0,
                method: SnapshotMethod::Split,
                mate: 1,
            }),
            live: false,
            chunk_size_bytes: 1 << 20,
            chunk_digests: vec![],
            image_digest: String::new(),
            counts: None,
        }
    }

    const HOUR_MS: u64 = 3_600_000;

    #[test]
    fn keep_last_and_keep_within_keep_the_union_of_one_volume() {
        let now = 100 * HOUR_MS;
        let all = [
            backup("a", 0, now - 50 * HOUR_MS),
            backup("b", 0, now - 30 * HOUR_MS),
            backup("c", 0, now - 10 * HOUR_MS),
            backup("d", 0, now - HOUR_MS),
            backup("other", 1, now - 90 * HOUR_MS),
        ];
        let refs: Vec<&Manifest> = all.iter().collect();
        let kept = |retention| -> Vec<(String, bool)> {
            decide(&refs, 0, retention, now)
                .into_iter()
                .map(|d| (d.backup_id, d.keep))
                .collect()
        };
        let last2 = Retention {
            keep_last: Some(2),
            keep_within: None,
        };
        assert_eq!(
            kept(last2),
            [
                ("d".into(), true),
                ("c".into(), true),
                ("b".into(), false),
                ("a".into(), false)
            ]
        );
        let day = Retention {
            keep_last: None,
            keep_within: Some(Duration::from_secs(24 * 3600)),
        };
        assert_eq!(
            kept(day).iter().filter(|(_, k)| *k).count(),
            2,
            "d and c are within a day"
        );
        let both = Retention {
            keep_last: Some(1),
            keep_within: Some(Duration::from_secs(40 * 3600)),
        };
        assert_eq!(
            kept(both),
            [
                ("d".into(), true),
                ("c".into(), true),
                ("b".into(), true),
                ("a".into(), false)
            ]
        );
        // Another volume's backups are never decided on.
        assert!(decide(&refs, 1, last2, now).len() == 1);
    }
}
