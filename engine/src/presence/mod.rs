//! Presence: track and untrack pushes, `presence_state` on join, `presence_diff`s coalesced
//! per room and engine step, automatic removal, and replication to peer replicas
//! (PROTOCOL.md §4).

pub mod crdt;

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::connection::ReplyTo;
use crate::peer::PeerMsg;
use crate::protocol::{self, Inbound, InboundPayload, Vsn};
use crate::room::{Kind, RoomKey};
use crate::timers::Timer;
use crate::{ConnId, Engine, NodeId, Output, To};
use crdt::{Change, Entry, Meta, Side};

/// `{key: {"metas": [meta, …]}}`, keys in order.
fn metas_object<'a>(items: impl Iterator<Item = (&'a str, Value)>) -> Value {
    let mut by_key: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
    for (key, meta) in items {
        by_key.entry(key).or_default().push(meta);
    }
    let object: Map<String, Value> = by_key
        .into_iter()
        .map(|(key, metas)| (key.to_owned(), serde_json::json!({ "metas": metas })))
        .collect();
    Value::Object(object)
}

impl Engine {
    /// A `presence` push: track or untrack this channel's meta.
    pub(crate) fn presence_push(
        &mut self,
        conn: ConnId,
        vsn: Vsn,
        index: usize,
        inbound: &Inbound<'_>,
    ) {
        let reply_to = ReplyTo::of(inbound);
        let now = self.now.mono;
        let (max, window) = (
            self.config.client_presence_calls_max,
            self.config.client_presence_window_ms,
        );
        let channel = &mut self
            .conns
            .get_mut(&conn)
            .expect("dispatched on a live connection")
            .channels[index];
        if !channel.presence_calls.allow(now, max, window) {
            let topic = channel.topic.clone();
            self.shutdown_channel(conn, &topic, "Client presence rate limit exceeded");
            return;
        }
        let payload: Value = match &inbound.payload {
            InboundPayload::Json(raw) => serde_json::from_str(raw.get()).unwrap_or(Value::Null),
            _ => Value::Null,
        };
        let event = payload
            .get("event")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if event.eq_ignore_ascii_case("track") {
            self.track(conn, vsn, index, &reply_to, payload.get("payload"));
        } else if event.eq_ignore_ascii_case("untrack") {
            self.presence_events_charge(1);
            let instance = self.conns[&conn].channels[index].instance;
            let changes = self.presence.remove(instance);
            self.queue_diff(changes);
            self.reply(conn, vsn, &reply_to, "ok", "{}");
        } else {
            self.reply(conn, vsn, &reply_to, "error", "{}");
        }
    }

