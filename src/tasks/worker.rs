//! A free workflow as a task worker: one connection to the queue (`tasks.sock`), and up
//! to `concurrency` running tasks, each its own process group and, where one is
//! writable, its own cgroup (`cgroups`), with a pidfd, its stdout and stderr read into
//! its log (bounded) and stdout's first `RESULT_MAX` bytes kept as its result. The
//! workflow's loop polls all of it (tokens from `TOKEN_BASE` up).
//!
//! The queue may go away (a failover): the tasks keep running, what ends meanwhile is
//! kept, and both are told to the next queue in the hello.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mio::net::UnixStream;
use mio::unix::SourceFd;
use mio::{Interest, Poll, Token};

use crate::child::{self, Ended, Program, Stdio};
use crate::ledger::rfc3339_now;
use crate::services::tree::Cgroup;
use crate::tasks::cgroups::TaskCgroups;
use crate::tasks::wire::{self, FromQueue, Held, LOG_MAX, Outcome, RESULT_MAX, ToQueue};

/// Far above the hosting code's tokens, which only count up from a few.
pub const TOKEN_BASE: usize = 1 << 40;
const LINK: Token = Token(TOKEN_BASE);
const RECONNECT_MIN: Duration = Duration::from_millis(50);
const RECONNECT_MAX: Duration = Duration::from_secs(1);

struct Link {
    stream: UnixStream,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    writable: bool,
}

struct Running {
    id: i64,
    attempt: u32,
    pid: i32,
    pidfd: OwnedFd,
    stdout: Option<File>,
    stderr: Option<File>,
    log: TaskLog,
    result: Vec<u8>,
    deadline: Option<Instant>,
    timeout_ms: Option<u64>,
    /// Why we killed it, if we did: that is its error.
    killed: Option<String>,
    /// Its tree's, where there is one: what escaped its process group is killed there.
    cgroup: Option<Cgroup>,
}

impl Running {
    /// SIGKILL to its whole tree: the cgroup where there is one, and the process group.
    fn kill_tree(&self) {
        if let Some(cg) = &self.cgroup {
            cg.kill();
        }
        kill_group(self.pid, libc::SIGKILL);
    }
}

pub struct TaskWorker {
    socket: PathBuf,
    queue_mark: String,
    id: u32,
    pid: i32,
    capabilities: Vec<String>,
    concurrency: u32,
    base_env: Vec<String>,
    link: Option<Link>,
    reconnect_at: Option<Instant>,
    reconnect_delay: Duration,
    tasks: BTreeMap<usize, Running>,
    next_slot: usize,
    /// Outcomes not yet told to a queue.
    unsent: Vec<Outcome>,
    draining: bool,
    cgroups: TaskCgroups,
}

fn slot_token(slot: usize, k: usize) -> Token {
    Token(TOKEN_BASE + 1 + slot * 3 + k)
}

impl TaskWorker {
    pub fn new(ctx: &crate::daemon::DaemonCtx, poll: &Poll) -> TaskWorker {
        let (capabilities, concurrency) =
            crate::tasks::settings::worker_of(&ctx.config.workers, ctx.slot.id);
        let state_dir = ctx
            .config
            .state_dir
            .clone()
            .unwrap_or_else(|| crate::tasks::settings::default_state_dir(ctx.dir.path()));
        let queue_mark = format!("NEXUS_TASK_QUEUE={}", state_dir.display());
        let base_env = std::env::vars()
            .filter(|(k, _)| !k.starts_with("NEXUS_TASK_"))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let tag = crate::services::state::dir_tag(&ctx.dir);
        let cgroups = TaskCgroups::new(&tag, ctx.slot.id, ctx.pid);
        match cgroups.described() {
            Some(d) => log::info!("tasks run in cgroups of their own: {d}"),
            None => log::info!("no writable cgroup v2: tasks run in process groups only"),
        }
        let mut w = TaskWorker {
            socket: ctx.dir.tasks_socket(),
            queue_mark,
            id: ctx.slot.id,
            pid: ctx.pid,
            capabilities,
            concurrency,
            base_env,
            link: None,
            reconnect_at: None,
            reconnect_delay: RECONNECT_MIN,
            tasks: BTreeMap::new(),
            next_slot: 0,
            unsent: Vec::new(),
            draining: false,
            cgroups,
        };
        w.connect(poll);
        w
    }

    pub fn owns(token: Token) -> bool {
        token.0 >= TOKEN_BASE
    }

    pub fn idle(&self) -> bool {
        self.tasks.is_empty()
    }

    pub fn deadline(&self) -> Option<Instant> {
        let tasks = self.tasks.values().filter_map(|t| t.deadline);
        tasks
            .chain(self.reconnect_at)
            .chain(self.cgroups.deadline())
            .min()
    }

