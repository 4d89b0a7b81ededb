//! A workflow hosting one service instance: the I/O around the instance's state machine.
//! It starts the program (or adopts it from the record a predecessor left), watches its
//! pidfd, moves its output into its log, runs its probes, serves its notify socket, and
//! does what each transition of `machine.rs` asks. Its events come from the workflow's
//! loop; its timers are deadlines of that loop.
//!
//! The hot path of a crash is `on_main_exit`: peek the status (without reaping, so the
//! process group cannot be reused), kill the rest of the old group, spawn the replacement;
//! reaping, the old tree's sweep, the ledger and the record come after.

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Interest, Poll, Token};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

use crate::child::{self, Ended, Program, Stdio};
use crate::chore::Chore;
use crate::config::{Config, Role};
use crate::daemon::{DaemonCtx, Rng};
use crate::ledger::{Appender, Cause, Event};
use crate::procscan;
use crate::restart_policy::{Backoff, STABLE_RUN_MS, mono_ms};
use crate::runtime_dir::RuntimeDir;
use crate::services::machine::{AfterStop, Do, Phase, Rules};
use crate::services::notify_socket::{Notice, NotifySocket};
use crate::services::output::{self, LogFile, Scratch, Stream, Which};
use crate::services::probes::{Prober, Verdict};
use crate::services::spec::{Condition, InstanceName, ProbeKind, ServiceSpec};
use crate::services::state::{self, Desired, Host as HostRec, Record, RunRecord, Stats};
use crate::services::tree::{self, Identity, Tree};
use crate::spawn;

pub const T_INOTIFY: Token = Token(1);
pub const T_MAIN: Token = Token(2);
pub const T_NOTIFY: Token = Token(3);
pub const T_READY_PROBE: Token = Token(4);
pub const T_LIVE_PROBE: Token = Token(5);
/// Output streams get tokens from here up.
const T_STREAMS: usize = 16;
/// Probe counts reach their file at most this often: a metrics scrape is slower still,
/// and a hundred probed services must not cost a file write each every interval.
const STATS_EVERY: Duration = Duration::from_secs(5);
/// When only passing checks and log lines were counted, this often: a write and rename
/// cost about as much as a probe on this kind of machine, and those counts matter to a
/// rate over minutes, not to an alert.
const STATS_ROUTINE_EVERY: Duration = Duration::from_secs(30);

/// The program run this host watches.
struct Live {
    pid: i32,
    pidfd: OwnedFd,
    /// Our child (spawned here): its exit status can be read. An adopted one is not.
    ours: bool,
    started_mono: u64,
    tree: Tree,
}

/// What the workflow should do with this host after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostState {
    Running,
    /// Done: the program is stopped (shutdown, or removed from the config).
    Finished,
}

pub struct Host {
    dir: RuntimeDir,
    name: InstanceName,
    spec: ServiceSpec,
    rules: Rules,
    /// The cluster's hang timeout: a program stopped (SIGSTOP) this long is hung.
    stop_timeout: Duration,
    interval: Duration,
    me: HostRec,
    record: Record,
    live: Option<Live>,
    /// The pid of the last run, for the next `respawned` line's old_pid.
    last_pid: Option<i32>,
    streams: Vec<(Token, Stream)>,
    next_stream_token: usize,
    log: LogFile,
    scratch: Scratch,
    notify: Option<NotifySocket>,
    ready_probe: Option<Prober>,
    liveness: Option<Prober>,
    log_regex: Option<regex_lite::Regex>,
    last_watchdog: Option<Instant>,
    stopped_since: Option<Instant>,
    /// Whether the program is stopped (SIGSTOP): read from /proc on the loop's wakes.
    stop_check: Chore,
    /// A stopped program is hung at this instant.
    stopped_deadline: Option<Instant>,
    inotify: Inotify,
    desired: Desired,
    ledger: Appender,
    rng: Rng,
    base_env: Vec<String>,
    cgroup: Option<tree::Cgroup>,
    /// Another workflow still hosts it (a move in progress, or one being replaced).
    waiting_for: Option<HostRec>,
    /// The definitions of the services it depends on (for their instances and hashes).
    deps: Vec<ServiceSpec>,
    /// The program, prepared for a fast restart; made again after a change of definition
    /// or a failed start.
    prepared: Option<child::Prepared>,
    /// The program's stdin, kept open for the next start.
    devnull: std::fs::File,
    /// The definition changed: restart once the dependencies are back.
    reload_pending: bool,
    stats: Stats,
    stats_dirty: bool,
    /// A failed check, a new error or a rejected datagram is among the unwritten counts.
    stats_urgent: bool,
    stats_write: Chore,
    stats_routine: Chore,
    finished: bool,
}

