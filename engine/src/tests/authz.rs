//! Private channels with a database: joins, broadcasts, tracks, refreshes and REST
//! requests wait for the policies' verdicts, and nothing reaches a member that may not
//! read it.

use bytes::Bytes;
use serde_json::{json, Value};

use super::changes::{batch, engine, sent};
use super::{Received, TestEngine};
use crate::authz::{AuthzAnswer, AuthzQuery, Permissions, Stored, XidSnapshot};
use crate::protocol::Vsn;
use crate::rest::RestAuth;
use crate::{ConnId, Input, RestRequest};

/// Every permission asked for, granted.
pub(crate) fn everything() -> AuthzAnswer {
    grant(true, true, true, true)
}

fn grant(br: bool, pr: bool, bw: bool, pw: bool) -> AuthzAnswer {
    AuthzAnswer {
        permissions: Permissions {
            broadcast_read: Some(br),
            presence_read: Some(pr),
            broadcast_write: Some(bw),
            presence_write: Some(pw),
        },
        replayed: Some(Vec::new()),
        snapshot: None,
    }
}

/// A policy by user (`sub` claim): `alice` may do anything, `bob` only reads broadcasts,
/// `carol` only reads and writes presence, anyone else nothing. Only what was asked is
/// answered.
fn policy(query: &AuthzQuery) -> Option<AuthzAnswer> {
    let (br, pr, bw, pw) = match query.claims.get("sub").and_then(Value::as_str) {
        Some("alice") => (true, true, true, true),
        Some("bob") => (true, false, false, false),
        Some("carol") => (false, true, false, true),
        _ => (false, false, false, false),
    };
    let asked = query.asked;
    Some(AuthzAnswer {
        permissions: Permissions {
            broadcast_read: asked.broadcast_read.then_some(br),
            presence_read: asked.presence_read.then_some(pr),
            broadcast_write: asked.broadcast_write.then_some(bw),
            presence_write: asked.presence_write.then_some(pw),
        },
        replayed: Some(Vec::new()),
        snapshot: None,
    })
}

fn user_token(t: &TestEngine, sub: &str) -> String {
    let exp = t.now.unix_ms / 1000 + 3600;
    crate::auth::sign(
        super::SECRET,
        &json!({"role": "authenticated", "sub": sub, "exp": exp}),
    )
}

/// Joins private channel `sub` as `user`, answering with `policy`; the join reply.
fn join_as(t: &mut TestEngine, conn: ConnId, sub: &str, user: &str, config: Value) -> Value {
    let mut config = config;
    config["private"] = json!(true);
    let token = user_token(t, user);
    let ref_ = t.next_ref();
    let topic = format!("realtime:{sub}");
    let payload = json!({"config": config, "access_token": token});
    t.send(conn, Some(&ref_), &ref_, &topic, "phx_join", payload);
    assert!(
        t.take(conn).iter().all(|r| r.event() != "phx_reply"),
        "a private join waits for the database"
    );
    t.authorize(policy);
    t.remember_join(conn, &topic, &ref_);
    let mut frames = t.take(conn);
    let index = frames
        .iter()
        .position(|r| r.event() == "phx_reply")
        .expect("a join reply after the answer");
    let reply = frames.remove(index).payload().clone();
    for frame in frames {
        t.requeue(conn, frame);
    }
    reply
}

fn events(frames: &[Received]) -> Vec<&str> {
    frames.iter().map(Received::event).collect()
}

#[test]
fn a_join_is_admitted_only_when_its_token_may_read_the_topic() {
    let mut t = engine();
    let (alice, dave) = (t.connect(Vsn::V2), t.connect(Vsn::V2));
    assert_eq!(
        join_as(&mut t, alice, "room", "alice", json!({}))["status"],
        "ok"
    );
    let reply = join_as(&mut t, dave, "room", "dave", json!({}));
    assert_eq!(reply["status"], "error");
    assert_eq!(
        reply["response"]["reason"],
        "Unauthorized: You do not have permissions to read from this Channel topic: room"
    );
    assert_eq!(t.refused(), [("unauthorized", 1)]);
}

