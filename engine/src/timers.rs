//! The engine's timer queue: a min-heap with lazy cancellation.
//!
//! Entries are never removed early. Each kind of timer re-checks its condition when it
//! fires (has the connection really been idle? is this still the same channel?), so
//! activity on a hot path costs a field write, not a heap operation.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use crate::{ConnId, Instant, Output};

/// What to do when a deadline passes.
#[derive(Debug)]
pub(crate) enum Timer {
    /// Close the connection if nothing arrived for the heartbeat timeout.
    Idle(ConnId),
    /// Close the connection if it has had no channel for the no-channel timeout.
    NoChannel(ConnId),
    /// Re-verify the token of channel instance `instance` on `conn`.
    TokenExpiry { conn: ConnId, instance: u64 },
    /// Shut channel `instance` down if it still waits for the change stream.
    ReplicationReady { conn: ConnId, instance: u64 },
    /// Send a presence heartbeat to peers.
    PeerHeartbeat,
    /// Ask visibility question `id` again after its `attempt`-th failure, unless it was
    /// asked again since.
    VisibilityRetry { id: u64, attempt: u32 },
    /// Outputs held back by an error backoff.
    Delayed(Vec<Output>),
}

struct Entry {
    deadline: Instant,
    seq: u64,
    timer: Timer,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        (self.deadline, self.seq) == (other.deadline, other.seq)
    }
}

impl Eq for Entry {}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Entry {
    /// Reversed so the heap pops the earliest deadline first, ties in insertion order.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.deadline, other.seq).cmp(&(self.deadline, self.seq))
    }
}

/// Deadlines in firing order; equal deadlines fire in the order they were set.
#[derive(Default)]
pub(crate) struct Timers {
    heap: BinaryHeap<Entry>,
    seq: u64,
}

impl Timers {
    pub(crate) fn set(&mut self, deadline: Instant, timer: Timer) {
        self.seq += 1;
        self.heap.push(Entry {
            deadline,
            seq: self.seq,
            timer,
        });
    }

    /// The earliest timer due at `now`, if any.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<Timer> {
        if self.heap.peek()?.deadline > now {
            return None;
        }
        self.heap.pop().map(|entry| entry.timer)
    }

    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.heap.peek().map(|entry| entry.deadline)
    }
}
