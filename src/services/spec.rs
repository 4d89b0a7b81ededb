//! A service as the config declares it: parsing and validation that names the service and
//! key at fault and collects every error of a config, the canonical JSON it is written back
//! as (config.json), and which workflow hosts which instance.
//!
//! Two levels of checking: `parse` is pure (syntax, ranges, names, dependencies, cycles)
//! and runs in every daemon that loads the config; `check_environment` looks at the machine
//! (the cwd exists, the user exists and we are root, probe hosts resolve) and runs only
//! where a config is accepted (`start`, `reload`), so that a directory removed later can
//! never stop a running daemon from reading its config.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;

use serde_json::{Map, Value, json};

use crate::config::Role;

pub const MAX_NAME: usize = 40;

/// How the program is run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Run {
    /// An argv, exec'd without a shell.
    Command(Vec<String>),
    /// One string for `/bin/sh -c`.
    Shell(String),
}

impl Run {
    pub fn argv(&self) -> Vec<String> {
        match self {
            Run::Command(v) => v.clone(),
            Run::Shell(s) => vec!["/bin/sh".into(), "-c".into(), s.clone()],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartMode {
    Always,
    OnFailure,
    Never,
}

impl RestartMode {
    pub fn as_str(self) -> &'static str {
        match self {
            RestartMode::Always => "always",
            RestartMode::OnFailure => "on-failure",
            RestartMode::Never => "never",
        }
    }
}

/// What a dependent waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Condition {
    /// The dependency's program has been exec'd.
    Started,
    Ready,
    /// It exited cleanly and is not restarted (restart on-failure or never).
    Completed,
}

impl Condition {
    pub fn as_str(self) -> &'static str {
        match self {
            Condition::Started => "started",
            Condition::Ready => "ready",
            Condition::Completed => "completed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeKind {
    /// GET `path` from `host:port`; 2xx or 3xx is success.
    Http {
        host: String,
        port: u16,
        path: String,
    },
    /// A TCP connect succeeds.
    Tcp { host: String, port: u16 },
    /// The command exits 0.
    Exec(Vec<String>),
    /// A line of the program's output matches (readiness only).
    Log(String),
    /// READY=1 on `$NOTIFY_SOCKET` (readiness only; liveness is `watchdog_ms`).
    Notify,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub kind: ProbeKind,
    pub period_ms: u64,
    pub timeout_ms: u64,
    /// Consecutive failures that make a liveness probe's verdict a hang.
    pub failures: u32,
    pub initial_delay_ms: u64,
}

impl Probe {
    pub fn describe(&self) -> String {
        match &self.kind {
            ProbeKind::Http { host, port, path } => format!("http://{host}:{port}{path}"),
            ProbeKind::Tcp { host, port } => format!("tcp {host}:{port}"),
            ProbeKind::Exec(argv) => format!("exec {}", argv.join(" ")),
            ProbeKind::Log(re) => format!("log /{re}/"),
            ProbeKind::Notify => "notify".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub memory_max: Option<u64>,
    pub pids_max: Option<u64>,
    pub nofile: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    pub name: String,
    pub run: Run,
    pub cwd: Option<PathBuf>,
    pub env: BTreeMap<String, String>,
    pub user: Option<String>,
    pub group: Option<String>,
    pub instances: u32,
    pub restart: RestartMode,
    pub critical: bool,
    pub depends_on: BTreeMap<String, Condition>,
    pub ready: Option<Probe>,
    pub liveness: Option<Probe>,
    pub watchdog_ms: Option<u64>,
    /// The signal number and its name as written (`SIGTERM`).
    pub stop_signal: (i32, String),
    pub stop_grace_ms: u64,
    pub limits: Limits,
}

/// Instance `n` (1-based) of service `service`: `web-2`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstanceName {
    pub service: String,
    pub n: u32,
}

impl fmt::Display for InstanceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.service, self.n)
    }
}

impl InstanceName {
    /// Parses `web-2` (the service name may itself contain dashes).
    pub fn parse(s: &str) -> Option<InstanceName> {
        let (service, n) = s.rsplit_once('-')?;
        let n: u32 = n.parse().ok().filter(|&n| n >= 1)?;
        valid_name(service).then(|| InstanceName {
            service: service.to_string(),
            n,
        })
    }
}

pub fn valid_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && s.len() <= MAX_NAME
        && Role::parse(s).is_none()
}

/// Errors collected while reading a config: each one line naming what is at fault.
#[derive(Debug, Default)]
pub struct Problems(pub Vec<String>);

impl Problems {
    pub fn push(&mut self, msg: impl Into<String>) {
        self.0.push(msg.into());
    }
}

/// A JSON value in words, for the messages that say what a key got instead.
pub fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".to_string(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string {s:?}"),
        Value::Array(_) => "a list".to_string(),
        Value::Object(_) => "an object".to_string(),
    }
}

/// Reads the services of one service object, pushing every problem found.
struct Reader<'a> {
    who: String,
    problems: &'a mut Problems,
}

