//! HTTP decisions: which route a request takes, and every answer that is not the REST
//! API's own (health, CORS preflight, not found, too large, not an upgrade). Runtimes only
//! parse and write HTTP; a runtime never decides a status or writes a body of its own.

use bytes::Bytes;
use percent_encoding::percent_decode_str;

use crate::auth;
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
    /// `GET /` or `/inspector`: the Inspector page, to try channels from a browser.
    Inspector,
    /// `GET /inspector/info`: what the page fills in (the anon key in development mode).
    InspectorInfo,
    /// `POST /inspector/token`: a token minted for the page, in development mode only.
    InspectorToken,
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
        ("GET", "" | "/inspector") => Route::Inspector,
        ("GET", "/inspector/info") => Route::InspectorInfo,
        ("POST", "/inspector/token") => Route::InspectorToken,
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

/// Whether a request comes from a browser on this machine: its peer address is loopback
/// and so is the `Host` it asked for. The host check keeps out pages of other sites that
/// reach a loopback port through DNS rebinding, and requests relayed by a proxy for a
/// public name.
pub fn is_local(peer_is_loopback: bool, host: Option<&str>) -> bool {
    let Some(host) = host else {
        return false;
    };
    // `[::1]:4000`, `127.0.0.1:4000`, `localhost`: the name without its port.
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => host.split(':').next().unwrap_or_default(),
    };
    let loopback_name = name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    peer_is_loopback && loopback_name
}

/// What the Inspector page asks to mint: `{"role": "...", "sub": "...", "exp": seconds}`.
#[derive(serde::Deserialize)]
struct TokenRequest {
    role: String,
    #[serde(default)]
    sub: Option<String>,
    #[serde(default = "TokenRequest::hour")]
    exp: u64,
}

impl TokenRequest {
    fn hour() -> u64 {
        3_600
    }
}

/// Longest lifetime the Inspector mints: 30 days.
const INSPECTOR_TOKEN_SECS_MAX: u64 = 30 * 86_400;

