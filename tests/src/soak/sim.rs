//! The nemesis's fast, in-process layer: the snapshot manager and its
//! journal (real files) over an in-memory array, driven from a seed through
//! writes to both virtual LUs, acquires (split or copy-on-write, with a
//! save area small enough to fill), deletes, resyncs, failed array writes,
//! crashes (also in the middle of a write, after the array applied it),
//! and journals damaged between a crash and the restart. After every step
//! the volume is compared with a plain model: the data virtual LU reads
//! what was acknowledged, a held split snapshot reads what it held plus its
//! own writes, a held copy-on-write snapshot reads what it held (its writes
//! refused) until it is invalidated — only by a full save area, a failed
//! write or a restart — and a Synchronized pair has origin == mate == data.
//!
//! No network and no processes: a seed takes milliseconds, so thousands of
//! seeds run in the time one soak round takes.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use db_server::array_port::{ArrayPort, BoxFuture, ClientError, MemoryArray, OwnAccess, PairInfo};
use db_server::journal::Journal;
use db_server::lu_status::VirtualLu;
use db_server::manager::{
    ManagerConfig, ManagerTestHooks, ResyncMethod, SnapshotManager, SnapshotMethod,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Canary;

const BLOCK: usize = 512;
const BLOCKS: u64 = 128;
const STEPS: usize = 60;
/// Journal regions of 8 blocks: rounding matters at this size.
const REGION_BYTES: u64 = 4096;
/// The save area of copy-on-write snapshots: a plain LU of 40 blocks, which
/// a snapshot held over a few writes fills (and is invalidated).
const SAVE_AREA_LU: u32 = 3;
const SAVE_AREA_BLOCKS: u64 = 40;
const PAIR: PairInfo = PairInfo {
    mirror_lu: 0,
    origin_lu: 1,
    mate_lu: 2,
    block_size_bytes: BLOCK as u32,
    block_count: BLOCKS,
};

/// The in-memory array, with a switch that makes the next write "kill"
/// db-server right after the array applied it: the call never answers.
struct SimArray {
    memory: MemoryArray,
    hang_after_next_write: AtomicBool,
    applied: Notify,
}

impl ArrayPort for SimArray {
    fn list_pairs(&self) -> BoxFuture<'_, Result<Vec<PairInfo>, ClientError>> {
        self.memory.list_pairs()
    }

    fn read(&self, lu: u32, lba: u64, blocks: u64) -> BoxFuture<'_, Result<Vec<u8>, ClientError>> {
        self.memory.read(lu, lba, blocks)
    }

    fn write(&self, lu: u32, lba: u64, data: Vec<u8>) -> BoxFuture<'_, Result<(), ClientError>> {
        Box::pin(async move {
            let result = self.memory.write(lu, lba, data).await;
            // The write of the volume's data, not a save ahead of it.
            if lu != SAVE_AREA_LU && self.hang_after_next_write.swap(false, Ordering::SeqCst) {
                self.applied.notify_one();
                std::future::pending::<()>().await;
            }
            result
        })
    }

    fn copy_range(
        &self,
        src_lu: u32,
        dst_lu: u32,
        lba: u64,
        blocks: u64,
    ) -> BoxFuture<'_, Result<(), ClientError>> {
        self.memory.copy_range(src_lu, dst_lu, lba, blocks)
    }

    fn flush(&self, lu: u32) -> BoxFuture<'_, Result<(), ClientError>> {
        self.memory.flush(lu)
    }

    fn checksums(
        &self,
        lu: u32,
        lba: u64,
        blocks: u64,
        chunk_blocks: u64,
    ) -> BoxFuture<'_, Result<Vec<[u8; 32]>, ClientError>> {
        self.memory.checksums(lu, lba, blocks, chunk_blocks)
    }

    fn identity(&self) -> Option<&str> {
        self.memory.identity()
    }

    fn lu_page(
        &self,
        lu: u32,
    ) -> BoxFuture<'_, Result<splitmirror_proto::client::LuPage, ClientError>> {
        self.memory.lu_page(lu)
    }

    fn set_own_access(
        &self,
        lu: u32,
        access: OwnAccess,
        purpose: &str,
    ) -> BoxFuture<'_, Result<(), ClientError>> {
        self.memory.set_own_access(lu, access, purpose)
    }
}

