//! A workflow: hosts one instance of a user's service (see `services::host`), or stays
//! free for tasks and only heartbeats. Its loop's events: the heartbeat deadline, signals
//! (SIGTERM, SIGHUP, SIGCHLD), and the hosted instance's pidfd, pipes, probes, notify
//! socket and state directory; its timeout is the earliest deadline of them all.
//!
//! The program outlives the workflow: a SIGKILL or SIGSTOP of the workflow never reaches
//! it, and a SIGTERM only *releases* it (the successor adopts it) — unless the cluster is
//! being stopped or the instance was removed from the config, when it is stopped first.

use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};

use crate::config::Config;
use crate::daemon::{DaemonCtx, Heartbeater, MasterProbe, Signals, act_on_probe, poll_until};
use crate::services::host::{self, Host, HostState};
use crate::services::spec::{InstanceName, ServiceSpec};
use crate::tasks::worker::TaskWorker;

const SIGNALS: Token = Token(0);

struct Workflow {
    ctx: DaemonCtx,
    poll: Poll,
    host: Option<Host>,
    /// Runs tasks from the queue while no service is hosted.
    worker: Option<TaskWorker>,
    /// Hosted next, once the current host has finished stopping (a reassignment).
    next: Option<(ServiceSpec, InstanceName)>,
    /// A termination signal arrived: exit once the host has finished.
    terminating: bool,
    /// When the draining worker's tasks are killed for good.
    worker_grace: Option<Instant>,
}

pub fn run(ctx: DaemonCtx) -> Result<(), String> {
    let poll = Poll::new().map_err(|e| format!("cannot create poll: {e}"))?;
    let mut signals =
        Signals::with_children().map_err(|e| format!("cannot install signal handlers: {e}"))?;
    poll.registry()
        .register(&mut signals.source, SIGNALS, Interest::READABLE)
        .map_err(|e| format!("cannot poll signals: {e}"))?;
    let mut heart =
        Heartbeater::new(&ctx).map_err(|e| format!("cannot create heartbeat socket: {e}"))?;
    let mut probe = MasterProbe::new(&ctx);
    let mut log = ctx.log();
    let mut wf = Workflow {
        ctx,
        poll,
        host: None,
        worker: None,
        next: None,
        terminating: false,
        worker_grace: None,
    };
    if let Some((spec, name)) = wf.assigned() {
        wf.host_instance(&spec, name)?;
    } else {
        wf.worker = Some(TaskWorker::new(&wf.ctx, &wf.poll));
    }
    let mut events = Events::with_capacity(64);
    log::info!(
        "workflow {} running{}",
        wf.ctx.slot,
        wf.host
            .as_ref()
            .map_or(String::new(), |h| format!(", hosting {}", h.name()))
    );
    // The hosted instance's next timer, as of the last poll.
    let mut host_due: Option<Instant> = None;
    loop {
        let now = Instant::now();
        // Whether this wake is for one of the hosted instance's timers too (1 ms: the
        // poll's timeout is in whole milliseconds).
        let shared = host_due.is_some_and(|t| t <= now + Duration::from_millis(1));
        if heart.tick_shared(now, shared).is_some() {
            log.maybe_rotate();
            // Only a free workflow takes over a masterless cluster: its re-exec would drop
            // a hosted program's pipes.
            if wf.host.is_none() && act_on_probe(&wf.ctx, &mut probe) {
                return Ok(());
            }
        }
        if let Some(h) = wf.host.as_mut() {
            h.tick(&wf.poll);
        }
        if let Some(w) = wf.worker.as_mut() {
            w.tick(&wf.poll);
        }
        if wf.after_worker_events() {
            return Ok(());
        }
        if wf.after_host_events()? {
            return Ok(());
        }
        let mut wake = heart.next_due();
        host_due = wf.host.as_ref().and_then(|h| h.deadline());
        if let Some(t) = host_due {
            wake = wake.min(t);
        }
        if let Some(t) = wf.worker.as_ref().and_then(|w| w.deadline()) {
            wake = wake.min(t);
        }
        if let Some(t) = wf.worker_grace.filter(|_| wf.worker.is_some()) {
            wake = wake.min(t);
        }
        if wf.host.as_ref().is_some_and(|h| h.busy()) {
            wake = Instant::now();
        }
        poll_until(&mut wf.poll, &mut events, wake)?;
        // The program's exit first: its restart is the hot path, and its pipes' hang-ups
        // and the rest of the round can wait until the replacement is on its way.
        if let Some(h) = wf.host.as_mut()
            && events.iter().any(|e| e.token() == host::T_MAIN)
        {
            h.on_event(&wf.poll, host::T_MAIN, false);
        }
        for event in events.iter() {
            if event.token() == host::T_MAIN {
                continue;
            }
            if TaskWorker::owns(event.token()) {
                if let Some(w) = wf.worker.as_mut() {
                    w.on_event(&wf.poll, event.token());
                }
            } else if event.token() == SIGNALS {
                if signals.drain() && !wf.terminating {
                    wf.on_terminate();
                }
                if signals.take_child()
                    && let Some(h) = wf.host.as_mut()
                {
                    h.on_children(&wf.poll);
                }
                if signals.take_reload() {
                    match wf.ctx.reload_config() {
                        Ok(true) => {
                            heart = Heartbeater::new(&wf.ctx)
                                .map_err(|e| format!("cannot create heartbeat socket: {e}"))?;
                            heart.mark_ready_told();
                            probe = MasterProbe::new(&wf.ctx);
                            log = wf.ctx.log();
                            wf.reassign()?;
                        }
                        Ok(false) => {
                            if !wf.terminating {
                                wf.on_terminate();
                            }
                        }
                        Err(e) => log::warn!("cannot reload the config: {e}"),
                    }
                }
            } else if let Some(h) = wf.host.as_mut() {
                h.on_event(&wf.poll, event.token(), event.is_read_closed());
            }
        }
        if let Some(h) = wf.host.as_mut() {
            h.pump_more(&wf.poll);
        }
        if wf.after_worker_events() {
            return Ok(());
        }
        if wf.after_host_events()? {
            return Ok(());
        }
        if wf.terminating && wf.host.is_none() && wf.worker.is_none() {
            log::info!("terminating on signal");
            return Ok(());
        }
    }
}

