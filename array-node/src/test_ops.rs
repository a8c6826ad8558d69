//! Unit tests' way of calling the array as a request would: validation,
//! then the core, with a given caller.

use splitmirror_proto::array::v1 as pb;
use splitmirror_proto::security::Caller;

use crate::array::Array;
use crate::config::LuId;
use crate::error::ArrayError;
use crate::modes::MirrorMode;
use crate::validate;

/// The caller of a node run with `--insecure`: masking off.
pub const ANYONE: Caller = Caller::Unauthenticated;

pub fn caller(identity: &str) -> Caller {
    Caller::Identified(identity.to_string())
}

pub async fn read(
    array: &Array,
    caller: &Caller,
    lu: LuId,
    lba: u64,
    blocks: u64,
) -> Result<Vec<u8>, ArrayError> {
    let read = validate::read(array, caller, &pb::ReadRequest { lu, lba, blocks })?;
    array.read(&read).await
}

pub async fn write(
    array: &Array,
    caller: &Caller,
    lu: LuId,
    lba: u64,
    data: Vec<u8>,
) -> Result<u64, ArrayError> {
    let request = pb::WriteRequest {
        lu,
        lba,
        data,
        fua: false,
    };
    let write = validate::write(array, caller, request)?;
    array.write(write).await
}

pub async fn copy_range(
    array: &Array,
    caller: &Caller,
    src_lu: LuId,
    dst_lu: LuId,
    lba: u64,
    blocks: u64,
) -> Result<u64, ArrayError> {
    let request = pb::CopyRangeRequest {
        src_lu,
        dst_lu,
        lba,
        blocks,
        min_bytes_per_s: None,
    };
    let copy = validate::copy_range(array, caller, &request)?;
    array.copy_range(&copy).await
}

pub async fn checksums(
    array: &Array,
    caller: &Caller,
    lu: LuId,
    lba: u64,
    blocks: u64,
    chunk_blocks: u64,
) -> Result<Vec<[u8; 32]>, ArrayError> {
    let request = pb::ChecksumRangeRequest {
        lu,
        lba,
        blocks,
        chunk_blocks,
    };
    let checksum = validate::checksum_range(array, caller, &request)?;
    array.checksum_range(&checksum).await
}

pub async fn flush(array: &Array, caller: &Caller, lu: LuId) -> Result<(), ArrayError> {
    let flush = validate::flush(array, caller, &pb::FlushRequest { lu })?;
    array.flush(&flush).await
}

/// `ModeSelect` of mirror LU `lu` as `caller`: validated, then applied.
pub async fn mode_select(
    array: &Array,
    caller: &Caller,
    lu: LuId,
    mode: pb::MirrorMode,
    mate_writable: bool,
) -> Result<(MirrorMode, MirrorMode), ArrayError> {
    mode_select_mate(array, caller, lu, None, mode, mate_writable).await
}

/// `ModeSelect` of the pair (mirror LU `lu`, mate `mate_lu`; unset: its
/// only mate) as `caller`: validated, then applied.
pub async fn mode_select_mate(
    array: &Array,
    caller: &Caller,
    lu: LuId,
    mate_lu: Option<LuId>,
    mode: pb::MirrorMode,
    mate_writable: bool,
) -> Result<(MirrorMode, MirrorMode), ArrayError> {
    let request = pb::ModeSelectRequest {
        mate_lu,
        lu,
        mode: mode.into(),
        mate_writable,
        purpose: format!("test: {}", mode.as_str_name()),
    };
    let change = validate::mode_select(array, caller, &request)?;
    array.modes().select(&change).await
}
