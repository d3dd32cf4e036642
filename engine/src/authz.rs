//! Private channels (Realtime Authorization): what a token may do on a topic, as the
//! project's RLS policies on `realtime.messages` say.
//!
//! The engine asks ([`crate::Output::Authorize`]) and the runtime's database evaluates the
//! policies exactly as upstream does: read by inserting probe rows as the owner and
//! selecting them back under the token's role and claims, write by inserting under them,
//! every probe rolled back. Until the answer ([`crate::Input::Authorized`]) comes, the
//! engine holds what waits on it: the join, the channel's broadcasts and tracks, or the REST
//! request. Permissions are evaluated at join (read), lazily on the first broadcast or track
//! (write), and again on every token refresh; a refresh that takes read away closes the
//! channel.

use std::sync::Arc;

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::auth::Claims;
use crate::broadcast::BroadcastBody;
use crate::channel::{system_payload, JoinConfig, JoinRefusal};
use crate::connection::ReplyTo;
use crate::protocol::{self, Inbound, InboundPayload, Vsn};
use crate::room::RoomKey;
use crate::{ConnId, Engine, Output, ReqId, ShardId, WsMessage};

/// An authorization question's id: the asking shard, so one pool serves every shard of a
/// process and routes each answer back, and its number there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AuthzId {
    /// The asking shard.
    pub shard: ShardId,
    /// The question's number on that shard.
    pub n: u64,
}

/// Which permissions a question asks the database to evaluate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Asked {
    /// May the claims receive broadcasts on the topic?
    pub broadcast_read: bool,
    /// May they receive presence on the topic?
    pub presence_read: bool,
    /// May they broadcast on the topic?
    pub broadcast_write: bool,
    /// May they track presence on the topic?
    pub presence_write: bool,
}

/// Permissions of a token on a topic; `None` is "not evaluated yet".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Permissions {
    /// Receives broadcasts.
    pub broadcast_read: Option<bool>,
    /// Receives presence.
    pub presence_read: Option<bool>,
    /// May broadcast.
    pub broadcast_write: Option<bool>,
    /// May track presence.
    pub presence_write: Option<bool>,
}

impl Permissions {
    /// Everything allowed: `service_role` without a database, which is not asked.
    pub const ALL: Permissions = Permissions {
        broadcast_read: Some(true),
        presence_read: Some(true),
        broadcast_write: Some(true),
        presence_write: Some(true),
    };

    /// `self` with every permission `answer` evaluated replaced by its verdict.
    fn merged(self, answer: Permissions) -> Permissions {
        Permissions {
            broadcast_read: answer.broadcast_read.or(self.broadcast_read),
            presence_read: answer.presence_read.or(self.presence_read),
            broadcast_write: answer.broadcast_write.or(self.broadcast_write),
            presence_write: answer.presence_write.or(self.presence_write),
        }
    }

    /// Whether either read is granted: what a join needs.
    fn reads(self) -> bool {
        self.broadcast_read == Some(true) || self.presence_read == Some(true)
    }
}

/// `config.broadcast.replay` of a join: the topic's stored messages since `since_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Replay {
    /// Milliseconds since the Unix epoch.
    pub since_ms: i64,
    /// At most this many, the newest of them (1 to 25, as upstream clamps it).
    pub limit: u32,
}

/// A question for the database: what may `role` with `claims` do on `topic`?
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuthzQuery {
    /// Echoed in [`crate::Input::Authorized`].
    pub id: AuthzId,
    /// The channel name without `realtime:`: `realtime.topic()` while the policies run.
    pub topic: Arc<str>,
    /// The Postgres role to `set role` to.
    pub role: String,
    /// Every claim, for `request.jwt.claims`.
    pub claims: Arc<Map<String, Value>>,
    /// What to evaluate.
    pub asked: Asked,
    /// Stored messages to read back once broadcast read is granted.
    pub replay: Option<Replay>,
}

/// A message stored in `realtime.messages`, replayed to a joining channel.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stored {
    /// The row's id, sent as `meta.id`.
    pub id: String,
    /// Its event.
    pub event: Value,
    /// Its payload.
    pub payload: Value,
}

