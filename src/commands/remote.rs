//! `nexus --api URL …`: the verbs that make sense from another machine, over the HTTP API,
//! printing what they print locally (the same renderers, from the same documents):
//! status, health, events, logs, metrics, pid, service, restart, scale, reload, task.
//! What changes something waits, as locally, by watching the status until it took effect.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::health::Report;
use super::status::{NOT_RUNNING, Snapshot};
use crate::config::Config;
use crate::http::client::{Answer, Api};

pub const VERBS: &str =
    "status, health, events, logs, metrics, pid, service, restart, scale, reload, task";

#[derive(Default)]
struct Flags {
    json: bool,
    follow: bool,
    last: Option<usize>,
    event: Option<String>,
    config: Option<String>,
    wait: bool,
    query: Vec<(String, String)>,
    positional: Vec<String>,
}

fn parse(args: &[String]) -> Result<Flags, String> {
    let mut f = Flags::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match a.as_str() {
            "--json" => f.json = true,
            "-f" | "--follow" => f.follow = true,
            "--wait" => f.wait = true,
            "-n" => {
                f.last = Some(
                    value(a)?
                        .parse()
                        .map_err(|_| "-n takes a number".to_string())?,
                )
            }
            "--event" => f.event = Some(value(a)?),
            "--config" => f.config = Some(value(a)?),
            "--priority" | "--max-attempts" | "--timeout-ms" | "--after" | "--delay-ms"
            | "--unique" | "--state" | "--limit" => {
                let v = value(a)?;
                f.query
                    .push((a.trim_start_matches("--").replace('-', "_"), v));
            }
            "--runtime-dir" => {
                return Err(
                    "--runtime-dir does not go with --api: the API serves one cluster".into(),
                );
            }
            s if s.starts_with('-') && s.len() > 1 => {
                return Err(format!("unknown option {s} over --api"));
            }
            s => f.positional.push(s.to_string()),
        }
    }
    Ok(f)
}

