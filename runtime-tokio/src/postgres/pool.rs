//! A pool of database connections answering the engine's questions: visibility checks for
//! postgres_changes, and authorization checks for private channels. Each worker takes the
//! next questions from a queue shared by the pool, answers them on its own connection, and
//! reconnects after the connection fails. Written once for both kinds of question.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use switchboard_engine::Input;
use tokio::sync::{mpsc, Mutex};
use tokio::time::Instant;
use tracing::warn;

use super::{Backoff, Sink};

/// Bound on one batch's answer, for a connection that stops answering altogether.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// One connection's way of answering one kind of question.
pub(crate) trait Answerer: Sized + Send + 'static {
    /// What the engine asks.
    type Question: Send + 'static;
    /// What the questions are, for logs.
    const WHAT: &'static str;
    /// Questions answered together: those queued when a worker is free, up to this many.
    const BATCH_MAX: usize;

    /// Opens a connection and prepares what it needs.
    fn connect(url: &str) -> impl Future<Output = Result<Self, tokio_postgres::Error>> + Send;

    /// Whether the connection is gone.
    fn is_closed(&self) -> bool;

    /// One input for the engine per question, in order. An error is the connection's or
    /// the database's, never the question's: the questions are answered as unanswered.
    fn answer(
        &mut self,
        batch: &[Self::Question],
    ) -> impl Future<Output = Result<Vec<Input>, tokio_postgres::Error>> + Send;

    /// The input telling the engine the database could not answer `question`.
    fn unanswered(question: &Self::Question) -> Input;
}

/// Runs one worker of a pool: answers batches from `queue` until it closes. Counts each
/// batch sent in `queries`, and observes in `seconds`, if given, how long each answered one
/// took.
pub(crate) async fn worker<A: Answerer>(
    url: Arc<str>,
    queue: Arc<Mutex<mpsc::UnboundedReceiver<A::Question>>>,
    sink: Sink,
    queries: Counter,
    seconds: Option<Histogram>,
) {
    let mut answerer: Option<A> = None;
    let mut backoff = Backoff::new();
    // While the database is unreachable, questions fail at once rather than each waiting
    // for a connect attempt; the engine asks them again (or gives up) on its own terms.
    let mut retry_at = Instant::now();
    loop {
        let batch = {
            let mut queue = queue.lock().await;
            let Some(first) = queue.recv().await else {
                return;
            };
            let mut batch = vec![first];
            while batch.len() < A::BATCH_MAX {
                match queue.try_recv() {
                    Ok(question) => batch.push(question),
                    Err(_) => break,
                }
            }
            batch
        };
        if answerer.as_ref().is_none_or(A::is_closed) && Instant::now() >= retry_at {
            match A::connect(&url).await {
                Ok(connected) => {
                    answerer = Some(connected);
                    backoff = Backoff::new();
                }
                Err(error) => {
                    warn!(%error, what = A::WHAT, "connection failed");
                    answerer = None;
                    retry_at = Instant::now() + backoff.next_delay();
                }
            }
        }
        let answers = match answerer.as_mut() {
            Some(connection) if !connection.is_closed() => {
                queries.inc();
                let asked = Instant::now();
                match tokio::time::timeout(ANSWER_TIMEOUT, connection.answer(&batch)).await {
                    Ok(Ok(answers)) => {
                        if let Some(seconds) = &seconds {
                            seconds.observe(asked.elapsed().as_secs_f64());
                        }
                        Some(answers)
                    }
                    Ok(Err(error)) => {
                        warn!(%error, what = A::WHAT, "query failed; unanswered");
                        answerer = None;
                        None
                    }
                    Err(_) => {
                        warn!(what = A::WHAT, "query timed out; unanswered");
                        answerer = None;
                        None
                    }
                }
            }
            _ => None,
        };
        match answers {
            Some(answers) => answers.into_iter().for_each(|input| sink(input)),
            None => batch.iter().for_each(|q| sink(A::unanswered(q))),
        }
    }
}
