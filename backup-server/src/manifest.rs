//! `manifest.json`: what a backup is, and the digests that prove it.
//!
//! The image is cut into chunks of `chunk_size_bytes`; each chunk's BLAKE3
//! digest is listed, and the image digest is the BLAKE3 of the concatenated
//! chunk digests. The array's `ChecksumRange` uses the same chunking, so a
//! backup can be compared with its LU without moving the data.

use serde::{Deserialize, Serialize};

/// The chunk size of every manifest (and of the console's comparison).
pub const CHUNK_SIZE_BYTES: u64 = 1 << 20;

pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub backup_id: String,
    pub run_id: String,
    pub label: String,
    /// The array the image was read from, as the backup server addressed it.
    pub source_array: String,
    pub source_lu: u32,
    pub block_size_bytes: u32,
    pub block_count: u64,
    pub size_bytes: u64,
    pub started_at_unix_ms: u64,
    pub completed_at_unix_ms: u64,
    pub ledger_sequence: Option<u64>,
    pub chunk_size_bytes: u64,
    /// Hex BLAKE3 digests, one per chunk, in order.
    pub chunk_digests: Vec<String>,
    /// Hex BLAKE3 of the concatenated raw chunk digests.
    pub image_digest: String,
}

/// The image digest of a list of raw chunk digests.
pub fn image_digest(chunk_digests: &[[u8; 32]]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    for digest in chunk_digests {
        hasher.update(digest);
    }
    *hasher.finalize().as_bytes()
}

pub fn to_hex(digest: &[u8; 32]) -> String {
    blake3::Hash::from_bytes(*digest).to_hex().to_string()
}

pub fn from_hex(text: &str) -> Option<[u8; 32]> {
    blake3::Hash::from_hex(text).ok().map(|h| *h.as_bytes())
}

pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_image_digest() {
        let a = *blake3::hash(b"a").as_bytes();
        let b = *blake3::hash(b"b").as_bytes();
        assert_eq!(from_hex(&to_hex(&a)), Some(a));
        assert_eq!(from_hex("zz"), None);
        let mut joined = Vec::new();
        joined.extend_from_slice(&a);
        joined.extend_from_slice(&b);
        assert_eq!(image_digest(&[a, b]), *blake3::hash(&joined).as_bytes());
    }
}
