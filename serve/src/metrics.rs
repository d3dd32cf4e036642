//! Prometheus metrics: the engine's figures, added after every step by each shard, plus
//! what only the runtime sees (bytes written, slow consumers, engine step latency).
//!
//! One [`Metrics`] serves every shard of a process: each shard adds the *change* in its
//! engine's [`Stats`], so counters and gauges alike are sums over the shards.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use switchboard_engine::Stats;

/// How an engine figure is exported.
#[derive(Clone, Copy)]
enum Kind {
    /// A level that goes up and down (open connections).
    Gauge,
    /// A running total.
    Counter,
}

/// One engine figure: name, help, kind and where [`Stats`] keeps it.
type Row = (&'static str, &'static str, Kind, fn(&Stats) -> u64);

/// The engine's figures.
const ENGINE: [Row; 9] = [
    (
        "connections",
        "Open WebSocket connections",
        Kind::Gauge,
        |s| s.connections,
    ),
    ("channels", "Joined channels", Kind::Gauge, |s| s.channels),
    (
        "messages_in",
        "Frames received from clients",
        Kind::Counter,
        |s| s.frames_in,
    ),
    (
        "messages_out",
        "Frames queued to clients, per recipient",
        Kind::Counter,
        |s| s.messages_out,
    ),
    (
        "bytes_in",
        "Bytes received from clients",
        Kind::Counter,
        |s| s.bytes_in,
    ),
    ("broadcasts", "Broadcasts routed", Kind::Counter, |s| {
        s.broadcasts
    }),
    (
        "errors",
        "Error replies, system errors and refused upgrades",
        Kind::Counter,
        |s| s.errors,
    ),
    (
        "malformed_frames",
        "Frames that could not be decoded",
        Kind::Counter,
        |s| s.malformed,
    ),
    (
        "visibility_retries",
        "Visibility questions the database failed to answer, each asked again",
        Kind::Counter,
        |s| s.visibility_retries,
    ),
];

