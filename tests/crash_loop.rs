//! A daemon crash-loops: exponential backoff, then the slot is marked failed and retried
//! at the backoff cap — never a tight loop. Provoked with NEXUS_FAULT (tests only).

mod common;

use std::time::Duration;

use common::*;

#[test]
fn crash_loop_backs_off_and_marks_the_slot_failed() {
    let c = Cluster::new(
        r#"{"interval_ms": 100, "timeout_ms": 1000, "backoff_initial_ms": 50, "backoff_max_ms": 2000,
            "restart_intensity": 4, "restart_period_ms": 60000, "start_timeout_ms": 1500}"#,
    );
    // workflow-2 crashes at every start: start cannot be whole, and says who is missing.
    let out = c.nexus_env(&["start"], &[("NEXUS_FAULT", "crash:workflow-2")]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("workflow-2"),
        "{}",
        text(&out)
    );
    assert!(
        c.daemons().is_empty(),
        "a failed start leaves nothing behind"
    );

    // Started without the fault, then made to crash-loop through the environment of
    // the replacements: simulate by starting with the fault and a long start timeout.
    let c = Cluster::new(
        r#"{"interval_ms": 100, "timeout_ms": 1000, "backoff_initial_ms": 50, "backoff_max_ms": 2000,
            "restart_intensity": 4, "restart_period_ms": 60000, "start_timeout_ms": 100000}"#,
    );
    let mut child = std::process::Command::new(NEXUS)
        .args(["start", "--runtime-dir"])
        .arg(c.path())
        .env("NEXUS_CONFIG", &c.config)
        .env("NEXUS_FAULT", "crash:workflow-2")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until("slot marked failed", Duration::from_secs(20), || {
        c.events()
            .iter()
            .any(|e| e["event"] == "failed" && e["id"] == 2)
    });
    let spawns = |c: &Cluster| {
        c.events()
            .iter()
            .filter(|e| e["event"] == "spawned" && e["id"] == 2 && e["role"] == "workflow")
            .count()
    };
    let before = spawns(&c);
    // At the backoff cap it is retried every 2 s: not a tight loop.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        spawns(&c) <= before + 1,
        "no tight loop: {} -> {}",
        before,
        spawns(&c)
    );
    let status = c.status_json();
    let w2 = status["daemons"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["role"] == "workflow" && d["id"] == 2)
        .unwrap()
        .clone();
    assert!(w2["state"] == "failed" || w2["state"] == "starting", "{w2}");
    assert_eq!(status["whole"], false);
    let _ = child.kill();
    let _ = child.wait();
}
