//! Broadcast rules: event names, self, ack, isolation, REST, order, encodings.

use bytes::Bytes;
use serde_json::{json, Value};

use super::{Received, TestEngine};
use crate::protocol::{encode_user_broadcast_push, UserBroadcastPush, Vsn};
use crate::rest::{RestAuth, RestRequest};
use crate::{Encoding, To, WsMessage};

#[test]
fn broadcast_reaches_other_members_with_event_name_and_payload() {
    let mut t = TestEngine::new();
    let (a, b, c) = (t.connect(Vsn::V2), t.connect(Vsn::V2), t.connect(Vsn::V1));
    for conn in [a, b, c] {
        t.join(conn, "room1", json!({}));
    }
    t.broadcast(a, "room1", "cursor", json!({"x": 1, "extra": [1, 2]}));
    assert!(t.broadcasts(a).is_empty(), "self defaults to false");
    assert_eq!(
        t.broadcasts(b),
        vec![("cursor".to_owned(), json!({"x": 1, "extra": [1, 2]}))]
    );
    assert_eq!(
        t.broadcasts(c),
        vec![("cursor".to_owned(), json!({"x": 1, "extra": [1, 2]}))]
    );
}

#[test]
fn text_push_is_relayed_verbatim_including_extra_keys() {
    let mut t = TestEngine::new();
    let (a, b) = (t.connect(Vsn::V2), t.connect(Vsn::V2));
    t.join(a, "r", json!({}));
    t.join(b, "r", json!({}));
    let payload = json!({"type": "broadcast", "event": "e", "payload": {"k": "v"}, "custom": true});
    t.push(a, "r", "broadcast", payload.clone());
    let got = t.take(b);
    assert_eq!(
        got,
        vec![Received::Text {
            join_ref: None,
            ref_: None,
            topic: "realtime:r".into(),
            event: "broadcast".into(),
            payload
        }]
    );
}

#[test]
fn self_true_echoes_exactly_once() {
    let mut t = TestEngine::new();
    let a = t.connect(Vsn::V2);
    t.join(a, "r", json!({"broadcast": {"self": true}}));
    t.broadcast(a, "r", "ping", json!({}));
    assert_eq!(t.broadcasts(a), vec![("ping".to_owned(), json!({}))]);
}

#[test]
fn self_as_string_is_honoured() {
    let mut t = TestEngine::new();
    let a = t.connect(Vsn::V2);
    t.join(a, "r", json!({"broadcast": {"self": "TRUE", "ack": 7}}));
    let r = t.broadcast(a, "r", "ping", json!({}));
    let got = t.take(a);
    assert_eq!(
        got.len(),
        1,
        "echo only: an invalid ack value falls back to false"
    );
    assert!(!got
        .iter()
        .any(|m| matches!(m, Received::Text { ref_: Some(x), .. } if *x == r)));
}

#[test]
fn ack_true_replies_ok_after_routing_and_ack_false_never_replies() {
    let mut t = TestEngine::new();
    let (a, b) = (t.connect(Vsn::V2), t.connect(Vsn::V2));
    t.join(a, "r", json!({"broadcast": {"ack": true}}));
    t.join(b, "r", json!({}));
    let ref_ = t.broadcast(a, "r", "e", json!({}));
    let got = t.take(a);
    assert_eq!(got.len(), 1);
    let Received::Text {
        event,
        ref_: Some(r),
        join_ref,
        payload,
        ..
    } = &got[0]
    else {
        panic!()
    };
    assert_eq!((event.as_str(), r.as_str()), ("phx_reply", ref_.as_str()));
    assert_eq!(join_ref.as_deref(), Some(t.join_ref(a, "r").as_str()));
    assert_eq!(payload, &json!({"status": "ok", "response": {}}));
    t.take(b);
    t.broadcast(b, "r", "e", json!({}));
    assert!(t.take(b).is_empty(), "no reply without ack");
}

#[test]
fn oversized_payload_is_dropped_with_an_error_ack() {
    let mut config = super::test_config();
    config.payload_kb_max = 1;
    let mut t = TestEngine::with_config(config);
    let (a, b) = (t.connect(Vsn::V2), t.connect(Vsn::V2));
    t.join(a, "r", json!({"broadcast": {"ack": true}}));
    t.join(b, "r", json!({}));
    t.broadcast(a, "r", "big", json!({"blob": "x".repeat(2000)}));
    assert!(t.take(b).is_empty());
    let reply = t.take(a);
    assert_eq!(
        reply[0].payload(),
        &json!({"status": "error", "response": {"reason": "payload_size_exceeded"}})
    );
}

#[test]
fn broadcasts_never_cross_rooms_or_privacy() {
    let mut t = TestEngine::new();
    let service = t.token("service_role", 3600);
    let (a, b, c) = (t.connect(Vsn::V2), t.connect(Vsn::V2), t.connect(Vsn::V2));
    t.join(a, "room1", json!({}));
    t.join(b, "room2", json!({}));
    let reply = t.join_with(
        c,
        "room1",
        json!({"config": {"private": true}, "access_token": service}),
    );
    assert_eq!(reply["status"], "ok");
    t.broadcast(a, "room1", "e", json!({}));
    assert!(t.take(b).is_empty(), "other topic");
    assert!(t.take(c).is_empty(), "private room of the same name");
}

