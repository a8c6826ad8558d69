//! Every request to the array is checked here, one function per request
//! kind, before anything happens: the per-request byte cap, whole blocks,
//! the block range inside the LU, and the caller's access (LUN masking, see
//! [`crate::access`]). Each function turns a wire request into a `Valid…`
//! value that only this module can make, and the [`Array`] only executes
//! `Valid…` values — so no request reaches a side effect unchecked.
//!
//! The checks run in one order for every kind: the size cap (it needs no
//! LU), then whether the caller sees the LU (`NOT_FOUND` for a missing or
//! masked one, the same answer), then its access (`PERMISSION_DENIED`),
//! then the shape of the request (`INVALID_ARGUMENT`, `OUT_OF_RANGE`), then
//! the pair's mode (`FAILED_PRECONDITION`, reason `mirror-mode`; see
//! [`crate::modes`]). The mode is checked here so that a refused read is
//! refused before its stream starts, and checked again by the [`Array`]
//! under the pair's gate, where it cannot change until the I/O is done:
//! that second check is the one that counts, the same rules
//! ([`ModeTable::route`](crate::modes::ModeTable::route)) in both.

use splitmirror_proto::array::v1 as pb;
use splitmirror_proto::security::Caller;

use crate::access::{self, Access, AccessChange};
use crate::array::{Array, LuInfo, LuKind, MAX_REQUEST_BYTES, Visible};
use crate::config::LuId;
use crate::error::ArrayError;
use crate::modes::{self, MirrorMode, ModeChange, Op, Route, Side};

/// A read of blocks `lba..lba + blocks` of `lu`, inside the LU, that the
/// caller may make. It may be larger than one request's cap: reads are
/// streamed in [`ValidRead::chunks`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidRead {
    lu: LuId,
    lba: u64,
    blocks: u64,
    block_size_bytes: u64,
}

impl ValidRead {
    pub fn lu(&self) -> LuId {
        self.lu
    }
    pub fn lba(&self) -> u64 {
        self.lba
    }
    pub fn blocks(&self) -> u64 {
        self.blocks
    }
    pub fn block_size_bytes(&self) -> u64 {
        self.block_size_bytes
    }
    pub fn bytes(&self) -> u64 {
        self.blocks * self.block_size_bytes
    }

    /// The read split into pieces of at most `chunk_bytes` (at least one
    /// block each), in order. Each piece lies inside this read, so it is
    /// valid too.
    pub fn chunks(&self, chunk_bytes: u64) -> impl Iterator<Item = ValidRead> + use<> {
        let chunk_blocks = (chunk_bytes / self.block_size_bytes).max(1);
        let whole = self.clone();
        (0..self.blocks.div_ceil(chunk_blocks)).map(move |index| {
            let lba = whole.lba + index * chunk_blocks;
            ValidRead {
                lba,
                blocks: chunk_blocks.min(whole.lba + whole.blocks - lba),
                ..whole.clone()
            }
        })
    }
}

/// A write of whole blocks inside the LU, within the byte cap, that the
/// caller may make (on every side, for a mirror LU).
#[derive(Debug, PartialEq, Eq)]
pub struct ValidWrite {
    lu: LuId,
    lba: u64,
    blocks: u64,
    block_size_bytes: u64,
    data: Vec<u8>,
    fua: bool,
    mate_denied: Option<MateDenied>,
}

/// A write to a mirror LU accepted while its pairs' modes sent it around
/// the mates a caller may not write (db-server masks a split mate
/// read-only for itself): should a mode have changed to one that writes
/// such a mate by the time the array routes it under the pairs' gates, the
/// array refuses it with this, rather than write a mate the caller may not
/// write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MateDenied {
    pub identity: String,
    /// Each mate the caller may not write, with the access it has.
    pub mates: Vec<(LuId, Access)>,
}

impl MateDenied {
    /// Refuses a request on mirror LU `lu` routed to `targets` if one of
    /// them is a mate the caller may not write.
    pub fn check(&self, lu: LuId, targets: &[LuId]) -> Result<(), ArrayError> {
        match self.mates.iter().find(|(mate, _)| targets.contains(mate)) {
            Some(&(mate, has)) => Err(ArrayError::PermissionDenied {
                identity: self.identity.clone(),
                lu,
                has,
                needs: Access::ReadWrite,
                through: Some(mate),
            }),
            None => Ok(()),
        }
    }
}

impl ValidWrite {
    pub fn lu(&self) -> LuId {
        self.lu
    }
    pub fn lba(&self) -> u64 {
        self.lba
    }
    pub fn blocks(&self) -> u64 {
        self.blocks
    }
    pub fn block_size_bytes(&self) -> u64 {
        self.block_size_bytes
    }
    pub fn data(&self) -> &[u8] {
        &self.data
    }
    pub fn fua(&self) -> bool {
        self.fua
    }
    /// Set if the caller may not write the mate (see [`MateDenied`]).
    pub fn mate_denied(&self) -> Option<&MateDenied> {
        self.mate_denied.as_ref()
    }
    /// The data, for the array to write.
    pub fn into_data(self) -> Vec<u8> {
        self.data
    }
}

/// A copy of blocks `lba..lba + blocks` from `src` to `dst`: two different
/// LUs of one geometry that share no real LU, the range inside both, the
/// caller allowed to read the one and write the other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidCopy {
    src: LuId,
    dst: LuId,
    lba: u64,
    blocks: u64,
    block_size_bytes: u64,
    min_bytes_per_s: Option<u64>,
    dst_mate_denied: Option<MateDenied>,
}

impl ValidCopy {
    pub fn src(&self) -> LuId {
        self.src
    }
    pub fn dst(&self) -> LuId {
        self.dst
    }
    pub fn lba(&self) -> u64 {
        self.lba
    }
    pub fn blocks(&self) -> u64 {
        self.blocks
    }
    pub fn block_size_bytes(&self) -> u64 {
        self.block_size_bytes
    }
    /// The rate this copy is guaranteed whatever the foreground load;
    /// `None`: the array's own minimum.
    pub fn min_bytes_per_s(&self) -> Option<u64> {
        self.min_bytes_per_s
    }
    /// Set if the caller may not write the destination's mate (see
    /// [`MateDenied`]).
    pub fn dst_mate_denied(&self) -> Option<&MateDenied> {
        self.dst_mate_denied.as_ref()
    }
}

/// Checksums of blocks `lba..lba + blocks` of `lu` in chunks of
/// `chunk_blocks`, each chunk within the byte cap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidChecksum {
    lu: LuId,
    lba: u64,
    blocks: u64,
    chunk_blocks: u64,
    block_size_bytes: u64,
}

impl ValidChecksum {
    pub fn lu(&self) -> LuId {
        self.lu
    }
    pub fn lba(&self) -> u64 {
        self.lba
    }
    pub fn blocks(&self) -> u64 {
        self.blocks
    }
    pub fn chunk_blocks(&self) -> u64 {
        self.chunk_blocks
    }
    pub fn block_size_bytes(&self) -> u64 {
        self.block_size_bytes
    }
}

/// A flush of an LU the caller may read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValidFlush {
    lu: LuId,
}

impl ValidFlush {
    pub fn lu(&self) -> LuId {
        self.lu
    }
}

