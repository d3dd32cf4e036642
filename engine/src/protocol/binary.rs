//! vsn 2.0.0 binary frames: a kind byte, one length byte per header string, the strings,
//! then the raw payload. Clients send kind 0 (push) and kind 3 (user broadcast push); the
//! server only ever sends kind 4 (user broadcast), the one kind realtime-js decodes.

use bytes::Bytes;

use super::DecodeError;
use crate::broadcast::Encoding;

const KIND_PUSH: u8 = 0;
const KIND_USER_BROADCAST_PUSH: u8 = 3;
const KIND_USER_BROADCAST: u8 = 4;

/// A decoded client binary frame.
#[derive(Debug, PartialEq, Eq)]
pub enum BinaryFrame {
    /// Kind 0: a generic Phoenix push with an opaque payload.
    Push {
        /// The join this push belongs to.
        join_ref: Option<String>,
        /// The push reference.
        ref_: Option<String>,
        /// The topic.
        topic: String,
        /// The Phoenix event.
        event: String,
        /// The opaque payload.
        payload: Bytes,
    },
    /// Kind 3: a broadcast push with the user event in the header.
    UserBroadcastPush {
        /// The join this push belongs to.
        join_ref: Option<String>,
        /// The push reference, echoed by an ack.
        ref_: Option<String>,
        /// The topic, `realtime:<sub>`.
        topic: String,
        /// The broadcast itself.
        push: UserBroadcastPush,
    },
}

/// The body of a kind 3 frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserBroadcastPush {
    /// The application's event name.
    pub event: String,
    /// Metadata JSON object (e.g. `{"persist":true}`), accepted and ignored.
    pub metadata: Option<Bytes>,
    /// How `payload` is encoded.
    pub encoding: Encoding,
    /// JSON text or raw bytes, sliced from the frame without copying.
    pub payload: Bytes,
}

struct Reader<'a> {
    data: &'a Bytes,
    at: usize,
}

impl Reader<'_> {
    fn byte(&mut self) -> Result<u8, DecodeError> {
        let b = *self.data.get(self.at).ok_or(DecodeError::Truncated)?;
        self.at += 1;
        Ok(b)
    }

    fn bytes(&mut self, len: usize) -> Result<Bytes, DecodeError> {
        if self.data.len() - self.at < len {
            return Err(DecodeError::Truncated);
        }
        let slice = self.data.slice(self.at..self.at + len);
        self.at += len;
        Ok(slice)
    }

    fn string(&mut self, len: u8) -> Result<String, DecodeError> {
        let bytes = self.bytes(len as usize)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::Utf8)
    }

    /// Empty refs mean "none": realtime-js never sends them empty, Phoenix sends `""` for
    /// a missing join_ref.
    fn opt_string(&mut self, len: u8) -> Result<Option<String>, DecodeError> {
        let s = self.string(len)?;
        Ok((!s.is_empty()).then_some(s))
    }

    fn encoding(&mut self) -> Result<Encoding, DecodeError> {
        match self.byte()? {
            0 => Ok(Encoding::Binary),
            1 => Ok(Encoding::Json),
            other => Err(DecodeError::Encoding(other)),
        }
    }

    /// Metadata of `len` bytes, absent when the length is 0.
    fn metadata(&mut self, len: u8) -> Result<Option<Bytes>, DecodeError> {
        (len > 0).then(|| self.bytes(len as usize)).transpose()
    }

    fn rest(&mut self) -> Bytes {
        let rest = self.data.slice(self.at..);
        self.at = self.data.len();
        rest
    }
}