#[test]
fn the_join_asks_presence_read_only_when_presence_is_enabled() {
    let mut t = engine();
    let conn = t.connect(Vsn::V2);
    let token = user_token(&t, "alice");
    for (sub, enabled) in [("a", false), ("b", true)] {
        let ref_ = t.next_ref();
        let config = json!({"private": true, "presence": {"enabled": enabled}});
        let payload = json!({"config": config, "access_token": token});
        t.send(
            conn,
            Some(&ref_),
            &ref_,
            &format!("realtime:{sub}"),
            "phx_join",
            payload,
        );
        assert_eq!(t.authz.len(), 1);
        assert_eq!(&*t.authz[0].topic, sub);
        assert!(t.authz[0].asked.broadcast_read);
        assert_eq!(t.authz[0].asked.presence_read, enabled);
        assert!(!t.authz[0].asked.broadcast_write);
        t.authorize(policy);
    }
}

#[test]
fn a_database_that_cannot_answer_refuses_the_join() {
    let mut t = engine();
    let conn = t.connect(Vsn::V2);
    let ref_ = t.next_ref();
    let payload = json!({"config": {"private": true}, "access_token": user_token(&t, "alice")});
    t.send(
        conn,
        Some(&ref_),
        &ref_,
        "realtime:room",
        "phx_join",
        payload,
    );
    t.authorize(|_| None);
    let frames = t.take(conn);
    assert_eq!(
        frames[0].payload()["response"]["reason"],
        "UnableToConnectToProject: Realtime was unable to connect to the project database"
    );
    assert_eq!(t.refused(), [("database_unavailable", 1)]);
}

#[test]
fn broadcasts_reach_only_members_that_may_read_them_and_writes_are_checked_once() {
    let mut t = engine();
    let (alice, bob, carol) = (t.connect(Vsn::V2), t.connect(Vsn::V2), t.connect(Vsn::V2));
    join_as(
        &mut t,
        alice,
        "room",
        "alice",
        json!({"broadcast": {"ack": true}}),
    );
    join_as(
        &mut t,
        bob,
        "room",
        "bob",
        json!({"broadcast": {"ack": true}}),
    );
    let config = json!({"presence": {"enabled": true}});
    assert_eq!(
        join_as(&mut t, carol, "room", "carol", config)["status"],
        "ok"
    );
    t.take(carol);

    // Alice's first broadcast waits for her write check; the second waits behind it.
    let first = t.broadcast(alice, "room", "e", json!({"n": 1}));
    let second = t.broadcast(alice, "room", "e", json!({"n": 2}));
    assert_eq!(t.authz.len(), 1, "one write check for both");
    assert!(t.authz[0].asked.broadcast_write);
    assert!(t.take(bob).is_empty(), "held until the answer");
    t.authorize(policy);
    assert_eq!(
        t.broadcasts(bob),
        vec![
            ("e".to_owned(), json!({"n": 1})),
            ("e".to_owned(), json!({"n": 2}))
        ]
    );
    assert!(
        t.broadcasts(carol).is_empty(),
        "carol may not read broadcasts"
    );
    let acks: Vec<String> = t
        .take(alice)
        .iter()
        .filter_map(|r| match r {
            Received::Text { event, ref_, .. } if event == "phx_reply" => ref_.clone(),
            _ => None,
        })
        .collect();
    assert_eq!(acks, vec![first, second]);
    // The verdict is kept: no second question.
    t.broadcast(alice, "room", "e", json!({"n": 3}));
    assert!(t.authz.is_empty());
    assert_eq!(t.broadcasts(bob).len(), 1);

    // Bob may not write: his broadcast is dropped without an ack.
    t.broadcast(bob, "room", "e", json!({"n": 4}));
    t.authorize(policy);
    assert!(t.take(bob).is_empty(), "no ack for a denied broadcast");
    assert!(t.broadcasts(alice).is_empty());
}

