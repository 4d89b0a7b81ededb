//! The cluster configuration: defaults, parsing and validation.
//!
//! Parsing is done by hand over a `serde_json::Value` rather than with a derived
//! `Deserialize`, because serde's type errors do not name the key at fault and a user
//! with a broken config needs to know which line to fix.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use std::collections::BTreeMap;

use crate::services::spec::{InstanceName, Problems, ServiceSpec};
use crate::tasks::settings::{Action, WorkerSpec};

/// The kinds of daemon the universal binary can become.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Communicator,
    Watchdog,
    Workflow,
    /// Serves the HTTP API and dashboard (only when `http.listen` is set): in a daemon of
    /// its own, so no client can ever delay the master's loop.
    Http,
}

impl Role {
    pub const ALL: [Role; 4] = [
        Role::Communicator,
        Role::Watchdog,
        Role::Workflow,
        Role::Http,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Communicator => "communicator",
            Role::Watchdog => "watchdog",
            Role::Workflow => "workflow",
            Role::Http => "http",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A daemon's place in the cluster: its role and its 1-based id within the role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SlotName {
    pub role: Role,
    pub id: u32,
}

impl fmt::Display for SlotName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.role, self.id)
    }
}

impl SlotName {
    /// Parses `workflow-3`.
    pub fn parse(s: &str) -> Option<SlotName> {
        let (role, id) = s.rsplit_once('-')?;
        let role = Role::parse(role)?;
        let id: u32 = id.parse().ok()?;
        (id >= 1).then_some(SlotName { role, id })
    }
}

pub const MAX_COMMUNICATORS: u32 = 8;
pub const MAX_WATCHDOGS: u32 = 15;
pub const MAX_WORKFLOWS: u32 = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Config {
    pub communicators: u32,
    pub watchdogs: u32,
    pub workflows: u32,
    /// How often every daemon heartbeats to every watchdog.
    pub interval_ms: u64,
    /// Silence longer than this is a failure.
    pub timeout_ms: u64,
    /// `stop`: how long a daemon gets between SIGTERM and SIGKILL.
    pub stop_grace_ms: u64,
    /// `start`: how long to wait for every daemon to be up and heartbeating.
    pub start_timeout_ms: u64,
    /// Delay before the second restart of a slot that keeps failing; doubles each time.
    pub backoff_initial_ms: u64,
    /// The longest backoff, and the retry period of a slot marked failed.
    pub backoff_max_ms: u64,
    /// More than `restart_intensity` restarts within `restart_period_ms` marks a slot failed.
    pub restart_intensity: u32,
    pub restart_period_ms: u64,
    /// Each daemon's log, and the ledger, are rotated past this size...
    pub log_max_bytes: u64,
    /// ...keeping this many older files.
    pub log_files: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime_dir: Option<PathBuf>,
    /// The user's programs, each instance hosted by one workflow (see services::spec).
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        serialize_with = "serialize_services"
    )]
    pub services: Vec<ServiceSpec>,
    /// Where the task queue lives (resolved by `start`: see tasks::settings).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub actions: BTreeMap<String, Action>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub workers: Vec<WorkerSpec>,
    /// Finished tasks kept: at most this many...
    pub task_retention_count: u64,
    /// ...and none finished longer ago than this.
    pub task_retention_ms: u64,
    /// The queue in PostgreSQL, shared with other hosts, instead of SQLite in state_dir.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_url: Option<String>,
    /// This host's name in a shared queue (default: hostname:runtime_dir).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_host: Option<String>,
    /// A host that has not renewed its lease for this long is taken as dead.
    pub queue_lease_ms: u64,
    /// The HTTP API and dashboard; None: off (the built-in default, so that clusters side
    /// by side never collide on a port).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<crate::http::settings::HttpSettings>,
}

fn serialize_services<S: serde::Serializer>(v: &[ServiceSpec], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq;
    let mut seq = s.serialize_seq(Some(v.len()))?;
    for spec in v {
        seq.serialize_element(&spec.to_json())?;
    }
    seq.end()
}

impl Default for Config {
    fn default() -> Self {
        Config {
            communicators: 2,
            watchdogs: 3,
            workflows: 5,
            interval_ms: 2000,
            timeout_ms: 6000,
            stop_grace_ms: 2000,
            start_timeout_ms: 10_000,
            backoff_initial_ms: 100,
            backoff_max_ms: 30_000,
            restart_intensity: 10,
            restart_period_ms: 60_000,
            log_max_bytes: 10_000_000,
            log_files: 3,
            runtime_dir: None,
            services: Vec::new(),
            state_dir: None,
            actions: BTreeMap::new(),
            workers: Vec::new(),
            task_retention_count: 10_000,
            task_retention_ms: 7 * 86_400_000,
            queue_url: None,
            queue_host: None,
            queue_lease_ms: 10_000,
            http: None,
        }
    }
}

