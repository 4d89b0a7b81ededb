//! The HTTP server: accepting (bounded in connections, header size and idle time,
//! optionally TLS), the checks every request passes (Host, Origin, key, rate of failed
//! keys), and the handlers. Blocking work (asking the master, reading /proc) runs on a
//! small blocking pool, so the loop that serves connections and sends heartbeats never
//! waits on it.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{Full, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};

use super::guard::{self, Hosts, KeyCache, Refusal};
use super::keys::KeyEntry;
use super::ledger_feed::Item;
use super::routes::{self, Route};
use super::session::{self, Sessions};
use super::settings::HttpSettings;
use crate::commands::{health, status};
use crate::runtime_dir::RuntimeDir;

pub type Body = BoxBody<Bytes, Infallible>;

/// Connections served at once; one more is answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 512;
/// Largest request head (request line and headers).
const MAX_HEAD: usize = 16 * 1024;
/// A client that sends no complete request head for this long is dropped (also between
/// requests on a kept-alive connection).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A TLS handshake must finish within this.
const TLS_TIMEOUT: Duration = Duration::from_secs(10);
/// An SSE stream sends a comment this often, so proxies keep it open and a vanished
/// client is noticed.
pub(super) const KEEPALIVE: Duration = Duration::from_secs(15);
/// Failed keys from one address within a minute before it gets 429 for the rest of it.
const MAX_FAILURES_PER_MINUTE: u32 = 20;

pub struct Server {
    pub(super) dir: RuntimeDir,
    hosts: Hosts,
    pub(super) keys: Mutex<KeyCache>,
    /// None when the state directory's session secret is unusable: keys still work.
    pub(super) sessions: Option<Sessions>,
    /// Cookies get `Secure` on a TLS listener.
    pub(super) tls: bool,
    pub(super) snapshots: SnapshotCache,
    pub(super) feed: broadcast::Sender<Item>,
    /// The latest status as an SSE frame, for the dashboards' streams (`status=1`).
    pub(super) status_frames: tokio::sync::watch::Sender<Bytes>,
    /// Wakes the status ticker when the first such stream opens.
    pub(super) status_wanted: tokio::sync::Notify,
    failures: Mutex<FailureLimiter>,
    connections: AtomicUsize,
    requests: AtomicU64,
    refused: AtomicU64,
}

/// Who a request comes from: the key, and the session cookie when it came by one.
pub struct Caller {
    pub entry: KeyEntry,
    pub cookie: Option<String>,
}

impl Server {
    pub fn new(
        dir: RuntimeDir,
        settings: &HttpSettings,
        state_dir: std::path::PathBuf,
        feed: broadcast::Sender<Item>,
    ) -> Server {
        let sessions = Sessions::load_or_create(&state_dir)
            .map_err(|e| log::error!("dashboard logins are off: {e}"))
            .ok();
        Server {
            snapshots: SnapshotCache::new(dir.clone()),
            dir,
            hosts: Hosts::new(settings),
            keys: Mutex::new(KeyCache::new(state_dir)),
            sessions,
            tls: settings.tls(),
            feed,
            status_frames: tokio::sync::watch::Sender::new(Bytes::new()),
            status_wanted: tokio::sync::Notify::new(),
            failures: Mutex::new(FailureLimiter::default()),
            connections: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    /// Requests answered so far (the loop trims the heap only after some came).
    pub fn answered(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Makes one status frame a second for every dashboard stream together (and one
    /// right after each ledger event), while at least one is open; none otherwise.
    pub async fn status_ticker(self: Arc<Self>) {
        let mut live = self.feed.subscribe();
        // Bounded by the daemon's life: each turn is one frame, or one wait for a viewer.
        loop {
            if self.status_frames.receiver_count() == 0 {
                self.status_wanted.notified().await;
                continue;
            }
            if let Ok(c) = &*self.snapshots.get().await {
                // The document, and the verdict `health` gives for it: the page shows
                // the server's judgement rather than making its own.
                let verdict = serde_json::json!({"health": c.verdict, "reasons": c.reasons});
                let mut frame = Vec::with_capacity(c.status_json.len() + 256);
                frame.extend_from_slice(b"event: status\ndata: ");
                frame.extend_from_slice(&c.status_json);
                frame.extend_from_slice(b"\n\nevent: health\ndata: ");
                frame.extend_from_slice(verdict.to_string().as_bytes());
                frame.extend_from_slice(b"\n\n");
                self.status_frames.send_replace(frame.into());
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                r = live.recv() => {
                    if matches!(r, Err(broadcast::error::RecvError::Closed)) {
                        return;
                    }
                    // A burst of events (a respawn writes two or three) makes one frame.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    while live.try_recv().is_ok() {}
                }
            }
        }
    }

    /// Accepts until the task is aborted.
    pub async fn accept_loop(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) {
        // Bounded by the daemon's life: each turn is one accepted connection.
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    // Out of fds or the like: back off instead of spinning.
                    log::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            if self.connections.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
                tokio::spawn(refuse_busy(stream));
                continue;
            }
            self.connections.fetch_add(1, Ordering::Relaxed);
            let srv = self.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                match tls {
                    Some(acceptor) => {
                        match tokio::time::timeout(TLS_TIMEOUT, acceptor.accept(stream)).await {
                            Ok(Ok(s)) => srv.clone().serve(TokioIo::new(s), peer).await,
                            Ok(Err(e)) => log::debug!("TLS handshake with {peer} failed: {e}"),
                            Err(_) => log::debug!("TLS handshake with {peer} timed out"),
                        }
                    }
                    None => srv.clone().serve(TokioIo::new(stream), peer).await,
                }
                srv.connections.fetch_sub(1, Ordering::Relaxed);
            });
        }
    }

