//! The one task that owns the engine: read what happened, `handle`, drain, carry out,
//! sleep until the next deadline.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant as StdInstant;

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use rustc_hash::FxHashMap;
use switchboard_engine::{
    ConnId, ConnectParams, Engine, Input, NodeId, Output, PeerMsg, ReqId, RestRequest, RoomKey,
    Stats, WsMessage,
};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;
use tungstenite::{Message, Utf8Bytes};

use crate::outbox::{Batch, Outbox, Picks};
use crate::runtime::{Runtime, Timer};
use crate::{Options, Shared};

/// The connection task's end of a socket the engine accepted: the HTTP task serves it as a socket.
/// It brings what the socket needs from its process, so an adapter passes only the stream.
pub struct SocketEnd {
    /// Frames to write, in the engine's order; a close frame comes last.
    pub(crate) outbox: Arc<Outbox>,
    /// Once the engine is done with the socket: the instant by which the connection task
    /// must have dropped it, flushed or not. Dropped unsent only if the engine task ended.
    pub(crate) deadline: oneshot::Receiver<std::time::Instant>,
    /// The process's metrics and the budget of unfinished messages.
    pub(crate) shared: Shared,
    /// The largest message the client may send.
    pub(crate) message_bytes_max: usize,
}

/// What became of an input a socket handed to the engine.
pub(crate) enum Handed {
    /// In the engine's queue.
    Taken,
    /// The queue is full: this completes once it is in (false if the engine ended first).
    /// Readers wait for it, so a burst pushes back on the clients' TCP windows instead of
    /// growing memory.
    Later(Pin<Box<dyn Future<Output = bool> + Send>>),
    /// The engine task has ended.
    EngineGone,
}

/// The verdict on an upgrade: the socket's end, or an HTTP answer.
pub type Upgrade = Result<SocketEnd, (u16, Bytes)>;

/// An input from a socket's task: a frame, with when the task read it, a refused frame, or
/// the socket's end. A broadcast's hand-over is timed from the read.
pub(crate) struct Read {
    pub(crate) input: Input,
    /// When the frame was read, by the runtime's clock; `None` for anything but a frame.
    pub(crate) at: Option<std::time::Instant>,
}

/// Frames read from sockets and not yet handled. Readers wait when it is full, so a burst
/// pushes back on the clients' TCP windows instead of growing memory.
const FRAMES_QUEUED_MAX: usize = 4096;

/// Inputs taken per wake-up before outputs are carried out and the timer re-armed.
const BATCH_MAX: usize = 256;

/// Frames gathered for sockets before they are handed over, even mid-batch: 256 broadcasts
/// to 10,000 members would otherwise keep every socket waiting until 2.5M deliveries were
/// gathered.
const HAND_OVER_FRAMES: usize = 128 * 1024;

/// Membership and messages of the peer bus.
#[derive(Debug)]
pub enum PeerEvent {
    /// A peer became reachable.
    Up(NodeId),
    /// Peers considered down together (the shards of one node).
    Down(Vec<NodeId>),
    /// A peer sent a message.
    Message(NodeId, PeerMsg),
    /// The cluster subscription to a room is in place ([`Input::InterestReady`]).
    Ready(RoomKey),
}

/// A message for the peer bus: to one replica, or to every one when `to` is `None`.
#[derive(Clone, Debug)]
pub struct PeerOut {
    /// The addressee, if only one.
    pub to: Option<NodeId>,
    /// The message.
    pub msg: PeerMsg,
}

/// The engine's end of a peer bus: what it sends to peers, and what peers report.
pub struct PeerLink {
    /// Hands a message to the bus, which must not block: in-process shards queue it for
    /// the addressees at once, the simulated bus holds it across partitions.
    pub outgoing: Box<dyn Fn(PeerOut) + Send + Sync>,
    /// Told when a room gains its first or loses its last member here: a cluster link
    /// subscribes to a room's traffic only while its node has members there.
    pub interest: Option<Box<dyn Fn(RoomKey, bool) + Send + Sync>>,
    /// Membership changes and messages from peers.
    pub incoming: mpsc::UnboundedReceiver<PeerEvent>,
}

enum Event {
    Connect {
        conn: ConnId,
        params: ConnectParams,
        reply: oneshot::Sender<Upgrade>,
    },
    Rest {
        request: RestRequest,
        reply: oneshot::Sender<(u16, Bytes)>,
    },
    Socket(Read),
    Input(Input),
}