/// Every key the config accepts, with the one-line description `nexus help config` shows.
pub const KEYS: &[(&str, &str)] = &[
    (
        "communicators",
        "number of communicators (1-8); the one holding leader.lock is the master",
    ),
    (
        "watchdogs",
        "number of watchdogs (1-15); a majority must agree before a hung daemon is killed",
    ),
    ("workflows", "number of workflows (0-10000)"),
    ("interval_ms", "heartbeat period in ms (10-60000)"),
    (
        "timeout_ms",
        "silence after which a daemon is declared hung, in ms (at least 2 x interval_ms)",
    ),
    (
        "stop_grace_ms",
        "stop: time between SIGTERM and SIGKILL, in ms (0-60000)",
    ),
    (
        "start_timeout_ms",
        "start: how long to wait for every daemon to heartbeat, in ms (100-600000)",
    ),
    (
        "backoff_initial_ms",
        "delay before the second quick restart of a crashing slot, doubled each time",
    ),
    (
        "backoff_max_ms",
        "longest restart delay; a failed slot is retried this often",
    ),
    (
        "restart_intensity",
        "restarts allowed within restart_period_ms before a slot is marked failed",
    ),
    (
        "restart_period_ms",
        "the window restart_intensity counts over, in ms",
    ),
    (
        "log_max_bytes",
        "rotate each daemon's log and the ledger past this size (10000-100000000000)",
    ),
    ("log_files", "rotated files kept per log (1-100)"),
    (
        "runtime_dir",
        "runtime directory (overridden by --runtime-dir and NEXUS_RUNTIME_DIR)",
    ),
    (
        "services",
        "the programs the workflows run: a list of objects (see below)",
    ),
    (
        "state_dir",
        "where the task queue (tasks.db) and task logs live; default /var/lib/nexus (root) or ~/.local/state/nexus",
    ),
    (
        "actions",
        "named task commands: {\"train\": {\"command\": [...], ...}} (see below)",
    ),
    (
        "workers",
        "what the free workflows offer tasks: [{\"workflows\": [1, 2], \"capabilities\": [\"gpu\"], \"concurrency\": 2}]",
    ),
    (
        "task_retention_count",
        "finished tasks kept (the oldest beyond are pruned, logs too; 1-10000000)",
    ),
    (
        "task_retention_ms",
        "finished tasks older than this are pruned, in ms (60000-31536000000; default 7 days)",
    ),
    (
        "queue_url",
        "postgres://user:password@host/db: the task queue in PostgreSQL, shared by the clusters of several hosts; ?sslmode=verify-full[&sslrootcert=CA.pem] for TLS",
    ),
    (
        "queue_host",
        "this cluster's name in a shared queue (default hostname:runtime_dir); unique per cluster",
    ),
    (
        "http",
        "{\"listen\": \"127.0.0.1:9090\"}: the HTTP API and dashboard, in a daemon of their own; a non-loopback listen needs \"tls_cert\" and \"tls_key\" (PEM paths); \"hosts\": other host names it answers to",
    ),
    (
        "queue_lease_ms",
        "a host silent this long has its running tasks re-queued by the others (2000-300000; default 10000)",
    ),
];

