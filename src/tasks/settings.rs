//! The config's task keys: `state_dir`, `actions`, `workers`, `queue_url` and the
//! retention of finished tasks, parsed by hand like the rest of the config so that every
//! error names its key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use crate::services::spec::{Problems, describe};

/// A named command a task can ask for with `"action": NAME`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Action {
    pub command: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub required_capabilities: Vec<String>,
    /// Where it runs: relative to the config file's directory, which is the default
    /// (made absolute when the config is loaded, like a service's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cwd: Option<PathBuf>,
}

/// What some workflows offer as workers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WorkerSpec {
    pub workflows: Vec<u32>,
    pub capabilities: Vec<String>,
    pub concurrency: u32,
}

pub const DEFAULT_CONCURRENCY: u32 = 1;
pub const MAX_CONCURRENCY: u32 = 256;
pub const MAX_ATTEMPTS: u32 = 1000;
pub const MAX_TIMEOUT_MS: u64 = 30 * 86_400_000;

pub const ACTION_KEYS: &[(&str, &str)] = &[
    (
        "command",
        "the argv to run (no shell), a non-empty list of strings",
    ),
    (
        "timeout_ms",
        "kill the task's tree after this long (1-2592000000)",
    ),
    (
        "max_attempts",
        "attempts before the task fails (1-1000; default 3)",
    ),
    (
        "required_capabilities",
        "capabilities a worker needs to run it, added to the task's own",
    ),
    (
        "cwd",
        "where it runs, relative to the config file's directory (the default)",
    ),
];

pub const WORKER_KEYS: &[(&str, &str)] = &[
    (
        "workflows",
        "the workflow ids this entry is about, like [1, 2]",
    ),
    ("capabilities", "what they offer, like [\"gpu\"]"),
    ("concurrency", "tasks each runs at once (1-256; default 1)"),
];

/// A capability or action name: short, printable, no spaces.
pub fn valid_word(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:/".contains(&b))
}

pub fn string_list(what: &str, v: &Value, problems: &mut Problems) -> Option<Vec<String>> {
    let Value::Array(items) = v else {
        problems.push(format!(
            "{what} must be a list of strings, got {}",
            describe(v)
        ));
        return None;
    };
    let mut out = Vec::new();
    for item in items {
        match item {
            Value::String(s) => out.push(s.clone()),
            other => {
                problems.push(format!(
                    "{what} must hold strings only, got {}",
                    describe(other)
                ));
                return None;
            }
        }
    }
    Some(out)
}

pub fn capability_list(what: &str, v: &Value, problems: &mut Problems) -> Option<Vec<String>> {
    let list = string_list(what, v, problems)?;
    if let Some(bad) = list.iter().find(|c| !valid_word(c)) {
        problems.push(format!(
            "{what}: {bad:?} is not a capability name (letters, digits and -_.:/, at most 64)"
        ));
        return None;
    }
    let mut list = list;
    list.sort();
    list.dedup();
    Some(list)
}

fn number(what: &str, v: &Value, min: u64, max: u64, problems: &mut Problems) -> Option<u64> {
    match v.as_u64() {
        Some(n) if (min..=max).contains(&n) => Some(n),
        Some(n) => {
            problems.push(format!("{what} is {n}, but must be from {min} to {max}"));
            None
        }
        None => {
            problems.push(format!(
                "{what} must be a whole number from {min} to {max}, got {}",
                describe(v)
            ));
            None
        }
    }
}

