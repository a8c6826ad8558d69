//! The typed client of `splitmirror.array.v1.ArrayService`.

use crate::telemetry::TracedChannel;
use futures_util::StreamExt;

use super::{AnswerStream, ClientError, ErrorKind, Peer};
use crate::array::v1 as pb;
use crate::array::v1::array_service_client::ArrayServiceClient;
use crate::node;
use crate::security::{Security, role};

/// One LU as the array's mode-sense page describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuPage {
    pub lu: u32,
    pub kind: pb::LuKind,
    pub block_size_bytes: u32,
    pub block_count: u64,
    /// For a mirror LU: its origin and mate.
    pub origin_lu: Option<u32>,
    pub mate_lu: Option<u32>,
    /// For a mirror LU, its origin and its mate: the pair's mode in the
    /// array's mirroring management table (`Unspecified` for a plain LU).
    pub mirror_mode: pb::MirrorMode,
    /// Whether that mode (Snapshot) lets the mate be written.
    pub mate_writable: bool,
    /// For a mirror LU, its origin or a mate: every (mirror LU, mate) pair
    /// and its mode, mate 1 first.
    pub mates: Vec<pb::MatePair>,
}

impl LuPage {
    pub fn size_bytes(&self) -> u64 {
        self.block_count * u64::from(self.block_size_bytes)
    }
}

/// One row of the mirroring definition table (1108) as the array's
/// mode-sense pages give it: a mirror LU and the pair behind it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PairInfo {
    pub mirror_lu: u32,
    pub origin_lu: u32,
    pub mate_lu: u32,
    pub block_size_bytes: u32,
    pub block_count: u64,
}

/// The array over gRPC. Cloning is cheap (one shared connection); the
/// connection is made at the first call and remade after the array
/// restarts.
#[derive(Clone)]
pub struct ArrayClient {
    inner: ArrayServiceClient<TracedChannel>,
    peer: Peer,
}

