//! `nexus stop`: workflows, then watchdogs, then standby communicators, then the master;
//! SIGTERM, a grace period, SIGKILL. Works from /proc when the master cannot answer.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use super::Common;
use crate::client;
use crate::config::{Role, SlotName};
use crate::procscan;
use crate::protocol::{Request, Response};
use crate::runtime_dir::{LeaderLock, RuntimeDir};
use crate::spawn;

#[inline(never)]
pub fn run(common: &Common) -> Result<(), String> {
    let dir = common.runtime_dir()?;
    if !dir.exists() {
        println!(
            "nexus is not running (no runtime directory {})",
            dir.display()
        );
        return Ok(());
    }
    dir.check()?;
    // The running cluster's own config; the user's only if that is unreadable.
    let grace = crate::config::Config::load(&dir.config_file())
        .or_else(|_| common.load_config())
        .map_or(2000, |c| c.stop_grace_ms);
    stop_dir(&dir, grace, false)
}

/// Stops every daemon of `dir`. `quiet` for use inside `start`'s failure path.
pub fn stop_dir(dir: &RuntimeDir, grace_ms: u64, quiet: bool) -> Result<(), String> {
    let t0 = Instant::now();
    let marker = dir.stopping_marker();
    let _ = std::fs::write(&marker, b"");
    let reply = client::request(
        &dir.control_socket(),
        &Request::Stop {},
        Duration::from_secs(2),
    );
    let mut master_pid = match &reply {
        Ok(Response::Stopping { master_pid, .. }) => Some(*master_pid),
        _ => None,
    };
    if let (Err(e), false) = (&reply, quiet)
        && dir.control_socket().exists()
    {
        eprintln!("nexus: the master did not answer ({e}); stopping the daemons found in /proc");
    }
    let mut members: BTreeMap<i32, SlotName> = BTreeMap::new();
    if let Ok(Response::Stopping { members: m, .. }) = &reply {
        for mem in m.iter().filter(|m| m.pid > 0) {
            if procscan::daemon_slot(mem.pid, dir.path()) == Some(mem.slot()) {
                members.insert(mem.pid, mem.slot());
            }
        }
    }
    for f in procscan::daemons_of(dir.path()) {
        members.insert(f.pid, f.slot);
    }
    if members.is_empty() {
        dir.remove_sockets();
        let _ = std::fs::remove_file(&marker);
        if !quiet {
            println!("nexus is not running in {}", dir.display());
        }
        return Ok(());
    }
    if master_pid.is_none() {
        master_pid =
            LeaderLock::recorded_pid(&dir.leader_lock()).filter(|p| members.contains_key(p));
    }

    let grace = Duration::from_millis(grace_ms);
    let mut total = 0;
    let mut forced = 0;
    // A second round catches anything spawned while the first ran (a master that missed
    // the stop request); bounded, as every loop here.
    for _round in 0..3 {
        if members.is_empty() {
            break;
        }
        let phase_of = |pid: &i32, slot: &SlotName| match slot.role {
            Role::Workflow => 0,
            Role::Watchdog => 1,
            Role::Communicator if Some(*pid) != master_pid => 2,
            Role::Communicator => 3,
        };
        for phase in 0..4 {
            let pids: Vec<i32> = members
                .iter()
                .filter(|(p, s)| phase_of(p, s) == phase)
                .map(|(p, _)| *p)
                .collect();
            let (stopped, killed) = terminate(&pids, grace);
            total += stopped;
            forced += killed;
        }
        members = procscan::daemons_of(dir.path())
            .into_iter()
            .map(|f| (f.pid, f.slot))
            .collect();
    }
    dir.remove_sockets();
    let _ = std::fs::remove_file(&marker);
    if !members.is_empty() {
        return Err(format!(
            "{} daemons of {} could not be stopped: {:?}",
            members.len(),
            dir.display(),
            members
        ));
    }
    if !quiet {
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        let forced = if forced > 0 {
            format!(", {forced} needed SIGKILL")
        } else {
            String::new()
        };
        println!(
            "nexus stopped in {ms:.1} ms: {total} daemons{forced}; sockets removed from {}",
            dir.display()
        );
    }
    Ok(())
}

/// SIGTERM to each, wait up to `grace`, SIGKILL the rest, wait for them. Returns
/// (processes that ended, how many needed SIGKILL).
fn terminate(pids: &[i32], grace: Duration) -> (usize, usize) {
    let fds: Vec<OwnedFd> = pids
        .iter()
        .filter_map(|&p| spawn::pidfd_open(p).ok())
        .collect();
    for fd in &fds {
        let _ = spawn::pidfd_signal(fd, libc::SIGTERM);
    }
    let mut alive = wait_all(fds, grace);
    let forced = alive.len();
    for fd in &alive {
        let _ = spawn::pidfd_signal(fd, libc::SIGKILL);
    }
    alive = wait_all(alive, Duration::from_secs(5));
    (pids.len() - alive.len(), forced)
}

/// Waits until every pidfd has exited or the time is up; returns those still alive.
fn wait_all(mut fds: Vec<OwnedFd>, limit: Duration) -> Vec<OwnedFd> {
    let deadline = Instant::now() + limit;
    while !fds.is_empty() {
        fds.retain(|fd| !spawn::has_exited(fd));
        let left = deadline.saturating_duration_since(Instant::now());
        if fds.is_empty() || left.is_zero() {
            break;
        }
        let mut pfds: Vec<libc::pollfd> = fds
            .iter()
            .map(|fd| libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: pfds is a valid array of pollfd for its length.
        unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
    }
    fds
}