pub fn parse_actions(v: &Value, problems: &mut Problems) -> BTreeMap<String, Action> {
    let mut out = BTreeMap::new();
    let Value::Object(map) = v else {
        problems.push(format!(
            "`actions` must be an object of named actions, like {{\"train\": {{\"command\": [...]}}}}, got {}",
            describe(v)
        ));
        return out;
    };
    for (name, body) in map {
        let at = format!("actions.{name}");
        if !valid_word(name) {
            problems.push(format!(
                "`{at}`: the name is invalid (letters, digits and -_.:/, at most 64)"
            ));
            continue;
        }
        let Value::Object(obj) = body else {
            problems.push(format!("`{at}` must be an object, got {}", describe(body)));
            continue;
        };
        let mut action = Action {
            command: Vec::new(),
            timeout_ms: None,
            max_attempts: None,
            required_capabilities: Vec::new(),
            cwd: None,
        };
        let before = problems.0.len();
        for (key, value) in obj {
            let what = format!("`{at}.{key}`");
            match key.as_str() {
                "command" => {
                    if let Some(argv) = string_list(&what, value, problems) {
                        if argv.is_empty() {
                            problems.push(format!("{what} is empty: give the program to run"));
                        }
                        action.command = argv;
                    }
                }
                "timeout_ms" => {
                    action.timeout_ms = number(&what, value, 1, MAX_TIMEOUT_MS, problems)
                }
                "max_attempts" => {
                    action.max_attempts =
                        number(&what, value, 1, MAX_ATTEMPTS.into(), problems).map(|n| n as u32)
                }
                "required_capabilities" => {
                    action.required_capabilities =
                        capability_list(&what, value, problems).unwrap_or_default()
                }
                "cwd" => match value {
                    Value::String(d) if !d.is_empty() => action.cwd = Some(PathBuf::from(d)),
                    other => problems.push(format!(
                        "{what} must be a directory path, got {}",
                        describe(other)
                    )),
                },
                _ => {
                    let known: Vec<&str> = ACTION_KEYS.iter().map(|(k, _)| *k).collect();
                    problems.push(format!(
                        "`{at}`: unknown key `{key}` (known keys: {})",
                        known.join(", ")
                    ));
                }
            }
        }
        if problems.0.len() == before && action.command.is_empty() {
            problems.push(format!("`{at}` needs a `command`"));
            continue;
        }
        out.insert(name.clone(), action);
    }
    out
}

pub fn parse_workers(v: &Value, problems: &mut Problems) -> Vec<WorkerSpec> {
    let Value::Array(items) = v else {
        problems.push(format!(
            "`workers` must be a list like [{{\"workflows\": [1, 2], \"capabilities\": [\"gpu\"], \"concurrency\": 2}}], got {}",
            describe(v)
        ));
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let at = format!("workers[{i}]");
        let Value::Object(obj) = item else {
            problems.push(format!("`{at}` must be an object, got {}", describe(item)));
            continue;
        };
        let mut w = WorkerSpec {
            workflows: Vec::new(),
            capabilities: Vec::new(),
            concurrency: DEFAULT_CONCURRENCY,
        };
        for (key, value) in obj {
            let what = format!("`{at}.{key}`");
            match key.as_str() {
                "workflows" => match value {
                    Value::Array(ids) => {
                        for id in ids {
                            match id.as_u64() {
                                Some(n)
                                    if n >= 1 && n <= u64::from(crate::config::MAX_WORKFLOWS) =>
                                {
                                    w.workflows.push(n as u32)
                                }
                                _ => problems.push(format!(
                                    "{what} must hold workflow ids (1 or more), got {}",
                                    describe(id)
                                )),
                            }
                        }
                    }
                    other => problems.push(format!(
                        "{what} must be a list of workflow ids, got {}",
                        describe(other)
                    )),
                },
                "capabilities" => {
                    w.capabilities = capability_list(&what, value, problems).unwrap_or_default()
                }
                "concurrency" => {
                    w.concurrency = number(&what, value, 1, MAX_CONCURRENCY.into(), problems)
                        .map_or(DEFAULT_CONCURRENCY, |n| n as u32)
                }
                _ => {
                    let known: Vec<&str> = WORKER_KEYS.iter().map(|(k, _)| *k).collect();
                    problems.push(format!(
                        "`{at}`: unknown key `{key}` (known keys: {})",
                        known.join(", ")
                    ));
                }
            }
        }
        if w.workflows.is_empty() && !obj.contains_key("workflows") {
            problems.push(format!("`{at}` needs `workflows`, the ids it is about"));
        }
        out.push(w);
    }
    // A workflow named twice would have two answers to "what can you do".
    let mut seen = std::collections::BTreeSet::new();
    for (i, w) in out.iter().enumerate() {
        for id in &w.workflows {
            if !seen.insert(*id) {
                problems.push(format!(
                    "`workers[{i}].workflows`: workflow {id} is already named by an earlier entry"
                ));
            }
        }
    }
    out
}

