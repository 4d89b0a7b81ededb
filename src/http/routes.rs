//! Which handler a request is for: a pure function of its method and path, so every
//! path (and every malformed one) is unit-tested without a server. Names in paths are
//! held to a strict alphabet here; whether they exist is for the handler to say.

use super::keys::Scope;
use crate::protocol::ServiceAction;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Dashboard,
    Status,
    Health,
    Events,
    Metrics,
    OpenApi,
    /// The services' shape (instances, dependencies), for the dashboard's graph.
    Services,
    /// One log by name, or (None) every log merged.
    Logs(Option<String>),
    Service(String, ServiceAction),
    /// `ROLE-ID`: replace one daemon on purpose.
    RestartDaemon(String),
    Scale,
    Reload,
    ListTasks,
    SubmitTask,
    Task(i64),
    CancelTask(i64),
    RetryTask(i64),
    /// Who is asking (and, for a session, its CSRF token).
    Session,
    /// The dashboard's login (a key for a session cookie) and logout.
    Login,
    Logout,
    /// A known path asked with the wrong method: 405 with this Allow header.
    WrongMethod(&'static str),
    NotFound,
}

impl Route {
    /// The scope a key needs for this route (None: no key, the login page and form).
    pub fn needs(&self) -> Option<Scope> {
        match self {
            Route::Dashboard | Route::Login | Route::Logout | Route::WrongMethod(_) => None,
            Route::Service(..)
            | Route::RestartDaemon(_)
            | Route::Scale
            | Route::Reload
            | Route::SubmitTask
            | Route::CancelTask(_)
            | Route::RetryTask(_) => Some(Scope::Control),
            _ => Some(Scope::Read),
        }
    }

    /// Whether it changes something (POST): the dashboard's session must then also
    /// show its CSRF token.
    pub fn changes(&self) -> bool {
        self.needs() == Some(Scope::Control) || matches!(self, Route::Logout)
    }
}