    async fn serve<I>(self: Arc<Self>, io: I, peer: SocketAddr)
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let srv = self.clone();
        let svc = hyper::service::service_fn(move |req| {
            let srv = srv.clone();
            async move { Ok::<_, Infallible>(srv.handle(req, peer.ip()).await) }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .max_buf_size(MAX_HEAD)
            .max_headers(64);
        if let Err(e) = builder.serve_connection(io, svc).await {
            log::debug!("connection from {peer}: {e}");
        }
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>, peer: IpAddr) -> Response<Body> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let host = header_str(&req, header::HOST);
        let origin = header_str(&req, header::ORIGIN);
        if let Err(r) = guard::check_site(&self.hosts, host.as_deref(), origin.as_deref()) {
            return self.refuse(r);
        }
        let route = routes::route(req.method().as_str(), req.uri().path());
        if self.failures.lock().unwrap().blocked(peer, Instant::now()) {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return error(
                StatusCode::TOO_MANY_REQUESTS,
                "too many requests with a wrong key from this address: wait a minute",
            );
        }
        let caller = match self.authenticate(&req, &route) {
            Ok(c) => c,
            Err(r) => {
                if matches!(r, Refusal::Unauthenticated(_)) {
                    self.failures.lock().unwrap().record(peer, Instant::now());
                }
                return self.refuse(r);
            }
        };
        let head_only = req.method() == hyper::Method::HEAD;
        let mut resp = match route {
            Route::Dashboard => self.dashboard(),
            Route::Status => self.status().await,
            Route::Health => self.health().await,
            Route::Metrics => self.metrics().await,
            Route::OpenApi => self.openapi(),
            Route::Events => self.events(&req),
            Route::Services => self.services(),
            Route::Logs(name) => self.logs(&req, name).await,
            Route::Session => self.session(caller.as_ref()),
            Route::Login => self.login(req, peer).await,
            Route::Logout => self.logout(),
            Route::Service(name, action) => self.service(name, action).await,
            Route::RestartDaemon(name) => self.restart_daemon(name).await,
            Route::Scale => self.scale(req).await,
            Route::Reload => self.reload(req).await,
            Route::ListTasks => self.list_tasks(&req).await,
            Route::SubmitTask => self.submit_task(req).await,
            Route::Task(id) => self.task(id).await,
            Route::CancelTask(id) => self.task_verb(id, true).await,
            Route::RetryTask(id) => self.task_verb(id, false).await,
            Route::WrongMethod(allow) => {
                let mut r = error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here");
                r.headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static(allow));
                r
            }
            Route::NotFound => error(StatusCode::NOT_FOUND, "no such path"),
        };
        if head_only {
            *resp.body_mut() = empty();
        }
        resp
    }

    /// Who asks: a key in `Authorization`, else the dashboard's session cookie (with its
    /// CSRF token for anything that changes something). None for the open routes.
    fn authenticate<B>(&self, req: &Request<B>, route: &Route) -> Result<Option<Caller>, Refusal> {
        let Some(needed) = route.needs() else {
            return Ok(None);
        };
        let auth = req
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        let cookie = header_str(req, header::COOKIE)
            .and_then(|c| session::from_header(&c).map(str::to_string));
        let (Some(cookie), None) = (cookie, auth) else {
            let entry = self.keys.lock().unwrap().authorize(auth, needed)?;
            return Ok(Some(Caller {
                entry,
                cookie: None,
            }));
        };
        let Some(sessions) = &self.sessions else {
            return Err(Refusal::Unauthenticated(
                "sessions are unavailable (see the server's log)".into(),
            ));
        };
        let claims = sessions
            .verify(&cookie, crate::ledger::unix_ms_now())
            .ok_or_else(|| {
                Refusal::Unauthenticated(
                    "the session is not valid (expired or forged): log in again".into(),
                )
            })?;
        let entry = self
            .keys
            .lock()
            .unwrap()
            .session_key(&claims.name, claims.created_at_ms)
            .ok_or_else(|| {
                Refusal::Unauthenticated(format!("key `{}` was revoked: log in again", claims.name))
            })?;
        if !entry.scope.allows(needed) {
            return Err(Refusal::Forbidden(format!(
                "key `{}` has scope {}; this needs {}",
                entry.name,
                entry.scope.as_str(),
                needed.as_str()
            )));
        }
        if route.changes() {
            let token = header_str(req, session::CSRF_HEADER).unwrap_or_default();
            if !sessions.csrf_ok(&cookie, &token) {
                return Err(Refusal::Forbidden(
                    "a missing or wrong CSRF token (X-CSRF-Token)".into(),
                ));
            }
        }
        Ok(Some(Caller {
            entry,
            cookie: Some(cookie),
        }))
    }

    pub(super) fn refuse(&self, r: Refusal) -> Response<Body> {
        self.refused.fetch_add(1, Ordering::Relaxed);
        match r {
            Refusal::Host => error(
                StatusCode::BAD_REQUEST,
                "the Host header does not name this server (add the name to `http.hosts`)",
            ),
            Refusal::Origin => error(StatusCode::FORBIDDEN, "cross-origin requests are refused"),
            Refusal::Unauthenticated(why) => {
                let mut r = error(StatusCode::UNAUTHORIZED, &why);
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"nexus\""),
                );
                r
            }
            Refusal::Forbidden(why) => error(StatusCode::FORBIDDEN, &why),
        }
    }

    pub(super) fn own_metrics(&self) -> String {
        format!(
            "# HELP nexus_http_requests_total Requests the HTTP API has answered.\n# TYPE nexus_http_requests_total counter\nnexus_http_requests_total {}\n# HELP nexus_http_refused_total Requests refused (Host, Origin, key, scope, CSRF, rate).\n# TYPE nexus_http_refused_total counter\nnexus_http_refused_total {}\n# HELP nexus_http_connections Connections open to the HTTP API.\n# TYPE nexus_http_connections gauge\nnexus_http_connections {}\n",
            self.requests.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
            self.connections.load(Ordering::Relaxed),
        )
    }

    /// A failed login counts against its address like a wrong key.
    pub(super) fn record_failure(&self, peer: IpAddr) {
        self.failures.lock().unwrap().record(peer, Instant::now());
    }
}

