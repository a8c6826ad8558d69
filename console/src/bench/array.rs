//! `bench array`: the array's data path on loopback — sequential `Read` of
//! an LU into a file and to nowhere, 4 KiB writes with 1 and 32 in flight —
//! next to `qemu-nbd` + `qemu-img convert` of the same file.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow};
use futures_util::StreamExt;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use splitmirror_proto::client::ArrayClient;

use splitmirror_proto::security::role;

use super::common::{RandomLuArray, array_with_random_lu, f1, f2, mb_per_s, table};
use super::{BenchOptions, BenchOutput, peer};

pub async fn run(options: &BenchOptions) -> anyhow::Result<BenchOutput> {
    let size = options.size_bytes;
    // LU 1 (an origin, read on its own) holds random data.
    let RandomLuArray {
        dir,
        array,
        lu_file,
        credentials,
    } = array_with_random_lu(1, size, true).await?;
    // LU 1 is an origin: db-server's identity may read it.
    let client = ArrayClient::new(&array.url(), &credentials.security(role::DB)?)?;
    // The client connects at its first call: make that call before the
    // clock starts.
    client.list_lus().await?;
    let blocks = size / 4096;

    // Read to nowhere.
    let started = Instant::now();
    let received = read_lu(&client, blocks, |_| Ok(())).await?;
    let to_nowhere = mb_per_s(received, started.elapsed());

    // Read into a file (a writer thread, so that the file writes overlap the
    // stream; no fsync, as qemu-img convert does none either).
    let out = dir.path().join("read.raw");
    let started = Instant::now();
    let (sender, receiver) = std::sync::mpsc::sync_channel::<Vec<u8>>(8);
    let out_path = out.clone();
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        use std::io::Write;
        let mut file = std::fs::File::create(out_path)?;
        for chunk in receiver {
            file.write_all(&chunk)?;
        }
        Ok(())
    });
    read_lu(&client, blocks, |data| {
        sender
            .send(data)
            .map_err(|_| anyhow!("the file writer stopped"))
    })
    .await?;
    drop(sender);
    writer
        .join()
        .map_err(|_| anyhow!("the file writer panicked"))?
        .with_context(|| format!("writing {}", out.display()))?;
    let into_file = mb_per_s(size, started.elapsed());
    let _ = std::fs::remove_file(&out);

    // The peer, on the same file.
    let peer_figures: Result<f64, String> = match peer::missing() {
        Some(reason) => Err(reason),
        None => {
            let export = peer::export(&lu_file)?;
            let out = dir.path().join("peer.raw");
            let (copied, _) = peer::convert(&export, &out)?;
            let _ = std::fs::remove_file(&out);
            Ok(mb_per_s(size, copied))
        }
    };

    // 4 KiB writes to the mirror LU, with 1 and 32 in flight.
    let seconds = options.seconds;
    let one = write_ops(&client, 1, seconds, blocks).await?;
    let many = write_ops(&client, 32, seconds, blocks).await?;
    array.shutdown().await.map_err(anyhow::Error::msg)?;

    let (peer_mb, ratio) = match &peer_figures {
        Ok(mb) => (json!(mb), json!(into_file / mb)),
        Err(reason) => (json!(null), json!(reason)),
    };
    let mut rows = vec![
        vec!["Read → file".into(), f1(into_file), "MB/s".into()],
        vec!["Read → nowhere".into(), f1(to_nowhere), "MB/s".into()],
    ];
    match &peer_figures {
        Ok(mb) => {
            rows.push(vec![
                "qemu-nbd + qemu-img convert → file".into(),
                f1(*mb),
                "MB/s".into(),
            ]);
            rows.push(vec![
                "ratio Read → file / peer".into(),
                f2(into_file / mb),
                "× (target ≥ 1.2)".into(),
            ]);
        }
        Err(reason) => rows.push(vec!["peer".into(), "skipped".into(), reason.clone()]),
    }
    rows.push(vec![
        "4 KiB writes, 1 in flight".into(),
        f1(one),
        "ops/s".into(),
    ]);
    rows.push(vec![
        "4 KiB writes, 32 in flight".into(),
        f1(many),
        "ops/s".into(),
    ]);
    Ok(BenchOutput {
        table: table(&["array, LU of random data", "value", "unit"], &rows),
        figures: json!({
            "read_to_file_mb_per_s": into_file,
            "read_to_nowhere_mb_per_s": to_nowhere,
            "peer_qemu_img_convert_mb_per_s": peer_mb,
            "ratio_read_to_file_over_peer": ratio,
            "write_4k_ops_per_s_1_in_flight": one,
            "write_4k_ops_per_s_32_in_flight": many,
        }),
    })
}

/// Reads LU 1 whole with one `Read` stream, handing each chunk to `sink`;
/// answers the bytes received.
async fn read_lu(
    client: &ArrayClient,
    blocks: u64,
    mut sink: impl FnMut(Vec<u8>) -> anyhow::Result<()>,
) -> anyhow::Result<u64> {
    let mut stream = client.read_stream(1, 0, blocks).await?;
    let mut received = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        received += chunk.len() as u64;
        sink(chunk)?;
    }
    Ok(received)
}

/// 4 KiB writes to mirror LU 0 at random LBAs for `duration`, `in_flight`
/// at a time; answers operations per second.
async fn write_ops(
    client: &ArrayClient,
    in_flight: u64,
    duration: Duration,
    blocks: u64,
) -> anyhow::Result<f64> {
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..in_flight {
        let client = client.clone();
        let done = done.clone();
        tasks.spawn(async move {
            let mut rng = SmallRng::seed_from_u64(worker);
            let mut data = vec![0u8; 4096];
            rng.fill(&mut data[..]);
            while started.elapsed() < duration {
                let lba = rng.random_range(0..blocks);
                client.write(0, lba, data.clone()).await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        });
    }
    while let Some(result) = tasks.join_next().await {
        result.context("a writer task")??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}
