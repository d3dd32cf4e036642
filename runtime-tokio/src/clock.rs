//! Time for the engine: monotonic from tokio (virtual under turmoil), wall time from a
//! replaceable source (the simulator supplies its own).

use std::sync::Arc;

use switchboard_engine::{Instant, Now};

/// Milliseconds since the Unix epoch.
pub type WallClock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Reads both clocks once per engine step.
#[derive(Clone)]
pub struct Clock {
    origin: tokio::time::Instant,
    wall: WallClock,
}

impl Clock {
    /// Real wall time; monotonic time from tokio.
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
            origin: tokio::time::Instant::now(),
            wall,
        }
    }

    /// Both clocks now.
    pub fn now(&self) -> Now {
        Now {
            mono: Instant(self.origin.elapsed().as_millis() as u64),
            unix_ms: (self.wall)(),
        }
    }

    /// The tokio instant of an engine deadline.
    pub fn at(&self, deadline: Instant) -> tokio::time::Instant {
        self.origin + std::time::Duration::from_millis(deadline.0)
    }
}