/// What the volume must read, per the operations that were acknowledged.
struct Model {
    data: Vec<u8>,
    /// The snapshot virtual LU while one is held (and, copy-on-write, not
    /// known to be invalidated).
    snapshot: Option<Vec<u8>>,
    run: u32,
    /// The held snapshot is copy-on-write: what the model knows of it.
    cow: Option<CowModel>,
}

/// A held copy-on-write snapshot as the model sees it.
#[derive(Default)]
struct CowModel {
    /// Blocks written since the acquire: each saved once.
    saved: std::collections::BTreeSet<u64>,
    /// A write failed while it was held: slots may have been used for
    /// nothing, so a save area found full early is no failure.
    write_failed: bool,
    /// It was found invalidated (reads refused): it stays so.
    invalidated: bool,
}

impl CowModel {
    /// The save area cannot have held every block written since the
    /// acquire: it must be invalidated.
    fn must_be_invalidated(&self) -> bool {
        self.saved.len() as u64 > SAVE_AREA_BLOCKS
    }

    /// Whether an invalidation is explained (a full save area, counted
    /// with a slot of slack for where "full" is decided, or a failed
    /// write).
    fn may_be_invalidated(&self) -> bool {
        self.invalidated || self.write_failed || self.saved.len() as u64 >= SAVE_AREA_BLOCKS
    }
}

/// One running db-server: the manager and what stops it.
struct Node {
    manager: Arc<SnapshotManager>,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

/// What the fast mode found over many seeds.
#[derive(Debug, Default)]
pub struct SimSummary {
    pub seeds: u64,
    pub steps: u64,
    pub crashes: u64,
    pub crashes_mid_write: u64,
    pub damaged_journals: u64,
    pub failed_writes: u64,
    /// Copy-on-write snapshots acquired, and of those invalidated by a
    /// full save area (or a failed write) and by a restart.
    pub cow_acquires: u64,
    pub cow_invalidated_full: u64,
    pub cow_invalidated_restart: u64,
    /// The first seed that broke an invariant, and how.
    pub failure: Option<(u64, String)>,
}

/// Runs `seeds` seeds from `first_seed`; stops at the first failure.
pub async fn run_seeds(
    first_seed: u64,
    seeds: u64,
    canary: Option<Canary>,
    mut progress: impl FnMut(&SimSummary),
) -> SimSummary {
    let mut summary = SimSummary::default();
    for seed in first_seed..first_seed + seeds {
        summary.seeds += 1;
        if let Err(e) = run_seed(seed, canary, &mut summary).await {
            summary.failure = Some((seed, e));
            break;
        }
        if summary.seeds.is_multiple_of(500) {
            progress(&summary);
        }
    }
    summary
}

fn hooks_for(canary: Option<Canary>) -> ManagerTestHooks {
    ManagerTestHooks {
        resync_skips_recheck: canary == Some(Canary::ResyncSkipsRecheck),
        forget_snapshot_writes: canary == Some(Canary::ForgetSnapshotWrites),
        journal_intent_after_write: canary == Some(Canary::IntentAfterWrite),
        skip_cow_save: canary == Some(Canary::CowSkipsSave),
    }
}

/// A directory on tmpfs when there is one: the journal's fsyncs cost
/// nothing there, and a simulated crash loses nothing the page cache holds
/// either way.
fn scratch_dir() -> std::io::Result<tempfile::TempDir> {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        tempfile::Builder::new()
            .prefix("splitmirror-sim-")
            .tempdir_in(shm)
    } else {
        tempfile::Builder::new()
            .prefix("splitmirror-sim-")
            .tempdir()
    }
}

