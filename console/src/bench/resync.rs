//! `bench resync`: a volume with D MiB of scattered dirty ranges (D = 1, 16,
//! 256): resync time, bytes copied and bytes on the wire for `writeback`
//! and `offload`, and bytes copied ÷ distinct dirty bytes. The same D on a
//! volume 64× larger (sparse) shows that the time follows D, not the size.

use std::time::Instant;

use futures_util::StreamExt;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use splitmirror_proto::db::v1 as dpb;

use super::common::{Bench, f2, table};
use super::{BenchOptions, BenchOutput};
use crate::progress::Quiet;

const BLOCK: u64 = 4096;

struct Outcome {
    size_bytes: u64,
    method: &'static str,
    dirty_mib: u64,
    distinct_bytes: u64,
    seconds: f64,
    copied_bytes: u64,
    wire_bytes: u64,
}

pub async fn run(options: &BenchOptions) -> anyhow::Result<BenchOutput> {
    let (sizes, dirty_mibs): (Vec<u64>, Vec<u64>) = if options.quick {
        (vec![options.size_bytes, options.size_bytes * 4], vec![1])
    } else {
        (
            vec![options.size_bytes, options.size_bytes * 64],
            vec![1, 16, 256],
        )
    };
    let mut outcomes = Vec::new();
    for &size in &sizes {
        for (method, name) in [
            (db_server::manager::ResyncMethod::WriteBack, "writeback"),
            (db_server::manager::ResyncMethod::Offload, "offload"),
        ] {
            for &dirty_mib in &dirty_mibs {
                if dirty_mib << 20 > size / 2 {
                    continue;
                }
                outcomes.push(once(size, method, name, dirty_mib).await?);
            }
        }
    }
    let mut rows = Vec::new();
    let mut figures = Vec::new();
    for o in &outcomes {
        let small = outcomes.iter().find(|s| {
            s.size_bytes == sizes[0] && s.method == o.method && s.dirty_mib == o.dirty_mib
        });
        let time_ratio = small.map(|s| o.seconds / s.seconds.max(1e-9));
        let copied_ratio = o.copied_bytes as f64 / o.distinct_bytes.max(1) as f64;
        rows.push(vec![
            splitmirror_proto::units::format_bytes(o.size_bytes),
            o.method.to_string(),
            format!("{} MiB", o.dirty_mib),
            format!("{:.3}", o.seconds),
            f2(copied_ratio),
            f2(o.wire_bytes as f64 / o.distinct_bytes.max(1) as f64),
            time_ratio.map_or("-".into(), f2),
        ]);
        figures.push(json!({
            "volume_bytes": o.size_bytes,
            "method": o.method,
            "dirty_mib": o.dirty_mib,
            "distinct_dirty_bytes": o.distinct_bytes,
            "resync_seconds": o.seconds,
            "copied_bytes": o.copied_bytes,
            "wire_bytes": o.wire_bytes,
            "copied_over_distinct": copied_ratio,
            "time_over_smallest_volume": time_ratio,
        }));
    }
    Ok(BenchOutput {
        table: table(
            &[
                "volume",
                "method",
                "dirty",
                "resync s",
                "copied ÷ dirty",
                "wire ÷ dirty",
                "time ÷ small volume",
            ],
            &rows,
        ) + "\n  targets: copied ÷ dirty = 1.00; time on the large volume ≤ 1.1× the small one\n",
        figures: json!({"runs": figures}),
    })
}

async fn once(
    size: u64,
    method: db_server::manager::ResyncMethod,
    name: &'static str,
    dirty_mib: u64,
) -> anyhow::Result<Outcome> {
    let manager = db_server::manager::ManagerConfig {
        resync_method: method,
        ..db_server::manager::ManagerConfig::default()
    };
    let bench = Bench::start(
        size,
        None,
        manager,
        Some(db_server::DEFAULT_JOURNAL_REGION_BYTES),
    )
    .await?;
    let db = &bench.clients.db;
    db.acquire_snapshot(0, "resync").await?;
    // Scattered writes of 1–16 blocks until exactly the wanted number of
    // distinct blocks is dirty (the last write is cut to fit).
    let blocks = size / BLOCK;
    let wanted = (dirty_mib << 20) / BLOCK;
    let mut dirty = vec![0u64; blocks.div_ceil(64) as usize];
    let mut distinct = 0u64;
    let mut writes = Vec::new();
    let mut rng = SmallRng::seed_from_u64(dirty_mib ^ size);
    while distinct < wanted {
        let len = rng.random_range(1..=16u64);
        let lba = rng.random_range(0..blocks - len);
        let mut taken = 0;
        for b in lba..lba + len {
            if distinct == wanted {
                break;
            }
            let (word, bit) = ((b / 64) as usize, b % 64);
            if dirty[word] & (1 << bit) == 0 {
                dirty[word] |= 1 << bit;
                distinct += 1;
            }
            taken += 1;
        }
        writes.push((lba, taken));
    }
    let mut results = futures_util::stream::iter(writes)
        .map(|(lba, n)| {
            db.write(
                0,
                dpb::VirtualLu::Data,
                lba,
                vec![0xD1; (n * BLOCK) as usize],
            )
        })
        .buffer_unordered(16);
    while let Some(result) = results.next().await {
        result?;
    }
    drop(results);
    let traffic_before = bench.status().await?.array_traffic.unwrap_or_default();
    let started = Instant::now();
    db.delete_snapshot(0, "resync", false).await?;
    crate::run::wait_synchronized(&bench.clients, 0, &Quiet).await?;
    let seconds = started.elapsed().as_secs_f64();
    let status = bench.status().await?;
    let traffic = status.array_traffic.unwrap_or_default();
    let copied_bytes = crate::mates::pick(&status.volumes, 0, 1)
        .and_then(|v| v.resync)
        .map_or(0, |r| r.bytes_done);
    bench.shutdown().await?;
    Ok(Outcome {
        size_bytes: size,
        method: name,
        dirty_mib,
        distinct_bytes: distinct * BLOCK,
        seconds,
        copied_bytes,
        wire_bytes: (traffic.bytes_sent + traffic.bytes_received)
            .saturating_sub(traffic_before.bytes_sent + traffic_before.bytes_received),
    })
}
