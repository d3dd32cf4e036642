//! The WAL reader: streams the publication from a persistent pgoutput slot, groups whole
//! transactions into [`ChangeBatch`]es for the engine, and confirms to Postgres only what
//! the engine reports as handed out.
//!
//! Delivery is at least once. Postgres resends everything after the slot's confirmed
//! position when the stream reconnects; the engine skips changes at or below the highest
//! position it accepted, so only a restart of switchboard itself can repeat a change.
//!
//! Every second the reader also reports how far it trails: the WAL the server wrote past
//! the confirmed position, and how long ago the oldest transaction it read and has not
//! handed out yet committed. That is 0 when nothing waits, however old the last commit: a
//! quiet database is not a lagging one, and a transaction arriving after a quiet hour
//! counts from its own commit, not from the last one handed out.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pg_walstream::{
    CancellationToken, LogicalReplicationMessage, LogicalReplicationParser,
    LogicalReplicationStream, ReplicationStreamConfig, RetryConfig, TupleData,
};
use switchboard_engine::changes::{Change, ChangeBatch, ChangeKind, Column, Table};
use switchboard_engine::Input;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_postgres::Client;
use tracing::{debug, error, info, warn};

use super::decode::{self, Old, Relation};
use super::{catalog, Backoff, PostgresConfig, Sink};

