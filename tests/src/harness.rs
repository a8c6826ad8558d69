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

pub type DbClient = splitmirror_proto::db::v1::db_service_client::DbServiceClient<Channel>;

/// Starts a db-server against the array at `array_url`.
pub async fn start_db(
    array_url: &str,
    data_dir: &Path,
    manager: db_server::manager::ManagerConfig,
    ledger: Option<db_server::ledger::LedgerConfig>,
) -> NodeHandle {
    let listener = node::bind("127.0.0.1:0").await.expect("bind loopback");
    let config = db_server::DbServerConfig {
        array_url: array_url.to_string(),
        data_dir: data_dir.to_path_buf(),
        manager,
        ledger,
        journal_region_bytes: Some(db_server::DEFAULT_JOURNAL_REGION_BYTES),
        array_wait: Some(db_server::DEFAULT_ARRAY_WAIT),
        max_suspend_lease: db_server::gate::DEFAULT_MAX_LEASE,
    };
    let handle = db_server::spawn(config, listener)
        .await
        .expect("start db-server");
    wait_healthy(&handle.url()).await;
    // A first start compares origin and mate of every pair (no journal
    // knew them); tests start from Synchronized pairs.
    let mut client = db_client(&handle.url()).await;
    let volumes: Vec<u32> = client
        .status(splitmirror_proto::db::v1::StatusRequest::default())
        .await
        .expect("status")
        .into_inner()
        .volumes
        .iter()
        .map(|v| v.volume)
        .collect();
    for volume in volumes {
        wait_synchronized(&mut client, volume).await;
    }
    handle
}