impl Host {
    /// Hosts instance `name` of `spec` in workflow `ctx.slot`: adopts its program if one
    /// runs, or starts it once its dependencies are met.
    pub fn new(
        ctx: &DaemonCtx,
        poll: &Poll,
        spec: &ServiceSpec,
        name: InstanceName,
    ) -> Result<Host, String> {
        let dir = ctx.dir.clone();
        for d in [
            state::state_dir(&dir),
            state::stats_dir(&dir),
            state::cursor_dir(&dir),
        ] {
            std::fs::create_dir_all(&d)
                .map_err(|e| format!("cannot create {}: {e}", d.display()))?;
        }
        let log = LogFile::open(
            &state::log_path(&dir, &name),
            ctx.config.log_max_bytes,
            ctx.config.log_files,
        )
        .map_err(|e| format!("cannot open the log of {name}: {e}"))?;
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(|e| format!("inotify: {e}"))?;
        inotify
            .add_watch(
                &state::state_dir(&dir),
                AddWatchFlags::IN_MOVED_TO
                    | AddWatchFlags::IN_CLOSE_WRITE
                    | AddWatchFlags::IN_DELETE,
            )
            .map_err(|e| format!("cannot watch the services' states: {e}"))?;
        poll.registry()
            .register(
                &mut SourceFd(&std::os::fd::AsFd::as_fd(&inotify).as_raw_fd()),
                T_INOTIFY,
                Interest::READABLE,
            )
            .map_err(|e| format!("cannot poll inotify: {e}"))?;
        let me = HostRec {
            workflow: ctx.slot.id,
            pid: ctx.pid,
        };
        let mut host = Host {
            rules: rules_of(spec, &ctx.config),
            stop_timeout: ctx.config.timeout(),
            interval: ctx.config.interval(),
            spec: spec.clone(),
            record: Record::new(&name, spec.definition_hash()),
            name,
            dir,
            me,
            live: None,
            last_pid: None,
            streams: Vec::new(),
            next_stream_token: T_STREAMS,
            log,
            scratch: Scratch::new(),
            notify: None,
            ready_probe: None,
            liveness: None,
            log_regex: None,
            last_watchdog: None,
            stopped_since: None,
            stop_check: {
                let (early, late) = stop_check_window(ctx.config.interval(), ctx.config.timeout());
                Chore::new(early, late, Instant::now())
            },
            stopped_deadline: None,
            inotify,
            desired: Desired::default(),
            ledger: Appender::new(&ctx.dir.events()),
            rng: Rng::seeded(ctx.pid as u64 ^ 0x5eed),
            base_env: base_env(),
            cgroup: None,
            waiting_for: None,
            deps: deps_of(spec, &ctx.config),
            prepared: None,
            devnull: std::fs::File::open("/dev/null")
                .map_err(|e| format!("cannot open /dev/null: {e}"))?,
            reload_pending: false,
            stats: Stats::default(),
            stats_dirty: false,
            stats_urgent: false,
            stats_write: {
                let (early, late) = stats_window(ctx.config.interval());
                Chore::new(early, late, Instant::now())
            },
            stats_routine: Chore::new(
                STATS_ROUTINE_EVERY,
                STATS_ROUTINE_EVERY + STATS_ROUTINE_EVERY / 2,
                Instant::now(),
            ),
            finished: false,
        };
        host.stats = state::read_stats(&host.dir, &host.name);
        host.bind_notify(poll);
        host.desired = Desired::read(&host.dir);
        host.take_over(poll);
        Ok(host)
    }

    pub fn name(&self) -> &InstanceName {
        &self.name
    }

    pub fn state(&self) -> HostState {
        if self.finished {
            HostState::Finished
        } else {
            HostState::Running
        }
    }

    fn bind_notify(&mut self, poll: &Poll) {
        let path = state::notify_path(&self.dir, &self.name);
        let abstract_name = format!("nexus-{}-{}", state::dir_tag(&self.dir), self.name);
        match NotifySocket::bind(&path, &abstract_name) {
            Ok(mut s) => {
                if poll
                    .registry()
                    .register(&mut s.sock, T_NOTIFY, Interest::READABLE)
                    .is_ok()
                {
                    self.notify = Some(s);
                }
            }
            Err(e) => log::warn!("{}: no notify socket: {e}", self.name),
        }
    }

    /// Picks the instance up: from a predecessor's record if there is one (adopting a
    /// running program, or noting one that died unsupervised), else fresh.
    fn take_over(&mut self, poll: &Poll) {
        // The predecessor wrote its last counts when it let go: carry those on.
        self.stats = state::read_stats(&self.dir, &self.name);
        let Some(rec) = state::read_record(&self.dir, &self.name) else {
            self.record.host = Some(self.me);
            self.save();
            self.evaluate(poll);
            return;
        };
        if let Some(h) = rec.host
            && h.pid != self.me.pid
            && host_alive(&self.dir, h)
        {
            log::info!(
                "{}: still hosted by workflow-{} pid {}; waiting for it to let go",
                self.name,
                h.workflow,
                h.pid
            );
            self.record = rec;
            self.waiting_for = Some(h);
            return;
        }
        self.waiting_for = None;
        let previous = rec.host;
        self.record = rec;
        self.record.host = Some(self.me);
        let from = previous.map_or("no workflow".to_string(), |h| {
            format!("workflow-{} pid {}", h.workflow, h.pid)
        });
        match self.record.run.clone() {
            Some(run) if self.record.machine.phase.running() => match verify(&run) {
                Some(pidfd) => self.adopt(poll, run, pidfd, &from),
                None => self.died_unsupervised(poll, run),
            },
            _ => {
                self.record.run = None;
                if self.record.machine.phase.running() {
                    self.record.machine.phase = Phase::Waiting;
                }
                self.save();
                self.evaluate(poll);
            }
        }
    }

    /// The program survived its workflow: watch it again, take its output pipes back.
    fn adopt(&mut self, poll: &Poll, run: RunRecord, pidfd: OwnedFd, from: &str) {
        if poll
            .registry()
            .register(
                &mut SourceFd(&pidfd.as_raw_fd()),
                T_MAIN,
                Interest::READABLE,
            )
            .is_err()
        {
            log::error!("{}: cannot watch pid {}", self.name, run.pid);
        }
        let id = Identity {
            pgid: run.pgid,
            token: run.token.clone(),
            cgroup: run.cgroup.clone(),
        };
        self.cgroup = run.cgroup.as_deref().and_then(tree::Cgroup::existing);
        let mut holders = vec![run.pid];
        holders.extend(keepers(&self.dir));
        for (i, which) in [Which::Out, Which::Err].into_iter().enumerate() {
            match output::reopen_pipe(&holders, run.pipes[i]) {
                Some(fd) => self.add_stream(poll, which, fd),
                None => log::warn!(
                    "{}: the program's std{} pipe is gone; its output is not captured",
                    self.name,
                    which.as_str()
                ),
            }
        }
        self.live = Some(Live {
            pid: run.pid,
            pidfd,
            ours: false,
            started_mono: run.started_mono_ms,
            tree: Tree::new(id),
        });
        self.last_pid = Some(run.pid);
        self.record.run = Some(RunRecord {
            adopted: true,
            ..run.clone()
        });
        match self.record.machine.phase {
            Phase::Starting => self.start_ready_probe(),
            Phase::Ready | Phase::Unhealthy { .. } => self.start_liveness(),
            _ => {}
        }
        if self.record.machine.phase.is_ready() {
            self.last_watchdog = Some(Instant::now());
        }
        let mut ev = self.event("adopted", Some(run.pid));
        ev.detail = Some(format!("still running; was hosted by {from}"));
        self.ledger.append(&ev);
        log::info!("{}: adopted pid {} from {from}", self.name, run.pid);
        self.save();
        self.pump_all(false);
    }

