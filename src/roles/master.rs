//! The master's side of a communicator: one slot per daemon of the config, a pidfd
//! for each process, the control socket's requests, and every respawn, restart, resize
//! and recovery record. The hot path of a crash is `on_exit`: reap, spawn, then the ledger.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use mio::net::{UnixListener, UnixStream};
use mio::unix::SourceFd;
use mio::{Interest, Poll, Token};
use nix::sys::socket::{self, sockopt};

use crate::config::{Role, SlotName};
use crate::daemon::{DaemonCtx, Rejections};
use crate::ledger::{Event, Ledger, unix_ms_now};
use crate::procscan;
use crate::protocol::{self, Member, Request, Response, SlotState, StatusReport};
use crate::runtime_dir::LeaderLock;
use crate::spawn;

/// The control socket's listener (the communicator's own tokens are 0 and 2).
pub(super) const CONTROL: Token = Token(1);
pub(super) const PIDFD_BASE: usize = 1 << 20;
pub(super) const CONN_BASE: usize = 1 << 30;

/// A control connection that has not finished its request by then is dropped.
pub(super) const CONN_TIMEOUT: Duration = Duration::from_secs(2);
/// A process that dies sooner than this after its start is a quick failure and backs off.
pub(super) const QUICK_FAILURE: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cause {
    Crash,
    Hang,
    Failover,
    /// `nexus restart`: a replacement on purpose, not a failure.
    Manual,
}

impl Cause {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Cause::Crash => "crash",
            Cause::Hang => "hang",
            Cause::Failover => "failover",
            Cause::Manual => "manual",
        }
    }
}

/// A failure being recovered: opened at detection, closed by the replacement's ready.
#[derive(Debug, Clone, Copy)]
pub(super) struct Recovery {
    pub(super) cause: Cause,
    pub(super) old_pid: i32,
    pub(super) detected: Instant,
    /// Failure to detection, where something measures it: the silence before a hang was
    /// acted on. A crash has none: the kernel reports it through the pidfd as it happens
    /// and gives no exit timestamp to subtract (chaos and the bench time it from outside).
    pub(super) detect_ms: Option<f64>,
}

pub(super) struct Proc {
    pub(super) pid: i32,
    /// None for the master's own slot: it cannot watch itself.
    pub(super) pidfd: Option<OwnedFd>,
    pub(super) child: bool,
    pub(super) started: Instant,
    pub(super) started_ms: u64,
    pub(super) ready: bool,
    /// Watchdogs that reported this pid silent.
    pub(super) votes: Vec<u32>,
    /// Set once we have decided to kill it for a hang.
    pub(super) killing: Option<Recovery>,
    /// The pidfd's token in our poll (Token(0) for ourselves: not watched).
    pub(super) token: Token,
    /// Stopped on purpose (`nexus restart`): its exit is not a failure.
    pub(super) manual: bool,
    /// SIGTERMed on purpose: SIGKILL at this time if still alive.
    pub(super) kill_at: Option<Instant>,
    /// The config changed before it was ready: SIGHUP it once it is (earlier, before its
    /// handlers exist, SIGHUP would kill it).
    pub(super) reload_when_ready: bool,
}

pub(super) struct Slot {
    pub(super) name: SlotName,
    pub(super) proc: Option<Proc>,
    /// Failures not yet recovered: usually one, more if a replacement died before it
    /// was ready. The next ready process closes them all.
    pub(super) pending: Vec<Recovery>,
    pub(super) restart_at: Option<Instant>,
    pub(super) recent_restarts: VecDeque<Instant>,
    pub(super) quick_failures: u32,
    pub(super) failed: bool,
    pub(super) restarts: u32,
    pub(super) last_cause: Option<Cause>,
}

pub(super) struct Conn {
    pub(super) stream: UnixStream,
    pub(super) peer_pid: i32,
    pub(super) inbuf: Vec<u8>,
    pub(super) outbuf: Vec<u8>,
    pub(super) written: usize,
    pub(super) opened: Instant,
}

pub(super) struct Master {
    pub(super) lock: LeaderLock,
    pub(super) listener: UnixListener,
    pub(super) conns: HashMap<usize, Conn>,
    pub(super) next_conn: usize,
    pub(super) slots: Vec<Slot>,
    pub(super) ledger: Ledger,
    pub(super) stopping: bool,
    pub(super) rejected: Rejections,
    pub(super) whole_logged: bool,
    pub(super) counters: crate::counters::Counters,
    /// pidfd tokens → the slot whose process they watch. Tokens are never reused, so a
    /// resize (which moves slot indices) cannot misroute an exit.
    pub(super) tokens: HashMap<Token, SlotName>,
    pub(super) next_token: usize,
    /// Processes of slots removed by a scale-down, being stopped.
    pub(super) retiring: HashMap<Token, (SlotName, Proc)>,
    /// A validated config from `reload`/`scale`, applied by the loop after this event.
    pub(super) pending_config: Option<crate::config::Config>,
    /// `nexus restart` of the master itself: exit after answering, a standby takes over.
    pub(super) hand_over: bool,
    /// systemd's notify socket, when run under a Type=notify unit.
    pub(super) notifier: Option<crate::notify::Notifier>,
    pub(super) launcher: spawn::Launcher,
}

