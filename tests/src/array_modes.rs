//! The array holds the mode (issue #19, first embodiment): every cell of
//! the mode × target (mirror LU, mate) × operation table answers as the
//! comment of `rpc ModeSelect` in `proto/proto/array.proto` specifies,
//! whoever sends it — db-server's identity (the pair's owner) and a second
//! identity granted read-write on the whole pair by `[[grant]]`.
//!
//! The expectation is [`TABLE`], written here by hand from that comment;
//! each cell runs at its own block, where origin and mate start different,
//! so that a read says which side it came from and ChecksumRange of the
//! origin and the mate afterwards says where a write or a copy landed. A
//! refusal is FAILED_PRECONDITION with reason mirror-mode and changes no
//! byte. Also: only the owner may ModeSelect (and only a mirror LU, a
//! defined mode, mate_writable only with SNAPSHOT), ModeSense reports the
//! mode on the mirror LU, its origin and its mate and nothing on the other
//! pair, and the mode outlives kill -9 of the array process.

use array_node::ArrayTestHooks;
use array_node::access::Access;
use splitmirror_proto::array::v1::MirrorMode;
use splitmirror_proto::client::{ArrayClient, ClientError, ErrorKind};
use splitmirror_proto::reason::Reason;
use splitmirror_proto::security::role;

use crate::harness::{self, array_process, start_array};

const BLOCK: usize = 4096;
/// Enough blocks for every cell to have its own.
const BLOCKS: u64 = 128;
/// Pair 0: mirror LU 0 = origin 1 + mate 2 (the pair under test).
const MIRROR: u32 = 0;
const ORIGIN: u32 = 1;
const MATE: u32 = 2;
/// Pair 3 (origin 4, mate 5): must keep its own mode whatever pair 0's.
const OTHER_MIRROR: u32 = 3;
/// A plain LU (in no mirror): ModeSense reports no mode for it.
const PLAIN: u32 = 8;

/// One operation of a cell, on pair 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    ReadMirror,
    WriteMirror,
    ReadMate,
    WriteMate,
    /// CopyRange origin → mate (what the resync sends).
    CopyOriginToMate,
    /// CopyRange mate → origin (what a reverse resync sends).
    CopyMateToOrigin,
    /// ChecksumRange of the mate: no data, allowed in every mode.
    ChecksumMate,
}

/// The columns of [`TABLE`], in order.
const OPS: [Op; 7] = [
    Op::ReadMirror,
    Op::WriteMirror,
    Op::ReadMate,
    Op::WriteMate,
    Op::CopyOriginToMate,
    Op::CopyMateToOrigin,
    Op::ChecksumMate,
];

/// What a cell must answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// A read that answers the origin's bytes.
    ReadsOrigin,
    /// A read that answers the origin's or the mate's bytes (the array may
    /// read either side of a synchronized pair).
    ReadsEither,
    /// A read that answers the mate's bytes.
    ReadsMate,
    /// Allowed, and afterwards exactly these sides hold the new bytes (a
    /// write's data, or the copy's source); the others are as they were.
    Lands { origin: bool, mate: bool },
    /// Allowed, changes nothing (ChecksumRange).
    Answers,
    /// FAILED_PRECONDITION, reason mirror-mode; no byte changes.
    Refused,
}

const BOTH: Answer = Answer::Lands {
    origin: true,
    mate: true,
};
const ORIGIN_ONLY: Answer = Answer::Lands {
    origin: true,
    mate: false,
};
const MATE_ONLY: Answer = Answer::Lands {
    origin: false,
    mate: true,
};
use Answer::{Answers, ReadsEither, ReadsMate, ReadsOrigin, Refused};

/// One row of the specification: a mode (and mate_writable) and the
/// answer of each operation of [`OPS`].
struct Row {
    mode: MirrorMode,
    mate_writable: bool,
    answers: [Answer; 7],
}

