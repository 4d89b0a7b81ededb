//! Keeps every program's output pipes open while their workflow is being replaced, the way
//! systemd's file-descriptor store keeps a service's fds across its restart.
//!
//! A pipe whose last reader closes makes the writer's next write fail with SIGPIPE, which
//! would kill the user's program because nexus lost a daemon. So every communicator (the
//! master and the standbys) holds a read end of each program's stdout and stderr pipes,
//! opened again through /proc from whoever holds one (the hosting workflow, or the program
//! itself), and never reads from it: the bytes stay in the pipe for the successor to take.
//! Refreshed each heartbeat from the instance records; a few stats per interval.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::time::SystemTime;

use crate::runtime_dir::RuntimeDir;
use crate::services::output;
use crate::services::state::{self, Record};

struct Held {
    pid: i32,
    start_ticks: u64,
    _fds: Vec<OwnedFd>,
}

pub struct PipeKeeper {
    dir: RuntimeDir,
    held: BTreeMap<String, Held>,
    seen: BTreeMap<String, SystemTime>,
}

impl PipeKeeper {
    pub fn new(dir: &RuntimeDir) -> PipeKeeper {
        PipeKeeper {
            dir: dir.clone(),
            held: BTreeMap::new(),
            seen: BTreeMap::new(),
        }
    }

    /// Picks up new programs' pipes and lets go of ended ones.
    pub fn refresh(&mut self) {
        let Ok(entries) = std::fs::read_dir(state::state_dir(&self.dir)) else {
            self.held.clear();
            return;
        };
        let mut present = Vec::new();
        for e in entries.filter_map(Result::ok) {
            let file = e.file_name().to_string_lossy().into_owned();
            let Some(name) = file.strip_suffix(".json") else {
                continue;
            };
            if name == "desired" || name.starts_with('.') {
                continue;
            }
            present.push(name.to_string());
            let mtime = e.metadata().and_then(|m| m.modified()).ok();
            if mtime.is_some() && self.seen.get(name) == mtime.as_ref() {
                continue;
            }
            if let Some(t) = mtime {
                self.seen.insert(name.to_string(), t);
            }
            let rec: Option<Record> = std::fs::read(e.path())
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            self.take(name, rec);
        }
        self.held.retain(|name, h| {
            present.contains(name) && crate::procscan::start_ticks(h.pid) == Some(h.start_ticks)
        });
        self.seen.retain(|name, _| present.contains(name));
    }

    fn take(&mut self, name: &str, rec: Option<Record>) {
        let Some(run) = rec.as_ref().and_then(|r| r.run.clone()) else {
            self.held.remove(name);
            return;
        };
        if self
            .held
            .get(name)
            .is_some_and(|h| h.pid == run.pid && h.start_ticks == run.start_ticks)
        {
            return;
        }
        let mut holders: Vec<i32> = rec
            .as_ref()
            .and_then(|r| r.host)
            .map(|h| h.pid)
            .into_iter()
            .collect();
        holders.push(run.pid);
        let fds: Vec<OwnedFd> = run
            .pipes
            .iter()
            .filter_map(|&ino| output::reopen_pipe(&holders, ino))
            .collect();
        if !fds.is_empty() {
            self.held.insert(
                name.to_string(),
                Held {
                    pid: run.pid,
                    start_ticks: run.start_ticks,
                    _fds: fds,
                },
            );
        }
    }
}
