//! What every scenario needs: nodes on ephemeral ports (in-process or as
//! processes), the shared typed clients, seeds.
//!
//! Normal calls go through `splitmirror_proto::client`; a test that must
//! send what those never would uses the client's `raw()`.
//!
//! Every node and client of a test process uses mutual TLS, as in
//! production: [`certs_dir`] holds one CA and the four roles' certificates
//! for the whole process, in-process nodes get their role's, processes get
//! `SPLITMIRROR_TLS_DIR` ([`command`]), and the clients act as the role a
//! test plays: the array's client as db-server (the identity that may read
//! and write every LU of the pairs), the others as the console.

use std::path::Path;
use std::time::Duration;

use array_node::{ArrayConfig, ArrayTestHooks};
use splitmirror_console::cluster::{self, Credentials, DbOptions};
use splitmirror_proto::backup::v1 as bpb;
use splitmirror_proto::db::v1 as dpb;
use splitmirror_proto::node::NodeHandle;
use splitmirror_proto::security::{Security, role};

pub use splitmirror_proto::client::{ArrayClient, BackupClient, ClientError, DbClient, ErrorKind};

/// Starts an array node over `data_dir` on an ephemeral loopback port
/// (through the console's cluster builder, as the demo and the benchmarks
/// do).
pub async fn start_array(data_dir: &Path, array: ArrayConfig, hooks: ArrayTestHooks) -> NodeHandle {
    cluster::start_array(data_dir, array, hooks, &security(role::ARRAY))
        .await
        .expect("start array node")
}

/// The directory of this test process's certificates, created at the
/// first call: a CA and the four roles' certificates (as `console certs
/// init` writes them), plus two that must be refused at the handshake:
/// `expired` (the console's identity, from this CA, valid only in 2000)
/// and `other-ca` (db-server's identity, from another CA).
pub fn certs_dir() -> &'static Path {
    use splitmirror_console::certs::{self, Authority, Validity};
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("splitmirror-test-certs-")
            .tempdir()
            .expect("temporary directory for certificates");
        let ca = Authority::new(certs::CA_COMMON_NAME).expect("a CA");
        std::fs::write(
            certs::cert_path(dir.path(), certs::CA_NAME),
            ca.ca_cert_pem(),
        )
        .expect("writing ca.pem");
        for role in certs::ROLES {
            ca.issue(role, &[], Validity::default())
                .and_then(|issued| issued.write(dir.path(), role))
                .unwrap_or_else(|e| panic!("the {role} certificate: {e}"));
        }
        ca.issue(role::CONSOLE, &[], Validity::long_expired())
            .and_then(|issued| issued.write(dir.path(), "expired"))
            .expect("the expired certificate");
        Authority::new("another CA")
            .and_then(|other| other.issue(role::DB, &[], Validity::default()))
            .and_then(|issued| issued.write(dir.path(), "other-ca"))
            .expect("the other CA's certificate");
        dir
    })
    .path()
}

/// The certificates every node and client of this test process uses.
pub fn credentials() -> Credentials {
    Credentials::Certificates(certs_dir().to_path_buf())
}

/// The security of the program of `role` (`security::role::*`).
pub fn security(role: &str) -> Security {
    credentials()
        .security(role)
        .unwrap_or_else(|e| panic!("the {role} certificate: {e}"))
}

/// A command running one of the workspace's binaries with this process's
/// certificates (`SPLITMIRROR_TLS_DIR`; each program takes its role's).
pub fn command(binary_name: &str) -> std::process::Command {
    let mut command = std::process::Command::new(binary(binary_name));
    command.env("SPLITMIRROR_TLS_DIR", certs_dir());
    command
}

/// grpcurl's arguments for mutual TLS as `identity` (`-cacert`, `-cert`,
/// `-key`), as the README shows them.
pub fn grpcurl_tls_args(identity: &str) -> Vec<String> {
    let dir = certs_dir();
    let path = |file: String| dir.join(file).to_string_lossy().into_owned();
    vec![
        "-cacert".into(),
        path("ca.pem".into()),
        "-cert".into(),
        path(format!("{identity}.pem")),
        "-key".into(),
        path(format!("{identity}.key")),
    ]
}

