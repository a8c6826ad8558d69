//! The mirroring management table (Fig. 2 of the patent text): the mode of
//! each mirror LU, kept and enforced by the array itself (the first
//! embodiment; db-server `--array-mode stateful` sets it with `ModeSelect`).
//!
//! # The modes
//!
//! Every mirror LU is [`MirrorMode::HostManaged`] until its owner selects
//! another mode: the array enforces nothing and routes as it always did
//! (the stateless array of the second and third embodiments). The others
//! are enforced on every request, whoever sends it (the comment of `rpc
//! ModeSelect` in `array.proto` is the specification; [`MirrorMode::route`]
//! is its one implementation):
//!
//! | mode            | mirror LU read | mirror LU write | mate read | mate write          |
//! |-----------------|----------------|-----------------|-----------|---------------------|
//! | HostManaged     | less busy side | both sides      | yes       | yes                 |
//! | Synchronized    | less busy side | both sides      | yes       | refused             |
//! | Snapshot        | origin         | origin          | yes       | only if mate_writable |
//! | Resynchronizing | origin         | both sides      | refused   | refused             |
//!
//! The origin is never restricted. `CopyRange` counts as a read of its
//! source and a write of its destination, except that a Resynchronizing
//! pair's own copy from its origin to its mate is allowed (that copy *is*
//! the resync); a copy from the mate to the origin while the pair is in
//! Snapshot (the reverse resync of a restore) follows from the rules.
//! `ChecksumRange` returns no data and is allowed in every mode (a mirror
//! LU's checksum is read where a read would be). `Flush` changes no data and
//! flushes both sides whatever the mode.
//!
//! # Changing a mode while requests run
//!
//! Each pair has a gate (a `tokio` read-write lock). Every read, write,
//! copy chunk and checksum chunk on any LU of the pair holds it shared from
//! the moment it is routed until its I/O is done; `ModeSelect` holds it
//! exclusively while it makes the new mode durable and puts it in force.
//! So a `ModeSelect` waits for the requests in flight on its pair, and once
//! it has answered no request routed under the old mode is still writing:
//! a mirror write routed to both sides before a split has landed before the
//! split answers, and none lands on the mate after it. Long transfers
//! (streamed reads, copies, checksums) take the gate per chunk, so a mode
//! change waits for one chunk, not for the whole transfer; the chunks after
//! it are routed (or refused) under the new mode. `validate` checks the
//! mode too, so that most refusals come before the first byte of a stream,
//! but the check under the gate is the one that counts.
//!
//! # Durability
//!
//! The table is kept in `DATA_DIR/modes.json`, written as `access.json` is
//! ([`crate::state_file`]): atomically and durably *before* `ModeSelect`
//! answers; a failed write leaves the old mode in force, in memory and on
//! disk. A damaged file stops the array from starting with an error naming
//! it. Only pairs whose mode is not HostManaged are listed, so deleting the
//! file returns every mirror LU to HostManaged.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use serde::{Deserialize, Serialize};

use crate::config::{ArrayConfig, LuId};
use crate::error::ArrayError;
use crate::state_file::{self, StateFileError};

/// The file of the mirroring management table, inside the data directory.
pub const MODES_FILE: &str = "modes.json";

/// What identifies the file's layout; a file of another layout is refused.
const FORMAT: &str = "splitmirror-array-modes-v1";

/// The longest purpose `ModeSelect` takes, so that the file stays small.
pub const MAX_PURPOSE_BYTES: usize = crate::access::MAX_PURPOSE_BYTES;

/// Why `modes.json` could not be loaded (see [`crate::state_file`]).
pub type ModesFileError = StateFileError;

/// What the operator can do about a damaged file.
const ADVICE: &str = "the array refuses to start rather than guess which mirror LUs are split \
                      (restore the file from a copy, or delete it to return every mirror LU \
                      to HOST_MANAGED; the pairs' owner then selects their modes again)";

/// The mode of a mirror LU (Fig. 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MirrorMode {
    /// The array holds no mode: the host routes (every mirror LU's mode
    /// until a `ModeSelect`).
    #[default]
    HostManaged,
    /// Origin and mate hold the same data.
    Synchronized,
    /// Split: the mirror LU is the origin alone, the mate a frozen image
    /// (or an independent LU, if `mate_writable`).
    Snapshot { mate_writable: bool },
    /// The origin's changes are being copied to the mate.
    Resynchronizing,
}

