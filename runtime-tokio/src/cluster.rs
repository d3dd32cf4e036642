//! A cluster of switchboard nodes over NATS core pub/sub: to the engines a remote node's
//! shards are peers like the local ones, and this link carries what concerns them.
//!
//! Subjects, under a prefix (`switchboard` by default):
//! - `<prefix>.room.<o|p><topic>`: broadcasts of one room (`o` public, `p` private), the
//!   topic percent-encoded into one subject token. A node subscribes only while one of its
//!   shards has members there ([`ToCluster::Interest`]), so a broadcast costs one publish
//!   and reaches only the nodes that deliver it.
//! - `<prefix>.node.<process>`: messages addressed to one node's replica (presence
//!   snapshots and their requests), so a new or repaired node is not a flood.
//! - `<prefix>.all`: messages for every replica (presence deltas and clocks).
//! - `<prefix>.alive`: each node's heartbeat.
//! - `<prefix>.sync.<process>`: served by nobody; the broker's "no responders" answer to a
//!   request there proves it processed the node's subscriptions sent before. A node silent for the down timeout is
//!   reported down to the local engines, which drop its presence in one `leaves` diff; its
//!   next heartbeat reports it up again and the engines resync by snapshot.
//!
//! - `<prefix>.db.feed`, `<prefix>.db.progress`, `<prefix>.db.refresh`: with a database,
//!   what the slot holder's WAL reader produced (change batches, the publication, whether
//!   the stream is live), each node's progress back to the holder, and requests to read
//!   the publication again (see [`crate::postgres::ClusterDb`]).
//!
//! Peer messages are dropped, not queued, while the broker is unreachable: they are
//! ephemeral, and presence repairs itself by clocks and snapshots once the link is back.
//!
//! **When a change counts as handed out.** The holder confirms a batch to Postgres only
//! once every node that was up when the batch went out has reported handing it out, or
//! has gone down since. A node that dies takes its clients with it, and they rejoin
//! elsewhere; a node that lives on has delivered. If the holder dies, the next one resumes
//! from the slot's confirmed position: batches after it are read again, and every
//! surviving node skips what it already accepted (the engine ignores changes at or below
//! the highest position it was given), so their subscribers see no duplicate. Only
//! subscribers of a node that restarts (a fresh engine) can see a change twice: at most
//! the batches in flight, as after a single-node crash.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::{Client, ConnectOptions, Message, Subscriber};
use bytes::Bytes;
use futures_util::StreamExt;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::postgres::{ClusterDb, DbEvent};
use switchboard_engine::changes::{ChangeBatch, Table};
use switchboard_engine::peer::wire::{self, Envelope};
use switchboard_engine::{Input, NodeId, PeerMsg, RoomKey, ShardId};
use switchboard_serve::{Metrics, PeerEvent, ToCluster};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tracing::{info, warn};

/// How a node joins its cluster.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// The NATS server, `nats://host:port`.
    pub url: String,
    /// The first token of every subject: clusters sharing a broker use different ones.
    pub prefix: String,
    /// This node's name in logs and heartbeats.
    pub name: String,
    /// How often this node says it is alive.
    pub heartbeat: Duration,
    /// Silence after which another node counts as down.
    pub down_after: Duration,
}

/// The longest a join waits for its room's subscription to be confirmed.
const READY_WAIT: Duration = Duration::from_secs(2);

/// Characters kept as they are in a subject token; the rest become `%XX`, so topics with
/// `.`, `*`, `>` or spaces stay one token.
const TOKEN: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_');

impl ClusterConfig {
    /// The subject of a room's broadcasts.
    pub fn room_subject(&self, room: &RoomKey) -> String {
        let kind = if room.private { 'p' } else { 'o' };
        let topic = utf8_percent_encode(&room.sub, TOKEN);
        format!("{}.room.{kind}{topic}", self.prefix)
    }

    fn node_subject(&self, process: u64) -> String {
        format!("{}.node.{process:x}", self.prefix)
    }

    fn all_subject(&self) -> String {
        format!("{}.all", self.prefix)
    }

    fn alive_subject(&self) -> String {
        format!("{}.alive", self.prefix)
    }

    /// Where a node asks the broker whether its subscriptions are in place: nobody
    /// subscribes to it.
    fn sync_subject(&self, process: u64) -> String {
        format!("{}.sync.{process:x}", self.prefix)
    }

    fn db_subject(&self, what: &str) -> String {
        format!("{}.db.{what}", self.prefix)
    }
}