/// Waits (bounded) until the node of `server_role` answers its health
/// check.
pub async fn wait_healthy(url: &str, server_role: &str) {
    cluster::wait_healthy("node", url, &security(role::CONSOLE), server_role)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

/// A client of the array at `url` (connecting at its first call), as
/// db-server: the identity that may read and write every LU of the pairs.
pub fn array_client(url: &str) -> ArrayClient {
    ArrayClient::new(url, &security(role::DB)).expect("array address")
}

/// Plain text, no masking: for the tests of the writable snapshot virtual
/// LU (DESIGN §3), which only an array without LUN masking lets db-server
/// write (with masking the mate is read-only while a snapshot is held; see
/// `db_control`). Their nodes run `--insecure` and their clients use this.
pub const INSECURE: Security = Security::Insecure;

/// Starts an array node with `security` (see [`start_array`]).
pub async fn start_array_with(
    data_dir: &Path,
    array: ArrayConfig,
    hooks: ArrayTestHooks,
    security: &Security,
) -> NodeHandle {
    cluster::start_array(data_dir, array, hooks, security)
        .await
        .expect("start array node")
}

/// A client of db-server at `url` (connecting at its first call), as the
/// console.
pub fn db_client(url: &str) -> DbClient {
    DbClient::new(url, &security(role::CONSOLE)).expect("db-server address")
}

/// A client of the backup server at `url` (connecting at its first call),
/// as the console.
pub fn backup_client(url: &str) -> BackupClient {
    BackupClient::new(url, &security(role::CONSOLE)).expect("backup server address")
}

/// Reads blocks of an LU through the array.
pub async fn read_lu(client: &ArrayClient, lu: u32, lba: u64, blocks: u64) -> Vec<u8> {
    client.read(lu, lba, blocks).await.expect("read")
}

/// BLAKE3 digests of a whole LU in 256-block chunks.
pub async fn lu_digests(client: &ArrayClient, lu: u32) -> Vec<[u8; 32]> {
    let page = client.mode_sense(lu).await.expect("mode sense");
    client
        .checksums(lu, 0, page.block_count, 256)
        .await
        .expect("checksum")
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

/// Starts a db-server against the array at `array_url`, and waits until
/// every pair is Synchronized (a first start compares origin and mate of
/// each; tests start from Synchronized pairs).
pub async fn start_db(
    array_url: &str,
    data_dir: &Path,
    manager: db_server::manager::ManagerConfig,
    ledger: Option<db_server::ledger::LedgerConfig>,
) -> NodeHandle {
    let handle = start_db_with(array_url, data_dir, manager, ledger, &security(role::DB)).await;
    wait_all_synchronized(&db_client(&handle.url())).await;
    handle
}

/// [`start_db`] with `security` (it does not wait for the pairs: the
/// caller's clients must match `security`).
pub async fn start_db_with(
    array_url: &str,
    data_dir: &Path,
    manager: db_server::manager::ManagerConfig,
    ledger: Option<db_server::ledger::LedgerConfig>,
    security: &Security,
) -> NodeHandle {
    let options = DbOptions {
        manager,
        ledger,
        ..DbOptions::default()
    };
    cluster::start_db(array_url, data_dir, &options, security)
        .await
        .expect("start db-server")
}

/// Waits (bounded) until every volume db-server knows is Synchronized.
pub async fn wait_all_synchronized(client: &DbClient) {
    let volumes: Vec<u32> = client
        .status(false)
        .await
        .expect("status")
        .volumes
        .iter()
        .map(|v| v.volume)
        .collect();
    for volume in volumes {
        wait_synchronized(client, volume).await;
    }
}

/// The status of one volume.
pub async fn volume_status(client: &DbClient, volume: u32) -> dpb::VolumeStatus {
    client.volume_status(volume).await.expect("volume status")
}

/// Waits (bounded) until the volume is Synchronized.
pub async fn wait_synchronized(client: &DbClient, volume: u32) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let status = volume_status(client, volume).await;
        if status.data_mode() == dpb::Mode::Synchronized {
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
    client: &DbClient,
    volume: u32,
    target: dpb::VirtualLu,
    lba: u64,
    blocks: u64,
) -> Vec<u8> {
    client
        .read(volume, target, lba, blocks)
        .await
        .expect("volume read")
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
        access: Default::default(),
        grants: Vec::new(),
    }
}

/// The workspace's binaries that tests run as processes.
const WORKSPACE_BINARIES: [&str; 5] = [
    "array-node",
    "db-server",
    "backup-server",
    "console",
    "soak",
];

/// Path of one of the workspace's binaries, built with the same profile as
/// this test binary. The first call in a test process runs `cargo build
/// --workspace --bins` (nothing to do when they are up to date): built with
/// the whole workspace, the nodes get the `testing` features this package
/// turns on, which the canaries' `--unsafe-test-*` flags and the crash
/// points need — a binary left by a root `cargo build` has none.
///
/// The binaries are then hard-linked into `<profile>/test-bins/` and run
/// from there: the compose test's `docker/build-image.sh` runs a root
/// `cargo build` while other tests run, and that relinks
/// `<profile>/db-server` to a build without the `testing` features (CI
/// once ran a crash-point test against it, and the crash never came). A
/// hard link keeps the file this process built whatever cargo relinks
/// later.
pub fn binary(name: &str) -> std::path::PathBuf {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("test binary path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>/deps/<test>");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = std::process::Command::new(cargo);
        build.args(["build", "--workspace", "--bins"]);
        if profile_dir.ends_with("release") {
            build.arg("--release");
        }
        let status = build.status().expect("run cargo build");
        assert!(status.success(), "building the workspace's binaries failed");
        let dir = profile_dir.join("test-bins");
        std::fs::create_dir_all(&dir).expect("creating <profile>/test-bins");
        for name in WORKSPACE_BINARIES {
            let (from, to) = (profile_dir.join(name), dir.join(name));
            // A running test process keeps its own inode: replacing the
            // link never changes a binary that is running.
            let _ = std::fs::remove_file(&to);
            std::fs::hard_link(&from, &to)
                .or_else(|_| std::fs::copy(&from, &to).map(drop))
                .unwrap_or_else(|e| {
                    panic!("linking {} into {}: {e}", from.display(), dir.display())
                });
        }
        dir
    })
    .join(name)
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
        let mut command = command(binary_name);
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