impl Reader<'_> {
    fn bad(&mut self, key: &str, msg: impl fmt::Display) {
        self.problems.push(format!("{}: `{key}` {msg}", self.who));
    }

    fn string(&mut self, key: &str, v: &Value) -> Option<String> {
        match v {
            Value::String(s) if !s.is_empty() => Some(s.clone()),
            other => {
                self.bad(
                    key,
                    format!("must be a non-empty string, got {}", describe(other)),
                );
                None
            }
        }
    }

    fn number(&mut self, key: &str, v: &Value, min: u64, max: u64) -> Option<u64> {
        match v.as_u64() {
            Some(n) if (min..=max).contains(&n) => Some(n),
            Some(n) => {
                self.bad(key, format!("is {n}, but must be from {min} to {max}"));
                None
            }
            None => {
                self.bad(
                    key,
                    format!(
                        "must be a whole number from {min} to {max}, got {}",
                        describe(v)
                    ),
                );
                None
            }
        }
    }

    fn bool(&mut self, key: &str, v: &Value) -> Option<bool> {
        match v {
            Value::Bool(b) => Some(*b),
            other => {
                self.bad(
                    key,
                    format!("must be true or false, got {}", describe(other)),
                );
                None
            }
        }
    }

    fn argv(&mut self, key: &str, v: &Value) -> Option<Vec<String>> {
        let Value::Array(items) = v else {
            self.bad(
                key,
                format!("must be a list of strings (an argv), got {}", describe(v)),
            );
            return None;
        };
        if items.is_empty() {
            self.bad(key, "is an empty argv: name the program to run");
            return None;
        }
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            match item {
                Value::String(s) if !s.contains('\0') => out.push(s.clone()),
                other => {
                    self.bad(
                        &format!("{key}[{i}]"),
                        format!("must be a string, got {}", describe(other)),
                    );
                    return None;
                }
            }
        }
        if out[0].is_empty() {
            self.bad(key, "starts with an empty program name");
            return None;
        }
        Some(out)
    }

    fn probe(&mut self, key: &str, v: &Value, liveness: bool) -> Option<Probe> {
        let mut p = Probe {
            kind: ProbeKind::Notify,
            period_ms: if liveness { 1000 } else { 100 },
            timeout_ms: 1000,
            failures: if liveness { 3 } else { 1 },
            initial_delay_ms: 0,
        };
        let obj = match v {
            Value::String(s) if s == "notify" => {
                if liveness {
                    self.bad(
                        key,
                        "cannot be \"notify\": sd_notify liveness is `watchdog_ms` (WATCHDOG=1)",
                    );
                    return None;
                }
                return Some(p);
            }
            Value::Object(o) => o,
            other => {
                self.bad(
                    key,
                    format!(
                        "must be an object like {{\"http\": URL}} or the string \"notify\", got {}",
                        describe(other)
                    ),
                );
                return None;
            }
        };
        let kinds: Vec<&str> = ["http", "tcp", "exec", "log", "notify"]
            .into_iter()
            .filter(|k| obj.contains_key(*k))
            .collect();
        if kinds.len() != 1 {
            self.bad(
                key,
                format!(
                    "must name exactly one check (http, tcp, exec, log or notify), found {}",
                    if kinds.is_empty() {
                        "none".to_string()
                    } else {
                        kinds.join(", ")
                    }
                ),
            );
            return None;
        }
        let mut ok = true;
        for (k, val) in obj {
            let sub = format!("{key}.{k}");
            match k.as_str() {
                "http" => match self.string(&sub, val) {
                    Some(url) => match parse_http_url(&url) {
                        Ok((host, port, path)) => p.kind = ProbeKind::Http { host, port, path },
                        Err(why) => {
                            self.bad(&sub, why);
                            ok = false;
                        }
                    },
                    None => ok = false,
                },
                "tcp" => match self.string(&sub, val) {
                    Some(addr) => match parse_host_port(&addr) {
                        Ok((host, port)) => p.kind = ProbeKind::Tcp { host, port },
                        Err(why) => {
                            self.bad(&sub, why);
                            ok = false;
                        }
                    },
                    None => ok = false,
                },
                "exec" => match self.argv(&sub, val) {
                    Some(argv) => p.kind = ProbeKind::Exec(argv),
                    None => ok = false,
                },
                "log" => match self.string(&sub, val) {
                    Some(re) if liveness => {
                        let _ = re;
                        self.bad(&sub, "is for readiness only (`ready`), not liveness");
                        ok = false;
                    }
                    Some(re) => match regex_lite::Regex::new(&re) {
                        Ok(_) => p.kind = ProbeKind::Log(re),
                        Err(e) => {
                            let first = e.to_string().lines().last().unwrap_or("").to_string();
                            self.bad(&sub, format!("is not a valid regex: {first}"));
                            ok = false;
                        }
                    },
                    None => ok = false,
                },
                "notify" => {
                    if liveness {
                        self.bad(
                            &sub,
                            "cannot be a liveness check: use `watchdog_ms` (WATCHDOG=1)",
                        );
                        ok = false;
                    } else if val != &Value::Bool(true) {
                        self.bad(&sub, "must be true");
                        ok = false;
                    }
                }
                "period_ms" => match self.number(&sub, val, 10, 3_600_000) {
                    Some(n) => p.period_ms = n,
                    None => ok = false,
                },
                "timeout_ms" => match self.number(&sub, val, 1, 600_000) {
                    Some(n) => p.timeout_ms = n,
                    None => ok = false,
                },
                "failures" => {
                    if !liveness {
                        self.bad(
                            &sub,
                            "applies to liveness only: readiness waits for success",
                        );
                        ok = false;
                    } else {
                        match self.number(&sub, val, 1, 1000) {
                            Some(n) => p.failures = n as u32,
                            None => ok = false,
                        }
                    }
                }
                "initial_delay_ms" => match self.number(&sub, val, 0, 3_600_000) {
                    Some(n) => p.initial_delay_ms = n,
                    None => ok = false,
                },
                other => {
                    self.bad(
                        &format!("{key}.{other}"),
                        "is not a probe key (http, tcp, exec, log, notify, period_ms, timeout_ms, failures, initial_delay_ms)",
                    );
                    ok = false;
                }
            }
        }
        ok.then_some(p)
    }
}

