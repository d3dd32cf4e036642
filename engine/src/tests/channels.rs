//! Connection and channel lifecycle: upgrade checks, heartbeats, join, leave, tokens.

use serde_json::{json, Value};

use super::{test_config, Received, TestEngine};
use crate::protocol::Vsn;
use crate::{auth, Input, JoinRefusal};

#[test]
fn upgrade_refusals_use_upstream_status_and_text() {
    let mut t = TestEngine::new();
    let conn = t.try_connect(Some("2.0.0"), None);
    assert_eq!(
        t.rejected[&conn],
        (401, json!({"error": "API key is missing"}))
    );
    let expired = t.token("anon", -1);
    let conn = t.try_connect(Some("2.0.0"), Some(expired));
    assert_eq!(
        t.rejected[&conn],
        (401, json!({"error": "Token has expired"}))
    );
    let conn = t.try_connect(None, Some("garbage".into()));
    assert_eq!(
        t.rejected[&conn],
        (
            401,
            json!({"error": "The token provided is not a valid JWT"})
        )
    );
    let forged = auth::sign("wrong", &json!({"role": "anon", "exp": 4_000_000_000u64}));
    let conn = t.try_connect(None, Some(forged));
    assert_eq!(
        t.rejected[&conn],
        (401, json!({"error": "Failed to validate JWT signature"}))
    );
    let no_role = auth::sign(super::SECRET, &json!({"exp": 4_000_000_000u64}));
    let conn = t.try_connect(None, Some(no_role));
    assert_eq!(
        t.rejected[&conn].1,
        json!({"error": "Fields `role` and `exp` are required in JWT"})
    );
    let token = t.token("anon", 60);
    let conn = t.try_connect(Some("3.0.0"), Some(token));
    assert_eq!(t.rejected[&conn], (403, Value::Null));
}

#[test]
fn upgrade_refusal_waits_for_the_connect_backoff() {
    let mut config = test_config();
    config.connect_error_backoff_ms = 2_000;
    let mut t = TestEngine::with_config(config);
    let conn = t.try_connect(Some("2.0.0"), None);
    assert!(!t.rejected.contains_key(&conn));
    t.advance(1_999);
    assert!(!t.rejected.contains_key(&conn));
    t.advance(1);
    assert_eq!(t.rejected[&conn].0, 401);
}

#[test]
fn heartbeat_is_answered_in_both_versions() {
    let mut t = TestEngine::new();
    let (a, b) = (t.connect(Vsn::V2), t.connect(Vsn::V1));
    t.send(a, None, "7", "phoenix", "heartbeat", json!({}));
    t.send(b, None, "8", "phoenix", "heartbeat", json!({}));
    let expect = |ref_: &str| Received::Text {
        join_ref: None,
        ref_: Some(ref_.into()),
        topic: "phoenix".into(),
        event: "phx_reply".into(),
        payload: json!({"status": "ok", "response": {}}),
    };
    assert_eq!(t.take(a), vec![expect("7")]);
    assert_eq!(t.take(b), vec![expect("8")]);
}

#[test]
fn silent_socket_is_closed_after_the_heartbeat_timeout_and_a_heartbeating_one_is_not() {
    let mut t = TestEngine::new();
    let (quiet, chatty) = (t.connect(Vsn::V2), t.connect(Vsn::V2));
    t.join(quiet, "r", json!({}));
    t.join(chatty, "r", json!({}));
    for i in 0..12 {
        t.advance(25_000);
        t.send(
            chatty,
            None,
            &format!("hb{i}"),
            "phoenix",
            "heartbeat",
            json!({}),
        );
    }
    assert_eq!(t.closed.get(&quiet), Some(&(1000, "heartbeat timeout")));
    assert!(
        !t.closed.contains_key(&chatty),
        "a client heartbeating every 25 s stays for 5 minutes"
    );
}

#[test]
fn socket_without_channels_is_closed_after_ten_minutes() {
    let mut t = TestEngine::new();
    let conn = t.connect(Vsn::V2);
    t.join(conn, "r", json!({}));
    t.push(conn, "r", "phx_leave", json!({}));
    for i in 0..23 {
        t.advance(25_000);
        t.send(
            conn,
            None,
            &format!("{i}"),
            "phoenix",
            "heartbeat",
            json!({}),
        );
    }
    assert!(!t.closed.contains_key(&conn));
    t.advance(25_000);
    assert_eq!(t.closed.get(&conn), Some(&(1000, "no channels joined")));
}

