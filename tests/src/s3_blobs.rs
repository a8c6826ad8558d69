//! The S3 object backend of the chunk store (`backup_server::s3::S3Blobs`)
//! against a real S3 server (s3s-fs, [`crate::s3_server`]): objects under
//! a prefix, multipart uploads, prefixes kept apart, and the errors a
//! backup job acts on (wrong credentials, nothing listening, a missing
//! key). The bucket's directory is the independent oracle: an object `K`
//! of a store with prefix `P` is the file `BUCKET/P/K`.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use backup_server::blobs::{BlobError, Blobs};
use backup_server::s3::{self, S3Args, S3Blobs, S3Credentials};

use crate::s3_server::S3Server;

fn keys(listed: &[backup_server::blobs::ObjectMeta]) -> Vec<&str> {
    listed.iter().map(|m| m.key.as_str()).collect()
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64
}

#[tokio::test]
async fn objects_under_a_prefix_put_get_list_and_delete() {
    let Some(server) = S3Server::start() else {
        return;
    };
    let blobs = s3::connect(server.bucket(), "site-a/db/", &server.args()).expect("connect");
    assert_eq!(
        blobs.location(),
        format!("s3://{}/site-a/db", server.bucket())
    );

    let before_ms = now_unix_ms();
    blobs
        .put("chunks/0a1/0a1b2c", vec![1, 2, 3])
        .await
        .expect("put a chunk");
    blobs
        .put("chunks/0a2/0a2fff", vec![4; 1000])
        .await
        .expect("put a chunk");
    blobs
        .put("indexes/vol-1/0001.json", b"{}".to_vec())
        .await
        .expect("put an index");

    assert_eq!(
        blobs.get("chunks/0a1/0a1b2c").await.expect("get"),
        vec![1, 2, 3]
    );
    // The oracle: the object is the file BUCKET/PREFIX/KEY.
    assert_eq!(
        std::fs::read(server.bucket_dir().join("site-a/db/chunks/0a2/0a2fff")).expect("file"),
        vec![4; 1000]
    );

    let chunks = blobs.list("chunks/").await.expect("list chunks/");
    assert_eq!(keys(&chunks), ["chunks/0a1/0a1b2c", "chunks/0a2/0a2fff"]);
    assert_eq!(chunks[0].size_bytes, 3);
    assert_eq!(chunks[1].size_bytes, 1000);
    for meta in &chunks {
        // S3's Last-Modified has second precision.
        assert!(
            meta.modified_unix_ms + 2_000 >= before_ms
                && meta.modified_unix_ms <= now_unix_ms() + 2_000,
            "{meta:?} was not written just now ({before_ms})"
        );
    }
    assert_eq!(
        keys(&blobs.list("chunks/0a1/").await.expect("list")),
        ["chunks/0a1/0a1b2c"]
    );
    assert_eq!(
        keys(&blobs.list("indexes/").await.expect("list")),
        ["indexes/vol-1/0001.json"]
    );
    assert!(blobs.list("nothing/").await.expect("list").is_empty());

    // A put replaces the object whole.
    blobs
        .put("chunks/0a1/0a1b2c", vec![9, 9])
        .await
        .expect("replace");
    assert_eq!(
        blobs.get("chunks/0a1/0a1b2c").await.expect("get"),
        vec![9, 9]
    );

    blobs.delete("chunks/0a1/0a1b2c").await.expect("delete");
    blobs
        .delete("chunks/0a1/0a1b2c")
        .await
        .expect("deleting a missing object is not an error");
    assert_eq!(
        keys(&blobs.list("chunks/").await.expect("list")),
        ["chunks/0a2/0a2fff"]
    );
}

#[tokio::test]
async fn a_large_object_goes_up_in_parts_and_reads_back_equal() {
    let Some(server) = S3Server::start() else {
        return;
    };
    let blobs = s3::connect(server.bucket(), "big", &server.args()).expect("connect");
    // 40 MiB and a bit: above the multipart threshold, with a short last
    // part.
    let size_bytes = 40 * 1024 * 1024 + 12_345;
    assert!(size_bytes > s3::MULTIPART_THRESHOLD_BYTES);
    let data: Vec<u8> = (0..size_bytes as u64)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let digest = blake3::hash(&data);
    let started = Instant::now();
    blobs
        .put("chunks/large", data)
        .await
        .expect("multipart put");
    eprintln!("40 MiB multipart put to s3s-fs: {:?}", started.elapsed());

    let read = blobs.get("chunks/large").await.expect("get");
    assert_eq!(read.len(), size_bytes);
    assert_eq!(blake3::hash(&read), digest, "read back differs");
    let file = std::fs::read(server.bucket_dir().join("big/chunks/large")).expect("file");
    assert_eq!(blake3::hash(&file), digest, "the stored file differs");
    let listed = blobs.list("chunks/").await.expect("list");
    assert_eq!(keys(&listed), ["chunks/large"]);
    assert_eq!(listed[0].size_bytes, size_bytes as u64);
}

