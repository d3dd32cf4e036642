//! The database side of postgres_changes: the WAL reader that turns the publication's
//! logical replication stream into [`Input::Changes`], the catalog reads behind
//! [`Input::Publication`], and the pool that answers [`Output::Visibility`].
//!
//! Everything here moves data; the engine decides. The reader confirms to Postgres only the
//! positions the engine reports in [`Output::WalProgress`], so a crash replays what was not
//! handed out rather than losing it.

mod authz;
mod catalog;
pub mod check;
mod decode;
mod holder;
mod migrate;
mod pool;
mod rls;
mod wal;

pub use migrate::{
    keep_schema, maintain_partitions, migrate, MESSAGES_PUBLICATION, RETENTION_DAYS,
};

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use switchboard_engine::changes::Progress;
use switchboard_engine::{Input, Output};
use tokio::sync::{mpsc, watch, Mutex, Notify};
use tokio::task::JoinHandle;

/// Where the subsystem's inputs go: the engine task in production, a channel in tests.
pub(crate) type Sink = Arc<dyn Fn(Input) + Send + Sync>;

/// What the postgres subsystem needs to know. [`PostgresConfig::new`] has the defaults.
/// Not `Debug`: the URL may hold a password.
#[derive(Clone)]
pub struct PostgresConfig {
    /// Connection URL (`postgresql://user:pass@host:port/db`); the replication connection
    /// adds `replication=database` itself.
    pub database_url: String,
    /// The publication to stream. It belongs to the user (Supabase creates
    /// `supabase_realtime`); the reader waits for it rather than creating it.
    pub publication: String,
    /// The logical replication slot, created with `pgoutput` on first start. Persistent, so
    /// changes made while the server is down are streamed when it comes back.
    pub slot_name: String,
    /// Connections answering visibility questions concurrently.
    pub visibility_connections: usize,
    /// Connections answering private channels' authorization questions concurrently.
    pub authorization_connections: usize,
    /// Batches handed to the engine and not yet confirmed before the reader stops reading:
    /// bounds memory when clients or the database are slow.
    pub batches_in_flight_max: usize,
    /// A batch is handed over once it holds this many changes (whole transactions, so a big
    /// one may exceed it).
    pub batch_changes_max: usize,
    /// A batch is handed over as soon as the stream has nothing more ready and the engine
    /// has no batch in flight, and at the latest this long after its first transaction.
    pub batch_delay: Duration,
    /// How often the publication's tables are re-read, so `ALTER PUBLICATION … ADD TABLE`
    /// is noticed without any change to the new table.
    pub catalog_refresh: Duration,
    /// Counts visibility transactions sent to the database (`/metrics`); the questions of
    /// one role queued together share one.
    pub visibility_queries: Counter,
    /// How long each answered visibility transaction took (`/metrics`). The default has no
    /// buckets but `+Inf`: the binary hands in its own.
    pub visibility_query_seconds: Histogram,
    /// Counts the changes the WAL reader decodes (`/metrics`).
    pub changes_decoded: Counter,
    /// Set every second by the WAL reader: WAL written past the confirmed position, in
    /// bytes (`/metrics`).
    pub replication_lag_bytes: Gauge,
    /// Set every second by the WAL reader: seconds since the oldest transaction not yet
    /// handed out committed, 0 when none waits (`/metrics`).
    pub replication_lag_seconds: Gauge<f64, AtomicU64>,
    /// Counts authorization batches sent to the database (`/metrics`).
    pub authorization_queries: Counter,
    /// 1 while this process reads the replication slot (`/metrics`).
    pub slot_held: Gauge,
    /// Shards fed by this reader: the slot is confirmed up to the lowest position all of
    /// them reported.
    pub shards: usize,
}

impl PostgresConfig {
    /// Supabase's names and conservative limits for `database_url`.
    pub fn new(database_url: impl Into<String>) -> Self {
        PostgresConfig {
            database_url: database_url.into(),
            publication: "supabase_realtime".to_owned(),
            slot_name: "switchboard_slot".to_owned(),
            visibility_connections: 2,
            authorization_connections: 2,
            batches_in_flight_max: 8,
            batch_changes_max: 500,
            batch_delay: Duration::from_millis(10),
            catalog_refresh: Duration::from_secs(10),
            visibility_queries: Counter::default(),
            visibility_query_seconds: Histogram::new(std::iter::empty()),
            changes_decoded: Counter::default(),
            replication_lag_bytes: Gauge::default(),
            replication_lag_seconds: Gauge::default(),
            authorization_queries: Counter::default(),
            slot_held: Gauge::default(),
            shards: 1,
        }
    }
}