/// This node: its process id (the high bits of its replicas' ids), its shards' queues and
/// its database side.
pub struct Local {
    /// The process id given to [`switchboard_serve::Options::shards`].
    pub process: u64,
    /// Each shard's queue of peer events, in shard order.
    pub inboxes: Vec<mpsc::UnboundedSender<PeerEvent>>,
    /// With a database: the link's end of [`ClusterDb`].
    pub database: Option<LocalDb>,
}

/// The cluster link's end of a node's database side.
pub struct LocalDb {
    events: mpsc::UnboundedReceiver<DbEvent>,
    confirmable: watch::Sender<u64>,
    refresh: Arc<Notify>,
    inputs: Box<dyn Fn(Input) + Send + Sync>,
}

/// The two ends between a node's database side and its cluster link; `inputs` hands what
/// the slot holder sends to this node's shards.
pub fn database_link(inputs: impl Fn(Input) + Send + Sync + 'static) -> (ClusterDb, LocalDb) {
    let (to_link, events) = mpsc::unbounded_channel();
    let (confirmable, confirmable_rx) = watch::channel(0);
    let refresh = Arc::new(Notify::new());
    let database = ClusterDb {
        to_link,
        confirmable: confirmable_rx,
        refresh: refresh.clone(),
    };
    let local = LocalDb {
        events,
        confirmable,
        refresh,
        inputs: Box::new(inputs),
    };
    (database, local)
}

/// What the slot holder's reader produced, as it travels to the other nodes.
#[derive(Serialize, Deserialize)]
enum Feed {
    Publication(Vec<Table>),
    Changes(Arc<ChangeBatch>),
    Replication(bool),
}

/// A node's progress report to the holder.
#[derive(Serialize, Deserialize)]
struct Report {
    process: u64,
    lsn: u64,
}

/// The holder's view of what every node handed out: batches published and not yet
/// confirmable, each with the nodes that were up when it went out.
#[derive(Default)]
struct Confirming {
    pending: VecDeque<(u64, Vec<u64>)>,
    reported: HashMap<u64, u64>,
    /// The last stream state this node's reader fed, to tell nodes that come up later.
    live: Option<bool>,
}

impl Confirming {
    /// The highest batch position every node that was up for it has handed out, or has
    /// gone down since; pops the batches up to it.
    fn advance(&mut self, up: impl Fn(u64) -> bool) -> Option<u64> {
        let mut confirmable = None;
        while let Some((lsn, nodes)) = self.pending.front() {
            let done = nodes
                .iter()
                .all(|n| !up(*n) || self.reported.get(n).is_some_and(|r| r >= lsn));
            if !done {
                break;
            }
            confirmable = Some(*lsn);
            self.pending.pop_front();
        }
        confirmable
    }
}

/// Another node, as its heartbeats describe it.
struct Seen {
    shards: u16,
    name: String,
    last: Instant,
}

/// Runs the node's cluster link until the shards stop: connects to NATS (retrying while it
/// is down), publishes what the shards hand over, and hands them what other nodes send.
pub async fn run(
    config: ClusterConfig,
    mut local: Local,
    from_shards: mpsc::UnboundedReceiver<ToCluster>,
    metrics: Arc<Metrics>,
) -> Result<(), async_nats::ConnectError> {
    let client = ConnectOptions::new()
        .name(&config.name)
        .no_echo()
        .retry_on_initial_connect()
        .max_reconnects(None)
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis((100 * attempts as u64).min(1_000))
        })
        .event_callback(|event| async move { info!(%event, "cluster broker") })
        .connect(config.url.as_str())
        .await?;
    let (received, inbound) = mpsc::unbounded_channel();
    let mut standing = Vec::new();
    let mut subjects = vec![
        config.node_subject(local.process),
        config.all_subject(),
        config.alive_subject(),
    ];
    let db_events = local.database.as_mut().map(|db| {
        subjects.extend(["feed", "progress", "refresh"].map(|what| config.db_subject(what)));
        std::mem::replace(&mut db.events, mpsc::unbounded_channel().1)
    });
    for subject in subjects {
        match client.subscribe(subject.clone()).await {
            Ok(subscriber) => standing.push(forward(subscriber, received.clone())),
            Err(e) => warn!(%subject, error = %e, "subscribing to the cluster failed"),
        }
    }
    let mut link = Link {
        config,
        local,
        client,
        metrics,
        received,
        rooms: HashMap::new(),
        nodes: HashMap::new(),
        confirming: Confirming::default(),
    };
    info!(name = %link.config.name, process = %format_args!("{:x}", link.local.process), "joining the cluster");
    link.serve(from_shards, inbound, db_events).await;
    // What the shards said last (the presence leaves of a drain) goes out before the end.
    let _ = link.client.flush().await;
    for task in standing {
        task.abort();
    }
    Ok(())
}

