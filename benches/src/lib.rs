//! Shared pieces of switchboard's benchmarks: engine fixtures driven through the public
//! API only, so benchmarks measure exactly what runtimes run.

use bytes::Bytes;
use serde_json::{json, Value};
use switchboard_engine::{
    auth, Config, ConnId, ConnectParams, Engine, Input, Instant, NodeId, Now, Output, WsMessage,
};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// The secret fixtures sign tokens with.
pub const SECRET: &str = "bench-secret-bench-secret-bench-secret";

/// Wall clock of every fixture: tokens are valid far beyond it.
pub const NOW: Now = Now {
    mono: Instant(1_000),
    unix_ms: 1_700_000_000_000,
};

/// A configuration without limits that would get in a benchmark's way.
pub fn config() -> Config {
    Config {
        jwt_secret: SECRET.to_owned(),
        join_error_backoff_ms: 0,
        connect_error_backoff_ms: 0,
        events_per_sec_max: 0,
        joins_per_sec_max: 0,
        presence_events_per_sec_max: 0,
        concurrent_users_max: usize::MAX,
        database: true,
        ..Config::default()
    }
}

/// A token for `role` with extra claims.
pub fn token(role: &str, sub: &str) -> String {
    auth::sign(
        SECRET,
        &json!({"role": role, "sub": sub, "exp": 4_000_000_000u64}),
    )
}

/// Feeds `input` and drops every output.
pub fn drive(engine: &mut Engine, input: Input) {
    engine.handle(NOW, input);
    while engine.poll_output().is_some() {}
}

/// Opens connection `id` with serializer `vsn` ("1.0.0" or "2.0.0").
pub fn connect(engine: &mut Engine, id: u64, vsn: &str, key: &str) -> ConnId {
    let conn = ConnId(id);
    let params = ConnectParams {
        vsn: Some(vsn.to_owned()),
        apikey: Some(key.to_owned()),
        x_api_key: None,
    };
    drive(engine, Input::Connect { conn, params });
    conn
}

/// Sends a text frame in the v2 serializer.
pub fn push_v2(engine: &mut Engine, conn: ConnId, frame: &Value) {
    let msg = WsMessage::Text(Bytes::from(frame.to_string()));
    drive(engine, Input::Frame { conn, msg });
}

/// An engine with `members` v2 and v1 connections (alternating) joined to `realtime:room`,
/// plus the id of the first (the sender).
pub fn room(members: u64) -> (Engine, ConnId) {
    join_room(Engine::new(config(), NodeId(1), 1), members)
}

/// `engine` with `members` v2 and v1 connections (alternating) joined to `realtime:room`,
/// plus the id of the first (the sender).
pub fn join_room(mut engine: Engine, members: u64) -> (Engine, ConnId) {
    let key = token("anon", "bench");
    for id in 1..=members {
        let vsn = if id % 2 == 0 { "1.0.0" } else { "2.0.0" };
        let conn = connect(&mut engine, id, vsn, &key);
        let join = if vsn == "2.0.0" {
            json!(["1", "1", "realtime:room", "phx_join", {"config": {}}])
        } else {
            json!({"topic": "realtime:room", "event": "phx_join", "payload": {"config": {}}, "ref": "1", "join_ref": "1"})
        };
        let msg = WsMessage::Text(Bytes::from(join.to_string()));
        drive(&mut engine, Input::Frame { conn, msg });
    }
    (engine, ConnId(1))
}

/// A realtime-js broadcast push as a text frame.
pub fn broadcast_frame(n: u64) -> WsMessage {
    let frame = json!(["1", n.to_string(), "realtime:room", "broadcast",
        {"type": "broadcast", "event": "cursor", "payload": {"x": n, "y": 2}}]);
    WsMessage::Text(Bytes::from(frame.to_string()))
}

/// Counts recipients of every `Send` output: deliveries.
pub fn deliveries(engine: &mut Engine) -> usize {
    let mut delivered = 0;
    while let Some(output) = engine.poll_output() {
        if let Output::Send { to, .. } = output {
            delivered += to.iter().count();
        }
    }
    delivered
}

/// The client socket settings every load generator uses. tungstenite's default read buffer
/// is 128 KiB and is zeroed again before every read: 1,000 sockets receiving 50 frames/s
/// each spent a seventh of the machine in `memset`, CPU taken from the server measured.
pub fn websocket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(4096)
}

/// A WebSocket client connection to `url`, with [`websocket_config`].
pub async fn websocket(url: &str) -> Result<Ws, String> {
    tokio_tungstenite::connect_async_with_config(url, Some(websocket_config()), false)
        .await
        .map(|(ws, _)| ws)
        .map_err(|e| e.to_string())
}

/// A client socket of the load generators.
pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A connection to the database at `url`, its driver running on the current runtime: what
/// the load generators that write rows (`rls_load`, `join_load`) start with.
pub async fn database(url: &str) -> tokio_postgres::Client {
    let (db, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("database reachable");
    tokio::spawn(connection);
    db
}

/// The value of a counter or gauge in the /metrics of the switchboard at `addr`, 0 when it
/// cannot be read: the load generators report what the server did, not only what they saw.
pub async fn metric(addr: &str, name: &str) -> f64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
        return 0.0;
    };
    let request = format!("GET /metrics HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
    let _ = stream.write_all(request.as_bytes()).await;
    let mut body = String::new();
    let _ = stream.read_to_string(&mut body).await;
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}