async fn start(array: &Arc<SimArray>, dir: &Path, canary: Option<Canary>) -> Result<Node, String> {
    let replayed =
        Journal::open(dir, REGION_BYTES).map_err(|e| format!("opening the journal: {e}"))?;
    let cancel = CancellationToken::new();
    let tasks = TaskTracker::new();
    let config = ManagerConfig {
        resync_method: ResyncMethod::Offload,
        resync_chunk_bytes: 8 * BLOCK as u64,
        hooks: hooks_for(canary),
        save_areas: [(PAIR.mirror_lu, SAVE_AREA_LU)].into(),
        ..ManagerConfig::default()
    };
    let manager = SnapshotManager::start(
        array.clone(),
        vec![PAIR],
        Some(replayed),
        config,
        cancel.clone(),
        tasks.clone(),
    )
    .await
    .map_err(|e| format!("starting the manager: {e}"))?;
    Ok(Node {
        manager,
        cancel,
        tasks,
    })
}

/// The process dies: nothing more reaches the journal, every task stops.
async fn crash(node: Node) {
    crash_during(node, None).await;
}

/// The same, with a write hanging inside the array call: once nothing can
/// reach the journal any more, the write is dropped where it hangs, which
/// lets go of the locks it holds, as the process's death would.
async fn crash_during(node: Node, write: Option<tokio::task::JoinHandle<()>>) {
    node.manager.close_journal();
    if let Some(write) = write {
        write.abort();
        let _ = write.await;
    }
    node.cancel.cancel();
    node.tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), node.tasks.wait()).await;
}

fn random_range(rng: &mut SmallRng) -> Range<u64> {
    let len = rng.random_range(1..=12u64);
    let start = rng.random_range(0..BLOCKS - len);
    start..start + len
}

fn bytes(range: &Range<u64>) -> Range<usize> {
    range.start as usize * BLOCK..range.end as usize * BLOCK
}

