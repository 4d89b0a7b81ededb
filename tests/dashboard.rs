//! The dashboard in a real browser: tests/browser/dashboard.mjs drives Debian's chromium
//! (through playwright-core) against a cluster started here, and `kill -9`s one of its
//! workflows from the shell. Screenshots land in target/dashboard-shots/.
//!
//! Needs node, `npm ci --prefix tests/browser` and /usr/bin/chromium; `.ci/run` installs
//! them. Without them the test says so and passes, except under CI=true, where it fails.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

#[test]
fn the_dashboard_in_a_real_browser() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = root.join("tests/browser/dashboard.mjs");
    let modules = root.join("tests/browser/node_modules/playwright-core");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let missing: Vec<&str> = [
        (!modules.exists()).then_some("tests/browser/node_modules (npm ci --prefix tests/browser)"),
        (!Path::new(&chromium).exists()).then_some("chromium (apt-get install chromium)"),
        Command::new("node")
            .arg("--version")
            .output()
            .is_err()
            .then_some("node"),
    ]
    .into_iter()
    .flatten()
    .collect();
    if !missing.is_empty() {
        let msg = format!("the browser test needs {}", missing.join(", "));
        assert!(std::env::var_os("CI").is_none(), "{msg}");
        eprintln!("skipped: {msg}");
        return;
    }
    let port = free_port();
    let c = Cluster::new(&format!(
        r#"{{"interval_ms": 200, "timeout_ms": 1000, "workflows": 6,
            "http": {{"listen": "127.0.0.1:{port}"}},
            "services": [
              {{"name": "db", "command": ["sh", "-c", "while :; do echo db-tick; sleep 0.5; done"]}},
              {{"name": "web", "instances": 2, "depends_on": {{"db": "started"}},
                "command": ["sh", "-c", "while :; do echo web-tick; sleep 0.5; done"]}}
            ]}}"#
    ));
    c.start();
    let out = c.nexus(&[
        "api-key", "create", "--name", "browser", "--scope", "control",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let key = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let shots = root.join("target/dashboard-shots");
    let run = Command::new("node")
        .arg(&script)
        .env("NEXUS_URL", format!("http://127.0.0.1:{port}"))
        .env("NEXUS_KEY", &key)
        .env("NEXUS_SHOTS", &shots)
        .env("CHROMIUM", &chromium)
        .env(MARKER, c.path())
        .output()
        .expect("node");
    let said = text(&run);
    eprintln!("{said}");
    assert!(run.status.success(), "the browser test failed:\n{said}");
    assert!(said.contains("ok: no request left the server"), "{said}");
}
