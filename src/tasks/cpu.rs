//! How much CPU a worker's tasks use, for the queue's choice among equally full workers
//! (`scheduler::cpu_permille` makes a rate of two samples). Read by the master once a
//! second while tasks run: their cgroups' `cpu.stat` (each task's whole tree, what left
//! its process group included), or where there are none, their programs' /proc stat
//! (the program and the children it reaped).

use std::collections::BTreeMap;

use crate::procscan;
use crate::tasks::cgroups;

/// Microseconds of CPU by counter: `cg:NAME` for a task cgroup, `pid:N` for a program.
pub fn usage(
    dir_tag: &str,
    worker: u32,
    worker_pid: i32,
    task_pids: &[i32],
) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for path in cgroups::cgroups_named(&cgroups::worker_prefix(dir_tag, worker, worker_pid)) {
        let usec = std::fs::read_to_string(path.join("cpu.stat"))
            .ok()
            .and_then(|s| usage_usec(&s));
        if let (Some(usec), Some(name)) = (usec, path.file_name()) {
            out.insert(format!("cg:{}", name.to_string_lossy()), usec);
        }
    }
    if !out.is_empty() {
        return out;
    }
    let usec_per_tick = 1_000_000 / procscan::clock_ticks_per_sec().max(1);
    for &pid in task_pids.iter().filter(|p| **p > 0) {
        if let Some(ticks) = procscan::tree_cpu_ticks(pid) {
            out.insert(format!("pid:{pid}"), ticks * usec_per_tick);
        }
    }
    out
}

/// `usage_usec` of a cgroup's `cpu.stat` (always there in cgroup v2, controller or not).
fn usage_usec(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_usage_of_a_cgroup_s_cpu_stat() {
        let stat = "usage_usec 1234567\nuser_usec 1000000\nsystem_usec 234567\n";
        assert_eq!(usage_usec(stat), Some(1_234_567));
        assert_eq!(usage_usec("user_usec 5\n"), None);
    }

    #[test]
    fn a_spinning_program_shows_its_cpu_where_there_is_no_cgroup() {
        struct Reaped(std::process::Child);
        impl Drop for Reaped {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let spin = Reaped(
            std::process::Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .spawn()
                .unwrap(),
        );
        let pid = spin.0.id() as i32;
        // No cgroup is named for this worker: the program's own counters are read.
        let tag = "cpu-test-none";
        let before = usage(tag, 1, 1, &[pid]);
        let t0 = std::time::Instant::now();
        let mut rate = 0;
        for _ in 0..150 {
            std::thread::sleep(std::time::Duration::from_millis(20));
            let after = usage(tag, 1, 1, &[pid]);
            rate = crate::tasks::scheduler::cpu_permille(&before, &after, t0.elapsed());
            if rate > 200 {
                break;
            }
        }
        assert!(rate > 200, "a busy loop used {rate}‰ of a core");
    }
}
