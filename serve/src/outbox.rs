//! A socket's outbox: frames the engine task handed over and the socket's writer has not
//! taken yet.
//!
//! Why not a tokio `mpsc` channel per socket: its first block of 32 slots is allocated up
//! front, about 1.8 KB for every idle socket, and each frame sent through it is a handful of
//! atomic operations on cache lines the writer's core also writes. The engine task instead
//! gathers a hand-over's frames once, in a table every socket shares, and each socket's share
//! as indices into it; at the hand-over every socket gets one [`Batch`] in one locked append
//! and one wake, however many broadcasts it held. The writer takes everything at once. An
//! idle socket's outbox holds no frame buffer at all.
//!
//! A frame waiting in an outbox costs four bytes, not a 56-byte message: a backlog of
//! thousands of frames per socket (clients reading slower than they are sent to) stays
//! small, and batches are moved in whole, never copied into larger buffers.

use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use smallvec::SmallVec;
use tungstenite::Message;

/// Frames for one socket from one hand-over, in order.
#[derive(Debug, PartialEq)]
pub(crate) enum Batch {
    /// One frame: the usual share of a broadcast when the server keeps up.
    One(Message),
    /// Frames from the hand-over's table, which every socket shares.
    Shared {
        frames: Arc<[Message]>,
        picks: Picks,
    },
    /// Frames of the socket's own: its last ones, when it is let go between hand-overs.
    Own(Vec<Message>),
}

/// Which frames of a shared table a socket gets.
#[derive(Debug, PartialEq)]
pub(crate) enum Picks {
    /// Every one, as every member of a busy room does: nothing to allocate per socket.
    All,
    /// These, in order.
    Some(Vec<u32>),
}

impl Batch {
    pub(crate) fn len(&self) -> usize {
        match self {
            Batch::One(_) => 1,
            Batch::Shared {
                frames,
                picks: Picks::All,
            } => frames.len(),
            Batch::Shared {
                picks: Picks::Some(picks),
                ..
            } => picks.len(),
            Batch::Own(frames) => frames.len(),
        }
    }

    /// Bytes of its frames' payloads, summed frame by frame: for the socket's own frames
    /// and tests. The engine task sums a hand-over's table once instead.
    pub(crate) fn bytes(&self) -> usize {
        match self {
            Batch::One(frame) => frame.len(),
            Batch::Shared {
                frames,
                picks: Picks::All,
            } => frames.iter().map(Message::len).sum(),
            Batch::Shared {
                frames,
                picks: Picks::Some(picks),
            } => picks.iter().map(|&p| frames[p as usize].len()).sum(),
            Batch::Own(frames) => frames.iter().map(Message::len).sum(),
        }
    }

    /// The frames in order; shared ones as refcounted clones.
    pub(crate) fn into_frames(self) -> Frames {
        match self {
            Batch::One(frame) => Frames::One(Some(frame)),
            Batch::Shared {
                frames,
                picks: Picks::All,
            } => Frames::All(frames, 0),
            Batch::Shared {
                frames,
                picks: Picks::Some(picks),
            } => Frames::Picked(frames, picks.into_iter()),
            Batch::Own(frames) => Frames::Own(frames.into_iter()),
        }
    }

    /// Keeps only the first `n` frames.
    #[cfg(feature = "planted-bugs")]
    fn truncate(self, n: usize) -> Batch {
        Batch::Own(self.into_frames().take(n).collect())
    }
}

/// The frames of a [`Batch`].
pub(crate) enum Frames {
    One(Option<Message>),
    All(Arc<[Message]>, usize),
    Picked(Arc<[Message]>, std::vec::IntoIter<u32>),
    Own(std::vec::IntoIter<Message>),
}

impl Iterator for Frames {
    type Item = Message;

    fn next(&mut self) -> Option<Message> {
        match self {
            Frames::One(frame) => frame.take(),
            Frames::All(frames, at) => {
                let frame = frames.get(*at)?.clone();
                *at += 1;
                Some(frame)
            }
            Frames::Picked(frames, picks) => picks.next().map(|pick| frames[pick as usize].clone()),
            Frames::Own(frames) => frames.next(),
        }
    }
}

/// One socket's outbox, shared by the engine task (which appends) and the writer (which
/// takes).
#[derive(Default)]
pub(crate) struct Outbox {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Batches in order; the first inline, as a socket that keeps up has one at a time.
    batches: SmallVec<[Batch; 1]>,
    /// Frames in `batches`.
    waiting: usize,
    /// Their bytes.
    waiting_bytes: usize,
    /// No frame will follow what is in `batches`.
    finished: bool,
    /// The writer, parked until there is something to take.
    writer: Option<Waker>,
}