impl MirrorMode {
    /// Its name on the wire and in messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::HostManaged => "HOST_MANAGED",
            Self::Synchronized => "SYNCHRONIZED",
            Self::Snapshot { .. } => "SNAPSHOT",
            Self::Resynchronizing => "RESYNCHRONIZING",
        }
    }

    /// Its word in `modes.json`.
    fn word(self) -> &'static str {
        match self {
            Self::HostManaged => "host-managed",
            Self::Synchronized => "synchronized",
            Self::Snapshot { .. } => "snapshot",
            Self::Resynchronizing => "resynchronizing",
        }
    }

    /// The mode a `modes.json` entry names, if it names one.
    fn from_word(word: &str, mate_writable: bool) -> Option<Self> {
        let mode = match word {
            "host-managed" => Self::HostManaged,
            "synchronized" => Self::Synchronized,
            "snapshot" => Self::Snapshot { mate_writable },
            "resynchronizing" => Self::Resynchronizing,
            _ => return None,
        };
        (mate_writable == mode.mate_writable()).then_some(mode)
    }

    /// Whether the mate may be written (a writable snapshot).
    pub fn mate_writable(self) -> bool {
        matches!(
            self,
            Self::Snapshot {
                mate_writable: true
            }
        )
    }

    /// Where a request `op` on the `side` of a pair in this mode goes, or
    /// what about it is refused (for people). The rules of `rpc
    /// ModeSelect`; see the table in the module documentation.
    pub fn route(self, side: Side, op: Op) -> Result<PairRoute, &'static str> {
        use MirrorMode::{HostManaged, Resynchronizing, Snapshot, Synchronized};
        match (side, op) {
            (Side::Mirror, Op::Read | Op::Checksum) => Ok(match self {
                HostManaged | Synchronized => PairRoute::EitherSide,
                Snapshot { .. } | Resynchronizing => PairRoute::OriginOnly,
            }),
            (Side::Mirror, Op::Write) => Ok(match self {
                HostManaged | Synchronized | Resynchronizing => PairRoute::BothSides,
                Snapshot { .. } => PairRoute::OriginOnly,
            }),
            (Side::Origin, Op::Read | Op::Write | Op::Checksum) => Ok(PairRoute::Named),
            (Side::Mate, Op::Checksum) => Ok(PairRoute::Named),
            (Side::Mate, Op::Read) => match self {
                HostManaged | Synchronized | Snapshot { .. } => Ok(PairRoute::Named),
                Resynchronizing => Err(
                    "a read naming the mate is refused while the pair resynchronizes \
                     (its blocks are being copied from the origin; read the mirror LU)",
                ),
            },
            (Side::Mate, Op::Write) => match self {
                HostManaged
                | Snapshot {
                    mate_writable: true,
                } => Ok(PairRoute::Named),
                Synchronized => Err(
                    "a write naming the mate is refused while the pair is synchronized \
                     (write the mirror LU: it lands on both sides)",
                ),
                Snapshot {
                    mate_writable: false,
                } => Err(
                    "a write naming the mate is refused: it holds a read-only snapshot \
                     (a writable one is selected with mate_writable)",
                ),
                Resynchronizing => Err(
                    "a write naming the mate is refused while the pair resynchronizes \
                     (write the mirror LU: it lands on both sides)",
                ),
            },
        }
    }
}

impl std::fmt::Display for MirrorMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Snapshot { mate_writable } => write!(
                f,
                "SNAPSHOT (mate {})",
                if *mate_writable {
                    "writable"
                } else {
                    "read-only"
                }
            ),
            other => f.write_str(other.name()),
        }
    }
}

/// Which LU of its pair a request names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Mirror,
    Origin,
    Mate,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Mirror => "mirror LU",
            Self::Origin => "origin",
            Self::Mate => "mate",
        })
    }
}

/// What a request does with an LU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    /// `ChecksumRange`: read where a read would be, but never refused.
    Checksum,
}

/// Where a request on one LU of one pair goes, by that pair's mode alone
/// ([`MirrorMode::route`]); [`ModeTable::route`] combines the pairs of a
/// mirror LU into a [`Route`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairRoute {
    /// A mirror LU read: the origin or this mate, whichever is less busy.
    EitherSide,
    /// A mirror LU read or write: the origin, not this mate.
    OriginOnly,
    /// A mirror LU write: the origin and this mate.
    BothSides,
    /// A request naming a real LU: that LU.
    Named,
}

/// Where a request goes, every pair of its LU considered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// A request naming a real LU (or an LU of no pair): that LU.
    Named,
    /// A mirror LU read or checksum: the least busy of these real LUs
    /// (never empty; the origin first, then mates in mate order, which is
    /// also the order ties go in, see [`least_busy`]).
    LeastBusyOf(Vec<LuId>),
    /// A mirror LU write: every one of these real LUs (the origin first,
    /// then mates in mate order); acknowledged once all of them hold it.
    AllOf(Vec<LuId>),
}

/// One `ModeSelect`, validated ([`crate::validate::mode_select`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModeChange {
    /// The mirror LU.
    pub mirror: LuId,
    /// The mate whose pair changes.
    pub mate: LuId,
    pub mode: MirrorMode,
    /// Why, for the log and the file.
    pub purpose: String,
}

/// An LU's place in a mirror.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PairOf {
    pub mirror: LuId,
    pub origin: LuId,
    /// For a mate LU, itself; for the mirror LU or its origin, mate 1.
    pub mate: LuId,
    /// Which of them the LU is.
    pub side: Side,
}

/// The mode in force and why it was selected.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    mode: MirrorMode,
    purpose: String,
}

