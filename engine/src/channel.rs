//! Channels: join, leave, token refresh and expiry, and server-side shutdown
//! (PROTOCOL.md §2).

use std::sync::Arc;

use serde_json::{Map, Value};

use crate::auth::{Claims, TokenError};
use crate::authz::{parse_replay, replay_refusal, Hears, PendingJoin, Permissions, Replay};
use crate::connection::ReplyTo;
use crate::limits::FixedWindow;
use crate::protocol::{self, json_str, Inbound, InboundPayload, Vsn};
use crate::room::{Room, RoomKey};
use crate::timers::Timer;
use crate::{ConnId, Engine, Output, WsMessage};

/// Why a join was refused, for metrics: a small closed set, each with a stable label. The
/// client sees upstream's text; operators see which of these it was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JoinRefusal {
    /// No `realtime:` prefix, an empty name, or a name over the limit.
    TopicInvalid,
    /// The server is draining.
    Restarting,
    /// A public channel on a project that allows only private ones.
    PrivateOnly,
    /// Replay asked where it cannot be: on a public channel, with invalid parameters, or
    /// without a database.
    ReplayRefused,
    /// The project's concurrent users are at their limit.
    TooManyUsers,
    /// The project's joins per second are at their limit; the socket is closed too.
    JoinRateLimit,
    /// The connection has as many channels as it may.
    TooManyChannels,
    /// The channel's token is malformed, expired, or not signed by a known key.
    InvalidToken,
    /// A private channel the token may not read: denied by the topic's policies, or no
    /// database to ask and not `service_role`.
    Unauthorized,
    /// The database did not answer a private channel's authorization or replay question.
    DatabaseUnavailable,
}

impl JoinRefusal {
    /// Every reason, in declaration order: `ALL[i] as usize == i`.
    pub const ALL: [JoinRefusal; 10] = [
        JoinRefusal::TopicInvalid,
        JoinRefusal::Restarting,
        JoinRefusal::PrivateOnly,
        JoinRefusal::ReplayRefused,
        JoinRefusal::TooManyUsers,
        JoinRefusal::JoinRateLimit,
        JoinRefusal::TooManyChannels,
        JoinRefusal::InvalidToken,
        JoinRefusal::Unauthorized,
        JoinRefusal::DatabaseUnavailable,
    ];

    /// The metric label: snake_case, stable across releases.
    pub fn label(self) -> &'static str {
        match self {
            JoinRefusal::TopicInvalid => "topic_invalid",
            JoinRefusal::Restarting => "restarting",
            JoinRefusal::PrivateOnly => "private_only",
            JoinRefusal::ReplayRefused => "replay_refused",
            JoinRefusal::TooManyUsers => "too_many_users",
            JoinRefusal::JoinRateLimit => "join_rate_limit",
            JoinRefusal::TooManyChannels => "too_many_channels",
            JoinRefusal::InvalidToken => "invalid_token",
            JoinRefusal::Unauthorized => "unauthorized",
            JoinRefusal::DatabaseUnavailable => "database_unavailable",
        }
    }
}

/// One joined channel instance on a connection.
#[derive(Debug)]
pub(crate) struct Channel {
    /// `realtime:<sub>`, as joined.
    pub(crate) topic: Arc<str>,
    pub(crate) room: RoomKey,
    /// Unique per join, so timers and presence can tell a channel from its rejoined twin.
    pub(crate) instance: u64,
    /// The `ref` of the `phx_join`; clients drop channel messages with another join_ref.
    pub(crate) join_ref: Option<Box<str>>,
    /// `broadcast.self`: receive own broadcasts.
    pub(crate) self_broadcast: bool,
    /// `broadcast.ack`: reply to each broadcast push.
    pub(crate) ack: bool,
    /// Whether the join asked for presence (`presence_state`, then diffs), or the channel
    /// tracked since.
    pub(crate) presence_enabled: bool,
    /// The presence key: the configured one or a generated UUID.
    pub(crate) presence_key: Arc<str>,
    /// The channel's own token, when it is not the connection token.
    pub(crate) token: Option<Arc<str>>,
    pub(crate) claims: Arc<Claims>,
    /// Postgres changes bindings, echoed with ids.
    pub(crate) bindings: Vec<Binding>,
    /// Upstream's per-channel client presence limiter.
    pub(crate) presence_calls: FixedWindow,
    /// What a private channel's token may do, as far as evaluated; `None` on public ones.
    pub(crate) permissions: Option<Permissions>,
    /// Broadcasts and tracks waiting for a write check, in arrival order.
    pub(crate) held: Option<Vec<WsMessage>>,
    /// `replication_ready` asked, and the change stream was not live yet.
    pub(crate) awaiting_replication: bool,
}