/// What workflow `id` offers: its capabilities and concurrency.
pub fn worker_of(workers: &[WorkerSpec], id: u32) -> (Vec<String>, u32) {
    workers
        .iter()
        .find(|w| w.workflows.contains(&id))
        .map_or((Vec::new(), DEFAULT_CONCURRENCY), |w| {
            (w.capabilities.clone(), w.concurrency)
        })
}

/// The default state directory, which survives a reboot: /var/lib/nexus for root, else
/// `$XDG_STATE_HOME/nexus` (`~/.local/state/nexus`). A cluster in another runtime
/// directory than /tmp/nexus gets a subdirectory of its own, so two clusters never share
/// a queue by accident.
pub fn default_state_dir(runtime_dir: &Path) -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    let base = if unsafe { libc::geteuid() } == 0 {
        PathBuf::from("/var/lib/nexus")
    } else {
        let xdg = std::env::var_os("XDG_STATE_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .filter(|p| p.is_absolute());
        let home = std::env::var_os("HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        match (xdg, home) {
            (Some(x), _) => x.join("nexus"),
            (None, Some(h)) => h.join(".local/state/nexus"),
            (None, None) => PathBuf::from("/var/tmp/nexus-state"),
        }
    };
    if runtime_dir == Path::new(crate::runtime_dir::DEFAULT_DIR) {
        base
    } else {
        let name: String = runtime_dir
            .to_string_lossy()
            .trim_matches('/')
            .chars()
            .map(|c| if c == '/' { '%' } else { c })
            .collect();
        base.join("clusters").join(name)
    }
}

/// A cluster's name in a shared queue when the config gives none: the machine's name and
/// the runtime directory, so that two clusters of one machine are two hosts.
pub fn default_queue_host(runtime_dir: &Path) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("{host}:{}", runtime_dir.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems_of(f: impl FnOnce(&mut Problems)) -> Vec<String> {
        let mut p = Problems::default();
        f(&mut p);
        p.0
    }

    #[test]
    fn actions_parse_and_errors_name_the_key() {
        let v: Value = serde_json::from_str(
            r#"{"train": {"command": ["sh", "-c", "exit 0"], "timeout_ms": 5000, "max_attempts": 2}}"#,
        )
        .unwrap();
        let mut p = Problems::default();
        let a = parse_actions(&v, &mut p);
        assert!(p.0.is_empty(), "{:?}", p.0);
        assert_eq!(a["train"].timeout_ms, Some(5000));
        let bad = problems_of(|p| {
            parse_actions(
                &serde_json::json!({"x": {"command": []}, "y": {"bogus": 1, "command": ["a"]}, "z": {}}),
                p,
            );
        });
        assert!(
            bad.iter()
                .any(|l| l.contains("`actions.x.command` is empty")),
            "{bad:?}"
        );
        assert!(
            bad.iter().any(|l| l.contains("unknown key `bogus`")),
            "{bad:?}"
        );
        assert!(
            bad.iter()
                .any(|l| l.contains("`actions.z` needs a `command`")),
            "{bad:?}"
        );
    }

    #[test]
    fn workers_parse_and_refuse_a_workflow_named_twice() {
        let v = serde_json::json!([
            {"workflows": [1, 2], "capabilities": ["gpu", "gpu"], "concurrency": 2},
            {"workflows": [2], "concurrency": 0}
        ]);
        let mut p = Problems::default();
        let w = parse_workers(&v, &mut p);
        assert_eq!(w[0].capabilities, vec!["gpu".to_string()]);
        assert!(
            p.0.iter().any(|l| l.contains("workers[1].concurrency")),
            "{:?}",
            p.0
        );
        assert!(
            p.0.iter()
                .any(|l| l.contains("workflow 2 is already named")),
            "{:?}",
            p.0
        );
        assert_eq!(worker_of(&w, 1), (vec!["gpu".to_string()], 2));
        assert_eq!(worker_of(&w, 9), (Vec::new(), DEFAULT_CONCURRENCY));
    }

    #[test]
    fn each_cluster_has_a_state_dir_of_its_own() {
        let a = default_state_dir(Path::new("/tmp/nexus"));
        let b = default_state_dir(Path::new("/tmp/other"));
        assert_ne!(a, b);
        assert!(!a.starts_with("/tmp"), "{a:?} would not survive a reboot");
        assert!(b.ends_with("clusters/tmp%other"), "{b:?}");
    }
}
