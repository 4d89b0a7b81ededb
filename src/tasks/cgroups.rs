//! The cgroups a worker's tasks run in: each running task has one to itself, below the
//! workflow's own cgroup, so that `cgroup.kill` ends its whole tree in one write — what
//! called setsid() or double-forked included — when it times out, is cancelled, or its
//! program exits and leaves something behind.
//!
//! A cgroup is made once per concurrency slot and used again by the next task once it is
//! empty: a mkdir and an rmdir on cgroupfs cost 130 µs together here, a tenth of what a
//! no-op task costs the whole cluster. One that had to be killed is made again (the
//! kernel SIGKILLs what is later created in a killed cgroup, see `tree::Cgroup`).
//!
//! Names: `nexus-TAG-task.wN.PID.K`, worker N with pid PID. Dots keep them apart from
//! the services' cgroups (a service's name has none); the pid, from a predecessor's,
//! which this worker sweeps when it starts (a worker that was SIGKILLed leaves them).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::services::tree::{self, Cgroup};

/// How soon a killed cgroup is looked at again (its processes die in microseconds).
const SETTLE: Duration = Duration::from_millis(5);
/// How long a going worker waits for its killed cgroups to empty before it removes them.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

pub struct TaskCgroups {
    /// This worker's names start with it, and only its.
    prefix: String,
    free: Vec<Cgroup>,
    /// Killed with something still in them: made again once empty.
    settling: Vec<Cgroup>,
    /// A predecessor's, killed: removed once empty.
    stale: Vec<PathBuf>,
    made: usize,
    /// False where no cgroup v2 hierarchy is writable, or once a mkdir failed there.
    available: bool,
}

/// The names every worker of a runtime directory gives its tasks' cgroups start with this.
pub fn cluster_prefix(dir_tag: &str) -> String {
    format!("nexus-{dir_tag}-task.")
}

/// The names of the cgroups of worker `worker`'s tasks while it has pid `pid`.
pub fn worker_prefix(dir_tag: &str, worker: u32, pid: i32) -> String {
    format!("{}w{worker}.{pid}.", cluster_prefix(dir_tag))
}

impl TaskCgroups {
    pub fn new(dir_tag: &str, worker: u32, pid: i32) -> TaskCgroups {
        let of_worker = format!("{}w{worker}.", cluster_prefix(dir_tag));
        let mut me = TaskCgroups {
            prefix: worker_prefix(dir_tag, worker, pid),
            free: Vec::new(),
            settling: Vec::new(),
            stale: Vec::new(),
            made: 0,
            available: tree::own_cgroup_dir().is_some(),
        };
        for path in cgroups_named(&of_worker) {
            if !path_has(&path, &me.prefix) {
                log::info!("removing {}, a predecessor's task cgroup", path.display());
                me.stale.push(kill_and_remove(&path));
            }
        }
        me.stale.retain(|p| p.exists());
        me
    }

    /// Where the tasks' cgroups go, for the log: None where there are none.
    pub fn described(&self) -> Option<String> {
        let base = tree::own_cgroup_dir().filter(|_| self.available)?;
        Some(format!("{}/{}K", base.display(), self.prefix))
    }

    /// A cgroup for a task about to start; None where there is none to be had (the task
    /// then has its process group only).
    pub fn take(&mut self) -> Option<Cgroup> {
        if let Some(cg) = self.free.pop() {
            return Some(cg);
        }
        if !self.available {
            return None;
        }
        let name = format!("{}{}", self.prefix, self.made);
        match Cgroup::open(&name) {
            Some(cg) => {
                self.made += 1;
                Some(cg)
            }
            None => {
                log::warn!("cannot make the cgroup {name}: tasks run in process groups only");
                self.available = false;
                None
            }
        }
    }

    /// A task's program was reaped: what is left of its tree is killed, and the cgroup
    /// serves the next task once empty.
    pub fn give_back(&mut self, cg: Cgroup) {
        if cg.clean() && cg.pids().is_empty() {
            self.free.push(cg);
        } else {
            cg.kill();
            self.settling.push(cg);
        }
    }

    /// When `tick` has something to do.
    pub fn deadline(&self) -> Option<Instant> {
        (!self.settling.is_empty() || !self.stale.is_empty()).then(|| Instant::now() + SETTLE)
    }