#[test]
fn presence_follows_presence_read_and_tracks_need_presence_write() {
    let mut t = engine();
    let (alice, bob, carol) = (t.connect(Vsn::V2), t.connect(Vsn::V2), t.connect(Vsn::V2));
    let config = json!({"presence": {"enabled": true, "key": "k"}});
    join_as(&mut t, alice, "room", "alice", config.clone());
    join_as(&mut t, bob, "room", "bob", config.clone());
    join_as(&mut t, carol, "room", "carol", config);
    let state = |t: &mut TestEngine, conn| {
        let frames = t.take(conn);
        events(&frames).contains(&"presence_state")
    };
    assert!(state(&mut t, alice));
    assert!(!state(&mut t, bob), "bob may not read presence");
    assert!(state(&mut t, carol));

    // Carol's track waits for her write check, then goes out to presence readers only.
    t.push(
        carol,
        "room",
        "presence",
        json!({"event": "track", "payload": {"a": 1}}),
    );
    t.authorize(policy);
    let frames = t.take(carol);
    let reply = frames.iter().find(|r| r.event() == "phx_reply").unwrap();
    assert_eq!(reply.payload()["status"], "ok", "{frames:?}");
    assert!(events(&frames).contains(&"presence_diff"));
    assert!(events(&t.take(alice)).contains(&"presence_diff"));
    assert!(!events(&t.take(bob)).contains(&"presence_diff"));

    // Bob may not track: a bare error.
    t.push(
        bob,
        "room",
        "presence",
        json!({"event": "track", "payload": {"b": 1}}),
    );
    t.authorize(policy);
    let frames = t.take(bob);
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].payload()["status"], "error");
    assert_eq!(frames[0].payload()["response"], json!({}));
    assert!(!events(&t.take(alice)).contains(&"presence_diff"));
}

#[test]
fn a_refresh_that_takes_read_away_closes_the_channel() {
    let mut t = engine();
    // Alice becomes bob: both read broadcasts, so the channel stays.
    let conn = t.connect(Vsn::V2);
    join_as(&mut t, conn, "room", "alice", json!({}));
    let bob = user_token(&t, "bob");
    t.push(conn, "room", "access_token", json!({"access_token": bob}));
    assert_eq!(t.authz.len(), 1, "read is evaluated again");
    t.authorize(policy);
    assert!(t.take(conn).is_empty());

    // Alice becomes carol: presence read stays, broadcast read is revoked.
    let conn = t.connect(Vsn::V2);
    join_as(
        &mut t,
        conn,
        "room",
        "alice",
        json!({"presence": {"enabled": true}}),
    );
    t.take(conn);
    let carol = user_token(&t, "carol");
    t.push(conn, "room", "access_token", json!({"access_token": carol}));
    t.authorize(policy);
    let frames = t.take(conn);
    assert_eq!(events(&frames), vec!["system", "phx_close"]);
    assert_eq!(
        frames[0].payload()["message"],
        "You no longer have permission to read from this Channel topic: room"
    );

    // Alice becomes nobody: refused with the join's text.
    let conn = t.connect(Vsn::V2);
    join_as(&mut t, conn, "room", "alice", json!({}));
    let dave = user_token(&t, "dave");
    t.push(conn, "room", "access_token", json!({"access_token": dave}));
    t.authorize(policy);
    let frames = t.take(conn);
    assert_eq!(
        frames[0].payload()["message"],
        "You do not have permissions to read from this Channel topic: room"
    );
}