/// `Read`: `read` access, a non-empty range inside the LU, a read the
/// pair's mode allows. The whole range is checked before the first byte is
/// sent.
pub fn read(
    array: &Array,
    caller: &Caller,
    request: &pb::ReadRequest,
) -> Result<ValidRead, ArrayError> {
    let info = require(array, caller, request.lu, Access::Read)?;
    check_range(info, request.lba, request.blocks)?;
    array.modes().route(request.lu, Op::Read)?;
    Ok(ValidRead {
        lu: request.lu,
        lba: request.lba,
        blocks: request.blocks,
        block_size_bytes: u64::from(info.block_size_bytes),
    })
}

/// `Write` (and each message of `WriteStream`): at most
/// [`MAX_REQUEST_BYTES`] of data, `read-write` access (to the mirror LU and
/// both its sides), a positive whole number of blocks, inside the LU, a
/// write the pair's mode allows.
pub fn write(
    array: &Array,
    caller: &Caller,
    request: pb::WriteRequest,
) -> Result<ValidWrite, ArrayError> {
    let pb::WriteRequest { lu, lba, data, fua } = request;
    check_request_size(data.len() as u64)?;
    let (info, mate_denied) = require_write(array, caller, lu)?;
    let blocks = check_data(info, &data)?;
    check_range(info, lba, blocks)?;
    array.modes().route(lu, Op::Write)?;
    Ok(ValidWrite {
        lu,
        lba,
        blocks,
        block_size_bytes: u64::from(info.block_size_bytes),
        data,
        fua,
        mate_denied,
    })
}

/// `CopyRange`: `read` on the source, `read-write` on the destination (on
/// both sides of a mirror LU), two LUs of one geometry sharing no real LU,
/// a non-empty range inside them, a read of the source and a write of the
/// destination that their pairs' modes allow (or a Resynchronizing pair's
/// own origin → mate copy).
pub fn copy_range(
    array: &Array,
    caller: &Caller,
    request: &pb::CopyRangeRequest,
) -> Result<ValidCopy, ArrayError> {
    let &pb::CopyRangeRequest {
        src_lu: src,
        dst_lu: dst,
        lba,
        blocks,
        min_bytes_per_s,
    } = request;
    if min_bytes_per_s == Some(0) {
        return Err(ArrayError::InvalidArgument(format!(
            "CopyRange from LU {src} to LU {dst} guaranteed 0 bytes per second: \
             leave min_bytes_per_s unset for the array's own minimum"
        )));
    }
    let src_info = require(array, caller, src, Access::Read)?;
    let (dst_info, dst_mate_denied) = require_write(array, caller, dst)?;
    if src == dst {
        return Err(ArrayError::InvalidArgument(format!(
            "CopyRange from LU {src} to itself"
        )));
    }
    if (src_info.block_size_bytes, src_info.block_count)
        != (dst_info.block_size_bytes, dst_info.block_count)
    {
        return Err(ArrayError::InvalidArgument(format!(
            "CopyRange between LU {src} ({} blocks of {} bytes) and LU {dst} \
             ({} blocks of {} bytes): geometries differ",
            src_info.block_count,
            src_info.block_size_bytes,
            dst_info.block_count,
            dst_info.block_size_bytes
        )));
    }
    let src_real = real_lus(src_info);
    if let Some(shared) = real_lus(dst_info)
        .into_iter()
        .find(|lu| src_real.contains(lu))
    {
        // A copy from a mirror LU to one of its sides (or back) would read
        // what it is writing.
        return Err(ArrayError::InvalidArgument(format!(
            "CopyRange from LU {src} to LU {dst}: they share LU {shared}"
        )));
    }
    check_range(src_info, lba, blocks)?;
    array.modes().copy_routes(src, dst)?;
    Ok(ValidCopy {
        src,
        dst,
        lba,
        blocks,
        block_size_bytes: u64::from(src_info.block_size_bytes),
        min_bytes_per_s,
        dst_mate_denied,
    })
}

/// `ChecksumRange`: `read` access, a non-empty range inside the LU, chunks
/// of a positive number of blocks within the byte cap. Allowed in every
/// mode of the pair (it returns no data).
pub fn checksum_range(
    array: &Array,
    caller: &Caller,
    request: &pb::ChecksumRangeRequest,
) -> Result<ValidChecksum, ArrayError> {
    let &pb::ChecksumRangeRequest {
        lu,
        lba,
        blocks,
        chunk_blocks,
    } = request;
    let info = require(array, caller, lu, Access::Read)?;
    check_range(info, lba, blocks)?;
    if chunk_blocks == 0 {
        return Err(ArrayError::InvalidArgument(
            "chunk_blocks must be positive".into(),
        ));
    }
    let block_size_bytes = u64::from(info.block_size_bytes);
    check_request_size(chunk_blocks.saturating_mul(block_size_bytes))?;
    Ok(ValidChecksum {
        lu,
        lba,
        blocks,
        chunk_blocks,
        block_size_bytes,
    })
}

/// `Flush`: `read` access. A flush changes no data (it makes writes
/// already acknowledged durable), so a reader may ask for it; it needs
/// the LU to be visible like any other request.
pub fn flush(
    array: &Array,
    caller: &Caller,
    request: &pb::FlushRequest,
) -> Result<ValidFlush, ArrayError> {
    require(array, caller, request.lu, Access::Read)?;
    Ok(ValidFlush { lu: request.lu })
}

/// `ModeSense`: the LU must be visible to the caller. Answers its
/// description and the caller's access through it.
pub fn mode_sense<'a>(
    array: &'a Array,
    caller: &Caller,
    request: &pb::ModeSenseRequest,
) -> Result<Visible<'a>, ArrayError> {
    array.visible(caller, request.lu)
}

/// `SetAccess`: only from the owner of the pairs (anyone with
/// `--insecure`), for a non-empty identity, an LU of a pair, and a known
/// access (unset: back to the configuration). Plain LUs are the
/// configuration's alone (`INVALID_ARGUMENT`).
pub fn set_access(
    array: &Array,
    caller: &Caller,
    request: &pb::SetAccessRequest,
) -> Result<AccessChange, ArrayError> {
    let table = array.access();
    require_owner(array, caller, "LUN masking")?;
    if request.identity.is_empty() {
        return Err(ArrayError::InvalidArgument(
            "SetAccess needs the identity whose access changes".into(),
        ));
    }
    if request.identity.len() > access::MAX_IDENTITY_BYTES {
        return Err(ArrayError::InvalidArgument(format!(
            "an identity of {} bytes is longer than any DNS name ({} bytes)",
            request.identity.len(),
            access::MAX_IDENTITY_BYTES
        )));
    }
    if request.purpose.len() > access::MAX_PURPOSE_BYTES {
        return Err(ArrayError::InvalidArgument(format!(
            "a purpose of {} bytes is over the limit of {} bytes",
            request.purpose.len(),
            access::MAX_PURPOSE_BYTES
        )));
    }
    let access = match request.access {
        None => None,
        Some(value) => Some(match pb::Access::try_from(value) {
            Ok(pb::Access::None) => Access::None,
            Ok(pb::Access::Read) => Access::Read,
            Ok(pb::Access::ReadWrite) => Access::ReadWrite,
            Ok(pb::Access::Unspecified) | Err(_) => {
                return Err(ArrayError::InvalidArgument(format!(
                    "access {value} is not none, read or read-write \
                     (leave it unset to return to the configured access)"
                )));
            }
        }),
    };
    // The LU must exist (and be seen by the caller) before anything is said
    // about its kind.
    array.visible(caller, request.lu)?;
    if !table.in_pair(request.lu) {
        return Err(ArrayError::InvalidArgument(format!(
            "LU {} belongs to no pair: its access is set by [[grant]] entries of the \
             array's configuration, not by SetAccess",
            request.lu
        )));
    }
    Ok(AccessChange {
        identity: request.identity.clone(),
        lu: request.lu,
        access,
        purpose: request.purpose.clone(),
    })
}

