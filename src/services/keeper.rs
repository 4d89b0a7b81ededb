//! Keeps every program's output pipes open while their workflow is being replaced, the way
//! systemd's file-descriptor store keeps a service's fds across its restart.
//!
//! A pipe whose last reader closes makes the writer's next write fail with SIGPIPE, which
//! would kill the user's program because nexus lost a daemon. So every communicator (the
//! master and the standbys) and every watchdog holds a read end of each program's stdout
//! and stderr pipes, opened again through /proc from whoever holds one (the hosting
//! workflow, or the program itself), and never reads from it: the bytes stay in the pipe
//! for the successor to take. Watchdogs too, so that the hosting workflow and both
//! communicators failing together (a chaos run SIGKILLed the workflow and the standby
//! while the master was stopped, and the master was then killed for it) still leave
//! keepers.
//! Refreshed each heartbeat from the instance records. An idle refresh costs two system
//! calls whatever the number of programs: the records are read again only when their
//! directory changed, and the programs' ends are learnt from their pidfds in one poll.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, SystemTime};

use crate::runtime_dir::RuntimeDir;
use crate::services::output;
use crate::services::state::{self, Record};

struct Held {
    pid: i32,
    start_ticks: u64,
    /// Readable once the program has ended.
    pidfd: OwnedFd,
    _fds: Vec<OwnedFd>,
}

pub struct PipeKeeper {
    dir: RuntimeDir,
    held: BTreeMap<String, Held>,
    seen: BTreeMap<String, SystemTime>,
    /// The state directory's mtime at the last full scan, and when that scan began.
    scanned: Option<(SystemTime, SystemTime)>,
    /// Refreshes since the last full scan.
    skipped: u32,
}

/// Every this many refreshes the records are read even if their directory looks unchanged
/// (a wall clock stepped back could hide a change from the mtime test).
const FULL_SCAN_EVERY: u32 = 10;

/// A directory changed this close before a scan began may have changed during it: an
/// mtime is as coarse as the kernel's clock tick.
const MTIME_GRACE: Duration = Duration::from_millis(100);

/// Whether the records must be read again: their directory changed since the last scan
/// (or too close to it to tell), or it is time for a full scan anyway. Pure.
fn must_scan(
    mtime: Option<SystemTime>,
    scanned: Option<(SystemTime, SystemTime)>,
    skipped: u32,
) -> bool {
    let (Some(m), Some((seen_m, began))) = (mtime, scanned) else {
        return true;
    };
    m != seen_m || m + MTIME_GRACE >= began || skipped >= FULL_SCAN_EVERY
}

impl PipeKeeper {
    pub fn new(dir: &RuntimeDir) -> PipeKeeper {
        PipeKeeper {
            dir: dir.clone(),
            held: BTreeMap::new(),
            seen: BTreeMap::new(),
            scanned: None,
            skipped: 0,
        }
    }

    /// Picks up new programs' pipes and lets go of ended ones.
    pub fn refresh(&mut self) {
        self.drop_ended();
        let dir = state::state_dir(&self.dir);
        let mtime = std::fs::metadata(&dir).and_then(|m| m.modified()).ok();
        if !must_scan(mtime, self.scanned, self.skipped) {
            self.skipped += 1;
            return;
        }
        let began = SystemTime::now();
        let Ok(entries) = std::fs::read_dir(&dir) else {
            self.held.clear();
            self.scanned = None;
            return;
        };
        self.skipped = 0;
        self.scanned = mtime.map(|m| (m, began));
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
        self.held.retain(|name, _| present.contains(name));
        self.seen.retain(|name, _| present.contains(name));
    }

    /// Lets go of the pipes of programs that have ended: one poll over their pidfds.
    fn drop_ended(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let mut fds: Vec<libc::pollfd> = self
            .held
            .values()
            .map(|h| libc::pollfd {
                fd: h.pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: polling our own fds, without waiting.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 0) };
        if n <= 0 {
            return;
        }
        let ended: Vec<String> = self
            .held
            .keys()
            .zip(&fds)
            .filter(|(_, p)| p.revents != 0)
            .map(|(name, _)| name.clone())
            .collect();
        for name in ended {
            self.held.remove(&name);
            // Its record will change; read it again then.
            self.seen.remove(&name);
        }
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
        // The pidfd first, then the start time: then the pidfd is this very run's.
        let Ok(pidfd) = crate::spawn::pidfd_open(run.pid) else {
            self.held.remove(name);
            return;
        };
        if crate::procscan::start_ticks(run.pid) != Some(run.start_ticks) {
            self.held.remove(name);
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
                    pidfd,
                    _fds: fds,
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_records_are_read_again_only_when_their_directory_may_have_changed() {
        let t = |ms: u64| SystemTime::UNIX_EPOCH + Duration::from_millis(1_000_000 + ms);
        // Never scanned, or no mtime: scan.
        assert!(must_scan(Some(t(0)), None, 0));
        assert!(must_scan(None, Some((t(0), t(5000))), 0));
        // Unchanged since a scan that began well after the last change: skip.
        assert!(!must_scan(Some(t(0)), Some((t(0), t(5000))), 0));
        // Changed: scan.
        assert!(must_scan(Some(t(7000)), Some((t(0), t(5000))), 0));
        // The last change came just before the scan began: it may have raced it.
        assert!(must_scan(Some(t(4950)), Some((t(4950), t(5000))), 0));
        // Unchanged, but a full scan is due.
        assert!(must_scan(
            Some(t(0)),
            Some((t(0), t(5000))),
            FULL_SCAN_EVERY
        ));
    }
}
