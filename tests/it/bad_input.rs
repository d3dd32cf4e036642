//! Hostile and broken clients against the real binary: invalid UTF-8, oversized and
//! unfinished messages, tokens not valid yet, overlong topics, readers that never read
//! large frames, and a process out of file descriptors. Each gets a clear close or error,
//! memory stays bounded, and other clients are unaffected.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{connect, http, join, metric, recv, send, token, Server, Ws, SECRET, UPGRADE};

/// The close frame that ends `ws`, within 5 s.
async fn close_of(ws: &mut Ws) -> (CloseCode, String) {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("the socket ends within 5 s")
        {
            Some(Ok(Message::Close(Some(frame)))) => {
                break (frame.code, frame.reason.as_str().to_owned())
            }
            Some(Ok(Message::Close(None))) | None | Some(Err(_)) => {
                panic!("the socket ended without a close code")
            }
            Some(Ok(_)) => {}
        }
    }
}

/// A heartbeat on `ws` is answered: the server still serves it.
async fn still_served(ws: &mut Ws) {
    send(ws, json!([null, "hb", "phoenix", "heartbeat", {}])).await;
    assert_eq!(recv(ws).await[1], "hb");
}

#[tokio::test]
async fn invalid_utf8_closes_with_1007_and_oversized_messages_with_1009() {
    let server = Server::start(&["--max-payload-size-kb", "100"]);
    let mut bystander = connect(&server, "2.0.0").await;
    let mut bad = connect(&server, "2.0.0").await;
    let frame = Frame::message(vec![0xff, 0xfe, b'{'], OpCode::Data(Data::Text), true);
    bad.send(Message::Frame(frame)).await.expect("sending");
    assert_eq!(close_of(&mut bad).await.0, CloseCode::Invalid);
    // Over the payload limit plus the envelope allowance.
    let mut big = connect(&server, "2.0.0").await;
    let blob = "x".repeat(100_000 + 500 + 64 * 1024 + 1);
    let _ = big.send(Message::Text(blob.into())).await;
    assert_eq!(close_of(&mut big).await.0, CloseCode::Size);
    still_served(&mut bystander).await;
}

#[tokio::test]
async fn tokens_not_valid_yet_and_overlong_topics_are_refused() {
    let server = Server::start(&[]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let early = switchboard_engine::auth::sign(
        SECRET,
        &json!({"role": "anon", "exp": now + 3600, "nbf": now + 600}),
    );
    let path = format!("/realtime/v1/websocket?apikey={early}&vsn=2.0.0");
    let (status, _, body) = http(&server.addr, "GET", &path, &UPGRADE, b"").await;
    assert_eq!(
        (status, String::from_utf8(body).unwrap()),
        (401, r#"{"error":"Token is not valid yet"}"#.to_owned())
    );
    let mut ws = connect(&server, "2.0.0").await;
    let topic = format!("realtime:{}", "t".repeat(300));
    send(
        &mut ws,
        json!(["1", "1", topic, "phx_join", {"config": {}}]),
    )
    .await;
    let reply = recv(&mut ws).await;
    assert_eq!(
        reply[4]["response"]["reason"],
        "TopicNameTooLong: The topic must be at most 255 bytes"
    );
    let channel_token = early;
    send(
        &mut ws,
        json!(["2", "2", "realtime:ok", "phx_join", {"config": {}, "access_token": channel_token}]),
    )
    .await;
    assert_eq!(
        recv(&mut ws).await[4]["response"]["reason"],
        "InvalidJWTToken: Token is not valid yet"
    );
}

/// Opens a raw WebSocket and sends the start of one text frame of `declared` bytes, of
/// which only `sent` follow: a message that is never finished.
async fn unfinished(addr: &str, declared: u64, sent: usize) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "GET /realtime/v1/websocket?apikey={}&vsn=2.0.0 HTTP/1.1\r\nhost: {addr}\r\n\
         upgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-version: 13\r\n\
         sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        token("anon", 3600)
    );
    stream.write_all(request.as_bytes()).await.expect("upgrade");
    let mut response = [0u8; 1024];
    let n = stream.read(&mut response).await.expect("101");
    assert!(response[..n].starts_with(b"HTTP/1.1 101"), "upgraded");
    // FIN + text, masked with a zero key, 64-bit length.
    let mut header = vec![0x81, 0x80 | 127];
    header.extend_from_slice(&declared.to_be_bytes());
    header.extend_from_slice(&[0, 0, 0, 0]);
    stream.write_all(&header).await.expect("header");
    let chunk = vec![b'x'; 64 * 1024];
    let mut left = sent;
    while left > 0 {
        let n = left.min(chunk.len());
        if stream.write_all(&chunk[..n]).await.is_err() {
            break;
        }
        left -= n;
    }
    stream
}