/// Feeds the engine task. Cheap to clone.
#[derive(Clone)]
pub struct EngineHandle {
    /// Upgrades, REST requests and inputs from subsystems: few, and never to be refused.
    events: mpsc::UnboundedSender<Event>,
    /// Frames and closes from socket readers, bounded; one channel keeps a socket's close
    /// behind its last frame.
    frames: mpsc::Sender<Read>,
    next_conn: Arc<AtomicU64>,
}

impl EngineHandle {
    /// Sends an input (e.g. from the WAL reader); dropped if the engine task has ended.
    pub fn input(&self, input: Input) {
        let _ = self.events.send(Event::Input(input));
    }

    /// A fresh connection id: never reused, so a late output can never reach a stranger.
    pub fn next_conn(&self) -> ConnId {
        ConnId(self.next_conn.fetch_add(1, Ordering::Relaxed) + 1)
    }

    /// Hands a frame (or the `Closed` after the last one) read from a socket to the engine.
    pub(crate) fn hand(&self, read: Read) -> Handed {
        match self.frames.try_send(read) {
            Ok(()) => Handed::Taken,
            Err(TrySendError::Full(read)) => {
                let frames = self.frames.clone();
                Handed::Later(Box::pin(async move { frames.send(read).await.is_ok() }))
            }
            Err(TrySendError::Closed(_)) => Handed::EngineGone,
        }
    }

    /// Tells the engine `conn`'s socket is gone, after every frame read from it.
    pub async fn closed(&self, conn: ConnId) {
        let input = Input::Closed { conn };
        let _ = self.frames.send(Read { input, at: None }).await;
    }