/// What a new master knows about how it came to be one.
pub(super) struct Takeover {
    pub(super) previous: Option<i32>,
    pub(super) previous_slot: Option<SlotName>,
    pub(super) previous_cause: Cause,
    pub(super) hung_ms: u64,
    pub(super) left_slot: Option<SlotName>,
    pub(super) me: SlotName,
    pub(super) my_pid: i32,
}

impl Master {
    /// After a takeover, picks up the failures the old master could not finish: each
    /// becomes a pending recovery of its slot (closed when the replacement is ready), or is
    /// closed at once where a live process already fills the slot. An empty slot whose
    /// last known pid is dead is a failure too, so that no loss goes unrecorded.
    pub(super) fn reconcile(
        &mut self,
        ctx: &DaemonCtx,
        t: &Takeover,
        history: &crate::ledger::History,
    ) {
        let now = Instant::now();
        let open = |cause: Cause, old_pid: i32, detect_ms: Option<f64>| Recovery {
            cause,
            old_pid,
            detected: now,
            detect_ms,
        };
        for i in 0..self.slots.len() {
            let name = self.slots[i].name;
            let mut failures: Vec<Recovery> = history
                .unclosed
                .iter()
                .filter(|(slot, ..)| *slot == name)
                .map(|(_, pid, cause)| {
                    let cause = match cause.as_str() {
                        "hang" => Cause::Hang,
                        "failover" => Cause::Failover,
                        _ => Cause::Crash,
                    };
                    open(cause, *pid, None)
                })
                .collect();
            let current = self.slots[i].proc.as_ref().map(|p| p.pid);
            let known = |pid: i32, f: &[Recovery]| f.iter().any(|r| r.old_pid == pid);
            if Some(name) == t.previous_slot
                && let Some(prev) = t.previous
                && !known(prev, &failures)
            {
                let detect = (t.previous_cause == Cause::Hang).then_some(t.hung_ms as f64);
                failures.push(open(t.previous_cause, prev, detect));
            }
            if Some(name) == t.left_slot && !known(t.my_pid, &failures) {
                failures.push(open(Cause::Failover, t.my_pid, None));
            }
            if let Some(&last) = history.last_pid.get(&name)
                && Some(last) != current
                && last != t.my_pid
                && !known(last, &failures)
                && procscan::daemon_slot(last, ctx.dir.path()) != Some(name)
            {
                failures.push(open(Cause::Crash, last, None));
            }
            failures.retain(|r| Some(r.old_pid) != current);
            if current.is_some() {
                // A live process already fills the slot (adopted, or ourselves): these
                // failures were recovered before the old master could record it.
                let pid = current.unwrap_or(0);
                let detail = if name == t.me {
                    "filled by the new master itself"
                } else {
                    "replacement adopted by a new master"
                };
                for r in failures {
                    // When it became ready is unknown: no recover_ms.
                    self.record_respawn(name, pid, &r, None, Some(detail));
                }
            } else {
                self.slots[i].pending = failures;
            }
        }
    }

    /// The one place a recovery is closed: its ledger line and its count.
    pub(super) fn record_respawn(
        &mut self,
        name: SlotName,
        pid: i32,
        rec: &Recovery,
        recover_ms: Option<f64>,
        detail: Option<&str>,
    ) {
        // A restart asked for is recorded as such, never as a failure's recovery.
        let mut ev = Event::new(if rec.cause == Cause::Manual {
            "restarted"
        } else {
            "respawned"
        });
        ev.role = Some(name.role);
        ev.id = Some(name.id);
        ev.pid = Some(pid);
        ev.old_pid = Some(rec.old_pid);
        ev.cause = Some(rec.cause.as_str().into());
        ev.detect_ms = rec.detect_ms.map(round3);
        ev.recover_ms = recover_ms;
        ev.detail = detail.map(str::to_string);
        self.ledger.append(&ev);
        self.counters
            .record_recovery(name.role, rec.cause.as_str(), recover_ms);
    }

