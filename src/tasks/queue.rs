//! The queue's owner: a thread of the master (so no database write ever delays a
//! respawn), serving `tasks.sock`. Free workflows connect as workers and are handed tasks;
//! the CLI submits, asks and cancels. Its loop's events: the listener, the connections,
//! and its timers (acknowledgement deadlines, delayed tasks, pruning, reopening a
//! database that failed).
//!
//! A worker's death is its connection's end, which the kernel delivers the moment the
//! process is gone: its tasks' programs are killed and the tasks re-queued at once, the
//! attempt counted. A hung worker is killed by the master on the watchdogs' verdict, and
//! then ends the same way.
//!
//! The database failing never stops the thread: the queue answers with the error and
//! tries to reopen it each second, while the master goes on supervising.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mio::net::{UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Token};
use nix::sys::socket::{self, sockopt};
use serde_json::json;

use crate::ledger::{Appender, Event, unix_ms_now};
use crate::runtime_dir::RuntimeDir;
use crate::tasks::backend::Backend;
use crate::tasks::lifecycle::{Ending, RetryBackoff, TaskState};
use crate::tasks::postgres::{Note, PgStore};
use crate::tasks::scheduler::{self, Load, Waiting};
use crate::tasks::store::{Durability, Retry, Store, StoreError};
use crate::tasks::view;
use crate::tasks::wire::{self, FromQueue, Held, Outcome, ToQueue};

const LISTENER: Token = Token(0);
/// The PostgreSQL listener thread has notes for us.
const NOTES: Token = Token(usize::MAX);
/// A page of `task list` holds at most this many.
pub const MAX_PAGE: u32 = 1000;
/// How often a database that failed is tried again.
const REOPEN_EVERY: Duration = Duration::from_secs(1);
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// How often the workers' tasks' CPU is sampled while any runs (`cpu`).
const CPU_EVERY: Duration = Duration::from_secs(1);
/// A task marked running whose worker is alive but not connected (a failover) is given
/// this long for the worker to come back before it is taken as lost.
const RECONNECT_GRACE: Duration = Duration::from_secs(5);

pub struct Options {
    pub dir: RuntimeDir,
    pub state_dir: PathBuf,
    /// `nexus start` started this master: nothing can still be running any task.
    pub fresh: bool,
    pub ack_timeout: Duration,
    pub retention_count: u64,
    pub retention_ms: u64,
    pub backoff: RetryBackoff,
    /// The queue is in PostgreSQL, shared with other hosts.
    pub shared: Option<Shared>,
}

pub struct Shared {
    pub url: String,
    pub host: String,
    pub lease: Duration,
}

/// Binds `tasks.sock` and starts the queue's thread.
pub fn spawn(opts: Options) -> Result<(), String> {
    let path = opts.dir.tasks_socket();
    let _ = std::fs::remove_file(&path);
    let listener =
        UnixListener::bind(&path).map_err(|e| format!("cannot bind {}: {e}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot chmod {}: {e}", path.display()))?;
    // One malloc arena for the process: a second one for this thread would hold its own
    // pages, in a daemon that is otherwise a loop over a few small buffers.
    // SAFETY: mallopt with an integer option, before the thread exists.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    std::thread::Builder::new()
        .name("queue".into())
        .spawn(move || match Queue::new(opts, listener) {
            Ok(mut q) => q.run(),
            Err(e) => log::error!("the task queue cannot run: {e}"),
        })
        .map_err(|e| format!("cannot start the queue's thread: {e}"))?;
    Ok(())
}

struct Conn {
    stream: UnixStream,
    peer_pid: i32,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    /// The worker this connection is, once it said hello.
    worker: Option<u32>,
    /// A `task wait`: the ids it asked for, and those of them not finished yet.
    waiting: Option<(Vec<i64>, std::collections::BTreeSet<i64>)>,
    /// Close once `out` is written (a CLI's answer).
    close_when_flushed: bool,
    writable: bool,
}

struct Worker {
    token: Token,
    pid: i32,
    capabilities: Vec<String>,
    concurrency: u32,
    /// Attempts it runs: (id, attempt) → the program's pid (0 until confirmed).
    running: BTreeMap<(i64, u32), i32>,
    given: u64,
    draining: bool,
    /// Its tasks' CPU counters at the last sample, and the rate since the one before.
    cpu_sample: Option<(Instant, BTreeMap<String, u64>)>,
    cpu_permille: u32,
}

struct Queue {
    opts: Options,
    poll: Poll,
    listener: UnixListener,
    conns: HashMap<Token, Conn>,
    next_token: usize,
    uid: u32,
    store: Option<Box<dyn Backend>>,
    /// Whether to open the store: once tasks.db exists or a request needs it. A cluster
    /// that never uses tasks never loads SQLite into the master.
    wanted: bool,
    db_error: Option<String>,
    next_reopen: Instant,
    /// flock on state_dir/queue.lock while the store is ours.
    lock: Option<std::fs::File>,
    /// Only the first open of a fresh start may take every running task as lost.
    fresh: bool,
    workers: BTreeMap<u32, Worker>,
    /// Attempts handed out and not yet confirmed: their deadline.
    acks: BTreeMap<(i64, u32), Instant>,
    /// Running tasks whose worker is not connected: since when.
    unowned: BTreeMap<(i64, u32), Instant>,
    next_due: Option<Instant>,
    next_prune: Instant,
    dirty: bool,
    /// A batch transaction is open (see `run`).
    in_batch: bool,
    ledger: Appender,
    rng: crate::daemon::Rng,
    /// A shared queue: what the listener thread heard, and when to renew the lease.
    notes: Option<std::sync::mpsc::Receiver<Note>>,
    next_beat: Instant,
    /// The runtime directory's tag, which the tasks' cgroups are named by.
    dir_tag: String,
    next_cpu: Instant,
}