    /// Asks the engine whether `conn` may upgrade; the socket's end if so.
    pub async fn connect(&self, conn: ConnId, params: ConnectParams) -> Upgrade {
        let (reply, answer) = oneshot::channel();
        if self
            .events
            .send(Event::Connect {
                conn,
                params,
                reply,
            })
            .is_err()
        {
            return Err((
                503,
                Bytes::from_static(br#"{"error":"Realtime is restarting, please standby"}"#),
            ));
        }
        answer.await.unwrap_or(Err((503, Bytes::new())))
    }

    /// Hands a REST request to the engine; its status and body.
    pub async fn rest(&self, request: RestRequest) -> (u16, Bytes) {
        let (reply, answer) = oneshot::channel();
        if self.events.send(Event::Rest { request, reply }).is_err() {
            return (503, Bytes::new());
        }
        answer.await.unwrap_or((503, Bytes::new()))
    }

    /// Asks the engine to drain: channels are told, sockets closed.
    pub fn shutdown(&self) {
        self.input(Input::Shutdown);
    }
}

/// The engine task's end of a socket.
struct Socket {
    outbox: Arc<Outbox>,
    /// This hand-over's frames for the socket, as indices into the driver's table.
    pending: Vec<u32>,
    /// Reported to the engine as a slow consumer, whose close is on its way.
    lagging: bool,
    deadline: oneshot::Sender<std::time::Instant>,
}

struct Driver<R: Runtime> {
    runtime: R,
    engine: Engine,
    options: Options,
    sockets: FxHashMap<ConnId, Socket>,
    /// This hand-over's frames, each encoded once, shared by every socket it goes to.
    table: Vec<Message>,
    /// Sockets with pending frames.
    dirty: Vec<ConnId>,
    /// Frames pending over all sockets.
    pending_frames: usize,
    upgrades: FxHashMap<ConnId, oneshot::Sender<Upgrade>>,
    requests: FxHashMap<ReqId, oneshot::Sender<(u16, Bytes)>>,
    next_req: u64,
    /// Connections whose outbox overflowed, reported back to the engine after the hand-over.
    lagging: Vec<ConnId>,
    /// Connections accepted by the engine whose upgrade can no longer happen.
    gone: Vec<ConnId>,
    /// When each broadcast routed since the last hand-over arrived, one entry per
    /// broadcast: observed once its copies are on the outboxes. Kept, not reallocated.
    arrivals: Vec<std::time::Instant>,
    /// This shard's share of `switchboard_engine_busy_seconds`.
    busy: Counter<f64, AtomicU64>,
    last_stats: Stats,
    draining: bool,
}

/// An engine not yet driven: made on any thread, then driven on the one that serves it.
pub(crate) struct Engined {
    engine: Engine,
    options: Options,
    events: mpsc::UnboundedReceiver<Event>,
    frames: mpsc::Receiver<Read>,
}

/// An engine and its handle. The handle feeds it from anywhere as soon as it exists; the
/// engine runs once [`Engined::drive`] is spawned.
pub(crate) fn driver(options: Options) -> (EngineHandle, Engined) {
    let (events, event_receiver) = mpsc::unbounded_channel();
    let (frames, frame_receiver) = mpsc::channel(FRAMES_QUEUED_MAX);
    let engine = Engine::with_replica(
        options.config.clone(),
        options.replica.clone(),
        options.seed,
    );
    let handle = EngineHandle {
        events,
        frames,
        next_conn: Arc::default(),
    };
    let engined = Engined {
        engine,
        options,
        events: event_receiver,
        frames: frame_receiver,
    };
    (handle, engined)
}

impl Engined {
    /// The future that drives the engine on `runtime`: it ends once the engine has drained
    /// after [`EngineHandle::shutdown`], or when every handle is gone.
    pub(crate) fn drive<R: Runtime>(self, runtime: R) -> impl Future<Output = ()> {
        let Engined {
            engine,
            options,
            events,
            frames,
        } = self;
        let busy = options.shared.metrics.engine_busy(options.replica.shard);
        let driver = Driver {
            runtime,
            engine,
            options,
            sockets: FxHashMap::default(),
            table: Vec::new(),
            dirty: Vec::new(),
            pending_frames: 0,
            upgrades: FxHashMap::default(),
            requests: FxHashMap::default(),
            next_req: 0,
            lagging: Vec::new(),
            gone: Vec::new(),
            arrivals: Vec::new(),
            busy,
            last_stats: Stats::default(),
            draining: false,
        };
        driver.run(events, frames)
    }
}

impl<R: Runtime> Driver<R> {
    async fn run(
        mut self,
        mut events: mpsc::UnboundedReceiver<Event>,
        mut frames: mpsc::Receiver<Read>,
    ) {
        let mut peers = self.options.peers.take();
        let mut sleep = self.runtime.timer(far_future(self.runtime.now()));
        loop {
            let event = tokio::select! {
                biased;
                event = events.recv() => match event {
                    Some(event) => event,
                    None => return,
                },
                Some(read) = frames.recv() => Event::Socket(read),
                Some(peer) = recv_peer(&mut peers) => Event::Input(peer_input(peer)),
                () = &mut sleep => Event::Input(Input::Tick),
            };
            self.step(event, peers.as_ref());
            // Take whatever else is ready before sleeping: one wake-up, many inputs.
            for _ in 0..BATCH_MAX {
                if self.pending_frames >= HAND_OVER_FRAMES {
                    self.hand_over(peers.as_ref());
                }
                // Peers' messages too: a shard fanning out another shard's broadcasts hands
                // its sockets a wake-up's worth at once, as it does its own.
                let Some(event) = events
                    .try_recv()
                    .ok()
                    .or_else(|| frames.try_recv().ok().map(Event::Socket))
                    .or_else(|| {
                        let link = peers.as_mut()?;
                        link.incoming
                            .try_recv()
                            .ok()
                            .map(peer_input)
                            .map(Event::Input)
                    })
                else {
                    break;
                };
                self.step(event, peers.as_ref());
            }
            self.hand_over(peers.as_ref());
            if self.draining {
                // The engine closed every connection; any socket left gets the same grace.
                for (_, socket) in std::mem::take(&mut self.sockets) {
                    self.release(socket, None);
                }
                return;
            }
            let now = self.runtime.now();
            let deadline = self
                .engine
                .poll_timeout()
                .map_or_else(|| far_future(now), |t| self.options.clock.at(t, now));
            sleep.reset(deadline);
        }
    }

    fn step(&mut self, event: Event, peers: Option<&PeerLink>) {
        // When what may carry broadcasts arrived: a client's frame or a REST request.
        let (input, arrived) = match event {
            Event::Connect {
                conn,
                params,
                reply,
            } => {
                self.upgrades.insert(conn, reply);
                (Input::Connect { conn, params }, None)
            }
            Event::Rest { request, reply } => {
                self.next_req += 1;
                let req = ReqId(self.next_req);
                self.requests.insert(req, reply);
                (Input::Rest { req, request }, Some(self.runtime.now()))
            }
            Event::Socket(Read { input, at }) => (input, at),
            Event::Input(input) => (input, None),
        };
        if let Input::Closed { conn } = &input {
            // Let the writer send its reply to the client's close frame.
            if let Some(socket) = self.sockets.remove(conn) {
                self.release(socket, None);
            }
        }
        if matches!(input, Input::Shutdown) {
            self.draining = true;
        }
        let routed_before = self.engine.stats().broadcasts;
        self.handle(input, peers);
        if let Some(at) = arrived {
            let routed = self.engine.stats().broadcasts - routed_before;
            self.arrivals.extend((0..routed).map(|_| at));
        }
        while let Some(conn) = self.gone.pop() {
            self.handle(Input::Closed { conn }, peers);
        }
    }