    /// Takes over every running daemon of the directory: one pidfd each, so their exits
    /// wake us exactly like our own children's. Duplicates and strangers are killed.
    pub(super) fn adopt(&mut self, ctx: &DaemonCtx, poll: &Poll) {
        for found in procscan::daemons_of(ctx.dir.path()) {
            if found.pid == ctx.pid {
                continue;
            }
            let Ok(fd) = spawn::pidfd_open(found.pid) else {
                continue;
            };
            // The pid could have been reused between the scan and the open: check again.
            if procscan::daemon_slot(found.pid, ctx.dir.path()) != Some(found.slot) {
                continue;
            }
            let Some(i) = ctx.config.slot_index(found.slot) else {
                log::warn!(
                    "killing {} pid {}: not in the config",
                    found.slot,
                    found.pid
                );
                let _ = spawn::pidfd_signal(&fd, libc::SIGKILL);
                continue;
            };
            if let Some(existing) = &self.slots[i].proc {
                // Keep the older: it is the one the rest of the cluster knows.
                let (keep_old, other) = (
                    procscan::start_ticks(existing.pid) <= procscan::start_ticks(found.pid),
                    found.pid,
                );
                if keep_old {
                    log::warn!("killing duplicate {} pid {other}", found.slot);
                    let _ = spawn::pidfd_signal(&fd, libc::SIGKILL);
                    continue;
                }
                if let Some(old) = self.slots[i].proc.take() {
                    log::warn!("killing duplicate {} pid {}", found.slot, old.pid);
                    self.unwatch(poll, &old);
                    if let Some(ofd) = &old.pidfd {
                        let _ = spawn::pidfd_signal(ofd, libc::SIGKILL);
                    }
                }
            }
            let Ok(token) = self.watch(poll, &fd, found.slot) else {
                continue;
            };
            let now = Instant::now();
            self.slots[i].proc = Some(Proc {
                pid: found.pid,
                pidfd: Some(fd),
                child: false,
                // Old enough that a watchdog which never heard it is believed at once.
                started: now.checked_sub(ctx.config.timeout()).unwrap_or(now),
                started_ms: unix_ms_now(),
                ready: true,
                votes: Vec::new(),
                killing: None,
                token,
                manual: false,
                kill_at: None,
                reload_when_ready: false,
            });
            log::info!("adopted {} pid {}", found.slot, found.pid);
        }
    }

    /// Registers a daemon's pidfd under a fresh token, so its exit wakes the loop.
    pub(super) fn watch(&mut self, poll: &Poll, fd: &OwnedFd, name: SlotName) -> io::Result<Token> {
        let token = Token(self.next_token);
        self.next_token = if self.next_token + 1 >= CONN_BASE {
            PIDFD_BASE
        } else {
            self.next_token + 1
        };
        poll.registry()
            .register(&mut SourceFd(&fd.as_raw_fd()), token, Interest::READABLE)?;
        self.tokens.insert(token, name);
        Ok(token)
    }

    pub(super) fn unwatch(&mut self, poll: &Poll, proc: &Proc) {
        if let Some(fd) = &proc.pidfd {
            let _ = poll.registry().deregister(&mut SourceFd(&fd.as_raw_fd()));
        }
        self.tokens.remove(&proc.token);
    }

    pub(super) fn spawn_slot(&mut self, ctx: &DaemonCtx, poll: &Poll, i: usize) {
        let name = self.slots[i].name;
        self.slots[i].restart_at = None;
        match self.launcher.spawn(name, &ctx.dir.log_file(name)) {
            Ok((pid, fd)) => {
                let token = match self.watch(poll, &fd, name) {
                    Ok(t) => t,
                    Err(e) => {
                        log::error!("cannot watch {name} pid {pid}: {e}; killing it");
                        let _ = spawn::pidfd_signal(&fd, libc::SIGKILL);
                        self.schedule_retry(ctx, i);
                        return;
                    }
                };
                self.slots[i].proc = Some(Proc {
                    pid,
                    pidfd: Some(fd),
                    child: true,
                    started: Instant::now(),
                    started_ms: unix_ms_now(),
                    ready: false,
                    votes: Vec::new(),
                    killing: None,
                    token,
                    manual: false,
                    kill_at: None,
                    reload_when_ready: false,
                });
                let mut ev = Event::new("spawned");
                ev.role = Some(name.role);
                ev.id = Some(name.id);
                ev.pid = Some(pid);
                self.ledger.append(&ev);
            }
            Err(e) => {
                log::error!("cannot spawn {name}: {e}");
                self.schedule_retry(ctx, i);
            }
        }
    }

    pub(super) fn schedule_retry(&mut self, ctx: &DaemonCtx, i: usize) {
        let delay = self.slots[i].plan_restart(ctx, Duration::ZERO);
        self.slots[i].restart_at = Some(Instant::now() + delay.max(Duration::from_millis(1)));
    }

    pub(super) fn run_due_restarts(&mut self, ctx: &DaemonCtx, poll: &Poll, now: Instant) {
        if self.stopping {
            return;
        }
        for i in 0..self.slots.len() {
            if self.slots[i].proc.is_none() && self.slots[i].restart_at.is_some_and(|t| t <= now) {
                self.spawn_slot(ctx, poll, i);
            }
        }
    }