    /// The record names a program that is gone and nobody saw it end: its status is
    /// unknown; it is restarted per its policy, and what is left of its tree is killed.
    fn died_unsupervised(&mut self, poll: &Poll, run: RunRecord) {
        let old = Tree::new(Identity {
            pgid: run.pgid,
            token: run.token.clone(),
            cgroup: None,
        });
        old.signal_all(libc::SIGKILL);
        self.cgroup = run.cgroup.as_deref().and_then(tree::Cgroup::existing);
        self.record.run = None;
        self.last_pid = Some(run.pid);
        let mut ev = self.event("exited", Some(run.pid));
        ev.cause = Some(Cause::Crash.as_str().into());
        ev.detail = Some("exit status unknown: it ended while no workflow hosted it".into());
        self.ledger.append(&ev);
        let now = mono_ms();
        let lived = now.saturating_sub(run.started_mono_ms);
        let jitter = self.rng.unit();
        let d = self
            .record
            .machine
            .on_exit(None, lived, &self.rules, now, jitter);
        self.act(poll, d);
        self.save();
    }

    fn event(&self, kind: &str, pid: Option<i32>) -> Event {
        Event {
            pid,
            service: Some(self.name.service.clone()),
            instance: Some(self.name.n),
            workflow: Some(self.me.workflow),
            ..Event::new(kind)
        }
    }

    fn save(&mut self) {
        self.record.updated_ms = crate::ledger::unix_ms_now();
        if let Err(e) = state::write_record(&self.dir, &self.record) {
            log::warn!("{}: cannot write its record: {e}", self.name);
        }
    }

    /// Re-decides what to do about the users' wishes, a pending reload and the
    /// dependencies (after any change of a record or of desired.json).
    fn evaluate(&mut self, poll: &Poll) {
        if self.waiting_for.is_some() || self.finished {
            return;
        }
        let now = mono_ms();
        let want = self.desired.of(&self.name);
        let before = self.record.machine.clone();
        if want.stopped {
            let stopping_already = matches!(
                self.record.machine.phase,
                Phase::Stopped
                    | Phase::Stopping {
                        then: AfterStop::Stay | AfterStop::Exit,
                        ..
                    }
            );
            if !stopping_already {
                let d = self.record.machine.user_stop(&self.rules, now);
                self.act(poll, d);
            }
        } else if self.record.machine.phase == Phase::Stopped {
            self.record.machine.user_start();
        }
        if want.start_gen > self.record.start_gen {
            self.record.start_gen = want.start_gen;
            if !want.stopped {
                self.record.machine.user_start();
            }
        }
        if want.restart_gen > self.record.restart_gen {
            self.record.restart_gen = want.restart_gen;
            if !want.stopped {
                let d = self.record.machine.user_restart(&self.rules, now);
                self.act(poll, d);
            }
        }
        if self.reload_pending && !want.stopped && self.deps_met(true) {
            self.reload_pending = false;
            let d = self.record.machine.user_restart(&self.rules, now);
            self.act(poll, d);
        }
        if self.record.machine.may_start() && !want.stopped && self.deps_met(false) {
            self.spawn(poll, false);
        }
        if self.record.machine != before {
            self.save();
        }
    }

    /// Whether the record file `name` is one of a dependency's instances.
    fn watches(&self, name: &str) -> bool {
        name.strip_suffix(".json")
            .and_then(InstanceName::parse)
            .is_some_and(|i| self.spec.depends_on.contains_key(&i.service))
    }

    /// Every dependency meets its condition. With `current`, each must also run its
    /// current definition (a reload restarts in dependency order).
    fn deps_met(&self, current: bool) -> bool {
        self.spec.depends_on.iter().all(|(dep, cond)| {
            let Some(dep_spec) = self.deps.iter().find(|d| &d.name == dep) else {
                return true;
            };
            let hash = format!("{:016x}", dep_spec.definition_hash());
            (1..=dep_spec.instances).all(|n| {
                let Some(r) = state::read_record(&self.dir, &dep_spec.instance(n)) else {
                    return false;
                };
                if current && r.spec_hash != hash {
                    return false;
                }
                match cond {
                    Condition::Started => {
                        r.machine.phase.running() || r.machine.phase == Phase::Completed
                    }
                    Condition::Ready => r.machine.phase.is_ready(),
                    Condition::Completed => r.machine.phase == Phase::Completed,
                }
            })
        })
    }

    fn act(&mut self, poll: &Poll, d: Do) {
        match d {
            Do::Nothing => {}
            Do::Spawn => self.spawn(poll, false),
            Do::Stop => {
                if let Some(l) = &self.live {
                    l.tree.signal_all(self.spec.stop_signal.0);
                }
            }
            Do::Kill => {
                if let Some(l) = &self.live {
                    l.tree.signal_all(libc::SIGKILL);
                }
            }
            Do::Exit => self.finish(),
        }
    }

    /// The program as it is started, but for its run's token (`tree::TREE_VAR`).
    fn program(&self) -> Result<Program, String> {
        let mut env = self.base_env.clone();
        env.extend(self.spec.env.iter().map(|(k, v)| format!("{k}={v}")));
        env.push(format!("NEXUS_SERVICE={}", self.name.service));
        env.push(format!("NEXUS_INSTANCE={}", self.name.n));
        if let Some(n) = &self.notify {
            env.push(format!("NOTIFY_SOCKET={}", n.address));
        }
        if let Some(w) = self.spec.watchdog_ms {
            env.push(format!("WATCHDOG_USEC={}", w * 1000));
        }
        let mut identity = None;
        if let Some(u) = &self.spec.user {
            let user = crate::services::identity::lookup_user(u)
                .ok_or_else(|| format!("user {u:?} does not exist"))?;
            let mut groups = crate::services::identity::groups_of(&user);
            let gid = match &self.spec.group {
                Some(g) => crate::services::identity::lookup_group(g)
                    .ok_or_else(|| format!("group {g:?} does not exist"))?,
                None => user.gid,
            };
            groups.retain(|&x| x != gid);
            groups.insert(0, gid);
            for (k, v) in [
                ("HOME", user.home.display().to_string()),
                ("USER", user.name.clone()),
                ("LOGNAME", user.name.clone()),
            ] {
                if !self.spec.env.contains_key(k) {
                    env.retain(|kv| !kv.starts_with(&format!("{k}=")));
                    env.push(format!("{k}={v}"));
                }
            }
            identity = Some((user.uid, gid, groups));
        }
        let by_cgroup: Vec<String> = self
            .record
            .limits
            .iter()
            .filter(|l| l.contains("(cgroup"))
            .cloned()
            .collect();
        let (rlimits, _) =
            tree::rlimits_for(&self.spec.limits, &by_cgroup, self.spec.user.is_some());
        Ok(Program {
            argv: self.spec.run.argv(),
            env,
            cwd: self.spec.cwd.clone(),
            identity,
            rlimits,
        })
    }

