//! Time for the engine: monotonic from the runtime (virtual under a simulator), wall time
//! from a replaceable source (the simulator supplies its own).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use switchboard_engine::{Instant, Now};

/// Milliseconds since the Unix epoch.
pub type WallClock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Reads both clocks once per engine step. Clones share their origin, so the shards of a
/// process count engine time from the same instant (their shared rate limits rely on it).
#[derive(Clone)]
pub struct Clock {
    /// Set by the first engine that reads the clock, from its runtime's now.
    origin: Arc<OnceLock<std::time::Instant>>,
    wall: WallClock,
}

impl Clock {
    /// Real wall time.
    pub fn system() -> Self {
        Clock::with_wall(Arc::new(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64)
        }))
    }

    /// Wall time from `wall`, e.g. a simulator's clock.
    pub fn with_wall(wall: WallClock) -> Self {
        Clock {
            origin: Arc::default(),
            wall,
        }
    }

    /// Both clocks, at the runtime's monotonic `now`.
    pub fn now(&self, now: std::time::Instant) -> Now {
        let origin = *self.origin.get_or_init(|| now);
        Now {
            mono: Instant(now.saturating_duration_since(origin).as_millis() as u64),
            unix_ms: (self.wall)(),
        }
    }

    /// Wall time, in seconds since the Unix epoch: when a minted token is issued.
    pub fn unix_secs(&self) -> u64 {
        (self.wall)() / 1_000
    }

    /// The runtime instant of an engine deadline (after the first [`Clock::now`]).
    pub fn at(&self, deadline: Instant, now: std::time::Instant) -> std::time::Instant {
        let origin = *self.origin.get_or_init(|| now);
        origin + Duration::from_millis(deadline.0)
    }
}
