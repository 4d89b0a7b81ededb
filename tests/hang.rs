//! A daemon hangs or never heartbeats: the watchdogs notice the silence, a majority
//! agrees, the master kills and replaces it, once.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[test]
fn stopped_workflow_is_killed_and_replaced() {
    let c = Cluster::new(FAST);
    c.start();
    let victim = c.pid_of("workflow", 2).unwrap();
    let t0 = Instant::now();
    signal(victim, libc::SIGSTOP);
    c.wait_replaced("workflow", 2, victim);
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(400),
        "not before the timeout: {took:?}"
    );
    wait_until("old pid gone", Duration::from_secs(5), || gone(victim));
    wait_until("recovery recorded", Duration::from_secs(5), || {
        !c.recoveries_of(victim).is_empty()
    });
    let rec = c.recoveries_of(victim);
    assert_eq!(rec.len(), 1, "three watchdogs, one replacement: {rec:?}");
    assert_eq!(rec[0]["cause"], "hang");
    assert!(rec[0]["detect_ms"].as_f64().unwrap() >= 600.0);
    let killed: Vec<_> = c
        .events()
        .into_iter()
        .filter(|e| e["event"] == "killed" && e["pid"] == victim)
        .collect();
    assert_eq!(killed.len(), 1, "{killed:?}");
    c.wait_whole(10, Duration::from_secs(10));
}

#[test]
fn stopped_watchdog_is_caught_by_its_peers() {
    let c = Cluster::new(FAST);
    c.start();
    let victim = c.pid_of("watchdog", 1).unwrap();
    signal(victim, libc::SIGSTOP);
    c.wait_replaced("watchdog", 1, victim);
    wait_until("recovery recorded", Duration::from_secs(5), || {
        !c.recoveries_of(victim).is_empty()
    });
    assert_eq!(c.recoveries_of(victim)[0]["cause"], "hang");
    c.wait_whole(10, Duration::from_secs(10));
}

#[test]
fn stopped_standby_communicator_is_replaced() {
    let c = Cluster::new(FAST);
    c.start();
    let master = c.master_pid();
    let standby = c.standby();
    signal(standby.0, libc::SIGSTOP);
    c.wait_replaced("communicator", standby.1, standby.0);
    assert_eq!(c.master_pid(), master);
}

#[test]
fn a_daemon_that_never_heartbeats_is_replaced() {
    let c = Cluster::new(r#"{"interval_ms": 100, "timeout_ms": 1000, "start_timeout_ms": 800}"#);
    // workflow-4 starts but never heartbeats: start cannot complete and names it.
    let out = c.nexus_env(&["start"], &[("NEXUS_FAULT", "mute:workflow-4")]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("workflow-4"),
        "{}",
        text(&out)
    );

    // With room to wait, the watchdogs report the mute daemon and it is replaced
    // (the replacement inherits the fault, so it is replaced again: what matters is
    // that each silent pid is replaced once).
    let c = Cluster::new(r#"{"interval_ms": 100, "timeout_ms": 1000, "start_timeout_ms": 100000}"#);
    let mut child = std::process::Command::new(NEXUS)
        .args(["start", "--runtime-dir"])
        .arg(c.path())
        .env("NEXUS_CONFIG", &c.config)
        .env("NEXUS_FAULT", "mute:workflow-4")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until(
        "mute workflow-4 killed as hung",
        Duration::from_secs(15),
        || {
            c.events()
                .iter()
                .any(|e| e["event"] == "killed" && e["id"] == 4 && e["cause"] == "hang")
        },
    );
    let killed: Vec<i64> = c
        .events()
        .iter()
        .filter(|e| e["event"] == "killed" && e["id"] == 4)
        .map(|e| e["pid"].as_i64().unwrap())
        .collect();
    let mut unique = killed.clone();
    unique.dedup();
    assert_eq!(killed, unique, "each silent pid is killed once");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn two_hung_watchdogs_are_both_replaced() {
    let c = Cluster::new(FAST);
    c.start();
    let w1 = c.pid_of("watchdog", 1).unwrap();
    let w2 = c.pid_of("watchdog", 2).unwrap();
    signal(w1, libc::SIGSTOP);
    signal(w2, libc::SIGSTOP);
    // Only watchdog-3 can testify; the two suspects must not block each other's kill.
    wait_until(
        "both hung watchdogs replaced",
        Duration::from_secs(15),
        || {
            c.pid_of("watchdog", 1).is_some_and(|p| p != w1)
                && c.pid_of("watchdog", 2).is_some_and(|p| p != w2)
        },
    );
    c.wait_whole(10, Duration::from_secs(10));
}

#[test]
fn a_deleted_heartbeat_socket_is_restored() {
    let c = Cluster::new(FAST);
    c.start();
    let sock = c.path().join("heartbeat_3.sock");
    let dog = c.pid_of("watchdog", 3).unwrap();
    std::fs::remove_file(&sock).unwrap();
    wait_until(
        "watchdog-3 replaced with a fresh socket",
        Duration::from_secs(10),
        || c.pid_of("watchdog", 3).is_some_and(|p| p != dog) && sock.exists(),
    );
    c.wait_whole(10, Duration::from_secs(10));
}