/// The database's answer to an [`AuthzQuery`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuthzAnswer {
    /// A verdict for every permission asked. A policy that fails to evaluate denies.
    pub permissions: Permissions,
    /// With a replay, when broadcast read was granted: the messages, oldest first, or
    /// `None` when reading them failed.
    pub replayed: Option<Vec<Stored>>,
    /// The replay query's snapshot: the stored messages it could see were its to send or
    /// to leave out; those it could not follow the replay.
    pub snapshot: Option<XidSnapshot>,
}

/// What a replay covered for its member: the messages it sent, and every message its
/// snapshot could see (sent or left out by `since` and `limit`). Neither is sent to the
/// member again when the stream delivers it.
#[derive(Debug)]
pub(crate) struct Covered {
    ids: Box<[Box<str>]>,
    snapshot: Option<XidSnapshot>,
}

impl Covered {
    /// Whether stored message `id`, sent by transaction `xid`, was the replay's.
    pub(crate) fn covers(&self, id: Option<&str>, xid: u32) -> bool {
        self.snapshot.as_ref().is_some_and(|s| s.sees(xid))
            || id.is_some_and(|id| self.ids.iter().any(|i| **i == *id))
    }
}

/// A Postgres snapshot (`pg_current_snapshot()`), in the 32-bit transaction ids pgoutput
/// sends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct XidSnapshot {
    /// Every transaction before it had ended.
    pub xmin: u32,
    /// No transaction from it on had ended.
    pub xmax: u32,
    /// Transactions between the two still in progress.
    pub xip: Vec<u32>,
}

impl XidSnapshot {
    /// Parses `xmin:xmax:xip,xip,…` (64-bit ids, kept to their low 32 bits).
    pub fn parse(text: &str) -> Option<XidSnapshot> {
        let mut parts = text.split(':');
        let low = |t: &str| t.trim().parse::<u64>().ok().map(|x| x as u32);
        let xmin = low(parts.next()?)?;
        let xmax = low(parts.next()?)?;
        let xip = match parts.next() {
            None | Some("") => Vec::new(),
            Some(list) => list.split(',').map(low).collect::<Option<_>>()?,
        };
        Some(XidSnapshot { xmin, xmax, xip })
    }

    /// Whether transaction `xid` had committed (or ended) for this snapshot.
    pub fn sees(&self, xid: u32) -> bool {
        // Modulo 2³², as Postgres compares 32-bit ids.
        let precedes = |a: u32, b: u32| (a.wrapping_sub(b) as i32) < 0;
        precedes(xid, self.xmin) || (precedes(xid, self.xmax) && !self.xip.contains(&xid))
    }
}

/// Questions out and what waits on each.
#[derive(Debug, Default)]
pub(crate) struct State {
    next: u64,
    pending: FxHashMap<u64, Pending>,
    rests: FxHashMap<u64, PendingRest>,
    /// Pending joins with a replay: stored messages to their rooms are kept for them.
    replaying: usize,
}

#[derive(Debug)]
enum Pending {
    Join(Box<PendingJoin>),
    /// A refresh's read check; `before` is what the channel could read until then.
    Refresh {
        conn: ConnId,
        instance: u64,
        before: Permissions,
    },
    /// A lazy write check; the channel holds its frames until it returns.
    Write {
        conn: ConnId,
        instance: u64,
    },
    /// A REST request's write check for one private topic.
    Rest {
        rest: u64,
        topic: Arc<str>,
    },
}

/// A join waiting for its read check.
#[derive(Debug)]
pub(crate) struct PendingJoin {
    pub(crate) conn: ConnId,
    pub(crate) vsn: Vsn,
    pub(crate) join_ref: Option<String>,
    pub(crate) ref_: Option<String>,
    pub(crate) topic: String,
    pub(crate) claims: Arc<Claims>,
    pub(crate) own_token: Option<Arc<str>>,
    pub(crate) config: JoinConfig,
    /// With a replay: messages sent from the database to the room while the join waits,
    /// with their ids and transactions. Those the replay's snapshot could not see reach
    /// the member after the replay; the others were the replay's to send or leave out.
    pub(crate) stored: Vec<(Option<String>, u32, BroadcastBody)>,
}

/// A REST request waiting for the write checks of its private topics.
#[derive(Debug)]
struct PendingRest {
    req: ReqId,
    /// Checks still out.
    waiting: usize,
    messages: Vec<(RoomKey, BroadcastBody)>,
    /// Private topics the token may write to.
    allowed: Vec<Arc<str>>,
    /// The single-message endpoint answers 403 when its one topic is denied.
    single: bool,
}

