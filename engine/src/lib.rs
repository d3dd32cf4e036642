//! The switchboard engine: every rule of the Supabase Realtime protocol as a pure,
//! deterministic state machine.
//!
//! The engine owns connections, channels, broadcast routing, rate limits and the exact error
//! replies the official clients expect. It performs no IO, reads no clock and spawns no
//! thread: runtimes (tokio, glommio, the turmoil simulator) feed it [`Input`]s stamped with
//! the time they read, and carry out the [`Output`]s it queues. The same engine therefore runs
//! in production and in the simulator, and a run is a pure function of its inputs and seed.
//!
//! # Run loop
//!
//! Drain after every mutation: call [`Engine::handle`], then [`Engine::poll_output`] until it
//! returns `None`, then arm one timer for [`Engine::poll_timeout`] and call
//! `handle(now, Input::Tick)` when it fires.
//!
//! ```no_run
//! use switchboard_engine::{Config, Engine, Input, Instant, NodeId, Now, Output};
//!
//! let mut engine = Engine::new(Config::default(), NodeId(1), 7);
//! let now = Now { mono: Instant(0), unix_ms: 1_700_000_000_000 };
//! engine.handle(now, Input::Tick);
//! while let Some(output) = engine.poll_output() {
//!     match output {
//!         Output::Send { to, msg } => { /* write `msg` to every connection in `to` */ }
//!         _ => { /* accept, reject, close, reply, peers */ }
//!     }
//! }
//! let _wake_at = engine.poll_timeout();
//! ```
//!
//! Bad input never panics the engine: it becomes an error reply, a close of the one offending
//! connection, or is ignored, exactly as the upstream server does. A panic is a bug.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod auth;
pub mod authz;
mod broadcast;
pub mod changes;
mod channel;
mod config;
mod connection;
pub mod http;
pub mod limits;
pub mod peer;
pub mod presence;
pub mod protocol;
pub mod rest;
mod room;
mod timers;

#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use rand_chacha::ChaCha8Rng;
use rand_core::SeedableRng;
use rustc_hash::FxHashMap;

pub use broadcast::{BroadcastBody, Encoding};
pub use channel::JoinRefusal;
pub use config::Config;
#[cfg(feature = "planted-bugs")]
pub use config::PlantedBug;
pub use peer::PeerMsg;
pub use protocol::Vsn;
pub use rest::RestRequest;
pub use room::RoomKey;

use connection::Conn;
pub use limits::SharedLimits;
use room::Room;
use timers::Timers;

/// Monotonic milliseconds since an origin the runtime chose.
///
/// Timers, heartbeats and rate limits run on this clock so that wall-clock steps never
/// fire or starve them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Instant(pub u64);

impl Instant {
    /// The instant `ms` milliseconds later, saturating instead of overflowing.
    pub fn plus_ms(self, ms: u64) -> Instant {
        Instant(self.0.saturating_add(ms))
    }

    /// Milliseconds from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Instant) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

/// Both clocks, read once by the runtime before each [`Engine::handle`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Now {
    /// Monotonic time for every timer and rate limit.
    pub mono: Instant,
    /// Wall-clock milliseconds since the Unix epoch: only for JWT `exp` and timestamps
    /// clients see.
    pub unix_ms: u64,
}

/// A WebSocket connection, numbered by the runtime and never reused, so that a late output
/// can never reach a stranger.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(pub u64);

/// An HTTP request awaiting its [`Output::Reply`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReqId(pub u64);

/// A replica: a shard of this process or another node of the cluster.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct NodeId(pub u64);

/// One WebSocket message. Owned `Bytes`, so one encoding can be shared by many sockets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WsMessage {
    /// A UTF-8 text frame (JSON in every serializer version).
    Text(Bytes),
    /// A binary frame (vsn 2.0.0 user broadcasts).
    Binary(Bytes),
}

impl WsMessage {
    /// The payload bytes, whatever the frame type.
    pub fn bytes(&self) -> &Bytes {
        match self {
            WsMessage::Text(bytes) | WsMessage::Binary(bytes) => bytes,
        }
    }
}

/// What a WebSocket upgrade request carried, for the engine to accept or refuse it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnectParams {
    /// The `vsn` query parameter, absent meaning 1.0.0.
    pub vsn: Option<String>,
    /// The `apikey` query parameter, URL-decoded.
    pub apikey: Option<String>,
    /// The `x-api-key` header, which wins over `apikey` as it does upstream.
    pub x_api_key: Option<String>,
}