    /// Starts the program. On the crash path this is the hot path: nothing but the
    /// cgroup's leftovers is dealt with before the fork.
    /// `after_exit`: right after the program ended, on the crash path. Its group was killed
    /// and its tree is swept by its token after the spawn, so the cgroup is not read first.
    fn spawn(&mut self, poll: &Poll, after_exit: bool) {
        let cause = self.record.machine.pending_cause.take();
        // Removed under our feet (by hand, or a cleanup): made again.
        if !after_exit && self.cgroup.as_ref().is_some_and(|c| !c.path.exists()) {
            self.cgroup = None;
        }
        if !after_exit
            && let Some(cg) = &self.cgroup
            && !cg.pids().is_empty()
        {
            cg.kill();
        }
        // One that was killed is made again if it is empty (see `tree::Cgroup::clean`).
        if self
            .cgroup
            .as_ref()
            .is_some_and(|c| !c.clean() && c.remove())
        {
            self.cgroup = None;
        }
        if self.cgroup.is_none() {
            let (cg, applied) = tree::prepare_cgroup(
                &state::dir_tag(&self.dir),
                &self.name.to_string(),
                &self.spec.limits,
            );
            self.record.cgroup = cg.as_ref().map(|c| c.path.clone());
            self.cgroup = cg;
            let (_, said) =
                tree::rlimits_for(&self.spec.limits, &applied, self.spec.user.is_some());
            self.record.limits = applied.into_iter().chain(said).collect();
        }
        let token = tree::new_token(&mut self.rng);
        if self.prepared.is_none() {
            self.prepared = match self
                .program()
                .and_then(|p| child::Prepared::new(&p).map_err(|e| e.to_string()))
            {
                Ok(p) => Some(p),
                Err(e) => {
                    self.start_failed(e);
                    return;
                }
            };
        }
        let token_var = std::ffi::CString::new(format!("{}={token}", tree::TREE_VAR)).ok();
        let Some(prep) = self.prepared.as_ref() else {
            return;
        };
        let started = (|| {
            let (out_r, out_w) = output::new_pipe().map_err(|e| format!("pipe: {e}"))?;
            let (err_r, err_w) = output::new_pipe().map_err(|e| format!("pipe: {e}"))?;
            let stdio = Stdio {
                stdin: self.devnull.as_raw_fd(),
                stdout: out_w.as_raw_fd(),
                stderr: err_w.as_raw_fd(),
            };
            let cg = self.cgroup.as_ref().map(|c| c.fds());
            let (pid, pidfd) = child::start_prepared(prep, token_var.as_ref(), &stdio, cg, true)
                .map_err(|e| e.to_string())?;
            output::enlarge(&out_w);
            output::enlarge(&err_w);
            Ok::<_, String>((pid, pidfd, out_r, err_r))
        })();
        let now = mono_ms();
        let (pid, pidfd, out_r, err_r) = match started {
            Ok(s) => s,
            Err(e) => {
                // Resolved again next time: the program may be installed meanwhile.
                self.prepared = None;
                self.start_failed(e);
                return;
            }
        };
        // Past the hot path.
        let _ = poll.registry().register(
            &mut SourceFd(&pidfd.as_raw_fd()),
            T_MAIN,
            Interest::READABLE,
        );
        let pipes = [output::inode(&out_r), output::inode(&err_r)];
        self.add_stream(poll, Which::Out, out_r);
        self.add_stream(poll, Which::Err, err_r);
        let id = Identity {
            pgid: pid,
            token: token.clone(),
            cgroup: self.cgroup.as_ref().map(|c| c.path.clone()),
        };
        self.live = Some(Live {
            pid,
            pidfd,
            ours: true,
            started_mono: now,
            tree: Tree::new(id.clone()),
        });
        self.record.machine.on_started(&self.rules);
        self.record.spec_hash = format!("{:016x}", self.spec.definition_hash());
        self.record.run = Some(RunRecord {
            pid,
            start_ticks: procscan::start_ticks(pid).unwrap_or(0),
            started_ms: crate::ledger::unix_ms_now(),
            started_mono_ms: now,
            pgid: pid,
            token,
            cgroup: id.cgroup,
            pipes,
            adopted: false,
        });
        self.record.status_text = None;
        self.stopped_since = None;
        self.ready_probe = None;
        self.liveness = None;
        let mut ev = self.event(
            if cause.is_some() {
                "respawned"
            } else {
                "started"
            },
            Some(pid),
        );
        if let Some(c) = cause {
            ev.cause = Some(c.as_str().into());
            ev.old_pid = self.last_pid;
        }
        self.ledger.append(&ev);
        self.last_pid = Some(pid);
        if self.record.machine.phase == Phase::Starting {
            self.start_ready_probe();
        } else {
            self.became_ready();
        }
        self.save();
    }

    fn start_failed(&mut self, e: String) {
        log::warn!("{}: {e}", self.name);
        let jitter = self.rng.unit();
        let now = mono_ms();
        self.record
            .machine
            .on_start_failed(e.clone(), &self.rules, now, jitter);
        let mut ev = self.event("failed", None);
        ev.detail = Some(e);
        self.ledger.append(&ev);
        self.save();
    }

    fn start_ready_probe(&mut self) {
        let Some(spec) = self.spec.ready.clone() else {
            return;
        };
        self.log_regex = match &spec.kind {
            ProbeKind::Log(re) => regex_lite::Regex::new(re).ok(),
            _ => None,
        };
        self.ready_probe = Some(Prober::readiness(spec, T_READY_PROBE, Instant::now()));
    }

    fn start_liveness(&mut self) {
        self.liveness = self.spec.liveness.clone().map(|p| {
            // A random phase within the first period: instances started in one burst
            // would otherwise probe, and beat (see `Heartbeater::tick_shared`), in the
            // same few milliseconds of every period.
            let phase = Duration::from_millis((self.rng.unit() * p.period_ms as f64) as u64);
            Prober::new(p, T_LIVE_PROBE, Instant::now() + phase)
        });
    }