/// Starts `array-node` as a process serving the default two pairs of
/// `lu_size` LUs (e.g. "4MiB") from `data_dir`, listening on `listen`
/// ("127.0.0.1:0" for an ephemeral port; a fixed address to restart it
/// where clients already point).
pub fn array_process(data_dir: &Path, lu_size: &str, listen: &str) -> NodeProcess {
    NodeProcess::start(
        "array-node",
        &[
            "--listen",
            listen,
            "--data-dir",
            data_dir.to_str().expect("utf-8 path"),
            "--lu-size",
            lu_size,
        ],
    )
}

/// The plain LU a save area lives on in the arrays of
/// [`save_area_array_toml`] (in no mirror; db-server may read and write it).
pub const SAVE_AREA_LU: u32 = crate::soak::cluster::SAVE_AREA_LU;

/// An array config (TOML, for `array-node --config`) of the default two
/// pairs of `lu_size_bytes` LUs of 4096-byte blocks (mirror 0 = 1 + 2,
/// mirror 3 = 4 + 5) and the plain LUs [`SAVE_AREA_LU`] and 21 of
/// `save_area_blocks` blocks of the same size, which db-server may read
/// and write: save areas for the volumes' copy-on-write snapshots
/// (`db-server --save-area 0=20 --save-area 3=21`). The soak's cluster
/// uses the same.
pub fn save_area_array_toml(lu_size_bytes: u64, save_area_blocks: u64) -> String {
    crate::soak::cluster::save_area_array_toml(lu_size_bytes, save_area_blocks)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// `db-server --save-area` for volume 0 on [`SAVE_AREA_LU`].
pub const SAVE_AREA_ARGS: [&str; 2] = ["--save-area", "0=20"];

/// `db-server --save-area` for volume 3 on the config's second plain LU
/// (21): with [`SAVE_AREA_ARGS`], every volume has one, as
/// `--snapshot-method cow` needs.
pub const SECOND_SAVE_AREA_ARGS: [&str; 2] = ["--save-area", "3=21"];

/// Starts `array-node` as a process serving [`save_area_array_toml`]
/// from `data_dir` (the config is written beside it), listening on
/// `listen`.
pub fn array_process_with_save_area(
    data_dir: &Path,
    lu_size_bytes: u64,
    save_area_blocks: u64,
    listen: &str,
) -> NodeProcess {
    std::fs::create_dir_all(data_dir).expect("creating the array's directory");
    let config = data_dir.with_extension("toml");
    std::fs::write(
        &config,
        save_area_array_toml(lu_size_bytes, save_area_blocks),
    )
    .expect("writing the array config");
    NodeProcess::start(
        "array-node",
        &[
            "--listen",
            listen,
            "--data-dir",
            data_dir.to_str().expect("utf-8 path"),
            "--config",
            config.to_str().expect("utf-8 path"),
        ],
    )
}

/// Starts `db-server` as a process on an ephemeral port, against the
/// array at `array`, its journal in `data_dir`, with `extra` arguments
/// (e.g. `--no-ledger`) and `env` (e.g. a crash point).
pub fn db_process(
    data_dir: &Path,
    array: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> NodeProcess {
    db_process_at("127.0.0.1:0", data_dir, array, extra, env)
}

/// [`db_process`] listening on `listen`: a fixed address to restart it
/// where clients (and a backup server's `--db`) already point.
pub fn db_process_at(
    listen: &str,
    data_dir: &Path,
    array: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> NodeProcess {
    let mut args = vec![
        "--listen",
        listen,
        "--array",
        array,
        "--data-dir",
        data_dir.to_str().expect("utf-8 path"),
    ];
    args.extend(extra);
    NodeProcess::start_with_env("db-server", &args, env)
}

pub use backup_server::store::{DEFAULT_GC_GRACE, StoreLocation};
/// A db-server address for backup servers of tests that start none: only
/// live backups, which never ask it, can succeed there.
pub use splitmirror_console::cluster::NO_DB;

/// Starts a backup-server in-process, reading from the array at
/// `array_url` and confirming snapshots with the db-server at `db_url`
/// (tests of live backups alone may pass [`NO_DB`]).
pub async fn start_backup(array_url: &str, db_url: &str, store: &Path) -> NodeHandle {
    start_backup_at(
        array_url,
        db_url,
        &StoreLocation::Dir(store.to_path_buf()),
        DEFAULT_GC_GRACE,
    )
    .await
}

/// [`start_backup`] with its chunk store anywhere (a directory or an S3
/// bucket) and its garbage-collection grace period.
pub async fn start_backup_at(
    array_url: &str,
    db_url: &str,
    store: &StoreLocation,
    gc_grace: std::time::Duration,
) -> NodeHandle {
    cluster::start_backup(
        array_url,
        db_url,
        store,
        gc_grace,
        None,
        &security(role::BACKUP),
    )
    .await
    .expect("start backup-server")
}

/// Follows a backup until it ends and answers its last progress.
pub async fn follow_backup(client: &BackupClient, backup_id: &str) -> bpb::BackupProgress {
    use futures_util::StreamExt;
    let mut stream = client.watch_backup(backup_id).await.expect("watch backup");
    let mut last = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while let Some(progress) = tokio::time::timeout_at(deadline, stream.next())
        .await
        .expect("backup ended in time")
    {
        last = Some(progress.expect("progress"));
    }
    last.expect("at least one progress message")
}

/// Starts `backup-server` as a process listening on `listen`, reading
/// from (and, for a restore, writing to) the array at `array`, confirming
/// with the db-server at `db`, its chunk store the directory `store`, with
/// `env` (e.g. a crash point).
pub fn backup_process(
    listen: &str,
    store: &Path,
    array: &str,
    db: &str,
    env: &[(&str, &str)],
) -> NodeProcess {
    NodeProcess::start_with_env(
        "backup-server",
        &[
            "--listen",
            listen,
            "--array",
            array,
            "--db",
            db,
            "--store",
            store.to_str().expect("utf-8 path"),
        ],
        env,
    )
}

/// The chunk size of the store and of the array's digests a restore
/// compares: 1 MiB.
pub const CHUNK_BYTES: u64 = backup_server::store::CHUNK_SIZE_BYTES;

/// The BLAKE3 digest of every 1 MiB chunk of a whole LU, by the array's
/// `ChecksumRange`: exactly the digests a backup's manifest lists for the
/// same bytes.
pub async fn chunk_digests(client: &ArrayClient, lu: u32) -> Vec<[u8; 32]> {
    let page = client.mode_sense(lu).await.expect("mode sense");
    let chunk_blocks = CHUNK_BYTES / u64::from(page.block_size_bytes);
    client
        .checksums(lu, 0, page.block_count, chunk_blocks)
        .await
        .unwrap_or_else(|e| panic!("the chunk digests of LU {lu}: {e}"))
}

/// Follows a restore job until it ends and answers its last progress.
pub async fn follow_restore(client: &BackupClient, run_id: &str) -> bpb::RestoreProgress {
    use futures_util::StreamExt;
    let mut stream = client
        .watch_restore(run_id)
        .await
        .unwrap_or_else(|e| panic!("watching restore run {run_id}: {e}"));
    let mut last = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while let Some(progress) = tokio::time::timeout_at(deadline, stream.next())
        .await
        .expect("restore ended in time")
    {
        last = Some(progress.expect("restore progress"));
    }
    last.expect("at least one restore progress message")
}
