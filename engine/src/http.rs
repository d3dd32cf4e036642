//! HTTP decisions: which route a request takes, and every answer that is not the REST
//! API's own (health, CORS preflight, not found, too large, not an upgrade). Runtimes only
//! parse and write HTTP; a runtime never decides a status or writes a body of its own.

use bytes::Bytes;
use percent_encoding::percent_decode_str;

use crate::rest::{RestAuth, RestRequest};

/// Where a request goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// `GET /realtime/v1/websocket` or `/socket/websocket`: a WebSocket upgrade, decided by
    /// [`crate::Input::Connect`].
    WebSocket,
    /// `GET /healthz`, `/api/health`, `/realtime/v1/api/health`: the process is up.
    Health,
    /// `GET /metrics`: the runtime's Prometheus exposition.
    Metrics,
    /// `GET /readyz`: whether the node can serve all it offers (the change stream is live,
    /// with a database), unlike [`Route::Health`], which only says the process is up.
    Ready,
    /// `OPTIONS` on a REST path: a CORS preflight.
    Preflight,
    /// `POST` to the broadcast API.
    Rest(RestTarget),
    /// Anything else.
    NotFound,
}

/// What a REST path addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RestTarget {
    /// `/realtime/v1/api/broadcast` (or `/api/broadcast`): a batch of messages.
    Batch,
    /// `…/api/broadcast/<topic>/events/<event>`: one message, its payload the body.
    Single {
        /// The channel name, percent-decoded.
        topic: String,
        /// The event name, percent-decoded.
        event: String,
    },
}

impl RestTarget {
    /// The engine's request for this target. `private` is the `?private=true` query.
    pub fn request(
        self,
        auth: RestAuth,
        content_type: Option<String>,
        private: bool,
        body: Bytes,
    ) -> RestRequest {
        match self {
            RestTarget::Batch => RestRequest::Broadcast { auth, body },
            RestTarget::Single { topic, event } => RestRequest::BroadcastEvent {
                auth,
                topic,
                event,
                private,
                content_type,
                body,
            },
        }
    }
}

/// The route of `method` on `path` (trailing slashes ignored).
pub fn route(method: &str, path: &str) -> Route {
    let path = path.trim_end_matches('/');
    match (method, path) {
        ("GET", "/realtime/v1/websocket" | "/socket/websocket") => Route::WebSocket,
        ("GET", "/healthz" | "/api/health" | "/realtime/v1/api/health") => Route::Health,
        ("GET", "/metrics") => Route::Metrics,
        ("GET", "/readyz") => Route::Ready,
        ("OPTIONS", _) if rest_target(path).is_some() => Route::Preflight,
        ("POST", _) => rest_target(path).map_or(Route::NotFound, Route::Rest),
        _ => Route::NotFound,
    }
}

fn rest_target(path: &str) -> Option<RestTarget> {
    let rest = path
        .strip_prefix("/realtime/v1")
        .unwrap_or(path)
        .strip_prefix("/api/broadcast")?;
    if rest.is_empty() {
        return Some(RestTarget::Batch);
    }
    let segments: Vec<&str> = rest.strip_prefix('/')?.split('/').collect();
    let decode = |s: &str| percent_decode_str(s).decode_utf8_lossy().into_owned();
    match segments.as_slice() {
        [topic, "events", event] => Some(RestTarget::Single {
            topic: decode(topic),
            event: decode(event),
        }),
        _ => None,
    }
}

/// An answer for the runtime to write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// HTTP status.
    pub status: u16,
    /// `Content-Type`, if the body has one.
    pub content_type: Option<&'static str>,
    /// The REST API's CORS headers ([`CORS`]) go with it.
    pub cors: bool,
    /// The body.
    pub body: Bytes,
}

/// The CORS headers of the REST API, as upstream sends them.
pub const CORS: [(&str, &str); 3] = [
    ("access-control-allow-origin", "*"),
    ("access-control-allow-methods", "POST, OPTIONS"),
    (
        "access-control-allow-headers",
        "apikey, authorization, content-type, x-client-info",
    ),
];

impl Response {
    /// A JSON answer (no content type when empty, as for 202).
    pub fn json(status: u16, body: Bytes) -> Response {
        Response {
            status,
            content_type: (!body.is_empty()).then_some("application/json"),
            cors: false,
            body,
        }
    }

