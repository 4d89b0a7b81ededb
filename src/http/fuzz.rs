//! Property tests of everything that parses a request: whatever a client sends as a path,
//! a query, a Host or Origin, a Last-Event-ID, a cookie or a CSRF token, parsing returns
//! an answer (never panics), and no name that reaches a handler can name a path.

use proptest::prelude::*;

use super::guard::{Hosts, check_site};
use super::ledger_feed::Cursor;
use super::routes::{Route, route};
use super::server::Query;
use super::session::{Sessions, from_header};
use super::settings::HttpSettings;
use super::views::percent_decode;

const CASES: u32 = 20_000;

/// Paths built from the pieces an attacker would try, and from arbitrary bytes.
fn path() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("api".to_string()),
        Just("v1".to_string()),
        Just("logs".to_string()),
        Just("services".to_string()),
        Just("tasks".to_string()),
        Just("daemons".to_string()),
        Just("..".to_string()),
        Just(".".to_string()),
        Just("%2e%2e".to_string()),
        Just("%2F".to_string()),
        Just(String::new()),
        "[a-z0-9._-]{1,12}",
        ".{0,16}",
    ];
    (proptest::collection::vec(piece, 0..7), any::<bool>())
        .prop_map(|(parts, slash)| format!("/{}{}", parts.join("/"), if slash { "/" } else { "" }))
}

fn method() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("GET".to_string()),
        Just("POST".to_string()),
        Just("HEAD".to_string()),
        "[A-Z]{0,8}"
    ]
}

fn safe_name(n: &str) -> bool {
    !n.is_empty() && !n.contains('/') && !n.contains('%') && !n.starts_with('.') && n.len() <= 64
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn any_path_routes_and_no_name_can_name_a_path(m in method(), p in path()) {
        match route(&m, &p) {
            Route::Logs(Some(n)) | Route::Service(n, _) | Route::RestartDaemon(n) => {
                prop_assert!(safe_name(&n), "{m} {p} gave the name {n:?}");
            }
            Route::Task(id) | Route::CancelTask(id) | Route::RetryTask(id) => prop_assert!(id >= 0),
            _ => {}
        }
    }

    #[test]
    fn queries_hosts_and_origins_never_panic(
        q in ".{0,200}",
        host in ".{0,80}",
        origin in proptest::option::of(".{0,80}"),
        key in "[a-z]{1,8}",
    ) {
        let query = Query::parse(Some(&q));
        let _ = query.number(&key, 0, 1000);
        let _ = query.flag(&key, false);
        let _ = percent_decode(&q);
        let hosts = Hosts::new(&HttpSettings {
            listen: "127.0.0.1:9090".parse().unwrap(),
            tls_cert: None,
            tls_key: None,
            hosts: vec!["nexus.lan".into()],
        });
        let _ = check_site(&hosts, Some(&host), origin.as_deref());
    }

    #[test]
    fn ids_cookies_and_tokens_from_outside_are_refused_not_trusted(
        id in ".{0,60}",
        cookie in ".{0,300}",
        token in ".{0,140}",
    ) {
        let _ = Cursor::parse(&id);
        let _ = from_header(&cookie);
        let s = Sessions::for_tests();
        prop_assert_eq!(s.verify(&cookie, 1), None);
        prop_assert!(!s.csrf_ok(&cookie, &token));
    }
}
