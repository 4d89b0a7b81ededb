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
    match status::snapshot(&dir) {
        Ok(s) => {
            print!("{}", render(&s));
            Ok(0)
        }
        Err(e) => {
            // Still valid exposition: a scraper sees the cluster down rather than an error.
            print!(
                "# HELP nexus_up Whether a nexus master answers.\n# TYPE nexus_up gauge\nnexus_up 0\n"
            );
            eprintln!("nexus is not running in {} ({e})", dir.display());
            Ok(status::NOT_RUNNING)
        }
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
        for cause in ["crash", "hang", "failover"] {
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
    out
}
