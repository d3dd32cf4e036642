//! The floor: a minimal raw fan-out WebSocket server on the same WebSocket crate as
//! switchboard, with no protocol and no engine. Every text frame a client sends goes to
//! every other client of its room (`?room=<name>`), frames to one socket batched into one
//! write. switchboard's throughput is reported as a ratio of this floor, measured in the
//! same run by the same load generator.
//!
//! `floor --bind 127.0.0.1:4100`; prints `floor listening on ws://ADDR` when ready.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:4100")]
    bind: String,
    /// Per-socket send queue, in frames.
    #[arg(long, default_value_t = 4096)]
    queue: usize,
}

type Rooms = Arc<Mutex<HashMap<String, Vec<(u64, mpsc::Sender<Message>)>>>>;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    // The backlog switchboard asks for: tokio's default of 128 drops SYNs in a burst.
    let addr: std::net::SocketAddr = args
        .bind
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    let listener = socket.listen(4096)?;
    println!("floor listening on ws://{}", listener.local_addr()?);
    let rooms: Rooms = Arc::default();
    let mut next_id = 0u64;
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        next_id += 1;
        tokio::spawn(serve(stream, next_id, rooms.clone(), args.queue));
    }
}

// The handshake callback's error type is tungstenite's own `ErrorResponse`.
#[allow(clippy::result_large_err)]
async fn serve(stream: tokio::net::TcpStream, id: u64, rooms: Rooms, queue: usize) {
    let mut room = String::new();
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(8192);
    let callback = |request: &Request, response: Response| {
        room = request
            .uri()
            .query()
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("room=")))
            .unwrap_or("default")
            .to_owned();
        Ok(response)
    };
    let Ok(ws) =
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config)).await
    else {
        return;
    };
    let (mut sink, mut source) = ws.split();
    let (tx, mut rx) = mpsc::channel::<Message>(queue);
    rooms
        .lock()
        .expect("rooms lock")
        .entry(room.clone())
        .or_default()
        .push((id, tx));
    let writer = tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            if sink.feed(first).await.is_err() {
                return;
            }
            while let Ok(next) = rx.try_recv() {
                if sink.feed(next).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
    });
    while let Some(Ok(msg)) = source.next().await {
        if !msg.is_text() {
            continue;
        }
        let members = rooms
            .lock()
            .expect("rooms lock")
            .get(&room)
            .cloned()
            .unwrap_or_default();
        for (member, tx) in members {
            if member != id {
                let _ = tx.try_send(msg.clone());
            }
        }
    }
    rooms
        .lock()
        .expect("rooms lock")
        .entry(room)
        .or_default()
        .retain(|(member, _)| *member != id);
    writer.abort();
}