/// One (mirror LU, mate) pair.
struct Pair {
    mate: LuId,
    /// Held shared by every request on the pair while it is routed and
    /// done, exclusively by a mode change (see the module documentation).
    gate: tokio::sync::RwLock<()>,
    /// The mode in force; changed only with `gate` held exclusively.
    current: RwLock<Entry>,
}

/// A mirror LU and its pairs.
struct Mirror {
    origin: LuId,
    /// One per mate, mate 1 first.
    pairs: Vec<Pair>,
}

impl Mirror {
    fn pair(&self, mate: LuId) -> Option<(usize, &Pair)> {
        self.pairs.iter().enumerate().find(|(_, p)| p.mate == mate)
    }

    /// Every pair's (mate, mode in force), mate 1 first.
    fn modes(&self) -> Vec<(LuId, MirrorMode)> {
        self.pairs
            .iter()
            .map(|pair| {
                let mode = pair.current.read().expect("mode table poisoned").mode;
                (pair.mate, mode)
            })
            .collect()
    }
}

/// The mirroring management table. Shared by every request.
pub struct ModeTable {
    /// Every LU of every mirror: its mirror LU and side.
    sides: BTreeMap<LuId, (LuId, Side)>,
    /// By mirror LU.
    mirrors: BTreeMap<LuId, Mirror>,
    /// Held for the whole of one change (persist, then swap), so that two
    /// changes of different pairs never write the file over each other.
    changing: tokio::sync::Mutex<()>,
    /// `None` keeps the modes in memory only (unit tests and the in-memory
    /// array).
    file: Option<PathBuf>,
}

/// The gates of the pairs one request uses, held shared while it is
/// routed and done ([`ModeTable::enter`]).
pub struct Admission<'a> {
    _gates: Vec<tokio::sync::RwLockReadGuard<'a, ()>>,
}

/// One pair in `modes.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMode {
    /// The mirror LU.
    lu: LuId,
    /// The mate of the pair. Absent in files written before mirror LUs
    /// had several mates: such an entry is the pair of mate 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mate: Option<LuId>,
    mode: String,
    mate_writable: bool,
    purpose: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModesFile {
    format: String,
    /// BLAKE3 (hex) of `modes` serialized as compact JSON.
    blake3: String,
    modes: Vec<FileMode>,
}

/// Where a request on mirror LU with origin `origin` and pairs `pairs`
/// ((mate, mode), mate 1 first) goes. The one place the pairs of a mirror
/// LU are combined:
///
/// - A write goes to the origin and to every mate whose pair takes it
///   (HostManaged, Synchronized, Resynchronizing: [`MirrorMode::route`]
///   answers [`PairRoute::BothSides`]); a Snapshot pair's mate is frozen
///   (or the host's own, when writable) and is left alone.
/// - A read (or checksum) comes from the least busy of the origin and the
///   mates known to hold the mirror LU's data: with one mate, exactly as
///   the pair's mode says (either side while HostManaged or Synchronized,
///   the origin otherwise: what hosts of a stateless array rely on); with
///   several, only the mates whose pair is Synchronized. A HostManaged
///   pair among several is not read: the array cannot tell whether the
///   host split that mate, while a Synchronized pair's mate is kept equal
///   to the origin by the array itself. The origin always holds the data.
fn mirror_route(origin: LuId, pairs: &[(LuId, MirrorMode)], op: Op) -> Route {
    match op {
        Op::Write => Route::AllOf(
            std::iter::once(origin)
                .chain(pairs.iter().filter_map(|&(mate, mode)| {
                    (mode.route(Side::Mirror, Op::Write) == Ok(PairRoute::BothSides))
                        .then_some(mate)
                }))
                .collect(),
        ),
        Op::Read | Op::Checksum => {
            let readable = |&(mate, mode): &(LuId, MirrorMode)| match pairs.len() {
                1 => (mode.route(Side::Mirror, op) == Ok(PairRoute::EitherSide)).then_some(mate),
                _ => (mode == MirrorMode::Synchronized).then_some(mate),
            };
            Route::LeastBusyOf(
                std::iter::once(origin)
                    .chain(pairs.iter().filter_map(readable))
                    .collect(),
            )
        }
    }
}

/// The least busy of `candidates` (by `busy`, the requests in flight on
/// each real LU), the first of them on a tie: the origin comes first, then
/// the mates in mate order, so that an idle array reads the origin.
pub fn least_busy(candidates: &[LuId], busy: impl Fn(LuId) -> u64) -> Option<LuId> {
    candidates.iter().copied().min_by_key(|&lu| busy(lu))
}

impl ModeTable {
    /// Every pair of `config` HostManaged, except those
    /// `DATA_DIR/modes.json` sets.
    pub fn open(config: &ArrayConfig, data_dir: &Path) -> Result<Self, ModesFileError> {
        let mut table = Self::in_memory(config);
        let path = data_dir.join(MODES_FILE);
        for ((mirror, mate), entry) in load(&path, &table.mirrors)? {
            let (_, pair) = table.mirrors[&mirror].pair(mate).expect("load checked it");
            *pair.current.write().expect("mode table poisoned") = entry;
        }
        table.file = Some(path);
        Ok(table)
    }