#[test]
fn replay_sends_stored_messages_once_and_only_on_private_channels() {
    let mut t = engine();
    let conn = t.connect(Vsn::V2);
    let reply = t.join_with(
        conn,
        "room",
        json!({"config": {"broadcast": {"replay": {"since": 0}}}}),
    );
    assert_eq!(
        reply["response"]["reason"],
        "UnableToReplayMessages: Replay is not allowed for public channels"
    );
    let reply = t.join_with(
        conn,
        "room",
        json!({"config": {"private": true, "broadcast": {"replay": {"since": "yesterday"}}}}),
    );
    assert_eq!(
        reply["response"]["reason"],
        "UnableToReplayMessages: Replay params are not valid"
    );

    let (replaying, other) = (t.connect(Vsn::V2), t.connect(Vsn::V2));
    join_as(&mut t, other, "room", "alice", json!({}));
    let ref_ = t.next_ref();
    let config = json!({"private": true, "broadcast": {"replay": {"since": 1000, "limit": 40}}});
    let payload = json!({"config": config, "access_token": user_token(&t, "alice")});
    t.send(
        replaying,
        Some(&ref_),
        &ref_,
        "realtime:room",
        "phx_join",
        payload,
    );
    let replay = t.authz[0].replay.expect("the question carries the replay");
    assert_eq!(
        (replay.since_ms, replay.limit),
        (1000, 25),
        "limit clamped to 25"
    );
    t.authorize(|_| {
        Some(AuthzAnswer {
            replayed: Some(vec![Stored {
                id: "m1".into(),
                event: json!("old"),
                payload: json!({"n": 0}),
            }]),
            ..everything()
        })
    });
    let frames = t.take(replaying);
    assert_eq!(events(&frames), vec!["phx_reply", "broadcast"]);
    assert_eq!(
        frames[1].payload(),
        &json!({"type": "broadcast", "event": "old", "payload": {"n": 0},
                "meta": {"replayed": true, "id": "m1"}})
    );
    // The same row arriving live afterwards reaches the others, not the replayer again.
    batch(
        &mut t,
        10,
        vec![
            sent("room", "old", true, "m1"),
            sent("room", "new", true, "m2"),
        ],
    );
    let got: Vec<String> = t
        .broadcasts(replaying)
        .into_iter()
        .map(|(e, _)| e)
        .collect();
    assert_eq!(got, vec!["new"]);
    assert_eq!(t.broadcasts(other).len(), 2);

    // Rows streamed while a replay join waits for its answer reach it after the replay when
    // the replay's snapshot could not see them; those it could see were its to send or to
    // leave out (here by its limit), live or not.
    let late = t.connect(Vsn::V2);
    let ref_ = t.next_ref();
    let payload = json!({"config": config, "access_token": user_token(&t, "alice")});
    t.send(
        late,
        Some(&ref_),
        &ref_,
        "realtime:room",
        "phx_join",
        payload,
    );
    let from = |xid: u32, change: crate::changes::Change| crate::changes::Change { xid, ..change };
    batch(
        &mut t,
        20,
        vec![
            from(5, sent("room", "left out", true, "m2")),
            from(6, sent("room", "covered", true, "m3")),
            from(9, sent("room", "after", true, "m4")),
        ],
    );
    t.authorize(|_| {
        Some(AuthzAnswer {
            replayed: Some(vec![Stored {
                id: "m3".into(),
                event: json!("covered"),
                payload: json!({"n": 3}),
            }]),
            snapshot: XidSnapshot::parse("8:9:"),
            ..everything()
        })
    });
    let frames = t.take(late);
    assert_eq!(events(&frames), vec!["phx_reply", "broadcast", "broadcast"]);
    assert_eq!(frames[1].payload()["meta"]["replayed"], true);
    assert_eq!(frames[1].payload()["event"], "covered");
    assert_eq!(frames[2].payload()["event"], "after");
    // Arriving live after the join, a row the snapshot saw is still not sent.
    batch(
        &mut t,
        30,
        vec![
            from(7, sent("room", "seen by the replay", true, "m5")),
            from(10, sent("room", "new", true, "m6")),
        ],
    );
    let got: Vec<String> = t.broadcasts(late).into_iter().map(|(e, _)| e).collect();
    assert_eq!(got, vec!["new"]);
}