/// Every problem of a config, one line each.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl ConfigError {
    fn from_problems(p: Problems) -> ConfigError {
        ConfigError(p.0.join("\n"))
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl ConfigError {
    /// Each line says which file it is about.
    fn within(self, path: &Path) -> ConfigError {
        let lines: Vec<String> = self
            .0
            .lines()
            .map(|l| format!("config {}: {l}", path.display()))
            .collect();
        ConfigError(lines.join("\n"))
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read config {}: {e}", path.display())))?;
        let mut cfg = Config::parse(&text).map_err(|e| e.within(path))?;
        cfg.anchor_paths(path);
        Ok(cfg)
    }

    /// A service's `cwd` is relative to the config file's directory, and defaults to it
    /// (as a compose file's does): a stack and its scripts can live side by side and be
    /// started from anywhere. config.json then holds the absolute paths.
    fn anchor_paths(&mut self, config_file: &Path) {
        let base =
            crate::runtime_dir::RuntimeDir::at(config_file.parent().unwrap_or(Path::new(".")))
                .path()
                .to_path_buf();
        for a in self.actions.values_mut() {
            a.cwd = Some(match a.cwd.take() {
                Some(c) if c.is_absolute() => c,
                Some(c) => crate::runtime_dir::RuntimeDir::at(&base.join(c))
                    .path()
                    .to_path_buf(),
                None => base.clone(),
            });
        }
        for s in &mut self.services {
            s.cwd = Some(match s.cwd.take() {
                Some(c) if c.is_absolute() => c,
                Some(c) => crate::runtime_dir::RuntimeDir::at(&base.join(c))
                    .path()
                    .to_path_buf(),
                None => base.clone(),
            });
        }
    }

    /// Parses and validates, collecting every problem (one line each), not only the first.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| ConfigError(format!("not valid JSON: {e}")))?;
        let Value::Object(map) = value else {
            return Err(ConfigError("the top level must be a JSON object".into()));
        };
        let mut cfg = Config::default();
        let mut problems = Problems::default();
        for (key, value) in &map {
            if key == "services" {
                cfg.services = crate::services::spec::parse_services(value, &mut problems);
            } else if key == "actions" {
                cfg.actions = crate::tasks::settings::parse_actions(value, &mut problems);
            } else if key == "workers" {
                cfg.workers = crate::tasks::settings::parse_workers(value, &mut problems);
            } else if key == "http" {
                cfg.http = crate::http::settings::parse(value, &mut problems);
            } else if let Err(e) = cfg.set(key, value) {
                problems.push(e.0);
            }
        }
        if problems.0.is_empty() {
            cfg.validate(&mut problems);
        }
        if problems.0.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigError::from_problems(problems))
        }
    }

    /// `parse`, then the checks against this machine (cwd, users, probe hosts): for where
    /// a config is accepted (`start`, `reload`), never for a daemon reading config.json.
    pub fn parse_and_check(text: &str) -> Result<Config, ConfigError> {
        let cfg = Config::parse(text)?;
        let mut problems = Problems::default();
        cfg.check_environment(&mut problems);
        if problems.0.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigError::from_problems(problems))
        }
    }

    pub fn load_and_check(path: &Path) -> Result<Config, ConfigError> {
        let cfg = Config::load(path)?;
        let mut problems = Problems::default();
        cfg.check_environment(&mut problems);
        if problems.0.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigError::from_problems(problems).within(path))
        }
    }

    fn check_environment(&self, problems: &mut Problems) {
        crate::services::spec::check_environment(&self.services, problems);
        if let Some(h) = &self.http {
            crate::http::settings::check_environment(h, problems);
        }
    }

    fn set(&mut self, key: &str, value: &Value) -> Result<(), ConfigError> {
        match key {
            "communicators" => self.communicators = count(key, value, 1, MAX_COMMUNICATORS)?,
            "watchdogs" => self.watchdogs = count(key, value, 1, MAX_WATCHDOGS)?,
            "workflows" => self.workflows = count(key, value, 0, MAX_WORKFLOWS)?,
            "interval_ms" => self.interval_ms = millis(key, value, 10, 60_000)?,
            "timeout_ms" => self.timeout_ms = millis(key, value, 20, 600_000)?,
            "stop_grace_ms" => self.stop_grace_ms = millis(key, value, 0, 60_000)?,
            "start_timeout_ms" => self.start_timeout_ms = millis(key, value, 100, 600_000)?,
            "backoff_initial_ms" => self.backoff_initial_ms = millis(key, value, 1, 600_000)?,
            "backoff_max_ms" => self.backoff_max_ms = millis(key, value, 1, 3_600_000)?,
            "restart_intensity" => self.restart_intensity = count(key, value, 1, 1_000_000)?,
            "restart_period_ms" => self.restart_period_ms = millis(key, value, 1, 86_400_000)?,
            "log_max_bytes" => self.log_max_bytes = millis(key, value, 10_000, 100_000_000_000)?,
            "log_files" => self.log_files = count(key, value, 1, 100)?,
            "task_retention_count" => {
                self.task_retention_count = whole_number(key, value, 1, 10_000_000)?
            }
            "task_retention_ms" => {
                self.task_retention_ms = millis(key, value, 60_000, 31_536_000_000)?
            }
            "state_dir" => match value {
                Value::String(s) if s.starts_with('/') => self.state_dir = Some(PathBuf::from(s)),
                Value::String(s) if !s.is_empty() => {
                    return Err(ConfigError(format!(
                        "`state_dir` must be an absolute path, got {s:?}"
                    )));
                }
                Value::Null => self.state_dir = None,
                other => return Err(type_error(key, "an absolute path string", other)),
            },
            "queue_url" => match value {
                Value::String(s) => {
                    crate::tasks::postgres::check_url(s).map_err(ConfigError)?;
                    self.queue_url = Some(s.clone());
                }
                Value::Null => self.queue_url = None,
                other => return Err(type_error(key, "a postgres:// URL string", other)),
            },
            "queue_host" => match value {
                Value::String(s)
                    if !s.is_empty() && s.len() <= 200 && !s.chars().any(char::is_control) =>
                {
                    self.queue_host = Some(s.clone())
                }
                Value::Null => self.queue_host = None,
                other => {
                    return Err(type_error(
                        key,
                        "a name of 1-200 printable characters",
                        other,
                    ));
                }
            },
            "queue_lease_ms" => self.queue_lease_ms = millis(key, value, 2000, 300_000)?,
            "runtime_dir" => match value {
                Value::String(s) if !s.is_empty() => self.runtime_dir = Some(PathBuf::from(s)),
                Value::Null => self.runtime_dir = None,
                other => return Err(type_error(key, "a non-empty path string", other)),
            },
            _ => {
                let known: Vec<&str> = KEYS.iter().map(|(k, _)| *k).collect();
                return Err(ConfigError(format!(
                    "unknown key `{key}` (known keys: {})",
                    known.join(", ")
                )));
            }
        }
        Ok(())
    }

    fn validate(&self, problems: &mut Problems) {
        if self.timeout_ms < 2 * self.interval_ms {
            problems.push(format!(
                "`timeout_ms` ({}) must be at least twice `interval_ms` ({}), or a single late heartbeat would count as a failure",
                self.timeout_ms, self.interval_ms
            ));
        }
        if self.backoff_max_ms < self.backoff_initial_ms {
            problems.push(format!(
                "`backoff_max_ms` ({}) must not be below `backoff_initial_ms` ({})",
                self.backoff_max_ms, self.backoff_initial_ms
            ));
        }
        for (i, w) in self.workers.iter().enumerate() {
            if let Some(id) = w.workflows.iter().find(|&&id| id > self.workflows) {
                problems.push(format!(
                    "`workers[{i}].workflows` names workflow {id}, but `workflows` is {}",
                    self.workflows
                ));
            }
        }
        let instances: u64 = self.services.iter().map(|s| u64::from(s.instances)).sum();
        if instances > u64::from(self.workflows) {
            problems.push(format!(
                "the services have {instances} instances but `workflows` is {}: each instance needs a workflow of its own (raise `workflows` to at least {instances})",
                self.workflows
            ));
        }
    }

    /// Which instance each workflow hosts (index 0 is workflow-1); None: free.
    pub fn assignment(&self) -> Vec<Option<InstanceName>> {
        crate::services::spec::assignment(&self.services, self.workflows)
    }

    /// The instance workflow `id` hosts, with its service.
    pub fn hosted_by(&self, workflow_id: u32) -> Option<(&ServiceSpec, InstanceName)> {
        let inst = self
            .assignment()
            .into_iter()
            .nth(workflow_id.checked_sub(1)? as usize)??;
        let spec = self.services.iter().find(|s| s.name == inst.service)?;
        Some((spec, inst))
    }

    pub fn service(&self, name: &str) -> Option<&ServiceSpec> {
        self.services.iter().find(|s| s.name == name)
    }

    pub fn count_of(&self, role: Role) -> u32 {
        match role {
            Role::Communicator => self.communicators,
            Role::Watchdog => self.watchdogs,
            Role::Workflow => self.workflows,
            Role::Http => u32::from(self.http.is_some()),
        }
    }

    pub fn total(&self) -> usize {
        Role::ALL
            .into_iter()
            .map(|r| self.count_of(r) as usize)
            .sum()
    }

    /// Every slot of the cluster in a fixed order (communicators, watchdogs, workflows,
    /// the http daemon);
    /// `slot_index` maps a name back to its position.
    pub fn slots(&self) -> Vec<SlotName> {
        Role::ALL
            .into_iter()
            .flat_map(|role| (1..=self.count_of(role)).map(move |id| SlotName { role, id }))
            .collect()
    }

    pub fn slot_index(&self, name: SlotName) -> Option<usize> {
        if name.id == 0 || name.id > self.count_of(name.role) {
            return None;
        }
        let base = match name.role {
            Role::Communicator => 0,
            Role::Watchdog => self.communicators,
            Role::Workflow => self.communicators + self.watchdogs,
            Role::Http => self.communicators + self.watchdogs + self.workflows,
        };
        Some((base + name.id - 1) as usize)
    }

    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// A loop that wakes at least every interval but finds more than this elapsed was
    /// itself stopped or starved: its own silence clocks are not evidence against others.
    pub fn stall_threshold(&self) -> Duration {
        Duration::from_millis(self.interval_ms + (self.timeout_ms - self.interval_ms) / 2)
    }

    pub fn to_json(&self) -> String {
        // Serializing a struct of plain numbers and an optional path cannot fail.
        serde_json::to_string_pretty(self).expect("config serializes") + "\n"
    }
}