/// The next event of the database side, if there is one.
async fn recv_db(events: &mut Option<mpsc::UnboundedReceiver<DbEvent>>) -> Option<DbEvent> {
    match events {
        Some(events) => events.recv().await,
        None => std::future::pending().await,
    }
}

/// Hands a subscription's messages to the link's queue.
fn forward(mut subscriber: Subscriber, to: mpsc::UnboundedSender<Message>) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(message) = subscriber.next().await {
            if to.send(message).is_err() {
                break;
            }
        }
    })
}

struct Link {
    config: ClusterConfig,
    local: Local,
    client: Client,
    metrics: Arc<Metrics>,
    received: mpsc::UnboundedSender<Message>,
    /// Rooms some shard has members in: how many shards, and the subscription's task.
    rooms: HashMap<RoomKey, (usize, JoinHandle<()>)>,
    /// Other nodes seen alive, by process id.
    nodes: HashMap<u64, Seen>,
    confirming: Confirming,
}

impl Link {
    async fn serve(
        &mut self,
        mut from_shards: mpsc::UnboundedReceiver<ToCluster>,
        mut inbound: mpsc::UnboundedReceiver<Message>,
        db_events: Option<mpsc::UnboundedReceiver<DbEvent>>,
    ) {
        let mut db_events = db_events;
        let mut ticks = tokio::time::interval(self.config.heartbeat);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                item = from_shards.recv() => match item {
                    Some(item) => self.outbound(item).await,
                    None => break,
                },
                Some(message) = inbound.recv() => self.inbound(message).await,
                Some(event) = recv_db(&mut db_events) => self.database(event).await,
                _ = ticks.tick() => self.tick().await,
            }
        }
        for (_, (_, task)) in self.rooms.drain() {
            task.abort();
        }
    }

    fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    async fn publish(&self, subject: String, payload: Bytes) {
        if !self.connected() {
            self.metrics.cluster_dropped.inc();
            return;
        }
        match self.client.publish(subject, payload).await {
            Ok(()) => {
                self.metrics.cluster_published.inc();
            }
            Err(e) => {
                // Such as a message above the broker's max_payload.
                self.metrics.cluster_dropped.inc();
                warn!(error = %e, "publishing to the cluster failed");
            }
        }
    }

    async fn outbound(&mut self, item: ToCluster) {
        match item {
            ToCluster::Message { from, out } => {
                let subject = match (&out.to, &out.msg) {
                    (Some(to), _) => self.config.node_subject(to.process()),
                    (None, PeerMsg::Broadcast { room, .. }) => self.config.room_subject(room),
                    (None, _) => self.config.all_subject(),
                };
                let envelope = Envelope {
                    from,
                    to: out.to,
                    msg: out.msg,
                };
                self.publish(subject, wire::encode(&envelope)).await;
            }
            ToCluster::Interest { room, members } => self.interest(room, members).await,
        }
    }

    /// Counts the shards with members in `room`: subscribes to its subject at the first,
    /// unsubscribes after the last. A shard whose first member joined hears when the
    /// subscription is in place, and only then answers the join.
    async fn interest(&mut self, room: RoomKey, members: bool) {
        if members {
            if let Some((count, _)) = self.rooms.get_mut(&room) {
                *count += 1;
            } else {
                let subject = self.config.room_subject(&room);
                match self.client.subscribe(subject.clone()).await {
                    Ok(subscriber) => {
                        let task = forward(subscriber, self.received.clone());
                        self.rooms.insert(room.clone(), (1, task));
                    }
                    Err(e) => warn!(%subject, error = %e, "subscribing to a room failed"),
                }
            }
            self.ready_when_subscribed(room);
        } else if let Some((count, _)) = self.rooms.get_mut(&room) {
            *count -= 1;
            if *count == 0 {
                if let Some((_, task)) = self.rooms.remove(&room) {
                    // Dropping the subscriber unsubscribes.
                    task.abort();
                }
            }
        }
    }

    async fn inbound(&mut self, message: Message) {
        self.metrics.cluster_received.inc();
        let subject = message.subject.as_str();
        if subject == self.config.alive_subject() {
            self.alive(&message.payload).await;
            return;
        }
        if let Some(what) = subject.strip_prefix(&self.config.db_subject("")) {
            self.database_message(what, &message.payload);
            return;
        }
        let envelope = match wire::decode(&message.payload) {
            Ok(envelope) => envelope,
            Err(e) => {
                warn!(subject = %message.subject, error = %e, "dropping a cluster message");
                return;
            }
        };
        if envelope.from.process() == self.local.process {
            return;
        }
        match envelope.to {
            Some(to) if to.process() == self.local.process => {
                if let Some(inbox) = self.local.inboxes.get(usize::from(to.shard().0)) {
                    let _ = inbox.send(PeerEvent::Message(envelope.from, envelope.msg));
                }
            }
            Some(_) => {}
            None => {
                if let Some((last, others)) = self.local.inboxes.split_last() {
                    for inbox in others {
                        let _ = inbox.send(PeerEvent::Message(envelope.from, envelope.msg.clone()));
                    }
                    let _ = last.send(PeerEvent::Message(envelope.from, envelope.msg));
                }
            }
        }
    }

    /// Another node's heartbeat: up if it was not.
    async fn alive(&mut self, payload: &[u8]) {
        let Ok(heartbeat) = serde_json::from_slice::<Value>(payload) else {
            return;
        };
        let (Some(process), Some(shards)) = (
            heartbeat["process"].as_u64(),
            heartbeat["shards"]
                .as_u64()
                .and_then(|s| u16::try_from(s).ok()),
        ) else {
            return;
        };
        if process == self.local.process {
            return;
        }
        let name = heartbeat["name"].as_str().unwrap_or_default().to_owned();
        let now = Instant::now();
        if let Some(seen) = self.nodes.get_mut(&process) {
            seen.last = now;
            return;
        }
        info!(node = %name, shards, "cluster node up");
        for shard in 0..shards {
            let replica = NodeId::replica(process, ShardId(shard));
            for inbox in &self.local.inboxes {
                let _ = inbox.send(PeerEvent::Up(replica));
            }
        }
        if self.confirming.live == Some(true) {
            // A node that came up after the stream went live hears it from the holder.
            let feed = serde_json::to_vec(&Feed::Replication(true)).expect("feeds serialize");
            self.publish(self.config.db_subject("feed"), Bytes::from(feed))
                .await;
        }
        self.nodes.insert(
            process,
            Seen {
                shards,
                name,
                last: now,
            },
        );
        self.metrics.cluster_nodes.set(self.nodes.len() as i64);
    }

    /// Says this node is alive, and reports down the nodes silent for too long.
    async fn tick(&mut self) {
        let heartbeat = json!({
            "process": self.local.process,
            "shards": self.local.inboxes.len(),
            "name": self.config.name,
        });
        self.publish(
            self.config.alive_subject(),
            Bytes::from(heartbeat.to_string()),
        )
        .await;
        let now = Instant::now();
        let down_after = self.config.down_after;
        let silent: Vec<u64> = self
            .nodes
            .iter()
            .filter(|(_, seen)| now.duration_since(seen.last) >= down_after)
            .map(|(process, _)| *process)
            .collect();
        for process in silent {
            if let Some(seen) = self.nodes.remove(&process) {
                warn!(node = %seen.name, silent_ms = down_after.as_millis() as u64, "cluster node down");
                // All its shards at once: their entries leave in one diff per room.
                let replicas: Vec<NodeId> = (0..seen.shards)
                    .map(|shard| NodeId::replica(process, ShardId(shard)))
                    .collect();
                for inbox in &self.local.inboxes {
                    let _ = inbox.send(PeerEvent::Down(replicas.clone()));
                }
            }
        }
        self.metrics.cluster_nodes.set(self.nodes.len() as i64);
        self.confirm();
    }

    /// From this node's database side.
    async fn database(&mut self, event: DbEvent) {
        match event {
            DbEvent::Feed(input) => {
                let feed = match input {
                    Input::Changes(batch) => {
                        let mut nodes: Vec<u64> = self.nodes.keys().copied().collect();
                        nodes.push(self.local.process);
                        self.confirming.pending.push_back((batch.lsn, nodes));
                        Feed::Changes(batch)
                    }
                    Input::Publication(tables) => Feed::Publication(tables),
                    Input::Replication(live) => {
                        self.confirming.live = Some(live);
                        Feed::Replication(live)
                    }
                    _ => return,
                };
                let feed = serde_json::to_vec(&feed).expect("feeds serialize");
                self.publish(self.config.db_subject("feed"), Bytes::from(feed))
                    .await;
            }
            DbEvent::Progress(lsn) => {
                self.progress(self.local.process, lsn);
                let report = Report {
                    process: self.local.process,
                    lsn,
                };
                let report = serde_json::to_vec(&report).expect("reports serialize");
                self.publish(self.config.db_subject("progress"), Bytes::from(report))
                    .await;
            }
            DbEvent::Refresh => {
                self.publish(self.config.db_subject("refresh"), Bytes::new())
                    .await;
            }
        }
    }

    /// From another node's database side.
    fn database_message(&mut self, what: &str, payload: &[u8]) {
        let Some(db) = &self.local.database else {
            return;
        };
        match what {
            "feed" => match serde_json::from_slice(payload) {
                Ok(Feed::Changes(batch)) => (db.inputs)(Input::Changes(batch)),
                Ok(Feed::Publication(tables)) => (db.inputs)(Input::Publication(tables)),
                Ok(Feed::Replication(live)) => (db.inputs)(Input::Replication(live)),
                Err(e) => warn!(error = %e, "dropping a malformed change feed message"),
            },
            "progress" => match serde_json::from_slice::<Report>(payload) {
                Ok(report) if report.process != self.local.process => {
                    self.progress(report.process, report.lsn)
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "dropping a malformed progress report"),
            },
            "refresh" => db.refresh.notify_one(),
            _ => {}
        }
    }

    /// A node's progress; the holder may confirm further.
    fn progress(&mut self, process: u64, lsn: u64) {
        let reported = self.confirming.reported.entry(process).or_default();
        *reported = (*reported).max(lsn);
        self.confirm();
    }

    /// Tells the holder's reader what every node handed out.
    fn confirm(&mut self) {
        let (me, nodes) = (self.local.process, &self.nodes);
        let up = |process: u64| process == me || nodes.contains_key(&process);
        if let Some(lsn) = self.confirming.advance(up) {
            if let Some(db) = &self.local.database {
                db.confirmable.send_replace(lsn);
            }
        }
    }

    /// Tells the shards once the broker has every subscription asked for so far. A request
    /// to a subject nobody serves is answered "no responders" by the server itself, after
    /// it processed everything this connection sent before, the room's SUB included (a
    /// flush would only prove the bytes left this process). While the broker is
    /// unreachable, at once: joins must not wait for it, and nothing crosses nodes then.
    fn ready_when_subscribed(&self, room: RoomKey) {
        let inboxes = self.local.inboxes.clone();
        let ready = move || {
            for inbox in &inboxes {
                let _ = inbox.send(PeerEvent::Ready(room.clone()));
            }
        };
        if !self.connected() {
            ready();
            return;
        }
        let client = self.client.clone();
        let subject = self.config.sync_subject(self.local.process);
        tokio::spawn(async move {
            let _ = tokio::time::timeout(READY_WAIT, client.request(subject, Bytes::new())).await;
            ready();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_confirmable_once_every_node_up_for_it_reported_or_went_down() {
        let mut c = Confirming::default();
        c.pending.push_back((10, vec![1, 2]));
        c.pending.push_back((20, vec![1, 2, 3]));
        let all_up = |_: u64| true;
        c.reported.insert(1, 20);
        assert_eq!(c.advance(all_up), None, "node 2 has not reported");
        c.reported.insert(2, 10);
        assert_eq!(c.advance(all_up), Some(10));
        c.reported.insert(2, 20);
        assert_eq!(
            c.advance(all_up),
            None,
            "node 3 was up for the second batch"
        );
        assert_eq!(c.advance(|n| n != 3), Some(20), "until it went down");
        assert!(c.pending.is_empty());
    }

    #[test]
    fn topics_become_one_subject_token() {
        let config = ClusterConfig {
            url: String::new(),
            prefix: "sb".into(),
            name: String::new(),
            heartbeat: Duration::from_secs(1),
            down_after: Duration::from_secs(5),
        };
        let room = |private, sub: &str| RoomKey {
            private,
            sub: sub.into(),
        };
        assert_eq!(config.room_subject(&room(false, "chat")), "sb.room.ochat");
        assert_eq!(
            config.room_subject(&room(true, "a.b *>c")),
            "sb.room.pa%2Eb%20%2A%3Ec"
        );
        assert_eq!(config.room_subject(&room(false, "")), "sb.room.o");
        assert_eq!(
            config.room_subject(&room(false, "é_x-1")),
            "sb.room.o%C3%A9_x-1"
        );
    }
}
