//! The life of one service instance as a state machine: every transition in one place,
//! pure (the clock comes in as monotonic milliseconds, shared by every process of the
//! machine, so a workflow's successor carries on from the state file), unit-tested below.
//! The host (`host.rs`) does the I/O each transition asks for.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::child::Ended;
use crate::ledger::Cause;
use crate::restart_policy::{Backoff, RestartPolicy};
use crate::services::spec::RestartMode;

/// What follows a stop that nexus asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AfterStop {
    /// `nexus service stop`: stays stopped.
    Stay,
    /// Started again: `restart` (manual), a hang, or a changed definition (manual).
    Restart(Cause),
    /// The cluster is being stopped, or the instance was removed: the host is done.
    Exit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Phase {
    /// Not started: waiting for its dependencies (or for its first start).
    Waiting,
    /// Running; readiness not yet established.
    Starting,
    Ready,
    /// Ready, but its liveness probe is failing (below the threshold).
    Unhealthy {
        failures: u32,
    },
    /// Being stopped by nexus: `stop_signal` sent, SIGKILL at `kill_at` (monotonic ms).
    Stopping {
        then: AfterStop,
        kill_at: u64,
    },
    /// Waiting to restart at `until`.
    Backoff {
        until: u64,
    },
    /// Crash-looping (retried at the cap, `until`), could not be executed, or exited
    /// with an error under `restart: never` (`until` None: not retried).
    Failed {
        until: Option<u64>,
    },
    /// Stopped by the user: stays stopped, also across failovers, until started.
    Stopped,
    /// Exited cleanly and is not restarted (`restart: on-failure` or `never`).
    Completed,
}

impl Phase {
    /// The name `status` shows.
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Waiting => "waiting",
            Phase::Starting => "starting",
            Phase::Ready => "ready",
            Phase::Unhealthy { .. } => "unhealthy",
            Phase::Stopping { .. } => "stopping",
            Phase::Backoff { .. } => "backoff",
            Phase::Failed { .. } => "failed",
            Phase::Stopped => "stopped",
            Phase::Completed => "completed",
        }
    }

    /// A program of this instance is running.
    pub fn running(&self) -> bool {
        matches!(
            self,
            Phase::Starting | Phase::Ready | Phase::Unhealthy { .. } | Phase::Stopping { .. }
        )
    }

    /// Ready for its dependents (an unhealthy one still is: it was ready and not yet hung).
    pub fn is_ready(&self) -> bool {
        matches!(self, Phase::Ready | Phase::Unhealthy { .. })
    }

    /// When a timer of this phase is due (restart, or SIGKILL after the grace).
    pub fn due(&self) -> Option<u64> {
        match *self {
            Phase::Backoff { until } => Some(until),
            Phase::Failed { until } => until,
            Phase::Stopping { kill_at, .. } => Some(kill_at),
            _ => None,
        }
    }
}

/// What the host must do after a transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Do {
    Nothing,
    /// Start the program now (the hot path after a crash).
    Spawn,
    /// Send `stop_signal` to the tree; SIGKILL follows at the phase's `kill_at`.
    Stop,
    /// SIGKILL the whole tree at once (a hang, or the grace has run out).
    Kill,
    /// The host has nothing left to run (shutdown, or the instance was removed).
    Exit,
}

/// How the last run ended, as `status --json` shows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastExit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// The program died while no workflow hosted it (or it was adopted and is not our
    /// child): its exit status is unknown.
    #[serde(default)]
    pub unknown: bool,
}

impl LastExit {
    pub fn of(ended: Option<Ended>) -> LastExit {
        match ended {
            Some(Ended::Code(c)) => LastExit {
                code: Some(c),
                ..LastExit::default()
            },
            Some(Ended::Signal(s)) => LastExit {
                signal: Some(s),
                ..LastExit::default()
            },
            None => LastExit {
                unknown: true,
                ..LastExit::default()
            },
        }
    }
}

/// The instance's state and history: what the state file carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    pub phase: Phase,
    pub policy: RestartPolicy,
    /// Restarts of every kind, and by cause.
    pub restarts: u32,
    pub by_cause: BTreeMap<Cause, u32>,
    pub last_exit: Option<LastExit>,
    pub last_cause: Option<Cause>,
    /// Why it is failed, or what the last probe said: one line.
    pub last_error: Option<String>,
    /// The cause of the run in progress: closed by `respawned` once it is started.
    #[serde(default)]
    pub pending_cause: Option<Cause>,
}

