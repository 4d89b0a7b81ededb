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

/// `nexus pid NAME`: the pid of a daemon (`workflow-3`) or of a service instance's program
/// (`web-1`), alone on stdout, for `kill -9 "$(nexus pid web-1)"`.
#[inline(never)]
pub fn pid(common: &Common, name: &str) -> Result<i32, String> {
    let dir = common.runtime_dir()?;
    if let Some(slot) = crate::config::SlotName::parse(name) {
        let reply = client::request(
            &dir.control_socket(),
            &Request::Status {},
            Duration::from_secs(2),
        )
        .map_err(|e| format!("nexus is not running in {} ({e})", dir.display()))?;
        let Response::Status(report) = reply else {
            return Err("unexpected answer from the master".into());
        };
        let m = report
            .members
            .iter()
            .find(|m| m.slot() == slot)
            .ok_or_else(|| format!("{slot} is not a slot of this cluster"))?;
        if m.pid == 0 {
            return Err(format!("{slot} has no process right now ({:?})", m.state).to_lowercase());
        }
        println!("{}", m.pid);
        return Ok(0);
    }
    let cfg = Config::load(&dir.config_file())
        .map_err(|_| format!("nexus is not running in {}", dir.display()))?;
    let names = crate::services::spec::targets(&cfg.services, name)?;
    let [inst] = names.as_slice() else {
        return Err(format!(
            "`{name}` has {} instances: name one, like {name}-1",
            names.len()
        ));
    };
    let rec = state::read_record(&dir, inst);
    match rec.as_ref().and_then(|r| r.run.as_ref()) {
        Some(run) => {
            println!("{}", run.pid);
            Ok(0)
        }
        None => Err(format!(
            "{inst} has no program running ({})",
            rec.map_or("not started", |r| r.machine.state_name())
        )),
    }
}

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
            .find(|n| now.get(&n.to_string()).is_some_and(is_failed));
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
            r.map_or("unknown", |r| r.machine.state_name()),
            r.and_then(|r| r.run.as_ref())
                .map_or(String::new(), |run| format!(" (pid {})", run.pid))
        );
    }
    println!("done in {:.1} ms", t0.elapsed().as_secs_f64() * 1000.0);
    Ok(())
}

/// Ready (and not a crash-looping program's brief retry), or done for good (completed).
fn settled(r: &Record) -> bool {
    (r.machine.phase.is_ready() && !r.machine.policy.failed())
        || matches!(r.machine.phase, Phase::Completed)
}

fn is_failed(r: &Record) -> bool {
    r.machine.state_name() == "failed"
}

/// Failures during a wait after which an instance counts as crash-looping.
const CRASH_LOOP: u32 = 3;

/// A program without a ready probe is ready at its exec; `start` still waits this long
/// after the exec, so that one which dies at once (a typo in a `shell` command) fails the
/// start instead of passing it.
const SETTLE_MS: u64 = 250;

/// Is the current run past the point where an instant failure would have shown? After a
/// failure since the wait began, it must hold for a stable run; a probe-less one, for
/// SETTLE_MS after its exec.
fn steady(r: &Record, baseline: u32, probed: bool) -> bool {
    if r.machine.phase == Phase::Completed {
        return true;
    }
    let need = if r.machine.failures() > baseline {
        crate::restart_policy::STABLE_RUN_MS
    } else if probed {
        return true;
    } else {
        SETTLE_MS
    };
    r.run.as_ref().is_some_and(|run| {
        crate::restart_policy::mono_ms().saturating_sub(run.started_mono_ms) >= need
    })
}