/// Frames and bytes waiting in an outbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Waiting {
    pub(crate) frames: usize,
    pub(crate) bytes: usize,
}

/// What the writer takes: batches in order, and whether the engine is done with the socket.
pub(crate) struct Taken {
    pub(crate) batches: SmallVec<[Batch; 1]>,
    pub(crate) finished: bool,
}

impl Outbox {
    pub(crate) fn new() -> Arc<Outbox> {
        Arc::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave `State` half-updated: every critical
        // section is a plain move or flag write.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Appends `batch`, of `bytes` in all, and wakes the writer. Returns what now waits.
    pub(crate) fn append(&self, batch: Batch, bytes: usize) -> Waiting {
        let (waiting, writer) = {
            let mut state = self.lock();
            if batch.len() > 0 {
                state.waiting += batch.len();
                state.waiting_bytes += bytes;
                state.batches.push(batch);
            }
            let waiting = Waiting {
                frames: state.waiting,
                bytes: state.waiting_bytes,
            };
            (waiting, state.writer.take())
        };
        if let Some(writer) = writer {
            writer.wake();
        }
        waiting
    }

    /// The planted slow-consumer bug: appends only what fits under `limit` and drops the
    /// rest without a word.
    #[cfg(feature = "planted-bugs")]
    pub(crate) fn append_within(&self, batch: Batch, limit: usize) {
        let room = limit.saturating_sub(self.lock().waiting);
        let batch = batch.truncate(room);
        let bytes = batch.bytes();
        self.append(batch, bytes);
    }

    /// Says no frame follows what was appended, and wakes the writer.
    pub(crate) fn finish(&self) {
        let writer = {
            let mut state = self.lock();
            state.finished = true;
            state.writer.take()
        };
        if let Some(writer) = writer {
            writer.wake();
        }
    }

    /// Takes everything once there are frames or the outbox is finished; until then, the
    /// task of `cx` is woken when there are.
    pub(crate) fn poll_take(&self, cx: &mut Context<'_>) -> Poll<Taken> {
        let mut state = self.lock();
        if state.batches.is_empty() && !state.finished {
            match &mut state.writer {
                Some(waker) if waker.will_wake(cx.waker()) => {}
                slot => *slot = Some(cx.waker().clone()),
            }
            return Poll::Pending;
        }
        state.waiting = 0;
        state.waiting_bytes = 0;
        Poll::Ready(Taken {
            batches: std::mem::take(&mut state.batches),
            finished: state.finished,
        })
    }

    /// Waits until there are frames or the outbox is finished, and takes everything.
    #[cfg(test)]
    async fn take(&self) -> Taken {
        std::future::poll_fn(|cx| self.poll_take(cx)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &'static str) -> Message {
        Message::Text(s.into())
    }

    #[tokio::test]
    async fn frames_arrive_in_order_then_the_end() {
        let outbox = Outbox::new();
        let table: Arc<[Message]> = Arc::from(vec![text("a"), text("b"), text("c")]);
        let picked = Batch::Shared {
            frames: table.clone(),
            picks: Picks::Some(vec![2, 0]),
        };
        let append = |batch: Batch| {
            let bytes = batch.bytes();
            outbox.append(batch, bytes)
        };
        assert_eq!(
            append(picked),
            Waiting {
                frames: 2,
                bytes: 2
            }
        );
        let all = Batch::Shared {
            frames: table,
            picks: Picks::All,
        };
        assert_eq!(
            append(all),
            Waiting {
                frames: 5,
                bytes: 5
            }
        );
        assert_eq!(
            append(Batch::One(text("dd"))),
            Waiting {
                frames: 6,
                bytes: 7
            }
        );
        assert_eq!(
            append(Batch::Own(vec![text("e")])),
            Waiting {
                frames: 7,
                bytes: 8
            }
        );
        outbox.finish();
        let taken = outbox.take().await;
        let frames: Vec<Message> = taken
            .batches
            .into_iter()
            .flat_map(Batch::into_frames)
            .collect();
        let expected = ["c", "a", "a", "b", "c", "dd", "e"].map(text);
        assert_eq!(frames, expected);
        assert!(taken.finished);
    }

    #[tokio::test]
    async fn a_parked_writer_wakes_for_an_append() {
        let outbox = Outbox::new();
        let writer = tokio::spawn({
            let outbox = outbox.clone();
            async move { outbox.take().await.batches }
        });
        tokio::task::yield_now().await;
        outbox.append(Batch::One(text("x")), 1);
        assert_eq!(
            writer.await.expect("writer").into_vec(),
            vec![Batch::One(text("x"))]
        );
        let taken = outbox.take();
        outbox.finish();
        let taken = taken.await;
        assert!(taken.batches.is_empty() && taken.finished);
    }
}
