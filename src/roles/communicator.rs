//! A communicator. The one holding `leader.lock` is the master: it spawns every other
//! daemon, holds a pidfd for each, answers the control socket and respawns what fails.
//! The others are standbys: they heartbeat like any daemon while a helper thread waits on
//! the lock; when the kernel hands it over (the master died), the standby becomes master,
//! adopting the running daemons from /proc.
//!
//! The loop's events: signals, the lock hand-over, the control socket and its
//! connections, one pidfd per daemon, and deadlines (heartbeat, delayed restarts,
//! connection time-outs).

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mio::net::{UnixListener, UnixStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use nix::sys::socket::{self, sockopt};

use crate::config::{Role, SlotName};
use crate::daemon::{DaemonCtx, Heartbeater, Rejections, Signals, poll_until};
use crate::ledger::{Event, Ledger, unix_ms_now};
use crate::procscan;
use crate::protocol::{self, Member, Request, Response, SlotState, StatusReport};
use crate::roles::master_watch::{KilledMaster, MasterWatch};
use crate::runtime_dir::LeaderLock;
use crate::spawn;

const SIGNALS: Token = Token(0);
const CONTROL: Token = Token(1);
const LOCK_HANDOVER: Token = Token(2);
const PIDFD_BASE: usize = 1 << 20;
const CONN_BASE: usize = 1 << 30;

/// A control connection that has not finished its request by then is dropped.
const CONN_TIMEOUT: Duration = Duration::from_secs(2);
/// A process that dies sooner than this after its start is a quick failure and backs off.
const QUICK_FAILURE: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    Crash,
    Hang,
    Failover,
    /// `nexus restart`: a replacement on purpose, not a failure.
    Manual,
}

