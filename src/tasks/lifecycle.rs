//! A task's life: one state enum and its transitions, pure (the clock and the random
//! jitter are passed in), so every rule of the queue is unit-tested here and the store
//! and the daemons only carry the results out.
//!
//! `queued` → `running` → `succeeded`; or `retrying` (backoff) → `running` again … until
//! the attempts are spent → `failed`; or `cancelled` from any live state. A worker that
//! dies or hangs mid-task ends the attempt like a failed exit (the attempt is counted):
//! at-least-once execution, one final outcome. A result that arrives for an attempt that
//! is no longer the current one is refused, so a superseded run can never overwrite it.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    Queued,
    Running,
    Retrying,
    Succeeded,
    Failed,
    Cancelled,
}

impl TaskState {
    pub const ALL: [TaskState; 6] = [
        TaskState::Queued,
        TaskState::Running,
        TaskState::Retrying,
        TaskState::Succeeded,
        TaskState::Failed,
        TaskState::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Queued => "queued",
            TaskState::Running => "running",
            TaskState::Retrying => "retrying",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<TaskState> {
        TaskState::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// Succeeded, failed or cancelled: nothing more happens to it unless retried by hand.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            TaskState::Succeeded | TaskState::Failed | TaskState::Cancelled
        )
    }
}

/// Retry backoff: `initial_ms` × 2^(attempt − 1), capped, spread over 75–125 %.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryBackoff {
    pub initial_ms: u64,
    pub max_ms: u64,
}

impl RetryBackoff {
    /// The wait before the attempt after `attempts` failed ones; `jitter` in [0, 1).
    pub fn delay_ms(&self, attempts: u32, jitter: f64) -> u64 {
        let exp = attempts.saturating_sub(1).min(30);
        let nominal = self.initial_ms.saturating_mul(1u64 << exp).min(self.max_ms);
        let spread = 0.75 + 0.5 * jitter.clamp(0.0, 1.0);
        ((nominal as f64 * spread) as u64).min(self.max_ms)
    }
}

/// What a task is now, as far as its life is concerned (the store keeps the rest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Life {
    pub state: TaskState,
    /// Attempts begun so far (the current one included while running).
    pub attempts: u32,
    pub max_attempts: u32,
    /// The attempts one submit (or one retry by hand) grants.
    pub budget: u32,
    /// Not to be started before this (Unix ms): a delay or a retry's backoff.
    pub not_before_ms: u64,
    /// The worker running the current attempt.
    pub worker: Option<u32>,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    pub started_at_ms: Option<u64>,
    pub finished_at_ms: Option<u64>,
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// The program exited with this code (0 is success).
    Exited(i32),
    /// It could not start, or was killed at its timeout.
    Failed(String),
    /// Its worker died or hung, or never confirmed the start: not the task's fault, so it
    /// is re-queued at once (no backoff), but the attempt counts.
    Lost(String),
}

/// Why a transition was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The task is not in a state where this applies (e.g. cancelling a finished task).
    NotNow(TaskState),
    /// A result for an attempt that is no longer the current one: ignored.
    Superseded { current: u32, got: u32 },
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::NotNow(s) => write!(f, "the task is {}", s.as_str()),
            Refused::Superseded { current, got } => {
                write!(
                    f,
                    "a result of attempt {got}, but attempt {current} is the current one"
                )
            }
        }
    }
}

impl Life {
    pub fn new(max_attempts: u32, not_before_ms: u64) -> Life {
        Life {
            state: TaskState::Queued,
            attempts: 0,
            max_attempts: max_attempts.max(1),
            budget: max_attempts.max(1),
            not_before_ms,
            worker: None,
            exit_code: None,
            error: None,
            started_at_ms: None,
            finished_at_ms: None,
        }
    }

    /// Whether it may be started at `now`: queued (or retrying with its backoff over).
    pub fn runnable(&self, now_ms: u64) -> bool {
        matches!(self.state, TaskState::Queued | TaskState::Retrying)
            && now_ms >= self.not_before_ms
    }

    /// A worker starts it: the attempt's number.
    pub fn start(&mut self, worker: u32, now_ms: u64) -> Result<u32, Refused> {
        if !self.runnable(now_ms) {
            return Err(Refused::NotNow(self.state));
        }
        self.state = TaskState::Running;
        self.attempts += 1;
        self.worker = Some(worker);
        self.exit_code = None;
        self.error = None;
        self.started_at_ms = Some(now_ms);
        self.finished_at_ms = None;
        Ok(self.attempts)
    }

