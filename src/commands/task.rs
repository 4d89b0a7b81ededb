//! `nexus task submit|status|list|cancel|retry|wait|logs`: the task queue from a shell.
//! Everything goes through the queue's socket (`tasks.sock`), except reading a task's
//! log, and `status`/`list` while the cluster is down, which read the state directory.

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::Common;
use crate::config::Config;
use crate::runtime_dir::RuntimeDir;
use crate::tasks::backend::Backend;
use crate::tasks::lifecycle::TaskState;
use crate::tasks::settings::{self, MAX_ATTEMPTS, MAX_TIMEOUT_MS};
use crate::tasks::store::NewTask;
use crate::tasks::wire::{self, FromQueue, ToQueue};

pub const USAGE: &str = "\
Usage:
  nexus task submit JSON [--priority N] [--max-attempts N] [--timeout-ms N] [--after ID]
                         [--delay-ms N] [--unique KEY] [--wait]
        JSON is an object with \"action\" (a name from the config's `actions`) or \"command\"
        (an argv); \"required_capabilities\": [..] sends it only to workers that have them.
        The whole JSON reaches the program's stdin; NEXUS_TASK_ID and NEXUS_TASK_ATTEMPT are
        in its environment; its exit code decides; its stdout (first 64 KiB) is the result.
        Prints the new task's id alone; --wait then waits and exits with the task's code.
        --priority -1000..1000 (higher first, FIFO within one; default 0), --max-attempts
        1..1000 (default 3, or the action's), --timeout-ms (kills its process group),
        --after ID (only once that task succeeded), --delay-ms (held back that long),
        --unique KEY (refused while a live task has that key).
  nexus task status ID [--json]          one task: state, attempts, worker, result, error, why it waits
  nexus task list [--state S] [--after ID] [--limit N] [--json]
                                          tasks in id order, a page at a time (default 50, at most 1000)
  nexus task cancel ID                   a waiting task is cancelled; a running one is killed too
  nexus task retry ID                    a failed or cancelled task queued again, with fresh attempts
  nexus task wait ID...                  until all are finished; exits 0 if all succeeded, else the
                                          first failure's exit code (1 if it had none)
  nexus task logs ID [-f]                its output (every attempt); -f follows until it finishes
States: queued, running, retrying, succeeded, failed, cancelled.
";

pub const MAX_PRIORITY: i64 = 1000;
/// How an answer that no queue runs begins: `status`, `list` and `logs` then read the
/// state directory instead.
const NOT_RUNNING: &str = "nexus is not running";
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_REPLY: usize = 256 << 20;

#[derive(Default)]
struct Flags {
    json: bool,
    wait: bool,
    follow: bool,
    priority: Option<i64>,
    max_attempts: Option<u32>,
    timeout_ms: Option<u64>,
    after: Option<i64>,
    delay_ms: u64,
    unique: Option<String>,
    state: Option<String>,
    after_id: i64,
    limit: u32,
}

fn number<T: std::str::FromStr + PartialOrd + std::fmt::Display>(
    flag: &str,
    v: Option<&String>,
    min: T,
    max: T,
) -> Result<T, String> {
    let v = v.ok_or_else(|| format!("{flag} needs a value"))?;
    match v.parse::<T>() {
        Ok(n) if n >= min && n <= max => Ok(n),
        _ => Err(format!(
            "{flag} takes a whole number from {min} to {max}, not `{v}`"
        )),
    }
}

/// Returns the exit code; Err(text) is a one-line error (exit 1), usage errors included.
#[inline(never)]
pub fn run(common_in: &Common, args: &[String]) -> Result<i32, String> {
    let Some((verb, rest)) = args.split_first() else {
        print!("{USAGE}");
        return Ok(2);
    };
    if matches!(verb.as_str(), "-h" | "--help" | "help") {
        print!("{USAGE}");
        return Ok(0);
    }
    let mut common = Common {
        runtime_dir: common_in.runtime_dir.clone(),
        config: common_in.config.clone(),
    };
    let mut f = Flags {
        limit: 50,
        ..Flags::default()
    };
    let mut positional: Vec<String> = Vec::new();
    let mut it = rest.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--runtime-dir" => {
                common.runtime_dir = Some(PathBuf::from(
                    it.next().ok_or("--runtime-dir needs a value")?,
                ))
            }
            "--config" => {
                common.config = Some(PathBuf::from(it.next().ok_or("--config needs a value")?))
            }
            "--json" => f.json = true,
            "--wait" => f.wait = true,
            "-f" | "--follow" => f.follow = true,
            "--priority" => f.priority = Some(number(a, it.next(), -MAX_PRIORITY, MAX_PRIORITY)?),
            "--max-attempts" => f.max_attempts = Some(number(a, it.next(), 1, MAX_ATTEMPTS)?),
            "--timeout-ms" => f.timeout_ms = Some(number(a, it.next(), 1, MAX_TIMEOUT_MS)?),
            "--after" => f.after = Some(number(a, it.next(), 1, i64::MAX)?),
            "--delay-ms" => f.delay_ms = number(a, it.next(), 0, MAX_TIMEOUT_MS)?,
            "--unique" => {
                let k = it.next().ok_or("--unique needs a value")?;
                if k.is_empty() || k.len() > 200 {
                    return Err("--unique takes a key of 1 to 200 characters".into());
                }
                f.unique = Some(k.clone());
            }
            "--state" => {
                let s = it.next().ok_or("--state needs a value")?;
                if TaskState::parse(s).is_none() {
                    return Err(format!(
                        "--state takes queued, running, retrying, succeeded, failed or cancelled, not `{s}`"
                    ));
                }
                f.state = Some(s.clone());
            }
            "--after-id" => f.after_id = number(a, it.next(), 0, i64::MAX)?,
            "--limit" => f.limit = number(a, it.next(), 1, crate::tasks::queue::MAX_PAGE)?,
            "-h" | "--help" => {
                print!("{USAGE}");
                return Ok(0);
            }
            s if s.starts_with('-') && s.len() > 1 && s.parse::<i64>().is_err() => {
                return Err(format!(
                    "unknown option {s} for `task {verb}` (see `nexus task help`)"
                ));
            }
            s => positional.push(s.to_string()),
        }
    }
    // `task list --after ID` pages on; elsewhere --after is submit's dependency.
    if verb == "list"
        && let Some(a) = f.after.take()
    {
        f.after_id = a;
    }
    let dir = common.runtime_dir()?;
    let id_arg = |p: &[String]| -> Result<i64, String> {
        match p {
            [one] => one
                .parse::<i64>()
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| format!("`{one}` is not a task id (a whole number, 1 or more)")),
            [] => Err(format!("task {verb} needs a task id")),
            [_, extra, ..] => Err(format!(
                "task {verb} takes one task id; unexpected `{extra}`"
            )),
        }
    };
    match verb.as_str() {
        "submit" => submit(&dir, &common, &positional, &f),
        "status" => status(&dir, id_arg(&positional)?, f.json),
        "list" => {
            if let Some(x) = positional.first() {
                return Err(format!("task list takes no argument; unexpected `{x}`"));
            }
            list(&dir, &f)
        }
        "cancel" | "retry" => {
            let id = id_arg(&positional)?;
            let req = if verb == "cancel" {
                ToQueue::Cancel { id }
            } else {
                ToQueue::Retry { id }
            };
            match ask(&dir, &req)? {
                FromQueue::Done { message } => {
                    println!("{message}");
                    Ok(0)
                }
                other => Err(unexpected(other)),
            }
        }
        "wait" => {
            if positional.is_empty() {
                return Err("task wait needs one or more task ids".into());
            }
            let ids = positional
                .iter()
                .map(|p| id_arg(std::slice::from_ref(p)))
                .collect::<Result<Vec<_>, _>>()?;
            wait(&dir, &ids, f.json)
        }
        "logs" => logs(&dir, id_arg(&positional)?, f.follow),
        other => Err(format!(
            "unknown task command `{other}` (submit, status, list, cancel, retry, wait, logs)"
        )),
    }
}

