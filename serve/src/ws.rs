//! One WebSocket connection, in one task: it reads frames for the engine and writes what
//! the connection's outbox holds.
//!
//! Whenever the engine lets a socket go (it closed it, or heard it closed) it also sets a
//! deadline: what is queued and the close frame may flush until then, and the socket is
//! dropped at the deadline whatever the client does. A client that stops reading therefore
//! cannot hold a socket, a task and its queue after the engine closed it.
//!
//! It runs over any futures-io stream, so every runtime serves sockets with this one task.
//! Frames are read and written by [`crate::wire`]: reads go to the thread's buffer and a
//! socket keeps only what it has not seen whole; every frame already queued for a socket is
//! gathered into one write, not one syscall per frame.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_io::{AsyncRead, AsyncWrite};
use smallvec::SmallVec;
use switchboard_engine::{ConnId, FrameError, Input};
use tokio::sync::{mpsc, oneshot};
use tracing::debug;
use tungstenite::Message;

use crate::engine_task::{EngineHandle, Handed, Read, SocketEnd};
use crate::metrics::Metrics;
use crate::outbox::{Batch, Frames, Outbox, Taken};
use crate::runtime::Runtime;
use crate::wire::{self, Decoder, Event};

/// Bytes a socket reads at once, into its thread's buffer.
const READ_BYTES: usize = 16 * 1024;

/// Bytes of frames gathered for one write, beyond which the rest waits for the next. A
/// socket that cannot take them keeps what is left, so this bounds what a stalled socket
/// holds besides its outbox.
const GATHER_BYTES: usize = 16 * 1024;