    fn connect(&mut self, poll: &Poll) {
        self.reconnect_at = None;
        match UnixStream::connect(&self.socket) {
            Ok(mut stream) => {
                if poll
                    .registry()
                    .register(&mut stream, LINK, Interest::READABLE)
                    .is_err()
                {
                    return self.retry_later();
                }
                self.link = Some(Link {
                    stream,
                    inbuf: Vec::new(),
                    out: Vec::new(),
                    writable: false,
                });
                self.reconnect_delay = RECONNECT_MIN;
                let hello = ToQueue::Hello {
                    worker: self.id,
                    pid: self.pid,
                    capabilities: self.capabilities.clone(),
                    concurrency: self.concurrency,
                    running: self
                        .tasks
                        .values()
                        .map(|t| Held {
                            id: t.id,
                            attempt: t.attempt,
                            pid: t.pid,
                        })
                        .collect(),
                    ended: std::mem::take(&mut self.unsent),
                };
                self.send(poll, &hello);
                if self.draining {
                    self.send(poll, &ToQueue::Draining {});
                }
            }
            Err(_) => self.retry_later(),
        }
    }

    fn retry_later(&mut self) {
        self.reconnect_at = Some(Instant::now() + self.reconnect_delay);
        self.reconnect_delay = (self.reconnect_delay * 2).min(RECONNECT_MAX);
    }

    fn drop_link(&mut self, poll: &Poll) {
        if let Some(mut l) = self.link.take() {
            let _ = poll.registry().deregister(&mut l.stream);
            log::info!("lost the task queue's connection; reconnecting");
        }
        self.reconnect_delay = RECONNECT_MIN;
        self.retry_later();
    }

    fn send(&mut self, poll: &Poll, msg: &ToQueue) {
        let Some(l) = self.link.as_mut() else {
            if let ToQueue::Ended(o) = msg {
                self.unsent.push(o.clone());
            }
            return;
        };
        l.out.extend_from_slice(&wire::encode(msg));
        self.flush(poll);
    }

