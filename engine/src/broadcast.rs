//! Broadcast messages and how each serializer version receives them (PROTOCOL.md §3.2).

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use serde::de::IgnoredAny;

use crate::connection::ReplyTo;
use crate::peer::PeerMsg;
use crate::protocol::{self, encode_user_broadcast, push_json_str, Inbound, InboundPayload, Vsn};
use crate::room::RoomKey;
use crate::{ConnId, Engine, Output, WsMessage};

/// How a user broadcast payload is encoded: the byte value is the wire value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Encoding {
    /// Opaque bytes (`ArrayBuffer` in realtime-js); never delivered to vsn 1.0.0.
    Binary = 0,
    /// UTF-8 JSON text.
    Json = 1,
}

/// One broadcast on its way to members, in the form it arrived, so each serializer version
/// gets the exact frame upstream would send.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BroadcastBody {
    /// The whole `{"type":"broadcast","event":…,"payload":…}` object of a text push or a
    /// REST batch message, relayed verbatim.
    Json(Bytes),
    /// A user broadcast (binary push or REST single message): event name in the header.
    User {
        /// The application's event name.
        event: String,
        /// How `payload` is encoded.
        encoding: Encoding,
        /// The user payload: JSON text or raw bytes.
        payload: Bytes,
    },
}

impl BroadcastBody {
    /// The payload size counted against the payload limit.
    pub fn payload_len(&self) -> usize {
        match self {
            BroadcastBody::Json(object) => object.len(),
            BroadcastBody::User { payload, .. } => payload.len(),
        }
    }

    /// The frame a member with serializer `vsn` joined to `topic` receives, or `None` when
    /// that version cannot carry it (binary payloads to vsn 1.0.0).
    pub fn encode(&self, vsn: Vsn, topic: &str) -> Option<WsMessage> {
        match (self, vsn) {
            (BroadcastBody::Json(object), _) => Some(text(vsn, topic, object)),
            (
                BroadcastBody::User {
                    encoding: Encoding::Binary,
                    ..
                },
                Vsn::V1,
            ) => None,
            (
                BroadcastBody::User {
                    event,
                    encoding,
                    payload,
                },
                Vsn::V2,
            ) => {
                match encode_user_broadcast(topic, event, None, *encoding, payload) {
                    Some(frame) => Some(WsMessage::Binary(frame)),
                    // Header strings over 255 bytes: only JSON can still travel, as text.
                    None if *encoding == Encoding::Json => {
                        Some(text(vsn, topic, &user_object(event, payload)))
                    }
                    None => None,
                }
            }
            (BroadcastBody::User { event, payload, .. }, Vsn::V1) => {
                Some(text(vsn, topic, &user_object(event, payload)))
            }
        }
    }
}

fn text(vsn: Vsn, topic: &str, object: &[u8]) -> WsMessage {
    // Json bodies and JSON user payloads are validated as UTF-8 JSON when they enter.
    let object = std::str::from_utf8(object).expect("broadcast JSON was validated on entry");
    protocol::encode_text(vsn, None, None, topic, "broadcast", object)
}

/// `{"event":E,"payload":P,"type":"broadcast"}`, as upstream converts a user broadcast for
/// JSON serializers.
fn user_object(event: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + event.len() + 48);
    out.extend_from_slice(b"{\"event\":");
    push_json_str(&mut out, event);
    out.extend_from_slice(b",\"payload\":");
    out.extend_from_slice(payload);
    out.extend_from_slice(b",\"type\":\"broadcast\"}");
    out
}