    pub(super) fn next_deadline(&self) -> Option<Instant> {
        let restarts = self.slots.iter().filter_map(|s| s.restart_at);
        let conns = self.conns.values().map(|c| c.opened + CONN_TIMEOUT);
        let kills = self.slots.iter().filter_map(|s| s.proc.as_ref()?.kill_at);
        let retiring = self.retiring.values().filter_map(|(_, p)| p.kill_at);
        restarts.chain(conns).chain(kills).chain(retiring).min()
    }

    pub(super) fn on_event(&mut self, ctx: &DaemonCtx, poll: &Poll, token: Token, uid: u32) {
        match token {
            CONTROL => self.accept_all(poll, uid),
            Token(t) if (PIDFD_BASE..CONN_BASE).contains(&t) => {
                if let Some(i) = self
                    .tokens
                    .get(&token)
                    .and_then(|&name| ctx.config.slot_index(name))
                {
                    self.on_exit(ctx, poll, i);
                } else if self.retiring.contains_key(&token) {
                    self.on_retired_exit(poll, token);
                }
            }
            Token(t) if t >= CONN_BASE => self.on_conn(ctx, poll, t),
            _ => {}
        }
    }

    /// A daemon exited. The hot path is spawn; reaping and bookkeeping come after.
    pub(super) fn on_exit(&mut self, ctx: &DaemonCtx, poll: &Poll, i: usize) {
        let Some(slot) = self.slots.get_mut(i) else {
            return;
        };
        let Some(proc) = slot.proc.as_ref() else {
            return;
        };
        let Some(fd) = proc.pidfd.as_ref() else {
            return;
        };
        if !spawn::has_exited(fd) {
            return;
        }
        let proc = slot.proc.take().expect("checked above");
        let now = Instant::now();
        let recovery = proc.killing.unwrap_or(Recovery {
            cause: if proc.manual {
                Cause::Manual
            } else {
                Cause::Crash
            },
            old_pid: proc.pid,
            detected: now,
            detect_ms: None,
        });
        let name = slot.name;
        if !self.stopping && proc.manual {
            // Asked for: replaced at once, outside the backoff and the failure counts.
            slot.pending.push(recovery);
            self.spawn_slot(ctx, poll, i);
        } else if !self.stopping {
            let delay = slot.plan_restart(ctx, now.duration_since(proc.started));
            slot.pending.push(recovery);
            slot.last_cause = Some(recovery.cause);
            slot.restarts += 1;
            if delay.is_zero() {
                self.spawn_slot(ctx, poll, i);
            } else {
                slot.restart_at = Some(now + delay);
                log::warn!("{name} restarts in {} ms (backoff)", delay.as_millis());
            }
        }
        // The replacement's exec is still running when posix_spawn returns (a vfork child
        // releases its parent before it has loaded the image), and the woken parent would
        // preempt it for the bookkeeping below. Let it finish first.
        if self.slots[i].proc.is_some() {
            std::thread::yield_now();
        }
        // Reaping (the kernel frees the dead task then, tens of µs) and unwatching wait
        // until the replacement is on its way: the zombie keeps its pid from reuse.
        self.unwatch(poll, &proc);
        let how = if proc.child {
            spawn::reap(proc.pid)
        } else {
            None
        };
        let mut ev = Event::new("exited");
        ev.role = Some(name.role);
        ev.id = Some(name.id);
        ev.pid = Some(proc.pid);
        ev.cause = (!self.stopping).then(|| recovery.cause.as_str().to_string());
        ev.detail = how;
        self.ledger.append(&ev);
        log::info!(
            "{name} pid {} exited ({})",
            proc.pid,
            ev.detail.as_deref().unwrap_or("not our child")
        );
        if self.slots[i].failed && self.slots[i].proc.is_none() {
            let mut ev = Event::new("failed");
            ev.role = Some(name.role);
            ev.id = Some(name.id);
            ev.detail = Some(format!(
                "more than {} restarts in {} ms; retrying every {} ms",
                ctx.config.restart_intensity,
                ctx.config.restart_period_ms,
                ctx.config.backoff_max_ms
            ));
            self.ledger.append(&ev);
        }
    }

    /// `STATUS=` for systemd: how many slots run, and who is master.
    pub(super) fn status_line(&self) -> String {
        let running = self
            .slots
            .iter()
            .filter(|s| s.proc.as_ref().is_some_and(|p| p.ready))
            .count();
        let count = |r: Role| self.slots.iter().filter(|s| s.name.role == r).count();
        format!(
            "{running}/{} daemons running ({} communicators, {} watchdogs, {} workflows); master pid {}",
            self.slots.len(),
            count(Role::Communicator),
            count(Role::Watchdog),
            count(Role::Workflow),
            std::process::id()
        )
    }

    pub(super) fn notify_status(&mut self) {
        if self.notifier.is_some() {
            let line = self.status_line();
            if let Some(n) = self.notifier.as_mut() {
                n.status(&line);
            }
        }
    }