    fn flush(&mut self, poll: &Poll) {
        let Some(l) = self.link.as_mut() else {
            return;
        };
        if wire::write_pending(&mut l.stream, &mut l.out) {
            return self.drop_link(poll);
        }
        let want = !l.out.is_empty();
        if want != l.writable {
            l.writable = want;
            let i = if want {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            let _ = poll.registry().reregister(&mut l.stream, LINK, i);
        }
    }

    /// Timers: reconnecting, tasks past their timeout, killed cgroups to make again.
    pub fn tick(&mut self, poll: &Poll) {
        let now = Instant::now();
        if self.reconnect_at.is_some_and(|t| t <= now) {
            self.connect(poll);
        }
        self.cgroups.tick();
        for t in self.tasks.values_mut() {
            if t.deadline.is_some_and(|d| d <= now) {
                t.deadline = None;
                t.killed = Some(format!(
                    "timed out after {} ms: killed with its {}",
                    t.timeout_ms.unwrap_or(0),
                    if t.cgroup.is_some() {
                        "cgroup"
                    } else {
                        "process group"
                    }
                ));
                t.kill_tree();
            }
        }
    }

    pub fn on_event(&mut self, poll: &Poll, token: Token) {
        if token == LINK {
            self.read_link(poll);
            self.flush(poll);
            return;
        }
        let slot = (token.0 - TOKEN_BASE - 1) / 3;
        let k = (token.0 - TOKEN_BASE - 1) % 3;
        match k {
            0 => self.on_exit(poll, slot),
            _ => {
                if let Some(t) = self.tasks.get_mut(&slot) {
                    pump(t, k == 1, poll);
                }
            }
        }
    }

    fn read_link(&mut self, poll: &Poll) {
        let mut closed = false;
        let mut lines = Vec::new();
        if let Some(l) = self.link.as_mut() {
            closed = wire::read_available(&mut l.stream, &mut l.inbuf, 256);
            match wire::take_lines(&mut l.inbuf) {
                Ok(v) => lines = v,
                Err(e) => {
                    log::warn!("the task queue sent {e}");
                    closed = true;
                }
            }
        }
        for line in lines {
            match serde_json::from_slice::<FromQueue>(&line) {
                Ok(FromQueue::Run {
                    id,
                    attempt,
                    argv,
                    spec,
                    cwd,
                    timeout_ms,
                    log,
                }) => self.run(poll, id, attempt, &argv, &spec, cwd, timeout_ms, &log),
                Ok(FromQueue::Kill { id, attempt, why }) => {
                    if let Some(t) = self
                        .tasks
                        .values_mut()
                        .find(|t| t.id == id && t.attempt == attempt)
                    {
                        log::info!("killing task {id} attempt {attempt}: {why}");
                        t.killed = Some(why);
                        t.deadline = None;
                        t.kill_tree();
                    }
                }
                Ok(FromQueue::Error { message }) => log::warn!("the task queue: {message}"),
                Ok(_) => {}
                Err(e) => log::warn!("the task queue sent garbage: {e}"),
            }
        }
        if closed {
            self.drop_link(poll);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &mut self,
        poll: &Poll,
        id: i64,
        attempt: u32,
        argv: &[String],
        spec: &str,
        cwd: Option<String>,
        timeout_ms: Option<u64>,
        log_path: &Path,
    ) {
        let fail = |me: &mut TaskWorker, error: String| {
            log::info!("task {id} attempt {attempt} could not start: {error}");
            let o = Outcome {
                id,
                attempt,
                exit_code: None,
                error: Some(error),
                result: None,
            };
            me.send(poll, &ToQueue::Ended(o));
        };
        if self.draining || self.tasks.len() as u32 >= self.concurrency {
            return fail(self, format!("workflow-{} had no room for it", self.id));
        }
        let mut log = TaskLog {
            path: log_path.to_path_buf(),
            header: format!(
                "--- {} attempt {attempt} on workflow-{}: {} ---\n",
                rfc3339_now(),
                self.id,
                serde_json::to_string(argv).unwrap_or_default()
            ),
            file: None,
            logged: 0,
            cut: false,
            failed: false,
        };
        let cgroup = self.cgroups.take();
        let started = (|| -> Result<(i32, OwnedFd, File, File), String> {
            let (stdin_r, stdin_w) = pipe().map_err(|e| format!("cannot make a pipe: {e}"))?;
            let (out_r, out_w) = pipe().map_err(|e| format!("cannot make a pipe: {e}"))?;
            let (err_r, err_w) = pipe().map_err(|e| format!("cannot make a pipe: {e}"))?;
            // The JSON fits the pipe's buffer (SPEC_MAX): written before the program runs.
            let mut w = File::from(stdin_w);
            let _ = w.write_all(spec.as_bytes());
            drop(w);
            let mut env = self.base_env.clone();
            env.push(format!("NEXUS_TASK_ID={id}"));
            env.push(format!("NEXUS_TASK_ATTEMPT={attempt}"));
            env.push(self.queue_mark.clone());
            let prog = Program {
                argv: argv.to_vec(),
                env,
                cwd: cwd.map(PathBuf::from).filter(|p| p.is_dir()),
                identity: None,
                rlimits: Vec::new(),
            };
            let stdio = Stdio {
                stdin: stdin_r.as_raw_fd(),
                stdout: out_w.as_raw_fd(),
                stderr: err_w.as_raw_fd(),
            };
            let (pid, pidfd) = child::start(&prog, &stdio, cgroup.as_ref().map(Cgroup::fds))
                .map_err(|e| e.to_string())?;
            Ok((pid, pidfd, File::from(out_r), File::from(err_r)))
        })();
        let (pid, pidfd, stdout, stderr) = match started {
            Ok(s) => s,
            Err(e) => {
                log.write(format!("nexus: {e}\n").as_bytes());
                if let Some(cg) = cgroup {
                    self.cgroups.give_back(cg);
                }
                return fail(self, e);
            }
        };
        let slot = self.next_slot;
        self.next_slot += 1;
        for (k, fd) in [
            (0, pidfd.as_raw_fd()),
            (1, stdout.as_raw_fd()),
            (2, stderr.as_raw_fd()),
        ] {
            set_nonblocking(fd);
            let _ = poll.registry().register(
                &mut SourceFd(&fd),
                slot_token(slot, k),
                Interest::READABLE,
            );
        }
        self.tasks.insert(
            slot,
            Running {
                id,
                attempt,
                pid,
                pidfd,
                stdout: Some(stdout),
                stderr: Some(stderr),
                log,
                result: Vec::new(),
                deadline: timeout_ms.map(|ms| Instant::now() + Duration::from_millis(ms)),
                timeout_ms,
                killed: None,
                cgroup,
            },
        );
        self.send(poll, &ToQueue::Started { id, attempt, pid });
    }

    fn on_exit(&mut self, poll: &Poll, slot: usize) {
        let Some(t) = self.tasks.get_mut(&slot) else {
            return;
        };
        // The leader is a zombie until reaped, so its group id is still its own: the rest
        // of its tree goes with it.
        kill_group(t.pid, libc::SIGKILL);
        let Some((_, ended)) = child::reap(t.pid) else {
            return;
        };
        let Some(mut t) = self.tasks.remove(&slot) else {
            return;
        };
        // What its program left behind (a daemonised child) is killed with the cgroup.
        if let Some(cg) = t.cgroup.take() {
            self.cgroups.give_back(cg);
        }
        pump(&mut t, true, poll);
        pump(&mut t, false, poll);
        let _ = poll
            .registry()
            .deregister(&mut SourceFd(&t.pidfd.as_raw_fd()));
        for f in [t.stdout.take(), t.stderr.take()].into_iter().flatten() {
            let _ = poll.registry().deregister(&mut SourceFd(&f.as_raw_fd()));
        }
        let (exit_code, error) = match (ended, t.killed.take()) {
            (_, Some(why)) => (None, Some(why)),
            (Ended::Code(c), None) => (Some(c), None),
            (Ended::Signal(s), None) => {
                (None, Some(format!("killed by {}", child::signal_name(s))))
            }
        };
        let mut result = t.result;
        while result.last() == Some(&b'\n') {
            result.pop();
        }
        let result = (!result.is_empty()).then(|| String::from_utf8_lossy(&result).into_owned());
        if self.draining {
            // Ended by our own drain (a stop, or a service to host): the queue re-queues
            // it as lost when our connection ends; it is not the task's failure.
            return;
        }
        let o = Outcome {
            id: t.id,
            attempt: t.attempt,
            exit_code,
            error,
            result,
        };
        self.send(poll, &ToQueue::Ended(o));
    }

    /// No more tasks: the workflow is about to host a service or to exit. Running tasks
    /// get SIGTERM now; `kill_all` ends them for good.
    pub fn drain(&mut self, poll: &Poll) {
        if !self.draining {
            self.draining = true;
            self.send(poll, &ToQueue::Draining {});
            for t in self.tasks.values() {
                kill_group(t.pid, libc::SIGTERM);
            }
        }
    }

    /// The worker is going: every task's tree is killed, and its cgroup left to the pool,
    /// which removes it once empty.
    pub fn kill_all(&mut self) {
        for t in self.tasks.values_mut() {
            t.kill_tree();
            if let Some(cg) = t.cgroup.take() {
                self.cgroups.give_back(cg);
            }
        }
    }
}

impl Drop for TaskWorker {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// Reads what a task's stdout (`out`) or stderr has for us into its log and result.
fn pump(t: &mut Running, out: bool, poll: &Poll) {
    let file = if out { &mut t.stdout } else { &mut t.stderr };
    let Some(f) = file.as_mut() else {
        return;
    };
    let mut buf = [0u8; 16384];
    let mut eof = false;
    // Bounded per wake so one chatty task cannot starve the rest of the loop.
    for _ in 0..64 {
        match f.read(&mut buf) {
            Ok(0) => {
                eof = true;
                break;
            }
            Ok(n) => {
                let chunk = &buf[..n];
                if out && t.result.len() < RESULT_MAX {
                    let room = RESULT_MAX - t.result.len();
                    t.result.extend_from_slice(&chunk[..n.min(room)]);
                }
                t.log.write(chunk);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    if eof && let Some(f) = file.take() {
        let _ = poll.registry().deregister(&mut SourceFd(&f.as_raw_fd()));
    }
}

/// A task's log, opened at its first byte of output: most tasks write nothing, and a
/// file created per task costs an inode allocation, the dearest step of a no-op task.
struct TaskLog {
    path: PathBuf,
    /// The attempt's first line, written before its first output.
    header: String,
    file: Option<File>,
    /// Bytes in the file (all attempts), up to LOG_MAX.
    logged: u64,
    cut: bool,
    failed: bool,
}

impl TaskLog {
    fn write(&mut self, chunk: &[u8]) {
        if self.cut || self.failed {
            return;
        }
        if self.file.is_none() {
            if let Some(d) = self.path.parent() {
                let _ = std::fs::create_dir_all(d);
            }
            match std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&self.path)
            {
                Ok(mut f) => {
                    self.logged = f.metadata().map_or(0, |m| m.len());
                    let _ = f.write_all(self.header.as_bytes());
                    self.logged += self.header.len() as u64;
                    self.file = Some(f);
                }
                Err(e) => {
                    log::warn!("cannot open the task log {}: {e}", self.path.display());
                    self.failed = true;
                    return;
                }
            }
        }
        let Some(f) = self.file.as_mut() else {
            return;
        };
        let n = chunk.len() as u64;
        if self.logged + n <= LOG_MAX {
            let _ = f.write_all(chunk);
            self.logged += n;
        } else {
            let room = LOG_MAX.saturating_sub(self.logged) as usize;
            let _ = f.write_all(&chunk[..room.min(chunk.len())]);
            let _ = writeln!(f, "\n[nexus: the log is cut at {LOG_MAX} bytes]");
            self.logged = LOG_MAX;
            self.cut = true;
        }
    }
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)
}

fn set_nonblocking(fd: i32) {
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
}

fn kill_group(pgid: i32, sig: i32) {
    if pgid > 1 {
        // SAFETY: a signal to the process group our task leads.
        unsafe { libc::kill(-pgid, sig) };
    }
}
