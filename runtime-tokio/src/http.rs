//! HTTP: the accept loop, the WebSocket upgrade and reading REST bodies. Which route a
//! request takes and every answer come from the engine ([`switchboard_engine::http`]);
//! this module only parses and writes HTTP with hyper.

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
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use switchboard_engine::http::{self as engine_http, Response as Answer, RestTarget, Route};
use switchboard_engine::rest::RestAuth;
use switchboard_engine::ConnectParams;
use switchboard_serve::{EngineHandle, Metrics};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_util::compat::TokioAsyncReadCompatExt;
use tokio_util::task::TaskTracker;
use tracing::{debug, debug_span, warn, Instrument};

use crate::listener::Listener;
use crate::Tokio;

type Body = Full<Bytes>;

/// What every request handler shares.
#[derive(Clone)]
pub(crate) struct State {
    pub(crate) engine: EngineHandle,
    pub(crate) metrics: Arc<Metrics>,
    /// WebSocket tasks, so shutdown can wait for their close frames.
    pub(crate) sockets: TaskTracker,
    /// REST bodies above this are refused unread.
    pub(crate) rest_body_bytes_max: usize,
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

/// Writes the engine's answer.
fn respond(answer: Answer) -> Response<Body> {
    let mut response = Response::new(Full::new(answer.body));
    *response.status_mut() =
        StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    if let Some(content_type) = answer.content_type {
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    }
    if answer.cors {
        for (name, value) in engine_http::CORS {
            headers.insert(name, HeaderValue::from_static(value));
        }
    }
    response
}

async fn route(
    request: Request<Incoming>,
    state: State,
    peer: SocketAddr,
) -> Result<Response<Body>, Infallible> {
    let answer = match engine_http::route(request.method().as_str(), request.uri().path()) {
        Route::WebSocket => return Ok(upgrade(request, state, peer).await),
        Route::Health => Answer::health(),
        Route::Metrics => Answer::metrics(state.metrics.render()),
        Route::Preflight => Answer::preflight(),
        Route::Rest(target) => rest(request, target, state).await,
        Route::NotFound => Answer::not_found(),
    };
    Ok(respond(answer))
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

async fn rest(request: Request<Incoming>, target: RestTarget, state: State) -> Answer {
    let auth = RestAuth {
        authorization: header(request.headers(), "authorization"),
        apikey: header(request.headers(), "apikey"),
    };
    let content_type = header(request.headers(), "content-type");
    let private = query(&request, "private").is_some_and(|p| p == "true");
    let body = match Limited::new(request.into_body(), state.rest_body_bytes_max)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(_) => return Answer::too_large(),
    };
    let request = target.request(auth, content_type, private, body);
    let (status, body) = state.engine.rest(request).await;
    Answer::json(status, body).with_cors()
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
        return respond(Answer::not_an_upgrade());
    };
    let params = ConnectParams {
        vsn: query(&request, "vsn"),
        apikey: query(&request, "apikey"),
        x_api_key: header(request.headers(), "x-api-key"),
    };
    let conn = state.engine.next_conn();
    let end = match state.engine.connect(conn, params).await {
        Ok(end) => end,
        Err((status, body)) => return respond(Answer::json(status, body)),
    };
    let on_upgrade = hyper::upgrade::on(&mut request);
    let State {
        engine, sockets, ..
    } = state;
    let socket = async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                debug!("socket open");
                let io = TokioIo::new(upgraded).compat();
                switchboard_serve::socket(io, conn, end, engine, Tokio).await;
            }
            Err(e) => {
                debug!(error = %e, "upgrade failed");
                engine.closed(conn).await;
            }
        }
    };
    sockets.spawn(socket.instrument(debug_span!("socket", conn = conn.0, %peer)));
    let mut response = respond(Answer::json(101, Bytes::new()));
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