/// Something that happened, for the engine to react to. `Clone`, so one input can go to every
/// shard of a process; frames and change batches are shared, not copied.
#[derive(Clone, Debug)]
pub enum Input {
    /// A WebSocket upgrade was requested; the engine answers [`Output::Accept`] or
    /// [`Output::Reject`] for `conn`.
    Connect {
        /// The id the runtime gives the connection if it is accepted.
        conn: ConnId,
        /// What the upgrade request carried.
        params: ConnectParams,
    },
    /// A frame arrived on an accepted connection.
    Frame {
        /// Where it arrived.
        conn: ConnId,
        /// The frame itself.
        msg: WsMessage,
    },
    /// The connection is gone (closed by either side, crashed, or never upgraded).
    Closed {
        /// The connection that ended.
        conn: ConnId,
    },
    /// The runtime's send queue for `conn` is full: the client reads too slowly.
    Lagging {
        /// The slow connection.
        conn: ConnId,
    },
    /// The WebSocket layer refused what `conn` sent; nothing more is read from it.
    FrameError {
        /// The offending connection.
        conn: ConnId,
        /// What was wrong.
        error: FrameError,
    },
    /// An HTTP request for the REST API arrived.
    Rest {
        /// Where the [`Output::Reply`] goes.
        req: ReqId,
        /// What was asked.
        request: RestRequest,
    },
    /// A message from another replica arrived over the peer bus.
    Peer {
        /// The sender.
        from: NodeId,
        /// The message.
        msg: PeerMsg,
    },
    /// A replica became reachable.
    PeerUp(NodeId),
    /// Replicas considered down together (the shards of a node that died): every entry
    /// they held leaves in one `presence_diff` per room.
    PeerDown(Vec<NodeId>),
    /// The cluster subscription asked for by [`Output::Interest`] is in place: the joins
    /// waiting for it are answered ([`Config::cluster`]).
    InterestReady(RoomKey),
    /// The publication's tables, read from the catalogs: at start and whenever the runtime
    /// sees them change. Replaces the previous list.
    Publication(Vec<changes::Table>),
    /// Decoded WAL changes, whole transactions in commit order; every shard of a process
    /// gets the same batch.
    Changes(Arc<changes::ChangeBatch>),
    /// The database's answer to an [`Output::Visibility`] query, one verdict per check.
    Visibility {
        /// The query's id; answers for another shard are ignored.
        id: changes::QueryId,
        /// One verdict per [`changes::RowCheck`], in order; `None` when the database could
        /// not answer (connection lost, timeout, database down). A failure is never a
        /// verdict: the engine asks again after a backoff.
        verdicts: Option<Vec<changes::Verdict>>,
        /// The rule of each table the question named, under its role, as the same
        /// transaction found it; a table left out counts as judged by the database.
        rules: Vec<changes::TableRule>,
    },
    /// The database's answer to an [`Output::Authorize`] question; `None` when it could
    /// not answer (connection lost, timeout, database down).
    Authorized {
        /// The question's id; answers for another shard are ignored.
        id: authz::AuthzId,
        /// The verdicts, and the replayed messages if the question asked for them.
        answer: Option<authz::AuthzAnswer>,
    },
    /// Keys fetched from the JWKS URL: they replace the JWKS tokens are checked with.
    Jwks(Arc<auth::Jwks>),
    /// The change stream started (`true`) or stopped (`false`) streaming from the database:
    /// `replication_ready` joins wait for it.
    Replication(bool),
    /// The server is draining: tell every channel and close every socket.
    Shutdown,
    /// A timer set from [`Engine::poll_timeout`] fired (spurious ticks are harmless).
    Tick,
}

/// What the WebSocket layer refused, each closed with the code RFC 6455 gives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// A text message that is not UTF-8 (1007).
    InvalidUtf8,
    /// A frame or message over the size limit (1009).
    TooLarge,
    /// Unfinished messages of every socket together hold the memory set aside for them:
    /// this one may come back later (1013).
    Busy,
    /// A frame that breaks the WebSocket protocol (1002).
    Protocol,
}

impl FrameError {
    /// The close code and reason sent for it.
    pub fn close(self) -> (u16, &'static str) {
        match self {
            FrameError::InvalidUtf8 => (1007, "invalid UTF-8 in a text message"),
            FrameError::TooLarge => (1009, "message too large"),
            FrameError::Busy => (1013, "too much unfinished data on the server, try again"),
            FrameError::Protocol => (1002, "WebSocket protocol error"),
        }
    }
}

