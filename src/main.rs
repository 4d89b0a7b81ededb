//! nexus: a self-healing cluster of local daemons. One binary: the CLI users type, and
//! every daemon (`nexus daemon --role R --id N --runtime-dir DIR`).

mod child;
mod chore;
mod client;
mod commands;
mod config;
mod counters;
mod daemon;
mod http;
mod ledger;
mod logfiles;
mod notify;
mod procscan;
mod protocol;
mod restart_policy;
mod roles;
mod runtime_dir;
mod services;
mod spawn;
mod tasks;

use std::path::PathBuf;
use std::process::ExitCode;

use commands::Common;
use config::{Config, Role, SlotName};
use daemon::DaemonCtx;
use runtime_dir::RuntimeDir;

const USAGE: &str = "\
nexus — a self-healing supervisor: its own daemons and your services

Usage:
  nexus start   [--config PATH] [--runtime-dir DIR] [--foreground]
                                                      start the cluster; returns once every daemon heartbeats
                                                      and every service is ready (in dependency order)
                                                      (--foreground: stay, stop it on SIGTERM: for systemd)
  nexus stop    [--runtime-dir DIR]                   stop it: services (dependents first), workflows,
                                                      watchdogs, standbys, master; nothing is left running
  nexus status  [--json] [--watch] [--runtime-dir DIR]
                                                      one row per daemon and per service instance (exit 0
                                                      whole, 1 degraded, 3 not running); --watch redraws it
  nexus health  [--json]                              HEALTHY, DEGRADED or CRITICAL (exit 0, 1, 2; 3 not running)
  nexus logs    [NAME] [-n N] [-f]                    a daemon's log (workflow-3), a service's (web: its
                                                      instances merged) or an instance's (web-2); without
                                                      a name all, merged by time; -f follows
  nexus metrics                                       Prometheus text: daemons, restarts, heartbeats, recoveries
  nexus scale   NAME=N [NAME=N ...]                  change counts of a running cluster: daemons
                                                      (workflow=8 watchdog=5) and service instances (web=3)
  nexus reload  [--config PATH]                       apply a changed config; a bad one is refused, nothing touched
  nexus restart ROLE-ID                               replace one daemon on purpose (the master hands over)
  nexus service start|stop|restart NAME[-N]           a service (every instance) or one instance; waits until done
  nexus pid     NAME                                  the pid of a daemon (workflow-3) or a program (web-1)
  nexus events  [-n N] [--event TYPE] [--json] [--follow]
                                                      the event ledger (last 20 by default); --event
                                                      keeps one type (task_failed, respawned, ...)
  nexus task    submit|status|list|cancel|retry|wait|logs ...
                                                      the task queue: `nexus task help` says more
  nexus api-key create|list|revoke|check ...          keys for the HTTP API (read or control scope):
                                                      `nexus api-key help` says more
  nexus chaos   [--duration S] [--interval S] [--roles R,R] [--signal kill|stop|mixed] [--services]
                                                      kill random daemons (--services: and programs),
                                                      then check every failure was recovered exactly
                                                      once and no line was lost (exit 1 if not)
  nexus --api URL --api-key-file FILE VERB ...         drive a cluster over its HTTP API: status, health,
                                                      events, logs, metrics, pid, service, restart, scale,
                                                      reload --config PATH, task (NEXUS_API, NEXUS_API_KEY;
                                                      NEXUS_API_CA for a self-signed server's CA)
  nexus help config                                   every config key
  nexus daemon --role ROLE --id N --runtime-dir DIR   (internal: how the master starts each daemon)

The runtime directory is --runtime-dir, else $NEXUS_RUNTIME_DIR, else the config's
runtime_dir, else /tmp/nexus. The config is --config, else $NEXUS_CONFIG, else
runtime/nexus_config.json if present, else the built-in defaults.
Logs: DIR/logs/ROLE-ID.log and DIR/logs/SERVICE-N.log (RUST_LOG=debug for more).
Ledger: DIR/events.jsonl. Services: `nexus help config`, and runtime/examples/.
";

/// Test-only fault injection: `NEXUS_FAULT=crash:workflow-2,mute:watchdog-1` makes those
/// daemons exit at once (crash) or never heartbeat (mute). Production never sets it.
const ENV_FAULT: &str = "NEXUS_FAULT";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) != Some("daemon") {
        // A command-line tool piped into `head` should end quietly, as Unix tools do,
        // rather than panic on a write to a closed pipe.
        // SAFETY: restoring a default disposition before any other thread exists.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match dispatch(&args) {
        Ok(code) => ExitCode::from(code as u8),
        Err(Failure::Usage(msg)) => {
            eprintln!("nexus: {msg}\nRun `nexus help` for usage.");
            ExitCode::from(2)
        }
        Err(Failure::Error(msg)) => {
            // A config can have several problems: one line each, every one marked.
            for line in msg.lines() {
                eprintln!("nexus: {line}");
            }
            ExitCode::from(1)
        }
    }
}