/// The knobs a transition needs from the spec and the cluster config.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    pub restart: RestartMode,
    pub backoff: Backoff,
    pub stop_grace_ms: u64,
    pub has_ready_probe: bool,
    pub liveness_failures: u32,
}

impl Default for Machine {
    fn default() -> Self {
        Machine::new()
    }
}

impl Machine {
    pub fn new() -> Machine {
        Machine {
            phase: Phase::Waiting,
            policy: RestartPolicy::default(),
            restarts: 0,
            by_cause: BTreeMap::new(),
            last_exit: None,
            last_cause: None,
            last_error: None,
            pending_cause: None,
        }
    }

    /// The program was exec'd.
    pub fn on_started(&mut self, r: &Rules) {
        self.phase = if r.has_ready_probe {
            Phase::Starting
        } else {
            Phase::Ready
        };
        self.last_error = None;
    }

    /// It could not be: failed with the error, retried with backoff (at least the
    /// initial delay: an ENOENT does not fix itself in a microsecond).
    pub fn on_start_failed(&mut self, error: String, r: &Rules, now: u64, jitter: f64) -> Do {
        let delay = self
            .policy
            .next_delay(&r.backoff, now, 0, jitter)
            .max(r.backoff.initial_ms);
        self.last_error = Some(error);
        self.phase = Phase::Failed {
            until: Some(now + delay),
        };
        Do::Nothing
    }

    /// A readiness probe passed (or READY=1, or the log line matched).
    pub fn on_ready(&mut self) {
        if self.phase == Phase::Starting {
            self.phase = Phase::Ready;
            self.last_error = None;
        }
    }

    /// A liveness check's result. Enough failures in a row are a hang: killed, restarted.
    pub fn on_liveness(&mut self, ok: bool, error: Option<String>, r: &Rules, now: u64) -> Do {
        match (self.phase, ok) {
            (Phase::Unhealthy { .. }, true) => {
                self.phase = Phase::Ready;
                Do::Nothing
            }
            (Phase::Ready | Phase::Unhealthy { .. }, false) => {
                let failures = match self.phase {
                    Phase::Unhealthy { failures } => failures + 1,
                    _ => 1,
                };
                self.last_error = error;
                if failures >= r.liveness_failures {
                    self.hang(now)
                } else {
                    self.phase = Phase::Unhealthy { failures };
                    Do::Nothing
                }
            }
            _ => Do::Nothing,
        }
    }

    /// Hung (liveness, watchdog silence, stopped too long): the tree is killed now and the
    /// exit restarts it with cause `hang`.
    pub fn hang(&mut self, now: u64) -> Do {
        if !self.phase.running() || matches!(self.phase, Phase::Stopping { .. }) {
            return Do::Nothing;
        }
        self.phase = Phase::Stopping {
            then: AfterStop::Restart(Cause::Hang),
            kill_at: now,
        };
        Do::Kill
    }

    /// The grace of a stop has run out.
    pub fn on_timer(&mut self, now: u64) -> Do {
        match self.phase {
            Phase::Stopping { kill_at, then } if now >= kill_at => {
                // Once: the next timer is the next grace (a tree that survives SIGKILL is
                // signalled again, not in a tight loop).
                self.phase = Phase::Stopping {
                    then,
                    kill_at: now + 1000,
                };
                Do::Kill
            }
            Phase::Backoff { until } | Phase::Failed { until: Some(until) } if now >= until => {
                Do::Spawn
            }
            _ => Do::Nothing,
        }
    }

    /// The main process ended. `ended` is None when its status is unknown (not our child).
    pub fn on_exit(
        &mut self,
        ended: Option<Ended>,
        lived_ms: u64,
        r: &Rules,
        now: u64,
        jitter: f64,
    ) -> Do {
        self.last_exit = Some(LastExit::of(ended));
        if let Phase::Stopping { then, .. } = self.phase {
            return match then {
                AfterStop::Stay => {
                    self.phase = Phase::Stopped;
                    Do::Nothing
                }
                AfterStop::Exit => Do::Exit,
                AfterStop::Restart(Cause::Hang) => {
                    self.restart(Cause::Hang, lived_ms, r, now, jitter)
                }
                AfterStop::Restart(cause) => {
                    // Asked for: at once, outside the backoff and the failure counts.
                    self.count(cause);
                    self.pending_cause = Some(cause);
                    Do::Spawn
                }
            };
        }
        if !self.phase.running() {
            return Do::Nothing;
        }
        let clean = ended.is_some_and(Ended::clean);
        match (r.restart, clean) {
            (RestartMode::Never | RestartMode::OnFailure, true) => {
                self.phase = Phase::Completed;
                Do::Nothing
            }
            (RestartMode::Never, false) => {
                self.last_cause = Some(Cause::Crash);
                self.last_error = Some(match ended {
                    Some(e) => format!("{} (restart: never)", e.describe()),
                    None => "exited, status unknown (restart: never)".into(),
                });
                self.phase = Phase::Failed { until: None };
                Do::Nothing
            }
            _ => self.restart(Cause::Crash, lived_ms, r, now, jitter),
        }
    }