    /// Attempt `attempt` ended. Success is final; a failure is retried after a backoff
    /// while attempts remain, else final.
    pub fn end(
        &mut self,
        attempt: u32,
        ending: Ending,
        now_ms: u64,
        backoff: &RetryBackoff,
        jitter: f64,
    ) -> Result<TaskState, Refused> {
        if self.state != TaskState::Running {
            return Err(Refused::NotNow(self.state));
        }
        if attempt != self.attempts {
            return Err(Refused::Superseded {
                current: self.attempts,
                got: attempt,
            });
        }
        // `worker` stays: who ran the last attempt.
        let lost = matches!(ending, Ending::Lost(_));
        let (code, error) = match ending {
            Ending::Exited(c) => (Some(c), (c != 0).then(|| format!("exited with status {c}"))),
            Ending::Failed(e) | Ending::Lost(e) => (None, Some(e)),
        };
        self.exit_code = code;
        self.error = error;
        self.state = if code == Some(0) {
            self.finished_at_ms = Some(now_ms);
            TaskState::Succeeded
        } else if self.attempts < self.max_attempts {
            self.not_before_ms = if lost {
                now_ms
            } else {
                now_ms + backoff.delay_ms(self.attempts, jitter)
            };
            TaskState::Retrying
        } else {
            self.finished_at_ms = Some(now_ms);
            TaskState::Failed
        };
        Ok(self.state)
    }

    /// Cancelled by the user: final at once. Returns the worker to kill, if it was running.
    pub fn cancel(&mut self, now_ms: u64) -> Result<Option<u32>, Refused> {
        if self.state.is_final() {
            return Err(Refused::NotNow(self.state));
        }
        let worker = self
            .worker
            .take()
            .filter(|_| self.state == TaskState::Running);
        self.state = TaskState::Cancelled;
        self.finished_at_ms = Some(now_ms);
        self.error = Some("cancelled".into());
        Ok(worker)
    }

