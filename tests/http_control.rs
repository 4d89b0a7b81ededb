//! The API's controls and the task queue through it, the logs as SSE, the dashboard's
//! session (cookie and CSRF token), and the OpenAPI document checked against the real
//! answers.

mod common;

use std::net::TcpStream;
use std::time::Duration;

use common::http::{Api, Resp, SseStream};
use common::*;
use serde_json::Value;

fn config(port: u16) -> String {
    format!(
        r#"{{"interval_ms": 100, "timeout_ms": 1000, "stop_grace_ms": 1000, "workflows": 4,
            "http": {{"listen": "127.0.0.1:{port}"}},
            "services": [
              {{"name": "db", "command": ["sh", "-c", "while :; do echo db-tick; sleep 0.2; done"]}},
              {{"name": "web", "command": ["sh", "-c", "while :; do echo web-tick; sleep 0.2; done"],
                "depends_on": {{"db": "started"}}, "env": {{"SECRET_TOKEN": "hunter2"}}}}
            ]}}"#
    )
}

fn key(c: &Cluster, name: &str, scope: &str) -> String {
    let out = c.nexus(&["api-key", "create", "--name", name, "--scope", scope]);
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn up() -> (Cluster, u16) {
    let port = free_port();
    let c = Cluster::new(&config(port));
    c.start();
    (c, port)
}

#[test]
fn controls_need_a_control_key_and_do_what_the_cli_does() {
    let (c, port) = up();
    let ro = Api::new(port, Some(&key(&c, "viewer", "read")));
    let rw = Api::new(port, Some(&key(&c, "ops", "control")));

    // Environment values never leave the server.
    for path in [
        "/api/v1/services",
        "/api/v1/status",
        "/api/v1/events?follow=0&n=1000",
    ] {
        let r = ro.get(path);
        assert_eq!(r.status, 200, "{path}");
        assert!(!r.text().contains("hunter2"), "{path} shows an env value");
    }
    assert_eq!(
        ro.get("/api/v1/services").json()["services"][1]["env"]["SECRET_TOKEN"],
        "[redacted]"
    );
    let r = ro.post("/api/v1/services/web/restart", "");
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.text().contains("scope read"), "{}", r.text());

    let before = c.program_pid("web-1").unwrap();
    let r = rw.post("/api/v1/services/web/restart", "");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json()["changes"][0].as_str().unwrap().contains("web-1"));
    wait_until("web-1 restarted", Duration::from_secs(10), || {
        c.program_pid("web-1").is_some_and(|p| p != before) && c.state_of("web-1") == "ready"
    });
    let r = rw.post("/api/v1/services/nope/stop", "");
    assert_eq!(r.status, 404, "{}", r.text());
    let r = rw.post("/api/v1/services/web/stop", "");
    assert_eq!(r.status, 200, "{}", r.text());
    wait_until("web-1 stopped", Duration::from_secs(10), || {
        c.state_of("web-1") == "stopped"
    });
    assert_eq!(rw.post("/api/v1/services/web/start", "").status, 200);
    wait_until("web-1 ready again", Duration::from_secs(10), || {
        c.state_of("web-1") == "ready"
    });

    let old = c.pid_of("workflow", 4).unwrap();
    let r = rw.post("/api/v1/daemons/workflow-4/restart", "");
    assert_eq!(r.status, 200, "{}", r.text());
    c.wait_replaced("workflow", 4, old);
    assert_eq!(
        rw.post("/api/v1/daemons/workflow-99/restart", "").status,
        404
    );
    assert_eq!(rw.post("/api/v1/daemons/bogus/restart", "").status, 404);

    let r = rw.post("/api/v1/scale", r#"{"workflow": 6}"#);
    assert_eq!(r.status, 200, "{}", r.text());
    wait_until("6 workflows", Duration::from_secs(10), || {
        c.count("workflow") == 6
    });
    for (bad, why) in [
        (r#"{"workflow": -1}"#, "count"),
        (r#"{"workflow": "many"}"#, "count"),
        (r#"{"gremlin": 3}"#, "gremlin"),
        (r#"{}"#, "counts"),
        (r#"[1]"#, "counts"),
        ("{not json", "JSON"),
        (r#"{"workflow": 100000}"#, "workflows"),
    ] {
        let r = rw.post("/api/v1/scale", bad);
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
        assert!(r.text().contains(why), "{bad}: {}", r.text());
    }
    let r = rw.send(
        "POST",
        "/api/v1/scale",
        &[("Content-Type", "text/plain")],
        b"{\"workflow\": 2}",
    );
    assert_eq!(r.status, 415, "a form cannot post here");
    let huge = format!("{{\"workflow\": 6, \"pad\": \"{}\"}}", "x".repeat(2 << 20));
    assert_eq!(rw.post("/api/v1/scale", &huge).status, 413);
    assert_eq!(c.count("workflow"), 6, "nothing changed by the bad ones");

    // A reload with a whole config: services scaled, a bad one refused.
    let mut cfg: Value = serde_json::from_str(&config(port)).unwrap();
    cfg["workflows"] = 6.into();
    cfg["state_dir"] = c.path().join("state").display().to_string().into();
    cfg["services"][0]["instances"] = 2.into();
    let r = rw.post("/api/v1/reload", &cfg.to_string());
    assert_eq!(r.status, 200, "{}", r.text());
    wait_until("db-2 ready", Duration::from_secs(10), || {
        c.state_of("db-2") == "ready"
    });
    cfg["timeout_ms"] = 10.into();
    let r = rw.post("/api/v1/reload", &cfg.to_string());
    assert_eq!(r.status, 400);
    assert!(r.text().contains("timeout_ms"), "{}", r.text());
}

#[test]
fn tasks_through_the_api() {
    let (c, port) = up();
    let rw = Api::new(port, Some(&key(&c, "ops", "control")));
    let ro = Api::new(port, Some(&key(&c, "viewer", "read")));
    let r = rw.post(
        "/api/v1/tasks?priority=5",
        r#"{"command": ["sh", "-c", "echo done"]}"#,
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_i64().unwrap();
    wait_until("task succeeded", Duration::from_secs(10), || {
        ro.get(&format!("/api/v1/tasks/{id}")).json()["state"] == "succeeded"
    });
    let t = ro.get(&format!("/api/v1/tasks/{id}")).json();
    assert_eq!(t["priority"], 5);
    let long = rw
        .post("/api/v1/tasks", r#"{"command": ["sleep", "600"]}"#)
        .json()["id"]
        .as_i64()
        .unwrap();
    wait_until("task running", Duration::from_secs(10), || {
        ro.get(&format!("/api/v1/tasks/{long}")).json()["state"] == "running"
    });
    let list = ro.get("/api/v1/tasks?state=running").json();
    assert_eq!(list["tasks"][0]["id"], long, "{list}");
    assert_eq!(
        ro.post(&format!("/api/v1/tasks/{long}/cancel"), "").status,
        403
    );
    let r = rw.post(&format!("/api/v1/tasks/{long}/cancel"), "");
    assert_eq!(r.status, 200, "{}", r.text());
    wait_until("cancelled", Duration::from_secs(10), || {
        ro.get(&format!("/api/v1/tasks/{long}")).json()["state"] == "cancelled"
    });
    assert_eq!(ro.get("/api/v1/tasks/999999").status, 404);
    assert_eq!(ro.get("/api/v1/tasks?state=bogus").status, 400);
    assert_eq!(ro.get("/api/v1/tasks?limit=5000").status, 400);
    for bad in [
        r#"{"nothing": 1}"#,
        r#"{"action": "nope"}"#,
        r#""just a string""#,
        "{broken",
    ] {
        let r = rw.post("/api/v1/tasks", bad);
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
    }
    assert_eq!(
        rw.post("/api/v1/tasks?priority=5000", r#"{"command": ["true"]}"#)
            .status,
        400
    );
    let all = ro.get("/api/v1/tasks").json();
    assert_eq!(
        all["tasks"].as_array().unwrap().len(),
        2,
        "nothing else queued"
    );
}

#[test]
fn logs_stream_their_lines_and_follow() {
    let (c, port) = up();
    let api = Api::new(port, Some(&key(&c, "viewer", "read")));
    let mut s = SseStream::open(&api, "/api/v1/logs/web?n=5&follow=1", &[]);
    assert_eq!(s.status, 200);
    let first = s
        .until(Duration::from_secs(10), |e| {
            e.event == "line" && e.data.contains("web-tick")
        })
        .expect("a line");
    // Followed: more lines arrive after the backlog.
    let mut more = 0;
    for _ in 0..10 {
        if s.until(Duration::from_secs(5), |e| e.event == "line")
            .is_some()
        {
            more += 1;
        }
    }
    assert!(more >= 5, "followed {more} lines after {first:?}");
    let mut filtered = SseStream::open(&api, "/api/v1/logs/workflow-1?n=1000&q=hosting", &[]);
    let mut n = 0;
    while let Some(e) = filtered.next(Duration::from_secs(5)) {
        if e.event == "line" {
            assert!(e.data.contains("hosting"), "{}", e.data);
            n += 1;
        }
    }
    assert!(n >= 1, "the workflow's log says what it hosts");
    for bad in ["/api/v1/logs/nope", "/api/v1/logs/workflow-99"] {
        assert_eq!(api.get(bad).status, 404, "{bad}");
    }
    assert_eq!(api.get("/api/v1/logs/..%2F..%2Fetc%2Fpasswd").status, 404);
}

fn cookie_of(r: &Resp) -> String {
    let set = r.header("set-cookie").expect("a cookie");
    for part in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(part), "{set}");
    }
    set.split(';').next().unwrap().to_string()
}

#[test]
fn the_dashboard_logs_in_to_a_cookie_and_changes_need_its_csrf_token() {
    let (c, port) = up();
    let control = key(&c, "ops", "control");
    let anon = Api::new(port, None);
    let page = anon.get("/");
    assert_eq!(page.status, 200);
    assert!(page.text().contains("<html"), "the page needs no key");
    assert!(
        page.header("content-security-policy")
            .is_some_and(|p| p.contains("default-src 'none'")),
        "{:?}",
        page.headers
    );
    for outside in [
        "src=\"http",
        "href=\"http",
        "url(http",
        "@import",
        "src=\"//",
    ] {
        assert!(
            !page.text().contains(outside),
            "nothing from elsewhere: {outside}"
        );
    }

    assert_eq!(anon.post("/login", r#"{"key": "nxk_nope"}"#).status, 401);
    let login = anon.post("/login", &format!(r#"{{"key": "{control}"}}"#));
    assert_eq!(login.status, 200, "{}", login.text());
    let cookie = cookie_of(&login);
    assert!(!cookie.contains(&control[4..]), "the cookie is not the key");
    let csrf = login.json()["csrf"].as_str().unwrap().to_string();
    fn with<'a>(cookie: &'a str, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        let mut h = vec![("Cookie", cookie)];
        h.extend_from_slice(extra);
        h
    }
    let me = anon.send("GET", "/api/v1/session", &with(&cookie, &[]), b"");
    assert_eq!(me.status, 200);
    assert_eq!(me.json()["name"], "ops");
    assert_eq!(me.json()["csrf"], csrf.as_str());
    assert_eq!(
        anon.send("GET", "/api/v1/status", &with(&cookie, &[]), b"")
            .status,
        200,
        "reads need only the cookie"
    );
    let restart = |h: &[(&str, &str)]| {
        let mut h = h.to_vec();
        h.push(("Content-Type", "application/json"));
        anon.send("POST", "/api/v1/services/db/restart", &h, b"")
    };
    let r = restart(&with(&cookie, &[]));
    assert_eq!(r.status, 403, "no CSRF token: {}", r.text());
    assert!(r.text().contains("CSRF"));
    assert_eq!(
        restart(&with(&cookie, &[("X-CSRF-Token", "00ff")])).status,
        403
    );
    let r = restart(&with(&cookie, &[("X-CSRF-Token", &csrf)]));
    assert_eq!(r.status, 200, "{}", r.text());

    // A forged cookie, one signed for another key name, a cookie from before a revoke.
    let forged = cookie.replacen("ops", "adm", 1);
    let r = anon.send("GET", "/api/v1/status", &[("Cookie", &forged)], b"");
    assert_eq!(r.status, 401);
    let out = c.nexus(&["api-key", "revoke", "ops"]);
    assert!(out.status.success());
    let r = anon.send("GET", "/api/v1/status", &with(&cookie, &[]), b"");
    assert_eq!(r.status, 401, "revoking the key ends its sessions");

    // Logged out: the cookie is cleared.
    let viewer = key(&c, "viewer", "read");
    let login = anon.post("/login", &format!(r#"{{"key": "{viewer}"}}"#));
    let cookie = cookie_of(&login);
    let csrf = login.json()["csrf"].as_str().unwrap().to_string();
    let r = anon.send(
        "POST",
        "/api/v1/services/db/restart",
        &[
            ("Cookie", &cookie),
            ("X-CSRF-Token", &csrf),
            ("Content-Type", "application/json"),
        ],
        b"",
    );
    assert_eq!(r.status, 403, "a read key's session cannot control");
    let out = anon.send(
        "POST",
        "/logout",
        &[("Cookie", &cookie), ("X-CSRF-Token", &csrf)],
        b"",
    );
    assert_eq!(out.status, 200);
    assert!(out.header("set-cookie").unwrap().contains("Max-Age=0"));
}

/// The status document arrives on the event stream with `status=1`, each second.
#[test]
fn one_stream_carries_events_and_status() {
    let (c, port) = up();
    let api = Api::new(port, Some(&key(&c, "viewer", "read")));
    let mut s = SseStream::open(&api, "/api/v1/events?n=0&status=1", &[]);
    let mut frames = 0;
    for _ in 0..3 {
        let e = s
            .until(Duration::from_secs(5), |e| e.event == "status")
            .expect("a status frame");
        let v: Value = serde_json::from_str(&e.data).unwrap();
        assert_eq!(v["schema"], 2);
        frames += 1;
    }
    assert_eq!(frames, 3);
    let victim = c.pid_of("workflow", 3).unwrap();
    signal(victim, libc::SIGKILL);
    let seen = s
        .until(Duration::from_secs(5), |e| {
            e.event == "status"
                && serde_json::from_str::<Value>(&e.data).is_ok_and(|v| {
                    v["daemons"].as_array().unwrap().iter().any(|d| {
                        d["role"] == "workflow"
                            && d["id"] == 3
                            && d["pid"] != victim
                            && d["state"] == "running"
                    })
                })
        })
        .is_some();
    assert!(seen, "the replacement shows in a status frame");
}

// --- the OpenAPI document against the answers ------------------------------------------

/// A JSON Schema subset (type, nullable, required, properties, items, enum,
/// additionalProperties, $ref): enough to hold every answer to the document.
fn check(doc: &Value, schema: &Value, v: &Value, at: &str) -> Result<(), String> {
    if let Some(r) = schema["$ref"].as_str() {
        let name = r.rsplit('/').next().unwrap();
        return check(doc, &doc["components"]["schemas"][name], v, at);
    }
    if v.is_null() {
        return if schema["nullable"] == true || schema.get("type").is_none() {
            Ok(())
        } else {
            Err(format!("{at}: null where {schema} wants a value"))
        };
    }
    let ok = match schema["type"].as_str() {
        Some("object") => v.is_object(),
        Some("array") => v.is_array(),
        Some("string") => v.is_string(),
        Some("integer") => v.is_i64() || v.is_u64(),
        Some("number") => v.is_number(),
        Some("boolean") => v.is_boolean(),
        _ => true,
    };
    if !ok {
        return Err(format!("{at}: {v} is not {}", schema["type"]));
    }
    if let Some(e) = schema["enum"].as_array()
        && !e.contains(v)
    {
        return Err(format!("{at}: {v} not in {e:?}"));
    }
    for r in schema["required"].as_array().into_iter().flatten() {
        let k = r.as_str().unwrap();
        if v.get(k).is_none() {
            return Err(format!("{at}: `{k}` missing"));
        }
    }
    if let Some(props) = schema["properties"].as_object() {
        for (k, s) in props {
            if let Some(x) = v.get(k) {
                check(doc, s, x, &format!("{at}.{k}"))?;
            }
        }
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), v.as_array()) {
        for (i, x) in arr.iter().enumerate() {
            check(doc, items, x, &format!("{at}[{i}]"))?;
        }
    }
    if let (Some(extra), Some(obj)) = (schema.get("additionalProperties"), v.as_object())
        && extra.is_object()
    {
        for (k, x) in obj {
            if schema["properties"].get(k).is_none() {
                check(doc, extra, x, &format!("{at}.{k}"))?;
            }
        }
    }
    Ok(())
}

fn answer_schema<'a>(doc: &'a Value, path: &str, method: &str, code: u16) -> &'a Value {
    let resp = &doc["paths"][path][method]["responses"][code.to_string()];
    let resp = match resp["$ref"].as_str() {
        Some(r) => &doc["components"]["responses"][r.rsplit('/').next().unwrap()],
        None => resp,
    };
    &resp["content"]["application/json"]["schema"]
}

#[test]
fn the_openapi_document_describes_the_real_answers() {
    let (c, port) = up();
    let rw = Api::new(port, Some(&key(&c, "ops", "control")));
    let doc = rw.get("/api/v1/openapi.json").json();
    assert_eq!(doc["openapi"], "3.0.3");
    let id = rw.post("/api/v1/tasks", r#"{"command": ["true"]}"#).json()["id"]
        .as_i64()
        .unwrap();
    wait_until("the task done", Duration::from_secs(10), || {
        rw.get(&format!("/api/v1/tasks/{id}")).json()["state"] == "succeeded"
    });
    let cases: Vec<(&str, String, &str, Option<&str>)> = vec![
        ("/api/v1/status", "/api/v1/status".into(), "get", None),
        ("/api/v1/health", "/api/v1/health".into(), "get", None),
        ("/api/v1/services", "/api/v1/services".into(), "get", None),
        ("/api/v1/session", "/api/v1/session".into(), "get", None),
        ("/api/v1/tasks", "/api/v1/tasks".into(), "get", None),
        (
            "/api/v1/tasks/{id}",
            format!("/api/v1/tasks/{id}"),
            "get",
            None,
        ),
        (
            "/api/v1/tasks/{id}",
            "/api/v1/tasks/424242".into(),
            "get",
            None,
        ),
        (
            "/api/v1/tasks",
            "/api/v1/tasks".into(),
            "post",
            Some(r#"{"command": ["true"]}"#),
        ),
        (
            "/api/v1/scale",
            "/api/v1/scale".into(),
            "post",
            Some(r#"{"workflow": 4}"#),
        ),
        (
            "/api/v1/scale",
            "/api/v1/scale".into(),
            "post",
            Some(r#"{"workflow": "x"}"#),
        ),
        (
            "/api/v1/services/{name}/{action}",
            "/api/v1/services/db/restart".into(),
            "post",
            Some(""),
        ),
        (
            "/api/v1/tasks/{id}/retry",
            format!("/api/v1/tasks/{id}/retry"),
            "post",
            Some(""),
        ),
    ];
    for (template, path, method, body) in cases {
        let r = match body {
            Some(b) => rw.post(&path, b),
            None => rw.get(&path),
        };
        let schema = answer_schema(&doc, template, method, r.status);
        assert!(
            schema.is_object(),
            "{method} {path}: answer {} is not in the document",
            r.status
        );
        check(&doc, schema, &r.json(), &path).unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    }
    // Every path of the document is served (not 404) by the server.
    for (path, ops) in doc["paths"].as_object().unwrap() {
        let name = if path.contains("/daemons/") {
            "workflow-1"
        } else {
            "db"
        };
        let concrete = path
            .replace("{name}", name)
            .replace("{action}", "restart")
            .replace("{id}", &id.to_string());
        for method in ops.as_object().unwrap().keys() {
            let r = if method == "get" {
                if concrete.contains("/logs/") || concrete.ends_with("/events") {
                    rw.get(&format!("{concrete}?follow=0"))
                } else {
                    rw.get(&concrete)
                }
            } else {
                rw.post(
                    &concrete,
                    if concrete.ends_with("/login") {
                        r#"{"key":"x"}"#
                    } else {
                        ""
                    },
                )
            };
            assert_ne!(r.status, 404, "{method} {path}: {}", r.text());
            assert_ne!(r.status, 405, "{method} {path}");
        }
    }
    assert!(TcpStream::connect(rw.addr).is_ok());
}
