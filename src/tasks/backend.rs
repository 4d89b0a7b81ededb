//! What the queue's owner asks of a store, whichever database holds the queue: SQLite in
//! the state directory (`store`), or PostgreSQL shared by several hosts (`postgres`).
//!
//! Every change is one transaction, and decides through `lifecycle::Life`, so both
//! backends make the same decisions; they differ in who else writes (nobody, or the other
//! hosts' queue owners) and so in what `running` and `heartbeat` mean.

use crate::tasks::lifecycle::{Ending, TaskState};
use crate::tasks::store::{AttemptRow, Durability, NewTask, Retry, StoreError, TaskRow};

/// A task this host runs, as stored: id, attempt, worker, worker pid, program pid.
pub type RunningTask = (i64, u32, u32, Option<i32>, Option<i32>);

/// What renewing this host's lease found (a shared queue only).
#[derive(Debug, Default, PartialEq)]
pub struct Heartbeat {
    /// Our lease had expired and the others re-queued what we ran: every attempt this
    /// host still runs is superseded.
    pub superseded: bool,
    /// Tasks of dead hosts that this host re-queued: id, attempt, the dead host, the
    /// task's new state.
    pub requeued: Vec<(i64, u32, String, TaskState)>,
}

/// Every state with its count, from a `GROUP BY state` (states with no task count 0).
pub fn every_state(got: &[(String, i64)]) -> Vec<(TaskState, u64)> {
    TaskState::ALL
        .into_iter()
        .map(|s| {
            let n = got
                .iter()
                .find(|(name, _)| name == s.as_str())
                .map_or(0, |(_, n)| (*n).max(0) as u64);
            (s, n)
        })
        .collect()
}

pub trait Backend: Send {
    /// Groups the changes that follow into one commit, until `commit_batch` (a store
    /// that cannot may commit each change on its own).
    fn begin_batch(&mut self) -> Result<(), StoreError>;
    fn commit_batch(&mut self) -> Result<(), StoreError>;
    /// How the changes that follow are committed.
    fn set_durability(&mut self, d: Durability) -> Result<(), StoreError>;

    /// Stores a new task, queued: its id.
    fn submit(&mut self, t: &NewTask, now_ms: u64) -> Result<i64, StoreError>;
    fn get(&mut self, id: i64) -> Result<TaskRow, StoreError>;
    /// Tasks in id order, optionally of one state: a page of at most `limit` after `after_id`.
    fn list(
        &mut self,
        state: Option<TaskState>,
        after_id: i64,
        limit: u32,
    ) -> Result<Vec<TaskRow>, StoreError>;
    /// How many tasks are in each state.
    fn counts(&mut self) -> Result<Vec<(TaskState, u64)>, StoreError>;
    /// Starts the best task `worker` can run at `now`: the highest priority, oldest first,
    /// among those whose required capabilities it has and whose `after` task succeeded.
    /// Returns it with its attempt number.
    fn claim(
        &mut self,
        worker: u32,
        worker_pid: i32,
        capabilities: &[String],
        now_ms: u64,
    ) -> Result<Option<(TaskRow, u32)>, StoreError>;
    /// Attempt `attempt` of task `id` ended: the task's new state.
    fn finish(
        &mut self,
        id: i64,
        attempt: u32,
        ending: Ending,
        result: Option<&str>,
        now_ms: u64,
        retry: &Retry,
    ) -> Result<TaskState, StoreError>;
    /// Cancels a live task: the worker of this host running it, if any (to be killed). One
    /// running on another host is killed there.
    fn cancel(&mut self, id: i64, now_ms: u64) -> Result<Option<u32>, StoreError>;
    /// Every task this host runs.
    fn running(&mut self) -> Result<Vec<RunningTask>, StoreError>;
    /// When the next waiting task (delayed, or backing off) becomes runnable, if later
    /// than `now_ms`.
    fn next_due_ms(&mut self, now_ms: u64) -> Result<Option<u64>, StoreError>;
    /// Whether any task waits to be run now (by someone).
    fn any_runnable(&mut self, now_ms: u64) -> Result<bool, StoreError>;
    fn attempts(&mut self, id: i64) -> Result<Vec<AttemptRow>, StoreError>;
    /// For the metrics: each first attempt's wait (submit to start) and each finished
    /// attempt's run time, in seconds, over the tasks kept.
    fn durations(&mut self) -> Result<(Vec<f64>, Vec<f64>), StoreError>;
    /// Removes finished tasks beyond the newest `keep` and those finished before
    /// `older_than_ms`: their ids (their logs go too).
    fn prune(&mut self, keep: u64, older_than_ms: u64) -> Result<Vec<i64>, StoreError>;
    /// Queues a failed or cancelled task again, with a fresh set of attempts.
    fn retry(&mut self, id: i64, now_ms: u64) -> Result<(), StoreError>;

    /// Renews this host's lease and re-queues the tasks of hosts whose lease expired (a
    /// shared queue; a queue of one host has nobody else to watch).
    fn heartbeat(&mut self, _now_ms: u64, _retry: &Retry) -> Result<Heartbeat, StoreError> {
        Ok(Heartbeat::default())
    }
}
