//! How a backup run shows its progress: a bar on a terminal, plain lines on
//! stderr otherwise, or nothing.
//!
//! The bar is drawn by hand rather than with indicatif: indicatif depends on
//! a crate named `console`, which makes `cargo run -p console` ambiguous in
//! this workspace, and one redrawn line is all a run needs.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use splitmirror_proto::units::format_bytes;

pub trait ProgressSink: Send + Sync {
    /// A new phase starts ("acquire", "backup", "resync", …).
    fn phase(&self, name: &str);
    /// Backup bytes copied so far.
    fn backup(&self, done_bytes: u64, total_bytes: u64, throughput_bytes_per_s: u64);
    /// Resync bytes copied so far.
    fn resync(&self, done_bytes: u64, total_bytes: u64);
    /// The run is over; clear any bars.
    fn finish(&self);
}

/// Chooses bars when stderr is a terminal, plain lines otherwise.
pub fn for_stderr() -> Box<dyn ProgressSink> {
    if std::io::stderr().is_terminal() {
        Box::new(Bars::default())
    } else {
        Box::new(Lines::default())
    }
}

/// Shows nothing (the demo prints reports instead).
pub struct Quiet;

impl ProgressSink for Quiet {
    fn phase(&self, _name: &str) {}
    fn backup(&self, _: u64, _: u64, _: u64) {}
    fn resync(&self, _: u64, _: u64) {}
    fn finish(&self) {}
}

/// One bar on stderr, redrawn in place at most ten times a second.
#[derive(Default)]
struct Bars {
    /// The kind of bar on screen and when it was last drawn.
    drawn: Mutex<Option<(String, Instant)>>,
}

const BAR_WIDTH: usize = 32;

impl Bars {
    fn draw(&self, kind: &str, done: u64, total: u64, extra: String) {
        let mut drawn = self.drawn.lock().expect("progress bar");
        let due = match drawn.as_ref() {
            Some((k, at)) => {
                k != kind || at.elapsed() >= Duration::from_millis(100) || done >= total
            }
            None => true,
        };
        if !due {
            return;
        }
        let fraction = if total == 0 {
            1.0
        } else {
            (done as f64 / total as f64).min(1.0)
        };
        let filled = (fraction * BAR_WIDTH as f64) as usize;
        let bar: String = (0..BAR_WIDTH)
            .map(|i| match i.cmp(&filled) {
                std::cmp::Ordering::Less => '=',
                std::cmp::Ordering::Equal => '>',
                std::cmp::Ordering::Greater => ' ',
            })
            .collect();
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r\x1b[2K{kind:>7} [{bar}] {:>3.0}% {} of {}{extra}",
            fraction * 100.0,
            format_bytes(done),
            format_bytes(total)
        );
        let _ = err.flush();
        *drawn = Some((kind.to_string(), Instant::now()));
    }

    fn clear(&self) {
        if self.drawn.lock().expect("progress bar").take().is_some() {
            eprint!("\r\x1b[2K");
        }
    }
}

impl ProgressSink for Bars {
    fn phase(&self, name: &str) {
        self.clear();
        eprintln!("· {name}");
    }

    fn backup(&self, done: u64, total: u64, throughput: u64) {
        self.draw(
            "backup",
            done,
            total,
            format!(", {}/s", format_bytes(throughput)),
        );
    }

    fn resync(&self, done: u64, total: u64) {
        self.draw("resync", done, total, String::new());
    }

    fn finish(&self) {
        self.clear();
    }
}

/// Plain lines, at most one a second per kind, and always the last one.
#[derive(Default)]
struct Lines {
    last: Mutex<Option<(String, Instant)>>,
}

impl Lines {
    fn line(&self, kind: &str, done: u64, total: u64, extra: String) {
        let mut last = self.last.lock().expect("progress lines");
        let due = match last.as_ref() {
            Some((k, at)) => k != kind || at.elapsed() >= Duration::from_secs(1) || done == total,
            None => true,
        };
        if due {
            let percent = if total == 0 {
                100.0
            } else {
                done as f64 * 100.0 / total as f64
            };
            eprintln!(
                "{kind}: {} of {} ({percent:.0}%){extra}",
                format_bytes(done),
                format_bytes(total)
            );
            *last = Some((kind.to_string(), Instant::now()));
        }
    }
}

impl ProgressSink for Lines {
    fn phase(&self, name: &str) {
        eprintln!("· {name}");
    }

    fn backup(&self, done: u64, total: u64, throughput: u64) {
        self.line(
            "backup",
            done,
            total,
            format!(", {}/s", format_bytes(throughput)),
        );
    }

    fn resync(&self, done: u64, total: u64) {
        self.line("resync", done, total, String::new());
    }

    fn finish(&self) {}
}