/// Frames of a private channel held while its write check is out, at most this many:
/// more are dropped, as a client sending faster than the database answers would grow the
/// queue without bound.
pub(crate) const HELD_MAX: usize = 256;

impl Engine {
    /// Sends an authorization question; its answer goes to what `pending` describes.
    fn ask(
        &mut self,
        topic: Arc<str>,
        claims: &Claims,
        asked: Asked,
        replay: Option<Replay>,
        pending: Pending,
    ) {
        self.authz.next += 1;
        let n = self.authz.next;
        self.authz.pending.insert(n, pending);
        self.emit(Output::Authorize(AuthzQuery {
            id: AuthzId {
                shard: self.shard,
                n,
            },
            topic,
            role: claims.role.clone(),
            claims: claims.all.clone(),
            asked,
            replay,
        }));
    }

    /// Asks whether a private join may read its topic; [`Engine::admit`] follows the answer.
    pub(crate) fn ask_join(&mut self, join: PendingJoin) {
        let sub = join.topic.strip_prefix("realtime:").unwrap_or(&join.topic);
        let asked = Asked {
            broadcast_read: true,
            presence_read: join.config.presence_enabled || self.config.presence_enabled,
            ..Asked::default()
        };
        let replay = join.config.replay.and_then(Result::ok);
        self.authz.replaying += usize::from(replay.is_some());
        let claims = join.claims.clone();
        self.ask(
            Arc::from(sub),
            &claims,
            asked,
            replay,
            Pending::Join(Box::new(join)),
        );
    }

    /// Asks again what a private channel may read, after its token changed.
    pub(crate) fn ask_refresh(&mut self, conn: ConnId, index: usize) {
        let channel = &self.conns[&conn].channels[index];
        let before = channel.permissions.unwrap_or_default();
        let asked = Asked {
            broadcast_read: true,
            presence_read: channel.presence_enabled,
            ..Asked::default()
        };
        let (topic, claims, instance) = (
            channel.room.sub.clone(),
            channel.claims.clone(),
            channel.instance,
        );
        self.ask(
            topic,
            &claims,
            asked,
            None,
            Pending::Refresh {
                conn,
                instance,
                before,
            },
        );
    }

    /// Whether frame `msg` of private channel `index` must wait for a write check: one
    /// already out, or one it starts because the permission it needs (broadcast write for
    /// a broadcast, presence write for a track) was not evaluated yet. Held frames are
    /// handled again, in order, when the answer comes.
    pub(crate) fn hold_for_write(
        &mut self,
        conn: ConnId,
        index: usize,
        msg: &WsMessage,
        inbound: &Inbound<'_>,
    ) -> bool {
        let database = self.config.database;
        let channel = &mut self
            .conns
            .get_mut(&conn)
            .expect("a live connection")
            .channels[index];
        let Some(permissions) = channel
            .permissions
            .filter(|_| database && channel.room.private)
        else {
            return false;
        };
        let broadcast = match &*inbound.event {
            "broadcast" => true,
            "presence" if is_track(inbound) => false,
            _ => return false,
        };
        if let Some(held) = &mut channel.held {
            if held.len() < HELD_MAX {
                held.push(msg.clone());
            }
            return true;
        }
        let asked = if broadcast {
            Asked {
                broadcast_write: permissions.broadcast_write.is_none(),
                ..Asked::default()
            }
        } else {
            // A track enables presence: what it may read is evaluated now if the join did
            // not, so its diffs are gated as they would have been.
            Asked {
                presence_write: permissions.presence_write.is_none(),
                presence_read: permissions.presence_read.is_none(),
                ..Asked::default()
            }
        };
        if !(asked.broadcast_write || asked.presence_write) {
            return false;
        }
        channel.held = Some(vec![msg.clone()]);
        let (topic, claims, instance) = (
            channel.room.sub.clone(),
            channel.claims.clone(),
            channel.instance,
        );
        self.ask(
            topic,
            &claims,
            asked,
            None,
            Pending::Write { conn, instance },
        );
        true
    }

