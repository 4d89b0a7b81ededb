//! A standby's health check of the master. Watchdogs report silence to the master, so
//! a hung master would go unanswered; instead each standby pings the master's event loop
//! over the control socket every interval, and when it has not answered for the timeout
//! the standby kills it. The kernel then releases the leader lock and a standby takes
//! over, exactly as after a crash.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::client;
use crate::config::Role;
use crate::daemon::DaemonCtx;
use crate::procscan;
use crate::protocol::{Request, Response};
use crate::runtime_dir::LeaderLock;
use crate::spawn;

pub struct MasterWatch {
    control: PathBuf,
    lock: PathBuf,
    dir: PathBuf,
    me: i32,
    interval: Duration,
    timeout: Duration,
    stall: Duration,
    last_ok: Instant,
    last_tick: Instant,
    next_ping: Instant,
}

/// The master we killed for not answering, and how long it had been silent.
#[derive(Debug, Clone, Copy)]
pub struct KilledMaster {
    pub pid: i32,
    pub silent_ms: u64,
}

impl MasterWatch {
    pub fn new(ctx: &DaemonCtx) -> MasterWatch {
        let now = Instant::now();
        MasterWatch {
            control: ctx.dir.control_socket(),
            lock: ctx.dir.leader_lock(),
            dir: ctx.dir.path().to_path_buf(),
            me: ctx.pid,
            interval: ctx.config.interval(),
            timeout: ctx.config.timeout(),
            stall: ctx.config.stall_threshold(),
            last_ok: now,
            last_tick: now,
            next_ping: now + ctx.config.interval(),
        }
    }

    pub fn next_due(&self) -> Instant {
        self.next_ping
    }

    pub fn tick(&mut self, now: Instant) -> Option<KilledMaster> {
        // If we ourselves were stopped or starved, our clock says nothing about the master.
        if now.duration_since(self.last_tick) > self.stall {
            self.last_ok = now;
        }
        self.last_tick = now;
        if now < self.next_ping {
            return None;
        }
        self.next_ping = now + self.interval;
        let wait = (self.interval / 2).min(Duration::from_millis(500));
        if matches!(
            client::request(&self.control, &Request::Ping {}, wait),
            Ok(Response::Ok {})
        ) {
            self.last_ok = Instant::now();
            return None;
        }
        let silent = now.duration_since(self.last_ok);
        if silent < self.timeout {
            return None;
        }
        let pid = LeaderLock::recorded_pid(&self.lock).filter(|&p| p != self.me)?;
        // Only ever a communicator of this very directory, through a pidfd: never a
        // recycled pid.
        let fd = spawn::pidfd_open(pid).ok()?;
        if procscan::daemon_slot(pid, &self.dir).map(|s| s.role) != Some(Role::Communicator) {
            return None;
        }
        log::warn!(
            "master pid {pid} has not answered for {} ms: killing it",
            silent.as_millis()
        );
        spawn::pidfd_signal(&fd, libc::SIGKILL).ok()?;
        self.last_ok = now;
        Some(KilledMaster {
            pid,
            silent_ms: silent.as_millis() as u64,
        })
    }
}