fn unexpected(m: FromQueue) -> String {
    match m {
        FromQueue::Error { message } => message,
        other => format!("unexpected answer from the queue: {other:?}"),
    }
}

/// One request, one answer line. `wait` may take as long as the tasks do. Across a
/// change of master (its socket briefly gone, or a connection cut), a request is tried
/// again for a few seconds: any request that was never sent, and one that only reads.
fn ask_with(
    dir: &RuntimeDir,
    req: &ToQueue,
    timeout: Option<Duration>,
) -> Result<FromQueue, String> {
    let reads_only = matches!(
        req,
        ToQueue::Status { .. }
            | ToQueue::List { .. }
            | ToQueue::Overview { .. }
            | ToQueue::Wait { .. }
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = String::new();
    for _ in 0..200 {
        match ask_once(dir, req, timeout) {
            Ok(m) => return Ok(m),
            Err(Attempt::Final(e)) => return Err(e),
            Err(Attempt::NotSent(e)) => {
                // Nobody holds the lock: not a failover, simply not running.
                if !crate::runtime_dir::LeaderLock::is_held(&dir.leader_lock()) {
                    return Err(e);
                }
                last = e;
            }
            Err(Attempt::Cut(e)) if reads_only => last = e,
            Err(Attempt::Cut(e)) => {
                return Err(format!(
                    "{e}; the master changed while it answered: check with `nexus task list` before submitting again"
                ));
            }
        }
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(last)
}

enum Attempt {
    /// The queue's answer (an error it gave, a timeout): no second try.
    Final(String),
    /// Nothing reached the queue.
    NotSent(String),
    /// Sent, but the connection ended without an answer.
    Cut(String),
}

fn ask_once(
    dir: &RuntimeDir,
    req: &ToQueue,
    timeout: Option<Duration>,
) -> Result<FromQueue, Attempt> {
    let path = dir.tasks_socket();
    let mut s = UnixStream::connect(&path).map_err(|e| {
        Attempt::NotSent(
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) {
                format!(
                    "{NOT_RUNNING} in {} (no task queue at {}); start it with ./start",
                    dir.display(),
                    path.display()
                )
            } else {
                format!("cannot connect to {}: {e}", path.display())
            },
        )
    })?;
    s.set_read_timeout(timeout).ok();
    s.set_write_timeout(Some(REQUEST_TIMEOUT)).ok();
    s.write_all(&wire::encode(req))
        .map_err(|e| Attempt::NotSent(format!("cannot send to the task queue: {e}")))?;
    let mut reader = BufReader::new(s).take(MAX_REPLY as u64);
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line).map_err(|e| {
        if matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) {
            Attempt::Final(format!(
                "the task queue did not answer within {} s",
                REQUEST_TIMEOUT.as_secs()
            ))
        } else {
            Attempt::Cut(format!("cannot read the task queue's answer: {e}"))
        }
    })?;
    if line.is_empty() {
        return Err(Attempt::Cut(
            "the task queue closed the connection without an answer".into(),
        ));
    }
    match serde_json::from_slice::<FromQueue>(&line) {
        Ok(FromQueue::Error { message }) => Err(Attempt::Final(message)),
        Ok(m) => Ok(m),
        Err(e) => Err(Attempt::Final(format!(
            "garbled answer from the task queue: {e}"
        ))),
    }
}