/// The specification, from the comment of `rpc ModeSelect` (array.proto).
/// CopyRange counts as a read of its source and a write of its
/// destination; a write naming the origin is restricted by no mode; the
/// RESYNCHRONIZING pair's own copy (origin → mate) is allowed.
#[rustfmt::skip]
const TABLE: [Row; 5] = [
    //                                    read mirror  write mirror  read mate  write mate  copy o→m    copy m→o     checksum mate
    Row { mode: MirrorMode::HostManaged,     mate_writable: false,
          answers: [ReadsEither, BOTH,        ReadsMate, MATE_ONLY, MATE_ONLY,  ORIGIN_ONLY, Answers] },
    Row { mode: MirrorMode::Synchronized,    mate_writable: false,
          answers: [ReadsEither, BOTH,        ReadsMate, Refused,   Refused,    ORIGIN_ONLY, Answers] },
    Row { mode: MirrorMode::Snapshot,        mate_writable: false,
          answers: [ReadsOrigin, ORIGIN_ONLY, ReadsMate, Refused,   Refused,    ORIGIN_ONLY, Answers] },
    Row { mode: MirrorMode::Snapshot,        mate_writable: true,
          answers: [ReadsOrigin, ORIGIN_ONLY, ReadsMate, MATE_ONLY, MATE_ONLY,  ORIGIN_ONLY, Answers] },
    Row { mode: MirrorMode::Resynchronizing, mate_writable: false,
          answers: [ReadsOrigin, BOTH,        Refused,   Refused,   MATE_ONLY,  Refused,     Answers] },
];

/// The senders: the owner, and an identity granted read-write on the
/// mirror LU, its origin and its mate.
const SENDERS: [&str; 2] = [role::DB, role::BACKUP];

/// The bytes of one block: `tag` 1 = the origin's at the start, 2 = the
/// mate's at the start, 3 = a write's.
fn block(lba: u64, tag: u8) -> Vec<u8> {
    let mut data = vec![tag; BLOCK];
    data[..8].copy_from_slice(&lba.to_le_bytes());
    data
}

fn digest(data: &[u8]) -> [u8; 32] {
    *blake3::hash(data).as_bytes()
}

/// The digest of one block of an LU, by ChecksumRange (allowed in every
/// mode).
async fn block_digest(owner: &ArrayClient, lu: u32, lba: u64) -> [u8; 32] {
    owner
        .checksums(lu, lba, 1, 1)
        .await
        .unwrap_or_else(|e| panic!("checksum of LU {lu} block {lba}: {e}"))[0]
}

/// The array: the two default pairs of [`BLOCKS`] blocks, a plain LU, and
/// the backup server's identity granted read-write on all of pair 0 (as a
/// restore's grant would make it).
fn config() -> array_node::ArrayConfig {
    let mut config = harness::small_array(BLOCKS * BLOCK as u64);
    config
        .add_plain_lu(PLAIN, BLOCK as u32, 16, &[(role::DB, Access::Read)])
        .expect("plain LU");
    for lu in [MIRROR, ORIGIN, MATE] {
        config.grants.push(array_node::access::GrantConfig {
            identity: role::BACKUP.into(),
            lu,
            access: Access::ReadWrite,
        });
    }
    config.validate().expect("valid config");
    config
}

async fn run(client: &ArrayClient, op: Op, lba: u64) -> Result<Option<Vec<u8>>, ClientError> {
    match op {
        Op::ReadMirror => client.read(MIRROR, lba, 1).await.map(Some),
        Op::ReadMate => client.read(MATE, lba, 1).await.map(Some),
        Op::WriteMirror => client.write(MIRROR, lba, block(lba, 3)).await.map(|_| None),
        Op::WriteMate => client.write(MATE, lba, block(lba, 3)).await.map(|_| None),
        Op::CopyOriginToMate => client.copy_range(ORIGIN, MATE, lba, 1).await.map(|_| None),
        Op::CopyMateToOrigin => client.copy_range(MATE, ORIGIN, lba, 1).await.map(|_| None),
        Op::ChecksumMate => client.checksums(MATE, lba, 1, 1).await.map(|_| None),
    }
}

/// Whether an error is the mode's refusal.
fn is_mode_refusal(error: &ClientError) -> bool {
    error.kind == ErrorKind::FailedPrecondition && error.reason == Some(Reason::MirrorMode)
}