    /// Every pair of `config` HostManaged; changes live in memory only.
    pub fn in_memory(config: &ArrayConfig) -> Self {
        let mut sides = BTreeMap::new();
        let mut mirrors = BTreeMap::new();
        for m in config.mirror_lus() {
            sides.insert(m.mirror, (m.mirror, Side::Mirror));
            sides.insert(m.origin, (m.mirror, Side::Origin));
            let pairs = m
                .mates
                .iter()
                .map(|&mate| {
                    sides.insert(mate, (m.mirror, Side::Mate));
                    Pair {
                        mate,
                        gate: tokio::sync::RwLock::new(()),
                        current: RwLock::new(Entry {
                            mode: MirrorMode::HostManaged,
                            purpose: String::new(),
                        }),
                    }
                })
                .collect();
            mirrors.insert(
                m.mirror,
                Mirror {
                    origin: m.origin,
                    pairs,
                },
            );
        }
        Self {
            sides,
            mirrors,
            changing: tokio::sync::Mutex::new(()),
            file: None,
        }
    }

    /// The mirror `lu` belongs to, if any.
    pub fn pair_of(&self, lu: LuId) -> Option<PairOf> {
        let &(mirror, side) = self.sides.get(&lu)?;
        let entry = &self.mirrors[&mirror];
        Some(PairOf {
            mirror,
            origin: entry.origin,
            mate: if side == Side::Mate {
                lu
            } else {
                entry.pairs[0].mate
            },
            side,
        })
    }

    /// The mates of mirror LU `mirror`, mate 1 first (`None` for an LU that
    /// is no mirror LU).
    pub fn mates(&self, mirror: LuId) -> Option<Vec<LuId>> {
        let entry = self.mirrors.get(&mirror)?;
        Some(entry.pairs.iter().map(|pair| pair.mate).collect())
    }

    /// Every pair of the mirror `lu` belongs to (mirror LU, origin or
    /// mate): (mate, mode in force), mate 1 first. Empty for an LU of no
    /// mirror.
    pub fn pairs(&self, lu: LuId) -> Vec<(LuId, MirrorMode)> {
        match self.sides.get(&lu) {
            Some(&(mirror, _)) => self.mirrors[&mirror].modes(),
            None => Vec::new(),
        }
    }

    /// The mode in force for the pair of `lu`: a mate's own pair's, mate
    /// 1's for a mirror LU or an origin; `None` for an LU of no pair.
    pub fn mode(&self, lu: LuId) -> Option<MirrorMode> {
        let pair = self.pair_of(lu)?;
        Some(self.mode_of_pair(pair.mirror, pair.mate))
    }

    fn mode_of_pair(&self, mirror: LuId, mate: LuId) -> MirrorMode {
        let (_, pair) = self.mirrors[&mirror].pair(mate).expect("a pair");
        pair.current.read().expect("mode table poisoned").mode
    }

    /// Where `op` on `lu` goes in the modes in force of its mirror's pairs,
    /// or [`ArrayError::MirrorMode`]. A mirror LU: [`mirror_route`] (never
    /// refused); its origin: itself, whatever the modes; a mate: as its own
    /// pair's mode says. An LU of no pair: [`Route::Named`]. Stable only
    /// while the pairs' gates are held ([`Self::enter`]).
    pub fn route(&self, lu: LuId, op: Op) -> Result<Route, ArrayError> {
        let Some(&(mirror, side)) = self.sides.get(&lu) else {
            return Ok(Route::Named);
        };
        match side {
            Side::Mirror => {
                let entry = &self.mirrors[&mirror];
                Ok(mirror_route(entry.origin, &entry.modes(), op))
            }
            Side::Origin => Ok(Route::Named),
            Side::Mate => {
                let mode = self.mode_of_pair(mirror, lu);
                mode.route(side, op)
                    .map(|_| Route::Named)
                    .map_err(|refused| ArrayError::MirrorMode {
                        lu,
                        side,
                        mirror,
                        mode,
                        refused,
                    })
            }
        }
    }

    /// The routes of a copy from `src` to `dst`: a read of the source and a
    /// write of the destination, except a Resynchronizing pair's own copy
    /// from its origin to its mate (the resync), which goes as named.
    pub fn copy_routes(&self, src: LuId, dst: LuId) -> Result<(Route, Route), ArrayError> {
        if let (Some(from), Some(to)) = (self.pair_of(src), self.pair_of(dst))
            && from.mirror == to.mirror
            && from.side == Side::Origin
            && to.side == Side::Mate
            && self.mode_of_pair(to.mirror, to.mate) == MirrorMode::Resynchronizing
        {
            return Ok((Route::Named, Route::Named));
        }
        Ok((self.route(src, Op::Read)?, self.route(dst, Op::Write)?))
    }