    /// A REST request with messages to private topics the token must be allowed to write to:
    /// one check per topic, then the allowed messages go out and the request is answered.
    pub(crate) fn ask_rest(
        &mut self,
        req: ReqId,
        claims: &Claims,
        messages: Vec<(RoomKey, BroadcastBody)>,
        single: bool,
    ) {
        let mut topics: Vec<Arc<str>> = messages
            .iter()
            .filter(|(room, _)| room.private)
            .map(|(room, _)| room.sub.clone())
            .collect();
        topics.sort();
        topics.dedup();
        self.authz.next += 1;
        let rest = self.authz.next;
        self.authz.rests.insert(
            rest,
            PendingRest {
                req,
                waiting: topics.len(),
                messages,
                allowed: Vec::new(),
                single,
            },
        );
        let asked = Asked {
            broadcast_write: true,
            ..Asked::default()
        };
        for topic in topics {
            self.ask(
                topic.clone(),
                claims,
                asked,
                None,
                Pending::Rest { rest, topic },
            );
        }
    }

    /// The database answered question `id`; `None` when it could not.
    pub(crate) fn authorized(&mut self, id: AuthzId, answer: Option<AuthzAnswer>) {
        if id.shard != self.shard {
            return;
        }
        let Some(pending) = self.authz.pending.remove(&id.n) else {
            return;
        };
        match pending {
            Pending::Join(join) => {
                self.authz.replaying -= usize::from(join.config.replay.is_some());
                self.join_answered(*join, answer)
            }
            Pending::Refresh {
                conn,
                instance,
                before,
            } => self.refresh_answered(conn, instance, before, answer),
            Pending::Write { conn, instance } => self.write_answered(conn, instance, answer),
            Pending::Rest { rest, topic } => self.rest_answered(rest, topic, answer),
        }
    }

    fn join_answered(&mut self, join: PendingJoin, answer: Option<AuthzAnswer>) {
        if !self.conns.contains_key(&join.conn) {
            return;
        }
        let reply_to = ReplyTo {
            join_ref: join.join_ref.as_deref(),
            ref_: join.ref_.as_deref(),
            topic: &join.topic,
        };
        let sub = join.topic.strip_prefix("realtime:").unwrap_or(&join.topic);
        let Some(answer) = answer else {
            let reason =
                "UnableToConnectToProject: Realtime was unable to connect to the project database";
            let why = JoinRefusal::DatabaseUnavailable;
            self.refuse_join(join.conn, join.vsn, &reply_to, why, reason);
            return;
        };
        #[allow(unused_mut)]
        let mut permissions = answer.permissions;
        #[cfg(feature = "planted-bugs")]
        if self.planted(crate::PlantedBug::IgnoreReadPolicy) {
            permissions.broadcast_read = Some(true);
        }
        if !permissions.reads()
            || (join.config.replay.is_some() && permissions.broadcast_read != Some(true))
        {
            let reason = format!(
                "Unauthorized: You do not have permissions to read from this Channel topic: {sub}"
            );
            let why = JoinRefusal::Unauthorized;
            self.refuse_join(join.conn, join.vsn, &reply_to, why, &reason);
            return;
        }
        let snapshot = answer.snapshot;
        let replaying = join.config.replay.is_some();
        let replayed = match (join.config.replay, answer.replayed) {
            (Some(_), None) => {
                let reason = "UnableToReplayMessages: Realtime was unable to replay messages";
                let why = JoinRefusal::DatabaseUnavailable;
                self.refuse_join(join.conn, join.vsn, &reply_to, why, reason);
                return;
            }
            (_, replayed) => replayed.unwrap_or_default(),
        };
        // A duplicate join that arrived while this one was checked closed nothing: the
        // channel did not exist yet. Phoenix closes the older instance, so do that now.
        if let Some(index) = self.conns[&join.conn].channel_index(&join.topic) {
            let old = &self.conns[&join.conn].channels[index];
            let join_ref = old.join_ref.clone();
            self.send_one(
                join.conn,
                crate::channel::phx_close(join.vsn, join_ref.as_deref(), &join.topic),
            );
            self.remove_channel(join.conn, index);
        }
        let joined = self.admit(
            join.conn,
            join.vsn,
            &reply_to,
            sub,
            true,
            join.claims,
            join.own_token,
            join.config,
            Some(permissions),
        );
        if !joined {
            return;
        }
        if !replaying {
            return;
        }
        let covered = Covered {
            ids: replayed.iter().map(|m| Box::from(m.id.as_str())).collect(),
            snapshot,
        };
        for message in replayed {
            let object = serde_json::json!({
                "type": "broadcast",
                "event": message.event,
                "payload": message.payload,
                "meta": {"replayed": true, "id": message.id},
            });
            let msg = protocol::encode_text(
                join.vsn,
                None,
                None,
                &join.topic,
                "broadcast",
                &object.to_string(),
            );
            self.send_one(join.conn, msg);
        }
        // Then what the database sent while the join waited, less what the replay covered.
        for (id, xid, body) in join.stored {
            if covered.covers(id.as_deref(), xid) {
                continue;
            }
            if let Some(msg) = body.encode(join.vsn, &join.topic) {
                self.send_one(join.conn, msg);
            }
        }
        // And from now on, live: the room skips what the replay covered for this member.
        let key = RoomKey {
            private: true,
            sub: Arc::from(sub),
        };
        if let Some(room) = self.rooms.get_mut(&key) {
            room.replayed(join.conn, covered);
        }
    }

