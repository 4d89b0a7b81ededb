//! Services: the workflows run the user's programs — dependency order, readiness,
//! restarts and backoff, hangs, the process tree, the user's stop and start.

mod common;

use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(20);

fn config(services: &str, workflows: u32) -> String {
    format!(
        r#"{{"interval_ms": 100, "timeout_ms": 1000, "stop_grace_ms": 1000, "workflows": {workflows},
            "backoff_initial_ms": 50, "backoff_max_ms": 1000, "restart_intensity": 5,
            "services": [{services}]}}"#
    )
}

#[test]
fn start_follows_dependency_order_and_returns_once_every_service_is_ready() {
    let port = free_port();
    let c = Cluster::new(&config(
        &format!(
            r#"{{"name": "web", "command": {}, "ready": {{"http": "http://127.0.0.1:{port}/", "period_ms": 20}}}},
               {{"name": "worker", "shell": "echo working; exec sleep 1000", "depends_on": {{"web": "ready", "job": "completed"}}}},
               {{"name": "job", "shell": "echo job done", "restart": "never"}}"#,
            http_server(port)
        ),
        4,
    ));
    let out = c.start();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("worker-1 ready") && said.contains("job-1 completed"),
        "{said}"
    );
    // The web server answers: start waited for its readiness.
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    let events = c.events();
    let at = |service: &str, kind: &str| {
        events
            .iter()
            .position(|e| e["service"] == service && e["event"] == kind)
            .unwrap_or_else(|| panic!("no {kind} of {service} in {events:?}"))
    };
    assert!(
        at("web", "ready") < at("worker", "started"),
        "worker waited for web"
    );
    assert!(
        at("job", "exited") < at("worker", "started"),
        "worker waited for job to complete"
    );
    assert_eq!(c.state_of("job-1"), "completed");
    assert!(c.log_text("worker-1").contains(" worker-1 out working"));
    let status = c.status_json();
    assert_eq!(status["schema"], 2);
    let services = status["services"].as_array().unwrap();
    assert_eq!(services.len(), 3);
    for s in services {
        for key in [
            "name",
            "instance",
            "workflow",
            "pid",
            "state",
            "uptime_s",
            "restarts",
            "last_exit",
            "last_cause",
            "cpu_percent",
            "rss_kib",
        ] {
            assert!(s.get(key).is_some(), "{key} in {s}");
        }
    }
    assert!(
        services[0]["rss_kib"].as_u64().unwrap() > 1000,
        "python's tree"
    );
    // ./stop leaves nothing of the stack behind.
    let out = c.nexus(&["stop"]);
    assert!(out.status.success(), "{}", text(&out));
    wait_until("nothing left", Duration::from_secs(5), || {
        marked(c.path()).is_empty()
    });
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[test]
fn a_service_that_cannot_become_ready_fails_start_with_its_error_last_exit_and_log() {
    let c = Cluster::new(&config(
        r#"{"name": "broken", "shell": "echo starting up; echo cannot open /etc/broken.conf >&2; exit 3"}"#,
        2,
    ));
    let out = c.nexus(&["start"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "broken-1",
        "crash-looping",
        "exit status 3",
        "cannot open /etc/broken.conf",
    ] {
        assert!(err.contains(needle), "{needle:?} in {err}");
    }
    assert!(c.daemons().is_empty(), "start stopped what it started");
    assert!(marked(c.path()).is_empty(), "and the programs");

    // A program that cannot be executed at all: the errno, at once.
    let c = Cluster::new(&config(
        r#"{"name": "ghost", "command": ["/nonexistent/program"]}"#,
        1,
    ));
    let out = c.nexus(&["start"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ghost-1") && err.contains("ENOENT"), "{err}");
}

#[test]
fn a_program_that_cannot_be_executed_is_failed_with_backoff_never_a_tight_loop() {
    let c = Cluster::new(&config(
        r#"{"name": "app", "command": ["true"]}, {"name": "nothere", "command": ["no-such-program-anywhere"], "critical": false}"#,
        2,
    ));
    let bg = c.start_background(&[]);
    wait_until("nothere failed", T, || c.state_of("nothere-1") == "failed");
    let failures = |c: &Cluster| {
        c.service_events("nothere", 1)
            .iter()
            .filter(|e| e["event"] == "failed")
            .count()
    };
    let before = failures(&c);
    std::thread::sleep(Duration::from_millis(1000));
    let after = failures(&c);
    assert!(
        after <= before + 5,
        "backoff, not a tight loop: {before} -> {after}"
    );
    let rec = c.record("nothere-1").unwrap();
    assert!(
        rec["machine"]["last_error"]
            .as_str()
            .unwrap()
            .contains("ENOENT"),
        "{rec}"
    );
    let ev = c.service_events("nothere", 1);
    assert!(
        ev.iter().any(|e| e["event"] == "failed"
            && e["detail"].as_str().is_some_and(|d| d.contains("ENOENT")))
    );
    drop(bg);
}

#[test]
fn a_crash_is_restarted_at_once_and_a_crash_loop_is_failed_visibly_and_retried() {
    let c = Cluster::new(&config(
        r#"{"name": "app", "command": ["sleep", "1000"]},
           {"name": "flaky", "shell": "sleep 0.05; exit 7", "critical": false}"#,
        2,
    ));
    let bg = c.start_background(&[]);
    c.wait_state("app-1", "ready", T);
    let old = c.program_pid("app-1").unwrap();
    signal(old, libc::SIGKILL);
    let new = c.wait_program_replaced("app-1", old, T);
    let ev = c.service_events("app", 1);
    let respawned: Vec<_> = ev
        .iter()
        .filter(|e| e["event"] == "respawned" && e["old_pid"] == old)
        .collect();
    assert_eq!(respawned.len(), 1, "exactly one restart: {ev:?}");
    assert_eq!(respawned[0]["cause"], "crash");
    assert_eq!(respawned[0]["pid"], new);
    wait_until("the exit is recorded with its signal", T, || {
        c.service_events("app", 1)
            .iter()
            .any(|e| e["event"] == "exited" && e["pid"] == old && e["signal"] == 9)
    });

    // A crash loop: backoff, then failed past the intensity, and retried at the cap.
    wait_until("flaky failed", T, || c.state_of("flaky-1") == "failed");
    let rec = c.record("flaky-1").unwrap();
    assert!(rec["machine"]["restarts"].as_u64().unwrap() >= 5, "{rec}");
    assert_eq!(rec["machine"]["last_exit"]["code"], 7);
    let starts = |c: &Cluster| {
        c.service_events("flaky", 1)
            .iter()
            .filter(|e| e["event"] == "respawned")
            .count()
    };
    let n = starts(&c);
    wait_until("retried at the cap", T, || starts(&c) > n);
    let health = c.nexus(&["health"]);
    assert_eq!(
        health.status.code(),
        Some(1),
        "a non-critical failure: DEGRADED: {}",
        text(&health)
    );
    drop(bg);
}

#[test]
fn restart_policies_on_failure_and_never() {
    let c = Cluster::new(&config(
        r#"{"name": "clean", "shell": "exit 0", "restart": "on-failure"},
           {"name": "dirty", "shell": "sleep 0.2; exit 2", "restart": "on-failure", "critical": false},
           {"name": "once", "shell": "exit 5", "restart": "never", "critical": false},
           {"name": "hold", "command": ["sleep", "1000"]}"#,
        4,
    ));
    let bg = c.start_background(&[]);
    c.wait_state("clean-1", "completed", T);
    c.wait_state("once-1", "failed", T);
    wait_until("dirty restarted", T, || {
        c.record("dirty-1")
            .is_some_and(|r| r["machine"]["restarts"].as_u64().unwrap_or(0) >= 1)
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(c.state_of("once-1"), "failed", "never restarted");
    assert_eq!(c.record("once-1").unwrap()["machine"]["restarts"], 0);
    drop(bg);
}

#[test]
fn hangs_are_killed_with_their_tree_and_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("healthy");
    std::fs::write(&flag, "").unwrap();
    let c = Cluster::new(&config(
        &format!(
            r#"{{"name": "probed", "command": ["sleep", "1000"],
                 "liveness": {{"exec": ["test", "-e", "{}"], "period_ms": 100, "failures": 3, "initial_delay_ms": 300}}}},
               {{"name": "stopped", "command": ["sleep", "1000"]}},
               {{"name": "dog", "command": ["python3", "-c", "import os,socket,time\na=os.environ['NOTIFY_SOCKET']\na='\\0'+a[1:] if a[0]=='@' else a\ns=socket.socket(socket.AF_UNIX,socket.SOCK_DGRAM)\ns.sendto(b'READY=1',a)\nfor i in range(8):\n  s.sendto(b'WATCHDOG=1',a); time.sleep(0.1)\ntime.sleep(1000)"],
                 "ready": "notify", "watchdog_ms": 400}}"#,
            flag.display()
        ),
        3,
    ));
    let bg = c.start_background(&[]);
    for inst in ["probed-1", "stopped-1", "dog-1"] {
        c.wait_state(inst, "ready", T);
    }
    // Liveness failing three times in a row.
    let probed = c.program_pid("probed-1").unwrap();
    let t0 = Instant::now();
    std::fs::remove_file(&flag).unwrap();
    wait_until("probed unhealthy", T, || {
        c.state_of("probed-1") == "unhealthy"
    });
    wait_until("probed replaced", T, || {
        c.program_pid("probed-1").is_some_and(|p| p != probed)
    });
    std::fs::write(&flag, "").unwrap();
    let new = c.wait_program_replaced("probed-1", probed, T);
    assert!(t0.elapsed() < Duration::from_secs(5));
    let ev = c.service_events("probed", 1);
    assert!(ev.iter().any(|e| e["event"] == "unhealthy"), "{ev:?}");
    assert!(
        ev.iter().any(|e| e["event"] == "respawned"
            && e["old_pid"] == probed
            && e["cause"] == "hang"
            && e["pid"] == new),
        "{ev:?}"
    );
    // SIGSTOP without a probe: stopped for the cluster's timeout is a hang.
    let stopped = c.program_pid("stopped-1").unwrap();
    signal(stopped, libc::SIGSTOP);
    c.wait_program_replaced("stopped-1", stopped, T);
    assert!(gone(stopped), "the stopped program was killed");
    let ev = c.service_events("stopped", 1);
    assert!(
        ev.iter().any(|e| e["event"] == "killed"
            && e["detail"].as_str().is_some_and(|d| d.contains("SIGSTOP")))
    );
    // sd_notify WATCHDOG=1 stops coming: watchdog_ms of silence is a hang. (It may be
    // between a kill and its replacement by now: wait for a running one.)
    wait_until("dog runs", T, || c.program_pid("dog-1").is_some());
    let dog = c.program_pid("dog-1").unwrap();
    c.wait_program_replaced("dog-1", dog, T);
    let ev = c.service_events("dog", 1);
    assert!(
        ev.iter().any(|e| e["event"] == "killed"
            && e["detail"].as_str().is_some_and(|d| d.contains("WATCHDOG"))),
        "{ev:?}"
    );
    drop(bg);
}

#[test]
fn nothing_a_service_started_survives_its_restart_or_stop_even_double_forked() {
    // A sleep with a duration no other test uses, to find it by.
    let marker = format!("100000.{}", std::process::id());
    // The child detaches itself: a new session (setsid) and a dead parent.
    let c = Cluster::new(&config(
        &format!(
            r#"{{"name": "forker", "shell": "setsid sh -c 'sleep {marker}' & exec sleep 1000"}}"#
        ),
        1,
    ));
    let bg = c.start_background(&[]);
    c.wait_state("forker-1", "ready", T);
    wait_until("the orphan runs", T, || !pids_with_arg(&marker).is_empty());
    let orphan = pids_with_arg(&marker)[0];
    let out = c.nexus(&["service", "restart", "forker"]);
    assert!(out.status.success(), "{}", text(&out));
    wait_until("the first orphan is gone", T, || gone(orphan));
    wait_until("a new orphan runs", T, || {
        pids_with_arg(&marker).iter().any(|&p| p != orphan)
    });
    let out = c.nexus(&["service", "stop", "forker-1"]);
    assert!(out.status.success(), "{}", text(&out));
    wait_until("stop leaves nothing", T, || {
        pids_with_arg(&marker).is_empty()
    });
    assert_eq!(c.state_of("forker-1"), "stopped");
    // And ./stop after a start: nothing either.
    let out = c.nexus(&["service", "start", "forker"]);
    assert!(out.status.success(), "{}", text(&out));
    wait_until("runs again", T, || !pids_with_arg(&marker).is_empty());
    let out = c.nexus(&["stop"]);
    assert!(out.status.success(), "{}", text(&out));
    wait_until("./stop leaves nothing", T, || {
        pids_with_arg(&marker).is_empty()
    });
    drop(bg);
}

#[test]
fn readiness_by_notify_and_by_a_log_line_and_forged_datagrams_are_dropped() {
    let c = Cluster::new(&config(
        r#"{"name": "notifier", "command": ["python3", "-c", "import os,socket,time\na=os.environ['NOTIFY_SOCKET']\na='\\0'+a[1:] if a[0]=='@' else a\ntime.sleep(0.3)\ns=socket.socket(socket.AF_UNIX,socket.SOCK_DGRAM)\ns.sendto(b'STATUS=warming up',a)\ns.sendto(b'READY=1\\nSTATUS=serving',a)\ntime.sleep(1000)"],
            "ready": "notify"},
           {"name": "talker", "shell": "echo booting; sleep 0.3; echo listening on 8080; exec sleep 1000",
            "ready": {"log": "listening on [0-9]+"}}"#,
        2,
    ));
    let bg = c.start_background(&[]);
    // A stranger (this test) speaks on the notify socket before the program does.
    let sock = c.path().join("notify/notifier-1.sock");
    wait_until("notify socket bound", T, || sock.exists());
    let stranger = std::os::unix::net::UnixDatagram::unbound().unwrap();
    let _ = stranger.send_to(b"READY=1", &sock);
    let _ = stranger.send_to(b"\xff\xfe garbage", &sock);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        c.state_of("notifier-1"),
        "starting",
        "a forged READY=1 is not believed"
    );
    c.wait_state("notifier-1", "ready", T);
    c.wait_state("talker-1", "ready", T);
    let out = bg.finish(T);
    assert!(out.status.success(), "{}", text(&out));
    let rec = c.record("notifier-1").unwrap();
    assert_eq!(rec["status_text"], "serving");
    wait_until("rejections counted", T, || {
        std::fs::read_to_string(c.path().join("services/stats/notifier-1.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .is_some_and(|s| s["notify_rejected"].as_u64().unwrap_or(0) >= 2)
    });
    let talker = c.service_events("talker", 1);
    let started = talker.iter().find(|e| e["event"] == "started").unwrap();
    let ready = talker.iter().find(|e| e["event"] == "ready").unwrap();
    assert!(ready["ts"].as_str() > started["ts"].as_str());
}

#[test]
fn a_user_stop_stays_stopped_across_a_failover_and_a_reload_until_started() {
    let c = Cluster::new(&config(
        r#"{"name": "app", "command": ["sleep", "1000"]}, {"name": "other", "command": ["sleep", "1001"]}"#,
        2,
    ));
    c.start();
    let out = c.nexus(&["service", "stop", "app"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(c.state_of("app-1"), "stopped");
    assert!(c.program_pid("app-1").is_none());
    let health = c.nexus(&["health"]);
    assert_eq!(health.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&health.stdout).contains("stopped by the user"));
    // The master dies; the new one must not start it.
    signal(c.master_pid(), libc::SIGKILL);
    c.wait_whole(7, T);
    // The hosting workflow dies; its successor must not start it either.
    let wf = c.pid_of("workflow", 1).unwrap();
    signal(wf, libc::SIGKILL);
    c.wait_replaced("workflow", 1, wf);
    // A reload that changes another service.
    std::fs::write(
        &c.config,
        config(
            r#"{"name": "app", "command": ["sleep", "1000"]}, {"name": "other", "command": ["sleep", "1002"]}"#,
            2,
        ),
    )
    .unwrap();
    let out = c.nexus(&["reload"]);
    assert!(out.status.success(), "{}", text(&out));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(c.state_of("app-1"), "stopped");
    let out = c.nexus(&["service", "start", "app-1"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(c.state_of("app-1"), "ready");
    let bad = c.nexus(&["service", "stop", "nosuch"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("known: app, other"));
    let bad = c.nexus(&["service", "stop", "app-2"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("has 1 instance"));
}

#[test]
fn reload_restarts_only_the_changed_services_in_dependency_order() {
    let services = |a: &str, b: &str| {
        format!(
            r#"{{"name": "base", "shell": "echo base {a}; exec sleep 1000"}},
               {{"name": "mid", "shell": "echo mid {b}; exec sleep 1000", "depends_on": {{"base": "ready"}}}},
               {{"name": "calm", "command": ["sleep", "1000"]}}"#
        )
    };
    let c = Cluster::new(&config(&services("v1", "v1"), 3));
    c.start();
    let pid = |i: &str| c.program_pid(i).unwrap();
    let (base, mid, calm) = (pid("base-1"), pid("mid-1"), pid("calm-1"));
    std::fs::write(&c.config, config(&services("v2", "v2"), 3)).unwrap();
    let out = c.nexus(&["reload"]);
    assert!(out.status.success(), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("service base: definition changed"), "{said}");
    assert_ne!(pid("base-1"), base);
    assert_ne!(pid("mid-1"), mid);
    assert_eq!(pid("calm-1"), calm, "an unchanged service is left alone");
    let ev = c.events();
    let at = |s: &str, kind: &str| {
        ev.iter()
            .rposition(|e| e["service"] == s && e["event"] == kind)
            .unwrap()
    };
    assert!(
        at("base", "ready") < at("mid", "respawned"),
        "mid after base is back"
    );
    wait_until("mid's new output", T, || {
        c.log_text("mid-1").contains("mid v2")
    });
    // A restarted dependency does not restart its dependents.
    let mid = pid("mid-1");
    let out = c.nexus(&["service", "restart", "base"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(pid("mid-1"), mid);
}

#[test]
fn bad_service_configs_are_refused_with_every_error_before_anything_starts() {
    let c = Cluster::new(
        r#"{"workflows": 2, "services": [
            {"name": "web", "command": ["x"], "shell": "y"},
            {"name": "web", "command": ["x"]},
            {"name": "a", "command": ["x"], "depends_on": {"b": "ready"}},
            {"name": "b", "command": ["x"], "depends_on": {"a": "ready"}},
            {"name": "c", "command": ["x"], "depends_on": {"ghost": "started"}},
            {"name": "d", "command": [], "ready": {"http": "http://127.0.0.1:99999/"}},
            {"name": "e", "command": ["x"], "cwd": "/nonexistent/dir"}]}"#,
    );
    let out = c.nexus(&["start"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "service `web`: `command` and `shell` are both given",
        "the name is used twice",
        "a -> b -> a",
        "`depends_on.ghost`",
        "service `d`: `command` is an empty argv",
        "service `d`: `ready.http`",
    ] {
        assert!(err.contains(needle), "{needle:?} in\n{err}");
    }
    assert!(err.lines().count() >= 6, "every error at once:\n{err}");
    assert!(
        err.lines().all(|l| l.starts_with("nexus: config ")),
        "{err}"
    );
    assert!(c.daemons().is_empty());
    // Checks against the machine come after the syntax is right.
    let c = Cluster::new(
        r#"{"workflows": 1, "services": [{"name": "e", "command": ["x"], "cwd": "/nonexistent/dir"}]}"#,
    );
    let out = c.nexus(&["start"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("`cwd` /nonexistent/dir does not exist"),
        "{}",
        text(&out)
    );
    let c = Cluster::new(
        r#"{"workflows": 1, "services": [{"name": "a", "command": ["x"], "instances": 2}]}"#,
    );
    let out = c.nexus(&["start"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("`workflows` is 1"),
        "{}",
        text(&out)
    );
}

#[test]
fn secrets_in_env_are_never_printed() {
    let secret = "hunter2-do-not-print";
    let c = Cluster::new(&config(
        &format!(
            r#"{{"name": "app", "command": ["sleep", "1000"], "env": {{"DB_PASSWORD": "{secret}"}}}}"#
        ),
        1,
    ));
    c.start();
    for args in [
        vec!["status"],
        vec!["status", "--json"],
        vec!["metrics"],
        vec!["health", "--json"],
        vec!["logs", "-n", "1000"],
        vec!["events", "-n", "1000"],
    ] {
        let out = c.nexus(&args);
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!all.contains(secret), "{args:?} printed the secret");
    }
    std::fs::write(
        &c.config,
        config(r#"{"name": "app", "command": ["sleep", "1000"], "env": {"DB_PASSWORD": "changed-secret"}}"#, 1),
    )
    .unwrap();
    let out = c.nexus(&["reload"]);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{all}");
    assert!(
        !all.contains(secret) && !all.contains("changed-secret"),
        "{all}"
    );
}
