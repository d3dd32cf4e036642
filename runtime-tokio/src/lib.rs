//! switchboard on tokio: HTTP and WebSocket serving, the REST API and metrics around the
//! pure engine.
//!
//! The runtime is a thin pump. One task owns the [`Engine`](switchboard_engine::Engine),
//! feeds it [`Input`](switchboard_engine::Input)s and carries out its outputs; each socket
//! is one task that feeds the engine what it reads and writes what the engine hands its
//! outbox, a wake-up's frames at once. Every protocol decision is the engine's. [`serve`]
//! is generic over its listener, so the simulator runs this very code on turmoil's
//! simulated network.

mod clock;
mod engine_task;
mod http;
mod listener;
mod metrics;
mod outbox;
pub mod postgres;
mod shards;
mod ws;

pub use clock::{Clock, WallClock};
pub use engine_task::{EngineHandle, PeerEvent, PeerLink, PeerOut};
pub use listener::Listener;
pub use metrics::Metrics;
pub use shards::{shard_links, to_shards};

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use switchboard_engine::{Config, NodeId, Output, Replica, ShardId, SharedLimits};
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;
use tracing::info;

/// Everything [`serve`] needs besides its listener.
pub struct Options {
    /// The engine configuration, built and checked by the binary.
    pub config: Config,
    /// This replica's id, its shard index and the limits its process's shards share.
    pub replica: Replica,
    /// What the process's shards share in the runtime: metrics and the memory budget of
    /// unfinished messages.
    pub shared: Shared,
    /// Seed of the engine's RNG (presence keys and refs).
    pub seed: u64,
    /// Frames waiting for a socket's writer before it counts as a slow consumer.
    pub send_queue: usize,
    /// Bytes waiting for a socket's writer before it counts as a slow consumer (a single
    /// frame larger than this still goes out).
    pub send_queue_bytes: usize,
    /// Where time comes from: real time in production, simulated time under turmoil.
    pub clock: Clock,
    /// The peer bus, when this replica has peers.
    pub peers: Option<PeerLink>,
    /// Receives the database outputs (visibility queries, WAL progress) when a database
    /// is configured.
    pub database: Option<mpsc::UnboundedSender<Output>>,
    /// How long a socket the engine closed may take to flush what is queued and its close
    /// frame before it is dropped; shutdown waits at most this long.
    pub drain_timeout: Duration,
}

/// What every shard of a process shares in the runtime, so that N shards export one set of
/// metrics and hold unfinished messages to one budget, not N.
#[derive(Clone)]
pub struct Shared {
    /// Summed over the shards: each adds what its engine counted.
    pub metrics: Arc<Metrics>,
    unfinished: Arc<ws::Budget>,
}

impl Shared {
    /// Fresh metrics and a budget of [`Config::unfinished_bytes_max`].
    pub fn new(config: &Config) -> Shared {
        Shared {
            metrics: Arc::new(Metrics::new()),
            unfinished: ws::Budget::new(config.unfinished_bytes_max),
        }
    }
}

impl Options {
    /// Production defaults around `config`: a process of one shard.
    pub fn new(config: Config) -> Self {
        Options {
            replica: Replica {
                node: NodeId(1),
                shard: ShardId(0),
                limits: SharedLimits::new(&config),
            },
            shared: Shared::new(&config),
            config,
            seed: 0,
            send_queue: 1024,
            send_queue_bytes: 16 << 20,
            clock: Clock::system(),
            peers: None,
            database: None,
            drain_timeout: Duration::from_secs(2),
        }
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
        let unfinished = options.shared.unfinished.clone();
        let drain_timeout = options.drain_timeout;
        let message_bytes_max = options.config.message_bytes_max();
        let rest_body_bytes_max = options.config.rest_body_bytes_max;
        let (handle, task) = engine_task::spawn(options, metrics.clone());
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
                message_bytes_max,
                unfinished,
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
    message_bytes_max: usize,
    unfinished: Arc<ws::Budget>,
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
            message_bytes_max: self.message_bytes_max,
            unfinished: self.unfinished,
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
