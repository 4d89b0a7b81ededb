//! The queue in PostgreSQL (`queue_url`), shared by the clusters of several hosts.
//!
//! Each host's master owns its share: it claims with `FOR UPDATE SKIP LOCKED`, so two
//! hosts never take one task, and it finishes only the attempts its own workers ran.
//! Wake-ups travel by `NOTIFY nexus_tasks` (sent inside the transaction that made the
//! change, so they arrive only once it is committed) to every host's listener thread:
//! `ready` (a task became runnable), `done ID` (a task reached its final state, for the
//! `task wait`s of other hosts), `kill ID ATTEMPT HOST` (a cancel for another host's
//! attempt). Nobody polls for work.
//!
//! Hosts hold leases in `nexus_hosts`, renewed every quarter lease and timed by the
//! database's clock (so the hosts' clocks may disagree). A host whose lease ran out is
//! taken as dead by the first host to notice: its running attempts are re-queued, counted,
//! in the same transaction that deletes its lease. A worker dying on a living host is still
//! noticed at once, by its own master, as with SQLite. A host that comes back after its
//! lease was taken finds its row gone and kills what it still runs (superseded).
//!
//! Durability: a submit, cancel or retry commits with `synchronous_commit = on`, the
//! owner's transitions with `off` (the analogue of SQLite's NORMAL): they survive any
//! nexus process's death; a crash of PostgreSQL itself can lose the last fraction of a
//! second of them, and the reconcile after reconnecting re-runs what that left running.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::mpsc::Sender;
use std::time::Duration;

use postgres::{Client, GenericClient, NoTls, Row, Statement};

use crate::tasks::backend::{Backend, Heartbeat, RunningTask, every_state};
use crate::tasks::lifecycle::{Ending, Life, Refused, TaskState};
use crate::tasks::pg_url;
use crate::tasks::store::{
    AttemptRow, Durability, NewTask, Retry, StoreError, TaskRow, parse_result,
};

/// The NOTIFY channel every host listens on.
const CHANNEL: &str = "nexus_tasks";
/// Serialises the schema's creation between hosts starting at once.
const SCHEMA_LOCK: i64 = 0x6e65_7875_7300;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS nexus_tasks (
    id BIGSERIAL PRIMARY KEY,
    spec TEXT NOT NULL,
    argv JSONB NOT NULL,
    required JSONB NOT NULL,
    priority INTEGER NOT NULL,
    timeout_ms BIGINT,
    after_id BIGINT,
    unique_key TEXT,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    max_attempts INTEGER NOT NULL,
    budget INTEGER NOT NULL,
    not_before_ms BIGINT NOT NULL,
    worker INTEGER,
    host TEXT,
    exit_code INTEGER,
    result TEXT,
    error TEXT,
    submitted_at_ms BIGINT NOT NULL,
    started_at_ms BIGINT,
    finished_at_ms BIGINT,
    cwd TEXT,
    pid INTEGER,
    worker_pid INTEGER,
    ready BOOLEAN NOT NULL DEFAULT TRUE
);
CREATE INDEX IF NOT EXISTS nexus_tasks_runnable ON nexus_tasks (priority DESC, id)
    WHERE state IN ('queued', 'retrying') AND ready;
CREATE INDEX IF NOT EXISTS nexus_tasks_by_state ON nexus_tasks (state);
CREATE INDEX IF NOT EXISTS nexus_tasks_due ON nexus_tasks (not_before_ms)
    WHERE state IN ('queued', 'retrying') AND ready;
CREATE INDEX IF NOT EXISTS nexus_tasks_running ON nexus_tasks (host) WHERE state = 'running';
CREATE INDEX IF NOT EXISTS nexus_tasks_by_parent ON nexus_tasks (after_id)
    WHERE after_id IS NOT NULL;
CREATE UNIQUE INDEX IF NOT EXISTS nexus_tasks_live_unique ON nexus_tasks (unique_key)
    WHERE unique_key IS NOT NULL AND state IN ('queued', 'running', 'retrying');
CREATE TABLE IF NOT EXISTS nexus_attempts (
    task_id BIGINT NOT NULL,
    n INTEGER NOT NULL,
    worker INTEGER NOT NULL,
    host TEXT,
    started_at_ms BIGINT NOT NULL,
    finished_at_ms BIGINT,
    exit_code INTEGER,
    error TEXT,
    PRIMARY KEY (task_id, n)
);
CREATE TABLE IF NOT EXISTS nexus_hosts (
    host TEXT PRIMARY KEY,
    expires_at_ms BIGINT NOT NULL,
    lease_ms BIGINT NOT NULL,
    pid INTEGER NOT NULL
);
"#;

/// What a host's listener hears, for its queue's loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    /// A task became runnable somewhere: dispatch.
    Ready,
    /// A task reached its final state.
    Done(i64),
    /// Kill this attempt if this host runs it (a cancel on another host).
    Kill { id: i64, attempt: u32, host: String },
    /// The listener (re)connected: what was said meanwhile is unknown.
    Listening,
}

impl Note {
    pub fn parse(payload: &str) -> Option<Note> {
        let mut words = payload.splitn(4, ' ');
        match words.next()? {
            "ready" => Some(Note::Ready),
            "done" => words.next()?.parse().ok().map(Note::Done),
            "kill" => Some(Note::Kill {
                id: words.next()?.parse().ok()?,
                attempt: words.next()?.parse().ok()?,
                host: words.next()?.to_string(),
            }),
            _ => None,
        }
    }
}

