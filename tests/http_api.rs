//! The HTTP API against a real cluster: its own daemon, keys and scopes, the Host and
//! Origin checks, status/health/metrics as the CLI gives them, the ledger as SSE with
//! resume, a busy port, TLS, reload, and bad input that changes nothing.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::http::{Api, SseStream, parse, raw};
use common::*;
use serde_json::Value;

fn config(port: u16) -> String {
    format!(
        r#"{{"interval_ms": 100, "timeout_ms": 1000, "stop_grace_ms": 1000, "http": {{"listen": "127.0.0.1:{port}"}}}}"#
    )
}

fn key(c: &Cluster, name: &str, scope: &str) -> String {
    let out = c.nexus(&["api-key", "create", "--name", name, "--scope", scope]);
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn started(port: u16) -> Cluster {
    let c = Cluster::new(&config(port));
    let out = c.start();
    let said = text(&out);
    assert!(
        said.contains(&format!("API and dashboard at http://127.0.0.1:{port}/ "))
            && said.contains("api-key create"),
        "start names the URL and how to get a key: {said}"
    );
    c
}

#[test]
fn status_health_and_metrics_need_a_key_and_match_the_cli() {
    let port = free_port();
    let c = started(port);
    assert_eq!(c.count("http"), 1, "the API runs in a daemon of its own");
    let read = key(&c, "viewer", "read");
    let api = Api::new(port, Some(&read));

    let status = api.get("/api/v1/status");
    assert_eq!(status.status, 200, "{}", status.text());
    assert_eq!(status.header("content-type"), Some("application/json"));
    let from_api = status.json();
    let from_cli = c.status_json();
    let keys = |v: &Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(keys(&from_api), keys(&from_cli), "the status --json schema");
    assert_eq!(from_api["schema"], 2);
    assert_eq!(from_api["daemons"].as_array().unwrap().len(), 11);
    assert_eq!(from_api["http"]["serving"], true);
    assert_eq!(
        from_api["http"]["url"],
        format!("http://127.0.0.1:{port}").as_str()
    );

    let health = api.get("/api/v1/health");
    assert_eq!(health.status, 200);
    assert_eq!(health.json()["health"], "HEALTHY");

    let metrics = api.get("/metrics");
    assert_eq!(metrics.status, 200);
    assert!(
        metrics
            .header("content-type")
            .is_some_and(|t| t.starts_with("text/plain; version=0.0.4")),
        "{:?}",
        metrics.headers
    );
    let m = metrics.text();
    assert!(m.contains("nexus_up 1"), "{m}");
    assert!(m.contains("role=\"http\""), "{m}");
    assert!(m.contains("nexus_http_requests_total"), "{m}");

    let head = api.send("HEAD", "/api/v1/health", &[], b"");
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());

    // No key, a wrong key, a malformed header: 401, with the scheme to use.
    for auth in [
        None,
        Some("Bearer nxk_0000000000000000000000000000000000000000000000000000000000000000"),
        Some("Basic dXNlcjpwYXNz"),
        Some("Bearer"),
    ] {
        let mut headers = vec![];
        if let Some(a) = auth {
            headers.push(("Authorization", a));
        }
        let r = Api::new(port, None).send("GET", "/api/v1/status", &headers, b"");
        assert_eq!(r.status, 401, "{auth:?}: {}", r.text());
        assert_eq!(r.header("www-authenticate"), Some("Bearer realm=\"nexus\""));
        assert!(!r.text().contains("daemons"), "nothing leaks");
    }
    // Unknown paths and wrong methods, with a key.
    for path in [
        "/api/v1/nope",
        "/api/v1/../../etc/passwd",
        "/api/v1/status/",
    ] {
        assert_eq!(api.get(path).status, 404, "{path}");
    }
    let r = api.send("DELETE", "/api/v1/status", &[], b"");
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, HEAD"));

    // DNS rebinding: a name that is not ours.
    let r = api.send(
        "GET",
        "/api/v1/status",
        &[("Host", "rebind.example:80")],
        b"",
    );
    assert_eq!(r.status, 400, "{}", r.text());
    let r = api.send(
        "GET",
        "/api/v1/status",
        &[("Host", &format!("localhost:{port}"))],
        b"",
    );
    assert_eq!(r.status, 200, "localhost is us on loopback");
    // A page of another site calling us from a browser.
    let r = api.send(
        "GET",
        "/api/v1/status",
        &[("Origin", "http://evil.example")],
        b"",
    );
    assert_eq!(r.status, 403);
    assert!(r.header("access-control-allow-origin").is_none(), "no CORS");

    // Revoked: refused from the next request on, with no signal to anybody.
    let out = c.nexus(&["api-key", "revoke", "viewer"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(api.get("/api/v1/status").status, 401);
}

/// A client address of its own on loopback, so the rate limit it earns is its own.
fn from(src: [u8; 4], to: SocketAddr, request: &str) -> Vec<u8> {
    let sock = socket2_connect(src, to);
    let mut s = sock;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

/// Binds the client side to `src` before connecting (std has no bind-then-connect).
fn socket2_connect(src: [u8; 4], to: SocketAddr) -> TcpStream {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket calls on a fresh fd that we own from here on.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let mut a: libc::sockaddr_in = std::mem::zeroed();
        a.sin_family = libc::AF_INET as u16;
        a.sin_addr.s_addr = u32::from_ne_bytes(src);
        assert_eq!(
            libc::bind(
                fd,
                &a as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_in>() as u32
            ),
            0
        );
        let SocketAddr::V4(to4) = to else { panic!() };
        let mut b: libc::sockaddr_in = std::mem::zeroed();
        b.sin_family = libc::AF_INET as u16;
        b.sin_port = to4.port().to_be();
        b.sin_addr.s_addr = u32::from_ne_bytes(to4.ip().octets());
        assert_eq!(
            libc::connect(
                fd,
                &b as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_in>() as u32
            ),
            0
        );
        TcpStream::from_raw_fd(fd)
    }
}

#[test]
fn wrong_keys_are_rate_limited_per_address_and_bad_input_changes_nothing() {
    let port = free_port();
    let c = started(port);
    let good = key(&c, "ops", "control");
    let api = Api::new(port, Some(&good));
    let addr = api.addr;
    let bad = |src: [u8; 4]| {
        let req = format!(
            "GET /api/v1/status HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer nxk_wrong\r\nConnection: close\r\n\r\n"
        );
        parse(&from(src, addr, &req)).unwrap().status
    };
    let mut codes = Vec::new();
    for _ in 0..25 {
        codes.push(bad([127, 0, 0, 2]));
    }
    assert_eq!(codes[0], 401);
    assert_eq!(*codes.last().unwrap(), 429, "{codes:?}");
    let req = format!(
        "GET /api/v1/health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {good}\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(
        parse(&from([127, 0, 0, 2], addr, &req)).unwrap().status,
        429,
        "the guessing address is held off, even with a good key"
    );
    assert_eq!(api.get("/api/v1/health").status, 200, "others are served");

    // Garbage, a huge head, a request line with a raw control byte: 4xx, never a crash.
    let garbage = raw(
        addr,
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n",
    );
    assert!(
        garbage.is_empty() || parse(&garbage).is_ok_and(|r| r.status == 400),
        "{:?}",
        String::from_utf8_lossy(&garbage)
    );
    let huge = format!(
        "GET /api/v1/status HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let r = raw(addr, huge.as_bytes());
    let code = parse(&r).map(|r| r.status).unwrap_or(0);
    assert!(
        code == 431 || code == 400 || r.is_empty(),
        "huge head: {code}"
    );
    let many: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
    let r = raw(
        addr,
        format!("GET /api/v1/status HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{many}\r\n").as_bytes(),
    );
    let code = parse(&r).map(|r| r.status).unwrap_or(0);
    assert!(
        code == 431 || code == 400 || r.is_empty(),
        "200 headers: {code}"
    );
    // Header injection: an encoded CR LF in a query stays data; a raw one ends the line.
    let r = api.get("/api/v1/events?follow=0&event=x%0d%0aX-Injected:%201");
    assert_eq!(r.status, 200);
    assert!(r.header("x-injected").is_none(), "{:?}", r.headers);
    let r = raw(
        addr,
        format!(
            "GET /api/v1/health?a=1\r\nX-Injected: 1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n"
        )
        .as_bytes(),
    );
    assert!(parse(&r).is_ok_and(|r| r.status == 400) || r.is_empty());
    let r = raw(addr, b"GET /api/v1/st\x01atus HTTP/1.1\r\n\r\n");
    assert!(parse(&r).is_ok_and(|r| r.status == 400) || r.is_empty());

    // A held connection that sends half a head is dropped, and meanwhile others are served.
    let mut held = TcpStream::connect(addr).unwrap();
    held.write_all(b"GET /api/v1/status HTTP/1.1\r\nHost: 1")
        .unwrap();
    held.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let t0 = Instant::now();
    assert_eq!(api.get("/api/v1/health").status, 200);
    let mut buf = Vec::new();
    let _ = held.read_to_end(&mut buf);
    let waited = t0.elapsed();
    assert!(
        waited < Duration::from_secs(25),
        "a held connection is closed: after {waited:?}"
    );

    // Past the connection limit: 503 at once, and served again once they are gone.
    let mut open = Vec::new();
    for _ in 0..520 {
        let s = TcpStream::connect(addr).unwrap();
        open.push(s);
    }
    let over = raw(
        addr,
        format!("GET /api/v1/health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n").as_bytes(),
    );
    assert_eq!(parse(&over).map(|r| r.status).unwrap_or(0), 503);
    drop(open);
    wait_until(
        "served again after the flood",
        Duration::from_secs(10),
        || api.get("/api/v1/health").status == 200,
    );

    // Through all of it the daemon never died.
    let http_pid = c.pid_of("http", 1).unwrap();
    assert_eq!(
        c.status_json()["daemons"][10]["restarts"],
        0,
        "pid {http_pid}"
    );
}

#[test]
fn the_ledger_streams_live_and_resumes_after_the_last_event_id() {
    let port = free_port();
    let c = started(port);
    let k = key(&c, "viewer", "read");
    let api = Api::new(port, Some(&k));
    let mut live = SseStream::open(&api, "/api/v1/events?n=0", &[]);
    assert_eq!(live.status, 200);
    let victim = c.pid_of("workflow", 2).unwrap();
    signal(victim, libc::SIGKILL);
    let t0 = Instant::now();
    let seen = live
        .until(Duration::from_secs(10), |e| {
            e.event == "ledger"
                && e.data.contains("\"respawned\"")
                && e.data.contains(&format!("\"old_pid\":{victim}"))
        })
        .expect("the respawn arrives on the stream");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "live: {:?}",
        t0.elapsed()
    );
    let ev: Value = serde_json::from_str(&seen.data).unwrap();
    assert_eq!(ev["role"], "workflow");

    // Everything up to now, then resume after the first event: exactly the rest.
    let mut all = SseStream::open(&api, "/api/v1/events?n=100000&follow=0", &[]);
    let mut ids = Vec::new();
    while let Some(e) = all.next(Duration::from_secs(5)) {
        if e.event == "ledger" {
            ids.push((e.id.clone().unwrap(), e.data));
        }
    }
    assert!(ids.len() >= 3, "{ids:?}");
    let mut resumed = SseStream::open(
        &api,
        "/api/v1/events?follow=0",
        &[("Last-Event-ID", &ids[0].0)],
    );
    let mut rest = Vec::new();
    while let Some(e) = resumed.next(Duration::from_secs(5)) {
        if e.event == "ledger" {
            rest.push(e.data);
        }
    }
    let want: Vec<String> = ids[1..].iter().map(|(_, d)| d.clone()).collect();
    assert_eq!(
        rest[..want.len()],
        want[..],
        "resume gives what followed, in order"
    );

    // One type only; a garbage Last-Event-ID starts from the tail instead.
    let mut only = SseStream::open(&api, "/api/v1/events?n=1000&follow=0&event=respawned", &[]);
    let mut n = 0;
    while let Some(e) = only.next(Duration::from_secs(5)) {
        if e.event == "ledger" {
            assert!(e.data.contains("\"respawned\""), "{}", e.data);
            n += 1;
        }
    }
    assert!(n >= 1);
    let r = api.get("/api/v1/events?n=lots");
    assert_eq!(r.status, 400);
}

#[test]
fn a_busy_port_names_its_holder_and_the_cluster_runs_degraded_until_it_frees() {
    let holder = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let c = Cluster::new(&config(port));
    let out = c.start();
    let said = text(&out);
    let me = std::process::id();
    assert!(
        said.contains(&format!("127.0.0.1:{port} is in use by pid {me}")),
        "names the holder: {said}"
    );
    let h = c.nexus(&["health"]);
    assert_eq!(h.status.code(), Some(1), "{}", text(&h));
    assert!(
        text(&h).contains("the HTTP API is not serving"),
        "{}",
        text(&h)
    );
    assert_eq!(c.count("workflow"), 5, "the rest of the cluster runs");
    drop(holder);
    let k = key(&c, "viewer", "read");
    let api = Api::new(port, Some(&k));
    wait_until(
        "serving once the port is free",
        Duration::from_secs(10),
        || TcpStream::connect(api.addr).is_ok() && api.get("/api/v1/health").status == 200,
    );
    wait_until("healthy again", Duration::from_secs(5), || {
        c.nexus(&["health"]).status.success()
    });
}

#[test]
fn the_http_daemon_is_supervised_like_any_other_and_follows_reload() {
    let port = free_port();
    let c = started(port);
    let k = key(&c, "viewer", "read");
    let old = c.pid_of("http", 1).unwrap();
    signal(old, libc::SIGKILL);
    let new = c.wait_replaced("http", 1, old);
    let api = Api::new(port, Some(&k));
    wait_until("the replacement serves", Duration::from_secs(10), || {
        TcpStream::connect(api.addr).is_ok() && api.get("/api/v1/health").status == 200
    });
    // Hung: replaced after the timeout, as any daemon.
    signal(new, libc::SIGSTOP);
    let third = c.wait_replaced("http", 1, new);
    assert_ne!(third, new);

    // Moved to another port by a reload; then removed.
    let port2 = free_port();
    c.set_config(&config(port2));
    let out = c.nexus(&["reload"]);
    assert!(out.status.success(), "{}", text(&out));
    let api2 = Api::new(port2, Some(&k));
    wait_until("serving on the new port", Duration::from_secs(10), || {
        TcpStream::connect(api2.addr).is_ok() && api2.get("/api/v1/health").status == 200
    });
    wait_until("the old port closed", Duration::from_secs(10), || {
        TcpStream::connect(api.addr).is_err()
    });
    c.set_config(FAST);
    let out = c.nexus(&["reload"]);
    assert!(out.status.success(), "{}", text(&out));
    wait_until("the http daemon retired", Duration::from_secs(10), || {
        c.count("http") == 0
    });
    c.wait_whole(10, Duration::from_secs(10));
}

#[test]
fn a_non_loopback_listen_needs_tls_and_serves_it() {
    // Refused before anything starts.
    let c = Cluster::new(r#"{"http": {"listen": "0.0.0.0:9999"}}"#);
    let out = c.nexus(&["start"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("tls_cert"), "{}", text(&out));
    assert!(c.daemons().is_empty());

    // A self-signed pair for 127.0.0.1, served on every address.
    let tmp = c.path();
    let (cert, key_file) = (tmp.join("cert.pem"), tmp.join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "2", "-subj", "/CN=nexus-test"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key_file)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    assert!(made.status.success(), "{}", text(&made));
    std::fs::set_permissions(
        &key_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let port = free_port();
    let cfg = format!(
        r#"{{"interval_ms": 100, "timeout_ms": 1000, "http": {{"listen": "0.0.0.0:{port}", "tls_cert": "{}", "tls_key": "{}"}}}}"#,
        cert.display(),
        key_file.display()
    );
    c.set_config(&cfg);
    let out = c.nexus(&["start"]);
    assert!(
        !out.status.success(),
        "a key file others can read is refused"
    );
    assert!(text(&out).contains("chmod 600"), "{}", text(&out));
    std::fs::set_permissions(
        &key_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let out = c.start();
    assert!(
        text(&out).contains(&format!("https://127.0.0.1:{port}/ ")),
        "{}",
        text(&out)
    );
    let k = key(&c, "viewer", "read");
    let curl = |scheme: &str| {
        std::process::Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "5",
            ])
            .arg("--cacert")
            .arg(&cert)
            .args(["-H", &format!("Authorization: Bearer {k}")])
            .arg(format!("{scheme}://127.0.0.1:{port}/api/v1/health"))
            .output()
            .expect("curl")
    };
    let ok = curl("https");
    assert_eq!(String::from_utf8_lossy(&ok.stdout), "200", "{}", text(&ok));
    let plain = curl("http");
    assert_ne!(
        String::from_utf8_lossy(&plain.stdout),
        "200",
        "no clear text on a TLS port"
    );
}
