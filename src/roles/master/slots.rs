//! A slot and the process in it: one state enum per process, with its transitions in one
//! place, and the master's decisions over slots as pure functions (quorum, stale reports,
//! what `status` shows). No I/O here: everything is unit-tested below.

use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use mio::Token;

use crate::config::{Role, SlotName};
use crate::protocol::{Member, SlotState};
use crate::restart_policy::RestartPolicy;

pub use crate::ledger::Cause;

/// A failure being recovered: opened at detection, closed by the replacement's ready.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Recovery {
    pub cause: Cause,
    pub old_pid: i32,
    pub detected: Instant,
    /// Failure to detection, where something measures it: the silence before a hang was
    /// acted on. A crash has none: the kernel reports it through the pidfd as it happens
    /// and gives no exit timestamp to subtract (chaos and the bench time it from outside).
    pub detect_ms: Option<f64>,
}

/// Why a process was told to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// `nexus restart`: replaced at once, outside the backoff and the failure counts.
    Restart,
    /// Its slot was removed by a scale-down.
    Retire,
}

/// Where a process is in its life, as the master sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ProcState {
    /// Spawned or adopted; no ready message yet. The config changed meanwhile: it is told
    /// (SIGHUP) once ready — before its handlers exist, SIGHUP would kill it.
    Starting {
        reload_when_ready: bool,
    },
    Running,
    /// SIGTERMed on purpose; SIGKILL at `kill_at` if still alive.
    Stopping {
        reason: StopReason,
        kill_at: Option<Instant>,
        was_ready: bool,
    },
    /// Killed for a hang: its exit is the hang's recovery.
    HangKilled {
        recovery: Recovery,
        was_ready: bool,
    },
}

/// A transition the state does not allow: logged and ignored by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused;

impl ProcState {
    pub fn is_ready(&self) -> bool {
        match *self {
            ProcState::Starting { .. } => false,
            ProcState::Running => true,
            ProcState::Stopping { was_ready, .. } | ProcState::HangKilled { was_ready, .. } => {
                was_ready
            }
        }
    }

    /// Its ready message arrived. Returns whether to SIGHUP it now (the config changed
    /// while it was starting).
    pub fn on_ready(&mut self) -> bool {
        match *self {
            ProcState::Starting { reload_when_ready } => {
                *self = ProcState::Running;
                reload_when_ready
            }
            ProcState::Stopping {
                ref mut was_ready, ..
            }
            | ProcState::HangKilled {
                ref mut was_ready, ..
            } => {
                *was_ready = true;
                false
            }
            ProcState::Running => false,
        }
    }

    /// The config changed. Returns whether to SIGHUP it now; a starting one is told later.
    pub fn on_reload(&mut self) -> bool {
        match self {
            ProcState::Starting { reload_when_ready } => {
                *reload_when_ready = true;
                false
            }
            _ => self.is_ready(),
        }
    }

    /// Told to stop (SIGTERM sent), SIGKILL due at `kill_at`. One stop at a time.
    pub fn stop(&mut self, reason: StopReason, kill_at: Instant) -> Result<(), Refused> {
        match *self {
            ProcState::Starting { .. } | ProcState::Running => {
                *self = ProcState::Stopping {
                    reason,
                    kill_at: Some(kill_at),
                    was_ready: self.is_ready(),
                };
                Ok(())
            }
            ProcState::Stopping { .. } | ProcState::HangKilled { .. } => Err(Refused),
        }
    }

    /// A quorum found it hung: it is killed, and its exit is this recovery's.
    pub fn kill_for_hang(&mut self, recovery: Recovery) -> Result<(), Refused> {
        match *self {
            ProcState::HangKilled { .. } => Err(Refused),
            _ => {
                *self = ProcState::HangKilled {
                    recovery,
                    was_ready: self.is_ready(),
                };
                Ok(())
            }
        }
    }

    /// Whether the grace period of a stop has run out: true once, when SIGKILL is due.
    pub fn take_due_kill(&mut self, now: Instant) -> bool {
        match self {
            ProcState::Stopping { kill_at, .. } if kill_at.is_some_and(|t| t <= now) => {
                *kill_at = None;
                true
            }
            _ => false,
        }
    }

    pub fn kill_at(&self) -> Option<Instant> {
        match *self {
            ProcState::Stopping { kill_at, .. } => kill_at,
            _ => None,
        }
    }

    /// What its exit means: the recovery it opens (or closes the hang's).
    pub fn exit_recovery(&self, pid: i32, now: Instant) -> Recovery {
        match *self {
            ProcState::HangKilled { recovery, .. } => recovery,
            ProcState::Stopping {
                reason: StopReason::Restart,
                ..
            } => Recovery {
                cause: Cause::Manual,
                old_pid: pid,
                detected: now,
                detect_ms: None,
            },
            _ => Recovery {
                cause: Cause::Crash,
                old_pid: pid,
                detected: now,
                detect_ms: None,
            },
        }
    }