pub(super) fn event_type_of(line: &str) -> Option<&str> {
    // The ledger's lines start {"ts":"…","event":"TYPE",…}: no JSON parse per event.
    let rest = &line[line.find("\"event\":\"")? + 9..];
    Some(&rest[..rest.find('"')?])
}

pub(super) fn sse_frame(it: &Item) -> Bytes {
    Bytes::from(format!(
        "id: {}\nevent: ledger\ndata: {}\n\n",
        it.at.id(),
        it.line
    ))
}

/// Over the connection limit: a short 503, then close.
async fn refuse_busy(mut stream: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    let body = "{\"error\":\"too many connections: retry later\"}\n";
    let msg = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(msg.as_bytes())).await;
}

/// Runs blocking work on the pool; None if it panicked.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    tokio::task::spawn_blocking(f).await.ok()
}

pub(super) fn header_str<B>(req: &Request<B>, name: impl header::AsHeaderName) -> Option<String> {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

pub fn full(b: impl Into<Bytes>) -> Body {
    BoxBody::new(Full::new(b.into()))
}

pub(super) fn empty() -> Body {
    full(Bytes::new())
}

/// Headers on every answer: nothing cached, sniffed, framed or sent as referrer.
pub(super) fn secure(mut r: Response<Body>) -> Response<Body> {
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'self'; frame-ancestors 'none'"),
    );
    r
}

pub(super) fn json_bytes(code: StatusCode, body: Bytes) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    secure(r)
}

pub fn error(code: StatusCode, message: &str) -> Response<Body> {
    let body = serde_json::json!({ "error": message }).to_string() + "\n";
    json_bytes(code, body.into())
}

/// An SSE body fed by the task that follows the ledger for this client.
pub(super) struct ChannelBody {
    pub(super) rx: mpsc::Receiver<Bytes>,
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(Frame::data(b))))
    }
}

/// A query string's parameters; unknown ones are ignored, known ones checked.
pub(super) struct Query(Vec<(String, String)>);