/// Checks one cell at block `lba` (origin holds tag 1 and mate tag 2
/// there); answers what is wrong.
async fn check_cell(
    owner: &ArrayClient,
    caller: &ArrayClient,
    op: Op,
    answer: Answer,
    lba: u64,
) -> Option<String> {
    let (origin_bytes, mate_bytes, written) = (block(lba, 1), block(lba, 2), block(lba, 3));
    let outcome = run(caller, op, lba).await;
    let mut origin_after = digest(&origin_bytes);
    let mut mate_after = digest(&mate_bytes);
    match (answer, &outcome) {
        (Refused, Err(error)) if is_mode_refusal(error) => {}
        (Refused, other) => {
            return Some(format!(
                "expected FAILED_PRECONDITION mirror-mode, got {other:?}"
            ));
        }
        (_, Err(error)) => return Some(format!("expected {answer:?}, refused: {error}")),
        (ReadsOrigin | ReadsEither | ReadsMate, Ok(data)) => {
            let data = data.as_deref().expect("a read answers data");
            let from = if data == origin_bytes.as_slice() {
                "origin"
            } else if data == mate_bytes.as_slice() {
                "mate"
            } else {
                "neither side"
            };
            let fits = match answer {
                ReadsOrigin => from == "origin",
                ReadsMate => from == "mate",
                _ => from != "neither side",
            };
            if !fits {
                return Some(format!("expected {answer:?}, read the {from}'s bytes"));
            }
        }
        (Answer::Lands { origin, mate }, Ok(_)) => {
            let new = match op {
                Op::CopyOriginToMate => digest(&origin_bytes),
                Op::CopyMateToOrigin => digest(&mate_bytes),
                _ => digest(&written),
            };
            if origin {
                origin_after = new;
            }
            if mate {
                mate_after = new;
            }
        }
        (Answers, Ok(_)) => {}
    }
    let got = (
        block_digest(owner, ORIGIN, lba).await,
        block_digest(owner, MATE, lba).await,
    );
    let name = |d: [u8; 32]| {
        if d == digest(&origin_bytes) {
            "the origin's old bytes"
        } else if d == digest(&mate_bytes) {
            "the mate's old bytes"
        } else if d == digest(&written) {
            "the written bytes"
        } else {
            "other bytes"
        }
    };
    (got != (origin_after, mate_after)).then(|| {
        format!(
            "afterwards origin holds {} (expected {}), mate holds {} (expected {})",
            name(got.0),
            name(origin_after),
            name(got.1),
            name(mate_after)
        )
    })
}

