//! One WebSocket connection: a reader feeding the engine and a writer draining the
//! connection's bounded queue.
//!
//! tokio-tungstenite, not fastwebsockets: both are maintained and fast, but tungstenite's
//! `WebSocketConfig` sizes the read and write buffers per connection (its defaults cost
//! about 130 KB per idle socket; we use a few KB), and its `Sink` separates `feed` from
//! `flush`, so every frame already queued for a socket goes out in one write instead of one
//! syscall per frame. fastwebsockets writes each frame as it is given.

use futures_util::{SinkExt, StreamExt};
use switchboard_engine::{ConnId, Input, WsMessage};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tracing::debug;

use crate::engine_task::{EngineHandle, Outbound};
use crate::metrics::Metrics;

/// Largest frame and message accepted (upstream's limit, PROTOCOL.md §1.1).
const FRAME_BYTES_MAX: usize = 5_000_000;

/// Buffers sized for many mostly idle sockets.
pub(crate) fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(8 * 1024)
        .max_write_buffer_size(FRAME_BYTES_MAX * 2)
        .max_message_size(Some(FRAME_BYTES_MAX))
        .max_frame_size(Some(FRAME_BYTES_MAX))
}

/// Runs a connection until either side ends it; the engine always hears `Closed`.
pub(crate) async fn run<S>(
    stream: WebSocketStream<S>,
    conn: ConnId,
    mut queue: mpsc::Receiver<Outbound>,
    engine: EngineHandle,
    metrics: std::sync::Arc<Metrics>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, mut source) = stream.split();
    let writer = tokio::spawn(async move {
        while let Some(first) = queue.recv().await {
            let mut next = Some(first);
            let mut bytes = 0u64;
            // Everything already queued goes out in one flush.
            while let Some(outbound) = next.take() {
                match outbound {
                    Outbound::Frame(message) => {
                        bytes += message.len() as u64;
                        if sink.feed(message).await.is_err() {
                            return;
                        }
                    }
                    Outbound::Close(frame) => {
                        let _ = sink.send(Message::Close(Some(frame))).await;
                        let _ = sink.close().await;
                        return;
                    }
                }
                next = queue.try_recv().ok();
            }
            if sink.flush().await.is_err() {
                return;
            }
            metrics.bytes_out.inc_by(bytes);
        }
        // The engine dropped the queue (shutdown after a close, or never): end the socket.
        let _ = sink.close().await;
    });
    let mut writer = writer;
    loop {
        let received = tokio::select! {
            received = source.next() => received,
            // The server closed the socket: nothing more will be read.
            _ = &mut writer => {
                engine.input(Input::Closed { conn });
                return;
            }
        };
        let msg = match received {
            Some(Ok(Message::Text(text))) => WsMessage::Text(text.into()),
            Some(Ok(Message::Binary(data))) => WsMessage::Binary(data),
            Some(Ok(Message::Close(_)) | Err(_)) | None => break,
            Some(Ok(_)) => continue,
        };
        engine.input(Input::Frame { conn, msg });
    }
    debug!(conn = conn.0, "socket ended");
    engine.input(Input::Closed { conn });
    // Let the writer flush what is queued before the socket drops, within reason.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), writer).await;
}
