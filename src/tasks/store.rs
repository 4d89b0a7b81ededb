//! The queue's durable store: SQLite in the state directory.
//!
//! WAL. A submit, cancel or retry is committed with `synchronous = FULL`: it is
//! acknowledged only once its row is on disk, so it survives a power cut as well as
//! SIGKILL of every nexus process. The queue owner's own transitions (claim, a result)
//! are committed with `NORMAL`: they survive the death of any process, and a power cut
//! can only lose the last of them, which re-runs a task (at-least-once) but never loses
//! one; that saves an fsync per task on the dispatch path. Every change is one
//! transaction (a savepoint, so that the owner can also group a loop turn's changes into
//! one commit: `begin_batch`); the owner is the only writer, and readers are never
//! blocked (WAL).
//!
//! A task's life is `lifecycle::Life`: this module loads it, lets it decide, and stores
//! what it decided, in the same transaction.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use crate::tasks::backend::{Backend, RunningTask, every_state};
use crate::tasks::lifecycle::{Ending, Life, Refused, RetryBackoff, TaskState};

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS tasks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    spec TEXT NOT NULL,
    argv TEXT NOT NULL,
    required TEXT NOT NULL,
    priority INTEGER NOT NULL,
    timeout_ms INTEGER,
    after_id INTEGER,
    unique_key TEXT,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    max_attempts INTEGER NOT NULL,
    budget INTEGER NOT NULL,
    not_before_ms INTEGER NOT NULL,
    worker INTEGER,
    exit_code INTEGER,
    result TEXT,
    error TEXT,
    submitted_at_ms INTEGER NOT NULL,
    started_at_ms INTEGER,
    finished_at_ms INTEGER,
    cwd TEXT,
    pid INTEGER,
    worker_pid INTEGER,
    -- 1 once nothing it runs `--after` stands in its way: kept up to date when the parent
    -- succeeds, so that thousands of waiting dependents cost a claim nothing.
    ready INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS tasks_by_state ON tasks (state, ready, priority DESC, id);
CREATE INDEX IF NOT EXISTS tasks_by_parent ON tasks (after_id) WHERE after_id IS NOT NULL;
-- When the next held-back task is due: without it, that MIN read every queued row, 0.9 ms
-- per dispatch with 10,000 queued.
CREATE INDEX IF NOT EXISTS tasks_due ON tasks (not_before_ms)
    WHERE state IN ('queued', 'retrying') AND ready = 1;
CREATE UNIQUE INDEX IF NOT EXISTS tasks_live_unique ON tasks (unique_key)
    WHERE unique_key IS NOT NULL AND state IN ('queued', 'running', 'retrying');
CREATE TABLE IF NOT EXISTS attempts (
    task_id INTEGER NOT NULL,
    n INTEGER NOT NULL,
    worker INTEGER NOT NULL,
    started_at_ms INTEGER NOT NULL,
    finished_at_ms INTEGER,
    exit_code INTEGER,
    error TEXT,
    PRIMARY KEY (task_id, n)
);
"#;

/// A task as submitted (the CLI sends it so, its action already resolved).
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewTask {
    /// The JSON the program gets on stdin.
    pub spec: String,
    pub argv: Vec<String>,
    pub required: Vec<String>,
    pub priority: i32,
    pub max_attempts: u32,
    pub timeout_ms: Option<u64>,
    pub delay_ms: u64,
    pub after: Option<i64>,
    pub unique: Option<String>,
    pub cwd: Option<String>,
}

/// A task as stored: the shape of `task status --json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskRow {
    pub id: i64,
    pub state: TaskState,
    pub priority: i32,
    pub attempts: u32,
    pub max_attempts: u32,
    #[serde(skip)]
    pub budget: u32,
    pub worker: Option<u32>,
    pub exit_code: Option<i32>,
    pub result: Option<serde_json::Value>,
    pub error: Option<String>,
    pub submitted_at_ms: u64,
    pub started_at_ms: Option<u64>,
    pub finished_at_ms: Option<u64>,
    pub argv: Vec<String>,
    pub required: Vec<String>,
    pub timeout_ms: Option<u64>,
    pub after: Option<i64>,
    pub unique: Option<String>,
    #[serde(skip)]
    pub spec: String,
    #[serde(skip)]
    pub not_before_ms: u64,
    #[serde(skip)]
    pub cwd: Option<String>,
    /// The current attempt's program (its process group), once its worker confirmed it.
    #[serde(skip)]
    pub pid: Option<i32>,
    /// The worker's pid when the attempt was handed to it.
    #[serde(skip)]
    pub worker_pid: Option<i32>,
    /// The host whose worker runs (or last ran) it, in a queue shared by several.
    #[serde(skip)]
    pub host: Option<String>,
}

