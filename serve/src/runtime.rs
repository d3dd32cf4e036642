//! What the serving core needs from a runtime: monotonic time and timers. Everything else
//! it does is plain futures (polled by whoever spawns them) and tokio's channels, which
//! work on any executor. Spawning stays with the adapter, which knows whether its tasks
//! must be `Send` (a work-stealing pool) or not (one executor per core).
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
}

/// A timer of a [`Runtime`].
pub trait Timer: Future<Output = ()> + Unpin {
    /// Moves the deadline to `at`; the timer completes again once it passes.
    fn reset(&mut self, at: Instant);
}
