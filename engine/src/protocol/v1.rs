//! Phoenix V1 JSON serializer: every frame is an object. Server frames never carry
//! `join_ref` (Phoenix `encode_v1_fields_only`).

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::{push_json_str, push_opt_str, DecodeError, Inbound, InboundPayload};

#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(borrow)]
    topic: Cow<'a, str>,
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(borrow)]
    payload: &'a RawValue,
    #[serde(default, borrow, rename = "ref")]
    ref_: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    join_ref: Option<Cow<'a, str>>,
}

pub(super) fn decode(text: &[u8]) -> Result<Inbound<'_>, DecodeError> {
    let frame: Frame<'_> =
        serde_json::from_slice(text).map_err(|e| DecodeError::Json(e.to_string()))?;
    Ok(Inbound {
        join_ref: frame.join_ref,
        ref_: frame.ref_,
        topic: frame.topic,
        event: frame.event,
        payload: InboundPayload::Json(frame.payload),
    })
}

pub(super) fn encode(
    out: &mut Vec<u8>,
    ref_: Option<&str>,
    topic: &str,
    event: &str,
    payload: &str,
) {
    out.extend_from_slice(b"{\"topic\":");
    push_json_str(out, topic);
    out.extend_from_slice(b",\"event\":");
    push_json_str(out, event);
    out.extend_from_slice(b",\"payload\":");
    out.extend_from_slice(payload.as_bytes());
    out.extend_from_slice(b",\"ref\":");
    push_opt_str(out, ref_);
    out.push(b'}');
}
