//! `nexus chaos` against a real cluster: mixed SIGKILL and SIGSTOP of every role, the
//! master included; it must find every failure recovered exactly once.

mod common;

use common::*;

#[test]
fn chaos_with_mixed_signals_passes() {
    let c = Cluster::new(
        r#"{"interval_ms": 100, "timeout_ms": 1000, "restart_intensity": 100000, "backoff_max_ms": 1000}"#,
    );
    c.start();
    let out = c.nexus(&[
        "chaos",
        "--duration",
        "6",
        "--interval",
        "0.3",
        "--signal",
        "mixed",
    ]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", text(&out));
    assert!(said.contains("PASS"), "{said}");
    assert!(said.contains("failures injected"), "{said}");
    // The chaos command's own verdict is checked independently here too.
    assert_eq!(c.daemons().len(), 10);
}

#[test]
fn chaos_refuses_a_cluster_that_is_not_running() {
    let c = Cluster::new(FAST);
    let out = c.nexus(&["chaos", "--duration", "1"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not running"),
        "{}",
        text(&out)
    );
    let bad = c.nexus(&["chaos", "--signal", "nuke"]);
    assert_eq!(bad.status.code(), Some(2));
}
