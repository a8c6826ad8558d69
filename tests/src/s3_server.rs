//! A real S3 server for tests: `s3s-fs` (the S3 REST API with SigV4 over a
//! directory) on `127.0.0.1` at a free port, over a temporary directory,
//! with one bucket and fixed credentials; killed when dropped.
//!
//! `.ci/run` installs s3s-fs. Elsewhere a test that needs it skips, saying
//! so, when the binary is missing; under CI (`CI` set) a missing binary
//! fails the test instead, as grpcurl's tests do.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use backup_server::s3::{S3Args, S3Credentials};

/// The binary, found on `PATH`.
const BINARY: &str = "s3s-fs";
const INSTALL: &str = "cargo install s3s-fs --version 0.14.1 --features binary --locked";
const ACCESS_KEY: &str = "splitmirror-test";
const SECRET_KEY: &str = "splitmirror-test-secret";
/// s3s-fs has one bucket per directory below its root; this one is made
/// before it starts.
const BUCKET: &str = "backups";
/// How long a starting s3s-fs may take to answer HTTP.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// Another process can take the free port between our probe and s3s-fs's
/// bind; then s3s-fs exits and we try another port.
const START_ATTEMPTS: usize = 3;

/// A running s3s-fs, killed (and its directory removed) on drop.
#[derive(Debug)]
pub struct S3Server {
    child: Child,
    addr: SocketAddr,
    /// Holds the data root (`data/`) and the server's log (`s3s-fs.log`).
    dir: tempfile::TempDir,
}

impl S3Server {
    /// Starts s3s-fs, or `None` (after printing why) when the binary is
    /// missing outside CI. Panics when it is missing under CI or does not
    /// start.
    pub fn start() -> Option<Self> {
        if !binary_available() {
            assert!(
                std::env::var_os("CI").is_none(),
                "{BINARY} is missing under CI: .ci/run must install it ({INSTALL})"
            );
            eprintln!("SKIPPED: {BINARY} is not installed ({INSTALL})");
            return None;
        }
        let dir = tempfile::tempdir().expect("a temporary directory for s3s-fs");
        let root = dir.path().join("data");
        std::fs::create_dir_all(root.join(BUCKET)).expect("create the bucket directory");
        let log = dir.path().join("s3s-fs.log");
        for _ in 0..START_ATTEMPTS {
            let addr = free_port();
            let mut child = spawn(&root, &log, addr);
            match wait_until_answering(&mut child, addr) {
                Ok(()) => return Some(Self { child, addr, dir }),
                Err(why) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    eprintln!("s3s-fs on {addr} did not start ({why}); trying another port");
                }
            }
        }
        panic!(
            "s3s-fs did not start after {START_ATTEMPTS} attempts; its log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn bucket(&self) -> &str {
        BUCKET
    }

    pub fn access_key(&self) -> &str {
        ACCESS_KEY
    }

    pub fn secret_key(&self) -> &str {
        SECRET_KEY
    }

    /// The directory the bucket's objects are files in (`bucket/KEY`).
    pub fn bucket_dir(&self) -> PathBuf {
        self.dir.path().join("data").join(BUCKET)
    }

    /// The S3 flags of a store in this server, with its credentials.
    pub fn args(&self) -> S3Args {
        S3Args {
            endpoint: Some(self.endpoint()),
            region: Some("us-east-1".into()),
            virtual_hosted_style: false,
            credentials: Some(S3Credentials {
                access_key_id: ACCESS_KEY.into(),
                secret_access_key: SECRET_KEY.into(),
                session_token: None,
            }),
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn binary_available() -> bool {
    Command::new(BINARY)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A port nothing listens on now.
fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("probe a free port on 127.0.0.1")
}

fn spawn(root: &Path, log: &Path, addr: SocketAddr) -> Child {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("open the s3s-fs log");
    Command::new(BINARY)
        .args(["--host", "127.0.0.1", "--port", &addr.port().to_string()])
        .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
        .arg(root)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("clone the log handle"))
        .stderr(log_file)
        .spawn()
        .expect("spawn s3s-fs")
}

/// Waits until s3s-fs answers an HTTP request (any status: an anonymous
/// request is refused), or fails when it exits or takes too long.
fn wait_until_answering(child: &mut Child, addr: SocketAddr) -> Result<(), String> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Err(format!("it exited with {status}"));
        }
        if answers_http(addr) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("no HTTP answer within {START_TIMEOUT:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn answers_http(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    if stream.write_all(request).is_err() {
        return false;
    }
    let mut answer = [0u8; 9];
    stream.read_exact(&mut answer).is_ok() && answer.starts_with(b"HTTP/1.")
}