/// A daemon, service or instance name: what the config allows, nothing a path could
/// be built from.
fn name(s: &str) -> Option<String> {
    (!s.is_empty()
        && s.len() <= 64
        && !s.starts_with(['.', '-'])
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.')))
    .then(|| s.to_string())
}

fn task_id(s: &str) -> Option<i64> {
    (!s.is_empty() && s.len() <= 18 && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

pub fn route(method: &str, path: &str) -> Route {
    let read = matches!(method, "GET" | "HEAD");
    let post = method == "POST";
    let get = |r: Route| {
        if read {
            r
        } else {
            Route::WrongMethod("GET, HEAD")
        }
    };
    let post_only = |r: Route| if post { r } else { Route::WrongMethod("POST") };
    match path {
        "/" => return get(Route::Dashboard),
        "/metrics" => return get(Route::Metrics),
        "/login" => return post_only(Route::Login),
        "/logout" => return post_only(Route::Logout),
        _ => {}
    }
    let Some(rest) = path.strip_prefix("/api/v1/") else {
        return Route::NotFound;
    };
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        ["status"] => get(Route::Status),
        ["health"] => get(Route::Health),
        ["events"] => get(Route::Events),
        ["openapi.json"] => get(Route::OpenApi),
        ["session"] => get(Route::Session),
        ["services"] => get(Route::Services),
        ["logs"] => get(Route::Logs(None)),
        ["logs", n] => name(n).map_or(Route::NotFound, |n| get(Route::Logs(Some(n)))),
        ["services", n, verb] => {
            let action = match *verb {
                "start" => ServiceAction::Start,
                "stop" => ServiceAction::Stop,
                "restart" => ServiceAction::Restart,
                _ => return Route::NotFound,
            };
            name(n).map_or(Route::NotFound, |n| post_only(Route::Service(n, action)))
        }
        ["daemons", n, "restart"] => {
            name(n).map_or(Route::NotFound, |n| post_only(Route::RestartDaemon(n)))
        }
        ["scale"] => post_only(Route::Scale),
        ["reload"] => post_only(Route::Reload),
        ["tasks"] => match method {
            "GET" | "HEAD" => Route::ListTasks,
            "POST" => Route::SubmitTask,
            _ => Route::WrongMethod("GET, HEAD, POST"),
        },
        ["tasks", id] => task_id(id).map_or(Route::NotFound, |id| get(Route::Task(id))),
        ["tasks", id, "cancel"] => {
            task_id(id).map_or(Route::NotFound, |id| post_only(Route::CancelTask(id)))
        }
        ["tasks", id, "retry"] => {
            task_id(id).map_or(Route::NotFound, |id| post_only(Route::RetryTask(id)))
        }
        _ => Route::NotFound,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_routes() {
        assert_eq!(route("GET", "/api/v1/status"), Route::Status);
        assert_eq!(route("HEAD", "/api/v1/health"), Route::Health);
        assert_eq!(route("GET", "/metrics"), Route::Metrics);
        assert_eq!(route("GET", "/"), Route::Dashboard);
        assert_eq!(
            route("POST", "/api/v1/status"),
            Route::WrongMethod("GET, HEAD")
        );
        assert_eq!(
            route("POST", "/api/v1/services/web/restart"),
            Route::Service("web".into(), ServiceAction::Restart)
        );
        assert_eq!(
            route("GET", "/api/v1/services/web/restart"),
            Route::WrongMethod("POST")
        );
        assert_eq!(
            route("POST", "/api/v1/daemons/workflow-3/restart"),
            Route::RestartDaemon("workflow-3".into())
        );
        assert_eq!(
            route("GET", "/api/v1/logs/web-2"),
            Route::Logs(Some("web-2".into()))
        );
        assert_eq!(route("GET", "/api/v1/logs"), Route::Logs(None));
        assert_eq!(route("POST", "/api/v1/tasks"), Route::SubmitTask);
        assert_eq!(route("GET", "/api/v1/tasks"), Route::ListTasks);
        assert_eq!(route("GET", "/api/v1/tasks/42"), Route::Task(42));
        assert_eq!(
            route("POST", "/api/v1/tasks/42/cancel"),
            Route::CancelTask(42)
        );
        assert_eq!(
            route("PUT", "/api/v1/tasks"),
            Route::WrongMethod("GET, HEAD, POST")
        );
    }

    #[test]
    fn malformed_paths_and_names_are_not_found() {
        for bad in [
            "/api/v1/status/",
            "/api/v1//status",
            "/api/v1/../v1/status",
            "/API/v1/status",
            "",
            "/api/v2/status",
            "/api/v1/logs/..",
            "/api/v1/logs/../../etc/passwd",
            "/api/v1/logs/%2e%2e",
            "/api/v1/logs/.hidden",
            "/api/v1/logs/a%2Fb",
            "/api/v1/logs/",
            "/api/v1/services/web/explode",
            "/api/v1/tasks/-1",
            "/api/v1/tasks/1e3",
            "/api/v1/tasks/99999999999999999999",
            "/index.html",
        ] {
            assert_eq!(route("GET", bad), Route::NotFound, "{bad}");
            assert_eq!(route("POST", bad), Route::NotFound, "{bad}");
        }
        let long = format!("/api/v1/logs/{}", "a".repeat(65));
        assert_eq!(route("GET", &long), Route::NotFound);
    }

    #[test]
    fn what_changes_needs_control() {
        assert_eq!(route("GET", "/api/v1/status").needs(), Some(Scope::Read));
        assert_eq!(route("POST", "/api/v1/scale").needs(), Some(Scope::Control));
        assert!(route("POST", "/api/v1/tasks/1/cancel").changes());
        assert!(!route("GET", "/api/v1/tasks/1").changes());
        assert_eq!(route("GET", "/").needs(), None);
    }
}