impl Queue {
    fn new(opts: Options, mut listener: UnixListener) -> Result<Queue, String> {
        let poll = Poll::new().map_err(|e| format!("cannot create poll: {e}"))?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .map_err(|e| format!("cannot poll tasks.sock: {e}"))?;
        let ledger = Appender::new(&opts.dir.events());
        let seed = unix_ms_now() ^ u64::from(std::process::id());
        // A shared queue is wanted from the start: other hosts submit to it.
        let wanted = opts.shared.is_some() || opts.state_dir.join("tasks.db").exists();
        let notes = match &opts.shared {
            Some(shared) => {
                let waker = std::sync::Arc::new(
                    mio::Waker::new(poll.registry(), NOTES)
                        .map_err(|e| format!("cannot create a waker: {e}"))?,
                );
                let (tx, rx) = std::sync::mpsc::channel();
                let url = shared.url.clone();
                std::thread::Builder::new()
                    .name("queue-listen".into())
                    .spawn(move || crate::tasks::postgres::listen(url, tx, waker))
                    .map_err(|e| format!("cannot start the queue's listener: {e}"))?;
                Some(rx)
            }
            None => None,
        };
        let opts_dir = opts.dir.clone();
        Ok(Queue {
            fresh: opts.fresh,
            opts,
            poll,
            listener,
            conns: HashMap::new(),
            next_token: 1,
            // SAFETY: geteuid has no preconditions.
            uid: unsafe { libc::geteuid() },
            store: None,
            wanted,
            db_error: None,
            next_reopen: Instant::now(),
            lock: None,
            workers: BTreeMap::new(),
            acks: BTreeMap::new(),
            unowned: BTreeMap::new(),
            next_due: None,
            next_prune: Instant::now() + PRUNE_EVERY,
            dirty: true,
            in_batch: false,
            ledger,
            rng: crate::daemon::Rng::seeded(seed),
            notes,
            next_beat: Instant::now(),
            dir_tag: crate::services::state::dir_tag(&opts_dir),
            next_cpu: Instant::now(),
        })
    }