enum Failure {
    Usage(String),
    Error(String),
}

impl From<String> for Failure {
    fn from(s: String) -> Self {
        Failure::Error(s)
    }
}

/// A tiny flag parser: every command's flags are few and known.
struct Args<'a> {
    rest: std::slice::Iter<'a, String>,
}

impl<'a> Args<'a> {
    fn value(&mut self, flag: &str) -> Result<&'a str, Failure> {
        self.rest
            .next()
            .map(String::as_str)
            .ok_or_else(|| Failure::Usage(format!("{flag} needs a value")))
    }
}

/// `--api URL` with `--api-key KEY` or `--api-key-file FILE` (else NEXUS_API and
/// NEXUS_API_KEY): the command goes to a cluster's HTTP API instead of this machine's
/// sockets. Taken out of the arguments wherever they stand.
fn remote_api(args: &mut Vec<String>) -> Result<Option<http::client::Api>, Failure> {
    let mut url = std::env::var("NEXUS_API").ok().filter(|u| !u.is_empty());
    let mut key = std::env::var("NEXUS_API_KEY").ok();
    let mut i = 0;
    // Bounded: each turn consumes an argument.
    while i < args.len() {
        let take = |args: &mut Vec<String>, i: usize| -> Result<String, Failure> {
            if i + 1 >= args.len() {
                return Err(Failure::Usage(format!("{} needs a value", args[i])));
            }
            let v = args.remove(i + 1);
            args.remove(i);
            Ok(v)
        };
        match args[i].as_str() {
            "--api" => url = Some(take(args, i)?),
            "--api-key" => key = Some(take(args, i)?),
            "--api-key-file" => {
                let path = take(args, i)?;
                key = Some(
                    std::fs::read_to_string(&path)
                        .map_err(|e| Failure::Error(format!("--api-key-file {path}: {e}")))?,
                );
            }
            // A task's JSON and whatever follows it are the command's own.
            "submit" => break,
            _ => i += 1,
        }
    }
    let Some(url) = url else {
        return Ok(None);
    };
    let key = key.ok_or_else(|| {
        Failure::Usage(
            "--api needs a key: --api-key-file FILE, NEXUS_API_KEY, or --api-key KEY".into(),
        )
    })?;
    let ca = std::env::var_os("NEXUS_API_CA").map(PathBuf::from);
    Ok(Some(http::client::Api::new(&url, &key, ca)?))
}

fn dispatch(args: &[String]) -> Result<i32, Failure> {
    if args.first().map(String::as_str) != Some("daemon") {
        let mut args = args.to_vec();
        if let Some(api) = remote_api(&mut args)? {
            return Ok(commands::remote::run(&api, &args)?);
        }
        return dispatch_local(&args);
    }
    dispatch_local(args)
}