    pub fn tick(&mut self) {
        let mut still = Vec::new();
        for cg in std::mem::take(&mut self.settling) {
            if !cg.pids().is_empty() || !cg.remove() {
                still.push(cg);
                continue;
            }
            let name = cg
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned());
            match name.and_then(|n| Cgroup::open(&n)) {
                Some(fresh) => self.free.push(fresh),
                None => self.available = false,
            }
        }
        self.settling = still;
        self.stale
            .retain(|p| std::fs::remove_dir(p).is_err() && p.exists());
    }

    /// The worker is going: everything in its cgroups is killed and they are removed.
    pub fn close(&mut self) {
        let mut paths: Vec<PathBuf> = self
            .free
            .drain(..)
            .chain(self.settling.drain(..))
            .map(|cg| kill_and_remove(&cg.path))
            .collect();
        paths.append(&mut self.stale);
        remove_when_empty(paths);
    }
}

impl Drop for TaskCgroups {
    fn drop(&mut self) {
        self.close();
    }
}

/// `./stop`'s last net: the tasks' cgroups of every worker of the cluster, killed and
/// removed (a worker that was SIGKILLed could not). How many there were.
pub fn sweep_cluster(dir_tag: &str) -> usize {
    let paths: Vec<PathBuf> = cgroups_named(&cluster_prefix(dir_tag))
        .iter()
        .map(|p| kill_and_remove(p))
        .collect();
    let n = paths.len();
    remove_when_empty(paths);
    n
}

/// Kills what is in it unless empty, and removes it if it can be now; its path.
fn kill_and_remove(path: &Path) -> PathBuf {
    if let Some(cg) = Cgroup::existing(path)
        && !cg.pids().is_empty()
    {
        cg.kill();
    }
    let _ = std::fs::remove_dir(path);
    path.to_path_buf()
}

fn remove_when_empty(mut paths: Vec<PathBuf>) {
    let deadline = Instant::now() + CLOSE_WAIT;
    paths.retain(|p| p.exists());
    while !paths.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
        paths.retain(|p| std::fs::remove_dir(p).is_err() && p.exists());
    }
    for p in &paths {
        log::warn!("the task cgroup {} could not be removed", p.display());
    }
}

/// The cgroups below ours whose names start with `prefix`.
pub fn cgroups_named(prefix: &str) -> Vec<PathBuf> {
    let Some(base) = tree::own_cgroup_dir() else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(&base) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| path_has(p, prefix))
        .collect()
}

fn path_has(path: &Path, prefix: &str) -> bool {
    path.file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs where a cgroup v2 hierarchy is writable (as root on these machines); says so
    /// and passes elsewhere, where tasks have process groups only.
    #[test]
    fn a_cgroup_is_used_again_once_empty_and_made_again_once_killed() {
        let tag = format!("ut{:x}", std::process::id());
        let mut pool = TaskCgroups::new(&tag, 1, std::process::id() as i32);
        let Some(cg) = pool.take() else {
            eprintln!("no writable cgroup v2 here: nothing to test");
            return;
        };
        let first = cg.path.clone();
        assert!(cg.clean());
        pool.give_back(cg);
        let again = pool.take().unwrap();
        assert_eq!(again.path, first, "an empty cgroup serves the next task");

        // Something left behind: killed, and the cgroup made again before it is reused.
        struct Reaped(std::process::Child);
        impl Drop for Reaped {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let mut sleeper = Reaped(
            std::process::Command::new("sleep")
                .arg("30")
                .spawn()
                .unwrap(),
        );
        std::fs::write(again.path.join("cgroup.procs"), sleeper.0.id().to_string()).unwrap();
        pool.give_back(again);
        let status = sleeper.0.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9)
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while pool.free.is_empty() && Instant::now() < deadline {
            pool.tick();
            std::thread::sleep(Duration::from_millis(2));
        }
        let fresh = pool.take().unwrap();
        assert_eq!(fresh.path, first);
        assert!(fresh.clean(), "made again, so a child may be created in it");
        let second = pool.take().unwrap();
        assert_ne!(second.path, first);

        // A successor sweeps a predecessor's cgroups; closing removes one's own.
        let successor = TaskCgroups::new(&tag, 1, 1);
        assert!(!first.exists() && !second.path.exists());
        drop(successor);
        drop(fresh);
        drop(second);
        drop(pool);
        assert_eq!(sweep_cluster(&tag), 0, "nothing left of the test's cgroups");
    }
}