/// A postgres_changes binding as the client sent it, with its id.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Binding {
    pub(crate) id: u32,
    pub(crate) params: Map<String, Value>,
}

/// The join payload, read leniently: an invalid field falls back to its default and never
/// fails the join (upstream logs `InvalidJoinPayload` and carries on).
#[derive(Debug, Default, PartialEq)]
pub(crate) struct JoinConfig {
    pub(crate) self_broadcast: bool,
    pub(crate) ack: bool,
    pub(crate) presence_enabled: bool,
    pub(crate) presence_key: Option<String>,
    pub(crate) private: bool,
    pub(crate) bindings: Vec<Map<String, Value>>,
    pub(crate) token: Option<String>,
    /// `broadcast.replay`, when present as an object: its params, or `Err` if invalid.
    pub(crate) replay: Option<Result<Replay, ()>>,
    /// `broadcast.replication_ready`: tell the channel once the change stream is live.
    pub(crate) replication_ready: bool,
}

impl JoinConfig {
    pub(crate) fn parse(payload: &Value) -> JoinConfig {
        let config = payload.get("config");
        let at = |path: &[&str]| path.iter().try_fold(config?, |value, key| value.get(key));
        let flag = |path: &[&str]| at(path).and_then(flexible_bool).unwrap_or(false);
        let token = ["user_token", "access_token"]
            .iter()
            .find_map(|key| payload.get(key).and_then(Value::as_str))
            .map(str::to_owned);
        JoinConfig {
            self_broadcast: flag(&["broadcast", "self"]),
            ack: flag(&["broadcast", "ack"]),
            presence_enabled: flag(&["presence", "enabled"]),
            presence_key: at(&["presence", "key"])
                .and_then(Value::as_str)
                .filter(|key| !key.is_empty())
                .map(str::to_owned),
            private: flag(&["private"]),
            bindings: at(&["postgres_changes"])
                .and_then(Value::as_array)
                .map(|list| list.iter().filter_map(|b| b.as_object().cloned()).collect())
                .unwrap_or_default(),
            token,
            replay: parse_replay(at(&["broadcast", "replay"])),
            replication_ready: flag(&["broadcast", "replication_ready"]),
        }
    }
}

/// `true`/`false` or the strings `"true"`/`"false"` in any case.
fn flexible_bool(value: &Value) -> Option<bool> {
    match value {
        Value::Bool(b) => Some(*b),
        Value::String(s) if s.eq_ignore_ascii_case("true") => Some(true),
        Value::String(s) if s.eq_ignore_ascii_case("false") => Some(false),
        _ => None,
    }
}

/// A stable id for a binding: identical bindings get identical ids, in 0..2³¹.
pub(crate) fn binding_id(params: &Map<String, Value>) -> u32 {
    // serde_json's Map is ordered by key, so equal bindings serialise identically.
    let text = serde_json::to_string(params).expect("a JSON map serialises");
    let mut hash: u32 = 0x811c_9dc5;
    for byte in text.bytes() {
        hash = (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193);
    }
    hash & 0x7fff_ffff
}

/// `{"extension":…,"status":…,"message":…,"channel":…}`.
pub(crate) fn system_payload(extension: &str, status: &str, message: &str, sub: &str) -> String {
    format!(
        r#"{{"extension":"{extension}","status":"{status}","message":{},"channel":{}}}"#,
        json_str(message),
        json_str(sub)
    )
}