    fn became_ready(&mut self) {
        self.ready_probe = None;
        self.log_regex = None;
        self.last_watchdog = Some(Instant::now());
        self.start_liveness();
        let pid = self.live.as_ref().map(|l| l.pid);
        self.ledger.append(&self.event("ready", pid));
    }

    fn add_stream(&mut self, poll: &Poll, which: Which, fd: OwnedFd) {
        let token = Token(self.next_stream_token);
        self.next_stream_token += 1;
        let _ = poll
            .registry()
            .register(&mut SourceFd(&fd.as_raw_fd()), token, Interest::READABLE);
        match Stream::new(which, fd, &state::cursor_dir(&self.dir), &self.log) {
            Ok(s) => self.streams.push((token, s)),
            Err(e) => log::warn!("{}: cannot capture std{}: {e}", self.name, which.as_str()),
        }
    }

    /// Moves output to the log; `flush` writes trailing partial lines too.
    fn pump_all(&mut self, flush: bool) {
        let name = self.name.to_string();
        let mut matched = false;
        let regex = self.log_regex.clone();
        for (_, s) in &mut self.streams {
            s.pump(
                &mut self.log,
                &name,
                flush,
                &mut self.scratch,
                &mut |line| {
                    if !matched && regex.as_ref().is_some_and(|r| r.is_match(line)) {
                        matched = true;
                    }
                },
            );
        }
        self.stats.log_lines = self.log.lines;
        self.stats_dirty = true;
        if matched && self.record.machine.phase == Phase::Starting {
            self.passive_ready();
        }
    }

    /// A log line matched, or READY=1 came: ready.
    fn passive_ready(&mut self) {
        if let Some(v) = self
            .ready_probe
            .as_mut()
            .map(|p| p.passive_pass(Instant::now()))
        {
            self.stats.ready.record(v.ok, v.took);
        }
        self.record.machine.on_ready();
        self.became_ready();
        self.save();
    }

    fn close_finished_streams(&mut self, poll: &Poll) {
        let mut i = 0;
        while i < self.streams.len() {
            if self.streams[i].1.closed {
                let (_, s) = self.streams.remove(i);
                let _ = poll.registry().deregister(&mut SourceFd(&s.raw_fd()));
                s.finish();
            } else {
                i += 1;
            }
        }
    }

    /// Some streams ran out of budget with data left: the loop must not sleep.
    pub fn busy(&self) -> bool {
        self.streams.iter().any(|(_, s)| s.more)
    }

    pub fn deadline(&self) -> Option<Instant> {
        let now_i = Instant::now();
        if self.waiting_for.is_some() {
            // Only the predecessor's letting go is awaited (see `tick`).
            return Some(now_i + Duration::from_secs(1));
        }
        let now = mono_ms();
        let from_mono = |t: u64| now_i + Duration::from_millis(t.saturating_sub(now));
        let watchdog = match (self.spec.watchdog_ms, self.last_watchdog) {
            (Some(w), Some(last)) if self.record.machine.phase.is_ready() => {
                Some(last + Duration::from_millis(w))
            }
            _ => None,
        };
        let stable = (self.live.as_ref())
            .filter(|_| self.record.machine.policy.failed())
            .map(|l| from_mono(l.started_mono + STABLE_RUN_MS));
        [
            Some(self.stop_check.deadline()),
            self.stopped_deadline,
            self.stats_dirty.then(|| self.stats_chore().deadline()),
            self.record.machine.phase.due().map(from_mono),
            self.ready_probe.as_ref().and_then(Prober::deadline),
            self.liveness.as_ref().and_then(Prober::deadline),
            watchdog,
            stable,
        ]
        .into_iter()
        .flatten()
        .chain(self.streams.iter().filter_map(|(_, s)| s.partial_due()))
        .min()
    }

    /// The timers: restarts and kills due, probes, watchdog silence, a stopped program,
    /// partial lines waiting too long, stats.
    pub fn tick(&mut self, poll: &Poll) {
        let now_i = Instant::now();
        if let Some(h) = self.waiting_for {
            if !host_alive(&self.dir, h) {
                self.take_over(poll);
            }
            return;
        }
        let now = mono_ms();
        let d = self.record.machine.on_timer(now);
        if d != Do::Nothing {
            self.act(poll, d);
            self.save();
        }
        if self.record.machine.policy.failed()
            && self
                .live
                .as_ref()
                .is_some_and(|l| now.saturating_sub(l.started_mono) >= STABLE_RUN_MS)
            && self.record.machine.on_stable()
        {
            log::info!("{}: has run for a while: no longer failing", self.name);
            self.save();
        }
        let env = self.base_env.clone();
        if let Some(v) = self
            .ready_probe
            .as_mut()
            .and_then(|p| p.tick(poll, now_i, &env))
        {
            self.on_ready_verdict(v);
        }
        if let Some(v) = self
            .liveness
            .as_mut()
            .and_then(|p| p.tick(poll, now_i, &env))
        {
            self.on_liveness_verdict(poll, v);
        }
        if let (Some(w), Some(last)) = (self.spec.watchdog_ms, self.last_watchdog)
            && self.record.machine.phase.is_ready()
            && now_i.duration_since(last) >= Duration::from_millis(w)
        {
            self.hung(poll, format!("no WATCHDOG=1 for {w} ms (watchdog_ms)"));
        }
        if self.stop_check.may_run(now_i) || self.stopped_deadline.is_some_and(|t| now_i >= t) {
            self.check_stopped(poll, now_i);
        }
        if self
            .streams
            .iter()
            .any(|(_, s)| s.partial_due().is_some_and(|t| now_i >= t))
        {
            self.pump_all(false);
        }
        if self.stats_dirty && self.stats_chore().may_run(now_i) {
            self.write_stats(now_i);
        }
    }

    fn stats_chore(&self) -> &Chore {
        if self.stats_urgent {
            &self.stats_write
        } else {
            &self.stats_routine
        }
    }

    fn write_stats(&mut self, now: Instant) {
        let rejected = self.notify.as_ref().map_or(0, |n| n.rejected);
        self.stats.notify_rejected = rejected;
        let _ = state::write_stats(&self.dir, &self.name, &self.stats);
        self.stats_dirty = false;
        self.stats_urgent = false;
        self.stats_write.ran(now);
        self.stats_routine.ran(now);
    }

