//! The master's counters for `nexus metrics`: restarts by role and cause, a histogram of
//! recovery times, leader changes. Kept in memory by the master and carried across a
//! failover by re-reading the ledger, which records every one of these events.

use serde::{Deserialize, Serialize};

use crate::config::Role;

/// Upper bounds of the recovery-time histogram, in seconds (detection → ready).
pub const BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    pub restarts: Vec<RestartCount>,
    /// Cumulative counts per bucket of `BUCKETS` (Prometheus `le` semantics).
    pub recovery_buckets: Vec<u64>,
    pub recovery_count: u64,
    pub recovery_sum_s: f64,
    pub leader_changes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestartCount {
    pub role: Role,
    pub cause: String,
    pub count: u64,
}

impl Counters {
    /// One recovery closed: a replacement of `role` is ready after a failure of `cause`.
    pub fn record_recovery(&mut self, role: Role, cause: &str, recover_ms: Option<f64>) {
        match self
            .restarts
            .iter_mut()
            .find(|r| r.role == role && r.cause == cause)
        {
            Some(r) => r.count += 1,
            None => self.restarts.push(RestartCount {
                role,
                cause: cause.to_string(),
                count: 1,
            }),
        }
        self.restarts
            .sort_by(|a, b| (a.role, &a.cause).cmp(&(b.role, &b.cause)));
        if let Some(ms) = recover_ms {
            let s = ms / 1000.0;
            self.recovery_buckets.resize(BUCKETS.len(), 0);
            for (bound, n) in BUCKETS.iter().zip(self.recovery_buckets.iter_mut()) {
                if s <= *bound {
                    *n += 1;
                }
            }
            self.recovery_count += 1;
            self.recovery_sum_s += s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let mut c = Counters::default();
        c.record_recovery(Role::Workflow, "crash", Some(2.0));
        c.record_recovery(Role::Workflow, "crash", Some(300.0));
        c.record_recovery(Role::Watchdog, "hang", None);
        assert_eq!(c.recovery_buckets[0], 0); // 1 ms
        assert_eq!(c.recovery_buckets[1], 1); // 2.5 ms
        assert_eq!(c.recovery_buckets[8], 2); // 500 ms
        assert_eq!(c.recovery_count, 2);
        assert_eq!(c.restarts.len(), 2);
        assert_eq!(
            c.restarts[1],
            RestartCount {
                role: Role::Workflow,
                cause: "crash".into(),
                count: 2
            }
        );
    }
}
