//! Messages between replicas (shards of one process, or cluster nodes).
//!
//! The engine only produces and consumes them; the runtime's peer bus carries them
//! (in-process channels between shards, NATS between nodes, a simulated bus in `sim`).

use serde::{Deserialize, Serialize};

use crate::broadcast::BroadcastBody;
use crate::presence::crdt::{Delta, Snapshot};
use crate::room::RoomKey;
use crate::{Engine, NodeId};

/// A message for peer replicas.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum PeerMsg {
    /// A broadcast accepted by the sending replica, for its peers' local members.
    Broadcast {
        /// The room it was sent to.
        room: RoomKey,
        /// The message, as it arrived.
        body: BroadcastBody,
    },
    /// An owner's presence changes since its previous delta.
    PresenceDelta(Delta),
    /// An owner's whole presence state: to a replica that came up, and to one that asked
    /// after a gap.
    PresenceSnapshot(Snapshot),
    /// Periodic: the owner's presence clock, so peers notice missed deltas.
    PresenceHeartbeat {
        /// The sending replica.
        owner: NodeId,
        /// Its presence clock.
        clock: u64,
    },
    /// Asks `owner` (its addressee) for a snapshot after a gap.
    PresenceRequest {
        /// Whose snapshot is needed.
        owner: NodeId,
    },
}

impl Engine {
    pub(crate) fn peer_message(&mut self, from: NodeId, msg: PeerMsg) {
        match msg {
            // The sender is never among a peer's members, so nobody is excluded.
            PeerMsg::Broadcast { room, body } => self.fan_out(&room, &body, None),
            presence => self.peer_presence(from, presence),
        }
    }
}

/// The bytes of peer messages between processes (cluster nodes): an envelope naming the
/// sending and the addressed replica, then the message. Broadcasts, most of the traffic,
/// carry their body as it is, after a short binary header; the rarer presence messages are
/// JSON.
///
/// ```text
/// from: u64 BE | to: u64 BE (u64::MAX: every replica) | kind: u8 | …
/// kind 0, broadcast: private: u8 | sub length: u16 BE | sub | body
///   body 0, JSON object:  0 | object bytes
///   body 1, user message: 1 | encoding: u8 | event length: u16 BE | event | payload
/// kind 1, other: the message as JSON
/// ```
pub mod wire {
    use bytes::{BufMut, Bytes, BytesMut};

    use super::PeerMsg;
    use crate::broadcast::{BroadcastBody, Encoding};
    use crate::room::RoomKey;
    use crate::NodeId;

    const EVERY: u64 = u64::MAX;

    /// A peer message as it travels between processes.
    #[derive(Clone, Debug, PartialEq)]
    pub struct Envelope {
        /// The sending replica.
        pub from: NodeId,
        /// The addressed replica, or `None` for every replica that receives it.
        pub to: Option<NodeId>,
        /// The message.
        pub msg: PeerMsg,
    }

    /// Bytes that are not an envelope: from a foreign publisher or a newer version.
    #[derive(Debug, thiserror::Error, PartialEq, Eq)]
    #[error("malformed peer message: {0}")]
    pub struct WireError(&'static str);

    /// The envelope's bytes.
    pub fn encode(envelope: &Envelope) -> Bytes {
        let mut out = BytesMut::with_capacity(64);
        out.put_u64(envelope.from.0);
        out.put_u64(envelope.to.map_or(EVERY, |to| to.0));
        match &envelope.msg {
            PeerMsg::Broadcast { room, body } if room.sub.len() <= usize::from(u16::MAX) => {
                out.put_u8(0);
                out.put_u8(u8::from(room.private));
                out.put_u16(room.sub.len() as u16);
                out.put_slice(room.sub.as_bytes());
                match body {
                    BroadcastBody::Json(object) => {
                        out.put_u8(0);
                        out.put_slice(object);
                    }
                    BroadcastBody::User {
                        event,
                        encoding,
                        payload,
                    } if event.len() <= usize::from(u16::MAX) => {
                        out.put_u8(1);
                        out.put_u8(*encoding as u8);
                        out.put_u16(event.len() as u16);
                        out.put_slice(event.as_bytes());
                        out.put_slice(payload);
                    }
                    BroadcastBody::User { .. } => return json(out, envelope),
                }
            }
            _ => return json(out, envelope),
        }
        out.freeze()
    }

    fn json(mut out: BytesMut, envelope: &Envelope) -> Bytes {
        out.truncate(16);
        out.put_u8(1);
        let mut writer = out.writer();
        serde_json::to_writer(&mut writer, &envelope.msg).expect("peer messages serialize");
        writer.into_inner().freeze()
    }

    /// Reads an envelope; never panics, whatever the bytes.
    pub fn decode(bytes: &Bytes) -> Result<Envelope, WireError> {
        let mut reader = Reader {
            bytes: bytes.clone(),
        };
        let from = NodeId(reader.u64()?);
        let to = match reader.u64()? {
            EVERY => None,
            to => Some(NodeId(to)),
        };
        let msg = match reader.u8()? {
            0 => {
                let private = match reader.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(WireError("private flag")),
                };
                let sub = reader.string()?;
                let body = match reader.u8()? {
                    0 => BroadcastBody::Json(reader.bytes),
                    1 => {
                        let encoding = match reader.u8()? {
                            0 => Encoding::Binary,
                            1 => Encoding::Json,
                            _ => return Err(WireError("encoding")),
                        };
                        let event = reader.string()?;
                        BroadcastBody::User {
                            event,
                            encoding,
                            payload: reader.bytes,
                        }
                    }
                    _ => return Err(WireError("body kind")),
                };
                PeerMsg::Broadcast {
                    room: RoomKey {
                        private,
                        sub: sub.into(),
                    },
                    body,
                }
            }
            1 => serde_json::from_slice(&reader.bytes).map_err(|_| WireError("JSON message"))?,
            _ => return Err(WireError("message kind")),
        };
        Ok(Envelope { from, to, msg })
    }

