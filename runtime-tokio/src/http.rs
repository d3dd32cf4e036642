//! HTTP: the accept loop, routing, the WebSocket upgrade, the REST API, health and
//! metrics. Requests are translated into engine inputs; the engine decides every answer.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use percent_encoding::percent_decode_str;
use switchboard_engine::rest::{RestAuth, RestRequest};
use switchboard_engine::ConnectParams;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;
use tokio_util::task::TaskTracker;
use tracing::{debug, debug_span, warn, Instrument};

use crate::engine_task::EngineHandle;
use crate::listener::Listener;
use crate::metrics::Metrics;
use crate::ws;

/// REST bodies above this are refused before reaching the engine.
const BODY_BYTES_MAX: usize = 5_000_000;

type Body = Full<Bytes>;

/// What every request handler shares.
#[derive(Clone)]
pub(crate) struct State {
    pub(crate) engine: EngineHandle,
    pub(crate) metrics: Arc<Metrics>,
    /// WebSocket tasks, so shutdown can wait for their close frames.
    pub(crate) sockets: TaskTracker,
    /// The largest message a client may send.
    pub(crate) message_bytes_max: usize,
    /// What unfinished messages of every socket may hold together.
    pub(crate) unfinished: Arc<ws::Budget>,
}

/// Accepts connections until `shutdown` completes; each is served on its own task.
pub(crate) async fn accept_loop<L: Listener>(
    listener: L,
    state: State,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut refusals = AcceptRefusals::default();
    loop {
        let (stream, peer) = tokio::select! {
            // Shutdown first, so a stream of new connections cannot delay it.
            biased;
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => {
                    refusals.backoff = None;
                    accepted
                }
                Err(e) => {
                    state.metrics.accept_errors.inc();
                    if let Some(pause) = refusals.note(&e) {
                        // Out of descriptors or memory: what is open keeps being served,
                        // and accepting resumes once something closes.
                        tokio::select! {
                            biased;
                            () = &mut shutdown => return,
                            () = tokio::time::sleep(pause) => {}
                        }
                    }
                    continue;
                }
            },
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| route(request, state.clone(), peer));
            // With a timer hyper enforces its 30 s limit on reading request headers, so a
            // client trickling bytes cannot hold a task forever.
            let served = http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            if let Err(e) = served.await {
                debug!(%peer, error = %e, "http connection ended");
            }
        });
    }
}

/// Accept failures: a backoff while the process is out of descriptors or memory, and a log
/// line at most every [`AcceptRefusals::LOG_EVERY`] with how many there were.
#[derive(Default)]
struct AcceptRefusals {
    /// The pause after the last failure, while failures continue.
    backoff: Option<Duration>,
    /// Failures since the last log line.
    unlogged: u64,
    logged_at: Option<Instant>,
}

impl AcceptRefusals {
    const FIRST: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_secs(1);
    const LOG_EVERY: Duration = Duration::from_secs(10);

    /// Counts a failure; returns how long to pause before accepting again, if at all.
    fn note(&mut self, error: &std::io::Error) -> Option<Duration> {
        // EMFILE, ENFILE, ENOBUFS, ENOMEM: accepting again at once would fail again.
        let exhausted = matches!(error.raw_os_error(), Some(24 | 23 | 105 | 12));
        self.unlogged += 1;
        if self
            .logged_at
            .is_none_or(|at| at.elapsed() >= Self::LOG_EVERY)
        {
            warn!(
                error = %error,
                failures = self.unlogged,
                "accept failed; open connections are still served (see README: raising the file descriptor limit)"
            );
            self.unlogged = 0;
            self.logged_at = Some(Instant::now());
        }
        if !exhausted {
            // A connection reset before it was accepted, say: nothing to wait for.
            return None;
        }
        let pause = self
            .backoff
            .map_or(Self::FIRST, |last| (last * 2).min(Self::MAX));
        self.backoff = Some(pause);
        Some(pause)
    }
}

fn respond(status: u16, content_type: Option<&'static str>, body: Bytes) -> Response<Body> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() =
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Some(content_type) = content_type {
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    }
    response
}

fn json(status: u16, body: Bytes) -> Response<Body> {
    let content_type = (!body.is_empty()).then_some("application/json");
    respond(status, content_type, body)
}