fn db_err(e: postgres::Error) -> StoreError {
    StoreError::Db(match e.as_db_error() {
        Some(d) => format!("PostgreSQL: {}", d.message()),
        None => format!("PostgreSQL: {e}"),
    })
}

/// Opens a connection, bounded in time: an unreachable server is an error within
/// seconds, and a connection whose server vanished is found dead by the kernel.
fn connect(url: &str) -> Result<Client, StoreError> {
    let target = pg_url::parse(url).map_err(StoreError::Db)?;
    let mut config = target.config;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(5));
    }
    config
        .application_name("nexus")
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(5))
        .tcp_user_timeout(Duration::from_secs(10));
    let at = describe_url(url);
    let connected = match &target.tls {
        Some(tls) => config.connect(tls.connector().map_err(StoreError::Db)?),
        None => config.connect(NoTls),
    };
    connected.map_err(|e| {
        StoreError::Db(pg_url::explain_tls_error(format!(
            "PostgreSQL at {at}: {}",
            with_causes(&e)
        )))
    })
}

/// An error and what caused it, in one line: "error performing TLS handshake" alone
/// does not say that the certificate was refused.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    for _ in 0..8 {
        let Some(c) = cause else { break };
        let s = c.to_string();
        if !out.contains(&s) {
            out = format!("{out}: {s}");
        }
        cause = c.source();
    }
    out
}

/// The URL without its password, for messages.
pub fn describe_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let cred = &url[s + 3..at];
            let user = cred.split(':').next().unwrap_or("");
            format!("{}{user}@{}", &url[..s + 3], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

/// Checks a `queue_url` as the config is loaded: its syntax, and that it asks for
/// nothing this build cannot do.
pub fn check_url(url: &str) -> Result<(), String> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(format!(
            "`queue_url` must be a postgres:// URL, got {:?}",
            describe_url(url)
        ));
    }
    // A CA file that cannot be read is found as the config loads, not at each reconnect.
    if let Some(tls) = pg_url::parse(url)?.tls {
        tls.connector()?;
    }
    Ok(())
}

/// Prepared statements by their text: each is parsed once per connection.
#[derive(Default)]
struct Prepared(HashMap<&'static str, Statement>);

impl Prepared {
    fn get<C: GenericClient>(
        &mut self,
        c: &mut C,
        sql: &'static str,
    ) -> Result<Statement, StoreError> {
        if let Some(s) = self.0.get(sql) {
            return Ok(s.clone());
        }
        let s = c.prepare(sql).map_err(db_err)?;
        self.0.insert(sql, s.clone());
        Ok(s)
    }
}

/// A client (or transaction) and the prepared statements: what every query goes through.
struct Db<'a, C: GenericClient> {
    c: &'a mut C,
    p: &'a mut Prepared,
}

type Param<'p> = &'p (dyn postgres::types::ToSql + Sync);
type Params<'p> = &'p [Param<'p>];

impl<C: GenericClient> Db<'_, C> {
    fn query(&mut self, sql: &'static str, params: Params<'_>) -> Result<Vec<Row>, StoreError> {
        let st = self.p.get(self.c, sql)?;
        self.c.query(&st, params).map_err(db_err)
    }
    fn opt(&mut self, sql: &'static str, params: Params<'_>) -> Result<Option<Row>, StoreError> {
        let st = self.p.get(self.c, sql)?;
        self.c.query_opt(&st, params).map_err(db_err)
    }
    fn exec(&mut self, sql: &'static str, params: Params<'_>) -> Result<u64, StoreError> {
        let st = self.p.get(self.c, sql)?;
        self.c.execute(&st, params).map_err(db_err)
    }
    fn notify(&mut self, payload: &str) -> Result<(), StoreError> {
        self.exec("SELECT pg_notify('nexus_tasks', $1)", &[&payload])
            .map(drop)
    }
    fn task(&mut self, id: i64, lock: bool) -> Result<TaskRow, StoreError> {
        let row = if lock {
            self.opt(SELECT_ONE_FOR_UPDATE, &[&id])?
        } else {
            self.opt(SELECT_ONE, &[&id])?
        };
        row.map(|r| row_of(&r))
            .transpose()?
            .ok_or(StoreError::NoSuchTask(id))
    }
}

// The statements that name every column, spelled out once (a `format!` would make a new
// string per call, which the statement cache keys on).
const SELECT_ONE: &str = "SELECT id, state, priority, attempts, max_attempts, worker, exit_code, \
     result, error, submitted_at_ms, started_at_ms, finished_at_ms, argv::text, required::text, \
     timeout_ms, after_id, unique_key, spec, not_before_ms, budget, cwd, pid, worker_pid, host \
     FROM nexus_tasks WHERE id = $1";
const SELECT_ONE_FOR_UPDATE: &str = "SELECT id, state, priority, attempts, max_attempts, worker, \
     exit_code, result, error, submitted_at_ms, started_at_ms, finished_at_ms, argv::text, \
     required::text, timeout_ms, after_id, unique_key, spec, not_before_ms, budget, cwd, pid, \
     worker_pid, host FROM nexus_tasks WHERE id = $1 FOR UPDATE";
