//! The wire codec: Phoenix serializer vsn 1.0.0 (JSON objects), 2.0.0 (JSON arrays) and the
//! binary user-broadcast frames of current realtime-js. Codec only: no protocol rules here.

mod binary;
mod v1;
mod v2;

use std::borrow::Cow;

use bytes::Bytes;
use serde_json::value::RawValue;

pub use binary::{
    decode_binary, decode_user_broadcast, encode_user_broadcast, encode_user_broadcast_push,
    BinaryFrame, UserBroadcast, UserBroadcastPush,
};

use crate::WsMessage;

/// The serializer a connection negotiated with `vsn`; kept for the connection's life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Vsn {
    /// JSON objects; no `join_ref` on server frames; no binary payloads.
    V1,
    /// JSON arrays plus binary user-broadcast frames.
    V2,
}

impl Vsn {
    /// Parses the `vsn` query parameter: absent means 1.0.0, `~> 1.0.0` and `~> 2.0.0` as
    /// Phoenix matches them, anything else is refused.
    pub fn parse(vsn: Option<&str>) -> Option<Vsn> {
        let Some(vsn) = vsn else { return Some(Vsn::V1) };
        let mut parts = vsn.split('.');
        let (major, minor, patch) = (parts.next()?, parts.next()?, parts.next());
        if minor != "0" || parts.next().is_some() {
            return None;
        }
        if let Some(patch) = patch {
            if patch.is_empty() || !patch.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
        }
        match major {
            "1" => Some(Vsn::V1),
            "2" => Some(Vsn::V2),
            _ => None,
        }
    }

    /// Both versions, in a fixed order for deterministic fan-out.
    pub const ALL: [Vsn; 2] = [Vsn::V1, Vsn::V2];
}

/// A decoded client frame, borrowing from the received bytes.
#[derive(Debug)]
pub struct Inbound<'a> {
    /// The join this message belongs to (`null` allowed).
    pub join_ref: Option<Cow<'a, str>>,
    /// The client's message reference, echoed in replies.
    pub ref_: Option<Cow<'a, str>>,
    /// `realtime:<sub>` or `phoenix`.
    pub topic: Cow<'a, str>,
    /// Phoenix event name (`phx_join`, `broadcast`, …).
    pub event: Cow<'a, str>,
    /// The payload.
    pub payload: InboundPayload<'a>,
}

/// The payload of an [`Inbound`] message.
#[derive(Debug)]
pub enum InboundPayload<'a> {
    /// A JSON value from a text frame.
    Json(&'a RawValue),
    /// A binary kind 3 user broadcast push.
    UserBroadcast(UserBroadcastPush),
    /// A binary kind 0 push: parsed, never routed.
    Binary(Bytes),
}

/// Why a frame could not be decoded. The frame is ignored; the socket stays open.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not JSON, or JSON of the wrong shape for the serializer.
    #[error("invalid JSON frame: {0}")]
    Json(String),
    /// A binary frame shorter than its header says.
    #[error("truncated binary frame")]
    Truncated,
    /// A binary kind the server does not accept from clients.
    #[error("unknown binary frame kind {0}")]
    UnknownKind(u8),
    /// A header string that is not UTF-8.
    #[error("binary frame header is not UTF-8")]
    Utf8,
    /// A kind 3 payload encoding other than 0 (binary) or 1 (JSON).
    #[error("unknown payload encoding {0}")]
    Encoding(u8),
    /// A binary frame on a vsn 1.0.0 socket.
    #[error("binary frame on a vsn 1.0.0 socket")]
    BinaryOnV1,
}

/// Decodes one client frame with the connection's serializer.
pub fn decode(vsn: Vsn, msg: &WsMessage) -> Result<Inbound<'_>, DecodeError> {
    match (vsn, msg) {
        (Vsn::V1, WsMessage::Text(text)) => v1::decode(text),
        (Vsn::V2, WsMessage::Text(text)) => v2::decode(text),
        (Vsn::V2, WsMessage::Binary(data)) => match decode_binary(data)? {
            BinaryFrame::Push {
                join_ref,
                ref_,
                topic,
                event,
                payload,
            } => Ok(Inbound {
                join_ref: join_ref.map(Cow::Owned),
                ref_: ref_.map(Cow::Owned),
                topic: Cow::Owned(topic),
                event: Cow::Owned(event),
                payload: InboundPayload::Binary(payload),
            }),
            BinaryFrame::UserBroadcastPush {
                join_ref,
                ref_,
                topic,
                push,
            } => Ok(Inbound {
                join_ref: join_ref.map(Cow::Owned),
                ref_: ref_.map(Cow::Owned),
                topic: Cow::Owned(topic),
                event: Cow::Borrowed("broadcast"),
                payload: InboundPayload::UserBroadcast(push),
            }),
        },
        (Vsn::V1, WsMessage::Binary(_)) => Err(DecodeError::BinaryOnV1),
    }
}

/// Encodes a text frame. `payload` must be JSON text; it is spliced in, not re-serialised.
pub fn encode_text(
    vsn: Vsn,
    join_ref: Option<&str>,
    ref_: Option<&str>,
    topic: &str,
    event: &str,
    payload: &str,
) -> WsMessage {
    let mut out = Vec::with_capacity(payload.len() + topic.len() + event.len() + 48);
    match vsn {
        Vsn::V1 => v1::encode(&mut out, ref_, topic, event, payload),
        Vsn::V2 => v2::encode(&mut out, join_ref, ref_, topic, event, payload),
    }
    WsMessage::Text(Bytes::from(out))
}

/// Encodes a `phx_reply`: `{"status": status, "response": response}`.
pub fn encode_reply(
    vsn: Vsn,
    join_ref: Option<&str>,
    ref_: Option<&str>,
    topic: &str,
    status: &str,
    response: &str,
) -> WsMessage {
    let payload = format!(r#"{{"status":"{status}","response":{response}}}"#);
    encode_text(vsn, join_ref, ref_, topic, "phx_reply", &payload)
}

/// Appends `s` as a JSON string literal.
pub(crate) fn push_json_str(out: &mut Vec<u8>, s: &str) {
    // Writing into a Vec cannot fail and a &str always serialises.
    serde_json::to_writer(&mut *out, s).expect("serialising a str into a Vec cannot fail");
}

/// `s` as a JSON string literal.
pub(crate) fn json_str(s: &str) -> String {
    serde_json::to_string(s).expect("serialising a str cannot fail")
}

fn push_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => push_json_str(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

#[cfg(test)]
mod tests;
