//! The operator metrics on the real binary: each moves when what it counts happens. Joins
//! refused by reason, broadcast hand-over, presence entries and engine busy time without a
//! database; changes decoded and delivered, visibility query latency and replication lag
//! with a real Postgres.

use std::time::Duration;

use serde_json::{json, Value};

use crate::pg::TempPostgres;
use crate::support::{connect, http, join, metric, recv, send, token, until, Server, Ws, SECRET};
use crate::wal::wait_streaming;

/// Reads `name` until `wanted` accepts its value, within 5 s; the last value if not.
async fn metric_until(server: &Server, name: &str, wanted: impl Fn(&str) -> bool) -> String {
    let mut value = metric(server, name).await;
    for _ in 0..100 {
        if wanted(&value) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        value = metric(server, name).await;
    }
    value
}

/// Every series of `family` on `/metrics`, whatever their labels, added up.
async fn sum(server: &Server, family: &str) -> f64 {
    let (_, _, body) = http(&server.addr, "GET", "/metrics", &[], b"").await;
    let body = String::from_utf8(body).expect("metrics are UTF-8");
    body.lines()
        .filter(|line| {
            line.strip_prefix(family)
                .is_some_and(|rest| rest.starts_with(['{', ' ']))
        })
        .map(|line| {
            let value = line.rsplit(' ').next().expect("a value");
            value.parse::<f64>().expect("a number")
        })
        .sum()
}

fn number(value: &str) -> f64 {
    value
        .parse()
        .unwrap_or_else(|_| panic!("a number: {value}"))
}

fn refused(reason: &str) -> String {
    format!("switchboard_joins_refused_total{{reason=\"{reason}\"}}")
}

/// The reply to the push with `ref_`.
async fn reply(ws: &mut Ws, ref_: &str) -> Value {
    until(ws, |frame| {
        (frame[3] == "phx_reply" && frame[1] == ref_).then(|| frame[4].clone())
    })
    .await
}

#[tokio::test]
async fn refused_joins_broadcasts_presence_and_busy_time_show_on_metrics() {
    let server = Server::start(&[]);
    for reason in ["invalid_token", "too_many_channels", "unauthorized"] {
        assert_eq!(metric(&server, &refused(reason)).await, "0", "{reason}");
    }
    let (mut sender, mut member) = (
        connect(&server, "2.0.0").await,
        connect(&server, "2.0.0").await,
    );
    // A join with a token that is no JWT is refused as an invalid token, and only that.
    send(
        &mut sender,
        json!(["1", "1", "realtime:room", "phx_join", {"config": {}, "access_token": "not-a-jwt"}]),
    )
    .await;
    let answer = reply(&mut sender, "1").await;
    assert_eq!(
        answer["response"]["reason"],
        "MalformedJWT: The token provided is not a valid JWT"
    );
    assert_eq!(metric(&server, &refused("invalid_token")).await, "1");
    assert_eq!(metric(&server, &refused("too_many_channels")).await, "0");

    // Broadcasts from a socket and from REST each show up once in the hand-over histogram.
    let handed = "switchboard_broadcast_handover_seconds_count";
    join(&mut sender, "room", json!({})).await;
    join(&mut member, "room", json!({})).await;
    assert_eq!(metric(&server, handed).await, "0");
    send(
        &mut sender,
        json!([null, "2", "realtime:room", "broadcast", {"type": "broadcast", "event": "e", "payload": {"n": 1}}]),
    )
    .await;
    assert_eq!(recv(&mut member).await[3], "broadcast");
    assert_eq!(metric_until(&server, handed, |v| v == "1").await, "1");
    let key = token("anon", 60);
    let body = json!({"messages": [{"topic": "room", "event": "e", "payload": {"n": 2}}]});
    let headers = [
        ("apikey", key.as_str()),
        ("content-type", "application/json"),
    ];
    let path = "/realtime/v1/api/broadcast";
    let (status, _, _) = http(
        &server.addr,
        "POST",
        path,
        &headers,
        body.to_string().as_bytes(),
    )
    .await;
    assert_eq!(status, 202);
    assert_eq!(recv(&mut member).await[3], "broadcast");
    assert_eq!(metric_until(&server, handed, |v| v == "2").await, "2");
    let spent = number(&metric(&server, "switchboard_broadcast_handover_seconds_sum").await);
    assert!((0.0..5.0).contains(&spent), "hand-over took {spent} s");

    // Presence entries follow track and untrack.
    let local = r#"switchboard_presence_entries{origin="local"}"#;
    let mut tracker = connect(&server, "2.0.0").await;
    join(
        &mut tracker,
        "lobby",
        json!({"presence": {"enabled": true, "key": "me"}}),
    )
    .await;
    assert_eq!(metric(&server, local).await, "0");
    let presence = |event: &str, ref_: &str| {
        let push = json!({"type": "presence", "event": event, "payload": {"here": true}});
        json!(["1", ref_, "realtime:lobby", "presence", push])
    };
    send(&mut tracker, presence("track", "3")).await;
    assert_eq!(reply(&mut tracker, "3").await["status"], "ok");
    assert_eq!(metric_until(&server, local, |v| v == "1").await, "1");
    send(&mut tracker, presence("untrack", "4")).await;
    assert_eq!(reply(&mut tracker, "4").await["status"], "ok");
    assert_eq!(metric_until(&server, local, |v| v == "0").await, "0");

    // The engine tasks were busy for all of that.
    let busy = sum(&server, "switchboard_engine_busy_seconds_total").await;
    assert!(busy > 0.0, "engine busy {busy} s");
}