    struct Reader {
        bytes: Bytes,
    }

    impl Reader {
        fn take(&mut self, n: usize) -> Result<Bytes, WireError> {
            if self.bytes.len() < n {
                return Err(WireError("truncated"));
            }
            Ok(self.bytes.split_to(n))
        }

        fn u8(&mut self) -> Result<u8, WireError> {
            Ok(self.take(1)?[0])
        }

        fn u64(&mut self) -> Result<u64, WireError> {
            let bytes = self.take(8)?;
            Ok(u64::from_be_bytes(bytes[..].try_into().expect("8 bytes")))
        }

        /// A string after its u16 length.
        fn string(&mut self) -> Result<String, WireError> {
            let len = self.take(2)?;
            let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
            String::from_utf8(self.take(len)?.to_vec()).map_err(|_| WireError("UTF-8"))
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use proptest::prelude::*;

    use super::wire::{decode, encode, Envelope};
    use super::PeerMsg;
    use crate::broadcast::{BroadcastBody, Encoding};
    use crate::room::RoomKey;
    use crate::NodeId;

    fn body() -> impl Strategy<Value = BroadcastBody> {
        prop_oneof![
            any::<Vec<u8>>().prop_map(|b| BroadcastBody::Json(Bytes::from(b))),
            (".{0,20}", any::<bool>(), any::<Vec<u8>>()).prop_map(|(event, json, payload)| {
                BroadcastBody::User {
                    event,
                    encoding: if json {
                        Encoding::Json
                    } else {
                        Encoding::Binary
                    },
                    payload: Bytes::from(payload),
                }
            }),
        ]
    }

    fn msg() -> impl Strategy<Value = PeerMsg> {
        prop_oneof![
            (any::<bool>(), ".{0,30}", body()).prop_map(|(private, sub, body)| {
                PeerMsg::Broadcast {
                    room: RoomKey {
                        private,
                        sub: sub.into(),
                    },
                    body,
                }
            }),
            (any::<u64>(), any::<u64>()).prop_map(|(owner, clock)| PeerMsg::PresenceHeartbeat {
                owner: NodeId(owner),
                clock,
            }),
            any::<u64>().prop_map(|owner| PeerMsg::PresenceRequest {
                owner: NodeId(owner)
            }),
        ]
    }

    proptest! {
        #[test]
        fn envelopes_survive_the_wire(from: u64, to: Option<u64>, msg in msg()) {
            let envelope = Envelope { from: NodeId(from), to: to.filter(|t| *t != u64::MAX).map(NodeId), msg };
            prop_assert_eq!(decode(&encode(&envelope)), Ok(envelope));
        }

        #[test]
        fn any_bytes_decode_or_fail_cleanly(bytes: Vec<u8>) {
            let _ = decode(&Bytes::from(bytes));
        }

        #[test]
        fn cut_envelopes_fail_cleanly(msg in msg(), cut: usize) {
            let envelope = Envelope { from: NodeId(1), to: None, msg };
            let bytes = encode(&envelope);
            let cut = cut % bytes.len();
            let _ = decode(&bytes.slice(..cut));
        }
    }

    #[test]
    fn a_broadcast_costs_its_body_and_a_small_header() {
        let body = Bytes::from_static(br#"{"type":"broadcast","event":"e","payload":{}}"#);
        let envelope = Envelope {
            from: NodeId(1),
            to: None,
            msg: PeerMsg::Broadcast {
                room: RoomKey {
                    private: false,
                    sub: "room".into(),
                },
                body: BroadcastBody::Json(body.clone()),
            },
        };
        assert_eq!(
            encode(&envelope).len(),
            8 + 8 + 1 + 1 + 2 + 4 + 1 + body.len()
        );
    }
}
