//! How a backup run or a restore shows its progress: a bar (indicatif) on
//! a terminal, plain lines on stderr otherwise, or nothing.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use splitmirror_proto::units::format_bytes;

/// Where a run reports its phases and the progress of its copies.
pub trait ProgressSink: Send + Sync {
    /// A new phase starts ("acquire", "backup", "resync", …).
    fn phase(&self, name: &str);
    /// Backup bytes copied so far.
    fn backup(&self, done_bytes: u64, total_bytes: u64, throughput_bytes_per_s: u64);
    /// Resync bytes copied so far.
    fn resync(&self, done_bytes: u64, total_bytes: u64);
    /// A restore: `done_chunks` of `total_chunks` in `phase` ("compare",
    /// "check", "write", "verify"), the bytes written so far and the
    /// write speed.
    fn restore(
        &self,
        phase: &'static str,
        done_chunks: u64,
        total_chunks: u64,
        bytes_written: u64,
        throughput_bytes_per_s: u64,
    );
    /// A reverse resync (snapshot restore): bytes copied mate → origin so
    /// far.
    fn reverse_resync(&self, done_bytes: u64, total_bytes: u64);
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
    fn restore(&self, _: &'static str, _: u64, _: u64, _: u64, _: u64) {}
    fn reverse_resync(&self, _: u64, _: u64) {}
    fn finish(&self) {}
}

/// One bar on stderr at a time (the backup's, then the resync's), drawn
/// by indicatif; phases are printed above it as lines.
#[derive(Default)]
struct Bars {
    /// The kind of the bar on screen ("backup", "resync") and the bar.
    current: Mutex<Option<(&'static str, ProgressBar)>>,
}

impl Bars {
    /// The bar fills the terminal's width; the figures after it are one
    /// message, so that they always agree with each other.
    fn style() -> ProgressStyle {
        ProgressStyle::with_template("{prefix:>7} [{wide_bar}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ")
    }

    /// A bar of bytes: "42% 10 MiB of 24 MiB{extra}".
    fn draw_bytes(&self, kind: &'static str, done: u64, total: u64, extra: String) {
        let message = format!(
            "{:>3.0}% {} of {}{extra}",
            percent(done, total),
            format_bytes(done),
            format_bytes(total)
        );
        self.draw(kind, done, total, message);
    }

    fn draw(&self, kind: &'static str, done: u64, total: u64, message: String) {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let bar = match current.as_ref() {
            Some((k, bar)) if *k == kind => bar.clone(),
            _ => {
                if let Some((_, old)) = current.take() {
                    old.finish_and_clear();
                }
                let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr())
                    .with_style(Self::style())
                    .with_prefix(kind);
                *current = Some((kind, bar.clone()));
                bar
            }
        };
        if bar.length() != Some(total) {
            bar.set_length(total);
        }
        bar.set_position(done.min(total));
        bar.set_message(message);
    }

    fn clear(&self) {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, bar)) = current.take() {
            bar.finish_and_clear();
        }
    }
}

impl ProgressSink for Bars {
    fn phase(&self, name: &str) {
        self.clear();
        eprintln!("· {name}");
    }

    fn backup(&self, done: u64, total: u64, throughput: u64) {
        self.draw_bytes(
            "backup",
            done,
            total,
            format!(", {}/s", format_bytes(throughput)),
        );
    }

    fn resync(&self, done: u64, total: u64) {
        self.draw_bytes("resync", done, total, String::new());
    }

    fn restore(&self, phase: &'static str, done: u64, total: u64, written: u64, throughput: u64) {
        self.draw(
            phase,
            done,
            total,
            restore_message(done, total, written, throughput),
        );
    }

    fn reverse_resync(&self, done: u64, total: u64) {
        self.draw_bytes("reverse", done, total, String::new());
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
        self.line_with(kind, done, total, || {
            format!(
                "{kind}: {} of {} ({:.0}%){extra}",
                format_bytes(done),
                format_bytes(total),
                percent(done, total)
            )
        });
    }

    fn line_with(&self, kind: &str, done: u64, total: u64, text: impl FnOnce() -> String) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let due = match last.as_ref() {
            Some((k, at)) => k != kind || at.elapsed() >= Duration::from_secs(1) || done == total,
            None => true,
        };
        if due {
            eprintln!("{}", text());
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

    fn restore(&self, phase: &'static str, done: u64, total: u64, written: u64, throughput: u64) {
        self.line_with(phase, done, total, || {
            format!(
                "{phase}: {}",
                restore_message(done, total, written, throughput)
            )
        });
    }

    fn reverse_resync(&self, done: u64, total: u64) {
        self.line("reverse resync", done, total, String::new());
    }

    fn finish(&self) {}
}

/// `done` of `total` in percent (100 for an empty total).
fn percent(done: u64, total: u64) -> f64 {
    if total == 0 {
        100.0
    } else {
        done.min(total) as f64 * 100.0 / total as f64
    }
}

/// "42% 430 of 1024 chunks, 12.0 MiB written, 150 MiB/s".
fn restore_message(done: u64, total: u64, written: u64, throughput: u64) -> String {
    format!(
        "{:>3.0}% {done} of {total} chunks, {} written, {}/s",
        percent(done, total),
        format_bytes(written),
        format_bytes(throughput)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_lines_say_chunks_bytes_and_speed() {
        assert_eq!(
            restore_message(512, 1024, 3 << 20, 100 << 20),
            " 50% 512 of 1024 chunks, 3.00 MiB written, 100.00 MiB/s"
        );
        assert_eq!(percent(0, 0), 100.0);
        assert_eq!(percent(7, 5), 100.0);
    }
}
