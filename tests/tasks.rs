//! The task queue on real clusters: submit → a worker runs it; retries, timeouts,
//! cancels, `--after`, capabilities; a worker's SIGKILL re-queues at once; SIGKILL of
//! every process then `start` finishes every task; bad input stores nothing; a broken
//! database degrades the queue, not the cluster.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

const CONFIG: &str = r#"{"workflows": 3, "interval_ms": 100, "timeout_ms": 1000, "stop_grace_ms": 1000,
  "workers": [{"workflows": [1], "capabilities": ["gpu"], "concurrency": 2}],
  "actions": {"echo": {"command": ["sh", "-c", "cat; echo; echo attempt=$NEXUS_TASK_ATTEMPT"]}}}"#;

/// The same config with the queue in PostgreSQL.
fn with_queue(config: &str, url: &str) -> String {
    let mut v: Value = serde_json::from_str(config).expect("a JSON config");
    v["queue_url"] = Value::String(url.into());
    v.to_string()
}

/// Each of these runs twice: on SQLite, and on PostgreSQL when a server is named (in CI
/// always), in a database of its own.
macro_rules! on_both_backends {
    ($($name:ident),*) => {$(
        mod $name {
            #[test]
            fn sqlite() {
                super::$name(&super::Cluster::new(super::CONFIG));
            }
            #[test]
            fn postgres() {
                if let Some(db) = super::pg::TempDb::create() {
                    let c = super::Cluster::new(&super::with_queue(super::CONFIG, &db.url));
                    super::$name(&c);
                    drop(c);
                }
            }
        }
    )*};
}

on_both_backends!(
    tasks_run_retry_time_out_cancel_chain_and_respect_capabilities,
    a_killed_or_hung_worker_has_its_task_requeued_at_once,
    sigkill_of_everything_then_start_finishes_every_task,
    bad_input_is_one_line_and_stores_nothing
);

fn submit(c: &Cluster, args: &[&str]) -> i64 {
    let mut a = vec!["task", "submit"];
    a.extend_from_slice(args);
    let out = c.nexus(&a);
    assert!(out.status.success(), "submit {args:?}: {}", text(&out));
    let s = String::from_utf8_lossy(&out.stdout);
    s.trim()
        .parse()
        .unwrap_or_else(|_| panic!("submit printed {s:?}, not an id alone"))
}

fn task(c: &Cluster, id: i64) -> Value {
    let out = c.nexus(&["task", "status", &id.to_string(), "--json"]);
    assert!(out.status.success(), "status {id}: {}", text(&out));
    serde_json::from_slice(&out.stdout).expect("status --json")
}

fn wait_state(c: &Cluster, id: i64, state: &str, within: Duration) -> Value {
    let mut last = Value::Null;
    wait_until(&format!("task {id} {state}"), within, || {
        last = task(c, id);
        last["state"] == state
    });
    last
}

fn task_events(c: &Cluster, id: i64) -> Vec<String> {
    c.events()
        .into_iter()
        .filter(|e| e["task"] == id)
        .map(|e| e["event"].as_str().unwrap_or("").to_string())
        .collect()
}