/// Waits until every instance of `cfg` is ready (or completed, or stopped as the user
/// asked). A critical instance that is `failed` ends the wait with an error at once; a
/// non-critical one that fails, or is not ready in time, is only a warning (the cluster is
/// then DEGRADED, not unusable). The error explains the instance at fault.
pub fn wait_ready(
    dir: &RuntimeDir,
    cfg: &Config,
    deadline: Instant,
) -> Result<Vec<String>, String> {
    let names: Vec<InstanceName> = cfg.assignment().into_iter().flatten().collect();
    if names.is_empty() {
        return Ok(Vec::new());
    }
    // Failures before the wait began do not count against it.
    let baseline: std::collections::BTreeMap<String, u32> = state::read_all(dir)
        .into_iter()
        .map(|(k, r)| (k, r.machine.failures()))
        .collect();
    let hash = |n: &InstanceName| {
        cfg.service(&n.service)
            .map(|s| format!("{:016x}", s.definition_hash()))
    };
    let critical = |n: &InstanceName| cfg.service(&n.service).is_none_or(|s| s.critical);
    loop {
        let recs = state::read_all(dir);
        let desired = state::Desired::read(dir);
        // Ready (or completed) with its current definition, or stopped as the user asked.
        let done = |n: &InstanceName| {
            let key = n.to_string();
            recs.get(&key).is_some_and(|r| {
                let base = baseline.get(&key).copied().unwrap_or(0);
                let probed = cfg.service(&n.service).is_some_and(|s| s.ready.is_some());
                (settled(r)
                    && steady(r, base, probed)
                    && (Some(&r.spec_hash) == hash(n).as_ref() || r.run.is_none()))
                    || (desired.of(n).stopped && r.machine.phase == Phase::Stopped)
            })
        };
        // Failed, or crash-looping: three failures since the wait began and not running
        // now. Waiting out the backoff would only delay the same answer.
        let failed = |n: &InstanceName| {
            let key = n.to_string();
            recs.get(&key).is_some_and(|r| {
                let base = baseline.get(&key).copied().unwrap_or(0);
                is_failed(r)
                    || (r.machine.failures() >= base + CRASH_LOOP && !r.machine.phase.running())
            })
        };
        let pending: Vec<&InstanceName> = names.iter().filter(|n| !done(n)).collect();
        if let Some(n) = pending.iter().find(|n| critical(n) && failed(n)) {
            return Err(explain(dir, n, recs.get(&n.to_string())));
        }
        let waiting: Vec<&&InstanceName> = pending
            .iter()
            .filter(|n| critical(n) || !failed(n))
            .collect();
        let timed_out = Instant::now() >= deadline;
        if waiting.is_empty() || timed_out {
            let (late, warn): (Vec<&InstanceName>, Vec<&InstanceName>) =
                pending.iter().partition(|n| critical(n));
            if let Some(first) = late.first().filter(|_| timed_out) {
                let also = if late.len() > 1 {
                    format!(
                        " (also not ready: {})",
                        late[1..]
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
            return Ok(warn
                .iter()
                .map(|n| {
                    format!(
                        "not critical, not ready: {}",
                        explain(dir, n, recs.get(&n.to_string()))
                    )
                })
                .collect());
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
            let state = match r.machine.state_name() {
                "backoff" => format!(
                    "crash-looping ({} failures, waiting to restart)",
                    r.machine.failures()
                ),
                other => other.to_string(),
            };
            let mut s = format!("service {n} is {state}");
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

/// Instances `start` names one by one; past this, it counts them by state.
const SUMMARY_NAMED: usize = 10;

/// One line for `start`: every instance and how it is (counted by state when many).
pub fn summary(dir: &RuntimeDir, cfg: &Config) -> String {
    let recs = state::read_all(dir);
    let instances: Vec<_> = cfg.assignment().into_iter().flatten().collect();
    let record_of = |n: &crate::services::spec::InstanceName| recs.get(&n.to_string());
    let phase_of = |r: Option<&state::Record>| r.map_or("unknown", |r| r.machine.state_name());
    if instances.len() > SUMMARY_NAMED {
        let mut by_state: std::collections::BTreeMap<&str, usize> = Default::default();
        for n in &instances {
            *by_state.entry(phase_of(record_of(n))).or_default() += 1;
        }
        let counts: Vec<String> = by_state.iter().map(|(s, k)| format!("{k} {s}")).collect();
        return format!(
            "services: {} instances, {} (`nexus status` lists them)",
            instances.len(),
            counts.join(", ")
        );
    }
    let parts: Vec<String> = instances
        .iter()
        .map(|n| {
            let r = record_of(n);
            let phase = phase_of(r);
            match r.and_then(|r| r.run.as_ref()) {
                Some(run) => format!("{n} {phase} (pid {})", run.pid),
                None => format!("{n} {phase}"),
            }
        })
        .collect();
    format!("services: {}", parts.join(", "))
}
