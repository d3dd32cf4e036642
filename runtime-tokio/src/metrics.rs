//! Prometheus metrics: engine counters copied after every step, plus what only the
//! runtime sees (bytes written, slow consumers, engine step latency).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use switchboard_engine::Stats;

/// Every metric `/metrics` exports.
pub struct Metrics {
    registry: Registry,
    connections: Gauge,
    /// WebSocket tasks the runtime holds, closing ones included: above `connections` while
    /// sockets the engine closed still flush.
    pub(crate) sockets: Gauge,
    channels: Gauge,
    messages_in: Counter,
    messages_out: Counter,
    bytes_in: Counter,
    /// Bytes written to sockets, counted by the writers.
    pub bytes_out: Counter<u64, AtomicU64>,
    broadcasts: Counter,
    errors: Counter,
    malformed: Counter,
    visibility_retries: Counter,
    /// Sockets closed because their send queue overflowed.
    pub slow_consumers: Counter,
    /// Time spent in one `Engine::handle` plus its drain.
    pub handle_seconds: Histogram,
    /// Visibility questions sent to the database, counted by the postgres subsystem.
    pub visibility_queries: Counter,
    /// Connections the listener failed to accept (out of file descriptors, say).
    pub accept_errors: Counter,
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("switchboard");
        let metrics = Metrics {
            connections: Gauge::default(),
            sockets: Gauge::default(),
            channels: Gauge::default(),
            messages_in: Counter::default(),
            messages_out: Counter::default(),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            broadcasts: Counter::default(),
            errors: Counter::default(),
            malformed: Counter::default(),
            visibility_retries: Counter::default(),
            slow_consumers: Counter::default(),
            handle_seconds: Histogram::new(exponential_buckets(1e-6, 4.0, 12)),
            visibility_queries: Counter::default(),
            accept_errors: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "connections",
            "Open WebSocket connections",
            metrics.connections.clone(),
        );
        registry.register(
            "sockets",
            "WebSocket sockets held by the runtime, closing ones included",
            metrics.sockets.clone(),
        );
        registry.register("channels", "Joined channels", metrics.channels.clone());
        registry.register(
            "messages_in",
            "Frames received from clients",
            metrics.messages_in.clone(),
        );
        registry.register(
            "messages_out",
            "Frames queued to clients, per recipient",
            metrics.messages_out.clone(),
        );
        registry.register(
            "bytes_in",
            "Bytes received from clients",
            metrics.bytes_in.clone(),
        );
        registry.register(
            "bytes_out",
            "Bytes written to clients",
            metrics.bytes_out.clone(),
        );
        registry.register(
            "broadcasts",
            "Broadcasts routed",
            metrics.broadcasts.clone(),
        );
        registry.register(
            "errors",
            "Error replies, system errors and refused upgrades",
            metrics.errors.clone(),
        );
        registry.register(
            "malformed_frames",
            "Frames that could not be decoded",
            metrics.malformed.clone(),
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
            "visibility_retries",
            "Visibility questions the database failed to answer, each asked again",
            metrics.visibility_retries.clone(),
        );
        registry.register(
            "accept_errors",
            "Connections the listener failed to accept, such as for want of file descriptors",
            metrics.accept_errors.clone(),
        );
        Metrics {
            registry,
            ..metrics
        }
    }

    /// Copies the engine's counters: gauges set, counters advanced by the difference.
    pub fn update(&self, before: &Stats, now: &Stats) {
        self.connections.set(now.connections as i64);
        self.channels.set(now.channels as i64);
        let delta = |a: u64, b: u64| b.saturating_sub(a);
        self.messages_in
            .inc_by(delta(before.frames_in, now.frames_in));
        self.messages_out
            .inc_by(delta(before.messages_out, now.messages_out));
        self.bytes_in.inc_by(delta(before.bytes_in, now.bytes_in));
        self.broadcasts
            .inc_by(delta(before.broadcasts, now.broadcasts));
        self.errors.inc_by(delta(before.errors, now.errors));
        self.malformed
            .inc_by(delta(before.malformed, now.malformed));
        self.visibility_retries
            .inc_by(delta(before.visibility_retries, now.visibility_retries));
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