#[tokio::test]
async fn a_listing_never_shows_another_prefix() {
    let Some(server) = S3Server::start() else {
        return;
    };
    let site = s3::connect(server.bucket(), "site", &server.args()).expect("connect");
    // A prefix that starts with the other's name: "site2/" is not below
    // "site/".
    let site2 = s3::connect(server.bucket(), "site2", &server.args()).expect("connect");
    let root = s3::connect(server.bucket(), "", &server.args()).expect("connect");
    site.put("chunks/a", vec![1]).await.expect("put");
    site2.put("chunks/b", vec![2]).await.expect("put");
    site2.put("chunksX/c", vec![3]).await.expect("put");

    assert_eq!(
        keys(&site.list("chunks/").await.expect("list")),
        ["chunks/a"]
    );
    assert_eq!(
        keys(&site2.list("chunks/").await.expect("list")),
        ["chunks/b"]
    );
    assert!(matches!(
        site.get("chunks/b").await,
        Err(BlobError::NotFound(_))
    ));
    // The bucket's root sees both, with their prefixes.
    assert_eq!(
        keys(&root.list("site/").await.expect("list")),
        ["site/chunks/a"]
    );
    assert_eq!(
        keys(&root.list("site2/").await.expect("list")),
        ["site2/chunks/b", "site2/chunksX/c"]
    );
}

/// Wrong credentials are refused with 403 by s3s-fs (SignatureDoesNotMatch
/// for a wrong secret, InvalidAccessKeyId for an unknown key): every
/// operation says PermissionDenied, none says Failed or Unavailable.
#[tokio::test]
async fn wrong_credentials_are_permission_denied() {
    let Some(server) = S3Server::start() else {
        return;
    };
    let good = s3::connect(server.bucket(), "p", &server.args()).expect("connect");
    good.put("chunks/a", vec![1]).await.expect("put");
    let with = |access_key_id: &str, secret_access_key: String| S3Args {
        credentials: Some(S3Credentials {
            access_key_id: access_key_id.into(),
            secret_access_key,
            session_token: None,
        }),
        ..server.args()
    };
    for (what, args) in [
        (
            "a wrong secret",
            with(
                server.access_key(),
                format!("{}-wrong", server.secret_key()),
            ),
        ),
        (
            "an unknown access key",
            with("nobody", server.secret_key().to_string()),
        ),
    ] {
        let bad = s3::connect(server.bucket(), "p", &args).expect("connect");
        let put = bad.put("chunks/b", vec![2]).await;
        let get = bad.get("chunks/a").await;
        let list = bad.list("chunks/").await.map(|_| ());
        let delete = bad.delete("chunks/a").await;
        for (operation, result) in [
            ("put", put),
            ("get", get.map(|_| ())),
            ("list", list),
            ("delete", delete),
        ] {
            assert!(
                matches!(result, Err(BlobError::PermissionDenied { .. })),
                "{operation} with {what}: {result:?}"
            );
        }
    }
    assert_eq!(good.get("chunks/a").await.expect("still there"), vec![1]);
    assert_eq!(
        keys(&good.list("chunks/").await.expect("list")),
        ["chunks/a"]
    );
}

/// A backup job whose store does not answer must fail promptly with
/// UNAVAILABLE, not after minutes of retries.
#[tokio::test]
async fn an_endpoint_where_nothing_listens_is_unavailable_within_30_s() {
    // This test needs no S3 server: only a port where nothing listens.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("probe a free port");
    let args = S3Args {
        endpoint: Some(format!("http://{addr}")),
        credentials: Some(S3Credentials {
            access_key_id: "k".into(),
            secret_access_key: "s".into(),
            session_token: None,
        }),
        ..Default::default()
    };
    let blobs = S3Blobs::connect("bucket", "p", &args).expect("connect sends nothing");
    let started = Instant::now();
    let put = blobs.put("chunks/a", vec![1]).await;
    let elapsed = started.elapsed();
    eprintln!("put to a closed port failed after {elapsed:?}: {put:?}");
    assert!(matches!(put, Err(BlobError::Unavailable { .. })), "{put:?}");
    assert!(elapsed < Duration::from_secs(30), "took {elapsed:?}");
    let list = blobs.list("chunks/").await;
    assert!(
        matches!(list, Err(BlobError::Unavailable { .. })),
        "{list:?}"
    );
}

#[tokio::test]
async fn a_missing_key_is_not_found() {
    let Some(server) = S3Server::start() else {
        return;
    };
    let blobs = s3::connect(server.bucket(), "p", &server.args()).expect("connect");
    let got = blobs.get("chunks/never-written").await;
    assert!(
        matches!(&got, Err(BlobError::NotFound(key)) if key == "chunks/never-written"),
        "{got:?}"
    );
    // A bucket that does not exist is a configuration error, not an
    // empty store.
    let nowhere = s3::connect("no-such-bucket", "p", &server.args()).expect("connect");
    let list = nowhere.list("chunks/").await;
    assert!(matches!(list, Err(BlobError::Failed { .. })), "{list:?}");
}
