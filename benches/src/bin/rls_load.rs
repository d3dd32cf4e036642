//! postgres_changes with Row Level Security at saturation: N subscribers in G claims groups
//! (distinct `sub`s), rows inserted at a rising rate, each row visible to the subscribers of
//! its owner's group. Each step inserts at one rate for `--duration` seconds; the rate then
//! grows by half until deliveries stop keeping up or p99 passes `--p99-max-ms`, which marks
//! the ceiling.
//!
//! The same load runs first on a table without RLS, each subscriber filtering on its own
//! owner (`owner=eq.<sub>`): the same rows reach the same subscribers, with no visibility
//! query, which is the floor the RLS path is measured against.
//!
//! Per step it reports deliveries/s, commit-to-delivery latency (p50, p99: each row carries
//! the time it was inserted), and the visibility queries the server made per change and
//! per claims group (from its /metrics): batching means at most one query per batch per
//! claims group, never one per subscriber per row.
//!
//! Needs a running `switchboard serve --database-url …` on the same database.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Parser, ValueEnum};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use switchboard_benches::{database, metric, websocket, Ws};
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
    /// Rows inserted per second in the first step.
    #[arg(long, default_value_t = 500)]
    rate: u64,
    /// Seconds of inserting per step.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Raise the rate step by step until the server falls behind; without it, one step.
    #[arg(long)]
    ramp: bool,
    /// Highest rate a ramp tries, rows per second.
    #[arg(long, default_value_t = 100_000)]
    max_rate: u64,
    /// A step whose p99 passes this has hit the ceiling.
    #[arg(long, default_value_t = 1_000)]
    p99_max_ms: u64,
    /// Which tables to load: the RLS table, the table without RLS, or both in turn.
    #[arg(long, value_enum, default_value = "both")]
    tables: Tables,
    /// The RLS table's policy: `owner = auth.uid()`; `owner = (select auth.uid())` as
    /// Supabase's performance advisor recommends; or `true`, the dashboard's "Enable read
    /// access for all users", with each subscriber filtering on its owner as on the table
    /// without RLS, so the same rows reach the same subscribers.
    #[arg(long, value_enum, default_value = "uid")]
    policy: Policy,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Policy {
    Uid,
    SelectUid,
    True,
}