/// ModeSense of the mirror LU, its origin and its mate as `client` sees
/// them: each must report `(mode, mate_writable)`.
async fn sensed(client: &ArrayClient, lu: u32) -> (MirrorMode, bool) {
    let page = client
        .mode_sense(lu)
        .await
        .unwrap_or_else(|e| panic!("mode sense of LU {lu}: {e}"));
    (page.mirror_mode, page.mate_writable)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mode_answers_every_read_write_and_copy_as_specified_whoever_sends_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = start_array(dir.path(), config(), ArrayTestHooks::default()).await;
    let client = |identity: &str| {
        ArrayClient::new(&node.url(), &harness::security(identity)).expect("array address")
    };
    let owner = client(role::DB);

    // Every mirror LU is HOST_MANAGED until a ModeSelect; a plain LU has
    // no mode.
    for lu in [MIRROR, ORIGIN, MATE, OTHER_MIRROR, 4, 5] {
        assert_eq!(
            sensed(&owner, lu).await,
            (MirrorMode::HostManaged, false),
            "LU {lu} at start"
        );
    }
    assert_eq!(
        sensed(&owner, PLAIN).await,
        (MirrorMode::Unspecified, false)
    );

    // Origin and mate differ at every block (written while nothing is
    // enforced), so a read names its side.
    let fill = |tag| -> Vec<u8> { (0..BLOCKS).flat_map(|lba| block(lba, tag)).collect() };
    owner.write(ORIGIN, 0, fill(1)).await.expect("fill origin");
    owner.write(MATE, 0, fill(2)).await.expect("fill mate");

    let mut cells = 0;
    let mut failures = Vec::new();
    let mut previous = MirrorMode::HostManaged;
    let mut lba = 0;
    for row in &TABLE {
        let selected = owner
            .mode_select(MIRROR, row.mode, row.mate_writable, "array_modes matrix")
            .await
            .unwrap_or_else(|e| panic!("ModeSelect {:?}: {e}", row.mode));
        assert_eq!(
            (selected.previous(), selected.mode(), selected.mate_writable),
            (previous, row.mode, row.mate_writable),
            "ModeSelect's answer"
        );
        previous = row.mode;
        assert_eq!(
            sensed(&owner, OTHER_MIRROR).await,
            (MirrorMode::HostManaged, false),
            "the other pair keeps its own mode"
        );
        for identity in SENDERS {
            let caller = client(identity);
            for lu in [MIRROR, ORIGIN, MATE] {
                assert_eq!(
                    sensed(&caller, lu).await,
                    (row.mode, row.mate_writable),
                    "ModeSense of LU {lu} by {identity}"
                );
            }
            for (op, answer) in OPS.into_iter().zip(row.answers) {
                cells += 1;
                if let Some(wrong) = check_cell(&owner, &caller, op, answer, lba).await {
                    failures.push(format!(
                        "{:?}{} {op:?} by {identity} (block {lba}): {wrong}",
                        row.mode,
                        if row.mate_writable {
                            " mate_writable"
                        } else {
                            ""
                        }
                    ));
                }
                lba += 1;
            }
        }
    }
    assert!(lba <= BLOCKS, "{lba} cells need more blocks");
    println!(
        "mirror mode matrix: {cells} cells checked, {} wrong",
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Only the owner may ModeSelect, only a mirror LU, only a defined mode,
    // mate_writable only with SNAPSHOT: each refusal leaves the mode as it
    // was (RESYNCHRONIZING, from the table's last row).
    let refusals: [(&str, u32, MirrorMode, bool, ErrorKind); 8] = [
        (
            role::BACKUP,
            MIRROR,
            MirrorMode::Synchronized,
            false,
            ErrorKind::PermissionDenied,
        ),
        (
            role::CONSOLE,
            MIRROR,
            MirrorMode::Synchronized,
            false,
            ErrorKind::PermissionDenied,
        ),
        (
            role::DB,
            ORIGIN,
            MirrorMode::Synchronized,
            false,
            ErrorKind::InvalidArgument,
        ),
        (
            role::DB,
            MATE,
            MirrorMode::Snapshot,
            false,
            ErrorKind::InvalidArgument,
        ),
        (
            role::DB,
            MIRROR,
            MirrorMode::Unspecified,
            false,
            ErrorKind::InvalidArgument,
        ),
        (
            role::DB,
            MIRROR,
            MirrorMode::Synchronized,
            true,
            ErrorKind::InvalidArgument,
        ),
        (
            role::DB,
            MIRROR,
            MirrorMode::Resynchronizing,
            true,
            ErrorKind::InvalidArgument,
        ),
        (
            role::DB,
            MIRROR,
            MirrorMode::HostManaged,
            true,
            ErrorKind::InvalidArgument,
        ),
    ];
    for (identity, lu, mode, mate_writable, kind) in refusals {
        let answer = client(identity)
            .mode_select(lu, mode, mate_writable, "must be refused")
            .await;
        assert_eq!(
            answer.as_ref().map_err(|e| e.kind).err(),
            Some(kind),
            "ModeSelect LU {lu} {mode:?} mate_writable {mate_writable} by {identity}: {answer:?}"
        );
        assert_eq!(
            sensed(&owner, MIRROR).await,
            (MirrorMode::Resynchronizing, false),
            "a refused ModeSelect changed the mode"
        );
    }
    // Back to the stateless array: nothing enforced again.
    owner
        .mode_select(MIRROR, MirrorMode::HostManaged, false, "back")
        .await
        .expect("back to host-managed");
    owner
        .read(MATE, 0, 1)
        .await
        .expect("host-managed: the mate is readable");
    owner
        .write(MATE, 0, block(0, 9))
        .await
        .expect("host-managed: the mate is writable");
    node.shutdown().await.expect("shutdown");
}

/// The mode is durable before ModeSelect answers: kill -9 of the array
/// process right after it, and the restarted array reports and enforces
/// the same modes, each pair its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mode_outlives_kill_9_of_the_array() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("array");
    let mut array = array_process(&data, "1MiB", "127.0.0.1:0");
    let addr = array.addr.clone();
    let owner = harness::array_client(&array.url());
    // (pair, mode, mate_writable) of each step; the array is killed after
    // each step's ModeSelects, and both pairs' modes are checked after the
    // restart against this list.
    let steps: [[(u32, MirrorMode, bool); 2]; 3] = [
        [
            (0, MirrorMode::Snapshot, false),
            (3, MirrorMode::Resynchronizing, false),
        ],
        [
            (0, MirrorMode::Snapshot, true),
            (3, MirrorMode::Synchronized, false),
        ],
        [
            (0, MirrorMode::HostManaged, false),
            (3, MirrorMode::Synchronized, false),
        ],
    ];
    for (number, step) in steps.iter().enumerate() {
        for &(lu, mode, mate_writable) in step {
            owner
                .mode_select(lu, mode, mate_writable, "durability")
                .await
                .unwrap_or_else(|e| panic!("step {number}: ModeSelect {lu} {mode:?}: {e}"));
        }
        array.kill9();
        array = array_process(&data, "1MiB", &addr);
        harness::wait_healthy(&array.url(), role::ARRAY).await;
        for &(lu, mode, mate_writable) in step {
            let pair_lus = [lu, lu + 1, lu + 2];
            for side in pair_lus {
                assert_eq!(
                    sensed(&owner, side).await,
                    (mode, mate_writable),
                    "step {number}: LU {side} after kill -9 of the array"
                );
            }
            // And it is enforced, not only reported.
            let mate = lu + 2;
            let write = owner.write(mate, 0, block(0, 4)).await;
            let refused = matches!(mode, MirrorMode::Synchronized | MirrorMode::Resynchronizing)
                || (mode == MirrorMode::Snapshot && !mate_writable);
            match &write {
                Err(error) if refused && is_mode_refusal(error) => {}
                Ok(_) if !refused => {}
                other => panic!(
                    "step {number}: write to mate {mate} in {mode:?} after the restart: {other:?}"
                ),
            }
            let read = owner.read(mate, 0, 1).await;
            match &read {
                Err(error) if mode == MirrorMode::Resynchronizing && is_mode_refusal(error) => {}
                Ok(_) if mode != MirrorMode::Resynchronizing => {}
                other => panic!(
                    "step {number}: read of mate {mate} in {mode:?} after the restart: {other:?}"
                ),
            }
        }
    }
}

