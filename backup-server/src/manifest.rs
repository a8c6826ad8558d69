//! The manifest — a backup's index in the chunk store
//! (`indexes/<id>.json`): what a backup is, and the digests that prove it.
//!
//! The image is cut into chunks of `chunk_size_bytes`; each chunk's BLAKE3
//! digest is listed, and the image digest is the BLAKE3 of the concatenated
//! chunk digests. The array's `ChecksumRange` uses the same chunking, so a
//! backup can be compared with its LU without moving the data.

use serde::{Deserialize, Serialize};

/// The chunk size of every manifest (and of the console's comparison).
pub const CHUNK_SIZE_BYTES: u64 = splitmirror_proto::BACKUP_CHUNK_SIZE_BYTES;

/// 3: the index of a backup in the chunk store, with its chunk counts
/// (formats 1 and 2 were raw images with a `manifest.json`: 2 records the
/// snapshot the image was copied from, or that it was copied live; a
/// converted backup keeps its format).
pub const FORMAT_VERSION: u32 = 3;

/// What a backup moved and stored: every chunk is counted once. A
/// copy-on-write snapshot's backup reads every chunk (`bytes_read` is the
/// whole image): there `chunks_read` counts the chunks with content new to
/// the store, `chunks_reused` those whose content the store held (put
/// again, adding nothing), `chunks_zero` the all-zero ones (not stored).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkCounts {
    /// Read from the array and compared with the array's digest.
    pub chunks_read: u64,
    /// Already held by the store: not written again (and not read unless
    /// `verify_read`).
    pub chunks_reused: u64,
    /// All zeros: neither read nor stored.
    pub chunks_zero: u64,
    /// Bytes this backup added to the store (as stored: compressed where
    /// that saved space).
    pub new_bytes_stored: u64,
    /// Data bytes read from the array.
    pub bytes_read: u64,
    /// Every non-zero chunk was read and compared, also the reused ones.
    pub verify_read: bool,
}

/// What a backup copied: a snapshot confirmed with its owner, or a live LU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// The db-server volume whose snapshot froze the copied mate LU.
    pub volume: u32,
    /// The run id that held the snapshot while the image was read.
    pub holder_run_id: String,
    /// The ledger sequence at the snapshot, as db-server reported it.
    pub ledger_sequence: u64,
    /// The id db-server gave the acquire, the same before the first read
    /// and after the last one (0 in manifests written before ids existed).
    #[serde(default)]
    pub snapshot_id: u64,
    /// The db-server that confirmed it, as the backup server addressed it.
    pub owner: String,
    /// When db-server confirmed the snapshot before the first read and
    /// after the last one.
    pub confirmed_before_unix_ms: u64,
    pub confirmed_after_unix_ms: u64,
    /// How db-server took the snapshot, and so where the image was read:
    /// the frozen mate LU from the array (split; every manifest written
    /// before copy-on-write snapshots existed), or the snapshot virtual LU
    /// through db-server (copy-on-write).
    #[serde(default)]
    pub method: SnapshotMethod,
    /// Which of the volume's mates the snapshot split and the image was
    /// copied from, counted from 1 ([0020]); 1 in manifests written before
    /// a volume could have several.
    #[serde(default = "first_mate")]
    pub mate: u32,
}

/// The mate of a manifest that names none: volumes had one.
fn first_mate() -> u32 {
    1
}

/// How a snapshot was taken (db-server's `SnapshotMethod`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotMethod {
    /// The pair was split: the mate LU is the frozen image, read from the
    /// array.
    #[default]
    Split,
    /// Copy-on-write: the pair stayed whole; the image is db-server's
    /// snapshot virtual LU (the save area over the mate), read through
    /// db-server.
    Cow,
}

impl SnapshotMethod {
    /// "split" or "copy-on-write".
    pub fn name(self) -> &'static str {
        match self {
            SnapshotMethod::Split => "split",
            SnapshotMethod::Cow => "copy-on-write",
        }
    }
}