/// Decodes a client binary frame (kind 0 or 3).
pub fn decode_binary(data: &Bytes) -> Result<BinaryFrame, DecodeError> {
    let mut r = Reader { data, at: 0 };
    match r.byte()? {
        KIND_PUSH => {
            let (j, rf, t, e) = (r.byte()?, r.byte()?, r.byte()?, r.byte()?);
            Ok(BinaryFrame::Push {
                join_ref: r.opt_string(j)?,
                ref_: r.opt_string(rf)?,
                topic: r.string(t)?,
                event: r.string(e)?,
                payload: r.rest(),
            })
        }
        KIND_USER_BROADCAST_PUSH => {
            let (j, rf, t, e, m) = (r.byte()?, r.byte()?, r.byte()?, r.byte()?, r.byte()?);
            let encoding = r.encoding()?;
            let join_ref = r.opt_string(j)?;
            let ref_ = r.opt_string(rf)?;
            let topic = r.string(t)?;
            let event = r.string(e)?;
            let metadata = r.metadata(m)?;
            let payload = r.rest();
            Ok(BinaryFrame::UserBroadcastPush {
                join_ref,
                ref_,
                topic,
                push: UserBroadcastPush {
                    event,
                    metadata,
                    encoding,
                    payload,
                },
            })
        }
        other => Err(DecodeError::UnknownKind(other)),
    }
}

/// Encodes a kind 4 user broadcast, or `None` when a header string exceeds 255 bytes and
/// cannot be carried in a binary frame.
pub fn encode_user_broadcast(
    topic: &str,
    event: &str,
    metadata: Option<&[u8]>,
    encoding: Encoding,
    payload: &[u8],
) -> Option<Bytes> {
    let meta = metadata.unwrap_or_default();
    let (t, e, m) = (
        len_u8(topic.len())?,
        len_u8(event.len())?,
        len_u8(meta.len())?,
    );
    let mut out = Vec::with_capacity(5 + topic.len() + event.len() + meta.len() + payload.len());
    out.extend_from_slice(&[KIND_USER_BROADCAST, t, e, m, encoding as u8]);
    out.extend_from_slice(topic.as_bytes());
    out.extend_from_slice(event.as_bytes());
    out.extend_from_slice(meta);
    out.extend_from_slice(payload);
    Some(Bytes::from(out))
}

/// Encodes a kind 3 push as realtime-js does: what simulated clients and the load
/// generator send.
pub fn encode_user_broadcast_push(
    join_ref: Option<&str>,
    ref_: Option<&str>,
    topic: &str,
    push: &UserBroadcastPush,
) -> Option<Bytes> {
    let (join_ref, ref_) = (join_ref.unwrap_or_default(), ref_.unwrap_or_default());
    let meta = push.metadata.as_deref().unwrap_or_default();
    let header = [
        KIND_USER_BROADCAST_PUSH,
        len_u8(join_ref.len())?,
        len_u8(ref_.len())?,
        len_u8(topic.len())?,
        len_u8(push.event.len())?,
        len_u8(meta.len())?,
        push.encoding as u8,
    ];
    let mut out = Vec::with_capacity(header.len() + 64 + push.payload.len());
    out.extend_from_slice(&header);
    for part in [
        join_ref.as_bytes(),
        ref_.as_bytes(),
        topic.as_bytes(),
        push.event.as_bytes(),
        meta,
    ] {
        out.extend_from_slice(part);
    }
    out.extend_from_slice(&push.payload);
    Some(Bytes::from(out))
}

/// A decoded kind 4 frame, as a client sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserBroadcast {
    /// The recipient's joined topic.
    pub topic: String,
    /// The application's event name.
    pub event: String,
    /// Metadata JSON object, if any.
    pub metadata: Option<Bytes>,
    /// How `payload` is encoded.
    pub encoding: Encoding,
    /// The payload.
    pub payload: Bytes,
}

/// Decodes a kind 4 frame as realtime-js does: for simulated clients and tests.
pub fn decode_user_broadcast(data: &Bytes) -> Result<UserBroadcast, DecodeError> {
    let mut r = Reader { data, at: 0 };
    let kind = r.byte()?;
    if kind != KIND_USER_BROADCAST {
        return Err(DecodeError::UnknownKind(kind));
    }
    let (t, e, m) = (r.byte()?, r.byte()?, r.byte()?);
    let encoding = r.encoding()?;
    let topic = r.string(t)?;
    let event = r.string(e)?;
    let metadata = r.metadata(m)?;
    Ok(UserBroadcast {
        topic,
        event,
        metadata,
        encoding,
        payload: r.rest(),
    })
}

fn len_u8(len: usize) -> Option<u8> {
    u8::try_from(len).ok()
}
