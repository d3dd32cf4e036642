//! The binary over real sockets: upgrade refusals, health, metrics, REST, CORS, slow
//! consumers and graceful shutdown.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{connect, http, join, metric, recv, send, token, Server, SECRET, UPGRADE};

#[tokio::test]
async fn refused_upgrades_get_upstream_status_and_text() {
    let server = Server::start(&[]);
    let (status, _, body) = http(
        &server.addr,
        "GET",
        "/realtime/v1/websocket?vsn=2.0.0",
        &UPGRADE,
        b"",
    )
    .await;
    assert_eq!(
        (status, body),
        (401, br#"{"error":"API key is missing"}"#.to_vec())
    );
    let path = format!(
        "/realtime/v1/websocket?vsn=3.0.0&apikey={}",
        token("anon", 60)
    );
    assert_eq!(http(&server.addr, "GET", &path, &UPGRADE, b"").await.0, 403);
    let path = format!("/realtime/v1/websocket?apikey={}", token("anon", -10));
    let (status, _, body) = http(&server.addr, "GET", &path, &UPGRADE, b"").await;
    assert_eq!(
        (status, body),
        (401, br#"{"error":"Token has expired"}"#.to_vec())
    );
    let path = "/socket/websocket?apikey=garbage";
    let (status, _, body) = http(&server.addr, "GET", path, &UPGRADE, b"").await;
    assert_eq!(
        (status, body),
        (
            401,
            br#"{"error":"The token provided is not a valid JWT"}"#.to_vec()
        )
    );
    // x-api-key wins over the query parameter.
    let with_header = [UPGRADE.as_slice(), &[("x-api-key", "garbage")]].concat();
    let path = format!("/realtime/v1/websocket?apikey={}", token("anon", 60));
    assert_eq!(
        http(&server.addr, "GET", &path, &with_header, b"").await.0,
        401
    );
    // Both paths and versions upgrade.
    for (path, vsn) in [
        ("/realtime/v1/websocket", "2.0.0"),
        ("/socket/websocket", "1.0.0"),
    ] {
        let url = format!(
            "ws://{}{path}?apikey={}&vsn={vsn}",
            server.addr,
            token("anon", 60)
        );
        assert!(tokio_tungstenite::connect_async(url).await.is_ok());
    }
}

#[tokio::test]
async fn health_metrics_rest_and_cors() {
    let server = Server::start(&[]);
    let (status, _, body) = http(&server.addr, "GET", "/healthz", &[], b"").await;
    assert_eq!((status, body), (200, br#"{"status":"ok"}"#.to_vec()));
    let mut ws = connect(&server, "2.0.0").await;
    join(&mut ws, "room1", json!({})).await;
    let key = token("anon", 60);
    let body =
        json!({"messages": [{"topic": "room1", "event": "e", "payload": {"x": 1}}]}).to_string();
    let headers = [
        ("apikey", key.as_str()),
        ("content-type", "application/json"),
    ];
    let (status, head, _) = http(
        &server.addr,
        "POST",
        "/realtime/v1/api/broadcast?apikey=x&vsn=2.0.0",
        &headers,
        body.as_bytes(),
    )
    .await;
    assert_eq!(status, 202);
    assert!(head.contains("access-control-allow-origin: *"));
    let got = recv(&mut ws).await;
    assert_eq!(
        got,
        json!([null, null, "realtime:room1", "broadcast", {"payload": {"x": 1}, "event": "e", "type": "broadcast"}])
    );
    let (status, head, _) = http(
        &server.addr,
        "OPTIONS",
        "/realtime/v1/api/broadcast",
        &[("origin", "http://x")],
        b"",
    )
    .await;
    assert_eq!(status, 204);
    assert!(head.contains(
        "access-control-allow-headers: apikey, authorization, content-type, x-client-info"
    ));
    let (status, _, body) = http(
        &server.addr,
        "POST",
        "/realtime/v1/api/broadcast",
        &[("apikey", "bad")],
        body.as_bytes(),
    )
    .await;
    assert_eq!(
        (status, body),
        (401, br#"{"message":"Unauthorized"}"#.to_vec())
    );
    let (_, _, metrics) = http(&server.addr, "GET", "/metrics", &[], b"").await;
    let metrics = String::from_utf8(metrics).unwrap();
    for name in [
        "switchboard_connections 1",
        "switchboard_sockets 1",
        "switchboard_channels 1",
        "switchboard_messages_in_total",
        "switchboard_messages_out_total",
        "switchboard_bytes_out_total",
        "switchboard_engine_handle_seconds_bucket",
        "switchboard_errors_total",
    ] {
        assert!(metrics.contains(name), "{name} in {metrics}");
    }
}

#[tokio::test]
async fn slow_consumer_is_released_and_others_are_unaffected() {
    let server = Server::start(&["--send-queue", "16"]);
    let (mut slow, mut sender, mut reader) = (
        connect(&server, "2.0.0").await,
        connect(&server, "2.0.0").await,
        connect(&server, "2.0.0").await,
    );
    for ws in [&mut slow, &mut sender, &mut reader] {
        join(ws, "flood", json!({})).await;
    }
    let blob = "x".repeat(100_000);
    let mut received = 0;
    for i in 0..300 {
        send(&mut sender, json!(["1", i.to_string(), "realtime:flood", "broadcast", {"type": "broadcast", "event": "e", "payload": {"blob": blob}}])).await;
        // The good reader keeps up.
        while let Ok(Some(Ok(_))) =
            tokio::time::timeout(Duration::from_millis(2), reader.next()).await
        {
            received += 1;
        }
    }
    while let Ok(Some(Ok(_))) =
        tokio::time::timeout(Duration::from_millis(500), reader.next()).await
    {
        received += 1;
    }
    assert_eq!(received, 300, "the reading client got every broadcast");
    // The slow client has read nothing since its join, yet the server lets its socket go
    // rather than wait for it to read.
    let mut sockets = String::new();
    for _ in 0..100 {
        sockets = metric(&server, "switchboard_sockets").await;
        if sockets == "2" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(sockets, "2", "the slow socket was released");
    // It finds what the kernel buffered, then the slow-consumer close frame if the close
    // got into its queue, or else the end of the stream; never a close without reason.
    let ending = loop {
        match tokio::time::timeout(Duration::from_secs(5), slow.next())
            .await
            .expect("the slow socket ends")
        {
            Some(Ok(Message::Close(frame))) => break Some(frame),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => break None,
        }
    };
    if let Some(frame) = ending {
        let frame = frame.expect("a close frame with a code");
        assert_eq!(frame.code, CloseCode::Policy);
        assert_eq!(frame.reason.as_str(), "slow consumer: send queue full");
    }
    send(&mut sender, json!([null, "hb", "phoenix", "heartbeat", {}])).await;
    assert_eq!(
        recv(&mut sender).await[1],
        "hb",
        "other sockets still answered"
    );
}

#[tokio::test]
async fn a_slow_consumer_that_reads_again_gets_every_frame_then_1008() {
    let server = Server::start(&["--send-queue", "16"]);
    let (mut slow, mut sender) = (
        connect(&server, "1.0.0").await,
        connect(&server, "2.0.0").await,
    );
    // vsn 1.0.0, so broadcasts arrive as JSON text.
    send(&mut slow, json!({"topic": "realtime:burst", "event": "phx_join", "payload": {"config": {}}, "ref": "1", "join_ref": "1"})).await;
    assert_eq!(recv(&mut slow).await["payload"]["status"], "ok");
    join(&mut sender, "burst", json!({})).await;
    // Enough to fill the kernel's socket buffers and then the outbox: the client is over
    // its limit while it does not read.
    let blob = "x".repeat(100_000);
    for i in 0..300 {
        send(&mut sender, json!(["1", i.to_string(), "realtime:burst", "broadcast", {"type": "broadcast", "event": "e", "payload": {"i": i, "blob": blob}}])).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Back within the grace: every frame handed over, in order, then the reason.
    let mut next = 0;
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(5), slow.next())
            .await
            .expect("the slow socket ends")
        {
            Some(Ok(Message::Text(text))) => {
                let frame: serde_json::Value = serde_json::from_str(&text).expect("JSON");
                assert_eq!(
                    frame["payload"]["payload"]["i"], next,
                    "frames in order, none lost"
                );
                next += 1;
            }
            Some(Ok(Message::Close(frame))) => break frame.expect("a close frame with a code"),
            other => panic!("the socket ended without its close frame: {other:?}"),
        }
    };
    assert!(next > 16, "only {next} frames before the close");
    assert_eq!(close.code, CloseCode::Policy);
    assert_eq!(close.reason.as_str(), "slow consumer: send queue full");
}

#[tokio::test]
async fn sigterm_tells_channels_and_closes_sockets_with_1012() {
    let mut server = Server::start(&[]);
    let mut ws = connect(&server, "2.0.0").await;
    join(&mut ws, "r", json!({})).await;
    let exited_ok = tokio::task::spawn_blocking(move || server.terminate());
    let system = recv(&mut ws).await;
    assert_eq!(
        system,
        json!([null, null, "realtime:r", "system", {"extension": "system", "status": "ok", "message": "Server requested disconnect"}])
    );
    let close = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("close in time");
    let Some(Ok(Message::Close(Some(frame)))) = close else {
        panic!("close frame expected, got {close:?}")
    };
    assert_eq!(frame.code, CloseCode::Restart);
    let _ = ws.close(None).await;
    assert!(exited_ok.await.unwrap(), "exit status 0");
}

/// The signal handlers are in before the shards serve anyone: a SIGTERM sent the moment the
/// address is printed drains the server, which exits 0. Before, they were installed after
/// that line, so such a SIGTERM could kill the server (this loop failed within its first 25
/// starts in each of three runs), and a client already joined lost its socket without a
/// close frame. bash sends it with its builtin `kill`; `Server::terminate` runs the `kill`
/// program, a fork and exec later, which mostly hid the race.
#[test]
fn a_sigterm_as_soon_as_the_server_listens_drains_it() {
    let script = r#"coproc S {
            exec "$0" serve --bind 127.0.0.1:0 --jwt-secret "$1" --runtime "$2" --shards "$3" \
                --log-level error
        }
        read -r line <&"${S[0]}"
        kill -TERM "$S_PID"
        wait "$S_PID""#;
    let (runtime, shards) = (crate::support::runtime(), crate::support::shards());
    for start in 0..100 {
        let binary = env!("CARGO_BIN_EXE_switchboard");
        let status = std::process::Command::new("bash")
            .args(["-c", script, binary, SECRET, &runtime, &shards])
            .status()
            .expect("bash runs");
        assert!(status.success(), "start {start}: {status}");
    }
}

#[tokio::test]
async fn sigterm_does_not_wait_on_a_client_that_stopped_reading() {
    let mut server = Server::start(&[]);
    let (mut stuck, mut sender) = (
        connect(&server, "2.0.0").await,
        connect(&server, "2.0.0").await,
    );
    join(&mut stuck, "backlog", json!({})).await;
    join(&mut sender, "backlog", json!({})).await;
    // More than loopback's socket buffers hold, yet fewer frames than the send queue: the
    // server's writer is blocked with the close frame still to come.
    let blob = "x".repeat(200_000);
    for i in 0..100 {
        send(&mut sender, json!(["1", i.to_string(), "realtime:backlog", "broadcast", {"type": "broadcast", "event": "e", "payload": {"blob": blob}}])).await;
    }
    send(&mut sender, json!([null, "hb", "phoenix", "heartbeat", {}])).await;
    assert_eq!(recv(&mut sender).await[1], "hb", "the flood was handled");
    // `terminate` gives up after 5 s: the stuck socket is dropped at the 2 s drain timeout.
    let exited_ok = tokio::task::spawn_blocking(move || server.terminate())
        .await
        .unwrap();
    assert!(exited_ok, "exit status 0 within 5 s");
    drop(stuck);
}

/// `/readyz` of `server`: status and body.
async fn readyz(server: &Server) -> (u16, serde_json::Value) {
    let (status, _, body) = http(&server.addr, "GET", "/readyz", &[], b"").await;
    (status, serde_json::from_slice(&body).expect("JSON"))
}

#[tokio::test]
async fn readyz_needs_the_change_stream_only_with_a_database() {
    let alone = Server::start(&[]);
    let (status, body) = readyz(&alone).await;
    assert_eq!((status, body["database"].as_str()), (200, Some("none")));

    // A database that is not there: up (healthz) but not ready.
    let port = crate::pg::free_port();
    let url = format!("postgresql://postgres@127.0.0.1:{port}/postgres");
    let unreachable = Server::start(&["--database-url", &url]);
    let (status, body) = readyz(&unreachable).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (503, Some("not ready")),
        "{body}"
    );
    let (status, _, _) = http(&unreachable.addr, "GET", "/healthz", &[], b"").await;
    assert_eq!(status, 200);

    // A real one: ready once the stream is live.
    let pg = crate::pg::TempPostgres::start();
    let server = Server::start(&["--database-url", &pg.url()]);
    for _ in 0..200 {
        let (status, body) = readyz(&server).await;
        if status == 200 {
            assert_eq!(body["database"], "streaming");
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never ready: {:?}", readyz(&server).await);
}
