//! Bad input never panics the engine nor disturbs other connections.

use bytes::Bytes;
use proptest::prelude::*;
use serde_json::json;

use super::TestEngine;
use crate::protocol::Vsn;
use crate::WsMessage;

/// The malformed frames of PROTOCOL.md C8, in both serializers.
fn malformed() -> Vec<WsMessage> {
    let text = |s: &str| WsMessage::Text(Bytes::from(s.to_owned()));
    vec![
        text("{not json"),
        text(r#"[null,"1","phoenix","heartbeat"]"#),
        text(r#""a string""#),
        text(r#"[1,2,3,4,5]"#),
        text(r#"{"topic":"phoenix"}"#),
        text(r#"[null,"1","realtime:r","phx_join","not an object"]"#),
        text(r#"[null,"1","realtime:r","broadcast",[1,2]]"#),
        WsMessage::Binary(Bytes::from_static(&[3, 5, 5, 5])),
        WsMessage::Binary(Bytes::from_static(&[9, 0, 0])),
        WsMessage::Binary(Bytes::from_static(&[3, 0, 0, 10, 1, 0, 7, b'r', b'e'])),
        WsMessage::Binary(Bytes::from_static(&[
            3, 0, 0, 1, 1, 0, 1, b'x', b'e', b'{', b'x',
        ])),
        WsMessage::Binary(Bytes::new()),
    ]
}

#[test]
fn malformed_frames_leave_the_socket_open_and_answering() {
    for vsn in [Vsn::V1, Vsn::V2] {
        let mut t = TestEngine::new();
        let (a, b) = (t.connect(vsn), t.connect(Vsn::V2));
        t.join(a, "r", json!({}));
        t.join(b, "r", json!({}));
        for msg in malformed() {
            t.raw(a, msg);
        }
        t.take(a);
        t.send(a, None, "hb", "phoenix", "heartbeat", json!({}));
        assert_eq!(
            t.take(a).len(),
            1,
            "heartbeat answered after malformed frames"
        );
        t.broadcast(b, "r", "e", json!({}));
        assert_eq!(t.broadcasts(a).len(), 1);
        assert!(t.closed.is_empty());
    }
}

fn frame_strategy() -> impl Strategy<Value = WsMessage> {
    let json_like = prop::collection::vec(
        prop_oneof![
            Just("[".to_owned()),
            Just("]".to_owned()),
            Just("{".to_owned()),
            Just("}".to_owned()),
            Just(",".to_owned()),
            Just("null".to_owned()),
            Just(r#""realtime:r""#.to_owned()),
            Just(r#""phx_join""#.to_owned()),
            Just(r#""broadcast""#.to_owned()),
            Just(r#""access_token""#.to_owned()),
            Just(r#""phx_leave""#.to_owned()),
            Just(r#""config":"#.to_owned()),
            Just(r#""event":"#.to_owned()),
            "[a-z0-9\"]{0,6}",
        ],
        0..24,
    )
    .prop_map(|parts| WsMessage::Text(Bytes::from(parts.concat())));
    prop_oneof![
        json_like,
        prop::collection::vec(any::<u8>(), 0..64).prop_map(|b| WsMessage::Text(Bytes::from(b))),
        prop::collection::vec(any::<u8>(), 0..64).prop_map(|mut b| {
            if let Some(first) = b.first_mut() {
                *first %= 5;
            }
            WsMessage::Binary(Bytes::from(b))
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_frames_never_panic_nor_disturb_others(
        frames in prop::collection::vec(frame_strategy(), 1..40),
        v1 in any::<bool>(),
    ) {
        let mut t = TestEngine::new();
        let attacker = t.connect(if v1 { Vsn::V1 } else { Vsn::V2 });
        let (a, b) = (t.connect(Vsn::V2), t.connect(Vsn::V1));
        t.join(a, "r", json!({}));
        t.join(b, "r", json!({}));
        t.join(attacker, "r", json!({}));
        for frame in frames {
            t.raw(attacker, frame);
        }
        t.take(a);
        t.take(b);
        t.broadcast(a, "r", "still", json!({"ok": true}));
        prop_assert_eq!(t.broadcasts(b), vec![("still".to_owned(), json!({"ok": true}))]);
        t.send(b, None, "hb", "phoenix", "heartbeat", json!({}));
        prop_assert_eq!(t.take(b).len(), 1);
        prop_assert!(!t.closed.contains_key(&a) && !t.closed.contains_key(&b));
    }
}

#[test]
fn frames_the_websocket_layer_refuses_close_with_their_rfc_codes() {
    use crate::{FrameError, Input};
    let cases = [
        (FrameError::InvalidUtf8, 1007),
        (FrameError::TooLarge, 1009),
        (FrameError::Busy, 1013),
        (FrameError::Protocol, 1002),
    ];
    for (error, code) in cases {
        let mut t = TestEngine::new();
        let (a, b) = (t.connect(Vsn::V2), t.connect(Vsn::V2));
        t.join(a, "r", json!({}));
        t.join(b, "r", json!({}));
        t.handle(Input::FrameError { conn: a, error });
        assert_eq!(t.closed[&a].0, code, "{error:?}");
        assert_eq!(t.engine.stats().connections, 1, "the socket is forgotten");
        t.broadcast(b, "r", "e", json!({}));
        assert!(t.take(a).is_empty(), "nothing after the close");
    }
}