fn type_error(key: &str, expected: &str, got: &Value) -> ConfigError {
    let got = match got {
        Value::Null => "null".to_string(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string {s:?}"),
        Value::Array(_) => "a list".to_string(),
        Value::Object(_) => "an object".to_string(),
    };
    ConfigError(format!("`{key}` must be {expected}, got {got}"))
}

fn whole_number(key: &str, value: &Value, min: u64, max: u64) -> Result<u64, ConfigError> {
    let n = value
        .as_u64()
        .ok_or_else(|| type_error(key, &format!("a whole number from {min} to {max}"), value))?;
    if n < min || n > max {
        return Err(ConfigError(format!(
            "`{key}` is {n}, but must be from {min} to {max}"
        )));
    }
    Ok(n)
}

fn count(key: &str, value: &Value, min: u32, max: u32) -> Result<u32, ConfigError> {
    whole_number(key, value, min.into(), max.into()).map(|n| n as u32)
}

fn millis(key: &str, value: &Value, min: u64, max: u64) -> Result<u64, ConfigError> {
    whole_number(key, value, min, max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_from_empty_object() {
        assert_eq!(Config::parse("{}").unwrap(), Config::default());
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (r#"{"workflows": "five"}"#, "`workflows`"),
            (r#"{"bogus": 1}"#, "`bogus`"),
            (r#"{"communicators": 0}"#, "`communicators`"),
            (r#"{"watchdogs": 0}"#, "`watchdogs`"),
            (r#"{"workflows": 1000000}"#, "`workflows`"),
            (
                r#"{"interval_ms": 1000, "timeout_ms": 1000}"#,
                "`timeout_ms`",
            ),
            (r#"{"interval_ms": -5}"#, "`interval_ms`"),
            (r#"{"timeout_ms": 1.5}"#, "`timeout_ms`"),
            (r#"{"runtime_dir": 3}"#, "`runtime_dir`"),
        ];
        for (text, key) in cases {
            let err = Config::parse(text).unwrap_err().0;
            assert!(err.contains(key), "{text}: {err}");
        }
        assert!(Config::parse("[1]").is_err());
        assert!(Config::parse("{").unwrap_err().0.contains("JSON"));
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let err = Config::parse(r#"{"workflows": "five", "bogus": 1, "log_files": 0}"#)
            .unwrap_err()
            .0;
        assert_eq!(err.lines().count(), 3, "{err}");
        for key in ["`workflows`", "`bogus`", "`log_files`"] {
            assert!(err.contains(key), "{key} in {err}");
        }
    }

    #[test]
    fn services_need_a_workflow_each_and_round_trip_through_config_json() {
        let text =
            r#"{"workflows": 2, "services": [{"name": "web", "command": ["x"], "instances": 3}]}"#;
        let err = Config::parse(text).unwrap_err().0;
        assert!(
            err.contains("3 instances") && err.contains("`workflows` is 2"),
            "{err}"
        );
        let ok =
            r#"{"workflows": 4, "services": [{"name": "web", "command": ["x"], "instances": 3}]}"#;
        let cfg = Config::parse(ok).unwrap();
        assert_eq!(Config::parse(&cfg.to_json()).unwrap(), cfg);
        assert_eq!(cfg.hosted_by(3).unwrap().1.to_string(), "web-3");
        assert!(cfg.hosted_by(4).is_none());
        assert!(Config::default().to_json().find("services").is_none());
    }

    #[test]
    fn slot_index_matches_slots_order() {
        let cfg = Config {
            communicators: 2,
            watchdogs: 3,
            workflows: 4,
            ..Config::default()
        };
        for (i, s) in cfg.slots().into_iter().enumerate() {
            assert_eq!(cfg.slot_index(s), Some(i));
        }
        assert_eq!(
            cfg.slot_index(SlotName {
                role: Role::Workflow,
                id: 5
            }),
            None
        );
        assert_eq!(
            cfg.slot_index(SlotName {
                role: Role::Watchdog,
                id: 0
            }),
            None
        );
    }

    #[test]
    fn slot_names_parse() {
        assert_eq!(
            SlotName::parse("workflow-12"),
            Some(SlotName {
                role: Role::Workflow,
                id: 12
            })
        );
        assert_eq!(SlotName::parse("workflow-0"), None);
        assert_eq!(SlotName::parse("nope-1"), None);
    }
}
