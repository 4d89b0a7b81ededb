//! `nexus status`: the master's view of every slot, the watchdogs' heartbeat ages, and
//! each process's uptime, CPU and memory from /proc. The same snapshot feeds `health`
//! and `metrics`; serialized, it is the documented `status --json` schema.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::Common;
use crate::client;
use crate::config::{Config, Role, SlotName};
use crate::procscan;
use crate::protocol::{self, Datagram, Member, Request, Response, SlotState, StatusReport};
use crate::runtime_dir::RuntimeDir;

/// Exit code when nothing answers on the control socket.
pub const NOT_RUNNING: i32 = 3;

/// One daemon slot as `status --json` reports it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Row {
    pub role: Role,
    pub id: u32,
    /// 0 when the slot has no process.
    pub pid: i32,
    /// starting, running, backoff, failed or down.
    pub state: SlotState,
    pub master: bool,
    pub uptime_s: Option<f64>,
    /// Average CPU since the process started, percent of one core.
    pub cpu_percent: Option<f64>,
    /// CPU time used so far (user + system), for rates between two snapshots.
    pub cpu_seconds: Option<f64>,
    pub rss_kib: Option<u64>,
    /// Freshest heartbeat any watchdog heard from this pid (None: none yet; always None
    /// for the master, which is watched through the lock instead).
    pub heartbeat_age_ms: Option<u64>,
    /// Heard nothing for longer than the timeout: about to be replaced.
    pub silent: bool,
    pub restarts: u32,
    /// crash, hang or failover.
    pub last_cause: Option<String>,
}

/// Everything `status`, `health` and `metrics` know about a running cluster.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Snapshot {
    pub schema: u32,
    pub runtime_dir: String,
    pub master_pid: i32,
    /// Every slot running.
    pub whole: bool,
    pub timeout_ms: u64,
    pub watchdogs_configured: u32,
    pub daemons: Vec<Row>,
    pub rejected_by_master: u64,
    pub rejected_by_watchdogs: u64,
    pub heartbeats_received: u64,
    /// Per watchdog: heartbeats received and datagrams rejected since it started.
    pub watchdogs: Vec<WatchdogCounters>,
    /// The master's counts since the cluster started (restarts, recoveries, leaders).
    pub counters: crate::counters::Counters,
    /// Every instance of every service is ready or completed, or stopped as the user asked
    /// (true without services).
    pub services_ready: bool,
    /// One row per service instance (schema 2).
    pub services: Vec<super::services_view::ServiceRow>,
    /// The task queue: `available`, `error`, `counts` by state, `workers` with their load.
    pub tasks: Option<serde_json::Value>,
    /// The HTTP API (when `http` is configured): its URL, and whether it serves or why not.
    pub http: Option<crate::http::serving::Serving>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct WatchdogCounters {
    pub id: u32,
    pub received: u64,
    pub rejected: u64,
}

#[derive(Default)]
struct Ages {
    by_pid: HashMap<(SlotName, i32), u64>,
    rejected: u64,
    received: u64,
    per_watchdog: Vec<WatchdogCounters>,
}

/// Asks the master and the watchdogs; Err if no master answers.
pub fn snapshot(dir: &RuntimeDir) -> Result<Snapshot, String> {
    snapshot_with(dir, false)
}

/// `task_durations`: the task queue's histograms too (for `metrics`).
pub fn snapshot_with(dir: &RuntimeDir, task_durations: bool) -> Result<Snapshot, String> {
    let report = match client::request(
        &dir.control_socket(),
        &Request::Status {},
        Duration::from_secs(2),
    ) {
        Ok(Response::Status(r)) => r,
        Ok(other) => return Err(format!("unexpected answer from the master: {other:?}")),
        Err(e) => return Err(e),
    };
    let cfg = Config::load(&dir.config_file()).unwrap_or_default();
    let ages = heartbeat_ages(dir, &report);
    let services = super::services_view::rows(dir, &cfg);
    let daemons: Vec<Row> = report
        .members
        .iter()
        .map(|m| row(m, &ages.by_pid, cfg.timeout_ms))
        .collect();
    let http = cfg.http.as_ref().and_then(|_| {
        // Only the running http daemon's word counts, not a predecessor's file.
        let pid = daemons.iter().find(|d| d.role == Role::Http)?.pid;
        crate::http::serving::read(dir).filter(|h| h.pid == pid && pid > 0)
    });
    Ok(Snapshot {
        schema: 2,
        whole: daemons.iter().all(|r| r.state == SlotState::Running),
        services_ready: services.iter().all(|s| s.fine() || s.stopped_by_user),
        services,
        runtime_dir: report.runtime_dir,
        master_pid: report.master_pid,
        timeout_ms: cfg.timeout_ms,
        watchdogs_configured: cfg.watchdogs,
        daemons,
        rejected_by_master: report.rejected,
        rejected_by_watchdogs: ages.rejected,
        heartbeats_received: ages.received,
        watchdogs: ages.per_watchdog,
        counters: report.counters,
        tasks: super::task::overview(dir, task_durations),
        http,
    })
}