/// `ModeSelect`: only from the owner of the pairs (anyone with
/// `--insecure`), exactly as `SetAccess`; a known mode (never
/// UNSPECIFIED), `mate_writable` only with SNAPSHOT, a purpose within the
/// limit, a mirror LU the caller sees (its origin, its mate or a plain LU:
/// `INVALID_ARGUMENT`) and the pair's mate: `mate_lu`, one of the mirror
/// LU's mates, or unset for a mirror LU with one mate (`INVALID_ARGUMENT`
/// otherwise).
pub fn mode_select(
    array: &Array,
    caller: &Caller,
    request: &pb::ModeSelectRequest,
) -> Result<ModeChange, ArrayError> {
    require_owner(array, caller, "the mode of a mirror LU")?;
    if request.purpose.len() > modes::MAX_PURPOSE_BYTES {
        return Err(ArrayError::InvalidArgument(format!(
            "a purpose of {} bytes is over the limit of {} bytes",
            request.purpose.len(),
            modes::MAX_PURPOSE_BYTES
        )));
    }
    let mate_writable = request.mate_writable;
    let mode = match pb::MirrorMode::try_from(request.mode) {
        Ok(pb::MirrorMode::HostManaged) => MirrorMode::HostManaged,
        Ok(pb::MirrorMode::Synchronized) => MirrorMode::Synchronized,
        Ok(pb::MirrorMode::Snapshot) => MirrorMode::Snapshot { mate_writable },
        Ok(pb::MirrorMode::Resynchronizing) => MirrorMode::Resynchronizing,
        Ok(pb::MirrorMode::Unspecified) | Err(_) => {
            return Err(ArrayError::InvalidArgument(format!(
                "mode {} is not HOST_MANAGED, SYNCHRONIZED, SNAPSHOT or RESYNCHRONIZING",
                request.mode
            )));
        }
    };
    if mate_writable && !mode.mate_writable() {
        return Err(ArrayError::InvalidArgument(format!(
            "mate_writable is for SNAPSHOT alone, not {}",
            mode.name()
        )));
    }
    // The LU must exist (and be seen by the caller) before anything is said
    // about its kind.
    let lu = request.lu;
    array.visible(caller, lu)?;
    match array.modes().pair_of(lu) {
        Some(pair) if pair.side == Side::Mirror => {
            let mates = array.modes().mates(lu).unwrap_or_default();
            let mate = match request.mate_lu {
                None if mates.len() == 1 => mates[0],
                None => {
                    return Err(ArrayError::InvalidArgument(format!(
                        "mirror LU {lu} has {} mates (LUs {}): ModeSelect names the pair \
                         with mate_lu",
                        mates.len(),
                        list(&mates)
                    )));
                }
                Some(mate) if mates.contains(&mate) => mate,
                Some(mate) => {
                    return Err(ArrayError::InvalidArgument(format!(
                        "LU {mate} is no mate of mirror LU {lu} (its mates: LUs {})",
                        list(&mates)
                    )));
                }
            };
            Ok(ModeChange {
                mirror: lu,
                mate,
                mode,
                purpose: request.purpose.clone(),
            })
        }
        Some(pair) => Err(ArrayError::InvalidArgument(format!(
            "LU {lu} is the {} of mirror LU {}: ModeSelect names the mirror LU",
            pair.side, pair.mirror
        ))),
        None => Err(ArrayError::InvalidArgument(format!(
            "LU {lu} belongs to no pair: only a mirror LU has a mode"
        ))),
    }
}

