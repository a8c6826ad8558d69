//! A model-based test of the snapshot manager against a real array: random
//! sequences of writes to the data and snapshot virtual LUs, acquires,
//! deletes and resyncs, checked after every step against a plain model — a
//! byte vector per virtual LU and a per-block bitmap standing in for the
//! update location table. Writes are aimed at the edges of recorded ranges
//! (adjacent, overlapping left and right, whole overwrite, first and last
//! block), where merging and splitting go wrong.

use array_node::ArrayTestHooks;
use db_server::manager::{ArrayModeKeeping, ManagerConfig, ManagerTestHooks, ResyncMethod};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use splitmirror_proto::array::v1::MirrorMode;
use splitmirror_proto::db::v1 as pb;

use splitmirror_proto::reason::Reason;

use crate::harness::{self, ClientError, DbClient, ErrorKind, read_volume};

const BLOCK: usize = 512;
const BLOCKS: u64 = 256;
const STEPS: usize = 120;

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ModelMode {
    Synchronized,
    Snapshot,
    Resynchronizing,
}

struct Model {
    data: Vec<u8>,
    snapshot: Option<Vec<u8>>,
    /// One flag per block: written since the acquire (Snapshot mode only).
    dirty: Vec<bool>,
    mode: ModelMode,
    run: u32,
    /// The run whose snapshot was deleted last: a delete retried by it is
    /// answered `already_deleted`.
    last_deleted: Option<u32>,
}

impl Model {
    fn dirty_ranges(&self) -> Vec<(u64, u64)> {
        let mut ranges = Vec::new();
        let mut start = None;
        for (block, &dirty) in self.dirty.iter().chain([&false]).enumerate() {
            match (dirty, start) {
                (true, None) => start = Some(block as u64),
                (false, Some(s)) => {
                    ranges.push((s, block as u64 - s));
                    start = None;
                }
                _ => {}
            }
        }
        ranges
    }
}

/// A block range aimed at the edges of what is recorded.
fn aimed_range(rng: &mut SmallRng, model: &Model) -> (u64, u64) {
    let ranges = model.dirty_ranges();
    let len = rng.random_range(1..=8u64);
    let clamp = |lo: i64, hi: i64| -> (u64, u64) {
        let lo = lo.clamp(0, BLOCKS as i64 - 1) as u64;
        let hi = (hi.clamp(lo as i64 + 1, BLOCKS as i64)) as u64;
        (lo, hi - lo)
    };
    let pick = rng.random_range(0..10);
    if ranges.is_empty() || pick >= 8 {
        return match pick % 3 {
            0 => (0, len.min(BLOCKS)),
            1 => (BLOCKS - len, len),
            _ => {
                let lba = rng.random_range(0..BLOCKS - len);
                (lba, len)
            }
        };
    }
    let (start, count) = ranges[rng.random_range(0..ranges.len())];
    let (a, b, k) = (start as i64, (start + count) as i64, len as i64);
    match pick {
        0 => clamp(a - k, a),     // adjacent on the left
        1 => clamp(b, b + k),     // adjacent on the right
        2 => clamp(a - k, a + 1), // overlapping the left edge
        3 => clamp(b - 1, b + k), // overlapping the right edge
        4 => clamp(a - 1, b + 1), // whole overwrite
        5 => clamp(a + 1, b - 1), // inside (splits nothing, merges)
        6 => clamp(a, a + 1),     // first block of the range
        _ => clamp(b - 1, b),     // last block of the range
    }
}

async fn write(
    client: &DbClient,
    target: pb::VirtualLu,
    lba: u64,
    data: Vec<u8>,
) -> Result<(), ClientError> {
    client.write(0, target, lba, data).await.map(drop)
}

/// Whether `error` is db-server's refusal with `reason` (a
/// `FAILED_PRECONDITION` with that machine-readable reason).
fn refused(error: &ClientError, reason: Reason) -> bool {
    error.kind == ErrorKind::FailedPrecondition && error.reason == Some(reason)
}

async fn check(client: &DbClient, model: &Model, step: usize) -> Result<(), String> {
    let data = read_volume(client, 0, pb::VirtualLu::Data, 0, BLOCKS).await;
    ensure!(
        data == model.data,
        "step {step}: the data volume differs from the model"
    );
    let status = harness::volume_status(client, 0).await;
    if let Some(snapshot) = &model.snapshot {
        let read = read_volume(client, 0, pb::VirtualLu::Snapshot, 0, BLOCKS).await;
        ensure!(
            &read == snapshot,
            "step {step}: the snapshot differs from the data at acquire plus its own writes"
        );
        let table: Vec<(u64, u64)> = status
            .dirty_ranges
            .iter()
            .map(|r| (r.lba, r.blocks))
            .collect();
        ensure!(
            table == model.dirty_ranges(),
            "step {step}: update location table {table:?}, model {:?}",
            model.dirty_ranges()
        );
    }
    Ok(())
}

