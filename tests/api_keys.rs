//! `nexus api-key`: keys made once and kept only as hashes in the state directory, the
//! same whether the cluster runs or not; bad input is one line and changes nothing.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;

use common::*;
use serde_json::Value;

fn check(c: &Cluster, key: &str, scope: &str) -> std::process::Output {
    let mut child = c
        .command(&["api-key", "check", "--scope", scope])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{key}\n").as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn names(c: &Cluster) -> Vec<(String, String)> {
    let out = c.nexus(&["api-key", "list", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["name"].as_str().unwrap().to_string(),
                k["scope"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn keys_are_printed_once_kept_as_hashes_and_checked_by_scope() {
    let c = Cluster::new(FAST);
    // Made while the cluster is down...
    let out = c.nexus(&["api-key", "create", "--name", "ops", "--scope", "control"]);
    assert!(out.status.success(), "{}", text(&out));
    let ops = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(
        ops.starts_with("nxk_") && ops.len() == 68,
        "the key alone: {ops:?}"
    );
    let file = c.path().join("state/api-keys.json");
    let stored = std::fs::read_to_string(&file).unwrap();
    assert!(!stored.contains(&ops[4..]), "the key itself is stored");
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // ...are the running cluster's: one state directory.
    c.start();
    let out = c.nexus(&["api-key", "create", "--name", "ci", "--scope", "read"]);
    assert!(out.status.success(), "{}", text(&out));
    let ci = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(
        names(&c),
        vec![
            ("ops".into(), "control".into()),
            ("ci".into(), "read".into())
        ]
    );
    assert!(check(&c, &ops, "control").status.success());
    assert!(check(&c, &ci, "read").status.success());
    let out = check(&c, &ci, "control");
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("has scope read"), "{}", text(&out));

    // Revoked: refused at once.
    let out = c.nexus(&["api-key", "revoke", "ops"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = check(&c, &ops, "read");
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("unknown or revoked"), "{}", text(&out));
    assert_eq!(names(&c), vec![("ci".into(), "read".into())]);
}

#[test]
fn bad_input_is_one_line_and_changes_nothing() {
    let c = Cluster::new(FAST);
    let out = c.nexus(&["api-key", "create", "--name", "k", "--scope", "read"]);
    assert!(out.status.success(), "{}", text(&out));
    let file = c.path().join("state/api-keys.json");
    let before = std::fs::read(&file).unwrap();
    for (args, says) in [
        (
            &["api-key", "create", "--name", "k", "--scope", "read"][..],
            "exists already",
        ),
        (
            &["api-key", "create", "--name", "a/b", "--scope", "read"],
            "not a key name",
        ),
        (
            &["api-key", "create", "--name", "x", "--scope", "admin"],
            "read or control",
        ),
        (&["api-key", "create", "--name", "x"], "needs --scope"),
        (&["api-key", "create", "--scope", "read"], "needs --name"),
        (&["api-key", "create", "--name"], "needs a value"),
        (&["api-key", "revoke", "nobody"], "no key named"),
        (&["api-key", "revoke"], "one NAME"),
        (&["api-key", "list", "--bogus"], "unknown option"),
        (&["api-key", "frob"], "unknown api-key command"),
    ] {
        let out = c.nexus(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(out.stdout.is_empty(), "{args:?} printed {}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    assert_eq!(
        std::fs::read(&file).unwrap(),
        before,
        "a refusal changed the file"
    );
    // A file others could read is not trusted.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = c.nexus(&["api-key", "list"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("readable by others"), "{}", text(&out));
}

#[test]
fn keys_made_at_the_same_time_are_all_kept() {
    let c = Cluster::new(FAST);
    let children: Vec<_> = (0..8)
        .map(|i| {
            c.command(&[
                "api-key",
                "create",
                "--name",
                &format!("k{i}"),
                "--scope",
                "read",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
        })
        .collect();
    let keys: Vec<String> = children
        .into_iter()
        .map(|ch| {
            let out = ch.wait_with_output().unwrap();
            assert!(out.status.success(), "{}", text(&out));
            String::from_utf8(out.stdout).unwrap().trim().to_string()
        })
        .collect();
    assert_eq!(names(&c).len(), 8);
    for k in &keys {
        assert!(check(&c, k, "read").status.success(), "{k} lost");
    }
}