async fn route(
    request: Request<Incoming>,
    state: State,
    peer: SocketAddr,
) -> Result<Response<Body>, Infallible> {
    let path = request.uri().path().trim_end_matches('/').to_owned();
    let method = request.method().clone();
    let response = match (&method, path.as_str()) {
        (&Method::GET, "/realtime/v1/websocket" | "/socket/websocket") => {
            upgrade(request, state, peer).await
        }
        (&Method::GET, "/healthz" | "/api/health" | "/realtime/v1/api/health") => {
            json(200, Bytes::from_static(br#"{"status":"ok"}"#))
        }
        (&Method::GET, "/metrics") => respond(
            200,
            Some("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            Bytes::from(state.metrics.render()),
        ),
        (&Method::OPTIONS, _) if rest_path(&path).is_some() => {
            cors(respond(204, None, Bytes::new()))
        }
        (&Method::POST, _) => match rest_path(&path) {
            Some(target) => cors(rest(request, target, state).await),
            None => json(404, Bytes::from_static(br#"{"message":"Not found"}"#)),
        },
        _ => json(404, Bytes::from_static(br#"{"message":"Not found"}"#)),
    };
    Ok(response)
}

/// What a REST path addresses.
enum RestTarget {
    Batch,
    Single { topic: String, event: String },
}

fn rest_path(path: &str) -> Option<RestTarget> {
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

fn cors(mut response: Response<Body>) -> Response<Body> {
    let headers = response.headers_mut();
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("POST, OPTIONS"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("apikey, authorization, content-type, x-client-info"),
    );
    response
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn query(request: &Request<Incoming>, name: &str) -> Option<String> {
    let query = request.uri().query()?;
    form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

async fn rest(request: Request<Incoming>, target: RestTarget, state: State) -> Response<Body> {
    let auth = RestAuth {
        authorization: header(request.headers(), "authorization"),
        apikey: header(request.headers(), "apikey"),
    };
    let content_type = header(request.headers(), "content-type");
    let private = query(&request, "private").is_some_and(|p| p == "true");
    let body = match Limited::new(request.into_body(), BODY_BYTES_MAX)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return json(
                413,
                Bytes::from_static(br#"{"message":"Payload too large"}"#),
            )
        }
    };
    let request = match target {
        RestTarget::Batch => RestRequest::Broadcast { auth, body },
        RestTarget::Single { topic, event } => RestRequest::BroadcastEvent {
            auth,
            topic,
            event,
            private,
            content_type,
            body,
        },
    };
    let (status, body) = state.engine.rest(request).await;
    json(status, body)
}

async fn upgrade(mut request: Request<Incoming>, state: State, peer: SocketAddr) -> Response<Body> {
    let headers = request.headers();
    let is_upgrade = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let Some(key) = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .filter(|_| is_upgrade)
        .cloned()
    else {
        return json(
            400,
            Bytes::from_static(br#"{"error":"expected a WebSocket upgrade"}"#),
        );
    };
    let params = ConnectParams {
        vsn: query(&request, "vsn"),
        apikey: query(&request, "apikey"),
        x_api_key: header(request.headers(), "x-api-key"),
    };
    let conn = state.engine.next_conn();
    let end = match state.engine.connect(conn, params).await {
        Ok(end) => end,
        Err((status, body)) => return json(status, body),
    };
    let on_upgrade = hyper::upgrade::on(&mut request);
    let State {
        engine,
        metrics,
        sockets,
        message_bytes_max,
        unfinished,
    } = state;
    let socket = async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                debug!("socket open");
                let stream = WebSocketStream::from_raw_socket(
                    ws::Metered::new(TokioIo::new(upgraded), unfinished),
                    Role::Server,
                    Some(ws::config(message_bytes_max)),
                )
                .await;
                metrics.sockets.inc();
                ws::run(stream, conn, end, engine, metrics.clone()).await;
                metrics.sockets.dec();
            }
            Err(e) => {
                debug!(error = %e, "upgrade failed");
                engine.closed(conn).await;
            }
        }
    };
    sockets.spawn(socket.instrument(debug_span!("socket", conn = conn.0, %peer)));
    let mut response = respond(101, None, Bytes::new());
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    let accept = derive_accept_key(key.as_bytes());
    headers.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).expect("base64 is a valid header"),
    );
    response
}