    /// A message sent from the database to `room`: pending replay joins to it keep it.
    pub(crate) fn keep_for_replays(
        &mut self,
        room: &RoomKey,
        body: &BroadcastBody,
        id: Option<&str>,
        xid: u32,
    ) {
        if self.authz.replaying == 0 || !room.private {
            return;
        }
        for pending in self.authz.pending.values_mut() {
            if let Pending::Join(join) = pending {
                let sub = join.topic.strip_prefix("realtime:").unwrap_or(&join.topic);
                if join.config.replay.is_some() && *sub == *room.sub {
                    join.stored.push((id.map(str::to_owned), xid, body.clone()));
                }
            }
        }
    }

    fn refresh_answered(
        &mut self,
        conn: ConnId,
        instance: u64,
        before: Permissions,
        answer: Option<AuthzAnswer>,
    ) {
        let Some(index) = self.channel_of(conn, instance) else {
            return;
        };
        let topic = self.conns[&conn].channels[index].topic.clone();
        let sub = self.conns[&conn].channels[index].room.sub.clone();
        let Some(answer) = answer else {
            self.shutdown_channel(
                conn,
                &topic,
                "Realtime was unable to connect to the project database",
            );
            return;
        };
        let now = answer.permissions;
        if !now.reads() {
            let message =
                format!("You do not have permissions to read from this Channel topic: {sub}");
            self.shutdown_channel(conn, &topic, &message);
            return;
        }
        let revoked = |was: Option<bool>, is: Option<bool>| was == Some(true) && is == Some(false);
        if revoked(before.broadcast_read, now.broadcast_read)
            || revoked(before.presence_read, now.presence_read)
        {
            let message =
                format!("You no longer have permission to read from this Channel topic: {sub}");
            self.shutdown_channel(conn, &topic, &message);
            return;
        }
        // Writes are evaluated again, lazily, under the new token.
        let permissions = Permissions {
            broadcast_write: None,
            presence_write: None,
            ..before.merged(now)
        };
        self.set_permissions(conn, index, permissions);
    }

    fn write_answered(&mut self, conn: ConnId, instance: u64, answer: Option<AuthzAnswer>) {
        let Some(index) = self.channel_of(conn, instance) else {
            return;
        };
        let channel = &mut self.conns.get_mut(&conn).expect("found above").channels[index];
        let held = channel.held.take().unwrap_or_default();
        let before = channel.permissions.unwrap_or_default();
        let Some(answer) = answer else {
            // Nothing is learned: the held frames fail as upstream's do when the database
            // is unreachable (broadcasts dropped, tracks answered with an error), and the
            // next one asks again.
            let vsn = self.conns[&conn].vsn;
            for msg in held {
                if let Ok(inbound) = protocol::decode(vsn, &msg) {
                    if inbound.event == "presence" {
                        self.reply(conn, vsn, &ReplyTo::of(&inbound), "error", "{}");
                    }
                }
            }
            return;
        };
        self.set_permissions(conn, index, before.merged(answer.permissions));
        for msg in held {
            if !self.conns.contains_key(&conn) {
                return;
            }
            self.frame_again(conn, msg);
        }
    }

