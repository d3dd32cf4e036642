//! switchboard on glommio: one executor per shard, each pinned to its own core, each with
//! its own io_uring, engine and SO_REUSEPORT listener. The serving core
//! ([`switchboard_serve`]) does everything else, exactly as on tokio; this crate brings
//! glommio's time, spawning and sockets, and the checks that glommio can run at all.
//!
//! Shards reach each other, and the database side reaches them, through the serving
//! core's channels (tokio's `sync`, which wake a glommio task from any thread).

mod checks;

pub use checks::{check, Refused};

use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use glommio::{LocalExecutorPoolBuilder, PoolPlacement, PoolThreadHandles};
use switchboard_serve::ServerTask;

/// glommio's clock, timers and tasks for the serving core. Use it only on an executor.
#[derive(Clone, Copy, Debug, Default)]
pub struct Glommio;

/// A glommio timer that can be moved to another deadline.
pub struct GlommioTimer(glommio::timer::Timer);

impl switchboard_serve::Runtime for Glommio {
    type Timer = GlommioTimer;

    fn now(&self) -> Instant {
        Instant::now()
    }

    fn timer(&self, at: Instant) -> GlommioTimer {
        GlommioTimer(glommio::timer::Timer::new(
            at.saturating_duration_since(Instant::now()),
        ))
    }

    fn spawn(&self, future: impl Future<Output = ()> + 'static) {
        glommio::spawn_local(future).detach();
    }
}

impl switchboard_serve::Timer for GlommioTimer {
    fn reset(&mut self, at: Instant) {
        self.0.reset(at.saturating_duration_since(Instant::now()));
    }
}

impl Future for GlommioTimer {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        Pin::new(&mut self.0).poll(cx).map(drop)
    }
}

/// A shard's listener: glommio's, on a socket bound beforehand.
pub struct Listener(glommio::net::TcpListener);

impl Listener {
    /// Takes over `listener`, bound and listening, on the current executor.
    pub fn new(listener: std::net::TcpListener) -> Listener {
        // SAFETY: the descriptor is a listening TCP socket that `into_raw_fd` gave up, so
        // the glommio listener is its only owner.
        Listener(unsafe { glommio::net::TcpListener::from_raw_fd(listener.into_raw_fd()) })
    }
}

impl switchboard_serve::Listener for Listener {
    type Stream = glommio::net::TcpStream;

    async fn accept(&self) -> std::io::Result<(Self::Stream, SocketAddr)> {
        let stream = self.0.accept().await?;
        // Frames are batched per flush already; Nagle would only add latency.
        stream.set_nodelay(true)?;
        let peer = stream.peer_addr()?;
        Ok((stream, peer))
    }
}

/// Memory each executor sets aside for io_uring's registered buffers. glommio uses them
/// for file I/O, which the server does not do; its default is 10 MiB per executor.
const IO_MEMORY: usize = 256 << 10;

/// What one shard serves: its engine and its listener, bound beforehand.
pub type Shard = (ServerTask, std::net::TcpListener);

/// The shards' threads, each running its executor until its server has drained.
pub struct Shards(PoolThreadHandles<()>);

/// Tells [`Shards::start`] that an executor came up. glommio drops an executor's future
/// unpolled when it cannot make the executor, and with it this report, unsent.
#[derive(Clone)]
struct Started(Option<mpsc::Sender<()>>);

impl Started {
    fn started(&mut self) {
        if let Some(report) = self.0.take() {
            let _ = report.send(());
        }
    }
}

/// A shard that failed to start or ended with a panic.
#[derive(Debug, thiserror::Error)]
#[error("a glommio shard failed: {0}")]
pub struct ShardFailed(String);

impl Shards {
    /// Serves each `(task, listener)` pair on its own executor, pinned to a core of its
    /// own, until the future `shutdown()` makes for it completes. Returns once every
    /// executor runs, or with why one could not start.
    pub fn start<S, F>(shards: Vec<Shard>, shutdown: S) -> Result<Shards, ShardFailed>
    where
        S: FnOnce() -> F + Clone + Send + 'static,
        F: Future<Output = ()> + 'static,
    {
        let count = shards.len();
        // Each executor takes the next pair; glommio gives every one the same closure.
        let shards: Arc<Mutex<Vec<Option<Shard>>>> =
            Arc::new(Mutex::new(shards.into_iter().map(Some).collect()));
        let next = Arc::new(AtomicUsize::new(0));
        let (report, reports) = mpsc::channel();
        let report = Started(Some(report));
        let handles = LocalExecutorPoolBuilder::new(PoolPlacement::MaxSpread(count, None))
            .name("shard")
            .io_memory(IO_MEMORY)
            .on_all_shards(move || {
                let mut report = report;
                let index = next.fetch_add(1, Ordering::Relaxed);
                let taken = shards.lock().expect("shard list")[index].take();
                async move {
                    report.started();
                    let (task, listener) = taken.expect("one task per executor");
                    let listener = Listener::new(listener);
                    task.run(Glommio, listener, shutdown()).await;
                }
            })
            .map_err(|e| ShardFailed(e.to_string()))?;
        let shards = Shards(handles);
        // Every report is sent or dropped once its executor started or failed to.
        let started = reports.iter().count();
        if started < count {
            // An executor could not start: its thread has ended with the reason.
            shards.join()?;
            return Err(ShardFailed("an executor ended before it started".into()));
        }
        Ok(shards)
    }

    /// Waits for every shard to end.
    pub fn join(self) -> Result<(), ShardFailed> {
        for ended in self.0.join_all() {
            ended.map_err(|e| ShardFailed(e.to_string()))?;
        }
        Ok(())
    }
}