#[test]
fn binary_push_reaches_v2_as_kind_4_and_v1_as_json() {
    let mut t = TestEngine::new();
    let (a, b, c) = (t.connect(Vsn::V2), t.connect(Vsn::V2), t.connect(Vsn::V1));
    for conn in [a, b, c] {
        t.join(conn, "room1", json!({}));
    }
    // The exact frame realtime-js 2.119 sends (PROTOCOL.md §3.1), with join_ref "1".
    let push = UserBroadcastPush {
        event: "cursor".into(),
        metadata: None,
        encoding: Encoding::Json,
        payload: Bytes::from("{\"x\":1,\"y\":\"é\"}"),
    };
    let join_ref = t.join_ref(a, "room1");
    let frame =
        encode_user_broadcast_push(Some(&join_ref), Some("7"), "realtime:room1", &push).unwrap();
    t.raw(a, WsMessage::Binary(frame));
    let got = t.take(b);
    let Received::Binary(ub) = &got[0] else {
        panic!("v2 gets binary: {got:?}")
    };
    assert_eq!(
        (ub.topic.as_str(), ub.event.as_str(), ub.encoding),
        ("realtime:room1", "cursor", Encoding::Json)
    );
    assert_eq!(ub.payload, push.payload, "payload bytes are identical");
    assert_eq!(ub.metadata, None);
    assert_eq!(
        t.take(c)[0].payload(),
        &json!({"event": "cursor", "payload": {"x": 1, "y": "é"}, "type": "broadcast"})
    );
}

