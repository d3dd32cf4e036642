//! The `realtime` schema: installed and upgraded by versioned migrations, each applied once
//! in its own transaction and recorded in `realtime.switchboard_migrations`, under an
//! advisory lock so servers starting together apply each migration once.

use tokio_postgres::Client;
use tracing::{info, warn};

use super::catalog::connect;

/// The migrations, in order: a version, a name, and the SQL.
pub(super) const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "realtime schema",
        include_str!("migrations/0001_realtime_schema.sql"),
    ),
    (
        2,
        "messages publication",
        include_str!("migrations/0002_messages_publication.sql"),
    ),
];

/// The publication of `realtime.messages`, streamed beside the project's publication.
pub const MESSAGES_PUBLICATION: &str = "switchboard_messages";

/// Any advisory lock key of our own: "switchboard" in ASCII, folded to 63 bits.
const LOCK: i64 = 0x7377_6974_6368_626f;

/// How long `realtime.messages` keeps messages; older daily partitions are dropped.
pub const RETENTION_DAYS: u32 = 3;

/// Brings the database's `realtime` schema up to date and makes this week's partitions;
/// returns the versions it applied (none when it was up to date).
pub async fn migrate(database_url: &str) -> Result<Vec<i32>, tokio_postgres::Error> {
    let client = connect(database_url).await?;
    client
        .execute("select pg_advisory_lock($1)", &[&LOCK])
        .await?;
    let applied = apply(&client).await;
    let maintained = match &applied {
        Ok(_) => maintain_partitions(&client).await,
        Err(_) => Ok(()),
    };
    client
        .execute("select pg_advisory_unlock($1)", &[&LOCK])
        .await?;
    maintained?;
    applied
}

async fn apply(client: &Client) -> Result<Vec<i32>, tokio_postgres::Error> {
    client
        .batch_execute(
            "create schema if not exists realtime;
             create table if not exists realtime.switchboard_migrations (
               version integer primary key,
               name text not null,
               applied_at timestamptz not null default now()
             );",
        )
        .await?;
    let done: Vec<i32> = client
        .query("select version from realtime.switchboard_migrations", &[])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let mut applied = Vec::new();
    for &(version, name, sql) in MIGRATIONS {
        if done.contains(&version) {
            continue;
        }
        client.batch_execute("begin").await?;
        let result = async {
            client.batch_execute(sql).await?;
            client
                .execute(
                    "insert into realtime.switchboard_migrations (version, name) values ($1, $2)",
                    &[&version, &name],
                )
                .await
        }
        .await;
        match result {
            Ok(_) => client.batch_execute("commit").await?,
            Err(e) => {
                let _ = client.batch_execute("rollback").await;
                return Err(e);
            }
        }
        info!(version, name, "applied a realtime schema migration");
        applied.push(version);
    }
    Ok(applied)
}

/// Unless `installed`, installs or upgrades the schema (trying again with a backoff while
/// the database cannot be reached); then keeps `realtime.messages`' partitions made ahead
/// and dropped past the retention, hourly, for as long as the server runs.
pub async fn keep_schema(database_url: String, installed: bool) {
    let mut backoff = std::time::Duration::from_secs(1);
    if !installed {
        while let Err(e) = migrate(&database_url).await {
            warn!(error = %e, retry_in = ?backoff, "installing the realtime schema failed");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(std::time::Duration::from_secs(60));
        }
    }
    let mut hourly = tokio::time::interval(std::time::Duration::from_secs(3600));
    hourly.tick().await;
    loop {
        hourly.tick().await;
        let kept = async {
            let client = connect(&database_url).await?;
            maintain_partitions(&client).await
        };
        if let Err(e) = kept.await {
            warn!(error = %e, "maintaining realtime.messages partitions failed; trying again in an hour");
        }
    }
}

/// Makes the coming days' partitions of `realtime.messages` and drops those past the
/// retention. The server runs it at start and hourly.
pub async fn maintain_partitions(client: &Client) -> Result<(), tokio_postgres::Error> {
    let retention = format!("{RETENTION_DAYS} days");
    client
        .execute(
            "select realtime.switchboard_maintain_partitions($1::text::interval)",
            &[&retention],
        )
        .await?;
    Ok(())
}