pub async fn db_client(url: &str) -> DbClient {
    let channel = node::endpoint(url)
        .expect("endpoint")
        .connect()
        .await
        .expect("connect to db-server");
    DbClient::new(channel)
        .max_decoding_message_size(node::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(node::MAX_MESSAGE_BYTES)
}

/// The status of one volume.
pub async fn volume_status(
    client: &mut DbClient,
    volume: u32,
) -> splitmirror_proto::db::v1::VolumeStatus {
    client
        .status(splitmirror_proto::db::v1::StatusRequest::default())
        .await
        .expect("status")
        .into_inner()
        .volumes
        .into_iter()
        .find(|v| v.volume == volume)
        .expect("volume in status")
}

/// Waits (bounded) until the volume is Synchronized.
pub async fn wait_synchronized(client: &mut DbClient, volume: u32) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let status = volume_status(client, volume).await;
        if status.data_mode() == splitmirror_proto::db::v1::Mode::Synchronized {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "volume {volume} not synchronized: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Reads a volume's virtual LU through db-server.
pub async fn read_volume(
    client: &mut DbClient,
    volume: u32,
    target: splitmirror_proto::db::v1::VirtualLu,
    lba: u64,
    blocks: u64,
) -> Vec<u8> {
    let mut stream = client
        .read(splitmirror_proto::db::v1::VolumeReadRequest {
            volume,
            target: target.into(),
            lba,
            blocks,
        })
        .await
        .expect("volume read")
        .into_inner();
    let mut data = Vec::new();
    while let Some(chunk) = stream.message().await.expect("volume read chunk") {
        data.extend_from_slice(&chunk.data);
    }
    data
}

/// One real pair of 512-byte blocks, for fine-grained model tests:
/// mirror LU 0 = origin 1 + mate 2.
pub fn small_512_pair(block_count: u64) -> ArrayConfig {
    use array_node::config::{MirrorConfig, RealLuConfig};
    let lu = |id| RealLuConfig {
        id,
        block_size_bytes: 512,
        block_count,
    };
    ArrayConfig {
        lus: vec![lu(1), lu(2)],
        mirrors: vec![MirrorConfig {
            mirror: 0,
            origin: 1,
            mate: 2,
        }],
    }
}

/// Path of one of the workspace's binaries, built with the same profile as
/// this test binary (building it first if it is missing).
pub fn binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>");
    let path = profile_dir.join(name);
    if !path.exists() {
        let release = profile_dir.ends_with("release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = std::process::Command::new(cargo);
        build.args(["build", "--bin", name]);
        if release {
            build.arg("--release");
        }
        let status = build.status().expect("run cargo build");
        assert!(status.success(), "building {name} failed");
    }
    path
}

/// A node running as its own process, so that a test can `kill -9` it.
pub struct NodeProcess {
    pub child: std::process::Child,
    pub addr: String,
    /// Everything the process has logged so far.
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// The thread copying stderr into `log`; it ends when the process does.
    drain: Option<std::thread::JoinHandle<()>>,
}

impl NodeProcess {
    /// Starts `binary args…` and waits for its "listening on ADDR" line.
    pub fn start(binary_name: &str, args: &[&str]) -> Self {
        Self::start_with_env(binary_name, args, &[])
    }

    /// The same, with extra environment variables.
    pub fn start_with_env(binary_name: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        use std::io::BufRead;
        let mut command = std::process::Command::new(binary(binary_name));
        command
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env_remove("SPLITMIRROR_CRASH_AT")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting {binary_name}: {e}"));
        let stderr = child.stderr.take().expect("stderr piped");
        let mut lines = std::io::BufReader::new(stderr).lines();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let addr = loop {
            let line = match lines.next() {
                Some(Ok(line)) => line,
                _ => panic!(
                    "{binary_name} exited before listening: {:?}",
                    log.lock().expect("log")
                ),
            };
            log.lock().expect("log").push(line.clone());
            if let Some(rest) = line.split("listening on ").nth(1) {
                break rest
                    .split_whitespace()
                    .next()
                    .expect("an address after 'listening on'")
                    .to_string();
            }
        };
        // Keep draining stderr so the child never blocks on a full pipe.
        let sink = log.clone();
        let drain = std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                sink.lock().expect("log").push(line);
            }
        });
        Self {
            child,
            addr,
            log,
            drain: Some(drain),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Whether some logged line contains `text`.
    pub fn logged(&self, text: &str) -> bool {
        self.log
            .lock()
            .expect("log")
            .iter()
            .any(|l| l.contains(text))
    }

    /// Waits (bounded) until the process exits by itself, as a crash point
    /// makes it.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                // Its last words (a crash point's line) are in the log only
                // once the drain has read stderr to the end.
                if let Some(drain) = self.drain.take() {
                    let _ = drain.join();
                }
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A db-server address for backup servers of tests that start none: only
/// live backups, which never ask it, can succeed there.
pub const NO_DB: &str = "http://127.0.0.1:9";

pub type BackupClient =
    splitmirror_proto::backup::v1::backup_service_client::BackupServiceClient<Channel>;

/// Starts a backup-server in-process, reading from the array at
/// `array_url` and confirming snapshots with the db-server at `db_url`
/// (tests of live backups alone may pass [`NO_DB`]).
pub async fn start_backup(array_url: &str, db_url: &str, store: &Path) -> NodeHandle {
    let listener = node::bind("127.0.0.1:0").await.expect("bind loopback");
    let config = backup_server::BackupServerConfig {
        array_url: array_url.to_string(),
        db_url: db_url.to_string(),
        store_dir: store.to_path_buf(),
        default_max_bytes_per_s: None,
    };
    let handle = backup_server::spawn(config, listener)
        .await
        .expect("start backup-server");
    wait_healthy(&handle.url()).await;
    handle
}

pub async fn backup_client(url: &str) -> BackupClient {
    let channel = node::endpoint(url)
        .expect("endpoint")
        .connect()
        .await
        .expect("connect to backup-server");
    BackupClient::new(channel).max_decoding_message_size(node::MAX_MESSAGE_BYTES)
}

/// Follows a backup until it ends and answers its last progress.
pub async fn follow_backup(
    client: &mut BackupClient,
    backup_id: &str,
) -> splitmirror_proto::backup::v1::BackupProgress {
    let mut stream = client
        .watch_backup(splitmirror_proto::backup::v1::BackupIdRequest {
            backup_id: backup_id.to_string(),
        })
        .await
        .expect("watch backup")
        .into_inner();
    let mut last = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while let Some(progress) = tokio::time::timeout_at(deadline, stream.message())
        .await
        .expect("backup ended in time")
        .expect("progress")
    {
        last = Some(progress);
    }
    last.expect("at least one progress message")
}