#[test]
fn default_join_replies_ok_with_empty_postgres_changes() {
    let mut t = TestEngine::new();
    let conn = t.connect(Vsn::V2);
    let reply = t.join(
        conn,
        "room1",
        json!({"broadcast": {"ack": false, "self": false, "replication_ready": false}, "presence": {"key": "", "enabled": false}, "postgres_changes": [], "postgres_changes_options": {"all": true}, "private": false}),
    );
    assert_eq!(
        reply,
        json!({"status": "ok", "response": {"postgres_changes": []}})
    );
    let legacy = t.join_with(conn, "legacy", json!({}));
    assert_eq!(
        legacy,
        json!({"status": "ok", "response": {"postgres_changes": []}})
    );
}

#[test]
fn bindings_are_echoed_with_stable_integer_ids() {
    let mut t = TestEngine::new();
    let conn = t.connect(Vsn::V2);
    let bindings = json!([
        {"event": "INSERT", "schema": "public", "table": "todos", "filter": "id=eq.5"},
        {"event": "*", "schema": "public"},
        {"event": "INSERT", "schema": "public", "table": "todos", "filter": "id=eq.5"},
    ]);
    let reply = t.join(conn, "r", json!({"postgres_changes": bindings}));
    let echoed = reply["response"]["postgres_changes"].as_array().unwrap();
    assert_eq!(echoed.len(), 3);
    for (sent, got) in bindings.as_array().unwrap().iter().zip(echoed) {
        let id = got["id"].as_u64().expect("integer id");
        assert!(id < 1 << 31);
        let mut without_id = got.clone();
        without_id.as_object_mut().unwrap().remove("id");
        assert_eq!(&without_id, sent);
    }
    assert_eq!(echoed[0]["id"], echoed[2]["id"]);
    assert_ne!(echoed[0]["id"], echoed[1]["id"]);
    let system = t.take(conn);
    assert_eq!(system.len(), 1);
    assert_eq!(system[0].event(), "system");
    assert_eq!(system[0].payload()["extension"], "postgres_changes");
    assert_eq!(
        system[0].payload()["status"],
        "error",
        "no database configured"
    );
}

#[test]
fn topics_longer_than_binary_frames_carry_are_refused() {
    let mut t = TestEngine::new();
    let conn = t.connect(Vsn::V2);
    // `realtime:` and 246 bytes: 255 in all, the most a binary frame's topic holds.
    let longest = "x".repeat(246);
    assert_eq!(t.join(conn, &longest, json!({}))["status"], "ok");
    let reply = t.join_with(conn, &format!("{longest}y"), json!({"config": {}}));
    assert_eq!(
        reply,
        json!({"status": "error", "response": {"reason": "TopicNameTooLong: The topic must be at most 255 bytes"}})
    );
    let huge = "é".repeat(50_000);
    let reply = t.join_with(conn, &huge, json!({"config": {}}));
    assert_eq!(reply["status"], "error");
    assert_eq!(t.engine.stats().channels, 1, "only the one that fits");
    assert_eq!(t.refused(), [("topic_invalid", 2)]);
}

#[test]
fn empty_topic_and_foreign_topics_are_refused() {
    let mut t = TestEngine::new();
    let conn = t.connect(Vsn::V2);
    let reply = t.join_with(conn, "", json!({"config": {}}));
    assert_eq!(
        reply,
        json!({"status": "error", "response": {"reason": "TopicNameRequired: You must provide a topic name"}})
    );
    t.send(conn, Some("5"), "5", "room1", "phx_join", json!({}));
    let got = t.take(conn);
    let Received::Text {
        join_ref, payload, ..
    } = &got[0]
    else {
        panic!()
    };
    assert_eq!(join_ref, &None);
    assert_eq!(
        payload,
        &json!({"status": "error", "response": {"reason": "unmatched topic"}})
    );
    assert_eq!(t.refused(), [("topic_invalid", 2)]);
}

#[test]
fn join_errors_wait_for_the_backoff_and_ok_replies_do_not() {
    let mut config = test_config();
    config.join_error_backoff_ms = 5_000;
    let mut t = TestEngine::with_config(config);
    let conn = t.connect(Vsn::V2);
    t.join(conn, "fine", json!({}));
    t.send(
        conn,
        Some("9"),
        "9",
        "realtime:",
        "phx_join",
        json!({"config": {}}),
    );
    assert!(t.take(conn).is_empty());
    t.advance(5_000);
    assert_eq!(t.take(conn)[0].payload()["status"], "error");
}

