//! `nexus metrics`: the Prometheus text exposition format (version 0.0.4), for a
//! node-exporter textfile collector, a cron job or an HTTP shim to scrape.

use std::fmt::Write;

use super::Common;
use super::health;
use super::status::{self, Snapshot};
use crate::config::Role;
use crate::counters::BUCKETS;
use crate::protocol::SlotState;

#[inline(never)]
pub fn run(common: &Common) -> Result<i32, String> {
    let dir = common.runtime_dir()?;
    let (text, err) = exposition(&dir);
    print!("{text}");
    match err {
        None => Ok(0),
        Some(e) => {
            eprintln!("nexus is not running in {} ({e})", dir.display());
            Ok(status::NOT_RUNNING)
        }
    }
}

/// The exposition, and why the master did not answer if it did not: still valid text
/// then, so a scraper sees the cluster down rather than an error.
pub fn exposition(dir: &crate::runtime_dir::RuntimeDir) -> (String, Option<String>) {
    match status::snapshot_with(dir, true) {
        Ok(s) => (render(&s), None),
        Err(e) => (
            "# HELP nexus_up Whether a nexus master answers.\n# TYPE nexus_up gauge\nnexus_up 0\n"
                .to_string(),
            Some(e),
        ),
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

pub fn render(s: &Snapshot) -> String {
    let mut out = String::new();
    family(
        &mut out,
        "nexus_up",
        "gauge",
        "Whether a nexus master answers.",
    );
    let _ = writeln!(out, "nexus_up 1");

    family(
        &mut out,
        "nexus_health",
        "gauge",
        "0 healthy, 1 degraded, 2 critical (as nexus health exits).",
    );
    let _ = writeln!(out, "nexus_health {}", health::judge(s).0.exit_code());

    family(
        &mut out,
        "nexus_daemons",
        "gauge",
        "Daemon slots by role and state.",
    );
    let states = [
        SlotState::Starting,
        SlotState::Running,
        SlotState::Backoff,
        SlotState::Failed,
        SlotState::Down,
    ];
    for role in Role::ALL {
        for state in states {
            let n = s
                .daemons
                .iter()
                .filter(|d| d.role == role && d.state == state)
                .count();
            let state = format!("{state:?}").to_lowercase();
            let _ = writeln!(
                out,
                "nexus_daemons{{role=\"{role}\",state=\"{state}\"}} {n}"
            );
        }
    }

    family(
        &mut out,
        "nexus_daemon_rss_bytes",
        "gauge",
        "Resident memory of all daemons by role.",
    );
    for role in Role::ALL {
        let kib: u64 = s
            .daemons
            .iter()
            .filter(|d| d.role == role)
            .filter_map(|d| d.rss_kib)
            .sum();
        let _ = writeln!(
            out,
            "nexus_daemon_rss_bytes{{role=\"{role}\"}} {}",
            kib * 1024
        );
    }

    family(
        &mut out,
        "nexus_restarts_total",
        "counter",
        "Replacements by role and cause, since the cluster started.",
    );
    for role in Role::ALL {
        for cause in crate::ledger::Cause::ALL.map(crate::ledger::Cause::as_str) {
            let n = s
                .counters
                .restarts
                .iter()
                .find(|r| r.role == role && r.cause == cause)
                .map_or(0, |r| r.count);
            let _ = writeln!(
                out,
                "nexus_restarts_total{{role=\"{role}\",cause=\"{cause}\"}} {n}"
            );
        }
    }

    family(
        &mut out,
        "nexus_leader_changes_total",
        "counter",
        "Masters replaced, since the cluster started.",
    );
    let _ = writeln!(
        out,
        "nexus_leader_changes_total {}",
        s.counters.leader_changes
    );

    family(
        &mut out,
        "nexus_heartbeats_received_total",
        "counter",
        "Heartbeats accepted, per watchdog (resets when it restarts).",
    );
    for w in &s.watchdogs {
        let _ = writeln!(
            out,
            "nexus_heartbeats_received_total{{watchdog=\"{}\"}} {}",
            w.id, w.received
        );
    }

    family(
        &mut out,
        "nexus_rejected_total",
        "counter",
        "Datagrams and requests refused (garbage, forged, foreign uid, stale).",
    );
    let _ = writeln!(
        out,
        "nexus_rejected_total{{by=\"master\"}} {}",
        s.rejected_by_master
    );
    for w in &s.watchdogs {
        let _ = writeln!(
            out,
            "nexus_rejected_total{{by=\"watchdog-{}\"}} {}",
            w.id, w.rejected
        );
    }

    family(
        &mut out,
        "nexus_recovery_seconds",
        "histogram",
        "Detection of a failure to its replacement's ready message.",
    );
    let buckets = &s.counters.recovery_buckets;
    for (i, bound) in BUCKETS.iter().enumerate() {
        let n = buckets.get(i).copied().unwrap_or(0);
        let _ = writeln!(out, "nexus_recovery_seconds_bucket{{le=\"{bound}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "nexus_recovery_seconds_bucket{{le=\"+Inf\"}} {}",
        s.counters.recovery_count
    );
    let _ = writeln!(
        out,
        "nexus_recovery_seconds_sum {}",
        s.counters.recovery_sum_s
    );
    let _ = writeln!(
        out,
        "nexus_recovery_seconds_count {}",
        s.counters.recovery_count
    );
    if !s.services.is_empty() {
        render_services(&mut out, s);
    }
    if let Some(t) = &s.tasks {
        render_tasks(&mut out, t);
    }
    out
}

/// Per service instance: up, restarts by cause, probe failures and durations.
fn render_services(out: &mut String, s: &Snapshot) {
    let label = |r: &super::services_view::ServiceRow| {
        format!("service=\"{}\",instance=\"{}\"", r.name, r.instance)
    };
    family(
        out,
        "nexus_service_up",
        "gauge",
        "1 if the service instance is ready (unhealthy included) or completed, else 0.",
    );
    for r in &s.services {
        let up = r.fine() || r.state == "unhealthy";
        let _ = writeln!(out, "nexus_service_up{{{}}} {}", label(r), u8::from(up));
    }
    family(
        out,
        "nexus_service_state",
        "gauge",
        "The state of each service instance (1 for its current state).",
    );
    for r in &s.services {
        let _ = writeln!(
            out,
            "nexus_service_state{{{},state=\"{}\"}} 1",
            label(r),
            r.state
        );
    }
    family(
        out,
        "nexus_service_restarts_total",
        "counter",
        "Restarts of each service instance by cause.",
    );
    for r in &s.services {
        for cause in ["crash", "hang", "manual"] {
            let n = r.restarts_by_cause.get(cause).copied().unwrap_or(0);
            let _ = writeln!(
                out,
                "nexus_service_restarts_total{{{},cause=\"{cause}\"}} {n}",
                label(r)
            );
        }
    }
    family(
        out,
        "nexus_service_rss_bytes",
        "gauge",
        "Resident memory of each instance's whole process tree.",
    );
    for r in &s.services {
        let _ = writeln!(
            out,
            "nexus_service_rss_bytes{{{}}} {}",
            label(r),
            r.rss_kib.unwrap_or(0) * 1024
        );
    }
    family(
        out,
        "nexus_service_probe_failures_total",
        "counter",
        "Failed readiness and liveness checks of each instance.",
    );
    for r in &s.services {
        for (probe, st) in ["ready", "liveness"].iter().zip(&r.probes) {
            let _ = writeln!(
                out,
                "nexus_service_probe_failures_total{{{},probe=\"{probe}\"}} {}",
                label(r),
                st.failures
            );
        }
    }
    family(
        out,
        "nexus_service_probe_duration_seconds",
        "histogram",
        "How long each readiness and liveness check took.",
    );
    for r in &s.services {
        for (probe, st) in ["ready", "liveness"].iter().zip(&r.probes) {
            let l = format!("{},probe=\"{probe}\"", label(r));
            for (i, bound) in crate::services::probes::BUCKETS.iter().enumerate() {
                let n = st.buckets.get(i).copied().unwrap_or(0);
                let _ = writeln!(
                    out,
                    "nexus_service_probe_duration_seconds_bucket{{{l},le=\"{bound}\"}} {n}"
                );
            }
            let _ = writeln!(
                out,
                "nexus_service_probe_duration_seconds_bucket{{{l},le=\"+Inf\"}} {}",
                st.runs
            );
            let _ = writeln!(
                out,
                "nexus_service_probe_duration_seconds_sum{{{l}}} {}",
                st.sum_s
            );
            let _ = writeln!(
                out,
                "nexus_service_probe_duration_seconds_count{{{l}}} {}",
                st.runs
            );
        }
    }
}

fn render_tasks(out: &mut String, t: &serde_json::Value) {
    family(
        out,
        "nexus_tasks_available",
        "gauge",
        "Whether the task queue's database is usable.",
    );
    let _ = writeln!(
        out,
        "nexus_tasks_available {}",
        u8::from(t["available"] == true)
    );
    if let Some(c) = t["counts"].as_object() {
        family(out, "nexus_tasks", "gauge", "Tasks in the queue by state.");
        for (state, n) in c {
            let _ = writeln!(out, "nexus_tasks{{state=\"{state}\"}} {n}");
        }
    }
    for (key, name, help) in [
        (
            "wait_seconds",
            "nexus_task_wait_seconds",
            "From submit to the first attempt's start, over the tasks kept.",
        ),
        (
            "run_seconds",
            "nexus_task_run_seconds",
            "Each finished attempt's run time, over the tasks kept.",
        ),
    ] {
        let h = &t[key];
        let (Some(le), Some(counts)) = (h["le"].as_array(), h["counts"].as_array()) else {
            continue;
        };
        family(out, name, "histogram", help);
        for (l, c) in le.iter().zip(counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{l}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h["count"]);
        let _ = writeln!(out, "{name}_sum {}", h["sum"]);
        let _ = writeln!(out, "{name}_count {}", h["count"]);
    }
    if let Some(ws) = t["workers"].as_array() {
        family(
            out,
            "nexus_worker_running",
            "gauge",
            "Tasks each worker runs now.",
        );
        for w in ws {
            let _ = writeln!(
                out,
                "nexus_worker_running{{worker=\"{}\"}} {}",
                w["worker"].as_str().unwrap_or(""),
                w["running"]
            );
        }
        family(
            out,
            "nexus_worker_concurrency",
            "gauge",
            "Tasks each worker may run at once.",
        );
        for w in ws {
            let _ = writeln!(
                out,
                "nexus_worker_concurrency{{worker=\"{}\"}} {}",
                w["worker"].as_str().unwrap_or(""),
                w["concurrency"]
            );
        }
        family(
            out,
            "nexus_worker_cpu_cores",
            "gauge",
            "CPU each worker's tasks used over the last second, in cores.",
        );
        for w in ws {
            let _ = writeln!(
                out,
                "nexus_worker_cpu_cores{{worker=\"{}\"}} {}",
                w["worker"].as_str().unwrap_or(""),
                w["cpu_percent"].as_f64().unwrap_or(0.0) / 100.0
            );
        }
    }
}
