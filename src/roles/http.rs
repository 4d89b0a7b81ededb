//! The http daemon: serves the API (http::server) from a current-thread tokio runtime of
//! its own, so the master's loop never sees a client. Its loop's events: the heartbeat
//! deadline, the bind retry while the port is busy, and signals (SIGTERM ends it, SIGHUP
//! re-reads the config and rebinds if `http` changed). The heartbeat is sent from the same
//! runtime that serves requests, so a server wedged by a bug stops beating and the
//! watchdogs replace it like any hung daemon.

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use crate::daemon::{DaemonCtx, Heartbeater};
use crate::http::ledger_feed::{self, Item};
use crate::http::server::Server;
use crate::http::serving::{self, Serving};
use crate::http::settings::HttpSettings;

/// How often a busy port is tried again.
const BIND_RETRY: Duration = Duration::from_secs(2);

pub fn run(ctx: DaemonCtx) -> Result<(), String> {
    // glibc gives each thread that allocates an arena of its own; the blocking pool's few
    // threads building status documents would each keep one's high-water mark resident.
    // SAFETY: mallopt only tunes the allocator, before any other thread exists.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        // Status snapshots and /proc reads: a few at a time is plenty (they are shared
        // between requests), and a flood of clients cannot make hundreds of threads.
        .max_blocking_threads(4)
        .thread_keep_alive(Duration::from_secs(5))
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let result = rt.block_on(main_loop(ctx));
    // Blocking tasks (a status request to a hung master) must not hold the exit up.
    rt.shutdown_timeout(Duration::from_millis(100));
    result
}

struct Listening {
    settings: HttpSettings,
    task: Option<JoinHandle<()>>,
    ticker: Option<JoinHandle<()>>,
    /// The TLS files as they were when loaded: a renewed certificate at the same path is
    /// picked up by the next reload.
    tls_stamp: Vec<(i64, u64)>,
    /// The last error, logged once rather than every retry.
    error: Option<String>,
    retry_at: Instant,
}

