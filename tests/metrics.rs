//! `nexus metrics`: Prometheus text, checked by promtool (which .ci/run installs), and
//! counters that follow what happened.

mod common;

use std::io::Write;
use std::time::Duration;

use common::*;

fn metrics(c: &Cluster) -> String {
    let out = c.nexus(&["metrics"]);
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8(out.stdout).unwrap()
}

fn value(m: &str, series: &str) -> f64 {
    m.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no series {series} in\n{m}"))
}

#[test]
fn metrics_count_what_happened_and_pass_promtool() {
    let c = Cluster::new(FAST);
    c.start();
    let victim = c.pid_of("workflow", 4).unwrap();
    signal(victim, libc::SIGKILL);
    c.wait_replaced("workflow", 4, victim);
    wait_until("recovery recorded", Duration::from_secs(5), || {
        !c.recoveries_of(victim).is_empty()
    });
    let old_master = c.master_pid();
    signal(old_master, libc::SIGKILL);
    c.wait_whole(10, Duration::from_secs(10));
    wait_until("the failover counted", Duration::from_secs(5), || {
        value(
            &metrics(&c),
            r#"nexus_restarts_total{role="communicator",cause="failover"}"#,
        ) >= 1.0
    });
    let m = metrics(&c);
    assert_eq!(value(&m, "nexus_up"), 1.0);
    assert_eq!(
        value(&m, r#"nexus_daemons{role="workflow",state="running"}"#),
        5.0
    );
    // Counted by the first master, carried over by the second from the ledger.
    assert_eq!(
        value(&m, r#"nexus_restarts_total{role="workflow",cause="crash"}"#),
        1.0
    );
    assert_eq!(value(&m, "nexus_leader_changes_total"), 1.0);
    assert!(value(&m, "nexus_recovery_seconds_count") >= 1.0);
    assert!(value(&m, r#"nexus_heartbeats_received_total{watchdog="1"}"#) > 0.0);
    promtool(&m);
}

/// `promtool check metrics` on the exposition (installed by .ci/run).
fn promtool(m: &str) {
    match std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Ok(mut child) => {
            child.stdin.take().unwrap().write_all(m.as_bytes()).unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "promtool: {}\n{m}", text(&out));
        }
        Err(_) if std::env::var_os("CI").is_some() => {
            panic!("promtool missing in CI (.ci/run installs it)")
        }
        Err(_) => {
            eprintln!("promtool not installed: exposition checked by the assertions above only")
        }
    }
}

#[test]
fn services_have_their_own_series_and_pass_promtool() {
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("ok");
    std::fs::write(&flag, "").unwrap();
    let c = Cluster::new(&format!(
        r#"{{"interval_ms": 100, "timeout_ms": 1000, "workflows": 2, "services": [
            {{"name": "app", "command": ["sleep", "1000"],
              "liveness": {{"exec": ["test", "-e", "{}"], "period_ms": 50, "failures": 1000}}}}]}}"#,
        flag.display()
    ));
    c.start();
    let old = c.program_pid("app-1").unwrap();
    signal(old, libc::SIGKILL);
    c.wait_program_replaced("app-1", old, Duration::from_secs(10));
    std::fs::remove_file(&flag).unwrap();
    // Probe counts reach the stats file every few seconds.
    wait_until("probe failures counted", Duration::from_secs(20), || {
        let m = metrics(&c);
        m.lines()
            .find_map(|l| {
                l.strip_prefix(r#"nexus_service_probe_failures_total{service="app",instance="1",probe="liveness"} "#)
            })
            .and_then(|v| v.trim().parse::<f64>().ok())
            .is_some_and(|v| v > 0.0)
    });
    let m = metrics(&c);
    assert_eq!(
        value(&m, r#"nexus_service_up{service="app",instance="1"}"#),
        1.0
    );
    assert_eq!(
        value(
            &m,
            r#"nexus_service_restarts_total{service="app",instance="1",cause="crash"}"#
        ),
        1.0
    );
    assert!(
        value(
            &m,
            r#"nexus_service_probe_duration_seconds_count{service="app",instance="1",probe="liveness"}"#
        ) > 0.0
    );
    assert!(value(&m, r#"nexus_service_rss_bytes{service="app",instance="1"}"#) > 0.0);
    promtool(&m);
}

#[test]
fn metrics_without_a_cluster_say_down() {
    let c = Cluster::new(FAST);
    let out = c.nexus(&["metrics"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stdout).contains("nexus_up 0"));
}