/// Why a replication session ended; every one of them is retried after a backoff.
#[derive(Debug, thiserror::Error)]
enum WalError {
    /// The user has not created the publication yet.
    #[error(
        "publication {0:?} does not exist; create it (Supabase does) and the reader will start"
    )]
    PublicationMissing(String),
    /// A catalog query or its connection failed.
    #[error("catalog query failed: {0}")]
    Catalog(#[from] tokio_postgres::Error),
    /// The replication connection failed or sent something unreadable.
    #[error("replication stream failed: {0}")]
    Stream(#[from] pg_walstream::ReplicationError),
    /// A change named a relation this session never described.
    #[error("change for relation {0} before its Relation message")]
    UnknownRelation(u32),
    /// A change or commit arrived outside a transaction.
    #[error("change outside a transaction")]
    NoTransaction,
}

/// Streams until the engine goes away (its progress channel closes), reconnecting with
/// backoff whenever Postgres does.
///
/// `refresh` is notified when the engine asks for the publication to be read again; the
/// reader then sends it whether or not it changed.
pub(crate) async fn run(
    config: PostgresConfig,
    sink: Sink,
    mut progress: watch::Receiver<u64>,
    refresh: Arc<Notify>,
) {
    let mut reader = Reader {
        replication_url: replication_url(&config.database_url),
        config,
        sink,
        types: catalog::TypeNames::default(),
        published: None,
        relations: HashMap::new(),
        transaction: None,
        pending: None,
        in_flight: VecDeque::new(),
        confirmed: 0,
    };
    reader.config.replication_lag_bytes.set(0);
    reader.config.replication_lag_seconds.set(0.0);
    let mut backoff = Backoff::new();
    loop {
        match reader.session(&mut progress, &mut backoff, &refresh).await {
            Ok(()) => return,
            Err(error @ WalError::PublicationMissing(_)) => error!(%error, "WAL reader waiting"),
            Err(error) => warn!(%error, "WAL reader reconnecting"),
        }
        (reader.sink)(Input::Replication(false));
        // Complete transactions need no connection to be handed out.
        reader.progress(*progress.borrow_and_update());
        if reader.in_flight.len() < reader.config.batches_in_flight_max {
            reader.flush();
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// A transaction being decoded: its changes are handed out only once it commits.
struct Transaction {
    xid: u32,
    /// When it committed, in pgoutput's microseconds since 2000-01-01 UTC.
    committed: i64,
    commit_timestamp: String,
    changes: Vec<Change>,
}

/// Committed transactions waiting to be handed to the engine as one batch.
struct Pending {
    changes: Vec<Change>,
    /// Commit end LSN of the last transaction.
    lsn: u64,
    /// When the first transaction arrived: the batch leaves once the stream has nothing
    /// more ready and no batch is in flight, and at most `batch_delay` later.
    since: Instant,
    /// When the first transaction committed (pgoutput's microseconds).
    committed: i64,
}

/// A batch handed to the engine and not confirmed yet.
struct InFlight {
    /// Commit end LSN of its last transaction.
    lsn: u64,
    /// When its first transaction committed (pgoutput's microseconds).
    committed: i64,
}

struct Reader {
    config: PostgresConfig,
    replication_url: String,
    sink: Sink,
    types: catalog::TypeNames,
    /// The tables last sent as [`Input::Publication`]; `None` before the first read.
    published: Option<Vec<Table>>,
    /// Relations described by this session's `Relation` messages, by OID.
    relations: HashMap<u32, Relation>,
    transaction: Option<Transaction>,
    pending: Option<Pending>,
    /// Batches handed to the engine and not confirmed yet, oldest first.
    in_flight: VecDeque<InFlight>,
    /// The highest LSN the engine reported as handed out.
    confirmed: u64,
}

impl Reader {
    /// One connection's lifetime: catalog, slot, then stream until something fails.
    /// `Ok` only when the engine is gone.
    async fn session(
        &mut self,
        progress: &mut watch::Receiver<u64>,
        backoff: &mut Backoff,
        refresh_asked: &Notify,
    ) -> Result<(), WalError> {
        let client = catalog::connect(&self.config.database_url).await?;
        if !catalog::publication_exists(&client, &self.config.publication).await? {
            return Err(WalError::PublicationMissing(
                self.config.publication.clone(),
            ));
        }
        self.refresh(&client, false).await?;
        // Messages sent from SQL ride the same slot, once the schema is installed. pgoutput
        // takes a list; pg_walstream quotes the ends of it.
        let publications =
            if catalog::publication_exists(&client, super::MESSAGES_PUBLICATION).await? {
                format!(
                    "{}\",\"{}",
                    self.config.publication,
                    super::MESSAGES_PUBLICATION
                )
            } else {
                self.config.publication.clone()
            };
        let stream_config = ReplicationStreamConfig::builder(&self.config.slot_name, &publications)
            .with_protocol_version(1)
            .with_feedback_interval(Duration::from_secs(1))
            .with_connection_timeout(Duration::from_secs(10))
            .with_retry_config(RetryConfig {
                // Reconnecting is this reader's job, with its own backoff.
                max_attempts: 1,
                ..RetryConfig::default()
            });
        let mut stream =
            LogicalReplicationStream::new(&self.replication_url, stream_config).await?;
        self.progress(*progress.borrow_and_update());
        stream
            .shared_lsn_feedback
            .update_applied_lsn(self.confirmed);
        // Creates the slot on first start; resumes from its confirmed position after that.
        stream.start(None).await?;
        info!(
            slot = %self.config.slot_name,
            publication = %self.config.publication,
            "streaming changes"
        );
        (self.sink)(Input::Replication(true));
        *backoff = Backoff::new();
        self.relations.clear();
        self.transaction = None;
        let mut parser = LogicalReplicationParser::with_protocol_version(1);
        let token = CancellationToken::new();
        let period = self.config.catalog_refresh;
        let mut refresh = tokio::time::interval_at(Instant::now() + period, period);
        let mut idle = tokio::time::interval_at(Instant::now() + IDLE_CHECK, IDLE_CHECK);
        loop {
            let room = self.in_flight.len() < self.config.batches_in_flight_max;
            let full = self
                .pending
                .as_ref()
                .is_some_and(|p| p.changes.len() >= self.config.batch_changes_max);
            let flush_at = self.pending.as_ref().filter(|_| room).map(|p| match full {
                true => p.since,
                false => p.since + self.config.batch_delay,
            });
            tokio::select! {
                biased;
                changed = progress.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    let lsn = *progress.borrow_and_update();
                    self.confirm(lsn, &mut stream).await?;
                }
                () = sleep_until(flush_at), if flush_at.is_some() => self.flush(),
                _ = refresh.tick() => self.refresh(&client, false).await?,
                () = refresh_asked.notified() => self.refresh(&client, true).await?,
                _ = idle.tick() => {
                    self.confirm_idle(&mut stream).await?;
                    self.measure_lag(&client, stream.current_lsn()).await?;
                }
                // Dropping this read for another branch loses nothing: the connection
                // keeps what it has received in its own buffer.
                raw = stream.next_raw_event(&token), if room && !full => {
                    let message = parser.parse_wal_message_bytes(raw?.data)?;
                    self.message(message.message, &client).await?;
                }
                // Polled last: nothing more has arrived and the engine has every batch
                // done, so what is pending leaves now instead of waiting out `batch_delay`
                // for company. While a batch is in flight, changes gather (Nagle's rule),
                // so many small transactions never make more batches, each with its own
                // visibility questions, than a fixed delay would.
                () = std::future::ready(()), if self.in_flight.is_empty() && self.pending.is_some() => {
                    self.flush()
                }
            }
        }
    }

    /// Re-reads the publication and tells the engine if it changed, or in any case when
    /// `asked`.
    async fn refresh(&mut self, client: &Client, asked: bool) -> Result<(), WalError> {
        let tables = catalog::tables(client, &self.config.publication).await?;
        if asked || self.published.as_ref() != Some(&tables) {
            debug!(tables = tables.len(), "publication changed");
            (self.sink)(Input::Publication(tables.clone()));
            self.published = Some(tables);
        }
        Ok(())
    }

    async fn message(
        &mut self,
        message: LogicalReplicationMessage,
        client: &Client,
    ) -> Result<(), WalError> {
        match message {
            LogicalReplicationMessage::Begin { timestamp, xid, .. } => {
                self.transaction = Some(Transaction {
                    xid,
                    committed: timestamp,
                    commit_timestamp: decode::commit_timestamp(timestamp),
                    changes: Vec::new(),
                });
            }
            LogicalReplicationMessage::Relation {
                relation_id,
                namespace,
                relation_name,
                columns,
                ..
            } => {
                self.types
                    .resolve(client, columns.iter().map(|c| c.type_id))
                    .await?;
                let relation = Relation {
                    schema: namespace.to_string(),
                    table: relation_name.to_string(),
                    columns: columns
                        .iter()
                        .map(|c| Column {
                            name: c.name.to_string(),
                            type_name: self.types.name(c.type_id),
                        })
                        .collect(),
                    key: columns.iter().map(|c| c.is_key()).collect(),
                };
                let known = self.published.iter().flatten().any(|table| {
                    table.schema == relation.schema
                        && table.name == relation.table
                        && relation.columns.iter().all(|c| table.columns.contains(c))
                });
                self.relations.insert(relation_id, relation);
                // The engine hears of a new or altered table before any of its changes.
                if !known {
                    self.refresh(client, false).await?;
                }
            }
            LogicalReplicationMessage::Insert { relation_id, tuple } => {
                self.push(relation_id, ChangeKind::Insert, Some(&tuple), Old::Absent)?;
            }
            LogicalReplicationMessage::Update {
                relation_id,
                old_tuple,
                new_tuple,
                key_type,
            } => {
                let old = match (&old_tuple, key_type) {
                    (Some(tuple), Some('O')) => Old::Full(tuple),
                    (Some(tuple), _) => Old::Key(tuple),
                    (None, _) => Old::Absent,
                };
                self.push(relation_id, ChangeKind::Update, Some(&new_tuple), old)?;
            }
            LogicalReplicationMessage::Delete {
                relation_id,
                old_tuple,
                key_type,
            } => {
                let old = match key_type {
                    'O' => Old::Full(&old_tuple),
                    _ => Old::Key(&old_tuple),
                };
                self.push(relation_id, ChangeKind::Delete, None, old)?;
            }
            LogicalReplicationMessage::Commit { end_lsn, .. } => self.commit(end_lsn)?,
            // Truncate is not delivered; types, origins and messages mean nothing to clients.
            _ => {}
        }
        Ok(())
    }

    fn push(
        &mut self,
        relation_id: u32,
        kind: ChangeKind,
        new: Option<&TupleData>,
        old: Old<'_>,
    ) -> Result<(), WalError> {
        let relation = self
            .relations
            .get(&relation_id)
            .ok_or(WalError::UnknownRelation(relation_id))?;
        let transaction = self.transaction.as_mut().ok_or(WalError::NoTransaction)?;
        let change = decode::change(
            relation,
            kind,
            new,
            old,
            &transaction.commit_timestamp,
            transaction.xid,
        );
        transaction.changes.push(change);
        self.config.changes_decoded.inc();
        Ok(())
    }

    fn commit(&mut self, end_lsn: u64) -> Result<(), WalError> {
        let mut transaction = self.transaction.take().ok_or(WalError::NoTransaction)?;
        if end_lsn <= self.confirmed {
            // Postgres resends from the slot's persisted position, which after a crash may
            // lag what was confirmed: the engine handed these out already.
            debug!(lsn = end_lsn, "skipping a transaction confirmed before");
            return Ok(());
        }
        for change in &mut transaction.changes {
            change.lsn = end_lsn;
        }
        let pending = self.pending.get_or_insert_with(|| Pending {
            changes: Vec::new(),
            lsn: end_lsn,
            since: Instant::now(),
            committed: transaction.committed,
        });
        pending.changes.extend(transaction.changes);
        pending.lsn = end_lsn;
        Ok(())
    }

    /// Hands the pending batch to the engine.
    fn flush(&mut self) {
        if let Some(pending) = self.pending.take() {
            debug!(
                lsn = pending.lsn,
                changes = pending.changes.len(),
                in_flight = self.in_flight.len(),
                "handing a batch to the engine"
            );
            self.in_flight.push_back(InFlight {
                lsn: pending.lsn,
                committed: pending.committed,
            });
            (self.sink)(Input::Changes(Arc::new(ChangeBatch {
                changes: pending.changes,
                lsn: pending.lsn,
            })));
        }
    }

    /// With nothing outstanding (no open transaction, nothing pending, every batch
    /// confirmed), everything received has been handed out, so the position of the last
    /// keepalive can be confirmed: it is past every commit the server sent. Without this a
    /// quiet publication on a busy database would retain WAL forever, and a fast shutdown
    /// of Postgres would wait for `wal_sender_timeout`, since the walsender exits only once
    /// its client confirms everything it sent.
    async fn confirm_idle(
        &mut self,
        stream: &mut LogicalReplicationStream,
    ) -> Result<(), WalError> {
        let outstanding =
            self.transaction.is_some() || self.pending.is_some() || !self.in_flight.is_empty();
        let received = stream.current_lsn();
        if outstanding || received <= self.confirmed {
            return Ok(());
        }
        self.confirm(received, stream).await
    }

    /// Records the engine's progress: batches up to `lsn` are no longer in flight. False if
    /// it is not news.
    fn progress(&mut self, lsn: u64) -> bool {
        // Batches resent after a reconnect may end below what was confirmed before: they
        // leave the flight all the same.
        while self.in_flight.front().is_some_and(|batch| batch.lsn <= lsn) {
            self.in_flight.pop_front();
        }
        if lsn <= self.confirmed {
            return false;
        }
        self.confirmed = lsn;
        true
    }

    /// Sets the lag gauges: the server's WAL position (or, if later, `received`, the last
    /// one the stream reported) past the confirmed one, and the age of the oldest commit not
    /// handed out.
    async fn measure_lag(&self, client: &Client, received: u64) -> Result<(), WalError> {
        let server = catalog::wal_position(client).await?.unwrap_or(0);
        let written = server.max(received);
        let behind = written.saturating_sub(self.confirmed);
        self.config
            .replication_lag_bytes
            .set(i64::try_from(behind).unwrap_or(i64::MAX));
        let waiting = self.oldest_waiting();
        let seconds = seconds_since(waiting, SystemTime::now());
        self.config.replication_lag_seconds.set(seconds);
        Ok(())
    }

    /// When the oldest transaction read and not yet handed out committed: transactions
    /// arrive in commit order, so the first in flight, else the first pending, else the one
    /// being read.
    fn oldest_waiting(&self) -> Option<i64> {
        let in_flight = self.in_flight.front().map(|batch| batch.committed);
        let pending = self.pending.as_ref().map(|batch| batch.committed);
        let reading = self.transaction.as_ref().map(|t| t.committed);
        in_flight.or(pending).or(reading)
    }

    /// Records the engine's progress and confirms it to Postgres at once, so the slot
    /// stops retaining WAL and a reconnect does not resend it.
    async fn confirm(
        &mut self,
        lsn: u64,
        stream: &mut LogicalReplicationStream,
    ) -> Result<(), WalError> {
        if !self.progress(lsn) {
            return Ok(());
        }
        stream.shared_lsn_feedback.update_applied_lsn(lsn);
        stream.send_feedback().await?;
        Ok(())
    }
}

/// How often a reader with nothing outstanding confirms the server's position.
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// Microseconds from the Unix epoch to pgoutput's, 2000-01-01 UTC.
const POSTGRES_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// Seconds from `committed` (pgoutput's microseconds) to `now`; 0 with nothing committed,
/// and for a commit the server's clock puts ahead of ours.
fn seconds_since(committed: Option<i64>, now: SystemTime) -> f64 {
    let Some(committed) = committed else {
        return 0.0;
    };
    let now = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_micros() as i64);
    (now - POSTGRES_EPOCH_MICROS - committed).max(0) as f64 / 1e6
}

async fn sleep_until(deadline: Option<Instant>) {
    if let Some(deadline) = deadline {
        tokio::time::sleep_until(deadline).await;
    }
}

/// The replication connection's URL: `replication=database`, and the session settings the
/// decoder relies on (UTC, ISO dates) whatever the server's defaults.
fn replication_url(url: &str) -> String {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let separator = if url.contains('?') { '&' } else { '?' };
        let options = "options=-c%20TimeZone%3DUTC%20-c%20DateStyle%3DISO";
        format!("{url}{separator}replication=database&{options}")
    } else {
        format!("{url} replication=database options='-c TimeZone=UTC -c DateStyle=ISO'")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_counts_from_the_oldest_waiting_commit_and_is_zero_without_one() {
        // 2024-01-01T00:00:00Z, in pgoutput's microseconds.
        let committed = (1_704_067_200 - 946_684_800) * 1_000_000;
        let later = UNIX_EPOCH + Duration::from_millis(1_704_067_202_500);
        assert_eq!(seconds_since(Some(committed), later), 2.5);
        assert_eq!(seconds_since(None, later), 0.0);
        let earlier = UNIX_EPOCH + Duration::from_secs(1_704_067_199);
        assert_eq!(seconds_since(Some(committed), earlier), 0.0, "clock skew");
    }

    #[test]
    fn replication_url_keeps_the_users_parameters() {
        assert_eq!(
            replication_url("postgresql://u@h:5432/db?sslmode=require"),
            "postgresql://u@h:5432/db?sslmode=require&replication=database\
             &options=-c%20TimeZone%3DUTC%20-c%20DateStyle%3DISO"
        );
        assert_eq!(
            replication_url("host=h dbname=db"),
            "host=h dbname=db replication=database options='-c TimeZone=UTC -c DateStyle=ISO'"
        );
    }
}