    /// A process of a slot removed by a scale-down has ended.
    pub(super) fn on_retired_exit(&mut self, poll: &Poll, token: Token) {
        let Some((name, proc)) = self.retiring.remove(&token) else {
            return;
        };
        self.unwatch(poll, &proc);
        let how = if proc.child {
            spawn::reap(proc.pid)
        } else {
            None
        };
        let mut ev = Event::new("retired");
        ev.role = Some(name.role);
        ev.id = Some(name.id);
        ev.pid = Some(proc.pid);
        ev.detail = how;
        self.ledger.append(&ev);
        log::info!("{name} pid {} retired", proc.pid);
    }

    /// SIGTERM now, SIGKILL at the grace period's end (see `escalate_kills`).
    pub(super) fn terminate_proc(proc: &mut Proc, grace: Duration) {
        if let Some(fd) = &proc.pidfd {
            let _ = spawn::pidfd_signal(fd, libc::SIGTERM);
        }
        proc.kill_at = Some(Instant::now() + grace);
    }

    /// Processes stopped on purpose that ignored SIGTERM for the grace period.
    pub(super) fn escalate_kills(&mut self, now: Instant) {
        let procs = self.slots.iter_mut().filter_map(|s| s.proc.as_mut());
        let retiring = self.retiring.values_mut().map(|(_, p)| p);
        for p in procs.chain(retiring) {
            if p.kill_at.is_some_and(|t| t <= now) {
                p.kill_at = None;
                if let Some(fd) = &p.pidfd {
                    log::warn!("pid {} ignored SIGTERM: SIGKILL", p.pid);
                    let _ = spawn::pidfd_signal(fd, libc::SIGKILL);
                }
            }
        }
    }

