//! `nexus --api URL …` from another runtime directory, as from another machine: the same
//! output as the local commands, the same exit codes, and one-line refusals.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use serde_json::Value;

fn key(c: &Cluster, name: &str, scope: &str) -> String {
    let out = c.nexus(&["api-key", "create", "--name", name, "--scope", scope]);
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// `nexus ARGS` with NEXUS_API set, from an empty runtime directory of its own.
fn remote(elsewhere: &std::path::Path, url: &str, key: &str, args: &[&str]) -> Output {
    Command::new(NEXUS)
        .args(args)
        .env("NEXUS_RUNTIME_DIR", elsewhere)
        .env("NEXUS_API", url)
        .env("NEXUS_API_KEY", key)
        .env_remove("NEXUS_CONFIG")
        .output()
        .expect("run nexus")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// (role, id, pid, state) of every daemon, and (name-n, pid, state) of every instance.
fn shape(v: &Value) -> (Vec<String>, Vec<String>) {
    let d = v["daemons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| format!("{}-{} {} {}", d["role"], d["id"], d["pid"], d["state"]))
        .collect();
    let s = v["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            format!(
                "{}-{} {} {}",
                s["name"], s["instance"], s["pid"], s["state"]
            )
        })
        .collect();
    (d, s)
}

#[test]
fn the_cli_drives_a_cluster_over_its_api_with_the_local_output() {
    let port = free_port();
    let c = Cluster::new(&format!(
        r#"{{"interval_ms": 100, "timeout_ms": 1000, "workflows": 4,
            "http": {{"listen": "127.0.0.1:{port}"}},
            "services": [{{"name": "web", "command": ["sh", "-c", "while :; do echo web-tick; sleep 0.2; done"]}}]}}"#
    ));
    c.start();
    let ops = key(&c, "ops", "control");
    let viewer = key(&c, "viewer", "read");
    let url = format!("http://127.0.0.1:{port}");
    let other = tempfile::tempdir().unwrap();
    let far = |k: &str, args: &[&str]| remote(other.path(), &url, k, args);

    // status: the same document and the same table as locally.
    let local: Value = serde_json::from_slice(&c.nexus(&["status", "--json"]).stdout).unwrap();
    let out = far(&viewer, &["status", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let there: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shape(&there), shape(&local));
    let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        keys(&there),
        keys(&local),
        "the same fields in the same order"
    );
    let table = far(&viewer, &["status"]);
    assert_eq!(table.status.code(), Some(0));
    let local_table = stdout(&c.nexus(&["status"]));
    assert_eq!(
        stdout(&table).lines().next(),
        local_table.lines().next(),
        "the same heading"
    );
    assert_eq!(stdout(&table).lines().count(), local_table.lines().count());

    let h = far(&viewer, &["health"]);
    assert_eq!(h.status.code(), Some(0), "{}", text(&h));
    assert_eq!(stdout(&h), stdout(&c.nexus(&["health"])));

    // events: the same lines (nothing happens between the two).
    let mine = stdout(&c.nexus(&["events", "-n", "8", "--json"]));
    let theirs = stdout(&far(&viewer, &["events", "-n", "8", "--json"]));
    assert_eq!(theirs, mine);
    assert_eq!(
        stdout(&far(&viewer, &["events", "-n", "8"])),
        stdout(&c.nexus(&["events", "-n", "8"]))
    );
    wait_until("three lines of web", Duration::from_secs(10), || {
        stdout(&c.nexus(&["logs", "web", "-n", "3"]))
            .lines()
            .count()
            == 3
    });
    let logs = far(&viewer, &["logs", "web", "-n", "3"]);
    assert!(logs.status.success(), "{}", text(&logs));
    assert_eq!(stdout(&logs).lines().count(), 3, "{}", stdout(&logs));
    assert!(stdout(&logs).contains("web-tick"));
    let pid = far(&viewer, &["pid", "web-1"]);
    assert_eq!(
        stdout(&pid).trim(),
        c.program_pid("web-1").unwrap().to_string()
    );
    let m = far(&viewer, &["metrics"]);
    assert!(stdout(&m).contains("nexus_up 1"));

    // Controls: a read key is refused in one line; a control key restarts and waits.
    let r = far(&viewer, &["service", "restart", "web"]);
    assert_eq!(r.status.code(), Some(1));
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("403") && err.contains("scope read"), "{err}");
    let before = c.program_pid("web-1").unwrap();
    let r = far(&ops, &["service", "restart", "web"]);
    assert!(r.status.success(), "{}", text(&r));
    let after = c.program_pid("web-1").unwrap();
    assert_ne!(after, before);
    assert!(
        stdout(&r).contains(&format!("web-1: ready (pid {after})")),
        "{}",
        stdout(&r)
    );
    let old = c.pid_of("workflow", 4).unwrap();
    let r = far(&ops, &["restart", "workflow-4"]);
    assert!(r.status.success(), "{}", text(&r));
    assert!(stdout(&r).contains(&format!("workflow-4 restarted: pid {old} -> ")));
    let r = far(&ops, &["scale", "workflow=5"]);
    assert!(r.status.success(), "{}", text(&r));
    assert_eq!(c.count("workflow"), 5);

    // Tasks: submit --wait exits with the task's code; list is the local list.
    let ok = far(
        &ops,
        &["task", "submit", r#"{"command": ["true"]}"#, "--wait"],
    );
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok));
    let bad = far(
        &ops,
        &[
            "task",
            "submit",
            r#"{"command": ["sh", "-c", "exit 7"]}"#,
            "--max-attempts",
            "1",
            "--wait",
        ],
    );
    assert_eq!(bad.status.code(), Some(7), "{}", text(&bad));
    assert_eq!(
        stdout(&far(&viewer, &["task", "list", "--json"])),
        stdout(&c.nexus(&["task", "list", "--json"]))
    );
    let id = stdout(&ok).trim().to_string();
    assert_eq!(
        stdout(&far(&viewer, &["task", "status", &id])),
        stdout(&c.nexus(&["task", "status", &id]))
    );

    // One-line refusals: a wrong key, nothing listening, a verb that needs the machine.
    let r = far("nxk_wrong", &["status"]);
    assert_eq!(r.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&r.stderr).contains("refused the key (401)"));
    let gone = remote(
        other.path(),
        &format!("http://127.0.0.1:{}", free_port()),
        &ops,
        &["status"],
    );
    assert_eq!(gone.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&gone.stderr).contains("cannot connect"));
    let r = far(&ops, &["start"]);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("not available over --api"));
    let r = remote(other.path(), "localhost:9090", &ops, &["status"]);
    assert!(String::from_utf8_lossy(&r.stderr).contains("http://HOST:PORT"));

    // Flags instead of the environment, the key from a file.
    let file = other.path().join("ops.key");
    std::fs::write(&file, format!("{ops}\n")).unwrap();
    let out = Command::new(NEXUS)
        .args(["--api", &url, "--api-key-file"])
        .arg(&file)
        .args(["health", "--json"])
        .env_remove("NEXUS_API")
        .env_remove("NEXUS_API_KEY")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["health"], "HEALTHY");
    wait_until("still whole", Duration::from_secs(5), || {
        c.nexus(&["status"]).status.success()
    });
}
