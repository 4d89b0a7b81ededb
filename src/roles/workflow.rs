//! A workflow: for now it stays alive and heartbeats. Its loop has two events: the
//! heartbeat deadline and a termination signal.

use std::time::Instant;

use mio::{Events, Interest, Poll, Token};

use crate::daemon::{DaemonCtx, Heartbeater, MasterProbe, Signals, act_on_probe, poll_until};

const SIGNALS: Token = Token(0);

pub fn run(mut ctx: DaemonCtx) -> Result<(), String> {
    let mut poll = Poll::new().map_err(|e| format!("cannot create poll: {e}"))?;
    let mut signals = Signals::new().map_err(|e| format!("cannot install signal handlers: {e}"))?;
    poll.registry()
        .register(&mut signals.source, SIGNALS, Interest::READABLE)
        .map_err(|e| format!("cannot poll signals: {e}"))?;
    let mut heart =
        Heartbeater::new(&ctx).map_err(|e| format!("cannot create heartbeat socket: {e}"))?;
    let mut probe = MasterProbe::new(&ctx);
    let log = ctx.log();
    let mut events = Events::with_capacity(8);
    log::info!("workflow {} running", ctx.slot);
    loop {
        if heart.tick(Instant::now()).is_some() {
            log.maybe_rotate();
            if act_on_probe(&ctx, &mut probe) {
                return Ok(());
            }
        }
        poll_until(&mut poll, &mut events, heart.next_due())?;
        if events.iter().any(|e| e.token() == SIGNALS) && signals.drain() {
            log::info!("terminating on signal");
            return Ok(());
        }
        if signals.take_reload() {
            match ctx.reload_config() {
                Ok(true) => {
                    heart = Heartbeater::new(&ctx)
                        .map_err(|e| format!("cannot create heartbeat socket: {e}"))?;
                    heart.mark_ready_told();
                    probe = MasterProbe::new(&ctx);
                }
                Ok(false) => return Ok(()),
                Err(e) => log::warn!("cannot reload the config: {e}"),
            }
        }
    }
}