impl Query {
    pub(super) fn parse(q: Option<&str>) -> Query {
        Query(
            q.unwrap_or("")
                .split('&')
                .filter(|p| !p.is_empty())
                .take(32)
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    (k.to_string(), v.to_string())
                })
                .collect(),
        )
    }

    pub(super) fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub(super) fn number(&self, key: &str, default: u64, max: u64) -> Result<u64, String> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .parse::<u64>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| format!("`{key}` must be a whole number from 0 to {max}")),
        }
    }

    pub(super) fn flag(&self, key: &str, default: bool) -> Result<bool, String> {
        match self.get(key) {
            None => Ok(default),
            Some("1" | "true" | "yes") => Ok(true),
            Some("0" | "false" | "no") => Ok(false),
            Some(_) => Err(format!("`{key}` must be 1 or 0")),
        }
    }
}

/// Counts failed keys per client address over a minute. Bounded: past 10,000
/// addresses the table starts over (an attacker with that many addresses is not slowed by
/// a table anyway). Pure apart from the clock it is given.
#[derive(Default)]
pub struct FailureLimiter {
    by_addr: HashMap<IpAddr, (Instant, u32)>,
}

impl FailureLimiter {
    pub fn record(&mut self, addr: IpAddr, now: Instant) {
        if self.by_addr.len() >= 10_000 {
            self.by_addr.clear();
        }
        let e = self.by_addr.entry(addr).or_insert((now, 0));
        if now.duration_since(e.0) >= Duration::from_secs(60) {
            *e = (now, 0);
        }
        e.1 += 1;
    }

    pub fn blocked(&mut self, addr: IpAddr, now: Instant) -> bool {
        match self.by_addr.get(&addr) {
            Some(&(since, n)) if now.duration_since(since) < Duration::from_secs(60) => {
                n >= MAX_FAILURES_PER_MINUTE
            }
            Some(_) => {
                self.by_addr.remove(&addr);
                false
            }
            None => false,
        }
    }
}

/// What one status snapshot gives the handlers, made once for many requests.
pub struct Cached {
    pub status_json: Bytes,
    pub verdict: health::Verdict,
    pub reasons: Vec<String>,
}

/// One status answer, shared by every request it serves.
pub type Shared = Arc<Result<Cached, String>>;

/// Asks the master at most once at a time. A request takes the answer to a question
/// asked after it arrived, or asks itself: never stale, and a flood of clients costs the
/// master one status request after another rather than fifty at once.
pub struct SnapshotCache {
    dir: RuntimeDir,
    /// When the last question was asked, and its answer.
    last: tokio::sync::Mutex<Option<(Instant, Shared)>>,
}

impl SnapshotCache {
    fn new(dir: RuntimeDir) -> SnapshotCache {
        SnapshotCache {
            dir,
            last: tokio::sync::Mutex::new(None),
        }
    }

    pub async fn get(&self) -> Shared {
        let asked = Instant::now();
        let mut last = self.last.lock().await;
        if let Some((started, v)) = &*last
            && *started >= asked
        {
            return v.clone();
        }
        let started = Instant::now();
        let dir = self.dir.clone();
        let v = blocking(move || {
            let snap = status::snapshot(&dir)
                .map_err(|e| format!("nexus is not running in {} ({e})", dir.display()))?;
            let (verdict, reasons) = health::judge(&snap);
            let status_json = serde_json::to_vec(&snap).map_err(|e| e.to_string())?;
            Ok(Cached {
                status_json: status_json.into(),
                verdict,
                reasons,
            })
        })
        .await
        .unwrap_or_else(|| Err("the status task failed".into()));
        let v = Arc::new(v);
        *last = Some((started, v.clone()));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_keys_are_limited_per_address_for_a_minute() {
        let mut l = FailureLimiter::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..MAX_FAILURES_PER_MINUTE {
            assert!(!l.blocked(a, t0));
            l.record(a, t0);
        }
        assert!(l.blocked(a, t0 + Duration::from_secs(30)));
        assert!(!l.blocked(b, t0), "others are not affected");
        assert!(
            !l.blocked(a, t0 + Duration::from_secs(61)),
            "a minute later"
        );
    }

    #[test]
    fn query_parameters_are_checked() {
        let q = Query::parse(Some("n=5&follow=0&x"));
        assert_eq!(q.number("n", 20, 100), Ok(5));
        assert_eq!(q.flag("follow", true), Ok(false));
        assert_eq!(q.number("m", 20, 100), Ok(20));
        assert!(Query::parse(Some("n=-1")).number("n", 1, 9).is_err());
        assert!(Query::parse(Some("n=99")).number("n", 1, 9).is_err());
        assert!(
            Query::parse(Some("follow=maybe"))
                .flag("follow", true)
                .is_err()
        );
    }

    #[test]
    fn event_types_are_read_without_parsing() {
        assert_eq!(
            event_type_of(r#"{"ts":"x","event":"respawned","pid":1}"#),
            Some("respawned")
        );
        assert_eq!(event_type_of("garbage"), None);
    }
}
