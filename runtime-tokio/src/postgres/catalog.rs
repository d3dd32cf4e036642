//! Catalog reads on an ordinary connection: the publication's tables (what the engine may
//! subscribe to), type names for the OIDs pgoutput sends, and the server's WAL position.

use std::collections::HashMap;

use switchboard_engine::changes::{Column, Table};
use tokio_postgres::{Client, NoTls};
use tracing::warn;

/// Opens an ordinary (non-replication) connection and drives it on its own task.
pub(crate) async fn connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            warn!(%error, "postgres connection ended");
        }
    });
    Ok(client)
}

/// Whether the publication exists: streaming from a missing one fails only at the first
/// change, so the reader checks before it starts.
pub(crate) async fn publication_exists(
    client: &Client,
    publication: &str,
) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "select 1 from pg_catalog.pg_publication where pubname = $1",
            &[&publication],
        )
        .await?;
    Ok(row.is_some())
}

/// Where the server's WAL ends, in bytes: what it has written on a primary, what it has
/// replayed on a standby (where logical decoding may run too). `None` on a standby that has
/// replayed nothing yet.
pub(crate) async fn wal_position(client: &Client) -> Result<Option<u64>, tokio_postgres::Error> {
    const POSITION: &str = "select (case when pg_is_in_recovery() then pg_last_wal_replay_lsn()
        else pg_current_wal_lsn() end - '0/0'::pg_lsn)::int8";
    let row = client.query_one(POSITION, &[]).await?;
    Ok(row.get::<_, Option<i64>>(0).map(|lsn| lsn as u64))
}

/// Every table of the publication with its columns in `attnum` order, primary key in key
/// order and whether Row Level Security is on, sorted by schema and name so two reads of
/// an unchanged catalog compare equal.
pub(crate) async fn tables(
    client: &Client,
    publication: &str,
) -> Result<Vec<Table>, tokio_postgres::Error> {
    const TABLES: &str = "
        select n.nspname::text, c.relname::text, c.relrowsecurity,
            array(
                select a.attname::text from pg_catalog.pg_attribute a
                where a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
                order by a.attnum
            ),
            array(
                select t.typname::text from pg_catalog.pg_attribute a
                join pg_catalog.pg_type t on t.oid = a.atttypid
                where a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
                order by a.attnum
            ),
            array(
                select a.attname::text from pg_catalog.pg_index i
                join pg_catalog.pg_attribute a
                    on a.attrelid = i.indrelid and a.attnum = any(i.indkey)
                where i.indrelid = c.oid and i.indisprimary
                order by array_position(i.indkey::int2[], a.attnum)
            )
        from pg_catalog.pg_publication_tables p
        join pg_catalog.pg_namespace n on n.nspname = p.schemaname
        join pg_catalog.pg_class c on c.relnamespace = n.oid and c.relname = p.tablename
        where p.pubname = $1
        order by 1, 2";
    let rows = client.query(TABLES, &[&publication]).await?;
    Ok(rows
        .iter()
        .map(|row| {
            let names: Vec<String> = row.get(3);
            let types: Vec<String> = row.get(4);
            Table {
                schema: row.get(0),
                name: row.get(1),
                rls: row.get(2),
                columns: names
                    .into_iter()
                    .zip(types)
                    .map(|(name, type_name)| Column { name, type_name })
                    .collect(),
                primary_key: row.get(5),
            }
        })
        .collect())
}

/// `pg_type.typname` by OID, cached: pgoutput names columns by type OID only, and the
/// built-in OIDs never change.
#[derive(Default)]
pub(crate) struct TypeNames {
    names: HashMap<u32, String>,
}

impl TypeNames {
    /// Looks up every OID in `oids` not cached yet, in one query.
    pub(crate) async fn resolve(
        &mut self,
        client: &Client,
        oids: impl IntoIterator<Item = u32>,
    ) -> Result<(), tokio_postgres::Error> {
        let missing: Vec<u32> = oids
            .into_iter()
            .filter(|oid| !self.names.contains_key(oid))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let rows = client
            .query(
                "select oid, typname::text from pg_catalog.pg_type where oid = any($1)",
                &[&missing],
            )
            .await?;
        for row in rows {
            self.names.insert(row.get(0), row.get(1));
        }
        Ok(())
    }

    /// The cached name; a type dropped between the `Relation` message and the lookup is
    /// shown as `text`, which every client handles.
    pub(crate) fn name(&self, oid: u32) -> String {
        self.names
            .get(&oid)
            .cloned()
            .unwrap_or_else(|| "text".to_owned())
    }
}
