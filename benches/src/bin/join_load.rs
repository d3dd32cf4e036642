//! Join rate: many connections joining several channels each, all at once, first public
//! channels and then private ones authorised by policies on `realtime.messages`. Reports
//! joins per second and the join latency (phx_join sent to its reply), and for private
//! channels how many authorization batches the server sent to the database per join (from
//! its /metrics): joins arriving together are checked together, not one round trip each.
//!
//! Needs a running `switchboard serve --database-url …` on the same database, with join
//! and user limits out of the way.

use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use switchboard_benches::{database, metric, websocket};
use switchboard_engine::auth;
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser)]
struct Args {
    /// switchboard's address, `host:port`.
    #[arg(long, default_value = "127.0.0.1:4000")]
    addr: String,
    /// The database switchboard authorises private channels with.
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// switchboard's JWT secret.
    #[arg(long, env = "SWITCHBOARD_JWT_SECRET")]
    secret: String,
    /// Connections joining at once.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Channels each connection joins.
    #[arg(long, default_value_t = 5)]
    channels: usize,
    /// Distinct users (claims groups) among the connections.
    #[arg(long, default_value_t = 100)]
    users: usize,
    /// Distinct topics among the channels.
    #[arg(long, default_value_t = 50)]
    topics: usize,
}

/// Every authenticated user may read `room-*` topics.
const SETUP: &str = "
drop policy if exists bench_read on realtime.messages;
create policy bench_read on realtime.messages for select to authenticated
  using (realtime.topic() like 'room-%');
";

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Joins every channel of one connection at once; the latency of each join, in µs.
async fn join_all(mut ws: Ws, topics: Vec<String>, private: bool, token: String) -> Vec<u64> {
    let mut sent = Vec::with_capacity(topics.len());
    for (n, topic) in topics.iter().enumerate() {
        let frame = json!([n.to_string(), n.to_string(), format!("realtime:{topic}"), "phx_join",
            {"config": {"private": private}, "access_token": token}]);
        sent.push(Instant::now());
        ws.send(Message::Text(frame.to_string().into()))
            .await
            .expect("join sent");
    }
    let mut latencies = Vec::with_capacity(topics.len());
    while latencies.len() < topics.len() {
        let Some(Ok(Message::Text(text))) = ws.next().await else {
            panic!("socket ended while joining");
        };
        let frame: Value = serde_json::from_str(&text).expect("JSON");
        if frame[3] != "phx_reply" {
            continue;
        }
        assert_eq!(frame[4]["status"], "ok", "join refused: {frame}");
        let n: usize = frame[1].as_str().and_then(|r| r.parse().ok()).expect("ref");
        latencies.push(sent[n].elapsed().as_micros() as u64);
    }
    let _ = ws.close(None).await;
    latencies
}

/// Connects every connection, then joins everything at once; the figures as JSON.
async fn round(args: &Args, private: bool) -> Value {
    let mut sockets = Vec::with_capacity(args.connections);
    for i in 0..args.connections {
        let claims = json!({"role": "authenticated", "sub": format!("user-{}", i % args.users),
            "exp": 4_000_000_000u64});
        let token = auth::sign(&args.secret, &claims);
        let url = format!(
            "ws://{}/realtime/v1/websocket?apikey={token}&vsn=2.0.0",
            args.addr
        );
        let ws = websocket(&url).await.expect("connected");
        let topics: Vec<String> = (0..args.channels)
            .map(|k| format!("room-{}", (i * args.channels + k) % args.topics))
            .collect();
        sockets.push((ws, topics, token));
    }
    let batches_before = metric(&args.addr, "switchboard_authorization_queries_total").await;
    let started = Instant::now();
    let tasks: Vec<_> = sockets
        .into_iter()
        .map(|(ws, topics, token)| tokio::spawn(join_all(ws, topics, private, token)))
        .collect();
    let mut latencies = Histogram::<u64>::new(3).expect("histogram");
    for task in tasks {
        for us in task.await.expect("joins") {
            latencies.record(us).expect("recorded");
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let joins = args.connections * args.channels;
    let batches =
        metric(&args.addr, "switchboard_authorization_queries_total").await - batches_before;
    json!({
        "private": private,
        "joins": joins,
        "joins_per_sec": (joins as f64 / secs).round(),
        "p50_ms": latencies.value_at_quantile(0.5) as f64 / 1000.0,
        "p99_ms": latencies.value_at_quantile(0.99) as f64 / 1000.0,
        "authorization_batches": batches,
        "batches_per_join": batches / joins as f64,
    })
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let db = database(&args.database_url).await;
    // serve installs the realtime schema at start.
    for _ in 0..100 {
        if db.batch_execute(SETUP).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let public = round(&args, false).await;
    let private = round(&args, true).await;
    println!(
        "{}",
        json!({
            "connections": args.connections,
            "channels": args.channels,
            "users": args.users,
            "topics": args.topics,
            "public": public,
            "private": private,
        })
    );
}
