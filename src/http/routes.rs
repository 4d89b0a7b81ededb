//! Which handler a request is for: a pure function of its method and path, so every
//! path (and every malformed one) is unit-tested without a server.

use super::keys::Scope;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Status,
    Health,
    Events,
    Metrics,
    /// A known path asked with the wrong method: 405 with this Allow header.
    WrongMethod(&'static str),
    NotFound,
}

impl Route {
    /// The scope a key needs for this route.
    pub fn needs(&self) -> Scope {
        Scope::Read
    }
}

pub fn route(method: &str, path: &str) -> Route {
    let get = |r: Route| {
        if method == "GET" || method == "HEAD" {
            r
        } else {
            Route::WrongMethod("GET, HEAD")
        }
    };
    match path {
        "/api/v1/status" => get(Route::Status),
        "/api/v1/health" => get(Route::Health),
        "/api/v1/events" => get(Route::Events),
        "/metrics" => get(Route::Metrics),
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
        assert_eq!(
            route("POST", "/api/v1/status"),
            Route::WrongMethod("GET, HEAD")
        );
        for bad in [
            "/api/v1/status/",
            "/api/v1//status",
            "/api/v1/../v1/status",
            "/API/v1/status",
            "",
            "/api/v2/status",
        ] {
            assert_eq!(route("GET", bad), Route::NotFound, "{bad}");
        }
    }
}
