//! The peer a user would pick instead: `qemu-nbd` exporting the same LU
//! file over NBD on loopback, copied by `qemu-img convert` into a raw file
//! — in its default mode (buffered output, cache mode `unsafe`: no flush),
//! and in its best one for bulk copies, `-t none -W` (output opened with
//! `O_DIRECT`, out-of-order writes), from an export served with
//! `--cache=none` (the LU file read with `O_DIRECT` too).

use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// A running `qemu-nbd`; stopped when dropped.
pub struct NbdExport {
    child: Child,
    port: u16,
}

impl Drop for NbdExport {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Why the peer could not be measured, for the report.
pub fn missing() -> Option<String> {
    for tool in ["qemu-nbd", "qemu-img"] {
        let found = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!(
                "{tool} is not installed (apt-get install qemu-utils): the peer is skipped"
            ));
        }
    }
    None
}

/// How `qemu-nbd` opens the file it exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportCache {
    /// qemu-nbd's default (`writeback`): reads through the page cache.
    Buffered,
    /// `--cache=none`: reads with `O_DIRECT`.
    Direct,
}

/// Exports `file` read-only on an ephemeral loopback port, through the
/// page cache.
pub fn export(file: &Path) -> anyhow::Result<NbdExport> {
    export_with_cache(file, ExportCache::Buffered)
}

/// Exports `file` read-only on an ephemeral loopback port, opened as
/// `cache` says.
pub fn export_with_cache(file: &Path, cache: ExportCache) -> anyhow::Result<NbdExport> {
    let port = {
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").context("binding a loopback port")?;
        listener.local_addr()?.port()
    };
    let child = Command::new("qemu-nbd")
        .args([
            "--read-only",
            "--persistent",
            "--format=raw",
            "--bind=127.0.0.1",
        ])
        .arg(format!("--port={port}"))
        .arg("--export-name=lu")
        .args(match cache {
            ExportCache::Buffered => None,
            ExportCache::Direct => Some("--cache=none"),
        })
        .arg(file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting qemu-nbd")?;
    let export = NbdExport { child, port };
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("qemu-nbd did not start listening");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(export)
}

/// Copies the export into `out` with `qemu-img convert` in its default
/// mode; answers the time the copy took and, separately, the time to fsync
/// the result.
pub fn convert(export: &NbdExport, out: &Path) -> anyhow::Result<(Duration, Duration)> {
    convert_with(export, out, &[])
}

/// Copies the export into `out` with `qemu-img convert -t none -W`: the
/// output opened with `O_DIRECT` (qemu flushes it before exiting), writes
/// issued out of order by its coroutines. Answers the copy's time and the
/// time of an fsync after it (near zero: the data is already on disk).
pub fn convert_direct(export: &NbdExport, out: &Path) -> anyhow::Result<(Duration, Duration)> {
    convert_with(export, out, &["-t", "none", "-W"])
}

fn convert_with(
    export: &NbdExport,
    out: &Path,
    mode: &[&str],
) -> anyhow::Result<(Duration, Duration)> {
    let started = Instant::now();
    let output = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .args(mode)
        .arg(format!("nbd://127.0.0.1:{}/lu", export.port))
        .arg(out)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .context("running qemu-img convert")?;
    let copied = started.elapsed();
    if !output.status.success() {
        bail!(
            "qemu-img convert {} failed ({}): {}",
            mode.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let started = Instant::now();
    std::fs::File::open(out)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", out.display()))?;
    Ok((copied, started.elapsed()))
}
