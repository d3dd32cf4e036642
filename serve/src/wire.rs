//! WebSocket frames on the wire (RFC 6455), as a server reads and writes them: a decoder
//! that holds no buffer between messages, and the encoding of the outbox's frames.
//!
//! Why not tungstenite's `WebSocket`: every socket keeps a read and a write buffer there,
//! and both keep their capacity once used, about 800 B of an idle joined socket. Here a
//! socket reads into its thread's buffer and keeps only the bytes of a header, frame or
//! message it has not seen whole; writes are gathered in the thread's buffer, and a socket
//! keeps only what the kernel would not take. Headers are still parsed and written by
//! tungstenite's `FrameHeader`; buffering and the rules of RFC 6455 §5 are what is ours.
//!
//! Public so that `fuzz/` can drive the [`Decoder`] with arbitrary bytes.

use std::io::Cursor;

use bytes::Bytes;
use switchboard_engine::{FrameError, WsMessage};
use tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;
use tungstenite::Message;

/// What a client's frames amount to, once whole.
#[derive(Debug, PartialEq)]
pub enum Event {
    /// A text or binary message, reassembled from its fragments.
    Message(WsMessage),
    /// A ping, to be answered with a pong of this payload.
    Ping(Bytes),
    /// The client's close frame, with its status code if it gave one.
    Close(Option<u16>),
}

/// A client's frames decoded into [`Event`]s, from chunks of any size.
///
/// Between messages it holds nothing on the heap. A header cut short by a read is carried
/// until the next; a frame's payload and a fragmented message's are kept as they arrive,
/// bounded by the size limit. Pongs are dropped: nothing here sends pings.
#[derive(Debug)]
pub struct Decoder {
    /// Bytes taken and not yet decoded: a header cut short, or whatever followed an event
    /// the caller could not take yet ([`Decoder::keep`]).
    carry: Vec<u8>,
    /// The frame whose payload is arriving, once its header was read.
    frame: Option<Box<Partial>>,
    /// The fragments so far of a message sent in several frames.
    message: Option<Box<Fragments>>,
    /// The largest frame or message accepted.
    max: usize,
}

#[derive(Debug)]
struct Partial {
    header: FrameHeader,
    /// Payload bytes still to come.
    need: usize,
    /// Masked, as they arrived.
    payload: Vec<u8>,
}

#[derive(Debug)]
struct Fragments {
    text: bool,
    payload: Vec<u8>,
}

impl Decoder {
    /// A decoder of messages up to `max` bytes, which starts with `read`: what was read past
    /// the upgrade request.
    pub fn new(max: usize, read: Vec<u8>) -> Decoder {
        Decoder {
            carry: read,
            frame: None,
            message: None,
            max,
        }
    }

    /// The next event from what is carried, then `input`, which is advanced past what was
    /// used. `None` once `input` is used up: what it held of an unfinished frame is kept.
    /// After an error the decoder is of no further use.
    pub fn next(&mut self, input: &mut &[u8]) -> Result<Option<Event>, FrameError> {
        if self.carry.is_empty() {
            let event = self.step(input)?;
            if event.is_none() {
                // A header cut short; everything else was taken into the frame.
                self.carry.extend_from_slice(input);
                *input = &[];
            }
            return Ok(event);
        }
        let mut carry = std::mem::take(&mut self.carry);
        carry.extend_from_slice(input);
        *input = &[];
        let mut rest = &carry[..];
        let event = self.step(&mut rest)?;
        let used = carry.len() - rest.len();
        if used < carry.len() {
            carry.drain(..used);
            self.carry = carry;
        }
        Ok(event)
    }

    /// Keeps `rest`, which followed the last event, for the next call: the caller had no
    /// room for more events.
    pub fn keep(&mut self, rest: &[u8]) {
        self.carry.extend_from_slice(rest);
    }