#[test]
fn join_token_errors_use_upstream_reasons() {
    let mut t = TestEngine::new();
    let conn = t.connect(Vsn::V2);
    let expired = t.token("authenticated", -30);
    let reply = t.join_with(conn, "a", json!({"config": {}, "access_token": expired}));
    assert_eq!(
        reply["response"]["reason"],
        "InvalidJWTToken: Token has expired 30 seconds ago"
    );
    let reply = t.join_with(conn, "b", json!({"config": {}, "access_token": "xx"}));
    assert_eq!(
        reply["response"]["reason"],
        "MalformedJWT: The token provided is not a valid JWT"
    );
    let reply = t.join_with(
        conn,
        "c",
        json!({"config": {}, "access_token": "sb_publishable_abc"}),
    );
    assert_eq!(
        reply["status"], "ok",
        "opaque keys fall back to the socket token"
    );
    let reply = t.join_with(
        conn,
        "d",
        json!({"config": {}, "user_token": expired, "access_token": "ignored"}),
    );
    assert_eq!(reply["status"], "error", "user_token takes precedence");
    assert_eq!(t.refused(), [("invalid_token", 3)]);
}

#[test]
fn private_channel_without_database_needs_service_role() {
    let mut t = TestEngine::new();
    let conn = t.connect(Vsn::V2);
    let reply = t.join(conn, "pub", json!({"private": false}));
    assert_eq!(reply["status"], "ok");
    let reply = t.join_with(conn, "priv", json!({"config": {"private": true}}));
    assert_eq!(
        reply["response"]["reason"],
        "UnableToConnectToProject: Realtime was unable to connect to the project database"
    );
    assert_eq!(t.refused(), [("unauthorized", 1)]);
}