#[inline(never)]
pub fn run(common: &Common, json: bool, watch: bool) -> Result<i32, String> {
    let dir = common.runtime_dir()?;
    if watch {
        return watch_loop(&dir);
    }
    let snap = match snapshot(&dir) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("nexus is not running in {} ({e})", dir.display());
            return Ok(NOT_RUNNING);
        }
    };
    print(&snap, json)
}

/// `status` as it prints, here or over `--api`; the exit code: 0 whole, 1 degraded.
pub fn print(snap: &Snapshot, json: bool) -> Result<i32, String> {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(snap).map_err(|e| e.to_string())?
        );
    } else {
        print!("{}", render(snap, colours_wanted()));
    }
    Ok(if snap.whole && snap.services_ready {
        0
    } else {
        1
    })
}

/// Redraws the table in place once a second (cursor home, clear to end), which is what
/// `watch -n 1` did, without its flicker. Ends with Ctrl-C.
fn watch_loop(dir: &RuntimeDir) -> Result<i32, String> {
    let colour = colours_wanted();
    let mut out = std::io::stdout();
    // Bounded like every loop here: a week of seconds.
    for _ in 0..604_800 {
        let frame = match snapshot(dir) {
            Ok(s) => render(&s, colour),
            Err(e) => format!("nexus is not running in {} ({e})\n", dir.display()),
        };
        let stamp = crate::ledger::rfc3339_now();
        let _ = write!(out, "\x1b[H\x1b[2J{stamp}  (Ctrl-C to quit)\n{frame}");
        let _ = out.flush();
        std::thread::sleep(Duration::from_secs(1));
    }
    Ok(0)
}

pub fn colours_wanted() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

fn row(m: &Member, ages: &HashMap<(SlotName, i32), u64>, timeout_ms: u64) -> Row {
    let live = m.pid > 0;
    let hz = procscan::clock_ticks_per_sec() as f64;
    let uptime = live
        .then(|| Some(procscan::uptime_secs()? - procscan::start_ticks(m.pid)? as f64 / hz))
        .flatten();
    // CPU time so far, read once: the average since start and the running total.
    let cpu_s = live
        .then(|| procscan::cpu_ticks(m.pid).map(|t| t as f64 / hz))
        .flatten();
    let cpu = cpu_s.zip(uptime).map(|(cpu, up)| {
        if up > 0.0 {
            (cpu / up * 1000.0).round() / 10.0
        } else {
            0.0
        }
    });
    Row {
        role: m.role,
        id: m.id,
        pid: m.pid,
        state: m.state,
        master: m.master,
        uptime_s: uptime.map(|u| (u * 10.0).round() / 10.0),
        cpu_percent: cpu,
        cpu_seconds: cpu_s.map(|c| (c * 100.0).round() / 100.0),
        rss_kib: live.then(|| procscan::rss_kib(m.pid)).flatten(),
        // The master hears nothing itself; a slot's age is the freshest any watchdog saw.
        heartbeat_age_ms: ages.get(&(m.slot(), m.pid)).copied(),
        silent: m.pid > 0
            && !m.master
            && ages
                .get(&(m.slot(), m.pid))
                .is_some_and(|&a| a > timeout_ms),
        restarts: m.restarts,
        last_cause: m.last_cause.clone(),
    }
}

