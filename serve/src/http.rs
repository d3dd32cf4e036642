//! HTTP for every runtime: the accept loop, one task per connection that serves requests
//! with hyper and, after a WebSocket upgrade, goes on as the socket in the same task.
//! Which route a request takes and every answer come from the engine
//! ([`switchboard_engine::http`]); this module only parses and writes HTTP.
//!
//! The upgrade is taken by hand, the same way on every runtime: the service answers 101,
//! the connection is served `without_shutdown`, and its parts (the stream and whatever
//! hyper read past the request) become the WebSocket. hyper's own upgrade path needs a
//! `Send` stream, which a thread-per-core runtime's stream is not.

use std::cell::Cell;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_io::{AsyncRead, AsyncWrite};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use smol_hyper::rt::FuturesIo;
use switchboard_engine::http::{self as engine_http, Response as Answer, RestTarget, Route};
use switchboard_engine::rest::RestAuth;
use switchboard_engine::{ConnId, ConnectParams};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, debug_span, info, warn, Instrument};
use tungstenite::handshake::derive_accept_key;

use crate::clock::Clock;
use crate::engine_task::driver;
use crate::engine_task::{EngineHandle, Engined, SocketEnd};
use crate::metrics::Metrics;
use crate::runtime::{Runtime, Timer};
use crate::ws::{socket, Connection};
use crate::Options;

type Body = Full<Bytes>;

/// A source of connections: a runtime's TCP listener, or a simulated one.
pub trait Listener: 'static {
    /// One accepted connection.
    type Stream: AsyncRead + AsyncWrite + Unpin + 'static;

    /// Waits for the next connection.
    fn accept(&self) -> impl Future<Output = std::io::Result<(Self::Stream, SocketAddr)>>;
}

/// An engine's handle, for the subsystems (the WAL reader) that feed it inputs.
pub struct Server {
    handle: EngineHandle,
}

impl Server {
    /// An engine and its handle, made on any thread; the engine runs once the
    /// [`ServerTask`] runs, on the thread that serves it.
    pub fn new(options: Options) -> (Server, ServerTask) {
        let metrics = options.shared.metrics.clone();
        let drain_timeout = options.drain_timeout;
        let rest_body_bytes_max = options.config.rest_body_bytes_max;
        let (database, cluster) = (options.config.database, options.config.cluster);
        let development = (options.config.development)
            .then(|| Arc::<str>::from(options.config.jwt_secret.as_str()));
        let clock = options.clock.clone();
        let (handle, engined) = driver(options);
        let server = Server {
            handle: handle.clone(),
        };
        let task = ServerTask {
            state: State {
                rest: handle.clone(),
                engine: handle,
                metrics,
                rest_body_bytes_max,
                database,
                cluster,
                development,
                clock,
            },
            engined,
            drain_timeout,
        };
        (server, task)
    }

    /// A handle that feeds the engine.
    pub fn handle(&self) -> EngineHandle {
        self.handle.clone()
    }

    /// The servers of one process's shards, from each shard's options in shard order
    /// ([`Options::shards`], [`Options::replicas`]).
    ///
    /// Every shard hands its REST requests to the first shard's engine, whichever listener
    /// accepted them. A client that sends one REST broadcast after another opens a new
    /// connection now and then, which the kernel may put on another shard; were each handled
    /// where it landed, a later message delivered by its own shard would overtake an earlier
    /// one still crossing over from the other. Through one engine, each goes out in the
    /// order sent, locally or over the one FIFO link to each other shard.
    pub fn shards(options: Vec<Options>) -> (Vec<Server>, Vec<ServerTask>) {
        let (servers, mut tasks): (Vec<Server>, Vec<ServerTask>) =
            options.into_iter().map(Server::new).unzip();
        if let Some(first) = servers.first() {
            for task in &mut tasks {
                task.state.rest = first.handle();
            }
        }
        (servers, tasks)
    }
}

/// The serving half of a server: its engine and what accepting connections needs.
pub struct ServerTask {
    state: State,
    engined: Engined,
    drain_timeout: Duration,
}

