//! One queue in PostgreSQL shared by two clusters (two runtime directories playing two
//! hosts): each host's capabilities are honoured, a submit on one runs on the other, a
//! cancel and a wait cross hosts, both take work, and a host that dies has its running
//! task re-queued by the other when its lease runs out.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn host_config(url: &str, caps: &[&str]) -> String {
    serde_json::json!({
        "workflows": 2, "interval_ms": 100, "timeout_ms": 1000, "stop_grace_ms": 1000,
        "queue_url": url, "queue_lease_ms": 2000,
        "workers": [{"workflows": [1, 2], "capabilities": caps, "concurrency": 2}],
    })
    .to_string()
}

fn submit(c: &Cluster, json: &str) -> i64 {
    let out = c.nexus(&["task", "submit", json]);
    assert!(out.status.success(), "submit {json}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

fn task(c: &Cluster, id: i64) -> Value {
    let out = c.nexus(&["task", "status", &id.to_string(), "--json"]);
    assert!(out.status.success(), "status {id}: {}", text(&out));
    serde_json::from_slice(&out.stdout).expect("status --json")
}

fn host_of(c: &Cluster) -> String {
    format!(
        "{}:{}",
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .unwrap()
            .trim(),
        c.path().display()
    )
}

#[test]
fn two_hosts_share_one_queue_and_take_back_a_dead_hosts_task() {
    let Some(db) = pg::TempDb::create() else {
        return;
    };
    let a = Cluster::new(&host_config(&db.url, &["a", "any"]));
    let b = Cluster::new(&host_config(&db.url, &["b", "any"]));
    a.start();
    b.start();

    // Submitted on A, only B can run it: B does, and A's wait sees the end.
    let id = submit(
        &a,
        r#"{"command": ["sh", "-c", "echo from-b"], "required_capabilities": ["b"]}"#,
    );
    let out = a.nexus(&["task", "wait", &id.to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    let t = task(&a, id);
    assert_eq!(t["result"], "from-b", "{t}");
    assert_eq!(t["host"], host_of(&b), "{t}");

    // A cancel on A kills the program running on B.
    let id = submit(
        &a,
        r#"{"command": ["sleep", "60"], "required_capabilities": ["b"]}"#,
    );
    let mut pid = 0;
    wait_until("the task running on B", Duration::from_secs(10), || {
        pid = task(&b, id)["pid"].as_i64().unwrap_or(0) as i32;
        pid > 0
    });
    let out = a.nexus(&["task", "cancel", &id.to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("killed there"), "{}", text(&out));
    wait_until("B's program killed", Duration::from_secs(10), || gone(pid));

    // Both hosts take work, and each task runs once.
    let ids: Vec<i64> = (0..24)
        .map(|_| submit(&a, r#"{"command": ["sh", "-c", "sleep 0.2"]}"#))
        .collect();
    let mut args = vec!["task".to_string(), "wait".to_string()];
    args.extend(ids.iter().map(|i| i.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = b.nexus(&args);
    assert!(out.status.success(), "{}", text(&out));
    let mut hosts = std::collections::BTreeSet::new();
    for id in &ids {
        let t = task(&b, *id);
        assert_eq!(
            (t["state"].as_str(), t["attempts"].as_u64()),
            (Some("succeeded"), Some(1)),
            "{t}"
        );
        hosts.insert(t["host"].as_str().unwrap().to_string());
    }
    assert_eq!(hosts.len(), 2, "both hosts ran tasks: {hosts:?}");

    // B dies whole (daemons and programs) mid-task: A takes it back when B's lease runs out.
    let id = submit(
        &a,
        r#"{"command": ["sh", "-c", "sleep 1; echo again"], "required_capabilities": ["b"]}"#,
    );
    wait_until("the task running on B", Duration::from_secs(10), || {
        task(&a, id)["pid"].as_i64().is_some() || task(&b, id)["pid"].as_i64().is_some()
    });
    kill_all(b.path());
    let died = Instant::now();
    wait_until("re-queued by A", Duration::from_secs(15), || {
        task(&a, id)["state"] != "running"
    });
    let took = died.elapsed();
    let t = task(&a, id);
    assert!(
        t["history"][0]["error"]
            .as_str()
            .unwrap_or("")
            .contains("stopped renewing its 2000 ms lease"),
        "{t}"
    );
    assert!(
        took >= Duration::from_millis(1000),
        "not before the lease: {took:?}"
    );
    // A has no "b": the task waits until B is back (a fresh start), then runs there.
    assert!(
        task(&a, id)["waiting"]
            .as_str()
            .is_some_and(|w| w.contains("capabilities")),
        "{}",
        task(&a, id)
    );
    b.start();
    let out = a.nexus(&["task", "wait", &id.to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    let t = task(&a, id);
    assert_eq!(
        (t["result"].as_str(), t["attempts"].as_u64()),
        (Some("again"), Some(2)),
        "{t}"
    );
    drop(a);
    drop(b);
}
