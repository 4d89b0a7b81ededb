//! systemd's notify protocol, spoken by the master: READY=1 once the cluster is whole,
//! WATCHDOG=1 every half WATCHDOG_USEC, STATUS= with the counts, STOPPING=1. Under
//! `Type=notify` with `NotifyAccess=all`, whichever communicator is master sends them,
//! so the unit stays up across failovers (see runtime/nexus.service).

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::{Duration, Instant};

pub struct Notifier {
    sock: UnixDatagram,
    addr: SocketAddr,
    watchdog_every: Option<Duration>,
    next_watchdog: Instant,
    last_status: String,
}

impl Notifier {
    /// None unless NOTIFY_SOCKET is set (a path, or `@name` in the abstract namespace).
    pub fn from_env() -> Option<Notifier> {
        let target = std::env::var("NOTIFY_SOCKET")
            .ok()
            .filter(|s| !s.is_empty())?;
        let addr = match target.strip_prefix('@') {
            Some(name) => SocketAddr::from_abstract_name(name.as_bytes()).ok()?,
            None => SocketAddr::from_pathname(&target).ok()?,
        };
        let sock = UnixDatagram::unbound().ok()?;
        sock.set_nonblocking(true).ok()?;
        let watchdog_every = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|&us| us > 0)
            .map(|us| Duration::from_micros(us / 2));
        Some(Notifier {
            sock,
            addr,
            watchdog_every,
            next_watchdog: Instant::now(),
            last_status: String::new(),
        })
    }

    fn send(&self, msg: &str) {
        if let Err(e) = self.sock.send_to_addr(msg.as_bytes(), &self.addr) {
            log::debug!("systemd notify failed: {e}");
        }
    }

    pub fn ready(&mut self, status: &str) {
        self.last_status = status.to_string();
        self.send(&format!("READY=1\nSTATUS={status}"));
    }

    pub fn status(&mut self, status: &str) {
        if status != self.last_status {
            self.last_status = status.to_string();
            self.send(&format!("STATUS={status}"));
        }
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=stopping");
    }

    /// When the next watchdog ping is due, if systemd asked for them.
    pub fn next_due(&self) -> Option<Instant> {
        self.watchdog_every.map(|_| self.next_watchdog)
    }

    /// Pings from the master's loop: if the loop hangs the pings stop, and systemd acts
    /// (set WatchdogSec above two of our timeouts, so nexus's own failover comes first).
    pub fn tick(&mut self, now: Instant) {
        let Some(every) = self.watchdog_every else {
            return;
        };
        if now >= self.next_watchdog {
            self.send("WATCHDOG=1");
            self.next_watchdog = now + every;
        }
    }
}