    fn run(&mut self) {
        let mut events = Events::with_capacity(128);
        loop {
            // One commit for the whole turn: every result and start it handled, and the
            // dispatch that followed (a durable request commits apart, before its answer).
            self.batch_begin();
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept(),
                    NOTES => self.on_notes(),
                    t => {
                        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                            self.read(t);
                        }
                        if ev.is_writable() {
                            self.flush(t);
                        }
                    }
                }
            }
            let now = Instant::now();
            self.on_timers(now);
            if self.dirty {
                self.dirty = false;
                self.dispatch();
            }
            self.batch_end();
            let timeout = self
                .next_wake()
                .map(|t| t.saturating_duration_since(Instant::now()));
            if let Err(e) = self.poll.poll(&mut events, timeout)
                && e.kind() != io::ErrorKind::Interrupted
            {
                log::error!("the task queue's poll failed: {e}");
                return;
            }
        }
    }

    /// A change the user is told of (submit, cancel, retry): committed on its own, with
    /// an fsync, before the answer; not held for the rest of the turn. None: no store.
    fn durably<T>(
        &mut self,
        change: impl FnOnce(&mut dyn Backend) -> Result<T, StoreError>,
    ) -> Option<Result<T, StoreError>> {
        self.batch_end();
        let store = self.store.as_mut()?;
        let r = store
            .set_durability(Durability::Full)
            .and_then(|_| change(store.as_mut()));
        let _ = store.set_durability(Durability::Normal);
        Some(r)
    }

    fn batch_begin(&mut self) {
        if let Some(store) = self.store.as_mut() {
            match store.begin_batch() {
                Ok(()) => self.in_batch = true,
                Err(e) => self.failed(&e),
            }
        }
    }

    fn batch_end(&mut self) {
        if std::mem::take(&mut self.in_batch)
            && let Some(store) = self.store.as_mut()
            && let Err(e) = store.commit_batch()
        {
            self.failed(&e);
        }
    }

    fn next_wake(&self) -> Option<Instant> {
        let mut wake = Some(self.next_prune);
        let mut at = |t: Instant| wake = Some(wake.map_or(t, |w: Instant| w.min(t)));
        if let Some((_, t)) = self.acks.iter().min_by_key(|(_, t)| **t) {
            at(*t);
        }
        if let Some(t) = self.next_due {
            at(t);
        }
        if self.store.is_none() && self.wanted {
            at(self.next_reopen);
        }
        if !self.unowned.is_empty() {
            at(Instant::now() + Duration::from_secs(1));
        }
        if self.opts.shared.is_some() && self.store.is_some() {
            at(self.next_beat);
        }
        if self.any_running() {
            at(self.next_cpu);
        }
        wake
    }

    // ---- the database ----

    fn retry_rule(&mut self) -> Retry {
        Retry {
            backoff: self.opts.backoff,
            jitter: self.rng.unit(),
        }
    }

    /// A database error takes the store away until it can be reopened.
    fn failed(&mut self, e: &StoreError) {
        if let StoreError::Db(msg) = e {
            let at = self.location();
            let msg = if msg.starts_with(&at) {
                msg.clone()
            } else {
                format!("{at}: {msg}")
            };
            log::warn!("the task queue is unavailable: {msg}; retrying each second");
            self.db_error = Some(msg);
            self.store = None;
            self.in_batch = false;
            self.lock = None;
            self.next_reopen = Instant::now() + REOPEN_EVERY;
        }
    }

    /// Where the queue is, for messages: the SQLite file, or the server (no password).
    fn location(&self) -> String {
        match &self.opts.shared {
            Some(shared) => format!(
                "PostgreSQL at {}",
                crate::tasks::postgres::describe_url(&shared.url)
            ),
            None => self.opts.state_dir.join("tasks.db").display().to_string(),
        }
    }

    fn open_store(&mut self) {
        let dir = &self.opts.state_dir;
        let opened = (|| -> Result<(std::fs::File, Box<dyn Backend>), String> {
            std::fs::create_dir_all(dir.join("task-logs"))
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            let lock_path = dir.join("queue.lock");
            let lock = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock_path)
                .map_err(|e| format!("cannot open {}: {e}", lock_path.display()))?;
            // SAFETY: flock on a file we own.
            if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                return Err(format!(
                    "the queue in {} is owned by another cluster (its queue.lock is held); give this cluster a `state_dir` of its own",
                    dir.display()
                ));
            }
            let store: Box<dyn Backend> = match &self.opts.shared {
                Some(s) => Box::new(
                    PgStore::connect(&s.url, &s.host, s.lease.as_millis() as u64)
                        .map_err(StoreError::into_message)?,
                ),
                None => Box::new(
                    Store::open_with(&dir.join("tasks.db"), Durability::Normal)
                        .map_err(StoreError::into_message)?,
                ),
            };
            Ok((lock, store))
        })();
        match opened {
            Ok((lock, store)) => {
                if self.db_error.take().is_some() {
                    log::info!("the task queue is available again");
                }
                self.lock = Some(lock);
                self.store = Some(store);
                let fresh = std::mem::take(&mut self.fresh);
                if let Err(e) = self.reconcile(fresh) {
                    self.failed(&e);
                }
                self.dirty = true;
            }
            Err(e) => {
                if self.db_error.as_deref() != Some(e.as_str()) {
                    log::warn!("the task queue is unavailable: {e}; retrying each second");
                }
                self.db_error = Some(e);
                self.next_reopen = Instant::now() + REOPEN_EVERY;
            }
        }
    }

    /// After opening: what the store says runs, against who is connected. At a fresh
    /// start nothing can be running; after a failover, workers keep running their tasks
    /// and reconnect.
    fn reconcile(&mut self, fresh: bool) -> Result<(), StoreError> {
        let Some(store) = self.store.as_mut() else {
            return Ok(());
        };
        let running = store.running()?;
        let now = Instant::now();
        for (id, attempt, worker, worker_pid, _pid) in running {
            let held = self
                .workers
                .get(&worker)
                .is_some_and(|w| w.running.contains_key(&(id, attempt)));
            if held {
                continue;
            }
            let alive = worker_pid.is_some_and(|p| p > 0 && pid_alive(p));
            if fresh || !alive || self.workers.contains_key(&worker) {
                let why = if fresh {
                    "the cluster was restarted while it ran".to_string()
                } else {
                    format!("its worker workflow-{worker} is gone")
                };
                self.lose(id, attempt, Some(worker), &why)?;
            } else {
                self.unowned.insert((id, attempt), now);
            }
        }
        Ok(())
    }

    /// An attempt is lost (its worker died, hung or never confirmed it): its program is
    /// killed, and the task re-queued at once with the attempt counted.
    fn lose(
        &mut self,
        id: i64,
        attempt: u32,
        worker: Option<u32>,
        why: &str,
    ) -> Result<(), StoreError> {
        kill_attempt(&self.opts.state_dir, id, attempt);
        self.acks.remove(&(id, attempt));
        self.unowned.remove(&(id, attempt));
        let retry = self.retry_rule();
        let Some(store) = self.store.as_mut() else {
            return Ok(());
        };
        match store.finish(
            id,
            attempt,
            Ending::Lost(why.to_string()),
            None,
            unix_ms_now(),
            &retry,
        ) {
            Ok(state) => {
                log::info!(
                    "task {id} attempt {attempt} lost: {why}; now {}",
                    state.as_str()
                );
                self.record_end(id, attempt, worker, state, None, Some(why));
                self.dirty = true;
                Ok(())
            }
            Err(StoreError::Refused(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn record_end(
        &mut self,
        id: i64,
        attempt: u32,
        worker: Option<u32>,
        state: TaskState,
        code: Option<i32>,
        error: Option<&str>,
    ) {
        let event = match state {
            TaskState::Succeeded => "task_succeeded",
            TaskState::Retrying => "task_retry",
            TaskState::Failed => "task_failed",
            TaskState::Cancelled => "task_cancelled",
            TaskState::Queued | TaskState::Running => return,
        };
        self.ledger.append(&Event {
            task: Some(id),
            attempt: Some(attempt),
            workflow: worker,
            code,
            detail: error.map(str::to_string),
            ..Event::new(event)
        });
        self.notify_waiters(Some(id));
    }

    fn on_timers(&mut self, now: Instant) {
        if self.store.is_none() && self.wanted && now >= self.next_reopen {
            self.open_store();
        }
        if self.store.is_none() {
            return;
        }
        let expired: Vec<(i64, u32)> = self
            .acks
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(k, _)| *k)
            .collect();
        for (id, attempt) in expired {
            let worker = self
                .workers
                .iter()
                .find(|(_, w)| w.running.contains_key(&(id, attempt)))
                .map(|(n, _)| *n);
            let why = format!(
                "workflow-{} did not confirm the start within {} ms",
                worker.unwrap_or(0),
                self.opts.ack_timeout.as_millis()
            );
            if let Some(w) = worker {
                self.tell_worker(
                    w,
                    &FromQueue::Kill {
                        id,
                        attempt,
                        why: why.clone(),
                    },
                );
            }
            if let Err(e) = self.lose(id, attempt, worker, &why) {
                self.failed(&e);
                return;
            }
        }
        let overdue: Vec<(i64, u32)> = self
            .unowned
            .iter()
            .filter(|(_, t)| now.duration_since(**t) >= RECONNECT_GRACE)
            .map(|(k, _)| *k)
            .collect();
        for (id, attempt) in overdue {
            let why = format!(
                "its worker did not come back within {} ms of the failover",
                RECONNECT_GRACE.as_millis()
            );
            if let Err(e) = self.lose(id, attempt, None, &why) {
                self.failed(&e);
                return;
            }
        }
        if let Some(shared) = &self.opts.shared
            && now >= self.next_beat
        {
            self.next_beat = now + shared.lease / 4;
            self.heartbeat();
        }
        if self.next_due.is_some_and(|t| t <= now) {
            self.next_due = None;
            self.dirty = true;
        }
        if now >= self.next_prune {
            self.next_prune = now + PRUNE_EVERY;
            self.prune();
        }
        if now >= self.next_cpu && self.any_running() {
            self.next_cpu = now + CPU_EVERY;
            self.sample_cpu(now);
        }
    }

    fn any_running(&self) -> bool {
        self.workers.values().any(|w| !w.running.is_empty())
    }

    /// Each worker's tasks' CPU since the last sample (a worker running nothing uses none).
    fn sample_cpu(&mut self, now: Instant) {
        for (id, w) in self.workers.iter_mut() {
            if w.running.is_empty() {
                w.cpu_sample = None;
                w.cpu_permille = 0;
                continue;
            }
            let pids: Vec<i32> = w.running.values().copied().collect();
            let counters = crate::tasks::cpu::usage(&self.dir_tag, *id, w.pid, &pids);
            if let Some((at, before)) = &w.cpu_sample {
                w.cpu_permille = scheduler::cpu_permille(before, &counters, now - *at);
            }
            w.cpu_sample = Some((now, counters));
        }
    }

    fn prune(&mut self) {
        let Some(store) = self.store.as_mut() else {
            return;
        };
        let cutoff = unix_ms_now().saturating_sub(self.opts.retention_ms);
        match store.prune(self.opts.retention_count, cutoff) {
            Ok(ids) => {
                for id in &ids {
                    let _ = std::fs::remove_file(view::log_path(&self.opts.state_dir, *id));
                }
                if !ids.is_empty() {
                    log::info!("pruned {} finished tasks", ids.len());
                }
            }
            Err(e) => self.failed(&e),
        }
    }

    /// Hands runnable tasks to free workers, least loaded first, until one of them runs
    /// out: no task left, or no free worker that can run one.
    fn dispatch(&mut self) {
        let now_ms = unix_ms_now();
        // Asked once: after a claim, the next one finds out by itself (a query saved per
        // task; at the end of a burst each free worker's claim comes back empty once).
        let mut known_runnable = false;
        for _ in 0..100_000 {
            let order = scheduler::offer_order(&self.loads());
            if order.is_empty() {
                break;
            }
            let Some(store) = self.store.as_mut() else {
                return;
            };
            if !known_runnable {
                match store.any_runnable(now_ms) {
                    Ok(true) => known_runnable = true,
                    Ok(false) => break,
                    Err(e) => return self.failed(&e),
                }
            }
            let mut given = None;
            for w in order {
                let worker = &self.workers[&w];
                let Some(store) = self.store.as_mut() else {
                    return;
                };
                match store.claim(w, worker.pid, &worker.capabilities, now_ms) {
                    Ok(Some((row, attempt))) => {
                        given = Some((w, row, attempt));
                        break;
                    }
                    Ok(None) => {}
                    Err(e) => return self.failed(&e),
                }
            }
            let Some((w, row, attempt)) = given else {
                break;
            };
            let msg = FromQueue::Run {
                id: row.id,
                attempt,
                argv: row.argv.clone(),
                spec: row.spec.clone(),
                cwd: row.cwd.clone(),
                timeout_ms: row.timeout_ms,
                log: view::log_path(&self.opts.state_dir, row.id),
            };
            if let Some(worker) = self.workers.get_mut(&w) {
                worker.running.insert((row.id, attempt), 0);
                worker.given += 1;
            }
            self.acks
                .insert((row.id, attempt), Instant::now() + self.opts.ack_timeout);
            self.tell_worker(w, &msg);
        }
        if let Some(store) = self.store.as_mut() {
            match store.next_due_ms(now_ms) {
                Ok(Some(ms)) => {
                    self.next_due = Some(Instant::now() + Duration::from_millis(ms - now_ms))
                }
                Ok(None) => self.next_due = None,
                Err(e) => self.failed(&e),
            }
        }
    }

    fn loads(&self) -> Vec<Load> {
        self.workers
            .iter()
            .map(|(id, w)| Load {
                worker: *id,
                running: w.running.len() as u32,
                concurrency: w.concurrency,
                given: w.given,
                cpu_permille: w.cpu_permille,
                draining: w.draining,
            })
            .collect()
    }

    // ---- connections ----

    fn accept(&mut self) {
        for _ in 0..256 {
            let (mut stream, _) = match self.listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!("tasks.sock: accept failed: {e}");
                    return;
                }
            };
            let Ok(creds) = socket::getsockopt(&stream, sockopt::PeerCredentials) else {
                continue;
            };
            if creds.uid() != self.uid {
                log::warn!(
                    "tasks.sock: refused a connection from uid {} (pid {})",
                    creds.uid(),
                    creds.pid()
                );
                continue;
            }
            let token = Token(self.next_token);
            self.next_token += 1;
            if self
                .poll
                .registry()
                .register(&mut stream, token, Interest::READABLE)
                .is_err()
            {
                continue;
            }
            self.conns.insert(
                token,
                Conn {
                    stream,
                    peer_pid: creds.pid(),
                    inbuf: Vec::new(),
                    out: Vec::new(),
                    worker: None,
                    waiting: None,
                    close_when_flushed: false,
                    writable: false,
                },
            );
        }
    }

    fn read(&mut self, token: Token) {
        let mut lines = Vec::new();
        let mut closed;
        {
            let Some(conn) = self.conns.get_mut(&token) else {
                return;
            };
            closed = wire::read_available(&mut conn.stream, &mut conn.inbuf, 1024);
            match wire::take_lines(&mut conn.inbuf) {
                Ok(l) => lines = l,
                Err(e) => {
                    log::warn!("tasks.sock: pid {}: {e}; closing", conn.peer_pid);
                    closed = true;
                }
            }
        }
        for line in lines {
            match serde_json::from_slice::<ToQueue>(&line) {
                Ok(msg) => self.handle(token, msg),
                Err(e) => {
                    let pid = self.conns.get(&token).map_or(0, |c| c.peer_pid);
                    log::warn!("tasks.sock: garbage from pid {pid}: {e}");
                    self.reply(
                        token,
                        &FromQueue::Error {
                            message: format!("not a request: {e}"),
                        },
                    );
                }
            }
        }
        if closed {
            self.close(token);
        }
    }

    fn close(&mut self, token: Token) {
        let Some(mut conn) = self.conns.remove(&token) else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut conn.stream);
        let big = conn.out.capacity() + conn.inbuf.capacity() > 256 * 1024;
        drop(std::mem::take(&mut conn.out));
        drop(std::mem::take(&mut conn.inbuf));
        if big {
            crate::daemon::trim_heap();
        }
        if let Some(w) = conn.worker
            && self.workers.get(&w).is_some_and(|x| x.token == token)
        {
            self.worker_gone(w);
        }
    }

    /// A worker's connection ended: it died (or was killed for hanging), or is exiting.
    fn worker_gone(&mut self, id: u32) {
        let Some(w) = self.workers.remove(&id) else {
            return;
        };
        let why = format!("its worker workflow-{id} (pid {}) died", w.pid);
        for (id_attempt, _) in w.running {
            if let Err(e) = self.lose(id_attempt.0, id_attempt.1, Some(id), &why) {
                self.failed(&e);
                break;
            }
        }
        self.dirty = true;
    }

    fn send(&mut self, token: Token, msg: &FromQueue) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        let line = wire::encode(msg);
        let big = line.len() > 256 * 1024;
        conn.out.extend_from_slice(&line);
        drop(line);
        self.flush(token);
        if big {
            // A page of a thousand tasks is freed once sent: give its pages back.
            crate::daemon::trim_heap();
        }
    }

    /// A CLI's answer: sent, then the connection closed.
    fn reply(&mut self, token: Token, msg: &FromQueue) {
        if let Some(c) = self.conns.get_mut(&token)
            && c.worker.is_none()
        {
            c.close_when_flushed = true;
        }
        self.send(token, msg);
    }

    fn tell_worker(&mut self, worker: u32, msg: &FromQueue) {
        if let Some(t) = self.workers.get(&worker).map(|w| w.token) {
            self.send(t, msg);
        }
    }

    fn flush(&mut self, token: Token) {
        let mut close = false;
        if let Some(conn) = self.conns.get_mut(&token) {
            close = wire::write_pending(&mut conn.stream, &mut conn.out);
            let want = !conn.out.is_empty();
            if want != conn.writable {
                conn.writable = want;
                let interest = if want {
                    Interest::READABLE | Interest::WRITABLE
                } else {
                    Interest::READABLE
                };
                let _ = self
                    .poll
                    .registry()
                    .reregister(&mut conn.stream, token, interest);
            }
            if conn.out.is_empty() && conn.close_when_flushed {
                close = true;
            }
        }
        if close {
            self.close(token);
        }
    }

    // ---- requests ----

    fn handle(&mut self, token: Token, msg: ToQueue) {
        match msg {
            ToQueue::Hello {
                worker,
                pid,
                capabilities,
                concurrency,
                running,
                ended,
            } => self.hello(
                token,
                worker,
                pid,
                capabilities,
                concurrency,
                running,
                ended,
            ),
            ToQueue::Started { id, attempt, pid } => self.started(token, id, attempt, pid),
            ToQueue::Ended(o) => self.ended(token, o),
            ToQueue::Draining {} => {
                if let Some(w) = self.conns.get(&token).and_then(|c| c.worker)
                    && let Some(w) = self.workers.get_mut(&w)
                {
                    w.draining = true;
                }
            }
            other => {
                let had_store = self.store.is_some();
                let mut answer = self.answer(token, other);
                // The database failed under this request: say so as every later one will.
                if had_store
                    && self.store.is_none()
                    && let Some(FromQueue::Error { message }) = answer.as_mut()
                {
                    *message = format!(
                        "the task queue is unavailable: {}",
                        self.db_error.as_deref().unwrap_or("the database failed")
                    );
                }
                if let Some(a) = answer {
                    self.reply(token, &a);
                }
                // A durable request committed on its own: the rest of the turn batches again.
                if !self.in_batch {
                    self.batch_begin();
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn hello(
        &mut self,
        token: Token,
        worker: u32,
        pid: i32,
        capabilities: Vec<String>,
        concurrency: u32,
        running: Vec<Held>,
        ended: Vec<Outcome>,
    ) {
        let peer = self.conns.get(&token).map_or(0, |c| c.peer_pid);
        if peer != pid || worker == 0 {
            log::warn!("tasks.sock: pid {peer} claims to be worker {worker} pid {pid}: refused");
            self.reply(
                token,
                &FromQueue::Error {
                    message: "refused: the hello's pid is not the sender's".into(),
                },
            );
            return;
        }
        if self.workers.contains_key(&worker) {
            // Its old connection has not ended yet: the old process is gone or going.
            self.worker_gone(worker);
        }
        if let Some(c) = self.conns.get_mut(&token) {
            c.worker = Some(worker);
        }
        let mut w = Worker {
            token,
            pid,
            capabilities,
            concurrency: concurrency.clamp(1, crate::tasks::settings::MAX_CONCURRENCY),
            running: BTreeMap::new(),
            given: 0,
            draining: false,
            cpu_sample: None,
            cpu_permille: 0,
        };
        for h in &running {
            w.running.insert((h.id, h.attempt), h.pid);
            self.unowned.remove(&(h.id, h.attempt));
        }
        self.workers.insert(worker, w);
        log::info!(
            "worker workflow-{worker} (pid {pid}) connected, running {}",
            running.len()
        );
        for o in ended {
            self.ended(token, o);
        }
        // What the store says it runs, and what it says it runs, must agree.
        let Some(store) = self.store.as_mut() else {
            return;
        };
        let rows = match store.running() {
            Ok(r) => r,
            Err(e) => return self.failed(&e),
        };
        for (id, attempt, owner, _, _) in &rows {
            if *owner == worker
                && !running.iter().any(|h| h.id == *id && h.attempt == *attempt)
                && let Err(e) = self.lose(*id, *attempt, Some(worker), "its worker restarted")
            {
                return self.failed(&e);
            }
        }
        for h in running {
            let current = rows
                .iter()
                .any(|(id, a, owner, _, _)| *id == h.id && *a == h.attempt && *owner == worker);
            if !current {
                log::info!(
                    "task {} attempt {} on workflow-{worker} is no longer current: killing it",
                    h.id,
                    h.attempt
                );
                self.tell_worker(
                    worker,
                    &FromQueue::Kill {
                        id: h.id,
                        attempt: h.attempt,
                        why: "superseded".into(),
                    },
                );
            } else if h.pid == 0 {
                // Its start is still to be confirmed.
                self.acks
                    .insert((h.id, h.attempt), Instant::now() + self.opts.ack_timeout);
            }
        }
        self.dirty = true;
    }

    /// The acknowledgement. Kept in memory only (a database write per task saved): the
    /// pid is for `task status`, and after a failover the workers say it again. An
    /// attempt no longer awaited (lost at its deadline, or unknown) is killed.
    fn started(&mut self, token: Token, id: i64, attempt: u32, pid: i32) {
        let Some(worker) = self.conns.get(&token).and_then(|c| c.worker) else {
            return;
        };
        if self.acks.remove(&(id, attempt)).is_none() {
            log::info!(
                "task {id} attempt {attempt} started on workflow-{worker} after it was superseded: killing it"
            );
            self.tell_worker(
                worker,
                &FromQueue::Kill {
                    id,
                    attempt,
                    why: "superseded".into(),
                },
            );
            return;
        }
        if let Some(w) = self.workers.get_mut(&worker)
            && let Some(p) = w.running.get_mut(&(id, attempt))
        {
            *p = pid;
        }
        self.ledger.append(&Event {
            task: Some(id),
            attempt: Some(attempt),
            workflow: Some(worker),
            pid: Some(pid),
            ..Event::new("task_started")
        });
    }

    /// Kills an attempt this host runs: through its worker, or directly if its worker is
    /// gone; it is no longer awaited.
    fn kill_here(&mut self, id: i64, attempt: u32, why: &str) {
        self.acks.remove(&(id, attempt));
        self.unowned.remove(&(id, attempt));
        let worker = self
            .workers
            .iter()
            .find(|(_, w)| w.running.contains_key(&(id, attempt)))
            .map(|(n, _)| *n);
        match worker {
            Some(w) => self.tell_worker(
                w,
                &FromQueue::Kill {
                    id,
                    attempt,
                    why: why.into(),
                },
            ),
            None => {
                kill_attempt(&self.opts.state_dir, id, attempt);
            }
        }
    }

    /// This host's name in a shared queue.
    fn host(&self) -> Option<&str> {
        self.opts.shared.as_ref().map(|s| s.host.as_str())
    }

    /// What the other hosts said (a shared queue).
    fn on_notes(&mut self) {
        let Some(rx) = self.notes.as_ref() else {
            return;
        };
        let notes: Vec<Note> = rx.try_iter().take(100_000).collect();
        let mut recheck = false;
        for n in notes {
            match n {
                Note::Ready => self.dirty = true,
                Note::Done(id) => self.notify_waiters(Some(id)),
                Note::Kill { id, attempt, host } => {
                    if self.host() == Some(host.as_str()) {
                        log::info!(
                            "task {id} attempt {attempt} was cancelled on another host: killing it"
                        );
                        self.kill_here(id, attempt, "cancelled");
                    }
                }
                Note::Listening => {
                    self.dirty = true;
                    recheck = true;
                }
            }
        }
        if recheck {
            self.recheck_waiters();
        }
    }

    /// The listener (re)connected and may have missed a `done`: each waiter's tasks are
    /// looked at again.
    fn recheck_waiters(&mut self) {
        let Some(store) = self.store.as_mut() else {
            return;
        };
        for c in self.conns.values_mut() {
            if let Some((_, remaining)) = c.waiting.as_mut() {
                remaining.retain(|id| store.get(*id).is_ok_and(|t| !t.state.is_final()));
            }
        }
        self.notify_waiters(None);
    }

    /// Renews this host's lease in a shared queue, and takes back the tasks of the hosts
    /// whose lease ran out.
    fn heartbeat(&mut self) {
        let retry = self.retry_rule();
        let Some(store) = self.store.as_mut() else {
            return;
        };
        let beat = match store.heartbeat(unix_ms_now(), &retry) {
            Ok(b) => b,
            Err(e) => return self.failed(&e),
        };
        if beat.superseded {
            log::warn!(
                "this host's lease had expired and the other hosts took back its tasks: killing what it still runs"
            );
            let held: Vec<(i64, u32)> = self
                .workers
                .values()
                .flat_map(|w| w.running.keys().copied())
                .chain(self.unowned.keys().copied())
                .collect();
            for (id, attempt) in held {
                self.kill_here(id, attempt, "superseded: this host's lease expired");
            }
        }
        for (id, attempt, host, state) in beat.requeued {
            let why = format!("its host {host} stopped renewing its lease");
            log::info!(
                "task {id} attempt {attempt} lost: {why}; now {}",
                state.as_str()
            );
            self.record_end(id, attempt, None, state, None, Some(&why));
            self.dirty = true;
        }
    }

    /// The pid of a running attempt, as its worker said.
    fn live_pid(&self, id: i64, attempt: u32) -> Option<i32> {
        self.workers
            .values()
            .find_map(|w| w.running.get(&(id, attempt)))
            .copied()
            .filter(|p| *p > 0)
    }

    fn ended(&mut self, token: Token, o: Outcome) {
        let worker = self.conns.get(&token).and_then(|c| c.worker);
        if let Some(w) = worker.and_then(|w| self.workers.get_mut(&w)) {
            w.running.remove(&(o.id, o.attempt));
        }
        self.acks.remove(&(o.id, o.attempt));
        self.dirty = true;
        let retry = self.retry_rule();
        let Some(store) = self.store.as_mut() else {
            log::warn!(
                "task {} attempt {} ended but the queue is unavailable: it will run again",
                o.id,
                o.attempt
            );
            return;
        };
        let ending = match (o.exit_code, &o.error) {
            (_, Some(e)) => Ending::Failed(e.clone()),
            (Some(c), None) => Ending::Exited(c),
            (None, None) => Ending::Failed("ended without an exit status".into()),
        };
        match store.finish(
            o.id,
            o.attempt,
            ending,
            o.result.as_deref(),
            unix_ms_now(),
            &retry,
        ) {
            Ok(state) => {
                let err = if o.error.is_some() {
                    o.error.clone()
                } else {
                    o.exit_code
                        .filter(|c| *c != 0)
                        .map(|c| format!("exited with status {c}"))
                };
                self.record_end(o.id, o.attempt, worker, state, o.exit_code, err.as_deref());
            }
            Err(StoreError::Refused(r)) => {
                // A cancelled task's run, or a superseded attempt's: the first outcome stands.
                log::info!(
                    "task {} attempt {}: a late result, ignored ({r})",
                    o.id,
                    o.attempt
                );
            }
            Err(StoreError::NoSuchTask(_)) => {}
            Err(e) => self.failed(&e),
        }
    }

    /// A CLI's request: the answer now, or None when it is answered later (`wait`).
    fn answer(&mut self, token: Token, msg: ToQueue) -> Option<FromQueue> {
        let err = |message: String| Some(FromQueue::Error { message });
        if self.store.is_none() && !self.wanted && !matches!(msg, ToQueue::Overview { .. }) {
            self.wanted = true;
            self.open_store();
        }
        if self.store.is_none() {
            let why = self
                .db_error
                .clone()
                .unwrap_or_else(|| "not open yet".into());
            if !matches!(msg, ToQueue::Overview { .. }) {
                return err(format!("the task queue is unavailable: {why}"));
            }
        }
        let now_ms = unix_ms_now();
        match msg {
            ToQueue::Submit(s) => {
                if s.spec.len() > wire::SPEC_MAX {
                    return err(format!(
                        "the task's JSON is {} bytes; at most {} reach its stdin",
                        s.spec.len(),
                        wire::SPEC_MAX
                    ));
                }
                let t = s;
                let r = self.durably(|store| store.submit(&t, now_ms))?;
                match r {
                    Ok(id) => {
                        self.ledger.append(&Event {
                            task: Some(id),
                            detail: Some(serde_json::to_string(&t.argv).unwrap_or_default()),
                            ..Event::new("task_submitted")
                        });
                        self.dirty = true;
                        Some(FromQueue::Submitted { id })
                    }
                    Err(e) => {
                        self.failed(&e);
                        err(e.to_string())
                    }
                }
            }
            ToQueue::Status { id } => match self.task_json(id) {
                Ok(task) => Some(FromQueue::Task { task }),
                Err(e) => {
                    self.failed(&e);
                    err(e.to_string())
                }
            },
            ToQueue::List {
                state,
                after,
                limit,
            } => {
                let state = match state.as_deref().map(|s| (s, TaskState::parse(s))) {
                    None => None,
                    Some((_, Some(s))) => Some(s),
                    Some((s, None)) => {
                        return err(format!(
                            "unknown state {s:?} (queued, running, retrying, succeeded, failed, cancelled)"
                        ));
                    }
                };
                let limit = limit.clamp(1, MAX_PAGE);
                let store = self.store.as_mut()?;
                match store.list(state, after, limit) {
                    Ok(rows) => {
                        let next = (rows.len() as u32 == limit).then(|| rows[rows.len() - 1].id);
                        let mut tasks = Vec::with_capacity(rows.len());
                        for mut r in rows {
                            if r.state == TaskState::Running {
                                r.pid = self.live_pid(r.id, r.attempts);
                            }
                            let waiting = self.reason(&r, now_ms);
                            tasks.push(view::task_json(
                                &r,
                                &[],
                                waiting,
                                &view::log_path(&self.opts.state_dir, r.id),
                            ));
                        }
                        Some(FromQueue::Tasks { tasks, next })
                    }
                    Err(e) => {
                        self.failed(&e);
                        err(e.to_string())
                    }
                }
            }
            ToQueue::Cancel { id } => {
                let before = self.store.as_mut()?.get(id).ok();
                let r = self.durably(|store| store.cancel(id, now_ms))?;
                let attempt = before.as_ref().map_or(0, |t| t.attempts);
                // Running on another host (a shared queue): killed there, on its note.
                let elsewhere = before
                    .filter(|t| t.state == TaskState::Running)
                    .and_then(|t| t.host.zip(t.worker))
                    .filter(|(h, _)| Some(h.as_str()) != self.host());
                match r {
                    Ok(worker) => {
                        let message = match (worker, elsewhere) {
                            (Some(w), _) => {
                                self.kill_here(id, attempt, "cancelled");
                                format!(
                                    "task {id} cancelled; its program on workflow-{w} is killed"
                                )
                            }
                            (None, Some((h, w))) => format!(
                                "task {id} cancelled; its program on workflow-{w} of host {h} is killed there"
                            ),
                            (None, None) => format!("task {id} cancelled"),
                        };
                        self.record_end(id, attempt, worker, TaskState::Cancelled, None, None);
                        self.dirty = true;
                        Some(FromQueue::Done { message })
                    }
                    Err(e) => {
                        self.failed(&e);
                        err(e.to_string())
                    }
                }
            }
            ToQueue::Retry { id } => {
                let r = self.durably(|store| store.retry(id, now_ms))?;
                match r {
                    Ok(()) => {
                        self.ledger.append(&Event {
                            task: Some(id),
                            detail: Some("retried by hand".into()),
                            ..Event::new("task_retry")
                        });
                        self.dirty = true;
                        Some(FromQueue::Done {
                            message: format!("task {id} queued again"),
                        })
                    }
                    Err(e) => {
                        self.failed(&e);
                        err(e.to_string())
                    }
                }
            }
            ToQueue::Wait { ids } => {
                let store = self.store.as_mut()?;
                for id in &ids {
                    if let Err(e) = store.get(*id) {
                        return err(e.to_string());
                    }
                }
                let mut remaining = std::collections::BTreeSet::new();
                for id in &ids {
                    if store.get(*id).is_ok_and(|t| !t.state.is_final()) {
                        remaining.insert(*id);
                    }
                }
                if let Some(c) = self.conns.get_mut(&token) {
                    c.waiting = Some((ids, remaining));
                }
                self.notify_waiters(None);
                None
            }
            ToQueue::Overview { durations } => Some(FromQueue::Overview {
                overview: self.overview(durations),
            }),
            ToQueue::Hello { .. }
            | ToQueue::Started { .. }
            | ToQueue::Ended(_)
            | ToQueue::Draining {} => None,
        }
    }

    fn reason(&mut self, r: &crate::tasks::store::TaskRow, now_ms: u64) -> Option<String> {
        let store = self.store.as_mut()?;
        let after = r.after.map(|a| (a, store.get(a).ok().map(|p| p.state)));
        let workers: Vec<(&[String], bool)> = self
            .workers
            .values()
            .map(|w| {
                (
                    w.capabilities.as_slice(),
                    !w.draining && (w.running.len() as u32) < w.concurrency,
                )
            })
            .collect();
        let why = scheduler::waiting_reason(
            &Waiting {
                state: r.state,
                required: &r.required,
                not_before_ms: r.not_before_ms,
                after,
            },
            now_ms,
            &workers,
        );
        // This host sees only its own workers.
        match (why, self.opts.shared.is_some()) {
            (Some(w), true) if w.contains("worker") => Some(format!(
                "{w}, on this host (another host sharing the queue may take it)"
            )),
            (why, _) => why,
        }
    }

    fn task_json(&mut self, id: i64) -> Result<serde_json::Value, StoreError> {
        let store = self
            .store
            .as_mut()
            .ok_or_else(|| StoreError::Db("not open".into()))?;
        let mut row = store.get(id)?;
        let history = store.attempts(id)?;
        if row.state == TaskState::Running {
            row.pid = self.live_pid(id, row.attempts);
        }
        Ok(view::task_json(
            &row,
            &history,
            self.reason(&row, unix_ms_now()),
            &view::log_path(&self.opts.state_dir, id),
        ))
    }

    /// `durations`: also the wait and run histograms, a scan of every attempt kept (for
    /// `metrics`; `status` does without).
    fn overview(&mut self, durations: bool) -> serde_json::Value {
        let counts = match self.store.as_mut().map(|s| s.counts()) {
            Some(Ok(c)) => Some(
                c.into_iter()
                    .map(|(s, n)| (s.as_str().to_string(), json!(n)))
                    .collect::<serde_json::Map<_, _>>(),
            ),
            Some(Err(e)) => {
                self.failed(&e);
                None
            }
            None => None,
        };
        let workers: Vec<serde_json::Value> = self
            .workers
            .iter()
            .map(|(id, w)| {
                json!({
                    "worker": format!("workflow-{id}"),
                    "pid": w.pid,
                    "running": w.running.len(),
                    "concurrency": w.concurrency,
                    "capabilities": w.capabilities,
                    "draining": w.draining,
                    "cpu_percent": f64::from(w.cpu_permille) / 10.0,
                    "tasks": w.running.keys().map(|(t, _)| *t).collect::<Vec<_>>(),
                })
            })
            .collect();
        let counts = counts.or_else(|| {
            (!self.wanted).then(|| {
                TaskState::ALL
                    .iter()
                    .map(|s| (s.as_str().to_string(), json!(0)))
                    .collect()
            })
        });
        let (wait, run) = match self
            .store
            .as_mut()
            .filter(|_| durations)
            .map(|s| s.durations())
        {
            Some(Ok((w, r))) => (Some(histogram(&w)), Some(histogram(&r))),
            // No queue yet: empty histograms, so a scraper sees the series from the start.
            None if durations && !self.wanted => (Some(histogram(&[])), Some(histogram(&[]))),
            _ => (None, None),
        };
        json!({
            "wait_seconds": wait,
            "run_seconds": run,
            "available": self.store.is_some() || !self.wanted,
            "error": self.db_error,
            "state_dir": self.opts.state_dir,
            "counts": counts,
            "workers": workers,
        })
    }

    /// Answers every `task wait` whose tasks are all finished, `ended` being the one that
    /// just finished: each waiter keeps what it still waits for, so a wait for thousands
    /// of tasks costs one set removal per task, not a look at each of them.
    fn notify_waiters(&mut self, ended: Option<i64>) {
        let mut done = Vec::new();
        for (token, c) in self.conns.iter_mut() {
            let Some((ids, remaining)) = c.waiting.as_mut() else {
                continue;
            };
            if let Some(id) = ended {
                remaining.remove(&id);
            }
            if remaining.is_empty() {
                done.push((*token, std::mem::take(ids)));
                c.waiting = None;
            }
        }
        for (token, ids) in done {
            let Some(store) = self.store.as_mut() else {
                return;
            };
            // Pruned meanwhile: nothing more happens to it, and there is nothing to show.
            // Only what `wait` prints: a wait for 10,000 tasks stays a small answer.
            let tasks = ids
                .iter()
                .filter_map(|id| store.get(*id).ok())
                .map(|t| {
                    json!({
                        "id": t.id,
                        "state": t.state.as_str(),
                        "exit_code": t.exit_code,
                        "error": t.error,
                    })
                })
                .collect();
            self.reply(token, &FromQueue::Finished { tasks });
        }
    }
}

/// Prometheus histogram buckets (upper bounds in seconds).
pub const BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 300.0, 3600.0,
];

/// Cumulative counts per bucket, the sum and the count, as the metrics print them.
pub fn histogram(xs: &[f64]) -> serde_json::Value {
    let counts: Vec<u64> = BUCKETS
        .iter()
        .map(|le| xs.iter().filter(|x| **x <= *le).count() as u64)
        .collect();
    json!({
        "le": BUCKETS,
        "counts": counts,
        "sum": xs.iter().sum::<f64>(),
        "count": xs.len(),
    })
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(pid, 0) == 0 || *libc::__errno_location() == libc::EPERM }
}

/// Kills every process of one attempt of one task of this queue, found by the variables
/// every task's process inherits: its program and whatever it started, also what left its
/// process group. Run only when an attempt is lost, so a scan of /proc is affordable.
pub fn kill_attempt(state_dir: &Path, id: i64, attempt: u32) -> usize {
    kill_marked(&[
        format!("NEXUS_TASK_ID={id}"),
        format!("NEXUS_TASK_ATTEMPT={attempt}"),
        format!("NEXUS_TASK_QUEUE={}", state_dir.display()),
    ])
}

/// Every process of every task of this queue (`stop`: nothing is left running).
pub fn kill_all_tasks(state_dir: &Path) -> usize {
    kill_marked(&[format!("NEXUS_TASK_QUEUE={}", state_dir.display())])
}

fn kill_marked(marks: &[String]) -> usize {
    let mut killed = 0;
    for pid in crate::procscan::pids() {
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let has = |m: &str| env.split(|&b| b == 0).any(|v| v == m.as_bytes());
        if marks.iter().all(|m| has(m)) {
            // SAFETY: a plain kill of a pid we just identified as one of the queue's.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            killed += 1;
        }
    }
    killed
}