async fn main_loop(mut ctx: DaemonCtx) -> Result<(), String> {
    let settings = ctx
        .config
        .http
        .clone()
        .ok_or("started as the http daemon, but the config has no `http` key")?;
    let mut term = signal(SignalKind::terminate()).map_err(|e| format!("signals: {e}"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| format!("signals: {e}"))?;
    let mut hup = signal(SignalKind::hangup()).map_err(|e| format!("signals: {e}"))?;
    let mut heart =
        Heartbeater::new(&ctx).map_err(|e| format!("cannot create heartbeat socket: {e}"))?;
    let mut log = ctx.log();
    let (feed, _) = broadcast::channel::<Item>(1024);
    let follower = tokio::spawn(follow_ledger(ctx.dir.events(), feed.clone()));
    let mut server = Arc::new(new_server(&ctx, &settings, &feed));
    let mut l = Listening {
        settings,
        task: None,
        ticker: None,
        tls_stamp: Vec::new(),
        error: None,
        retry_at: Instant::now(),
    };
    log::info!("http daemon {} starting on {}", ctx.slot, l.settings.listen);
    let mut trimmed_at = 0;
    // Bounded by the daemon's life: each turn handles one event.
    loop {
        if l.task.is_none() && Instant::now() >= l.retry_at {
            try_listen(&ctx, &server, &mut l).await;
        }
        let mut wake = heart.next_due();
        if l.task.is_none() {
            wake = wake.min(l.retry_at);
        }
        tokio::select! {
            _ = tokio::time::sleep_until(wake.into()) => {
                if heart.tick(Instant::now()).is_some() {
                    log.maybe_rotate();
                    // What a burst of clients allocated goes back to the kernel; an idle
                    // server has nothing to give back and skips the heap walk.
                    if server.answered() != trimmed_at {
                        trimmed_at = server.answered();
                        crate::daemon::trim_heap();
                    }
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                match ctx.reload_config() {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => {
                        log::warn!("cannot reload the config: {e}");
                        continue;
                    }
                }
                heart = Heartbeater::new(&ctx)
                    .map_err(|e| format!("cannot create heartbeat socket: {e}"))?;
                heart.mark_ready_told();
                log = ctx.log();
                let Some(new) = ctx.config.http.clone() else { break };
                if new == l.settings && tls_stamp(&new) == l.tls_stamp {
                    // A scale or a reload of something else: the streams open stay open.
                    continue;
                }
                // Another address, hosts or TLS files: a new server.
                if let Some(t) = l.task.take() {
                    t.abort();
                }
                if let Some(t) = l.ticker.take() {
                    t.abort();
                }
                server = Arc::new(new_server(&ctx, &new, &feed));
                l.settings = new;
                l.retry_at = Instant::now();
                log::info!("config reloaded: listening on {} again", l.settings.listen);
            }
        }
    }
    log::info!("http daemon stopping");
    follower.abort();
    if let Some(t) = l.task.take() {
        t.abort();
    }
    serving::remove(&ctx.dir);
    Ok(())
}

fn new_server(ctx: &DaemonCtx, settings: &HttpSettings, feed: &broadcast::Sender<Item>) -> Server {
    let state_dir = ctx
        .config
        .state_dir
        .clone()
        .unwrap_or_else(|| crate::tasks::settings::default_state_dir(ctx.dir.path()));
    Server::new(ctx.dir.clone(), settings, state_dir, feed.clone())
}

/// Binds (and loads the TLS pair); on failure records why in http.json and retries later.
async fn try_listen(ctx: &DaemonCtx, server: &Arc<Server>, l: &mut Listening) {
    let s = &l.settings;
    let bound = async {
        let tls = match (&s.tls_cert, &s.tls_key) {
            (Some(c), Some(k)) => Some(crate::http::tls::acceptor(c, k)?),
            _ => None,
        };
        let listener =
            tokio::net::TcpListener::bind(s.listen)
                .await
                .map_err(|e| match e.kind() {
                    std::io::ErrorKind::AddrInUse => format!(
                        "{} is in use {}",
                        s.listen,
                        crate::http::holder::describe(s.listen)
                    ),
                    _ => format!("cannot listen on {}: {e}", s.listen),
                })?;
        Ok::<_, String>((listener, tls))
    }
    .await;
    let mut state = Serving {
        pid: ctx.pid,
        listen: s.listen.to_string(),
        url: s.url(),
        serving: false,
        error: None,
    };
    l.tls_stamp = tls_stamp(s);
    match bound {
        Ok((listener, tls)) => {
            log::info!("serving the API at {}", s.url());
            state.serving = true;
            l.error = None;
            l.task = Some(tokio::spawn(server.clone().accept_loop(listener, tls)));
            l.ticker = Some(tokio::spawn(server.clone().status_ticker()));
        }
        Err(e) => {
            if l.error.as_ref() != Some(&e) {
                log::error!(
                    "the HTTP API is not serving: {e} (retrying every {} s)",
                    BIND_RETRY.as_secs()
                );
            }
            state.error = Some(e.clone());
            l.error = Some(e);
            l.retry_at = Instant::now() + BIND_RETRY;
        }
    }
    serving::write(&ctx.dir, &state);
}

fn tls_stamp(s: &HttpSettings) -> Vec<(i64, u64)> {
    use std::os::unix::fs::MetadataExt;
    [&s.tls_cert, &s.tls_key]
        .into_iter()
        .flatten()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| (m.mtime(), m.size()))
        .collect()
}

/// inotify's fd for tokio's reactor.
struct Watch(Inotify);

impl AsRawFd for Watch {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// Broadcasts every line appended to the ledger. Woken by inotify on the runtime
/// directory, so an idle cluster costs it no wake-ups at all.
async fn follow_ledger(path: PathBuf, feed: broadcast::Sender<Item>) {
    let Some(dir) = path.parent().map(PathBuf::from) else {
        return;
    };
    let watch = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).and_then(|i| {
        i.add_watch(
            &dir,
            AddWatchFlags::IN_MODIFY | AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO,
        )?;
        Ok(i)
    });
    let registered = watch.map_err(std::io::Error::from).and_then(|i| {
        // SAFETY: Watch owns the inotify fd, which stays open and the same for as long as
        // the AsyncFd that owns the Watch.
        unsafe { AsyncFd::register_with_interest(Watch(i), tokio::io::Interest::READABLE) }
            .map_err(std::io::Error::from)
    });
    let fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            log::error!("cannot watch the ledger ({e}): live events are off");
            return;
        }
    };
    let name = path.file_name().map(|n| n.to_os_string());
    let (_, mut cursor) = ledger_feed::read_since(&path, None);
    // Bounded by the daemon's life: each turn is one batch of inotify events.
    loop {
        let Ok(mut ready) = fd.readable().await else {
            return;
        };
        let mut ours = false;
        match ready.get_inner().0.read_events() {
            Ok(events) => {
                ours = events.iter().any(|e| e.name.is_some() && e.name == name);
            }
            Err(nix::errno::Errno::EAGAIN) => ready.clear_ready(),
            Err(e) => {
                log::error!("reading inotify: {e}: live events are off");
                return;
            }
        }
        if ours {
            let (items, next) = ledger_feed::read_since(&path, Some(cursor));
            cursor = next;
            for it in items {
                // No subscribers is fine: nobody is listening.
                let _ = feed.send(it);
            }
        }
    }
}