pub fn ask(dir: &RuntimeDir, req: &ToQueue) -> Result<FromQueue, String> {
    ask_with(dir, req, Some(REQUEST_TIMEOUT))
}

/// Checks the JSON and the flags, resolves the action: everything a user can get wrong
/// is refused here, before anything is stored.
pub fn submission(
    json_text: &str,
    cfg: &Config,
    cwd: Option<&Path>,
    priority: Option<i64>,
    max_attempts: Option<u32>,
    timeout_ms: Option<u64>,
) -> Result<NewTask, String> {
    let v: Value =
        serde_json::from_str(json_text).map_err(|e| format!("the task is not valid JSON: {e}"))?;
    let Value::Object(obj) = &v else {
        return Err(
            "the task must be a JSON object, like {\"command\": [\"sh\", \"-c\", \"echo hi\"]}"
                .into(),
        );
    };
    let mut problems = crate::services::spec::Problems::default();
    let mut required = match obj.get("required_capabilities") {
        Some(r) => settings::capability_list("`required_capabilities`", r, &mut problems)
            .unwrap_or_default(),
        None => Vec::new(),
    };
    if let Some(p) = problems.0.first() {
        return Err(p.clone());
    }
    let (argv, action) = match (obj.get("action"), obj.get("command")) {
        (Some(_), Some(_)) => {
            return Err("the task has both \"action\" and \"command\": give one".into());
        }
        (None, None) => {
            return Err("the task needs \"action\" (a name from the config's `actions`) or \"command\" (an argv)".into());
        }
        (Some(Value::String(name)), None) => {
            let a = cfg.actions.get(name).ok_or_else(|| {
                let known: Vec<&str> = cfg.actions.keys().map(String::as_str).collect();
                if known.is_empty() {
                    format!("unknown action {name:?}: the cluster's config has no `actions`")
                } else {
                    format!(
                        "unknown action {name:?} (the config's actions: {})",
                        known.join(", ")
                    )
                }
            })?;
            (a.command.clone(), Some(a))
        }
        (Some(other), None) => return Err(format!("\"action\" must be a name, got {other}")),
        (None, Some(c)) => {
            let argv = settings::string_list("\"command\"", c, &mut problems);
            match (argv, problems.0.first()) {
                (_, Some(p)) => return Err(p.clone()),
                (Some(a), None) if !a.is_empty() && !a[0].is_empty() => (a, None),
                _ => return Err("\"command\" is empty: give the program and its arguments".into()),
            }
        }
    };
    if let Some(a) = action {
        required.extend(a.required_capabilities.iter().cloned());
        required.sort();
        required.dedup();
    }
    if json_text.len() > wire::SPEC_MAX {
        return Err(format!(
            "the task's JSON is {} bytes; at most {} (it reaches the program's stdin)",
            json_text.len(),
            wire::SPEC_MAX
        ));
    }
    Ok(NewTask {
        spec: json_text.to_string(),
        argv,
        required,
        priority: priority.unwrap_or(0) as i32,
        max_attempts: max_attempts
            .or(action.and_then(|a| a.max_attempts))
            .unwrap_or(3),
        timeout_ms: timeout_ms.or(action.and_then(|a| a.timeout_ms)),
        delay_ms: 0,
        after: None,
        unique: None,
        cwd: action
            .and_then(|a| a.cwd.as_deref())
            .or(cwd)
            .map(|p| p.display().to_string()),
    })
}

