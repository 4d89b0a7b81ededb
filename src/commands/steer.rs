//! Steering a running cluster: `restart ROLE-ID`, `reload`, `scale role=N`. Each asks
//! the master, then waits until the change has taken effect, so a script can rely on
//! the exit code.

use std::time::{Duration, Instant};

use super::Common;
use crate::client;
use crate::config::{Config, Role, SlotName};
use crate::protocol::{Request, Response, SlotState, StatusReport};
use crate::runtime_dir::RuntimeDir;

#[inline(never)]
pub fn restart(common: &Common, name: &str) -> Result<(), String> {
    let slot = SlotName::parse(name)
        .ok_or_else(|| format!("`{name}` is not a daemon name (like workflow-3 or watchdog-1)"))?;
    let dir = common.runtime_dir()?;
    let cfg = running_config(&dir)?;
    let before = status(&dir)?;
    let old = before
        .members
        .iter()
        .find(|m| m.slot() == slot)
        .map_or(0, |m| m.pid);
    let t0 = Instant::now();
    for line in ask(
        &dir,
        &Request::Restart {
            role: slot.role,
            id: slot.id,
        },
    )? {
        println!("{line}");
    }
    let within = Duration::from_millis(cfg.stop_grace_ms + cfg.start_timeout_ms);
    let new = wait_for(&dir, within, |r| {
        let m = r.members.iter().find(|m| m.slot() == slot)?;
        (m.pid != old && m.pid > 0 && m.state == SlotState::Running).then_some(m.pid)
    })
    .map_err(|why| {
        format!(
            "{slot} was not back within {} ms: {why}",
            within.as_millis()
        )
    })?;
    println!(
        "{slot} restarted: pid {old} -> {new} in {:.1} ms",
        t0.elapsed().as_secs_f64() * 1000.0
    );
    Ok(())
}

#[inline(never)]
pub fn reload(common: &Common) -> Result<(), String> {
    let cfg = common
        .load_checked_config()
        .map_err(|e| format!("{e}; the running cluster is untouched"))?;
    let dir = RuntimeDir::resolve(common.runtime_dir.as_deref(), cfg.runtime_dir.as_deref());
    let cfg = reloadable(&dir, cfg)?;
    apply(&dir, &cfg)
}

/// A new config for the running cluster, with what cannot change while it runs checked
/// (and the state directory kept when the new one does not name it).
pub fn reloadable(dir: &RuntimeDir, mut cfg: Config) -> Result<Config, String> {
    let running = running_config(dir)?;
    // The queue stays where it is: moving it under running workers would lose tasks.
    match (&cfg.state_dir, &running.state_dir) {
        (None, old) => cfg.state_dir = old.clone(),
        (Some(new), Some(old)) if new != old => {
            return Err(format!(
                "`state_dir` cannot change while the cluster runs (it is {}); stop it first; the running cluster is untouched",
                old.display()
            ));
        }
        _ => {}
    }
    if (&cfg.queue_url, &cfg.queue_host, cfg.queue_lease_ms)
        != (
            &running.queue_url,
            &running.queue_host,
            running.queue_lease_ms,
        )
    {
        return Err("`queue_url`, `queue_host` and `queue_lease_ms` cannot change while the cluster runs: stop it first; the running cluster is untouched".into());
    }
    Ok(cfg)
}

/// `scale workflow=8 watchdog=5 web=3`: the running config with new counts of daemons
/// and of service instances.
#[inline(never)]
pub fn scale(common: &Common, assignments: &[String]) -> Result<(), String> {
    let dir = common.runtime_dir()?;
    let cfg = scaled(&dir, assignments)?;
    apply(&dir, &cfg)
}

/// `web=3` as a name and a count.
pub fn assignment(a: &str) -> Result<(&str, u32), String> {
    let (what, n) = a
        .split_once('=')
        .ok_or_else(|| format!("`{a}` is not NAME=COUNT (like workflow=8 or web=3)"))?;
    let n = n
        .parse()
        .map_err(|_| format!("`{n}` is not a count in `{a}`"))?;
    Ok((what, n))
}