    /// Hands every socket's pending frames to its outbox: one append and one wake per socket
    /// however many broadcasts the wake-up held. Sockets now over their limit are reported
    /// to the engine, whose closes go out in turn.
    fn hand_over(&mut self, peers: Option<&PeerLink>) {
        self.append_pending();
        self.observe_arrivals();
        while !self.lagging.is_empty() {
            for conn in std::mem::take(&mut self.lagging) {
                warn!(conn = conn.0, "slow consumer: send queue full, closing");
                self.options.shared.metrics.slow_consumers.inc();
                self.handle(Input::Lagging { conn }, peers);
            }
            self.append_pending();
        }
    }

    /// Appends what is pending for each socket to its outbox, noting the sockets it takes
    /// over their limit in `lagging`.
    fn append_pending(&mut self) {
        self.pending_frames = 0;
        if self.dirty.is_empty() {
            // Whoever the frames were for was let go since.
            self.table.clear();
            return;
        }
        let table: Arc<[Message]> = std::mem::take(&mut self.table).into();
        let table_bytes: usize = table.iter().map(Message::len).sum();
        for conn in std::mem::take(&mut self.dirty) {
            let Some(socket) = self.sockets.get_mut(&conn) else {
                continue;
            };
            // Picks are distinct and ascending: as many as the table means all of it.
            let (batch, bytes) = if socket.pending.len() == table.len() {
                if socket.pending.capacity() > 64 {
                    socket.pending = Vec::new();
                } else {
                    socket.pending.clear();
                }
                let batch = match &*table {
                    [one] => Batch::One(one.clone()),
                    _ => Batch::Shared {
                        frames: table.clone(),
                        picks: Picks::All,
                    },
                };
                (batch, table_bytes)
            } else {
                let picks = std::mem::take(&mut socket.pending);
                let bytes = picks.iter().map(|&p| table[p as usize].len()).sum();
                let batch = Batch::Shared {
                    frames: table.clone(),
                    picks: Picks::Some(picks),
                };
                (batch, bytes)
            };
            #[cfg(feature = "planted-bugs")]
            if self.options.config.planted_bug
                == Some(switchboard_engine::PlantedBug::DropFramesOfSlowConsumers)
            {
                socket.outbox.append_within(batch, self.options.send_queue);
                continue;
            }
            let waiting = socket.outbox.append(batch, bytes);
            // A frame larger than the byte limit still goes out on its own.
            let over = waiting.frames > self.options.send_queue
                || (waiting.bytes > self.options.send_queue_bytes && waiting.frames > 1);
            if over && !socket.lagging {
                socket.lagging = true;
                self.lagging.push(conn);
            }
        }
    }

    /// The broadcasts routed since the last hand-over have their copies on the outboxes:
    /// one clock read for all of them.
    fn observe_arrivals(&mut self) {
        if self.arrivals.is_empty() {
            return;
        }
        let now = self.runtime.now();
        let handover = &self.options.shared.metrics.broadcast_handover_seconds;
        for at in self.arrivals.drain(..) {
            handover.observe(now.saturating_duration_since(at).as_secs_f64());
        }
    }

    /// Lets a socket go after what is pending for it and `close`: its connection task gets
    /// the drain timeout to write them.
    fn release(&self, socket: Socket, close: Option<CloseFrame>) {
        let mut own: Vec<Message> = socket
            .pending
            .iter()
            .map(|&pick| self.table[pick as usize].clone())
            .collect();
        own.extend(close.map(|frame| Message::Close(Some(frame))));
        let own = Batch::Own(own);
        let bytes = own.bytes();
        socket.outbox.append(own, bytes);
        socket.outbox.finish();
        let _ = socket
            .deadline
            .send(self.runtime.now() + self.options.drain_timeout);
    }

    fn handle(&mut self, input: Input, peers: Option<&PeerLink>) {
        if let Input::Replication(live) = &input {
            // For /readyz; every shard hears the same news.
            let live = i64::from(*live);
            self.options.shared.metrics.replication_live.set(live);
        }
        let started = StdInstant::now();
        self.engine
            .handle(self.options.clock.now(self.runtime.now()), input);
        while let Some(output) = self.engine.poll_output() {
            self.execute(output, peers);
        }
        let elapsed = started.elapsed().as_secs_f64();
        self.options.shared.metrics.handle_seconds.observe(elapsed);
        self.busy.inc_by(elapsed);
        let stats = self.engine.stats().clone();
        self.options.shared.metrics.update(&self.last_stats, &stats);
        self.last_stats = stats;
    }