/// One seed: a random walk through the operations, checked after each.
pub async fn run_seed(
    seed: u64,
    canary: Option<Canary>,
    summary: &mut SimSummary,
) -> Result<(), String> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let dir = scratch_dir().map_err(|e| format!("scratch directory: {e}"))?;
    let array = Arc::new(SimArray {
        memory: MemoryArray::new(vec![PAIR]).with_plain_lu(
            SAVE_AREA_LU,
            BLOCK as u32,
            SAVE_AREA_BLOCKS,
        ),
        hang_after_next_write: AtomicBool::new(false),
        applied: Notify::new(),
    });
    let mut node = start(&array, dir.path(), canary).await?;
    let mut model = Model {
        data: vec![0; BLOCKS as usize * BLOCK],
        snapshot: None,
        run: 0,
        cow: None,
    };
    wait_synchronized(&node, "the first start").await?;
    for step in 0..STEPS {
        summary.steps += 1;
        let held = node.manager.holder(0).map_err(|e| e.to_string())?.is_some();
        let what = rng.random_range(0..100);
        let context = |text: &str| format!("step {step} ({text})");
        match what {
            // Writes to the data virtual LU, the common case.
            0..=44 => {
                let failed_before = summary.failed_writes;
                let range = random_range(&mut rng);
                let mut data = vec![0u8; bytes(&range).len()];
                rng.fill(&mut data[..]);
                write_until_done(
                    &node,
                    &array,
                    VirtualLu::Data,
                    &range,
                    &data,
                    &mut rng,
                    summary,
                )
                .await
                .map_err(|e| format!("{}: {e}", context("data write")))?;
                model.data[bytes(&range)].copy_from_slice(&data);
                if let Some(cow) = &mut model.cow {
                    cow.saved.extend(range.clone());
                    cow.write_failed |= summary.failed_writes > failed_before;
                }
            }
            45..=54 if held && model.cow.is_some() => {
                // The copy-on-write snapshot virtual LU is read-only.
                let range = random_range(&mut rng);
                let data = vec![0xC0u8; bytes(&range).len()];
                if node
                    .manager
                    .write(0, VirtualLu::Snapshot, range.start, data)
                    .await
                    .is_ok()
                {
                    return Err(context(
                        "a write to a copy-on-write snapshot was acknowledged",
                    ));
                }
            }
            45..=54 if held => {
                let range = random_range(&mut rng);
                let mut data = vec![0u8; bytes(&range).len()];
                rng.fill(&mut data[..]);
                write_until_done(
                    &node,
                    &array,
                    VirtualLu::Snapshot,
                    &range,
                    &data,
                    &mut rng,
                    summary,
                )
                .await
                .map_err(|e| format!("{}: {e}", context("snapshot write")))?;
                if let Some(snapshot) = &mut model.snapshot {
                    snapshot[bytes(&range)].copy_from_slice(&data);
                }
            }
            55..=66 if !held => {
                // Acquire: only from Synchronized.
                wait_synchronized(&node, &context("before acquire")).await?;
                model.run += 1;
                let method = if rng.random_bool(0.5) {
                    summary.cow_acquires += 1;
                    SnapshotMethod::Cow
                } else {
                    SnapshotMethod::Split
                };
                node.manager
                    .acquire_by(
                        0,
                        &format!("run-{}", model.run),
                        u64::from(model.run),
                        method,
                    )
                    .await
                    .map_err(|e| format!("{}: {e}", context("acquire")))?;
                model.snapshot = Some(model.data.clone());
                model.cow = (method == SnapshotMethod::Cow).then(CowModel::default);
            }
            67..=76 if held => {
                let deleted = node
                    .manager
                    .delete(0, &format!("run-{}", model.run), false)
                    .await
                    .map_err(|e| format!("{}: {e}", context("delete")))?;
                model.snapshot = None;
                if let Some(cow) = model.cow.take() {
                    // Nothing to resync: the pair never split. (A write the
                    // array failed while it was held leaves its range
                    // recorded, as it would without a snapshot.)
                    let mode = node.manager.status().first().map(|v| v.routing.data_mode);
                    if !cow.write_failed
                        && (deleted.ranges_to_resync != 0
                            || mode != Some(db_server::lu_status::Mode::Synchronized))
                    {
                        return Err(context(&format!(
                            "a copy-on-write delete with no failed write left {} ranges to \
                             resync, the pair {mode:?}",
                            deleted.ranges_to_resync
                        )));
                    }
                }
                if rng.random_bool(0.5) {
                    wait_synchronized(&node, &context("after delete")).await?;
                }
            }
            77..=86 => {
                // A crash at a quiet moment (the resync may be running).
                summary.crashes += 1;
                crash(node).await;
                node = start(&array, dir.path(), canary).await?;
                restarted_with_cow(&node, &mut model, true, summary)
                    .await
                    .map_err(|e| context(&e))?;
            }
            87..=92 => {
                // A crash in the middle of a write: the array applied it,
                // the answer never came back.
                summary.crashes_mid_write += 1;
                let range = random_range(&mut rng);
                let target = if held && model.cow.is_none() && rng.random_bool(0.3) {
                    VirtualLu::Snapshot
                } else {
                    VirtualLu::Data
                };
                let mut data = vec![0u8; bytes(&range).len()];
                rng.fill(&mut data[..]);
                array.hang_after_next_write.store(true, Ordering::SeqCst);
                let manager = node.manager.clone();
                let write_data = data.clone();
                let lba = range.start;
                let write = tokio::spawn(async move {
                    let _ = manager.write(0, target, lba, write_data).await;
                });
                let applied =
                    tokio::time::timeout(Duration::from_secs(5), array.applied.notified()).await;
                crash_during(node, Some(write)).await;
                array.hang_after_next_write.store(false, Ordering::SeqCst);
                if applied.is_ok() {
                    // The bytes are on the array although never acknowledged.
                    match target {
                        VirtualLu::Data => model.data[bytes(&range)].copy_from_slice(&data),
                        VirtualLu::Snapshot if model.cow.is_some() => {
                            return Err(context(
                                "a write to a copy-on-write snapshot reached the array",
                            ));
                        }
                        VirtualLu::Snapshot => {
                            if let Some(snapshot) = &mut model.snapshot {
                                snapshot[bytes(&range)].copy_from_slice(&data);
                            }
                        }
                    }
                }
                node = start(&array, dir.path(), canary).await?;
                restarted_with_cow(&node, &mut model, true, summary)
                    .await
                    .map_err(|e| context(&e))?;
            }
            93..=99 => {
                // A crash, then the journal damaged while db-server is down.
                summary.crashes += 1;
                summary.damaged_journals += 1;
                crash(node).await;
                let corrupt = rng.random_bool(0.5);
                let damaged =
                    super::damage_journal_file(&dir.path().join("journal.log"), corrupt, &mut rng)?;
                node = start(&array, dir.path(), canary).await?;
                restarted_with_cow(&node, &mut model, !damaged, summary)
                    .await
                    .map_err(|e| context(&e))?;
                if damaged {
                    // Damage inside the committed part: the journal must be
                    // judged unusable and kept aside, and a snapshot it held
                    // cannot be trusted, so it is dropped (the pair is then
                    // compared whole).
                    let set_aside = super::set_aside_journals(dir.path());
                    if set_aside.is_empty() {
                        return Err(context(
                            "a journal damaged inside its committed part was not set aside as unusable",
                        ));
                    }
                    for path in set_aside {
                        let _ = std::fs::remove_file(path);
                    }
                    if node.manager.holder(0).map_err(|e| e.to_string())?.is_some() {
                        return Err(context("a snapshot survived an unusable journal"));
                    }
                    model.snapshot = None;
                }
            }
            _ => continue,
        }
        // Nothing but an unusable journal may make a snapshot disappear.
        if model.snapshot.is_some() && node.manager.holder(0).map_err(|e| e.to_string())?.is_none()
        {
            return Err(context("a held snapshot was lost across a crash"));
        }
        check(&node, &array, &mut model, summary)
            .await
            .map_err(|e| format!("after {}: {e}", context("check")))?;
    }
    // The end of every walk: release, resync, and origin == mate == data.
    if node.manager.holder(0).map_err(|e| e.to_string())?.is_some() {
        node.manager
            .delete(0, &format!("run-{}", model.run), false)
            .await
            .map_err(|e| format!("final delete: {e}"))?;
        model.snapshot = None;
        model.cow = None;
    }
    wait_synchronized(&node, "the end").await?;
    check(&node, &array, &mut model, summary).await?;
    crash(node).await;
    Ok(())
}