impl ServerTask {
    /// Drives the engine and accepts connections from `listener` on `runtime`'s current
    /// thread until `shutdown` completes, then drains: every channel is told, every socket
    /// gets a close frame, bounded by the drain timeout.
    pub async fn run<R: Runtime, L: Listener>(
        self,
        runtime: R,
        listener: L,
        shutdown: impl Future<Output = ()>,
    ) {
        let ServerTask {
            state,
            engined,
            drain_timeout,
        } = self;
        let (done, driven) = oneshot::channel();
        let driver = engined.drive(runtime.clone());
        runtime.spawn(async move {
            driver.await;
            let _ = done.send(());
        });
        // Every socket holds a clone; the receiver learns when the last one is gone.
        let (sockets, mut sockets_gone) = mpsc::channel::<()>(1);
        accept_loop(listener, &state, &sockets, &runtime, shutdown).await;
        state.engine.shutdown();
        drop(sockets);
        let drained = async {
            let _ = driven.await;
            let _ = sockets_gone.recv().await;
        };
        let deadline = runtime.timer(runtime.now() + drain_timeout);
        tokio::select! {
            () = drained => {}
            () = deadline => info!(
                sockets = state.metrics.sockets.get(),
                "drain timeout: dropping sockets still flushing"
            ),
        }
    }
}

/// What every request handler shares.
#[derive(Clone)]
struct State {
    /// This shard's engine: its sockets' upgrades, frames and closes.
    engine: EngineHandle,
    /// The engine REST requests go to: the first shard's ([`Server::shards`]).
    rest: EngineHandle,
    metrics: Arc<Metrics>,
    /// REST bodies above this are refused unread.
    rest_body_bytes_max: usize,
    /// A database is configured: readiness needs its change stream.
    database: bool,
    /// The node is in a cluster: readiness reports the other nodes up.
    cluster: bool,
    /// The secret generated for this run, in development mode: the Inspector mints
    /// tokens with it for browsers on this machine.
    development: Option<Arc<str>>,
    /// Wall time, for the tokens the Inspector mints.
    clock: Clock,
}

/// Accepts connections until `shutdown` completes; each is served on its own task.
async fn accept_loop<L: Listener, R: Runtime>(
    listener: L,
    state: &State,
    sockets: &mpsc::Sender<()>,
    runtime: &R,
    shutdown: impl Future<Output = ()>,
) {
    let mut shutdown = pin!(shutdown);
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
                            () = runtime.timer(runtime.now() + pause) => {}
                        }
                    }
                    continue;
                }
            },
        };
        let connection = connection(
            stream,
            peer.ip().is_loopback(),
            state.clone(),
            sockets.clone(),
            runtime.clone(),
        );
        runtime.spawn(connection.instrument(debug_span!("connection", %peer)));
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

/// How long a connection may go without starting a request while none is being served:
/// a client trickling header bytes, or an idle keep-alive connection, is dropped after
/// this (and at most twice this). hyper's own header timeout needs a `Send` timer, which a
/// thread-per-core runtime's is not; this watchdog uses the runtime's.
const REQUEST_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The requests of one connection, as the idle watchdog sees them.
#[derive(Default)]
struct Activity {
    /// Requests whose headers were read.
    started: Cell<u64>,
    /// Requests being answered.
    in_flight: Cell<u32>,
}

/// Counts a request in flight while it lives.
struct InFlight(Rc<Activity>);