fn submit(
    dir: &RuntimeDir,
    common: &Common,
    positional: &[String],
    f: &Flags,
) -> Result<i32, String> {
    let text = match positional {
        [one] => one.clone(),
        [] => return Err("task submit needs the task's JSON, like '{\"command\": [\"sh\", \"-c\", \"echo hi\"]}'".into()),
        [_, extra, ..] => return Err(format!("task submit takes one JSON argument; unexpected `{extra}` (quote the JSON)")),
    };
    // The actions of the config the cluster runs with.
    let cfg = match Config::load(&dir.config_file()) {
        Ok(c) => c,
        Err(_) => common.load_config()?,
    };
    // A command runs where it was submitted from; an action where its config lives.
    let cwd = std::env::current_dir().ok();
    let mut s = submission(
        &text,
        &cfg,
        cwd.as_deref(),
        f.priority,
        f.max_attempts,
        f.timeout_ms,
    )?;
    s.delay_ms = f.delay_ms;
    s.after = f.after;
    s.unique = f.unique.clone();
    let id = match ask(dir, &ToQueue::Submit(s))? {
        FromQueue::Submitted { id } => id,
        other => return Err(unexpected(other)),
    };
    println!("{id}");
    let _ = std::io::stdout().flush();
    if f.wait {
        return wait(dir, &[id], false);
    }
    Ok(0)
}

