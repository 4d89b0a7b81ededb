//! A task as `task status --json` shows it (and the HTTP API will): one JSON object.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::ledger::rfc3339;
use crate::tasks::store::{AttemptRow, TaskRow};

pub fn log_path(state_dir: &Path, id: i64) -> PathBuf {
    state_dir.join("task-logs").join(format!("{id}.log"))
}

pub fn task_json(
    t: &TaskRow,
    history: &[AttemptRow],
    waiting: Option<String>,
    log: &Path,
) -> Value {
    let ts = |v: Option<u64>| v.map(rfc3339);
    json!({
        "id": t.id,
        "state": t.state.as_str(),
        "priority": t.priority,
        "attempts": t.attempts,
        "max_attempts": t.max_attempts,
        "worker": t.worker.map(|w| format!("workflow-{w}")),
        "host": t.host,
        "pid": t.pid,
        "exit_code": t.exit_code,
        "result": t.result,
        "error": t.error,
        "submitted_at": rfc3339(t.submitted_at_ms),
        "started_at": ts(t.started_at_ms),
        "finished_at": ts(t.finished_at_ms),
        "command": t.argv,
        "required_capabilities": t.required,
        "timeout_ms": t.timeout_ms,
        "after": t.after,
        "unique": t.unique,
        "waiting": waiting,
        "log": log,
        "history": history.iter().map(|a| json!({
            "attempt": a.attempt,
            "worker": format!("workflow-{}", a.worker),
            "host": a.host,
            "started_at": rfc3339(a.started_at_ms),
            "finished_at": a.finished_at_ms.map(rfc3339),
            "exit_code": a.exit_code,
            "error": a.error,
        })).collect::<Vec<_>>(),
    })
}