/// `http://HOST[:PORT][/PATH]` → (host, port, path). https is refused: a probe checks a
/// local program, and a TLS stack in every workflow would cost more memory than it earns.
pub fn parse_http_url(url: &str) -> Result<(String, u16, String), String> {
    let rest = match url.strip_prefix("http://") {
        Some(r) => r,
        None if url.starts_with("https://") => {
            return Err(format!(
                "is {url:?}: https probes are not supported (probe the plain port, or use an exec probe with curl)"
            ));
        }
        None => return Err(format!("is {url:?}, not an http:// URL")),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "is {url:?}: the path has spaces or control characters"
        ));
    }
    let (host, port) = if authority.contains(':') {
        parse_host_port(authority)?
    } else {
        (authority.to_string(), 80)
    };
    if host.is_empty() {
        return Err(format!("is {url:?}: no host"));
    }
    Ok((host, port, path.to_string()))
}

/// `HOST:PORT`, `[v6]:PORT` → (host, port).
pub fn parse_host_port(s: &str) -> Result<(String, u16), String> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest
            .split_once("]:")
            .ok_or_else(|| format!("is {s:?}, not HOST:PORT"))?;
        (h, p)
    } else {
        s.rsplit_once(':')
            .ok_or_else(|| format!("is {s:?}, not HOST:PORT"))?
    };
    let port: u16 = match port.parse() {
        Ok(p) if p > 0 => p,
        _ => return Err(format!("is {s:?}: the port must be 1-65535")),
    };
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c == '/') {
        return Err(format!("is {s:?}: not a host name or address"));
    }
    Ok((host.to_string(), port))
}

fn signal_number(name: &str) -> Option<i32> {
    let bare = name.strip_prefix("SIG").unwrap_or(name);
    let sig: nix::sys::signal::Signal = format!("SIG{bare}").parse().ok()?;
    Some(sig as i32)
}

/// Parses the `services` list. Problems are pushed, never returned early: a user fixing a
/// config sees every mistake at once.
pub fn parse_services(v: &Value, problems: &mut Problems) -> Vec<ServiceSpec> {
    let Value::Array(items) = v else {
        problems.push(format!(
            "`services` must be a list of service objects, got {}",
            describe(v)
        ));
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, item) in items.iter().enumerate() {
        let Value::Object(obj) = item else {
            problems.push(format!(
                "services[{i}]: must be an object, got {}",
                describe(item)
            ));
            continue;
        };
        let name = match obj.get("name") {
            Some(Value::String(n)) if valid_name(n) => Some(n.clone()),
            Some(Value::String(n)) => {
                problems.push(format!(
                    "services[{i}]: `name` {n:?} is invalid: use [a-z][a-z0-9-]*, at most {MAX_NAME} characters, not a role name (communicator, watchdog, workflow)"
                ));
                None
            }
            Some(other) => {
                problems.push(format!(
                    "services[{i}]: `name` must be a string, got {}",
                    describe(other)
                ));
                None
            }
            None => {
                problems.push(format!("services[{i}]: `name` is missing"));
                None
            }
        };
        if let Some(n) = &name
            && !seen.insert(n.clone())
        {
            problems.push(format!(
                "service `{n}`: the name is used twice (services[{i}])"
            ));
        }
        let who = name
            .as_ref()
            .map_or(format!("services[{i}]"), |n| format!("service `{n}`"));
        let before = problems.0.len();
        let spec = parse_one(obj, &who, name.clone().unwrap_or_default(), problems);
        if let (Some(spec), true) = (spec, problems.0.len() == before && name.is_some()) {
            out.push(spec);
        }
    }
    check_dependencies(&out, items, problems);
    out
}

