//! One WebSocket connection, in one task: it reads frames for the engine and writes what
//! the connection's outbox holds.
//!
//! Whenever the engine lets a socket go (it closed it, or heard it closed) it also sets a
//! deadline: what is queued and the close frame may flush until then, and the socket is
//! dropped at the deadline whatever the client does. A client that stops reading therefore
//! cannot hold a socket, a task and its queue after the engine closed it.
//!
//! It runs over any futures-io stream (async-tungstenite, on the same tungstenite core as
//! tokio-tungstenite), so every runtime serves sockets with this one task.
//!
//! tungstenite, not fastwebsockets: both are maintained and fast, but tungstenite's
//! `WebSocketConfig` sizes the read and write buffers per connection (its defaults cost
//! about 130 KB per idle socket; we use a few KB), and its `Sink` separates `feed` from
//! `flush`, so every frame already queued for a socket goes out in one write instead of one
//! syscall per frame. fastwebsockets writes each frame as it is given.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use async_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use async_tungstenite::tungstenite::{Error as WsError, Message};
use async_tungstenite::WebSocketStream;
use futures_io::{AsyncRead, AsyncWrite};
use futures_util::{Sink, Stream};
use smallvec::SmallVec;
use switchboard_engine::{ConnId, FrameError, Input, WsMessage};
use tokio::sync::oneshot;
use tracing::debug;

use crate::engine_task::{EngineHandle, Handed, Read, SocketEnd};
use crate::metrics::Metrics;
use crate::outbox::{Batch, Frames, Outbox, Taken};
use crate::runtime::Runtime;

/// Buffers sized for many mostly idle sockets, and the largest message a client may send
/// (`message_bytes_max`: a payload at its limit in its envelope), so one socket never
/// buffers more of an unfinished message. Writes leave the buffer once it passes
/// `write_buffer_size` or on the writer's explicit flush, whichever comes first; what may
/// wait to be written is bounded by the outbox, so the write buffer itself is not.
fn config(message_bytes_max: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        // Realtime frames are small; a larger one grows the buffer as it arrives. 1 KiB instead
        // of 4 KiB took idle joined sockets from 12.4 KB to 9.5 KB of RSS each; 256 B instead
        // of 1 KiB from 5,169 B to 4,616 B, with the same CPU per delivery at 1k and 10k
        // (`benches/run.sh tokio`, medians of 3): a join takes two reads instead of one.
        .read_buffer_size(256)
        .write_buffer_size(8 * 1024)
        .max_message_size(Some(message_bytes_max))
        .max_frame_size(Some(message_bytes_max))
}

/// Bytes of unfinished messages held by all sockets together, and their limit.
#[derive(Debug)]
pub struct Budget {
    used: AtomicUsize,
    max: usize,
}

impl Budget {
    /// A budget of `max` bytes, shared by every socket that gets it.
    pub fn new(max: usize) -> Arc<Budget> {
        Arc::new(Budget {
            used: AtomicUsize::new(0),
            max,
        })
    }
}

/// Why a socket's read was refused: its unfinished message would take the shared budget
/// past its limit.
#[derive(Debug, thiserror::Error)]
#[error("unfinished messages of all sockets are over their memory budget")]
struct OverBudget;

/// A socket's byte stream, counting what it read since its last whole message against the
/// shared [`Budget`]. A socket mid-message (some bytes read, no message out yet) may read
/// more only while the budget has room; a socket between messages always may, so small
/// messages keep flowing when large unfinished ones fill the budget.
struct Metered<S> {
    inner: S,
    budget: Arc<Budget>,
    /// Bytes read since the last whole message.
    partial: usize,
}

impl<S> Metered<S> {
    fn new(inner: S, budget: Arc<Budget>) -> Self {
        Metered {
            inner,
            budget,
            partial: 0,
        }
    }

