//! The handlers that change something (all POST, all needing a `control` key) and the
//! task queue's reads; and the dashboard's login and logout. Each asks the master or the
//! queue over its socket from the blocking pool and answers with what it set in motion;
//! watching it happen is for `status` and `events`.

use std::net::IpAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use serde_json::{Value, json};

use super::server::{Body, Query, Server, blocking, error, header_str, json_bytes};
use super::session::{self, LIFETIME_MS};
use crate::client;
use crate::commands::{steer, task};
use crate::config::{Config, SlotName};
use crate::protocol::{
    ErrorKind, Request as MasterRequest, Response as MasterResponse, ServiceAction,
};
use crate::tasks::wire::{FromQueue, ToQueue};

/// Bodies: a task or a scale is small; a whole config for a reload may be large.
const MAX_BODY: usize = 1 << 20;
const MAX_CONFIG_BODY: usize = 8 << 20;
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

impl Server {
    /// `{"key": "nxk_…"}` for a session cookie and its CSRF token.
    pub(super) async fn login(&self, req: Request<Incoming>, peer: IpAddr) -> Response<Body> {
        let body = match json_body(req, 4096).await {
            Ok(v) => v,
            Err(r) => return r,
        };
        let Some(key) = body.get("key").and_then(Value::as_str) else {
            return error(StatusCode::BAD_REQUEST, "give {\"key\": \"nxk_…\"}");
        };
        let Some(entry) = self.keys.lock().unwrap().identify(key.trim().as_bytes()) else {
            self.record_failure(peer);
            return error(StatusCode::UNAUTHORIZED, "unknown or revoked key");
        };
        let Some(sessions) = &self.sessions else {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "sessions are unavailable (see the server's log)",
            );
        };
        let (cookie, csrf) = sessions.issue(&entry, crate::ledger::unix_ms_now());
        log::info!("dashboard login with key `{}`", entry.name);
        let body = json!({"name": entry.name, "scope": entry.scope.as_str(), "csrf": csrf});
        let mut r = json_bytes(StatusCode::OK, (body.to_string() + "\n").into());
        set_cookie(
            &mut r,
            &session::set_cookie(&cookie, LIFETIME_MS / 1000, self.tls),
        );
        r
    }

    pub(super) fn logout(&self) -> Response<Body> {
        let mut r = json_bytes(
            StatusCode::OK,
            Bytes::from_static(b"{\"logged_out\":true}\n"),
        );
        set_cookie(&mut r, &session::set_cookie("", 0, self.tls));
        r
    }

    pub(super) async fn service(&self, name: String, action: ServiceAction) -> Response<Body> {
        self.ask_master(MasterRequest::Service {
            action,
            target: name,
        })
        .await
    }

    pub(super) async fn restart_daemon(&self, name: String) -> Response<Body> {
        let Some(slot) = SlotName::parse(&name) else {
            return error(
                StatusCode::NOT_FOUND,
                &format!("`{name}` is not a daemon name (like workflow-3)"),
            );
        };
        self.ask_master(MasterRequest::Restart {
            role: slot.role,
            id: slot.id,
        })
        .await
    }

    /// `{"workflow": 8, "web": 3}`: new counts of daemons and service instances.
    pub(super) async fn scale(&self, req: Request<Incoming>) -> Response<Body> {
        let body = match json_body(req, MAX_BODY).await {
            Ok(v) => v,
            Err(r) => return r,
        };
        let Some(obj) = body.as_object().filter(|o| !o.is_empty()) else {
            return error(
                StatusCode::BAD_REQUEST,
                "give counts by name, like {\"workflow\": 8, \"web\": 3}",
            );
        };
        let mut assignments = Vec::new();
        for (k, v) in obj {
            let Some(n) = v.as_u64().filter(|n| *n <= u64::from(u32::MAX)) else {
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!("`{k}` must be a count, got {v}"),
                );
            };
            assignments.push(format!("{k}={n}"));
        }
        let dir = self.dir.clone();
        let sent = blocking(move || {
            let cfg = steer::scaled(&dir, &assignments)?;
            steer::send_config(&dir, &cfg)
        })
        .await;
        changes_or_error(sent)
    }

    /// A whole config (the JSON of a config file) for the running cluster, checked as
    /// `nexus reload` checks one: a bad one changes nothing.
    pub(super) async fn reload(&self, req: Request<Incoming>) -> Response<Body> {
        let text = match body_bytes(req, MAX_CONFIG_BODY).await {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(r) => return r,
        };
        let dir = self.dir.clone();
        let sent = blocking(move || {
            let cfg = Config::parse_and_check(&text)
                .map_err(|e| format!("{e}; the running cluster is untouched"))?;
            if cfg
                .services
                .iter()
                .any(|s| s.cwd.as_ref().is_some_and(|c| !c.is_absolute()))
            {
                return Err("a config sent to the API needs absolute `cwd`s (there is no file for them to be relative to); the running cluster is untouched".to_string());
            }
            let cfg = steer::reloadable(&dir, cfg)?;
            steer::send_config(&dir, &cfg)
        })
        .await;
        changes_or_error(sent)
    }

    /// `?state=S&after=ID&limit=N`: a page of tasks, as `nexus task list --json`.
    pub(super) async fn list_tasks(&self, req: &Request<Incoming>) -> Response<Body> {
        let q = Query::parse(req.uri().query());
        let (after, limit) = match (
            q.number("after", 0, i64::MAX as u64),
            q.number("limit", 50, 1000),
        ) {
            (Ok(a), Ok(l)) => (a as i64, l as u32),
            (Err(e), _) | (_, Err(e)) => return error(StatusCode::BAD_REQUEST, &e),
        };
        let state = q.get("state").map(str::to_string);
        if let Some(s) = &state
            && crate::tasks::lifecycle::TaskState::parse(s).is_none()
        {
            return error(
                StatusCode::BAD_REQUEST,
                "`state` is one of queued, running, retrying, succeeded, failed, cancelled",
            );
        }
        self.ask_queue(ToQueue::List {
            state,
            after,
            limit: limit.max(1),
        })
        .await
    }

    pub(super) async fn task(&self, id: i64) -> Response<Body> {
        self.ask_queue(ToQueue::Status { id }).await
    }

    pub(super) async fn task_verb(&self, id: i64, cancel: bool) -> Response<Body> {
        self.ask_queue(if cancel {
            ToQueue::Cancel { id }
        } else {
            ToQueue::Retry { id }
        })
        .await
    }

    /// The body is the task, as `nexus task submit JSON` takes it; the flags are query
    /// parameters: priority, max_attempts, timeout_ms, after, delay_ms, unique.
    pub(super) async fn submit_task(&self, req: Request<Incoming>) -> Response<Body> {
        let q = Query::parse(req.uri().query());
        let text = match body_bytes(req, MAX_BODY).await {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(r) => return r,
        };
        let num = |k: &str, max: u64| q.number(k, 0, max).map(|n| (q.get(k).is_some(), n));
        let parsed = (|| {
            let (has_p, p) = match q.get("priority") {
                Some(v) => (
                    true,
                    v.parse::<i64>()
                        .ok()
                        .filter(|p| p.abs() <= task::MAX_PRIORITY)
                        .ok_or("`priority` is a whole number from -1000 to 1000")?,
                ),
                None => (false, 0),
            };
            let (has_a, a) = num(
                "max_attempts",
                u64::from(crate::tasks::settings::MAX_ATTEMPTS),
            )?;
            let (has_t, t) = num("timeout_ms", crate::tasks::settings::MAX_TIMEOUT_MS)?;
            let (has_after, after) = num("after", i64::MAX as u64)?;
            let (_, delay) = num("delay_ms", 31_536_000_000)?;
            if has_a && a == 0 {
                return Err("`max_attempts` is at least 1".to_string());
            }
            Ok::<_, String>((
                has_p.then_some(p),
                has_a.then_some(a as u32),
                has_t.then_some(t),
                has_after.then_some(after as i64),
                delay,
                q.get("unique").map(super::views::percent_decode),
            ))
        })();
        let (priority, attempts, timeout, after, delay, unique) = match parsed {
            Ok(x) => x,
            Err(e) => return error(StatusCode::BAD_REQUEST, &e),
        };
        let dir = self.dir.clone();
        let made = blocking(move || {
            let cfg = Config::load(&dir.config_file()).map_err(|e| e.to_string())?;
            let mut s = task::submission(&text, &cfg, None, priority, attempts, timeout)?;
            s.delay_ms = delay;
            s.after = after;
            s.unique = unique;
            Ok::<_, String>(s)
        })
        .await;
        let new = match made {
            Some(Ok(s)) => s,
            Some(Err(e)) => return error(StatusCode::BAD_REQUEST, &e),
            None => return error(StatusCode::INTERNAL_SERVER_ERROR, "the submission failed"),
        };
        let mut r = self.ask_queue(ToQueue::Submit(new)).await;
        if r.status() == StatusCode::OK {
            *r.status_mut() = StatusCode::CREATED;
        }
        r
    }

    async fn ask_master(&self, req: MasterRequest) -> Response<Body> {
        let control = self.dir.control_socket();
        let answer =
            blocking(move || client::request(&control, &req, Duration::from_secs(5))).await;
        match answer {
            Some(Ok(MasterResponse::Applied { changes })) => changes_json(&changes),
            Some(Ok(MasterResponse::Error { kind, message })) => {
                let code = match kind {
                    ErrorKind::NoSuchSlot => StatusCode::NOT_FOUND,
                    ErrorKind::Stopping => StatusCode::SERVICE_UNAVAILABLE,
                    ErrorKind::Busy | ErrorKind::Stale => StatusCode::CONFLICT,
                    ErrorKind::Refused => StatusCode::BAD_REQUEST,
                };
                error(code, &message)
            }
            Some(Ok(other)) => error(
                StatusCode::BAD_GATEWAY,
                &format!("unexpected answer from the master: {other:?}"),
            ),
            Some(Err(e)) => error(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("the master did not answer: {e}"),
            ),
            None => error(StatusCode::INTERNAL_SERVER_ERROR, "the request failed"),
        }
    }

    async fn ask_queue(&self, req: ToQueue) -> Response<Body> {
        let dir = self.dir.clone();
        let answer = blocking(move || task::ask(&dir, &req)).await;
        let body = match answer {
            Some(Ok(FromQueue::Submitted { id })) => json!({ "id": id }),
            Some(Ok(FromQueue::Task { task })) => task,
            Some(Ok(FromQueue::Tasks { tasks, next })) => json!({"tasks": tasks, "next": next}),
            Some(Ok(FromQueue::Done { message })) => json!({ "message": message }),
            Some(Ok(other)) => {
                return error(
                    StatusCode::BAD_GATEWAY,
                    &format!("unexpected answer from the queue: {other:?}"),
                );
            }
            Some(Err(e)) if e.starts_with("no task ") => return error(StatusCode::NOT_FOUND, &e),
            Some(Err(e)) if e.starts_with("nexus is not running") => {
                return error(StatusCode::SERVICE_UNAVAILABLE, &e);
            }
            Some(Err(e)) => return error(StatusCode::CONFLICT, &e),
            None => return error(StatusCode::INTERNAL_SERVER_ERROR, "the request failed"),
        };
        json_bytes(StatusCode::OK, (body.to_string() + "\n").into())
    }
}