    /// With the REST API's CORS headers.
    pub fn with_cors(mut self) -> Response {
        self.cors = true;
        self
    }

    /// `GET /healthz`.
    pub fn health() -> Response {
        Response::json(200, Bytes::from_static(br#"{"status":"ok"}"#))
    }

    /// `GET /readyz`: 200 when ready, 503 when not. `streaming` is `None` without a
    /// database, else whether the change stream is live; `nodes` is `None` outside a
    /// cluster, else how many other nodes are up (reported, not required: a node alone
    /// still serves its clients).
    pub fn ready(streaming: Option<bool>, nodes: Option<u64>) -> Response {
        let ready = streaming != Some(false);
        let body = serde_json::json!({
            "status": if ready { "ready" } else { "not ready" },
            "database": match streaming {
                None => "none",
                Some(true) => "streaming",
                Some(false) => "not streaming",
            },
            "cluster_nodes": nodes,
        });
        Response::json(if ready { 200 } else { 503 }, Bytes::from(body.to_string()))
    }

    /// The CORS preflight answer.
    pub fn preflight() -> Response {
        Response::json(204, Bytes::new()).with_cors()
    }

    /// An unknown route.
    pub fn not_found() -> Response {
        Response::json(404, Bytes::from_static(br#"{"message":"Not found"}"#))
    }

    /// A REST body over [`crate::Config::rest_body_bytes_max`].
    pub fn too_large() -> Response {
        Response::json(
            413,
            Bytes::from_static(br#"{"message":"Payload too large"}"#),
        )
        .with_cors()
    }

    /// A `GET` on a WebSocket path that is not an upgrade.
    pub fn not_an_upgrade() -> Response {
        Response::json(
            400,
            Bytes::from_static(br#"{"error":"expected a WebSocket upgrade"}"#),
        )
    }

    /// The Prometheus exposition the runtime rendered.
    pub fn metrics(text: String) -> Response {
        Response {
            status: 200,
            content_type: Some("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            cors: false,
            body: Bytes::from(text),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_match_upstream_paths() {
        assert_eq!(route("GET", "/realtime/v1/websocket"), Route::WebSocket);
        assert_eq!(route("GET", "/socket/websocket/"), Route::WebSocket);
        assert_eq!(route("GET", "/api/health"), Route::Health);
        assert_eq!(route("GET", "/readyz"), Route::Ready);
        assert_eq!(route("GET", "/metrics"), Route::Metrics);
        assert_eq!(
            route("POST", "/realtime/v1/api/broadcast"),
            Route::Rest(RestTarget::Batch)
        );
        assert_eq!(
            route("POST", "/api/broadcast/room%201/events/a%2Fb"),
            Route::Rest(RestTarget::Single {
                topic: "room 1".into(),
                event: "a/b".into()
            })
        );
        assert_eq!(
            route("OPTIONS", "/realtime/v1/api/broadcast"),
            Route::Preflight
        );
        assert_eq!(route("OPTIONS", "/elsewhere"), Route::NotFound);
        assert_eq!(route("POST", "/api/broadcast/x/y"), Route::NotFound);
        assert_eq!(route("GET", "/"), Route::NotFound);
    }

    #[test]
    fn readiness_needs_a_live_change_stream_only_when_there_is_a_database() {
        let body = |r: &Response| serde_json::from_slice::<serde_json::Value>(&r.body).unwrap();
        let alone = Response::ready(None, None);
        assert_eq!(alone.status, 200);
        assert_eq!(body(&alone)["database"], "none");
        let down = Response::ready(Some(false), Some(2));
        assert_eq!(down.status, 503);
        assert_eq!(body(&down)["status"], "not ready");
        assert_eq!(body(&down)["cluster_nodes"], 2);
        assert_eq!(Response::ready(Some(true), Some(0)).status, 200);
    }

    #[test]
    fn answers_carry_json_and_cors_where_upstream_does() {
        let ok = Response::json(202, Bytes::new()).with_cors();
        assert_eq!((ok.content_type, ok.cors), (None, true));
        assert_eq!(Response::not_found().content_type, Some("application/json"));
        assert_eq!(Response::too_large().status, 413);
    }
}