/// The Inspector page: one file, no dependency, served from the binary.
const INSPECTOR_HTML: &str = include_str!("inspector.html");

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

    /// `GET /`: the Inspector page.
    pub fn inspector() -> Response {
        Response {
            status: 200,
            content_type: Some("text/html; charset=utf-8"),
            cors: false,
            body: Bytes::from_static(INSPECTOR_HTML.as_bytes()),
        }
    }

    /// `GET /inspector/info`: in development mode (`development` holds the secret
    /// generated for this run), an anon key for a browser on this machine, minted at `now`
    /// (Unix seconds) for a day, so the page works at once.
    pub fn inspector_info(development: Option<&str>, local: bool, now: u64) -> Response {
        let secret = development.filter(|_| local);
        let body = serde_json::json!({
            "development": development.is_some(),
            "minting": secret.is_some(),
            "anon_key": secret.map(|secret| auth::mint(secret, "anon", None, now, 86_400)),
        });
        Response::json(200, Bytes::from(body.to_string()))
    }

    /// `POST /inspector/token`: a token for the role and `sub` asked, minted at `now` with
    /// the development secret, for a browser on this machine only. With a secret of the
    /// operator's, keys come from `switchboard token`: the server never mints them.
    pub fn inspector_token(
        development: Option<&str>,
        local: bool,
        now: u64,
        body: &[u8],
    ) -> Response {
        let refuse = |status: u16, message: &str| {
            let body = serde_json::json!({ "message": message });
            Response::json(status, Bytes::from(body.to_string()))
        };
        let Some(secret) = development else {
            return refuse(
                403,
                "this server has a JWT secret of its own: mint tokens with `switchboard token --role R --sub S`",
            );
        };
        if !local {
            return refuse(
                403,
                "tokens are minted only for a browser on the server's own machine",
            );
        }
        let asked: TokenRequest = match serde_json::from_slice(body) {
            Ok(asked) => asked,
            Err(e) => {
                return refuse(
                    400,
                    &format!("expected {{\"role\", \"sub\", \"exp\"}}: {e}"),
                )
            }
        };
        if asked.role.is_empty() || !(1..=INSPECTOR_TOKEN_SECS_MAX).contains(&asked.exp) {
            return refuse(
                400,
                "role must not be empty and exp must be 1 to 2592000 seconds",
            );
        }
        let sub = asked.sub.as_deref().filter(|s| !s.is_empty());
        let token = auth::mint(secret, &asked.role, sub, now, asked.exp);
        Response::json(
            200,
            Bytes::from(serde_json::json!({ "token": token }).to_string()),
        )
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
        assert_eq!(route("GET", "/"), Route::Inspector);
        assert_eq!(route("GET", "/inspector/"), Route::Inspector);
        assert_eq!(route("GET", "/inspector/info"), Route::InspectorInfo);
        assert_eq!(route("POST", "/inspector/token"), Route::InspectorToken);
        assert_eq!(route("GET", "/inspector/token"), Route::NotFound);
        assert_eq!(route("GET", "/elsewhere"), Route::NotFound);
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
    fn only_a_browser_on_this_machine_is_local() {
        assert!(is_local(true, Some("127.0.0.1:4000")));
        assert!(is_local(true, Some("localhost")));
        assert!(is_local(true, Some("[::1]:4000")));
        // DNS rebinding: a loopback peer asking for another site's name.
        assert!(!is_local(true, Some("evil.example:4000")));
        // A proxy relaying a public name, or a remote peer.
        assert!(!is_local(true, Some("realtime.example.com")));
        assert!(!is_local(false, Some("127.0.0.1:4000")));
        assert!(!is_local(true, None));
    }

    #[test]
    fn the_inspector_mints_only_in_development_for_local_browsers() {
        let body = |r: &Response| serde_json::from_slice::<serde_json::Value>(&r.body).unwrap();
        let operator = None;
        let development = Some("development-secret");
        let asked = br#"{"role":"authenticated","sub":"user-1","exp":60}"#;
        let operated = Response::inspector_token(operator, true, 1_000, asked);
        assert_eq!(operated.status, 403);
        assert!(body(&operated)["message"]
            .as_str()
            .unwrap()
            .contains("switchboard token"));
        assert_eq!(
            body(&Response::inspector_info(operator, true, 1_000))["anon_key"],
            serde_json::Value::Null
        );

        assert_eq!(
            Response::inspector_token(development, false, 1_000, asked).status,
            403
        );
        assert_eq!(
            Response::inspector_token(development, true, 1_000, b"{").status,
            400
        );
        let too_long = br#"{"role":"anon","exp":99999999}"#;
        assert_eq!(
            Response::inspector_token(development, true, 1_000, too_long).status,
            400
        );

        let minted = Response::inspector_token(development, true, 1_000, asked);
        assert_eq!(minted.status, 200);
        let token = body(&minted)["token"].as_str().unwrap().to_owned();
        let claims = auth::Verifier::new("development-secret")
            .verify(&token, 1_030_000)
            .expect("a valid token");
        assert_eq!(claims.role, "authenticated");
        assert_eq!(claims.all["sub"], "user-1");
        assert!(auth::Verifier::new("development-secret")
            .verify(&token, 1_061_000)
            .is_err());

        let info = body(&Response::inspector_info(development, true, 1_000));
        let anon = info["anon_key"].as_str().unwrap();
        let claims = auth::Verifier::new("development-secret")
            .verify(anon, 1_000_000)
            .unwrap();
        assert_eq!(claims.role, "anon");
        assert_eq!(
            body(&Response::inspector_info(development, false, 1_000))["anon_key"],
            serde_json::Value::Null
        );
    }

    #[test]
    fn the_inspector_page_is_one_self_contained_file() {
        let page = Response::inspector();
        assert_eq!(page.content_type, Some("text/html; charset=utf-8"));
        let html = std::str::from_utf8(&page.body).unwrap();
        assert!(html.contains("<title>switchboard inspector</title>"));
        // Nothing from another origin: it must work with no network beyond the server.
        for external in ["http://", "https://", "//cdn", "@import"] {
            assert!(!html.contains(external), "the page loads {external}");
        }
    }

    #[test]
    fn answers_carry_json_and_cors_where_upstream_does() {
        let ok = Response::json(202, Bytes::new()).with_cors();
        assert_eq!((ok.content_type, ok.cors), (None, true));
        assert_eq!(Response::not_found().content_type, Some("application/json"));
        assert_eq!(Response::too_large().status, 413);
    }
}