    fn track(
        &mut self,
        conn: ConnId,
        vsn: Vsn,
        index: usize,
        reply_to: &ReplyTo<'_>,
        payload: Option<&Value>,
    ) {
        let payload = match payload {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(map)) => map.clone(),
            Some(_) => {
                let reason = r#"{"reason":"Presence track payload must be a map"}"#;
                self.reply(conn, vsn, reply_to, "error", reason);
                return;
            }
        };
        let channel = &self.conns[&conn].channels[index];
        if channel
            .permissions
            .is_some_and(|p| p.presence_write != Some(true))
        {
            // Denied by the topic's policies: upstream answers a bare error.
            self.reply(conn, vsn, reply_to, "error", "{}");
            return;
        }
        let (topic, instance) = (channel.topic.clone(), channel.instance);
        let size = serde_json::to_string(&payload).map_or(usize::MAX, |s| s.len());
        if size > self.config.payload_bytes_max() {
            self.shutdown_channel(conn, &topic, "Track message size exceeded");
            return;
        }
        if self.limits.presence.tripped(self.now.mono) {
            self.shutdown_channel(conn, &topic, "Too many presence messages per second");
            return;
        }
        self.presence_events_charge(1);
        let previous = self.presence.local(instance).map(|e| e.meta.clone());
        if previous.as_ref().is_none_or(|meta| meta.payload != payload) {
            let channel = &self.conns[&conn].channels[index];
            let (room, key) = (channel.room.clone(), channel.presence_key.clone());
            let phx_ref = self.phx_ref();
            let replaced = previous.as_ref().map_or(0, |meta| meta.bytes);
            let meta = Meta::new(
                &key,
                phx_ref,
                previous.map(|meta| meta.phx_ref.clone()),
                payload,
            );
            let state = self.presence.room_bytes(&room) - replaced + meta.bytes;
            if state > self.config.presence_state_bytes_max {
                // Every joiner gets the room's whole state in one frame: keep it sendable.
                let reason = format!(
                    r#"{{"reason":"PresenceStateTooLarge: The presence state of this channel would exceed {} bytes"}}"#,
                    self.config.presence_state_bytes_max
                );
                self.reply(conn, vsn, reply_to, "error", &reason);
                return;
            }
            let changes = self.presence.put(
                instance,
                Entry {
                    room,
                    key,
                    meta: Arc::new(meta),
                },
            );
            self.queue_diff(changes);
        }
        self.enable_presence(conn, index);
        self.reply(conn, vsn, reply_to, "ok", "{}");
    }

    /// A track enables presence on the channel, as upstream's does: a public channel that
    /// joined without it hears presence diffs from now on.
    fn enable_presence(&mut self, conn: ConnId, index: usize) {
        let channel = &mut self
            .conns
            .get_mut(&conn)
            .expect("a live connection")
            .channels[index];
        if channel.presence_enabled {
            return;
        }
        channel.presence_enabled = true;
        if channel.permissions.is_none() {
            let room = channel.room.clone();
            if let Some(room) = self.rooms.get_mut(&room) {
                room.hears(
                    conn,
                    crate::authz::Hears {
                        broadcast: true,
                        presence: true,
                    },
                );
            }
        }
    }

    /// Pushes the room's full state to a channel that just joined with presence enabled.
    pub(crate) fn presence_state(
        &mut self,
        conn: ConnId,
        vsn: Vsn,
        join_ref: Option<&str>,
        topic: &str,
        room: &RoomKey,
    ) {
        if self.limits.presence.tripped(self.now.mono) {
            self.shutdown_channel(conn, topic, "Too many presence messages per second");
            return;
        }
        self.presence_events_charge(1);
        let state = metas_object(
            self.presence
                .room(room)
                .map(|e| (&*e.key, e.meta.to_json())),
        );
        let msg = protocol::encode_text(
            vsn,
            join_ref,
            None,
            topic,
            "presence_state",
            &state.to_string(),
        );
        self.send_one(conn, msg);
    }

    /// Removes a channel's meta when the channel ends for any reason.
    pub(crate) fn presence_forget(&mut self, instance: u64) {
        let changes = self.presence.remove(instance);
        self.queue_diff(changes);
    }

    pub(crate) fn queue_diff(&mut self, changes: Vec<Change>) {
        for change in changes {
            self.pending_diffs
                .entry(change.room.clone())
                .or_default()
                .push(change);
        }
    }

    /// End of an engine step: one `presence_diff` per room for everything that changed,
    /// encoded once per serializer version, and one delta for peers.
    pub(crate) fn flush_presence(&mut self) {
        // Every change to the entries passes through `queue_diff`: recounted only then.
        if !self.pending_diffs.is_empty() {
            let (own, replicated) = self.presence.entry_counts();
            self.stats.presence_entries = own as u64;
            self.stats.presence_entries_replicated = replicated as u64;
        }
        for (room, changes) in std::mem::take(&mut self.pending_diffs) {
            let side = |side: Side| {
                metas_object(
                    changes
                        .iter()
                        .filter(|c| c.side == side)
                        .map(|c| (&*c.key, c.meta.to_json())),
                )
            };
            let payload =
                serde_json::json!({ "joins": side(Side::Join), "leaves": side(Side::Leave) })
                    .to_string();
            let Some(local) = self.rooms.get_mut(&room) else {
                continue;
            };
            let topic = local.topic.clone();
            let lists: Vec<(Vsn, Arc<[ConnId]>)> = Vsn::ALL
                .iter()
                .map(|v| (*v, local.members(*v, Kind::Presence)))
                .collect();
            let recipients: usize = lists.iter().map(|(_, list)| list.len()).sum();
            self.presence_events_charge(recipients as u64);
            for (vsn, list) in lists {
                if !list.is_empty() {
                    let msg =
                        protocol::encode_text(vsn, None, None, &topic, "presence_diff", &payload);
                    self.emit(Output::Send {
                        to: To::Members { list, except: None },
                        msg,
                    });
                }
            }
        }
        if let Some(delta) = self.presence.take_delta() {
            if !self.peers.is_empty() {
                self.emit(Output::ToPeers(PeerMsg::PresenceDelta(delta)));
            }
        }
    }

    fn presence_events_charge(&mut self, n: u64) {
        self.limits.presence.charge(self.now.mono, n);
    }

    /// A fresh `phx_ref`: unique across replicas (the whole replica id, shard included) and
    /// within one (a counter from a seeded random start, so a restarted replica does not
    /// repeat refs clients hold). The counter's fixed width keeps the two apart.
    fn phx_ref(&mut self) -> String {
        self.phx_ref_counter += 1;
        format!(
            "{:x}{:012x}",
            self.node.0,
            self.phx_ref_counter & 0xffff_ffff_ffff
        )
    }

    pub(crate) fn peer_up(&mut self, node: NodeId) {
        if node == self.node || !self.peers.insert(node) {
            return;
        }
        if self.peers.len() == 1 {
            let period = self.config.presence_broadcast_ms;
            self.timers
                .set(self.now.mono.plus_ms(period), Timer::PeerHeartbeat);
        }
        self.emit(Output::ToPeer {
            to: node,
            msg: PeerMsg::PresenceSnapshot(self.presence.snapshot()),
        });
    }

    pub(crate) fn peer_down(&mut self, node: NodeId) {
        self.peers.remove(&node);
        let changes = self.presence.drop_owner(node);
        self.queue_diff(changes);
    }

    /// Periodic heartbeat to peers carrying our clock, so a peer that missed a delta
    /// notices and asks for a snapshot.
    pub(crate) fn peer_heartbeat(&mut self) {
        if self.peers.is_empty() {
            return;
        }
        let clock = self.presence.clock();
        self.emit(Output::ToPeers(PeerMsg::PresenceHeartbeat {
            owner: self.node,
            clock,
        }));
        self.timers.set(
            self.now.mono.plus_ms(self.config.presence_broadcast_ms),
            Timer::PeerHeartbeat,
        );
    }

    pub(crate) fn peer_presence(&mut self, from: NodeId, msg: PeerMsg) {
        // A replica declared down stays down until it is seen up again, so late messages
        // cannot resurrect its entries.
        if !self.peers.contains(&from) {
            return;
        }
        match msg {
            PeerMsg::PresenceDelta(delta) => match self.presence.apply_delta(&delta) {
                Ok(changes) => self.queue_diff(changes),
                Err(gap) => self.emit(Output::ToPeer {
                    to: gap.owner,
                    msg: PeerMsg::PresenceRequest { owner: gap.owner },
                }),
            },
            PeerMsg::PresenceSnapshot(snapshot) => {
                let changes = self.presence.apply_snapshot(&snapshot);
                self.queue_diff(changes);
            }
            PeerMsg::PresenceHeartbeat { owner, clock } => {
                if self.presence.behind(owner, clock) {
                    self.emit(Output::ToPeer {
                        to: owner,
                        msg: PeerMsg::PresenceRequest { owner },
                    });
                }
            }
            PeerMsg::PresenceRequest { owner } => {
                if owner == self.node {
                    self.emit(Output::ToPeer {
                        to: from,
                        msg: PeerMsg::PresenceSnapshot(self.presence.snapshot()),
                    });
                }
            }
            PeerMsg::Broadcast { .. } => {}
        }
    }
}