const SELECT_PAGE: &str = "SELECT id, state, priority, attempts, max_attempts, worker, exit_code, \
     result, error, submitted_at_ms, started_at_ms, finished_at_ms, argv::text, required::text, \
     timeout_ms, after_id, unique_key, spec, not_before_ms, budget, cwd, pid, worker_pid, host \
     FROM nexus_tasks WHERE id > $1 AND ($2::text IS NULL OR state = $2) ORDER BY id LIMIT $3";
/// Every required capability among the worker's (`<@`), so that many tasks this worker
/// cannot run never hide one it can; SKIP LOCKED, so that hosts claiming at once take
/// different tasks and never wait for each other.
const SELECT_CLAIM: &str = "SELECT id, state, priority, attempts, max_attempts, worker, \
     exit_code, result, error, submitted_at_ms, started_at_ms, finished_at_ms, argv::text, \
     required::text, timeout_ms, after_id, unique_key, spec, not_before_ms, budget, cwd, pid, \
     worker_pid, host FROM nexus_tasks WHERE state IN ('queued', 'retrying') AND ready \
     AND not_before_ms <= $1 AND required <@ ($2::text)::jsonb \
     ORDER BY priority DESC, id LIMIT 1 FOR UPDATE SKIP LOCKED";

fn row_of(r: &Row) -> Result<TaskRow, StoreError> {
    let get_u64 = |i: usize| -> Result<Option<u64>, StoreError> {
        r.try_get::<_, Option<i64>>(i)
            .map(|v| v.map(|v| v.max(0) as u64))
            .map_err(db_err)
    };
    let state: String = r.try_get(1).map_err(db_err)?;
    let state = TaskState::parse(&state)
        .ok_or_else(|| StoreError::Db(format!("unknown task state {state:?}")))?;
    let u32_of = |i: usize| -> Result<Option<u32>, StoreError> {
        r.try_get::<_, Option<i32>>(i)
            .map(|v| v.map(|v| v.max(0) as u32))
            .map_err(db_err)
    };
    let text = |i: usize| -> Result<Option<String>, StoreError> { r.try_get(i).map_err(db_err) };
    Ok(TaskRow {
        id: r.try_get(0).map_err(db_err)?,
        state,
        priority: r.try_get(2).map_err(db_err)?,
        attempts: u32_of(3)?.unwrap_or(0),
        max_attempts: u32_of(4)?.unwrap_or(0),
        worker: u32_of(5)?,
        exit_code: r.try_get(6).map_err(db_err)?,
        result: text(7)?.map(parse_result),
        error: text(8)?,
        submitted_at_ms: get_u64(9)?.unwrap_or(0),
        started_at_ms: get_u64(10)?,
        finished_at_ms: get_u64(11)?,
        argv: serde_json::from_str(&text(12)?.unwrap_or_default()).unwrap_or_default(),
        required: serde_json::from_str(&text(13)?.unwrap_or_default()).unwrap_or_default(),
        timeout_ms: get_u64(14)?,
        after: r.try_get(15).map_err(db_err)?,
        unique: text(16)?,
        spec: text(17)?.unwrap_or_default(),
        not_before_ms: get_u64(18)?.unwrap_or(0),
        budget: u32_of(19)?.unwrap_or(0),
        cwd: text(20)?,
        pid: r.try_get(21).map_err(db_err)?,
        worker_pid: r.try_get(22).map_err(db_err)?,
        host: text(23)?,
    })
}