    /// A whole message came out of what was read: it no longer counts.
    fn message_done(&mut self) {
        self.budget.used.fetch_sub(self.partial, Ordering::Relaxed);
        self.partial = 0;
    }
}

impl<S> Drop for Metered<S> {
    fn drop(&mut self) {
        self.message_done();
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if this.partial > 0 && this.budget.used.load(Ordering::Relaxed) > this.budget.max {
            return Poll::Ready(Err(std::io::Error::other(OverBudget)));
        }
        let read = std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        this.partial += read;
        this.budget.used.fetch_add(read, Ordering::Relaxed);
        Poll::Ready(Ok(read))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

/// What the WebSocket layer refused, as the engine names it; `None` when the socket simply
/// broke or closed.
fn refused(error: &WsError) -> Option<FrameError> {
    match error {
        WsError::Utf8(_) => Some(FrameError::InvalidUtf8),
        WsError::Capacity(_) => Some(FrameError::TooLarge),
        WsError::Protocol(_) => Some(FrameError::Protocol),
        WsError::Io(e) if e.get_ref().is_some_and(|inner| inner.is::<OverBudget>()) => {
            Some(FrameError::Busy)
        }
        _ => None,
    }
}

/// Serves an upgraded WebSocket stream until both sides are done with it or the engine's
/// deadline for it passes; the engine always hears `Closed`, after the last frame read.
/// `io` may be any futures-io stream and `read` what was read from it past the upgrade
/// request; `end` says how much it may buffer.
pub(crate) async fn socket<S, R>(
    io: S,
    read: Vec<u8>,
    conn: ConnId,
    end: SocketEnd,
    engine: EngineHandle,
    runtime: R,
) where
    S: AsyncRead + AsyncWrite + Unpin,
    R: Runtime,
{
    let SocketEnd {
        outbox,
        deadline,
        shared,
        message_bytes_max,
    } = end;
    let metrics = shared.metrics;
    let ws = WebSocketStream::from_partially_read(
        Metered::new(io, shared.unfinished),
        read,
        Role::Server,
        Some(config(message_bytes_max)),
    )
    .await;
    metrics.sockets.inc();
    Connection {
        ws,
        conn,
        engine,
        metrics: metrics.clone(),
        runtime,
        outbox,
        release: Some(deadline),
        deadline: None,
        reading: true,
        forward: None,
        told_closed: false,
        writing: true,
        ended: None,
        batches: SmallVec::new().into_iter(),
        frames: None,
        held: None,
        finished: false,
        unflushed: 0,
    }
    .await;
    metrics.sockets.dec();
    debug!(conn = conn.0, "socket ended");
}

/// Why writing stopped.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// The engine's close frame went out; the client's reply is due.
    CloseSent,
    /// The engine let the socket go without a close frame: the client closed first.
    Released,
    /// Writing failed: the socket is broken.
    Broken,
}

/// One socket, read and written by a single task.
///
/// One task, not a reader and a writer: an idle socket then costs one task and no split
/// lock around the stream (about 2 KB less), and a frame handed over wakes the task that
/// writes it. Both directions are polled every time the task wakes, so a reader waiting for
/// room in the engine's queue never holds up writes, and a writer stuck on a client that does
/// not read never stops reads.
struct Connection<S, R: Runtime> {
    ws: WebSocketStream<Metered<S>>,
    conn: ConnId,
    engine: EngineHandle,
    metrics: Arc<Metrics>,
    runtime: R,
    outbox: Arc<Outbox>,
    /// Until the engine lets the socket go: then the instant by which it must be dropped.
    release: Option<oneshot::Receiver<std::time::Instant>>,
    /// Armed once released: the socket goes at this deadline, flushed or not.
    deadline: Option<R::Timer>,
    /// Frames from the client are still read.
    reading: bool,
    /// An input the engine's queue had no room for yet.
    forward: Option<Pin<Box<dyn Future<Output = bool> + Send>>>,
    /// The engine has heard `Closed` (or is gone).
    told_closed: bool,
    /// Frames are still written.
    writing: bool,
    /// Why writing stopped.
    ended: Option<Ended>,
    /// Batches taken from the outbox and not yet fed to the socket.
    batches: smallvec::IntoIter<[Batch; 1]>,
    /// The batch being fed.
    frames: Option<Frames>,
    /// A frame taken from `frames` that the socket had no room for yet.
    held: Option<Message>,
    /// The outbox said no frame follows what was taken.
    finished: bool,
    /// Bytes fed since the last flush.
    unflushed: u64,
}

impl<S, R> Future for Connection<S, R>
where
    S: AsyncRead + AsyncWrite + Unpin,
    R: Runtime,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if let Some(release) = &mut this.release {
            if let Poll::Ready(at) = Pin::new(release).poll(cx) {
                this.release = None;
                // Unsent means the engine task is gone: nobody will write to this socket.
                let at = at.unwrap_or_else(|_| this.runtime.now());
                this.deadline = Some(this.runtime.timer(at));
            }
        }
        if let Some(deadline) = &mut this.deadline {
            if Pin::new(deadline).poll(cx).is_ready() {
                debug!(
                    conn = this.conn.0,
                    "close deadline passed, dropping the socket"
                );
                if !this.told_closed {
                    // Released, so no frame is owed to the engine any more: no need to wait
                    // for room in its frame queue.
                    this.engine.input(Input::Closed { conn: this.conn });
                }
                return Poll::Ready(());
            }
        }
        this.poll_write(cx);
        this.poll_read(cx);
        // After our close frame, wait for the client's (within the deadline); a socket that
        // broke or was released while writing has nothing more to say.
        let done = !this.writing && (!this.reading || this.ended != Some(Ended::CloseSent));
        loop {
            // A frame still waiting for the engine goes first: `Closed` never overtakes it.
            if this.poll_forward(cx).is_pending() || !done {
                return Poll::Pending;
            }
            if this.told_closed {
                return Poll::Ready(());
            }
            this.tell_closed();
        }
    }
}

