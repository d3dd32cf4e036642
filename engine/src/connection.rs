//! Connections: upgrade checks, frame dispatch, heartbeats, idle timeouts and closing.

use std::sync::Arc;

use bytes::Bytes;

use crate::auth::Claims;
use crate::channel::Channel;
use crate::protocol::{self, Inbound, Vsn};
use crate::timers::Timer;
use crate::{ConnId, ConnectParams, Engine, Instant, Output, WsMessage};

/// One accepted WebSocket connection.
#[derive(Debug)]
pub(crate) struct Conn {
    pub(crate) vsn: Vsn,
    /// The connection token: the default channel token.
    pub(crate) token: Arc<str>,
    pub(crate) claims: Arc<Claims>,
    /// Last time any frame arrived; the idle timer re-checks it when it fires.
    pub(crate) last_seen: Instant,
    /// Since when the connection has had no channel, if it has none.
    pub(crate) empty_since: Option<Instant>,
    /// Its channels; a socket with any counts as a concurrent user.
    pub(crate) channels: Vec<Channel>,
}

impl Conn {
    pub(crate) fn channel_index(&self, topic: &str) -> Option<usize> {
        self.channels.iter().position(|c| &*c.topic == topic)
    }
}

/// A reply to the message `inbound`, echoing its refs.
pub(crate) struct ReplyTo<'a> {
    pub(crate) join_ref: Option<&'a str>,
    pub(crate) ref_: Option<&'a str>,
    pub(crate) topic: &'a str,
}

impl<'a> ReplyTo<'a> {
    pub(crate) fn of(inbound: &'a Inbound<'a>) -> Self {
        ReplyTo {
            join_ref: inbound.join_ref.as_deref(),
            ref_: inbound.ref_.as_deref(),
            topic: &inbound.topic,
        }
    }
}