/// `a=1&b=x`, values percent-encoded.
fn query(pairs: &[(String, String)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A refusal as the one line a user reads.
fn refused(a: &Answer) -> String {
    match a.status {
        401 => format!("the API refused the key (401): {}", a.message()),
        403 => format!("refused (403): {}", a.message()),
        _ => format!("{} ({})", a.message(), a.status),
    }
}

fn ok_json(a: Answer) -> Result<Value, String> {
    if !(200..300).contains(&a.status) {
        return Err(refused(&a));
    }
    serde_json::from_slice(&a.body).map_err(|e| format!("the API's answer is not JSON: {e}"))
}

pub fn run(api: &Api, args: &[String]) -> Result<i32, String> {
    let Some((verb, rest)) = args.split_first() else {
        return Err(format!("--api needs a command: {VERBS}"));
    };
    if verb == "task" {
        return task(api, rest);
    }
    let f = parse(rest)?;
    let one = |what: &str| -> Result<String, String> {
        match f.positional.as_slice() {
            [x] => Ok(x.clone()),
            _ => Err(format!("{verb} takes one {what}")),
        }
    };
    match verb.as_str() {
        "status" => status(api, f.json),
        "health" => health(api, f.json),
        "metrics" => {
            let a = api.get("/metrics")?;
            if a.status != 200 {
                return Err(refused(&a));
            }
            print!("{}", String::from_utf8_lossy(&a.body));
            Ok(0)
        }
        "events" => {
            let mut q = vec![
                ("n".to_string(), f.last.unwrap_or(20).to_string()),
                (
                    "follow".to_string(),
                    if f.follow { "1" } else { "0" }.to_string(),
                ),
            ];
            if let Some(e) = &f.event {
                q.push(("event".into(), e.clone()));
            }
            let a = api.stream(&format!("/api/v1/events?{}", query(&q)), |e| {
                if e.event == "ledger" {
                    super::events::print_line(e.data, f.json);
                }
                true
            })?;
            if a.status != 200 {
                return Err(refused(&a));
            }
            Ok(0)
        }
        "logs" => {
            let path = match f.positional.as_slice() {
                [] => "/api/v1/logs".to_string(),
                [name] => format!("/api/v1/logs/{}", encode(name)),
                _ => return Err("logs takes at most one name, like workflow-3".into()),
            };
            let q = [
                ("n".to_string(), f.last.unwrap_or(20).to_string()),
                (
                    "follow".to_string(),
                    if f.follow { "1" } else { "0" }.to_string(),
                ),
            ];
            let a = api.stream(&format!("{path}?{}", query(&q)), |e| {
                if e.event == "line" {
                    println!("{}", e.data);
                }
                true
            })?;
            if a.status != 200 {
                return Err(refused(&a));
            }
            Ok(0)
        }
        "pid" => pid(
            api,
            &one("name: a daemon (workflow-3) or an instance (web-1)")?,
        ),
        "service" => match f.positional.as_slice() {
            [action, target] => service(api, action, target),
            _ => Err(
                "service takes an action and a name: service start|stop|restart NAME[-N]".into(),
            ),
        },
        "restart" => restart(api, &one("daemon name, like workflow-3")?),
        "scale" => scale(api, &f.positional),
        "reload" => {
            let path = f
                .config
                .clone()
                .or_else(|| std::env::var("NEXUS_CONFIG").ok())
                .ok_or("reload over --api sends a config file: give --config PATH")?;
            let cfg = Config::load(std::path::Path::new(&path)).map_err(|e| e.to_string())?;
            let changes = ok_json(api.post("/api/v1/reload", &cfg.to_json())?)?;
            print_changes(&changes);
            let t0 = Instant::now();
            wait_settled(
                api,
                Duration::from_millis(cfg.start_timeout_ms + 30_000),
                |s| s.whole && s.services_ready && s.daemons.len() == cfg.total(),
            )?;
            println!("applied in {:.1} ms", t0.elapsed().as_secs_f64() * 1000.0);
            Ok(0)
        }
        other => Err(format!(
            "`{other}` is not available over --api (it runs on the cluster's own machine); these are: {VERBS}"
        )),
    }
}

fn snapshot(api: &Api) -> Result<Option<Snapshot>, String> {
    let a = api.get("/api/v1/status")?;
    if a.status == 503 {
        eprintln!("{}", a.message());
        return Ok(None);
    }
    let v = ok_json(a)?;
    serde_json::from_value(v)
        .map(Some)
        .map_err(|e| format!("the status from the API does not parse: {e}"))
}

fn status(api: &Api, json: bool) -> Result<i32, String> {
    let Some(s) = snapshot(api)? else {
        return Ok(NOT_RUNNING);
    };
    super::status::print(&s, json)
}

fn health(api: &Api, json: bool) -> Result<i32, String> {
    let a = api.get("/api/v1/health")?;
    if a.status != 200 && a.status != 503 {
        return Err(refused(&a));
    }
    let r: Report =
        serde_json::from_slice(&a.body).map_err(|e| format!("the health answer: {e}"))?;
    Ok(super::health::print(&r, json))
}

fn pid(api: &Api, name: &str) -> Result<i32, String> {
    let s = snapshot(api)?.ok_or("nexus is not running")?;
    let pid = s
        .daemons
        .iter()
        .find(|d| format!("{}-{}", d.role, d.id) == name)
        .map(|d| d.pid)
        .or_else(|| {
            s.services
                .iter()
                .find(|r| format!("{}-{}", r.name, r.instance) == name)
                .map(|r| r.pid)
        })
        .ok_or_else(|| format!("no daemon or service instance named `{name}`"))?;
    if pid == 0 {
        return Err(format!("{name} has no process right now"));
    }
    println!("{pid}");
    Ok(0)
}

fn print_changes(v: &Value) {
    for c in v["changes"].as_array().into_iter().flatten() {
        println!("{}", c.as_str().unwrap_or_default());
    }
}

/// Polls the status every 100 ms until `done`; the deadline's error names what is missing.
fn wait_settled(
    api: &Api,
    within: Duration,
    mut done: impl FnMut(&Snapshot) -> bool,
) -> Result<Snapshot, String> {
    let deadline = Instant::now() + within;
    // Bounded by the deadline and a count.
    for _ in 0..100_000 {
        if let Some(s) = snapshot(api)?
            && done(&s)
        {
            return Ok(s);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "not done within {} ms (see `nexus --api URL status`)",
                within.as_millis()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err("gave up waiting".into())
}

fn service(api: &Api, action: &str, target: &str) -> Result<i32, String> {
    if !matches!(action, "start" | "stop" | "restart") {
        return Err(format!(
            "`service {action}`: the actions are start, stop and restart"
        ));
    }
    let before = snapshot(api)?.ok_or("nexus is not running")?;
    let ours = |s: &Snapshot| -> Vec<(String, i32, String, bool)> {
        s.services
            .iter()
            .filter(|r| r.name == target || format!("{}-{}", r.name, r.instance) == target)
            .map(|r| {
                (
                    format!("{}-{}", r.name, r.instance),
                    r.pid,
                    r.state.clone(),
                    r.stopped_by_user,
                )
            })
            .collect()
    };
    let old = ours(&before);
    let t0 = Instant::now();
    let changes = ok_json(api.post(&format!("/api/v1/services/{}/{action}", encode(target)), "")?)?;
    print_changes(&changes);
    let settled = |state: &str| state == "ready" || state == "completed";
    let after = wait_settled(api, Duration::from_secs(60), |s| {
        let now = ours(s);
        !now.is_empty()
            && now.iter().all(|(n, pid, state, _)| match action {
                "stop" => state == "stopped",
                "start" => settled(state),
                _ => {
                    let was = old.iter().find(|o| &o.0 == n).map_or(0, |o| o.1);
                    settled(state) && (*pid != was || state == "completed")
                }
            })
    })?;
    for (n, pid, state, _) in ours(&after) {
        let pid = if pid > 0 {
            format!(" (pid {pid})")
        } else {
            String::new()
        };
        println!("{n}: {state}{pid}");
    }
    println!("done in {:.1} ms", t0.elapsed().as_secs_f64() * 1000.0);
    Ok(0)
}

fn restart(api: &Api, name: &str) -> Result<i32, String> {
    let before = snapshot(api)?.ok_or("nexus is not running")?;
    let key = |d: &super::status::Row| format!("{}-{}", d.role, d.id);
    let old = before
        .daemons
        .iter()
        .find(|d| key(d) == name)
        .map_or(0, |d| d.pid);
    let t0 = Instant::now();
    let changes = ok_json(api.post(&format!("/api/v1/daemons/{}/restart", encode(name)), "")?)?;
    print_changes(&changes);
    let s = wait_settled(api, Duration::from_secs(30), |s| {
        s.daemons.iter().any(|d| {
            key(d) == name
                && d.pid != old
                && d.pid > 0
                && d.state == crate::protocol::SlotState::Running
        })
    })?;
    let new = s
        .daemons
        .iter()
        .find(|d| key(d) == name)
        .map_or(0, |d| d.pid);
    println!(
        "{name} restarted: pid {old} -> {new} in {:.1} ms",
        t0.elapsed().as_secs_f64() * 1000.0
    );
    Ok(0)
}

fn scale(api: &Api, assignments: &[String]) -> Result<i32, String> {
    if assignments.is_empty() {
        return Err("scale needs at least one ROLE=COUNT, like workflow=8".into());
    }
    let mut body = serde_json::Map::new();
    for a in assignments {
        let (what, n) = super::steer::assignment(a)?;
        body.insert(what.to_string(), json!(n));
    }
    let t0 = Instant::now();
    let changes = ok_json(api.post("/api/v1/scale", &Value::Object(body.clone()).to_string())?)?;
    for c in changes["changes"].as_array().into_iter().flatten() {
        println!("  {}", c.as_str().unwrap_or_default());
    }
    let want = |s: &Snapshot, what: &str| -> Option<usize> {
        let role = what.trim_end_matches('s');
        if ["communicator", "watchdog", "workflow"].contains(&role) {
            return Some(s.daemons.iter().filter(|d| d.role.as_str() == role).count());
        }
        Some(s.services.iter().filter(|r| r.name == what).count())
    };
    wait_settled(api, Duration::from_secs(60), |s| {
        s.whole
            && s.services_ready
            && body
                .iter()
                .all(|(k, v)| want(s, k) == v.as_u64().map(|n| n as usize))
    })?;
    println!("applied in {:.1} ms", t0.elapsed().as_secs_f64() * 1000.0);
    Ok(0)
}

fn task(api: &Api, args: &[String]) -> Result<i32, String> {
    let Some((sub, rest)) = args.split_first() else {
        return Err(
            "task needs a command over --api: submit, status, list, cancel, retry, wait".into(),
        );
    };
    let f = parse(rest)?;
    let id = || -> Result<i64, String> {
        match f.positional.as_slice() {
            [x] => x
                .parse::<i64>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("`{x}` is not a task id")),
            _ => Err(format!("task {sub} takes one task id")),
        }
    };
    match sub.as_str() {
        "submit" => {
            let [json_text] = f.positional.as_slice() else {
                return Err("task submit takes one JSON argument (quote it)".into());
            };
            let q = query(&f.query);
            let v = ok_json(api.post(&format!("/api/v1/tasks?{q}"), json_text)?)?;
            let id = v["id"].as_i64().ok_or("the API gave no task id")?;
            println!("{id}");
            if f.wait {
                return wait_tasks(api, &[id], false);
            }
            Ok(0)
        }
        "status" => {
            let t = ok_json(api.get(&format!("/api/v1/tasks/{}", id()?))?)?;
            if f.json {
                println!("{}", serde_json::to_string_pretty(&t).unwrap_or_default());
            } else {
                print!("{}", super::task::describe(&t));
            }
            Ok(0)
        }
        "list" => {
            let q = query(&f.query);
            let v = ok_json(api.get(&format!("/api/v1/tasks?{q}"))?)?;
            let tasks = v["tasks"].as_array().cloned().unwrap_or_default();
            let state = f
                .query
                .iter()
                .find(|(k, _)| k == "state")
                .map(|(_, v)| v.as_str());
            super::task::print_list(&tasks, v["next"].as_i64(), state, f.json);
            Ok(0)
        }
        "cancel" | "retry" => {
            let v = ok_json(api.post(&format!("/api/v1/tasks/{}/{sub}", id()?), "")?)?;
            println!("{}", v["message"].as_str().unwrap_or_default());
            Ok(0)
        }
        "wait" => {
            let ids = f
                .positional
                .iter()
                .map(|p| {
                    p.parse::<i64>()
                        .map_err(|_| format!("`{p}` is not a task id"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            if ids.is_empty() {
                return Err("task wait needs one or more task ids".into());
            }
            wait_tasks(api, &ids, f.json)
        }
        other => Err(format!(
            "`task {other}` is not available over --api (submit, status, list, cancel, retry, wait are)"
        )),
    }
}

fn wait_tasks(api: &Api, ids: &[i64], json: bool) -> Result<i32, String> {
    let finished = |t: &Value| {
        matches!(
            t["state"].as_str(),
            Some("succeeded" | "failed" | "cancelled")
        )
    };
    // Bounded: a week of polls, twice a second.
    for _ in 0..1_209_600 {
        let mut done = Vec::new();
        for id in ids {
            let t = ok_json(api.get(&format!("/api/v1/tasks/{id}"))?)?;
            if !finished(&t) {
                break;
            }
            done.push(t);
        }
        if done.len() == ids.len() {
            return Ok(super::task::report_finished(&done, json));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Err("gave up waiting".into())
}
