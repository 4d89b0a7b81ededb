//! One handler per control request: status, stop, ready, silence reports, restart and
//! reload. Each returns the response; the transport (`control.rs`) sends it.

use std::time::{Duration, Instant};

use mio::Poll;

use super::slots::{self, Recovery, Silence, StopReason};
use super::{Master, round3};
use crate::config::{Role, SlotName};
use crate::daemon::DaemonCtx;
use crate::ledger::{Cause, Event};
use crate::protocol::{ErrorKind, Request, Response, ServiceAction, StatusReport};
use crate::services::state::Desired;
use crate::spawn;

impl Master {
    pub(super) fn on_conn(&mut self, ctx: &DaemonCtx, poll: &Poll, id: usize) {
        let Some(incoming) = self.control.on_ready(poll, id) else {
            return;
        };
        let peer = incoming.peer_pid;
        let response = match incoming.request {
            Ok(req) => self.handle(ctx, peer, req),
            Err(e) => {
                if !incoming.empty {
                    self.rejected
                        .reject(format_args!("control request from pid {peer}: {e}"));
                }
                Response::error(ErrorKind::Refused, e.to_string())
            }
        };
        self.control.reply(poll, id, &response);
    }

    fn handle(&mut self, ctx: &DaemonCtx, peer: i32, req: Request) -> Response {
        match req {
            Request::Status {} => Response::Status(self.status(ctx)),
            Request::Ping {} => Response::Ok {},
            Request::Stop {} => self.stop(ctx, peer),
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
            Request::Service { action, target } => self.service(ctx, action, &target),
        }
    }

    /// `nexus service start|stop|restart`: the wish goes into desired.json, which every
    /// hosting workflow watches; it survives failovers and reloads (a stopped service
    /// stays stopped until started).
    fn service(&mut self, ctx: &DaemonCtx, action: ServiceAction, target: &str) -> Response {
        if self.stopping {
            return Response::error(ErrorKind::Stopping, "the cluster is stopping");
        }
        let names = match crate::services::spec::targets(&ctx.config.services, target) {
            Ok(n) => n,
            Err(e) => return Response::error(ErrorKind::NoSuchSlot, e),
        };
        let mut desired = Desired::read(&ctx.dir);
        let mut changes = Vec::new();
        for n in &names {
            let w = desired.instances.entry(n.to_string()).or_default();
            let verb = match action {
                ServiceAction::Stop => {
                    w.stopped = true;
                    "stopping"
                }
                ServiceAction::Start => {
                    w.stopped = false;
                    w.start_gen += 1;
                    "starting"
                }
                ServiceAction::Restart => {
                    w.stopped = false;
                    w.restart_gen += 1;
                    "restarting"
                }
            };
            changes.push(format!("{n}: {verb}"));
        }
        if let Err(e) = desired.write(&ctx.dir) {
            return Response::error(
                ErrorKind::Refused,
                format!("cannot write desired.json: {e}"),
            );
        }
        let mut ev = Event::new(match action {
            ServiceAction::Stop => "service_stop",
            ServiceAction::Start => "service_start",
            ServiceAction::Restart => "service_restart",
        });
        ev.service = names.first().map(|n| n.service.clone());
        ev.detail = Some(changes.join(", "));
        self.ledger.append(&ev);
        Response::Applied { changes }
    }

    fn status(&self, ctx: &DaemonCtx) -> StatusReport {
        StatusReport {
            master_pid: ctx.pid,
            runtime_dir: ctx.dir.path().display().to_string(),
            members: slots::members(&self.slots, ctx.slot),
            rejected: self.rejected.count,
            counters: self.counters.clone(),
        }
    }