impl<S, R> Connection<S, R>
where
    S: AsyncRead + AsyncWrite + Unpin,
    R: Runtime,
{
    /// Hands `input` to the engine, or keeps it until the engine's queue has room.
    fn submit(&mut self, input: Input, at: Option<std::time::Instant>) {
        match self.engine.hand(Read { input, at }) {
            Handed::Taken => {}
            Handed::Later(forward) => self.forward = Some(forward),
            Handed::EngineGone => self.engine_gone(),
        }
    }

    /// The engine stopped (shutdown): nothing more is read, but the writer may still owe a
    /// close.
    fn engine_gone(&mut self) {
        self.reading = false;
        self.told_closed = true;
    }

    /// Stops reading and tells the engine the socket is gone, behind every frame read.
    fn tell_closed(&mut self) {
        self.reading = false;
        self.submit(Input::Closed { conn: self.conn }, None);
        self.told_closed = true;
    }

    /// Waits for the input the engine's queue had no room for; ready once it is in, or the
    /// engine is gone.
    fn poll_forward(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if let Some(forward) = &mut self.forward {
            let delivered = std::task::ready!(forward.as_mut().poll(cx));
            self.forward = None;
            if !delivered {
                self.engine_gone();
            }
        }
        Poll::Ready(())
    }

    /// Reads frames until the socket or the engine's queue has to wait. Stops at the
    /// client's close (or a broken socket); the engine hears `Closed` after the last frame.
    fn poll_read(&mut self, cx: &mut Context<'_>) {
        // One clock read for the frames of one wake-up: they were read together.
        let mut read_at = None;
        loop {
            if self.poll_forward(cx).is_pending() || !self.reading {
                return;
            }
            let next = Pin::new(&mut self.ws).poll_next(cx);
            if let Poll::Ready(Some(Ok(_))) = &next {
                self.ws.get_mut().message_done();
            }
            let msg = match next {
                Poll::Pending => return,
                Poll::Ready(Some(Ok(Message::Text(text)))) => WsMessage::Text(text.into()),
                Poll::Ready(Some(Ok(Message::Binary(data)))) => WsMessage::Binary(data),
                // Pings are answered and pongs noted by tungstenite.
                Poll::Ready(Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)))) => {
                    continue
                }
                Poll::Ready(Some(Err(error))) if refused(&error).is_some() => {
                    // The engine closes the socket with the code for it; the close frame is
                    // written like any other, and nothing more is read.
                    let error = refused(&error).expect("checked");
                    self.reading = false;
                    let input = Input::FrameError {
                        conn: self.conn,
                        error,
                    };
                    self.submit(input, None);
                    return;
                }
                Poll::Ready(Some(Ok(Message::Close(_)) | Err(_)) | None) => {
                    self.tell_closed();
                    continue;
                }
            };
            let at = *read_at.get_or_insert_with(|| self.runtime.now());
            let input = Input::Frame {
                conn: self.conn,
                msg,
            };
            self.submit(input, Some(at));
        }
    }

    /// Writes what the outbox holds, feeding everything taken at once before one flush: one
    /// syscall for a burst instead of one per frame.
    fn poll_write(&mut self, cx: &mut Context<'_>) {
        while self.writing {
            let Some(frame) = self.held.take().or_else(|| self.next_frame()) else {
                // Nothing held: flush what was fed, then take more.
                if self.unflushed > 0 || self.ended == Some(Ended::CloseSent) {
                    match Pin::new(&mut self.ws).poll_flush(cx) {
                        Poll::Pending => return,
                        Poll::Ready(Err(_)) => return self.stop_writing(Ended::Broken),
                        Poll::Ready(Ok(())) => {
                            self.metrics.bytes_out.inc_by(self.unflushed);
                            self.unflushed = 0;
                        }
                    }
                    if self.ended == Some(Ended::CloseSent) {
                        return self.stop_writing(Ended::CloseSent);
                    }
                }
                if self.finished {
                    // Flushes tungstenite's reply to the client's close frame.
                    if Pin::new(&mut self.ws).poll_close(cx).is_pending() {
                        return;
                    }
                    return self.stop_writing(Ended::Released);
                }
                match self.outbox.poll_take(cx) {
                    Poll::Pending => return,
                    Poll::Ready(Taken { batches, finished }) => {
                        self.batches = batches.into_iter();
                        self.finished = finished;
                    }
                }
                continue;
            };
            match Pin::new(&mut self.ws).poll_ready(cx) {
                Poll::Pending => {
                    self.held = Some(frame);
                    return;
                }
                Poll::Ready(Err(_)) => return self.stop_writing(Ended::Broken),
                Poll::Ready(Ok(())) => {}
            }
            let close = matches!(frame, Message::Close(_));
            self.unflushed += frame.len() as u64;
            if Pin::new(&mut self.ws).start_send(frame).is_err() {
                return self.stop_writing(Ended::Broken);
            }
            if close {
                // The engine's close frame comes last: flush it, then wait for the reply.
                self.ended = Some(Ended::CloseSent);
                self.batches = SmallVec::new().into_iter();
                self.frames = None;
            }
        }
    }

    /// The next frame of what was taken from the outbox.
    fn next_frame(&mut self) -> Option<Message> {
        if self.ended.is_some() {
            return None;
        }
        loop {
            if let Some(frame) = self.frames.as_mut().and_then(Iterator::next) {
                return Some(frame);
            }
            self.frames = Some(self.batches.next()?.into_frames());
        }
    }

    fn stop_writing(&mut self, why: Ended) {
        self.writing = false;
        self.ended = Some(why);
        self.batches = SmallVec::new().into_iter();
        self.frames = None;
        self.held = None;
    }
}