#[test]
fn join_refusal_reasons_index_their_counters_and_have_distinct_labels() {
    for (index, why) in JoinRefusal::ALL.iter().enumerate() {
        assert_eq!(*why as usize, index);
        let label = why.label();
        assert!(label.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
        let same = JoinRefusal::ALL.iter().filter(|w| w.label() == label);
        assert_eq!(same.count(), 1, "{label}");
    }
}

#[test]
fn refusals_of_the_engine_are_counted_by_reason() {
    let mut config = test_config();
    config.private_only = true;
    let mut t = TestEngine::with_config(config);
    let conn = t.connect(Vsn::V2);
    let reply = t.join_with(conn, "public", json!({"config": {}}));
    assert_eq!(
        reply["response"]["reason"],
        "PrivateOnly: This project only allows private channels"
    );
    let replay = json!({"config": {"private": true, "broadcast": {"replay": {"since": 1}}}});
    let reply = t.join_with(conn, "replayed", replay);
    assert_eq!(
        reply["response"]["reason"],
        "UnableToReplayMessages: Realtime was unable to replay messages"
    );
    assert_eq!(t.refused(), [("private_only", 1), ("replay_refused", 1)]);
}

#[test]
fn leave_replies_ok_then_closes_with_the_join_ref() {
    let mut t = TestEngine::new();
    let (a, b) = (t.connect(Vsn::V2), t.connect(Vsn::V2));
    t.join(a, "r", json!({}));
    t.join(b, "r", json!({}));
    let join_ref = t.join_ref(a, "r");
    let leave_ref = t.push(a, "r", "phx_leave", json!({}));
    let got = t.take(a);
    assert_eq!(got.len(), 2);
    assert_eq!(
        got[0],
        Received::Text {
            join_ref: Some(join_ref.clone()),
            ref_: Some(leave_ref),
            topic: "realtime:r".into(),
            event: "phx_reply".into(),
            payload: json!({"status": "ok", "response": {}})
        }
    );
    assert_eq!(
        got[1],
        Received::Text {
            join_ref: Some(join_ref.clone()),
            ref_: Some(join_ref),
            topic: "realtime:r".into(),
            event: "phx_close".into(),
            payload: json!({})
        }
    );
    t.broadcast(b, "r", "e", json!({}));
    assert!(t.take(a).is_empty(), "no delivery after leave");
    t.send(a, None, "99", "realtime:r", "phx_leave", json!({}));
    let got = t.take(a);
    assert_eq!(got.len(), 1, "leaving a topic not joined: ok reply only");
    assert_eq!(got[0].payload()["status"], "ok");
}

#[test]
fn pushes_to_topics_not_joined_get_unmatched_topic() {
    let mut t = TestEngine::new();
    let conn = t.connect(Vsn::V1);
    t.send(
        conn,
        Some("3"),
        "4",
        "realtime:nope",
        "broadcast",
        json!({"event": "e", "payload": {}}),
    );
    let got = t.take(conn);
    assert_eq!(
        got[0].payload(),
        &json!({"status": "error", "response": {"reason": "unmatched topic"}})
    );
    let Received::Text { ref_, .. } = &got[0] else {
        panic!()
    };
    assert_eq!(ref_.as_deref(), Some("4"));
}

#[test]
fn duplicate_join_closes_the_old_instance_first() {
    let mut t = TestEngine::new();
    let (a, b) = (t.connect(Vsn::V2), t.connect(Vsn::V2));
    t.join(a, "r", json!({}));
    t.join(b, "r", json!({}));
    let old = t.join_ref(a, "r");
    let ref_ = t.next_ref();
    t.send(
        a,
        Some(&ref_),
        &ref_,
        "realtime:r",
        "phx_join",
        json!({"config": {}}),
    );
    let got = t.take(a);
    assert_eq!(got[0].event(), "phx_close");
    assert!(matches!(&got[0], Received::Text { join_ref: Some(j), .. } if *j == old));
    assert_eq!(got[1].payload()["status"], "ok");
    t.broadcast(b, "r", "e", json!({}));
    assert_eq!(
        t.broadcasts(a).len(),
        1,
        "one delivery: the old instance is gone"
    );
}

#[test]
fn unknown_events_get_no_reply_and_stale_join_refs_are_ignored() {
    let mut t = TestEngine::new();
    let (a, b) = (t.connect(Vsn::V2), t.connect(Vsn::V2));
    t.join(a, "r", json!({}));
    t.join(b, "r", json!({}));
    t.push(a, "r", "typo_event", json!({}));
    assert!(t.take(a).is_empty());
    t.send(
        a,
        Some("stale"),
        "50",
        "realtime:r",
        "broadcast",
        json!({"event": "e", "payload": {}}),
    );
    assert!(t.take(b).is_empty(), "a push from an old join is dropped");
    t.send(
        a,
        None,
        "51",
        "realtime:r",
        "broadcast",
        json!({"event": "e", "payload": {}}),
    );
    assert_eq!(t.broadcasts(b).len(), 1, "a null join_ref is accepted");
}

#[test]
fn valid_refresh_is_silent_and_expired_refresh_closes_only_that_channel() {
    let mut t = TestEngine::new();
    let (a, b) = (t.connect(Vsn::V2), t.connect(Vsn::V2));
    t.join(a, "r", json!({}));
    t.join(a, "s", json!({}));
    t.join(b, "s", json!({}));
    let fresh = t.token("authenticated", 7200);
    t.push(a, "r", "access_token", json!({"access_token": fresh}));
    assert!(t.take(a).is_empty(), "no reply to access_token");
    let expired = t.token("authenticated", -3);
    t.push(a, "r", "access_token", json!({"access_token": expired}));
    let got = t.take(a);
    assert_eq!(got.len(), 2);
    assert_eq!(
        got[0].payload(),
        &json!({"extension": "system", "status": "error", "message": "Token has expired 3 seconds ago", "channel": "r"})
    );
    assert_eq!(got[1].event(), "phx_close");
    assert!(t.closed.is_empty(), "the socket stays open");
    t.broadcast(b, "s", "e", json!({}));
    assert_eq!(t.broadcasts(a).len(), 1, "other channels keep working");
}

#[test]
fn channel_is_closed_when_its_token_expires() {
    let mut t = TestEngine::new();
    let conn = t.connect(Vsn::V2);
    let short = t.token("authenticated", 10);
    let reply = t.join_with(conn, "r", json!({"config": {}, "access_token": short}));
    assert_eq!(reply["status"], "ok");
    t.advance(9_000);
    assert!(t.take(conn).is_empty());
    t.advance(1_000);
    let got = t.take(conn);
    assert_eq!(
        got[0].payload()["message"],
        "Token has expired 0 seconds ago"
    );
    assert_eq!(got[1].event(), "phx_close");
    assert!(t.closed.is_empty());
}

#[test]
fn a_token_expiry_timer_that_fires_before_the_wall_clock_reaches_exp_waits_for_it() {
    let mut t = TestEngine::new();
    let conn = t.connect(Vsn::V2);
    let short = t.token("authenticated", 10);
    t.join_with(conn, "r", json!({"config": {}, "access_token": short}));
    // The expiry deadline comes while the wall clock still reads a millisecond short.
    let deadline = t.engine.poll_timeout().expect("the expiry is armed");
    let exp_ms = t.now.unix_ms + 10_000;
    t.now.mono = deadline;
    t.now.unix_ms = exp_ms - 1;
    t.handle(Input::Tick);
    assert!(t.take(conn).is_empty(), "not expired yet");
    t.advance(1);
    let got = t.take(conn);
    assert_eq!(got.len(), 2, "closed once the wall clock reached exp");
    assert_eq!(got[1].event(), "phx_close");
}

#[test]
fn refresh_extends_the_channel_beyond_the_first_expiry() {
    let mut t = TestEngine::new();
    let conn = t.connect(Vsn::V2);
    let short = t.token("authenticated", 10);
    t.join_with(conn, "r", json!({"config": {}, "access_token": short}));
    let long = t.token("authenticated", 100);
    t.push(conn, "r", "access_token", json!({"access_token": long}));
    t.advance(20_000);
    assert!(t.take(conn).is_empty());
}

#[test]
fn shutdown_tells_every_channel_then_closes_with_1012() {
    let mut t = TestEngine::new();
    let conn = t.connect(Vsn::V2);
    t.join(conn, "r", json!({}));
    t.handle(Input::Shutdown);
    let got = t.take(conn);
    assert_eq!(
        got,
        vec![Received::Text {
            join_ref: None,
            ref_: None,
            topic: "realtime:r".into(),
            event: "system".into(),
            payload: json!({"extension": "system", "status": "ok", "message": "Server requested disconnect"})
        }]
    );
    assert_eq!(t.closed[&conn].0, 1012);
    assert_eq!(t.engine.stats().connections, 0);
}

#[test]
fn interest_follows_the_first_and_last_member_of_a_room() {
    let mut t = TestEngine::new();
    let (a, b) = (t.connect(Vsn::V2), t.connect(Vsn::V2));
    let room = crate::RoomKey {
        private: false,
        sub: "r".into(),
    };
    t.join(a, "r", json!({}));
    t.join(b, "r", json!({}));
    assert_eq!(
        t.interest,
        vec![(room.clone(), true)],
        "once, for the first"
    );
    t.push(a, "r", "phx_leave", json!({}));
    assert_eq!(t.interest.len(), 1, "b is still there");
    t.handle(Input::Closed { conn: b });
    assert_eq!(t.interest, vec![(room.clone(), true), (room, false)]);
}

#[test]
fn in_a_cluster_a_rooms_first_joins_are_answered_once_its_subscription_is_in_place() {
    let mut config = test_config();
    config.cluster = true;
    let mut t = TestEngine::with_config(config);
    let (a, b, c, d) = (
        t.connect(Vsn::V2),
        t.connect(Vsn::V2),
        t.connect(Vsn::V2),
        t.connect(Vsn::V2),
    );
    let room = crate::RoomKey {
        private: false,
        sub: "r".into(),
    };
    let phx_join = |t: &mut TestEngine, conn| {
        let ref_ = t.next_ref();
        t.send(
            conn,
            Some(&ref_),
            &ref_,
            "realtime:r",
            "phx_join",
            json!({"config": {}}),
        );
        t.remember_join(conn, "realtime:r", &ref_);
    };
    let replies = |t: &mut TestEngine, conn| {
        t.take(conn)
            .iter()
            .filter(|r| r.event() == "phx_reply")
            .count()
    };
    phx_join(&mut t, a);
    phx_join(&mut t, b);
    phx_join(&mut t, c);
    assert_eq!(t.interest, vec![(room.clone(), true)]);
    assert_eq!(replies(&mut t, a) + replies(&mut t, b), 0, "waiting");
    // A member that left before the subscription is not answered.
    t.handle(Input::Closed { conn: c });
    // Members not answered yet hear nothing of the room.
    let from_peer = |room: &crate::RoomKey| Input::Peer {
        from: crate::NodeId(99),
        msg: crate::PeerMsg::Broadcast {
            room: room.clone(),
            body: crate::broadcast::BroadcastBody::Json(bytes::Bytes::from_static(
                br#"{"type":"broadcast","event":"e","payload":{}}"#,
            )),
        },
    };
    t.handle(from_peer(&room));
    assert!(t.broadcasts(a).is_empty());
    t.handle(Input::InterestReady(room.clone()));
    assert_eq!(replies(&mut t, a), 1);
    assert_eq!(replies(&mut t, b), 1);
    phx_join(&mut t, d);
    assert_eq!(
        replies(&mut t, d),
        1,
        "the room's subscription stands: at once"
    );
    t.handle(from_peer(&room));
    assert_eq!(t.broadcasts(a).len(), 1, "answered members hear the room");
    assert_eq!(t.broadcasts(d).len(), 1);
}

#[test]
fn a_socket_holds_room_for_the_channels_it_joined_and_no_more() {
    let mut t = TestEngine::new();
    let conn = t.connect(Vsn::V2);
    t.join(conn, "room", json!({}));
    assert_eq!(t.engine.conns[&conn].channels.capacity(), 1);
    t.join(conn, "other", json!({}));
    assert_eq!(t.engine.conns[&conn].channels.capacity(), 2);
}