    /// A program SIGSTOPped (or otherwise stopped) for the cluster's timeout is hung.
    fn check_stopped(&mut self, poll: &Poll, now: Instant) {
        self.stop_check.ran(now);
        self.stopped_deadline = None;
        let Some((pid, ours)) = self.live.as_ref().map(|l| (l.pid, l.ours)) else {
            self.stopped_since = None;
            return;
        };
        if is_stopped(pid, ours) {
            let since = *self.stopped_since.get_or_insert(now);
            let stopped = now.duration_since(since);
            if stopped >= self.stop_timeout {
                self.hung(
                    poll,
                    format!("stopped (SIGSTOP) for {} ms", stopped.as_millis()),
                );
            } else {
                self.stopped_deadline = Some(since + self.stop_timeout);
            }
        } else {
            self.stopped_since = None;
        }
    }

    fn hung(&mut self, poll: &Poll, why: String) {
        let d = self.record.machine.hang(mono_ms());
        if d == Do::Nothing {
            return;
        }
        log::warn!("{}: hung: {why}", self.name);
        self.record.machine.last_error = Some(why.clone());
        let pid = self.live.as_ref().map(|l| l.pid);
        let mut ev = self.event("killed", pid);
        ev.cause = Some(Cause::Hang.as_str().into());
        ev.detail = Some(why);
        self.ledger.append(&ev);
        self.liveness = None;
        self.act(poll, d);
        self.save();
    }

    fn on_ready_verdict(&mut self, v: Verdict) {
        self.stats.ready.record(v.ok, v.took);
        self.stats_dirty = true;
        self.stats_urgent |= !v.ok;
        let (ok, error) = (v.ok, v.error);
        if ok {
            self.record.machine.on_ready();
            if self.record.machine.phase == Phase::Ready {
                self.became_ready();
                self.save();
            }
        } else if error != self.record.machine.last_error {
            self.record.machine.last_error = error;
            self.stats_dirty = true;
            self.stats_urgent = true;
        }
    }

    fn on_liveness_verdict(&mut self, poll: &Poll, v: Verdict) {
        self.stats.liveness.record(v.ok, v.took);
        self.stats_dirty = true;
        self.stats_urgent |= !v.ok;
        let (ok, error) = (v.ok, v.error);
        let before = self.record.machine.phase;
        let d = self
            .record
            .machine
            .on_liveness(ok, error.clone(), &self.rules, mono_ms());
        if d == Do::Kill {
            let why = error.unwrap_or_else(|| "liveness probe failed".into());
            // `hung` writes the kill; the machine is already stopping.
            log::warn!("{}: hung: {why}", self.name);
            let pid = self.live.as_ref().map(|l| l.pid);
            let mut ev = self.event("killed", pid);
            ev.cause = Some(Cause::Hang.as_str().into());
            ev.detail = Some(format!(
                "{why} ({} consecutive liveness failures)",
                self.rules.liveness_failures
            ));
            self.ledger.append(&ev);
            self.liveness = None;
            self.act(poll, d);
            self.save();
            return;
        }
        let now = self.record.machine.phase;
        if matches!(now, Phase::Unhealthy { failures: 1 }) && before == Phase::Ready {
            let pid = self.live.as_ref().map(|l| l.pid);
            let mut ev = self.event("unhealthy", pid);
            ev.detail = self.record.machine.last_error.clone();
            self.ledger.append(&ev);
            self.save();
        } else if now != before {
            self.save();
        }
    }

    pub fn on_event(&mut self, poll: &Poll, token: Token, read_closed: bool) {
        match token {
            T_MAIN => self.on_main_exit(poll),
            T_INOTIFY => {
                // Only the files this instance depends on: the users' wishes, its own
                // record (a predecessor letting go), its dependencies' records. Every
                // record written wakes every host; the rest of them cost one read here.
                let (mut wishes, mut relevant) = (false, false);
                let own = format!("{}.json", self.name);
                while let Ok(events) = self.inotify.read_events() {
                    if events.is_empty() {
                        break;
                    }
                    for e in events {
                        let Some(name) = e.name.as_ref().and_then(|n| n.to_str()) else {
                            continue;
                        };
                        if name == "desired.json" {
                            wishes = true;
                        } else if name == own || self.watches(name) {
                            relevant = true;
                        }
                    }
                }
                if wishes {
                    self.desired = Desired::read(&self.dir);
                }
                if wishes || relevant {
                    if let Some(h) = self.waiting_for {
                        let released = state::read_record(&self.dir, &self.name)
                            .is_none_or(|r| r.host != Some(h));
                        if released || !host_alive(&self.dir, h) {
                            self.take_over(poll);
                        }
                    } else {
                        self.evaluate(poll);
                    }
                }
            }
            T_NOTIFY => self.on_notify(),
            T_READY_PROBE => {
                if let Some(v) = self
                    .ready_probe
                    .as_mut()
                    .and_then(|p| p.on_event(Instant::now()))
                {
                    self.on_ready_verdict(v);
                }
            }
            T_LIVE_PROBE => {
                if let Some(v) = self
                    .liveness
                    .as_mut()
                    .and_then(|p| p.on_event(Instant::now()))
                {
                    self.on_liveness_verdict(poll, v);
                }
            }
            Token(t) if t >= T_STREAMS => {
                let flush = read_closed;
                let name = self.name.to_string();
                if let Some((_, s)) = self.streams.iter_mut().find(|(tk, _)| *tk == token) {
                    let mut matched = false;
                    let regex = self.log_regex.clone();
                    s.pump(
                        &mut self.log,
                        &name,
                        flush,
                        &mut self.scratch,
                        &mut |line| {
                            if !matched && regex.as_ref().is_some_and(|r| r.is_match(line)) {
                                matched = true;
                            }
                        },
                    );
                    if read_closed {
                        // One more peek sees the end of the stream (tee returns 0).
                        s.pump(&mut self.log, &name, true, &mut self.scratch, &mut |_| {});
                    }
                    self.stats.log_lines = self.log.lines;
                    self.stats_dirty = true;
                    if matched && self.record.machine.phase == Phase::Starting {
                        self.passive_ready();
                    }
                }
                self.close_finished_streams(poll);
            }
            _ => {}
        }
    }

