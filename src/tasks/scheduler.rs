//! The queue's decisions, pure: which worker is offered the next task, and why a task
//! that waits is waiting.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::tasks::lifecycle::TaskState;

/// CPU use within one step counts as equal: a sample's noise never outweighs the spread
/// of tasks by `given`.
pub const CPU_STEP_PERMILLE: u32 = 100;

/// A connected worker's load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Load {
    pub worker: u32,
    pub running: u32,
    pub concurrency: u32,
    /// Tasks it has been given since it connected: spreads work over equal workers.
    pub given: u64,
    /// The CPU its tasks used over the last sample, in thousandths of a core.
    pub cpu_permille: u32,
    pub draining: bool,
}

impl Load {
    pub fn free(&self) -> bool {
        !self.draining && self.running < self.concurrency
    }
}

/// The workers that can take a task now, least loaded first: running ÷ concurrency,
/// then the least CPU its tasks use (in steps of `CPU_STEP_PERMILLE`), then the fewest
/// given so far, then the lowest id.
pub fn offer_order(loads: &[Load]) -> Vec<u32> {
    let mut free: Vec<&Load> = loads.iter().filter(|l| l.free()).collect();
    free.sort_by(|a, b| {
        // a.running / a.concurrency < b.running / b.concurrency, without division.
        let lhs = u64::from(a.running) * u64::from(b.concurrency);
        let rhs = u64::from(b.running) * u64::from(a.concurrency);
        let cpu = |l: &Load| l.cpu_permille / CPU_STEP_PERMILLE;
        lhs.cmp(&rhs)
            .then(cpu(a).cmp(&cpu(b)))
            .then(a.given.cmp(&b.given))
            .then(a.worker.cmp(&b.worker))
    });
    free.into_iter().map(|l| l.worker).collect()
}

/// The CPU used between two samples of a worker's tasks' counters (microseconds of CPU
/// by cgroup or process, `cpu::usage`), in thousandths of a core. Only what is in both
/// counts: a task that started or ended in between, or a cgroup made again, is left out
/// rather than taken for a jump or a drop.
pub fn cpu_permille(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
    elapsed: Duration,
) -> u32 {
    let micros = elapsed.as_micros();
    if micros == 0 {
        return 0;
    }
    let used: u128 = after
        .iter()
        .filter_map(|(k, now)| Some(u128::from(now.saturating_sub(*before.get(k)?))))
        .sum();
    u32::try_from(used * 1000 / micros).unwrap_or(u32::MAX)
}

/// What a waiting task waits for.
pub struct Waiting<'a> {
    pub state: TaskState,
    pub required: &'a [String],
    pub not_before_ms: u64,
    /// The state of the task it runs after, if any (None: that task is gone).
    pub after: Option<(i64, Option<TaskState>)>,
}