    fn execute(&mut self, output: Output, peers: Option<&PeerLink>) {
        match output {
            Output::Send { to, msg } => {
                let pick = u32::try_from(self.table.len())
                    .expect("a hand-over holds far fewer than 2^32 frames");
                let mut sent = false;
                for conn in to.iter() {
                    let Some(socket) = self.sockets.get_mut(&conn) else {
                        continue;
                    };
                    if socket.pending.is_empty() {
                        self.dirty.push(conn);
                    }
                    socket.pending.push(pick);
                    self.pending_frames += 1;
                    sent = true;
                }
                if sent {
                    self.table.push(to_message(msg));
                }
            }
            Output::Close { conn, code, reason } => {
                let Some(socket) = self.sockets.remove(&conn) else {
                    return;
                };
                let frame = CloseFrame {
                    code: CloseCode::from(code),
                    reason: Utf8Bytes::from_static(reason),
                };
                // Behind what the socket already has, so a close never overtakes a send, and
                // past any limit: a slow consumer that still reads gets every frame, then
                // learns why it was dropped. One that does not loses the socket at the grace.
                self.release(socket, Some(frame));
            }
            Output::Accept { conn } => {
                let outbox = Outbox::new();
                let (deadline, deadline_end) = oneshot::channel();
                let end = SocketEnd {
                    outbox: outbox.clone(),
                    deadline: deadline_end,
                    shared: self.options.shared.clone(),
                    message_bytes_max: self.options.config.message_bytes_max(),
                };
                let delivered = self
                    .upgrades
                    .remove(&conn)
                    .is_some_and(|reply| reply.send(Ok(end)).is_ok());
                if delivered {
                    let socket = Socket {
                        outbox,
                        pending: Vec::new(),
                        lagging: false,
                        deadline,
                    };
                    self.sockets.insert(conn, socket);
                } else {
                    // The client went away while the engine decided.
                    self.gone.push(conn);
                }
            }
            Output::Reject { conn, status, body } => {
                debug!(conn = conn.0, status, "upgrade refused");
                if let Some(reply) = self.upgrades.remove(&conn) {
                    let _ = reply.send(Err((status, body)));
                }
            }
            Output::Reply { req, status, body } => {
                if let Some(reply) = self.requests.remove(&req) {
                    let _ = reply.send((status, body));
                }
            }
            Output::ToPeers(msg) => {
                if let Some(peers) = peers {
                    (peers.outgoing)(PeerOut { to: None, msg });
                }
            }
            Output::ToPeer { to, msg } => {
                if let Some(peers) = peers {
                    (peers.outgoing)(PeerOut { to: Some(to), msg });
                }
            }
            Output::Interest { room, members } => {
                if let Some(interest) = peers.and_then(|p| p.interest.as_ref()) {
                    interest(room, members);
                }
            }
            Output::RefreshJwks => {
                if let Some(keys) = &self.options.jwks_refresh {
                    let _ = keys.send(());
                }
            }
            output @ (Output::Visibility(_)
            | Output::Authorize(_)
            | Output::RefreshPublication
            | Output::WalProgress { .. }) => {
                if let Some(database) = &self.options.database {
                    let _ = database.send(output);
                }
            }
        }
    }
}

/// A deadline that never comes: a year after `now`.
fn far_future(now: std::time::Instant) -> std::time::Instant {
    now + std::time::Duration::from_secs(86_400 * 365)
}

fn peer_input(event: PeerEvent) -> Input {
    match event {
        PeerEvent::Up(node) => Input::PeerUp(node),
        PeerEvent::Down(nodes) => Input::PeerDown(nodes),
        PeerEvent::Message(from, msg) => Input::Peer { from, msg },
        PeerEvent::Ready(room) => Input::InterestReady(room),
    }
}

async fn recv_peer(peers: &mut Option<PeerLink>) -> Option<PeerEvent> {
    match peers {
        Some(link) => link.incoming.recv().await,
        None => std::future::pending().await,
    }
}

/// Converts once per output; every recipient gets a refcounted clone.
fn to_message(msg: WsMessage) -> Message {
    match msg {
        // The engine encodes only UTF-8 JSON text: this check cannot fail.
        WsMessage::Text(bytes) => {
            Message::Text(Utf8Bytes::try_from(bytes).expect("engine text frames are UTF-8"))
        }
        WsMessage::Binary(bytes) => Message::Binary(bytes),
    }
}