fn parse_one(
    obj: &Map<String, Value>,
    who: &str,
    name: String,
    problems: &mut Problems,
) -> Option<ServiceSpec> {
    let mut r = Reader {
        who: who.to_string(),
        problems,
    };
    let mut spec = ServiceSpec {
        name,
        run: Run::Command(Vec::new()),
        cwd: None,
        env: BTreeMap::new(),
        user: None,
        group: None,
        instances: 1,
        restart: RestartMode::Always,
        critical: true,
        depends_on: BTreeMap::new(),
        ready: None,
        liveness: None,
        watchdog_ms: None,
        stop_signal: (libc::SIGTERM, "SIGTERM".into()),
        stop_grace_ms: 5000,
        limits: Limits::default(),
    };
    match (obj.get("command"), obj.get("shell")) {
        (Some(_), Some(_)) => r.bad("command", "and `shell` are both given: use exactly one"),
        (None, None) => r.bad(
            "command",
            "is missing: give `command` (an argv) or `shell` (a string for /bin/sh -c)",
        ),
        (Some(c), None) => {
            if let Some(argv) = r.argv("command", c) {
                spec.run = Run::Command(argv);
            }
        }
        (None, Some(s)) => {
            if let Some(s) = r.string("shell", s) {
                spec.run = Run::Shell(s);
            }
        }
    }
    for (key, v) in obj {
        match key.as_str() {
            "name" | "command" | "shell" => {}
            "cwd" => spec.cwd = r.string(key, v).map(PathBuf::from),
            "env" => match v {
                Value::Object(vars) => {
                    for (k, val) in vars {
                        let sub = format!("env.{k}");
                        if k.is_empty() || k.contains('=') || k.contains('\0') {
                            r.bad(&sub, "is not a valid variable name");
                        } else if ["NEXUS_SERVICE", "NEXUS_INSTANCE", "NOTIFY_SOCKET"]
                            .contains(&k.as_str())
                        {
                            r.bad(&sub, "is set by nexus itself");
                        } else {
                            match val {
                                Value::String(s) if !s.contains('\0') => {
                                    spec.env.insert(k.clone(), s.clone());
                                }
                                _ => r.bad(&sub, "must be a string (quote numbers)"),
                            }
                        }
                    }
                }
                other => r.bad(
                    key,
                    format!("must be an object of strings, got {}", describe(other)),
                ),
            },
            "user" => spec.user = r.string(key, v),
            "group" => spec.group = r.string(key, v),
            "instances" => {
                if let Some(n) = r.number(key, v, 0, crate::config::MAX_WORKFLOWS as u64) {
                    spec.instances = n as u32;
                }
            }
            "restart" => match v.as_str() {
                Some("always") => spec.restart = RestartMode::Always,
                Some("on-failure") => spec.restart = RestartMode::OnFailure,
                Some("never") => spec.restart = RestartMode::Never,
                _ => r.bad(
                    key,
                    format!(
                        "must be \"always\", \"on-failure\" or \"never\", got {}",
                        describe(v)
                    ),
                ),
            },
            "critical" => {
                if let Some(b) = r.bool(key, v) {
                    spec.critical = b;
                }
            }
            "depends_on" => match v {
                Value::Object(deps) => {
                    for (dep, cond) in deps {
                        let c = match cond.as_str() {
                            Some("started") => Condition::Started,
                            Some("ready") => Condition::Ready,
                            Some("completed") => Condition::Completed,
                            _ => {
                                r.bad(
                                    &format!("depends_on.{dep}"),
                                    format!(
                                        "must be \"started\", \"ready\" or \"completed\", got {}",
                                        describe(cond)
                                    ),
                                );
                                continue;
                            }
                        };
                        spec.depends_on.insert(dep.clone(), c);
                    }
                }
                other => r.bad(
                    key,
                    format!(
                        "must be an object like {{\"web\": \"ready\"}}, got {}",
                        describe(other)
                    ),
                ),
            },
            "ready" => spec.ready = r.probe(key, v, false),
            "liveness" => spec.liveness = r.probe(key, v, true),
            "watchdog_ms" => spec.watchdog_ms = r.number(key, v, 10, 3_600_000),
            "stop_signal" => match v.as_str().and_then(|s| Some((signal_number(s)?, s))) {
                Some((n, s)) => spec.stop_signal = (n, s.to_string()),
                None => r.bad(
                    key,
                    format!(
                        "must be a signal name like \"SIGTERM\", got {}",
                        describe(v)
                    ),
                ),
            },
            "stop_grace_ms" => {
                if let Some(n) = r.number(key, v, 0, 600_000) {
                    spec.stop_grace_ms = n;
                }
            }
            "limits" => match v {
                Value::Object(l) => {
                    for (k, val) in l {
                        let sub = format!("limits.{k}");
                        match k.as_str() {
                            "memory_max" => {
                                spec.limits.memory_max = r.number(&sub, val, 1 << 20, 1 << 40)
                            }
                            "pids_max" => spec.limits.pids_max = r.number(&sub, val, 1, 4_194_304),
                            "nofile" => spec.limits.nofile = r.number(&sub, val, 8, 1 << 20),
                            _ => r.bad(&sub, "is not a limit (memory_max, pids_max, nofile)"),
                        }
                    }
                }
                other => r.bad(key, format!("must be an object, got {}", describe(other))),
            },
            other => r.bad(
                other,
                format!("is not a service key (known: {})", SERVICE_KEYS.join(", ")),
            ),
        }
    }
    if spec.group.is_some() && spec.user.is_none() {
        r.bad("group", "needs `user` too");
    }
    Some(spec)
}

