//! What the serving core needs from a runtime: monotonic time, timers and spawning on the
//! current thread. Everything else it does is plain futures and tokio's channels, which
//! work on any executor. Tasks are never `Send`: each shard's engine, connections and
//! sockets live on one thread, which is what a thread-per-core runtime wants and costs a
//! single-threaded tokio runtime nothing.
//!
//! In the spirit of quinn's `runtime` module: the driver is written once, each runtime
//! brings a few lines.

use std::future::Future;
use std::time::Instant;

/// A runtime's clock and timers. Cheap to clone.
pub trait Runtime: Clone + Unpin + 'static {
    /// A timer that can be moved to another deadline without being made again.
    type Timer: Timer;

    /// The runtime's monotonic now: virtual under a simulator.
    fn now(&self) -> Instant;

    /// A timer that completes at `at`.
    fn timer(&self, at: Instant) -> Self::Timer;

    /// Runs `future` to completion on the current thread, detached.
    fn spawn(&self, future: impl Future<Output = ()> + 'static);
}

/// A timer of a [`Runtime`].
pub trait Timer: Future<Output = ()> + Unpin {
    /// Moves the deadline to `at`; the timer completes again once it passes.
    fn reset(&mut self, at: Instant);
}