fn state_dir_of(dir: &RuntimeDir) -> PathBuf {
    Config::load(&dir.config_file())
        .ok()
        .and_then(|c| c.state_dir)
        .unwrap_or_else(|| settings::default_state_dir(dir.path()))
}

type OfflineStore = (Box<dyn Backend>, PathBuf);

/// This cluster's name in a shared queue.
fn this_host(dir: &RuntimeDir) -> String {
    Config::load(&dir.config_file())
        .ok()
        .and_then(|c| c.queue_host)
        .unwrap_or_else(|| settings::default_queue_host(dir.path()))
}

/// The store the cluster's config names, read directly (the cluster is down), with the
/// state directory; None when there is no queue yet.
fn offline_store(dir: &RuntimeDir) -> Result<Option<OfflineStore>, String> {
    let state = state_dir_of(dir);
    let url = Config::load(&dir.config_file())
        .ok()
        .and_then(|c| c.queue_url);
    if let Some(url) = url {
        let store = crate::tasks::postgres::PgStore::reader(&url).map_err(|e| e.to_string())?;
        return Ok(Some((Box::new(store), state)));
    }
    let db = state.join("tasks.db");
    if !db.exists() {
        return Ok(None);
    }
    let store = crate::tasks::store::Store::open(&db).map_err(|e| e.to_string())?;
    Ok(Some((Box::new(store), state)))
}

/// The store read directly (the cluster is down): the same JSON, without the live parts.
fn offline_task(dir: &RuntimeDir, id: i64) -> Result<Value, String> {
    let Some((mut store, state)) = offline_store(dir)? else {
        return Err(format!(
            "no task {id}: there is no queue in {}",
            state_dir_of(dir).display()
        ));
    };
    let row = store.get(id).map_err(|e| e.to_string())?;
    let history = store.attempts(id).map_err(|e| e.to_string())?;
    Ok(crate::tasks::view::task_json(
        &row,
        &history,
        Some("the cluster is not running".into()).filter(|_| !row.state.is_final()),
        &crate::tasks::view::log_path(&state, id),
    ))
}

fn status(dir: &RuntimeDir, id: i64, json: bool) -> Result<i32, String> {
    let task = match ask(dir, &ToQueue::Status { id }) {
        Ok(FromQueue::Task { task }) => task,
        Ok(other) => return Err(unexpected(other)),
        Err(e) if e.starts_with(NOT_RUNNING) => offline_task(dir, id)?,
        Err(e) => return Err(e),
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&task).unwrap_or_default()
        );
    } else {
        print!("{}", describe(&task));
    }
    Ok(0)
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

