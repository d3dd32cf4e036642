//! A socket's outbox: frames the engine task handed over and the socket's writer has not
//! taken yet.
//!
//! Why not a tokio `mpsc` channel per socket: its first block of 32 slots is allocated up
//! front, about 1.8 KB for every idle socket, and each frame sent through it is a handful of
//! atomic operations on cache lines the writer's core also writes. The engine task instead
//! gathers a wake-up's frames per socket in a plain `Vec` and hands the whole batch over
//! here in one locked append: one wake per socket per batch, however many broadcasts the
//! batch held. The writer takes everything at once. An idle socket's outbox holds no frame
//! buffer at all.

use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};

use tokio_tungstenite::tungstenite::Message;

/// One socket's outbox, shared by the engine task (which appends) and the writer (which
/// takes).
#[derive(Default)]
pub(crate) struct Outbox {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    frames: Vec<Message>,
    /// No frame will follow what is in `frames`.
    finished: bool,
    /// The writer, parked until there is something to take.
    writer: Option<Waker>,
}

/// What the writer takes: frames in order, and whether the engine is done with the socket.
pub(crate) struct Taken {
    pub(crate) frames: Vec<Message>,
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

    /// Appends `frames` (emptying it; its allocation moves in when the outbox is empty) and
    /// wakes the writer. Returns how many frames now wait.
    pub(crate) fn append(&self, frames: &mut Vec<Message>) -> usize {
        let (waiting, writer) = {
            let mut state = self.lock();
            if state.frames.is_empty() {
                std::mem::swap(&mut state.frames, frames);
            } else {
                state.frames.append(frames);
            }
            (state.frames.len(), state.writer.take())
        };
        if let Some(writer) = writer {
            writer.wake();
        }
        waiting
    }

    /// The planted slow-consumer bug: appends only what fits under `limit` and drops the
    /// rest without a word.
    #[cfg(feature = "planted-bugs")]
    pub(crate) fn append_within(&self, frames: &mut Vec<Message>, limit: usize) {
        let room = limit.saturating_sub(self.lock().frames.len());
        frames.truncate(room);
        self.append(frames);
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

    /// Waits until there are frames or the outbox is finished, and takes everything.
    pub(crate) async fn take(&self) -> Taken {
        poll_fn(|cx| {
            let mut state = self.lock();
            if state.frames.is_empty() && !state.finished {
                match &mut state.writer {
                    Some(waker) if waker.will_wake(cx.waker()) => {}
                    slot => *slot = Some(cx.waker().clone()),
                }
                return Poll::Pending;
            }
            Poll::Ready(Taken {
                frames: std::mem::take(&mut state.frames),
                finished: state.finished,
            })
        })
        .await
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
        let mut batch = vec![text("a"), text("b")];
        assert_eq!(outbox.append(&mut batch), 2);
        assert!(batch.is_empty());
        let mut batch = vec![text("c")];
        assert_eq!(outbox.append(&mut batch), 3);
        outbox.finish();
        let taken = outbox.take().await;
        assert_eq!(taken.frames, vec![text("a"), text("b"), text("c")]);
        assert!(taken.finished);
    }

    #[tokio::test]
    async fn a_parked_writer_wakes_for_an_append() {
        let outbox = Outbox::new();
        let writer = tokio::spawn({
            let outbox = outbox.clone();
            async move { outbox.take().await.frames }
        });
        tokio::task::yield_now().await;
        outbox.append(&mut vec![text("x")]);
        assert_eq!(writer.await.expect("writer"), vec![text("x")]);
        let taken = outbox.take();
        outbox.finish();
        let taken = taken.await;
        assert!(taken.frames.is_empty() && taken.finished);
    }
}
