//! `nexus api-key create|list|revoke`: the keys the HTTP API will take. They live in the
//! cluster's state directory (beside its task queue, so they survive a reboot), and
//! work with the cluster running or not.

use std::path::{Path, PathBuf};

use super::Common;
use crate::config::Config;
use std::io::Read as _;

use crate::http::keys::{Denied, KeyStore, Scope};
use crate::ledger::{rfc3339, unix_ms_now};
use crate::runtime_dir::LeaderLock;

pub const USAGE: &str = "\
Usage:
  nexus api-key create --name NAME --scope read|control
        makes a key and prints it alone on stdout, once: only its hash is kept, in
        STATE_DIR/api-keys.json (mode 0600). `read` may look (status, health, events, logs,
        metrics, tasks); `control` may also change (start, stop, restart, scale, reload,
        submit, cancel). NAME: 1 to 64 of letters, digits, `-`, `_`, `.`.
  nexus api-key list [--json]             name, scope and creation time of every key
  nexus api-key revoke NAME               the key stops working at once
  nexus api-key check [--scope S] < KEYFILE
                                          which key this is (read from stdin, never from the
                                          command line, where ps would show it); exit 0 if it
                                          is valid (and has scope S), 1 if not
Requests present a key as `Authorization: Bearer KEY`.
";

#[inline(never)]
pub fn run(common: &Common, args: &[String]) -> Result<i32, String> {
    let Some((verb, rest)) = args.split_first() else {
        print!("{USAGE}");
        return Ok(2);
    };
    let mut name = None;
    let mut scope = None;
    let mut json = false;
    let mut positional = Vec::new();
    let mut common = Common {
        runtime_dir: common.runtime_dir.clone(),
        config: common.config.clone(),
    };
    let mut it = rest.iter();
    while let Some(a) = it.next() {
        // An option where a value should be (`--name --scope read`) is a missing value.
        let mut value = || match it.next() {
            Some(v) if !v.starts_with("--") => Ok(v.clone()),
            _ => Err(format!("{a} needs a value")),
        };
        match a.as_str() {
            "--name" => name = Some(value()?),
            "--scope" => {
                let v = value()?;
                scope = Some(
                    Scope::parse(&v)
                        .ok_or_else(|| format!("--scope takes read or control, not `{v}`"))?,
                );
            }
            "--json" => json = true,
            "--runtime-dir" => common.runtime_dir = Some(PathBuf::from(value()?)),
            "--config" => common.config = Some(PathBuf::from(value()?)),
            "-h" | "--help" => {
                print!("{USAGE}");
                return Ok(0);
            }
            s if s.starts_with('-') => {
                return Err(format!("unknown option {s} for `api-key {verb}`"));
            }
            s => positional.push(s.to_string()),
        }
    }
    let state = state_dir(&common)?;
    match verb.as_str() {
        "create" => {
            no_more(&positional, verb)?;
            let name = name.ok_or("api-key create needs --name NAME")?;
            let scope = scope.ok_or("api-key create needs --scope read|control")?;
            let _lock = lock(&state)?;
            let key = KeyStore::load(&state)?.create(&name, scope, unix_ms_now())?;
            println!("{key}");
            eprintln!(
                "api key `{name}` ({}) made; it is not shown again: keep it now (only its hash is in {})",
                scope.as_str(),
                KeyStore::path_in(&state).display()
            );
            Ok(0)
        }
        "list" => {
            no_more(&positional, verb)?;
            let store = KeyStore::load(&state)?;
            if json {
                let keys: Vec<_> = store
                    .entries()
                    .iter()
                    .map(|e| {
                        serde_json::json!({
                            "name": e.name,
                            "scope": e.scope.as_str(),
                            "created_at": rfc3339(e.created_at_ms),
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(keys));
            } else if store.entries().is_empty() {
                println!(
                    "no API keys in {} (`nexus api-key create --name NAME --scope read|control` makes one)",
                    KeyStore::path_in(&state).display()
                );
            } else {
                println!("{:<24} {:<8} CREATED", "NAME", "SCOPE");
                for e in store.entries() {
                    println!(
                        "{:<24} {:<8} {}",
                        e.name,
                        e.scope.as_str(),
                        rfc3339(e.created_at_ms)
                    );
                }
            }
            Ok(0)
        }
        "revoke" => {
            let [name] = positional.as_slice() else {
                return Err("api-key revoke takes one NAME".into());
            };
            let _lock = lock(&state)?;
            let gone = KeyStore::load(&state)?.revoke(name)?;
            println!("api key `{}` ({}) revoked", gone.name, gone.scope.as_str());
            Ok(0)
        }
        "check" => {
            no_more(&positional, verb)?;
            let mut key = String::new();
            std::io::stdin()
                .take(4096)
                .read_to_string(&mut key)
                .map_err(|e| format!("cannot read the key from stdin: {e}"))?;
            let header = format!("Bearer {}", key.trim());
            let store = KeyStore::load(&state)?;
            match store.authorize(Some(header.as_bytes()), scope.unwrap_or(Scope::Read)) {
                Ok(e) => {
                    println!("api key `{}` ({}): valid", e.name, e.scope.as_str());
                    Ok(0)
                }
                Err(Denied::Forbidden { name, scope: has }) => Err(format!(
                    "api key `{name}` is valid but has scope {}, not control",
                    has.as_str()
                )),
                Err(Denied::Unauthenticated(why)) => Err(format!(
                    "not a valid key of {}: {why}",
                    KeyStore::path_in(&state).display()
                )),
            }
        }
        "help" => {
            print!("{USAGE}");
            Ok(0)
        }
        v => Err(format!(
            "unknown api-key command `{v}` (create, list, revoke, check; `nexus api-key help`)"
        )),
    }
}

fn no_more(positional: &[String], verb: &str) -> Result<(), String> {
    match positional.first() {
        Some(x) => Err(format!("unexpected argument `{x}` for `api-key {verb}`")),
        None => Ok(()),
    }
}

/// The running cluster's state directory, else the one the config names, else the
/// default for the runtime directory: where `start` puts the queue.
fn state_dir(common: &Common) -> Result<PathBuf, String> {
    let dir = common.runtime_dir()?;
    let running = Config::load(&dir.config_file())
        .ok()
        .and_then(|c| c.state_dir);
    let configured = || common.load_config().ok().and_then(|c| c.state_dir);
    Ok(running
        .or_else(configured)
        .unwrap_or_else(|| crate::tasks::settings::default_state_dir(dir.path())))
}

/// Held across a read, change and write of the key file, so that two `create`s at once
/// both keep their key: the same exclusive flock as the master's lock (0600, close-on-exec,
/// EINTR retried), on a file of its own.
fn lock(state: &Path) -> Result<LeaderLock, String> {
    std::fs::create_dir_all(state)
        .map_err(|e| format!("cannot create the state directory {}: {e}", state.display()))?;
    let path = state.join("api-keys.lock");
    LeaderLock::acquire_blocking(&path).map_err(|e| format!("cannot lock {}: {e}", path.display()))
}