/// The running subsystem. Dropping it stops every task and closes every connection, without
/// confirming anything more to Postgres.
pub struct Postgres {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Postgres {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// What the database side of a cluster node exchanges with its cluster link
/// ([`crate::cluster`]): only the node holding the replication slot reads the WAL, and the
/// link carries what it reads to the other nodes and their progress back.
pub struct ClusterDb {
    /// The reader's inputs while this node holds the slot, this node's progress, and its
    /// engines' requests to read the publication again.
    pub to_link: mpsc::UnboundedSender<DbEvent>,
    /// The position every node that was up when a batch went out has handed out: what the
    /// holder confirms to Postgres.
    pub confirmable: watch::Receiver<u64>,
    /// Notified when another node's engine asks for the publication again.
    pub refresh: Arc<Notify>,
}

/// From a node's database side to its cluster link.
#[derive(Debug)]
pub enum DbEvent {
    /// What the WAL reader produced, for every node (this one has it already).
    Feed(Input),
    /// This node's shards have handed out every change up to this position.
    Progress(u64),
    /// An engine of this node asked for the publication again: the holder reads it.
    Refresh,
}

/// Starts the WAL reader, the catalog reads and the visibility pool. `inputs` receives
/// every [`Input`] for the engines, in order ([`crate::to_shards`] spreads them over a
/// process's shards); `outputs` carries every shard's [`Output::Visibility`],
/// [`Output::RefreshPublication`] and [`Output::WalProgress`] (others are ignored). The
/// subsystem ends when `outputs` closes.
///
/// In a `cluster`, the reader runs only while this node holds the slot's advisory lock,
/// and its inputs also go to the link; the slot is confirmed up to what the link says
/// every node handed out.
pub fn start(
    config: PostgresConfig,
    inputs: impl Fn(Input) + Send + Sync + 'static,
    mut outputs: mpsc::UnboundedReceiver<Output>,
    cluster: Option<ClusterDb>,
) -> Postgres {
    let sink: Sink = Arc::new(inputs);
    let (progress, progress_rx) = watch::channel(0u64);
    let mut shards = Progress::new(config.shards);
    let (questions, questions_rx) = mpsc::unbounded_channel();
    let questions_rx = Arc::new(Mutex::new(questions_rx));
    let url: Arc<str> = config.database_url.as_str().into();
    let mut tasks = Vec::new();
    for _ in 0..config.visibility_connections.max(1) {
        tasks.push(tokio::spawn(pool::worker::<rls::Checker>(
            url.clone(),
            questions_rx.clone(),
            sink.clone(),
            config.visibility_queries.clone(),
            Some(config.visibility_query_seconds.clone()),
        )));
    }
    let (authz, authz_rx) = mpsc::unbounded_channel();
    let authz_rx = Arc::new(Mutex::new(authz_rx));
    for _ in 0..config.authorization_connections.max(1) {
        tasks.push(tokio::spawn(pool::worker::<authz::Authorizer>(
            url.clone(),
            authz_rx.clone(),
            sink.clone(),
            config.authorization_queries.clone(),
            None,
        )));
    }
    let refresh = match &cluster {
        Some(cluster) => cluster.refresh.clone(),
        None => Arc::new(Notify::new()),
    };
    let to_link = cluster.as_ref().map(|c| c.to_link.clone());
    match cluster {
        None => tasks.push(tokio::spawn({
            config.slot_held.set(1);
            wal::run(config, sink, progress_rx, refresh.clone())
        })),
        Some(cluster) => {
            let link = cluster.to_link.clone();
            let feed: Sink = Arc::new(move |input: Input| {
                let _ = link.send(DbEvent::Feed(input.clone()));
                sink(input);
            });
            tasks.push(tokio::spawn(holder::run(
                config,
                feed,
                cluster.confirmable,
                refresh.clone(),
            )));
        }
    }
    tasks.push(tokio::spawn(async move {
        while let Some(output) = outputs.recv().await {
            match output {
                Output::Visibility(query) => {
                    let _ = questions.send(query);
                }
                Output::Authorize(query) => {
                    let _ = authz.send(query);
                }
                // A permit is stored while the reader is between sessions.
                Output::RefreshPublication => match &to_link {
                    Some(link) => {
                        let _ = link.send(DbEvent::Refresh);
                        refresh.notify_one();
                    }
                    None => refresh.notify_one(),
                },
                Output::WalProgress { shard, lsn } => {
                    if let Some(lsn) = shards.report(usize::from(shard.0), lsn) {
                        match &to_link {
                            Some(link) => {
                                let _ = link.send(DbEvent::Progress(lsn));
                            }
                            None => {
                                progress.send_replace(lsn);
                            }
                        }
                    }
                }
                _ => {}
            }
        }
    }));
    Postgres { tasks }
}

/// Whether a failure is the connection's or the database's (it may pass if asked again),
/// not the question's: no SQLSTATE (the connection broke), or the database is shutting
/// down, starting, out of resources, cancelled the statement, or failed internally.
pub(crate) fn transient(error: &tokio_postgres::Error) -> bool {
    let Some(code) = error.code() else {
        return true;
    };
    matches!(&code.code()[..2], "08" | "53" | "57" | "58" | "XX")
}

/// A claim as Postgres setting text: strings bare, anything else as JSON.
pub(crate) fn text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Exponential backoff for reconnects: 100 ms doubling to 5 s.
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);

    pub(crate) fn new() -> Self {
        Backoff { next: Self::FIRST }
    }

    /// The delay before the next attempt; each call doubles the one after.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        delay
    }
}