    /// Decodes from `input` until an event is whole or `input` ends with at most a header
    /// cut short, which is left in `input`.
    fn step(&mut self, input: &mut &[u8]) -> Result<Option<Event>, FrameError> {
        loop {
            let Some(mut partial) = self.frame.take() else {
                let mut cursor = Cursor::new(*input);
                let Some((header, len)) =
                    FrameHeader::parse(&mut cursor).map_err(|_| FrameError::Protocol)?
                else {
                    return Ok(None);
                };
                let len = self.admit(&header, len)?;
                // At most 14 bytes were parsed from `input`.
                *input = &input[cursor.position() as usize..];
                if input.len() >= len {
                    let (payload, rest) = input.split_at(len);
                    *input = rest;
                    match self.complete(header, payload.to_vec())? {
                        Some(event) => return Ok(Some(event)),
                        None => continue,
                    }
                }
                self.frame = Some(Box::new(Partial {
                    header,
                    need: len - input.len(),
                    payload: input.to_vec(),
                }));
                *input = &[];
                return Ok(None);
            };
            let take = partial.need.min(input.len());
            let payload = &mut partial.payload;
            if payload.capacity() - payload.len() < take {
                // Doubling, but never past the frame's length.
                let len = payload.len();
                let target = (len * 2).max(len + take).min(len + partial.need);
                payload.reserve_exact(target - len);
            }
            payload.extend_from_slice(&input[..take]);
            partial.need -= take;
            *input = &input[take..];
            if partial.need > 0 {
                self.frame = Some(partial);
                return Ok(None);
            }
            let Partial {
                header, payload, ..
            } = *partial;
            if let Some(event) = self.complete(header, payload)? {
                return Ok(Some(event));
            }
        }
    }

    /// Checks a frame's header against the protocol, the size limit and the message in
    /// progress; its payload length if it passes. Reserved opcodes never get here:
    /// `FrameHeader::parse` refuses them.
    fn admit(&self, header: &FrameHeader, len: u64) -> Result<usize, FrameError> {
        if header.rsv1 || header.rsv2 || header.rsv3 || header.mask.is_none() {
            // No extension is negotiated, and a client masks every frame.
            return Err(FrameError::Protocol);
        }
        if matches!(header.opcode, OpCode::Control(_)) && (!header.is_final || len > 125) {
            return Err(FrameError::Protocol);
        }
        let len = usize::try_from(len)
            .ok()
            .filter(|&len| len <= self.max)
            .ok_or(FrameError::TooLarge)?;
        match (header.opcode, &self.message) {
            (OpCode::Data(Data::Continue), None) => Err(FrameError::Protocol),
            (OpCode::Data(Data::Continue), Some(message))
                if message.payload.len() + len > self.max =>
            {
                Err(FrameError::TooLarge)
            }
            (OpCode::Data(Data::Text | Data::Binary), Some(_)) => Err(FrameError::Protocol),
            _ => Ok(len),
        }
    }

    /// A whole frame, as an event if it ends one.
    fn complete(
        &mut self,
        header: FrameHeader,
        mut payload: Vec<u8>,
    ) -> Result<Option<Event>, FrameError> {
        if let Some(mask) = header.mask {
            unmask(&mut payload, mask);
        }
        match header.opcode {
            OpCode::Control(Control::Close) => match payload.len() {
                0 => Ok(Some(Event::Close(None))),
                1 => Err(FrameError::Protocol),
                _ => {
                    std::str::from_utf8(&payload[2..]).map_err(|_| FrameError::InvalidUtf8)?;
                    let code = u16::from_be_bytes([payload[0], payload[1]]);
                    Ok(Some(Event::Close(Some(code))))
                }
            },
            OpCode::Control(Control::Ping) => Ok(Some(Event::Ping(payload.into()))),
            OpCode::Control(Control::Pong) => Ok(None),
            OpCode::Data(Data::Continue) => {
                let Some(mut message) = self.message.take() else {
                    return Err(FrameError::Protocol);
                };
                message.payload.extend_from_slice(&payload);
                if !header.is_final {
                    self.message = Some(message);
                    return Ok(None);
                }
                whole(message.text, message.payload)
            }
            OpCode::Data(data @ (Data::Text | Data::Binary)) => {
                let text = data == Data::Text;
                if header.is_final {
                    return whole(text, payload);
                }
                self.message = Some(Box::new(Fragments { text, payload }));
                Ok(None)
            }
            OpCode::Control(Control::Reserved(_)) | OpCode::Data(Data::Reserved(_)) => {
                Err(FrameError::Protocol)
            }
        }
    }
}

/// A whole message; text must be UTF-8.
fn whole(text: bool, payload: Vec<u8>) -> Result<Option<Event>, FrameError> {
    if !text {
        return Ok(Some(Event::Message(WsMessage::Binary(payload.into()))));
    }
    std::str::from_utf8(&payload).map_err(|_| FrameError::InvalidUtf8)?;
    Ok(Some(Event::Message(WsMessage::Text(payload.into()))))
}