    fn hang_killed(&self) -> bool {
        matches!(self, ProcState::HangKilled { .. })
    }
}

/// A daemon process the master watches through its pidfd.
pub struct Proc {
    pub pid: i32,
    pub pidfd: OwnedFd,
    /// The pidfd's token in the master's poll.
    pub token: Token,
    /// Spawned by this master, so it may reap it (an adopted one is reaped by init).
    pub ours: bool,
    pub started: Instant,
    /// Wall-clock start, ms since the epoch, for `status`.
    pub started_ms: u64,
    pub state: ProcState,
    /// Watchdogs that reported this pid silent.
    pub votes: Vec<u32>,
}

impl Proc {
    pub fn spawned(pid: i32, pidfd: OwnedFd, token: Token) -> Proc {
        Proc {
            pid,
            pidfd,
            token,
            ours: true,
            started: Instant::now(),
            started_ms: crate::ledger::unix_ms_now(),
            state: ProcState::Starting {
                reload_when_ready: false,
            },
            votes: Vec::new(),
        }
    }

    /// A running daemon found in /proc. It counts as ready, and as old as the timeout,
    /// so that a watchdog which never heard it is believed at once.
    pub fn adopted(pid: i32, pidfd: OwnedFd, token: Token, timeout: Duration) -> Proc {
        let now = Instant::now();
        Proc {
            ours: false,
            started: now.checked_sub(timeout).unwrap_or(now),
            state: ProcState::Running,
            ..Proc::spawned(pid, pidfd, token)
        }
    }
}

/// Who fills a slot.
pub enum Occupant {
    /// The master itself: it cannot watch itself.
    Me {
        pid: i32,
        started_ms: u64,
    },
    Proc(Proc),
}

impl Occupant {
    pub fn pid(&self) -> i32 {
        match self {
            Occupant::Me { pid, .. } => *pid,
            Occupant::Proc(p) => p.pid,
        }
    }

    pub fn is_ready(&self) -> bool {
        match self {
            Occupant::Me { .. } => true,
            Occupant::Proc(p) => p.state.is_ready(),
        }
    }

    pub fn started_ms(&self) -> u64 {
        match self {
            Occupant::Me { started_ms, .. } => *started_ms,
            Occupant::Proc(p) => p.started_ms,
        }
    }
}

pub struct Slot {
    pub name: SlotName,
    pub occupant: Option<Occupant>,
    /// Failures not yet recovered: usually one, more if a replacement died before it
    /// was ready. The next ready process closes them all.
    pub open_recoveries: Vec<Recovery>,
    pub restart_at: Option<Instant>,
    pub policy: RestartPolicy,
    pub restarts: u32,
    pub last_cause: Option<Cause>,
}

impl Slot {
    pub fn new(name: SlotName) -> Slot {
        Slot {
            name,
            occupant: None,
            open_recoveries: Vec::new(),
            restart_at: None,
            policy: RestartPolicy::default(),
            restarts: 0,
            last_cause: None,
        }
    }

    pub fn proc(&self) -> Option<&Proc> {
        match &self.occupant {
            Some(Occupant::Proc(p)) => Some(p),
            _ => None,
        }
    }

    pub fn proc_mut(&mut self) -> Option<&mut Proc> {
        match &mut self.occupant {
            Some(Occupant::Proc(p)) => Some(p),
            _ => None,
        }
    }

    pub fn pid(&self) -> Option<i32> {
        self.occupant.as_ref().map(Occupant::pid)
    }

    pub fn is_ready(&self) -> bool {
        self.occupant.as_ref().is_some_and(Occupant::is_ready)
    }

    pub fn state(&self) -> SlotState {
        match &self.occupant {
            Some(o) if o.is_ready() => SlotState::Running,
            Some(_) => SlotState::Starting,
            None if self.policy.failed() => SlotState::Failed,
            None if self.restart_at.is_some() => SlotState::Backoff,
            None => SlotState::Down,
        }
    }
}

/// Reports needed to kill `subject`: a majority of the watchdogs that can vote — up,
/// not the subject, and not themselves reported silent (two hung watchdogs must not
/// block each other's replacement).
pub fn quorum(slots: &[Slot], subject: SlotName) -> usize {
    let voters = slots
        .iter()
        .filter(|s| s.name.role == Role::Watchdog && s.name != subject)
        .filter_map(Slot::proc)
        .filter(|p| p.state.is_ready() && !p.state.hang_killed() && p.votes.is_empty())
        .count();
    voters / 2 + 1
}