thread_local! {
    /// Every socket of the thread reads into this buffer and gathers its writes in that
    /// one: an idle socket holds neither.
    static BUFFERS: RefCell<(Box<[u8]>, Vec<u8>)> =
        RefCell::new((vec![0; READ_BYTES].into_boxed_slice(), Vec::with_capacity(GATHER_BYTES)));
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

/// What a socket read since its last whole message, counted against the shared
/// [`Budget`]. A socket mid-message (some bytes read, no message out yet) may read more only
/// while the budget has room; a socket between messages always may, so small messages keep
/// flowing when large unfinished ones fill the budget.
struct Meter {
    budget: Arc<Budget>,
    /// Bytes read since the last whole message.
    partial: usize,
}

impl Meter {
    /// Whether the socket may read now.
    fn may_read(&self) -> bool {
        self.partial == 0 || self.budget.used.load(Ordering::Relaxed) <= self.budget.max
    }

    fn read(&mut self, bytes: usize) {
        self.partial += bytes;
        self.budget.used.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A whole message came out of what was read: it no longer counts.
    fn message_done(&mut self) {
        self.budget.used.fetch_sub(self.partial, Ordering::Relaxed);
        self.partial = 0;
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        self.message_done();
    }
}

/// Serves an upgraded WebSocket stream until both sides are done with it or the engine's
/// deadline for it passes; the engine always hears `Closed`, after the last frame read.
/// `io` may be any futures-io stream and `read` what was read from it past the upgrade
/// request; `end` says how much it may buffer. `open` is held while the socket is: the
/// server's drain waits for every one to go.
pub(crate) fn socket<S, R>(
    io: S,
    read: Vec<u8>,
    conn: ConnId,
    end: SocketEnd,
    engine: EngineHandle,
    runtime: R,
    open: mpsc::Sender<()>,
) -> Connection<S, R>
where
    S: AsyncRead + AsyncWrite + Unpin,
    R: Runtime,
{
    let SocketEnd {
        outbox,
        deadline,
        shared,
        message_bytes_max,
    } = end;
    shared.metrics.sockets.inc();
    Connection {
        io,
        decoder: Decoder::new(message_bytes_max, read),
        meter: Meter {
            budget: shared.unfinished,
            partial: 0,
        },
        conn,
        engine,
        metrics: shared.metrics,
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
        unsent: Vec::new(),
        unflushed: false,
        finished: false,
        peer_closed: None,
        close_replied: false,
        _open: open,
    }
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
pub(crate) struct Connection<S, R: Runtime> {
    io: S,
    decoder: Decoder,
    meter: Meter,
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
    /// Why writing stopped, or that the engine's close frame is on its way.
    ended: Option<Ended>,
    /// Batches taken from the outbox and not yet gathered.
    batches: smallvec::IntoIter<[Batch; 1]>,
    /// The batch being gathered.
    frames: Option<Frames>,
    /// Encoded bytes the socket has not taken yet: the rest of a write, and pongs. Empty,
    /// without capacity, while the socket keeps up.
    unsent: Vec<u8>,
    /// Bytes were written since the last flush.
    unflushed: bool,
    /// The outbox said no frame follows what was taken.
    finished: bool,
    /// The client's close frame arrived, with its code if any: the reply echoes it.
    peer_closed: Option<Option<u16>>,
    /// The close frame that ends a released socket is queued.
    close_replied: bool,
    /// Held while the socket is: the server waits for these to drain at shutdown.
    _open: mpsc::Sender<()>,
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
        let waiting = this.unsent.len();
        this.poll_read(cx);
        if this.unsent.len() > waiting {
            // The reads queued a pong.
            this.poll_write(cx);
        }
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

impl<S, R: Runtime> Drop for Connection<S, R> {
    fn drop(&mut self) {
        self.metrics.sockets.dec();
        debug!(conn = self.conn.0, "socket ended");
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

    /// The client broke the protocol or a limit: the engine closes the socket with the code
    /// for it, written like any other frame, and nothing more is read.
    fn refuse(&mut self, error: FrameError) {
        self.reading = false;
        let input = Input::FrameError {
            conn: self.conn,
            error,
        };
        self.submit(input, None);
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
            // What was kept when the engine's queue was full comes before new reads.
            match self.decoder.next(&mut &[][..]) {
                Ok(Some(event)) => {
                    self.take(event, &mut read_at);
                    continue;
                }
                Ok(None) => {}
                Err(error) => return self.refuse(error),
            }
            if !self.meter.may_read() {
                return self.refuse(FrameError::Busy);
            }
            let read = BUFFERS.with_borrow_mut(|(buffer, _)| {
                let n = match Pin::new(&mut self.io).poll_read(cx, buffer) {
                    Poll::Pending => return false,
                    Poll::Ready(Ok(0) | Err(_)) => {
                        self.tell_closed();
                        return true;
                    }
                    Poll::Ready(Ok(n)) => n,
                };
                self.meter.read(n);
                let mut input = &buffer[..n];
                loop {
                    match self.decoder.next(&mut input) {
                        Ok(Some(event)) => {
                            self.take(event, &mut read_at);
                            if !self.reading {
                                break;
                            }
                            if self.forward.is_some() {
                                self.decoder.keep(input);
                                break;
                            }
                        }
                        Ok(None) => break,
                        Err(error) => {
                            self.refuse(error);
                            break;
                        }
                    }
                }
                true
            });
            if !read {
                return;
            }
        }
    }

    /// Acts on what the client sent.
    fn take(&mut self, event: Event, read_at: &mut Option<std::time::Instant>) {
        self.meter.message_done();
        match event {
            Event::Message(msg) => {
                let at = *read_at.get_or_insert_with(|| self.runtime.now());
                let input = Input::Frame {
                    conn: self.conn,
                    msg,
                };
                self.submit(input, Some(at));
            }
            Event::Ping(payload) => {
                if self.writing && self.ended.is_none() {
                    queue_pong(&mut self.unsent, payload);
                }
            }
            Event::Close(code) => {
                self.peer_closed = Some(code);
                self.tell_closed();
            }
        }
    }

    /// Writes what the outbox holds, everything taken at once gathered into one write: one
    /// syscall for a burst instead of one per frame.
    fn poll_write(&mut self, cx: &mut Context<'_>) {
        while self.writing {
            if !self.unsent.is_empty() {
                match Pin::new(&mut self.io).poll_write(cx, &self.unsent) {
                    Poll::Pending => return,
                    Poll::Ready(Ok(0) | Err(_)) => return self.stop_writing(Ended::Broken),
                    Poll::Ready(Ok(n)) if n == self.unsent.len() => {
                        self.wrote(n);
                        self.unsent = Vec::new();
                    }
                    Poll::Ready(Ok(n)) => {
                        self.wrote(n);
                        self.unsent.drain(..n);
                    }
                }
                continue;
            }
            match self.gather(cx) {
                Gathered::Wrote => continue,
                Gathered::Waiting => return,
                Gathered::Broken => return self.stop_writing(Ended::Broken),
                Gathered::Nothing => {}
            }
            if self.unflushed {
                match Pin::new(&mut self.io).poll_flush(cx) {
                    Poll::Pending => return,
                    Poll::Ready(Err(_)) => return self.stop_writing(Ended::Broken),
                    Poll::Ready(Ok(())) => self.unflushed = false,
                }
            }
            if self.ended == Some(Ended::CloseSent) {
                return self.stop_writing(Ended::CloseSent);
            }
            if self.finished {
                if !self.close_replied {
                    // The reply to the client's close frame, or a close of our own.
                    self.close_replied = true;
                    wire::encode_close_reply(self.peer_closed.flatten(), &mut self.unsent);
                    continue;
                }
                if Pin::new(&mut self.io).poll_close(cx).is_pending() {
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
        }
    }

    /// Encodes frames taken from the outbox into the thread's buffer, up to
    /// [`GATHER_BYTES`], and writes them; what the socket does not take is kept.
    fn gather(&mut self, cx: &mut Context<'_>) -> Gathered {
        BUFFERS.with_borrow_mut(|(_, gathered)| {
            gathered.clear();
            while gathered.len() < GATHER_BYTES {
                let Some(frame) = self.next_frame() else {
                    break;
                };
                wire::encode(&frame, gathered);
                if matches!(frame, Message::Close(_)) {
                    // The engine's close frame comes last: write it, then wait for the reply.
                    self.ended = Some(Ended::CloseSent);
                    self.batches = SmallVec::new().into_iter();
                    self.frames = None;
                }
            }
            if gathered.is_empty() {
                return Gathered::Nothing;
            }
            let written = match Pin::new(&mut self.io).poll_write(cx, gathered) {
                Poll::Pending => 0,
                Poll::Ready(Ok(0) | Err(_)) => return Gathered::Broken,
                Poll::Ready(Ok(n)) => n,
            };
            self.wrote(written);
            if written < gathered.len() {
                self.unsent = gathered[written..].to_vec();
            }
            if written == 0 {
                Gathered::Waiting
            } else {
                Gathered::Wrote
            }
        })
    }

    fn wrote(&mut self, bytes: usize) {
        self.metrics.bytes_out.inc_by(bytes as u64);
        self.unflushed |= bytes > 0;
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
            // What was written goes at once: an idle socket holds no share of a hand-over's
            // table (about 200 B after a join).
            self.frames = None;
            let Some(batch) = self.batches.next() else {
                self.batches = SmallVec::new().into_iter();
                return None;
            };
            self.frames = Some(batch.into_frames());
        }
    }

    fn stop_writing(&mut self, why: Ended) {
        self.writing = false;
        self.ended = Some(why);
        self.batches = SmallVec::new().into_iter();
        self.frames = None;
        self.unsent = Vec::new();
    }
}

/// Queues the pong for a ping behind what waits for the socket, unless that is already
/// [`GATHER_BYTES`] or more: a client that pings and never reads cannot grow it. RFC 6455
/// lets a server answer only the latest of several pings.
fn queue_pong(unsent: &mut Vec<u8>, payload: bytes::Bytes) {
    if unsent.len() < GATHER_BYTES {
        wire::encode(&Message::Pong(payload), unsent);
    }
}

/// What a gathering write came to.
enum Gathered {
    /// No frame was waiting.
    Nothing,
    /// Some bytes went out; what did not is kept.
    Wrote,
    /// The socket took nothing: everything is kept, and the task wakes when it has room.
    Waiting,
    Broken,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pings_from_a_client_that_does_not_read_queue_a_bounded_backlog() {
        let mut unsent = Vec::new();
        for _ in 0..100_000 {
            queue_pong(&mut unsent, bytes::Bytes::from_static(&[7; 125]));
        }
        assert!(unsent.len() < GATHER_BYTES + 130, "{} bytes", unsent.len());
        let mut pongs =
            tungstenite::protocol::frame::FrameSocket::new(std::io::Cursor::new(unsent));
        let pong = pongs.read(None).expect("valid").expect("a frame");
        assert_eq!(pong.payload(), &[7; 125]);
    }
}