/// A join whose reply waits for its room's cluster subscription ([`crate::Config::cluster`]),
/// with what follows the reply. Joins with a replay never wait: what the database sends
/// while they would must follow their replay.
#[derive(Debug)]
pub(crate) struct Welcome {
    conn: ConnId,
    instance: u64,
    vsn: Vsn,
    join_ref: Option<Box<str>>,
    ref_: Option<Box<str>>,
    topic: Arc<str>,
    room: RoomKey,
    response: String,
    /// What the member hears once answered.
    hears: Hears,
    presence_state: bool,
    replication_ready: bool,
    awaiting_replication: bool,
    has_bindings: bool,
}

impl Engine {
    pub(crate) fn join(&mut self, conn: ConnId, vsn: Vsn, inbound: &Inbound<'_>) {
        let reply_to = ReplyTo::of(inbound);
        let Some(sub) = inbound.topic.strip_prefix("realtime:") else {
            self.stats.joins_refused[JoinRefusal::TopicInvalid as usize] += 1;
            self.reply(
                conn,
                vsn,
                &ReplyTo {
                    join_ref: None,
                    ..reply_to
                },
                "error",
                r#"{"reason":"unmatched topic"}"#,
            );
            return;
        };
        // Phoenix closes a duplicate join's old instance before handling the new join.
        if let Some(index) = self.conns[&conn].channel_index(&inbound.topic) {
            let old = &self.conns[&conn].channels[index];
            let join_ref = old.join_ref.clone();
            self.send_one(conn, phx_close(vsn, join_ref.as_deref(), &inbound.topic));
            self.remove_channel(conn, index);
        }
        let payload: Value = match &inbound.payload {
            InboundPayload::Json(raw) => serde_json::from_str(raw.get()).unwrap_or(Value::Null),
            _ => Value::Null,
        };
        let config = JoinConfig::parse(&payload);
        let now = self.now.mono;
        let c = &self.conns[&conn];
        let refusal = if sub.is_empty() {
            Some((
                JoinRefusal::TopicInvalid,
                "TopicNameRequired: You must provide a topic name".to_owned(),
            ))
        } else if inbound.topic.len() > self.config.topic_bytes_max {
            Some((
                JoinRefusal::TopicInvalid,
                format!(
                    "TopicNameTooLong: The topic must be at most {} bytes",
                    self.config.topic_bytes_max
                ),
            ))
        } else if self.shutting_down {
            Some((
                JoinRefusal::Restarting,
                "RealtimeRestarting: Realtime is restarting, please standby".to_owned(),
            ))
        } else if self.config.private_only && !config.private {
            Some((
                JoinRefusal::PrivateOnly,
                "PrivateOnly: This project only allows private channels".to_owned(),
            ))
        } else if let Some(reason) =
            replay_refusal(config.private, config.replay, self.config.database)
        {
            Some((JoinRefusal::ReplayRefused, reason))
        } else if c.channels.is_empty() && self.limits.users() >= self.config.concurrent_users_max {
            Some((
                JoinRefusal::TooManyUsers,
                "ConnectionRateLimitReached: Too many connected users".to_owned(),
            ))
        } else if !self.limits.joins.take(now, 1) {
            Some((
                JoinRefusal::JoinRateLimit,
                "ClientJoinRateLimitReached: Too many joins per second".to_owned(),
            ))
        } else if c.channels.len() >= self.config.channels_per_client_max {
            Some((
                JoinRefusal::TooManyChannels,
                "ChannelRateLimitReached: Too many channels".to_owned(),
            ))
        } else {
            None
        };
        if let Some((why, reason)) = refusal {
            self.refuse_join(conn, vsn, &reply_to, why, &reason);
            return;
        }
        // The channel token: the join's own unless it is an opaque `sb_` key.
        let own_token = config.token.as_deref().filter(|t| !t.starts_with("sb_"));
        let connection_claims = c.claims.clone();
        let verified = match own_token {
            None => Ok((None, connection_claims)),
            Some(token) => self
                .verify_token(token)
                .map(|(token, claims)| (Some(token), claims)),
        };
        let (own_token, claims) = match verified {
            Ok(verified) => verified,
            Err(e) => {
                let reason = e.join_reason();
                self.refuse_join(conn, vsn, &reply_to, JoinRefusal::InvalidToken, &reason);
                return;
            }
        };
        if config.private && self.config.database {
            // Authorised by the project's RLS policies on realtime.messages: the join waits
            // for the database's answer.
            self.ask_join(PendingJoin {
                conn,
                vsn,
                join_ref: reply_to.join_ref.map(str::to_owned),
                ref_: reply_to.ref_.map(str::to_owned),
                topic: inbound.topic.to_string(),
                claims,
                own_token,
                config,
                stored: Vec::new(),
            });
            return;
        }
        if config.private && !claims.is_service_role() {
            // Without the project database only service_role may join a private channel.
            let reason =
                "UnableToConnectToProject: Realtime was unable to connect to the project database";
            self.refuse_join(conn, vsn, &reply_to, JoinRefusal::Unauthorized, reason);
            return;
        }
        let permissions = config.private.then_some(Permissions::ALL);
        self.admit(
            conn,
            vsn,
            &reply_to,
            sub,
            config.private,
            claims,
            own_token,
            config,
            permissions,
        );
    }