/// Every event of `bytes`, fed to a fresh decoder of messages up to `max` bytes `chunk`
/// bytes at a time, up to the first error: how the tests and the fuzz target check that
/// the way reads cut the bytes changes nothing.
pub fn decode_in_chunks(bytes: &[u8], chunk: usize, max: usize) -> Vec<Result<Event, FrameError>> {
    let mut decoder = Decoder::new(max, Vec::new());
    let mut events = Vec::new();
    for mut input in bytes.chunks(chunk.max(1)) {
        loop {
            match decoder.next(&mut input) {
                Ok(Some(event)) => events.push(Ok(event)),
                Ok(None) => break,
                Err(error) => {
                    events.push(Err(error));
                    return events;
                }
            }
        }
        debug_assert!(input.is_empty(), "`None` means the input was used up");
    }
    events
}

/// Undoes a client's masking (RFC 6455 §5.3).
fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let word = u32::from_ne_bytes(mask);
    let mut chunks = payload.chunks_exact_mut(4);
    for chunk in &mut chunks {
        let masked = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]) ^ word;
        chunk.copy_from_slice(&masked.to_ne_bytes());
    }
    for (byte, key) in chunks.into_remainder().iter_mut().zip(mask) {
        *byte ^= key;
    }
}

/// Appends `frame` to `out` as a server sends it: one final, unmasked frame.
pub(crate) fn encode(frame: &Message, out: &mut Vec<u8>) {
    let (opcode, payload): (OpCode, &[u8]) = match frame {
        Message::Text(text) => (OpCode::Data(Data::Text), text.as_bytes()),
        Message::Binary(data) => (OpCode::Data(Data::Binary), data),
        Message::Ping(data) => (OpCode::Control(Control::Ping), data),
        Message::Pong(data) => (OpCode::Control(Control::Pong), data),
        Message::Close(close) => {
            let (code, reason) = close.as_ref().map_or((None, ""), |close| {
                (Some(close.code), close.reason.as_str())
            });
            return encode_close(code, reason, out);
        }
        Message::Frame(frame) => (frame.header().opcode, frame.payload()),
    };
    header(opcode, payload.len(), out);
    out.extend_from_slice(payload);
}

/// Appends a close frame: `code` and `reason`, or an empty payload without a code.
fn encode_close(code: Option<CloseCode>, reason: &str, out: &mut Vec<u8>) {
    let opcode = OpCode::Control(Control::Close);
    let Some(code) = code else {
        return header(opcode, 0, out);
    };
    header(opcode, 2 + reason.len(), out);
    out.extend_from_slice(&u16::from(code).to_be_bytes());
    out.extend_from_slice(reason.as_bytes());
}

/// Appends the reply to a client's close frame: its code echoed (RFC 6455 §5.5.1), 1002
/// for a code no endpoint may send, and no code if it gave none.
pub(crate) fn encode_close_reply(code: Option<u16>, out: &mut Vec<u8>) {
    let code = code.map(|code| match CloseCode::from(code) {
        code if code.is_allowed() => code,
        _ => CloseCode::Protocol,
    });
    encode_close(code, "", out);
}

