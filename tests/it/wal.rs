//! The postgres subsystem against a real PostgreSQL, with a channel standing in for the
//! engine: typed values from the WAL, and no change lost, repeated or reordered when
//! Postgres or the reader restarts.

use std::time::Duration;

use serde_json::{json, Value};
use switchboard_engine::changes::{Change, ChangeBatch, ChangeKind, Column, Table};
use switchboard_engine::{Input, Output, ShardId};
use switchboard_tokio::postgres::{self, Postgres, PostgresConfig};
use tokio::sync::mpsc;

use crate::pg::TempPostgres;

/// The subsystem wired to channels: the test reads its inputs and answers as the engine.
pub struct Engine {
    inputs: mpsc::UnboundedReceiver<Input>,
    outputs: mpsc::UnboundedSender<Output>,
    /// The running subsystem; dropping it stops the reader without confirming more.
    _postgres: Postgres,
    /// What the reader last said of the change stream ([`Input::Replication`]).
    live: bool,
}

impl Engine {
    pub fn start(config: PostgresConfig) -> Engine {
        let (input, inputs) = mpsc::unbounded_channel();
        let (outputs, output) = mpsc::unbounded_channel();
        let postgres = postgres::start(
            config,
            move |i| {
                let _ = input.send(i);
            },
            output,
            None,
        );
        Engine {
            inputs,
            outputs,
            _postgres: postgres,
            live: false,
        }
    }

    /// The next input, within 10 s, after any news of the stream going live or down
    /// (kept in `live`).
    pub async fn next(&mut self) -> Input {
        loop {
            let input = tokio::time::timeout(Duration::from_secs(10), self.inputs.recv())
                .await
                .expect("an input within 10 s")
                .expect("the subsystem is running");
            match input {
                Input::Replication(live) => self.live = live,
                input => return input,
            }
        }
    }

    /// Sends an output as the engine would.
    pub fn send(&self, output: Output) {
        self.outputs.send(output).expect("the subsystem is running");
    }

    async fn batch(&mut self) -> ChangeBatch {
        loop {
            if let Input::Changes(batch) = self.next().await {
                return (*batch).clone();
            }
        }
    }

    /// Batches until they hold at least `count` changes, each confirmed as soon as it
    /// arrives, as an engine with nothing to wait for would.
    async fn changes(&mut self, count: usize) -> Vec<Change> {
        let mut changes = Vec::new();
        while changes.len() < count {
            let batch = self.batch().await;
            self.send(Output::WalProgress {
                shard: ShardId(0),
                lsn: batch.lsn,
            });
            changes.extend(batch.changes);
        }
        changes
    }
}