fn ms(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

fn int(v: u32) -> i32 {
    v.min(i32::MAX as u32) as i32
}

pub struct PgStore {
    client: Client,
    prepared: Prepared,
    host: String,
    lease_ms: u64,
    /// Within the owner's loop turn (`begin_batch`): changes join one transaction...
    batching: bool,
    /// ...opened at the first of them.
    open: bool,
}

impl PgStore {
    /// Connects, creates the schema if it is missing, and takes (or renews) this host's
    /// lease.
    pub fn connect(url: &str, host: &str, lease_ms: u64) -> Result<PgStore, StoreError> {
        let mut client = connect(url)?;
        // Not a NOTICE per table that already exists in every daemon log. No sort where
        // an index gives the order: a claim must walk `nexus_tasks_runnable` and stop at
        // its first row, but the planner, whose statistics say few tasks are queued (true
        // between bursts), chose to read every queued row and sort them, 1.6 ms per claim
        // with 3,000 queued instead of 0.07 ms: the benchmark's 843 tasks/s fell to 206
        // once a second index matched the claim's predicate. Statements with no such
        // index (pruning by age) still sort.
        client
            .batch_execute("SET client_min_messages = warning; SET enable_sort = off")
            .map_err(db_err)?;
        let mut tx = client.transaction().map_err(db_err)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
            .map_err(db_err)?;
        tx.batch_execute(SCHEMA).map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        let mut s = PgStore {
            client,
            prepared: Prepared::default(),
            host: host.to_string(),
            lease_ms,
            batching: false,
            open: false,
        };
        s.set_durability(Durability::Normal)?;
        s.take_lease()?;
        Ok(s)
    }

    /// A connection that only reads (the CLI, while its cluster is down): it takes no
    /// lease and creates nothing.
    pub fn reader(url: &str) -> Result<PgStore, StoreError> {
        Ok(PgStore {
            client: connect(url)?,
            prepared: Prepared::default(),
            host: String::new(),
            lease_ms: 0,
            batching: false,
            open: false,
        })
    }

    fn take_lease(&mut self) -> Result<(), StoreError> {
        let pid = std::process::id() as i32;
        let lease = ms(self.lease_ms);
        let mut db = Db {
            c: &mut self.client,
            p: &mut self.prepared,
        };
        db.exec(
            "INSERT INTO nexus_hosts (host, expires_at_ms, lease_ms, pid) \
             VALUES ($1, (extract(epoch from clock_timestamp()) * 1000)::bigint + $2, $2, $3) \
             ON CONFLICT (host) DO UPDATE SET expires_at_ms = EXCLUDED.expires_at_ms, \
             lease_ms = EXCLUDED.lease_ms, pid = EXCLUDED.pid",
            &[&self.host, &lease, &pid],
        )?;
        Ok(())
    }

    /// Runs `f` in one transaction (committed when it returns Ok, rolled back otherwise).
    /// Within a batch, `f` joins the turn's transaction: a change that is refused decides
    /// so before it writes, and any database error takes the whole store away (and the
    /// server rolls the turn back), so no savepoint is needed.
    fn tx<T>(
        &mut self,
        f: impl FnOnce(&mut Db<'_, Client>, &str) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        if self.batching {
            if !self.open {
                self.client.batch_execute("BEGIN").map_err(db_err)?;
                self.open = true;
            }
            let mut db = Db {
                c: &mut self.client,
                p: &mut self.prepared,
            };
            return f(&mut db, &self.host);
        }
        self.client.batch_execute("BEGIN").map_err(db_err)?;
        let mut db = Db {
            c: &mut self.client,
            p: &mut self.prepared,
        };
        match f(&mut db, &self.host) {
            Ok(r) => {
                self.client.batch_execute("COMMIT").map_err(db_err)?;
                Ok(r)
            }
            Err(e) => {
                let _ = self.client.batch_execute("ROLLBACK");
                Err(e)
            }
        }
    }

    fn db(&mut self) -> Db<'_, Client> {
        Db {
            c: &mut self.client,
            p: &mut self.prepared,
        }
    }
}

/// A task's life as the columns that hold it: the parameters $2 to $11 of every statement
/// that stores one (`state = $2, attempts = $3, …, budget = $11`), after the id in $1.
struct LifeColumns<'a> {
    state: &'static str,
    attempts: i32,
    max_attempts: i32,
    not_before_ms: i64,
    worker: Option<i32>,
    exit_code: Option<i32>,
    error: Option<&'a str>,
    started_at_ms: Option<i64>,
    finished_at_ms: Option<i64>,
    budget: i32,
}

impl<'a> LifeColumns<'a> {
    fn of(l: &'a Life) -> LifeColumns<'a> {
        LifeColumns {
            state: l.state.as_str(),
            attempts: int(l.attempts),
            max_attempts: int(l.max_attempts),
            not_before_ms: ms(l.not_before_ms),
            worker: l.worker.map(int),
            exit_code: l.exit_code,
            error: l.error.as_deref(),
            started_at_ms: l.started_at_ms.map(ms),
            finished_at_ms: l.finished_at_ms.map(ms),
            budget: int(l.budget),
        }
    }

    /// `id` as $1, these as $2 to $11, then `more` from $12 on.
    fn params<'p>(&'p self, id: &'p i64, more: &[Param<'p>]) -> Vec<Param<'p>> {
        let mut p: Vec<Param<'p>> = vec![
            id,
            &self.state,
            &self.attempts,
            &self.max_attempts,
            &self.not_before_ms,
            &self.worker,
            &self.exit_code,
            &self.error,
            &self.started_at_ms,
            &self.finished_at_ms,
            &self.budget,
        ];
        p.extend_from_slice(more);
        p
    }
}

fn store_life<C: GenericClient>(db: &mut Db<'_, C>, id: i64, l: &Life) -> Result<(), StoreError> {
    db.exec(
        "UPDATE nexus_tasks SET state = $2, attempts = $3, max_attempts = $4, \
         not_before_ms = $5, worker = $6, exit_code = $7, error = $8, started_at_ms = $9, \
         finished_at_ms = $10, budget = $11 WHERE id = $1",
        &LifeColumns::of(l).params(&id, &[]),
    )?;
    Ok(())
}

/// The tasks waiting (`--after`) for one that will never succeed are cancelled, and theirs
/// in turn, in the same transaction.
fn cancel_dependents<C: GenericClient>(
    db: &mut Db<'_, C>,
    id: i64,
    what: &str,
    now_ms: u64,
) -> Result<(), StoreError> {
    let mut work = vec![id];
    for _ in 0..100_000 {
        let Some(parent) = work.pop() else {
            break;
        };
        let error = format!("task {parent}, which it runs after, {what}");
        let children = db.query(
            "UPDATE nexus_tasks SET state = 'cancelled', finished_at_ms = $2, error = $3 \
             WHERE after_id = $1 AND state IN ('queued', 'retrying') RETURNING id",
            &[&parent, &ms(now_ms), &error],
        )?;
        for c in children {
            let c: i64 = c.try_get(0).map_err(db_err)?;
            db.notify(&format!("done {c}"))?;
            work.push(c);
        }
    }
    Ok(())
}