    /// Holds the gates of the pairs `lus` use shared, so that their modes
    /// stay as they are until the admission is dropped: a mate uses its own
    /// pair, a mirror LU or an origin every pair of the mirror. Taken in
    /// mirror LU order, then mate order, so that two requests and a mode
    /// change never wait in a cycle. Take it before any range lock and drop
    /// it once the I/O is done.
    pub async fn enter(&self, lus: &[LuId]) -> Admission<'_> {
        let mut pairs: Vec<(LuId, usize)> = Vec::new();
        for lu in lus {
            let Some(&(mirror, side)) = self.sides.get(lu) else {
                continue;
            };
            let entry = &self.mirrors[&mirror];
            match side {
                Side::Mate => {
                    let (index, _) = entry.pair(*lu).expect("a mate's pair");
                    pairs.push((mirror, index));
                }
                Side::Mirror | Side::Origin => {
                    pairs.extend((0..entry.pairs.len()).map(|index| (mirror, index)));
                }
            }
        }
        pairs.sort_unstable();
        pairs.dedup();
        let mut gates = Vec::with_capacity(pairs.len());
        for (mirror, index) in pairs {
            gates.push(self.mirrors[&mirror].pairs[index].gate.read().await);
        }
        Admission { _gates: gates }
    }

    /// Whether a request holds the gate of the pair (mirror LU `mirror`,
    /// mate `mate`) (or a mode change is waiting for it), for tests that
    /// must order a request before a change.
    #[cfg(test)]
    pub(crate) fn gate_is_held(&self, mirror: LuId, mate: LuId) -> bool {
        let (_, pair) = self.mirrors[&mirror].pair(mate).expect("a pair");
        pair.gate.try_write().is_err()
    }

    /// Applies a validated `ModeSelect`: waits for the requests in flight
    /// on the pair (its gate, exclusively), makes the new mode durable,
    /// then puts it in force. Answers the mode before and after. On an
    /// error nothing changed, in memory or on disk.
    ///
    /// Run it to completion (the service runs it on its own task): dropped
    /// while the file is being written, the file may hold the new mode while
    /// the old one stays in force.
    pub async fn select(
        &self,
        change: &ModeChange,
    ) -> Result<(MirrorMode, MirrorMode), ArrayError> {
        let (_, pair) = self
            .mirrors
            .get(&change.mirror)
            .ok_or(ArrayError::UnknownLu(change.mirror))?
            .pair(change.mate)
            .ok_or(ArrayError::UnknownLu(change.mate))?;
        let _gate = pair.gate.write().await;
        let _changing = self.changing.lock().await;
        let previous = pair.current.read().expect("mode table poisoned").mode;
        let entry = Entry {
            mode: change.mode,
            purpose: change.purpose.clone(),
        };
        if let Some(path) = &self.file {
            let old = self.file_content(None);
            let next = self.file_content(Some(((change.mirror, change.mate), &entry)));
            let target = path.clone();
            tokio::task::spawn_blocking(move || state_file::persist(&target, &next, &old))
                .await
                .map_err(|e| std::io::Error::other(format!("I/O task failed: {e}")))
                .and_then(|saved| saved)
                .map_err(|e| {
                    ArrayError::io(
                        format!(
                            "saving the mode of mirror LU {} (mate LU {}) to {}",
                            change.mirror,
                            change.mate,
                            path.display()
                        ),
                        e,
                    )
                })?;
        }
        *pair.current.write().expect("mode table poisoned") = entry;
        Ok((previous, change.mode))
    }

    /// The file's bytes: every pair not HostManaged, with `replaced` in
    /// place of the one being changed.
    fn file_content(&self, replaced: Option<((LuId, LuId), &Entry)>) -> Vec<u8> {
        let mut modes = Vec::new();
        for (&mirror, entry) in &self.mirrors {
            for pair in &entry.pairs {
                let current = pair.current.read().expect("mode table poisoned").clone();
                let entry = match replaced {
                    Some((changed, entry)) if changed == (mirror, pair.mate) => entry.clone(),
                    _ => current,
                };
                if entry.mode != MirrorMode::HostManaged {
                    modes.push(FileMode {
                        lu: mirror,
                        mate: Some(pair.mate),
                        mode: entry.mode.word().to_string(),
                        mate_writable: entry.mode.mate_writable(),
                        purpose: entry.purpose,
                    });
                }
            }
        }
        state_file::encode(&ModesFile {
            format: FORMAT.to_string(),
            blake3: state_file::checksum(&modes),
            modes,
        })
    }
}

