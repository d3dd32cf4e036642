//! Prometheus metrics: the engine's figures, added after every step by each shard, plus
//! what only the runtime sees (bytes written, slow consumers, engine step latency).
//!
//! One [`Metrics`] serves every shard of a process: each shard adds the *change* in its
//! engine's [`Stats`], so counters and gauges alike are sums over the shards.
//!
//! Names follow Prometheus's conventions: base units (seconds, bytes) in the name, and
//! `_total` on counters, which the encoder appends. The replication metrics come from the
//! process reading the slot, which alone knows them.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use switchboard_engine::{JoinRefusal, ShardId, Stats};

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
const ENGINE: [Row; 11] = [
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
    (
        "visibility_replans",
        "Change batches planned again because a table's policies changed under them",
        Kind::Counter,
        |s| s.visibility_replans,
    ),
    (
        "changes_delivered",
        "postgres_changes messages queued to subscribers, per recipient",
        Kind::Counter,
        |s| s.changes_delivered,
    ),
];

/// One label, as `name="value"`.
type Label<V> = [(&'static str, V); 1];

/// Every metric `/metrics` exports.
pub struct Metrics {
    registry: Registry,
    /// One per row of [`ENGINE`], in order: (a gauge, a counter), the one unused left at 0.
    engine: Vec<(Gauge, Counter)>,
    /// Joins refused, one counter per [`JoinRefusal`] in its order: the family's members,
    /// made up front so every reason is exported from the start, at 0.
    joins_refused: Vec<Counter>,
    /// Presence entries the shards own, and their copies of other replicas' entries.
    presence_entries: (Gauge, Gauge),
    /// Time each shard's engine task spent handling inputs, by shard.
    engine_busy: Family<Label<u16>, Counter<f64, AtomicU64>>,
    /// From a broadcast's arrival to its copies queued on the recipients' outboxes.
    pub(crate) broadcast_handover_seconds: Histogram,
    /// WebSocket tasks the runtime holds, closing ones included: above `connections` while
    /// sockets the engine closed still flush.
    pub(crate) sockets: Gauge,
    /// Bytes written to sockets, counted by the writers.
    pub bytes_out: Counter<u64, AtomicU64>,
    /// Sockets closed because their send queue overflowed.
    pub slow_consumers: Counter,
    /// Time spent in one `Engine::handle` plus its drain.
    pub handle_seconds: Histogram,
    /// Visibility transactions sent to the database (each answers one or more questions),
    /// counted by the postgres subsystem.
    pub visibility_queries: Counter,
    /// How long the database took to answer each visibility transaction.
    pub visibility_query_seconds: Histogram,
    /// Changes the WAL reader decoded.
    pub changes_decoded: Counter,
    /// WAL the database holds beyond what was confirmed as handed out, set by the reader.
    pub replication_lag_bytes: Gauge,
    /// How long ago the oldest change not yet handed out was committed, set by the reader.
    pub replication_lag_seconds: Gauge<f64, AtomicU64>,
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
        let joins_refused = Family::<Label<&'static str>, Counter>::default();
        registry.register(
            "joins_refused",
            "Joins refused, by reason",
            joins_refused.clone(),
        );
        let joins_refused = JoinRefusal::ALL
            .iter()
            .map(|why| joins_refused.get_or_create_owned(&[("reason", why.label())]))
            .collect();
        let presence_entries = Family::<Label<&'static str>, Gauge>::default();
        registry.register(
            "presence_entries",
            "Presence entries (metas) held: origin=\"local\" for those of this process's \
             channels (summed over a cluster's nodes, every entry once), origin=\"replicated\" \
             for each shard's copies of other shards' and nodes' entries",
            presence_entries.clone(),
        );
        let presence_entries = (
            presence_entries.get_or_create_owned(&[("origin", "local")]),
            presence_entries.get_or_create_owned(&[("origin", "replicated")]),
        );
        let metrics = Metrics {
            registry: Registry::default(),
            engine,
            joins_refused,
            presence_entries,
            engine_busy: Family::default(),
            broadcast_handover_seconds: Histogram::new(exponential_buckets(1e-5, 4.0, 10)),
            sockets: Gauge::default(),
            bytes_out: Counter::default(),
            slow_consumers: Counter::default(),
            handle_seconds: Histogram::new(exponential_buckets(1e-6, 4.0, 12)),
            visibility_queries: Counter::default(),
            visibility_query_seconds: Histogram::new(exponential_buckets(5e-4, 2.0, 15)),
            changes_decoded: Counter::default(),
            replication_lag_bytes: Gauge::default(),
            replication_lag_seconds: Gauge::default(),
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
            "Row Level Security visibility transactions sent to the database; the questions of one role queued together share one",
            metrics.visibility_queries.clone(),
        );
        registry.register(
            "visibility_query_seconds",
            "Time the database took to answer one Row Level Security visibility transaction \
             (answered ones; failures and timeouts are asked again and not observed)",
            metrics.visibility_query_seconds.clone(),
        );
        registry.register(
            "changes_decoded",
            "Row changes decoded from the WAL (on the process reading the replication slot: \
             in a cluster, the slot holder)",
            metrics.changes_decoded.clone(),
        );
        registry.register(
            "replication_lag_bytes",
            "WAL the database has written past the position confirmed as handed out to \
             every subscriber, refreshed every second (on the process reading the \
             replication slot: in a cluster, the slot holder)",
            metrics.replication_lag_bytes.clone(),
        );
        registry.register(
            "replication_lag_seconds",
            "Seconds since the commit of the oldest transaction read from the WAL and not \
             yet handed out, 0 when none waits (caught up, even if the last commit is old), \
             refreshed every second (on the process reading the replication slot: in a \
             cluster, the slot holder)",
            metrics.replication_lag_seconds.clone(),
        );
        registry.register(
            "engine_busy_seconds",
            "Time each shard's engine task spent handling inputs and carrying out their \
             outputs, by shard",
            metrics.engine_busy.clone(),
        );
        registry.register(
            "broadcast_handover_seconds",
            "From a broadcast's arrival (its frame read from the client's socket, or its REST \
             request taken by the engine task) until its copies for the members on the same \
             shard are queued on their sockets' outboxes, one observation per broadcast; \
             copies for other shards and nodes are handed over there and not observed",
            metrics.broadcast_handover_seconds.clone(),
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
        let refused = before.joins_refused.iter().zip(&now.joins_refused);
        for ((was, is), counter) in refused.zip(&self.joins_refused) {
            if is != was {
                counter.inc_by(is.saturating_sub(*was));
            }
        }
        let (local, replicated) = &self.presence_entries;
        local.inc_by(now.presence_entries as i64 - before.presence_entries as i64);
        let copies = now.presence_entries_replicated as i64;
        replicated.inc_by(copies - before.presence_entries_replicated as i64);
    }

    /// The busy-time counter of shard `shard`, for its engine task to keep.
    pub(crate) fn engine_busy(&self, shard: ShardId) -> Counter<f64, AtomicU64> {
        self.engine_busy.get_or_create_owned(&[("shard", shard.0)])
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

    #[test]
    fn joins_refused_are_exported_by_reason_from_zero() {
        let metrics = Metrics::new();
        let zero = Stats::default();
        let text = metrics.render();
        for why in JoinRefusal::ALL {
            let name = format!(
                "switchboard_joins_refused_total{{reason=\"{}\"}}",
                why.label()
            );
            assert_eq!(line(&text, &name), format!("{name} 0"));
        }
        let mut refused = Stats::default();
        refused.joins_refused[JoinRefusal::InvalidToken as usize] = 2;
        refused.joins_refused[JoinRefusal::TooManyChannels as usize] = 1;
        metrics.update(&zero, &refused);
        let mut more = refused.clone();
        more.joins_refused[JoinRefusal::InvalidToken as usize] = 3;
        metrics.update(&refused, &more);
        let text = metrics.render();
        let reason = |label| format!("switchboard_joins_refused_total{{reason=\"{label}\"}}");
        assert!(line(&text, &reason("invalid_token")).ends_with(" 3"));
        assert!(line(&text, &reason("too_many_channels")).ends_with(" 1"));
        assert!(line(&text, &reason("unauthorized")).ends_with(" 0"));
    }

    #[test]
    fn presence_entries_and_delivered_changes_sum_over_shards() {
        let metrics = Metrics::new();
        let zero = Stats::default();
        let shard = |own, copies, delivered| Stats {
            presence_entries: own,
            presence_entries_replicated: copies,
            changes_delivered: delivered,
            ..Stats::default()
        };
        metrics.update(&zero, &shard(2, 1, 5));
        metrics.update(&zero, &shard(1, 2, 4));
        metrics.update(&shard(2, 1, 5), &shard(0, 1, 6));
        let text = metrics.render();
        let local = r#"switchboard_presence_entries{origin="local"}"#;
        let replicated = r#"switchboard_presence_entries{origin="replicated"}"#;
        assert_eq!(line(&text, local), format!("{local} 1"));
        assert_eq!(line(&text, replicated), format!("{replicated} 3"));
        assert_eq!(
            line(&text, "switchboard_changes_delivered_total"),
            "switchboard_changes_delivered_total 10"
        );
    }

    #[test]
    fn busy_time_is_kept_per_shard() {
        let metrics = Metrics::new();
        metrics.engine_busy(ShardId(0)).inc_by(0.25);
        metrics.engine_busy(ShardId(1)).inc_by(0.5);
        metrics.engine_busy(ShardId(1)).inc_by(0.25);
        let text = metrics.render();
        let shard = |n| format!("switchboard_engine_busy_seconds_total{{shard=\"{n}\"}}");
        assert_eq!(line(&text, &shard(0)), format!("{} 0.25", shard(0)));
        assert_eq!(line(&text, &shard(1)), format!("{} 0.75", shard(1)));
    }

    #[test]
    fn database_figures_are_exported_under_their_conventional_names() {
        let metrics = Metrics::new();
        metrics.changes_decoded.inc_by(4);
        metrics.replication_lag_bytes.set(1024);
        metrics.replication_lag_seconds.set(1.5);
        metrics.visibility_query_seconds.observe(0.002);
        metrics.broadcast_handover_seconds.observe(0.0001);
        let text = metrics.render();
        for expected in [
            "switchboard_changes_decoded_total 4",
            "switchboard_replication_lag_bytes 1024",
            "switchboard_replication_lag_seconds 1.5",
            "switchboard_visibility_query_seconds_count 1",
            "switchboard_broadcast_handover_seconds_count 1",
            "# TYPE switchboard_replication_lag_seconds gauge",
            "# TYPE switchboard_visibility_query_seconds histogram",
        ] {
            assert!(text.lines().any(|l| l == expected), "{expected} in {text}");
        }
    }
}