fn set_cookie(r: &mut Response<Body>, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
}

fn changes_json(changes: &[String]) -> Response<Body> {
    json_bytes(
        StatusCode::OK,
        (json!({ "changes": changes }).to_string() + "\n").into(),
    )
}

fn changes_or_error(sent: Option<Result<Vec<String>, String>>) -> Response<Body> {
    match sent {
        Some(Ok(c)) => changes_json(&c),
        Some(Err(e)) if e.starts_with("nexus is not running") => {
            error(StatusCode::SERVICE_UNAVAILABLE, &e)
        }
        Some(Err(e)) => error(StatusCode::BAD_REQUEST, &e),
        None => error(StatusCode::INTERNAL_SERVER_ERROR, "the request failed"),
    }
}

/// The body, at most `limit` bytes, within BODY_TIMEOUT; it must be JSON by its
/// Content-Type, which no cross-site form can send.
async fn body_bytes(req: Request<Incoming>, limit: usize) -> Result<Bytes, Response<Body>> {
    let json_type = header_str(&req, header::CONTENT_TYPE).is_some_and(|t| {
        t.split(';')
            .next()
            .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
    });
    if !json_type {
        return Err(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "the body must be Content-Type: application/json",
        ));
    }
    if let Some(len) =
        header_str(&req, header::CONTENT_LENGTH).and_then(|l| l.parse::<usize>().ok())
        && len > limit
    {
        return Err(too_large(limit));
    }
    let limited = http_body_util::Limited::new(req.into_body(), limit);
    match tokio::time::timeout(BODY_TIMEOUT, limited.collect()).await {
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(_)) => Err(too_large(limit)),
        Err(_) => Err(error(
            StatusCode::REQUEST_TIMEOUT,
            "the body did not arrive within 10 s",
        )),
    }
}

fn too_large(limit: usize) -> Response<Body> {
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!("the body is over {limit} bytes"),
    )
}

async fn json_body(req: Request<Incoming>, limit: usize) -> Result<Value, Response<Body>> {
    let b = body_bytes(req, limit).await?;
    serde_json::from_slice(&b).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            &format!("the body is not valid JSON: {e}"),
        )
    })
}