    /// Retried by hand after it failed or was cancelled: queued again with a fresh set of
    /// attempts (the history of the old ones stays in the store).
    pub fn retry(&mut self, now_ms: u64) -> Result<(), Refused> {
        if !matches!(self.state, TaskState::Failed | TaskState::Cancelled) {
            return Err(Refused::NotNow(self.state));
        }
        self.max_attempts = self.attempts + self.budget.max(1);
        self.state = TaskState::Queued;
        self.not_before_ms = now_ms;
        self.exit_code = None;
        self.error = None;
        self.finished_at_ms = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: RetryBackoff = RetryBackoff {
        initial_ms: 1000,
        max_ms: 60_000,
    };

    #[test]
    fn a_task_that_succeeds_first_time() {
        let mut l = Life::new(3, 0);
        assert!(l.runnable(0));
        assert_eq!(l.start(2, 10), Ok(1));
        assert_eq!(l.worker, Some(2));
        assert!(!l.runnable(11), "not started twice");
        assert_eq!(l.start(1, 11), Err(Refused::NotNow(TaskState::Running)));
        assert_eq!(
            l.end(1, Ending::Exited(0), 20, &B, 0.5),
            Ok(TaskState::Succeeded)
        );
        assert_eq!((l.exit_code, l.error.clone()), (Some(0), None));
        assert_eq!(l.finished_at_ms, Some(20));
        assert!(l.state.is_final());
    }

    #[test]
    fn failures_back_off_then_fail_for_good_when_attempts_are_spent() {
        let mut l = Life::new(3, 0);
        l.start(1, 0).unwrap();
        assert_eq!(
            l.end(1, Ending::Exited(2), 100, &B, 0.5),
            Ok(TaskState::Retrying)
        );
        assert_eq!(l.not_before_ms, 100 + 1000);
        assert!(!l.runnable(1099) && l.runnable(1100));
        assert_eq!(l.error.as_deref(), Some("exited with status 2"));
        l.start(1, 1100).unwrap();
        // The worker died: counted as the attempt, backoff doubled.
        assert_eq!(
            l.end(2, Ending::Failed("worker-1 died".into()), 2000, &B, 0.5),
            Ok(TaskState::Retrying)
        );
        assert_eq!(l.not_before_ms, 2000 + 2000);
        assert_eq!(l.start(3, 4000), Ok(3));
        assert_eq!(
            l.end(3, Ending::Exited(1), 5000, &B, 0.5),
            Ok(TaskState::Failed)
        );
        assert_eq!(l.attempts, 3);
        assert_eq!(l.finished_at_ms, Some(5000));
        assert_eq!(l.start(1, 9999), Err(Refused::NotNow(TaskState::Failed)));
    }

    #[test]
    fn a_lost_worker_requeues_at_once_with_the_attempt_counted() {
        let mut l = Life::new(2, 0);
        l.start(1, 0).unwrap();
        assert_eq!(
            l.end(
                1,
                Ending::Lost("worker workflow-1 died".into()),
                50,
                &B,
                0.9
            ),
            Ok(TaskState::Retrying)
        );
        assert_eq!(l.not_before_ms, 50, "no backoff: not the task's fault");
        assert!(l.runnable(50));
        assert_eq!(l.start(2, 50), Ok(2));
        assert_eq!(
            l.end(
                2,
                Ending::Lost("worker workflow-2 died".into()),
                60,
                &B,
                0.9
            ),
            Ok(TaskState::Failed),
            "still bounded by max_attempts"
        );
    }

    #[test]
    fn a_superseded_attempts_result_is_refused() {
        let mut l = Life::new(5, 0);
        l.start(1, 0).unwrap();
        l.end(1, Ending::Failed("worker-1 hung".into()), 10, &B, 0.0)
            .unwrap();
        l.start(2, 10_000).unwrap();
        // The hung worker's run finished after all: too late.
        assert_eq!(
            l.end(1, Ending::Exited(0), 10_001, &B, 0.0),
            Err(Refused::Superseded { current: 2, got: 1 })
        );
        assert_eq!(l.state, TaskState::Running);
        assert_eq!(l.worker, Some(2));
    }

    #[test]
    fn cancel_and_retry() {
        let mut q = Life::new(1, 0);
        assert_eq!(q.cancel(5), Ok(None), "a queued task has nobody to kill");
        assert_eq!(q.state, TaskState::Cancelled);
        assert_eq!(q.cancel(6), Err(Refused::NotNow(TaskState::Cancelled)));
        let mut r = Life::new(1, 0);
        r.start(4, 0).unwrap();
        assert_eq!(r.cancel(5), Ok(Some(4)), "a running one's worker kills it");
        // A late exit of the killed run changes nothing.
        assert_eq!(
            r.end(1, Ending::Exited(0), 6, &B, 0.0),
            Err(Refused::NotNow(TaskState::Cancelled))
        );
        assert_eq!(r.retry(7), Ok(()));
        assert_eq!((r.state, r.max_attempts), (TaskState::Queued, 2));
        assert_eq!(r.start(1, 7), Ok(2));
        // Each retry by hand grants the submit's budget again, no more.
        r.end(2, Ending::Exited(1), 8, &B, 0.5).unwrap();
        r.retry(9).unwrap();
        assert_eq!(r.max_attempts, 3);
        assert_eq!(
            Life::new(1, 0).retry(0),
            Err(Refused::NotNow(TaskState::Queued))
        );
    }

    #[test]
    fn backoff_doubles_is_capped_and_jittered_within_a_quarter() {
        assert_eq!(B.delay_ms(1, 0.5), 1000);
        assert_eq!(B.delay_ms(2, 0.5), 2000);
        assert_eq!(B.delay_ms(4, 0.5), 8000);
        assert_eq!(B.delay_ms(40, 0.5), 60_000);
        assert_eq!(B.delay_ms(1, 0.0), 750);
        assert_eq!(B.delay_ms(1, 0.999_999), 1249);
        assert_eq!(B.delay_ms(40, 0.99), 60_000, "never past the cap");
    }

    #[test]
    fn a_delay_holds_it_back() {
        let mut l = Life::new(1, 5000);
        assert!(!l.runnable(4999));
        assert_eq!(l.start(1, 4999), Err(Refused::NotNow(TaskState::Queued)));
        assert_eq!(l.start(1, 5000), Ok(1));
    }

    #[test]
    fn states_read_back_from_their_names() {
        for s in TaskState::ALL {
            assert_eq!(TaskState::parse(s.as_str()), Some(s));
        }
        assert_eq!(TaskState::parse("done"), None);
    }
}
