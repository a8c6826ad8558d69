//! The soak's cluster: array-node, db-server and backup-server as real
//! processes on fixed loopback ports in one directory, so that any of them
//! can be killed, paused, restarted on the same address, or have its
//! filesystem filled.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process};

/// Lines of each process's log kept for a violation report.
const LOG_TAIL_LINES: usize = 400;
/// How long a node may take to print its "listening on" line.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The three nodes of the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Node {
    Array,
    Db,
    Backup,
}

impl Node {
    pub const ALL: [Node; 3] = [Node::Array, Node::Db, Node::Backup];

    pub fn binary(self) -> &'static str {
        match self {
            Node::Array => "array-node",
            Node::Db => "db-server",
            Node::Backup => "backup-server",
        }
    }

    /// Its identity in the certificates (the role's name is the binary's).
    pub fn role(self) -> &'static str {
        self.binary()
    }
}

impl std::fmt::Display for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.binary())
    }
}

/// How the cluster is set up.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Size of each LU (the array's default layout: two pairs).
    pub lu_size: String,
    /// The ledger's transactions per second (0 = full speed).
    pub workload_tps: u32,
    /// Caps the resync so that faults land inside it.
    pub resync_max_rate: String,
    /// db-server's resync method: `offload` or `writeback`.
    pub resync_method: String,
    /// Extra flags for db-server (canaries).
    pub db_flags: Vec<String>,
    /// Extra flags for array-node (canaries).
    pub array_flags: Vec<String>,
    /// A save area for volume 0's copy-on-write snapshots: the array then
    /// runs from a config (the default two pairs and the plain LU
    /// [`SAVE_AREA_LU`] of this many blocks, which db-server may write)
    /// and db-server gets `--save-area 0=20`. `None`: the default layout,
    /// no save area.
    pub save_area_blocks: Option<u64>,
}

/// The plain LU of the save area, when the cluster has one.
pub const SAVE_AREA_LU: u32 = 20;
/// A second plain LU of the same size in that config, for volume 3 (the
/// soak does not use it; a db-server with `--snapshot-method cow` needs a
/// save area for every volume).
pub const SECOND_SAVE_AREA_LU: u32 = 21;

/// A node's process and the tail of its log.
struct Process {
    child: Child,
    log: Arc<Mutex<VecDeque<String>>>,
    paused: bool,
    /// Started with a crash point armed (`SPLITMIRROR_CRASH_AT`).
    crash_armed: bool,
}

pub struct Cluster {
    pub dir: PathBuf,
    bin_dir: PathBuf,
    ports: [u16; 3],
    options: ClusterOptions,
    processes: [Option<Process>; 3],
    /// Logs of processes that have ended, newest last.
    past_logs: Vec<(Node, Vec<String>)>,
    /// tmpfs mounts made for the full-filesystem faults (unmounted on drop).
    mounts: Vec<PathBuf>,
}

