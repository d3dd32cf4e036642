//! postgres_changes with Row Level Security under load: N subscribers in G claims groups
//! (distinct `sub`s), rows inserted at a target rate, each row visible to the subscribers of
//! its owner's group. Reports changes delivered per second and the visibility queries the
//! server made per change (from its /metrics): batching means at most one query per batch
//! per claims group, never one per subscriber per row.
//!
//! Needs a running `switchboard serve --database-url …` on the same database.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use switchboard_benches::metric;
use switchboard_engine::auth;
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser)]
struct Args {
    /// switchboard's address, `host:port`.
    #[arg(long, default_value = "127.0.0.1:4000")]
    addr: String,
    /// The database switchboard streams from.
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// switchboard's JWT secret.
    #[arg(long, env = "SWITCHBOARD_JWT_SECRET")]
    secret: String,
    /// Subscribing connections.
    #[arg(long, default_value_t = 100)]
    subscribers: usize,
    /// Distinct claims groups (users) among them.
    #[arg(long, default_value_t = 10)]
    groups: usize,
    /// Rows inserted per second.
    #[arg(long, default_value_t = 500)]
    rate: u64,
    /// Seconds of inserting.
    #[arg(long, default_value_t = 10)]
    duration: u64,
}

const SETUP: &str = "
drop table if exists public.bench_rls;
create table public.bench_rls (id bigserial primary key, owner uuid not null, body text);
alter table public.bench_rls enable row level security;
create policy own on public.bench_rls for select to authenticated using (owner = auth.uid());
grant all on public.bench_rls to authenticated;
grant all on sequence public.bench_rls_id_seq to authenticated;
alter publication supabase_realtime add table public.bench_rls;
";

fn user(group: usize) -> String {
    format!("00000000-0000-0000-0000-{group:012}")
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Connects with `token` and subscribes `realtime:<sub>` to the bench table's inserts;
/// returns once Postgres changes are live, or the error the server sent.
async fn subscribe(addr: &str, token: &str, sub: &str) -> Result<Ws, String> {
    let url = format!("ws://{addr}/realtime/v1/websocket?apikey={token}&vsn=2.0.0");
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .map_err(|e| e.to_string())?;
    let binding = json!({"event": "INSERT", "schema": "public", "table": "bench_rls"});
    let join = json!(["1", "1", format!("realtime:{sub}"), "phx_join",
        {"config": {"postgres_changes": [binding]}, "access_token": token}]);
    ws.send(Message::Text(join.to_string().into()))
        .await
        .map_err(|e| e.to_string())?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) if text.contains("Subscribed to PostgreSQL") => {
                return Ok(ws)
            }
            Some(Ok(Message::Text(text))) if text.contains("\"error\"") => {
                return Err(text.to_string())
            }
            Some(Ok(_)) => {}
            other => return Err(format!("socket ended while subscribing: {other:?}")),
        }
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let (db, connection) = tokio_postgres::connect(&args.database_url, tokio_postgres::NoTls)
        .await
        .expect("database reachable");
    tokio::spawn(connection);
    db.batch_execute(SETUP).await.expect("bench schema");
    // Wait until switchboard knows the new table: a row makes the WAL reader announce it
    // (once its slot exists), and a probe subscription tells when that happened.
    let probe_claims = json!({"role": "service_role", "exp": 4_000_000_000u64});
    let probe_token = auth::sign(&args.secret, &probe_claims);
    let mut known = false;
    for attempt in 0..30 {
        let warm_up = format!(
            "insert into bench_rls(owner) values ('{}'); delete from bench_rls;",
            user(0)
        );
        db.batch_execute(&warm_up).await.expect("warm-up row");
        tokio::time::sleep(Duration::from_millis(500)).await;
        if subscribe(&args.addr, &probe_token, &format!("probe-{attempt}"))
            .await
            .is_ok()
        {
            known = true;
            break;
        }
    }
    assert!(
        known,
        "switchboard never saw the bench table in the publication"
    );

    let delivered = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for i in 0..args.subscribers {
        let group = i % args.groups;
        let claims = json!({"role": "authenticated", "sub": user(group), "exp": 4_000_000_000u64});
        let token = auth::sign(&args.secret, &claims);
        let mut ws = subscribe(&args.addr, &token, &format!("rls-{i}"))
            .await
            .expect("subscription");
        let delivered = delivered.clone();
        readers.push(tokio::spawn(async move {
            while let Some(Ok(msg)) = ws.next().await {
                if let Message::Text(text) = msg {
                    if text.contains("postgres_changes") {
                        delivered.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }

    let queries_before = metric(&args.addr, "switchboard_visibility_queries_total").await;
    let started = Instant::now();
    let mut inserted = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while started.elapsed() < Duration::from_secs(args.duration) {
        tick.tick().await;
        let due = (started.elapsed().as_secs_f64() * args.rate as f64) as u64;
        if due > inserted {
            let owners: Vec<String> = (inserted..due)
                .map(|n| user(n as usize % args.groups))
                .collect();
            let values: Vec<String> = owners.iter().map(|o| format!("('{o}', 'x')")).collect();
            db.batch_execute(&format!(
                "insert into bench_rls(owner, body) values {}",
                values.join(",")
            ))
            .await
            .expect("insert");
            inserted = due;
        }
    }
    let expected = inserted * (args.subscribers / args.groups) as u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    while delivered.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let queries = metric(&args.addr, "switchboard_visibility_queries_total").await - queries_before;
    let got = delivered.load(Ordering::Relaxed);
    for reader in readers {
        reader.abort();
    }
    println!(
        "{}",
        json!({
            "subscribers": args.subscribers,
            "claims_groups": args.groups,
            "rows": inserted,
            "delivered": got,
            "expected": expected,
            "delivered_per_sec": (got as f64 / secs).round(),
            "rows_per_sec": (inserted as f64 / secs).round(),
            "visibility_queries": queries,
            "queries_per_change": queries / inserted.max(1) as f64,
            "queries_per_change_per_group": queries / inserted.max(1) as f64 / args.groups as f64,
        })
    );
}
