//! A periodic chore that rides on wakes the loop has anyway.
//!
//! On this kind of machine a wake costs more than most chores: a sleeping daemon woken by
//! a timer spends ~60 µs of CPU on the wake alone (a virtual machine's timer and idle
//! exits), more than reading /proc or writing a small file. A hosting workflow had four
//! timers of its own (probe, heartbeat, stopped-program check, stats) and woke for each;
//! a chore instead may run on any wake once `early` of its period has passed and forces a
//! wake only at `late`, so the timers fall into step and one wake serves them all.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub struct Chore {
    /// May run on a wake from this long after the last run …
    early: Duration,
    /// … and the loop wakes for it this long after.
    late: Duration,
    last: Instant,
}

impl Chore {
    /// First due `late` after `now`.
    pub fn new(early: Duration, late: Duration, now: Instant) -> Chore {
        Chore {
            early: early.min(late),
            late,
            last: now,
        }
    }

    /// Changes the window (a reload), keeping the last run.
    pub fn set(&mut self, early: Duration, late: Duration) {
        self.early = early.min(late);
        self.late = late;
    }

    /// Whether to run it on this wake.
    pub fn may_run(&self, now: Instant) -> bool {
        now >= self.last + self.early
    }

    /// When the loop must wake for it.
    pub fn deadline(&self) -> Instant {
        self.last + self.late
    }

    pub fn ran(&mut self, now: Instant) {
        self.last = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chore_runs_on_any_wake_inside_its_window_and_forces_one_at_its_end() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut c = Chore::new(Duration::from_millis(1000), Duration::from_millis(2000), t0);
        assert_eq!(c.deadline(), ms(2000));
        assert!(!c.may_run(ms(999)));
        assert!(c.may_run(ms(1000)));
        c.ran(ms(1300));
        assert_eq!(c.deadline(), ms(3300));
        assert!(!c.may_run(ms(2200)));
        assert!(c.may_run(ms(2300)));
        // An early edge past the late one is the late one.
        c.set(Duration::from_millis(5000), Duration::from_millis(500));
        assert!(c.may_run(ms(1800)));
        assert_eq!(c.deadline(), ms(1800));
    }

    #[test]
    fn timers_of_one_period_fall_into_step() {
        // A probe each second and a chore of window [1 s, 2 s]: after its first run the
        // chore never forces a wake of its own.
        let t0 = Instant::now();
        let mut c = Chore::new(Duration::from_millis(1000), Duration::from_millis(2000), t0);
        let mut own_wakes = 0;
        let mut runs = 0;
        let mut next_probe = t0 + Duration::from_millis(300);
        for _ in 0..100 {
            let wake = next_probe.min(c.deadline());
            if wake == c.deadline() && wake < next_probe {
                own_wakes += 1;
            }
            if c.may_run(wake) {
                c.ran(wake);
                runs += 1;
            }
            if wake >= next_probe {
                next_probe += Duration::from_secs(1);
            }
        }
        assert_eq!(own_wakes, 0);
        assert!(runs >= 45, "{runs}");
    }
}