impl Engine {
    /// A broadcast push from a joined channel (PROTOCOL.md §3.1).
    pub(crate) fn broadcast_push(
        &mut self,
        conn: ConnId,
        vsn: Vsn,
        index: usize,
        inbound: &Inbound<'_>,
    ) {
        let channel = &self.conns[&conn].channels[index];
        #[allow(unused_mut)]
        let mut denied = channel
            .permissions
            .is_some_and(|p| p.broadcast_write != Some(true));
        #[cfg(feature = "planted-bugs")]
        if self.planted(crate::PlantedBug::IgnoreWritePolicy) {
            denied = false;
        }
        if denied {
            // Denied by the topic's policies: dropped without a reply, as upstream does.
            return;
        }
        let (ack, room) = (channel.ack, channel.room.clone());
        #[allow(unused_mut)]
        let mut except = (!channel.self_broadcast).then_some(conn);
        #[cfg(feature = "planted-bugs")]
        if self.planted(crate::PlantedBug::DeliverToSelf) {
            except = None;
        }
        let reply_to = ReplyTo::of(inbound);
        let body = match &inbound.payload {
            InboundPayload::Json(raw) if raw.get().starts_with('{') => {
                BroadcastBody::Json(Bytes::copy_from_slice(raw.get().as_bytes()))
            }
            InboundPayload::UserBroadcast(push) => {
                if push.encoding == Encoding::Json
                    && serde_json::from_slice::<IgnoredAny>(&push.payload).is_err()
                {
                    self.stats.malformed += 1;
                    return;
                }
                BroadcastBody::User {
                    event: push.event.clone(),
                    encoding: push.encoding,
                    payload: push.payload.clone(),
                }
            }
            // Not an object, or a generic binary push: nothing a member could decode.
            _ => {
                self.stats.malformed += 1;
                return;
            }
        };
        if !self.limits.events.take(self.now.mono, 1) {
            // Over the project's event rate: the sender's channel and every receiving
            // channel are shut down, as upstream channels do.
            let topic = reply_to.topic.to_owned();
            self.fan_out(&room, &body, except);
            self.shutdown_channel(conn, &topic, "Too many messages per second");
            return;
        }
        if body.payload_len() > self.config.payload_bytes_max() {
            if ack {
                self.reply(
                    conn,
                    vsn,
                    &reply_to,
                    "error",
                    r#"{"reason":"payload_size_exceeded"}"#,
                );
            }
            return;
        }
        self.route(&room, &body, except);
        if ack {
            self.reply(conn, vsn, &reply_to, "ok", "{}");
        }
    }

    /// Delivers a broadcast to local members and forwards it to peer replicas.
    pub(crate) fn route(&mut self, room: &RoomKey, body: &BroadcastBody, except: Option<ConnId>) {
        self.stats.broadcasts += 1;
        self.fan_out(room, body, except);
        if !self.peers.is_empty() {
            self.emit(Output::ToPeers(PeerMsg::Broadcast {
                room: room.clone(),
                body: body.clone(),
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_user_broadcast_is_not_delivered_to_v1() {
        let body = BroadcastBody::User {
            event: "e".into(),
            encoding: Encoding::Binary,
            payload: Bytes::from_static(b"\x00\x01"),
        };
        assert_eq!(body.encode(Vsn::V1, "realtime:r"), None);
        let Some(WsMessage::Binary(frame)) = body.encode(Vsn::V2, "realtime:r") else {
            panic!("v2 gets a binary frame")
        };
        assert_eq!(&frame[..], b"\x04\x0a\x01\x00\x00realtime:re\x00\x01");
    }

    #[test]
    fn json_user_broadcast_matches_the_spec_bytes() {
        let body = BroadcastBody::User {
            event: "e".into(),
            encoding: Encoding::Json,
            payload: Bytes::from_static(br#"{"x":1}"#),
        };
        let Some(WsMessage::Binary(frame)) = body.encode(Vsn::V2, "realtime:r") else {
            panic!("v2 gets a binary frame")
        };
        assert_eq!(&frame[..], b"\x04\x0a\x01\x00\x01realtime:re{\"x\":1}");
        let Some(WsMessage::Text(v1)) = body.encode(Vsn::V1, "realtime:r") else {
            panic!("v1 gets text")
        };
        assert_eq!(
            &v1[..],
            br#"{"topic":"realtime:r","event":"broadcast","payload":{"event":"e","payload":{"x":1},"type":"broadcast"},"ref":null}"#
        );
    }

    #[test]
    fn long_event_names_fall_back_to_text_for_v2() {
        let body = BroadcastBody::User {
            event: "e".repeat(300),
            encoding: Encoding::Json,
            payload: Bytes::from_static(b"1"),
        };
        assert!(matches!(
            body.encode(Vsn::V2, "realtime:r"),
            Some(WsMessage::Text(_))
        ));
    }
}