    fn rest_answered(&mut self, rest: u64, topic: Arc<str>, answer: Option<AuthzAnswer>) {
        let Some(pending) = self.authz.rests.get_mut(&rest) else {
            return;
        };
        if answer.is_some_and(|a| a.permissions.broadcast_write == Some(true)) {
            pending.allowed.push(topic);
        }
        pending.waiting -= 1;
        if pending.waiting > 0 {
            return;
        }
        let pending = self.authz.rests.remove(&rest).expect("found above");
        if pending.single && pending.allowed.is_empty() {
            self.stats.errors += 1;
            let body = bytes::Bytes::from(r#"{"message":"Unauthorized"}"#);
            self.emit(Output::Reply {
                req: pending.req,
                status: 403,
                body,
            });
            return;
        }
        for (room, body) in pending.messages {
            if !room.private || pending.allowed.contains(&room.sub) {
                self.limits.events.charge(self.now.mono, 1);
                self.route(&room, &body, None);
            }
        }
        self.emit(Output::Reply {
            req: pending.req,
            status: 202,
            body: bytes::Bytes::new(),
        });
    }

    /// The index of channel `instance` on `conn`, if both still exist.
    fn channel_of(&self, conn: ConnId, instance: u64) -> Option<usize> {
        self.conns
            .get(&conn)?
            .channels
            .iter()
            .position(|ch| ch.instance == instance)
    }

    /// Stores a private channel's permissions and updates what its room sends it.
    fn set_permissions(&mut self, conn: ConnId, index: usize, permissions: Permissions) {
        let channel = &mut self
            .conns
            .get_mut(&conn)
            .expect("a live connection")
            .channels[index];
        channel.permissions = Some(permissions);
        let room = channel.room.clone();
        if let Some(room) = self.rooms.get_mut(&room) {
            room.hears(conn, permissions.hears());
        }
    }

    /// The `system` message of a `replication_ready` join, once the change stream is live.
    pub(crate) fn replication_ready_message(
        vsn: Vsn,
        join_ref: Option<&str>,
        topic: &str,
        sub: &str,
    ) -> WsMessage {
        let payload = system_payload("system", "ok", "Replication connection established", sub);
        protocol::encode_text(vsn, join_ref, None, topic, "system", &payload)
    }
}

/// What a member of a room receives: broadcasts, presence diffs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Hears {
    pub(crate) broadcast: bool,
    pub(crate) presence: bool,
}

impl Permissions {
    /// What a member with these permissions receives: only what it was allowed to read.
    pub(crate) fn hears(self) -> Hears {
        Hears {
            broadcast: self.broadcast_read == Some(true),
            presence: self.presence_read == Some(true),
        }
    }
}

/// Whether a `presence` push is a track (untracks need no permission).
fn is_track(inbound: &Inbound<'_>) -> bool {
    let InboundPayload::Json(raw) = &inbound.payload else {
        return false;
    };
    serde_json::from_str::<Value>(raw.get())
        .ok()
        .and_then(|v| {
            v.get("event")?
                .as_str()
                .map(|e| e.eq_ignore_ascii_case("track"))
        })
        .unwrap_or(false)
}

/// `{"reason": …}` of a join refused because of `config.broadcast.replay`, or `None`.
pub(crate) fn replay_refusal(
    private: bool,
    replay: Option<Result<Replay, ()>>,
    database: bool,
) -> Option<String> {
    let reason = match replay? {
        _ if !private => "Replay is not allowed for public channels",
        Err(()) => "Replay params are not valid",
        Ok(_) if !database => "Realtime was unable to replay messages",
        Ok(_) => return None,
    };
    Some(format!("UnableToReplayMessages: {reason}"))
}

/// Reads `config.broadcast.replay`: `None` when absent or not an object (upstream ignores
/// it then), `Err` when `since` or `limit` is not an integer.
pub(crate) fn parse_replay(value: Option<&Value>) -> Option<Result<Replay, ()>> {
    let object = value?.as_object()?;
    let since = object.get("since").and_then(Value::as_i64);
    let limit = match object.get("limit") {
        None | Some(Value::Null) => Some(25),
        Some(limit) => limit.as_i64(),
    };
    Some(match (since, limit) {
        (Some(since_ms), Some(limit)) => Ok(Replay {
            since_ms,
            limit: limit.clamp(1, 25) as u32,
        }),
        _ => Err(()),
    })
}