/// How a backup is described to people: frozen by which snapshot, or live.
pub fn describe_consistency(snapshot: Option<&SnapshotRecord>, live: bool) -> String {
    match (snapshot, live) {
        (Some(s), _) => format!(
            "frozen ({}snapshot of volume {}{} held by run {}, ledger sequence {}, snapshot id {:016x})",
            match s.method {
                SnapshotMethod::Split => "",
                SnapshotMethod::Cow => "copy-on-write ",
            },
            s.volume,
            crate::owner::of_mate(s.mate),
            s.holder_run_id,
            s.ledger_sequence,
            s.snapshot_id
        ),
        (None, true) => "live (not frozen)".into(),
        (None, false) => "unconfirmed (made before backups recorded their snapshot)".into(),
    }
}

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
    /// The snapshot's ledger sequence (the same as `snapshot`'s), kept
    /// at the top for readers of format 1.
    pub ledger_sequence: Option<u64>,
    /// The snapshot the image was copied from, confirmed held by
    /// `holder_run_id` with the same snapshot id before the first read and
    /// after the last one. `None` for a live backup.
    #[serde(default)]
    pub snapshot: Option<SnapshotRecord>,
    /// True when the LU was copied without a snapshot, while it could be
    /// written: the image need not be consistent.
    #[serde(default)]
    pub live: bool,
    pub chunk_size_bytes: u64,
    /// Hex BLAKE3 digests, one per chunk, in order.
    pub chunk_digests: Vec<String>,
    /// Hex BLAKE3 of the concatenated raw chunk digests.
    pub image_digest: String,
    /// What the copy moved and stored (format 3; `None` in backups
    /// converted from raw images).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counts: Option<ChunkCounts>,
}

impl Manifest {
    /// The chunk digests as bytes; `None` names the first that is not a
    /// hex BLAKE3 digest (an edited or damaged index).
    pub fn digests(&self) -> Result<Vec<[u8; 32]>, usize> {
        self.chunk_digests
            .iter()
            .enumerate()
            .map(|(index, hex)| from_hex(hex).ok_or(index))
            .collect()
    }

    /// The length of chunk `index` (the last may be shorter).
    pub fn chunk_len_bytes(&self, index: u64) -> u64 {
        self.chunk_size_bytes
            .min(self.size_bytes - index * self.chunk_size_bytes)
    }

    /// "frozen (snapshot of volume 0 held by run …)" or "live (not frozen)".
    pub fn consistency(&self) -> String {
        describe_consistency(self.snapshot.as_ref(), self.live)
    }
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
    fn a_manifest_without_a_method_was_copied_from_a_split_snapshot() {
        let old = r#"{"volume":0,"holder_run_id":"run-1","ledger_sequence":7,
            "owner":"x:1","confirmed_before_unix_ms":1,"confirmed_after_unix_ms":2}"#;
        let record: SnapshotRecord = serde_json::from_str(old).expect("an old record parses");
        assert_eq!(record.method, SnapshotMethod::Split);
        assert_eq!(record.mate, 1, "an old record's volume had one mate");
        let cow = SnapshotRecord {
            method: SnapshotMethod::Cow,
            ..record.clone()
        };
        let text = serde_json::to_string(&cow).expect("serializes");
        assert!(text.contains(r#""method":"cow""#), "{text}");
        assert_eq!(
            serde_json::from_str::<SnapshotRecord>(&text).expect("parses"),
            cow
        );
        let split = describe_consistency(Some(&record), false);
        assert!(split.starts_with("frozen (snapshot of volume 0"), "{split}");
        let described = describe_consistency(Some(&cow), false);
        assert!(
            described.starts_with("frozen (copy-on-write snapshot of volume 0"),
            "{described}"
        );
    }

    #[test]
    fn a_manifest_records_which_mate_was_copied() {
        let old = r#"{"volume":3,"holder_run_id":"run-1","ledger_sequence":7,
            "owner":"x:1","confirmed_before_unix_ms":1,"confirmed_after_unix_ms":2}"#;
        let first: SnapshotRecord = serde_json::from_str(old).expect("an old record parses");
        let second = SnapshotRecord {
            mate: 2,
            ..first.clone()
        };
        let text = serde_json::to_string(&second).expect("serializes");
        assert!(text.contains(r#""mate":2"#), "{text}");
        assert_eq!(
            serde_json::from_str::<SnapshotRecord>(&text).expect("parses"),
            second
        );
        let described = describe_consistency(Some(&second), false);
        assert!(
            described.starts_with("frozen (snapshot of volume 3 (mate 2) held by run run-1"),
            "{described}"
        );
        let described = describe_consistency(Some(&first), false);
        assert!(
            described.starts_with("frozen (snapshot of volume 3 held by run run-1"),
            "{described}"
        );
    }

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