impl Cluster {
    /// Lays out `dir` (array/, db/, store/) and picks three free ports.
    pub fn new(dir: &Path, options: ClusterOptions) -> Result<Self, String> {
        let bin_dir = binaries_dir()?;
        for node in Node::ALL {
            let path = bin_dir.join(node.binary());
            if !path.exists() {
                return Err(format!(
                    "{} is missing: build the workspace first (cargo build --release --bins)",
                    path.display()
                ));
            }
        }
        for sub in ["array", "db", "store"] {
            std::fs::create_dir_all(dir.join(sub))
                .map_err(|e| format!("creating {}: {e}", dir.join(sub).display()))?;
        }
        if let Some(save_area_blocks) = options.save_area_blocks {
            let lu_size_bytes = splitmirror_proto::units::parse_size_bytes(&options.lu_size)
                .map_err(|e| format!("--lu-size {}: {e}", options.lu_size))?;
            let text = save_area_array_toml(lu_size_bytes, save_area_blocks)?;
            std::fs::write(dir.join("array.toml"), text)
                .map_err(|e| format!("writing the array config: {e}"))?;
        }
        // Mutual TLS between the nodes and for the console, as in
        // production: one CA and the four roles' certificates.
        splitmirror_console::cluster::Credentials::create_in(&dir.join("certs"))
            .map_err(|e| format!("creating the certificates: {e}"))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            bin_dir,
            ports: [free_port()?, free_port()?, free_port()?],
            options,
            processes: [None, None, None],
            past_logs: Vec::new(),
            mounts: Vec::new(),
        })
    }

    pub fn addr(&self, node: Node) -> String {
        format!("127.0.0.1:{}", self.ports[node as usize])
    }

    pub fn url(&self, node: Node) -> String {
        format!("http://{}", self.addr(node))
    }

    pub fn db_dir(&self) -> PathBuf {
        self.dir.join("db")
    }

    pub fn store_dir(&self) -> PathBuf {
        self.dir.join("store")
    }

    /// Where the checks export a backup to read it (outside the store,
    /// which may be a small tmpfs).
    pub fn export_path(&self) -> PathBuf {
        self.dir.join("export.raw")
    }

    pub fn array_dir(&self) -> PathBuf {
        self.dir.join("array")
    }

    pub fn console_binary(&self) -> PathBuf {
        self.bin_dir.join("console")
    }

    /// The certificates of the nodes and the console (`--tls-dir`).
    pub fn certs_dir(&self) -> PathBuf {
        self.dir.join("certs")
    }

    /// The security of the program of `role`.
    pub fn security(&self, role: &str) -> Result<splitmirror_proto::security::Security, String> {
        splitmirror_proto::security::Security::from_dir(&self.certs_dir(), role)
            .map_err(|e| format!("the {role} certificate: {e}"))
    }

    /// Mounts a tmpfs of `size` over the db or store directory, so that
    /// the full-filesystem fault has a small filesystem to fill. Needs root.
    pub fn mount_small_fs(&mut self, dir: &Path, size: &str) -> Result<(), String> {
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("running mount: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "mount -t tmpfs {}: {}",
                dir.display(),
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        self.mounts.push(dir.to_path_buf());
        Ok(())
    }

    fn args(&self, node: Node) -> Vec<String> {
        let listen = self.addr(node);
        let path = |p: PathBuf| p.to_string_lossy().into_owned();
        let mut args: Vec<String> = match node {
            Node::Array => {
                let mut args = vec![
                    "--listen".into(),
                    listen,
                    "--data-dir".into(),
                    path(self.array_dir()),
                ];
                match self.options.save_area_blocks {
                    Some(_) => args.extend(["--config".into(), path(self.dir.join("array.toml"))]),
                    None => args.extend(["--lu-size".into(), self.options.lu_size.clone()]),
                }
                args
            }
            Node::Db => vec![
                "--listen".into(),
                listen,
                "--array".into(),
                self.addr(Node::Array),
                "--data-dir".into(),
                path(self.db_dir()),
                "--workload-tps".into(),
                self.options.workload_tps.to_string(),
                "--workload-workers".into(),
                "4".into(),
                "--resync-max-rate".into(),
                self.options.resync_max_rate.clone(),
                "--resync".into(),
                self.options.resync_method.clone(),
            ],
            Node::Backup => vec![
                "--listen".into(),
                listen,
                "--array".into(),
                self.addr(Node::Array),
                "--db".into(),
                self.addr(Node::Db),
                "--store".into(),
                path(self.store_dir()),
                // The checks prune and collect after every round: a short
                // grace lets the collector remove what pruning freed (and
                // races it with the next round's backups).
                "--gc-grace".into(),
                "2s".into(),
            ],
        };
        if node == Node::Db && self.options.save_area_blocks.is_some() {
            args.extend(["--save-area".into(), format!("0={SAVE_AREA_LU}")]);
        }
        match node {
            Node::Array => args.extend(self.options.array_flags.iter().cloned()),
            Node::Db => args.extend(self.options.db_flags.iter().cloned()),
            Node::Backup => {}
        }
        args
    }

    /// Starts a node (it must not be running) and waits for it to listen.
    pub fn start(&mut self, node: Node) -> Result<(), String> {
        self.start_with_env(node, &[])
    }

    /// The same, with extra environment variables (a crash point).
    pub fn start_with_env(&mut self, node: Node, env: &[(&str, &str)]) -> Result<(), String> {
        if self.is_running(node) {
            return Err(format!("{node} is already running"));
        }
        let mut child = Command::new(self.bin_dir.join(node.binary()))
            .args(self.args(node))
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env("SPLITMIRROR_TLS_DIR", self.certs_dir())
            .env_remove("SPLITMIRROR_CRASH_AT")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting {node}: {e}"))?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::new(Mutex::new(VecDeque::new()));
        let (listening_tx, listening_rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        // The drain thread keeps reading so that the child never blocks on
        // a full pipe; it ends with the process.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("listening on") {
                    let _ = listening_tx.send(());
                }
                let mut log = sink.lock().expect("log tail");
                if log.len() == LOG_TAIL_LINES {
                    log.pop_front();
                }
                log.push_back(line);
            }
        });
        let started = Instant::now();
        let mut process = Process {
            child,
            log,
            paused: false,
            crash_armed: env.iter().any(|(key, _)| *key == "SPLITMIRROR_CRASH_AT"),
        };
        loop {
            if listening_rx.recv_timeout(Duration::from_millis(50)).is_ok() {
                break;
            }
            if let Ok(Some(status)) = process.child.try_wait() {
                std::thread::sleep(Duration::from_millis(50));
                let tail = tail_of(&process.log);
                self.past_logs.push((node, tail.clone()));
                return Err(format!(
                    "{node} exited ({status}) before listening; its last lines:\n{}",
                    tail.join("\n")
                ));
            }
            if started.elapsed() > START_TIMEOUT {
                let _ = process.child.kill();
                let _ = process.child.wait();
                return Err(format!("{node} did not listen within {START_TIMEOUT:?}"));
            }
        }
        self.processes[node as usize] = Some(process);
        Ok(())
    }

    pub fn is_running(&mut self, node: Node) -> bool {
        match &mut self.processes[node as usize] {
            Some(process) => matches!(process.child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// A node that should run but has exited by itself: its exit status.
    pub fn exited_by_itself(&mut self, node: Node) -> Option<String> {
        let process = self.processes[node as usize].as_mut()?;
        match process.child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            _ => None,
        }
    }

    /// SIGKILL, as a crash would; waits until the process is gone.
    pub fn kill9(&mut self, node: Node) {
        if let Some(mut process) = self.processes[node as usize].take() {
            let _ = process.child.kill();
            let _ = process.child.wait();
            self.past_logs.push((node, tail_of(&process.log)));
        }
    }

    /// SIGTERM and a bounded wait for a clean exit (SIGKILL after it).
    pub fn stop(&mut self, node: Node) {
        if let Some(mut process) = self.processes[node as usize].take() {
            if process.paused {
                let _ = signal(&process.child, Signal::CONT);
            }
            let _ = signal(&process.child, Signal::TERM);
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = process.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = process.child.kill();
            let _ = process.child.wait();
            self.past_logs.push((node, tail_of(&process.log)));
        }
    }

    /// A node still running with a crash point that never fired is
    /// restarted without it, so that the point cannot fire in a later round
    /// (where no fault asked for it). Answers whether it was restarted.
    pub fn disarm(&mut self, node: Node) -> Result<bool, String> {
        let armed = self.processes[node as usize]
            .as_ref()
            .is_some_and(|p| p.crash_armed);
        if !armed || !self.is_running(node) {
            return Ok(false);
        }
        self.stop(node);
        self.start(node)?;
        Ok(true)
    }

    /// SIGSTOP: the node stops answering but keeps its sockets.
    pub fn pause(&mut self, node: Node) {
        if let Some(process) = &mut self.processes[node as usize]
            && signal(&process.child, Signal::STOP).is_ok()
        {
            process.paused = true;
        }
    }

    /// SIGCONT after [`pause`](Self::pause).
    pub fn resume(&mut self, node: Node) {
        if let Some(process) = &mut self.processes[node as usize]
            && process.paused
        {
            let _ = signal(&process.child, Signal::CONT);
            process.paused = false;
        }
    }

    /// Every node running and unpaused again after a fault; answers the
    /// nodes that had to be started.
    pub fn heal(&mut self) -> Result<Vec<Node>, String> {
        let mut started = Vec::new();
        for node in Node::ALL {
            self.resume(node);
            if !self.is_running(node) {
                if self.processes[node as usize].is_some() {
                    self.kill9(node);
                }
                self.start(node)?;
                started.push(node);
            }
        }
        Ok(started)
    }

    /// What each node has logged lately, for a violation report.
    pub fn write_logs(&self, into: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(into)?;
        for (i, (node, lines)) in self.past_logs.iter().enumerate() {
            std::fs::write(
                into.join(format!("{i:04}-{node}-ended.log")),
                lines.join("\n"),
            )?;
        }
        for node in Node::ALL {
            if let Some(process) = &self.processes[node as usize] {
                std::fs::write(
                    into.join(format!("{node}-running.log")),
                    tail_of(&process.log).join("\n"),
                )?;
            }
        }
        Ok(())
    }

    /// Stops every node and unmounts what was mounted.
    pub fn shutdown(&mut self) {
        for node in Node::ALL {
            self.stop(node);
        }
        for dir in self.mounts.drain(..).rev() {
            let _ = Command::new("umount").arg(&dir).status();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn tail_of(log: &Arc<Mutex<VecDeque<String>>>) -> Vec<String> {
    log.lock().expect("log tail").iter().cloned().collect()
}

fn signal(child: &Child, signal: Signal) -> rustix::io::Result<()> {
    let pid = Pid::from_child(child);
    kill_process(pid, signal)
}

/// A loopback port nobody listens on right now.
fn free_port() -> Result<u16, String> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("finding a port: {e}"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("finding a port: {e}"))
}

/// The directory of the workspace's binaries: the soak runs from
/// `target/<profile>/soak`, beside them (a test binary runs from
/// `target/<profile>/deps/`).
pub fn binaries_dir() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("finding the soak binary: {e}"))?;
    let dir = exe
        .parent()
        .ok_or("the soak binary has no directory")?
        .to_path_buf();
    Ok(if dir.ends_with("deps") {
        dir.parent().map(Path::to_path_buf).unwrap_or(dir)
    } else {
        dir
    })
}

/// The array's config with a save area: the default two pairs of
/// `lu_size_bytes` LUs of 4096-byte blocks (mirror 0 = 1 + 2, mirror 3 =
/// 4 + 5) and the plain LUs [`SAVE_AREA_LU`] and [`SECOND_SAVE_AREA_LU`]
/// of `save_area_blocks` blocks each, read-write for db-server.
pub fn save_area_array_toml(lu_size_bytes: u64, save_area_blocks: u64) -> Result<String, String> {
    const BLOCK_SIZE_BYTES: u64 = 4096;
    if lu_size_bytes == 0 || !lu_size_bytes.is_multiple_of(BLOCK_SIZE_BYTES) {
        return Err(format!(
            "an LU size of {lu_size_bytes} bytes is not a positive multiple of {BLOCK_SIZE_BYTES}"
        ));
    }
    let block_count = lu_size_bytes / BLOCK_SIZE_BYTES;
    let mut text = String::new();
    let mut lu = |id: u32, blocks: u64| {
        text.push_str(&format!(
            "[[lu]]\nid = {id}\nblock_size_bytes = {BLOCK_SIZE_BYTES}\nblock_count = {blocks}\n\n"
        ));
    };
    for id in [1, 2, 4, 5] {
        lu(id, block_count);
    }
    lu(SAVE_AREA_LU, save_area_blocks);
    lu(SECOND_SAVE_AREA_LU, save_area_blocks);
    for (mirror, origin, mate) in [(0, 1, 2), (3, 4, 5)] {
        text.push_str(&format!(
            "[[mirror]]\nmirror = {mirror}\norigin = {origin}\nmate = {mate}\n\n"
        ));
    }
    for plain in [SAVE_AREA_LU, SECOND_SAVE_AREA_LU] {
        text.push_str(&format!(
            "[[grant]]\nidentity = \"{}\"\nlu = {plain}\naccess = \"read-write\"\n\n",
            splitmirror_proto::security::role::DB
        ));
    }
    array_node::ArrayConfig::from_toml(&text).map_err(|e| format!("the save-area config: {e}"))?;
    Ok(text)
}