/// Something the runtime must do, in the order given.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Complete the WebSocket upgrade for `conn`.
    Accept {
        /// The connection from [`Input::Connect`].
        conn: ConnId,
    },
    /// Refuse the upgrade with a plain HTTP response.
    Reject {
        /// The connection from [`Input::Connect`].
        conn: ConnId,
        /// HTTP status code.
        status: u16,
        /// Response body (JSON `{"error": …}` except for an unsupported `vsn`).
        body: Bytes,
    },
    /// Write `msg` to every connection in `to`.
    Send {
        /// The recipients.
        to: To,
        /// One encoding, shared by every recipient.
        msg: WsMessage,
    },
    /// Close the connection with a close frame, after anything sent before.
    Close {
        /// The connection to close.
        conn: ConnId,
        /// WebSocket close code.
        code: u16,
        /// Close reason text.
        reason: &'static str,
    },
    /// Answer a REST request.
    Reply {
        /// The request from [`Input::Rest`].
        req: ReqId,
        /// HTTP status code.
        status: u16,
        /// JSON body, empty for 202.
        body: Bytes,
    },
    /// Send a message to every peer replica.
    ToPeers(PeerMsg),
    /// `room` gained its first member on this replica (`members`), or lost its last: a
    /// cluster link subscribes to the room's traffic only while some replica of its node
    /// has members there, so a node receives only the broadcasts it delivers.
    Interest {
        /// The room.
        room: RoomKey,
        /// Whether the replica has members in it now.
        members: bool,
    },
    /// Send a message to one peer replica: snapshots and repairs go only to who needs them,
    /// so a new replica costs one snapshot from each peer, not one from each to each.
    ToPeer {
        /// The addressee.
        to: NodeId,
        /// The message.
        msg: PeerMsg,
    },
    /// Ask the database which rows a claims group may see; answer with
    /// [`Input::Visibility`].
    Visibility(changes::VisibilityQuery),
    /// A token named a key id the JWKS lacks: fetch the JWKS again if it comes from a URL,
    /// and answer with [`Input::Jwks`]. Asked at most once a second by each engine; the
    /// runtime keeps to its own interval.
    RefreshJwks,
    /// Ask the database what a token may do on a private channel's topic; answer with
    /// [`Input::Authorized`].
    Authorize(authz::AuthzQuery),
    /// Read the publication's tables again and answer with [`Input::Publication`], even if
    /// nothing changed: a channel named a table or column the last read lacked.
    RefreshPublication,
    /// Every change up to this WAL position has been handed out by this shard: the runtime
    /// may confirm to Postgres the lowest position every shard reported
    /// ([`changes::Progress`]).
    WalProgress {
        /// The reporting shard.
        shard: ShardId,
        /// The position it handed out.
        lsn: u64,
    },
}

/// Recipients of one [`Output::Send`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum To {
    /// A single connection.
    One(ConnId),
    /// Members of a room with one serializer version; the list is cached by the room, so a
    /// fan-out to thousands allocates nothing per member.
    Members {
        /// Every member with the frame's serializer version.
        list: Arc<[ConnId]>,
        /// The sender when it did not ask for its own broadcasts.
        except: Option<ConnId>,
    },
}

impl To {
    /// Every recipient connection.
    pub fn iter(&self) -> impl Iterator<Item = ConnId> + '_ {
        let (slice, except): (&[ConnId], Option<ConnId>) = match self {
            To::One(conn) => (std::slice::from_ref(conn), None),
            To::Members { list, except } => (list, *except),
        };
        slice
            .iter()
            .copied()
            .filter(move |conn| Some(*conn) != except)
    }
}

/// Counters the runtime exports as metrics. Gauges are current values; the rest only grow.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Open WebSocket connections.
    pub connections: u64,
    /// Joined channels across all connections.
    pub channels: u64,
    /// Frames received from clients.
    pub frames_in: u64,
    /// Bytes received from clients.
    pub bytes_in: u64,
    /// Frames queued to clients, counting each recipient.
    pub messages_out: u64,
    /// Broadcasts accepted for routing (socket, REST and peer origins).
    pub broadcasts: u64,
    /// Error replies, system errors and rejected upgrades sent.
    pub errors: u64,
    /// Frames that could not be decoded and were ignored.
    pub malformed: u64,
    /// Visibility questions the database failed to answer, each asked again.
    pub visibility_retries: u64,
    /// Batches planned again because an answer found another rule than the one their
    /// deliveries relied on ([`changes::Rule`]): a table's policies changed.
    pub visibility_replans: u64,
    /// postgres_changes messages queued to subscribers, counting each recipient.
    pub changes_delivered: u64,
    /// Presence entries (metas) this replica owns: those of its own channels. A gauge.
    pub presence_entries: u64,
    /// This replica's copies of other replicas' presence entries. A gauge.
    pub presence_entries_replicated: u64,
    /// Joins refused, by reason: entry `why as usize` counts [`JoinRefusal`] `why`.
    pub joins_refused: [u64; JoinRefusal::ALL.len()],
}

