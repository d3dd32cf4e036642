//! One WebSocket connection: a reader feeding the engine and a writer draining the
//! connection's outbox.
//!
//! Whenever the engine lets a socket go (it closed it, or heard it closed) it also sets a
//! deadline: what is queued and the close frame may flush until then, and the socket is
//! dropped at the deadline whatever the client does. A client that stops reading therefore
//! cannot hold a socket, a task and its queue after the engine closed it.
//!
//! tokio-tungstenite, not fastwebsockets: both are maintained and fast, but tungstenite's
//! `WebSocketConfig` sizes the read and write buffers per connection (its defaults cost
//! about 130 KB per idle socket; we use a few KB), and its `Sink` separates `feed` from
//! `flush`, so every frame already queued for a socket goes out in one write instead of one
//! syscall per frame. fastwebsockets writes each frame as it is given.

use std::sync::Arc;

use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use switchboard_engine::{ConnId, WsMessage};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tracing::debug;

use crate::engine_task::{EngineHandle, SocketEnd};
use crate::metrics::Metrics;
use crate::outbox::{Batch, Outbox, Taken};

/// Largest frame and message accepted (upstream's limit, PROTOCOL.md §1.1).
const FRAME_BYTES_MAX: usize = 5_000_000;

/// Buffers sized for many mostly idle sockets. Writes leave the buffer once it passes
/// `write_buffer_size` or on the writer's explicit flush, whichever comes first.
pub(crate) fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        // Realtime frames are small; a larger one grows the buffer as it arrives. 1 KiB instead
        // of 4 KiB took idle joined sockets from 12.4 KB to 9.5 KB of RSS each.
        .read_buffer_size(1024)
        .write_buffer_size(8 * 1024)
        .max_write_buffer_size(FRAME_BYTES_MAX * 2)
        .max_message_size(Some(FRAME_BYTES_MAX))
        .max_frame_size(Some(FRAME_BYTES_MAX))
}

/// Runs a connection until both sides are done with it or the engine's deadline for it
/// passes; the engine always hears `Closed`, after the last frame read.
pub(crate) async fn run<S>(
    stream: WebSocketStream<S>,
    conn: ConnId,
    end: SocketEnd,
    engine: EngineHandle,
    metrics: Arc<Metrics>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let SocketEnd {
        outbox,
        mut deadline,
    } = end;
    let (sink, mut source) = stream.split();
    let mut writer = tokio::spawn(write(sink, outbox, metrics));
    let abandon = tokio::time::sleep(std::time::Duration::MAX);
    tokio::pin!(abandon);
    let (mut reading, mut writing, mut released) = (true, true, false);
    // Stop reading the client once its close (or a broken socket) is seen or nobody
    // handles its frames; stop when the writer is done too.
    loop {
        tokio::select! {
            // Biased: the simulator cannot seed tokio's choice among ready branches, and a
            // client that never stops sending must not starve its deadline.
            biased;
            () = &mut abandon => {
                debug!(conn = conn.0, "close deadline passed, dropping the socket");
                break;
            }
            at = &mut deadline, if !released => {
                released = true;
                // Unsent means the engine task is gone: nobody will write to this socket.
                abandon.as_mut().reset(at.unwrap_or_else(|_| tokio::time::Instant::now()));
            }
            ended = &mut writer, if writing => {
                writing = false;
                // After our close frame, wait for the client's (within the deadline); a
                // socket that broke while writing has nothing more to say.
                if !reading || !matches!(ended, Ok(Ended::CloseSent)) {
                    break;
                }
            }
            received = source.next(), if reading => {
                let msg = match received {
                    Some(Ok(Message::Text(text))) => WsMessage::Text(text.into()),
                    Some(Ok(Message::Binary(data))) => WsMessage::Binary(data),
                    // Pings are answered and pongs noted by tungstenite.
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                    Some(Ok(Message::Close(_)) | Err(_)) | None => {
                        reading = false;
                        engine.closed(conn).await;
                        if !writing {
                            break;
                        }
                        continue;
                    }
                };
                if !engine.frame(conn, msg).await {
                    // The engine has stopped (shutdown): the writer may still owe a close.
                    reading = false;
                    if !writing {
                        break;
                    }
                }
            }
        }
    }
    // Ends a writer stuck on a client that does not read; the socket drops with both halves.
    writer.abort();
    if reading {
        engine.closed(conn).await;
    }
    debug!(conn = conn.0, "socket ended");
}

/// Why a writer stopped.
enum Ended {
    /// The engine's close frame went out; the client's reply is due.
    CloseSent,
    /// The engine let the socket go without a close frame: the client closed first.
    Released,
    /// Writing failed: the socket is broken.
    Broken,
}

/// Writes what the outbox holds, feeding everything taken at once before one flush: one
/// syscall for a burst instead of one per frame.
async fn write<S>(
    mut sink: SplitSink<WebSocketStream<S>, Message>,
    outbox: Arc<Outbox>,
    metrics: Arc<Metrics>,
) -> Ended
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        let Taken { batches, finished } = outbox.take().await;
        let mut bytes = 0u64;
        for message in batches.into_iter().flat_map(Batch::into_frames) {
            if let Message::Close(_) = message {
                // The engine's close frame comes last: the client's reply is due.
                return match sink.send(message).await {
                    Ok(()) => Ended::CloseSent,
                    Err(_) => Ended::Broken,
                };
            }
            bytes += message.len() as u64;
            if sink.feed(message).await.is_err() {
                return Ended::Broken;
            }
        }
        if sink.flush().await.is_err() {
            return Ended::Broken;
        }
        metrics.bytes_out.inc_by(bytes);
        if finished {
            // Flushes tungstenite's reply to the client's close frame.
            let _ = sink.close().await;
            return Ended::Released;
        }
    }
}
