//! The array's block I/O against a real node: mirror semantics, copies,
//! checksums, and every kind of bad input.

use array_node::ArrayTestHooks;
use array_node::config::RealLuConfig;
use splitmirror_proto::array::v1 as pb;
use tonic::Code;

use crate::harness::{
    self, ArrayClient, ClientError, array_client, lu_digests, read_lu, start_array,
};

const BLOCK: usize = 4096;

fn pattern(seed: u8, blocks: usize) -> Vec<u8> {
    (0..blocks * BLOCK)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

async fn write(client: &ArrayClient, lu: u32, lba: u64, data: Vec<u8>) -> Result<u64, ClientError> {
    client.write(lu, lba, data).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_writes_reach_origin_and_mate_and_sides_are_addressable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = start_array(
        dir.path(),
        harness::small_array(1 << 20),
        ArrayTestHooks::default(),
    )
    .await;
    let client = array_client(&node.url());

    let lus = client.list_lus().await.expect("list");
    let mirror = lus.iter().find(|lu| lu.id == 0).expect("LU 0");
    assert_eq!(mirror.kind(), pb::LuKind::Mirror);
    assert_eq!((mirror.origin_lu, mirror.mate_lu), (Some(1), Some(2)));
    assert_eq!(lus.len(), 6);
    // The raw page: its Fig. 11 classification is not in the typed page.
    let sense = client
        .raw()
        .mode_sense(pb::ModeSenseRequest { lu: 3 })
        .await
        .expect("sense")
        .into_inner();
    assert_eq!(
        (
            sense.kind(),
            sense.fig11_classification,
            sense.origin_lu,
            sense.mate_lu
        ),
        (pb::LuKind::Mirror, 0, Some(4), Some(5))
    );
    let sense = client
        .raw()
        .mode_sense(pb::ModeSenseRequest { lu: 4 })
        .await
        .expect("sense")
        .into_inner();
    assert_eq!(
        (
            sense.kind(),
            sense.fig11_classification,
            sense.origin_lu,
            sense.mate_lu
        ),
        (pb::LuKind::Origin, 1, None, None)
    );
    let sense = client.mode_sense(5).await.expect("sense");
    assert_eq!(sense.kind, pb::LuKind::Mate);

    // A mirror write lands on both sides, byte for byte in the files.
    let data = pattern(1, 8);
    assert_eq!(write(&client, 0, 10, data.clone()).await.expect("write"), 8);
    assert_eq!(read_lu(&client, 1, 10, 8).await, data);
    assert_eq!(read_lu(&client, 2, 10, 8).await, data);
    assert_eq!(read_lu(&client, 0, 10, 8).await, data);
    let origin_file = std::fs::read(dir.path().join("lu1.img")).expect("origin file");
    let mate_file = std::fs::read(dir.path().join("lu2.img")).expect("mate file");
    assert_eq!(origin_file, mate_file);
    assert_eq!(&origin_file[10 * BLOCK..18 * BLOCK], &data[..]);

    // Origin and mate are addressable alone.
    let origin_only = pattern(2, 2);
    write(&client, 1, 0, origin_only.clone())
        .await
        .expect("origin write");
    assert_eq!(read_lu(&client, 1, 0, 2).await, origin_only);
    assert_eq!(read_lu(&client, 2, 0, 2).await, vec![0; 2 * BLOCK]);
    let mate_only = pattern(3, 1);
    write(&client, 2, 255, mate_only.clone())
        .await
        .expect("mate write (last block)");
    assert_eq!(read_lu(&client, 2, 255, 1).await, mate_only);
    assert_eq!(read_lu(&client, 1, 255, 1).await, vec![0; BLOCK]);

    // Streaming writes (no typed client sends a write stream), and a
    // multi-chunk read of the whole LU.
    let stream = futures_util::stream::iter((0..4u64).map(|i| pb::WriteRequest {
        lu: 3,
        lba: i * 64,
        data: pattern(i as u8, 64),
        fua: i == 3,
    }));
    let written = client
        .raw()
        .write_stream(stream)
        .await
        .expect("stream")
        .into_inner();
    assert_eq!(written.blocks_written, 256);
    let whole = read_lu(&client, 4, 0, 256).await;
    assert_eq!(whole.len(), 256 * BLOCK);
    assert_eq!(&whole[64 * BLOCK..128 * BLOCK], &pattern(1, 64)[..]);
    assert_eq!(whole, read_lu(&client, 5, 0, 256).await);
    client.flush(3).await.expect("flush");
    node.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_range_and_checksum_range() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = start_array(
        dir.path(),
        harness::small_array(4 << 20),
        ArrayTestHooks::default(),
    )
    .await;
    let client = array_client(&node.url());
    // Origin diverges from mate in two places; copy only one of them.
    write(&client, 1, 5, pattern(7, 3)).await.expect("write");
    write(&client, 1, 900, pattern(8, 1)).await.expect("write");
    assert_ne!(lu_digests(&client, 1).await, lu_digests(&client, 2).await);
    let copied = client.copy_range(1, 2, 0, 600).await.expect("copy");
    assert_eq!(copied, 600);
    assert_eq!(read_lu(&client, 2, 5, 3).await, pattern(7, 3));
    let origin = lu_digests(&client, 1).await;
    let mate = lu_digests(&client, 2).await;
    assert_eq!(origin.len(), 4);
    assert_eq!(origin[..3], mate[..3]);
    assert_ne!(origin[3], mate[3], "block 900 was not copied");

    // Digests are BLAKE3 of each chunk, checked against an independent hash
    // of the file; the last chunk may be short.
    let file = std::fs::read(dir.path().join("lu1.img")).expect("file");
    let sums = client.checksums(1, 4, 10, 4).await.expect("checksum");
    let expected: Vec<[u8; 32]> = [(4, 8), (8, 12), (12, 14)]
        .iter()
        .map(|&(a, b)| *blake3::hash(&file[a * BLOCK..b * BLOCK]).as_bytes())
        .collect();
    assert_eq!(sums, expected);
    node.shutdown().await.expect("shutdown");
}

/// A request that must fail, the code it must fail with, and no byte of any
/// LU may change. Sent raw: the point is the server's answer to requests a
/// typed client would refuse to build or would split (an empty write, a
/// write over the limit), down to the exact gRPC code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_right_code_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = harness::small_array(1 << 20);
    config.lus.push(RealLuConfig {
        id: 6,
        block_size_bytes: 512,
        block_count: 2048,
    });
    config.lus.push(RealLuConfig {
        id: 7,
        block_size_bytes: 4096,
        block_count: 128,
    });
    // Plain LUs are reachable only through a grant (LUN masking): the
    // client acts as db-server.
    for lu in [6, 7] {
        config.grants.push(array_node::access::GrantConfig {
            identity: splitmirror_proto::security::role::DB.into(),
            lu,
            access: array_node::Access::ReadWrite,
        });
    }
    let node = start_array(dir.path(), config, ArrayTestHooks::default()).await;
    let client = array_client(&node.url());
    write(&client, 0, 0, pattern(9, 256)).await.expect("fill");
    let lus = [1, 2, 4, 5, 6, 7];
    let mut before = Vec::new();
    for lu in lus {
        before.push(lu_digests(&client, lu).await);
    }

    let w = |lu: u32, lba: u64, bytes: usize| pb::WriteRequest {
        lu,
        lba,
        data: vec![0xAB; bytes],
        fua: true,
    };
    let r = |lu: u32, lba: u64, blocks: u64| pb::ReadRequest { lu, lba, blocks };
    let c = |src_lu: u32, dst_lu: u32, lba: u64, blocks: u64| pb::CopyRangeRequest {
        src_lu,
        dst_lu,
        lba,
        blocks,
        min_bytes_per_s: None,
    };
    let s = |lu: u32, lba: u64, blocks: u64, chunk_blocks: u64| pb::ChecksumRangeRequest {
        lu,
        lba,
        blocks,
        chunk_blocks,
    };
    enum Call {
        Write(pb::WriteRequest),
        Read(pb::ReadRequest),
        Copy(pb::CopyRangeRequest),
        Sum(pb::ChecksumRangeRequest),
        Sense(u32),
        Flush(u32),
    }
    use Call::*;
    let cases: Vec<(&str, Call, Code)> = vec![
        (
            "write at the end",
            Write(w(0, 256, BLOCK)),
            Code::OutOfRange,
        ),
        (
            "write past the end",
            Write(w(0, 255, 2 * BLOCK)),
            Code::OutOfRange,
        ),
        (
            "write far past the end",
            Write(w(1, u64::MAX, BLOCK)),
            Code::OutOfRange,
        ),
        ("write of no data", Write(w(0, 0, 0)), Code::InvalidArgument),
        (
            "write of a partial block",
            Write(w(0, 0, 100)),
            Code::InvalidArgument,
        ),
        (
            "write of a block and a bit",
            Write(w(2, 0, BLOCK + 512)),
            Code::InvalidArgument,
        ),
        (
            "write to an unknown LU",
            Write(w(42, 0, BLOCK)),
            Code::NotFound,
        ),
        (
            "write over the size limit",
            Write(w(0, 0, 17 << 20)),
            Code::ResourceExhausted,
        ),
        ("read at the end", Read(r(0, 256, 1)), Code::OutOfRange),
        ("read past the end", Read(r(1, 200, 57)), Code::OutOfRange),
        (
            "read overflowing u64",
            Read(r(1, 1, u64::MAX)),
            Code::OutOfRange,
        ),
        (
            "read of zero blocks",
            Read(r(1, 0, 0)),
            Code::InvalidArgument,
        ),
        ("read of an unknown LU", Read(r(9, 0, 1)), Code::NotFound),
        (
            "copy between geometries",
            Copy(c(1, 6, 0, 1)),
            Code::InvalidArgument,
        ),
        (
            "copy between sizes",
            Copy(c(7, 1, 0, 1)),
            Code::InvalidArgument,
        ),
        (
            "copy onto itself",
            Copy(c(1, 1, 0, 1)),
            Code::InvalidArgument,
        ),
        (
            "copy into its own mirror",
            Copy(c(1, 0, 0, 1)),
            Code::InvalidArgument,
        ),
        ("copy past the end", Copy(c(1, 2, 250, 7)), Code::OutOfRange),
        (
            "copy overflowing u64",
            Copy(c(1, 2, 2, u64::MAX - 1)),
            Code::OutOfRange,
        ),
        (
            "copy of zero blocks",
            Copy(c(1, 2, 0, 0)),
            Code::InvalidArgument,
        ),
        (
            "copy from an unknown LU",
            Copy(c(8, 2, 0, 1)),
            Code::NotFound,
        ),
        (
            "checksum in zero-block chunks",
            Sum(s(1, 0, 8, 0)),
            Code::InvalidArgument,
        ),
        (
            "checksum chunk over the limit",
            Sum(s(6, 0, 8, 1 << 30)),
            Code::ResourceExhausted,
        ),
        (
            "checksum past the end",
            Sum(s(1, 0, 257, 1)),
            Code::OutOfRange,
        ),
        ("mode sense of an unknown LU", Sense(77), Code::NotFound),
        ("flush of an unknown LU", Flush(77), Code::NotFound),
    ];
    let typed = client.clone();
    let mut raw = client.raw();
    for (name, call, expected) in cases {
        let client = &mut raw;
        let result = match call {
            Write(request) => client.write(request).await.map(drop),
            Read(request) => client.read(request).await.map(drop),
            Copy(request) => client.copy_range(request).await.map(drop),
            Sum(request) => client.checksum_range(request).await.map(drop),
            Sense(lu) => client
                .mode_sense(pb::ModeSenseRequest { lu })
                .await
                .map(drop),
            Flush(lu) => client.flush(pb::FlushRequest { lu }).await.map(drop),
        };
        let status = result.expect_err(name);
        assert_eq!(status.code(), expected, "{name}: {}", status.message());
        assert!(!status.message().is_empty(), "{name}: the error says why");
        for (lu, digests) in lus.iter().zip(&before) {
            assert_eq!(
                &lu_digests(&typed, *lu).await,
                digests,
                "{name} changed LU {lu}"
            );
        }
    }
    // The next valid request still works.
    write(&client, 0, 255, pattern(4, 1))
        .await
        .expect("valid write after bad ones");
    assert_eq!(read_lu(&client, 2, 255, 1).await, pattern(4, 1));
    node.shutdown().await.expect("shutdown");
}
