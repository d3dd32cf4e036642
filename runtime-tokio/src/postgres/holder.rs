//! In a cluster, exactly one node reads the WAL: the one holding a session-level advisory
//! lock named after the slot. The lock lives as long as its connection, so when the holder
//! dies (or is cut from the database) Postgres releases it, another node takes it, and its
//! reader resumes from the slot's confirmed position.

use std::sync::Arc;
use std::time::Duration;

use switchboard_engine::Input;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio_postgres::NoTls;
use tracing::{info, warn};

use super::{wal, Backoff, PostgresConfig, Sink};

/// How often a node that does not hold the lock asks for it again.
const RETRY: Duration = Duration::from_secs(1);

/// Takes the lock when it is free and reads the WAL while holding it, until the engines
/// are gone (`confirmable` closes).
pub(crate) async fn run(
    config: PostgresConfig,
    sink: Sink,
    confirmable: watch::Receiver<u64>,
    refresh: Arc<Notify>,
) {
    let mut backoff = Backoff::new();
    loop {
        match hold(&config).await {
            Ok(mut lost) => {
                info!(slot = %config.slot_name, "holding the replication slot");
                config.slot_held.set(1);
                backoff = Backoff::new();
                let mut reader = tokio::spawn(wal::run(
                    config.clone(),
                    sink.clone(),
                    confirmable.clone(),
                    refresh.clone(),
                ));
                tokio::select! {
                    _ = &mut reader => return,
                    _ = &mut lost => {
                        warn!(slot = %config.slot_name, "lost the replication slot's lock; the WAL reader stops");
                        reader.abort();
                        config.slot_held.set(0);
                        // The new holder reports the lag; this node knows it no more.
                        config.replication_lag_bytes.set(0);
                        config.replication_lag_seconds.set(0.0);
                        sink(Input::Replication(false));
                    }
                }
            }
            Err(error) => warn!(%error, "asking for the replication slot's lock failed"),
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// Connects and waits until the lock is ours; the task returned ends when the connection,
/// and with it the lock, is lost.
async fn hold(config: &PostgresConfig) -> Result<JoinHandle<()>, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(&config.database_url, NoTls).await?;
    let connection = tokio::spawn(async move {
        if let Err(error) = connection.await {
            warn!(%error, "the replication slot's lock connection ended");
        }
    });
    let key = format!("switchboard replication slot {}", config.slot_name);
    loop {
        // Fails once the connection is gone.
        let row = client
            .query_one("select pg_try_advisory_lock(hashtext($1)::bigint)", &[&key])
            .await?;
        if row.get::<_, bool>(0) {
            // The client must live as long as the lock is wanted.
            return Ok(tokio::spawn(async move {
                let _client = client;
                let _ = connection.await;
            }));
        }
        tokio::time::sleep(RETRY).await;
    }
}