impl Workflow {
    fn assigned(&self) -> Option<(ServiceSpec, InstanceName)> {
        self.ctx
            .config
            .hosted_by(self.ctx.slot.id)
            .map(|(s, n)| (s.clone(), n))
    }

    fn host_instance(&mut self, spec: &ServiceSpec, name: InstanceName) -> Result<(), String> {
        // Orphans of the program's tree come back to us, to be reaped and stopped.
        // SAFETY: prctl with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        self.host = Some(Host::new(&self.ctx, &self.poll, spec, name)?);
        Ok(())
    }

    /// Whether the instance is still part of `cfg` (hosted by someone).
    fn exists(cfg: &Config, name: &InstanceName) -> bool {
        cfg.assignment().iter().flatten().any(|n| n == name)
    }

    /// SIGTERM or SIGINT: stop the program if the cluster is stopping or the instance is
    /// gone; otherwise hand it over (it keeps running; the successor adopts it).
    fn on_terminate(&mut self) {
        self.terminating = true;
        if let Some(w) = self.worker.as_mut() {
            // Its tasks get SIGTERM now and SIGKILL at the grace's end; the queue re-queues
            // them when our connection ends.
            w.drain(&self.poll);
            self.worker_grace = Some(std::time::Instant::now() + self.grace_for_tasks());
        }
        let Some(h) = self.host.as_mut() else {
            return;
        };
        let cfg =
            Config::load(&self.ctx.dir.config_file()).unwrap_or_else(|_| self.ctx.config.clone());
        let stopping = self.ctx.dir.stopping_marker().exists();
        if stopping || !Self::exists(&cfg, h.name()) {
            log::info!("stopping {} before exiting", h.name());
            h.shutdown(&self.poll);
        } else {
            log::info!("handing {} over: it keeps running", h.name());
            h.release(&self.poll);
        }
    }

    /// The config changed: keep, reconfigure, release or stop the hosted instance.
    fn reassign(&mut self) -> Result<(), String> {
        let new = self.assigned();
        match (self.host.as_mut(), new) {
            (Some(h), Some((spec, name))) if *h.name() == name => {
                let cfg = self.ctx.config.clone();
                h.reconfigure(&self.poll, &cfg, &spec);
            }
            (Some(h), new) => {
                if Self::exists(&self.ctx.config, h.name()) {
                    log::info!("{} moves to another workflow: handing it over", h.name());
                    h.release(&self.poll);
                } else {
                    log::info!("{} was removed from the config: stopping it", h.name());
                    h.shutdown(&self.poll);
                }
                self.next = new;
            }
            (None, Some((spec, name))) => {
                if let Some(mut w) = self.worker.take() {
                    // Hosting needs the workflow to itself: its tasks end (and are re-queued).
                    w.drain(&self.poll);
                    w.kill_all();
                }
                self.host_instance(&spec, name)?
            }
            (None, None) => {}
        }
        Ok(())
    }

    fn grace_for_tasks(&self) -> Duration {
        // The master SIGKILLs us at stop_grace_ms: our tasks must be gone before that.
        Duration::from_millis(self.ctx.config.stop_grace_ms.saturating_mul(3) / 4)
    }

    /// A draining worker whose tasks are gone (or whose grace is over) goes. True: exit.
    fn after_worker_events(&mut self) -> bool {
        let Some(w) = self.worker.as_mut() else {
            return false;
        };
        if !self.terminating {
            return false;
        }
        if !w.idle() && self.worker_grace.is_some_and(|t| Instant::now() < t) {
            return false;
        }
        w.kill_all();
        self.worker = None;
        if self.host.is_none() {
            log::info!("terminating on signal");
            return true;
        }
        false
    }

    /// A host that has finished goes; a reassignment waiting for it starts. True: exit.
    fn after_host_events(&mut self) -> Result<bool, String> {
        if self
            .host
            .as_ref()
            .is_none_or(|h| h.state() == HostState::Running)
        {
            return Ok(false);
        }
        if let Some(h) = self.host.take()
            && !Self::exists(&self.ctx.config, h.name())
        {
            h.forget();
        }
        if self.terminating {
            log::info!("terminating on signal");
            return Ok(true);
        }
        if let Some((spec, name)) = self.next.take() {
            self.host_instance(&spec, name)?;
        }
        Ok(false)
    }
}