impl Policy {
    /// The policy's `using` expression.
    fn using(self) -> &'static str {
        match self {
            Policy::Uid => "owner = auth.uid()",
            Policy::SelectUid => "owner = (select auth.uid())",
            Policy::True => "true",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Tables {
    Rls,
    Open,
    Both,
}

/// The schema; `{using}` is the policy's [`Policy::using`].
const SETUP: &str = "
drop table if exists public.bench_rls;
drop table if exists public.bench_open;
create table public.bench_rls (id bigserial primary key, owner uuid not null, body text);
alter table public.bench_rls enable row level security;
create policy own on public.bench_rls for select to authenticated using ({using});
create table public.bench_open (id bigserial primary key, owner uuid not null, body text);
grant all on public.bench_rls, public.bench_open to authenticated;
grant all on sequence public.bench_rls_id_seq, public.bench_open_id_seq to authenticated;
alter publication supabase_realtime add table public.bench_rls, public.bench_open;
";

fn user(group: usize) -> String {
    format!("00000000-0000-0000-0000-{group:012}")
}

fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Connects with `token` and subscribes `realtime:<sub>` to `binding`; returns once
/// Postgres changes are live, or the error the server sent.
async fn subscribe(addr: &str, token: &str, sub: &str, binding: &Value) -> Result<Ws, String> {
    let url = format!("ws://{addr}/realtime/v1/websocket?apikey={token}&vsn=2.0.0");
    let mut ws = websocket(&url).await?;
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

/// What the readers count: deliveries and their latency since the last step began.
#[derive(Default)]
struct Received {
    delivered: AtomicU64,
    latency_us: Mutex<Option<Histogram<u64>>>,
}

impl Received {
    /// The row's insert time, from its body, without parsing the whole frame.
    fn note(&self, frame: &str) {
        self.delivered.fetch_add(1, Ordering::Relaxed);
        let Some(at) = frame
            .split_once("\"body\":\"")
            .and_then(|(_, rest)| rest.split('"').next())
            .and_then(|digits| digits.parse::<u64>().ok())
        else {
            return;
        };
        let latency = unix_micros().saturating_sub(at).max(1);
        if let Some(histogram) = self.latency_us.lock().unwrap().as_mut() {
            let _ = histogram.record(latency);
        }
    }

    /// Starts a step: counts from zero.
    fn reset(&self) {
        self.delivered.store(0, Ordering::Relaxed);
        *self.latency_us.lock().unwrap() =
            Some(Histogram::new_with_bounds(1, 120_000_000, 3).expect("histogram bounds"));
    }
}

/// One table's subscribers, reading until dropped.
struct Subscribers {
    readers: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Subscribers {
    fn drop(&mut self) {
        for reader in &self.readers {
            reader.abort();
        }
    }
}

async fn subscribers(args: &Args, table: &str, received: &Arc<Received>) -> Subscribers {
    let mut readers = Vec::new();
    for i in 0..args.subscribers {
        let sub = user(i % args.groups);
        let claims = json!({"role": "authenticated", "sub": sub, "exp": 4_000_000_000u64});
        let token = auth::sign(&args.secret, &claims);
        let mut binding = json!({"event": "INSERT", "schema": "public", "table": table});
        if table == "bench_open" || args.policy == Policy::True {
            binding["filter"] = Value::from(format!("owner=eq.{sub}"));
        }
        let mut ws = subscribe(&args.addr, &token, &format!("{table}-{i}"), &binding)
            .await
            .expect("subscription");
        let received = received.clone();
        readers.push(tokio::spawn(async move {
            // A heartbeat every 25 s, as the clients send: the server closes a socket
            // that says nothing for a minute.
            let mut heartbeat = tokio::time::interval(Duration::from_secs(25));
            let mut sent = 0u64;
            loop {
                tokio::select! {
                    msg = ws.next() => match msg {
                        Some(Ok(Message::Text(text))) if text.contains("postgres_changes") => {
                            received.note(&text)
                        }
                        Some(Ok(_)) => {}
                        _ => return,
                    },
                    _ = heartbeat.tick() => {
                        sent += 1;
                        let beat = json!([null, format!("hb-{sent}"), "phoenix", "heartbeat", {}]);
                        if ws.send(Message::Text(beat.to_string().into())).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }));
    }
    Subscribers { readers }
}

/// Inserts rows into `table` at `rate` for `duration`, each stamped with its insert time;
/// returns how many.
async fn insert(
    db: &tokio_postgres::Client,
    table: &str,
    groups: usize,
    rate: u64,
    duration: Duration,
) -> u64 {
    let started = Instant::now();
    let mut inserted = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while started.elapsed() < duration {
        tick.tick().await;
        let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
        if due > inserted {
            let now = unix_micros();
            let values: Vec<String> = (inserted..due)
                .map(|n| format!("('{}', '{now}')", user(n as usize % groups)))
                .collect();
            db.batch_execute(&format!(
                "insert into {table}(owner, body) values {}",
                values.join(",")
            ))
            .await
            .expect("insert");
            inserted = due;
        }
    }
    inserted
}

/// One step at `rate`: its report, and whether the server kept up.
async fn step(
    args: &Args,
    db: &tokio_postgres::Client,
    table: &str,
    received: &Received,
    rate: u64,
) -> (Value, bool) {
    received.reset();
    let queries_before = metric(&args.addr, "switchboard_visibility_queries_total").await;
    let started = Instant::now();
    let rows = insert(
        db,
        table,
        args.groups,
        rate,
        Duration::from_secs(args.duration),
    )
    .await;
    let inserting = started.elapsed().as_secs_f64();
    let expected = rows * (args.subscribers / args.groups) as u64;
    // Deliveries may trail the inserts by up to the p99 bound.
    let grace = Instant::now() + Duration::from_millis(args.p99_max_ms.max(1_000));
    while received.delivered.load(Ordering::Relaxed) < expected && Instant::now() < grace {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let delivered = received.delivered.load(Ordering::Relaxed);
    let queries = metric(&args.addr, "switchboard_visibility_queries_total").await - queries_before;
    let latency = received.latency_us.lock().unwrap().take().expect("reset");
    let ms = |q: f64| (latency.value_at_quantile(q) as f64 / 1_000.0 * 10.0).round() / 10.0;
    let kept_up = delivered >= expected * 99 / 100 && ms(0.99) <= args.p99_max_ms as f64;
    let report = json!({
        "table": table,
        "policy": args.policy.using(),
        "subscribers": args.subscribers,
        "claims_groups": args.groups,
        "rate": rate,
        "rows": rows,
        "expected": expected,
        "delivered": delivered,
        "delivered_per_sec": (delivered as f64 / inserting).round(),
        "p50_ms": ms(0.5),
        "p99_ms": ms(0.99),
        "visibility_queries": queries,
        "queries_per_change": queries / rows.max(1) as f64,
        "queries_per_change_per_group": queries / rows.max(1) as f64 / args.groups as f64,
        "kept_up": kept_up,
    });
    (report, kept_up)
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let db = database(&args.database_url).await;
    db.batch_execute(&SETUP.replace("{using}", args.policy.using()))
        .await
        .expect("bench schema");
    // Wait until switchboard knows the new tables: a row makes the WAL reader announce
    // them (once its slot exists), and a probe subscription tells when that happened.
    let probe_claims = json!({"role": "service_role", "exp": 4_000_000_000u64});
    let probe_token = auth::sign(&args.secret, &probe_claims);
    let mut known = false;
    for attempt in 0..30 {
        let warm_up = format!(
            "insert into bench_rls(owner) values ('{0}'); insert into bench_open(owner) values ('{0}');
             delete from bench_rls; delete from bench_open;",
            user(0)
        );
        db.batch_execute(&warm_up).await.expect("warm-up rows");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut all = true;
        for table in ["bench_rls", "bench_open"] {
            let binding = json!({"event": "INSERT", "schema": "public", "table": table});
            let probe = format!("probe-{table}-{attempt}");
            all &= subscribe(&args.addr, &probe_token, &probe, &binding)
                .await
                .is_ok();
        }
        if all {
            known = true;
            break;
        }
    }
    assert!(
        known,
        "switchboard never saw the bench tables in the publication"
    );

    let tables: &[&str] = match args.tables {
        Tables::Rls => &["bench_rls"],
        Tables::Open => &["bench_open"],
        // Without RLS first: changes reach subscribers in commit order, so a backlog the
        // RLS table leaves would hold the other table's rows back.
        Tables::Both => &["bench_open", "bench_rls"],
    };
    let mut ceilings = Vec::new();
    for &table in tables {
        let received = Arc::new(Received::default());
        let _subscribers = subscribers(&args, table, &received).await;
        let mut rate = args.rate;
        let mut best: Option<Value> = None;
        let mut limit = None;
        loop {
            let (report, kept_up) = step(&args, &db, table, &received, rate).await;
            println!("{report}");
            if !kept_up {
                limit = Some(report);
                break;
            }
            best = Some(report);
            let next = rate + rate / 2;
            if !args.ramp || next > args.max_rate {
                break;
            }
            rate = next;
            // Let the previous step's stragglers drain before the next one counts.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        ceilings.push(json!({"table": table, "kept_up": best, "fell_behind": limit}));
    }
    // The last line is the summary the scripts read.
    println!(
        "{}",
        json!({
            "subscribers": args.subscribers,
            "claims_groups": args.groups,
            "ceilings": ceilings,
        })
    );
}