/// The close code a raw socket ends with, if any, within 2 s.
async fn raw_close_code(stream: &mut TcpStream) -> Option<u16> {
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf))
        .await
        .ok()?
        .ok()?;
    // A server frame: 0x88, length, then the code.
    (n >= 4 && buf[0] == 0x88).then(|| u16::from_be_bytes([buf[2], buf[3]]))
}

#[tokio::test]
async fn unfinished_messages_are_held_within_their_budget() {
    const BUDGET: usize = 20 << 20;
    let server = Server::start(&["--max-unfinished-bytes", &BUDGET.to_string()]);
    let mut bystander = connect(&server, "2.0.0").await;
    join(&mut bystander, "calm", json!({})).await;
    let before = server.rss_bytes();
    // Thirty sockets that each start a 3 MB message and send 2.5 MB of it: 75 MB if held.
    let mut sockets = Vec::new();
    for _ in 0..30 {
        sockets.push(unfinished(&server.addr, 3_000_000, 2_500_000).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = server.rss_bytes();
    let codes = futures_util::future::join_all(sockets.iter_mut().map(raw_close_code)).await;
    let refused = codes.iter().filter(|c| **c == Some(1013)).count();
    assert!(refused > 0, "every unfinished message was held");
    assert!(
        during.saturating_sub(before) < (BUDGET + (20 << 20)) as u64,
        "{} MB more while holding unfinished messages",
        during.saturating_sub(before) >> 20
    );
    still_served(&mut bystander).await;
    // A message over the per-socket limit is refused however the budget stands.
    let mut huge = unfinished(&server.addr, 10_000_000, 0).await;
    assert_eq!(raw_close_code(&mut huge).await, Some(1009));
    drop(sockets);
    // The memory goes back to the system once they are gone (jemalloc's decay: seconds).
    let mut after = server.rss_bytes();
    for _ in 0..60 {
        if after < before + (10 << 20) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        after = server.rss_bytes();
    }
    eprintln!(
        "RSS: {} MB before, {} MB while held, {} MB after",
        before >> 20,
        during >> 20,
        after >> 20
    );
    assert!(
        after < before + (10 << 20),
        "{} MB still held after the sockets left",
        after.saturating_sub(before) >> 20
    );
}

#[tokio::test]
async fn a_reader_that_never_reads_large_frames_is_bounded_by_bytes() {
    let server = Server::start(&["--send-queue-bytes", "4000000"]);
    let (mut slow, mut sender, mut reader) = (
        connect(&server, "2.0.0").await,
        connect(&server, "2.0.0").await,
        connect(&server, "2.0.0").await,
    );
    for ws in [&mut slow, &mut sender, &mut reader] {
        join(ws, "large", json!({})).await;
    }
    // Far fewer frames than the 1,024 frame limit, far more bytes than the byte limit.
    let blob = "x".repeat(1_000_000);
    let mut received = 0;
    for i in 0..30 {
        send(&mut sender, json!(["1", i.to_string(), "realtime:large", "broadcast", {"type": "broadcast", "event": "e", "payload": {"blob": blob}}])).await;
        while let Ok(Some(Ok(_))) =
            tokio::time::timeout(Duration::from_millis(20), reader.next()).await
        {
            received += 1;
        }
    }
    while let Ok(Some(Ok(_))) =
        tokio::time::timeout(Duration::from_millis(500), reader.next()).await
    {
        received += 1;
    }
    assert_eq!(received, 30, "the reading client got every broadcast");
    let mut sockets = String::new();
    for _ in 0..100 {
        sockets = metric(&server, "switchboard_sockets").await;
        if sockets == "2" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(sockets, "2", "the slow socket was let go");
    assert_eq!(
        metric(&server, "switchboard_slow_consumers_total").await,
        "1"
    );
}

#[tokio::test]
async fn out_of_file_descriptors_the_server_keeps_serving_and_recovers() {
    let server = Server::start_with_fd_limit(64, &[]);
    let (mut a, mut b) = (
        connect(&server, "2.0.0").await,
        connect(&server, "2.0.0").await,
    );
    join(&mut a, "pair", json!({})).await;
    join(&mut b, "pair", json!({})).await;
    // Far more connections than descriptors: the kernel queues them, accept fails.
    let mut flood = Vec::new();
    for _ in 0..200 {
        if let Ok(stream) = TcpStream::connect(&server.addr).await {
            flood.push(stream);
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    send(&mut a, json!(["1", "9", "realtime:pair", "broadcast", {"type": "broadcast", "event": "e", "payload": {"n": 1}}])).await;
    assert_eq!(
        recv(&mut b).await[4]["payload"]["n"],
        1,
        "the pair still talks"
    );
    let logged = server.logged("accept failed");
    assert!(
        (1..=3).contains(&logged),
        "{logged} log lines in 2 s of failing accepts"
    );
    drop(flood);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut late = connect(&server, "2.0.0").await;
    still_served(&mut late).await;
    let errors: u64 = metric(&server, "switchboard_accept_errors_total")
        .await
        .parse()
        .unwrap();
    assert!(errors > 0, "accept failures are counted");
}
