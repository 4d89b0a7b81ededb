//! `nexus status`: the master's view of every slot, the watchdogs' heartbeat ages, and
//! each process's uptime, CPU and memory from /proc.

use std::collections::HashMap;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::Common;
use crate::client;
use crate::config::{Role, SlotName};
use crate::procscan;
use crate::protocol::{self, Datagram, Member, Request, Response, SlotState, StatusReport};
use crate::runtime_dir::RuntimeDir;

/// Exit code when nothing answers on the control socket.
pub const NOT_RUNNING: i32 = 3;

#[derive(Serialize)]
struct Row {
    role: Role,
    id: u32,
    pid: i32,
    state: SlotState,
    master: bool,
    uptime_s: Option<f64>,
    cpu_percent: Option<f64>,
    rss_kib: Option<u64>,
    heartbeat_age_ms: Option<u64>,
    restarts: u32,
    last_cause: Option<String>,
}

#[derive(Serialize)]
struct Json<'a> {
    runtime_dir: &'a str,
    master_pid: i32,
    whole: bool,
    daemons: Vec<Row>,
    rejected_by_master: u64,
    rejected_by_watchdogs: u64,
}

pub fn run(common: &Common, json: bool) -> Result<i32, String> {
    let dir = common.runtime_dir()?;
    let report = match client::request(
        &dir.control_socket(),
        &Request::Status {},
        Duration::from_secs(2),
    ) {
        Ok(Response::Status(r)) => r,
        Ok(other) => return Err(format!("unexpected answer from the master: {other:?}")),
        Err(e) => {
            eprintln!("nexus is not running in {} ({e})", dir.display());
            return Ok(NOT_RUNNING);
        }
    };
    let (ages, dog_rejected) = heartbeat_ages(&dir, &report);
    let rows: Vec<Row> = report.members.iter().map(|m| row(m, &ages)).collect();
    let whole = rows.iter().all(|r| r.state == SlotState::Running);
    if json {
        let out = Json {
            runtime_dir: &report.runtime_dir,
            master_pid: report.master_pid,
            whole,
            daemons: rows,
            rejected_by_master: report.rejected,
            rejected_by_watchdogs: dog_rejected,
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&out).map_err(|e| e.to_string())?
        );
    } else {
        print_table(&report, &rows, whole);
    }
    Ok(if whole { 0 } else { 1 })
}

fn row(m: &Member, ages: &HashMap<(SlotName, i32), u64>) -> Row {
    let live = m.pid > 0;
    let hz = procscan::clock_ticks_per_sec() as f64;
    let uptime = live
        .then(|| Some(procscan::uptime_secs()? - procscan::start_ticks(m.pid)? as f64 / hz))
        .flatten();
    let cpu = live
        .then(|| {
            let up = uptime?;
            let cpu = procscan::cpu_ticks(m.pid)? as f64 / hz;
            Some(if up > 0.0 {
                (cpu / up * 1000.0).round() / 10.0
            } else {
                0.0
            })
        })
        .flatten();
    Row {
        role: m.role,
        id: m.id,
        pid: m.pid,
        state: m.state,
        master: m.master,
        uptime_s: uptime.map(|u| (u * 10.0).round() / 10.0),
        cpu_percent: cpu,
        rss_kib: live.then(|| procscan::rss_kib(m.pid)).flatten(),
        // The master hears nothing itself; a slot's age is the freshest any watchdog saw.
        heartbeat_age_ms: ages.get(&(m.slot(), m.pid)).copied(),
        restarts: m.restarts,
        last_cause: m.last_cause.clone(),
    }
}

/// Asks every watchdog when it last heard each slot, from a private bound socket;
/// returns the freshest age per (slot, pid) and the watchdogs' rejection counts.
fn heartbeat_ages(dir: &RuntimeDir, report: &StatusReport) -> (HashMap<(SlotName, i32), u64>, u64) {
    let mut ages = HashMap::new();
    let mut rejected = 0;
    let path = dir.client_socket();
    let _ = std::fs::remove_file(&path);
    let Ok(sock) = UnixDatagram::bind(&path) else {
        return (ages, rejected);
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
            rejected: r,
            ..
        }) = protocol::decode(&buf[..n], protocol::MAX_REPLY)
        {
            answered += 1;
            rejected += r;
            for e in entries {
                if let Some(age) = e.age_ms {
                    let key = (
                        SlotName {
                            role: e.role,
                            id: e.id,
                        },
                        e.pid,
                    );
                    ages.entry(key)
                        .and_modify(|a: &mut u64| *a = (*a).min(age))
                        .or_insert(age);
                }
            }
        }
    }
    let _ = std::fs::remove_file(&path);
    (ages, rejected)
}

fn print_table(report: &StatusReport, rows: &[Row], whole: bool) {
    println!(
        "nexus in {} — master pid {} — {}",
        report.runtime_dir,
        report.master_pid,
        if whole {
            "all daemons heartbeating"
        } else {
            "DEGRADED"
        }
    );
    println!(
        "{:>8}  {:<13} {:>3}  {:>9}  {:>5}  {:>7}  {:<22} {:>8}  LAST CAUSE",
        "PID", "ROLE", "ID", "UPTIME", "CPU%", "MEM", "STATUS", "RESTARTS"
    );
    for r in rows {
        let role = if r.master {
            format!("{}*", r.role)
        } else {
            r.role.to_string()
        };
        let state = format!("{:?}", r.state).to_lowercase();
        // The heartbeat age is the freshest any watchdog heard from this very pid.
        let status = match r.heartbeat_age_ms {
            Some(a) => format!("{state}, hb {:.1}s ago", a as f64 / 1000.0),
            None if r.pid > 0 => format!("{state}, no hb yet"),
            None => state,
        };
        let pid = if r.pid > 0 {
            r.pid.to_string()
        } else {
            "-".into()
        };
        let mem = r
            .rss_kib
            .map_or("-".into(), |k| format!("{:.1}M", k as f64 / 1024.0));
        println!(
            "{pid:>8}  {role:<13} {:>3}  {:>9}  {:>5}  {mem:>7}  {status:<22} {:>8}  {}",
            r.id,
            r.uptime_s.map_or("-".into(), fmt_duration),
            r.cpu_percent.map_or("-".into(), |c| format!("{c:.1}")),
            r.restarts,
            r.last_cause.as_deref().unwrap_or("-"),
        );
    }
    println!("* master. hb: the freshest heartbeat any watchdog heard from that pid.");
}

fn fmt_duration(s: f64) -> String {
    let s = s.max(0.0) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}