/// The state machine. One per shard; `Send`, so a runtime may move it between threads.
pub struct Engine {
    config: Config,
    node: NodeId,
    rng: ChaCha8Rng,
    now: Now,
    out: VecDeque<Output>,
    conns: FxHashMap<ConnId, Conn>,
    rooms: FxHashMap<RoomKey, Room>,
    /// Rooms whose cluster subscription is not in place yet, with the joins waiting for it.
    unready: FxHashMap<RoomKey, Vec<channel::Welcome>>,
    timers: Timers,
    peers: BTreeSet<NodeId>,
    /// Concurrent users and rates, shared with the process's other shards.
    limits: Arc<SharedLimits>,
    /// This engine's index among its process's shards: tags its database questions.
    shard: ShardId,
    presence: presence::crdt::Replica,
    /// Presence changes of this step, sent as one `presence_diff` per room at its end.
    pending_diffs: std::collections::BTreeMap<RoomKey, Vec<presence::crdt::Change>>,
    phx_ref_counter: u64,
    changes: changes::State,
    /// Private channel questions out, and what waits on them.
    authz: authz::State,
    /// The change stream is live: `replication_ready` joins are told at once.
    replication_live: bool,
    /// Channel instances are numbered so timers can tell a channel from its rejoined twin.
    next_instance: u64,
    shutting_down: bool,
    /// Broadcasts fanned out, for the planted "drop one in n" bug.
    #[cfg(feature = "planted-bugs")]
    planted_count: u64,
    stats: Stats,
    tokens: auth::Tokens,
    /// When [`Output::RefreshJwks`] was last asked.
    jwks_asked: Option<Instant>,
}

/// Where an engine sits: its replica id, its index among its process's shards, and the
/// project-wide limits it shares with them.
#[derive(Clone, Debug)]
pub struct Replica {
    /// Unique among every replica, shards and nodes alike.
    pub node: NodeId,
    /// Its index in its process.
    pub shard: ShardId,
    /// Shared by every shard of the process ([`SharedLimits::new`]).
    pub limits: Arc<SharedLimits>,
}

/// An engine's index among its process's shards.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Serialize,
    serde::Deserialize,
)]
pub struct ShardId(pub u16);

impl NodeId {
    /// The replica id of shard `shard` of process `process`: unique as long as process ids
    /// are (they fit 48 bits).
    pub fn replica(process: u64, shard: ShardId) -> NodeId {
        NodeId(process << 16 | u64::from(shard.0))
    }

    /// The process of a replica id made by [`NodeId::replica`].
    pub fn process(self) -> u64 {
        self.0 >> 16
    }

    /// The shard of a replica id made by [`NodeId::replica`].
    pub fn shard(self) -> ShardId {
        ShardId(self.0 as u16)
    }
}

impl Engine {
    /// Builds an engine alone in its process. Every random choice (presence keys and refs)
    /// comes from `seed`.
    pub fn new(config: Config, node: NodeId, seed: u64) -> Self {
        let limits = SharedLimits::new(&config);
        let replica = Replica {
            node,
            shard: ShardId(0),
            limits,
        };
        Engine::with_replica(config, replica, seed)
    }

    /// Builds one shard of a process, sharing its limits with the others.
    pub fn with_replica(config: Config, replica: Replica, seed: u64) -> Self {
        let Replica {
            node,
            shard,
            limits,
        } = replica;
        let tokens = auth::Tokens::new(auth::Verifier::with_jwks(
            &config.jwt_secret,
            config.jwt_jwks.as_ref(),
        ));
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let phx_ref_counter = u64::from(rand_core::RngCore::next_u32(&mut rng)) << 8;
        Engine {
            node,
            rng,
            limits,
            shard,
            presence: presence::crdt::Replica::new(node),
            pending_diffs: std::collections::BTreeMap::new(),
            phx_ref_counter,
            changes: changes::State::default(),
            authz: authz::State::default(),
            replication_live: false,
            now: Now::default(),
            out: VecDeque::new(),
            conns: FxHashMap::default(),
            rooms: FxHashMap::default(),
            unready: FxHashMap::default(),
            timers: Timers::default(),
            peers: BTreeSet::new(),
            next_instance: 0,
            shutting_down: false,
            #[cfg(feature = "planted-bugs")]
            planted_count: 0,
            stats: Stats::default(),
            tokens,
            jwks_asked: None,
            config,
        }
    }