pub fn describe(t: &Value) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = write!(
        out,
        "task {}: {} (attempt {} of {})",
        t["id"],
        s(t, "state"),
        t["attempts"],
        t["max_attempts"]
    );
    if let Some(w) = t["worker"].as_str() {
        let _ = write!(out, " on {w}");
        if let Some(h) = t["host"].as_str() {
            let _ = write!(out, " of host {h}");
        }
        if let Some(p) = t["pid"].as_i64() {
            let _ = write!(out, " pid {p}");
        }
    }
    out.push('\n');
    let _ = writeln!(out, "  command:   {}", t["command"]);
    if t["required_capabilities"]
        .as_array()
        .is_some_and(|a| !a.is_empty())
    {
        let _ = writeln!(out, "  needs:     {}", t["required_capabilities"]);
    }
    let _ = writeln!(out, "  priority:  {}", t["priority"]);
    let _ = writeln!(out, "  submitted: {}", s(t, "submitted_at"));
    if let Some(x) = t["started_at"].as_str() {
        let _ = writeln!(out, "  started:   {x}");
    }
    if let Some(x) = t["finished_at"].as_str() {
        let _ = writeln!(out, "  finished:  {x}");
    }
    if !t["exit_code"].is_null() {
        let _ = writeln!(out, "  exit code: {}", t["exit_code"]);
    }
    if !t["result"].is_null() {
        let _ = writeln!(out, "  result:    {}", t["result"]);
    }
    if let Some(e) = t["error"].as_str() {
        let _ = writeln!(out, "  error:     {e}");
    }
    if let Some(w) = t["waiting"].as_str() {
        let _ = writeln!(out, "  waiting:   {w}");
    }
    if let Some(h) = t["history"].as_array().filter(|h| h.len() > 1) {
        for a in h {
            let how = match (a["exit_code"].as_i64(), a["error"].as_str()) {
                (_, Some(e)) => e.to_string(),
                (Some(c), None) => format!("exit {c}"),
                (None, None) => "running".into(),
            };
            let _ = writeln!(
                out,
                "  attempt {}: {} at {}: {how}",
                a["attempt"],
                s(a, "worker"),
                s(a, "started_at")
            );
        }
    }
    let _ = writeln!(out, "  log:       {}", s(t, "log"));
    out
}

fn list(dir: &RuntimeDir, f: &Flags) -> Result<i32, String> {
    let req = ToQueue::List {
        state: f.state.clone(),
        after: f.after_id,
        limit: f.limit,
    };
    let (tasks, next) = match ask(dir, &req) {
        Ok(FromQueue::Tasks { tasks, next }) => (tasks, next),
        Ok(other) => return Err(unexpected(other)),
        Err(e) if e.starts_with(NOT_RUNNING) => offline_list(dir, f)?,
        Err(e) => return Err(e),
    };
    print_list(&tasks, next, f.state.as_deref(), f.json);
    Ok(0)
}

/// A page of tasks as `task list` prints it: a table, or the JSON document.
pub fn print_list(tasks: &[Value], next: Option<i64>, state: Option<&str>, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"tasks": tasks, "next": next}))
                .unwrap_or_default()
        );
        return;
    }
    println!(
        "{:>6}  {:<10} {:>4} {:>8}  {:<12} WHAT",
        "ID", "STATE", "PRI", "ATTEMPTS", "WORKER"
    );
    for t in tasks {
        let what = t["error"]
            .as_str()
            .map(str::to_string)
            .or_else(|| t["waiting"].as_str().map(str::to_string))
            .unwrap_or_else(|| t["command"].to_string());
        let what: String = what.chars().take(80).collect();
        println!(
            "{:>6}  {:<10} {:>4} {:>8}  {:<12} {what}",
            t["id"].to_string(),
            s(t, "state"),
            t["priority"].to_string(),
            format!("{}/{}", t["attempts"], t["max_attempts"]),
            t["worker"].as_str().unwrap_or("-"),
        );
    }
    if let Some(n) = next {
        println!(
            "(more: nexus task list --after {n}{})",
            state.map_or(String::new(), |s| format!(" --state {s}"))
        );
    }
}

fn offline_list(dir: &RuntimeDir, f: &Flags) -> Result<(Vec<Value>, Option<i64>), String> {
    let Some((mut store, state)) = offline_store(dir)? else {
        return Ok((Vec::new(), None));
    };
    let rows = store
        .list(
            f.state.as_deref().and_then(TaskState::parse),
            f.after_id,
            f.limit,
        )
        .map_err(|e| e.to_string())?;
    let next = (rows.len() as u32 == f.limit).then(|| rows[rows.len() - 1].id);
    Ok((
        rows.iter()
            .map(|r| {
                crate::tasks::view::task_json(
                    r,
                    &[],
                    None,
                    &crate::tasks::view::log_path(&state, r.id),
                )
            })
            .collect(),
        next,
    ))
}

/// The exit code a finished task stands for.
pub fn code_of(t: &Value) -> i32 {
    match (s(t, "state"), t["exit_code"].as_i64()) {
        ("succeeded", _) => 0,
        (_, Some(c)) if (1..=255).contains(&c) => c as i32,
        _ => 1,
    }
}