    fn count(&mut self, cause: Cause) {
        self.restarts += 1;
        *self.by_cause.entry(cause).or_default() += 1;
        self.last_cause = Some(cause);
    }

    /// A failure's restart: at once the first time, then with backoff; past the intensity
    /// limit it is `failed`, retried at the cap.
    fn restart(&mut self, cause: Cause, lived_ms: u64, r: &Rules, now: u64, jitter: f64) -> Do {
        self.count(cause);
        self.pending_cause = Some(cause);
        let delay = self.policy.next_delay(&r.backoff, now, lived_ms, jitter);
        if delay == 0 {
            return Do::Spawn;
        }
        let until = now + delay;
        self.phase = if self.policy.failed() {
            Phase::Failed { until: Some(until) }
        } else {
            Phase::Backoff { until }
        };
        Do::Nothing
    }

    /// `nexus service stop`.
    pub fn user_stop(&mut self, r: &Rules, now: u64) -> Do {
        self.stop(AfterStop::Stay, r, now, Phase::Stopped)
    }

    /// The cluster is stopping, or the instance is gone from the config.
    pub fn shutdown(&mut self, r: &Rules, now: u64) -> Do {
        match self.stop(AfterStop::Exit, r, now, self.phase) {
            Do::Nothing if !self.phase.running() => Do::Exit,
            d => d,
        }
    }

    /// `nexus service restart`, or a changed definition (`reload`).
    pub fn user_restart(&mut self, r: &Rules, now: u64) -> Do {
        if self.phase.running() {
            return self.stop(AfterStop::Restart(Cause::Manual), r, now, self.phase);
        }
        self.user_start()
    }

    /// `nexus service start`: a stopped, failed, completed or backing-off instance starts
    /// (its dependencies permitting); the user asked, so the backoff is forgotten.
    pub fn user_start(&mut self) -> Do {
        match self.phase {
            Phase::Stopped
            | Phase::Failed { .. }
            | Phase::Completed
            | Phase::Backoff { .. }
            | Phase::Waiting => {
                self.policy = RestartPolicy::default();
                self.phase = Phase::Waiting;
                Do::Nothing
            }
            _ => Do::Nothing,
        }
    }

    fn stop(&mut self, then: AfterStop, r: &Rules, now: u64, idle: Phase) -> Do {
        match self.phase {
            Phase::Starting | Phase::Ready | Phase::Unhealthy { .. } => {
                self.phase = Phase::Stopping {
                    then,
                    kill_at: now + r.stop_grace_ms,
                };
                Do::Stop
            }
            Phase::Stopping { kill_at, .. } => {
                // Already stopping: keep its deadline, but what follows is the newest ask.
                self.phase = Phase::Stopping { then, kill_at };
                Do::Nothing
            }
            _ => {
                self.phase = idle;
                Do::Nothing
            }
        }
    }