/// The end of an attempt, inside the caller's transaction (a result, or a dead host's
/// attempt taken back).
fn finish_in<C: GenericClient>(
    db: &mut Db<'_, C>,
    id: i64,
    attempt: u32,
    ending: Ending,
    result: Option<&str>,
    now_ms: u64,
    retry: &Retry,
) -> Result<TaskState, StoreError> {
    let row = db.task(id, true)?;
    let mut life = row.life();
    let state = life
        .end(attempt, ending, now_ms, &retry.backoff, retry.jitter)
        .map_err(StoreError::Refused)?;
    // The task's new life, its result and its attempt's end in one statement.
    db.exec(
        "WITH t AS (UPDATE nexus_tasks SET state = $2, attempts = $3, max_attempts = $4, \
         not_before_ms = $5, worker = $6, exit_code = $7, error = $8, started_at_ms = $9, \
         finished_at_ms = $10, budget = $11, result = $12 WHERE id = $1) \
         UPDATE nexus_attempts SET finished_at_ms = $14, exit_code = $7, error = $8 \
         WHERE task_id = $1 AND n = $13",
        &LifeColumns::of(&life).params(&id, &[&result, &int(attempt), &ms(now_ms)]),
    )?;
    match state {
        TaskState::Failed => cancel_dependents(db, id, "failed", now_ms)?,
        TaskState::Succeeded => {
            let freed = db.exec(
                "UPDATE nexus_tasks SET ready = TRUE WHERE after_id = $1 AND NOT ready",
                &[&id],
            )?;
            if freed > 0 {
                db.notify("ready")?;
            }
        }
        // Another host may take it (at once when lost, after its backoff otherwise: each
        // host then sets its timer by it).
        _ => db.notify("ready")?,
    }
    if state.is_final() {
        db.notify(&format!("done {id}"))?;
    }
    Ok(state)
}

fn live_with_key<C: GenericClient>(
    db: &mut Db<'_, C>,
    key: &str,
    except: i64,
) -> Result<Option<i64>, StoreError> {
    let r = db.opt(
        "SELECT id FROM nexus_tasks WHERE unique_key = $1 AND id <> $2 \
         AND state IN ('queued', 'running', 'retrying')",
        &[&key, &except],
    )?;
    r.map(|r| r.try_get(0).map_err(db_err)).transpose()
}

impl Backend for PgStore {
    /// One transaction per turn of the owner's loop, as with SQLite: its row locks are
    /// held for milliseconds, and the other hosts' claims skip them.
    fn begin_batch(&mut self) -> Result<(), StoreError> {
        self.batching = true;
        Ok(())
    }

    fn commit_batch(&mut self) -> Result<(), StoreError> {
        self.batching = false;
        if std::mem::take(&mut self.open) {
            self.client.batch_execute("COMMIT").map_err(db_err)?;
        }
        Ok(())
    }

    fn set_durability(&mut self, d: Durability) -> Result<(), StoreError> {
        self.client
            .batch_execute(match d {
                Durability::Full => "SET synchronous_commit = on",
                Durability::Normal => "SET synchronous_commit = off",
            })
            .map_err(db_err)
    }

    fn submit(&mut self, t: &NewTask, now_ms: u64) -> Result<i64, StoreError> {
        let r = self.tx(|db, _| {
            if let Some(key) = &t.unique
                && let Some(id) = live_with_key(db, key, 0)?
            {
                return Err(StoreError::Duplicate {
                    key: key.clone(),
                    id,
                });
            }
            let mut ready = true;
            if let Some(after) = t.after {
                let state: Option<String> = db
                    .opt("SELECT state FROM nexus_tasks WHERE id = $1", &[&after])?
                    .map(|r| r.try_get(0).map_err(db_err))
                    .transpose()?;
                match state.as_deref().and_then(TaskState::parse) {
                    None => return Err(StoreError::NoSuchTask(after)),
                    Some(s @ (TaskState::Failed | TaskState::Cancelled)) => {
                        return Err(StoreError::Refused(Refused::NotNow(s)));
                    }
                    Some(s) => ready = s == TaskState::Succeeded,
                }
            }
            let not_before = now_ms.saturating_add(t.delay_ms);
            let life = Life::new(t.max_attempts, not_before);
            let argv = serde_json::to_string(&t.argv).unwrap_or_default();
            let required = serde_json::to_string(&t.required).unwrap_or_default();
            let row = db
                .opt(
                    "INSERT INTO nexus_tasks (spec, argv, required, priority, timeout_ms, \
                     after_id, unique_key, state, attempts, max_attempts, budget, \
                     not_before_ms, submitted_at_ms, cwd, ready) \
                     VALUES ($1, ($2::text)::jsonb, ($3::text)::jsonb, $4, $5, $6, $7, $8, 0, \
                     $9, $9, $10, $11, $12, $13) RETURNING id",
                    &[
                        &t.spec,
                        &argv,
                        &required,
                        &t.priority,
                        &t.timeout_ms.map(ms),
                        &t.after,
                        &t.unique,
                        &life.state.as_str(),
                        &int(life.max_attempts),
                        &ms(life.not_before_ms),
                        &ms(now_ms),
                        &t.cwd,
                        &ready,
                    ],
                )?
                .ok_or_else(|| StoreError::Db("the insert returned no id".into()))?;
            let id: i64 = row.try_get(0).map_err(db_err)?;
            db.notify("ready")?;
            Ok(id)
        });
        match (r, &t.unique) {
            // Two hosts submitting one key at once: the unique index decides.
            (Err(StoreError::Db(e)), Some(key)) if e.contains("nexus_tasks_live_unique") => {
                let id = live_with_key(&mut self.db(), key, 0)?.unwrap_or(0);
                Err(StoreError::Duplicate {
                    key: key.clone(),
                    id,
                })
            }
            (r, _) => r,
        }
    }

