//! Pacing of bulk work to a byte rate, so that a backup or a resync leaves
//! the database its share of CPU and disk.
//!
//! - [`RateLimit`]: a fixed rate (db-server's `--resync-max-rate`). Each
//!   caller reserves the time its bytes take at the rate, and waits until
//!   the reservations before it have passed; concurrent callers share one
//!   rate.
//! - [`PaceController`]: the array's adaptive pace, shared by every
//!   background copy (a backup's reads, a resync's copies, a restore's bulk
//!   writes and checksums). It watches the latency of the foreground
//!   requests (the small reads and writes of the hosts) in windows of
//!   [`WINDOW`] and sets the background rate like AIMD: no foreground →
//!   full speed; foreground at its baseline latency → the rate rises;
//!   foreground slower than its baseline → the rate halves, never below the
//!   minimum. Time is passed in, so the rule is tested with synthetic
//!   clocks.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
pub struct RateLimit {
    bytes_per_s: u64,
    next: Mutex<Instant>,
}

impl RateLimit {
    pub fn new(bytes_per_s: u64) -> Self {
        Self {
            bytes_per_s: bytes_per_s.max(1),
            next: Mutex::new(Instant::now()),
        }
    }

    /// Waits until `bytes` more may go.
    pub async fn take(&self, bytes: u64) {
        let start = {
            let mut next = self.next.lock().expect("rate limit poisoned");
            let start = (*next).max(Instant::now());
            *next = start + Duration::from_secs_f64(bytes as f64 / self.bytes_per_s as f64);
            start
        };
        tokio::time::sleep_until(start).await;
    }
}

/// The controller decides once per window of this length.
pub const WINDOW: Duration = Duration::from_millis(100);
/// Windows without a foreground request before the pace calls the array
/// idle: 300 ms, so that a database idling between two transactions does
/// not flip the pace back to full speed.
const IDLE_AFTER_WINDOWS: u32 = 3;
/// The report covers this many windows (one second).
const REPORT_WINDOWS: usize = 10;
/// Foreground latency is "at baseline" up to baseline × this, plus
/// [`LATENCY_SLACK`]: a mean of a few dozen requests moves by a third
/// without anything being wrong.
const LATENCY_TOLERANCE: f64 = 1.5;
/// Absolute slack on the baseline: at tens of microseconds, jitter of a few
/// scheduler ticks is not a sign of contention.
const LATENCY_SLACK: Duration = Duration::from_micros(200);
/// While sharing, the rate grows by this factor per window (about ×2.6 a
/// second): back to full speed within a second or two of the foreground
/// calming down.
const INCREASE_FACTOR: f64 = 1.1;
/// While yielding, the rate is multiplied by this per window.
const DECREASE_FACTOR: f64 = 0.5;
/// When foreground requests appear after an idle spell, the background
/// rate starts at this fraction of what it was moving: the foreground gets
/// room at once, before its latency has been measured.
const ARRIVAL_FACTOR: f64 = 0.5;
/// While sharing, the rate does not grow past this multiple of what the
/// background moved over the last second: beyond it the rate limits
/// nothing, and a number that large would only take long to come down.
const HEADROOM_FACTOR: f64 = 2.0;
/// The baseline moves toward a window's mean latency by these fractions:
/// quickly down (a faster foreground is the true baseline), slowly up, and
/// more slowly still while background work was heavy in that window (its
/// latency then is what the pace is trying to judge).
const BASELINE_FALL: f64 = 0.5;
const BASELINE_RISE_LIGHT: f64 = 0.05;
const BASELINE_RISE_HEAVY: f64 = 0.01;

/// The adaptive pace's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PaceConfig {
    /// Background copies are never slowed below this (array-node
    /// `--background-min-rate`).
    pub min_bytes_per_s: u64,
    /// Background copies never go faster than this, idle or not (array-node
    /// `--background-max-rate`); `None`: unlimited when idle.
    pub max_bytes_per_s: Option<u64>,
}

/// 16 MiB/s: a 1 GiB resync or backup still ends in about a minute under
/// the heaviest foreground load, and 16 chunks of 1 MiB a second cost a
/// database's small requests little on one disk.
pub const DEFAULT_MIN_BYTES_PER_S: u64 = 16 << 20;