    /// The state `status` shows: a crash-looping program's retry is still `failed` until
    /// it has run for a while (see `on_stable`).
    pub fn state_name(&self) -> &'static str {
        if self.phase.running() && self.policy.failed() {
            "failed"
        } else {
            self.phase.name()
        }
    }

    /// The current run has lasted a stable run: a failed instance has recovered.
    pub fn on_stable(&mut self) -> bool {
        if self.policy.failed() && self.phase.running() {
            self.policy.forgive();
            return true;
        }
        false
    }

    /// Restarts after failures (crashes and hangs), not the ones asked for.
    pub fn failures(&self) -> u32 {
        self.by_cause
            .iter()
            .filter(|(c, _)| matches!(c, Cause::Crash | Cause::Hang))
            .map(|(_, n)| n)
            .sum()
    }

    /// Waiting, and its dependencies are met (or it has none): start it.
    pub fn may_start(&self) -> bool {
        self.phase == Phase::Waiting
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Backoff = Backoff {
        initial_ms: 100,
        max_ms: 2000,
        intensity: 3,
        period_ms: 60_000,
    };

    fn rules(restart: RestartMode) -> Rules {
        Rules {
            restart,
            backoff: B,
            stop_grace_ms: 500,
            has_ready_probe: true,
            liveness_failures: 3,
        }
    }

    fn running(r: &Rules) -> Machine {
        let mut m = Machine::new();
        m.on_started(r);
        m.on_ready();
        m
    }

    #[test]
    fn start_ready_and_without_a_probe_ready_at_exec() {
        let r = rules(RestartMode::Always);
        let mut m = Machine::new();
        assert!(m.may_start());
        m.on_started(&r);
        assert_eq!(m.phase, Phase::Starting);
        m.on_ready();
        assert_eq!(m.phase, Phase::Ready);
        let mut m = Machine::new();
        m.on_started(&Rules {
            has_ready_probe: false,
            ..r
        });
        assert_eq!(m.phase, Phase::Ready);
    }

    #[test]
    fn a_crash_restarts_at_once_then_backs_off_then_fails_visibly() {
        let r = rules(RestartMode::Always);
        let mut m = running(&r);
        let crash = Some(Ended::Signal(9));
        assert_eq!(m.on_exit(crash, 5, &r, 1000, 0.0), Do::Spawn, "at once");
        assert_eq!(m.pending_cause, Some(Cause::Crash));
        m.on_started(&r);
        assert_eq!(m.on_exit(crash, 5, &r, 1010, 0.0), Do::Nothing);
        assert_eq!(m.phase, Phase::Backoff { until: 1110 });
        assert_eq!(m.on_timer(1100), Do::Nothing);
        assert_eq!(m.on_timer(1110), Do::Spawn);
        m.on_started(&r);
        m.on_exit(crash, 5, &r, 1200, 0.0);
        m.on_started(&r);
        m.on_exit(crash, 5, &r, 1300, 0.0);
        assert_eq!(
            m.phase,
            Phase::Failed { until: Some(3300) },
            "past the intensity: failed at the cap"
        );
        assert_eq!(m.restarts, 4);
        assert_eq!(m.by_cause[&Cause::Crash], 4);
        assert_eq!(m.last_exit.unwrap().signal, Some(9));
    }

    #[test]
    fn restart_modes() {
        let r = rules(RestartMode::OnFailure);
        let mut m = running(&r);
        assert_eq!(
            m.on_exit(Some(Ended::Code(0)), 5000, &r, 1, 0.0),
            Do::Nothing
        );
        assert_eq!(m.phase, Phase::Completed);
        let mut m = running(&r);
        assert_eq!(m.on_exit(Some(Ended::Code(3)), 5000, &r, 1, 0.0), Do::Spawn);
        let mut m = running(&r);
        assert_eq!(
            m.on_exit(None, 5000, &r, 1, 0.0),
            Do::Spawn,
            "unknown is a failure"
        );

        let r = rules(RestartMode::Never);
        let mut m = running(&r);
        m.on_exit(Some(Ended::Code(0)), 5, &r, 1, 0.0);
        assert_eq!(m.phase, Phase::Completed);
        let mut m = running(&r);
        m.on_exit(Some(Ended::Code(2)), 5, &r, 1, 0.0);
        assert_eq!(m.phase, Phase::Failed { until: None });
        assert!(m.last_error.as_deref().unwrap().contains("exit status 2"));
        assert_eq!(m.on_timer(u64::MAX), Do::Nothing, "never retried");

        let r = rules(RestartMode::Always);
        let mut m = running(&r);
        assert_eq!(
            m.on_exit(Some(Ended::Code(0)), 5000, &r, 1, 0.0),
            Do::Spawn,
            "always"
        );
    }

    #[test]
    fn liveness_failures_below_the_threshold_are_unhealthy_then_a_hang() {
        let r = rules(RestartMode::Always);
        let mut m = running(&r);
        assert_eq!(
            m.on_liveness(false, Some("HTTP 503".into()), &r, 10),
            Do::Nothing
        );
        assert_eq!(m.phase, Phase::Unhealthy { failures: 1 });
        assert!(m.phase.is_ready(), "still ready for its dependents");
        assert_eq!(m.on_liveness(true, None, &r, 20), Do::Nothing);
        assert_eq!(m.phase, Phase::Ready, "a pass resets the count");
        for t in 0..2 {
            m.on_liveness(false, None, &r, 30 + t);
        }
        assert_eq!(m.on_liveness(false, None, &r, 40), Do::Kill);
        assert!(matches!(
            m.phase,
            Phase::Stopping {
                then: AfterStop::Restart(Cause::Hang),
                ..
            }
        ));
        assert_eq!(
            m.on_exit(Some(Ended::Signal(9)), 10_000, &r, 50, 0.0),
            Do::Spawn
        );
        assert_eq!(m.last_cause, Some(Cause::Hang));
        assert_eq!(m.by_cause[&Cause::Hang], 1);
    }

    #[test]
    fn a_user_stop_stays_stopped_until_started() {
        let r = rules(RestartMode::Always);
        let mut m = running(&r);
        assert_eq!(m.user_stop(&r, 100), Do::Stop);
        assert_eq!(m.phase.due(), Some(600), "SIGKILL after the grace");
        assert_eq!(m.on_timer(600), Do::Kill);
        assert_eq!(
            m.on_exit(Some(Ended::Signal(15)), 10, &r, 610, 0.0),
            Do::Nothing
        );
        assert_eq!(m.phase, Phase::Stopped);
        assert_eq!(m.on_timer(u64::MAX), Do::Nothing);
        assert_eq!(m.restarts, 0, "a stop is not a restart");
        m.user_start();
        assert!(m.may_start());
        // Stopping something not running just marks it.
        let mut m = Machine::new();
        m.on_start_failed("ENOENT".into(), &r, 0, 0.0);
        assert_eq!(m.user_stop(&r, 1), Do::Nothing);
        assert_eq!(m.phase, Phase::Stopped);
    }

    #[test]
    fn a_manual_restart_is_immediate_and_outside_the_backoff() {
        let r = rules(RestartMode::Always);
        let mut m = running(&r);
        for _ in 0..5 {
            assert_eq!(m.user_restart(&r, 0), Do::Stop);
            assert_eq!(m.on_exit(Some(Ended::Signal(15)), 1, &r, 0, 0.0), Do::Spawn);
            m.on_started(&r);
        }
        assert!(!m.policy.failed(), "manual restarts never mark it failed");
        assert_eq!(m.by_cause[&Cause::Manual], 5);
        let mut m = Machine::new();
        m.phase = Phase::Stopped;
        m.user_restart(&r, 0);
        assert!(m.may_start(), "restarting a stopped service starts it");
    }

    #[test]
    fn a_program_that_cannot_start_is_failed_with_backoff_never_a_tight_loop() {
        let r = rules(RestartMode::Always);
        let mut m = Machine::new();
        m.on_start_failed("cannot execute x: ENOENT".into(), &r, 1000, 0.0);
        assert_eq!(m.phase, Phase::Failed { until: Some(1100) });
        assert!(m.last_error.as_deref().unwrap().contains("ENOENT"));
        assert_eq!(m.on_timer(1100), Do::Spawn);
        m.on_start_failed("again".into(), &r, 1100, 0.0);
        assert_eq!(m.phase, Phase::Failed { until: Some(1200) });
        m.on_started(&r);
        assert_eq!(m.last_error, None, "a start clears the error");
    }

    #[test]
    fn shutdown_ends_the_host_once_the_program_is_gone() {
        let r = rules(RestartMode::Always);
        let mut m = running(&r);
        assert_eq!(m.shutdown(&r, 0), Do::Stop);
        assert_eq!(m.on_exit(Some(Ended::Signal(15)), 1, &r, 1, 0.0), Do::Exit);
        let mut m = Machine::new();
        assert_eq!(m.shutdown(&r, 0), Do::Exit, "nothing running: done at once");
        let mut m = running(&r);
        m.user_stop(&r, 0);
        assert_eq!(
            m.shutdown(&r, 5),
            Do::Nothing,
            "already stopping: the same deadline"
        );
        assert_eq!(m.phase.due(), Some(500));
        assert_eq!(m.on_exit(None, 1, &r, 6, 0.0), Do::Exit);
    }

    #[test]
    fn the_machine_survives_the_state_file() {
        let r = rules(RestartMode::Always);
        let mut m = running(&r);
        m.on_exit(Some(Ended::Code(1)), 5, &r, 10, 0.0);
        m.on_started(&r);
        m.on_exit(Some(Ended::Code(1)), 5, &r, 20, 0.0);
        let text = serde_json::to_string(&m).unwrap();
        let back: Machine = serde_json::from_str(&text).unwrap();
        assert_eq!(back, m);
        assert!(text.contains("\"state\":\"backoff\""), "{text}");
    }
}