/// What `nexus help config` says about each service key.
pub const SERVICE_KEY_HELP: &[(&str, &str)] = &[
    (
        "name",
        "unique, [a-z][a-z0-9-]*, not a role name; instance N is NAME-N",
    ),
    ("command", "the argv to run (no shell); or"),
    (
        "shell",
        "one string run by /bin/sh -c (exactly one of command and shell)",
    ),
    (
        "cwd",
        "working directory; relative to the config file's directory, which is the default",
    ),
    (
        "env",
        "extra environment (object of strings); never printed by nexus",
    ),
    (
        "user, group",
        "run as this user and group (nexus must run as root)",
    ),
    (
        "instances",
        "how many (default 1); each needs a workflow: workflows >= the total",
    ),
    (
        "restart",
        "always (default), on-failure or never; a clean exit under the last two is completed",
    ),
    (
        "critical",
        "default true: not ready makes the cluster CRITICAL, else DEGRADED",
    ),
    (
        "depends_on",
        "{\"web\": \"started\"|\"ready\"|\"completed\"}: start once those hold",
    ),
    (
        "ready",
        "a probe: {\"http\": URL} {\"tcp\": \"HOST:PORT\"} {\"exec\": [argv]} {\"log\": REGEX} or \"notify\"",
    ),
    (
        "liveness",
        "a probe (http, tcp, exec) with period_ms, timeout_ms, failures, initial_delay_ms",
    ),
    (
        "watchdog_ms",
        "sd_notify WATCHDOG=1 expected at least this often, else it is hung",
    ),
    ("stop_signal", "how it is asked to stop (default SIGTERM)"),
    (
        "stop_grace_ms",
        "then SIGKILL for the whole tree after this long (default 5000)",
    ),
    (
        "limits",
        "{\"memory_max\": bytes, \"pids_max\": n, \"nofile\": n}: cgroup v2, else rlimits",
    ),
];

pub const SERVICE_KEYS: &[&str] = &[
    "name",
    "command",
    "shell",
    "cwd",
    "env",
    "user",
    "group",
    "instances",
    "restart",
    "critical",
    "depends_on",
    "ready",
    "liveness",
    "watchdog_ms",
    "stop_signal",
    "stop_grace_ms",
    "limits",
];

/// Unknown dependencies, impossible conditions and cycles (printed as a path).
fn check_dependencies(specs: &[ServiceSpec], raw: &[Value], problems: &mut Problems) {
    let known: BTreeSet<&str> = raw.iter().filter_map(|v| v.get("name")?.as_str()).collect();
    let by_name: BTreeMap<&str, &ServiceSpec> =
        specs.iter().map(|s| (s.name.as_str(), s)).collect();
    for s in specs {
        for (dep, cond) in &s.depends_on {
            if dep == &s.name {
                problems.push(format!(
                    "service `{}`: `depends_on.{dep}`: a service cannot depend on itself",
                    s.name
                ));
            } else if !known.contains(dep.as_str()) {
                problems.push(format!(
                    "service `{}`: `depends_on.{dep}`: no service is called `{dep}`",
                    s.name
                ));
            } else if *cond == Condition::Completed
                && by_name
                    .get(dep.as_str())
                    .is_some_and(|d| d.restart == RestartMode::Always)
            {
                problems.push(format!(
                    "service `{}`: `depends_on.{dep}` is \"completed\", but `{dep}` has restart \"always\" and so never completes",
                    s.name
                ));
            }
        }
    }
    if let Some(cycle) = find_cycle(specs) {
        problems.push(format!(
            "services depend on each other in a cycle: {}",
            cycle.join(" -> ")
        ));
    }
}

/// A dependency cycle, as the names along it (first = last), if there is one.
pub fn find_cycle(specs: &[ServiceSpec]) -> Option<Vec<String>> {
    let deps: BTreeMap<&str, Vec<&str>> = specs
        .iter()
        .map(|s| {
            (
                s.name.as_str(),
                s.depends_on.keys().map(String::as_str).collect(),
            )
        })
        .collect();
    // 0 unvisited, 1 on the current path, 2 done.
    let mut mark: BTreeMap<&str, u8> = deps.keys().map(|k| (*k, 0)).collect();
    fn visit<'a>(
        n: &'a str,
        deps: &BTreeMap<&'a str, Vec<&'a str>>,
        mark: &mut BTreeMap<&'a str, u8>,
        path: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        match mark.get(n) {
            Some(2) | None => return None,
            Some(1) => {
                let start = path.iter().position(|p| *p == n).unwrap_or(0);
                let mut cycle: Vec<String> = path[start..].iter().map(|s| s.to_string()).collect();
                cycle.push(n.to_string());
                return Some(cycle);
            }
            _ => {}
        }
        mark.insert(n, 1);
        path.push(n);
        for d in deps.get(n).into_iter().flatten() {
            if let Some(c) = visit(d, deps, mark, path) {
                return Some(c);
            }
        }
        path.pop();
        mark.insert(n, 2);
        None
    }
    let names: Vec<&str> = deps.keys().copied().collect();
    for n in names {
        let mut path = Vec::new();
        if let Some(c) = visit(n, &deps, &mut mark, &mut path) {
            return Some(c);
        }
    }
    None
}

