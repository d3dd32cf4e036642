//! Round trips for every frame kind in every serializer version.

use bytes::Bytes;
use proptest::prelude::*;
use serde_json::{json, Value};

use super::*;
use crate::broadcast::Encoding;

fn text_of(msg: &WsMessage) -> &[u8] {
    match msg {
        WsMessage::Text(text) => text,
        WsMessage::Binary(_) => panic!("expected text"),
    }
}

fn any_str() -> impl Strategy<Value = String> {
    prop_oneof!["[a-z:_0-9]{0,20}", any::<String>()]
}

fn short_str() -> impl Strategy<Value = String> {
    any_str().prop_filter("fits a binary header", |s| s.len() <= 255)
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<String>().prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map("[a-z]{1,4}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

#[test]
fn parses_vsn_like_phoenix() {
    assert_eq!(Vsn::parse(None), Some(Vsn::V1));
    assert_eq!(Vsn::parse(Some("1.0.0")), Some(Vsn::V1));
    assert_eq!(Vsn::parse(Some("2.0.0")), Some(Vsn::V2));
    assert_eq!(Vsn::parse(Some("2.0.5")), Some(Vsn::V2));
    assert_eq!(Vsn::parse(Some("3.0.0")), None);
    assert_eq!(Vsn::parse(Some("2.1.0")), None);
    assert_eq!(Vsn::parse(Some("")), None);
}

#[test]
fn v2_accepts_extra_elements_and_v1_a_missing_join_ref() {
    let msg = WsMessage::Text(Bytes::from_static(
        br#"[null,"1","phoenix","heartbeat",{},"extra"]"#,
    ));
    let inbound = decode(Vsn::V2, &msg).unwrap();
    assert_eq!(
        (&*inbound.topic, inbound.ref_.as_deref()),
        ("phoenix", Some("1"))
    );
    let msg = WsMessage::Text(Bytes::from_static(
        br#"{"topic":"phoenix","event":"heartbeat","payload":{},"ref":"2"}"#,
    ));
    assert_eq!(decode(Vsn::V1, &msg).unwrap().join_ref, None);
    let short = WsMessage::Text(Bytes::from_static(br#"[null,"1","phoenix","heartbeat"]"#));
    assert!(decode(Vsn::V2, &short).is_err());
}

#[test]
fn decodes_the_captured_realtime_js_binary_push() {
    let mut frame = vec![0x03, 0x01, 0x01, 0x0e, 0x06, 0x00, 0x01];
    frame.extend_from_slice(b"67realtime:room1cursor");
    frame.extend_from_slice("{\"x\":1,\"y\":\"é\"}".as_bytes());
    let msg = WsMessage::Binary(Bytes::from(frame));
    let inbound = decode(Vsn::V2, &msg).unwrap();
    assert_eq!(inbound.join_ref.as_deref(), Some("6"));
    assert_eq!(inbound.ref_.as_deref(), Some("7"));
    assert_eq!(&*inbound.topic, "realtime:room1");
    let InboundPayload::UserBroadcast(push) = inbound.payload else {
        panic!("kind 3")
    };
    assert_eq!(push.event, "cursor");
    assert_eq!(push.encoding, Encoding::Json);
    assert_eq!(&push.payload[..], "{\"x\":1,\"y\":\"é\"}".as_bytes());
}

proptest! {
    #[test]
    fn text_frames_round_trip(
        v2 in any::<bool>(),
        join_ref in prop::option::of(any_str()),
        ref_ in prop::option::of(any_str()),
        topic in any_str(),
        event in any_str(),
        payload in json_value(),
    ) {
        let vsn = if v2 { Vsn::V2 } else { Vsn::V1 };
        let payload_text = payload.to_string();
        let msg = encode_text(vsn, join_ref.as_deref(), ref_.as_deref(), &topic, &event, &payload_text);
        let value: Value = serde_json::from_slice(text_of(&msg)).unwrap();
        if v2 {
            prop_assert_eq!(value.as_array().map(Vec::len), Some(5));
        } else {
            prop_assert!(value.get("join_ref").is_none());
        }
        let inbound = decode(vsn, &msg).unwrap();
        let expected_join_ref = if v2 { join_ref } else { None };
        prop_assert_eq!(inbound.join_ref.map(|c| c.into_owned()), expected_join_ref);
        prop_assert_eq!(inbound.ref_.map(|c| c.into_owned()), ref_);
        prop_assert_eq!(&*inbound.topic, topic.as_str());
        prop_assert_eq!(&*inbound.event, event.as_str());
        let InboundPayload::Json(raw) = inbound.payload else { panic!("text payloads are JSON") };
        prop_assert_eq!(serde_json::from_str::<Value>(raw.get()).unwrap(), payload);
    }

    #[test]
    fn replies_round_trip(v2 in any::<bool>(), ref_ in any_str(), ok in any::<bool>(), response in json_value()) {
        let vsn = if v2 { Vsn::V2 } else { Vsn::V1 };
        let status = if ok { "ok" } else { "error" };
        let msg = encode_reply(vsn, None, Some(&ref_), "realtime:r", status, &response.to_string());
        let inbound = decode(vsn, &msg).unwrap();
        prop_assert_eq!(&*inbound.event, "phx_reply");
        let InboundPayload::Json(raw) = inbound.payload else { panic!() };
        let payload: Value = serde_json::from_str(raw.get()).unwrap();
        prop_assert_eq!(payload, json!({"status": status, "response": response}));
    }

    #[test]
    fn user_broadcast_push_round_trips(
        join_ref in prop::option::of(short_str().prop_filter("non-empty", |s| !s.is_empty())),
        ref_ in prop::option::of(short_str().prop_filter("non-empty", |s| !s.is_empty())),
        topic in short_str(),
        event in short_str(),
        metadata in prop::option::of(json_value().prop_map(|v| Bytes::from(json!({"m": v}).to_string())).prop_filter("fits", |b| b.len() <= 255)),
        binary in any::<bool>(),
        payload in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let push = UserBroadcastPush {
            event,
            metadata,
            encoding: if binary { Encoding::Binary } else { Encoding::Json },
            payload: Bytes::from(payload),
        };
        let frame = encode_user_broadcast_push(join_ref.as_deref(), ref_.as_deref(), &topic, &push).unwrap();
        let decoded = decode_binary(&frame).unwrap();
        prop_assert_eq!(decoded, BinaryFrame::UserBroadcastPush { join_ref, ref_, topic, push });
    }

    #[test]
    fn user_broadcast_round_trips(
        topic in short_str(),
        event in short_str(),
        metadata in prop::option::of(prop::collection::vec(any::<u8>(), 1..255)),
        binary in any::<bool>(),
        payload in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let encoding = if binary { Encoding::Binary } else { Encoding::Json };
        let frame = encode_user_broadcast(&topic, &event, metadata.as_deref(), encoding, &payload).unwrap();
        let decoded = decode_user_broadcast(&frame).unwrap();
        prop_assert_eq!(decoded, UserBroadcast {
            topic,
            event,
            metadata: metadata.map(Bytes::from),
            encoding,
            payload: Bytes::from(payload),
        });
    }

    #[test]
    fn generic_binary_push_round_trips(
        join_ref in short_str(),
        ref_ in short_str(),
        topic in short_str(),
        event in short_str(),
        payload in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut frame = vec![0, join_ref.len() as u8, ref_.len() as u8, topic.len() as u8, event.len() as u8];
        for part in [&join_ref, &ref_, &topic, &event] {
            frame.extend_from_slice(part.as_bytes());
        }
        frame.extend_from_slice(&payload);
        let decoded = decode_binary(&Bytes::from(frame)).unwrap();
        let none_if_empty = |s: String| (!s.is_empty()).then_some(s);
        prop_assert_eq!(decoded, BinaryFrame::Push {
            join_ref: none_if_empty(join_ref),
            ref_: none_if_empty(ref_),
            topic,
            event,
            payload: Bytes::from(payload),
        });
    }

    #[test]
    fn arbitrary_binary_never_panics_the_decoder(data in prop::collection::vec(any::<u8>(), 0..300)) {
        let data = Bytes::from(data);
        let _ = decode_binary(&data);
        let _ = decode_user_broadcast(&data);
    }
}