impl ArrayClient {
    /// A client of the array at `target` (`host:port` or a URL). Fails only
    /// for an address that cannot be parsed.
    pub fn new(target: &str, security: &Security) -> Result<Self, ClientError> {
        let (peer, channel) = Peer::connect("array", role::ARRAY, target, security)?;
        let inner = ArrayServiceClient::new(channel)
            .max_decoding_message_size(node::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(node::MAX_MESSAGE_BYTES);
        Ok(Self { inner, peer })
    }

    /// The address this client calls.
    pub fn target(&self) -> &str {
        &self.peer.target
    }

    /// Every LU the array shows this client (LUN masking leaves out the
    /// LUs this identity has no access to), with the access it has.
    pub async fn list_lus(&self) -> Result<Vec<pb::LuInfo>, ClientError> {
        let answer = self.inner.clone().list_lus(pb::ListLusRequest {}).await;
        Ok(self.peer.answer(answer, || "listing LUs".into())?.lus)
    }

    /// The mode-sense page of one LU ([0054]).
    pub async fn mode_sense(&self, lu: u32) -> Result<LuPage, ClientError> {
        let answer = self
            .inner
            .clone()
            .mode_sense(pb::ModeSenseRequest { lu })
            .await;
        let page = self
            .peer
            .answer(answer, || format!("mode sense of LU {lu}"))?;
        Ok(LuPage {
            lu,
            kind: page.kind(),
            block_size_bytes: page.block_size_bytes,
            block_count: page.block_count,
            origin_lu: page.origin_lu,
            mate_lu: page.mate_lu,
            mirror_mode: page.mirror_mode(),
            mate_writable: page.mate_writable,
            mates: page.mates,
        })
    }

    /// Sets the mode of mirror LU `lu` in the array's mirroring management
    /// table (Fig. 2); `mate_writable` only with `Snapshot`. Only the
    /// pair's owner may call it. The array has made the mode durable when
    /// this answers, and enforces it on every request from then on.
    /// Answers the mode before and after.
    pub async fn mode_select(
        &self,
        lu: u32,
        mode: pb::MirrorMode,
        mate_writable: bool,
        purpose: &str,
    ) -> Result<pb::ModeSelectResponse, ClientError> {
        self.mode_select_mate(lu, None, mode, mate_writable, purpose)
            .await
    }

    /// [`mode_select`](Self::mode_select) of the pair of mirror LU `lu`
    /// and its mate `mate_lu` (`None`: its only mate), for a mirror LU
    /// with several mates.
    pub async fn mode_select_mate(
        &self,
        lu: u32,
        mate_lu: Option<u32>,
        mode: pb::MirrorMode,
        mate_writable: bool,
        purpose: &str,
    ) -> Result<pb::ModeSelectResponse, ClientError> {
        let request = pb::ModeSelectRequest {
            lu,
            mode: mode.into(),
            mate_writable,
            purpose: purpose.to_string(),
            mate_lu,
        };
        let answer = self.inner.clone().mode_select(request).await;
        self.peer.answer(answer, || {
            format!(
                "setting the mode of mirror LU {lu} to {}",
                mode.as_str_name()
            )
        })
    }

    /// The mirror pairs the array defines, learnt the patent's way: a
    /// mode-sense page per mirror LU ([0054]), one pair per mate (mate 1
    /// first) of a mirror LU with several. Only the pairs whose mirror
    /// LU this identity may at least read (the pairs' owner sees them all).
    pub async fn list_pairs(&self) -> Result<Vec<PairInfo>, ClientError> {
        let mut pairs = Vec::new();
        for lu in self.list_lus().await? {
            if lu.kind() != pb::LuKind::Mirror {
                continue;
            }
            let page = self.mode_sense(lu.id).await?;
            let (pb::LuKind::Mirror, Some(origin_lu), Some(first_mate_lu)) =
                (page.kind, page.origin_lu, page.mate_lu)
            else {
                continue;
            };
            // An array that lists no pairs on the page has one mate.
            let mate_lus: Vec<u32> = match page.mates.is_empty() {
                true => vec![first_mate_lu],
                false => page.mates.iter().map(|pair| pair.mate_lu).collect(),
            };
            for mate_lu in mate_lus {
                pairs.push(PairInfo {
                    mirror_lu: lu.id,
                    origin_lu,
                    mate_lu,
                    block_size_bytes: page.block_size_bytes,
                    block_count: page.block_count,
                });
            }
        }
        Ok(pairs)
    }

    /// `blocks` blocks of `lu` from `lba`, as the array streams them.
    pub async fn read_stream(
        &self,
        lu: u32,
        lba: u64,
        blocks: u64,
    ) -> Result<AnswerStream<Vec<u8>>, ClientError> {
        let doing = || format!("reading LU {lu} at LBA {lba}");
        let answer = self
            .inner
            .clone()
            .read(pb::ReadRequest { lu, lba, blocks })
            .await;
        let stream = self.peer.stream(self.peer.answer(answer, doing)?, doing());
        Ok(Box::pin(stream.map(|chunk| chunk.map(|c| c.data))))
    }

    /// `blocks` blocks of `lu` from `lba`, in one buffer.
    pub async fn read(&self, lu: u32, lba: u64, blocks: u64) -> Result<Vec<u8>, ClientError> {
        let mut stream = self.read_stream(lu, lba, blocks).await?;
        let mut data = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            if data.is_empty() {
                data = chunk;
            } else {
                data.extend_from_slice(&chunk);
            }
        }
        Ok(data)
    }

    /// Writes whole blocks at `lba`; a mirror LU writes both sides. With
    /// `fua` the array makes the data durable before it answers. Answers
    /// the blocks written.
    pub async fn write_with(
        &self,
        lu: u32,
        lba: u64,
        data: Vec<u8>,
        fua: bool,
    ) -> Result<u64, ClientError> {
        let request = pb::WriteRequest { lu, lba, data, fua };
        let answer = self.inner.clone().write(request).await;
        let written = self
            .peer
            .answer(answer, || format!("writing LU {lu} at LBA {lba}"))?;
        Ok(written.blocks_written)
    }

    /// Writes whole blocks at `lba` (no FUA); answers the blocks written.
    pub async fn write(&self, lu: u32, lba: u64, data: Vec<u8>) -> Result<u64, ClientError> {
        self.write_with(lu, lba, data, false).await
    }

    /// Copies a block range from one LU to another inside the array (the
    /// offload of claim 4); answers the blocks copied.
    pub async fn copy_range(
        &self,
        src_lu: u32,
        dst_lu: u32,
        lba: u64,
        blocks: u64,
    ) -> Result<u64, ClientError> {
        self.copy_range_guaranteed(src_lu, dst_lu, lba, blocks, None)
            .await
    }