/// The running config with the counts of `assignments` (`workflow=8`, `web=3`), checked
/// as a config file is.
pub fn scaled(dir: &RuntimeDir, assignments: &[String]) -> Result<Config, String> {
    if assignments.is_empty() {
        return Err("scale needs at least one ROLE=COUNT, like workflow=8".into());
    }
    let mut cfg = running_config(dir)?;
    for a in assignments {
        let (what, n) = assignment(a)?;
        if let Some(spec) = cfg.services.iter_mut().find(|s| s.name == what) {
            spec.instances = n;
            continue;
        }
        let role = Role::parse(what.trim_end_matches('s')).ok_or_else(|| {
            let services: Vec<&str> = cfg.services.iter().map(|s| s.name.as_str()).collect();
            format!(
                "unknown role or service `{what}` (roles: communicator, watchdog, workflow{})",
                if services.is_empty() {
                    String::new()
                } else {
                    format!("; services: {}", services.join(", "))
                }
            )
        })?;
        match role {
            Role::Communicator => cfg.communicators = n,
            Role::Watchdog => cfg.watchdogs = n,
            Role::Workflow => cfg.workflows = n,
            Role::Http => {
                return Err(
                    "the http daemon is one or none: set or remove `http.listen` in the config and `nexus reload`"
                        .into(),
                );
            }
        }
    }
    // The same validation as a config file gets: limits, and naming the key at fault.
    Config::parse(&cfg.to_json()).map_err(|e| format!("{e}; the running cluster is untouched"))
}

/// Hands the master a new config; the changes it set in motion, one line each.
pub fn send_config(dir: &RuntimeDir, cfg: &Config) -> Result<Vec<String>, String> {
    ask(
        dir,
        &Request::Reload {
            config: cfg.to_json(),
        },
    )
}

fn apply(dir: &RuntimeDir, cfg: &Config) -> Result<(), String> {
    let t0 = Instant::now();
    for line in send_config(dir, cfg)? {
        println!("  {line}");
    }
    let grace = cfg
        .services
        .iter()
        .map(|s| s.stop_grace_ms)
        .max()
        .unwrap_or(0);
    let within = Duration::from_millis(cfg.stop_grace_ms + grace + cfg.start_timeout_ms);
    wait_whole(dir, cfg, within)?;
    for w in super::service::wait_ready(dir, cfg, t0 + within)? {
        eprintln!("nexus: warning: {w}");
    }
    println!(
        "applied in {:.1} ms: {} communicators, {} watchdogs, {} workflows running",
        t0.elapsed().as_secs_f64() * 1000.0,
        cfg.communicators,
        cfg.watchdogs,
        cfg.workflows,
    );
    if !cfg.services.is_empty() {
        println!("{}", super::service::summary(dir, cfg));
    }
    Ok(())
}

/// Waits until the master reports every slot of `cfg` running and /proc holds exactly
/// that many daemons (nothing retiring, nothing extra).
pub fn wait_whole(dir: &RuntimeDir, cfg: &Config, within: Duration) -> Result<(), String> {
    let total = cfg.total();
    wait_for(dir, within, |r| {
        let ready =
            r.members.len() == total && r.members.iter().all(|m| m.state == SlotState::Running);
        let exact = crate::procscan::daemons_of(dir.path()).len() == total;
        (ready && exact).then_some(())
    })
    .map_err(|why| {
        format!(
            "the cluster did not settle within {} ms: {why}",
            within.as_millis()
        )
    })
}

fn running_config(dir: &RuntimeDir) -> Result<Config, String> {
    status(dir)?;
    Config::load(&dir.config_file()).map_err(|e| e.to_string())
}

fn status(dir: &RuntimeDir) -> Result<StatusReport, String> {
    match client::request(
        &dir.control_socket(),
        &Request::Status {},
        Duration::from_secs(2),
    ) {
        Ok(Response::Status(r)) => Ok(r),
        Ok(other) => Err(format!("unexpected answer from the master: {other:?}")),
        Err(e) => Err(format!("nexus is not running in {} ({e})", dir.display())),
    }
}

fn ask(dir: &RuntimeDir, req: &Request) -> Result<Vec<String>, String> {
    match client::request(&dir.control_socket(), req, Duration::from_secs(5))? {
        Response::Applied { changes } => Ok(changes),
        Response::Error { message, .. } => Err(message),
        other => Err(format!("unexpected answer from the master: {other:?}")),
    }
}

/// Polls the master (every 10 ms, bounded) until `done` yields a value.
fn wait_for<T>(
    dir: &RuntimeDir,
    within: Duration,
    mut done: impl FnMut(&StatusReport) -> Option<T>,
) -> Result<T, String> {
    let deadline = Instant::now() + within;
    let mut why = String::from("no answer yet");
    for _ in 0..1_000_000 {
        match status(dir) {
            Ok(r) => match done(&r) {
                Some(v) => return Ok(v),
                None => {
                    let pending: Vec<String> = r
                        .members
                        .iter()
                        .filter(|m| m.state != SlotState::Running)
                        .map(|m| format!("{} {:?}", m.slot(), m.state).to_lowercase())
                        .collect();
                    why = if pending.is_empty() {
                        "processes still stopping".into()
                    } else {
                        pending.join(", ")
                    };
                }
            },
            Err(e) => why = e,
        }
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(why)
}