fn header(opcode: OpCode, len: usize, out: &mut Vec<u8>) {
    let header = FrameHeader {
        opcode,
        ..FrameHeader::default()
    };
    // Writing to a `Vec` cannot fail.
    let _ = header.format(len as u64, out);
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use tungstenite::protocol::frame::Frame;

    use super::*;

    /// A client's frame: masked with `mask`.
    fn client(opcode: OpCode, fin: bool, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let header = FrameHeader {
            is_final: fin,
            opcode,
            mask: Some(mask),
            ..FrameHeader::default()
        };
        let mut out = Vec::new();
        Frame::from_payload(header, Bytes::copy_from_slice(payload))
            .format(&mut out)
            .expect("a Vec takes every write");
        out
    }

    const TEXT: OpCode = OpCode::Data(Data::Text);
    const BINARY: OpCode = OpCode::Data(Data::Binary);
    const CONTINUE: OpCode = OpCode::Data(Data::Continue);
    const PING: OpCode = OpCode::Control(Control::Ping);
    const CLOSE: OpCode = OpCode::Control(Control::Close);

    fn text(s: &str) -> Result<Event, FrameError> {
        Ok(Event::Message(WsMessage::Text(Bytes::copy_from_slice(
            s.as_bytes(),
        ))))
    }

    #[test]
    fn fragments_and_control_frames_between_them() {
        let mask = [1, 2, 3, 4];
        let mut bytes = client(TEXT, false, b"hel", mask);
        bytes.extend(client(PING, true, b"p", mask));
        bytes.extend(client(CONTINUE, true, "lo ✓".as_bytes(), mask));
        bytes.extend(client(BINARY, true, &[0, 255], mask));
        bytes.extend(client(CLOSE, true, &[3, 232, b'b', b'y', b'e'], mask));
        for chunk in [1, 2, 3, 7, 1000] {
            assert_eq!(
                decode_in_chunks(&bytes, chunk, 1024),
                vec![
                    Ok(Event::Ping(Bytes::from_static(b"p"))),
                    text("hello ✓"),
                    Ok(Event::Message(WsMessage::Binary(Bytes::from_static(&[
                        0, 255
                    ])))),
                    Ok(Event::Close(Some(1000))),
                ],
                "chunks of {chunk}"
            );
        }
    }

    #[test]
    fn what_breaks_the_protocol_or_the_limits_is_refused() {
        let mask = [9, 8, 7, 6];
        let unmasked = {
            let mut out = Vec::new();
            let _ = FrameHeader {
                opcode: TEXT,
                ..FrameHeader::default()
            }
            .format(2, &mut out);
            out.extend_from_slice(b"hi");
            out
        };
        let mut reserved_bit = client(TEXT, true, b"x", mask);
        reserved_bit[0] |= 0x40;
        let mut two_starts = client(TEXT, false, b"a", mask);
        two_starts.extend(client(TEXT, true, b"b", mask));
        let mut over_in_pieces = client(BINARY, false, &[0; 6], mask);
        over_in_pieces.extend(client(CONTINUE, true, &[0; 5], mask));
        let cases: Vec<(&str, Vec<u8>, FrameError)> = vec![
            ("unmasked", unmasked, FrameError::Protocol),
            ("reserved bit", reserved_bit, FrameError::Protocol),
            (
                "reserved opcode",
                client(OpCode::Data(Data::Reserved(3)), true, b"", mask),
                FrameError::Protocol,
            ),
            (
                "lone continuation",
                client(CONTINUE, true, b"x", mask),
                FrameError::Protocol,
            ),
            (
                "a new message mid-message",
                two_starts,
                FrameError::Protocol,
            ),
            (
                "fragmented ping",
                client(PING, false, b"", mask),
                FrameError::Protocol,
            ),
            (
                "ping over 125 bytes",
                client(PING, true, &[0; 126], mask),
                FrameError::Protocol,
            ),
            (
                "close of one byte",
                client(CLOSE, true, &[3], mask),
                FrameError::Protocol,
            ),
            (
                "frame over the limit",
                client(BINARY, true, &[0; 11], mask),
                FrameError::TooLarge,
            ),
            (
                "message over the limit",
                over_in_pieces,
                FrameError::TooLarge,
            ),
            (
                "text not UTF-8",
                client(TEXT, true, &[0xff, 0xfe], mask),
                FrameError::InvalidUtf8,
            ),
        ];
        for (name, bytes, error) in cases {
            for chunk in [1, 5, 1000] {
                assert_eq!(
                    decode_in_chunks(&bytes, chunk, 10).pop(),
                    Some(Err(error)),
                    "{name}, chunks of {chunk}"
                );
            }
        }
    }

    #[test]
    fn nothing_is_held_between_messages() {
        let mut decoder = Decoder::new(1 << 20, Vec::new());
        let bytes = client(BINARY, true, &[7; 100_000], [1, 2, 3, 4]);
        let (head, tail) = bytes.split_at(5);
        assert_eq!(decoder.next(&mut &head[..]), Ok(None));
        assert_eq!(decoder.carry.len(), 5, "a header cut short is carried");
        let (middle, tail) = tail.split_at(50_000);
        assert_eq!(decoder.next(&mut &middle[..]), Ok(None));
        assert!(decoder.carry.is_empty() && decoder.frame.is_some());
        let event = decoder.next(&mut &tail[..]).expect("valid");
        assert!(matches!(event, Some(Event::Message(WsMessage::Binary(b))) if b.len() == 100_000));
        assert!(
            decoder.carry.capacity() == 0 && decoder.frame.is_none() && decoder.message.is_none()
        );
    }

    #[test]
    fn kept_input_comes_back_before_new_input() {
        let mask = [0; 4];
        let mut bytes = client(TEXT, true, b"a", mask);
        bytes.extend(client(TEXT, true, b"b", mask));
        let mut decoder = Decoder::new(100, Vec::new());
        let mut input = &bytes[..];
        assert_eq!(decoder.next(&mut input).map(Option::unwrap), text("a"));
        decoder.keep(input);
        let more = client(TEXT, true, b"c", mask);
        let mut input = &more[..];
        assert_eq!(decoder.next(&mut &[][..]).map(Option::unwrap), text("b"));
        assert_eq!(decoder.next(&mut input).map(Option::unwrap), text("c"));
        assert!(decoder.carry.capacity() == 0);
    }

    #[test]
    fn frames_encode_as_a_client_reads_them() {
        use tungstenite::protocol::frame::FrameSocket;
        use tungstenite::protocol::CloseFrame;
        let frames = [
            Message::Text("héllo".into()),
            Message::Binary(Bytes::from(vec![1; 70_000])),
            Message::Close(Some(CloseFrame {
                code: CloseCode::Size,
                reason: "too big".into(),
            })),
        ];
        let mut bytes = Vec::new();
        for frame in &frames {
            encode(frame, &mut bytes);
        }
        encode_close_reply(Some(1005), &mut bytes);
        encode_close_reply(None, &mut bytes);
        let mut socket = FrameSocket::new(Cursor::new(bytes));
        let mut read = || socket.read(None).expect("valid").expect("a frame");
        assert_eq!(read().into_text().expect("text"), "héllo");
        assert_eq!(read().into_payload(), vec![1; 70_000]);
        assert_eq!(read().payload(), b"\x03\xf1too big");
        assert_eq!(read().payload(), b"\x03\xea", "1005 is never sent: 1002");
        assert!(read().payload().is_empty());
    }

    /// A message sent as a client may: fragments of random sizes with pings between them.
    fn message() -> impl Strategy<Value = (bool, Vec<u8>, Vec<usize>, bool)> {
        (
            any::<bool>(),
            prop::collection::vec(any::<u8>(), 0..300),
            prop::collection::vec(0usize..100, 0..4),
            any::<bool>(),
        )
    }

    proptest! {
        /// However the bytes are cut into reads, the events are the ones sent, in order.
        #[test]
        fn events_do_not_depend_on_how_reads_cut_the_bytes(
            messages in prop::collection::vec(message(), 1..8),
            mask in any::<[u8; 4]>(),
            chunk in 1usize..64,
        ) {
            let mut bytes = Vec::new();
            let mut expected = Vec::new();
            for (text, payload, cuts, ping) in messages {
                let payload = if text {
                    String::from_utf8_lossy(&payload).into_owned().into_bytes()
                } else {
                    payload
                };
                let mut at = 0;
                let mut opcode = if text { TEXT } else { BINARY };
                for cut in cuts {
                    let end = (at + cut).min(payload.len());
                    bytes.extend(client(opcode, false, &payload[at..end], mask));
                    if ping {
                        bytes.extend(client(PING, true, b"x", mask));
                        expected.push(Ok(Event::Ping(Bytes::from_static(b"x"))));
                    }
                    opcode = CONTINUE;
                    at = end;
                }
                bytes.extend(client(opcode, true, &payload[at..], mask));
                let payload = Bytes::from(payload);
                expected.push(Ok(Event::Message(if text {
                    WsMessage::Text(payload)
                } else {
                    WsMessage::Binary(payload)
                })));
            }
            prop_assert_eq!(decode_in_chunks(&bytes, chunk, 1024), expected);
        }

        /// Arbitrary bytes end in events or an error, never a panic, and cut any way they
        /// give the same.
        #[test]
        fn arbitrary_bytes_decode_the_same_in_any_chunks(
            bytes in prop::collection::vec(any::<u8>(), 0..400),
            chunk in 1usize..32,
        ) {
            prop_assert_eq!(
                decode_in_chunks(&bytes, chunk, 256),
                decode_in_chunks(&bytes, bytes.len(), 256)
            );
        }
    }
}