fn dispatch_local(args: &[String]) -> Result<i32, Failure> {
    let Some((cmd, rest)) = args.split_first() else {
        print!("{USAGE}");
        return Ok(2);
    };
    let mut common = Common::default();
    if cmd == "task" {
        return Ok(commands::task::run(&common, rest)?);
    }
    if cmd == "api-key" {
        return Ok(commands::api_key::run(&common, rest)?);
    }
    let mut json = false;
    let mut follow = false;
    let mut watch = false;
    let mut foreground = false;
    let mut last = 20usize;
    let mut role = None;
    let mut duration = 60.0f64;
    let mut interval = 2.0f64;
    let mut roles = Role::ALL.to_vec();
    let mut signal = commands::chaos::SignalMode::Kill;
    let mut services = false;
    let mut id = None;
    let mut event = None;
    let mut positional = Vec::new();
    let mut it = Args { rest: rest.iter() };
    while let Some(arg) = it.rest.next() {
        match arg.as_str() {
            "--runtime-dir" => common.runtime_dir = Some(PathBuf::from(it.value(arg)?)),
            "--config" => common.config = Some(PathBuf::from(it.value(arg)?)),
            "--json" => json = true,
            "-f" | "--follow" => follow = true,
            "-w" | "--watch" => watch = true,
            "--foreground" => foreground = true,
            "-n" => {
                last = it
                    .value(arg)?
                    .parse()
                    .map_err(|_| Failure::Usage("-n takes a number".into()))?
            }
            "--role" => role = Some(it.value(arg)?.to_string()),
            "--duration" => duration = seconds(arg, it.value(arg)?)?,
            "--interval" => interval = seconds(arg, it.value(arg)?)?,
            "--roles" => {
                roles = it
                    .value(arg)?
                    .split(',')
                    .map(|r| {
                        Role::parse(r.trim())
                            .ok_or_else(|| Failure::Usage(format!("unknown role `{r}` in --roles")))
                    })
                    .collect::<Result<_, _>>()?
            }
            "--signal" => {
                signal = match it.value(arg)? {
                    "kill" => commands::chaos::SignalMode::Kill,
                    "stop" => commands::chaos::SignalMode::Stop,
                    "mixed" => commands::chaos::SignalMode::Mixed,
                    s => {
                        return Err(Failure::Usage(format!(
                            "--signal takes kill, stop or mixed, not `{s}`"
                        )));
                    }
                }
            }
            "--id" => id = Some(it.value(arg)?.to_string()),
            "--services" => services = true,
            "--event" => event = Some(it.value(arg)?.to_string()),
            "-h" | "--help" => {
                print!("{USAGE}");
                return Ok(0);
            }
            s if s.starts_with('-') => {
                return Err(Failure::Usage(format!("unknown option {s} for `{cmd}`")));
            }
            s => positional.push(s.to_string()),
        }
    }
    let no_positional = |p: &[String]| match p.first() {
        Some(x) => Err(Failure::Usage(format!(
            "unexpected argument `{x}` for `{cmd}`"
        ))),
        None => Ok(()),
    };
    match cmd.as_str() {
        "start" => {
            no_positional(&positional)?;
            commands::start::run(&common, foreground)?;
            Ok(0)
        }
        "stop" => {
            no_positional(&positional)?;
            commands::stop::run(&common)?;
            Ok(0)
        }
        "status" => {
            no_positional(&positional)?;
            Ok(commands::status::run(&common, json, watch)?)
        }
        "health" => {
            no_positional(&positional)?;
            Ok(commands::health::run(&common, json)?)
        }
        "logs" => {
            if positional.len() > 1 {
                return Err(Failure::Usage(
                    "logs takes at most one daemon name, like workflow-3".into(),
                ));
            }
            commands::logs::run(
                &common,
                positional.first().map(String::as_str),
                last,
                follow,
            )?;
            Ok(0)
        }
        "metrics" => {
            no_positional(&positional)?;
            Ok(commands::metrics::run(&common)?)
        }
        "restart" => match positional.as_slice() {
            [name] => {
                commands::steer::restart(&common, name)?;
                Ok(0)
            }
            _ => Err(Failure::Usage(
                "restart takes one daemon name, like workflow-3".into(),
            )),
        },
        "service" => match positional.as_slice() {
            [action, target] => {
                commands::service::run(&common, action, target)?;
                Ok(0)
            }
            _ => Err(Failure::Usage(
                "service takes an action and a name: nexus service start|stop|restart NAME[-N]"
                    .into(),
            )),
        },
        "pid" => match positional.as_slice() {
            [name] => Ok(commands::service::pid(&common, name)?),
            _ => Err(Failure::Usage(
                "pid takes one name: a daemon (workflow-3) or a service instance (web-1)".into(),
            )),
        },
        "reload" => {
            no_positional(&positional)?;
            commands::steer::reload(&common)?;
            Ok(0)
        }
        "scale" => {
            commands::steer::scale(&common, &positional)?;
            Ok(0)
        }
        "events" => {
            no_positional(&positional)?;
            commands::events::run(
                &common,
                &commands::events::Options {
                    last,
                    json,
                    follow,
                    event,
                },
            )?;
            Ok(0)
        }
        "chaos" => {
            no_positional(&positional)?;
            let opts = commands::chaos::Options {
                duration: std::time::Duration::from_secs_f64(duration),
                interval: std::time::Duration::from_secs_f64(interval),
                roles,
                signal,
                services,
            };
            Ok(commands::chaos::run(&common, &opts)?)
        }
        "daemon" => {
            // Daemons keep Rust's ignored SIGPIPE: a vanished peer is an error to handle.
            let role = role.ok_or_else(|| Failure::Usage("daemon needs --role".into()))?;
            let role = Role::parse(&role).ok_or_else(|| {
                Failure::Usage(format!(
                    "unknown role `{role}` (communicator, watchdog, workflow)"
                ))
            })?;
            let id: u32 = id
                .and_then(|s| s.parse().ok())
                .filter(|&n| n >= 1)
                .ok_or_else(|| Failure::Usage("daemon needs --id N (1 or more)".into()))?;
            let dir = common
                .runtime_dir
                .ok_or_else(|| Failure::Usage("daemon needs --runtime-dir".into()))?;
            Ok(run_daemon(SlotName { role, id }, RuntimeDir::at(&dir)))
        }
        "help" | "--help" | "-h" => {
            if positional.first().map(String::as_str) == Some("config") {
                println!("Config keys (JSON object; unknown keys are refused):");
                let d = Config::default().to_json();
                for (key, help) in config::KEYS {
                    println!("  {key:<20} {help}");
                }
                println!("\nEach service (an object of `services`):");
                for (key, help) in services::spec::SERVICE_KEY_HELP {
                    println!("  {key:<20} {help}");
                }
                println!("\nDefaults:\n{d}");
                println!("A stack to start from: runtime/examples/stack.json");
            } else {
                print!("{USAGE}");
            }
            Ok(0)
        }
        "--version" | "version" => {
            println!("nexus {}", env!("CARGO_PKG_VERSION"));
            Ok(0)
        }
        other => Err(Failure::Usage(format!("unknown command `{other}`"))),
    }
}