    pub(super) fn accept_all(&mut self, poll: &Poll, uid: u32) {
        loop {
            let (mut stream, _) = match self.listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!("accept failed: {e}");
                    return;
                }
            };
            let creds = socket::getsockopt(&stream, sockopt::PeerCredentials);
            let Ok(creds) = creds else { continue };
            if creds.uid() != uid {
                self.rejected
                    .reject(format_args!("control connection from uid {}", creds.uid()));
                continue;
            }
            let id = CONN_BASE + self.next_conn;
            self.next_conn = (self.next_conn + 1) % (1 << 20);
            if poll
                .registry()
                .register(&mut stream, Token(id), Interest::READABLE)
                .is_err()
            {
                continue;
            }
            self.conns.insert(
                id,
                Conn {
                    stream,
                    peer_pid: creds.pid(),
                    inbuf: Vec::new(),
                    outbuf: Vec::new(),
                    written: 0,
                    opened: Instant::now(),
                },
            );
        }
    }

    pub(super) fn on_conn(&mut self, ctx: &DaemonCtx, poll: &Poll, id: usize) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        if !conn.outbuf.is_empty() {
            if flush(conn) {
                self.close(poll, id);
            }
            return;
        }
        let mut eof = false;
        let mut buf = [0u8; 4096];
        loop {
            match conn.stream.read(&mut buf) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => {
                    conn.inbuf.extend_from_slice(&buf[..n]);
                    if conn.inbuf.len() > protocol::MAX_REQUEST {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    eof = true;
                    break;
                }
            }
        }
        let line_end = conn.inbuf.iter().position(|&b| b == b'\n');
        if line_end.is_none() && !eof && conn.inbuf.len() <= protocol::MAX_REQUEST {
            return; // wait for the rest of the line
        }
        let line = conn.inbuf[..line_end.unwrap_or(conn.inbuf.len())].to_vec();
        let peer = conn.peer_pid;
        let response = match protocol::decode::<Request>(&line, protocol::MAX_REQUEST) {
            Ok(req) => self.handle(ctx, peer, req),
            Err(e) => {
                if !line.is_empty() {
                    self.rejected
                        .reject(format_args!("control request from pid {peer}: {e}"));
                }
                Response::Error {
                    message: e.to_string(),
                }
            }
        };
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        conn.outbuf = protocol::encode_line(&response);
        if flush(conn) {
            self.close(poll, id);
        } else {
            let _ = poll
                .registry()
                .reregister(&mut conn.stream, Token(id), Interest::WRITABLE);
        }
    }

    pub(super) fn close(&mut self, poll: &Poll, id: usize) {
        if let Some(mut c) = self.conns.remove(&id) {
            let _ = poll.registry().deregister(&mut c.stream);
        }
    }

    pub(super) fn expire_conns(&mut self, poll: &Poll) {
        let now = Instant::now();
        let expired: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| now >= c.opened + CONN_TIMEOUT)
            .map(|(&id, _)| id)
            .collect();
        for id in expired {
            self.rejected
                .reject(format_args!("control connection timed out"));
            // Say why before hanging up (best effort: the socket is non-blocking and the
            // answer small); a client left waiting learns more than from a bare close.
            if let Some(conn) = self.conns.get_mut(&id)
                && conn.outbuf.is_empty()
            {
                let why = Response::Error {
                    message: format!(
                        "incomplete request: no newline within {} ms",
                        CONN_TIMEOUT.as_millis()
                    ),
                };
                let _ = conn.stream.write(&protocol::encode_line(&why));
            }
            self.close(poll, id);
        }
    }

    pub(super) fn handle(&mut self, ctx: &DaemonCtx, peer: i32, req: Request) -> Response {
        match req {
            Request::Status {} => Response::Status(self.status(ctx)),
            Request::Ping {} => Response::Ok {},
            Request::Stop {} => {
                if !self.stopping {
                    self.stopping = true;
                    for s in &mut self.slots {
                        s.restart_at = None;
                    }
                    self.ledger.append(&Event::new("stopping"));
                    if let Some(n) = &self.notifier {
                        n.stopping();
                    }
                    log::info!("stop requested by pid {peer}");
                }
                Response::Stopping {
                    master_pid: ctx.pid,
                    members: self.members(ctx),
                }
            }
            Request::Ready { role, id, pid } => self.on_ready(peer, SlotName { role, id }, pid),
            Request::Restart { role, id } => self.restart(ctx, SlotName { role, id }),
            Request::Reload { config } => self.accept_config(ctx, &config),
            Request::Silent {
                reporter,
                role,
                id,
                pid,
                silent_ms,
            } => self.on_silent(ctx, peer, reporter, SlotName { role, id }, pid, silent_ms),
        }
    }

    /// `nexus restart`: SIGTERM (SIGKILL after the grace period); the exit is then a
    /// manual replacement, not a failure. Restarting the master hands over to a standby.
    pub(super) fn restart(&mut self, ctx: &DaemonCtx, name: SlotName) -> Response {
        if self.stopping {
            return Response::Error {
                message: "the cluster is stopping".into(),
            };
        }
        let Some(i) = ctx.config.slot_index(name) else {
            return Response::Error {
                message: format!("{name} is not a slot of this cluster"),
            };
        };
        if name == ctx.slot {
            let standby = self.slots.iter().any(|s| {
                s.name.role == Role::Communicator
                    && s.name != name
                    && s.proc.as_ref().is_some_and(|p| p.ready)
            });
            if !standby {
                return Response::Error {
                    message: format!("{name} is the master and no standby is running to take over"),
                };
            }
            self.hand_over = true;
            return Response::Applied {
                changes: vec![format!(
                    "{name} (master, pid {}) hands over to a standby",
                    ctx.pid
                )],
            };
        }
        let grace = Duration::from_millis(ctx.config.stop_grace_ms);
        match self.slots[i].proc.as_mut() {
            Some(p) if p.kill_at.is_none() => {
                p.manual = true;
                Self::terminate_proc(p, grace);
                Response::Applied {
                    changes: vec![format!("{name} pid {} restarting", p.pid)],
                }
            }
            Some(p) => Response::Error {
                message: format!("{name} pid {} is already being stopped", p.pid),
            },
            None => Response::Error {
                message: format!("{name} has no process right now (being replaced)"),
            },
        }
    }

    /// `nexus reload` / `scale`: validate here too (the client may be another build),
    /// then leave the config for the loop to apply once this event is done.
    pub(super) fn accept_config(&mut self, ctx: &DaemonCtx, text: &str) -> Response {
        let new = match crate::config::Config::parse(text) {
            Ok(c) => c,
            Err(e) => {
                return Response::Error {
                    message: format!("config refused, nothing changed: {e}"),
                };
            }
        };
        if let Some(d) = &new.runtime_dir
            && crate::runtime_dir::RuntimeDir::at(d).path() != ctx.dir.path()
        {
            return Response::Error {
                message: "runtime_dir cannot change on a running cluster".into(),
            };
        }
        if ctx.slot.role == Role::Communicator && ctx.slot.id > new.communicators {
            return Response::Error {
                message: format!(
                    "the master is {}: communicators cannot go below {} (restart it to move the master first)",
                    ctx.slot, ctx.slot.id
                ),
            };
        }
        if self.stopping {
            return Response::Error {
                message: "the cluster is stopping".into(),
            };
        }
        let changes = config_changes(&ctx.config, &new);
        self.pending_config = Some(new);
        Response::Applied { changes }
    }

    /// Moves to a new config: slots that stay keep their processes, new slots are
    /// spawned, removed ones are stopped (SIGTERM, then SIGKILL after the grace period).
    pub(super) fn resize(&mut self, ctx: &DaemonCtx, poll: &Poll) {
        let grace = Duration::from_millis(ctx.config.stop_grace_ms);
        let mut old: HashMap<SlotName, Slot> = self.slots.drain(..).map(|s| (s.name, s)).collect();
        self.slots = ctx
            .config
            .slots()
            .into_iter()
            .map(|name| old.remove(&name).unwrap_or_else(|| Slot::new(name)))
            .collect();
        for (name, slot) in old {
            if let Some(mut p) = slot.proc {
                Self::terminate_proc(&mut p, grace);
                self.retiring.insert(p.token, (name, p));
            }
        }
        for i in 0..self.slots.len() {
            if self.slots[i].proc.is_none() && self.slots[i].restart_at.is_none() {
                self.spawn_slot(ctx, poll, i);
            }
        }
        // Everyone re-reads config.json: new watchdog sockets, new timings. Those not yet
        // ready may have read the old file: they are told when they are.
        for p in self.slots.iter_mut().filter_map(|s| s.proc.as_mut()) {
            match &p.pidfd {
                Some(fd) if p.ready => {
                    let _ = spawn::pidfd_signal(fd, libc::SIGHUP);
                }
                Some(_) => p.reload_when_ready = true,
                None => {}
            }
        }
    }

    pub(super) fn on_ready(&mut self, peer: i32, name: SlotName, pid: i32) -> Response {
        if pid != peer {
            self.rejected.reject(format_args!(
                "ready for {name} pid {pid} sent by pid {peer}"
            ));
            return Response::Error {
                message: "pid does not match the sender".into(),
            };
        }
        let Some(slot) = self.slots.iter_mut().find(|s| s.name == name) else {
            self.rejected
                .reject(format_args!("ready from unknown slot {name}"));
            return Response::Error {
                message: format!("no slot {name}"),
            };
        };
        let Some(proc) = slot.proc.as_mut().filter(|p| p.pid == pid) else {
            return Response::Error {
                message: "stale: not the slot's current process".into(),
            };
        };
        proc.ready = true;
        if std::mem::take(&mut proc.reload_when_ready)
            && let Some(fd) = &proc.pidfd
        {
            let _ = spawn::pidfd_signal(fd, libc::SIGHUP);
        }
        for rec in std::mem::take(&mut slot.pending) {
            let recover_ms = round3(rec.detected.elapsed().as_secs_f64() * 1000.0);
            self.record_respawn(name, pid, &rec, Some(recover_ms), None);
        }
        if !self.whole_logged
            && self
                .slots
                .iter()
                .all(|s| s.proc.as_ref().is_some_and(|p| p.ready))
        {
            self.whole_logged = true;
            log::info!("cluster whole: {} daemons heartbeating", self.slots.len());
            let line = self.status_line();
            if let Some(n) = self.notifier.as_mut() {
                n.ready(&line);
            }
        }
        Response::Ok {}
    }

    pub(super) fn on_silent(
        &mut self,
        ctx: &DaemonCtx,
        peer: i32,
        reporter: u32,
        name: SlotName,
        pid: i32,
        silent_ms: u64,
    ) -> Response {
        let reporter_slot = SlotName {
            role: Role::Watchdog,
            id: reporter,
        };
        let genuine_reporter = ctx
            .config
            .slot_index(reporter_slot)
            .and_then(|i| self.slots[i].proc.as_ref())
            .is_some_and(|p| p.pid == peer);
        if !genuine_reporter {
            self.rejected.reject(format_args!(
                "silence report from pid {peer}, not {reporter_slot}"
            ));
            return Response::Error {
                message: "only watchdogs report silence".into(),
            };
        }
        if self.stopping || name == ctx.slot {
            return Response::Ok {};
        }
        let Some(i) = ctx.config.slot_index(name) else {
            self.rejected
                .reject(format_args!("silence report about unknown slot {name}"));
            return Response::Error {
                message: format!("no slot {name}"),
            };
        };
        let quorum = self.quorum(name);
        let timeout = ctx.config.timeout();
        let slot = &mut self.slots[i];
        let Some(proc) = slot.proc.as_mut() else {
            return Response::Ok {}; // already being replaced
        };
        // A report names the last pid its watchdog heard. It is about the current process
        // if it names it, or if the current process is older than the timeout and so
        // should have been heard by now; otherwise it is about a predecessor: stale.
        let about_current = pid == proc.pid || proc.started.elapsed() >= timeout;
        if !about_current || proc.killing.is_some() {
            log::debug!(
                "dropped stale silence report on {name} pid {pid} from watchdog-{reporter}"
            );
            return Response::Ok {};
        }
        if !proc.votes.contains(&reporter) {
            proc.votes.push(reporter);
        }
        log::info!(
            "watchdog-{reporter}: {name} pid {} silent for {silent_ms} ms ({}/{quorum} votes)",
            proc.pid,
            proc.votes.len()
        );
        if proc.votes.len() < quorum {
            return Response::Ok {};
        }
        let victim = proc.pid;
        proc.killing = Some(Recovery {
            cause: Cause::Hang,
            old_pid: victim,
            detected: Instant::now(),
            detect_ms: Some(silent_ms as f64),
        });
        if let Some(fd) = &proc.pidfd {
            // If it is already gone the pidfd reports that anyway; either way on_exit
            // performs the one replacement.
            let _ = spawn::pidfd_signal(fd, libc::SIGKILL);
        }
        let votes = proc.votes.clone();
        let mut ev = Event::new("killed");
        ev.role = Some(name.role);
        ev.id = Some(name.id);
        ev.pid = Some(victim);
        ev.cause = Some("hang".into());
        ev.detect_ms = Some(silent_ms as f64);
        ev.detail = Some(format!(
            "silent for {silent_ms} ms; reported by watchdogs {votes:?}"
        ));
        self.ledger.append(&ev);
        Response::Ok {}
    }

    /// Reports needed to kill `subject`: a majority of the watchdogs that can vote — up,
    /// not the subject, and not themselves reported silent (two hung watchdogs must not
    /// block each other's replacement).
    pub(super) fn quorum(&self, subject: SlotName) -> usize {
        let voters = self
            .slots
            .iter()
            .filter(|s| s.name.role == Role::Watchdog && s.name != subject)
            .filter(|s| {
                s.proc
                    .as_ref()
                    .is_some_and(|p| p.ready && p.killing.is_none() && p.votes.is_empty())
            })
            .count();
        voters / 2 + 1
    }

    pub(super) fn members(&self, ctx: &DaemonCtx) -> Vec<Member> {
        self.slots
            .iter()
            .map(|s| {
                let state = match &s.proc {
                    Some(p) if p.ready => SlotState::Running,
                    Some(_) => SlotState::Starting,
                    None if s.failed => SlotState::Failed,
                    None if s.restart_at.is_some() => SlotState::Backoff,
                    None => SlotState::Down,
                };
                Member {
                    role: s.name.role,
                    id: s.name.id,
                    pid: s.proc.as_ref().map_or(0, |p| p.pid),
                    state,
                    master: s.name == ctx.slot,
                    started_ms: s.proc.as_ref().map_or(0, |p| p.started_ms),
                    restarts: s.restarts,
                    last_cause: s.last_cause.map(|c| c.as_str().to_string()),
                }
            })
            .collect()
    }

    pub(super) fn status(&self, ctx: &DaemonCtx) -> StatusReport {
        StatusReport {
            master_pid: ctx.pid,
            runtime_dir: ctx.dir.path().display().to_string(),
            members: self.members(ctx),
            rejected: self.rejected.count,
            counters: self.counters.clone(),
        }
    }
}

