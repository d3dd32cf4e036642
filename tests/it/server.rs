//! The binary over real sockets: upgrade refusals, health, metrics, REST, CORS, slow
//! consumers and graceful shutdown.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{connect, http, join, recv, send, token, Server};

#[tokio::test]
async fn refused_upgrades_get_upstream_status_and_text() {
    let server = Server::start(&[]);
    let upgrade = [
        ("upgrade", "websocket"),
        ("connection", "Upgrade"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];
    let (status, _, body) = http(
        &server.addr,
        "GET",
        "/realtime/v1/websocket?vsn=2.0.0",
        &upgrade,
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
    assert_eq!(http(&server.addr, "GET", &path, &upgrade, b"").await.0, 403);
    let path = format!("/realtime/v1/websocket?apikey={}", token("anon", -10));
    let (status, _, body) = http(&server.addr, "GET", &path, &upgrade, b"").await;
    assert_eq!(
        (status, body),
        (401, br#"{"error":"Token has expired"}"#.to_vec())
    );
    let path = "/socket/websocket?apikey=garbage";
    let (status, _, body) = http(&server.addr, "GET", path, &upgrade, b"").await;
    assert_eq!(
        (status, body),
        (
            401,
            br#"{"error":"The token provided is not a valid JWT"}"#.to_vec()
        )
    );
    // x-api-key wins over the query parameter.
    let with_header = [upgrade.as_slice(), &[("x-api-key", "garbage")]].concat();
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
async fn slow_consumer_is_closed_and_others_are_unaffected() {
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
    // The slow client finds a close frame (slow consumer) or a dropped socket after what was buffered.
    let mut closed = None;
    while let Ok(next) = tokio::time::timeout(Duration::from_secs(5), slow.next()).await {
        match next {
            Some(Ok(Message::Close(frame))) => {
                closed = Some(frame.map(|f| (f.code, f.reason.to_string())));
                break;
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => {
                closed = Some(None);
                break;
            }
        }
    }
    let closed = closed.expect("the slow client was disconnected");
    if let Some((code, reason)) = closed {
        assert_eq!(code, CloseCode::Policy);
        assert!(reason.contains("slow consumer"), "{reason}");
    }
    send(&mut sender, json!([null, "hb", "phoenix", "heartbeat", {}])).await;
    assert_eq!(
        recv(&mut sender).await[1],
        "hb",
        "other sockets still answered"
    );
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