    /// `stop` begins: respawn nothing from now on, and say who is running.
    fn stop(&mut self, ctx: &DaemonCtx, peer: i32) -> Response {
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
            members: slots::members(&self.slots, ctx.slot),
        }
    }

    /// `nexus restart`: SIGTERM (SIGKILL after the grace period); the exit is then a
    /// manual replacement, not a failure. Restarting the master hands over to a standby.
    fn restart(&mut self, ctx: &DaemonCtx, name: SlotName) -> Response {
        if self.stopping {
            return Response::error(ErrorKind::Stopping, "the cluster is stopping");
        }
        let Some(i) = ctx.config.slot_index(name) else {
            return Response::error(
                ErrorKind::NoSuchSlot,
                format!("{name} is not a slot of this cluster"),
            );
        };
        if name == ctx.slot {
            let standby = self
                .slots
                .iter()
                .any(|s| s.name.role == Role::Communicator && s.name != name && s.is_ready());
            if !standby {
                return Response::error(
                    ErrorKind::Refused,
                    format!("{name} is the master and no standby is running to take over"),
                );
            }
            self.exit_for_handover = true;
            return Response::Applied {
                changes: vec![format!(
                    "{name} (master, pid {}) hands over to a standby",
                    ctx.pid
                )],
            };
        }
        let grace = Duration::from_millis(ctx.config.stop_grace_ms);
        match self.slots[i].proc_mut() {
            Some(p) => match p.state.stop(StopReason::Restart, Instant::now() + grace) {
                Ok(()) => {
                    let _ = spawn::pidfd_signal(&p.pidfd, libc::SIGTERM);
                    Response::Applied {
                        changes: vec![format!("{name} pid {} restarting", p.pid)],
                    }
                }
                Err(_) => Response::error(
                    ErrorKind::Busy,
                    format!("{name} pid {} is already being stopped", p.pid),
                ),
            },
            None => Response::error(
                ErrorKind::Busy,
                format!("{name} has no process right now (being replaced)"),
            ),
        }
    }

    /// `nexus reload` / `scale`: validate here too (the client may be another build),
    /// then leave the config for the loop to apply once this event is done.
    fn accept_config(&mut self, ctx: &DaemonCtx, text: &str) -> Response {
        let new = match crate::config::Config::parse_and_check(text) {
            Ok(c) => c,
            Err(e) => {
                return Response::error(
                    ErrorKind::Refused,
                    format!("config refused, nothing changed: {e}"),
                );
            }
        };
        if let Some(d) = &new.runtime_dir
            && crate::runtime_dir::RuntimeDir::at(d).path() != ctx.dir.path()
        {
            return Response::error(
                ErrorKind::Refused,
                "runtime_dir cannot change on a running cluster",
            );
        }
        if ctx.slot.role == Role::Communicator && ctx.slot.id > new.communicators {
            return Response::error(
                ErrorKind::Refused,
                format!(
                    "the master is {}: communicators cannot go below {} (restart it to move the master first)",
                    ctx.slot, ctx.slot.id
                ),
            );
        }
        if self.stopping {
            return Response::error(ErrorKind::Stopping, "the cluster is stopping");
        }
        let changes = super::config_changes(&ctx.config, &new);
        self.pending_config = Some(new);
        Response::Applied { changes }
    }

    fn on_ready(&mut self, peer: i32, name: SlotName, pid: i32) -> Response {
        if pid != peer {
            self.rejected.reject(format_args!(
                "ready for {name} pid {pid} sent by pid {peer}"
            ));
            return Response::error(ErrorKind::Refused, "pid does not match the sender");
        }
        let Some(slot) = self.slots.iter_mut().find(|s| s.name == name) else {
            self.rejected
                .reject(format_args!("ready from unknown slot {name}"));
            return Response::error(ErrorKind::NoSuchSlot, format!("no slot {name}"));
        };
        let Some(proc) = slot.proc_mut().filter(|p| p.pid == pid) else {
            return Response::error(ErrorKind::Stale, "stale: not the slot's current process");
        };
        if proc.state.on_ready() {
            let _ = spawn::pidfd_signal(&proc.pidfd, libc::SIGHUP);
        }
        let recovered = std::mem::take(&mut slot.open_recoveries);
        for rec in recovered {
            let recover_ms = round3(rec.detected.elapsed().as_secs_f64() * 1000.0);
            self.record_respawn(name, pid, &rec, Some(recover_ms), None);
        }
        if !self.whole_logged && self.slots.iter().all(|s| s.is_ready()) {
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
            .and_then(|i| self.slots[i].proc())
            .is_some_and(|p| p.pid == peer);
        if !genuine_reporter {
            self.rejected.reject(format_args!(
                "silence report from pid {peer}, not {reporter_slot}"
            ));
            return Response::error(ErrorKind::Refused, "only watchdogs report silence");
        }
        if self.stopping || name == ctx.slot {
            return Response::Ok {};
        }
        let Some(i) = ctx.config.slot_index(name) else {
            self.rejected
                .reject(format_args!("silence report about unknown slot {name}"));
            return Response::error(ErrorKind::NoSuchSlot, format!("no slot {name}"));
        };
        let quorum = slots::quorum(&self.slots, name);
        let Some(proc) = self.slots[i].proc_mut() else {
            return Response::Ok {}; // already being replaced
        };
        let now = Instant::now();
        match slots::judge_silence(proc, reporter, pid, now, ctx.config.timeout(), quorum) {
            Silence::Stale => {
                log::debug!(
                    "dropped stale silence report on {name} pid {pid} from watchdog-{reporter}"
                );
                return Response::Ok {};
            }
            Silence::Counted { votes, quorum } => {
                log::info!(
                    "watchdog-{reporter}: {name} pid {} silent for {silent_ms} ms ({votes}/{quorum} votes)",
                    proc.pid
                );
                return Response::Ok {};
            }
            Silence::Hung => {}
        }
        log::info!(
            "watchdog-{reporter}: {name} pid {} silent for {silent_ms} ms ({}/{quorum} votes)",
            proc.pid,
            proc.votes.len()
        );
        let victim = proc.pid;
        let recovery = Recovery {
            cause: Cause::Hang,
            old_pid: victim,
            detected: now,
            detect_ms: Some(silent_ms as f64),
        };
        if proc.state.kill_for_hang(recovery).is_err() {
            return Response::Ok {};
        }
        // If it is already gone the pidfd reports that anyway; either way on_exit
        // performs the one replacement.
        let _ = spawn::pidfd_signal(&proc.pidfd, libc::SIGKILL);
        let votes = proc.votes.clone();
        let mut ev = Event::about("killed", name, victim);
        ev.cause = Some(Cause::Hang.as_str().into());
        ev.detect_ms = Some(silent_ms as f64);
        ev.detail = Some(format!(
            "silent for {silent_ms} ms; reported by watchdogs {votes:?}"
        ));
        self.ledger.append(&ev);
        Response::Ok {}
    }
}