impl InFlight {
    fn new(activity: Rc<Activity>) -> InFlight {
        activity.started.set(activity.started.get() + 1);
        activity.in_flight.set(activity.in_flight.get() + 1);
        InFlight(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.set(self.0.in_flight.get() - 1);
    }
}

/// The socket an answered upgrade hands over once its 101 is written.
type Accepted = Rc<Cell<Option<(ConnId, SocketEnd)>>>;

/// Serves one connection: HTTP requests until it closes or upgrades, then the WebSocket.
///
/// Everything the HTTP phase holds (hyper's connection and buffers, the server's state)
/// moves into its boxed future, freed before the socket phase, which an idle socket spends
/// its life in: the task then holds the socket's state and nothing else.
fn connection<S, R>(
    io: S,
    peer_is_loopback: bool,
    state: State,
    sockets: mpsc::Sender<()>,
    runtime: R,
) -> impl Future<Output = ()>
where
    S: AsyncRead + AsyncWrite + Unpin + 'static,
    R: Runtime,
{
    let http = Box::pin(http(io, peer_is_loopback, state, sockets, runtime));
    async move {
        let Some(socket) = http.await else {
            return;
        };
        socket.await;
    }
}

/// Serves HTTP requests until the connection closes, or upgrades: then the socket, to be
/// served on.
async fn http<S, R>(
    io: S,
    peer_is_loopback: bool,
    state: State,
    sockets: mpsc::Sender<()>,
    runtime: R,
) -> Option<Connection<S, R>>
where
    S: AsyncRead + AsyncWrite + Unpin + 'static,
    R: Runtime,
{
    let accepted: Accepted = Rc::default();
    let activity = Rc::new(Activity::default());
    let service = {
        let (state, accepted, activity) = (state.clone(), accepted.clone(), activity.clone());
        service_fn(move |request| {
            let in_flight = InFlight::new(activity.clone());
            let answer = route(request, peer_is_loopback, state.clone(), accepted.clone());
            Box::pin(async move {
                let answer = answer.await;
                drop(in_flight);
                Ok::<_, Infallible>(answer)
            })
        })
    };
    let served = http1::Builder::new()
        .serve_connection(FuturesIo::new(io), service)
        .without_shutdown();
    let parts = watched(served, &activity, &runtime).await;
    let upgrade = accepted.take();
    match parts {
        Some(Ok(parts)) => {
            let (conn, end) = upgrade?;
            debug!(conn = conn.0, "socket open");
            let (io, read) = (parts.io.into_inner(), parts.read_buf.to_vec());
            Some(socket(io, read, conn, end, state.engine, runtime, sockets))
        }
        Some(Err(e)) => {
            debug!(error = %e, "http connection ended");
            if let Some((conn, _)) = upgrade {
                state.engine.closed(conn).await;
            }
            None
        }
        None => {
            debug!("http connection idle: dropped");
            None
        }
    }
}

/// Runs `served` until it completes, or `None` once no request started for
/// [`REQUEST_IDLE_TIMEOUT`] while none was being answered.
async fn watched<F: Future, R: Runtime>(
    served: F,
    activity: &Activity,
    runtime: &R,
) -> Option<F::Output> {
    let mut served = pin!(served);
    let mut timer = runtime.timer(runtime.now() + REQUEST_IDLE_TIMEOUT);
    let mut seen = activity.started.get();
    loop {
        tokio::select! {
            biased;
            output = &mut served => return Some(output),
            () = &mut timer => {
                let started = activity.started.get();
                if started == seen && activity.in_flight.get() == 0 {
                    return None;
                }
                seen = started;
                timer.reset(runtime.now() + REQUEST_IDLE_TIMEOUT);
            }
        }
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
    peer_is_loopback: bool,
    state: State,
    accepted: Accepted,
) -> Response<Body> {
    let local = || {
        let host = header(request.headers(), "host");
        engine_http::is_local(peer_is_loopback, host.as_deref())
    };
    let answer = match engine_http::route(request.method().as_str(), request.uri().path()) {
        Route::WebSocket => return upgrade(request, state, accepted).await,
        Route::Health => Answer::health(),
        Route::Metrics => Answer::metrics(state.metrics.render()),
        Route::Ready => Answer::ready(
            state
                .database
                .then(|| state.metrics.replication_live.get() == 1),
            state
                .cluster
                .then(|| state.metrics.cluster_nodes.get().max(0) as u64),
        ),
        Route::Inspector => Answer::inspector(),
        Route::InspectorInfo => Answer::inspector_info(
            state.development.as_deref(),
            local(),
            state.clock.unix_secs(),
        ),
        Route::InspectorToken => {
            let local = local();
            match body(request, INSPECTOR_BODY_BYTES_MAX).await {
                Some(body) => Answer::inspector_token(
                    state.development.as_deref(),
                    local,
                    state.clock.unix_secs(),
                    &body,
                ),
                None => Answer::too_large(),
            }
        }
        Route::Preflight => Answer::preflight(),
        Route::Rest(target) => rest(request, target, state).await,
        Route::NotFound => Answer::not_found(),
    };
    respond(answer)
}

/// Largest body of a token request from the Inspector (a role, a `sub` and a lifetime).
const INSPECTOR_BODY_BYTES_MAX: usize = 4096;

/// The request's body, or `None` once it passes `max` bytes (the rest is left unread).
async fn body(request: Request<Incoming>, max: usize) -> Option<Bytes> {
    let collected = Limited::new(request.into_body(), max).collect().await;
    collected.ok().map(|collected| collected.to_bytes())
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
    let Some(body) = body(request, state.rest_body_bytes_max).await else {
        return Answer::too_large();
    };
    let request = target.request(auth, content_type, private, body);
    let (status, body) = state.rest.rest(request).await;
    Answer::json(status, body).with_cors()
}

/// Answers an upgrade request: 101 with the socket's end left in `accepted`, or the
/// engine's refusal.
async fn upgrade(request: Request<Incoming>, state: State, accepted: Accepted) -> Response<Body> {
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
    if let Some((earlier, _)) = accepted.replace(Some((conn, end))) {
        // Only one upgrade per connection is ever written; an earlier one never was.
        state.engine.closed(earlier).await;
    }
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

#[cfg(test)]
mod tests {
    use std::pin::Pin;

    use super::*;

    /// tokio's paused clock as the serving core's runtime.
    #[derive(Clone)]
    struct Paused;

    struct Sleep(Pin<Box<tokio::time::Sleep>>);

    impl Future for Sleep {
        type Output = ();

        fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
            self.0.as_mut().poll(cx)
        }
    }

    impl Timer for Sleep {
        fn reset(&mut self, at: Instant) {
            self.0.as_mut().reset(at.into());
        }
    }

    impl Runtime for Paused {
        type Timer = Sleep;

        fn now(&self) -> Instant {
            tokio::time::Instant::now().into_std()
        }

        fn timer(&self, at: Instant) -> Sleep {
            Sleep(Box::pin(tokio::time::sleep_until(at.into())))
        }

        fn spawn(&self, future: impl Future<Output = ()> + 'static) {
            tokio::task::spawn_local(future);
        }
    }

    /// Runs `watched` over a connection that never ends while `act` plays the client;
    /// returns when the watchdog dropped it.
    async fn dropped_after(act: impl Future<Output = ()>, activity: Rc<Activity>) -> Duration {
        let start = tokio::time::Instant::now();
        let watching = watched(std::future::pending::<()>(), &activity, &Paused);
        tokio::select! {
            biased;
            output = watching => assert!(output.is_none(), "a pending connection never ends"),
            () = act => panic!("the watchdog let the connection outlive the client's act"),
        }
        start.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_starts_no_request_is_dropped() {
        let activity = Rc::new(Activity::default());
        let waited = dropped_after(std::future::pending(), activity).await;
        assert_eq!(waited, REQUEST_IDLE_TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn requests_keep_a_connection_and_an_idle_one_goes_after_its_last() {
        let activity = Rc::new(Activity::default());
        let client = {
            let activity = activity.clone();
            async move {
                for _ in 0..5 {
                    drop(InFlight::new(activity.clone()));
                    tokio::time::sleep(Duration::from_secs(20)).await;
                }
                std::future::pending::<()>().await;
            }
        };
        let waited = dropped_after(client, activity).await;
        // Requests at 0, 20, …, 80 s; the watchdog looks every 30 s and drops the
        // connection at the first look that saw no request since the one before: at 120 s,
        // 40 s after the last.
        assert_eq!(waited, Duration::from_secs(120));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_being_answered_is_never_cut_off() {
        let activity = Rc::new(Activity::default());
        let client = {
            let activity = activity.clone();
            async move {
                let answering = InFlight::new(activity.clone());
                tokio::time::sleep(Duration::from_secs(300)).await;
                drop(answering);
                std::future::pending::<()>().await;
            }
        };
        let waited = dropped_after(client, activity).await;
        assert!(
            waited >= Duration::from_secs(300) + REQUEST_IDLE_TIMEOUT,
            "{waited:?}"
        );
        assert!(
            waited <= Duration::from_secs(300) + REQUEST_IDLE_TIMEOUT * 2,
            "{waited:?}"
        );
    }

    /// What a client sends in a property case, and which head it starts with: maybe an
    /// upgrade request, and whatever bytes follow it in the same write (so hyper reads
    /// some of them past the request and must hand them over), then more, then its end.
    fn client_bytes() -> impl proptest::strategy::Strategy<Value = (usize, Vec<u8>)> {
        use proptest::prelude::*;
        let key = switchboard_engine::auth::sign(
            "s",
            &serde_json::json!({"role": "anon", "exp": 4_000_000_000u64}),
        );
        let upgrade = format!(
            "GET /realtime/v1/websocket?vsn=2.0.0&apikey={key} HTTP/1.1\r\nhost: x\r\n\
             upgrade: websocket\r\nconnection: upgrade\r\nsec-websocket-version: 13\r\n\
             sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        );
        // A masked text frame holding a heartbeat, as a client sends it.
        let heartbeat = {
            let text = br#"[null,"1","phoenix","heartbeat",{}]"#;
            let mut frame = vec![0x81, 0x80 | text.len() as u8, 1, 2, 3, 4];
            frame.extend(
                text.iter()
                    .enumerate()
                    .map(|(i, b)| b ^ [1, 2, 3, 4][i % 4]),
            );
            frame
        };
        let heads = [
            Vec::new(),
            upgrade.clone().into_bytes(),
            [upgrade.as_bytes(), &heartbeat].concat(),
            b"POST /realtime/v1/api/broadcast HTTP/1.1\r\ncontent-length: 5\r\n\r\n".to_vec(),
        ];
        (
            0..heads.len(),
            proptest::collection::vec(any::<u8>(), 0..512),
        )
            .prop_map(move |(head, tail)| (head, [heads[head].as_slice(), &tail].concat()))
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]

        /// Whatever a client sends, the connection task ends once the client is gone:
        /// no panic, no task left behind, and the engine keeps serving.
        #[test]
        fn any_bytes_end_in_a_finished_connection((head, bytes) in client_bytes()) {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            use tokio_util::compat::TokioAsyncReadCompatExt;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .start_paused(true)
                .build()
                .expect("a runtime");
            tokio::task::LocalSet::new().block_on(&runtime, async move {
                let config = switchboard_engine::Config {
                    jwt_secret: "s".into(),
                    ..switchboard_engine::Config::default()
                };
                let (server, task) = Server::new(Options::new(config));
                let ServerTask { state, engined, .. } = task;
                tokio::task::spawn_local(engined.drive(Paused));
                let (ours, theirs) = tokio::io::duplex(64 << 10);
                let (sockets, mut sockets_gone) = mpsc::channel::<()>(1);
                let served = tokio::task::spawn_local(connection(
                    ours.compat(),
                    true,
                    state,
                    sockets,
                    Paused,
                ));
                let mut client = theirs;
                let _ = client.write_all(&bytes).await;
                // A client that stays a moment: what it sent is answered before it leaves.
                tokio::time::sleep(Duration::from_secs(1)).await;
                let _ = client.shutdown().await;
                let mut answer = Vec::new();
                let _ = client.read_to_end(&mut answer).await;
                if head == 1 || head == 2 {
                    assert!(answer.starts_with(b"HTTP/1.1 101"), "upgraded");
                }
                if head == 2 {
                    // The frame hyper read past the request reached the engine.
                    let reply = br#""phoenix","phx_reply",{"status":"ok""#;
                    assert!(answer.windows(reply.len()).any(|w| w == reply), "heartbeat answered: {:?}", String::from_utf8_lossy(&answer));
                }
                let ended = tokio::time::timeout(REQUEST_IDLE_TIMEOUT * 3, served).await;
                assert!(matches!(ended, Ok(Ok(()))), "the connection ended: {ended:?}");
                assert!(sockets_gone.recv().await.is_none(), "no socket outlives it");
                // The engine still answers.
                let (status, _) = server
                    .handle()
                    .rest(RestTarget::Batch.request(
                        RestAuth { authorization: None, apikey: None },
                        None,
                        false,
                        Bytes::new(),
                    ))
                    .await;
                assert_eq!(status, 401);
            });
        }
    }
}
