//! Starting, counting, stopping; refusing what must be refused.

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::time::Duration;

use common::*;

#[test]
fn start_gives_ten_heartbeating_daemons_with_private_sockets() {
    let c = Cluster::new(FAST);
    let out = c.start();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&format!("master pid {}", c.master_pid())),
        "{said}"
    );
    assert!(
        said.contains("2 communicators, 3 watchdogs, 5 workflows"),
        "{said}"
    );
    assert_eq!(c.count("communicator"), 2);
    assert_eq!(c.count("watchdog"), 3);
    assert_eq!(c.count("workflow"), 5);
    for name in [
        "control.sock",
        "heartbeat_1.sock",
        "heartbeat_2.sock",
        "heartbeat_3.sock",
    ] {
        let meta = std::fs::symlink_metadata(c.path().join(name))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(meta.file_type().is_socket(), "{name} is a socket");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{name} is 0600");
    }
    let dir_mode = std::fs::metadata(c.path().join("logs"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(dir_mode, 0o700);
    // Every daemon is heartbeating: some watchdog has heard each one recently.
    let status = c.status_json();
    assert_eq!(status["whole"], true);
    for d in status["daemons"].as_array().unwrap() {
        if d["master"] == true {
            continue;
        }
        let age = d["heartbeat_age_ms"]
            .as_u64()
            .unwrap_or_else(|| panic!("no heartbeat from {d}"));
        assert!(age < 5_000, "{d}");
    }
    let starts: Vec<_> = c
        .events()
        .into_iter()
        .filter(|e| e["event"] == "spawned")
        .collect();
    assert_eq!(starts.len(), 9, "the master spawns the other nine");
}

#[test]
fn status_table_and_exit_codes() {
    let c = Cluster::new(FAST);
    let out = c.nexus(&["status"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "not running yet: {}",
        text(&out)
    );
    c.start();
    let out = c.nexus(&["status"]);
    assert!(out.status.success(), "{}", text(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    for col in ["PID", "ROLE", "ID", "UPTIME", "CPU%", "MEM", "STATUS"] {
        assert!(table.contains(col), "column {col} in\n{table}");
    }
    assert_eq!(
        table.lines().filter(|l| l.contains(" running,")).count(),
        10,
        "{table}"
    );
}

#[test]
fn stop_stops_everything_and_is_idempotent() {
    let c = Cluster::new(FAST);
    c.start();
    let pids: Vec<i32> = c.daemons().iter().map(|d| d.0).collect();
    let out = c.nexus(&["stop"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(c.daemons().is_empty(), "nothing left after stop");
    assert!(pids.iter().all(|&p| gone(p)));
    assert!(!c.path().join("control.sock").exists());
    assert!(!c.path().join("heartbeat_1.sock").exists());
    let events: Vec<String> = c
        .events()
        .iter()
        .map(|e| e["event"].as_str().unwrap().to_string())
        .collect();
    assert!(
        events.contains(&"stopping".to_string()) && events.last().unwrap() == "stopped",
        "{events:?}"
    );
    // No respawn happened during the stop.
    assert!(!events.contains(&"respawned".to_string()), "{events:?}");

    let again = c.nexus(&["stop"]);
    assert!(again.status.success(), "{}", text(&again));
    assert!(String::from_utf8_lossy(&again.stdout).contains("not running"));
}

#[test]
fn stop_works_without_the_control_socket() {
    let c = Cluster::new(FAST);
    c.start();
    std::fs::remove_file(c.path().join("control.sock")).unwrap();
    let out = c.nexus(&["stop"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(c.daemons().is_empty(), "stop found them in /proc");
}

#[test]
fn stop_escalates_to_sigkill_for_a_stopped_daemon() {
    let c = Cluster::new(r#"{"interval_ms": 100, "timeout_ms": 5000, "stop_grace_ms": 200}"#);
    c.start();
    let w = c.pid_of("workflow", 1).unwrap();
    signal(w, libc::SIGSTOP);
    let out = c.nexus(&["stop"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("needed SIGKILL"),
        "{}",
        text(&out)
    );
    assert!(c.daemons().is_empty());
}

#[test]
fn second_start_is_refused_naming_the_master() {
    let c = Cluster::new(FAST);
    c.start();
    let master = c.master_pid();
    let before = c.daemons();
    let out = c.nexus(&["start"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already running") && err.contains(&master.to_string()),
        "{err}"
    );
    assert_eq!(c.daemons(), before, "the running cluster is untouched");
}

#[test]
fn leftovers_of_a_crashed_run_are_cleaned() {
    let c = Cluster::new(FAST);
    c.start();
    // Simulate a crash of the whole cluster: every process dies, files stay.
    kill_all(c.path());
    assert!(c.path().join("control.sock").exists() && c.path().join("leader.lock").exists());
    std::fs::write(c.path().join("stopping"), b"").unwrap();
    c.start();
    c.wait_whole(10, Duration::from_secs(10));
}

#[test]
fn two_clusters_side_by_side() {
    let a = Cluster::new(FAST);
    let b = Cluster::new(r#"{"interval_ms": 100, "timeout_ms": 1000, "workflows": 2}"#);
    a.start();
    b.start();
    assert_eq!(a.daemons().len(), 10);
    assert_eq!(b.daemons().len(), 7);
    let victim = a.pid_of("workflow", 1).unwrap();
    signal(victim, libc::SIGKILL);
    a.wait_replaced("workflow", 1, victim);
    assert_eq!(
        b.events()
            .iter()
            .filter(|e| e["event"] == "respawned")
            .count(),
        0,
        "b untouched"
    );
    assert!(a.nexus(&["stop"]).status.success());
    assert!(a.daemons().is_empty());
    assert_eq!(b.daemons().len(), 7, "stopping a leaves b running");
}

#[test]
fn other_counts_work() {
    let c = Cluster::new(
        r#"{"communicators": 1, "watchdogs": 1, "workflows": 20, "interval_ms": 100, "timeout_ms": 1000}"#,
    );
    c.start();
    assert_eq!(c.daemons().len(), 22);
    assert_eq!(c.count("workflow"), 20);
    assert!(c.path().join("heartbeat_1.sock").exists());
    assert!(!c.path().join("heartbeat_2.sock").exists());
    let victim = c.pid_of("workflow", 17).unwrap();
    signal(victim, libc::SIGKILL);
    c.wait_replaced("workflow", 17, victim);
}

#[test]
fn bad_configs_are_refused_before_anything_starts() {
    let cases = [
        (r#"{"workflows": "five"}"#, "workflows"),
        (r#"{"communicators": 0}"#, "communicators"),
        (r#"{"watchdogs": 0}"#, "watchdogs"),
        (r#"{"workflows": 999999}"#, "workflows"),
        (r#"{"interval_ms": 1000, "timeout_ms": 1000}"#, "timeout_ms"),
        (r#"{"colour": "blue"}"#, "colour"),
        (r#"{"workflows": 5"#, "JSON"),
    ];
    for (json, key) in cases {
        let c = Cluster::new(json);
        let out = c.nexus(&["start"]);
        assert_eq!(out.status.code(), Some(1), "{json}: {}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(key),
            "{json}: message should name {key}: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(c.daemons().is_empty(), "{json}: nothing started");
    }
    let c = Cluster::new(FAST);
    let out = c.nexus(&["start", "--config", "/nonexistent/nexus.json"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/nexus.json"));
}

#[test]
fn unsafe_or_impossible_runtime_dirs_are_refused() {
    let c = Cluster::new(FAST);
    std::fs::set_permissions(c.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = c.nexus(&["start"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("chmod 700"),
        "{}",
        text(&out)
    );
    assert!(c.daemons().is_empty());

    let out = std::process::Command::new(NEXUS)
        .args(["start", "--runtime-dir", "/proc/nexus-cannot-be-here"])
        .env("NEXUS_CONFIG", &c.config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot create runtime directory"),
        "{}",
        text(&out)
    );
}

#[test]
fn usage_errors_exit_2_with_one_line() {
    for args in [
        vec!["frobnicate"],
        vec!["status", "--bogus"],
        vec!["daemon", "--role", "boss", "--id", "1"],
    ] {
        let out = std::process::Command::new(NEXUS)
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
    }
    let help = std::process::Command::new(NEXUS)
        .arg("--help")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("nexus start"));
}