/// A write retried until the array takes it; sometimes the first try
/// fails (the array is down), which leaves the outcome unknown.
async fn write_until_done(
    node: &Node,
    array: &SimArray,
    target: VirtualLu,
    range: &Range<u64>,
    data: &[u8],
    rng: &mut SmallRng,
    summary: &mut SimSummary,
) -> Result<(), String> {
    if rng.random_range(0..20) == 0 {
        summary.failed_writes += 1;
        array.memory.fail_writes.store(true, Ordering::SeqCst);
        let failed = node
            .manager
            .write(0, target, range.start, data.to_vec())
            .await;
        array.memory.fail_writes.store(false, Ordering::SeqCst);
        if failed.is_ok() {
            return Err("a write the array refused was acknowledged".into());
        }
    }
    node.manager
        .write(0, target, range.start, data.to_vec())
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

async fn wait_synchronized(node: &Node, when: &str) -> Result<(), String> {
    node.manager
        .wait_synchronized(0, Duration::from_secs(20))
        .await
        .map_err(|e| format!("{when}: the pair did not become Synchronized: {e}"))
}

/// After a restart with a copy-on-write snapshot held: it is invalidated
/// (its save-area map is not journaled) and its reads refused. With
/// `journal_kept` false the journal was set aside, and the snapshot with
/// it: only the refusal is checked.
async fn restarted_with_cow(
    node: &Node,
    model: &mut Model,
    journal_kept: bool,
    summary: &mut SimSummary,
) -> Result<(), String> {
    if model.cow.take().is_none() {
        return Ok(());
    }
    model.snapshot = None;
    summary.cow_invalidated_restart += 1;
    if journal_kept && node.manager.check_snapshot_valid(0).is_ok() {
        return Err("a copy-on-write snapshot is still valid after a restart".into());
    }
    if node
        .manager
        .read(0, VirtualLu::Snapshot, 0, BLOCKS)
        .await
        .is_ok()
    {
        return Err("a copy-on-write snapshot answered a read after a restart".into());
    }
    Ok(())
}

/// The volume against the model.
async fn check(
    node: &Node,
    array: &SimArray,
    model: &mut Model,
    summary: &mut SimSummary,
) -> Result<(), String> {
    let data = node
        .manager
        .read(0, VirtualLu::Data, 0, BLOCKS)
        .await
        .map_err(|e| format!("reading the data virtual LU: {e}"))?;
    if let Some(block) = first_difference(&data, &model.data) {
        return Err(format!(
            "the data virtual LU differs from what was written at block {block}"
        ));
    }
    if let (Some(cow), Some(expected)) = (&mut model.cow, &model.snapshot) {
        match node.manager.read(0, VirtualLu::Snapshot, 0, BLOCKS).await {
            Ok(_) if cow.invalidated => {
                return Err("an invalidated copy-on-write snapshot answered a read".into());
            }
            Ok(_) if cow.must_be_invalidated() => {
                return Err(format!(
                    "{} blocks were written under a copy-on-write snapshot with a save area of \
                     {SAVE_AREA_BLOCKS}, and it still answers reads",
                    cow.saved.len()
                ));
            }
            Ok(snapshot) => {
                if let Some(block) = first_difference(&snapshot, expected) {
                    return Err(format!(
                        "the copy-on-write snapshot differs from the volume at the acquire at \
                         block {block} ({} blocks saved)",
                        cow.saved.len()
                    ));
                }
            }
            Err(e) if !cow.may_be_invalidated() => {
                return Err(format!(
                    "a copy-on-write snapshot with {} of {SAVE_AREA_BLOCKS} blocks saved and no \
                     failed write refused a read: {e}",
                    cow.saved.len()
                ));
            }
            Err(_) => {
                if !cow.invalidated {
                    summary.cow_invalidated_full += 1;
                }
                cow.invalidated = true;
            }
        }
    } else if let Some(expected) = &model.snapshot {
        let snapshot = node
            .manager
            .read(0, VirtualLu::Snapshot, 0, BLOCKS)
            .await
            .map_err(|e| format!("reading the snapshot virtual LU: {e}"))?;
        if let Some(block) = first_difference(&snapshot, expected) {
            return Err(format!(
                "the snapshot differs from the volume at the acquire (plus its own writes) at block {block}"
            ));
        }
    }
    let synchronized = node
        .manager
        .status()
        .first()
        .is_some_and(|v| v.routing.data_mode == db_server::lu_status::Mode::Synchronized);
    if synchronized {
        let origin = array.memory.lu(PAIR.origin_lu);
        let mate = array.memory.lu(PAIR.mate_lu);
        if let Some(block) = first_difference(&origin, &mate) {
            return Err(format!(
                "the pair is Synchronized but origin and mate differ at block {block}"
            ));
        }
    }
    Ok(())
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.chunks(BLOCK)
        .zip(b.chunks(BLOCK))
        .position(|(x, y)| x != y)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CI's share of the fast mode: a few hundred seeds, and each canary
    /// of the snapshot manager caught within them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_model_holds_over_many_seeds_and_catches_each_canary() {
        let first = crate::harness::seed("soak_sim");
        let summary = run_seeds(first, 300, None, |_| {}).await;
        println!(
            "sim: {} seeds from {first}, {} steps, {} crashes, {} mid-write, {} damaged journals, {} failed writes",
            summary.seeds,
            summary.steps,
            summary.crashes,
            summary.crashes_mid_write,
            summary.damaged_journals,
            summary.failed_writes
        );
        if let Some((seed, what)) = &summary.failure {
            panic!(
                "seed {seed}: {what} (replay: cargo run --release -p splitmirror-tests --bin soak -- --fast --seed {seed} --seeds 1)"
            );
        }
        for canary in [
            Canary::ForgetSnapshotWrites,
            Canary::IntentAfterWrite,
            Canary::CowSkipsSave,
        ] {
            let caught = run_seeds(first, 300, Some(canary), |_| {}).await;
            let (seed, what) = caught
                .failure
                .unwrap_or_else(|| panic!("canary {} was not caught in 300 seeds", canary.name()));
            println!(
                "sim: canary {} caught at seed {seed}: {what}",
                canary.name()
            );
        }
    }
}