/// A silence report names the last pid its watchdog heard. It is about the current
/// process if it names it, or if the current process is older than the timeout and so
/// should have been heard by now; otherwise it is about a predecessor: stale.
pub fn about_current(report_pid: i32, current_pid: i32, age: Duration, timeout: Duration) -> bool {
    report_pid == current_pid || age >= timeout
}

/// What a silence report does to a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Silence {
    /// About a predecessor, or about a process already being killed: dropped.
    Stale,
    /// One more vote, not yet a majority.
    Counted { votes: usize, quorum: usize },
    /// A majority agrees: kill it.
    Hung,
}

/// Counts `reporter`'s vote against `proc` (pure: the caller kills on `Hung`).
pub fn judge_silence(
    proc: &mut Proc,
    reporter: u32,
    report_pid: i32,
    now: Instant,
    timeout: Duration,
    quorum: usize,
) -> Silence {
    let age = now.saturating_duration_since(proc.started);
    if !about_current(report_pid, proc.pid, age, timeout) || proc.state.hang_killed() {
        return Silence::Stale;
    }
    if !proc.votes.contains(&reporter) {
        proc.votes.push(reporter);
    }
    if proc.votes.len() < quorum {
        Silence::Counted {
            votes: proc.votes.len(),
            quorum,
        }
    } else {
        Silence::Hung
    }
}