impl Slot {
    pub(super) fn new(name: SlotName) -> Slot {
        Slot {
            name,
            proc: None,
            pending: Vec::new(),
            restart_at: None,
            recent_restarts: VecDeque::new(),
            quick_failures: 0,
            failed: false,
            restarts: 0,
            last_cause: None,
        }
    }

    /// Decides how long to wait before restarting this slot: the first restart is
    /// immediate, quick failures in a row back off exponentially, and more than
    /// `restart_intensity` restarts within `restart_period_ms` mark the slot failed,
    /// retried at the backoff cap — never a tight loop.
    pub(super) fn plan_restart(&mut self, ctx: &DaemonCtx, lived: Duration) -> Duration {
        let cfg = &ctx.config;
        let now = Instant::now();
        let period = Duration::from_millis(cfg.restart_period_ms);
        while self
            .recent_restarts
            .front()
            .is_some_and(|&t| now.duration_since(t) > period)
        {
            self.recent_restarts.pop_front();
        }
        self.recent_restarts.push_back(now);
        if lived >= QUICK_FAILURE {
            self.quick_failures = 0;
            self.failed = false;
        }
        let max = Duration::from_millis(cfg.backoff_max_ms);
        let delay = if self.quick_failures == 0 {
            Duration::ZERO
        } else {
            let shift = (self.quick_failures - 1).min(20);
            Duration::from_millis(cfg.backoff_initial_ms.saturating_mul(1 << shift)).min(max)
        };
        self.quick_failures = self.quick_failures.saturating_add(1);
        if self.recent_restarts.len() > cfg.restart_intensity as usize {
            self.failed = true;
            return max;
        }
        delay
    }
}

/// Writes what is left of the reply; true when done (or the peer is gone).
pub(super) fn flush(conn: &mut Conn) -> bool {
    while conn.written < conn.outbuf.len() {
        match conn.stream.write(&conn.outbuf[conn.written..]) {
            Ok(0) => return true,
            Ok(n) => conn.written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
    true
}

pub(super) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// One line per key that differs, for the reload's answer and the ledger.
pub(super) fn config_changes(
    old: &crate::config::Config,
    new: &crate::config::Config,
) -> Vec<String> {
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(old), serde_json::to_value(new))
    else {
        return Vec::new();
    };
    let mut out: Vec<String> = b
        .iter()
        .filter(|(k, v)| a.get(*k) != Some(*v))
        .map(|(k, v)| {
            format!(
                "{k}: {} -> {v}",
                a.get(k).map_or("unset".to_string(), |x| x.to_string())
            )
        })
        .collect();
    if out.is_empty() {
        out.push("nothing changed".into());
    }
    out
}