    fn get(&mut self, id: i64) -> Result<TaskRow, StoreError> {
        self.db().task(id, false)
    }

    fn list(
        &mut self,
        state: Option<TaskState>,
        after_id: i64,
        limit: u32,
    ) -> Result<Vec<TaskRow>, StoreError> {
        let rows = self.db().query(
            SELECT_PAGE,
            &[&after_id, &state.map(TaskState::as_str), &i64::from(limit)],
        )?;
        rows.iter().map(row_of).collect()
    }

    fn counts(&mut self) -> Result<Vec<(TaskState, u64)>, StoreError> {
        let rows = self.db().query(
            "SELECT state, COUNT(*) FROM nexus_tasks GROUP BY state",
            &[],
        )?;
        let mut got = Vec::new();
        for r in rows {
            let s: String = r.try_get(0).map_err(db_err)?;
            let n: i64 = r.try_get(1).map_err(db_err)?;
            got.push((s, n));
        }
        Ok(every_state(&got))
    }

    fn claim(
        &mut self,
        worker: u32,
        worker_pid: i32,
        capabilities: &[String],
        now_ms: u64,
    ) -> Result<Option<(TaskRow, u32)>, StoreError> {
        let caps = serde_json::to_string(capabilities).unwrap_or_else(|_| "[]".into());
        self.tx(|db, host| {
            let Some(found) = db.opt(SELECT_CLAIM, &[&ms(now_ms), &caps])? else {
                return Ok(None);
            };
            let mut row = row_of(&found)?;
            let mut life = row.life();
            let attempt = life.start(worker, now_ms).map_err(StoreError::Refused)?;
            // The task's new life and its attempt's row in one statement: a claim costs a
            // round trip per statement.
            db.exec(
                "WITH t AS (UPDATE nexus_tasks SET state = $2, attempts = $3, \
                 max_attempts = $4, not_before_ms = $5, worker = $6, exit_code = $7, \
                 error = $8, started_at_ms = $9, finished_at_ms = $10, budget = $11, \
                 pid = NULL, worker_pid = $12, host = $13 WHERE id = $1) \
                 INSERT INTO nexus_attempts (task_id, n, worker, host, started_at_ms) \
                 VALUES ($1, $3, $6, $13, $9) ON CONFLICT (task_id, n) DO UPDATE SET \
                 worker = EXCLUDED.worker, host = EXCLUDED.host, \
                 started_at_ms = EXCLUDED.started_at_ms, finished_at_ms = NULL, \
                 exit_code = NULL, error = NULL",
                &LifeColumns::of(&life).params(&row.id, &[&worker_pid, &host]),
            )?;
            row.apply(&life);
            row.pid = None;
            row.worker_pid = Some(worker_pid);
            row.host = Some(host.to_string());
            Ok(Some((row, attempt)))
        })
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
        self.tx(|db, _| finish_in(db, id, attempt, ending, result, now_ms, retry))
    }

    fn cancel(&mut self, id: i64, now_ms: u64) -> Result<Option<u32>, StoreError> {
        self.tx(|db, me| {
            let row = db.task(id, true)?;
            let mut life = row.life();
            let worker = life.cancel(now_ms).map_err(StoreError::Refused)?;
            store_life(db, id, &life)?;
            cancel_dependents(db, id, "was cancelled", now_ms)?;
            db.notify(&format!("done {id}"))?;
            if worker.is_none() {
                return Ok(None);
            }
            db.exec(
                "UPDATE nexus_attempts SET finished_at_ms = $3, error = 'cancelled' \
                 WHERE task_id = $1 AND n = $2",
                &[&id, &int(life.attempts), &ms(now_ms)],
            )?;
            match row.host.as_deref() {
                Some(h) if h != me => {
                    db.notify(&format!("kill {id} {} {h}", life.attempts))?;
                    Ok(None)
                }
                _ => Ok(worker),
            }
        })
    }