/// Why a queued or retrying task is not running, in words; None if it could run now.
/// `workers`: each connected worker's capabilities and whether it has room.
pub fn waiting_reason(
    t: &Waiting<'_>,
    now_ms: u64,
    workers: &[(&[String], bool)],
) -> Option<String> {
    if !matches!(t.state, TaskState::Queued | TaskState::Retrying) {
        return None;
    }
    if let Some((id, state)) = t.after {
        match state {
            Some(TaskState::Succeeded) => {}
            Some(s) => {
                return Some(format!(
                    "waiting for task {id} to succeed (it is {})",
                    s.as_str()
                ));
            }
            None => return Some(format!("waiting for task {id}, which is no longer kept")),
        }
    }
    if t.not_before_ms > now_ms {
        let what = if t.state == TaskState::Retrying {
            "backing off before its next attempt"
        } else {
            "held back by --delay-ms"
        };
        return Some(format!("{what}: {} ms to go", t.not_before_ms - now_ms));
    }
    let able: Vec<bool> = workers
        .iter()
        .filter(|(caps, _)| t.required.iter().all(|r| caps.contains(r)))
        .map(|(_, free)| *free)
        .collect();
    if workers.is_empty() {
        return Some(
            "no worker is connected (every workflow hosts a service, or none runs)".into(),
        );
    }
    if able.is_empty() {
        return Some(format!(
            "no worker has the capabilities {} (see `workers` in the config)",
            serde_json::to_string(t.required).unwrap_or_default()
        ));
    }
    if !able.iter().any(|f| *f) {
        return Some(format!(
            "every worker that can run it is busy ({} of them)",
            able.len()
        ));
    }
    Some("about to be dispatched".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(worker: u32, running: u32, concurrency: u32, given: u64) -> Load {
        Load {
            worker,
            running,
            concurrency,
            given,
            cpu_permille: 0,
            draining: false,
        }
    }

    #[test]
    fn among_equally_full_workers_the_one_whose_tasks_use_less_cpu_goes_first() {
        let busy = Load {
            cpu_permille: 950,
            ..load(1, 1, 4, 0)
        };
        let idle = Load {
            cpu_permille: 20,
            ..load(2, 1, 4, 9)
        };
        // Within one step, CPU is noise: the fewest given decides.
        let nearly = Load {
            cpu_permille: 90,
            ..load(3, 1, 4, 3)
        };
        assert_eq!(offer_order(&[busy.clone(), idle.clone()]), vec![2, 1]);
        assert_eq!(offer_order(&[idle, nearly]), vec![3, 2]);
        // Running ÷ concurrency still comes first.
        let emptier = Load {
            cpu_permille: 2000,
            ..load(4, 0, 4, 50)
        };
        assert_eq!(offer_order(&[busy, emptier]), vec![4, 1]);
    }

    #[test]
    fn cpu_counts_only_what_was_sampled_twice() {
        let m = |v: &[(&str, u64)]| -> BTreeMap<String, u64> {
            v.iter().map(|(k, n)| (k.to_string(), *n)).collect()
        };
        let before = m(&[("a", 1_000), ("b", 5_000), ("gone", 9_000)]);
        // a used 0.25 s and b 0.5 s of a 1 s interval; "new" started in between, and
        // "gone" ended: neither counts. A counter that went back (made again) adds nothing.
        let after = m(&[("a", 251_000), ("b", 505_000), ("new", 800_000)]);
        assert_eq!(cpu_permille(&before, &after, Duration::from_secs(1)), 750);
        let reset = m(&[("a", 10)]);
        assert_eq!(cpu_permille(&before, &reset, Duration::from_secs(1)), 0);
        assert_eq!(cpu_permille(&before, &after, Duration::ZERO), 0);
    }

    #[test]
    fn the_least_loaded_relative_to_its_concurrency_goes_first() {
        let loads = [
            load(1, 2, 4, 10), // half full
            load(2, 1, 1, 0),  // full
            load(3, 1, 4, 50), // a quarter
            load(4, 1, 4, 5),  // a quarter, given fewer
            Load {
                draining: true,
                ..load(5, 0, 4, 0)
            },
        ];
        assert_eq!(offer_order(&loads), vec![4, 3, 1]);
    }

    #[test]
    fn reasons_name_what_is_missing() {
        let gpu = vec!["gpu".to_string()];
        let none: Vec<String> = Vec::new();
        let t = Waiting {
            state: TaskState::Queued,
            required: &gpu,
            not_before_ms: 0,
            after: None,
        };
        let r = waiting_reason(&t, 10, &[(&none, true)]).unwrap();
        assert!(
            r.contains("no worker has the capabilities [\"gpu\"]"),
            "{r}"
        );
        let r = waiting_reason(&t, 10, &[(&gpu, false), (&none, true)]).unwrap();
        assert!(r.contains("busy (1 of them)"), "{r}");
        let r = waiting_reason(&t, 10, &[]).unwrap();
        assert!(r.contains("no worker is connected"), "{r}");
        let held = Waiting {
            not_before_ms: 500,
            ..t
        };
        assert!(
            waiting_reason(&held, 10, &[])
                .unwrap()
                .contains("490 ms to go")
        );
        let chained = Waiting {
            state: TaskState::Queued,
            required: &none,
            not_before_ms: 0,
            after: Some((7, Some(TaskState::Running))),
        };
        assert!(
            waiting_reason(&chained, 0, &[])
                .unwrap()
                .contains("task 7 to succeed (it is running)")
        );
        let running = Waiting {
            state: TaskState::Running,
            ..chained
        };
        assert_eq!(waiting_reason(&running, 0, &[]), None);
    }
}
