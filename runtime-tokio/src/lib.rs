//! switchboard on tokio: the adapter that accepts connections, speaks HTTP with hyper and
//! spawns the serving core's futures ([`switchboard_serve`]) on tokio, plus the database
//! side of postgres_changes (tokio-postgres, pg_walstream).
//!
//! The core does the rest: one task owns the [`Engine`](switchboard_engine::Engine) and
//! carries out its outputs; each socket is one task that feeds the engine what it reads and
//! writes what the engine hands its outbox. Every protocol decision is the engine's.
//! [`serve`] is generic over its listener, so the simulator runs this very code on
//! turmoil's simulated network.

mod http;
mod listener;
pub mod postgres;

pub use listener::Listener;
pub use switchboard_serve::{
    shard_links, to_shards, Clock, EngineHandle, Metrics, Options, PeerEvent, PeerLink, PeerOut,
    Shared, WallClock,
};

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::task::TaskTracker;
use tracing::info;

/// tokio's time for the serving core: virtual under turmoil, like the rest of tokio's.
#[derive(Clone, Copy, Debug, Default)]
pub struct Tokio;

/// A tokio sleep that can be moved.
pub struct TokioTimer(Pin<Box<tokio::time::Sleep>>);

impl switchboard_serve::Runtime for Tokio {
    type Timer = TokioTimer;

    fn now(&self) -> std::time::Instant {
        tokio::time::Instant::now().into_std()
    }

    fn timer(&self, at: std::time::Instant) -> TokioTimer {
        TokioTimer(Box::pin(tokio::time::sleep_until(at.into())))
    }
}

impl switchboard_serve::Timer for TokioTimer {
    fn reset(&mut self, at: std::time::Instant) {
        self.0.as_mut().reset(at.into());
    }
}

impl Future for TokioTimer {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        self.0.as_mut().poll(cx)
    }
}

/// A running server's engine handle, for subsystems (the WAL reader) that feed it inputs.
pub struct Server {
    handle: EngineHandle,
    metrics: Arc<Metrics>,
}

impl Server {
    /// Starts the engine task. Call [`Server::run`] to serve sockets.
    pub fn start(options: Options) -> (Server, ServerTask) {
        let metrics = options.shared.metrics.clone();
        let drain_timeout = options.drain_timeout;
        let rest_body_bytes_max = options.config.rest_body_bytes_max;
        let (handle, driver) = switchboard_serve::driver(options, Tokio);
        let task = tokio::spawn(driver);
        (
            Server {
                handle: handle.clone(),
                metrics,
            },
            ServerTask {
                handle,
                task,
                drain_timeout,
                sockets: TaskTracker::new(),
                rest_body_bytes_max,
            },
        )
    }

    /// A handle that feeds the engine.
    pub fn handle(&self) -> EngineHandle {
        self.handle.clone()
    }

    /// The metrics the server exports.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }
}

/// The serving half of a started server.
pub struct ServerTask {
    handle: EngineHandle,
    task: tokio::task::JoinHandle<()>,
    drain_timeout: Duration,
    sockets: TaskTracker,
    rest_body_bytes_max: usize,
}

impl ServerTask {
    /// Accepts connections from `listener` until `shutdown` completes, then drains: every
    /// channel is told, every socket gets a close frame, bounded by the drain timeout.
    pub async fn run<L: Listener>(
        self,
        listener: L,
        metrics: Arc<Metrics>,
        shutdown: impl Future<Output = ()>,
    ) {
        let state = http::State {
            engine: self.handle.clone(),
            metrics,
            sockets: self.sockets.clone(),
            rest_body_bytes_max: self.rest_body_bytes_max,
        };
        http::accept_loop(listener, state, shutdown).await;
        self.handle.shutdown();
        self.sockets.close();
        let drained = async {
            let _ = self.task.await;
            self.sockets.wait().await;
        };
        if tokio::time::timeout(self.drain_timeout, drained)
            .await
            .is_err()
        {
            info!(
                sockets = self.sockets.len(),
                "drain timeout: dropping sockets still flushing"
            );
        }
    }
}

/// Serves `listener` with a fresh engine until `shutdown` completes.
pub async fn serve<L: Listener>(listener: L, options: Options, shutdown: impl Future<Output = ()>) {
    let (server, task) = Server::start(options);
    task.run(listener, server.metrics(), shutdown).await;
}