/// Waits until the reader holds the slot and the slot is consistent: changes committed
/// from then on are streamed. A slot being created is already `active`, but until it is
/// consistent (it waits for the transactions open when it began) it has no
/// `confirmed_flush_lsn`, and what commits meanwhile is before its start.
pub async fn wait_streaming(client: &tokio_postgres::Client) {
    for _ in 0..200 {
        let active = client
            .query_opt(
                "select 1 from pg_replication_slots
                 where slot_name = 'switchboard_slot' and active
                   and confirmed_flush_lsn is not null",
                &[],
            )
            .await
            .expect("reading pg_replication_slots");
        if active.is_some() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the reader did not start streaming within 10 s");
}

/// The `id` column of each change's row.
fn ids(changes: &[Change]) -> Vec<i64> {
    changes
        .iter()
        .map(|c| {
            let row = c.record.as_ref().or(c.old_record.as_ref()).expect("a row");
            row["id"].as_i64().expect("an integer id")
        })
        .collect()
}

fn row(map: &Option<serde_json::Map<String, Value>>) -> Value {
    map.clone().map_or(Value::Null, Value::Object)
}

fn is_commit_timestamp(text: &str) -> bool {
    let digits = |range: std::ops::Range<usize>| text[range].bytes().all(|b| b.is_ascii_digit());
    text.len() == 24
        && digits(0..4)
        && &text[4..5] == "-"
        && &text[10..11] == "T"
        && &text[19..20] == "."
        && digits(20..23)
        && text.ends_with('Z')
}

const TYPES_SQL: &str = r#"
create table public.types (
  id int8 primary key, i2 int2, i4 int4, i8 int8, f4 float4, f8 float8, n numeric, b bool,
  t text, v varchar(20), j json, jb jsonb, ai int4[], at text[], ts timestamp,
  tstz timestamptz, d date, u uuid, by bytea
);
create table public.toasted (id int8 primary key, note text, big text);
alter table public.toasted alter column big set storage external;
create table public.toasted_full (id int8 primary key, note text, big text);
alter table public.toasted_full alter column big set storage external;
alter table public.toasted_full replica identity full;
alter publication supabase_realtime add table public.types, public.toasted, public.toasted_full;
-- The reader's session must print timestamps in UTC whatever the database says.
alter database postgres set timezone to 'Asia/Kolkata';
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_column_type_round_trips() {
    let pg = TempPostgres::start();
    pg.psql(TYPES_SQL);
    let mut engine = Engine::start(PostgresConfig::new(pg.url()));
    let client = pg.client().await;
    wait_streaming(&client).await;
    client
        .batch_execute(
            r#"
            insert into public.types values (1, 32767, 2147483647, 9223372036854775807, 1.5,
              2.25, 12.50, true, 'hello "world"', 'var', '{"a": [1, 2]}', '{"b": {"c": null}}',
              '{1,2,NULL}', '{a,"b c",NULL,"d\"e"}', '2026-01-01 12:00:00.123456',
              '2026-01-01 12:00:00+05:30', '2026-01-01', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
              '\x0102');
            insert into public.types (id) values (2);
            insert into public.types (id, n, f4, f8, b) values (3, 100, '-Infinity', 'NaN', false);
            insert into public.toasted values (1, 'a', repeat('0123456789abcdef', 1000));
            insert into public.toasted_full values (1, 'a', repeat('0123456789abcdef', 1000));
            update public.toasted set note = 'b' where id = 1;
            update public.toasted_full set note = 'b' where id = 1;
            delete from public.toasted where id = 1;
            delete from public.toasted_full where id = 1;
            "#,
        )
        .await
        .expect("writing the rows");
    let changes = engine.changes(9).await;
    assert_eq!(changes.len(), 9);
    for change in &changes {
        assert!(
            is_commit_timestamp(&change.commit_timestamp),
            "{}",
            change.commit_timestamp
        );
    }

    let columns: Vec<(&str, &str)> = changes[0]
        .columns
        .iter()
        .map(|c| (c.name.as_str(), c.type_name.as_str()))
        .collect();
    assert_eq!(
        columns,
        [
            ("id", "int8"),
            ("i2", "int2"),
            ("i4", "int4"),
            ("i8", "int8"),
            ("f4", "float4"),
            ("f8", "float8"),
            ("n", "numeric"),
            ("b", "bool"),
            ("t", "text"),
            ("v", "varchar"),
            ("j", "json"),
            ("jb", "jsonb"),
            ("ai", "_int4"),
            ("at", "_text"),
            ("ts", "timestamp"),
            ("tstz", "timestamptz"),
            ("d", "date"),
            ("u", "uuid"),
            ("by", "bytea")
        ]
    );
    assert_eq!(
        (changes[0].schema.as_str(), changes[0].table.as_str()),
        ("public", "types")
    );
    assert_eq!(changes[0].kind, ChangeKind::Insert);
    assert_eq!(changes[0].old_record, None);
    assert_eq!(
        row(&changes[0].record),
        json!({
            "id": 1, "i2": 32767, "i4": 2147483647, "i8": 9223372036854775807_i64,
            "f4": 1.5, "f8": 2.25, "n": 12.5, "b": true, "t": "hello \"world\"", "v": "var",
            "j": {"a": [1, 2]}, "jb": {"b": {"c": null}}, "ai": [1, 2, null],
            "at": ["a", "b c", null, "d\"e"], "ts": "2026-01-01T12:00:00.123456",
            "tstz": "2026-01-01T06:30:00+00:00", "d": "2026-01-01",
            "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "by": "\\x0102"
        })
    );
    let mut nulls = json!({"id": 2});
    for column in &columns[1..] {
        nulls[column.0] = Value::Null;
    }
    assert_eq!(row(&changes[1].record), nulls);
    let record = row(&changes[2].record);
    assert_eq!(
        [&record["n"], &record["f4"], &record["f8"], &record["b"]],
        [
            &json!(100),
            &json!("-Infinity"),
            &json!("NaN"),
            &json!(false)
        ]
    );

    let big = "0123456789abcdef".repeat(1000);
    let [_, _, _, _, _, update, update_full, delete, delete_full] = &changes[..] else {
        unreachable!("nine changes");
    };
    // Default replica identity: the unchanged TOAST value is not in the WAL at all.
    assert_eq!(update.kind, ChangeKind::Update);
    assert_eq!(row(&update.record), json!({"id": 1, "note": "b"}));
    assert_eq!(update.old_record, None);
    // REPLICA IDENTITY FULL: it comes from the old row.
    assert_eq!(update_full.table, "toasted_full");
    assert_eq!(
        row(&update_full.record),
        json!({"id": 1, "note": "b", "big": big})
    );
    assert_eq!(
        row(&update_full.old_record),
        json!({"id": 1, "note": "a", "big": big})
    );
    assert_eq!(delete.kind, ChangeKind::Delete);
    assert_eq!(delete.record, None);
    assert_eq!(row(&delete.old_record), json!({"id": 1}));
    assert_eq!(
        row(&delete_full.old_record),
        json!({"id": 1, "note": "b", "big": big})
    );
}

/// A throwaway Postgres whose publication has one table, `public.items (id int8)`.
fn publishing_items() -> TempPostgres {
    let pg = TempPostgres::start();
    pg.psql(
        "create table public.items (id int8 primary key);
         alter publication supabase_realtime add table public.items;",
    );
    pg
}

async fn insert_each(client: &tokio_postgres::Client, ids: std::ops::RangeInclusive<i64>) {
    for id in ids {
        client
            .execute("insert into public.items values ($1)", &[&id])
            .await
            .expect("inserting");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_loses_repeats_and_reorders_nothing() {
    let pg = publishing_items();
    let mut engine = Engine::start(PostgresConfig::new(pg.url()));
    let client = pg.client().await;
    wait_streaming(&client).await;
    // The engine confirms every batch as it comes, throughout.
    let collector = tokio::spawn(async move {
        let changes = engine.changes(40).await;
        (engine, changes)
    });
    insert_each(&client, 1..=20).await;
    // Restart while the reader may still be streaming the first half.
    let pg = tokio::task::spawn_blocking(move || {
        pg.restart();
        pg
    })
    .await
    .expect("restart");
    insert_each(&pg.client().await, 21..=40).await;
    let (mut engine, changes) = collector.await.expect("collecting");
    // Anything more would be a duplicate.
    let extra = tokio::time::timeout(Duration::from_millis(500), engine.batch()).await;
    assert!(extra.is_err(), "unexpected batch after all 40: {extra:?}");
    assert_eq!(ids(&changes), (1..=40).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_reader_resends_exactly_the_unconfirmed_changes() {
    let pg = publishing_items();
    let mut engine = Engine::start(PostgresConfig::new(pg.url()));
    let client = pg.client().await;
    wait_streaming(&client).await;
    insert_each(&client, 1..=10).await;
    // Confirm the batches that end at or before id 5, then none.
    let mut seen = Vec::new();
    let mut confirmed: Option<(u64, i64)> = None;
    while seen.len() < 10 {
        let batch = engine.batch().await;
        seen.extend(ids(&batch.changes));
        let last = *seen.last().expect("a change");
        if last <= 5 {
            engine.send(Output::WalProgress {
                shard: ShardId(0),
                lsn: batch.lsn,
            });
            confirmed = Some((batch.lsn, last));
        }
    }
    assert_eq!(seen, (1..=10).collect::<Vec<_>>());
    let (lsn, last_confirmed) = confirmed.expect("a batch ending at or before id 5");
    // Wait until Postgres has the confirmation, so the resend starts exactly after it.
    for attempt in 0.. {
        let flushed: i64 = client
            .query_one(
                "select (confirmed_flush_lsn - '0/0'::pg_lsn)::int8 from pg_replication_slots
                 where slot_name = 'switchboard_slot'",
                &[],
            )
            .await
            .expect("reading the slot")
            .get(0);
        if flushed as u64 >= lsn {
            assert_eq!(
                flushed as u64, lsn,
                "confirmed past what the engine reported"
            );
            break;
        }
        assert!(attempt < 100, "the confirmation never reached Postgres");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(engine);

    let mut engine = Engine::start(PostgresConfig::new(pg.url()));
    wait_streaming(&client).await;
    insert_each(&client, 11..=15).await;
    let changes = engine.changes(15 - last_confirmed as usize).await;
    assert_eq!(ids(&changes), (last_confirmed + 1..=15).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_hears_of_a_new_table_before_its_changes() {
    let pg = TempPostgres::start();
    pg.psql(
        "create table public.items (id int8 primary key, note text);
         alter table public.items enable row level security;
         alter publication supabase_realtime add table public.items;",
    );
    let mut engine = Engine::start(PostgresConfig::new(pg.url()));
    let column = |name: &str, type_name: &str| Column {
        name: name.into(),
        type_name: type_name.into(),
    };
    let items = Table {
        schema: "public".into(),
        name: "items".into(),
        columns: vec![column("id", "int8"), column("note", "text")],
        primary_key: vec!["id".into()],
        rls: true,
    };
    let Input::Publication(tables) = engine.next().await else {
        panic!("the publication comes first");
    };
    assert_eq!(tables, std::slice::from_ref(&items));
    wait_streaming(&pg.client().await).await;
    pg.psql(
        "create table public.later (a int4, b text, primary key (b, a));
         alter publication supabase_realtime add table public.later;
         insert into public.later values (1, 'x');",
    );
    let Input::Publication(tables) = engine.next().await else {
        panic!("the new table before its change");
    };
    assert!(engine.live, "the reader said the stream is live");
    let later = Table {
        schema: "public".into(),
        name: "later".into(),
        columns: vec![column("a", "int4"), column("b", "text")],
        primary_key: vec!["b".into(), "a".into()],
        rls: false,
    };
    assert_eq!(tables, [items, later]);
    let changes = engine.changes(1).await;
    assert_eq!(row(&changes[0].record), json!({"a": 1, "b": "x"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_publication_does_not_hold_back_wal() {
    let pg = TempPostgres::start();
    pg.psql("create table public.unpublished (id int8 primary key);");
    let _engine = Engine::start(PostgresConfig::new(pg.url()));
    let client = pg.client().await;
    wait_streaming(&client).await;
    client
        .batch_execute("insert into public.unpublished select generate_series(1, 100)")
        .await
        .expect("inserting");
    let written: i64 = client
        .query_one("select (pg_current_wal_lsn() - '0/0'::pg_lsn)::int8", &[])
        .await
        .expect("reading the WAL position")
        .get(0);
    for _ in 0..100 {
        let flushed: Option<i64> = client
            .query_one(
                "select (confirmed_flush_lsn - '0/0'::pg_lsn)::int8 from pg_replication_slots
                 where slot_name = 'switchboard_slot'",
                &[],
            )
            .await
            .expect("reading the slot")
            .get(0);
        if flushed.is_some_and(|flushed| flushed >= written) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the slot never moved past WAL with nothing for the engine");
}

/// After a crash Postgres resends from the slot's persisted position, which lags what was
/// confirmed: the reader skips what the engine already confirmed, its flight of batches
/// never jams on resends, and streaming carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_crash_resends_nothing_confirmed_and_streaming_resumes() {
    let pg = publishing_items();
    let mut config = PostgresConfig::new(pg.url());
    config.batches_in_flight_max = 2;
    config.batch_changes_max = 5;
    let mut engine = Engine::start(config);
    let client = pg.client().await;
    wait_streaming(&client).await;
    client
        .batch_execute(
            "do $$ begin for i in 1..60 loop insert into public.items values (i); commit; end loop; end $$",
        )
        .await
        .expect("inserting");
    let before = engine.changes(60).await;
    assert_eq!(ids(&before), (1..=60).collect::<Vec<_>>());
    let pg = tokio::task::spawn_blocking(move || {
        pg.stop("immediate");
        pg.start_again();
        pg
    })
    .await
    .expect("crashing postgres");
    let client = pg.client().await;
    client
        .batch_execute("insert into public.items select generate_series(61, 80)")
        .await
        .expect("inserting after the crash");
    let after = engine.changes(20).await;
    assert_eq!(ids(&after), (61..=80).collect::<Vec<_>>());
}

/// A batch leaves as soon as the stream has nothing more ready and no batch is in flight,
/// not after `batch_delay` (an hour here, so waiting it out fails the test); the
/// transactions that arrive while one is in flight leave together once it is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_leaves_once_the_stream_is_drained_and_grows_while_the_engine_is_busy() {
    let pg = publishing_items();
    let mut config = PostgresConfig::new(pg.url());
    config.batch_delay = Duration::from_secs(3600);
    let mut engine = Engine::start(config);
    let client = pg.client().await;
    wait_streaming(&client).await;
    insert_each(&client, 1..=1).await;
    let first = engine.batch().await;
    assert_eq!(ids(&first.changes), [1]);
    // While the first batch is unconfirmed, these gather, 20 ms apart, until the walsender
    // has sent them all.
    insert_each(&client, 2..=6).await;
    for attempt in 0.. {
        let sent: bool = client
            .query_one(
                "select sent_lsn >= pg_current_wal_insert_lsn() from pg_stat_replication",
                &[],
            )
            .await
            .expect("reading pg_stat_replication")
            .get(0);
        if sent {
            break;
        }
        assert!(attempt < 200, "the walsender never sent the five commits");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    engine.send(Output::WalProgress {
        shard: ShardId(0),
        lsn: first.lsn,
    });
    let second = engine.batch().await;
    assert_eq!(ids(&second.changes), (2..=6).collect::<Vec<_>>());
}

/// A transaction open while the slot is first created (the slot waits for it): every
/// change committed once the reader streams still arrives. Found when the `realtime` schema
/// was installed beside the reader's start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_open_while_the_slot_is_created_loses_nothing_after() {
    let pg = TempPostgres::start();
    pg.psql(
        "create table public.items (id int8 primary key);
         create table public.other (id int8 primary key);
         alter publication supabase_realtime add table public.items;",
    );
    let open = pg.client().await;
    open.batch_execute("begin; insert into public.other values (1)")
        .await
        .expect("an open transaction");
    let mut engine = Engine::start(PostgresConfig::new(pg.url()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    open.batch_execute("commit").await.expect("committing");
    let client = pg.client().await;
    wait_streaming(&client).await;
    let collector = tokio::spawn(async move { engine.changes(20).await });
    insert_each(&client, 1..=20).await;
    let changes = tokio::time::timeout(Duration::from_secs(10), collector)
        .await
        .expect("every change within 10 s")
        .expect("collecting");
    assert_eq!(ids(&changes), (1..=20).collect::<Vec<_>>());
}