/// Every metric `/metrics` exports.
pub struct Metrics {
    registry: Registry,
    /// One per row of [`ENGINE`], in order: (a gauge, a counter), the one unused left at 0.
    engine: Vec<(Gauge, Counter)>,
    /// WebSocket tasks the runtime holds, closing ones included: above `connections` while
    /// sockets the engine closed still flush.
    pub(crate) sockets: Gauge,
    /// Bytes written to sockets, counted by the writers.
    pub bytes_out: Counter<u64, AtomicU64>,
    /// Sockets closed because their send queue overflowed.
    pub slow_consumers: Counter,
    /// Time spent in one `Engine::handle` plus its drain.
    pub handle_seconds: Histogram,
    /// Visibility questions sent to the database, counted by the postgres subsystem.
    pub visibility_queries: Counter,
    /// Batches of private channel authorization questions sent to the database.
    pub authorization_queries: Counter,
    /// Connections the listener failed to accept (out of file descriptors, say).
    pub accept_errors: Counter,
    /// Messages this node published to the cluster broker.
    pub cluster_published: Counter,
    /// Messages this node received from the cluster broker.
    pub cluster_received: Counter,
    /// Peer messages not published because the broker was unreachable.
    pub cluster_dropped: Counter,
    /// Other nodes this node sees up.
    pub cluster_nodes: Gauge,
    /// 1 while this process reads the replication slot: always with a database and no
    /// cluster; in a cluster, on the one node holding the slot's lock.
    pub slot_held: Gauge,
    /// 1 while the change stream feeding this process is live (`/readyz`).
    pub replication_live: Gauge,
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("switchboard");
        let engine: Vec<(Gauge, Counter)> = ENGINE
            .iter()
            .map(|&(name, help, kind, _)| {
                let pair = (Gauge::default(), Counter::default());
                match kind {
                    Kind::Gauge => registry.register(name, help, pair.0.clone()),
                    Kind::Counter => registry.register(name, help, pair.1.clone()),
                }
                pair
            })
            .collect();
        let metrics = Metrics {
            registry: Registry::default(),
            engine,
            sockets: Gauge::default(),
            bytes_out: Counter::default(),
            slow_consumers: Counter::default(),
            handle_seconds: Histogram::new(exponential_buckets(1e-6, 4.0, 12)),
            visibility_queries: Counter::default(),
            authorization_queries: Counter::default(),
            accept_errors: Counter::default(),
            cluster_published: Counter::default(),
            cluster_received: Counter::default(),
            cluster_dropped: Counter::default(),
            cluster_nodes: Gauge::default(),
            slot_held: Gauge::default(),
            replication_live: Gauge::default(),
        };
        registry.register(
            "sockets",
            "WebSocket sockets held by the runtime, closing ones included",
            metrics.sockets.clone(),
        );
        registry.register(
            "bytes_out",
            "Bytes written to clients",
            metrics.bytes_out.clone(),
        );
        registry.register(
            "slow_consumers",
            "Sockets closed for a full send queue",
            metrics.slow_consumers.clone(),
        );
        registry.register(
            "engine_handle_seconds",
            "Time to handle one engine input and carry out its outputs",
            metrics.handle_seconds.clone(),
        );
        registry.register(
            "visibility_queries",
            "Row Level Security visibility questions sent to the database",
            metrics.visibility_queries.clone(),
        );
        registry.register(
            "authorization_queries",
            "Batches of private channel authorization questions sent to the database",
            metrics.authorization_queries.clone(),
        );
        registry.register(
            "accept_errors",
            "Connections the listener failed to accept, such as for want of file descriptors",
            metrics.accept_errors.clone(),
        );
        registry.register(
            "cluster_messages_published",
            "Messages published to the cluster broker",
            metrics.cluster_published.clone(),
        );
        registry.register(
            "cluster_messages_received",
            "Messages received from the cluster broker",
            metrics.cluster_received.clone(),
        );
        registry.register(
            "cluster_messages_dropped",
            "Peer messages dropped while the cluster broker was unreachable",
            metrics.cluster_dropped.clone(),
        );
        registry.register(
            "replication_live",
            "1 while the change stream feeding this process is live",
            metrics.replication_live.clone(),
        );
        registry.register(
            "replication_slot_held",
            "1 while this process reads the replication slot",
            metrics.slot_held.clone(),
        );
        registry.register(
            "cluster_nodes",
            "Other nodes of the cluster seen up",
            metrics.cluster_nodes.clone(),
        );
        Metrics {
            registry,
            ..metrics
        }
    }

    /// Adds what one shard's engine counted since `before`: gauges move by the difference,
    /// counters advance by it, so several shards sum.
    pub fn update(&self, before: &Stats, now: &Stats) {
        for ((_, _, kind, read), (gauge, counter)) in ENGINE.iter().zip(&self.engine) {
            let (was, is) = (read(before), read(now));
            match kind {
                Kind::Gauge => {
                    gauge.inc_by(is as i64 - was as i64);
                }
                Kind::Counter => {
                    counter.inc_by(is.saturating_sub(was));
                }
            }
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, name: &str) -> &'a str {
        text.lines()
            .find(|l| l.starts_with(name) && l.as_bytes().get(name.len()) == Some(&b' '))
            .unwrap_or_else(|| panic!("{name} in {text}"))
    }

    #[test]
    fn shards_sum_gauges_and_counters() {
        let metrics = Metrics::new();
        let zero = Stats::default();
        let shard = |connections, frames_in| Stats {
            connections,
            frames_in,
            ..Stats::default()
        };
        metrics.update(&zero, &shard(3, 10));
        metrics.update(&zero, &shard(2, 5));
        metrics.update(&shard(3, 10), &shard(1, 12));
        let text = metrics.render();
        assert_eq!(
            line(&text, "switchboard_connections"),
            "switchboard_connections 3"
        );
        assert_eq!(
            line(&text, "switchboard_messages_in_total"),
            "switchboard_messages_in_total 17"
        );
    }
}