#[test]
fn binary_payload_skips_v1_members() {
    let mut t = TestEngine::new();
    let (a, b, c) = (t.connect(Vsn::V2), t.connect(Vsn::V2), t.connect(Vsn::V1));
    for conn in [a, b, c] {
        t.join(conn, "r", json!({}));
    }
    let push = UserBroadcastPush {
        event: "bin".into(),
        metadata: Some(Bytes::from_static(br#"{"persist":true}"#)),
        encoding: Encoding::Binary,
        payload: Bytes::from_static(&[0, 159, 146, 150]),
    };
    let join_ref = t.join_ref(a, "r");
    let frame =
        encode_user_broadcast_push(Some(&join_ref), Some("9"), "realtime:r", &push).unwrap();
    t.raw(a, WsMessage::Binary(frame));
    let got = t.take(b);
    let Received::Binary(ub) = &got[0] else {
        panic!()
    };
    assert_eq!(ub.payload, push.payload);
    assert!(t.take(c).is_empty());
}

#[test]
fn messages_from_one_sender_arrive_in_send_order() {
    let mut t = TestEngine::new();
    let (a, b, c) = (t.connect(Vsn::V2), t.connect(Vsn::V1), t.connect(Vsn::V2));
    for conn in [a, b, c] {
        t.join(conn, "r", json!({}));
    }
    for i in 0..200 {
        t.broadcast(a, "r", "n", json!({"i": i}));
    }
    for conn in [b, c] {
        let got: Vec<Value> = t
            .broadcasts(conn)
            .into_iter()
            .map(|(_, p)| p["i"].clone())
            .collect();
        assert_eq!(got, (0..200).map(Value::from).collect::<Vec<_>>());
    }
}

#[test]
fn same_user_other_socket_receives_it() {
    let mut t = TestEngine::new();
    let (a, b) = (t.connect(Vsn::V2), t.connect(Vsn::V2));
    t.join(a, "r", json!({}));
    t.join(a, "other", json!({}));
    t.join(b, "r", json!({}));
    t.broadcast(a, "r", "e", json!({}));
    assert_eq!(t.broadcasts(b).len(), 1);
    assert!(
        t.take(a).is_empty(),
        "not to the sending channel, nor to its other channel"
    );
}

#[test]
fn rest_batch_delivers_without_a_sender() {
    let mut t = TestEngine::new();
    let (a, b) = (t.connect(Vsn::V2), t.connect(Vsn::V1));
    t.join(a, "room1", json!({}));
    t.join(b, "room1", json!({}));
    let key = t.token("anon", 3600);
    let body = json!({"messages": [
        {"topic": "room1", "event": "e", "payload": {"x": 1}},
        {"topic": "realtime:room1", "event": "e", "payload": {"x": 2}},
    ]});
    let (status, reply) = t.rest(RestRequest::Broadcast {
        auth: RestAuth {
            authorization: None,
            apikey: Some(key),
        },
        body: Bytes::from(body.to_string()),
    });
    assert_eq!((status, reply.len()), (202, 0));
    for conn in [a, b] {
        let got = t.take(conn);
        assert_eq!(
            got.len(),
            1,
            "realtime:room1 as a REST topic is another room"
        );
        assert_eq!(
            got[0].payload(),
            &json!({"payload": {"x": 1}, "event": "e", "type": "broadcast"})
        );
    }
}

#[test]
fn rest_batch_refuses_bad_tokens_and_bad_bodies() {
    let mut t = TestEngine::new();
    let expired = t.token("anon", -5);
    let valid = t.token("anon", 60);
    let request = |authorization: Option<String>, body: &str| RestRequest::Broadcast {
        auth: RestAuth {
            authorization,
            apikey: Some(valid.clone()),
        },
        body: Bytes::from(body.to_owned()),
    };
    let (status, body) = t.rest(request(
        Some(format!("Bearer {expired}")),
        r#"{"messages":[]}"#,
    ));
    assert_eq!(
        (status, &body[..]),
        (401, &br#"{"message":"Unauthorized"}"#[..])
    );
    let (status, body) = t.rest(request(None, r#"{"messages":[{"topic":"r","event":"e"}]}"#));
    assert_eq!(status, 422);
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        body,
        json!({"errors": {"messages": [{"payload": ["can't be blank"]}]}})
    );
    let (status, _) = t.rest(request(None, r#"{}"#));
    assert_eq!(status, 422);
}

#[test]
fn rest_single_sends_a_user_broadcast() {
    let mut t = TestEngine::new();
    let (a, b) = (t.connect(Vsn::V2), t.connect(Vsn::V1));
    t.join(a, "room 1", json!({}));
    t.join(b, "room 1", json!({}));
    let key = t.token("anon", 3600);
    let single = |content_type: &str, body: &'static [u8]| RestRequest::BroadcastEvent {
        auth: RestAuth {
            authorization: Some(format!("Bearer {key}")),
            apikey: None,
        },
        topic: "room 1".into(),
        event: "ev bin".into(),
        private: false,
        content_type: Some(content_type.to_owned()),
        body: Bytes::from_static(body),
    };
    assert_eq!(
        t.rest(single("application/json; charset=utf-8", br#"{"b":2}"#))
            .0,
        202
    );
    let Received::Binary(ub) = &t.take(a)[0] else {
        panic!()
    };
    assert_eq!(
        (ub.event.as_str(), &ub.payload[..]),
        ("ev bin", &br#"{"b":2}"#[..])
    );
    assert_eq!(
        t.take(b)[0].payload(),
        &json!({"event": "ev bin", "payload": {"b": 2}, "type": "broadcast"})
    );
    assert_eq!(
        t.rest(single("application/octet-stream", b"\x01\x02")).0,
        202
    );
    assert_eq!(t.take(a).len(), 1);
    assert!(
        t.take(b).is_empty(),
        "binary payloads are not delivered to v1"
    );
    let (status, body) = t.rest(single("text/plain", b"hi"));
    assert_eq!(status, 415);
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap(),
        json!({"error": "Unsupported Media Type. Use application/json or application/octet-stream"})
    );
    assert_eq!(t.rest(single("application/json", b"")).0, 422);
}

#[test]
fn private_rest_message_needs_write_permission() {
    let mut t = TestEngine::new();
    let anon = t.token("anon", 3600);
    let (status, body) = t.rest(RestRequest::BroadcastEvent {
        auth: RestAuth {
            authorization: None,
            apikey: Some(anon),
        },
        topic: "r".into(),
        event: "e".into(),
        private: true,
        content_type: None,
        body: Bytes::from_static(b"{}"),
    });
    assert_eq!(
        (status, &body[..]),
        (403, &br#"{"message":"Unauthorized"}"#[..])
    );
}

#[test]
fn fan_out_to_a_thousand_members_encodes_once_per_vsn() {
    let mut t = TestEngine::new();
    let members: Vec<_> = (0..1000)
        .map(|i| t.connect(if i % 2 == 0 { Vsn::V1 } else { Vsn::V2 }))
        .collect();
    for &conn in &members {
        t.join(conn, "big", json!({}));
    }
    let sender = members[0];
    t.sends.clear();
    t.broadcast(sender, "big", "e", json!({"n": 1}));
    assert_eq!(t.sends.len(), 2, "one Send per serializer version");
    let mut recipients = 0;
    for (to, _) in &t.sends {
        let To::Members { list, except } = to else {
            panic!("fan-out addresses members")
        };
        assert_eq!(list.len(), 500);
        assert_eq!(*except, Some(sender));
        recipients += to.iter().count();
    }
    assert_eq!(recipients, 999);
    // A second broadcast reuses the cached member lists: same allocation.
    let first: Vec<_> = t.sends.iter().map(|(to, _)| to.clone()).collect();
    t.sends.clear();
    t.broadcast(sender, "big", "e", json!({"n": 2}));
    for (before, (after, _)) in first.iter().zip(&t.sends) {
        let (To::Members { list: x, .. }, To::Members { list: y, .. }) = (before, after) else {
            panic!()
        };
        assert!(std::sync::Arc::ptr_eq(x, y));
    }
}