/// The modes of the file at `path` by (mirror LU, mate) (none if it does
/// not exist). An entry without a mate (a file written when a mirror LU had
/// one mate) is the pair of mate 1.
fn load(
    path: &Path,
    mirrors: &BTreeMap<LuId, Mirror>,
) -> Result<BTreeMap<(LuId, LuId), Entry>, ModesFileError> {
    let Some(bytes) = state_file::read(path)? else {
        return Ok(BTreeMap::new());
    };
    let damaged = |reason: String| ModesFileError::Damaged {
        path: path.to_path_buf(),
        reason,
        advice: ADVICE,
    };
    let file: ModesFile =
        serde_json::from_slice(&bytes).map_err(|e| damaged(format!("not its JSON: {e}")))?;
    state_file::check(&file.format, FORMAT, &file.blake3, &file.modes).map_err(damaged)?;
    let mut modes = BTreeMap::new();
    for entry in file.modes {
        let Some(mirror) = mirrors.get(&entry.lu) else {
            return Err(damaged(format!(
                "it sets the mode of LU {}, which is no mirror LU of the configuration",
                entry.lu
            )));
        };
        let mate = entry.mate.unwrap_or(mirror.pairs[0].mate);
        if mirror.pair(mate).is_none() {
            return Err(damaged(format!(
                "it sets the mode of mirror LU {} with mate LU {mate}, which is no mate of it \
                 in the configuration",
                entry.lu
            )));
        }
        let mode = MirrorMode::from_word(&entry.mode, entry.mate_writable).ok_or_else(|| {
            damaged(format!(
                "it sets mirror LU {} to {:?} with mate_writable {}, which is no mode",
                entry.lu, entry.mode, entry.mate_writable
            ))
        })?;
        let previous = modes.insert(
            (entry.lu, mate),
            Entry {
                mode,
                purpose: entry.purpose,
            },
        );
        if previous.is_some() {
            return Err(damaged(format!(
                "it sets the mode of mirror LU {} (mate LU {mate}) twice",
                entry.lu
            )));
        }
    }
    Ok(modes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ArrayConfig {
        ArrayConfig::default_pairs(1 << 20).expect("config")
    }

    fn change(mirror: LuId, mode: MirrorMode) -> ModeChange {
        // Default pairs: mirror LU 0 = 1 + 2, 3 = 4 + 5.
        ModeChange {
            mirror,
            mate: mirror + 2,
            mode,
            purpose: format!("test: mirror LU {mirror} to {mode}"),
        }
    }

    const SNAPSHOT: MirrorMode = MirrorMode::Snapshot {
        mate_writable: false,
    };
    const WRITABLE: MirrorMode = MirrorMode::Snapshot {
        mate_writable: true,
    };

    #[test]
    fn every_mirror_lu_is_host_managed_until_selected_and_plain_lus_have_no_mode() {
        let table = ModeTable::in_memory(&config());
        for lu in 0..6 {
            assert_eq!(table.mode(lu), Some(MirrorMode::HostManaged), "LU {lu}");
        }
        assert_eq!(table.mode(9), None);
        assert_eq!(table.route(9, Op::Write).expect("plain"), Route::Named);
        let pair = table.pair_of(5).expect("a pair");
        assert_eq!(
            (pair.mirror, pair.origin, pair.mate, pair.side),
            (3, 4, 5, Side::Mate)
        );
    }

    #[tokio::test]
    async fn modes_survive_a_restart_and_host_managed_leaves_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = config();
        let table = ModeTable::open(&config, dir.path()).expect("open");
        let answer = table.select(&change(0, WRITABLE)).await.expect("select");
        assert_eq!(answer, (MirrorMode::HostManaged, WRITABLE));
        table
            .select(&change(3, MirrorMode::Resynchronizing))
            .await
            .expect("select");
        drop(table);
        let reopened = ModeTable::open(&config, dir.path()).expect("reopen");
        assert_eq!(reopened.mode(2), Some(WRITABLE));
        assert_eq!(reopened.mode(3), Some(MirrorMode::Resynchronizing));
        let answer = reopened
            .select(&change(0, MirrorMode::HostManaged))
            .await
            .expect("select");
        assert_eq!(answer, (WRITABLE, MirrorMode::HostManaged));
        let text = std::fs::read_to_string(dir.path().join(MODES_FILE)).expect("read");
        assert!(
            !text.contains("snapshot") && text.contains("resynchronizing"),
            "{text}"
        );
        assert!(
            text.contains("test: mirror LU 3 to RESYNCHRONIZING"),
            "{text}"
        );
        let reopened = ModeTable::open(&config, dir.path()).expect("reopen");
        assert_eq!(reopened.mode(0), Some(MirrorMode::HostManaged));
        assert_eq!(reopened.mode(4), Some(MirrorMode::Resynchronizing));
        assert!(!dir.path().join("modes.json.tmp").exists());
    }

    #[tokio::test]
    async fn a_damaged_file_stops_the_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = config();
        let table = ModeTable::open(&config, dir.path()).expect("open");
        table.select(&change(0, SNAPSHOT)).await.expect("select");
        let path = dir.path().join(MODES_FILE);
        let good = std::fs::read_to_string(&path).expect("read");
        // The same LUs, but mirror LU 0 no longer defined.
        let mut other = config.clone();
        other.mirrors.retain(|m| m.mirror == 3);
        // A wrong entry with a right checksum: no mode, writable sync, twice.
        let forged = |modes: Vec<FileMode>| {
            String::from_utf8(state_file::encode(&ModesFile {
                format: FORMAT.into(),
                blake3: state_file::checksum(&modes),
                modes,
            }))
            .expect("utf-8")
        };
        let entry = |mode: &str, mate_writable| FileMode {
            lu: 0,
            mate: None,
            mode: mode.into(),
            mate_writable,
            purpose: String::new(),
        };
        let cases = [
            (
                good.replace("\"snapshot\"", "\"synchronized\""),
                &config,
                "checksum",
            ),
            (good[..good.len() / 2].to_string(), &config, "not its JSON"),
            (String::new(), &config, "not its JSON"),
            (good.replace(FORMAT, "something-else"), &config, "format"),
            (good.clone(), &other, "LU 0, which is no mirror LU"),
            (
                forged(vec![entry("split", false)]),
                &config,
                "which is no mode",
            ),
            (
                forged(vec![entry("synchronized", true)]),
                &config,
                "which is no mode",
            ),
            (
                forged(vec![
                    entry("snapshot", false),
                    entry("resynchronizing", false),
                ]),
                &config,
                "twice",
            ),
        ];
        for (text, config, expected) in cases {
            std::fs::write(&path, &text).expect("write");
            let Err(error) = ModeTable::open(config, dir.path()) else {
                panic!("{text}: opened");
            };
            let message = error.to_string();
            assert!(
                message.contains(expected) && message.contains("modes.json"),
                "{text}: {message}"
            );
            assert!(message.contains("refuses to start"), "{message}");
        }
        std::fs::remove_file(&path).expect("remove");
        std::fs::create_dir(&path).expect("mkdir");
        let Err(error) = ModeTable::open(&config, dir.path()) else {
            panic!("opened a directory");
        };
        assert!(matches!(error, StateFileError::Read { .. }), "{error}");
    }

    #[tokio::test]
    async fn a_failed_save_leaves_the_old_mode_in_force_and_on_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = config();
        let table = ModeTable::open(&config, dir.path()).expect("open");
        table
            .select(&change(0, MirrorMode::Synchronized))
            .await
            .expect("select");
        let path = dir.path().join(MODES_FILE);
        let before = std::fs::read(&path).expect("read");
        // A directory where the temporary file goes: creating it fails, as
        // for a full or read-only disk (and even for root).
        std::fs::create_dir(dir.path().join("modes.json.tmp")).expect("mkdir");
        for attempt in [change(0, SNAPSHOT), change(3, MirrorMode::Resynchronizing)] {
            let error = table.select(&attempt).await.expect_err("cannot save");
            assert!(matches!(error, ArrayError::Io { .. }), "{error}");
            assert!(error.to_string().contains("saving the mode"), "{error}");
        }
        assert_eq!(table.mode(0), Some(MirrorMode::Synchronized));
        assert_eq!(table.mode(3), Some(MirrorMode::HostManaged));
        assert!(table.route(2, Op::Write).is_err(), "still synchronized");
        assert_eq!(std::fs::read(&path).expect("read"), before);
        std::fs::remove_dir(dir.path().join("modes.json.tmp")).expect("rmdir");
        let answer = table.select(&change(0, SNAPSHOT)).await.expect("select");
        assert_eq!(answer, (MirrorMode::Synchronized, SNAPSHOT));
        let reopened = ModeTable::open(&config, dir.path()).expect("reopen");
        assert_eq!(reopened.mode(1), Some(SNAPSHOT));
    }

    #[tokio::test]
    async fn the_array_refuses_to_start_on_a_damaged_table() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(MODES_FILE), "{").expect("write");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let config = crate::ArrayNodeConfig {
            data_dir: dir.path().to_path_buf(),
            array: config(),
            hooks: crate::ArrayTestHooks::default(),
            security: splitmirror_proto::security::Security::Insecure,
        };
        let Err(error) = crate::spawn(config, listener).await else {
            panic!("started on a damaged modes.json");
        };
        let message = error.to_string();
        assert!(
            message.contains("mirroring management table") && message.contains("modes.json"),
            "{message}"
        );
        // No LU file was created: the start stopped before the LUs.
        assert!(!dir.path().join("lu1.img").exists());
    }
    /// Mirror LU 0 = origin 1 + mates 2, 3 and 4.
    fn three_mates() -> ArrayConfig {
        let lu = |id| format!("[[lu]]\nid = {id}\nblock_size_bytes = 4096\nblock_count = 16\n");
        let text = (1..=4).map(lu).collect::<String>()
            + "[[mirror]]\nmirror = 0\norigin = 1\nmates = [2, 3, 4]\n";
        ArrayConfig::from_toml(&text).expect("config")
    }

    #[tokio::test]
    async fn a_modes_file_of_one_mate_per_mirror_lu_sets_mate_1() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Written by hand as arrays before several mates wrote it: no
        // `mate`, the checksum over exactly these bytes.
        let modes = r#"[{"lu":0,"mode":"snapshot","mate_writable":true,"purpose":"old"}]"#;
        let text = format!(
            "{{\"format\": \"{FORMAT}\", \"blake3\": \"{}\", \"modes\": {modes}}}",
            blake3::hash(modes.as_bytes()).to_hex()
        );
        let path = dir.path().join(MODES_FILE);
        std::fs::write(&path, &text).expect("write");
        // The same file under today's single-mate configuration...
        let single = ModeTable::open(&config(), dir.path()).expect("open");
        assert_eq!(single.mode(2), Some(WRITABLE));
        assert_eq!(single.mode(0), Some(WRITABLE));
        // ...and once mirror LU 0 has three mates: mate 1's pair.
        let config = three_mates();
        let table = ModeTable::open(&config, dir.path()).expect("open");
        assert_eq!(
            table.pairs(0),
            vec![
                (2, WRITABLE),
                (3, MirrorMode::HostManaged),
                (4, MirrorMode::HostManaged)
            ]
        );
        assert_eq!(table.mode(3), Some(MirrorMode::HostManaged));
        // A change of another pair rewrites the file, each entry naming its
        // mate, and both modes come back.
        let change = ModeChange {
            mirror: 0,
            mate: 4,
            mode: MirrorMode::Resynchronizing,
            purpose: "resync of mate 3".into(),
        };
        table.select(&change).await.expect("select");
        let written = std::fs::read_to_string(&path).expect("read");
        assert!(
            written.contains("\"mate\": 2") && written.contains("\"mate\": 4"),
            "{written}"
        );
        drop(table);
        let reopened = ModeTable::open(&config, dir.path()).expect("reopen");
        assert_eq!(
            reopened.pairs(1),
            vec![
                (2, WRITABLE),
                (3, MirrorMode::HostManaged),
                (4, MirrorMode::Resynchronizing)
            ]
        );
        // An old entry and a new one for mate 1, or a mate of no pair: damaged.
        let forged = |modes: Vec<FileMode>| {
            state_file::encode(&ModesFile {
                format: FORMAT.into(),
                blake3: state_file::checksum(&modes),
                modes,
            })
        };
        let entry = |mate| FileMode {
            lu: 0,
            mate,
            mode: "synchronized".into(),
            mate_writable: false,
            purpose: String::new(),
        };
        for (modes, expected) in [
            (vec![entry(None), entry(Some(2))], "(mate LU 2) twice"),
            (
                vec![entry(Some(1))],
                "with mate LU 1, which is no mate of it",
            ),
        ] {
            std::fs::write(&path, forged(modes)).expect("write");
            let Err(error) = ModeTable::open(&config, dir.path()) else {
                panic!("opened");
            };
            assert!(error.to_string().contains(expected), "{error}");
        }
    }

    #[test]
    fn the_least_busy_candidate_serves_a_read_ties_going_to_the_first() {
        let counters = BTreeMap::from([(1, 2), (2, 1), (3, 1), (4, 0)]);
        let busy = |lu: LuId| counters[&lu];
        assert_eq!(least_busy(&[1, 2, 3, 4], busy), Some(4));
        assert_eq!(least_busy(&[1, 2, 3], busy), Some(2), "a tie: mate order");
        assert_eq!(least_busy(&[1, 3], busy), Some(3));
        assert_eq!(least_busy(&[1], busy), Some(1));
        assert_eq!(least_busy(&[], busy), None);
        let idle = |_| 0;
        assert_eq!(
            least_busy(&[1, 2, 3, 4], idle),
            Some(1),
            "a tie: the origin"
        );
    }

    #[test]
    fn a_mirror_lus_route_combines_its_pairs() {
        use MirrorMode::{HostManaged, Resynchronizing, Synchronized};
        let mixed = [(2, SNAPSHOT), (3, Synchronized), (4, Resynchronizing)];
        assert_eq!(
            mirror_route(1, &mixed, Op::Write),
            Route::AllOf(vec![1, 3, 4])
        );
        assert_eq!(
            mirror_route(1, &mixed, Op::Read),
            Route::LeastBusyOf(vec![1, 3])
        );
        assert_eq!(
            mirror_route(1, &mixed, Op::Checksum),
            Route::LeastBusyOf(vec![1, 3])
        );
        let managed = [(2, HostManaged), (3, Synchronized), (4, HostManaged)];
        assert_eq!(
            mirror_route(1, &managed, Op::Write),
            Route::AllOf(vec![1, 2, 3, 4])
        );
        assert_eq!(
            mirror_route(1, &managed, Op::Read),
            Route::LeastBusyOf(vec![1, 3])
        );
        // One mate: exactly the pair's mode, as before several mates.
        for (mode, read, write) in [
            (HostManaged, vec![1, 2], vec![1, 2]),
            (Synchronized, vec![1, 2], vec![1, 2]),
            (SNAPSHOT, vec![1], vec![1]),
            (WRITABLE, vec![1], vec![1]),
            (Resynchronizing, vec![1], vec![1, 2]),
        ] {
            assert_eq!(
                mirror_route(1, &[(2, mode)], Op::Read),
                Route::LeastBusyOf(read),
                "{mode}"
            );
            assert_eq!(
                mirror_route(1, &[(2, mode)], Op::Write),
                Route::AllOf(write),
                "{mode}"
            );
        }
    }
}
