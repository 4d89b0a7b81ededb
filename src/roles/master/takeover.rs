//! What a new master inherits: the failures its predecessor detected but did not live to
//! recover (read from the ledger), the predecessor's own death, and the slot a daemon
//! re-exec'd from when it took over. Each becomes an open recovery of its slot, closed by
//! the replacement's ready — or closed at once where a live process already fills the slot.

use std::time::Instant;

use super::slots::Recovery;
use super::{Master, round3};
use crate::config::SlotName;
use crate::daemon::DaemonCtx;
use crate::ledger::{Cause, Event, History};
use crate::procscan;

/// What a new master knows about how it came to be one.
pub struct Takeover {
    pub previous: Option<i32>,
    pub previous_slot: Option<SlotName>,
    pub previous_cause: Cause,
    pub hung_ms: u64,
    pub reexeced_from: Option<SlotName>,
    pub me: SlotName,
    pub my_pid: i32,
}

/// The failures slot `name` inherits, given the pid filling it now (`current`) and a test
/// of whether a pid still serves that slot. An empty slot whose last known pid is dead is a
/// failure too, so that no loss goes unrecorded. Pure.
pub fn inherited_failures(
    name: SlotName,
    current: Option<i32>,
    t: &Takeover,
    history: &History,
    still_serves: impl Fn(i32) -> bool,
    now: Instant,
) -> Vec<Recovery> {
    let open = |cause: Cause, old_pid: i32, detect_ms: Option<f64>| Recovery {
        cause,
        old_pid,
        detected: now,
        detect_ms,
    };
    let mut failures: Vec<Recovery> = history
        .unclosed
        .iter()
        .filter(|f| f.slot == name)
        .map(|f| open(f.cause, f.pid, None))
        .collect();
    let known = |pid: i32, f: &[Recovery]| f.iter().any(|r| r.old_pid == pid);
    if Some(name) == t.previous_slot
        && let Some(prev) = t.previous
        && !known(prev, &failures)
    {
        let detect = (t.previous_cause == Cause::Hang).then_some(t.hung_ms as f64);
        failures.push(open(t.previous_cause, prev, detect));
    }
    if Some(name) == t.reexeced_from && !known(t.my_pid, &failures) {
        failures.push(open(Cause::Failover, t.my_pid, None));
    }
    if let Some(&last) = history.last_pid.get(&name)
        && Some(last) != current
        && last != t.my_pid
        && !known(last, &failures)
        && !still_serves(last)
    {
        failures.push(open(Cause::Crash, last, None));
    }
    failures.retain(|r| Some(r.old_pid) != current);
    failures
}

impl Master {
    pub(super) fn reconcile(&mut self, ctx: &DaemonCtx, t: &Takeover, history: &History) {
        let now = Instant::now();
        for i in 0..self.slots.len() {
            let name = self.slots[i].name;
            let current = self.slots[i].pid();
            let still_serves = |pid| procscan::daemon_slot(pid, ctx.dir.path()) == Some(name);
            let failures = inherited_failures(name, current, t, history, still_serves, now);
            match current {
                // A live process already fills the slot (adopted, or ourselves): these
                // failures were recovered before the old master could record it. When it
                // became ready is unknown: no recover_ms.
                Some(pid) => {
                    let detail = if name == t.me {
                        "filled by the new master itself"
                    } else {
                        "replacement adopted by a new master"
                    };
                    for r in failures {
                        self.record_respawn(name, pid, &r, None, Some(detail));
                    }
                }
                None => self.slots[i].open_recoveries = failures,
            }
        }
    }

    /// The one place a recovery is closed: its ledger line and its count.
    pub(super) fn record_respawn(
        &mut self,
        name: SlotName,
        pid: i32,
        rec: &Recovery,
        recover_ms: Option<f64>,
        detail: Option<&str>,
    ) {
        // A restart asked for is recorded as such, never as a failure's recovery.
        let kind = if rec.cause == Cause::Manual {
            "restarted"
        } else {
            "respawned"
        };
        let mut ev = Event::about(kind, name, pid);
        ev.old_pid = Some(rec.old_pid);
        ev.cause = Some(rec.cause.as_str().into());
        ev.detect_ms = rec.detect_ms.map(round3);
        ev.recover_ms = recover_ms;
        ev.detail = detail.map(str::to_string);
        self.ledger.append(&ev);
        self.counters
            .record_recovery(name.role, rec.cause.as_str(), recover_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Role;
    use crate::ledger::Failure;

    fn wf(id: u32) -> SlotName {
        SlotName {
            role: Role::Workflow,
            id,
        }
    }

    fn comm(id: u32) -> SlotName {
        SlotName {
            role: Role::Communicator,
            id,
        }
    }

    fn takeover() -> Takeover {
        Takeover {
            previous: Some(100),
            previous_slot: Some(comm(1)),
            previous_cause: Cause::Failover,
            hung_ms: 0,
            reexeced_from: None,
            me: comm(2),
            my_pid: 200,
        }
    }

    fn pids(f: &[Recovery]) -> Vec<(i32, Cause)> {
        f.iter().map(|r| (r.old_pid, r.cause)).collect()
    }

    #[test]
    fn unrecovered_failures_of_the_old_master_are_inherited() {
        let mut h = History::default();
        h.unclosed.push(Failure {
            slot: wf(3),
            pid: 30,
            cause: Cause::Hang,
        });
        let f = inherited_failures(wf(3), None, &takeover(), &h, |_| false, Instant::now());
        assert_eq!(pids(&f), vec![(30, Cause::Hang)]);
        let other = inherited_failures(wf(2), None, &takeover(), &h, |_| false, Instant::now());
        assert!(other.is_empty());
    }

    #[test]
    fn the_old_master_itself_is_a_failover_or_a_hang() {
        let h = History::default();
        let f = inherited_failures(comm(1), None, &takeover(), &h, |_| false, Instant::now());
        assert_eq!(pids(&f), vec![(100, Cause::Failover)]);
        let hung = Takeover {
            previous_cause: Cause::Hang,
            hung_ms: 6000,
            ..takeover()
        };
        let f = inherited_failures(comm(1), None, &hung, &h, |_| false, Instant::now());
        assert_eq!(pids(&f), vec![(100, Cause::Hang)]);
        assert_eq!(f[0].detect_ms, Some(6000.0));
    }

    #[test]
    fn a_dead_last_pid_nobody_recorded_is_a_crash_but_a_living_one_is_not() {
        let mut h = History::default();
        h.last_pid.insert(wf(1), 11);
        let dead = inherited_failures(wf(1), None, &takeover(), &h, |_| false, Instant::now());
        assert_eq!(pids(&dead), vec![(11, Cause::Crash)]);
        let alive = inherited_failures(wf(1), None, &takeover(), &h, |p| p == 11, Instant::now());
        assert!(alive.is_empty());
        let current =
            inherited_failures(wf(1), Some(11), &takeover(), &h, |_| false, Instant::now());
        assert!(
            current.is_empty(),
            "the current process is not its own failure"
        );
    }

    #[test]
    fn a_daemon_that_reexeced_leaves_its_old_slot_failed_once() {
        let mut h = History::default();
        h.last_pid.insert(wf(4), 200);
        let t = Takeover {
            reexeced_from: Some(wf(4)),
            ..takeover()
        };
        let f = inherited_failures(wf(4), None, &t, &h, |_| false, Instant::now());
        assert_eq!(
            pids(&f),
            vec![(200, Cause::Failover)],
            "once, not also as a crash"
        );
    }
}