impl TaskRow {
    pub(crate) fn life(&self) -> Life {
        Life {
            state: self.state,
            attempts: self.attempts,
            max_attempts: self.max_attempts,
            budget: self.budget,
            not_before_ms: self.not_before_ms,
            worker: self.worker,
            exit_code: self.exit_code,
            error: self.error.clone(),
            started_at_ms: self.started_at_ms,
            finished_at_ms: self.finished_at_ms,
        }
    }
}

/// Why the store said no.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// The database could not be used (opened, read, written): the text names the cause.
    Db(String),
    NoSuchTask(i64),
    /// `--unique KEY` while a live task has that key.
    Duplicate {
        key: String,
        id: i64,
    },
    /// The transition does not apply now.
    Refused(Refused),
}

impl StoreError {
    /// What failed, for a message that already says it is the queue's database.
    pub fn into_message(self) -> String {
        match self {
            StoreError::Db(m) => m,
            other => other.to_string(),
        }
    }
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Db(e) => write!(f, "task database: {e}"),
            StoreError::NoSuchTask(id) => write!(f, "no task {id}"),
            StoreError::Duplicate { key, id } => {
                write!(f, "task {id} with the unique key {key:?} is still live")
            }
            StoreError::Refused(r) => write!(f, "{r}"),
        }
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> StoreError {
        StoreError::Db(e.to_string())
    }
}

pub struct Store {
    conn: Connection,
}

/// How a connection commits (see the module's comment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync at each commit: the CLI's acknowledged changes.
    Full,
    /// Durable against any process's death: the queue owner's transitions.
    Normal,
}

/// One attempt of a task, as kept.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AttemptRow {
    pub attempt: u32,
    pub worker: u32,
    pub started_at_ms: u64,
    pub finished_at_ms: Option<u64>,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    /// Its host, in a queue shared by several.
    pub host: Option<String>,
}

/// How a failed attempt is retried: the backoff and this decision's random jitter in
/// [0, 1) (passed in, so tests can pin it).
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    pub backoff: RetryBackoff,
    pub jitter: f64,
}

const COLUMNS: &str = "id, state, priority, attempts, max_attempts, worker, exit_code, result, \
     error, submitted_at_ms, started_at_ms, finished_at_ms, argv, required, timeout_ms, after_id, \
     unique_key, spec, not_before_ms, budget, cwd, pid, worker_pid";

/// A result as kept: JSON when it parses, else a string.
pub(crate) fn parse_result(t: String) -> serde_json::Value {
    serde_json::from_str(&t).unwrap_or(serde_json::Value::String(t))
}

fn row_of(r: &rusqlite::Row<'_>) -> rusqlite::Result<TaskRow> {
    let state: String = r.get(1)?;
    let result: Option<String> = r.get(7)?;
    let argv: String = r.get(12)?;
    let required: String = r.get(13)?;
    let state = TaskState::parse(&state).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            1,
            rusqlite::types::Type::Text,
            format!("unknown task state {state:?}").into(),
        )
    })?;
    Ok(TaskRow {
        id: r.get(0)?,
        state,
        priority: r.get(2)?,
        attempts: r.get(3)?,
        max_attempts: r.get(4)?,
        worker: r.get(5)?,
        exit_code: r.get(6)?,
        // Kept as JSON when it parses, else as a string.
        result: result.map(parse_result),
        error: r.get(8)?,
        submitted_at_ms: r.get::<_, i64>(9)? as u64,
        started_at_ms: r.get::<_, Option<i64>>(10)?.map(|v| v as u64),
        finished_at_ms: r.get::<_, Option<i64>>(11)?.map(|v| v as u64),
        argv: serde_json::from_str(&argv).unwrap_or_default(),
        required: serde_json::from_str(&required).unwrap_or_default(),
        timeout_ms: r.get::<_, Option<i64>>(14)?.map(|v| v as u64),
        after: r.get(15)?,
        unique: r.get(16)?,
        spec: r.get(17)?,
        not_before_ms: r.get::<_, i64>(18)? as u64,
        budget: r.get(19)?,
        cwd: r.get(20)?,
        pid: r.get(21)?,
        worker_pid: r.get(22)?,
        host: None,
    })
}

