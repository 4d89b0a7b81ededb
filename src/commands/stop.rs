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
        // Nothing of nexus runs (all SIGKILLed, say), but what it ran may: a service's
        // program, a task's, and the tasks' cgroups their dead workers left.
        let programs = sweep_leftovers(dir);
        dir.remove_sockets();
        let _ = std::fs::remove_file(&marker);
        if !quiet {
            if programs > 0 {
                println!(
                    "nexus is not running in {}; {} it had left {} killed",
                    dir.display(),
                    program_processes(programs),
                    if programs == 1 { "was" } else { "were" }
                );
            } else {
                println!("nexus is not running in {}", dir.display());
            }
        }
        return Ok(());
    }
    if master_pid.is_none() {
        master_pid =
            LeaderLock::recorded_pid(&dir.leader_lock()).filter(|p| members.contains_key(p));
    }

    let grace = Duration::from_millis(grace_ms);
    let order = StopOrder::of(dir, grace);
    let mut total = 0;
    let mut forced = 0;
    // A second round catches anything spawned while the first ran (a master that missed
    // the stop request); bounded, as every loop here.
    for _round in 0..3 {
        if members.is_empty() {
            break;
        }
        for phase in 0..order.phases() {
            let pids: Vec<i32> = members
                .iter()
                .filter(|(p, s)| order.phase_of(**p, **s, master_pid) == phase)
                .map(|(p, _)| *p)
                .collect();
            let (stopped, killed) = terminate(&pids, order.wait(phase));
            total += stopped;
            forced += killed;
        }
        members = procscan::daemons_of(dir.path())
            .into_iter()
            .map(|f| (f.pid, f.slot))
            .collect();
    }
    let programs = sweep_leftovers(dir);
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
        let programs = if programs > 0 {
            format!(", {} left over killed", program_processes(programs))
        } else {
            String::new()
        };
        println!(
            "nexus stopped in {ms:.1} ms: {total} daemons{forced}{programs}; sockets removed from {}",
            dir.display()
        );
    }
    Ok(())
}

fn program_processes(n: usize) -> String {
    if n == 1 {
        "1 program process".into()
    } else {
        format!("{n} program processes")
    }
}

/// Kills what the cluster ran and its daemons did not stop, and removes the tasks'
/// cgroups: a program whose workflow had to be killed or whose tree outlived its stop (by
/// the services' records), a task's (by the queue's mark in its environment). Returns
/// how many processes it killed.
fn sweep_leftovers(dir: &RuntimeDir) -> usize {
    let mut programs = sweep_programs(dir);
    if let Ok(cfg) = crate::config::Config::load(&dir.config_file()) {
        let state = cfg
            .state_dir
            .unwrap_or_else(|| crate::tasks::settings::default_state_dir(dir.path()));
        programs += crate::tasks::queue::kill_all_tasks(&state);
    }
    let task_cgroups = crate::tasks::cgroups::sweep_cluster(&crate::services::state::dir_tag(dir));
    if task_cgroups > 0 {
        log::info!("removed {task_cgroups} task cgroups that their workers had left");
    }
    programs
}

/// The order of a stop: the workflows hosting services first, dependents before what
/// they depend on (each given its services' stop grace), then the free workflows, the
/// watchdogs, the standby communicators, and the master last.
struct StopOrder {
    /// Hosting workflow id → its phase (0 = the deepest dependents).
    hosting: BTreeMap<u32, usize>,
    /// Per service phase, the longest stop grace among its services.
    service_waits: Vec<Duration>,
    grace: Duration,
}

impl StopOrder {
    fn of(dir: &RuntimeDir, grace: Duration) -> StopOrder {
        let cfg = crate::config::Config::load(&dir.config_file()).unwrap_or_default();
        let depths = crate::services::spec::depths(&cfg.services);
        let deepest = depths.values().copied().max().unwrap_or(0) as usize;
        let mut hosting = BTreeMap::new();
        let mut service_waits = vec![
            Duration::ZERO;
            if cfg.services.is_empty() {
                0
            } else {
                deepest + 1
            }
        ];
        for (i, inst) in cfg.assignment().into_iter().enumerate() {
            let Some(inst) = inst else { continue };
            let Some(spec) = cfg.service(&inst.service) else {
                continue;
            };
            let phase = deepest - depths.get(&inst.service).copied().unwrap_or(0) as usize;
            hosting.insert(i as u32 + 1, phase);
            // The workflow stops its program within the program's grace, then exits.
            let wait = Duration::from_millis(spec.stop_grace_ms) + grace + Duration::from_secs(1);
            service_waits[phase] = service_waits[phase].max(wait);
        }
        StopOrder {
            hosting,
            service_waits,
            grace,
        }
    }

    fn phases(&self) -> usize {
        self.service_waits.len() + 4
    }

    fn phase_of(&self, pid: i32, slot: SlotName, master: Option<i32>) -> usize {
        let base = self.service_waits.len();
        match slot.role {
            // The API goes first: nothing asks for a change while the rest stops.
            Role::Http => 0,
            Role::Workflow => self.hosting.get(&slot.id).copied().unwrap_or(base),
            Role::Watchdog => base + 1,
            Role::Communicator if Some(pid) != master => base + 2,
            Role::Communicator => base + 3,
        }
    }

    fn wait(&self, phase: usize) -> Duration {
        self.service_waits.get(phase).copied().unwrap_or(self.grace)
    }
}

/// Kills what is left of every service instance's tree (its workflow is gone by now),
/// and removes the instances' cgroups.
fn sweep_programs(dir: &RuntimeDir) -> usize {
    use crate::services::tree::{Identity, Tree};
    let mut killed = 0;
    for rec in crate::services::state::read_all(dir).into_values() {
        if let Some(run) = rec.run {
            let tree = Tree::new(Identity {
                pgid: run.pgid,
                token: run.token,
                cgroup: run.cgroup,
            });
            // Bounded: a tree that keeps forking is killed again, a few times.
            for _ in 0..5 {
                let n = tree.signal_all(libc::SIGKILL);
                killed += n;
                if n == 0 {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        if let Some(cg) = rec.cgroup.as_deref() {
            // Emptied by the kill above; the kernel needs a moment to let the dead go.
            for _ in 0..50 {
                if std::fs::remove_dir(cg).is_ok() || !cg.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
    killed
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
