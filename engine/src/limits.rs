//! Rate limiters on injected time.
//!
//! Upstream averages rates over a rolling minute; a token bucket holding `rate × window`
//! tokens gives the same "sustained average over about a minute" behaviour (PROTOCOL.md
//! §6.3) in O(1) per event with no background ticking.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::Instant;

/// A token bucket refilled at `rate` tokens per second up to `rate × window` tokens.
///
/// Takes may overdraw it (a fan-out counts every delivery), so one large burst is paid back
/// before the limit lets traffic through again. A rate of 0 means unlimited.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenBucket {
    /// Tokens per second, which is milli-tokens per millisecond.
    rate: i64,
    /// Capacity in milli-tokens.
    capacity: i64,
    /// Current balance in milli-tokens; negative while overdrawn.
    balance: i64,
    refilled_at: Instant,
}

impl TokenBucket {
    /// A full bucket for `rate` events per second averaged over `window_secs`.
    pub fn new(rate: u32, window_secs: u64) -> Self {
        let rate = i64::from(rate);
        let capacity = rate
            .saturating_mul(window_secs.max(1) as i64)
            .saturating_mul(1000);
        TokenBucket {
            rate,
            capacity,
            balance: capacity,
            refilled_at: Instant(0),
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.since(self.refilled_at) as i64;
        self.balance = self
            .balance
            .saturating_add(elapsed.saturating_mul(self.rate))
            .min(self.capacity);
        self.refilled_at = self.refilled_at.max(now);
    }

    /// Whether the average rate is over the limit right now: less than one whole token left.
    pub fn tripped(&mut self, now: Instant) -> bool {
        if self.rate == 0 {
            return false;
        }
        self.refill(now);
        self.balance < 1000
    }

    /// Counts `n` events. Returns false, counting nothing, if the limit was already tripped.
    pub fn take(&mut self, now: Instant, n: u64) -> bool {
        if self.tripped(now) {
            return false;
        }
        self.charge(now, n);
        true
    }

    /// Whether `n` more events fit without overdrawing.
    pub fn has(&mut self, now: Instant, n: u64) -> bool {
        if self.rate == 0 {
            return true;
        }
        self.refill(now);
        self.balance >= (n as i64).saturating_mul(1000)
    }

    /// Counts `n` events unconditionally (deliveries already made). The overdraft is capped
    /// at one full window so recovery time stays bounded.
    pub fn charge(&mut self, now: Instant, n: u64) {
        if self.rate == 0 {
            return;
        }
        self.refill(now);
        let cost = (n as i64).saturating_mul(1000);
        self.balance = self.balance.saturating_sub(cost).max(-self.capacity);
    }
}

/// The limits upstream applies per project, shared by every shard of a process, so that N
/// shards admit the project's limit once, not N times.
///
/// One engine alone owns its copy; a sharded process gives every shard the same one. Each
/// bucket sits behind its own lock, taken once per event (a broadcast, not each delivery),
/// so shards rarely meet there. Shards' clocks share an origin, and a bucket never refills
/// backwards, so the small skew between their `now`s is harmless.
#[derive(Debug)]
pub struct SharedLimits {
    /// Sockets with at least one channel: upstream's concurrent users.
    users: AtomicUsize,
    /// Joins per second.
    pub joins: SharedBucket,
    /// Events per second (pushes and deliveries).
    pub events: SharedBucket,
    /// Presence events per second.
    pub presence: SharedBucket,
}

impl SharedLimits {
    /// Fresh limits for `config`'s rates, full.
    pub fn new(config: &crate::Config) -> Arc<SharedLimits> {
        let bucket = |rate| SharedBucket::new(TokenBucket::new(rate, config.rate_window_secs));
        Arc::new(SharedLimits {
            users: AtomicUsize::new(0),
            joins: bucket(config.joins_per_sec_max),
            events: bucket(config.events_per_sec_max),
            presence: bucket(config.presence_events_per_sec_max),
        })
    }

    /// Concurrent users now.
    pub fn users(&self) -> usize {
        self.users.load(Ordering::Relaxed)
    }

    /// Counts a socket that got its first channel, if there is room under `max`: the check
    /// and the count are one step, so two shards cannot both take the last place.
    pub(crate) fn add_user(&self, max: usize) -> bool {
        self.users
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    /// A counted socket lost its last channel.
    pub(crate) fn remove_user(&self) {
        self.users.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A [`TokenBucket`] several shards charge.
#[derive(Debug)]
pub struct SharedBucket(Mutex<TokenBucket>);

impl SharedBucket {
    fn new(bucket: TokenBucket) -> Self {
        SharedBucket(Mutex::new(bucket))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TokenBucket> {
        // Every critical section is one arithmetic update: a panic cannot leave it torn.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// [`TokenBucket::tripped`].
    pub fn tripped(&self, now: Instant) -> bool {
        self.lock().tripped(now)
    }

    /// [`TokenBucket::take`].
    pub fn take(&self, now: Instant, n: u64) -> bool {
        self.lock().take(now, n)
    }

    /// [`TokenBucket::has`].
    pub fn has(&self, now: Instant, n: u64) -> bool {
        self.lock().has(now, n)
    }

    /// [`TokenBucket::charge`].
    pub fn charge(&self, now: Instant, n: u64) {
        self.lock().charge(now, n)
    }
}

/// A fixed window that starts at the first call, as upstream's client presence limiter:
/// `max` calls per `window_ms`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FixedWindow {
    started: Option<Instant>,
    count: u32,
}

impl FixedWindow {
    /// Counts one call; false when it is over `max` within the window.
    pub fn allow(&mut self, now: Instant, max: u32, window_ms: u64) -> bool {
        match self.started {
            Some(start) if now.since(start) < window_ms => {}
            _ => {
                self.started = Some(now);
                self.count = 0;
            }
        }
        self.count += 1;
        self.count <= max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_a_window_of_burst_then_the_rate() {
        let mut bucket = TokenBucket::new(10, 2);
        assert!(bucket.take(Instant(0), 20));
        assert!(!bucket.take(Instant(0), 1), "20 tokens spent, tripped");
        assert!(!bucket.take(Instant(99), 1), "0.99 tokens is not enough");
        assert!(
            bucket.take(Instant(100), 1),
            "one token refilled after 100 ms"
        );
    }

    #[test]
    fn overdraft_is_paid_back_before_traffic_resumes() {
        let mut bucket = TokenBucket::new(10, 1);
        bucket.charge(Instant(0), 15);
        assert!(bucket.tripped(Instant(0)));
        assert!(bucket.tripped(Instant(500)), "still 0 after paying back 5");
        assert!(!bucket.tripped(Instant(600)));
    }

    #[test]
    fn zero_rate_is_unlimited() {
        let mut bucket = TokenBucket::new(0, 60);
        assert!(bucket.take(Instant(0), u64::MAX / 2000));
        assert!(bucket.has(Instant(0), 1_000_000));
    }

    #[test]
    fn fixed_window_allows_max_then_resets() {
        let mut window = FixedWindow::default();
        for _ in 0..5 {
            assert!(window.allow(Instant(1000), 5, 30_000));
        }
        assert!(
            !window.allow(Instant(30_999), 5, 30_000),
            "the 6th in the window"
        );
        assert!(window.allow(Instant(31_000), 5, 30_000), "a new window");
    }
}