impl Store {
    /// Opens (creating) the queue at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Store::open_with(path, Durability::Full)
    }

    pub fn open_with(path: &Path, durability: Durability) -> Result<Store, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Db(format!("cannot create {}: {e}", dir.display())))?;
        }
        let at = |e: rusqlite::Error| StoreError::Db(format!("{}: {e}", path.display()));
        let conn = Connection::open(path).map_err(at)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(at)?;
        // Room for every statement of the dispatch path (see `Cached`).
        conn.set_prepared_statement_cache_capacity(64);
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(at)?;
        if mode != "wal" {
            return Err(StoreError::Db(format!(
                "{}: cannot use write-ahead logging (journal mode {mode})",
                path.display()
            )));
        }
        conn.execute_batch(match durability {
            Durability::Full => "PRAGMA synchronous = FULL;",
            // A bounded page cache: the master is a small daemon.
            Durability::Normal => "PRAGMA synchronous = NORMAL; PRAGMA cache_size = -512;",
        })
        .map_err(at)?;
        conn.execute_batch(SCHEMA).map_err(at)?;
        // The tasks' arguments and results are the user's: like every state file, ours.
        let _ = std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600));
        Ok(Store { conn })
    }
}

impl Backend for Store {
    /// Opens a transaction that the changes which follow join (each of them is a savepoint
    /// inside it), until `commit_batch`: the queue's owner commits once per turn of its
    /// loop rather than once per change. Without a batch, each change is its own
    /// transaction.
    fn begin_batch(&mut self) -> Result<(), StoreError> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        Ok(())
    }

    fn commit_batch(&mut self) -> Result<(), StoreError> {
        if !self.conn.is_autocommit() {
            self.conn.execute_batch("COMMIT")?;
        }
        Ok(())
    }

    fn set_durability(&mut self, d: Durability) -> Result<(), StoreError> {
        self.conn.execute_batch(match d {
            Durability::Full => "PRAGMA synchronous = FULL;",
            Durability::Normal => "PRAGMA synchronous = NORMAL;",
        })?;
        Ok(())
    }

    fn submit(&mut self, t: &NewTask, now_ms: u64) -> Result<i64, StoreError> {
        let tx = self.conn.savepoint()?;
        if let Some(key) = &t.unique {
            let live: Option<i64> = tx
                .one(
                    "SELECT id FROM tasks WHERE unique_key = ?1 \
                     AND state IN ('queued', 'running', 'retrying')",
                    [key],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(id) = live {
                return Err(StoreError::Duplicate {
                    key: key.clone(),
                    id,
                });
            }
        }
        let mut ready = true;
        if let Some(after) = t.after {
            let state: Option<String> = tx
                .one("SELECT state FROM tasks WHERE id = ?1", [after], |r| {
                    r.get(0)
                })
                .optional()?;
            match state.as_deref().and_then(TaskState::parse) {
                None => return Err(StoreError::NoSuchTask(after)),
                Some(s @ (TaskState::Failed | TaskState::Cancelled)) => {
                    return Err(StoreError::Refused(Refused::NotNow(s)));
                }
                Some(s) => ready = s == TaskState::Succeeded,
            }
        }
        let not_before = now_ms.saturating_add(t.delay_ms).min(i64::MAX as u64);
        let life = Life::new(t.max_attempts, not_before);
        tx.run(
            "INSERT INTO tasks (spec, argv, required, priority, timeout_ms, after_id, unique_key, \
             state, attempts, max_attempts, budget, not_before_ms, submitted_at_ms, cwd, ready) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 0, ?9, ?9, ?10, ?11, ?12, ?13)",
            params![
                t.spec,
                serde_json::to_string(&t.argv).unwrap_or_default(),
                serde_json::to_string(&t.required).unwrap_or_default(),
                t.priority,
                t.timeout_ms.map(|v| v as i64),
                t.after,
                t.unique,
                life.state.as_str(),
                life.max_attempts,
                life.not_before_ms as i64,
                now_ms as i64,
                t.cwd,
                ready,
            ],
        )?;
        let id = tx.last_insert_rowid();
        tx.commit()?;
        Ok(id)
    }

    fn get(&mut self, id: i64) -> Result<TaskRow, StoreError> {
        self.conn
            .one(
                &format!("SELECT {COLUMNS} FROM tasks WHERE id = ?1"),
                [id],
                row_of,
            )
            .optional()?
            .ok_or(StoreError::NoSuchTask(id))
    }

    fn list(
        &mut self,
        state: Option<TaskState>,
        after_id: i64,
        limit: u32,
    ) -> Result<Vec<TaskRow>, StoreError> {
        let mut st = self.conn.prepare(&format!(
            "SELECT {COLUMNS} FROM tasks WHERE id > ?1 AND (?2 IS NULL OR state = ?2) \
             ORDER BY id LIMIT ?3"
        ))?;
        let rows = st
            .query_map(
                params![after_id, state.map(TaskState::as_str), limit],
                row_of,
            )?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    fn counts(&mut self) -> Result<Vec<(TaskState, u64)>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT state, COUNT(*) FROM tasks GROUP BY state")?;
        let got: Vec<(String, i64)> = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        Ok(every_state(&got))
    }

    fn claim(
        &mut self,
        worker: u32,
        worker_pid: i32,
        capabilities: &[String],
        now_ms: u64,
    ) -> Result<Option<(TaskRow, u32)>, StoreError> {
        let tx = self.conn.savepoint()?;
        // Every required capability among the worker's, in SQL, so that many tasks this
        // worker cannot run never hide one it can.
        let caps = serde_json::to_string(capabilities).unwrap_or_else(|_| "[]".into());
        let found = tx
            .one(
                &format!(
                    "SELECT {COLUMNS} FROM tasks WHERE state IN ('queued', 'retrying') \
                     AND ready = 1 AND not_before_ms <= ?1 \
                     AND NOT EXISTS (SELECT 1 FROM json_each(tasks.required) \
                                     WHERE value NOT IN (SELECT value FROM json_each(?2))) \
                     ORDER BY priority DESC, id LIMIT 1"
                ),
                params![now_ms as i64, caps],
                row_of,
            )
            .optional()?;
        let Some(mut row) = found else {
            return Ok(None);
        };
        let mut life = row.life();
        let attempt = life.start(worker, now_ms).map_err(StoreError::Refused)?;
        store_life(&tx, row.id, &life)?;
        tx.run(
            "UPDATE tasks SET pid = NULL, worker_pid = ?2 WHERE id = ?1",
            params![row.id, worker_pid],
        )?;
        tx.run(
            "INSERT OR REPLACE INTO attempts (task_id, n, worker, started_at_ms) \
             VALUES (?1, ?2, ?3, ?4)",
            params![row.id, attempt, worker, now_ms as i64],
        )?;
        tx.commit()?;
        row.apply(&life);
        row.pid = None;
        row.worker_pid = Some(worker_pid);
        Ok(Some((row, attempt)))
    }

    fn finish(
        &mut self,
        id: i64,
        attempt: u32,
        ending: Ending,
        result: Option<&str>,
        now_ms: u64,
        retry: &Retry,
    ) -> Result<TaskState, StoreError> {
        let tx = self.conn.savepoint()?;
        let row = tx
            .one(
                &format!("SELECT {COLUMNS} FROM tasks WHERE id = ?1"),
                [id],
                row_of,
            )
            .optional()?
            .ok_or(StoreError::NoSuchTask(id))?;
        let mut life = row.life();
        let state = life
            .end(attempt, ending, now_ms, &retry.backoff, retry.jitter)
            .map_err(StoreError::Refused)?;
        store_life(&tx, id, &life)?;
        tx.run(
            "UPDATE tasks SET result = ?2 WHERE id = ?1",
            params![id, result],
        )?;
        if state == TaskState::Failed {
            cancel_dependents(&tx, id, "failed", now_ms)?;
        }
        if state == TaskState::Succeeded {
            tx.run("UPDATE tasks SET ready = 1 WHERE after_id = ?1", [id])?;
        }
        tx.run(
            "UPDATE attempts SET finished_at_ms = ?3, exit_code = ?4, error = ?5 \
             WHERE task_id = ?1 AND n = ?2",
            params![id, attempt, now_ms as i64, life.exit_code, life.error],
        )?;
        tx.commit()?;
        Ok(state)
    }

    fn cancel(&mut self, id: i64, now_ms: u64) -> Result<Option<u32>, StoreError> {
        let tx = self.conn.savepoint()?;
        let row = tx
            .one(
                &format!("SELECT {COLUMNS} FROM tasks WHERE id = ?1"),
                [id],
                row_of,
            )
            .optional()?
            .ok_or(StoreError::NoSuchTask(id))?;
        let mut life = row.life();
        let worker = life.cancel(now_ms).map_err(StoreError::Refused)?;
        store_life(&tx, id, &life)?;
        cancel_dependents(&tx, id, "was cancelled", now_ms)?;
        if worker.is_some() {
            tx.run(
                "UPDATE attempts SET finished_at_ms = ?3, error = 'cancelled' \
                 WHERE task_id = ?1 AND n = ?2",
                params![id, life.attempts, now_ms as i64],
            )?;
        }
        tx.commit()?;
        Ok(worker)
    }

    fn running(&mut self) -> Result<Vec<RunningTask>, StoreError> {
        let mut st = self.conn.prepare(
            "SELECT id, attempts, worker, worker_pid, pid FROM tasks WHERE state = 'running'",
        )?;
        let rows = st
            .query_map([], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get::<_, Option<u32>>(2)?.unwrap_or(0),
                    r.get(3)?,
                    r.get(4)?,
                ))
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    fn next_due_ms(&mut self, now_ms: u64) -> Result<Option<u64>, StoreError> {
        let v: Option<i64> = self.conn.one(
            "SELECT MIN(not_before_ms) FROM tasks INDEXED BY tasks_due \
             WHERE state IN ('queued', 'retrying') AND ready = 1 AND not_before_ms > ?1",
            [now_ms as i64],
            |r| r.get(0),
        )?;
        Ok(v.map(|v| v as u64))
    }

    fn any_runnable(&mut self, now_ms: u64) -> Result<bool, StoreError> {
        let v: Option<i64> = self
            .conn
            .query_row(
                "SELECT 1 FROM tasks WHERE state IN ('queued', 'retrying') \
                 AND ready = 1 AND not_before_ms <= ?1 LIMIT 1",
                [now_ms as i64],
                |r| r.get(0),
            )
            .optional()?;
        Ok(v.is_some())
    }

    fn attempts(&mut self, id: i64) -> Result<Vec<AttemptRow>, StoreError> {
        let mut st = self.conn.prepare(
            "SELECT n, worker, started_at_ms, finished_at_ms, exit_code, error FROM attempts \
             WHERE task_id = ?1 ORDER BY n",
        )?;
        let rows = st
            .query_map([id], |r| {
                Ok(AttemptRow {
                    attempt: r.get(0)?,
                    worker: r.get(1)?,
                    started_at_ms: r.get::<_, i64>(2)? as u64,
                    finished_at_ms: r.get::<_, Option<i64>>(3)?.map(|v| v as u64),
                    exit_code: r.get(4)?,
                    error: r.get(5)?,
                    host: None,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    fn durations(&mut self) -> Result<(Vec<f64>, Vec<f64>), StoreError> {
        let mut st = self.conn.prepare(
            "SELECT a.n, t.submitted_at_ms, a.started_at_ms, a.finished_at_ms \
             FROM attempts a JOIN tasks t ON t.id = a.task_id",
        )?;
        let mut wait = Vec::new();
        let mut run = Vec::new();
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, u32>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, Option<i64>>(3)?,
            ))
        })?;
        for row in rows {
            let (n, submitted, started, finished) = row?;
            if n == 1 {
                wait.push((started - submitted).max(0) as f64 / 1000.0);
            }
            if let Some(f) = finished {
                run.push((f - started).max(0) as f64 / 1000.0);
            }
        }
        Ok((wait, run))
    }

    fn prune(&mut self, keep: u64, older_than_ms: u64) -> Result<Vec<i64>, StoreError> {
        let tx = self.conn.savepoint()?;
        let ids: Vec<i64> = {
            let mut st = tx.prepare(
                "SELECT id FROM tasks WHERE state IN ('succeeded', 'failed', 'cancelled') \
                 AND (finished_at_ms < ?1 OR id NOT IN (SELECT id FROM tasks \
                     WHERE state IN ('succeeded', 'failed', 'cancelled') \
                     ORDER BY finished_at_ms DESC, id DESC LIMIT ?2)) \
                 AND id NOT IN (SELECT after_id FROM tasks WHERE after_id IS NOT NULL \
                     AND state IN ('queued', 'running', 'retrying')) \
                 LIMIT 10000",
            )?;
            st.query_map(params![older_than_ms as i64, keep as i64], |r| r.get(0))?
                .collect::<Result<_, _>>()?
        };
        for id in &ids {
            tx.run("DELETE FROM attempts WHERE task_id = ?1", [id])?;
            tx.run("DELETE FROM tasks WHERE id = ?1", [id])?;
        }
        tx.commit()?;
        Ok(ids)
    }

    fn retry(&mut self, id: i64, now_ms: u64) -> Result<(), StoreError> {
        let tx = self.conn.savepoint()?;
        let row = tx
            .one(
                &format!("SELECT {COLUMNS} FROM tasks WHERE id = ?1"),
                [id],
                row_of,
            )
            .optional()?
            .ok_or(StoreError::NoSuchTask(id))?;
        if let Some(key) = &row.unique {
            let live: Option<i64> = tx
                .one(
                    "SELECT id FROM tasks WHERE unique_key = ?1 AND id != ?2 \
                     AND state IN ('queued', 'running', 'retrying')",
                    params![key, id],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(other) = live {
                return Err(StoreError::Duplicate {
                    key: key.clone(),
                    id: other,
                });
            }
        }
        let mut life = row.life();
        life.retry(now_ms).map_err(StoreError::Refused)?;
        store_life(&tx, id, &life)?;
        tx.commit()?;
        Ok(())
    }
}

/// The tasks waiting (`--after`) for one that will never succeed are cancelled, and theirs
/// in turn, in the same transaction.
fn cancel_dependents(tx: &Connection, id: i64, what: &str, now_ms: u64) -> Result<(), StoreError> {
    let mut work = vec![id];
    let mut rounds = 0;
    while let Some(parent) = work.pop() {
        rounds += 1;
        if rounds > 100_000 {
            break; // a chain longer than any queue holds: stop rather than loop
        }
        let children: Vec<i64> = {
            let mut st = tx.prepare(
                "SELECT id FROM tasks WHERE after_id = ?1 AND state IN ('queued', 'retrying')",
            )?;
            st.query_map([parent], |r| r.get(0))?
                .collect::<Result<_, _>>()?
        };
        for c in children {
            tx.run(
                "UPDATE tasks SET state = 'cancelled', finished_at_ms = ?2, error = ?3 \
                 WHERE id = ?1",
                params![
                    c,
                    now_ms as i64,
                    format!("task {parent}, which it runs after, {what}")
                ],
            )?;
            work.push(c);
        }
    }
    Ok(())
}

/// Statements through the connection's cache: each is parsed once, not once a task
/// (parsing them anew held the 10,000-task benchmark at 1,880 tasks/s, not 2,200).
trait Cached {
    fn run(&self, sql: &str, p: impl rusqlite::Params) -> rusqlite::Result<usize>;
    fn one<T>(
        &self,
        sql: &str,
        p: impl rusqlite::Params,
        f: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T>;
}

impl Cached for Connection {
    fn run(&self, sql: &str, p: impl rusqlite::Params) -> rusqlite::Result<usize> {
        self.prepare_cached(sql)?.execute(p)
    }

    fn one<T>(
        &self,
        sql: &str,
        p: impl rusqlite::Params,
        f: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        self.prepare_cached(sql)?.query_row(p, f)
    }
}

fn store_life(tx: &Connection, id: i64, l: &Life) -> Result<(), StoreError> {
    tx.run(
        "UPDATE tasks SET state = ?2, attempts = ?3, max_attempts = ?4, not_before_ms = ?5, \
         worker = ?6, exit_code = ?7, error = ?8, started_at_ms = ?9, finished_at_ms = ?10, \
         budget = ?11 WHERE id = ?1",
        params![
            id,
            l.state.as_str(),
            l.attempts,
            l.max_attempts,
            l.not_before_ms as i64,
            l.worker,
            l.exit_code,
            l.error,
            l.started_at_ms.map(|v| v as i64),
            l.finished_at_ms.map(|v| v as i64),
            l.budget,
        ],
    )?;
    Ok(())
}

impl TaskRow {
    /// What `life` decided, on the row as returned.
    pub(crate) fn apply(&mut self, l: &Life) {
        let row = self;
        row.state = l.state;
        row.attempts = l.attempts;
        row.max_attempts = l.max_attempts;
        row.not_before_ms = l.not_before_ms;
        row.worker = l.worker;
        row.exit_code = l.exit_code;
        row.error = l.error.clone();
        row.started_at_ms = l.started_at_ms;
        row.finished_at_ms = l.finished_at_ms;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Retry = Retry {
        backoff: RetryBackoff {
            initial_ms: 100,
            max_ms: 1000,
        },
        jitter: 0.5,
    };

    fn task(argv: &[&str]) -> NewTask {
        NewTask {
            spec: "{}".into(),
            argv: argv.iter().map(|s| s.to_string()).collect(),
            required: Vec::new(),
            priority: 0,
            max_attempts: 3,
            timeout_ms: None,
            delay_ms: 0,
            after: None,
            unique: None,
            cwd: None,
        }
    }

    /// A new queue in a directory of its own (kept while the guard lives).
    fn fresh() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("tasks.db")).unwrap();
        (dir, s)
    }

    /// Runs a test against SQLite, then against PostgreSQL when NEXUS_TEST_PG_URL names
    /// a server (a database of its own, dropped after).
    fn each_backend(test: impl Fn(&mut dyn Backend)) {
        let (_dir, mut s) = fresh();
        test(&mut s);
        if let Some(db) = crate::tasks::postgres::testing::TempDb::create() {
            let mut pg = crate::tasks::postgres::PgStore::connect(&db.url, "unit", 10_000).unwrap();
            pg.set_durability(Durability::Full).unwrap();
            test(&mut pg);
        }
    }

    fn caps(c: &[&str]) -> Vec<String> {
        c.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn priority_then_fifo_and_capabilities_decide_who_runs_what() {
        each_backend(|s| {
            let low = s.submit(&task(&["a"]), 0).unwrap();
            let high = s
                .submit(
                    &NewTask {
                        priority: 10,
                        ..task(&["b"])
                    },
                    0,
                )
                .unwrap();
            let gpu = s
                .submit(
                    &NewTask {
                        priority: 20,
                        required: caps(&["gpu"]),
                        ..task(&["c"])
                    },
                    0,
                )
                .unwrap();
            let low2 = s.submit(&task(&["d"]), 0).unwrap();
            // A worker without the gpu skips the gpu task, priority first, then FIFO.
            let (t, n) = s.claim(1, 0, &[], 1).unwrap().unwrap();
            assert_eq!(
                (t.id, n, t.state, t.worker),
                (high, 1, TaskState::Running, Some(1))
            );
            assert_eq!(s.claim(1, 0, &[], 1).unwrap().unwrap().0.id, low);
            assert_eq!(s.claim(1, 0, &[], 1).unwrap().unwrap().0.id, low2);
            assert!(
                s.claim(1, 0, &[], 1).unwrap().is_none(),
                "only the gpu task is left"
            );
            assert_eq!(
                s.claim(2, 0, &caps(&["gpu", "ssd"]), 1)
                    .unwrap()
                    .unwrap()
                    .0
                    .id,
                gpu
            );
            let counts = s.counts().unwrap();
            assert!(counts.contains(&(TaskState::Running, 4)), "{counts:?}");
        });
    }

    #[test]
    fn a_failed_attempt_is_retried_after_its_backoff_and_results_are_kept() {
        each_backend(|s| {
            let id = s.submit(&task(&["x"]), 0).unwrap();
            let (_, a) = s.claim(1, 0, &[], 0).unwrap().unwrap();
            assert_eq!(
                s.finish(id, a, Ending::Exited(3), None, 10, &B).unwrap(),
                TaskState::Retrying
            );
            assert!(
                s.claim(1, 0, &[], 109).unwrap().is_none(),
                "still backing off"
            );
            let (_, a) = s.claim(2, 0, &[], 110).unwrap().unwrap();
            assert_eq!(a, 2);
            // A late result of attempt 1 is refused and changes nothing.
            assert!(matches!(
                s.finish(id, 1, Ending::Exited(0), Some("{}"), 111, &B),
                Err(StoreError::Refused(Refused::Superseded { .. }))
            ));
            assert_eq!(
                s.finish(id, a, Ending::Exited(0), Some(r#"{"ok": 1}"#), 120, &B)
                    .unwrap(),
                TaskState::Succeeded
            );
            let t = s.get(id).unwrap();
            assert_eq!(t.result, Some(serde_json::json!({"ok": 1})));
            assert_eq!(
                (t.attempts, t.exit_code, t.finished_at_ms),
                (2, Some(0), Some(120))
            );
            let kept = s.attempts(id).unwrap();
            assert_eq!(kept.len(), 2, "each attempt is kept");
            assert_eq!(kept[1].exit_code, Some(0));
        });
    }

    #[test]
    fn unique_keys_after_and_delay() {
        each_backend(|s| {
            let u = NewTask {
                unique: Some("nightly".into()),
                ..task(&["x"])
            };
            let first = s.submit(&u, 0).unwrap();
            assert_eq!(
                s.submit(&u, 0),
                Err(StoreError::Duplicate {
                    key: "nightly".into(),
                    id: first
                })
            );
            assert_eq!(
                s.submit(
                    &NewTask {
                        after: Some(999),
                        ..task(&["y"])
                    },
                    0
                ),
                Err(StoreError::NoSuchTask(999))
            );
            let later = s
                .submit(
                    &NewTask {
                        after: Some(first),
                        ..task(&["y"])
                    },
                    0,
                )
                .unwrap();
            let delayed = s
                .submit(
                    &NewTask {
                        delay_ms: 500,
                        ..task(&["z"])
                    },
                    0,
                )
                .unwrap();
            let (t, a) = s.claim(1, 0, &[], 0).unwrap().unwrap();
            assert_eq!(t.id, first);
            assert!(
                s.claim(1, 0, &[], 0).unwrap().is_none(),
                "`later` waits for `first`"
            );
            s.finish(first, a, Ending::Exited(0), None, 1, &B).unwrap();
            // The key is free again once its task is no longer live.
            assert!(s.submit(&u, 2).is_ok());
            assert_eq!(s.claim(1, 0, &[], 2).unwrap().unwrap().0.id, later);
            assert_eq!(
                s.claim(1, 0, &[], 499).unwrap().map(|t| t.0.id),
                Some(first + 3)
            );
            assert_eq!(s.claim(1, 0, &[], 500).unwrap().unwrap().0.id, delayed);
        });
    }

    /// What the queue's reconcile does at a fresh start, task by task.
    fn requeue_running(s: &mut dyn Backend, why: &str, now_ms: u64) -> Vec<(i64, TaskState)> {
        let mut out = Vec::new();
        for (id, attempt, ..) in s.running().unwrap() {
            let st = s
                .finish(id, attempt, Ending::Lost(why.into()), None, now_ms, &B)
                .unwrap();
            out.push((id, st));
        }
        out
    }

    #[test]
    fn what_was_running_when_the_queue_lost_its_owner_is_requeued_with_the_attempt_counted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tasks.db");
        let id = {
            let mut s = Store::open(&path).unwrap();
            let id = s
                .submit(
                    &NewTask {
                        max_attempts: 2,
                        ..task(&["x"])
                    },
                    0,
                )
                .unwrap();
            s.claim(1, 0, &[], 0).unwrap().unwrap();
            id
        };
        // Reopened, as after every nexus process was killed.
        let mut s = Store::open(&path).unwrap();
        let out = requeue_running(&mut s, "nexus stopped while it ran", 50);
        assert_eq!(out, vec![(id, TaskState::Retrying)]);
        let t = s.get(id).unwrap();
        assert_eq!(t.attempts, 1);
        assert_eq!(t.error.as_deref(), Some("nexus stopped while it ran"));
        let (_, a) = s.claim(2, 0, &[], 1000).unwrap().unwrap();
        requeue_running(&mut s, "again", 2000);
        assert_eq!(
            s.get(id).unwrap().state,
            TaskState::Failed,
            "attempts spent at {a}"
        );
    }

    #[test]
    fn cancel_a_queued_and_a_running_task() {
        each_backend(|s| {
            let q = s.submit(&task(&["x"]), 0).unwrap();
            let r = s
                .submit(
                    &NewTask {
                        priority: 5,
                        ..task(&["y"])
                    },
                    0,
                )
                .unwrap();
            assert_eq!(s.claim(7, 0, &[], 0).unwrap().unwrap().0.id, r);
            assert_eq!(s.cancel(q, 1), Ok(None));
            assert_eq!(s.cancel(r, 1), Ok(Some(7)));
            assert_eq!(
                s.cancel(r, 2),
                Err(StoreError::Refused(Refused::NotNow(TaskState::Cancelled)))
            );
            assert_eq!(s.cancel(42, 2), Err(StoreError::NoSuchTask(42)));
            assert!(s.claim(7, 0, &[], 3).unwrap().is_none());
            let page = s.list(Some(TaskState::Cancelled), 0, 10).unwrap();
            assert_eq!(page.iter().map(|t| t.id).collect::<Vec<_>>(), vec![q, r]);
            assert_eq!(s.list(None, q, 10).unwrap().len(), 1, "paged after an id");
        });
    }

    #[test]
    fn a_failed_task_cancels_what_waits_for_it_and_cannot_be_waited_for() {
        each_backend(|s| {
            let a = s
                .submit(
                    &NewTask {
                        max_attempts: 1,
                        ..task(&["a"])
                    },
                    0,
                )
                .unwrap();
            let b = s
                .submit(
                    &NewTask {
                        after: Some(a),
                        ..task(&["b"])
                    },
                    0,
                )
                .unwrap();
            let c = s
                .submit(
                    &NewTask {
                        after: Some(b),
                        ..task(&["c"])
                    },
                    0,
                )
                .unwrap();
            let (_, n) = s.claim(1, 0, &[], 0).unwrap().unwrap();
            assert_eq!(
                s.finish(a, n, Ending::Exited(1), None, 5, &B).unwrap(),
                TaskState::Failed
            );
            for id in [b, c] {
                let t = s.get(id).unwrap();
                assert_eq!(t.state, TaskState::Cancelled, "{t:?}");
                assert!(t.error.unwrap().contains("runs after"));
            }
            assert_eq!(
                s.submit(
                    &NewTask {
                        after: Some(a),
                        ..task(&["d"])
                    },
                    6
                ),
                Err(StoreError::Refused(Refused::NotNow(TaskState::Failed)))
            );
        });
    }

    #[test]
    fn many_tasks_a_worker_cannot_run_never_hide_one_it_can() {
        each_backend(|s| {
            for _ in 0..300 {
                s.submit(
                    &NewTask {
                        priority: 9,
                        required: caps(&["gpu"]),
                        ..task(&["g"])
                    },
                    0,
                )
                .unwrap();
            }
            let plain = s.submit(&task(&["p"]), 0).unwrap();
            assert_eq!(
                s.claim(1, 0, &caps(&["ssd"]), 0).unwrap().unwrap().0.id,
                plain
            );
        });
    }

    #[test]
    fn garbage_in_place_of_a_database_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tasks.db");
        std::fs::write(&path, vec![0x42u8; 8192]).unwrap();
        let e = Store::open(&path).err().unwrap().to_string();
        assert!(e.contains("tasks.db"), "{e}");
    }
}