    /// [`Self::copy_range`] guaranteed `min_bytes_per_s` whatever the
    /// foreground load (the array's adaptive pace never slows it below);
    /// `None`: the array's own minimum.
    pub async fn copy_range_guaranteed(
        &self,
        src_lu: u32,
        dst_lu: u32,
        lba: u64,
        blocks: u64,
        min_bytes_per_s: Option<u64>,
    ) -> Result<u64, ClientError> {
        let request = pb::CopyRangeRequest {
            src_lu,
            dst_lu,
            lba,
            blocks,
            min_bytes_per_s,
        };
        let answer = self.inner.clone().copy_range(request).await;
        let copied = self.peer.answer(answer, || {
            format!("copying LU {src_lu} to LU {dst_lu} at LBA {lba}")
        })?;
        Ok(copied.blocks_copied)
    }

    /// BLAKE3 digests of each `chunk_blocks`-block chunk of a range (the
    /// last chunk may be shorter).
    pub async fn checksums(
        &self,
        lu: u32,
        lba: u64,
        blocks: u64,
        chunk_blocks: u64,
    ) -> Result<Vec<[u8; 32]>, ClientError> {
        let doing = || format!("checksumming LU {lu} at LBA {lba}");
        let request = pb::ChecksumRangeRequest {
            lu,
            lba,
            blocks,
            chunk_blocks,
        };
        let answer = self.inner.clone().checksum_range(request).await;
        let digests = self.peer.answer(answer, doing)?.digests;
        digests
            .iter()
            .map(|d| <[u8; 32]>::try_from(d.as_slice()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| {
                ClientError::local(
                    ErrorKind::Internal,
                    self.peer.node,
                    &self.peer.target,
                    doing(),
                    "the array answered a digest that is not 32 bytes",
                )
            })
    }

    /// Makes every acknowledged write to `lu` durable.
    pub async fn flush(&self, lu: u32) -> Result<(), ClientError> {
        let answer = self.inner.clone().flush(pb::FlushRequest { lu }).await;
        self.peer.answer(answer, || format!("flushing LU {lu}"))?;
        Ok(())
    }

    /// LUN masking: sets what `identity` may do with `lu` (an LU of a
    /// pair) from now on, until set again; `None` returns it to what the
    /// array's configuration grants. Only the pairs' owner (db-server by
    /// default) may call it: others get `PermissionDenied`. The array has
    /// made the change durable when this answers; `purpose` goes to its
    /// log and to [`ArrayClient::list_access`]. Answers the identity's
    /// access to the LU before and after.
    pub async fn set_access(
        &self,
        identity: &str,
        lu: u32,
        access: Option<pb::Access>,
        purpose: &str,
    ) -> Result<(pb::Access, pb::Access), ClientError> {
        let request = pb::SetAccessRequest {
            identity: identity.to_string(),
            lu,
            access: access.map(Into::into),
            purpose: purpose.to_string(),
        };
        let answer = self.inner.clone().set_access(request).await;
        let answer = self.peer.answer(answer, || {
            let access = access.map_or("the configured access", |a| a.as_str_name());
            format!("setting {identity}'s access to LU {lu} to {access}")
        })?;
        Ok((answer.previous(), answer.access()))
    }

    /// How fast the array lets background copies go now, and why.
    pub async fn pace(&self) -> Result<pb::BackgroundPace, ClientError> {
        let answer = self.inner.clone().pace(pb::PaceRequest {}).await;
        let answer = self
            .peer
            .answer(answer, || "asking the array's pace".to_string())?;
        answer.pace.ok_or_else(|| {
            ClientError::local(
                ErrorKind::Internal,
                self.peer.node,
                &self.peer.target,
                "asking the array's pace",
                "the answer holds no pace",
            )
        })
    }

    /// The grants in force that this identity may see: the pairs' owner
    /// sees every identity's grants on its pairs' LUs, any other identity
    /// its own. Configured and set ones, one per (identity, LU).
    pub async fn list_access(&self) -> Result<Vec<pb::Grant>, ClientError> {
        let answer = self
            .inner
            .clone()
            .list_access(pb::ListAccessRequest {})
            .await;
        Ok(self
            .peer
            .answer(answer, || "listing LUN masking".into())?
            .grants)
    }

    /// The generated client, for tests that must send what this client
    /// never would (a malformed request, a raw stream).
    pub fn raw(&self) -> ArrayServiceClient<TracedChannel> {
        self.inner.clone()
    }
}
