//! Pacing of bulk work to a byte rate, so that a backup or a resync leaves
//! the database its share of CPU and disk. Each caller reserves the time its
//! bytes take at the rate, and waits until the reservations before it have
//! passed; concurrent callers share one rate.

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
}