impl Cause {
    fn as_str(self) -> &'static str {
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
struct Recovery {
    cause: Cause,
    old_pid: i32,
    detected: Instant,
    /// Failure to detection, where something measures it: the silence before a hang was
    /// acted on. A crash has none: the kernel reports it through the pidfd as it happens
    /// and gives no exit timestamp to subtract (chaos and the bench time it from outside).
    detect_ms: Option<f64>,
}

struct Proc {
    pid: i32,
    /// None for the master's own slot: it cannot watch itself.
    pidfd: Option<OwnedFd>,
    child: bool,
    started: Instant,
    started_ms: u64,
    ready: bool,
    /// Watchdogs that reported this pid silent.
    votes: Vec<u32>,
    /// Set once we have decided to kill it for a hang.
    killing: Option<Recovery>,
    /// The pidfd's token in our poll (Token(0) for ourselves: not watched).
    token: Token,
    /// Stopped on purpose (`nexus restart`): its exit is not a failure.
    manual: bool,
    /// SIGTERMed on purpose: SIGKILL at this time if still alive.
    kill_at: Option<Instant>,
    /// The config changed before it was ready: SIGHUP it once it is (earlier, before its
    /// handlers exist, SIGHUP would kill it).
    reload_when_ready: bool,
}

struct Slot {
    name: SlotName,
    proc: Option<Proc>,
    /// Failures not yet recovered: usually one, more if a replacement died before it
    /// was ready. The next ready process closes them all.
    pending: Vec<Recovery>,
    restart_at: Option<Instant>,
    recent_restarts: VecDeque<Instant>,
    quick_failures: u32,
    failed: bool,
    restarts: u32,
    last_cause: Option<Cause>,
}

struct Conn {
    stream: UnixStream,
    peer_pid: i32,
    inbuf: Vec<u8>,
    outbuf: Vec<u8>,
    written: usize,
    opened: Instant,
}

struct Master {
    lock: LeaderLock,
    listener: UnixListener,
    conns: HashMap<usize, Conn>,
    next_conn: usize,
    slots: Vec<Slot>,
    ledger: Ledger,
    stopping: bool,
    rejected: Rejections,
    whole_logged: bool,
    counters: crate::counters::Counters,
    /// pidfd tokens → the slot whose process they watch. Tokens are never reused, so a
    /// resize (which moves slot indices) cannot misroute an exit.
    tokens: HashMap<Token, SlotName>,
    next_token: usize,
    /// Processes of slots removed by a scale-down, being stopped.
    retiring: HashMap<Token, (SlotName, Proc)>,
    /// A validated config from `reload`/`scale`, applied by the loop after this event.
    pending_config: Option<crate::config::Config>,
    /// `nexus restart` of the master itself: exit after answering, a standby takes over.
    hand_over: bool,
    /// systemd's notify socket, when run under a Type=notify unit.
    notifier: Option<crate::notify::Notifier>,
}

struct Communicator {
    ctx: DaemonCtx,
    poll: Poll,
    heart: Heartbeater,
    master: Option<Master>,
    handover: Option<mpsc::Receiver<io::Result<LeaderLock>>>,
    /// A standby's health check of the master.
    watch: Option<MasterWatch>,
    killed_master: Option<KilledMaster>,
    log: crate::logfiles::DaemonLog,
    uid: u32,
}

pub fn run(ctx: DaemonCtx) -> Result<(), String> {
    let fresh = std::env::var_os(spawn::ENV_FRESH_START).is_some();
    let inherited: Option<i32> = std::env::var(spawn::ENV_LEADER_FD)
        .ok()
        .and_then(|v| v.parse().ok());
    let took_over_from = std::env::var(spawn::ENV_TAKEOVER_FROM).ok();
    // SAFETY: single-threaded at this point; removing our own marker variables.
    unsafe {
        std::env::remove_var(spawn::ENV_FRESH_START);
        std::env::remove_var(spawn::ENV_LEADER_FD);
        std::env::remove_var(spawn::ENV_TAKEOVER_FROM);
    }
    if inherited.is_some() {
        // We were another daemon a moment ago: log as what we are now.
        redirect_output(&ctx.dir.log_file(ctx.slot));
    }
    raise_fd_limit();

    let poll = Poll::new().map_err(|e| format!("cannot create poll: {e}"))?;
    let mut signals = Signals::new().map_err(|e| format!("cannot install signal handlers: {e}"))?;
    poll.registry()
        .register(&mut signals.source, SIGNALS, Interest::READABLE)
        .map_err(|e| format!("cannot poll signals: {e}"))?;
    let heart =
        Heartbeater::new(&ctx).map_err(|e| format!("cannot create heartbeat socket: {e}"))?;
    let lock_path = ctx.dir.leader_lock();
    let lock = match inherited {
        Some(fd) => Some(
            LeaderLock::from_inherited(fd).map_err(|e| format!("inherited leader lock: {e}"))?,
        ),
        None => LeaderLock::try_acquire(&lock_path)
            .map_err(|e| format!("cannot open {}: {e}", lock_path.display()))?,
    };
    let mut comm = Communicator {
        poll,
        heart,
        master: None,
        handover: None,
        watch: None,
        killed_master: None,
        log: ctx.log(),
        uid: nix::unistd::geteuid().as_raw(),
        ctx,
    };
    match lock {
        Some(lock) => comm.become_master(lock, fresh, took_over_from)?,
        None if fresh => {
            let holder = LeaderLock::recorded_pid(&lock_path).unwrap_or(0);
            return Err(format!(
                "another master (pid {holder}) already runs in {}",
                comm.ctx.dir.display()
            ));
        }
        None => comm.wait_for_lock()?,
    }

    let mut events = Events::with_capacity(256);
    loop {
        let now = Instant::now();
        if comm.heart.tick(now).is_some() {
            comm.log.maybe_rotate();
            if let Some(m) = comm.master.as_ref() {
                m.lock.touch();
            }
        }
        let mut wake = comm.heart.next_due();
        if let Some(w) = comm.watch.as_mut() {
            if let Some(k) = w.tick(now) {
                comm.killed_master = Some(k);
            }
            wake = wake.min(w.next_due());
        }
        if let Some(m) = comm.master.as_mut() {
            m.run_due_restarts(&comm.ctx, &comm.poll, now);
            m.escalate_kills(now);
            m.notify_status();
            if let Some(n) = m.notifier.as_mut() {
                n.tick(now);
                if let Some(t) = n.next_due() {
                    wake = wake.min(t);
                }
            }
            if let Some(t) = m.next_deadline() {
                wake = wake.min(t);
            }
        }
        poll_until(&mut comm.poll, &mut events, wake)?;
        for event in events.iter() {
            match event.token() {
                SIGNALS => {
                    if signals.drain() {
                        comm.terminate();
                        return Ok(());
                    }
                    if signals.take_reload() && comm.master.is_none() {
                        comm.reload_as_standby()?;
                    }
                }
                LOCK_HANDOVER => comm.on_handover()?,
                t => {
                    if let Some(m) = comm.master.as_mut() {
                        m.on_event(&comm.ctx, &comm.poll, t, comm.uid);
                    }
                }
            }
        }
        if let Some(m) = comm.master.as_mut() {
            m.expire_conns(&comm.poll);
        }
        if let Some(cfg) = comm.master.as_mut().and_then(|m| m.pending_config.take()) {
            comm.apply_config(cfg)?;
        }
        if comm.master.as_ref().is_some_and(|m| m.hand_over) {
            log::info!("restart requested: handing over to a standby");
            comm.terminate();
            return Ok(());
        }
    }
}

fn redirect_output(log: &std::path::Path) {
    use std::os::unix::fs::OpenOptionsExt;
    if let Ok(f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(log)
    {
        let _ = nix::unistd::dup2(f.as_raw_fd(), 1);
        let _ = nix::unistd::dup2(f.as_raw_fd(), 2);
    }
}

/// A master at scale holds two fds per daemon (pidfd, connection bursts); the default
/// soft limit of 1024 is too low for a thousand workflows.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

impl Communicator {
    /// A standby: a small helper thread blocks on the lock and wakes the loop when the
    /// kernel hands it over, so our heartbeats go on meanwhile.
    fn wait_for_lock(&mut self) -> Result<(), String> {
        let waker = Waker::new(self.poll.registry(), LOCK_HANDOVER)
            .map_err(|e| format!("cannot create waker: {e}"))?;
        let (tx, rx) = mpsc::channel();
        let path = self.ctx.dir.leader_lock();
        std::thread::Builder::new()
            .name("leader-lock".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                let _ = tx.send(LeaderLock::acquire_blocking(&path));
                let _ = waker.wake();
                // Keep the waker alive until the main loop has read the lock.
                std::thread::sleep(Duration::from_secs(1));
            })
            .map_err(|e| format!("cannot start the lock thread: {e}"))?;
        self.handover = Some(rx);
        self.watch = Some(MasterWatch::new(&self.ctx));
        log::info!("standby: waiting for the leader lock");
        Ok(())
    }

    fn on_handover(&mut self) -> Result<(), String> {
        let Some(rx) = self.handover.as_ref() else {
            return Ok(());
        };
        match rx.try_recv() {
            Ok(Ok(lock)) => {
                self.handover = None;
                self.watch = None;
                self.become_master(lock, false, None)
            }
            Ok(Err(e)) => Err(format!("waiting for the leader lock failed: {e}")),
            Err(_) => Ok(()),
        }
    }

    fn become_master(
        &mut self,
        mut lock: LeaderLock,
        fresh: bool,
        took_over_from: Option<String>,
    ) -> Result<(), String> {
        let dir = &self.ctx.dir;
        if !fresh && dir.stopping_marker().exists() {
            log::info!("the cluster is being stopped: not taking over");
            std::process::exit(0);
        }
        let previous = LeaderLock::recorded_pid(&dir.leader_lock()).filter(|&p| p != self.ctx.pid);
        let previous_slot = crate::ledger::last_master(&dir.events())
            .filter(|&(pid, _)| Some(pid) == previous)
            .map(|(_, slot)| slot);
        lock.write_pid(self.ctx.pid as u32)
            .map_err(|e| format!("cannot write leader.lock: {e}"))?;
        let left_slot = took_over_from.as_deref().and_then(SlotName::parse);
        // Read before we write anything to it ourselves.
        let history = crate::ledger::History::read(&dir.events());
        // Did we kill the old master for not answering? Then its recovery is a hang's.
        let hung = self
            .killed_master
            .take()
            .filter(|k| Some(k.pid) == previous);
        let previous_cause = if hung.is_some() {
            Cause::Hang
        } else {
            Cause::Failover
        };
        let hung_ms = hung.map_or(0, |k| k.silent_ms);

        // The control socket first: it is what clients are waiting for.
        let path = dir.control_socket();
        let _ = std::fs::remove_file(&path);
        let mut listener = UnixListener::bind(&path)
            .map_err(|e| format!("cannot bind {}: {e}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("cannot chmod {}: {e}", path.display()))?;
        self.poll
            .registry()
            .register(&mut listener, CONTROL, Interest::READABLE)
            .map_err(|e| format!("cannot poll the control socket: {e}"))?;
        let ledger = Ledger::open(
            &dir.events(),
            self.ctx.config.log_max_bytes,
            self.ctx.config.log_files,
        )
        .map_err(|e| format!("cannot open the ledger: {e}"))?;

        let slots = self.ctx.config.slots().into_iter().map(Slot::new).collect();
        let mut m = Master {
            lock,
            listener,
            conns: HashMap::new(),
            next_conn: 0,
            slots,
            ledger,
            stopping: false,
            rejected: Rejections::new(),
            whole_logged: false,
            tokens: HashMap::new(),
            next_token: PIDFD_BASE,
            retiring: HashMap::new(),
            pending_config: None,
            hand_over: false,
            notifier: crate::notify::Notifier::from_env(),
            // A successor carries the counts on from the ledger; this takeover is one more.
            counters: if fresh {
                crate::counters::Counters::default()
            } else {
                let mut c = history.counters.clone();
                c.leader_changes += 1;
                c
            },
        };
        let me = self
            .ctx
            .config
            .slot_index(self.ctx.slot)
            .ok_or("our own slot is not in the config")?;
        m.slots[me].proc = Some(Proc {
            pid: self.ctx.pid,
            pidfd: None,
            child: false,
            started: Instant::now(),
            started_ms: unix_ms_now(),
            ready: true,
            votes: Vec::new(),
            killing: None,
            token: Token(0),
            manual: false,
            kill_at: None,
            reload_when_ready: false,
        });
        self.heart.mark_ready_told();
        m.adopt(&self.ctx, &self.poll);

        let mut ev = Event::new(if fresh { "started" } else { "leader" });
        ev.role = Some(Role::Communicator);
        ev.id = Some(self.ctx.slot.id);
        ev.pid = Some(self.ctx.pid);
        if !fresh {
            ev.old_pid = previous;
            ev.cause = Some("failover".into());
            ev.detail =
                left_slot.map(|from| format!("every communicator was gone; taken over by {from}"));
        }
        if let (Some(k), Some(slot)) = (hung, previous_slot) {
            let mut killed = Event::new("killed");
            killed.role = Some(slot.role);
            killed.id = Some(slot.id);
            killed.pid = Some(k.pid);
            killed.cause = Some("hang".into());
            killed.detect_ms = Some(k.silent_ms as f64);
            killed.detail = Some(format!(
                "the master did not answer for {} ms; killed by a standby",
                k.silent_ms
            ));
            m.ledger.append(&killed);
        }
        m.ledger.append(&ev);
        log::info!(
            "master of {} (previous master: {previous:?})",
            dir.display()
        );

        if !fresh {
            let takeover = Takeover {
                previous,
                previous_slot,
                previous_cause,
                hung_ms,
                left_slot,
                me: self.ctx.slot,
                my_pid: self.ctx.pid,
            };
            m.reconcile(&self.ctx, &takeover, &history);
        }
        // Watchdogs first, so the others find their sockets when they first beat.
        for role in [Role::Watchdog, Role::Communicator, Role::Workflow] {
            for i in 0..m.slots.len() {
                if m.slots[i].name.role == role && m.slots[i].proc.is_none() {
                    m.spawn_slot(&self.ctx, &self.poll, i);
                }
            }
        }
        self.master = Some(m);
        Ok(())
    }

    /// The master applies a reload or scale: config.json first (new daemons read it),
    /// then our own view, then the slots; every daemon is told with a SIGHUP.
    fn apply_config(&mut self, cfg: crate::config::Config) -> Result<(), String> {
        self.ctx
            .dir
            .write_config(&cfg)
            .map_err(|e| format!("cannot write config.json: {e}"))?;
        let changes = config_changes(&self.ctx.config, &cfg);
        self.ctx.config = cfg;
        self.heart = Heartbeater::new(&self.ctx)
            .map_err(|e| format!("cannot create heartbeat socket: {e}"))?;
        self.heart.mark_ready_told();
        self.log = self.ctx.log();
        if let Some(m) = self.master.as_mut() {
            let mut ev = Event::new("reloaded");
            ev.detail = Some(changes.join("; "));
            m.ledger.append(&ev);
            m.whole_logged = false;
            m.resize(&self.ctx, &self.poll);
        }
        Ok(())
    }

    fn reload_as_standby(&mut self) -> Result<(), String> {
        match self.ctx.reload_config() {
            Ok(true) => {
                self.heart = Heartbeater::new(&self.ctx)
                    .map_err(|e| format!("cannot create heartbeat socket: {e}"))?;
                self.heart.mark_ready_told();
                self.watch = Some(MasterWatch::new(&self.ctx));
                self.log = self.ctx.log();
                Ok(())
            }
            Ok(false) => {
                log::info!("our slot was scaled away");
                std::process::exit(0);
            }
            Err(e) => {
                log::warn!("cannot reload the config: {e}");
                Ok(())
            }
        }
    }

    fn terminate(&mut self) {
        if let Some(m) = self.master.as_mut() {
            // Unlink before the lock is released at exit: a standby binds only after it
            // holds the lock, so we can never remove its socket.
            let _ = std::fs::remove_file(self.ctx.dir.control_socket());
            let mut ev = Event::new(if m.stopping { "stopped" } else { "leader_exit" });
            ev.role = Some(Role::Communicator);
            ev.id = Some(self.ctx.slot.id);
            ev.pid = Some(self.ctx.pid);
            m.ledger.append(&ev);
        }
        log::info!("terminating on signal");
    }
}

/// What a new master knows about how it came to be one.
struct Takeover {
    previous: Option<i32>,
    previous_slot: Option<SlotName>,
    previous_cause: Cause,
    hung_ms: u64,
    left_slot: Option<SlotName>,
    me: SlotName,
    my_pid: i32,
}

impl Master {
    /// After a takeover, picks up the failures the old master could not finish: each
    /// becomes a pending recovery of its slot (closed when the replacement is ready), or is
    /// closed at once where a live process already fills the slot. An empty slot whose
    /// last known pid is dead is a failure too, so that no loss goes unrecorded.
    fn reconcile(&mut self, ctx: &DaemonCtx, t: &Takeover, history: &crate::ledger::History) {
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
    fn record_respawn(
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
    fn adopt(&mut self, ctx: &DaemonCtx, poll: &Poll) {
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
    fn watch(&mut self, poll: &Poll, fd: &OwnedFd, name: SlotName) -> io::Result<Token> {
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

    fn unwatch(&mut self, poll: &Poll, proc: &Proc) {
        if let Some(fd) = &proc.pidfd {
            let _ = poll.registry().deregister(&mut SourceFd(&fd.as_raw_fd()));
        }
        self.tokens.remove(&proc.token);
    }

    fn spawn_slot(&mut self, ctx: &DaemonCtx, poll: &Poll, i: usize) {
        let name = self.slots[i].name;
        self.slots[i].restart_at = None;
        match spawn::spawn_daemon(&ctx.exe, name, &ctx.dir) {
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

    fn schedule_retry(&mut self, ctx: &DaemonCtx, i: usize) {
        let delay = self.slots[i].plan_restart(ctx, Duration::ZERO);
        self.slots[i].restart_at = Some(Instant::now() + delay.max(Duration::from_millis(1)));
    }

    fn run_due_restarts(&mut self, ctx: &DaemonCtx, poll: &Poll, now: Instant) {
        if self.stopping {
            return;
        }
        for i in 0..self.slots.len() {
            if self.slots[i].proc.is_none() && self.slots[i].restart_at.is_some_and(|t| t <= now) {
                self.spawn_slot(ctx, poll, i);
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let restarts = self.slots.iter().filter_map(|s| s.restart_at);
        let conns = self.conns.values().map(|c| c.opened + CONN_TIMEOUT);
        let kills = self.slots.iter().filter_map(|s| s.proc.as_ref()?.kill_at);
        let retiring = self.retiring.values().filter_map(|(_, p)| p.kill_at);
        restarts.chain(conns).chain(kills).chain(retiring).min()
    }

    fn on_event(&mut self, ctx: &DaemonCtx, poll: &Poll, token: Token, uid: u32) {
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

    /// A daemon exited. The hot path is reap → spawn; bookkeeping comes after.
    fn on_exit(&mut self, ctx: &DaemonCtx, poll: &Poll, i: usize) {
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
        self.unwatch(poll, &proc);
        let slot = &mut self.slots[i];
        let how = if proc.child {
            spawn::reap(proc.pid)
        } else {
            None
        };
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
    fn status_line(&self) -> String {
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

    fn notify_status(&mut self) {
        if self.notifier.is_some() {
            let line = self.status_line();
            if let Some(n) = self.notifier.as_mut() {
                n.status(&line);
            }
        }
    }

    /// A process of a slot removed by a scale-down has ended.
    fn on_retired_exit(&mut self, poll: &Poll, token: Token) {
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
    fn terminate_proc(proc: &mut Proc, grace: Duration) {
        if let Some(fd) = &proc.pidfd {
            let _ = spawn::pidfd_signal(fd, libc::SIGTERM);
        }
        proc.kill_at = Some(Instant::now() + grace);
    }

    /// Processes stopped on purpose that ignored SIGTERM for the grace period.
    fn escalate_kills(&mut self, now: Instant) {
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

    fn accept_all(&mut self, poll: &Poll, uid: u32) {
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

    fn on_conn(&mut self, ctx: &DaemonCtx, poll: &Poll, id: usize) {
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

    fn close(&mut self, poll: &Poll, id: usize) {
        if let Some(mut c) = self.conns.remove(&id) {
            let _ = poll.registry().deregister(&mut c.stream);
        }
    }

    fn expire_conns(&mut self, poll: &Poll) {
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

    fn handle(&mut self, ctx: &DaemonCtx, peer: i32, req: Request) -> Response {
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
    fn restart(&mut self, ctx: &DaemonCtx, name: SlotName) -> Response {
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
    fn accept_config(&mut self, ctx: &DaemonCtx, text: &str) -> Response {
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
    fn resize(&mut self, ctx: &DaemonCtx, poll: &Poll) {
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

    fn on_ready(&mut self, peer: i32, name: SlotName, pid: i32) -> Response {
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

    fn on_silent(
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
    fn quorum(&self, subject: SlotName) -> usize {
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

    fn members(&self, ctx: &DaemonCtx) -> Vec<Member> {
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

    fn status(&self, ctx: &DaemonCtx) -> StatusReport {
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
    fn new(name: SlotName) -> Slot {
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
    fn plan_restart(&mut self, ctx: &DaemonCtx, lived: Duration) -> Duration {
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
fn flush(conn: &mut Conn) -> bool {
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

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// One line per key that differs, for the reload's answer and the ledger.
fn config_changes(old: &crate::config::Config, new: &crate::config::Config) -> Vec<String> {
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
