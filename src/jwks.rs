//! `--jwt-jwks-url`: a JWKS (Supabase publishes one at `/auth/v1/.well-known/jwks.json`)
//! fetched at start, kept, fetched again when a token names a key it lacks (at most once
//! per interval, however many tokens do), and served stale while the URL is down.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use switchboard_engine::auth::Jwks;
use switchboard_engine::Input;
use switchboard_tokio::EngineHandle;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{info, warn};

/// Longest a fetch may take, connection and body together.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest JWKS accepted: a few keys are a few kilobytes.
const JWKS_BYTES_MAX: u64 = 1 << 20;

/// Fetches and checks the JWKS at `url` (http or https, certificates checked against the
/// Mozilla roots). Blocking: run it on a blocking thread.
pub fn fetch(url: &str) -> anyhow::Result<Jwks> {
    let agent = ureq::Agent::config_builder()
        .timeout_global(Some(FETCH_TIMEOUT))
        .build()
        .new_agent();
    let body = agent
        .get(url)
        .call()
        .with_context(|| format!("fetching the JWKS at {url}"))?
        .into_body()
        .with_config()
        .limit(JWKS_BYTES_MAX)
        .read_to_string()
        .with_context(|| format!("reading the JWKS at {url}"))?;
    Jwks::parse(&body).with_context(|| format!("the JWKS at {url}"))
}

/// The keys tokens are checked with: `inline` (from `--jwt-jwks`) and `fetched`, the
/// fetched ones winning on a shared `kid`.
pub fn keys(inline: Option<&Jwks>, fetched: &Jwks) -> Jwks {
    match inline {
        Some(inline) => inline.merged(fetched),
        None => fetched.clone(),
    }
}

/// Keeps the shards' keys fresh until `asked` closes: fetches again when a shard asks
/// (a token named an unknown `kid`) and `interval` has passed since the last attempt, and
/// every `interval` until a first fetch succeeds. A failed fetch keeps the keys as they
/// were.
pub async fn keep(
    url: String,
    inline: Option<Jwks>,
    shards: Vec<EngineHandle>,
    mut asked: mpsc::UnboundedReceiver<()>,
    interval: Duration,
    mut fetched: bool,
) {
    let mut attempted = Instant::now();
    loop {
        let due = attempted + interval;
        let wake = if fetched {
            asked.recv().await
        } else {
            tokio::select! {
                wake = asked.recv() => wake,
                () = tokio::time::sleep_until(due) => Some(()),
            }
        };
        if wake.is_none() {
            return;
        }
        if Instant::now() < due {
            continue;
        }
        attempted = Instant::now();
        let fetching = url.clone();
        match tokio::task::spawn_blocking(move || fetch(&fetching)).await {
            Ok(Ok(jwks)) => {
                fetched = true;
                info!(%url, "JWKS fetched");
                let keys = Arc::new(keys(inline.as_ref(), &jwks));
                for shard in &shards {
                    shard.input(Input::Jwks(keys.clone()));
                }
            }
            Ok(Err(error)) => warn!(error = format!("{error:#}"), "keeping the JWKS we have"),
            Err(error) => warn!(%error, "the JWKS fetch stopped"),
        }
    }
}
