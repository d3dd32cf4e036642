//! Phoenix V2 JSON serializer: `[join_ref, ref, topic, event, payload]`. Upstream accepts
//! arrays of five or more elements and ignores the extras; so do we.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde_json::value::RawValue;

use super::{push_json_str, push_opt_str, DecodeError, Inbound, InboundPayload};

struct FrameVisitor;

impl<'de> Visitor<'de> for FrameVisitor {
    type Value = Inbound<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[join_ref, ref, topic, event, payload]")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Inbound<'de>, A::Error> {
        let missing = || de::Error::custom("a v2 frame has five elements");
        let join_ref: Option<Cow<'de, str>> = seq.next_element()?.ok_or_else(missing)?;
        let ref_: Option<Cow<'de, str>> = seq.next_element()?.ok_or_else(missing)?;
        let topic: Cow<'de, str> = seq.next_element()?.ok_or_else(missing)?;
        let event: Cow<'de, str> = seq.next_element()?.ok_or_else(missing)?;
        let payload: &'de RawValue = seq.next_element()?.ok_or_else(missing)?;
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Inbound {
            join_ref,
            ref_,
            topic,
            event,
            payload: InboundPayload::Json(payload),
        })
    }
}

struct Frame<'a>(Inbound<'a>);

impl<'de> serde::Deserialize<'de> for Frame<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_seq(FrameVisitor).map(Frame)
    }
}

pub(super) fn decode(text: &[u8]) -> Result<Inbound<'_>, DecodeError> {
    serde_json::from_slice::<Frame<'_>>(text)
        .map(|frame| frame.0)
        .map_err(|e| DecodeError::Json(e.to_string()))
}

pub(super) fn encode(
    out: &mut Vec<u8>,
    join_ref: Option<&str>,
    ref_: Option<&str>,
    topic: &str,
    event: &str,
    payload: &str,
) {
    out.push(b'[');
    push_opt_str(out, join_ref);
    out.push(b',');
    push_opt_str(out, ref_);
    out.push(b',');
    push_json_str(out, topic);
    out.push(b',');
    push_json_str(out, event);
    out.push(b',');
    out.extend_from_slice(payload.as_bytes());
    out.push(b']');
}