/// LU numbers for people: "2, 3 and 4".
fn list(lus: &[LuId]) -> String {
    match lus {
        [] => "none".into(),
        [only] => only.to_string(),
        [rest @ .., last] => format!(
            "{} and {last}",
            rest.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Refuses `caller` unless it is the owner of the pairs (anyone with
/// `--insecure`): the calls that change `what` (LUN masking, the modes)
/// come from the node that manages the pairs alone.
fn require_owner(array: &Array, caller: &Caller, what: &'static str) -> Result<(), ArrayError> {
    let owner = array.access().owner();
    match caller {
        Caller::Unauthenticated => Ok(()),
        Caller::Identified(identity) if identity == owner => Ok(()),
        Caller::Identified(identity) => Err(ArrayError::NotOwner {
            identity: identity.clone(),
            owner: owner.to_string(),
            what,
        }),
        Caller::Anonymous => Err(ArrayError::NotOwner {
            identity: "a caller without a certificate".into(),
            owner: owner.to_string(),
            what,
        }),
    }
}

/// The LU's description if `caller` has at least `needs` access through
/// it; `NOT_FOUND` if it sees no such LU, `PERMISSION_DENIED` if it has
/// less.
fn require<'a>(
    array: &'a Array,
    caller: &Caller,
    lu: LuId,
    needs: Access,
) -> Result<&'a LuInfo, ArrayError> {
    let visible = array.visible(caller, lu)?;
    if visible.access < needs {
        return Err(ArrayError::PermissionDenied {
            identity: caller.identity().unwrap_or("the caller").to_string(),
            lu,
            has: visible.access,
            needs,
            through: visible.through,
        });
    }
    Ok(visible.info)
}

/// [`require`] of `read-write`, except that a write to a mirror LU needs
/// `read-write` on the mirror LU, its origin and every mate its pairs'
/// modes send it to: a mate it does not touch (a Snapshot pair's) may be
/// read-only for the caller (db-server masks a split mate so for itself).
/// Such a write carries [`MateDenied`], so that the array refuses it should
/// a mode have changed to one that writes such a mate before it runs.
fn require_write<'a>(
    array: &'a Array,
    caller: &Caller,
    lu: LuId,
) -> Result<(&'a LuInfo, Option<MateDenied>), ArrayError> {
    let denied = match require(array, caller, lu, Access::ReadWrite) {
        Ok(info) => return Ok((info, None)),
        Err(denied) => denied,
    };
    let visible = array.visible(caller, lu)?;
    let table = array.access();
    if let LuKind::Mirror { mates, .. } = &visible.info.kind
        && table.access(caller, lu) == Access::ReadWrite
        && let Ok(Route::AllOf(targets)) = array.modes().route(lu, Op::Write)
        && targets
            .iter()
            .all(|&target| table.access(caller, target) == Access::ReadWrite)
    {
        let mate_denied = MateDenied {
            identity: caller.identity().unwrap_or("the caller").to_string(),
            mates: mates
                .iter()
                .map(|&mate| (mate, table.access(caller, mate)))
                .filter(|&(_, has)| has < Access::ReadWrite)
                .collect(),
        };
        return Ok((visible.info, Some(mate_denied)));
    }
    Err(denied)
}

/// The real LUs an LU's data lives on.
fn real_lus(info: &LuInfo) -> Vec<LuId> {
    match &info.kind {
        LuKind::Mirror { origin, mates } => std::iter::once(*origin).chain(mates.clone()).collect(),
        LuKind::Origin | LuKind::Mate | LuKind::Plain => vec![info.id],
    }
}

/// Checks that `blocks` blocks at `lba` are a non-empty range inside the LU.
fn check_range(info: &LuInfo, lba: u64, blocks: u64) -> Result<(), ArrayError> {
    if blocks == 0 {
        return Err(ArrayError::InvalidArgument(format!(
            "zero blocks requested at LBA {lba} of LU {}",
            info.id
        )));
    }
    #[cfg(test)]
    if tests::end_check_is_off() {
        return Ok(());
    }
    if lba >= info.block_count {
        return Err(ArrayError::OutOfRange(format!(
            "LBA {lba} is at or past the end of LU {} ({} blocks)",
            info.id, info.block_count
        )));
    }
    match lba.checked_add(blocks) {
        Some(end) if end <= info.block_count => Ok(()),
        _ => Err(ArrayError::OutOfRange(format!(
            "{blocks} blocks at LBA {lba} run past the end of LU {} ({} blocks)",
            info.id, info.block_count
        ))),
    }
}

/// Checks that `data` is a positive whole number of blocks and answers it.
fn check_data(info: &LuInfo, data: &[u8]) -> Result<u64, ArrayError> {
    let block_size_bytes = info.block_size_bytes as usize;
    if data.is_empty() || !data.len().is_multiple_of(block_size_bytes) {
        return Err(ArrayError::InvalidArgument(format!(
            "{} bytes of data is not a positive whole number of {block_size_bytes}-byte blocks",
            data.len()
        )));
    }
    Ok((data.len() / block_size_bytes) as u64)
}

pub(crate) fn check_request_size(bytes: u64) -> Result<(), ArrayError> {
    if bytes > MAX_REQUEST_BYTES {
        return Err(ArrayError::TooLarge {
            bytes,
            limit_bytes: MAX_REQUEST_BYTES,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use proptest::prelude::*;
    use proptest::test_runner::{Config, RngSeed, TestError, TestRunner};
    use prost::Message;
    use splitmirror_proto::array::v1 as pb;
    use splitmirror_proto::security::Caller;

    use super::*;
    use crate::config::{ArrayConfig, RealLuConfig};
    use crate::modes::{MirrorMode, ModeChange};
    use crate::test_ops::{self, ANYONE, caller};

    thread_local! {
        /// The deliberately broken variant: the check that a range ends
        /// inside the LU is skipped. Per thread, so that only the test that
        /// turns it on sees it.
        static END_CHECK_OFF: Cell<bool> = const { Cell::new(false) };
    }

    pub(super) fn end_check_is_off() -> bool {
        END_CHECK_OFF.with(Cell::get)
    }

    const OWNER: &str = "db-server";
    const BACKUP: &str = "backup-server";
    const CONSOLE: &str = "console";

    /// Mirror 0 = origin 1 + mate 2, mirror 3 = origin 4 + mate 5 (16
    /// blocks of 4096 bytes), and plain LU 9 (24 blocks of 512 bytes),
    /// which "reporting" may read.
    fn config() -> ArrayConfig {
        let mut config = ArrayConfig::default_pairs(16 * 4096).expect("config");
        config.lus.push(RealLuConfig {
            id: 9,
            block_size_bytes: 512,
            block_count: 24,
        });
        config.grants.push(crate::access::GrantConfig {
            identity: "reporting".into(),
            lu: 9,
            access: Access::Read,
        });
        config.validate().expect("valid");
        config
    }

    fn array() -> Array {
        Array::in_memory(&config()).expect("array")
    }

    fn block(fill: u8) -> Vec<u8> {
        vec![fill; 4096]
    }

    fn set(array: &Array, by: &Caller, identity: &str, lu: LuId, access: Option<Access>) {
        let request = pb::SetAccessRequest {
            identity: identity.into(),
            lu,
            access: access.map(|a| match a {
                Access::None => pb::Access::None as i32,
                Access::Read => pb::Access::Read as i32,
                Access::ReadWrite => pb::Access::ReadWrite as i32,
            }),
            purpose: "test".into(),
        };
        let change = set_access(array, by, &request).expect("valid change");
        array.access().set(&change).expect("set");
    }

    #[tokio::test]
    async fn a_masked_lu_answers_as_a_missing_one() {
        let array = array();
        let console = caller(CONSOLE);
        let missing = test_ops::read(&array, &console, 42, 0, 1).await;
        let missing = missing.expect_err("no LU 42").to_string();
        assert_eq!(missing, "LU 42 does not exist");
        for lu in [0, 1, 2, 3, 9] {
            let masked = test_ops::read(&array, &console, lu, 0, 1).await;
            assert!(
                matches!(masked, Err(ArrayError::UnknownLu(n)) if n == lu),
                "LU {lu}: {masked:?}"
            );
            let write = test_ops::write(&array, &console, lu, 0, block(1)).await;
            assert!(matches!(write, Err(ArrayError::UnknownLu(_))), "{write:?}");
            let flush = test_ops::flush(&array, &console, lu).await;
            assert!(matches!(flush, Err(ArrayError::UnknownLu(_))), "{flush:?}");
            let sense = mode_sense(&array, &console, &pb::ModeSenseRequest { lu });
            assert!(matches!(sense, Err(ArrayError::UnknownLu(_))), "{sense:?}");
        }
        assert!(array.list_lus(&console).is_empty());
        assert!(array.list_lus(&Caller::Anonymous).is_empty());
    }

    #[tokio::test]
    async fn the_backup_reads_mates_and_nothing_else() {
        let array = array();
        let backup = caller(BACKUP);
        test_ops::write(&array, &ANYONE, 0, 0, block(7))
            .await
            .expect("write");
        let listed: Vec<_> = array
            .list_lus(&backup)
            .iter()
            .map(|v| (v.info.id, v.access))
            .collect();
        assert_eq!(listed, vec![(2, Access::Read), (5, Access::Read)]);
        let mate = test_ops::read(&array, &backup, 2, 0, 1).await;
        assert_eq!(mate.expect("read the mate"), block(7));
        test_ops::checksums(&array, &backup, 2, 0, 16, 4)
            .await
            .expect("checksum the mate");
        test_ops::flush(&array, &backup, 2)
            .await
            .expect("a reader may flush");
        let write = test_ops::write(&array, &backup, 2, 0, block(9)).await;
        let error = write.expect_err("the mate is read-only for the backup");
        assert!(
            matches!(
                error,
                ArrayError::PermissionDenied {
                    has: Access::Read,
                    needs: Access::ReadWrite,
                    ..
                }
            ),
            "{error}"
        );
        assert_eq!(
            error.to_string(),
            "backup-server has read access to LU 2; this request needs read-write access"
        );
        for lu in [0, 1] {
            let read = test_ops::read(&array, &backup, lu, 0, 1).await;
            assert!(matches!(read, Err(ArrayError::UnknownLu(_))), "{read:?}");
        }
        // A copy into the origin: the origin is invisible to it.
        let copy = test_ops::copy_range(&array, &backup, 2, 1, 0, 1).await;
        assert!(matches!(copy, Err(ArrayError::UnknownLu(1))), "{copy:?}");
        let mate = test_ops::read(&array, &ANYONE, 2, 0, 1).await;
        assert_eq!(
            mate.expect("read"),
            block(7),
            "denied write changed the mate"
        );
    }

    #[tokio::test]
    async fn a_read_only_mate_makes_its_mirror_read_only_for_writes() {
        let array = array();
        let owner = caller(OWNER);
        test_ops::write(&array, &owner, 0, 0, block(1))
            .await
            .expect("write");
        set(&array, &owner, OWNER, 2, Some(Access::Read));
        let write = test_ops::write(&array, &owner, 0, 0, block(2)).await;
        let error = write.expect_err("the mate is read-only");
        assert!(
            matches!(
                error,
                ArrayError::PermissionDenied {
                    lu: 0,
                    through: Some(2),
                    ..
                }
            ),
            "{error}"
        );
        assert!(error.to_string().contains("LU 2"), "{error}");
        for lu in [0, 1, 2] {
            let read = test_ops::read(&array, &owner, lu, 0, 1).await;
            assert_eq!(read.expect("read"), block(1), "LU {lu} changed");
        }
        // Listed as read-only, the origin still writable, the mate still
        // readable, and a resync into the mate refused.
        let listed: Vec<_> = array
            .list_lus(&owner)
            .iter()
            .map(|v| (v.info.id, v.access))
            .collect();
        assert_eq!(
            &listed[..3],
            &[(0, Access::Read), (1, Access::ReadWrite), (2, Access::Read)]
        );
        test_ops::write(&array, &owner, 1, 0, block(3))
            .await
            .expect("the origin is still the owner's");
        let copy = test_ops::copy_range(&array, &owner, 1, 2, 0, 16).await;
        assert!(
            matches!(copy, Err(ArrayError::PermissionDenied { lu: 2, .. })),
            "{copy:?}"
        );
        // Back to the configuration: writable again.
        set(&array, &owner, OWNER, 2, None);
        test_ops::write(&array, &owner, 0, 0, block(4))
            .await
            .expect("write after the grant is unset");
        test_ops::copy_range(&array, &owner, 1, 2, 0, 16)
            .await
            .expect("resync after the grant is unset");
    }

    #[tokio::test]
    async fn a_restore_grant_gives_the_backup_one_mirror_lu() {
        let array = array();
        let (owner, backup) = (caller(OWNER), caller(BACKUP));
        for lu in [0, 1, 2] {
            set(&array, &owner, BACKUP, lu, Some(Access::ReadWrite));
        }
        test_ops::write(&array, &backup, 0, 5, block(6))
            .await
            .expect("restore write");
        let other = test_ops::write(&array, &backup, 3, 5, block(6)).await;
        assert!(matches!(other, Err(ArrayError::UnknownLu(3))), "{other:?}");
        // Granting the mirror LU alone is not enough: the origin stays
        // invisible, so the mirror does too.
        set(&array, &owner, BACKUP, 4, None);
        let half = test_ops::write(&array, &backup, 3, 5, block(6)).await;
        assert!(matches!(half, Err(ArrayError::UnknownLu(3))), "{half:?}");
    }

    #[test]
    fn only_the_owner_sets_access_and_only_on_pairs() {
        let array = array();
        let request = |identity: &str, lu, access: Option<i32>| pb::SetAccessRequest {
            identity: identity.into(),
            lu,
            access,
            purpose: String::new(),
        };
        let read = Some(pb::Access::Read as i32);
        for by in [caller(BACKUP), caller(CONSOLE), Caller::Anonymous] {
            let refused = set_access(&array, &by, &request(BACKUP, 2, read));
            let error = refused.expect_err("not the owner");
            assert!(matches!(error, ArrayError::NotOwner { .. }), "{error}");
            assert!(
                error
                    .to_string()
                    .contains("only the owner of the array's pairs, db-server")
            );
        }
        let owner = caller(OWNER);
        let cases = [
            (request("", 2, read), "needs the identity"),
            (request(BACKUP, 2, Some(0)), "access 0 is not"),
            (request(BACKUP, 2, Some(17)), "access 17 is not"),
            (
                request(&"x".repeat(254), 2, read),
                "longer than any DNS name",
            ),
        ];
        for (request, expected) in cases {
            let error = set_access(&array, &owner, &request).expect_err(expected);
            assert!(matches!(error, ArrayError::InvalidArgument(_)), "{error}");
            assert!(error.to_string().contains(expected), "{error}");
        }
        let unknown = set_access(&array, &owner, &request(BACKUP, 42, read));
        assert!(
            matches!(unknown, Err(ArrayError::UnknownLu(42))),
            "{unknown:?}"
        );
        // A plain LU the owner has no grant on is invisible to it; one it
        // sees (here: with --insecure) is the configuration's alone.
        let plain = set_access(&array, &owner, &request(BACKUP, 9, read));
        assert!(matches!(plain, Err(ArrayError::UnknownLu(9))), "{plain:?}");
        let plain = set_access(&array, &ANYONE, &request(BACKUP, 9, read));
        let error = plain.expect_err("a plain LU");
        assert!(error.to_string().contains("belongs to no pair"), "{error}");
        set_access(&array, &owner, &request(BACKUP, 2, None)).expect("unset is valid");
        set_access(&array, &ANYONE, &request(BACKUP, 2, read)).expect("--insecure");
    }

    fn select_request(
        lu: LuId,
        mode: pb::MirrorMode,
        mate_writable: bool,
    ) -> pb::ModeSelectRequest {
        pb::ModeSelectRequest {
            mate_lu: None,
            lu,
            mode: mode.into(),
            mate_writable,
            purpose: "snapshot of run R".into(),
        }
    }

    #[test]
    fn only_the_owner_selects_a_mode_and_only_of_a_mirror_lu() {
        let array = array();
        let owner = caller(OWNER);
        let snapshot = select_request(0, pb::MirrorMode::Snapshot, true);
        for who in [caller(BACKUP), caller(CONSOLE), Caller::Anonymous] {
            let error = mode_select(&array, &who, &snapshot).expect_err("not the owner");
            assert!(matches!(error, ArrayError::NotOwner { .. }), "{error}");
            assert!(
                error
                    .to_string()
                    .contains("may not change the mode of a mirror LU")
                    && error.to_string().contains(OWNER),
                "{error}"
            );
        }
        let change = mode_select(&array, &owner, &snapshot).expect("the owner");
        assert_eq!(
            change,
            ModeChange {
                mirror: 0,
                mate: 2,
                mode: MirrorMode::Snapshot {
                    mate_writable: true
                },
                purpose: "snapshot of run R".into(),
            }
        );
        mode_select(&array, &ANYONE, &snapshot).expect("--insecure");
        let refused = [
            (
                select_request(1, pb::MirrorMode::Snapshot, false),
                "the origin of mirror LU 0",
            ),
            (
                select_request(5, pb::MirrorMode::Synchronized, false),
                "the mate of mirror LU 3",
            ),
            (
                select_request(0, pb::MirrorMode::Unspecified, false),
                "mode 0 is not",
            ),
            (
                pb::ModeSelectRequest {
                    mate_lu: None,
                    mode: 17,
                    ..select_request(0, pb::MirrorMode::Snapshot, false)
                },
                "mode 17 is not",
            ),
            (
                select_request(0, pb::MirrorMode::Synchronized, true),
                "mate_writable is for SNAPSHOT alone, not SYNCHRONIZED",
            ),
            (
                select_request(3, pb::MirrorMode::Resynchronizing, true),
                "mate_writable is for SNAPSHOT alone",
            ),
            (
                pb::ModeSelectRequest {
                    mate_lu: None,
                    purpose: "x".repeat(access::MAX_PURPOSE_BYTES + 1),
                    ..select_request(0, pb::MirrorMode::Snapshot, false)
                },
                "purpose",
            ),
        ];
        for (request, expected) in refused {
            let error = mode_select(&array, &owner, &request).expect_err(expected);
            assert!(matches!(error, ArrayError::InvalidArgument(_)), "{error}");
            assert!(error.to_string().contains(expected), "{error}");
        }
        // A plain LU the owner cannot see is missing; one it sees has no
        // mode.
        let plain = select_request(9, pb::MirrorMode::Synchronized, false);
        let unseen = mode_select(&array, &owner, &plain);
        assert!(
            matches!(unseen, Err(ArrayError::UnknownLu(9))),
            "{unseen:?}"
        );
        let error = mode_select(&array, &ANYONE, &plain).expect_err("a plain LU");
        assert!(error.to_string().contains("belongs to no pair"), "{error}");
        let missing = mode_select(
            &array,
            &owner,
            &select_request(42, pb::MirrorMode::Synchronized, false),
        );
        assert!(
            matches!(missing, Err(ArrayError::UnknownLu(42))),
            "{missing:?}"
        );
    }

    #[tokio::test]
    async fn the_mode_binds_the_owner_and_the_backup_alike() {
        let array = array();
        let owner = caller(OWNER);
        test_ops::mode_select(&array, &owner, 0, pb::MirrorMode::Resynchronizing, false)
            .await
            .expect("select");
        for who in [&owner, &caller(BACKUP)] {
            let read = test_ops::read(&array, who, 2, 0, 1).await;
            assert!(
                matches!(read, Err(ArrayError::MirrorMode { lu: 2, .. })),
                "{read:?}"
            );
        }
        // Masking still comes first: the console sees no mate at all.
        let read = test_ops::read(&array, &caller(CONSOLE), 2, 0, 1).await;
        assert!(matches!(read, Err(ArrayError::UnknownLu(2))), "{read:?}");
        test_ops::mode_select(&array, &owner, 0, pb::MirrorMode::Snapshot, false)
            .await
            .expect("select");
        test_ops::read(&array, &caller(BACKUP), 2, 0, 1)
            .await
            .expect("the backup reads the split mate");
        let write = test_ops::write(&array, &owner, 2, 0, block(3)).await;
        assert!(
            matches!(write, Err(ArrayError::MirrorMode { lu: 2, .. })),
            "{write:?}"
        );
    }

    #[tokio::test]
    async fn a_mirror_write_needs_write_access_to_every_mate_it_is_sent_to() {
        // Mirror LU 0 = origin 1 + mates 2, 3 and 4.
        let lu = |id| format!("[[lu]]\nid = {id}\nblock_size_bytes = 4096\nblock_count = 16\n");
        let text = (1..=4).map(lu).collect::<String>()
            + "[[mirror]]\nmirror = 0\norigin = 1\nmates = [2, 3, 4]\n";
        let array =
            Array::in_memory(&ArrayConfig::from_toml(&text).expect("config")).expect("array");
        let owner = caller(OWNER);
        // Every LU of the pairs is the owner's, and the backup's on mates.
        for lu in 0..=4 {
            assert_eq!(
                array.access().access(&owner, lu),
                Access::ReadWrite,
                "LU {lu}"
            );
        }
        for lu in 2..=4 {
            assert_eq!(
                array.access().access(&caller(BACKUP), lu),
                Access::Read,
                "LU {lu}"
            );
        }
        // Mate 1 split and masked read-only for the owner: the mirror write
        // goes to the origin, mate 2 and mate 3.
        for mate in [2, 3, 4] {
            test_ops::mode_select_mate(
                &array,
                &owner,
                0,
                Some(mate),
                pb::MirrorMode::Synchronized,
                false,
            )
            .await
            .expect("synchronized");
        }
        set(&array, &owner, OWNER, 2, Some(Access::Read));
        let refused = test_ops::write(&array, &owner, 0, 0, block(1)).await;
        assert!(
            matches!(
                refused,
                Err(ArrayError::PermissionDenied {
                    through: Some(2),
                    ..
                })
            ),
            "mate 1 synchronized: {refused:?}"
        );
        test_ops::mode_select_mate(&array, &owner, 0, Some(2), pb::MirrorMode::Snapshot, false)
            .await
            .expect("split mate 1");
        test_ops::write(&array, &owner, 0, 0, block(1))
            .await
            .expect("mate 1 is not written");
        // Mate 3 read-only too, while its pair takes the write: refused
        // (naming the first read-only side, mate 1).
        set(&array, &owner, OWNER, 4, Some(Access::Read));
        let refused = test_ops::write(&array, &owner, 0, 1, block(1)).await;
        assert!(
            matches!(refused, Err(ArrayError::PermissionDenied { .. })),
            "{refused:?}"
        );
        // Accepted with mate 3 split, run after mate 1 went on
        // resynchronizing: refused, nothing written.
        test_ops::mode_select_mate(&array, &owner, 0, Some(4), pb::MirrorMode::Snapshot, false)
            .await
            .expect("split mate 3");
        let request = pb::WriteRequest {
            lu: 0,
            lba: 2,
            data: block(2),
            fua: false,
        };
        let early = write(&array, &owner, request).expect("valid: mates 1 and 3 split");
        test_ops::mode_select_mate(
            &array,
            &owner,
            0,
            Some(2),
            pb::MirrorMode::Resynchronizing,
            false,
        )
        .await
        .expect("resync mate 1");
        let late = array.write(early).await;
        assert!(
            matches!(
                late,
                Err(ArrayError::PermissionDenied {
                    through: Some(2),
                    ..
                })
            ),
            "{late:?}"
        );
        for lu in [1, 3] {
            let read = test_ops::read(&array, &ANYONE, lu, 2, 1).await;
            assert_eq!(read.expect("read"), block(0), "LU {lu} untouched");
        }
    }

    #[tokio::test]
    async fn a_split_mate_masked_read_only_does_not_stop_mirror_writes_to_the_origin() {
        let array = array();
        let owner = caller(OWNER);
        // db-server masks the split mate read-only for itself.
        set(&array, &owner, OWNER, 2, Some(Access::Read));
        let whole = test_ops::write(&array, &owner, 0, 0, block(1)).await;
        assert!(
            matches!(
                whole,
                Err(ArrayError::PermissionDenied {
                    through: Some(2),
                    ..
                })
            ),
            "HostManaged writes both sides: {whole:?}"
        );
        test_ops::mode_select(&array, &owner, 0, pb::MirrorMode::Snapshot, false)
            .await
            .expect("split");
        test_ops::write(&array, &owner, 0, 0, block(1))
            .await
            .expect("the mirror write goes to the origin alone");
        assert_eq!(
            test_ops::read(&array, &owner, 1, 0, 1)
                .await
                .expect("origin"),
            block(1)
        );
        assert_eq!(
            test_ops::read(&array, &owner, 2, 0, 1).await.expect("mate"),
            block(0)
        );
        // Accepted while split, run after the pair went on resynchronizing
        // (which writes both sides): refused, nothing written.
        let request = pb::WriteRequest {
            lu: 0,
            lba: 1,
            data: block(2),
            fua: false,
        };
        let early = write(&array, &owner, request.clone()).expect("valid while split");
        test_ops::mode_select(&array, &owner, 0, pb::MirrorMode::Resynchronizing, false)
            .await
            .expect("resync");
        let late = array.write(early).await;
        assert!(
            matches!(
                late,
                Err(ArrayError::PermissionDenied {
                    through: Some(2),
                    ..
                })
            ),
            "{late:?}"
        );
        assert_eq!(
            test_ops::read(&array, &owner, 1, 1, 1)
                .await
                .expect("origin"),
            block(0)
        );
        let now = write(&array, &owner, request);
        assert!(
            matches!(now, Err(ArrayError::PermissionDenied { .. })),
            "{now:?}"
        );
        // Someone with read access to the origin alone gains nothing.
        set(&array, &owner, OWNER, 2, None);
        set(&array, &owner, OWNER, 1, Some(Access::Read));
        test_ops::mode_select(&array, &owner, 0, pb::MirrorMode::Snapshot, false)
            .await
            .expect("split");
        let origin_read_only = test_ops::write(&array, &owner, 0, 0, block(3)).await;
        assert!(
            matches!(
                origin_read_only,
                Err(ArrayError::PermissionDenied {
                    through: Some(1),
                    ..
                })
            ),
            "{origin_read_only:?}"
        );
    }

    // ---- The property: validation never panics, and what it accepts lies
    // inside the LU and is allowed. ----

    /// A request of any kind, as the array would receive it.
    #[derive(Debug, Clone)]
    enum Request {
        Read(pb::ReadRequest),
        Write(pb::WriteRequest),
        Copy(pb::CopyRangeRequest),
        Checksum(pb::ChecksumRangeRequest),
        Flush(pb::FlushRequest),
        ModeSense(pb::ModeSenseRequest),
        SetAccess(pb::SetAccessRequest),
        ModeSelect(pb::ModeSelectRequest),
    }

    /// Numbers that probe the edges: small ones near the LUs' ends, and
    /// ones that overflow.
    fn number() -> impl Strategy<Value = u64> {
        prop_oneof![
            12 => 0u64..28,
            1 => Just(u64::MAX),
            1 => Just(u64::MAX / 512),
            1 => Just(u64::MAX / 4096),
            1 => (1u64 << 40)..(1u64 << 41),
            1 => any::<u64>(),
        ]
    }

    fn lu() -> impl Strategy<Value = u32> {
        prop_oneof![
            6 => proptest::sample::select(vec![0u32, 1, 2, 3, 4, 5, 9]),
            1 => 0u32..12,
            1 => any::<u32>(),
        ]
    }

    fn data() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            2 => (0usize..5).prop_map(|blocks| vec![0xA5; blocks * 512]),
            2 => (0usize..5).prop_map(|blocks| vec![0x5A; blocks * 4096]),
            1 => proptest::collection::vec(any::<u8>(), 0..700),
        ]
    }

    fn structured() -> impl Strategy<Value = Request> {
        prop_oneof![
            (lu(), number(), number())
                .prop_map(|(lu, lba, blocks)| Request::Read(pb::ReadRequest { lu, lba, blocks })),
            (lu(), number(), data(), any::<bool>()).prop_map(|(lu, lba, data, fua)| {
                Request::Write(pb::WriteRequest { lu, lba, data, fua })
            }),
            (lu(), lu(), number(), number()).prop_map(|(src_lu, dst_lu, lba, blocks)| {
                Request::Copy(pb::CopyRangeRequest {
                    src_lu,
                    dst_lu,
                    lba,
                    blocks,
                    min_bytes_per_s: None,
                })
            }),
            (lu(), number(), number(), number()).prop_map(|(lu, lba, blocks, chunk_blocks)| {
                Request::Checksum(pb::ChecksumRangeRequest {
                    lu,
                    lba,
                    blocks,
                    chunk_blocks,
                })
            }),
            lu().prop_map(|lu| Request::Flush(pb::FlushRequest { lu })),
            lu().prop_map(|lu| Request::ModeSense(pb::ModeSenseRequest { lu })),
            (".{0,3}", lu(), proptest::option::of(-2i32..6), ".{0,8}").prop_map(
                |(identity, lu, access, purpose)| {
                    Request::SetAccess(pb::SetAccessRequest {
                        identity,
                        lu,
                        access,
                        purpose,
                    })
                }
            ),
            (lu(), -1i32..6, any::<bool>(), ".{0,8}").prop_map(
                |(lu, mode, mate_writable, purpose)| {
                    Request::ModeSelect(pb::ModeSelectRequest {
                        mate_lu: None,
                        lu,
                        mode,
                        mate_writable,
                        purpose,
                    })
                }
            ),
        ]
    }

    /// Arbitrary bytes decoded as each request message; most fail to
    /// decode (and are refused there, as tonic would).
    fn decoded() -> impl Strategy<Value = Option<Request>> {
        (0u8..8, proptest::collection::vec(any::<u8>(), 0..48)).prop_map(|(kind, bytes)| {
            let bytes = bytes.as_slice();
            match kind {
                0 => pb::ReadRequest::decode(bytes).ok().map(Request::Read),
                1 => pb::WriteRequest::decode(bytes).ok().map(Request::Write),
                2 => pb::CopyRangeRequest::decode(bytes).ok().map(Request::Copy),
                3 => pb::ChecksumRangeRequest::decode(bytes)
                    .ok()
                    .map(Request::Checksum),
                4 => pb::FlushRequest::decode(bytes).ok().map(Request::Flush),
                5 => pb::ModeSenseRequest::decode(bytes)
                    .ok()
                    .map(Request::ModeSense),
                6 => pb::SetAccessRequest::decode(bytes)
                    .ok()
                    .map(Request::SetAccess),
                _ => pb::ModeSelectRequest::decode(bytes)
                    .ok()
                    .map(Request::ModeSelect),
            }
        })
    }

    fn any_caller() -> impl Strategy<Value = Caller> {
        prop_oneof![
            Just(Caller::Unauthenticated),
            Just(Caller::Anonymous),
            Just(caller(OWNER)),
            Just(caller(BACKUP)),
            Just(caller(CONSOLE)),
            Just(caller("reporting")),
        ]
    }

    fn any_request() -> impl Strategy<Value = Option<Request>> {
        prop_oneof![4 => structured().prop_map(Some), 1 => decoded()]
    }

    /// The independent oracle: the LU's geometry from the configuration,
    /// and the caller's access computed from the table's grants on every
    /// real LU the request touches.
    struct Oracle {
        config: ArrayConfig,
    }

    impl Oracle {
        /// (block size, block count, the LUs whose grants count).
        fn lu(&self, lu: LuId) -> (u64, u64, Vec<LuId>) {
            if let Some(m) = self.config.mirrors.iter().find(|m| m.mirror == lu) {
                let origin = self
                    .config
                    .lus
                    .iter()
                    .find(|l| l.id == m.origin)
                    .expect("origin");
                let geometry = (u64::from(origin.block_size_bytes), origin.block_count);
                return (geometry.0, geometry.1, vec![lu, m.origin, m.mate]);
            }
            let real = self
                .config
                .lus
                .iter()
                .find(|l| l.id == lu)
                .expect("accepted LU exists");
            (u64::from(real.block_size_bytes), real.block_count, vec![lu])
        }

        fn assert_inside(&self, lu: LuId, lba: u64, blocks: u64) -> Result<(), TestCaseError> {
            let (_, block_count, _) = self.lu(lu);
            prop_assert!(blocks > 0, "accepted zero blocks of LU {lu}");
            prop_assert!(
                lba.checked_add(blocks)
                    .is_some_and(|end| end <= block_count),
                "accepted blocks {lba}..{lba}+{blocks} of LU {lu}, which has {block_count}"
            );
            Ok(())
        }

        fn assert_allowed(
            &self,
            array: &Array,
            caller: &Caller,
            lu: LuId,
            needs: Access,
        ) -> Result<(), TestCaseError> {
            let (_, _, lus) = self.lu(lu);
            let has = lus
                .iter()
                .map(|&l| array.access().access(caller, l))
                .min()
                .expect("an LU");
            prop_assert!(
                has >= needs,
                "accepted {needs} on LU {lu} for {caller:?}, which has {has}"
            );
            Ok(())
        }
    }

    /// Validates `request` as `caller`; on acceptance checks the range, the
    /// data length and the access against the oracle.
    fn check(
        array: &Array,
        oracle: &Oracle,
        caller: &Caller,
        request: Request,
    ) -> Result<bool, TestCaseError> {
        let mut accepted = true;
        match request {
            Request::Read(r) => {
                let outcome = read(array, caller, &r);
                accepted = outcome.is_ok();
                if let Ok(v) = outcome {
                    oracle.assert_inside(v.lu(), v.lba(), v.blocks())?;
                    oracle.assert_allowed(array, caller, v.lu(), Access::Read)?;
                    for chunk in v.chunks(4096) {
                        oracle.assert_inside(chunk.lu(), chunk.lba(), chunk.blocks())?;
                    }
                }
            }
            Request::Write(r) => {
                let outcome = write(array, caller, r);
                accepted = outcome.is_ok();
                if let Ok(v) = outcome {
                    oracle.assert_inside(v.lu(), v.lba(), v.blocks())?;
                    oracle.assert_allowed(array, caller, v.lu(), Access::ReadWrite)?;
                    let (block_size_bytes, _, _) = oracle.lu(v.lu());
                    prop_assert_eq!(v.data().len() as u64, v.blocks() * block_size_bytes);
                    prop_assert!(v.data().len() as u64 <= MAX_REQUEST_BYTES);
                }
            }
            Request::Copy(r) => {
                let outcome = copy_range(array, caller, &r);
                accepted = outcome.is_ok();
                if let Ok(v) = outcome {
                    oracle.assert_inside(v.src(), v.lba(), v.blocks())?;
                    oracle.assert_inside(v.dst(), v.lba(), v.blocks())?;
                    oracle.assert_allowed(array, caller, v.src(), Access::Read)?;
                    oracle.assert_allowed(array, caller, v.dst(), Access::ReadWrite)?;
                }
            }
            Request::Checksum(r) => {
                let outcome = checksum_range(array, caller, &r);
                accepted = outcome.is_ok();
                if let Ok(v) = outcome {
                    oracle.assert_inside(v.lu(), v.lba(), v.blocks())?;
                    oracle.assert_allowed(array, caller, v.lu(), Access::Read)?;
                    prop_assert!(v.chunk_blocks() * v.block_size_bytes() <= MAX_REQUEST_BYTES);
                }
            }
            Request::Flush(r) => {
                let outcome = flush(array, caller, &r);
                accepted = outcome.is_ok();
                if let Ok(v) = outcome {
                    oracle.assert_allowed(array, caller, v.lu(), Access::Read)?;
                }
            }
            Request::ModeSense(r) => match mode_sense(array, caller, &r) {
                Ok(_) => oracle.assert_allowed(array, caller, r.lu, Access::Read)?,
                Err(_) => accepted = false,
            },
            Request::SetAccess(r) => {
                let outcome = set_access(array, caller, &r);
                accepted = outcome.is_ok();
                if let Ok(change) = outcome {
                    let owner = matches!(caller, Caller::Unauthenticated)
                        || caller.identity() == Some(OWNER);
                    prop_assert!(owner, "{caller:?} may not set access");
                    prop_assert!(!change.identity.is_empty());
                    prop_assert!(array.access().in_pair(change.lu));
                }
            }
            Request::ModeSelect(r) => {
                let outcome = mode_select(array, caller, &r);
                accepted = outcome.is_ok();
                if let Ok(change) = outcome {
                    let owner = matches!(caller, Caller::Unauthenticated)
                        || caller.identity() == Some(OWNER);
                    prop_assert!(owner, "{caller:?} may not select a mode");
                    prop_assert!(
                        oracle
                            .config
                            .mirrors
                            .iter()
                            .any(|m| m.mirror == change.mirror),
                        "accepted a mode for LU {}, no mirror LU",
                        change.mirror
                    );
                    prop_assert!(r.mode >= 1 && r.mode <= 4, "accepted mode {}", r.mode);
                    prop_assert!(!r.mate_writable || r.mode == 3, "{r:?}");
                }
            }
        }
        Ok(accepted)
    }

    /// A runner with a printed seed: `PROPTEST_RNG_SEED` replays one, and
    /// `PROPTEST_CASES` sets the number of cases (default 16384 here).
    fn runner(name: &str) -> TestRunner {
        let mut config = Config::default();
        let seed = match config.rng_seed {
            RngSeed::Fixed(seed) => seed,
            RngSeed::Random => {
                use std::hash::{BuildHasher, RandomState};
                RandomState::new().hash_one(std::time::SystemTime::now())
            }
        };
        println!(
            "{name}: seed {seed}; replay with PROPTEST_RNG_SEED={seed} \
             cargo test --release -p splitmirror-array-node {name}"
        );
        config.rng_seed = RngSeed::Fixed(seed);
        // The broken variant must fail without leaving a regression file.
        config.failure_persistence = None;
        if std::env::var_os("PROPTEST_CASES").is_none() {
            config.cases = 16384;
        }
        TestRunner::new(config)
    }

    fn run_property(name: &str) -> Result<(), TestError<(Caller, Option<Request>)>> {
        let array = array();
        let oracle = Oracle { config: config() };
        // Some set grants too, so that access is not only the defaults.
        set(&array, &ANYONE, OWNER, 2, Some(Access::Read));
        set(&array, &ANYONE, BACKUP, 4, Some(Access::ReadWrite));
        let (cases, accepted) = (Cell::new(0u32), Cell::new(0u32));
        let outcome = runner(name).run(&(any_caller(), any_request()), |(caller, request)| {
            cases.set(cases.get() + 1);
            if let Some(request) = request
                && check(&array, &oracle, &caller, request)?
            {
                accepted.set(accepted.get() + 1);
            }
            Ok(())
        });
        println!(
            "{name}: {} of {} requests accepted by validation",
            accepted.get(),
            cases.get()
        );
        outcome
    }

    #[test]
    fn a_copys_guaranteed_rate_is_carried_and_zero_is_refused() {
        let array = Array::in_memory(&config()).expect("array");
        let copy = |min_bytes_per_s| {
            copy_range(
                &array,
                &ANYONE,
                &pb::CopyRangeRequest {
                    src_lu: 1,
                    dst_lu: 2,
                    lba: 0,
                    blocks: 1,
                    min_bytes_per_s,
                },
            )
        };
        assert_eq!(copy(None).expect("unset").min_bytes_per_s(), None);
        assert_eq!(copy(Some(5)).expect("5").min_bytes_per_s(), Some(5));
        let zero = copy(Some(0));
        assert!(
            matches!(zero, Err(ArrayError::InvalidArgument(ref m)) if m.contains("0 bytes per second")),
            "{zero:?}"
        );
    }

    #[test]
    fn validation_never_panics_and_accepts_only_what_lies_inside_and_is_allowed() {
        if let Err(error) = run_property("validation_never_panics") {
            panic!("{error}");
        }
    }

    #[test]
    fn the_property_catches_a_validation_without_the_end_check() {
        END_CHECK_OFF.with(|off| off.set(true));
        let outcome = run_property("the_property_catches");
        END_CHECK_OFF.with(|off| off.set(false));
        match outcome {
            Err(TestError::Fail(reason, input)) => {
                println!("caught, as it must be: {reason} for {input:?}");
                assert!(reason.message().contains("which has"), "{reason}");
            }
            other => panic!("the broken validation went unnoticed: {other:?}"),
        }
    }
}
