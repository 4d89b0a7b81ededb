//! `nexus service start|stop|restart NAME[-N]`, and what `start` and the other steering
//! commands share about services: waiting until instances are ready, and explaining one
//! that is not (its state, its probe's last error, its last exit, its log's last lines).

use std::time::{Duration, Instant};

use super::Common;
use crate::client;
use crate::config::Config;
use crate::protocol::{Request, Response, ServiceAction};
use crate::runtime_dir::RuntimeDir;
use crate::services::machine::Phase;
use crate::services::spec::InstanceName;
use crate::services::state::{self, Record};

#[inline(never)]
pub fn run(common: &Common, action: &str, target: &str) -> Result<(), String> {
    let action = match action {
        "start" => ServiceAction::Start,
        "stop" => ServiceAction::Stop,
        "restart" => ServiceAction::Restart,
        other => {
            return Err(format!(
                "`service {other}`: the actions are start, stop and restart"
            ));
        }
    };
    let dir = common.runtime_dir()?;
    let cfg = Config::load(&dir.config_file())
        .map_err(|_| format!("nexus is not running in {}", dir.display()))?;
    let names = crate::services::spec::targets(&cfg.services, target)?;
    let before = state::read_all(&dir);
    let t0 = Instant::now();
    let reply = client::request(
        &dir.control_socket(),
        &Request::Service {
            action,
            target: target.to_string(),
        },
        Duration::from_secs(5),
    )
    .map_err(|e| format!("nexus is not running in {} ({e})", dir.display()))?;
    match reply {
        Response::Applied { changes } => {
            for c in changes {
                println!("{c}");
            }
        }
        Response::Error { message, .. } => return Err(message),
        other => return Err(format!("unexpected answer from the master: {other:?}")),
    }
    let grace = names
        .iter()
        .filter_map(|n| cfg.service(&n.service))
        .map(|s| s.stop_grace_ms)
        .max()
        .unwrap_or(0);
    let within = Duration::from_millis(grace + cfg.start_timeout_ms);
    let deadline = Instant::now() + within;
    let done = |r: &Record, old: Option<&Record>| match action {
        ServiceAction::Stop => r.machine.phase == Phase::Stopped,
        ServiceAction::Start => settled(r),
        ServiceAction::Restart => {
            let old_pid = old.and_then(|o| o.run.as_ref()).map(|x| x.pid);
            let new_pid = r.run.as_ref().map(|x| x.pid);
            settled(r) && (new_pid != old_pid || r.machine.phase == Phase::Completed)
        }
    };
    loop {
        let now = state::read_all(&dir);
        let pending: Vec<&InstanceName> = names
            .iter()
            .filter(|n| {
                let key = n.to_string();
                !now.get(&key).is_some_and(|r| done(r, before.get(&key)))
            })
            .collect();
        if pending.is_empty() {
            break;
        }
        let failed = pending
            .iter()
            .find(|n| now.get(&n.to_string()).is_some_and(|r| is_failed(r)));
        if let Some(n) = failed.filter(|_| action != ServiceAction::Stop) {
            return Err(explain(&dir, n, now.get(&n.to_string())));
        }
        if Instant::now() >= deadline {
            let n = pending[0];
            return Err(format!(
                "not done within {} ms: {}",
                within.as_millis(),
                explain(&dir, n, now.get(&n.to_string()))
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let after = state::read_all(&dir);
    for n in &names {
        let r = after.get(&n.to_string());
        println!(
            "{n}: {}{}",
            r.map_or("unknown", |r| r.machine.phase.name()),
            r.and_then(|r| r.run.as_ref())
                .map_or(String::new(), |run| format!(" (pid {})", run.pid))
        );
    }
    println!("done in {:.1} ms", t0.elapsed().as_secs_f64() * 1000.0);
    Ok(())
}

/// Ready, or done for good (completed), or deliberately stopped.
fn settled(r: &Record) -> bool {
    r.machine.phase.is_ready() || matches!(r.machine.phase, Phase::Completed)
}

fn is_failed(r: &Record) -> bool {
    matches!(r.machine.phase, Phase::Failed { .. })
}

/// Waits until every instance of `cfg` is ready (or completed). `fail_fast`: an instance
/// that is `failed` ends the wait at once. The error explains the first one not ready.
pub fn wait_ready(
    dir: &RuntimeDir,
    cfg: &Config,
    deadline: Instant,
    fail_fast: bool,
) -> Result<(), String> {
    let names: Vec<InstanceName> = cfg.assignment().into_iter().flatten().collect();
    if names.is_empty() {
        return Ok(());
    }
    loop {
        let recs = state::read_all(dir);
        let pending: Vec<&InstanceName> = names
            .iter()
            .filter(|n| !recs.get(&n.to_string()).is_some_and(settled))
            .collect();
        let Some(first) = pending.first() else {
            return Ok(());
        };
        if fail_fast
            && let Some(n) = pending
                .iter()
                .find(|n| recs.get(&n.to_string()).is_some_and(is_failed))
        {
            return Err(explain(dir, n, recs.get(&n.to_string())));
        }
        if Instant::now() >= deadline {
            let also = if pending.len() > 1 {
                format!(
                    " (also not ready: {})",
                    pending[1..]
                        .iter()
                        .map(|n| n.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            } else {
                String::new()
            };
            return Err(format!(
                "the services were not ready in time (start_timeout_ms){also}: {}",
                explain(dir, first, recs.get(&first.to_string()))
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Why instance `n` is not ready: its state, its last error, its last exit, and the last
/// lines of its log.
pub fn explain(dir: &RuntimeDir, n: &InstanceName, rec: Option<&Record>) -> String {
    let mut out = match rec {
        None => format!("service {n} has not started (no workflow has taken it up yet)"),
        Some(r) => {
            let mut s = format!("service {n} is {}", r.machine.phase.name());
            if let Some(e) = &r.machine.last_error {
                s.push_str(&format!("; last error: {e}"));
            }
            if let Some(x) = &r.machine.last_exit {
                s.push_str(&format!("; last exit: {}", describe_exit(x)));
            }
            s
        }
    };
    let log = state::log_path(dir, n);
    let tail = last_lines(&log, 5);
    if tail.is_empty() {
        out.push_str(&format!("; {} is empty", log.display()));
    } else {
        out.push_str(&format!("; last lines of {}:", log.display()));
        for l in tail {
            out.push_str("\n    ");
            out.push_str(&l);
        }
    }
    out
}

pub fn describe_exit(x: &crate::services::machine::LastExit) -> String {
    match (x.code, x.signal, x.unknown) {
        (Some(c), _, _) => format!("exit status {c}"),
        (_, Some(s), _) => format!("killed by {}", crate::child::signal_name(s)),
        _ => "status unknown".into(),
    }
}

fn last_lines(path: &std::path::Path, n: usize) -> Vec<String> {
    let text = std::fs::read(path).unwrap_or_default();
    let start = text.len().saturating_sub(16 * 1024);
    let text = String::from_utf8_lossy(&text[start..]);
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

/// One line for `start`: every instance and how it is.
pub fn summary(dir: &RuntimeDir, cfg: &Config) -> String {
    let recs = state::read_all(dir);
    let parts: Vec<String> = cfg
        .assignment()
        .into_iter()
        .flatten()
        .map(|n| {
            let r = recs.get(&n.to_string());
            let phase = r.map_or("unknown", |r| r.machine.phase.name());
            match r.and_then(|r| r.run.as_ref()) {
                Some(run) => format!("{n} {phase} (pid {})", run.pid),
                None => format!("{n} {phase}"),
            }
        })
        .collect();
    format!("services: {}", parts.join(", "))
}