/// With a stateful array: the array's own mode of the pair is the model's
/// (a resync may have finished before the model waits for it).
async fn check_array_mode(
    array: &harness::ArrayClient,
    model: &Model,
    step: usize,
) -> Result<(), String> {
    let page = array
        .mode_sense(0)
        .await
        .map_err(|e| format!("step {step}: mode sense: {e}"))?;
    let allowed: &[MirrorMode] = match model.mode {
        ModelMode::Synchronized => &[MirrorMode::Synchronized],
        ModelMode::Snapshot => &[MirrorMode::Snapshot],
        ModelMode::Resynchronizing => &[MirrorMode::Resynchronizing, MirrorMode::Synchronized],
    };
    ensure!(
        allowed.contains(&page.mirror_mode),
        "step {step}: the array holds {:?} while the model is {:?}",
        page.mirror_mode,
        model.mode
    );
    ensure!(
        model.mode != ModelMode::Snapshot || page.mate_writable,
        "step {step}: the model's snapshot is writable, the array's mate is not"
    );
    Ok(())
}

/// Runs one random sequence; answers the first discrepancy.
async fn run_model(
    seed: u64,
    method: ResyncMethod,
    keeping: ArrayModeKeeping,
    hooks: ManagerTestHooks,
) -> Result<(), String> {
    let dir = tempfile::tempdir().expect("tempdir");
    // The model writes the snapshot virtual LU, which only an array
    // without LUN masking lets db-server write (see harness::INSECURE).
    let array = harness::start_array_with(
        &dir.path().join("array"),
        harness::small_512_pair(BLOCKS),
        ArrayTestHooks::default(),
        &harness::INSECURE,
    )
    .await;
    let manager = ManagerConfig {
        resync_method: method,
        resync_chunk_bytes: 8 * BLOCK as u64,
        array_mode: keeping,
        hooks,
        ..ManagerConfig::default()
    };
    let db = harness::start_db_with(
        &array.url(),
        &dir.path().join("db"),
        manager,
        None,
        &harness::INSECURE,
    )
    .await;
    let client = DbClient::new(&db.url(), &harness::INSECURE).expect("db-server address");
    harness::wait_all_synchronized(&client).await;
    let array_client =
        harness::ArrayClient::new(&array.url(), &harness::INSECURE).expect("array address");
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut model = Model {
        data: vec![0; BLOCKS as usize * BLOCK],
        snapshot: None,
        dirty: vec![false; BLOCKS as usize],
        mode: ModelMode::Synchronized,
        run: 0,
        last_deleted: None,
    };
    let result = async {
        for step in 0..STEPS {
            let op = rng.random_range(0..100);
            match op {
                0..=49 => {
                    let (lba, blocks) = aimed_range(&mut rng, &model);
                    let fill: u8 = rng.random();
                    let bytes = vec![fill; blocks as usize * BLOCK];
                    write(&client, pb::VirtualLu::Data, lba, bytes.clone())
                        .await
                        .map_err(|e| format!("step {step}: data write failed: {e}"))?;
                    let at = lba as usize * BLOCK;
                    model.data[at..at + bytes.len()].copy_from_slice(&bytes);
                    if model.mode == ModelMode::Snapshot {
                        model.dirty[lba as usize..(lba + blocks) as usize].fill(true);
                    }
                }
                50..=64 => {
                    let (lba, blocks) = aimed_range(&mut rng, &model);
                    let bytes = vec![rng.random::<u8>(); blocks as usize * BLOCK];
                    let result = write(&client, pb::VirtualLu::Snapshot, lba, bytes.clone()).await;
                    match (&mut model.snapshot, result) {
                        (Some(snapshot), Ok(())) => {
                            let at = lba as usize * BLOCK;
                            snapshot[at..at + bytes.len()].copy_from_slice(&bytes);
                            model.dirty[lba as usize..(lba + blocks) as usize].fill(true);
                        }
                        (None, Err(e)) if refused(&e, Reason::NoSnapshot) => {}
                        (snapshot, result) => {
                            return Err(format!(
                                "step {step}: snapshot write with snapshot={} answered {result:?}",
                                snapshot.is_some()
                            ));
                        }
                    }
                }
                65..=76 => {
                    if model.mode == ModelMode::Resynchronizing {
                        harness::wait_synchronized(&client, 0).await;
                        model.mode = ModelMode::Synchronized;
                    }
                    model.run += 1;
                    let run_id = format!("run-{}", model.run);
                    // A stateful array refuses writes to the mate of a
                    // read-only snapshot: the model's are writable there.
                    let result = client
                        .acquire_snapshot_with(pb::AcquireSnapshotRequest {
                            volume: 0,
                            run_id: run_id.clone(),
                            writable: keeping == ArrayModeKeeping::Stateful,
                            ..Default::default()
                        })
                        .await;
                    match (model.mode, result) {
                        (ModelMode::Synchronized, Ok(_)) => {
                            model.mode = ModelMode::Snapshot;
                            model.snapshot = Some(model.data.clone());
                        }
                        (ModelMode::Snapshot, Err(e)) if refused(&e, Reason::SnapshotHeld) => {
                            model.run -= 1;
                        }
                        (mode, result) => {
                            return Err(format!(
                                "step {step}: acquire in {mode:?} answered {result:?}"
                            ));
                        }
                    }
                }
                77..=88 => {
                    let run_id = format!("run-{}", model.run);
                    let result = client
                        .delete_snapshot(0, &format!("other-{run_id}"), false)
                        .await;
                    ensure!(
                        result.is_err(),
                        "step {step}: a delete by another run succeeded"
                    );
                    let result = client.delete_snapshot(0, &run_id, false).await;
                    match (model.mode, result) {
                        (ModelMode::Snapshot, Ok(_)) => {
                            model.mode = ModelMode::Resynchronizing;
                            model.snapshot = None;
                            model.dirty.fill(false);
                            model.last_deleted = Some(model.run);
                        }
                        (ModelMode::Synchronized | ModelMode::Resynchronizing, Ok(r))
                            if r.already_deleted && model.last_deleted == Some(model.run) => {}
                        (ModelMode::Synchronized, Err(e))
                            if refused(&e, Reason::WrongMode)
                                && model.last_deleted != Some(model.run) => {}
                        (mode, result) => {
                            return Err(format!(
                                "step {step}: delete in {mode:?} answered {result:?}"
                            ));
                        }
                    }
                }
                _ => {
                    if model.mode == ModelMode::Resynchronizing {
                        harness::wait_synchronized(&client, 0).await;
                        model.mode = ModelMode::Synchronized;
                        let origin = harness::lu_digests(&array_client, 1).await;
                        let mate = harness::lu_digests(&array_client, 2).await;
                        ensure!(
                            origin == mate,
                            "step {step}: origin != mate after the resync completed"
                        );
                        let status = harness::volume_status(&client, 0).await;
                        ensure!(
                            status.dirty_ranges.is_empty(),
                            "step {step}: table not empty after resync"
                        );
                    }
                }
            }
            check(&client, &model, step).await?;
            if keeping == ArrayModeKeeping::Stateful {
                check_array_mode(&array_client, &model, step).await?;
            }
        }
        // End synchronized, and prove the pair equal.
        if model.mode == ModelMode::Snapshot {
            client
                .delete_snapshot(0, &format!("run-{}", model.run), false)
                .await
                .map_err(|e| format!("final delete: {e}"))?;
            model.snapshot = None;
        }
        harness::wait_synchronized(&client, 0).await;
        let origin = harness::lu_digests(&array_client, 1).await;
        let mate = harness::lu_digests(&array_client, 2).await;
        ensure!(origin == mate, "end: origin != mate after the final resync");
        check(&client, &model, STEPS).await
    }
    .await;
    db.shutdown().await.expect("db shutdown");
    array.shutdown().await.expect("array shutdown");
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_snapshot_manager_behaves_as_the_model_says() {
    let seed = harness::seed("the_snapshot_manager_behaves_as_the_model_says");
    for (round, (method, keeping)) in [
        (ResyncMethod::Offload, ArrayModeKeeping::Stateless),
        (ResyncMethod::WriteBack, ArrayModeKeeping::Stateless),
        (ResyncMethod::Offload, ArrayModeKeeping::Stateful),
        (ResyncMethod::Offload, ArrayModeKeeping::Stateless),
    ]
    .into_iter()
    .enumerate()
    {
        let round_seed = seed.wrapping_add(round as u64);
        if let Err(e) = run_model(round_seed, method, keeping, ManagerTestHooks::default()).await {
            panic!("seed {seed} round {round} ({method:?}, {keeping}): {e}");
        }
    }
}

/// The canary: a manager that forgets to record Snapshot-mode writes must be
/// caught by the same model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_a_manager_that_forgets_snapshot_writes_is_caught() {
    let seed = harness::seed("canary_a_manager_that_forgets_snapshot_writes_is_caught");
    let hooks = ManagerTestHooks {
        forget_snapshot_writes: true,
        ..ManagerTestHooks::default()
    };
    for round in 0..5 {
        // Either array: a stateful one splits the pair itself, but the
        // table is still db-server's.
        let keeping = if round % 2 == 0 {
            ArrayModeKeeping::Stateful
        } else {
            ArrayModeKeeping::Stateless
        };
        match run_model(
            seed.wrapping_add(round),
            ResyncMethod::Offload,
            keeping,
            hooks,
        )
        .await
        {
            Err(e) => {
                eprintln!("seed {seed} round {round} ({keeping}): caught as expected: {e}");
                return;
            }
            Ok(()) => eprintln!("seed {seed} round {round} ({keeping}): not caught this round"),
        }
    }
    panic!("seed {seed}: 5 rounds never caught a manager that forgets snapshot writes");
}