    /// Makes the channel; `permissions` are what a private channel's token may do (`None`
    /// on public ones). Whether it joined.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn admit(
        &mut self,
        conn: ConnId,
        vsn: Vsn,
        reply_to: &ReplyTo<'_>,
        sub: &str,
        private: bool,
        claims: Arc<Claims>,
        own_token: Option<Arc<str>>,
        config: JoinConfig,
        permissions: Option<Permissions>,
    ) -> bool {
        // Counted and checked in one step: another shard may have taken the last place
        // since the check above.
        let first = self.conns[&conn].channels.is_empty();
        if first && !self.limits.add_user(self.config.concurrent_users_max) {
            let reason = "ConnectionRateLimitReached: Too many connected users";
            self.refuse_join(conn, vsn, reply_to, JoinRefusal::TooManyUsers, reason);
            return false;
        }
        let presence_key = match config.presence_key {
            Some(key) => Arc::from(key),
            None => Arc::from(self.uuid()),
        };
        let bindings: Vec<Binding> = config
            .bindings
            .into_iter()
            .map(|params| Binding {
                id: binding_id(&params),
                params,
            })
            .collect();
        self.next_instance += 1;
        let instance = self.next_instance;
        let room = RoomKey {
            private,
            sub: Arc::from(sub),
        };
        // Members of a room share its key and topic: one copy each, not one per channel.
        let (room, topic) = match self.rooms.get_key_value(&room) {
            Some((key, existing)) => (key.clone(), existing.topic.clone()),
            None => (room, Arc::from(reply_to.topic)),
        };
        let exp = claims.exp;
        let channel = Channel {
            topic: topic.clone(),
            room: room.clone(),
            instance,
            join_ref: reply_to.join_ref.map(Box::from),
            self_broadcast: config.self_broadcast,
            ack: config.ack,
            presence_enabled: config.presence_enabled || self.config.presence_enabled,
            presence_key,
            token: own_token,
            claims,
            bindings,
            presence_calls: FixedWindow::default(),
            permissions,
            held: None,
            awaiting_replication: config.replication_ready && !self.replication_live,
        };
        let response = join_response(&channel.bindings);
        let has_bindings = !channel.bindings.is_empty();
        // A channel that did not enable presence hears none until it tracks (realtime-js:
        // the flag "only affects whether this client receives presence updates").
        let hears = permissions.map_or(
            Hears {
                broadcast: true,
                presence: channel.presence_enabled,
            },
            Permissions::hears,
        );
        let welcome = Welcome {
            conn,
            instance,
            vsn,
            join_ref: reply_to.join_ref.map(Box::from),
            ref_: reply_to.ref_.map(Box::from),
            topic: topic.clone(),
            room: room.clone(),
            response,
            hears,
            presence_state: channel.presence_enabled && hears.presence,
            replication_ready: config.replication_ready,
            awaiting_replication: channel.awaiting_replication,
            has_bindings,
        };
        let c = self
            .conns
            .get_mut(&conn)
            .expect("join runs on a live connection");
        // Most sockets hold one or two channels: grown one at a time, a first push would
        // reserve room for four (about 540 B more per idle socket).
        if c.channels.len() < 4 {
            c.channels.reserve_exact(1);
        }
        c.channels.push(channel);
        c.empty_since = None;
        let mut interested = false;
        let local = self.rooms.entry(room.clone()).or_insert_with(|| {
            interested = true;
            Room::new(topic.clone())
        });
        let unready = self.config.cluster
            && config.replay.is_none()
            && (interested || self.unready.contains_key(&room));
        // A member waiting for its room's subscription hears nothing before its reply.
        let silent = Hears {
            broadcast: false,
            presence: false,
        };
        local.add(conn, vsn, if unready { silent } else { hears });
        if interested {
            self.emit(Output::Interest {
                room: room.clone(),
                members: true,
            });
        }
        self.stats.channels += 1;
        self.arm_expiry(conn, instance, exp);
        if unready {
            self.unready.entry(room).or_default().push(welcome);
            return true;
        }
        self.welcome(welcome)
    }

    /// Answers a join whose channel is made: the reply, then what follows it. Whether the
    /// channel is still there.
    fn welcome(&mut self, w: Welcome) -> bool {
        let reply_to = ReplyTo {
            join_ref: w.join_ref.as_deref(),
            ref_: w.ref_.as_deref(),
            topic: &w.topic,
        };
        let (conn, vsn, instance) = (w.conn, w.vsn, w.instance);
        self.reply(conn, vsn, &reply_to, "ok", &w.response);
        if w.replication_ready && !w.awaiting_replication {
            let msg =
                Engine::replication_ready_message(vsn, reply_to.join_ref, &w.topic, &w.room.sub);
            self.send_one(conn, msg);
        } else if w.awaiting_replication {
            let deadline = self
                .now
                .mono
                .plus_ms(self.config.replication_ready_timeout_ms);
            self.timers
                .set(deadline, Timer::ReplicationReady { conn, instance });
        }
        if w.presence_state {
            self.presence_state(conn, vsn, reply_to.join_ref, &w.topic, &w.room);
        }
        // presence_state may have shut the channel down.
        let joined = self.channel_alive(conn, instance);
        if w.has_bindings && joined {
            self.subscribe_changes(conn, instance);
        }
        joined
    }

    fn channel_alive(&self, conn: ConnId, instance: u64) -> bool {
        self.conns
            .get(&conn)
            .is_some_and(|c| c.channels.iter().any(|ch| ch.instance == instance))
    }

    /// The room's cluster subscription is in place: its waiting joins are answered, and
    /// their members hear the room from now on.
    pub(crate) fn interest_ready(&mut self, room: &RoomKey) {
        let Some(waiting) = self.unready.remove(room) else {
            return;
        };
        for w in waiting {
            if !self.channel_alive(w.conn, w.instance) {
                continue;
            }
            if let Some(local) = self.rooms.get_mut(room) {
                local.hears(w.conn, w.hears);
            }
            self.welcome(w);
        }
    }

    /// The change stream went live or stopped: channels waiting for it are told.
    pub(crate) fn replication(&mut self, live: bool) {
        self.replication_live = live;
        if !live {
            return;
        }
        let mut waiting: Vec<(ConnId, usize)> = Vec::new();
        for (conn, c) in &self.conns {
            for (index, channel) in c.channels.iter().enumerate() {
                if channel.awaiting_replication {
                    waiting.push((*conn, index));
                }
            }
        }
        waiting.sort_unstable();
        for (conn, index) in waiting {
            let c = self.conns.get_mut(&conn).expect("listed above");
            let vsn = c.vsn;
            let channel = &mut c.channels[index];
            channel.awaiting_replication = false;
            let msg = Engine::replication_ready_message(
                vsn,
                channel.join_ref.as_deref(),
                &channel.topic,
                &channel.room.sub,
            );
            self.send_one(conn, msg);
        }
    }

    /// A `replication_ready` channel's wait ran out: it is shut down, as upstream does.
    pub(crate) fn replication_deadline(&mut self, conn: ConnId, instance: u64) {
        let Some(channel) = self
            .conns
            .get(&conn)
            .and_then(|c| c.channels.iter().find(|ch| ch.instance == instance))
        else {
            return;
        };
        if channel.awaiting_replication {
            let topic = channel.topic.clone();
            let message = "Replication connection was not established in time";
            self.shutdown_channel(conn, &topic, message);
        }
    }

    /// Sends a join error with upstream's `reason` text after the configured backoff; the
    /// channel never exists. Too many joins per second closes the socket too.
    pub(crate) fn refuse_join(
        &mut self,
        conn: ConnId,
        vsn: Vsn,
        to: &ReplyTo<'_>,
        why: JoinRefusal,
        reason: &str,
    ) {
        self.stats.errors += 1;
        self.stats.joins_refused[why as usize] += 1;
        let close_socket = why == JoinRefusal::JoinRateLimit;
        let response = format!(r#"{{"reason":{}}}"#, json_str(reason));
        let reply = protocol::encode_reply(vsn, to.join_ref, to.ref_, to.topic, "error", &response);
        let mut outputs = vec![Output::Send {
            to: crate::To::One(conn),
            msg: reply,
        }];
        if close_socket {
            outputs.push(Output::Close {
                conn,
                code: 1001,
                reason: "too many joins per second",
            });
            // Forget the connection now; the reply and close follow after the backoff.
            self.closed(conn);
        }
        self.delay(self.config.join_error_backoff_ms, outputs);
    }

    pub(crate) fn leave(&mut self, conn: ConnId, vsn: Vsn, index: usize, reply_to: &ReplyTo<'_>) {
        self.reply(conn, vsn, reply_to, "ok", "{}");
        let join_ref = self.conns[&conn].channels[index].join_ref.clone();
        self.send_one(conn, phx_close(vsn, join_ref.as_deref(), reply_to.topic));
        self.remove_channel(conn, index);
    }

    /// Removes channel `index` of `conn` from its room and frees its slot.
    pub(crate) fn remove_channel(&mut self, conn: ConnId, index: usize) -> Option<Channel> {
        let now = self.now.mono;
        let c = self.conns.get_mut(&conn)?;
        let channel = c.channels.swap_remove(index);
        if c.channels.is_empty() {
            c.empty_since = Some(now);
            self.limits.remove_user();
            self.timers.set(
                now.plus_ms(self.config.no_channel_timeout_ms),
                Timer::NoChannel(conn),
            );
        }
        if let Some(room) = self.rooms.get_mut(&channel.room) {
            room.remove(conn);
            if room.is_empty() {
                self.rooms.remove(&channel.room);
                self.emit(Output::Interest {
                    room: channel.room.clone(),
                    members: false,
                });
            }
        }
        self.stats.channels -= 1;
        self.presence_forget(channel.instance);
        self.unsubscribe_changes(conn, channel.instance);
        Some(channel)
    }

    /// Ends a channel from the server side: a `system` error, then `phx_close`.
    pub(crate) fn shutdown_channel(&mut self, conn: ConnId, topic: &str, message: &str) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let Some(index) = c.channel_index(topic) else {
            return;
        };
        let vsn = c.vsn;
        let channel = &c.channels[index];
        let join_ref = channel.join_ref.clone();
        let payload = system_payload("system", "error", message, &channel.room.sub);
        self.stats.errors += 1;
        self.send_one(
            conn,
            protocol::encode_text(vsn, join_ref.as_deref(), None, topic, "system", &payload),
        );
        self.send_one(conn, phx_close(vsn, join_ref.as_deref(), topic));
        self.remove_channel(conn, index);
    }

    /// `access_token` push: swap the channel's claims, or shut the channel down.
    pub(crate) fn refresh(&mut self, conn: ConnId, index: usize, inbound: &Inbound<'_>) {
        let InboundPayload::Json(raw) = &inbound.payload else {
            return;
        };
        let Ok(payload) = serde_json::from_str::<Value>(raw.get()) else {
            return;
        };
        let Some(token) = payload.get("access_token").and_then(Value::as_str) else {
            return;
        };
        let c = &self.conns[&conn];
        let channel = &c.channels[index];
        let current = channel.token.as_deref().unwrap_or(&c.token);
        if token.starts_with("sb_") || token == current {
            return;
        }
        let topic = channel.topic.clone();
        match self.verify_token(token) {
            Ok((token, claims)) => {
                let c = self.conns.get_mut(&conn).expect("checked above");
                let channel = &mut c.channels[index];
                let exp = claims.exp;
                channel.claims = claims;
                channel.token = Some(token);
                let instance = channel.instance;
                let private = channel.room.private;
                self.arm_expiry(conn, instance, exp);
                // Re-registered under the new claims: RLS follows the new token.
                self.subscribe_changes(conn, instance);
                if private && self.config.database {
                    self.ask_refresh(conn, index);
                }
            }
            Err(e) => self.shutdown_channel(conn, &topic, &refresh_message(&e)),
        }
    }

    fn arm_expiry(&mut self, conn: ConnId, instance: u64, exp: u64) {
        let until_exp = (exp * 1000).saturating_sub(self.now.unix_ms);
        self.timers.set(
            self.now.mono.plus_ms(until_exp),
            Timer::TokenExpiry { conn, instance },
        );
    }

    pub(crate) fn token_expiry(&mut self, conn: ConnId, instance: u64) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let Some(channel) = c.channels.iter().find(|ch| ch.instance == instance) else {
            return;
        };
        let now_secs = self.now.unix_ms / 1000;
        if channel.claims.exp > now_secs {
            // The monotonic deadline passed before the wall clock reached `exp`: the two
            // are read apart and rounded apart, by a millisecond or so. A timer that fires
            // on time (glommio's does; tokio's rounds up) meets this; wait for the rest.
            let exp = channel.claims.exp;
            self.arm_expiry(conn, instance, exp);
            return;
        }
        let message = TokenError::Expired {
            secs_ago: now_secs - channel.claims.exp,
        }
        .to_string();
        let topic = channel.topic.clone();
        self.shutdown_channel(conn, &topic, &message);
    }

    /// A UUID v4 from the engine's seeded RNG: presence keys.
    pub(crate) fn uuid(&mut self) -> String {
        use rand_core::RngCore;
        let mut b = [0u8; 16];
        self.rng.fill_bytes(&mut b);
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
        format!(
            "{}-{}-{}-{}-{}",
            &hex[0..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..32]
        )
    }
}

/// What a refused `access_token` refresh tells the channel (no `Code:` prefix).
fn refresh_message(e: &TokenError) -> String {
    match e {
        TokenError::Missing => TokenError::Malformed.to_string(),
        other => other.to_string(),
    }
}

/// `{"postgres_changes":[…]}`: each binding exactly as sent, plus its id.
fn join_response(bindings: &[Binding]) -> String {
    let list: Vec<Value> = bindings
        .iter()
        .map(|b| {
            let mut params = b.params.clone();
            params.insert("id".to_owned(), Value::from(b.id));
            Value::Object(params)
        })
        .collect();
    serde_json::json!({ "postgres_changes": list }).to_string()
}

/// `phx_close` for a channel: `ref` is the join_ref, as upstream sends it.
pub(crate) fn phx_close(vsn: Vsn, join_ref: Option<&str>, topic: &str) -> crate::WsMessage {
    protocol::encode_text(vsn, join_ref, join_ref, topic, "phx_close", "{}")
}
