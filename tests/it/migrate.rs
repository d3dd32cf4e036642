//! The `realtime` schema on a real Postgres: `switchboard migrate` installs it once,
//! `serve` installs it at start, and its functions behave as Supabase's do.

use std::process::Command;

use serde_json::{json, Value};

use crate::pg::TempPostgres;
use crate::support::{join, recv, token, Server};
use crate::wal::wait_streaming;

fn migrate(pg: &TempPostgres) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["migrate", "--database-url", &pg.url()])
        .output()
        .expect("the binary runs");
    assert!(
        output.status.success(),
        "migrate failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8")
}

/// How many partitions `realtime.messages` has.
async fn partitions(db: &tokio_postgres::Client) -> i64 {
    db.query_one(
        "select count(*) from pg_inherits where inhparent = 'realtime.messages'::regclass",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test]
async fn migrate_installs_the_schema_once_and_its_functions_work() {
    let pg = TempPostgres::start();
    assert_eq!(
        migrate(&pg).trim(),
        "applied realtime schema migrations [1, 2]"
    );
    assert_eq!(migrate(&pg).trim(), "the realtime schema is up to date");
    let db = pg.client().await;

    // Partitions from yesterday to three days ahead.
    assert_eq!(partitions(&db).await, 5);

    // realtime.send: the payload gains the row's id, private by default.
    db.batch_execute(r#"select realtime.send('{"text": "hi"}', 'shout', 'room-1')"#)
        .await
        .unwrap();
    let row = db
        .query_one(
            "select id::text, payload::text, event, topic, private, extension from realtime.messages",
            &[],
        )
        .await
        .unwrap();
    let id: String = row.get(0);
    let payload: Value = serde_json::from_str(row.get(1)).unwrap();
    assert_eq!(payload, json!({"text": "hi", "id": id}));
    assert_eq!(row.get::<_, String>(2), "shout");
    assert_eq!(row.get::<_, String>(3), "room-1");
    assert!(row.get::<_, bool>(4), "private unless told otherwise");
    assert_eq!(row.get::<_, String>(5), "broadcast");

    // broadcast_changes from a row trigger, with upstream's payload shape.
    db.batch_execute(
        "create table public.todos (id int primary key, task text);
         create function public.todos_broadcast() returns trigger language plpgsql as $$
         begin
           perform realtime.broadcast_changes(
             'todos:' || coalesce(new.id, old.id)::text, tg_op, tg_op,
             tg_table_name, tg_table_schema, new, old);
           return null;
         end $$;
         create trigger todos_broadcast after insert or update or delete on public.todos
           for each row execute function public.todos_broadcast();
         insert into public.todos values (7, 'write tests');
         update public.todos set task = 'run tests' where id = 7;",
    )
    .await
    .unwrap();
    let rows = db
        .query(
            "select topic, event, payload::text, private from realtime.messages
             where topic = 'todos:7' order by inserted_at",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    let update: Value = serde_json::from_str(rows[1].get(2)).unwrap();
    assert_eq!(rows[1].get::<_, String>(1), "UPDATE");
    assert_eq!(update["operation"], "UPDATE");
    assert_eq!(update["table"], "todos");
    assert_eq!(update["schema"], "public");
    assert_eq!(update["record"], json!({"id": 7, "task": "run tests"}));
    assert_eq!(
        update["old_record"],
        json!({"id": 7, "task": "write tests"})
    );

    // realtime.topic() reads the setting the server (and send) set.
    let topic: Option<String> = db
        .query_one(
            "select realtime.topic() from (select set_config('realtime.topic', 'room-9', false)) s",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(topic.as_deref(), Some("room-9"));

    // Partitions past the retention are dropped, today's are kept.
    db.batch_execute(
        "create table realtime.messages_2020_01_01 partition of realtime.messages
           for values from ('2020-01-01') to ('2020-01-02');
         select realtime.switchboard_maintain_partitions();",
    )
    .await
    .unwrap();
    let old: i64 = db
        .query_one(
            "select count(*) from pg_class where relname = 'messages_2020_01_01'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(old, 0);
    assert_eq!(partitions(&db).await, 5, "today's partitions are kept");

    // Row Level Security is on and there is no policy: an API role reads nothing.
    db.batch_execute("begin; set local role authenticated")
        .await
        .unwrap();
    let visible: i64 = db
        .query_one("select count(*) from realtime.messages", &[])
        .await
        .unwrap()
        .get(0);
    db.batch_execute("rollback").await.unwrap();
    assert_eq!(visible, 0);
}

#[tokio::test]
async fn serve_installs_the_schema_at_start() {
    let pg = TempPostgres::start();
    let _server = Server::start(&["--database-url", &pg.url()]);
    let db = pg.client().await;
    for _ in 0..100 {
        let installed = db
            .query_opt(
                "select 1 from pg_tables where schemaname = 'realtime' and tablename = 'switchboard_migrations'",
                &[],
            )
            .await
            .unwrap()
            .is_some();
        if installed {
            assert_eq!(migrate(&pg).trim(), "the realtime schema is up to date");
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("serve did not install the realtime schema within 10 s");
}

#[tokio::test]
async fn messages_sent_from_sql_reach_the_topics_public_or_private_members() {
    let pg = TempPostgres::start();
    let server = Server::start(&["--database-url", &pg.url()]);
    let db = pg.client().await;
    wait_streaming(&db).await;
    let connect = |role: &str| {
        let url = server.url("2.0.0", &token(role, 3600));
        async move {
            tokio_tungstenite::connect_async(url)
                .await
                .expect("upgrade")
                .0
        }
    };
    let mut public = connect("anon").await;
    join(&mut public, "room-1", json!({})).await;
    let mut private = connect("service_role").await;
    join(&mut private, "room-1", json!({"private": true})).await;

    db.batch_execute(
        r#"select realtime.send('{"text": "to all"}', 'shout', 'room-1', false);
           select realtime.send('{"text": "to the private room"}', 'whisper', 'room-1');"#,
    )
    .await
    .unwrap();
    let heard = recv(&mut public).await;
    assert_eq!(heard[2], "realtime:room-1");
    assert_eq!(heard[3], "broadcast");
    let body = &heard[4];
    assert_eq!(body["event"], "shout");
    assert_eq!(body["payload"]["text"], "to all");
    assert_eq!(
        body["meta"]["id"], body["payload"]["id"],
        "meta.id is the row's id"
    );
    let whispered = recv(&mut private).await;
    assert_eq!(whispered[4]["event"], "whisper");
    assert_eq!(whispered[4]["payload"]["text"], "to the private room");
    // Each went to its own room only.
    let more = tokio::time::timeout(std::time::Duration::from_millis(500), recv(&mut public)).await;
    assert!(more.is_err(), "the public member got more: {more:?}");
}