fn wait(dir: &RuntimeDir, ids: &[i64], json: bool) -> Result<i32, String> {
    let tasks = match ask_with(dir, &ToQueue::Wait { ids: ids.to_vec() }, None)? {
        FromQueue::Finished { tasks } => tasks,
        other => return Err(unexpected(other)),
    };
    Ok(report_finished(&tasks, json))
}

/// What `task wait` says of finished tasks; the exit code: the first failure's.
pub fn report_finished(tasks: &[Value], json: bool) -> i32 {
    let mut code = 0;
    for t in tasks {
        if json {
            println!("{}", serde_json::to_string(t).unwrap_or_default());
        } else {
            let how = match (t["exit_code"].as_i64(), t["error"].as_str()) {
                (_, Some(e)) => format!(": {e}"),
                (Some(c), None) => format!(" (exit {c})"),
                _ => String::new(),
            };
            let line = format!("task {} {}{how}", t["id"], s(t, "state"));
            if code_of(t) == 0 {
                eprintln!("{line}");
            } else {
                eprintln!("nexus: {line}");
            }
        }
        if code == 0 {
            code = code_of(t);
        }
    }
    code
}

fn logs(dir: &RuntimeDir, id: i64, follow: bool) -> Result<i32, String> {
    let path = crate::tasks::view::log_path(&state_dir_of(dir), id);
    let mut offset = 0u64;
    let mut out = std::io::stdout();
    let started = Instant::now();
    let mut last_check = Instant::now() - Duration::from_secs(1);
    loop {
        match std::fs::File::open(&path) {
            Ok(mut f) => {
                let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                if len > offset && f.seek(SeekFrom::Start(offset)).is_ok() {
                    let mut buf = Vec::new();
                    let _ = (&mut f).take(len - offset).read_to_end(&mut buf);
                    offset += buf.len() as u64;
                    let _ = out.write_all(&buf);
                    let _ = out.flush();
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if !follow {
                    // Tell a task that never ran from one that does not exist.
                    return match ask(dir, &ToQueue::Status { id }).or_else(|e| {
                        if e.starts_with(NOT_RUNNING) {
                            offline_task(dir, id).map(|task| FromQueue::Task { task })
                        } else {
                            Err(e)
                        }
                    })? {
                        FromQueue::Task { task } => {
                            let ran_on = task["history"].as_array().and_then(|h| {
                                h.iter().filter_map(|a| a["host"].as_str()).next_back()
                            });
                            match ran_on {
                                Some(h) if h != this_host(dir) => eprintln!(
                                    "task {id} ran on host {h}: its log is there, in task-logs/{id}.log of that cluster's state_dir"
                                ),
                                _ => eprintln!("task {id} has no output yet"),
                            }
                            Ok(0)
                        }
                        other => Err(unexpected(other)),
                    };
                }
            }
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        }
        if !follow {
            return Ok(0);
        }
        if last_check.elapsed() >= Duration::from_millis(500) {
            last_check = Instant::now();
            match ask(dir, &ToQueue::Status { id }) {
                Ok(FromQueue::Task { task }) => {
                    let st = TaskState::parse(s(&task, "state"));
                    if st.is_some_and(TaskState::is_final) {
                        // One last read for what it wrote at the end.
                        if let Ok(mut f) = std::fs::File::open(&path)
                            && f.seek(SeekFrom::Start(offset)).is_ok()
                        {
                            let mut buf = Vec::new();
                            let _ = f.read_to_end(&mut buf);
                            let _ = out.write_all(&buf);
                        }
                        return Ok(0);
                    }
                }
                Ok(other) => return Err(unexpected(other)),
                Err(e) => return Err(e),
            }
        }
        // A follower is bounded by the task's life; this only caps a forgotten one.
        if started.elapsed() > Duration::from_secs(30 * 86_400) {
            return Ok(0);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The queue's counts and workers, for `status` and `metrics` (None: no queue answers);
/// `durations`: with the wait and run histograms.
pub fn overview(dir: &RuntimeDir, durations: bool) -> Option<Value> {
    match ask_with(
        dir,
        &ToQueue::Overview { durations },
        Some(Duration::from_secs(2)),
    ) {
        Ok(FromQueue::Overview { overview }) => Some(overview),
        _ => None,
    }
}

/// Two lines under `status`'s tables: the queue by state, and each worker's load.
pub fn render_overview(t: &Value) -> String {
    let mut out = String::new();
    if let Some(e) = t["error"].as_str() {
        out.push_str(&format!("tasks: UNAVAILABLE: {e}\n"));
    } else if let Some(c) = t["counts"].as_object() {
        let parts: Vec<String> = TaskState::ALL
            .iter()
            .map(|st| {
                format!(
                    "{} {}",
                    st.as_str(),
                    c.get(st.as_str()).and_then(Value::as_u64).unwrap_or(0)
                )
            })
            .collect();
        out.push_str(&format!("tasks:   {}\n", parts.join("  ")));
    }
    let workers: Vec<String> = t["workers"]
        .as_array()
        .map(|ws| {
            ws.iter()
                .map(|w| {
                    let caps = w["capabilities"]
                        .as_array()
                        .filter(|c| !c.is_empty())
                        .map(|c| {
                            format!(
                                " [{}]",
                                c.iter()
                                    .filter_map(Value::as_str)
                                    .collect::<Vec<_>>()
                                    .join(",")
                            )
                        })
                        .unwrap_or_default();
                    let cpu = w["cpu_percent"]
                        .as_f64()
                        .filter(|_| w["running"].as_u64().is_some_and(|n| n > 0))
                        .map(|c| format!(" {c:.0}%cpu"))
                        .unwrap_or_default();
                    format!(
                        "{} {}/{}{cpu}{caps}",
                        s(w, "worker"),
                        w["running"],
                        w["concurrency"]
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    if !workers.is_empty() {
        out.push_str(&format!(
            "workers: {}  (running/concurrency, their tasks' CPU)\n",
            workers.join("  ")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config::parse(r#"{"actions": {"train": {"command": ["python3", "t.py"], "timeout_ms": 500, "required_capabilities": ["gpu"]}}}"#).unwrap()
    }

    #[test]
    fn bad_tasks_are_refused_with_the_reason() {
        let c = cfg();
        let bad = |j: &str| submission(j, &c, None, None, None, None).unwrap_err();
        assert!(bad("{nope").contains("not valid JSON"));
        assert!(bad("[1]").contains("must be a JSON object"));
        assert!(bad("{}").contains("needs \"action\""));
        assert!(
            bad(r#"{"action": "x"}"#)
                .contains("unknown action \"x\" (the config's actions: train)")
        );
        assert!(bad(r#"{"command": []}"#).contains("is empty"));
        assert!(bad(r#"{"command": "ls"}"#).contains("must be a list of strings"));
        assert!(bad(r#"{"command": ["a"], "action": "train"}"#).contains("both"));
        assert!(
            bad(r#"{"command": ["a"], "required_capabilities": ["a b"]}"#)
                .contains("not a capability name")
        );
    }

    #[test]
    fn an_action_gives_its_command_and_defaults() {
        let s = submission(
            r#"{"action": "train", "data": 1, "required_capabilities": ["ssd"]}"#,
            &cfg(),
            None,
            Some(5),
            None,
            None,
        )
        .unwrap();
        assert_eq!(s.argv, vec!["python3", "t.py"]);
        assert_eq!(s.required, vec!["gpu", "ssd"]);
        assert_eq!(
            (s.priority, s.max_attempts, s.timeout_ms),
            (5, 3, Some(500))
        );
        let s = submission(
            r#"{"action": "train"}"#,
            &cfg(),
            None,
            None,
            Some(1),
            Some(9),
        )
        .unwrap();
        assert_eq!((s.max_attempts, s.timeout_ms), (1, Some(9)));
    }
}