impl Engine {
    pub(crate) fn connect(&mut self, conn: ConnId, params: ConnectParams) {
        if self.conns.contains_key(&conn) {
            return;
        }
        let Some(vsn) = Vsn::parse(params.vsn.as_deref()) else {
            // Phoenix refuses an unknown serializer with a bare 403, at once.
            self.stats.errors += 1;
            self.emit(Output::Reject {
                conn,
                status: 403,
                body: Bytes::new(),
            });
            return;
        };
        let token = params.x_api_key.or(params.apikey);
        let refused = match &token {
            None => Err((401, "API key is missing".to_owned())),
            Some(token) => self
                .verify_token(token)
                .map_err(|e| (401, e.connect_message())),
        }
        .and_then(|verified| {
            if self.shutting_down {
                Err((503, "Realtime is restarting, please standby".to_owned()))
            } else if self.limits.users() >= self.config.concurrent_users_max {
                Err((429, "Too many connected users".to_owned()))
            } else if self.limits.joins.tripped(self.now.mono) {
                Err((429, "Too many joins per second".to_owned()))
            } else {
                Ok(verified)
            }
        });
        match refused {
            Ok((token, claims)) => {
                let now = self.now.mono;
                self.conns.insert(
                    conn,
                    Conn {
                        vsn,
                        token,
                        claims,
                        last_seen: now,
                        empty_since: Some(now),
                        channels: Vec::new(),
                    },
                );
                self.timers.set(
                    now.plus_ms(self.config.heartbeat_timeout_ms),
                    Timer::Idle(conn),
                );
                self.timers.set(
                    now.plus_ms(self.config.no_channel_timeout_ms),
                    Timer::NoChannel(conn),
                );
                self.stats.connections += 1;
                self.emit(Output::Accept { conn });
            }
            Err((status, message)) => {
                self.stats.errors += 1;
                let body = Bytes::from(format!(r#"{{"error":{}}}"#, protocol::json_str(&message)));
                let reject = Output::Reject { conn, status, body };
                self.delay(self.config.connect_error_backoff_ms, vec![reject]);
            }
        }
    }

    pub(crate) fn frame(&mut self, conn: ConnId, msg: WsMessage) {
        let now = self.now.mono;
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.last_seen = now;
        let vsn = c.vsn;
        self.stats.frames_in += 1;
        self.stats.bytes_in += msg.bytes().len() as u64;
        match protocol::decode(vsn, &msg) {
            Ok(inbound) => self.dispatch(conn, vsn, inbound, &msg),
            // Upstream logs and ignores undecodable frames; the socket stays open.
            Err(_) => self.stats.malformed += 1,
        }
    }

    /// A frame held behind a write check, handled now that the check returned.
    pub(crate) fn frame_again(&mut self, conn: ConnId, msg: WsMessage) {
        let Some(vsn) = self.conns.get(&conn).map(|c| c.vsn) else {
            return;
        };
        if let Ok(inbound) = protocol::decode(vsn, &msg) {
            self.dispatch(conn, vsn, inbound, &msg);
        }
    }

    fn dispatch(&mut self, conn: ConnId, vsn: Vsn, inbound: Inbound<'_>, msg: &WsMessage) {
        let reply_to = ReplyTo::of(&inbound);
        if inbound.topic == "phoenix" {
            if inbound.event == "heartbeat" {
                self.reply(conn, vsn, &reply_to, "ok", "{}");
            } else {
                self.unmatched_topic(conn, vsn, &reply_to);
            }
            return;
        }
        if inbound.event == "phx_join" {
            self.join(conn, vsn, &inbound);
            return;
        }
        let Some(index) = self.conns[&conn].channel_index(&inbound.topic) else {
            if inbound.event == "phx_leave" {
                self.reply(conn, vsn, &reply_to, "ok", "{}");
            } else {
                self.unmatched_topic(conn, vsn, &reply_to);
            }
            return;
        };
        let channel = &self.conns[&conn].channels[index];
        if let Some(join_ref) = reply_to.join_ref {
            if channel.join_ref.as_deref() != Some(join_ref) {
                // A push from an earlier instance of this channel: stale, ignored.
                return;
            }
        }
        if self.hold_for_write(conn, index, msg, &inbound) {
            return;
        }
        match &*inbound.event {
            "phx_leave" => self.leave(conn, vsn, index, &reply_to),
            "broadcast" => self.broadcast_push(conn, vsn, index, &inbound),
            "access_token" => self.refresh(conn, index, &inbound),
            "presence" => self.presence_push(conn, vsn, index, &inbound),
            // Unknown events count toward the event rate and get no reply.
            _ => self.limits.events.charge(self.now.mono, 1),
        }
    }

    pub(crate) fn reply(
        &mut self,
        conn: ConnId,
        vsn: Vsn,
        to: &ReplyTo<'_>,
        status: &str,
        response: &str,
    ) {
        if status != "ok" {
            self.stats.errors += 1;
        }
        let msg = protocol::encode_reply(vsn, to.join_ref, to.ref_, to.topic, status, response);
        self.send_one(conn, msg);
    }

    fn unmatched_topic(&mut self, conn: ConnId, vsn: Vsn, to: &ReplyTo<'_>) {
        let to = ReplyTo {
            join_ref: None,
            ..*to
        };
        self.reply(conn, vsn, &to, "error", r#"{"reason":"unmatched topic"}"#);
    }

    /// Emits `outputs` after `ms`, or now if `ms` is zero.
    pub(crate) fn delay(&mut self, ms: u64, outputs: Vec<Output>) {
        if ms == 0 {
            outputs.into_iter().for_each(|o| self.emit(o));
        } else {
            self.timers
                .set(self.now.mono.plus_ms(ms), Timer::Delayed(outputs));
        }
    }

    /// Forgets a connection: every channel ends, as if each had left.
    pub(crate) fn closed(&mut self, conn: ConnId) {
        #[cfg(feature = "planted-bugs")]
        if self.planted(crate::PlantedBug::KeepPresenceOnClose) {
            // Detach the metas from their channels so the removal below misses them.
            let instances: Vec<u64> = self
                .conns
                .get(&conn)
                .map(|c| c.channels.iter().map(|ch| ch.instance).collect())
                .unwrap_or_default();
            for instance in instances {
                self.presence.orphan(instance);
            }
        }
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        for index in (0..c.channels.len()).rev() {
            self.remove_channel(conn, index);
        }
        self.conns.remove(&conn);
        self.stats.connections -= 1;
    }

    /// Closes `conn` with a close frame, then forgets it.
    pub(crate) fn close(&mut self, conn: ConnId, code: u16, reason: &'static str) {
        if self.conns.contains_key(&conn) {
            self.emit(Output::Close { conn, code, reason });
            self.closed(conn);
        }
    }

    pub(crate) fn lagging(&mut self, conn: ConnId) {
        // Growing the queue without bound would let one slow reader exhaust memory.
        self.close(conn, 1008, "slow consumer: send queue full");
    }

    pub(crate) fn run_timers(&mut self) {
        let now = self.now.mono;
        while let Some(timer) = self.timers.pop_due(now) {
            match timer {
                Timer::Idle(conn) => {
                    let Some(c) = self.conns.get(&conn) else {
                        continue;
                    };
                    let deadline = c.last_seen.plus_ms(self.config.heartbeat_timeout_ms);
                    #[cfg(feature = "planted-bugs")]
                    if self.planted(crate::PlantedBug::IgnoreHeartbeatTimeout) {
                        continue;
                    }
                    if deadline <= now {
                        self.close(conn, 1000, "heartbeat timeout");
                    } else {
                        self.timers.set(deadline, Timer::Idle(conn));
                    }
                }
                Timer::NoChannel(conn) => {
                    let Some(since) = self.conns.get(&conn).and_then(|c| c.empty_since) else {
                        continue;
                    };
                    let deadline = since.plus_ms(self.config.no_channel_timeout_ms);
                    if deadline <= now {
                        self.close(conn, 1000, "no channels joined");
                    } else {
                        self.timers.set(deadline, Timer::NoChannel(conn));
                    }
                }
                Timer::TokenExpiry { conn, instance } => self.token_expiry(conn, instance),
                Timer::ReplicationReady { conn, instance } => {
                    self.replication_deadline(conn, instance)
                }
                Timer::PeerHeartbeat => self.peer_heartbeat(),
                Timer::VisibilityRetry { id, attempt } => self.retry_visibility(id, attempt),
                Timer::Delayed(outputs) => outputs.into_iter().for_each(|o| self.emit(o)),
            }
        }
    }
}