    /// Streams that ran out of budget: pumped again before the loop sleeps.
    pub fn pump_more(&mut self, poll: &Poll) {
        if self.busy() {
            self.pump_all(false);
            self.close_finished_streams(poll);
        }
    }

    fn on_notify(&mut self) {
        let Some(n) = self.notify.as_mut() else {
            return;
        };
        let live = self.live.as_ref().map(|l| (l.pid, l.tree.id.clone()));
        let notices = n.receive(&mut |pid| match &live {
            Some((main, id)) => {
                pid == *main || procscan::pgrp(pid) == Some(id.pgid) || {
                    let t = Tree::new(id.clone());
                    t.members().contains(&pid)
                }
            }
            None => false,
        });
        self.stats_dirty = true;
        self.stats_urgent |= n.rejected != self.stats.notify_rejected;
        for notice in notices {
            match notice {
                Notice::Ready => {
                    let notify_ready = self
                        .spec
                        .ready
                        .as_ref()
                        .is_some_and(|p| p.kind == ProbeKind::Notify);
                    if notify_ready && self.record.machine.phase == Phase::Starting {
                        self.passive_ready();
                    }
                }
                Notice::Watchdog => self.last_watchdog = Some(Instant::now()),
                Notice::Status(s) => {
                    if self.record.status_text.as_deref() != Some(s.as_str()) {
                        self.record.status_text = Some(s);
                        self.save();
                    }
                }
                Notice::Stopping => {}
            }
        }
    }

    /// Children of the workflow ended (SIGCHLD): the program, an exec probe, or an orphan
    /// of the program's tree that came back to us as the subreaper.
    pub fn on_children(&mut self, poll: &Poll) {
        for _ in 0..1024 {
            let Some(pid) = peek_child() else {
                return;
            };
            if self.live.as_ref().is_some_and(|l| l.pid == pid && l.ours) {
                self.on_main_exit(poll);
                continue;
            }
            let Some((_, ended)) = child::reap(pid) else {
                return;
            };
            let now = Instant::now();
            if self.ready_probe.as_ref().and_then(Prober::child_pid) == Some(pid) {
                let v = self
                    .ready_probe
                    .as_mut()
                    .map(|p| p.on_child_exit(ended, now));
                if let Some(v) = v {
                    self.on_ready_verdict(v);
                }
            } else if self.liveness.as_ref().and_then(Prober::child_pid) == Some(pid) {
                let v = self.liveness.as_mut().map(|p| p.on_child_exit(ended, now));
                if let Some(v) = v {
                    self.on_liveness_verdict(poll, v);
                }
            }
        }
    }

    /// The program ended. The replacement comes first (see the module doc).
    fn on_main_exit(&mut self, poll: &Poll) {
        let Some(live) = self.live.as_ref() else {
            return;
        };
        if !spawn::has_exited(&live.pidfd) {
            return;
        }
        let ended = if live.ours {
            peek_status(live.pid)
        } else {
            None
        };
        let Some(live) = self.live.take() else {
            return;
        };
        let now = mono_ms();
        let lived = now.saturating_sub(live.started_mono);
        let jitter = self.rng.unit();
        let d = self
            .record
            .machine
            .on_exit(ended, lived, &self.rules, now, jitter);
        if live.ours {
            // The leader is not reaped yet, so its group id is still its own.
            // SAFETY: a signal to our own child's process group.
            unsafe { libc::kill(-live.pgid(), libc::SIGKILL) };
        }
        self.ready_probe = None;
        self.liveness = None;
        self.record.run = None;
        if d == Do::Spawn {
            self.spawn(poll, true);
        }
        // Past the hot path: reap, sweep the old tree, drain its output, record.
        let _ = poll
            .registry()
            .deregister(&mut SourceFd(&live.pidfd.as_raw_fd()));
        if live.ours {
            child::reap(live.pid);
        }
        let old = Tree::new(Identity {
            cgroup: None,
            ..live.tree.id.clone()
        });
        old.signal_all(libc::SIGKILL);
        let mut ev = self.event("exited", Some(live.pid));
        match ended {
            Some(Ended::Code(c)) => ev.code = Some(c),
            Some(Ended::Signal(s)) => ev.signal = Some(s),
            None => {
                ev.detail =
                    Some("exit status unknown: adopted, not a child of this workflow".into())
            }
        }
        if let Some(c) = self.record.machine.last_cause.filter(|_| {
            d == Do::Spawn
                || matches!(
                    self.record.machine.phase,
                    Phase::Backoff { .. } | Phase::Failed { .. }
                )
        }) {
            ev.cause = Some(c.as_str().into());
        }
        self.ledger.append(&ev);
        log::info!(
            "{}: pid {} {}",
            self.name,
            live.pid,
            ended.map_or("exited (status unknown)".to_string(), Ended::describe)
        );
        self.pump_all(true);
        self.close_finished_streams(poll);
        if d != Do::Spawn {
            self.act(poll, d);
        }
        self.save();
        if !self.finished {
            self.evaluate(poll);
        }
    }

    /// The config changed (SIGHUP). The same instance with a changed definition restarts
    /// once its changed dependencies are back; an unchanged one is left alone.
    pub fn reconfigure(&mut self, poll: &Poll, cfg: &Config, spec: &ServiceSpec) {
        let changed = spec.definition_hash() != self.spec.definition_hash();
        self.deps = deps_of(spec, cfg);
        self.prepared = None;
        self.rules = rules_of(spec, cfg);
        self.stop_timeout = cfg.timeout();
        self.interval = cfg.interval();
        let (early, late) = stop_check_window(self.interval, self.stop_timeout);
        self.stop_check.set(early, late);
        let (early, late) = stats_window(self.interval);
        self.stats_write.set(early, late);
        self.spec = spec.clone();
        if changed {
            log::info!(
                "{}: definition changed: restarting in dependency order",
                self.name
            );
            if self.record.machine.phase.running() {
                self.reload_pending = true;
            }
        }
        self.evaluate(poll);
    }