#[test]
fn snapshots_parse_and_see_what_had_committed() {
    let snapshot = XidSnapshot::parse("100:105:101,103").expect("a snapshot");
    assert!(snapshot.sees(99) && snapshot.sees(102) && snapshot.sees(104));
    assert!(!snapshot.sees(101) && !snapshot.sees(103) && !snapshot.sees(105));
    // 64-bit ids keep their low 32 bits; comparisons wrap as Postgres's do.
    let wrapped = XidSnapshot::parse("4294967396:4294967400:").expect("a snapshot");
    assert_eq!((wrapped.xmin, wrapped.xmax), (100, 104));
    assert!(wrapped.sees(u32::MAX) && !wrapped.sees(104));
    assert_eq!(XidSnapshot::parse("garbage"), None);
}

#[test]
fn rest_messages_to_private_topics_need_the_callers_write_permission() {
    let mut t = engine();
    let member = t.connect(Vsn::V2);
    join_as(&mut t, member, "open", "alice", json!({}));
    join_as(&mut t, member, "closed", "alice", json!({}));
    let rest_policy = |q: &AuthzQuery| {
        Some(AuthzAnswer {
            permissions: Permissions {
                broadcast_write: Some(&*q.topic == "open"),
                ..Permissions::default()
            },
            replayed: None,
            snapshot: None,
        })
    };
    let auth = RestAuth {
        authorization: Some(format!("Bearer {}", user_token(&t, "bob"))),
        apikey: None,
    };
    let body = json!({"messages": [
        {"topic": "open", "event": "e", "payload": {"n": 1}, "private": true},
        {"topic": "closed", "event": "e", "payload": {"n": 2}, "private": true},
    ]});
    let req = t.rest_later(RestRequest::Broadcast {
        auth: auth.clone(),
        body: Bytes::from(body.to_string()),
    });
    assert!(!t.replies.contains_key(&req), "answered after the checks");
    assert_eq!(t.authz.len(), 2, "one check per private topic");
    t.authorize(rest_policy);
    assert_eq!(t.replies[&req].0, 202);
    assert_eq!(
        t.broadcasts(member),
        vec![("e".to_owned(), json!({"n": 1}))]
    );

    let single = |topic: &str| RestRequest::BroadcastEvent {
        auth: auth.clone(),
        topic: topic.into(),
        event: "e".into(),
        private: true,
        content_type: None,
        body: Bytes::from_static(b"{}"),
    };
    let req = t.rest_later(single("closed"));
    t.authorize(rest_policy);
    assert_eq!(t.replies[&req].0, 403);
    let req = t.rest_later(single("open"));
    t.authorize(rest_policy);
    assert_eq!(t.replies[&req].0, 202);
    assert_eq!(t.broadcasts(member).len(), 1);
}

#[test]
fn replication_ready_is_told_once_the_change_stream_is_live_or_times_out() {
    let mut config = super::test_config();
    config.database = true;
    config.replication_ready_timeout_ms = 5_000;
    let mut t = TestEngine::with_config(config);
    let conn = t.connect(Vsn::V2);
    t.join(conn, "a", json!({"broadcast": {"replication_ready": true}}));
    assert!(t.take(conn).is_empty(), "the stream is not live yet");
    t.handle(Input::Replication(true));
    let frames = t.take(conn);
    assert_eq!(events(&frames), vec!["system"]);
    assert_eq!(
        frames[0].payload(),
        &json!({"extension": "system", "status": "ok",
                "message": "Replication connection established", "channel": "a"})
    );
    // Live already: told right after the join.
    t.join(conn, "b", json!({"broadcast": {"replication_ready": true}}));
    assert_eq!(events(&t.take(conn)), vec!["system"]);
    // Never live: shut down when the wait runs out.
    t.handle(Input::Replication(false));
    t.join(conn, "c", json!({"broadcast": {"replication_ready": true}}));
    t.advance(5_000);
    let frames = t.take(conn);
    assert_eq!(events(&frames), vec!["system", "phx_close"]);
    assert_eq!(
        frames[0].payload()["message"],
        "Replication connection was not established in time"
    );
}
