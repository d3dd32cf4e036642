//! switchboard's serving core, written once for every runtime: the task that drives an
//! engine (inputs in, outputs carried out: outboxes and their hand-over, slow consumers,
//! the rule that a close never overtakes a send, replies, drain deadlines), the task of one
//! WebSocket over any futures-io stream, the peer links between a process's shards and
//! the process-wide metrics.
//!
//! HTTP (with hyper) and the WebSocket upgrade are here too, so a runtime adapter
//! (runtime-tokio, runtime-glommio) only implements [`Runtime`] (time and spawning), gives
//! its sockets as a [`Listener`] and binds its threads. Every protocol decision is the
//! engine's.

mod clock;
mod engine_task;
mod http;
mod metrics;
mod outbox;
pub mod runtime;
mod shards;
pub mod wire;
mod ws;

pub use clock::{Clock, WallClock};
pub use engine_task::{EngineHandle, PeerEvent, PeerLink, PeerOut, SocketEnd, Upgrade};
pub use http::{Listener, Server, ServerTask};
pub use metrics::Metrics;
pub use runtime::{Runtime, Timer};
pub use shards::{peer_links, to_shards, ShardSet, ToCluster};
pub use ws::Budget;

use std::sync::Arc;
use std::time::Duration;

use switchboard_engine::{Config, NodeId, Output, Replica, ShardId, SharedLimits};
use tokio::sync::mpsc;

/// Everything an engine's driver needs: its configuration, where it sits among the
/// replicas, and what it talks to.
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
    /// Told when a token names a key id the JWKS lacks ([`Output::RefreshJwks`]), when the
    /// keys come from a URL.
    pub jwks_refresh: Option<mpsc::UnboundedSender<()>>,
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
    /// What unfinished messages of every socket may hold together.
    pub unfinished: Arc<Budget>,
}

impl Shared {
    /// Fresh metrics and a budget of [`Config::unfinished_bytes_max`].
    pub fn new(config: &Config) -> Shared {
        Shared {
            metrics: Arc::new(Metrics::new()),
            unfinished: Budget::new(config.unfinished_bytes_max),
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
            jwks_refresh: None,
            drain_timeout: Duration::from_secs(2),
        }
    }
}