    /// Leaves the program running for another workflow to adopt (this workflow is being
    /// replaced, or the instance moves): whole lines are written, partial ones stay in
    /// the pipe, the record says nobody hosts it.
    pub fn release(&mut self, poll: &Poll) {
        self.pump_all(false);
        for (_, s) in self.streams.drain(..) {
            let _ = poll.registry().deregister(&mut SourceFd(&s.raw_fd()));
        }
        if let Some(l) = self.live.take() {
            let _ = poll
                .registry()
                .deregister(&mut SourceFd(&l.pidfd.as_raw_fd()));
        }
        if self.stats_dirty {
            self.write_stats(Instant::now());
        }
        self.notify = None;
        self.record.host = None;
        self.save();
        self.finished = true;
    }

    /// The cluster is stopping, or the instance was removed: stop the program (its stop
    /// signal, SIGKILL after the grace), then finish.
    pub fn shutdown(&mut self, poll: &Poll) {
        if self.waiting_for.is_some() {
            self.finished = true;
            return;
        }
        let d = self.record.machine.shutdown(&self.rules, mono_ms());
        self.act(poll, d);
        self.save();
    }

    fn finish(&mut self) {
        if self.finished {
            return;
        }
        if let Some(cg) = &self.cgroup {
            cg.kill();
        }
        if let Some(l) = &self.live {
            l.tree.signal_all(libc::SIGKILL);
        }
        self.pump_all(true);
        if self.stats_dirty {
            self.write_stats(Instant::now());
        }
        if let Some(cg) = &self.cgroup {
            cg.remove();
        }
        self.finished = true;
    }

    /// The instance was removed from the config and its program is gone: forget it.
    pub fn forget(&self) {
        if let Some(cg) = &self.cgroup {
            cg.remove();
        }
        let _ = std::fs::remove_file(state::record_path(&self.dir, &self.name));
        let _ =
            std::fs::remove_file(state::stats_dir(&self.dir).join(format!("{}.json", self.name)));
    }
}

impl Live {
    fn pgid(&self) -> i32 {
        self.tree.id.pgid
    }
}

/// The stopped-program check: at least every heartbeat interval (a third of the timeout
/// at most), on whichever wake comes after half of it — the probe's or the heartbeat's.
fn stop_check_window(interval: Duration, timeout: Duration) -> (Duration, Duration) {
    let every = interval.min(timeout / 3).max(Duration::from_millis(10));
    (every / 2, every)
}

/// The stats file: every few seconds, on a wake the loop has anyway.
fn stats_window(interval: Duration) -> (Duration, Duration) {
    // Never later than the routine counts (a long interval_ms).
    let every = interval.clamp(STATS_EVERY, STATS_ROUTINE_EVERY);
    (every, every + every / 2)
}

fn deps_of(spec: &ServiceSpec, cfg: &Config) -> Vec<ServiceSpec> {
    cfg.services
        .iter()
        .filter(|s| spec.depends_on.contains_key(&s.name))
        .cloned()
        .collect()
}

fn rules_of(spec: &ServiceSpec, cfg: &Config) -> Rules {
    Rules {
        restart: spec.restart,
        backoff: Backoff::of(cfg),
        stop_grace_ms: spec.stop_grace_ms,
        has_ready_probe: spec.ready.is_some(),
        liveness_failures: spec.liveness.as_ref().map_or(3, |p| p.failures),
    }
}

/// The workflow's environment, less what belongs to nexus's own supervisor (systemd's
/// notify and socket-activation variables) and to nexus itself.
fn base_env() -> Vec<String> {
    const DROP: &[&str] = &[
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
        "NEXUS_FAULT",
        tree::TREE_VAR,
    ];
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(k, _)| !DROP.contains(&k.as_str()))
        .map(|(k, v)| format!("{k}={v}"))
        .collect()
}

/// A pidfd for the record's process, if it is still that process (pid and start time).
fn verify(run: &RunRecord) -> Option<OwnedFd> {
    let fd = spawn::pidfd_open(run.pid).ok()?;
    let same = procscan::start_ticks(run.pid) == Some(run.start_ticks)
        && procscan::state(run.pid).is_some_and(|s| s != 'Z');
    same.then_some(fd)
}

/// Whether the workflow named in a record still runs (and is a workflow of this dir).
fn host_alive(dir: &RuntimeDir, h: HostRec) -> bool {
    procscan::daemon_slot(h.pid, dir.path())
        .is_some_and(|s| s.role == crate::config::Role::Workflow && s.id == h.workflow)
}

/// The communicators of the directory: they hold every program's output pipes.
/// The daemons that keep every program's pipes open (see `keeper`).
fn keepers(dir: &RuntimeDir) -> Vec<i32> {
    procscan::daemons_of(dir.path())
        .into_iter()
        .filter(|f| matches!(f.slot.role, Role::Communicator | Role::Watchdog))
        .map(|f| f.pid)
        .collect()
}

/// The next ended child, without reaping it.
fn peek_child() -> Option<i32> {
    // SAFETY: waitid writes a siginfo we own.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let rc = libc::waitid(
            libc::P_ALL,
            0,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT | libc::__WALL,
        );
        let pid = info.si_pid();
        (rc == 0 && pid > 0).then_some(pid)
    }
}

/// Whether the program is stopped by a signal. Our own child's stop is asked of the
/// kernel (one waitid, which leaves the stop reportable); an adopted program's state is
/// read from /proc, ten times the cost on this kind of machine.
fn is_stopped(pid: i32, ours: bool) -> bool {
    match ours.then(|| peek_wait(pid, libc::WSTOPPED)).flatten() {
        Some(reported) => reported.is_some(),
        None => procscan::state(pid) == Some('T'),
    }
}

/// waitid for child `pid` without consuming what it reports (WNOWAIT, WNOHANG): None if
/// the call failed (not our child), else the report if there is one.
fn peek_wait(pid: i32, what: i32) -> Option<Option<libc::siginfo_t>> {
    // SAFETY: waitid writes a siginfo we own.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let rc = libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            what | libc::WNOHANG | libc::WNOWAIT | libc::__WALL,
        );
        (rc == 0).then(|| (info.si_pid() == pid).then_some(info))
    }
}

/// How child `pid` ended, without reaping it.
fn peek_status(pid: i32) -> Option<Ended> {
    let info = peek_wait(pid, libc::WEXITED).flatten()?;
    // SAFETY: a report of an ended child carries its status.
    let status = unsafe { info.si_status() };
    Some(match info.si_code {
        libc::CLD_EXITED => Ended::Code(status),
        _ => Ended::Signal(status),
    })
}
