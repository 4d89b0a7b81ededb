//! The services as `status`, `health` and `metrics` see them: one row per instance, from
//! its record (state, restarts, last exit), its stats (probes), and one pass over /proc
//! for each tree's processes (CPU and memory of the whole tree). Never an environment
//! value: a service's `env` may hold secrets.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::config::Config;
use crate::procscan;
use crate::runtime_dir::RuntimeDir;
use crate::services::probes::ProbeStats;
use crate::services::state::{self, Desired, Record};
use crate::services::tree::{self, Identity};

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct LastExitView {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// It ended while unsupervised or adopted: the status is not known.
    pub unknown: bool,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ServiceRow {
    pub name: String,
    pub instance: u32,
    /// The id of the workflow hosting it.
    pub workflow: Option<u32>,
    /// 0 when no program runs.
    pub pid: i32,
    /// waiting, starting, ready, unhealthy, stopping, backoff, failed, stopped, completed.
    pub state: String,
    pub uptime_s: Option<f64>,
    pub restarts: u32,
    pub restarts_by_cause: BTreeMap<String, u32>,
    pub last_exit: Option<LastExitView>,
    pub last_cause: Option<String>,
    /// Of the whole tree, average since the program started.
    pub cpu_percent: Option<f64>,
    /// CPU time of the program's tree so far, for rates between two snapshots.
    pub cpu_seconds: Option<f64>,
    /// Of the whole tree.
    pub rss_kib: Option<u64>,
    pub processes: usize,
    pub critical: bool,
    /// Stopped by `nexus service stop` (stays stopped until started).
    pub stopped_by_user: bool,
    pub last_error: Option<String>,
    /// The program's last sd_notify `STATUS=`.
    pub status_text: Option<String>,
    /// How each configured limit applies on this machine.
    pub limits: Vec<String>,
    #[serde(skip)]
    pub probes: [ProbeStats; 2],
}

impl ServiceRow {
    /// Ready or completed: nothing to worry about.
    pub fn fine(&self) -> bool {
        matches!(self.state.as_str(), "ready" | "completed")
    }
}

/// Every instance of the running config, in hosting order.
pub fn rows(dir: &RuntimeDir, cfg: &Config) -> Vec<ServiceRow> {
    let records = state::read_all(dir);
    let desired = Desired::read(dir);
    let names: Vec<_> = cfg.assignment().into_iter().flatten().collect();
    let ids: Vec<Option<Identity>> = names
        .iter()
        .map(|n| {
            let run = records.get(&n.to_string())?.run.as_ref()?;
            Some(Identity {
                pgid: run.pgid,
                token: run.token.clone(),
                cgroup: run.cgroup.clone(),
            })
        })
        .collect();
    let live: Vec<&Identity> = ids.iter().flatten().collect();
    let mut members: BTreeMap<usize, Vec<i32>> = BTreeMap::new();
    if !live.is_empty() {
        for (pid, k) in tree::scan(&live) {
            members.entry(k).or_default().push(pid);
        }
    }
    let hz = procscan::clock_ticks_per_sec() as f64;
    let up = procscan::uptime_secs();
    let mut live_index = 0;
    names
        .iter()
        .zip(&ids)
        .map(|(n, id)| {
            let rec: Option<&Record> = records.get(&n.to_string());
            let spec = cfg.service(&n.service);
            let pid = rec.and_then(|r| r.run.as_ref()).map_or(0, |r| r.pid);
            let procs = if id.is_some() {
                let m = members.remove(&live_index).unwrap_or_default();
                live_index += 1;
                m
            } else {
                Vec::new()
            };
            let procs: Vec<i32> = procs
                .into_iter()
                .filter(|&p| procscan::state(p).is_some_and(|s| s != 'Z'))
                .collect();
            let uptime = (pid > 0)
                .then(|| Some(up? - procscan::start_ticks(pid)? as f64 / hz))
                .flatten();
            let cpu_s: f64 = procs
                .iter()
                .filter_map(|&p| procscan::cpu_ticks(p))
                .sum::<u64>() as f64
                / hz;
            let stats = state::read_stats(dir, n);
            let m = rec.map(|r| &r.machine);
            ServiceRow {
                name: n.service.clone(),
                instance: n.n,
                workflow: rec.and_then(|r| r.host).map(|h| h.workflow),
                pid,
                state: m.map_or("waiting", |m| m.state_name()).to_string(),
                uptime_s: uptime.map(|u| (u * 10.0).round() / 10.0),
                restarts: m.map_or(0, |m| m.restarts),
                restarts_by_cause: m.map_or_else(BTreeMap::new, |m| {
                    m.by_cause
                        .iter()
                        .map(|(c, n)| (c.as_str().to_string(), *n))
                        .collect()
                }),
                last_exit: m.and_then(|m| m.last_exit).map(|x| LastExitView {
                    code: x.code,
                    signal: x.signal,
                    unknown: x.unknown,
                }),
                last_cause: m.and_then(|m| m.last_cause).map(|c| c.as_str().to_string()),
                cpu_percent: uptime
                    .filter(|&u| u > 0.0)
                    .map(|u| (cpu_s / u * 1000.0).round() / 10.0),
                cpu_seconds: (pid > 0).then(|| (cpu_s * 100.0).round() / 100.0),
                rss_kib: (pid > 0)
                    .then(|| procs.iter().filter_map(|&p| procscan::rss_kib(p)).sum()),
                processes: procs.len(),
                critical: spec.is_none_or(|s| s.critical),
                stopped_by_user: desired.of(n).stopped,
                last_error: m.and_then(|m| m.last_error.clone()),
                status_text: rec.and_then(|r| r.status_text.clone()),
                limits: rec.map(|r| r.limits.clone()).unwrap_or_default(),
                probes: [stats.ready, stats.liveness],
            }
        })
        .collect()
}

/// The services table below the daemons' in `status`.
pub fn render(rows: &[ServiceRow], paint: &dyn Fn(&str, &str) -> String) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if rows.is_empty() {
        return out;
    }
    let _ = writeln!(
        out,
        "\n{:<20} {:>8}  {:>3}  {:>9}  {:>5}  {:>7}  {:<11} {:>8}  {:<16} LAST CAUSE",
        "SERVICE", "PID", "WF", "UPTIME", "CPU%", "MEM", "STATE", "RESTARTS", "LAST EXIT"
    );
    for r in rows {
        let name = format!("{}-{}", r.name, r.instance);
        let state = format!("{:<11}", r.state);
        let state = match r.state.as_str() {
            "ready" | "completed" => paint("32", &state),
            "starting" | "waiting" | "backoff" | "stopping" | "unhealthy" | "stopped" => {
                paint("33", &state)
            }
            _ => paint("31", &state),
        };
        let exit = r
            .last_exit
            .as_ref()
            .map_or("-".to_string(), |x| match (x.code, x.signal) {
                (Some(c), _) => format!("code {c}"),
                (_, Some(s)) => crate::child::signal_name(s),
                _ => "unknown".into(),
            });
        let _ = writeln!(
            out,
            "{name:<20} {:>8}  {:>3}  {:>9}  {:>5}  {:>7}  {state} {:>8}  {exit:<16} {}",
            if r.pid > 0 {
                r.pid.to_string()
            } else {
                "-".into()
            },
            r.workflow.map_or("-".into(), |w| w.to_string()),
            r.uptime_s.map_or("-".into(), super::status::fmt_duration),
            r.cpu_percent.map_or("-".into(), |c| format!("{c:.1}")),
            r.rss_kib
                .map_or("-".into(), |k| format!("{:.1}M", k as f64 / 1024.0)),
            r.restarts,
            r.last_cause.as_deref().unwrap_or("-"),
        );
        if !r.fine()
            && let Some(e) = &r.last_error
        {
            let _ = writeln!(out, "{:<20} {}", "", paint("2", &format!("↳ {e}")));
        }
        if r.stopped_by_user {
            let _ = writeln!(
                out,
                "{:<20} {}",
                "",
                paint(
                    "2",
                    &format!("↳ stopped by the user: nexus service start {name}")
                )
            );
        }
    }
    out
}