impl Default for PaceConfig {
    fn default() -> Self {
        Self {
            min_bytes_per_s: DEFAULT_MIN_BYTES_PER_S,
            max_bytes_per_s: None,
        }
    }
}

impl PaceConfig {
    /// Checks min ≤ max and min > 0; the error is for an operator.
    pub fn validate(&self) -> Result<(), String> {
        if self.min_bytes_per_s == 0 {
            return Err("the background minimum rate must be above 0".into());
        }
        if let Some(max) = self.max_bytes_per_s
            && max < self.min_bytes_per_s
        {
            return Err(format!(
                "the background maximum rate ({}) is below the minimum ({})",
                format_rate(max),
                format_rate(self.min_bytes_per_s)
            ));
        }
        Ok(())
    }
}

/// Why background copies go at the rate they do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaceReason {
    /// No foreground requests lately: full speed (up to the max).
    Idle,
    /// Foreground latency at its baseline: the rate rises.
    Sharing,
    /// Foreground latency above its baseline: the rate halves.
    Yielding,
    /// Yielding, held at the minimum.
    Minimum,
}

/// What the pace is doing, over the last second.
#[derive(Debug, Clone, PartialEq)]
pub struct PaceReport {
    /// `None`: unlimited.
    pub rate_bytes_per_s: Option<u64>,
    pub reason: PaceReason,
    pub min_bytes_per_s: u64,
    pub max_bytes_per_s: Option<u64>,
    pub background_bytes_per_s: u64,
    pub foreground_requests_per_s: u64,
    pub foreground_latency_us: u64,
    pub baseline_latency_us: u64,
    /// One line for people.
    pub why: String,
}

/// The figures of one closed window.
#[derive(Debug, Clone, Copy, Default)]
struct WindowFigures {
    foreground_requests: u64,
    foreground_latency_sum_us: u64,
    background_bytes: u64,
}

#[derive(Debug)]
struct PaceState {
    window_start: Instant,
    current: WindowFigures,
    /// The last [`REPORT_WINDOWS`] closed windows, oldest first.
    closed: VecDeque<WindowFigures>,
    /// `None`: unlimited.
    rate_bytes_per_s: Option<f64>,
    reason: PaceReason,
    windows_without_foreground: u32,
    /// An estimate of foreground latency with little background work
    /// beside it; `None` until the first foreground window.
    baseline_latency_us: Option<f64>,
    /// The mean foreground latency of the last window that had any.
    last_latency_us: f64,
    /// When the next reservation may start (as in [`RateLimit`]).
    next_start: Instant,
}

/// The array's adaptive pace (see the module comment). Cheap to share: one
/// std mutex, never held across an await.
#[derive(Debug)]
pub struct PaceController {
    config: PaceConfig,
    /// Test-only: foreground requests are not counted, so the pace never
    /// leaves IDLE (a canary for the tests of the pace).
    ignore_foreground: bool,
    state: Mutex<PaceState>,
}

impl PaceController {
    pub fn new(config: PaceConfig, now: Instant) -> Self {
        Self {
            config,
            ignore_foreground: false,
            state: Mutex::new(PaceState {
                window_start: now,
                current: WindowFigures::default(),
                closed: VecDeque::with_capacity(REPORT_WINDOWS + 1),
                rate_bytes_per_s: config.max_bytes_per_s.map(|max| max as f64),
                reason: PaceReason::Idle,
                windows_without_foreground: IDLE_AFTER_WINDOWS,
                baseline_latency_us: None,
                last_latency_us: 0.0,
                next_start: now,
            }),
        }
    }

    /// A broken pace for tests that must show they can fail: it ignores
    /// the foreground, so background copies always go at full speed.
    /// Nothing in a node's configuration reaches it.
    #[doc(hidden)]
    pub fn ignoring_foreground_for_tests(config: PaceConfig, now: Instant) -> Self {
        Self {
            ignore_foreground: true,
            ..Self::new(config, now)
        }
    }

    pub fn config(&self) -> PaceConfig {
        self.config
    }

    /// A foreground request completed after `latency`.
    pub fn record_foreground(&self, latency: Duration, now: Instant) {
        if self.ignore_foreground {
            return;
        }
        let mut state = self.lock();
        self.advance(&mut state, now);
        state.current.foreground_requests += 1;
        state.current.foreground_latency_sum_us += latency.as_micros() as u64;
    }