/// Asks every watchdog when it last heard each slot, from a private bound socket;
/// returns the freshest age per (slot, pid) and the watchdogs' rejection counts.
fn heartbeat_ages(dir: &RuntimeDir, report: &StatusReport) -> Ages {
    let mut out = Ages::default();
    let path = dir.client_socket();
    let _ = std::fs::remove_file(&path);
    let Ok(sock) = UnixDatagram::bind(&path) else {
        return out;
    };
    let dogs: Vec<u32> = report
        .members
        .iter()
        .filter(|m| m.role == Role::Watchdog && m.pid > 0)
        .map(|m| m.id)
        .collect();
    let query = protocol::encode(&Datagram::Query {});
    let asked = dogs
        .iter()
        .filter(|&&n| sock.send_to(&query, dir.heartbeat_socket(n)).is_ok())
        .count();
    let deadline = Instant::now() + Duration::from_millis(500);
    let mut buf = vec![0u8; protocol::MAX_REPLY];
    let mut answered = 0;
    while answered < asked {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || sock.set_read_timeout(Some(left)).is_err() {
            break;
        }
        let Ok(n) = sock.recv(&mut buf) else { break };
        if let Ok(Datagram::Ages {
            entries,
            rejected,
            received,
            watchdog,
        }) = protocol::decode(&buf[..n], protocol::MAX_REPLY)
        {
            answered += 1;
            out.rejected += rejected;
            out.received += received;
            out.per_watchdog.push(WatchdogCounters {
                id: watchdog,
                received,
                rejected,
            });
            for e in entries {
                if let Some(age) = e.age_ms {
                    let key = (
                        SlotName {
                            role: e.role,
                            id: e.id,
                        },
                        e.pid,
                    );
                    out.by_pid
                        .entry(key)
                        .and_modify(|a: &mut u64| *a = (*a).min(age))
                        .or_insert(age);
                }
            }
        }
    }
    let _ = std::fs::remove_file(&path);
    out.per_watchdog.sort_by_key(|w| w.id);
    out
}

pub fn render(s: &Snapshot, colour: bool) -> String {
    use std::fmt::Write as _;
    let paint = |code: &str, text: &str| {
        if colour {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    };
    let mut out = String::new();
    let verdict = match (s.whole, s.services_ready) {
        (true, true) if s.services.is_empty() => paint("32", "all daemons heartbeating"),
        (true, true) => paint("32", "all daemons heartbeating, all services ready"),
        _ => paint("31;1", "DEGRADED"),
    };
    let _ = writeln!(
        out,
        "nexus in {} — master pid {} — {verdict}",
        s.runtime_dir, s.master_pid
    );
    let _ = writeln!(
        out,
        "{:>8}  {:<13} {:>3}  {:>9}  {:>5}  {:>7}  {:<22} {:>8}  LAST CAUSE",
        "PID", "ROLE", "ID", "UPTIME", "CPU%", "MEM", "STATUS", "RESTARTS"
    );
    for r in &s.daemons {
        let role = if r.master {
            format!("{}*", r.role)
        } else {
            r.role.to_string()
        };
        let state = format!("{:?}", r.state).to_lowercase();
        let status = match r.heartbeat_age_ms {
            Some(a) if r.silent => format!("SILENT {:.1}s", a as f64 / 1000.0),
            Some(a) => format!("{state}, hb {:.1}s ago", a as f64 / 1000.0),
            None if r.master => format!("{state}, master"),
            None if r.pid > 0 => format!("{state}, no hb yet"),
            None => state,
        };
        // Pad before painting: escape codes would otherwise break the column.
        let status = format!("{status:<22}");
        let status = match (r.state, r.silent) {
            (_, true) | (SlotState::Failed | SlotState::Down, _) => paint("31", &status),
            (SlotState::Starting | SlotState::Backoff, _) => paint("33", &status),
            (SlotState::Running, false) => paint("32", &status),
        };
        let pid = if r.pid > 0 {
            r.pid.to_string()
        } else {
            "-".into()
        };
        let mem = r
            .rss_kib
            .map_or("-".into(), |k| format!("{:.1}M", k as f64 / 1024.0));
        let _ = writeln!(
            out,
            "{pid:>8}  {role:<13} {:>3}  {:>9}  {:>5}  {mem:>7}  {status} {:>8}  {}",
            r.id,
            r.uptime_s.map_or("-".into(), fmt_duration),
            r.cpu_percent.map_or("-".into(), |c| format!("{c:.1}")),
            r.restarts,
            r.last_cause.as_deref().unwrap_or("-"),
        );
    }
    let _ = writeln!(
        out,
        "* master. hb: the freshest heartbeat any watchdog heard from that pid."
    );
    out.push_str(&super::services_view::render(&s.services, &paint));
    if let Some(t) = &s.tasks {
        out.push_str(&super::task::render_overview(t));
    }
    out
}

pub fn fmt_duration(s: f64) -> String {
    let s = s.max(0.0) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}
