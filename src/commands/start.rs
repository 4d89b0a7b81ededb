//! `nexus start`: check the config and the directory, start the master detached, and
//! return once every daemon is up and heartbeating.

use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::Common;
use crate::client;
use crate::config::{Role, SlotName};
use crate::procscan;
use crate::protocol::{Request, Response, SlotState};
use crate::runtime_dir::{LeaderLock, RuntimeDir};
use crate::spawn::ENV_FRESH_START;

#[inline(never)]
pub fn run(common: &Common, foreground: bool) -> Result<(), String> {
    let cfg = common.load_checked_config()?;
    let dir = RuntimeDir::resolve(common.runtime_dir.as_deref(), cfg.runtime_dir.as_deref());
    dir.prepare()?;
    let lock = dir.leader_lock();
    if LeaderLock::is_held(&lock) {
        let pid = LeaderLock::recorded_pid(&lock).map_or("unknown".into(), |p| p.to_string());
        return Err(format!(
            "already running in {} (master pid {pid}); stop it first with ./stop",
            dir.display()
        ));
    }
    let orphans = procscan::daemons_of(dir.path());
    if !orphans.is_empty() {
        let pids: Vec<String> = orphans
            .iter()
            .map(|f| format!("{} pid {}", f.slot, f.pid))
            .collect();
        return Err(format!(
            "{} daemons of {} are running without a master ({}); run ./stop first",
            orphans.len(),
            dir.display(),
            pids.join(", ")
        ));
    }
    let programs = crate::services::state::leftover_programs(&dir);
    if !programs.is_empty() {
        let list: Vec<String> = programs
            .iter()
            .map(|(n, pid)| format!("{n} pid {pid}"))
            .collect();
        return Err(format!(
            "programs of a previous run in {} are still running without nexus ({}); run ./stop first",
            dir.display(),
            list.join(", ")
        ));
    }
    // Leftovers of a crashed run are not a reason to refuse: nothing owns them. A fresh
    // start starts every service (a service stopped by the user before is started too).
    dir.remove_sockets();
    crate::http::serving::remove(&dir);
    let _ = std::fs::remove_file(dir.stopping_marker());
    crate::services::state::reset(&dir);
    let mut cfg = cfg;
    let state_dir = cfg
        .state_dir
        .clone()
        .unwrap_or_else(|| crate::tasks::settings::default_state_dir(dir.path()));
    prepare_state_dir(&state_dir)?;
    cfg.state_dir = Some(state_dir);
    dir.write_config(&cfg)
        .map_err(|e| format!("cannot write {}: {e}", dir.config_file().display()))?;

    let t0 = Instant::now();
    let exe = std::env::current_exe().map_err(|e| format!("cannot find my own binary: {e}"))?;
    let master_slot = SlotName {
        role: Role::Communicator,
        id: 1,
    };
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(dir.log_file(master_slot))
        .map_err(|e| format!("cannot open the master's log: {e}"))?;
    let mut cmd = Command::new(&exe);
    cmd.args([
        "daemon",
        "--role",
        "communicator",
        "--id",
        "1",
        "--runtime-dir",
    ])
    .arg(dir.path())
    .env(ENV_FRESH_START, "1")
    .stdin(Stdio::null())
    .stdout(log.try_clone().map_err(|e| e.to_string())?)
    .stderr(log)
    .current_dir("/");
    // SAFETY: setsid is async-signal-safe; it detaches the master from our terminal so
    // that closing the shell or a Ctrl-C there does not reach the cluster.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut master = cmd
        .spawn()
        .map_err(|e| format!("cannot start the master: {e}"))?;
    let master_pid = master.id();

    let deadline = t0 + Duration::from_millis(cfg.start_timeout_ms);
    let mut last_missing = vec!["the control socket".to_string()];
    while Instant::now() < deadline {
        if let Ok(Some(status)) = master.try_wait() {
            let tail = last_line(&dir.log_file(master_slot));
            return Err(format!("the master exited at start ({status}): {tail}"));
        }
        if let Ok(Response::Status(report)) = client::request(
            &dir.control_socket(),
            &Request::Status {},
            Duration::from_millis(500),
        ) {
            last_missing = report
                .members
                .iter()
                .filter(|m| m.state != SlotState::Running)
                .map(|m| format!("{} ({:?})", m.slot(), m.state).to_lowercase())
                .collect();
            if last_missing.is_empty() {
                let warnings = match super::service::wait_ready(&dir, &cfg, deadline) {
                    Ok(w) => w,
                    Err(why) => {
                        let _ = super::stop::stop_dir(&dir, cfg.stop_grace_ms, true);
                        return Err(format!("{why}\nstopped what had started"));
                    }
                };
                for w in &warnings {
                    eprintln!("nexus: warning: {w}");
                }
                let ms = t0.elapsed().as_secs_f64() * 1000.0;
                println!(
                    "nexus started in {ms:.1} ms: master pid {master_pid}, runtime dir {}",
                    dir.display()
                );
                println!(
                    "{} communicators, {} watchdogs, {} workflows heartbeating (interval {} ms, timeout {} ms)",
                    cfg.communicators,
                    cfg.watchdogs,
                    cfg.workflows,
                    cfg.interval_ms,
                    cfg.timeout_ms
                );
                if !cfg.services.is_empty() {
                    println!("{}", super::service::summary(&dir, &cfg));
                }
                if cfg.http.is_some() {
                    say_http(&dir);
                }
                if foreground {
                    return stay_in_foreground(&dir, &mut master, &cfg);
                }
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    // Do not leave half a cluster behind.
    let _ = super::stop::stop_dir(&dir, cfg.stop_grace_ms, true);
    Err(format!(
        "the cluster was not whole within {} ms (start_timeout_ms); not heartbeating: {}; stopped what had started (see {})",
        cfg.start_timeout_ms,
        last_missing.join(", "),
        dir.logs_dir().display()
    ))
}

/// Where the API is, and how to get in; or why it is not serving (the cluster is up all
/// the same, DEGRADED until the port is free).
fn say_http(dir: &RuntimeDir) {
    match crate::http::serving::read(dir) {
        Some(h) if h.serving => println!(
            "API and dashboard at {}/ (a key: nexus api-key create --name NAME --scope control{})",
            h.url,
            if dir.path() == std::path::Path::new(crate::runtime_dir::DEFAULT_DIR) {
                String::new()
            } else {
                format!(" --runtime-dir {}", dir.display())
            }
        ),
        Some(h) => eprintln!(
            "nexus: warning: the HTTP API is not serving: {}; the cluster runs without it (DEGRADED) and the port is tried again every 2 s",
            h.error.as_deref().unwrap_or("unknown error")
        ),
        None => eprintln!("nexus: warning: the http daemon has not said whether it serves"),
    }
}

fn last_line(path: &std::path::Path) -> String {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.lines().last().map(str::to_string))
        .unwrap_or_else(|| "no log".into())
}

/// `start --foreground`: the main process of a service manager's unit (systemd
/// `Type=notify`). The master cannot be that process — after a failover its pid changes
/// and the manager would take the old master's death for the service's. So this one
/// waits: SIGTERM or SIGINT stops the cluster in order and returns; a cluster that has
/// vanished (no master, no daemon, for two timeouts) is an error, so the manager restarts.
fn stay_in_foreground(
    dir: &RuntimeDir,
    master: &mut std::process::Child,
    cfg: &crate::config::Config,
) -> Result<(), String> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone())
            .map_err(|e| format!("cannot handle signals: {e}"))?;
    }
    let mut gone_since: Option<Instant> = None;
    // Bounded like every loop here: ten years of 100 ms naps.
    for _ in 0..3_153_600_000u64 {
        if stop.load(Ordering::SeqCst) {
            return super::stop::stop_dir(dir, cfg.stop_grace_ms, false);
        }
        // The first master is our child: reap it if it dies, whoever replaces it.
        let _ = master.try_wait();
        let alive =
            LeaderLock::is_held(&dir.leader_lock()) || !procscan::daemons_of(dir.path()).is_empty();
        match (alive, gone_since) {
            (true, _) => gone_since = None,
            (false, None) => gone_since = Some(Instant::now()),
            (false, Some(t)) if t.elapsed() >= 2 * cfg.timeout() => {
                return Err(format!("the cluster in {} is gone", dir.display()));
            }
            (false, Some(_)) => {}
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// The task queue's directory must be usable, or start refuses with the reason (a queue
/// that cannot be written loses tasks). It is not created here: the queue makes it at
/// its first task, so a cluster that never runs one leaves nothing behind (a benchmark's
/// or a test script's hundred clusters included).
fn prepare_state_dir(path: &std::path::Path) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    // The directory itself, or the nearest ancestor that exists, must be ours to write.
    let mut at = path;
    let meta = loop {
        match std::fs::metadata(at) {
            Ok(m) => break m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match at.parent() {
                Some(p) => at = p,
                None => return Err(format!("cannot use the state directory {}", path.display())),
            },
            Err(e) => {
                return Err(format!(
                    "cannot use the state directory {}: {e}",
                    path.display()
                ));
            }
        }
    };
    if !meta.is_dir() {
        return Err(format!(
            "the state directory {}: {} is not a directory",
            path.display(),
            at.display()
        ));
    }
    // SAFETY: geteuid has no preconditions.
    if at == path && meta.uid() != unsafe { libc::geteuid() } {
        return Err(format!(
            "the state directory {} belongs to uid {}, not to us: choose another `state_dir`",
            path.display(),
            meta.uid()
        ));
    }
    let c = std::ffi::CString::new(at.as_os_str().as_bytes())
        .map_err(|_| format!("the state directory {} has a NUL byte", path.display()))?;
    // SAFETY: access on a NUL-terminated path we own.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) } != 0 {
        return Err(format!(
            "cannot write in the state directory {} ({}: {})",
            path.display(),
            at.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}
