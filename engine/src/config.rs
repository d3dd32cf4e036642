//! Engine configuration. Every limit is a field, defaulting to self-hosted Supabase
//! Realtime's value so an unconfigured switchboard behaves like upstream.

/// Room for a message's envelope around its payload: topic, event, refs, JSON framing and
/// a token refresh's JWT fit many times over.
const ENVELOPE_BYTES_MAX: usize = 64 * 1024;

/// What the engine enforces. Built and checked once by the binary; the engine trusts it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// HMAC secret for HS256/HS384/HS512 JWTs (the project's JWT secret).
    pub jwt_secret: String,
    /// Keys for asymmetric tokens (RS, ES, EdDSA) and more HS secrets, chosen by `kid`
    /// (upstream's `API_JWT_JWKS`).
    pub jwt_jwks: Option<crate::auth::Jwks>,
    /// A socket that sends nothing for this long is closed (Phoenix transport timeout).
    pub heartbeat_timeout_ms: u64,
    /// A socket without any channel for this long is closed (`NO_CHANNEL_TIMEOUT_IN_MS`).
    pub no_channel_timeout_ms: u64,
    /// Delay before a join error reply, slowing rejoin storms (`CHANNEL_ERROR_BACKOFF_MS`).
    pub join_error_backoff_ms: u64,
    /// Delay before a refused upgrade is answered (`CONNECT_ERROR_BACKOFF_MS`).
    pub connect_error_backoff_ms: u64,
    /// Sockets with at least one channel (`TENANT_MAX_CONCURRENT_USERS`).
    pub concurrent_users_max: usize,
    /// Channels one socket may hold (`TENANT_MAX_CHANNELS_PER_CLIENT`).
    pub channels_per_client_max: usize,
    /// Sustained joins per second for the project (`TENANT_MAX_JOINS_PER_SECOND`).
    pub joins_per_sec_max: u32,
    /// Sustained events per second for the project: pushes and deliveries
    /// (`TENANT_MAX_EVENTS_PER_SECOND`).
    pub events_per_sec_max: u32,
    /// Sustained presence events per second for the project.
    pub presence_events_per_sec_max: u32,
    /// Presence pushes one channel may make per window (`CLIENT_PRESENCE_MAX_CALLS`).
    pub client_presence_calls_max: u32,
    /// The window for `client_presence_calls_max` (`CLIENT_PRESENCE_WINDOW_MS`).
    pub client_presence_window_ms: u64,
    /// Largest payload in kilobytes; the byte limit is `kb * 1000 + 500` as upstream.
    pub payload_kb_max: u64,
    /// Largest REST request body, in bytes: larger ones are answered 413 unread.
    pub rest_body_bytes_max: usize,
    /// Bytes that unfinished WebSocket messages of all sockets together may hold: a client
    /// that would go past it mid-message is closed (1013) rather than the server growing
    /// without bound. Each socket alone is held to [`Config::message_bytes_max`].
    pub unfinished_bytes_max: usize,
    /// Largest `presence_state` of one room, in bytes: a track that would grow the room's
    /// state past it is refused, since every joiner receives the whole state in one frame.
    pub presence_state_bytes_max: usize,
    /// Longest topic (`realtime:<sub>`) a channel may join, in bytes. Binary frames carry
    /// the topic behind a one-byte length, so realtime-js cannot send to a longer one.
    pub topic_bytes_max: usize,
    /// Rate limits average over this window: a token bucket holds `rate * window` tokens,
    /// so bursty but compliant clients are not cut off.
    pub rate_window_secs: u64,
    /// How often presence heartbeats go to peer replicas (Phoenix.Tracker's broadcast
    /// period).
    pub presence_broadcast_ms: u64,
    /// Every join gets `presence_state`, whatever its config says.
    pub presence_enabled: bool,
    /// Public channels are refused.
    pub private_only: bool,
    /// A database is configured: postgres_changes bindings can be served, and private
    /// channels are authorised by its policies (without one, only `service_role` may use
    /// them).
    pub database: bool,
    /// A `replication_ready` join that sees no change stream for this long is shut down.
    pub replication_ready_timeout_ms: u64,
    /// A cluster link subscribes to rooms by interest ([`crate::Output::Interest`]): the
    /// join of a room's first member here is answered only once the runtime reports the
    /// subscription in place ([`crate::Input::InterestReady`]), so no broadcast sent from
    /// another node after the reply can miss it.
    pub cluster: bool,
    /// The secret was generated for this run (`serve` without `--jwt-secret`): the
    /// Inspector page may mint tokens for a browser on this machine
    /// ([`crate::http::Response::inspector_token`]).
    pub development: bool,
    /// A deliberate bug for the simulator to find; see [`PlantedBug`].
    #[cfg(feature = "planted-bugs")]
    pub planted_bug: Option<PlantedBug>,
}

