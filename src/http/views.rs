//! The handlers that only read: status, health, metrics, the ledger and the logs as
//! Server-Sent Events, the services' shape, the OpenAPI document, the dashboard page,
//! and who the caller is.

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use serde_json::json;
use tokio::sync::{broadcast, mpsc};

use super::ledger_feed::{self, Cursor, Item};
use super::server::{
    Body, Caller, ChannelBody, KEEPALIVE, Query, Server, blocking, error, event_type_of, full,
    header_str, json_bytes, secure, sse_frame,
};
use crate::commands::{health, logs, metrics};
use crate::config::Config;

/// The page at `/` (one file, its script and style inline, nothing from elsewhere) and the
/// API's OpenAPI document (checked by a validator in CI and against real answers in the
/// tests). They live in a section of their own, starting on a 64 kB boundary: beside the
/// read-only data every daemon touches, the kernel's fault-around (64 kB windows) would map
/// their first pages into daemons that never serve them.
#[repr(C, align(65536))]
struct Assets {
    dashboard: [u8; include_bytes!("dashboard.html").len()],
    openapi: [u8; include_bytes!("openapi.json").len()],
}

#[unsafe(link_section = "nexus_assets")]
static ASSETS: Assets = Assets {
    dashboard: *include_bytes!("dashboard.html"),
    openapi: *include_bytes!("openapi.json"),
};

fn dashboard_page() -> &'static str {
    // Checked by the tests: both files are UTF-8.
    std::str::from_utf8(&ASSETS.dashboard).unwrap_or("")
}

/// The page's policy: its own script and style by their hashes, nothing inline besides,
/// connections to this server only, no frames, no forms elsewhere.
fn dashboard_policy() -> &'static str {
    static POLICY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    POLICY.get_or_init(|| {
        let hash = |open: &str, close: &str| {
            let body = dashboard_page()
                .split_once(open)
                .and_then(|(_, rest)| rest.split_once(close))
                .map_or("", |(b, _)| b);
            let d = ring::digest::digest(&ring::digest::SHA256, body.as_bytes());
            use base64::Engine;
            format!(
                "'sha256-{}'",
                base64::engine::general_purpose::STANDARD.encode(d.as_ref())
            )
        };
        format!(
            "default-src 'none'; script-src {}; style-src {}; connect-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
            hash("<script>", "</script>"),
            hash("<style>", "</style>")
        )
    })
}

impl Server {
    pub(super) fn dashboard(&self) -> Response<Body> {
        let mut r = Response::new(full(dashboard_page()));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        let mut r = secure(r);
        if let Ok(v) = HeaderValue::from_str(dashboard_policy()) {
            r.headers_mut().insert(header::CONTENT_SECURITY_POLICY, v);
        }
        r
    }

    pub(super) fn openapi(&self) -> Response<Body> {
        json_bytes(StatusCode::OK, Bytes::from_static(&ASSETS.openapi))
    }

    pub(super) fn session(&self, caller: Option<&Caller>) -> Response<Body> {
        let Some(c) = caller else {
            return error(StatusCode::UNAUTHORIZED, "not logged in");
        };
        let csrf = match (&c.cookie, &self.sessions) {
            (Some(cookie), Some(s)) => Some(s.csrf_for(cookie)),
            _ => None,
        };
        let body = json!({"name": c.entry.name, "scope": c.entry.scope.as_str(), "csrf": csrf});
        json_bytes(StatusCode::OK, (body.to_string() + "\n").into())
    }

    pub(super) async fn status(&self) -> Response<Body> {
        match &*self.snapshots.get().await {
            Ok(c) => json_bytes(StatusCode::OK, c.status_json.clone()),
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
        }
    }

    pub(super) async fn health(&self) -> Response<Body> {
        let snap = self.snapshots.get().await;
        let (verdict, reasons) = match &*snap {
            Ok(c) => (c.verdict, c.reasons.clone()),
            Err(_) => {
                let dir = self.dir.clone();
                blocking(move || health::assess_unreachable(&dir))
                    .await
                    .unwrap_or((health::Verdict::NotRunning, vec!["status failed".into()]))
            }
        };
        let code = match verdict {
            health::Verdict::Healthy | health::Verdict::Degraded => StatusCode::OK,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        };
        let body = health::report_json(verdict, reasons, &self.dir);
        json_bytes(code, body.into())
    }