    /// Reserves the time `bytes` of background work take at the current
    /// rate, after the reservations before it, and answers when the work
    /// may start. With `min_bytes_per_s` (a copy's own guarantee), the wait
    /// is never longer than the bytes take at that rate.
    pub fn reserve(&self, bytes: u64, min_bytes_per_s: Option<u64>, now: Instant) -> Instant {
        let mut state = self.lock();
        self.advance(&mut state, now);
        state.current.background_bytes += bytes;
        let Some(rate) = state.rate_bytes_per_s else {
            state.next_start = now;
            return now;
        };
        let start = state.next_start.max(now);
        state.next_start = start + Duration::from_secs_f64(bytes as f64 / rate);
        match min_bytes_per_s {
            Some(min) if min > 0 => {
                start.min(now + Duration::from_secs_f64(bytes as f64 / min as f64))
            }
            _ => start,
        }
    }

    /// Waits until `bytes` of background work may go (see [`Self::reserve`]).
    pub async fn wait(&self, bytes: u64, min_bytes_per_s: Option<u64>) {
        let start = self.reserve(bytes, min_bytes_per_s, Instant::now());
        tokio::time::sleep_until(start).await;
    }

    /// The rate, the reason and the figures of the last second.
    pub fn report(&self, now: Instant) -> PaceReport {
        let mut state = self.lock();
        self.advance(&mut state, now);
        let seconds = (state.closed.len().max(1) as f64 * WINDOW.as_secs_f64()).max(1e-3);
        let total = state
            .closed
            .iter()
            .fold(WindowFigures::default(), |sum, w| WindowFigures {
                foreground_requests: sum.foreground_requests + w.foreground_requests,
                foreground_latency_sum_us: sum.foreground_latency_sum_us
                    + w.foreground_latency_sum_us,
                background_bytes: sum.background_bytes + w.background_bytes,
            });
        let foreground_latency_us = total
            .foreground_latency_sum_us
            .checked_div(total.foreground_requests)
            .unwrap_or(0);
        let baseline_latency_us = state.baseline_latency_us.unwrap_or(0.0) as u64;
        let rate_bytes_per_s = state.rate_bytes_per_s.map(|r| r as u64);
        let reason = state.reason;
        let why = why_line(
            reason,
            rate_bytes_per_s,
            &self.config,
            state.last_latency_us as u64,
            baseline_latency_us,
        );
        PaceReport {
            rate_bytes_per_s,
            reason,
            min_bytes_per_s: self.config.min_bytes_per_s,
            max_bytes_per_s: self.config.max_bytes_per_s,
            background_bytes_per_s: (total.background_bytes as f64 / seconds) as u64,
            foreground_requests_per_s: (total.foreground_requests as f64 / seconds) as u64,
            foreground_latency_us,
            baseline_latency_us,
            why,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PaceState> {
        self.state.lock().expect("pace poisoned")
    }

    /// Closes every window that has ended by `now`, deciding the rate at
    /// the end of each.
    fn advance(&self, state: &mut PaceState, now: Instant) {
        let mut closed = 0;
        while now.saturating_duration_since(state.window_start) >= WINDOW {
            let window = std::mem::take(&mut state.current);
            self.decide(state, window);
            state.window_start += WINDOW;
            closed += 1;
            // After a long quiet spell, more empty windows change nothing.
            if closed > REPORT_WINDOWS as u32 + IDLE_AFTER_WINDOWS {
                state.window_start = now;
                break;
            }
        }
    }

    /// The rule, applied at the end of one window.
    fn decide(&self, state: &mut PaceState, window: WindowFigures) {
        state.closed.push_back(window);
        while state.closed.len() > REPORT_WINDOWS {
            state.closed.pop_front();
        }
        let max = self.config.max_bytes_per_s.map(|m| m as f64);
        let min = self.config.min_bytes_per_s as f64;
        if window.foreground_requests == 0 {
            state.windows_without_foreground = state.windows_without_foreground.saturating_add(1);
            if state.windows_without_foreground >= IDLE_AFTER_WINDOWS {
                state.reason = PaceReason::Idle;
                state.rate_bytes_per_s = max;
            }
            // Fewer than IDLE_AFTER_WINDOWS quiet windows: hold the rate.
            return;
        }
        let was_idle = state.windows_without_foreground >= IDLE_AFTER_WINDOWS;
        state.windows_without_foreground = 0;
        let latency_us =
            window.foreground_latency_sum_us as f64 / window.foreground_requests as f64;
        state.last_latency_us = latency_us;
        // Background bytes of the last second, per second.
        let seconds = state.closed.len() as f64 * WINDOW.as_secs_f64();
        let moved_per_s =
            state.closed.iter().map(|w| w.background_bytes).sum::<u64>() as f64 / seconds;
        // Light background work: at most the minimum rate over this window.
        let light = (window.background_bytes as f64) <= min * WINDOW.as_secs_f64();
        let baseline = match state.baseline_latency_us {
            None => latency_us,
            Some(b) if latency_us < b => b + (latency_us - b) * BASELINE_FALL,
            Some(b) if light => b + (latency_us - b) * BASELINE_RISE_LIGHT,
            Some(b) => b + (latency_us - b) * BASELINE_RISE_HEAVY,
        };
        state.baseline_latency_us = Some(baseline);
        let clamp = |rate: f64| {
            let rate = rate.max(min);
            max.map_or(rate, |m| rate.min(m))
        };
        if was_idle {
            // The foreground arrived: give it room at once.
            let from = state.rate_bytes_per_s.unwrap_or(moved_per_s);
            state.rate_bytes_per_s = Some(clamp(from.min(moved_per_s.max(min)) * ARRIVAL_FACTOR));
            state.reason = PaceReason::Yielding;
        } else {
            let threshold = baseline * LATENCY_TOLERANCE + LATENCY_SLACK.as_micros() as f64;
            let rate = state.rate_bytes_per_s.unwrap_or(moved_per_s.max(min));
            if latency_us <= threshold {
                let headroom = (moved_per_s * HEADROOM_FACTOR).max(min);
                state.rate_bytes_per_s =
                    Some(clamp((rate * INCREASE_FACTOR).min(headroom.max(rate))));
                state.reason = PaceReason::Sharing;
            } else {
                state.rate_bytes_per_s = Some(clamp(rate * DECREASE_FACTOR));
                state.reason = PaceReason::Yielding;
            }
        }
        if state.reason == PaceReason::Yielding && state.rate_bytes_per_s.is_some_and(|r| r <= min)
        {
            state.reason = PaceReason::Minimum;
        }
    }
}

/// The `why` line of a report.
fn why_line(
    reason: PaceReason,
    rate_bytes_per_s: Option<u64>,
    config: &PaceConfig,
    latency_us: u64,
    baseline_latency_us: u64,
) -> String {
    let rate = rate_bytes_per_s.map_or_else(|| "unlimited".to_string(), format_rate);
    let latency = format!(
        "foreground latency {} vs {} baseline",
        format_latency_us(latency_us),
        format_latency_us(baseline_latency_us)
    );
    match reason {
        PaceReason::Idle => match config.max_bytes_per_s {
            Some(max) => format!("full speed (max {}) — idle", format_rate(max)),
            None => "full speed — idle".to_string(),
        },
        PaceReason::Sharing => format!("{rate} — sharing: {latency}"),
        PaceReason::Yielding => format!("{rate} — yielding: {latency}"),
        PaceReason::Minimum => format!("{rate} — held at the minimum: {latency}"),
    }
}

/// A rate for people, in decimal units like disk data sheets: `212 MB/s`.
pub fn format_rate(bytes_per_s: u64) -> String {
    const UNITS: [&str; 4] = ["B/s", "kB/s", "MB/s", "GB/s"];
    let mut value = bytes_per_s as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    if value >= 100.0 || unit == 0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A latency for people: `1.9 ms`, `640 µs`.
pub fn format_latency_us(us: u64) -> String {
    if us >= 1000 {
        format!("{:.1} ms", us as f64 / 1000.0)
    } else {
        format!("{us} µs")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn reservations_follow_the_rate() {
        let limit = RateLimit::new(1000);
        let started = Instant::now();
        limit.take(500).await; // goes at once
        limit.take(500).await; // waits 0.5 s
        limit.take(1).await; // waits another 0.5 s
        assert_eq!(started.elapsed(), Duration::from_millis(1000));
    }

    const MIB: u64 = 1 << 20;

    /// A synthetic clock and load: one background worker moving 1 MiB
    /// chunks, each taking [`CHUNK_TIME`] of a fast disk (2 GiB/s unpaced)
    /// once the pace lets it start, and `foreground` requests a window of
    /// `latency` each.
    struct Sim {
        pace: PaceController,
        now: Instant,
        worker_free_at: Instant,
    }

    const CHUNK_TIME: Duration = Duration::from_micros(500);

    impl Sim {
        fn new(config: PaceConfig) -> Self {
            let now = Instant::now();
            Self::with(PaceController::new(config, now), now)
        }

        fn with(pace: PaceController, now: Instant) -> Self {
            Self {
                pace,
                now,
                worker_free_at: now,
            }
        }

        fn run(&mut self, windows: u32, foreground: u32, latency: Duration) -> PaceReport {
            let step = WINDOW / 20;
            for _ in 0..windows * 20 {
                for _ in 0..foreground / 20 {
                    self.pace.record_foreground(latency, self.now);
                }
                let step_end = self.now + step;
                while self.worker_free_at < step_end {
                    let at = self.worker_free_at.max(self.now);
                    let start = self.pace.reserve(MIB, None, at);
                    self.worker_free_at = start.max(at) + CHUNK_TIME;
                }
                self.now = step_end;
            }
            self.pace.report(self.now)
        }
    }

    fn config() -> PaceConfig {
        PaceConfig {
            min_bytes_per_s: 16 * MIB,
            max_bytes_per_s: None,
        }
    }

    const FAST: Duration = Duration::from_micros(500);
    const SLOW: Duration = Duration::from_millis(5);

    #[test]
    fn idle_is_unlimited() {
        let mut sim = Sim::new(config());
        let report = sim.run(10, 0, FAST);
        assert_eq!(report.reason, PaceReason::Idle);
        assert_eq!(report.rate_bytes_per_s, None);
        assert!(report.background_bytes_per_s > 1000 * MIB, "{report:?}");
        assert_eq!(report.why, "full speed — idle");
    }

    #[test]
    fn idle_with_a_max_goes_at_the_max() {
        let mut sim = Sim::new(PaceConfig {
            max_bytes_per_s: Some(100 * MIB),
            ..config()
        });
        let report = sim.run(20, 0, FAST);
        assert_eq!(report.reason, PaceReason::Idle);
        assert_eq!(report.rate_bytes_per_s, Some(100 * MIB));
        let moved = report.background_bytes_per_s;
        assert!((95 * MIB..=105 * MIB).contains(&moved), "{report:?}");
    }

    #[test]
    fn foreground_latency_up_drops_the_rate_and_its_return_restores_it() {
        let mut sim = Sim::new(config());
        let idle = sim.run(10, 0, FAST);
        // Foreground at its baseline: the rate stays high (sharing).
        let sharing = sim.run(20, 200, FAST);
        assert_eq!(sharing.reason, PaceReason::Sharing, "{sharing:?}");
        let shared_rate = sharing.rate_bytes_per_s.expect("a rate while sharing");
        // The latency rises tenfold: the rate halves each window.
        let yielding = sim.run(2, 200, SLOW);
        assert_eq!(yielding.reason, PaceReason::Yielding, "{yielding:?}");
        let yielded_rate = yielding.rate_bytes_per_s.expect("a rate while yielding");
        assert!(
            yielded_rate < shared_rate / 2,
            "{sharing:?} then {yielding:?}"
        );
        assert!(
            yielding
                .why
                .contains("yielding: foreground latency 5.0 ms vs"),
            "{}",
            yielding.why
        );
        // Held high: down to the minimum, never below. (Held there long
        // enough, the baseline would rise to it: the background is as light
        // as it can be, so the slowness is the foreground's own.)
        let minimum = sim.run(10, 200, SLOW);
        assert_eq!(minimum.reason, PaceReason::Minimum, "{minimum:?}");
        assert_eq!(minimum.rate_bytes_per_s, Some(16 * MIB));
        // The next second goes at the minimum: not below it.
        let held = sim.run(10, 200, SLOW);
        assert_eq!(held.reason, PaceReason::Minimum, "{held:?}");
        let moved = held.background_bytes_per_s;
        assert!((15 * MIB..=17 * MIB).contains(&moved), "{held:?}");
        // The foreground goes away: full speed again.
        let again = sim.run(10, 0, FAST);
        assert_eq!(again.reason, PaceReason::Idle, "{again:?}");
        assert_eq!(again.rate_bytes_per_s, None);
        assert!(
            again.background_bytes_per_s > idle.background_bytes_per_s / 2,
            "{again:?}"
        );
    }

    #[test]
    fn foreground_arriving_gives_way_at_once_then_shares_back_up() {
        let mut sim = Sim::new(config());
        let idle = sim.run(10, 0, FAST);
        let arrived = sim.run(1, 200, FAST);
        let rate = arrived
            .rate_bytes_per_s
            .expect("a rate once foreground arrived");
        assert!(
            rate <= idle.background_bytes_per_s / 2 + MIB,
            "{idle:?} then {arrived:?}"
        );
        let later = sim.run(30, 200, FAST);
        assert_eq!(later.reason, PaceReason::Sharing, "{later:?}");
        assert!(
            later.rate_bytes_per_s.expect("rate") > rate * 2,
            "{arrived:?} then {later:?}"
        );
    }

    #[test]
    fn the_baseline_follows_a_faster_foreground_quickly_and_a_slower_one_slowly() {
        let mut sim = Sim::new(config());
        sim.run(5, 200, SLOW);
        let fast = sim.run(5, 200, FAST);
        assert!(fast.baseline_latency_us < 1000, "{fast:?}");
        // A sudden slowdown is judged against the old baseline, not
        // absorbed into it.
        let slow = sim.run(5, 200, SLOW);
        assert!(slow.baseline_latency_us < 1000, "{slow:?}");
        assert_ne!(slow.reason, PaceReason::Sharing, "{slow:?}");
    }

    #[test]
    fn a_copys_own_minimum_bounds_its_wait() {
        let mut sim = Sim::new(config());
        sim.run(10, 0, FAST);
        sim.run(10, 200, FAST);
        sim.run(10, 200, SLOW);
        let report = sim.pace.report(sim.now);
        assert_eq!(report.reason, PaceReason::Minimum);
        // The queue of reservations at 16 MiB/s is long; a copy guaranteed
        // 64 MiB/s waits at most 1/64 s for its 1 MiB.
        let now = sim.now;
        let queued = sim.pace.reserve(MIB, None, now);
        let guaranteed = sim.pace.reserve(MIB, Some(64 * MIB), now);
        assert!(queued > now, "the queue is empty: {report:?}");
        assert!(guaranteed <= now + Duration::from_secs_f64(1.0 / 64.0));
        assert!(guaranteed >= now);
    }

    #[test]
    fn the_broken_pace_never_yields() {
        let now = Instant::now();
        let pace = PaceController::ignoring_foreground_for_tests(config(), now);
        let mut sim = Sim::with(pace, now);
        sim.run(5, 0, FAST);
        let report = sim.run(20, 200, SLOW);
        assert_eq!(report.reason, PaceReason::Idle);
        assert_eq!(report.rate_bytes_per_s, None);
    }

    #[test]
    fn limits_are_checked() {
        assert!(PaceConfig::default().validate().is_ok());
        let zero = PaceConfig {
            min_bytes_per_s: 0,
            max_bytes_per_s: None,
        };
        assert!(zero.validate().is_err());
        let inverted = PaceConfig {
            min_bytes_per_s: 10,
            max_bytes_per_s: Some(5),
        };
        assert!(
            inverted
                .validate()
                .expect_err("max below min")
                .contains("below the minimum")
        );
    }

    #[test]
    fn rates_and_latencies_read_well() {
        assert_eq!(format_rate(212_000_000), "212 MB/s");
        assert_eq!(format_rate(16 << 20), "16.8 MB/s");
        assert_eq!(format_latency_us(1900), "1.9 ms");
        assert_eq!(format_latency_us(640), "640 µs");
    }
}