/// Deliberate bugs that prove the simulation's oracle has teeth. Compiled only with the
/// `planted-bugs` feature and inactive unless configured.
#[cfg(feature = "planted-bugs")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlantedBug {
    /// Every n-th broadcast reaches nobody on this replica.
    DropBroadcastOneIn(u64),
    /// Senders receive their own broadcasts even without `self`.
    DeliverToSelf,
    /// A closed connection's presence metas are never removed.
    KeepPresenceOnClose,
    /// Rows RLS hides are delivered anyway.
    IgnoreRlsVerdicts,
    /// A visibility question the database failed to answer counts as "not visible", so the
    /// rows it asked about are withheld from subscribers their policies allow.
    HideRowsOfFailedChecks,
    /// A slow consumer is kept, and frames past its limit are silently lost (planted in the
    /// runtime, which enforces the limit).
    DropFramesOfSlowConsumers,
    /// Silent sockets are never timed out, so a vanished client's presence stays.
    IgnoreHeartbeatTimeout,
    /// Private joins are admitted whatever the read policy says.
    IgnoreReadPolicy,
    /// Private channels broadcast whatever the write policy says.
    IgnoreWritePolicy,
    /// The replication slot is confirmed up to the most advanced shard's progress instead
    /// of the least (planted in [`crate::changes::Progress`]).
    ConfirmMaxProgress,
}

impl Config {
    /// The payload byte limit derived from `payload_kb_max`.
    pub fn payload_bytes_max(&self) -> usize {
        (self.payload_kb_max * 1000 + 500) as usize
    }

    /// The largest WebSocket message (and frame) a client may send: a payload at its limit
    /// inside its envelope. A socket buffers at most this much of an unfinished message.
    pub fn message_bytes_max(&self) -> usize {
        self.payload_bytes_max() + ENVELOPE_BYTES_MAX
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            jwt_secret: String::new(),
            jwt_jwks: None,
            heartbeat_timeout_ms: 60_000,
            no_channel_timeout_ms: 600_000,
            join_error_backoff_ms: 5_000,
            connect_error_backoff_ms: 2_000,
            concurrent_users_max: 200,
            channels_per_client_max: 100,
            joins_per_sec_max: 100,
            events_per_sec_max: 100,
            presence_events_per_sec_max: 1_000,
            client_presence_calls_max: 5,
            client_presence_window_ms: 30_000,
            payload_kb_max: 3_000,
            topic_bytes_max: 255,
            unfinished_bytes_max: 128 << 20,
            rest_body_bytes_max: 5_000_000,
            presence_state_bytes_max: 4_000_000,
            rate_window_secs: 60,
            presence_broadcast_ms: 1_500,
            presence_enabled: false,
            private_only: false,
            database: false,
            replication_ready_timeout_ms: 60_000,
            cluster: false,
            development: false,
            #[cfg(feature = "planted-bugs")]
            planted_bug: None,
        }
    }
}