const SCHEMA: &str = "
create table public.r (id bigserial primary key, owner uuid not null);
alter table public.r enable row level security;
create policy own on public.r for select to authenticated using (owner = auth.uid());
create table public.slow (id bigserial primary key);
alter table public.slow enable row level security;
create policy slowly on public.slow for select to authenticated
    using ((select true from pg_sleep(2)));
alter publication supabase_realtime add table public.r, public.slow;";

const ALICE: &str = "11111111-1111-1111-1111-111111111111";
const BOB: &str = "22222222-2222-2222-2222-222222222222";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_visibility_queries_and_replication_lag_show_on_metrics() {
    let pg = TempPostgres::start();
    pg.psql(SCHEMA);
    let server = Server::start(&["--database-url", &pg.url()]);
    let db = pg.client().await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    let alice = switchboard_engine::auth::sign(
        SECRET,
        &json!({"role": "authenticated", "sub": ALICE, "exp": now + 3600}),
    );
    let mut ws = connect(&server, "2.0.0").await;
    let bindings = json!([
        {"event": "*", "schema": "public", "table": "r"},
        {"event": "*", "schema": "public", "table": "slow"},
    ]);
    let config = json!({"postgres_changes": bindings});
    send(
        &mut ws,
        json!(["1", "1", "realtime:rows", "phx_join", {"config": config, "access_token": alice}]),
    )
    .await;
    until(&mut ws, |frame| {
        let subscribed = frame[3] == "system" && frame[4]["extension"] == "postgres_changes";
        subscribed.then(|| assert_eq!(frame[4]["status"], "ok", "{frame}"))
    })
    .await;
    wait_streaming(&db).await;
    for name in [
        "switchboard_replication_lag_bytes",
        "switchboard_replication_lag_seconds",
    ] {
        number(&metric(&server, name).await);
    }
    let read = |name: &'static str| {
        let server = &server;
        async move { number(&metric(server, name).await) }
    };
    let decoded = read("switchboard_changes_decoded_total").await;
    let delivered = read("switchboard_changes_delivered_total").await;
    let asked = read("switchboard_visibility_query_seconds_count").await;

    // Two rows, one Alice may see: both decoded, one delivered, one question answered.
    db.batch_execute(&format!(
        "insert into r (id, owner) values (1, '{ALICE}'), (2, '{BOB}')"
    ))
    .await
    .expect("inserting");
    let row = until(&mut ws, |frame| {
        (frame[3] == "postgres_changes").then(|| frame[4]["data"]["record"]["id"].clone())
    })
    .await;
    assert_eq!(row, 1);
    assert_eq!(
        read("switchboard_changes_decoded_total").await,
        decoded + 2.0
    );
    assert_eq!(
        read("switchboard_changes_delivered_total").await,
        delivered + 1.0
    );
    assert!(read("switchboard_visibility_query_seconds_count").await > asked);
    // Handed out: at the next measurement nothing waits, so no lag, however old the commit.
    let lag = "switchboard_replication_lag_seconds";
    let caught_up = metric_until(&server, lag, |v| number(v) == 0.0).await;
    assert_eq!(number(&caught_up), 0.0);

    // A change whose visibility takes two seconds to judge waits that long to be handed
    // out: meanwhile the reader, measuring every second, reports it behind.
    db.batch_execute("insert into slow (id) values (1)")
        .await
        .expect("inserting");
    let behind = metric_until(&server, lag, |v| number(v) > 0.0).await;
    assert!(number(&behind) > 0.0, "lag while a change waits: {behind}");
    let bytes = number(&metric(&server, "switchboard_replication_lag_bytes").await);
    assert!(bytes > 0.0, "WAL past the confirmed position: {bytes}");
    until(&mut ws, |frame| {
        (frame[3] == "postgres_changes").then_some(())
    })
    .await;
    let caught_up = metric_until(&server, lag, |v| number(v) == 0.0).await;
    assert_eq!(number(&caught_up), 0.0);
    let slowest = read("switchboard_visibility_query_seconds_sum").await;
    assert!(slowest >= 2.0, "the slow answer is timed: {slowest} s");
}