fn tasks_run_retry_time_out_cancel_chain_and_respect_capabilities(c: &Cluster) {
    c.start();
    // An action: the task's JSON on stdin, its attempt in the environment, stdout the result.
    let echo = submit(c, &[r#"{"action": "echo", "n": 7}"#]);
    let out = c.nexus(&["task", "wait", &echo.to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    let t = task(c, echo);
    assert_eq!(t["state"], "succeeded");
    assert_eq!(t["exit_code"], 0);
    assert_eq!(
        t["result"], "{\"action\": \"echo\", \"n\": 7}\nattempt=1",
        "{t}"
    );
    // A result that parses is kept as JSON.
    let js = submit(c, &[r#"{"command": ["echo", "{\"ok\": true}"]}"#, "--wait"]);
    assert_eq!(task(c, js)["result"]["ok"], true);
    // Fails once, then succeeds: retried with its attempts kept.
    let flag = c.path().join("flag");
    let script = format!(
        "if [ -e {f} ]; then echo second; else echo first >&2; touch {f}; exit 4; fi",
        f = flag.display()
    );
    let flaky = submit(
        c,
        &[
            &serde_json::json!({"command": ["sh", "-c", script]}).to_string(),
            "--max-attempts",
            "3",
        ],
    );
    // A timeout kills its group; with one attempt it fails.
    let slow = submit(
        c,
        &[
            r#"{"command": ["sh", "-c", "sleep 30 & sleep 30"]}"#,
            "--timeout-ms",
            "300",
            "--max-attempts",
            "1",
        ],
    );
    // Needs a capability only workflow-1 has; another nobody has.
    let gpu = submit(
        c,
        &[r#"{"command": ["true"], "required_capabilities": ["gpu"]}"#],
    );
    let tpu = submit(
        c,
        &[r#"{"command": ["true"], "required_capabilities": ["tpu"]}"#],
    );
    // Cancelled while running: killed.
    let long = submit(c, &[r#"{"command": ["sleep", "30"]}"#]);
    let after = submit(
        c,
        &[
            r#"{"command": ["echo", "chained"]}"#,
            "--after",
            &flaky.to_string(),
        ],
    );
    let running = wait_state(c, long, "running", Duration::from_secs(10));
    wait_until("the long task's pid", Duration::from_secs(10), || {
        task(c, long)["pid"].as_i64().is_some()
    });
    let pid = task(c, long)["pid"].as_i64().unwrap() as i32;
    let _ = running;
    let out = c.nexus(&["task", "cancel", &long.to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    wait_until(
        "the cancelled task's program killed",
        Duration::from_secs(10),
        || gone(pid),
    );

    let out = c.nexus(&[
        "task",
        "wait",
        &flaky.to_string(),
        &slow.to_string(),
        &gpu.to_string(),
        &after.to_string(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "the timeout's failure: {}",
        text(&out)
    );
    let f = task(c, flaky);
    assert_eq!(
        (f["state"].as_str(), f["attempts"].as_i64()),
        (Some("succeeded"), Some(2)),
        "{f}"
    );
    assert_eq!(f["history"][0]["exit_code"], 4);
    assert_eq!(f["result"], "second");
    let s = task(c, slow);
    assert_eq!(s["state"], "failed");
    assert!(
        s["error"]
            .as_str()
            .unwrap()
            .contains("timed out after 300 ms"),
        "{s}"
    );
    assert_eq!(task(c, gpu)["worker"], "workflow-1");
    assert_eq!(task(c, after)["result"], "chained");
    let t = task(c, tpu);
    assert_eq!(t["state"], "queued");
    assert!(
        t["waiting"]
            .as_str()
            .unwrap()
            .contains("no worker has the capabilities [\"tpu\"]"),
        "{t}"
    );
    assert_eq!(task(c, long)["state"], "cancelled");
    // The ledger tells each story.
    assert_eq!(
        task_events(c, flaky),
        [
            "task_submitted",
            "task_started",
            "task_retry",
            "task_started",
            "task_succeeded"
        ]
    );
    assert!(task_events(c, long).contains(&"task_cancelled".to_string()));
    let out = c.nexus(&["events", "--event", "task_failed", "--json", "-n", "100"]);
    let failed: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["task"], slow);
    // The log holds every attempt's output.
    let out = c.nexus(&["task", "logs", &flaky.to_string()]);
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(
        log.contains("attempt 1 on")
            && log.contains("first")
            && log.contains("attempt 2 on")
            && log.contains("second"),
        "{log}"
    );
    // status and metrics show the queue.
    let st = c.status_json();
    assert_eq!(st["tasks"]["counts"]["queued"], 1, "{}", st["tasks"]);
    assert_eq!(st["tasks"]["workers"].as_array().unwrap().len(), 3);
    let out = c.nexus(&["metrics"]);
    let m = String::from_utf8_lossy(&out.stdout);
    assert!(m.contains("nexus_tasks{state=\"succeeded\"} 5"), "{m}");
    assert!(m.contains("nexus_task_run_seconds_count 8"), "{m}");
    assert!(
        m.contains("nexus_task_wait_seconds_bucket{le=\"+Inf\"} 7"),
        "{m}"
    );
    // retry by hand of the failed one gives it fresh attempts.
    let out = c.nexus(&["task", "retry", &slow.to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    let s = wait_state(c, slow, "failed", Duration::from_secs(10));
    assert_eq!(s["attempts"], 2);
}

fn a_killed_or_hung_worker_has_its_task_requeued_at_once(c: &Cluster) {
    c.start();
    let id = submit(c, &[r#"{"command": ["sh", "-c", "sleep 1; echo done"]}"#]);
    wait_until("the task's pid", Duration::from_secs(10), || {
        task(c, id)["pid"].as_i64().is_some()
    });
    let t = task(c, id);
    let worker = t["worker"].as_str().unwrap().to_string();
    let first = t["pid"].as_i64().unwrap() as i32;
    let wid: u32 = worker.trim_start_matches("workflow-").parse().unwrap();
    signal(c.pid_of("workflow", wid).unwrap(), libc::SIGKILL);
    // Re-queued and started again well before any lease could have run out.
    wait_until("attempt 2 running", Duration::from_secs(5), || {
        let t = task(c, id);
        t["attempts"] == 2 && t["pid"].as_i64().is_some_and(|p| p as i32 != first)
    });
    wait_until(
        "the first attempt's program killed",
        Duration::from_secs(5),
        || gone(first),
    );
    let t = wait_state(c, id, "succeeded", Duration::from_secs(10));
    assert!(
        t["history"][0]["error"]
            .as_str()
            .unwrap()
            .contains(&format!("its worker {worker}")),
        "{t}"
    );
    // Hung: SIGSTOP the worker; the watchdogs' verdict (1 s here) re-queues it.
    let id = submit(c, &[r#"{"command": ["sh", "-c", "sleep 1; echo done"]}"#]);
    wait_until("the task's pid", Duration::from_secs(10), || {
        task(c, id)["pid"].as_i64().is_some()
    });
    let wid: u32 = task(c, id)["worker"]
        .as_str()
        .unwrap()
        .trim_start_matches("workflow-")
        .parse()
        .unwrap();
    signal(c.pid_of("workflow", wid).unwrap(), libc::SIGSTOP);
    let t = wait_state(c, id, "succeeded", Duration::from_secs(15));
    assert_eq!(t["attempts"], 2, "{t}");
}

fn sigkill_of_everything_then_start_finishes_every_task(c: &Cluster) {
    c.start();
    let ids: Vec<i64> = (0..6)
        .map(|_| submit(c, &[r#"{"command": ["sh", "-c", "sleep 0.5; echo ok"]}"#]))
        .collect();
    wait_until("some running", Duration::from_secs(10), || {
        ids.iter().any(|id| task(c, *id)["state"] == "running")
    });
    // Every nexus process and every task's process, at once.
    kill_all(c.path());
    c.start();
    let out = c.nexus(&["task", "wait", &ids[0].to_string(), &ids[5].to_string()]);
    let _ = out;
    for id in &ids {
        let t = wait_state(c, *id, "succeeded", Duration::from_secs(20));
        assert_eq!(t["result"], "ok");
    }
    // Those that were running were re-queued with the attempt counted.
    assert!(ids.iter().any(|id| task(c, *id)["attempts"] == 2));
    // And the master changing hands loses nothing, runs nothing twice.
    let id = submit(c, &[r#"{"command": ["sh", "-c", "sleep 1; echo once"]}"#]);
    wait_state(c, id, "running", Duration::from_secs(10));
    signal(c.master_pid(), libc::SIGKILL);
    let t = wait_state(c, id, "succeeded", Duration::from_secs(15));
    assert_eq!(t["attempts"], 1, "the failover did not re-run it: {t}");
}

fn bad_input_is_one_line_and_stores_nothing(c: &Cluster) {
    c.start();
    for (args, says) in [
        (vec!["{nope"], "not valid JSON"),
        (vec![r#"{"action": "nope"}"#], "unknown action \"nope\""),
        (
            vec![r#"{"command": ["true"]}"#, "--priority", "5000"],
            "--priority takes",
        ),
        (
            vec![r#"{"command": ["true"]}"#, "--after", "999"],
            "no task 999",
        ),
        (
            vec![r#"{"command": ["true"]}"#, "--bogus"],
            "unknown option --bogus",
        ),
        (vec![r#"{"command": []}"#], "empty"),
        (vec![], "needs the task's JSON"),
    ] {
        let mut a = vec!["task", "submit"];
        a.extend_from_slice(&args);
        let out = c.nexus(&a);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(out.stdout.is_empty(), "{args:?}: {}", text(&out));
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    let out = c.nexus(&["task", "list", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tasks"].as_array().unwrap().len(), 0, "{v}");
    // A program that cannot be executed: the task fails with the errno.
    let id = submit(
        c,
        &[
            r#"{"command": ["/no/such/program"]}"#,
            "--max-attempts",
            "1",
        ],
    );
    let t = wait_state(c, id, "failed", Duration::from_secs(10));
    assert!(t["error"].as_str().unwrap().contains("ENOENT"), "{t}");
    // Garbage on the queue's socket is answered, never fatal.
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(c.path().join("tasks.sock")).unwrap();
    s.write_all(b"garbage\n").unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.contains("not a request"), "{answer}");
    assert!(submit(c, &[r#"{"command": ["true"]}"#]) > 0);
}

#[test]
fn a_broken_database_degrades_the_queue_not_the_cluster_sqlite() {
    let c = Cluster::new(CONFIG);
    let state = c.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("tasks.db"), vec![b'x'; 8192]).unwrap();
    c.start();
    let out = c.nexus(&["task", "submit", r#"{"command": ["true"]}"#]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("task queue is unavailable") && err.contains("tasks.db"),
        "{err}"
    );
    // The daemons go on.
    let out = c.nexus(&["status"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("tasks: UNAVAILABLE"));
    // Repaired: the queue comes back by itself.
    std::fs::remove_file(state.join("tasks.db")).unwrap();
    let mut id = 0;
    wait_until("the queue back", Duration::from_secs(10), || {
        let out = c.nexus(&["task", "submit", r#"{"command": ["true"]}"#, "--wait"]);
        if out.status.success() {
            id = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        }
        out.status.success()
    });
    assert_eq!(task(&c, id)["state"], "succeeded");
}

#[test]
fn an_unreachable_postgres_degrades_the_queue_not_the_cluster() {
    let Some(db) = pg::TempDb::create() else {
        return;
    };
    // The server is reached through a relay that is not there yet.
    let mut relay = pg::Relay::new(db.server());
    let c = Cluster::new(&with_queue(CONFIG, &db.url_via(relay.port)));
    c.start();
    let out = c.nexus(&["task", "submit", r#"{"command": ["true"]}"#]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("task queue is unavailable") && err.contains("PostgreSQL"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        !err.contains("nexus:nexus@"),
        "the password is not shown: {err}"
    );
    let out = c.nexus(&["status"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("tasks: UNAVAILABLE"));
    // The server comes back: so does the queue, by itself.
    relay.open();
    let mut id = 0;
    wait_until("the queue back", Duration::from_secs(20), || {
        let out = c.nexus(&["task", "submit", r#"{"command": ["true"]}"#, "--wait"]);
        if out.status.success() {
            id = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        }
        out.status.success()
    });
    assert_eq!(task(&c, id)["state"], "succeeded");
    drop(c);
}

/// Whether this test process may make cgroups (the daemons sit in the same one).
fn cgroups_writable() -> bool {
    let Some(base) = own_cgroup_dir() else {
        return false;
    };
    let probe = base.join(format!("nexus-test-probe.{}", std::process::id()));
    let ok = std::fs::create_dir(&probe).is_ok();
    let _ = std::fs::remove_dir(&probe);
    ok
}

#[test]
fn a_task_s_whole_tree_dies_with_it_in_its_cgroup() {
    if !cgroups_writable() {
        eprintln!("no writable cgroup v2 here: tasks have process groups only, nothing to test");
        return;
    }
    let c = Cluster::new(CONFIG);
    c.start();
    // A child that left the task's session and process group (the program waits until it
    // has: its pid is written after its setsid) outlives the program...
    let escape = |pidfile: &std::path::Path, then: &str| {
        let f = pidfile.display();
        let script = format!(
            "setsid sh -c 'echo $$ > {f}; exec sleep 300' & \
             for i in $(seq 500); do [ -s {f} ] && break; sleep 0.01; done; {then}"
        );
        serde_json::json!({"command": ["sh", "-c", script]}).to_string()
    };
    let pidfile = c.path().join("escaped.pid");
    let read_pid = |p: &std::path::Path| -> i32 {
        std::fs::read_to_string(p).unwrap().trim().parse().unwrap()
    };
    let id = submit(&c, &[&escape(&pidfile, "exit 0"), "--wait"]);
    assert_eq!(task(&c, id)["state"], "succeeded");
    let escaped = read_pid(&pidfile);
    // ...only until the worker reaps the program: its cgroup is killed then.
    wait_until("the escaped child killed", Duration::from_secs(5), || {
        gone(escaped)
    });
    // A timeout kills the whole tree, what escaped included.
    let pidfile = c.path().join("escaped-slow.pid");
    let slow = submit(
        &c,
        &[
            &escape(&pidfile, "sleep 300"),
            "--timeout-ms",
            "1000",
            "--max-attempts",
            "1",
        ],
    );
    let t = wait_state(&c, slow, "failed", Duration::from_secs(10));
    assert!(
        t["error"]
            .as_str()
            .unwrap_or("")
            .contains("killed with its cgroup"),
        "{t}"
    );
    let escaped = read_pid(&pidfile);
    wait_until(
        "the timed-out task's tree killed",
        Duration::from_secs(5),
        || gone(escaped),
    );
    // The cgroups are the workers' while they run, and none is left after a stop.
    assert!(!task_cgroups(c.path()).is_empty());
    let out = c.nexus(&["stop"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(task_cgroups(c.path()), Vec::<std::path::PathBuf>::new());
}

#[test]
fn stop_after_every_daemon_was_sigkilled_ends_the_tasks_and_their_cgroups() {
    let c = Cluster::new(CONFIG);
    c.start();
    let pidfile = c.path().join("task.pid");
    let spec = serde_json::json!({"command": ["sh", "-c",
        format!("echo $$ > {}; exec sleep 300", pidfile.display())]});
    let id = submit(&c, &[&spec.to_string()]);
    wait_state(&c, id, "running", Duration::from_secs(10));
    wait_until("the task's pid written", Duration::from_secs(10), || {
        std::fs::read_to_string(&pidfile).is_ok_and(|s| s.ends_with('\n'))
    });
    let program: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let had_cgroup = !task_cgroups(c.path()).is_empty();
    // nexus's own processes die, what they ran does not.
    kill_daemons(c.path());
    assert!(!gone(program), "the task's program died with its worker");
    let out = c.nexus(&["stop"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("not running")
            && text(&out).contains("1 program process it had left was killed"),
        "{}",
        text(&out)
    );
    wait_until("the task's program killed", Duration::from_secs(5), || {
        gone(program)
    });
    if had_cgroup {
        assert_eq!(task_cgroups(c.path()), Vec::<std::path::PathBuf>::new());
    }
}

#[test]
fn among_equally_full_workers_the_task_goes_to_the_one_using_less_cpu() {
    let c = Cluster::new(
        r#"{"workflows": 2, "interval_ms": 100, "timeout_ms": 1000, "stop_grace_ms": 1000,
            "workers": [{"workflows": [1, 2], "concurrency": 2}]}"#,
    );
    c.start();
    let worker_of = |id: i64| {
        wait_until(
            &format!("task {id} started"),
            Duration::from_secs(10),
            || task(&c, id)["pid"].as_i64().is_some(),
        );
        task(&c, id)["worker"].as_str().unwrap().to_string()
    };
    // Both idle: the first goes to workflow-1 and spins; the second to the emptier one.
    let spin = submit(&c, &[r#"{"command": ["sh", "-c", "while :; do :; done"]}"#]);
    assert_eq!(worker_of(spin), "workflow-1");
    let nap = submit(&c, &[r#"{"command": ["sleep", "30"]}"#]);
    assert_eq!(worker_of(nap), "workflow-2");
    // Both half full and given one each: once the samples show the spinner, the next
    // goes to the one whose task sleeps, not to the lower id.
    wait_until("workflow-1's CPU sampled", Duration::from_secs(10), || {
        let st = c.status_json();
        st["tasks"]["workers"].as_array().is_some_and(|ws| {
            ws.iter().any(|w| {
                w["worker"] == "workflow-1" && w["cpu_percent"].as_f64().unwrap_or(0.0) > 30.0
            })
        })
    });
    let third = submit(&c, &[r#"{"command": ["sleep", "30"]}"#]);
    assert_eq!(
        worker_of(third),
        "workflow-2",
        "{}",
        c.status_json()["tasks"]
    );
    let out = c.nexus(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("%cpu"), "{text}");
    for id in [spin, nap, third] {
        let out = c.nexus(&["task", "cancel", &id.to_string()]);
        assert!(out.status.success(), "{}", common::text(&out));
    }
}

#[test]
fn a_task_writing_hundreds_of_megabytes_has_its_log_and_result_cut_at_the_bounds() {
    let c = Cluster::new(CONFIG);
    c.start();
    // 256 MiB on stdout and 64 MiB on stderr: the program is never blocked by the cut
    // (the worker goes on reading), and what is kept stays bounded.
    let id = submit(
        &c,
        &[
            r#"{"command": ["sh", "-c", "head -c 268435456 /dev/zero | tr '\\0' x; head -c 67108864 /dev/zero >&2"]}"#,
            "--timeout-ms",
            "120000",
        ],
    );
    let t = wait_state(&c, id, "succeeded", Duration::from_secs(120));
    let result = t["result"].as_str().expect("a string result");
    assert_eq!(
        result.len(),
        64 * 1024,
        "the result is stdout's first 64 KiB"
    );
    assert!(result.bytes().all(|b| b == b'x'));
    let log = std::path::PathBuf::from(t["log"].as_str().unwrap());
    let size = std::fs::metadata(&log).unwrap().len();
    assert!(
        size <= (4 << 20) + 4096,
        "the log is cut at 4 MiB, not {size} bytes"
    );
    let out = c.nexus(&["task", "logs", &id.to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    let tail =
        String::from_utf8_lossy(&out.stdout[out.stdout.len().saturating_sub(200)..]).into_owned();
    assert!(
        tail.contains("[nexus: the log is cut at 4194304 bytes]"),
        "{tail}"
    );
}

/// A tmpfs of 1 MiB mounted for the test, unmounted when it ends (root only).
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(at: &std::path::Path) -> Option<SmallDisk> {
        std::fs::create_dir_all(at).ok()?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(at)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| SmallDisk(at.to_path_buf()))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn a_full_or_locked_database_fails_submits_by_name_and_recovers_by_itself() {
    let dir = tempfile::Builder::new().prefix("nxdisk").tempdir().unwrap();
    let state = dir.path().join("state");
    let Some(_disk) = SmallDisk::mount(&state) else {
        eprintln!("cannot mount a small tmpfs (not root?): the full-disk case is skipped");
        return;
    };
    let mut cfg: Value = serde_json::from_str(CONFIG).unwrap();
    cfg["state_dir"] = Value::String(state.display().to_string());
    // Declared after the disk: stopped before it is unmounted.
    let c = Cluster::new(&cfg.to_string());
    c.start();
    let first = submit(&c, &[r#"{"command": ["true"]}"#, "--wait"]);
    assert_eq!(task(&c, first)["state"], "succeeded");
    // Full: every submit fails naming the file and the cause; the cluster goes on.
    let filler = state.join("filler");
    let _ = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=64k"])
        .arg(format!("of={}", filler.display()))
        .stderr(std::process::Stdio::null())
        .status();
    let db = state.join("tasks.db").display().to_string();
    for _ in 0..2 {
        let out = c.nexus(&["task", "submit", r#"{"command": ["true"]}"#]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("the task queue is unavailable")
                && err.contains(&db)
                && err.contains("full"),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    assert!(c.nexus(&["health"]).status.code().is_some_and(|c| c <= 1));
    std::fs::remove_file(&filler).unwrap();
    let mut again = 0;
    wait_until(
        "the queue back after the disk",
        Duration::from_secs(10),
        || {
            let out = c.nexus(&["task", "submit", r#"{"command": ["true"]}"#, "--wait"]);
            if out.status.success() {
                again = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
            }
            out.status.success()
        },
    );
    assert_eq!(task(&c, again)["state"], "succeeded");
    // Locked by another process past the busy timeout (5 s): the same, then back.
    let holder = rusqlite::Connection::open(state.join("tasks.db")).unwrap();
    holder.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let out = c.nexus(&["task", "submit", r#"{"command": ["true"]}"#]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&db) && err.contains("locked"), "{err}");
    drop(holder);
    wait_until(
        "the queue back after the lock",
        Duration::from_secs(10),
        || {
            c.nexus(&["task", "submit", r#"{"command": ["true"]}"#, "--wait"])
                .status
                .success()
        },
    );
    // Nothing acknowledged was lost.
    assert_eq!(task(&c, first)["state"], "succeeded");
    assert_eq!(task(&c, again)["state"], "succeeded");
}

/// The CA of the test server's certificate (`scripts/pg-tls-setup`); in CI always set.
fn pg_ca() -> Option<String> {
    match std::env::var("NEXUS_TEST_PG_CA") {
        Ok(ca) => Some(ca),
        Err(_) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI tests the queue's TLS: set NEXUS_TEST_PG_CA (scripts/pg-tls-setup)"
            );
            eprintln!("NEXUS_TEST_PG_CA is not set: the TLS test is skipped");
            None
        }
    }
}

#[test]
fn a_queue_over_tls_verifies_the_server_s_certificate() {
    let Some(db) = pg::TempDb::create() else {
        return;
    };
    let Some(ca) = pg_ca() else {
        return;
    };
    // Trusting the server's CA: the queue works, and its connections are encrypted.
    let url = format!("{}?sslmode=verify-full&sslrootcert={ca}", db.url);
    let c = Cluster::new(&with_queue(CONFIG, &url));
    c.start();
    let id = submit(&c, &[r#"{"command": ["echo", "over TLS"]}"#, "--wait"]);
    assert_eq!(task(&c, id)["result"], "over TLS");
    let mut admin = postgres::Client::connect(&db.url, postgres::NoTls).unwrap();
    let name = db.url.rsplit('/').next().unwrap().to_string();
    let row = admin
        .query_one(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FROM pg_stat_activity a \
             JOIN pg_stat_ssl s USING (pid) WHERE a.datname = $1 AND a.application_name = 'nexus'",
            &[&name],
        )
        .unwrap();
    let (encrypted, all): (i64, i64) = (row.get(0), row.get(1));
    assert!(
        all > 0 && encrypted == all,
        "{encrypted} of {all} connections use TLS"
    );
    drop(c);
    // Not trusting it (the system's roots only): refused by name, not spoken to in clear.
    let c = Cluster::new(&with_queue(CONFIG, &format!("{}?sslmode=require", db.url)));
    c.start();
    let out = c.nexus(&["task", "submit", r#"{"command": ["true"]}"#]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("certificate") && err.contains("sslrootcert=FILE"),
        "{err}"
    );
    assert!(
        !err.contains(":nexus@") && err.lines().count() == 1,
        "{err}"
    );
    // A CA file that is not one: the config is refused as it loads.
    let bad = c.path().join("not-a-ca.pem");
    std::fs::write(&bad, "nothing\n").unwrap();
    let c2 = Cluster::new(&with_queue(
        CONFIG,
        &format!(
            "{}?sslmode=verify-full&sslrootcert={}",
            db.url,
            bad.display()
        ),
    ));
    let out = c2.nexus(&["start"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("no PEM certificate"), "{}", text(&out));
}