fn seconds(flag: &str, v: &str) -> Result<f64, Failure> {
    match v.parse::<f64>() {
        Ok(s) if s > 0.0 && s <= 86_400.0 => Ok(s),
        _ => Err(Failure::Usage(format!(
            "{flag} takes seconds between 0 and 86400, not `{v}`"
        ))),
    }
}

/// A daemon's life: private umask, its log, its config from the runtime directory, then
/// its role's event loop. Returns the exit code.
fn run_daemon(slot: SlotName, dir: RuntimeDir) -> i32 {
    // We are exec'd through /proc/self/exe, which names the process "exe" in ps and top.
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"nexus".as_ptr()) };
    // Sockets and files we create are ours alone.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    daemon::init_logging(&slot.to_string());
    let config = match Config::load(&dir.config_file()) {
        Ok(c) => c,
        Err(e) => {
            log::error!("{e}");
            return 1;
        }
    };
    daemon::trim_heap();
    if config.slot_index(slot).is_none() {
        log::error!("{slot} is not a slot of this cluster's config");
        return 1;
    }
    if let Some(code) = injected_fault(slot) {
        return code;
    }
    let exe = match std::env::current_exe() {
        // After a rebuild the link reads "<path> (deleted)": argv[0] must stay the path.
        Ok(p) => PathBuf::from(
            p.to_string_lossy()
                .trim_end_matches(" (deleted)")
                .to_string(),
        ),
        Err(e) => {
            log::error!("cannot find my own binary: {e}");
            return 1;
        }
    };
    let ctx = DaemonCtx {
        slot,
        dir,
        config,
        exe,
        pid: std::process::id() as i32,
    };
    let result = match slot.role {
        Role::Communicator => roles::communicator::run(ctx),
        Role::Watchdog => roles::watchdog::run(ctx),
        Role::Workflow => roles::workflow::run(ctx),
        Role::Http => roles::http::run(ctx),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            log::error!("{e}");
            1
        }
    }
}

fn injected_fault(slot: SlotName) -> Option<i32> {
    let spec = std::env::var(ENV_FAULT).ok()?;
    for item in spec.split(',') {
        let Some((kind, target)) = item.split_once(':') else {
            continue;
        };
        if SlotName::parse(target) != Some(slot) {
            continue;
        }
        match kind {
            "crash" => {
                log::warn!("{ENV_FAULT}: crashing at start");
                return Some(1);
            }
            "mute" => {
                log::warn!("{ENV_FAULT}: never heartbeating");
                let mut signals = daemon::Signals::new().ok()?;
                let mut poll = mio::Poll::new().ok()?;
                poll.registry()
                    .register(&mut signals.source, mio::Token(0), mio::Interest::READABLE)
                    .ok()?;
                let mut events = mio::Events::with_capacity(4);
                // Bounded: a muted daemon waits at most an hour for its signal.
                for _ in 0..3600 {
                    let _ = poll.poll(&mut events, Some(std::time::Duration::from_secs(1)));
                    if !events.is_empty() && signals.drain() {
                        return Some(0);
                    }
                }
                return Some(0);
            }
            _ => {}
        }
    }
    None
}