    /// Runs due timers, then applies `input`. Never blocks, reads no clock and cannot fail:
    /// bad input becomes an error reply or a close for that one connection.
    pub fn handle(&mut self, now: Now, input: Input) {
        // A clock that goes backwards is ignored rather than trusted (timers never rewind).
        if now.mono >= self.now.mono {
            self.now.mono = now.mono;
        }
        self.now.unix_ms = now.unix_ms;
        self.run_timers();
        match input {
            Input::Connect { conn, params } => self.connect(conn, params),
            Input::Frame { conn, msg } => self.frame(conn, msg),
            Input::Closed { conn } => self.closed(conn),
            Input::Lagging { conn } => self.lagging(conn),
            Input::FrameError { conn, error } => {
                self.stats.malformed += 1;
                let (code, reason) = error.close();
                self.close(conn, code, reason);
            }
            Input::Rest { req, request } => self.rest(req, request),
            Input::Peer { from, msg } => self.peer_message(from, msg),
            Input::PeerUp(node) => self.peer_up(node),
            Input::InterestReady(room) => self.interest_ready(&room),
            Input::PeerDown(nodes) => {
                for node in nodes {
                    self.peer_down(node);
                }
            }
            Input::Publication(tables) => self.publication(tables),
            Input::Changes(batch) => self.changes(batch),
            Input::Visibility {
                id,
                verdicts,
                rules,
            } => self.visibility(id, verdicts, rules),
            Input::Authorized { id, answer } => self.authorized(id, answer),
            Input::Replication(live) => self.replication(live),
            Input::Jwks(jwks) => {
                self.tokens = auth::Tokens::new(auth::Verifier::with_jwks(
                    &self.config.jwt_secret,
                    Some(&jwks),
                ));
                self.config.jwt_jwks = Some((*jwks).clone());
            }
            Input::Shutdown => self.shutdown(),
            Input::Tick => {}
        }
        self.flush_presence();
    }

    /// The next thing to do; drain to `None` after every [`Engine::handle`].
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// The latest time at which the runtime must call `handle(now, Input::Tick)`.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next_deadline()
    }

    /// Counters for metrics.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// This replica's id.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// The configuration the engine runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Whether the configured planted bug is `bug`.
    #[cfg(feature = "planted-bugs")]
    fn planted(&self, bug: PlantedBug) -> bool {
        self.config.planted_bug == Some(bug)
    }

    fn emit(&mut self, output: Output) {
        if let Output::Send { to, .. } = &output {
            self.stats.messages_out += to.iter().count() as u64;
        }
        self.out.push_back(output);
    }

    /// Verifies `token` (cached); a key id the JWKS lacks asks for the JWKS again.
    fn verify_token(
        &mut self,
        token: &str,
    ) -> Result<(Arc<str>, Arc<auth::Claims>), auth::TokenError> {
        let verified = self.tokens.verify(token, self.now.unix_ms);
        if let Err(auth::TokenError::UnknownKid(_)) = &verified {
            let now = self.now.mono;
            if self.jwks_asked.is_none_or(|at| now.since(at) >= 1_000) {
                self.jwks_asked = Some(now);
                self.emit(Output::RefreshJwks);
            }
        }
        verified
    }

    fn send_one(&mut self, conn: ConnId, msg: WsMessage) {
        self.emit(Output::Send {
            to: To::One(conn),
            msg,
        });
    }

    fn shutdown(&mut self) {
        self.shutting_down = true;
        let mut ids: Vec<ConnId> = self.conns.keys().copied().collect();
        ids.sort();
        for conn in ids {
            let Some(vsn) = self.conns.get(&conn).map(|c| c.vsn) else {
                continue;
            };
            let topics: Vec<Arc<str>> = self.conns[&conn]
                .channels
                .iter()
                .map(|c| c.topic.clone())
                .collect();
            for topic in topics {
                let msg = protocol::encode_text(
                    vsn,
                    None,
                    None,
                    &topic,
                    "system",
                    r#"{"extension":"system","status":"ok","message":"Server requested disconnect"}"#,
                );
                self.send_one(conn, msg);
            }
            self.emit(Output::Close {
                conn,
                code: 1012,
                reason: "server shutting down",
            });
            self.closed(conn);
        }
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("node", &self.node)
            .field("connections", &self.conns.len())
            .field("rooms", &self.rooms.len())
            .finish_non_exhaustive()
    }
}