    pub(super) async fn metrics(&self) -> Response<Body> {
        let dir = self.dir.clone();
        let mut text = blocking(move || metrics::exposition(&dir).0)
            .await
            .unwrap_or_default();
        text.push_str(&self.own_metrics());
        let mut r = Response::new(full(text.into_bytes()));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        secure(r)
    }

    /// Each service's shape for the dependency graph: never its command or environment.
    pub(super) fn services(&self) -> Response<Body> {
        let cfg = Config::load(&self.dir.config_file()).unwrap_or_default();
        let list: Vec<serde_json::Value> = cfg
            .services
            .iter()
            .map(|s| {
                let deps: serde_json::Map<String, serde_json::Value> = s
                    .depends_on
                    .iter()
                    .map(|(k, c)| (k.clone(), json!(c.as_str())))
                    .collect();
                json!({
                    "name": s.name,
                    "instances": s.instances,
                    "critical": s.critical,
                    "depends_on": deps,
                    "env": s.env.keys().map(|k| (k.clone(), json!("[redacted]"))).collect::<serde_json::Map<_, _>>(),
                })
            })
            .collect();
        json_bytes(
            StatusCode::OK,
            (json!({ "services": list }).to_string() + "\n").into(),
        )
    }

    /// The ledger as Server-Sent Events: what follows `Last-Event-ID`, else the last `n`
    /// (default 20), then every new event as it is written (unless `follow=0`); with
    /// `status=1` also `event: status` and `event: health` frames (the status document and
    /// its verdict, each second and right after each event): all a dashboard needs, on one
    /// connection.
    pub(super) fn events(&self, req: &Request<Incoming>) -> Response<Body> {
        let q = Query::parse(req.uri().query());
        let n = match q.number("n", 20, 100_000) {
            Ok(n) => n,
            Err(e) => return error(StatusCode::BAD_REQUEST, &e),
        };
        let follow = match q.flag("follow", true) {
            Ok(f) => f,
            Err(e) => return error(StatusCode::BAD_REQUEST, &e),
        };
        let resume = header_str(req, "last-event-id").and_then(|s| Cursor::parse(&s));
        let event_type = q.get("event").map(str::to_string);
        let with_status = match q.flag("status", false) {
            Ok(f) => f,
            Err(e) => return error(StatusCode::BAD_REQUEST, &e),
        };
        let mut status = with_status.then(|| self.status_frames.subscribe());
        if with_status {
            self.status_wanted.notify_one();
        }
        // Subscribed before the backlog is read, so nothing falls between the two.
        let mut live = self.feed.subscribe();
        let path = self.dir.events();
        let (tx, rx) = mpsc::channel::<Bytes>(64);
        tokio::spawn(async move {
            let (backlog, mut cursor) = match resume {
                Some(c) => ledger_feed::read_since(&path, Some(c)),
                None => ledger_feed::tail(&path, n as usize),
            };
            let wanted = |it: &Item| {
                event_type
                    .as_deref()
                    .is_none_or(|t| event_type_of(&it.line) == Some(t))
            };
            if tx
                .send(Bytes::from_static(b"retry: 1000\n\n"))
                .await
                .is_err()
            {
                return;
            }
            for it in backlog.iter().filter(|it| wanted(it)) {
                if tx.send(sse_frame(it)).await.is_err() {
                    return;
                }
            }
            if !follow {
                return;
            }
            if let Some(rx) = status.as_mut() {
                let now = rx.borrow_and_update().clone();
                if !now.is_empty() && tx.send(now).await.is_err() {
                    return;
                }
            }
            // Bounded by the client: the loop ends when it goes away.
            loop {
                let frames: Vec<Item> = tokio::select! {
                    got = live.recv() => match got {
                        Ok(it) => vec![it],
                        // Fell behind the broadcast: catch up from the file itself.
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            ledger_feed::read_since(&path, Some(cursor)).0
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    changed = async {
                        match status.as_mut() {
                            Some(rx) => rx.changed().await.map(|()| rx.borrow_and_update().clone()),
                            None => std::future::pending().await,
                        }
                    } => {
                        let Ok(frame) = changed else { return };
                        if tx.send(frame).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    _ = tokio::time::sleep(KEEPALIVE) => {
                        if tx.send(Bytes::from_static(b": keepalive\n\n")).await.is_err() {
                            return;
                        }
                        continue;
                    }
                };
                for it in frames {
                    if ledger_feed::already_seen(&it, cursor) {
                        continue;
                    }
                    cursor = it.at;
                    if wanted(&it) && tx.send(sse_frame(&it)).await.is_err() {
                        return;
                    }
                }
            }
        });
        sse_response(rx)
    }

    /// A log as Server-Sent Events (`event: line`): its last `n` lines (default 100),
    /// then, with `follow=1`, each new one; `q=TEXT` keeps the lines that contain it.
    pub(super) async fn logs(
        &self,
        req: &Request<Incoming>,
        name: Option<String>,
    ) -> Response<Body> {
        let q = Query::parse(req.uri().query());
        let (n, follow) = match (q.number("n", 100, 100_000), q.flag("follow", false)) {
            (Ok(n), Ok(f)) => (n as usize, f),
            (Err(e), _) | (_, Err(e)) => return error(StatusCode::BAD_REQUEST, &e),
        };
        let needle = q.get("q").map(percent_decode);
        let dir = self.dir.clone();
        let found = blocking(move || {
            let files = logs::resolve(&dir, name.as_deref())?;
            let (lines, pos) = logs::tail(&dir, &files, n);
            Ok::<_, String>((files, lines, pos))
        })
        .await;
        let (files, lines, mut pos) = match found {
            Some(Ok(x)) => x,
            Some(Err(e)) => return error(StatusCode::NOT_FOUND, &e),
            None => return error(StatusCode::INTERNAL_SERVER_ERROR, "reading the log failed"),
        };
        let (tx, rx) = mpsc::channel::<Bytes>(64);
        let keep = move |l: &str| needle.as_deref().is_none_or(|n| l.contains(n));
        tokio::spawn(async move {
            if tx
                .send(Bytes::from_static(b"retry: 1000\n\n"))
                .await
                .is_err()
            {
                return;
            }
            for l in lines.iter().filter(|l| keep(l)) {
                if tx.send(line_frame(l)).await.is_err() {
                    return;
                }
            }
            if !follow {
                return;
            }
            let mut quiet = std::time::Duration::ZERO;
            // Bounded by the client: the loop ends when it goes away.
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                let new = logs::poll(&files, &mut pos);
                if new.is_empty() {
                    quiet += std::time::Duration::from_millis(250);
                    if quiet >= KEEPALIVE {
                        quiet = std::time::Duration::ZERO;
                        if tx
                            .send(Bytes::from_static(b": keepalive\n\n"))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    continue;
                }
                quiet = std::time::Duration::ZERO;
                for l in new.lines().filter(|l| keep(l)) {
                    if tx.send(line_frame(l)).await.is_err() {
                        return;
                    }
                }
            }
        });
        sse_response(rx)
    }
}

/// A log line as one event. A line holds no newline, so one `data:` field carries it.
fn line_frame(line: &str) -> Bytes {
    Bytes::from(format!("event: line\ndata: {line}\n\n"))
}

fn sse_response(rx: mpsc::Receiver<Bytes>) -> Response<Body> {
    let mut r = Response::new(BoxBody::new(ChannelBody { rx }));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    secure(r)
}

/// `%41` and `+` in a query value; a malformed escape is kept as it is.
pub(super) fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], hex) {
            (b'+', _) => out.push(b' '),
            (b'%', Some(v)) => {
                out.push(v);
                i += 2;
            }
            (c, _) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::percent_decode;

    #[test]
    fn the_embedded_files_are_utf8() {
        assert!(super::dashboard_page().contains("<html"));
        assert!(std::str::from_utf8(&super::ASSETS.openapi).is_ok());
    }

    #[test]
    fn query_values_are_decoded_and_malformed_escapes_kept() {
        assert_eq!(percent_decode("a+b%20c%2Fd"), "a b c/d");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("%C3%A9"), "é");
    }
}
