//! `nexus health`: one verdict for probes and monitoring — HEALTHY (exit 0), DEGRADED
//! (1), CRITICAL (2) or not running (3) — with the reasons.
//!
//! CRITICAL: no master answers while daemons of the directory run; or fewer than a
//! majority of the configured watchdogs are running (hangs can no longer be judged).
//! DEGRADED: any slot not running (starting, in backoff, failed, down), or a daemon
//! silent for longer than the timeout (hung, about to be replaced).
//!
//! Services: a critical service (the default) not ready makes the cluster CRITICAL,
//! another one DEGRADED; an unhealthy one (liveness failing, not yet a hang) and one
//! stopped by the user are DEGRADED; a completed one is fine.

use serde::Serialize;

use super::Common;
use super::status::{self, Snapshot};
use crate::config::Role;
use crate::procscan;
use crate::protocol::SlotState;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Verdict {
    Healthy,
    Degraded,
    Critical,
    #[serde(rename = "NOT RUNNING")]
    NotRunning,
}

impl Verdict {
    pub fn exit_code(self) -> i32 {
        match self {
            Verdict::Healthy => 0,
            Verdict::Degraded => 1,
            Verdict::Critical => 2,
            Verdict::NotRunning => status::NOT_RUNNING,
        }
    }

    pub fn word(self) -> &'static str {
        match self {
            Verdict::Healthy => "HEALTHY",
            Verdict::Degraded => "DEGRADED",
            Verdict::Critical => "CRITICAL",
            Verdict::NotRunning => "NOT RUNNING",
        }
    }
}

#[derive(Serialize, serde::Deserialize)]
pub struct Report {
    pub health: Verdict,
    pub reasons: Vec<String>,
    pub runtime_dir: String,
}

/// The verdict for a snapshot of a cluster whose master answers.
pub fn judge(s: &Snapshot) -> (Verdict, Vec<String>) {
    let mut critical = Vec::new();
    let mut degraded = Vec::new();
    let dogs_running = s
        .daemons
        .iter()
        .filter(|d| d.role == Role::Watchdog && d.state == SlotState::Running && !d.silent)
        .count();
    let majority = s.watchdogs_configured as usize / 2 + 1;
    if dogs_running < majority {
        critical.push(format!(
            "only {dogs_running} of {} watchdogs running: no majority to judge hangs",
            s.watchdogs_configured
        ));
    }
    for d in &s.daemons {
        let slot = format!("{}-{}", d.role, d.id);
        if d.state != SlotState::Running {
            let state = format!("{:?}", d.state).to_lowercase();
            let cause = d
                .last_cause
                .as_deref()
                .map_or(String::new(), |c| format!(" after a {c}"));
            degraded.push(format!("{slot} is {state}{cause}"));
        } else if d.silent {
            let age = d.heartbeat_age_ms.unwrap_or(0) as f64 / 1000.0;
            degraded.push(format!("{slot} (pid {}) silent for {age:.1} s", d.pid));
        }
    }
    if let Some(h) = s.http.as_ref().filter(|h| !h.serving) {
        degraded.push(format!(
            "the HTTP API is not serving: {}",
            h.error.as_deref().unwrap_or("starting")
        ));
    }
    for r in &s.services {
        let name = format!("{}-{}", r.name, r.instance);
        let why = r
            .last_error
            .as_deref()
            .map_or(String::new(), |e| format!(": {e}"));
        match r.state.as_str() {
            "ready" | "completed" => {}
            _ if r.stopped_by_user => {
                degraded.push(format!("service {name} is stopped by the user"))
            }
            "unhealthy" => degraded.push(format!("service {name} is unhealthy{why}")),
            state if r.critical => {
                critical.push(format!("service {name} (critical) is {state}{why}"))
            }
            state => degraded.push(format!("service {name} is {state}{why}")),
        }
    }
    if !critical.is_empty() {
        critical.extend(degraded);
        (Verdict::Critical, critical)
    } else if !degraded.is_empty() {
        (Verdict::Degraded, degraded)
    } else {
        let services = if s.services.is_empty() {
            String::new()
        } else {
            let done = s.services.iter().filter(|r| r.state == "completed").count();
            let ready = s.services.len() - done;
            match done {
                0 => format!(", {ready} service instances ready"),
                _ => format!(", {ready} service instances ready, {done} completed"),
            }
        };
        (
            Verdict::Healthy,
            vec![format!(
                "{} daemons running, master pid {}{services}",
                s.daemons.len(),
                s.master_pid
            )],
        )
    }
}

/// The verdict when no master answers: CRITICAL if daemons of the directory still run.
pub fn assess_unreachable(dir: &crate::runtime_dir::RuntimeDir) -> (Verdict, Vec<String>) {
    let orphans = if dir.exists() {
        procscan::daemons_of(dir.path()).len()
    } else {
        0
    };
    if orphans > 0 {
        (
            Verdict::Critical,
            vec![format!("no master answers but {orphans} daemons run")],
        )
    } else {
        (
            Verdict::NotRunning,
            vec![format!("nothing runs in {}", dir.display())],
        )
    }
}

/// `health --json`, as the CLI prints it and the API serves it.
pub fn report_json(
    verdict: Verdict,
    reasons: Vec<String>,
    dir: &crate::runtime_dir::RuntimeDir,
) -> String {
    let r = Report {
        health: verdict,
        reasons,
        runtime_dir: dir.display().to_string(),
    };
    // A struct of strings and an enum: serializing cannot fail.
    serde_json::to_string_pretty(&r).expect("report serializes") + "\n"
}

#[inline(never)]
pub fn run(common: &Common, json: bool) -> Result<i32, String> {
    let dir = common.runtime_dir()?;
    let (verdict, reasons) = match status::snapshot(&dir) {
        Ok(s) => judge(&s),
        Err(e) => {
            let (v, mut reasons) = assess_unreachable(&dir);
            if v == Verdict::Critical {
                reasons = vec![format!(
                    "no master answers ({e}) but {} daemons run",
                    procscan::daemons_of(dir.path()).len()
                )];
            }
            (v, reasons)
        }
    };
    Ok(print(
        &Report {
            health: verdict,
            reasons,
            runtime_dir: dir.display().to_string(),
        },
        json,
    ))
}

/// `health` as it prints, here or over `--api`; the verdict's exit code.
pub fn print(r: &Report, json: bool) -> i32 {
    if json {
        // A struct of strings and an enum: serializing cannot fail.
        println!(
            "{}",
            serde_json::to_string_pretty(r).expect("report serializes")
        );
    } else {
        println!("{}", r.health.word());
        for why in &r.reasons {
            println!("  - {why}");
        }
    }
    r.health.exit_code()
}
