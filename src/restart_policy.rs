//! When to restart a process that ended: the decision shared by the master (for its
//! daemons) and a workflow (for the user's program it hosts). Pure: the clock is passed
//! in as milliseconds of CLOCK_MONOTONIC, which every process of the machine shares, so a
//! workflow's replacement can carry on with its predecessor's policy from a state file.
//!
//! Erlang-like: the first restart is immediate; failures that come quickly after their
//! start back off exponentially (with jitter, so many failing together drift apart); a run
//! that lasted resets the backoff; more than `intensity` restarts within `period` mark the
//! process failed, and it is then retried at the backoff cap — never a tight loop, never a
//! silent give-up.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// A process that lived at least this long had a stable run: its next failure restarts
/// at once again.
pub const STABLE_RUN_MS: u64 = 1000;

/// The knobs, from the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial_ms: u64,
    pub max_ms: u64,
    pub intensity: u32,
    pub period_ms: u64,
}

impl Backoff {
    pub fn of(cfg: &crate::config::Config) -> Backoff {
        Backoff {
            initial_ms: cfg.backoff_initial_ms,
            max_ms: cfg.backoff_max_ms,
            intensity: cfg.restart_intensity,
            period_ms: cfg.restart_period_ms,
        }
    }
}

/// One process slot's restart history.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartPolicy {
    /// When the restarts within the current period happened (monotonic ms).
    recent_ms: VecDeque<u64>,
    /// Quick failures in a row (each lived less than a stable run).
    quick_failures: u32,
    failed: bool,
}

impl RestartPolicy {
    /// Records a restart decided at `now_ms` of a process that ran for `lived_ms`, and
    /// returns how long to wait before it. `jitter` is a number in [0, 1) (0 = none):
    /// a backed-off delay is spread over 75 %–125 % of its nominal value, capped at the max.
    pub fn next_delay(&mut self, b: &Backoff, now_ms: u64, lived_ms: u64, jitter: f64) -> u64 {
        while self
            .recent_ms
            .front()
            .is_some_and(|&t| now_ms.saturating_sub(t) > b.period_ms)
        {
            self.recent_ms.pop_front();
        }
        self.recent_ms.push_back(now_ms);
        if lived_ms >= STABLE_RUN_MS {
            self.quick_failures = 0;
            self.failed = false;
        }
        let nominal = if self.quick_failures == 0 {
            0
        } else {
            let shift = (self.quick_failures - 1).min(20);
            b.initial_ms.saturating_mul(1 << shift).min(b.max_ms)
        };
        self.quick_failures = self.quick_failures.saturating_add(1);
        if self.recent_ms.len() > b.intensity as usize {
            self.failed = true;
            return b.max_ms;
        }
        if nominal == 0 || jitter <= 0.0 {
            return nominal;
        }
        let spread = 0.75 + 0.5 * jitter.min(1.0);
        ((nominal as f64 * spread) as u64).clamp(1, b.max_ms)
    }

    /// Past the intensity limit: retried at the cap until a run lasts.
    pub fn failed(&self) -> bool {
        self.failed
    }

    /// The current run has lasted: it is no longer failing (the restarts stay counted in
    /// the intensity window).
    pub fn forgive(&mut self) {
        self.quick_failures = 0;
        self.failed = false;
    }
}

/// Milliseconds of CLOCK_MONOTONIC: comparable between processes of one boot.
pub fn mono_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Backoff = Backoff {
        initial_ms: 100,
        max_ms: 2000,
        intensity: 4,
        period_ms: 60_000,
    };

    #[test]
    fn first_restart_is_immediate_then_quick_failures_back_off_exponentially() {
        let mut p = RestartPolicy::default();
        let delays: Vec<u64> = (0..4).map(|i| p.next_delay(&B, i * 10, 5, 0.0)).collect();
        assert_eq!(delays, vec![0, 100, 200, 400]);
        assert!(!p.failed());
    }

    #[test]
    fn past_the_intensity_the_slot_is_failed_and_retried_at_the_cap() {
        let mut p = RestartPolicy::default();
        for i in 0..4 {
            p.next_delay(&B, i, 5, 0.0);
        }
        assert_eq!(p.next_delay(&B, 5, 5, 0.0), 2000);
        assert!(p.failed());
        assert_eq!(p.next_delay(&B, 6, 5, 0.0), 2000, "still failed: the cap");
    }

    #[test]
    fn a_stable_run_resets_the_backoff_and_the_failure() {
        let mut p = RestartPolicy::default();
        for i in 0..6 {
            p.next_delay(&B, i, 5, 0.0);
        }
        assert!(p.failed());
        // Restarts older than the period no longer count, and a long run clears the rest.
        let later = 10 * B.period_ms;
        assert_eq!(p.next_delay(&B, later, STABLE_RUN_MS, 0.0), 0);
        assert!(!p.failed());
        assert_eq!(p.next_delay(&B, later + 1, 5, 0.0), 100);
    }

    #[test]
    fn delays_are_capped_even_after_many_quick_failures() {
        let b = Backoff {
            intensity: 1000,
            ..B
        };
        let mut p = RestartPolicy::default();
        let last = (0..40).map(|i| p.next_delay(&b, i, 5, 0.0)).last();
        assert_eq!(last, Some(2000));
    }

    #[test]
    fn jitter_spreads_a_delay_within_a_quarter_and_never_past_the_cap() {
        for j in [0.01, 0.5, 0.99] {
            let mut p = RestartPolicy::default();
            p.next_delay(&B, 0, 5, j);
            let d = p.next_delay(&B, 1, 5, j);
            assert!((75..=125).contains(&d), "jitter {j}: {d}");
        }
        let mut p = RestartPolicy::default();
        let b = Backoff {
            intensity: 1000,
            ..B
        };
        for i in 0..30 {
            assert!(p.next_delay(&b, i, 5, 0.99) <= b.max_ms);
        }
        let mut p = RestartPolicy::default();
        assert_eq!(
            p.next_delay(&B, 0, 5, 0.9),
            0,
            "the first restart stays immediate"
        );
    }

    #[test]
    fn the_policy_survives_a_round_trip_through_json() {
        let mut p = RestartPolicy::default();
        p.next_delay(&B, 3, 5, 0.0);
        let back: RestartPolicy =
            serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
    }
}