/// Every slot as `status` reports it.
pub fn members(slots: &[Slot], master: SlotName) -> Vec<Member> {
    slots
        .iter()
        .map(|s| Member {
            role: s.name.role,
            id: s.name.id,
            pid: s.pid().unwrap_or(0),
            state: s.state(),
            master: s.name == master,
            started_ms: s.occupant.as_ref().map_or(0, Occupant::started_ms),
            restarts: s.restarts,
            last_cause: s.last_cause.map(|c| c.as_str().to_string()),
        })
        .collect()
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub fn fake_fd() -> OwnedFd {
        std::fs::File::open("/dev/null").unwrap().into()
    }

    pub fn proc(pid: i32, state: ProcState) -> Proc {
        Proc {
            state,
            ..Proc::spawned(pid, fake_fd(), Token(7))
        }
    }

    fn slot(role: Role, id: u32, occupant: Option<Occupant>) -> Slot {
        Slot {
            occupant,
            ..Slot::new(SlotName { role, id })
        }
    }

    fn hang(pid: i32) -> Recovery {
        Recovery {
            cause: Cause::Hang,
            old_pid: pid,
            detected: Instant::now(),
            detect_ms: Some(1000.0),
        }
    }

    const STARTING: ProcState = ProcState::Starting {
        reload_when_ready: false,
    };

    #[test]
    fn valid_transitions() {
        let now = Instant::now();
        let mut s = STARTING;
        assert!(!s.on_ready() && s == ProcState::Running);
        assert!(s.stop(StopReason::Restart, now).is_ok());
        assert!(s.is_ready(), "a running process being restarted was ready");
        assert!(s.take_due_kill(now), "the grace has run out");
        assert!(!s.take_due_kill(now), "SIGKILL is sent once");
        assert_eq!(s.exit_recovery(5, now).cause, Cause::Manual);

        let mut s = STARTING;
        assert!(!s.on_reload(), "a starting process is not signalled yet");
        assert!(s.on_ready(), "...but once it is ready");
        assert!(s.on_reload(), "a running one is told at once");

        let mut s = ProcState::Running;
        s.kill_for_hang(hang(5)).unwrap();
        assert_eq!(s.exit_recovery(5, now).cause, Cause::Hang);

        let mut s = ProcState::Running;
        s.stop(StopReason::Restart, now).unwrap();
        s.kill_for_hang(hang(5)).unwrap();
        assert_eq!(
            s.exit_recovery(5, now).cause,
            Cause::Hang,
            "a hang found while restarting is a hang"
        );
    }

    #[test]
    fn invalid_transitions_leave_the_state_unchanged() {
        let now = Instant::now();
        let mut s = ProcState::Running;
        s.stop(StopReason::Retire, now).unwrap();
        let before = s;
        assert_eq!(s.stop(StopReason::Restart, now), Err(Refused));
        assert_eq!(s, before, "one stop at a time");

        let mut s = ProcState::Running;
        s.kill_for_hang(hang(1)).unwrap();
        let before = s;
        assert_eq!(s.kill_for_hang(hang(2)), Err(Refused));
        assert_eq!(s.stop(StopReason::Restart, now), Err(Refused));
        assert_eq!(s, before);
        assert!(!s.take_due_kill(now), "a hang-killed process has no grace");
    }

    #[test]
    fn an_exit_nobody_asked_for_is_a_crash() {
        let now = Instant::now();
        for s in [STARTING, ProcState::Running] {
            let r = s.exit_recovery(9, now);
            assert_eq!((r.cause, r.old_pid), (Cause::Crash, 9));
        }
        let mut retiring = ProcState::Running;
        retiring.stop(StopReason::Retire, now).unwrap();
        assert_eq!(retiring.exit_recovery(9, now).cause, Cause::Crash);
    }

    #[test]
    fn slot_state_is_derived() {
        let mut s = slot(Role::Workflow, 1, None);
        assert_eq!(s.state(), SlotState::Down);
        s.restart_at = Some(Instant::now());
        assert_eq!(s.state(), SlotState::Backoff);
        s.occupant = Some(Occupant::Proc(proc(3, STARTING)));
        assert_eq!(s.state(), SlotState::Starting);
        s.occupant = Some(Occupant::Proc(proc(3, ProcState::Running)));
        assert_eq!(s.state(), SlotState::Running);
        s.occupant = Some(Occupant::Me {
            pid: 1,
            started_ms: 0,
        });
        assert_eq!(s.state(), SlotState::Running);
    }

    #[test]
    fn quorum_is_a_majority_of_the_watchdogs_that_can_vote() {
        let dog = |id, state| {
            slot(
                Role::Watchdog,
                id,
                Some(Occupant::Proc(proc(id as i32, state))),
            )
        };
        let mut slots = vec![
            dog(1, ProcState::Running),
            dog(2, ProcState::Running),
            dog(3, ProcState::Running),
            slot(Role::Workflow, 1, None),
        ];
        let wf = SlotName {
            role: Role::Workflow,
            id: 1,
        };
        assert_eq!(quorum(&slots, wf), 2);
        // Judging a watchdog: the subject does not vote.
        assert_eq!(quorum(&slots, slots[0].name), 2);
        // A watchdog itself reported silent cannot vote: two hung watchdogs must not
        // block each other.
        slots[1].proc_mut().unwrap().votes.push(3);
        assert_eq!(quorum(&slots, wf), 2);
        assert_eq!(quorum(&slots, slots[2].name), 1);
        // Starting (not yet heard) and hang-killed watchdogs do not vote either.
        slots[0].occupant = Some(Occupant::Proc(proc(1, STARTING)));
        slots[2]
            .proc_mut()
            .unwrap()
            .state
            .kill_for_hang(hang(3))
            .unwrap();
        assert_eq!(
            quorum(&slots, wf),
            1,
            "nobody can vote: one report suffices"
        );
    }

    #[test]
    fn silence_reports_about_a_predecessor_are_stale() {
        let t = Duration::from_secs(1);
        assert!(about_current(5, 5, Duration::ZERO, t));
        assert!(
            !about_current(4, 5, Duration::from_millis(10), t),
            "names the old pid"
        );
        assert!(
            about_current(0, 5, t, t),
            "never heard, but old enough to have been"
        );
    }

    #[test]
    fn votes_are_counted_once_each_and_a_majority_kills() {
        let t = Duration::from_secs(1);
        let mut p = proc(5, ProcState::Running);
        let now = p.started + Duration::from_millis(10);
        assert_eq!(
            judge_silence(&mut p, 1, 5, now, t, 2),
            Silence::Counted {
                votes: 1,
                quorum: 2
            }
        );
        assert_eq!(
            judge_silence(&mut p, 1, 5, now, t, 2),
            Silence::Counted {
                votes: 1,
                quorum: 2
            },
            "the same watchdog twice is one vote"
        );
        assert_eq!(judge_silence(&mut p, 2, 5, now, t, 2), Silence::Hung);
        assert_eq!(
            judge_silence(&mut p, 3, 4, now, t, 2),
            Silence::Stale,
            "a report about the predecessor"
        );
        p.state.kill_for_hang(hang(5)).unwrap();
        assert_eq!(
            judge_silence(&mut p, 3, 5, now, t, 2),
            Silence::Stale,
            "already being killed: three reports, one kill"
        );
    }

    #[test]
    fn members_report_every_slot() {
        let me = SlotName {
            role: Role::Communicator,
            id: 1,
        };
        let mut slots = vec![
            slot(
                Role::Communicator,
                1,
                Some(Occupant::Me {
                    pid: 10,
                    started_ms: 5,
                }),
            ),
            slot(Role::Workflow, 1, None),
        ];
        slots[1].restarts = 2;
        slots[1].last_cause = Some(Cause::Hang);
        let m = members(&slots, me);
        assert!(m[0].master && m[0].pid == 10 && m[0].state == SlotState::Running);
        assert_eq!((m[1].pid, m[1].restarts), (0, 2));
        assert_eq!(m[1].last_cause.as_deref(), Some("hang"));
    }
}
