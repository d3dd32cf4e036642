//! switchboard on tokio: the [`Runtime`](switchboard_serve::Runtime) of the serving core
//! ([`switchboard_serve`]) on a single-threaded tokio runtime, its listeners, and the
//! database side of postgres_changes (tokio-postgres, pg_walstream).
//!
//! The core does the rest: HTTP, one task that owns the
//! [`Engine`](switchboard_engine::Engine) and carries out its outputs, one task per
//! connection. Every protocol decision is the engine's. [`Accepting`] takes any tokio
//! listener, so the simulator runs this very code on turmoil's simulated network.

pub mod cluster;
mod listener;
pub mod postgres;

pub use listener::{Accepting, Listener};
pub use switchboard_serve::{
    peer_links, to_shards, Clock, EngineHandle, Metrics, Options, PeerEvent, PeerLink, PeerOut,
    Server, ServerTask, ShardSet, Shared, ToCluster, WallClock,
};

use std::future::Future;
use std::pin::Pin;

/// tokio's time for the serving core (virtual under turmoil, like the rest of tokio's),
/// and its tasks, spawned on the current thread's `LocalSet`.
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

    fn spawn(&self, future: impl Future<Output = ()> + 'static) {
        tokio::task::spawn_local(future);
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

/// The shards' threads, each with a single-threaded runtime, running until its server has
/// drained.
pub struct Shards(Vec<std::thread::JoinHandle<()>>);

/// A shard's thread panicked.
#[derive(Debug, thiserror::Error)]
#[error("a shard panicked")]
pub struct ShardPanicked;

impl Shards {
    /// Serves each `(task, listener)` pair on a thread of its own until the future
    /// `shutdown()` makes for it completes.
    pub fn start<S, F>(
        shards: Vec<(ServerTask, std::net::TcpListener)>,
        shutdown: S,
    ) -> std::io::Result<Shards>
    where
        S: FnOnce() -> F + Clone + Send + 'static,
        F: Future<Output = ()> + 'static,
    {
        let mut threads = Vec::with_capacity(shards.len());
        for (index, (task, listener)) in shards.into_iter().enumerate() {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            listener.set_nonblocking(true)?;
            let listener = {
                let _entered = runtime.enter();
                tokio::net::TcpListener::from_std(listener)?
            };
            let shutdown = shutdown.clone();
            let thread = std::thread::Builder::new()
                .name(format!("shard-{index}"))
                .spawn(move || {
                    let serving = task.run(Tokio, Accepting(listener), shutdown());
                    tokio::task::LocalSet::new().block_on(&runtime, serving);
                })?;
            threads.push(thread);
        }
        Ok(Shards(threads))
    }

    /// Waits for every shard to end.
    pub fn join(self) -> Result<(), ShardPanicked> {
        for thread in self.0 {
            thread.join().map_err(|_| ShardPanicked)?;
        }
        Ok(())
    }
}
