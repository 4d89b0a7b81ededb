//! Steering a running cluster: scale, reload, restart — the daemons that stay are not
//! touched, a bad config changes nothing, a restart is recorded as such.

mod common;

use std::time::Duration;

use common::*;

fn run_ok(c: &Cluster, args: &[&str]) -> String {
    let out = c.nexus(args);
    assert!(out.status.success(), "{args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn no_casualties(c: &Cluster) {
    let bad: Vec<_> = c
        .events()
        .into_iter()
        .filter(|e| {
            e["event"] == "respawned" || e["detail"].as_str().is_some_and(|d| d.contains("SIGHUP"))
        })
        .collect();
    assert!(bad.is_empty(), "steering caused failures: {bad:?}");
}

#[test]
fn scale_up_and_down_leaves_the_others_alone() {
    let c = Cluster::new(r#"{"interval_ms": 100, "timeout_ms": 1000, "stop_grace_ms": 500}"#);
    c.start();
    let before = c.daemons();
    run_ok(&c, &["scale", "workflow=8"]);
    assert_eq!(c.count("workflow"), 8);
    for d in &before {
        assert!(c.daemons().contains(d), "{d:?} untouched by scaling up");
    }
    run_ok(&c, &["scale", "workflow=3", "watchdog=5"]);
    assert_eq!(c.count("workflow"), 3);
    assert_eq!(c.count("watchdog"), 5);
    assert!(c.path().join("heartbeat_5.sock").exists());
    for d in before.iter().filter(|d| d.1 != "workflow" || d.2 <= 3) {
        assert!(c.daemons().contains(d), "{d:?} untouched by scaling");
    }
    // A retired process leaves /proc's command lines (zombie) just before the master
    // records it.
    wait_until(
        "workflows 4..8 recorded as retired",
        Duration::from_secs(5),
        || {
            c.events()
                .iter()
                .filter(|e| e["event"] == "retired")
                .count()
                == 5
        },
    );
    // The new watchdogs judge hangs like the others; the remaining workflows are watched.
    let victim = c.pid_of("workflow", 2).unwrap();
    signal(victim, libc::SIGSTOP);
    c.wait_replaced("workflow", 2, victim);
    // The replacement runs before the master writes its ledger line (the hot path first).
    wait_until("the recovery recorded", Duration::from_secs(10), || {
        !c.recoveries_of(victim).is_empty()
    });
    assert_eq!(c.recoveries_of(victim).len(), 1);
    c.wait_whole(10, Duration::from_secs(10));
    let status = c.status_json();
    assert_eq!(status["whole"], true);
}

#[test]
fn reload_applies_a_good_config_and_refuses_a_bad_one() {
    let c = Cluster::new(r#"{"interval_ms": 100, "timeout_ms": 1000, "stop_grace_ms": 500}"#);
    c.start();
    let before = c.daemons();
    std::fs::write(
        &c.config,
        r#"{"interval_ms": 100, "timeout_ms": 1000, "workflows": "many"}"#,
    )
    .unwrap();
    let out = c.nexus(&["reload"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`workflows`") && err.contains("untouched"),
        "{err}"
    );
    assert_eq!(c.daemons(), before, "a refused reload touches nothing");

    std::fs::write(
        &c.config,
        r#"{"interval_ms": 100, "timeout_ms": 1500, "workflows": 6, "stop_grace_ms": 500}"#,
    )
    .unwrap();
    let said = run_ok(&c, &["reload"]);
    assert!(
        said.contains("timeout_ms: 1000 -> 1500") && said.contains("workflows: 5 -> 6"),
        "{said}"
    );
    assert_eq!(c.count("workflow"), 6);
    let running: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(c.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(running["timeout_ms"], 1500);
    no_casualties(&c);
}

#[test]
fn restart_replaces_one_daemon_on_purpose() {
    let c = Cluster::new(r#"{"interval_ms": 100, "timeout_ms": 1000, "stop_grace_ms": 500}"#);
    c.start();
    let old = c.pid_of("workflow", 2).unwrap();
    let said = run_ok(&c, &["restart", "workflow-2"]);
    assert!(said.contains("restarted"), "{said}");
    let new = c.pid_of("workflow", 2).unwrap();
    assert_ne!(old, new);
    let restarted: Vec<_> = c
        .events()
        .into_iter()
        .filter(|e| e["event"] == "restarted")
        .collect();
    assert_eq!(restarted.len(), 1);
    assert_eq!(restarted[0]["old_pid"], old);
    no_casualties(&c);

    let master = c.master_pid();
    let (name, _) = c
        .daemons()
        .into_iter()
        .find(|d| d.0 == master)
        .map(|d| (format!("{}-{}", d.1, d.2), d.0))
        .unwrap();
    run_ok(&c, &["restart", &name]);
    assert_ne!(c.master_pid(), master, "a restarted master hands over");
    c.wait_whole(10, Duration::from_secs(10));

    let bad = c.nexus(&["restart", "workflow-99"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("not a slot"),
        "{}",
        text(&bad)
    );
    let bad = c.nexus(&["scale", "chefs=3"]);
    assert_eq!(bad.status.code(), Some(1));
}