    fn running(&mut self) -> Result<Vec<RunningTask>, StoreError> {
        let host = self.host.clone();
        let rows = self.db().query(
            "SELECT id, attempts, worker, worker_pid, pid FROM nexus_tasks \
             WHERE state = 'running' AND host = $1",
            &[&host],
        )?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get(0).map_err(db_err)?,
                    r.try_get::<_, i32>(1).map_err(db_err)?.max(0) as u32,
                    r.try_get::<_, Option<i32>>(2)
                        .map_err(db_err)?
                        .unwrap_or(0)
                        .max(0) as u32,
                    r.try_get(3).map_err(db_err)?,
                    r.try_get(4).map_err(db_err)?,
                ))
            })
            .collect()
    }

    fn next_due_ms(&mut self, now_ms: u64) -> Result<Option<u64>, StoreError> {
        let r = self.db().opt(
            "SELECT MIN(not_before_ms) FROM nexus_tasks WHERE state IN ('queued', 'retrying') \
             AND ready AND not_before_ms > $1",
            &[&ms(now_ms)],
        )?;
        Ok(
            r.and_then(|r| r.try_get::<_, Option<i64>>(0).ok().flatten())
                .map(|v| v.max(0) as u64),
        )
    }

    fn any_runnable(&mut self, now_ms: u64) -> Result<bool, StoreError> {
        let r = self.db().opt(
            "SELECT 1 FROM nexus_tasks WHERE state IN ('queued', 'retrying') AND ready \
             AND not_before_ms <= $1 LIMIT 1",
            &[&ms(now_ms)],
        )?;
        Ok(r.is_some())
    }

    fn attempts(&mut self, id: i64) -> Result<Vec<AttemptRow>, StoreError> {
        let rows = self.db().query(
            "SELECT n, worker, started_at_ms, finished_at_ms, exit_code, error, host \
             FROM nexus_attempts WHERE task_id = $1 ORDER BY n",
            &[&id],
        )?;
        rows.iter()
            .map(|r| {
                Ok(AttemptRow {
                    attempt: r.try_get::<_, i32>(0).map_err(db_err)?.max(0) as u32,
                    worker: r.try_get::<_, i32>(1).map_err(db_err)?.max(0) as u32,
                    started_at_ms: r.try_get::<_, i64>(2).map_err(db_err)?.max(0) as u64,
                    finished_at_ms: r
                        .try_get::<_, Option<i64>>(3)
                        .map_err(db_err)?
                        .map(|v| v.max(0) as u64),
                    exit_code: r.try_get(4).map_err(db_err)?,
                    error: r.try_get(5).map_err(db_err)?,
                    host: r.try_get(6).map_err(db_err)?,
                })
            })
            .collect()
    }

    fn durations(&mut self) -> Result<(Vec<f64>, Vec<f64>), StoreError> {
        let rows = self.db().query(
            "SELECT a.n, t.submitted_at_ms, a.started_at_ms, a.finished_at_ms \
             FROM nexus_attempts a JOIN nexus_tasks t ON t.id = a.task_id",
            &[],
        )?;
        let mut wait = Vec::new();
        let mut run = Vec::new();
        for r in rows {
            let n: i32 = r.try_get(0).map_err(db_err)?;
            let submitted: i64 = r.try_get(1).map_err(db_err)?;
            let started: i64 = r.try_get(2).map_err(db_err)?;
            let finished: Option<i64> = r.try_get(3).map_err(db_err)?;
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
        self.tx(|db, _| {
            let rows = db.query(
                "SELECT id FROM nexus_tasks WHERE state IN ('succeeded', 'failed', 'cancelled') \
                 AND (finished_at_ms < $1 OR id NOT IN (SELECT id FROM nexus_tasks \
                     WHERE state IN ('succeeded', 'failed', 'cancelled') \
                     ORDER BY finished_at_ms DESC, id DESC LIMIT $2)) \
                 AND id NOT IN (SELECT after_id FROM nexus_tasks WHERE after_id IS NOT NULL \
                     AND state IN ('queued', 'running', 'retrying')) \
                 LIMIT 10000 FOR UPDATE SKIP LOCKED",
                &[&ms(older_than_ms), &ms(keep)],
            )?;
            let ids: Vec<i64> = rows
                .iter()
                .map(|r| r.try_get(0).map_err(db_err))
                .collect::<Result<_, _>>()?;
            if !ids.is_empty() {
                db.exec(
                    "DELETE FROM nexus_attempts WHERE task_id = ANY($1)",
                    &[&ids],
                )?;
                db.exec("DELETE FROM nexus_tasks WHERE id = ANY($1)", &[&ids])?;
            }
            Ok(ids)
        })
    }

    fn retry(&mut self, id: i64, now_ms: u64) -> Result<(), StoreError> {
        self.tx(|db, _| {
            let row = db.task(id, true)?;
            if let Some(key) = &row.unique
                && let Some(other) = live_with_key(db, key, id)?
            {
                return Err(StoreError::Duplicate {
                    key: key.clone(),
                    id: other,
                });
            }
            let mut life = row.life();
            life.retry(now_ms).map_err(StoreError::Refused)?;
            store_life(db, id, &life)?;
            db.notify("ready")
        })
    }

    fn heartbeat(&mut self, now_ms: u64, retry: &Retry) -> Result<Heartbeat, StoreError> {
        let lease = ms(self.lease_ms);
        let pid = std::process::id() as i32;
        self.tx(|db, me| {
            let mut beat = Heartbeat::default();
            let renewed = db.exec(
                "UPDATE nexus_hosts SET expires_at_ms = \
                 (extract(epoch from clock_timestamp()) * 1000)::bigint + $2, lease_ms = $2, \
                 pid = $3 WHERE host = $1",
                &[&me, &lease, &pid],
            )?;
            if renewed == 0 {
                beat.superseded = true;
                db.exec(
                    "INSERT INTO nexus_hosts (host, expires_at_ms, lease_ms, pid) VALUES \
                     ($1, (extract(epoch from clock_timestamp()) * 1000)::bigint + $2, $2, $3) \
                     ON CONFLICT (host) DO NOTHING",
                    &[&me, &lease, &pid],
                )?;
            }
            // Deleting the lease is what takes a host as dead: of two hosts noticing at
            // once, the second finds nothing left to delete.
            let dead = db.query(
                "DELETE FROM nexus_hosts WHERE host <> $1 \
                 AND expires_at_ms < (extract(epoch from clock_timestamp()) * 1000)::bigint \
                 RETURNING host, lease_ms",
                &[&me],
            )?;
            for d in dead {
                let host: String = d.try_get(0).map_err(db_err)?;
                let lease_ms: i64 = d.try_get(1).map_err(db_err)?;
                let tasks = db.query(
                    "SELECT id, attempts FROM nexus_tasks WHERE state = 'running' AND host = $1",
                    &[&host],
                )?;
                let why = format!("its host {host} stopped renewing its {lease_ms} ms lease");
                for t in tasks {
                    let id: i64 = t.try_get(0).map_err(db_err)?;
                    let attempt = t.try_get::<_, i32>(1).map_err(db_err)?.max(0) as u32;
                    match finish_in(
                        db,
                        id,
                        attempt,
                        Ending::Lost(why.clone()),
                        None,
                        now_ms,
                        retry,
                    ) {
                        Ok(state) => beat.requeued.push((id, attempt, host.clone(), state)),
                        Err(StoreError::Refused(_)) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            Ok(beat)
        })
    }
}

/// Listens for the queue's notifications for as long as the process lives, reconnecting
/// each second while the server cannot be reached. Each note is sent, then `wake` called.
pub fn listen(url: String, notes: Sender<Note>, wake: Arc<mio::Waker>) {
    let say = |n: Note| notes.send(n).is_ok() && wake.wake().is_ok();
    loop {
        if let Ok(mut c) = connect(&url)
            && c.batch_execute(&format!("LISTEN {CHANNEL}")).is_ok()
        {
            if !say(Note::Listening) {
                return;
            }
            while !c.is_closed() {
                let mut n = c.notifications();
                let mut it = n.timeout_iter(Duration::from_secs(30));
                while let Ok(Some(x)) = postgres::fallible_iterator::FallibleIterator::next(&mut it)
                {
                    if let Some(note) = Note::parse(x.payload())
                        && !say(note)
                    {
                        return;
                    }
                }
                drop(it);
                drop(n);
                // Not a poll for work: a check that the connection still lives.
                if c.simple_query("SELECT 1").is_err() {
                    break;
                }
            }
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[cfg(test)]
#[path = "../../tests/common/pg.rs"]
pub mod testing;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_parse_and_garbage_is_ignored() {
        assert_eq!(Note::parse("ready"), Some(Note::Ready));
        assert_eq!(Note::parse("done 42"), Some(Note::Done(42)));
        assert_eq!(
            Note::parse("kill 7 2 host a:/tmp/x y"),
            Some(Note::Kill {
                id: 7,
                attempt: 2,
                host: "host a:/tmp/x y".into()
            })
        );
        assert_eq!(Note::parse("done x"), None);
        assert_eq!(Note::parse(""), None);
        assert_eq!(Note::parse("kill 1"), None);
    }

    /// A regression seen in the benchmark (843 -> 206 tasks/s): a claim must walk the
    /// runnable index in claim order, never read and sort every queued task.
    #[test]
    fn a_claim_reads_one_row_of_the_runnable_index_not_every_queued_task() {
        let Some(db) = testing::TempDb::create() else {
            return;
        };
        let mut pg = PgStore::connect(&db.url, "unit", 10_000).unwrap();
        pg.client
            .batch_execute(
                "INSERT INTO nexus_tasks (spec, argv, required, priority, state, attempts, \
                 max_attempts, budget, not_before_ms, submitted_at_ms) \
                 SELECT '{}', '[\"true\"]', '[]', 0, 'queued', 0, 3, 3, 0, 0 \
                 FROM generate_series(1, 3000)",
            )
            .unwrap();
        let plan: Vec<String> = pg
            .client
            .query(
                &format!("EXPLAIN {SELECT_CLAIM}"),
                &[&1_i64, &"[]".to_string()],
            )
            .unwrap()
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect();
        let plan = plan.join("\n");
        assert!(plan.contains("nexus_tasks_runnable"), "{plan}");
        assert!(!plan.contains("Sort"), "{plan}");
    }

    #[test]
    fn urls_are_checked_and_shown_without_password() {
        assert_eq!(
            describe_url("postgres://u:secret@127.0.0.1:5432/db"),
            "postgres://u@127.0.0.1:5432/db"
        );
        assert!(check_url("postgres://u@localhost/db").is_ok());
        assert!(check_url("mysql://x").unwrap_err().contains("postgres://"));
        assert!(check_url("postgres://u@h/db?sslmode=require").is_ok());
        assert!(
            check_url("postgres://u@h/db?sslmode=verify-full&sslrootcert=/nonexistent.pem")
                .unwrap_err()
                .contains("/nonexistent.pem")
        );
    }
}