/// Dependency depth of each service: 0 for none, else 1 + the deepest dependency. Start
/// order is by increasing depth, stop order by decreasing. Needs an acyclic config.
pub fn depths(specs: &[ServiceSpec]) -> BTreeMap<String, u32> {
    let mut depth: BTreeMap<String, u32> = BTreeMap::new();
    // Bounded: each pass fixes at least one service in an acyclic graph.
    for _ in 0..=specs.len() {
        let mut changed = false;
        for s in specs {
            let d = s
                .depends_on
                .keys()
                .map(|dep| depth.get(dep).map_or(1, |x| x + 1))
                .max()
                .unwrap_or(0);
            if depth.get(&s.name) != Some(&d) {
                depth.insert(s.name.clone(), d);
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    depth
}

impl ServiceSpec {
    /// The canonical JSON form: what config.json holds and `parse_services` reads back.
    pub fn to_json(&self) -> Value {
        let mut o = Map::new();
        o.insert("name".into(), json!(self.name));
        match &self.run {
            Run::Command(argv) => o.insert("command".into(), json!(argv)),
            Run::Shell(s) => o.insert("shell".into(), json!(s)),
        };
        if let Some(c) = &self.cwd {
            o.insert("cwd".into(), json!(c));
        }
        if !self.env.is_empty() {
            o.insert("env".into(), json!(self.env));
        }
        if let Some(u) = &self.user {
            o.insert("user".into(), json!(u));
        }
        if let Some(g) = &self.group {
            o.insert("group".into(), json!(g));
        }
        o.insert("instances".into(), json!(self.instances));
        o.insert("restart".into(), json!(self.restart.as_str()));
        o.insert("critical".into(), json!(self.critical));
        if !self.depends_on.is_empty() {
            let deps: Map<String, Value> = self
                .depends_on
                .iter()
                .map(|(k, c)| (k.clone(), json!(c.as_str())))
                .collect();
            o.insert("depends_on".into(), Value::Object(deps));
        }
        for (key, probe) in [("ready", &self.ready), ("liveness", &self.liveness)] {
            if let Some(p) = probe {
                o.insert(key.into(), probe_json(p, key == "liveness"));
            }
        }
        if let Some(w) = self.watchdog_ms {
            o.insert("watchdog_ms".into(), json!(w));
        }
        o.insert("stop_signal".into(), json!(self.stop_signal.1));
        o.insert("stop_grace_ms".into(), json!(self.stop_grace_ms));
        let mut l = Map::new();
        for (k, v) in [
            ("memory_max", self.limits.memory_max),
            ("pids_max", self.limits.pids_max),
            ("nofile", self.limits.nofile),
        ] {
            if let Some(v) = v {
                l.insert(k.into(), json!(v));
            }
        }
        if !l.is_empty() {
            o.insert("limits".into(), Value::Object(l));
        }
        Value::Object(o)
    }

    /// What makes a running instance out of date: everything but the instance count.
    /// FNV-1a over the canonical JSON, stable across builds and processes.
    pub fn definition_hash(&self) -> u64 {
        let mut v = self.to_json();
        if let Value::Object(o) = &mut v {
            o.remove("instances");
        }
        let text = v.to_string();
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in text.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h
    }

    pub fn instance(&self, n: u32) -> InstanceName {
        InstanceName {
            service: self.name.clone(),
            n,
        }
    }
}

fn probe_json(p: &Probe, liveness: bool) -> Value {
    let mut o = Map::new();
    match &p.kind {
        ProbeKind::Notify => return json!("notify"),
        ProbeKind::Http { host, port, path } => {
            let h = if host.contains(':') {
                format!("[{host}]")
            } else {
                host.clone()
            };
            o.insert("http".into(), json!(format!("http://{h}:{port}{path}")))
        }
        ProbeKind::Tcp { host, port } => {
            let h = if host.contains(':') {
                format!("[{host}]")
            } else {
                host.clone()
            };
            o.insert("tcp".into(), json!(format!("{h}:{port}")))
        }
        ProbeKind::Exec(argv) => o.insert("exec".into(), json!(argv)),
        ProbeKind::Log(re) => o.insert("log".into(), json!(re)),
    };
    o.insert("period_ms".into(), json!(p.period_ms));
    o.insert("timeout_ms".into(), json!(p.timeout_ms));
    if liveness {
        o.insert("failures".into(), json!(p.failures));
    }
    o.insert("initial_delay_ms".into(), json!(p.initial_delay_ms));
    Value::Object(o)
}

/// What a user's target names: one instance (`web-2`), or every instance of a service.
pub fn targets(specs: &[ServiceSpec], target: &str) -> Result<Vec<InstanceName>, String> {
    let find = |name: &str| specs.iter().find(|s| s.name == name);
    if let Some(spec) = find(target) {
        return Ok((1..=spec.instances).map(|n| spec.instance(n)).collect());
    }
    if let Some(inst) = InstanceName::parse(target)
        && let Some(spec) = find(&inst.service)
    {
        if inst.n > spec.instances {
            return Err(format!(
                "service `{}` has {} instance{}; there is no {inst}",
                spec.name,
                spec.instances,
                if spec.instances == 1 { "" } else { "s" }
            ));
        }
        return Ok(vec![inst]);
    }
    let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    let known = if names.is_empty() {
        "this cluster has no services".to_string()
    } else {
        format!("known: {}", names.join(", "))
    };
    Err(format!("no service or instance `{target}` ({known})"))
}

/// Which instance each workflow hosts, in order: workflow-1 the first instance of the
/// first service, and so on; the rest host nothing. Index 0 is workflow-1.
pub fn assignment(specs: &[ServiceSpec], workflows: u32) -> Vec<Option<InstanceName>> {
    let mut out: Vec<Option<InstanceName>> = specs
        .iter()
        .flat_map(|s| (1..=s.instances).map(move |n| Some(s.instance(n))))
        .take(workflows as usize)
        .collect();
    out.resize(workflows as usize, None);
    out
}

/// Checks against the machine, for where a config is accepted (see the module doc).
pub fn check_environment(specs: &[ServiceSpec], problems: &mut Problems) {
    let root = nix::unistd::geteuid().is_root();
    for s in specs {
        let who = format!("service `{}`", s.name);
        if let Some(cwd) = &s.cwd
            && !cwd.is_dir()
        {
            problems.push(format!(
                "{who}: `cwd` {} does not exist or is not a directory",
                cwd.display()
            ));
        }
        if let Some(u) = &s.user {
            if !root {
                problems.push(format!(
                    "{who}: `user` {u:?} needs nexus to run as root (it runs as uid {})",
                    nix::unistd::geteuid()
                ));
            } else if crate::services::identity::lookup_user(u).is_none() {
                problems.push(format!("{who}: `user` {u:?} is not a user of this machine"));
            }
        }
        if let Some(g) = &s.group
            && root
            && crate::services::identity::lookup_group(g).is_none()
        {
            problems.push(format!(
                "{who}: `group` {g:?} is not a group of this machine"
            ));
        }
        for (key, probe) in [("ready", &s.ready), ("liveness", &s.liveness)] {
            let host = match probe.as_ref().map(|p| &p.kind) {
                Some(ProbeKind::Http { host, .. } | ProbeKind::Tcp { host, .. }) => host,
                _ => continue,
            };
            if crate::services::probes::resolve(host, 1).is_err() {
                problems.push(format!(
                    "{who}: `{key}`: host {host:?} is not an IP address, localhost, or in /etc/hosts"
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> (Vec<ServiceSpec>, Vec<String>) {
        let mut p = Problems::default();
        let v: Value = serde_json::from_str(text).unwrap();
        let specs = parse_services(&v, &mut p);
        (specs, p.0)
    }

    #[test]
    fn the_design_example_parses_and_round_trips() {
        let (specs, problems) = parse(
            r#"[{ "name": "web", "command": ["python3", "-m", "http.server", "8080"], "cwd": "/srv/www",
                  "env": { "PYTHONUNBUFFERED": "1" }, "instances": 1, "restart": "always", "critical": true,
                  "ready":    { "http": "http://127.0.0.1:8080/", "period_ms": 200, "timeout_ms": 1000 },
                  "liveness": { "http": "http://127.0.0.1:8080/", "period_ms": 1000, "timeout_ms": 1000, "failures": 3 },
                  "stop_signal": "SIGTERM", "stop_grace_ms": 5000 },
                { "name": "worker", "shell": "while sleep 1; do echo tick; done", "depends_on": { "web": "ready" } }]"#,
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(specs.len(), 2);
        let web = &specs[0];
        assert_eq!(
            web.ready.as_ref().unwrap().kind,
            ProbeKind::Http {
                host: "127.0.0.1".into(),
                port: 8080,
                path: "/".into()
            }
        );
        assert_eq!(web.liveness.as_ref().unwrap().failures, 3);
        assert_eq!(specs[1].depends_on["web"], Condition::Ready);
        assert_eq!(specs[1].run.argv()[0], "/bin/sh");
        let again = Value::Array(specs.iter().map(ServiceSpec::to_json).collect());
        let (back, problems) = parse(&again.to_string());
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(back, specs, "config.json reads back the same");
    }

    #[test]
    fn every_problem_is_reported_naming_the_service_and_key() {
        let (_, problems) = parse(
            r#"[{ "name": "web", "command": ["a"], "shell": "b" },
                { "name": "web", "command": ["x"] },
                { "name": "Bad Name", "command": ["x"] },
                { "name": "empty", "command": [] },
                { "name": "none" },
                { "name": "dep", "command": ["x"], "depends_on": { "ghost": "ready" } },
                { "name": "probe", "command": ["x"], "ready": { "http": "http://localhost:99999/" },
                  "liveness": { "tcp": "nohost" }, "restart": "sometimes", "colour": 1 },
                { "name": "workflow", "command": ["x"] }]"#,
        );
        let joined = problems.join("\n");
        for needle in [
            "service `web`: `command` and `shell` are both given",
            "service `web`: the name is used twice",
            "\"Bad Name\" is invalid",
            "service `empty`: `command` is an empty argv",
            "service `none`: `command` is missing",
            "service `dep`: `depends_on.ghost`: no service is called `ghost`",
            "service `probe`: `ready.http`",
            "the port must be 1-65535",
            "service `probe`: `liveness.tcp`",
            "service `probe`: `restart` must be",
            "service `probe`: `colour` is not a service key",
            "\"workflow\" is invalid",
        ] {
            assert!(joined.contains(needle), "missing {needle:?} in:\n{joined}");
        }
        assert!(problems.iter().all(|p| !p.contains('\n')), "one line each");
    }

    #[test]
    fn cycles_are_refused_and_printed() {
        let (_, problems) = parse(
            r#"[{ "name": "a", "command": ["x"], "depends_on": { "b": "ready" } },
                { "name": "b", "command": ["x"], "depends_on": { "c": "started" } },
                { "name": "c", "command": ["x"], "depends_on": { "a": "ready" } }]"#,
        );
        assert!(
            problems.iter().any(|p| p.contains("a -> b -> c -> a")),
            "{problems:?}"
        );
        let (_, problems) =
            parse(r#"[{ "name": "a", "command": ["x"], "depends_on": { "a": "ready" } }]"#);
        assert!(
            problems[0].contains("cannot depend on itself"),
            "{problems:?}"
        );
    }

    #[test]
    fn completed_needs_a_service_that_can_complete() {
        let (_, problems) = parse(
            r#"[{ "name": "job", "command": ["x"] },
                { "name": "app", "command": ["x"], "depends_on": { "job": "completed" } }]"#,
        );
        assert!(problems[0].contains("never completes"), "{problems:?}");
        let (_, problems) = parse(
            r#"[{ "name": "job", "command": ["x"], "restart": "never" },
                { "name": "app", "command": ["x"], "depends_on": { "job": "completed" } }]"#,
        );
        assert!(problems.is_empty(), "{problems:?}");
    }

    #[test]
    fn probes_parse_and_refuse_what_cannot_work() {
        let (specs, problems) = parse(
            r#"[{ "name": "a", "command": ["x"], "ready": "notify", "watchdog_ms": 500,
                  "liveness": { "exec": ["true"], "period_ms": 50, "failures": 2, "initial_delay_ms": 10 } },
                { "name": "b", "command": ["x"], "ready": { "log": "listening on [0-9]+" },
                  "liveness": { "tcp": "[::1]:8080" } }]"#,
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(specs[0].ready.as_ref().unwrap().kind, ProbeKind::Notify);
        assert_eq!(specs[0].liveness.as_ref().unwrap().failures, 2);
        assert_eq!(
            specs[1].liveness.as_ref().unwrap().kind,
            ProbeKind::Tcp {
                host: "::1".into(),
                port: 8080
            }
        );
        let (_, problems) = parse(
            r#"[{ "name": "a", "command": ["x"], "liveness": "notify" },
                { "name": "b", "command": ["x"], "liveness": { "log": "x" } },
                { "name": "c", "command": ["x"], "ready": { "log": "(" } },
                { "name": "d", "command": ["x"], "ready": { "http": "https://x/" } },
                { "name": "e", "command": ["x"], "ready": { "tcp": "h:1", "exec": ["y"] } },
                { "name": "f", "command": ["x"], "ready": { "period_ms": 5 } }]"#,
        );
        let joined = problems.join("\n");
        for needle in [
            "service `a`: `liveness` cannot be \"notify\"",
            "service `b`: `liveness.log` is for readiness only",
            "service `c`: `ready.log` is not a valid regex",
            "https probes are not supported",
            "service `e`: `ready` must name exactly one check",
            "service `f`: `ready` must name exactly one check (http, tcp, exec, log or notify), found none",
        ] {
            assert!(joined.contains(needle), "missing {needle:?} in:\n{joined}");
        }
    }

    #[test]
    fn urls_and_addresses() {
        assert_eq!(
            parse_http_url("http://localhost:8080/health?x=1").unwrap(),
            ("localhost".into(), 8080, "/health?x=1".into())
        );
        assert_eq!(
            parse_http_url("http://10.0.0.1").unwrap(),
            ("10.0.0.1".into(), 80, "/".into())
        );
        assert!(parse_http_url("http://:80/").is_err());
        assert!(parse_http_url("ftp://x/").is_err());
        assert!(parse_http_url("http://x/a b").is_err());
        assert_eq!(parse_host_port("[::1]:22").unwrap(), ("::1".into(), 22));
        assert!(parse_host_port("x:0").is_err());
        assert!(parse_host_port("x").is_err());
    }

    #[test]
    fn instance_names_and_assignment() {
        assert_eq!(
            InstanceName::parse("my-web-12"),
            Some(InstanceName {
                service: "my-web".into(),
                n: 12
            })
        );
        assert_eq!(InstanceName::parse("web-0"), None);
        assert_eq!(InstanceName::parse("workflow-1"), None);
        let (specs, _) = parse(
            r#"[{ "name": "web", "command": ["x"], "instances": 2 }, { "name": "job", "command": ["x"] }]"#,
        );
        let a: Vec<String> = assignment(&specs, 5)
            .into_iter()
            .map(|i| i.map_or("-".into(), |i| i.to_string()))
            .collect();
        assert_eq!(a, ["web-1", "web-2", "job-1", "-", "-"]);
    }

    #[test]
    fn depths_order_the_start() {
        let (specs, _) = parse(
            r#"[{ "name": "c", "command": ["x"], "depends_on": { "b": "ready" } },
                { "name": "b", "command": ["x"], "depends_on": { "a": "started" } },
                { "name": "a", "command": ["x"] }, { "name": "z", "command": ["x"] }]"#,
        );
        let d = depths(&specs);
        assert_eq!((d["a"], d["b"], d["c"], d["z"]), (0, 1, 2, 0));
    }

    #[test]
    fn the_definition_hash_ignores_the_instance_count_only() {
        let (a, _) = parse(r#"[{ "name": "w", "command": ["x"], "instances": 1 }]"#);
        let (b, _) = parse(r#"[{ "name": "w", "command": ["x"], "instances": 3 }]"#);
        let (c, _) = parse(r#"[{ "name": "w", "command": ["y"] }]"#);
        assert_eq!(a[0].definition_hash(), b[0].definition_hash());
        assert_ne!(a[0].definition_hash(), c[0].definition_hash());
    }
}