/// Mirror LU 10 = origin 11 + mates 12, 13 and 14 (a `mates = [..]`
/// config): mate 1 SNAPSHOT, mate 2 SYNCHRONIZED, mate 3 RESYNCHRONIZING.
/// Each cell runs at its own block, where every real LU starts with its own
/// tag (its LU number), so that a read names the LU it came from and the
/// checksums afterwards say where a write or a copy landed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_mates_each_follow_their_own_pairs_mode() {
    const MIRROR_3: u32 = 10;
    const ORIGIN_3: u32 = 11;
    const MATES: [u32; 3] = [12, 13, 14];
    const REAL: [u32; 4] = [ORIGIN_3, 12, 13, 14];
    let lu =
        |id| format!("[[lu]]\nid = {id}\nblock_size_bytes = {BLOCK}\nblock_count = {BLOCKS}\n");
    let text = REAL.iter().map(|&id| lu(id)).collect::<String>()
        + "[[mirror]]\nmirror = 10\norigin = 11\nmates = [12, 13, 14]\n";
    let config = array_node::ArrayConfig::from_toml(&text).expect("config");
    let dir = tempfile::tempdir().expect("tempdir");
    let node = start_array(dir.path(), config, ArrayTestHooks::default()).await;
    let owner = ArrayClient::new(&node.url(), &harness::security(role::DB)).expect("address");

    // ListLus and ModeSense name every mate, mate 1 first.
    let lus = owner.list_lus().await.expect("list");
    let mirror = lus
        .iter()
        .find(|l| l.id == MIRROR_3)
        .expect("the mirror LU");
    assert_eq!(mirror.mate_lus, MATES.to_vec());
    assert_eq!(
        (mirror.origin_lu, mirror.mate_lu),
        (Some(ORIGIN_3), Some(12))
    );

    // Unset mate_lu with three mates, or an LU that is no mate: refused.
    for (mate_lu, expected) in [(None, "has 3 mates"), (Some(ORIGIN_3), "is no mate")] {
        let error = owner
            .mode_select_mate(
                MIRROR_3,
                mate_lu,
                MirrorMode::Synchronized,
                false,
                "refused",
            )
            .await
            .expect_err("refused");
        assert!(
            error.kind == ErrorKind::InvalidArgument && error.to_string().contains(expected),
            "mate_lu {mate_lu:?}: {error}"
        );
    }

    // Every real LU holds its tag at every block (nothing enforced yet).
    let tagged = |lba: u64, lu: u32| block(lba, lu as u8);
    for lu in REAL {
        let data: Vec<u8> = (0..BLOCKS).flat_map(|lba| tagged(lba, lu)).collect();
        owner.write(lu, 0, data).await.expect("fill");
    }
    let modes = [
        (12, MirrorMode::Snapshot),
        (13, MirrorMode::Synchronized),
        (14, MirrorMode::Resynchronizing),
    ];
    for (mate, mode) in modes {
        let answer = owner
            .mode_select_mate(MIRROR_3, Some(mate), mode, false, "three mates")
            .await
            .expect("mode select");
        assert_eq!((answer.mode(), answer.mate_lu), (mode, mate));
    }
    // Each page lists every pair; a mate's page gives its own pair's mode.
    for lu in [MIRROR_3, ORIGIN_3, 12, 13, 14] {
        let page = owner.mode_sense(lu).await.expect("mode sense");
        let pairs: Vec<(u32, MirrorMode)> =
            page.mates.iter().map(|p| (p.mate_lu, p.mode())).collect();
        assert_eq!(pairs, modes.to_vec(), "LU {lu}");
        let own = modes
            .iter()
            .find(|(mate, _)| *mate == lu)
            .map_or(modes[0].1, |m| m.1);
        assert_eq!(page.mirror_mode, own, "LU {lu}");
    }

    // (operation, what it must do): Ok(LUs now holding new bytes) or
    // Err(()) for a mode refusal. The mirror write lands on the origin,
    // mate 2 and mate 3; mate 1 is a read-only snapshot.
    enum Cell {
        Write(u32),
        Copy(u32, u32),
        Read(u32),
    }
    let cells: [(Cell, Result<&[u32], ()>); 11] = [
        (Cell::Write(MIRROR_3), Ok(&[11, 13, 14])),
        (Cell::Write(ORIGIN_3), Ok(&[11])),
        (Cell::Write(12), Err(())),
        (Cell::Write(13), Err(())),
        (Cell::Write(14), Err(())),
        // Pair 3's resync copy; pair 1's reverse resync; a copy into mate 1.
        (Cell::Copy(ORIGIN_3, 14), Ok(&[14])),
        (Cell::Copy(12, ORIGIN_3), Ok(&[11])),
        (Cell::Copy(ORIGIN_3, 12), Err(())),
        (Cell::Copy(ORIGIN_3, 13), Err(())),
        (Cell::Read(12), Ok(&[])),
        (Cell::Read(14), Err(())),
    ];
    let mut failures = Vec::new();
    for (index, (cell, expected)) in cells.iter().enumerate() {
        let lba = index as u64;
        let (outcome, source) = match *cell {
            Cell::Write(lu) => (owner.write(lu, lba, block(lba, 99)).await.map(|_| None), 99),
            Cell::Copy(src, dst) => (
                owner.copy_range(src, dst, lba, 1).await.map(|_| None),
                src as u8,
            ),
            Cell::Read(lu) => (owner.read(lu, lba, 1).await.map(Some), 0),
        };
        let landed: &[u32] = match (expected, &outcome) {
            (Err(()), Err(error)) if is_mode_refusal(error) => &[],
            (Ok(lus), Ok(read)) => {
                if let (Cell::Read(lu), Some(data)) = (cell, read)
                    && *data != tagged(lba, *lu)
                {
                    failures.push(format!("cell {index}: read LU {lu} answered other bytes"));
                }
                lus
            }
            (_, other) => {
                failures.push(format!(
                    "cell {index}: expected {expected:?}, got {other:?}"
                ));
                continue;
            }
        };
        for lu in REAL {
            let want = if landed.contains(&lu) {
                block(lba, source)
            } else {
                tagged(lba, lu)
            };
            if block_digest(&owner, lu, lba).await != digest(&want) {
                failures.push(format!(
                    "cell {index}: LU {lu} does not hold what the modes say"
                ));
            }
        }
    }
    // A mirror read comes from the origin or mate 2 alone, never from mate
    // 1 (a snapshot) or mate 3 (resynchronizing), however often asked.
    let lba = BLOCKS - 1;
    for _ in 0..20 {
        let data = owner.read(MIRROR_3, lba, 1).await.expect("mirror read");
        if data != tagged(lba, ORIGIN_3) && data != tagged(lba, 13) {
            failures.push(format!("a mirror read answered LU {}'s bytes", data[8]));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
