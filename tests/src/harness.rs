//! What every scenario needs: nodes on ephemeral ports, clients, seeds.

use std::path::Path;
use std::time::Duration;

use array_node::{ArrayConfig, ArrayNodeConfig, ArrayTestHooks};
use splitmirror_proto::array::v1 as pb;
use splitmirror_proto::array::v1::array_service_client::ArrayServiceClient;
use splitmirror_proto::node::{self, NodeHandle};
use tonic::transport::Channel;

pub type ArrayClient = ArrayServiceClient<Channel>;

/// Starts an array node over `data_dir` on an ephemeral loopback port.
pub async fn start_array(data_dir: &Path, array: ArrayConfig, hooks: ArrayTestHooks) -> NodeHandle {
    let listener = node::bind("127.0.0.1:0").await.expect("bind loopback");
    let config = ArrayNodeConfig {
        data_dir: data_dir.to_path_buf(),
        array,
        hooks,
    };
    let handle = array_node::spawn(config, listener)
        .await
        .expect("start array node");
    wait_healthy(&handle.url()).await;
    handle
}

/// Waits (bounded) until a node answers its health check.
pub async fn wait_healthy(url: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match node::probe_health(url, "").await {
            Ok(()) => return,
            Err(e) if tokio::time::Instant::now() > deadline => {
                panic!("{url} did not become healthy: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

pub async fn array_client(url: &str) -> ArrayClient {
    let channel = node::endpoint(url)
        .expect("endpoint")
        .connect()
        .await
        .expect("connect to array");
    ArrayServiceClient::new(channel)
        .max_decoding_message_size(node::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(node::MAX_MESSAGE_BYTES)
}

/// Reads a whole LU through the array.
pub async fn read_lu(client: &mut ArrayClient, lu: u32, lba: u64, blocks: u64) -> Vec<u8> {
    let mut stream = client
        .read(pb::ReadRequest { lu, lba, blocks })
        .await
        .expect("read")
        .into_inner();
    let mut data = Vec::new();
    while let Some(chunk) = stream.message().await.expect("read chunk") {
        data.extend_from_slice(&chunk.data);
    }
    data
}

/// BLAKE3 digests of a whole LU in 256-block chunks.
pub async fn lu_digests(client: &mut ArrayClient, lu: u32) -> Vec<Vec<u8>> {
    let info = client
        .mode_sense(pb::ModeSenseRequest { lu })
        .await
        .expect("mode sense")
        .into_inner();
    client
        .checksum_range(pb::ChecksumRangeRequest {
            lu,
            lba: 0,
            blocks: info.block_count,
            chunk_blocks: 256,
        })
        .await
        .expect("checksum")
        .into_inner()
        .digests
}

/// The seed of a randomised test: `SPLITMIRROR_SEED` to replay one, else
/// fresh. Printed so that a failure can be replayed.
pub fn seed(test: &str) -> u64 {
    let seed = match std::env::var("SPLITMIRROR_SEED") {
        Ok(text) => text.parse().expect("SPLITMIRROR_SEED must be a u64"),
        Err(_) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock after 1970");
            now.as_nanos() as u64 ^ u64::from(std::process::id()).rotate_left(32)
        }
    };
    eprintln!("{test}: seed {seed} (replay with SPLITMIRROR_SEED={seed})");
    seed
}

/// A small array: mirror LU 0 = 1 + 2 and mirror LU 3 = 4 + 5.
pub fn small_array(lu_size_bytes: u64) -> ArrayConfig {
    ArrayConfig::default_pairs(lu_size_bytes).expect("valid config")
}
