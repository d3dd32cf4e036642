//! Presence: full state on join, diffs, multiple metas per key, updates, removal, limits,
//! and replication between replicas.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use super::{test_config, Received, TestEngine};
use crate::protocol::Vsn;
use crate::{ConnId, Input, NodeId};

fn presence_config(key: &str) -> Value {
    json!({"presence": {"enabled": true, "key": key}})
}

fn track(t: &mut TestEngine, conn: ConnId, sub: &str, payload: Value) -> Value {
    let ref_ = t.push(
        conn,
        sub,
        "presence",
        json!({"type": "presence", "event": "track", "payload": payload}),
    );
    reply_to(t, conn, &ref_)
}

fn untrack(t: &mut TestEngine, conn: ConnId, sub: &str) -> Value {
    let ref_ = t.push(
        conn,
        sub,
        "presence",
        json!({"type": "presence", "event": "untrack"}),
    );
    reply_to(t, conn, &ref_)
}

/// Removes and returns the reply to `ref_` from `conn`'s inbox; the rest stays queued.
fn reply_to(t: &mut TestEngine, conn: ConnId, ref_: &str) -> Value {
    let got = t.take(conn);
    let (replies, rest): (Vec<_>, Vec<_>) = got.into_iter().partition(|r| {
        matches!(r, Received::Text { event, ref_: Some(x), .. } if event == "phx_reply" && x == ref_)
    });
    for r in rest {
        t.requeue(conn, r);
    }
    replies
        .first()
        .map(|r| r.payload().clone())
        .unwrap_or(Value::Null)
}

fn diffs(t: &mut TestEngine, conn: ConnId) -> Vec<Value> {
    t.take(conn)
        .into_iter()
        .filter(|r| r.event() == "presence_diff")
        .map(|r| r.payload().clone())
        .collect()
}

fn metas(value: &Value, key: &str) -> Vec<Value> {
    value[key]["metas"].as_array().cloned().unwrap_or_default()
}

#[test]
fn joiner_gets_full_state_right_after_the_ok_reply() {
    let mut t = TestEngine::new();
    let (a, b, c) = (t.connect(Vsn::V2), t.connect(Vsn::V1), t.connect(Vsn::V2));
    t.join(a, "r", presence_config("alice"));
    assert_eq!(t.take(a)[0].payload(), &json!({}), "empty room: {{}}");
    assert_eq!(
        track(&mut t, a, "r", json!({"online_at": "now"})),
        json!({"status": "ok", "response": {}})
    );
    let reply = t.join_with(b, "r", json!({"config": presence_config("bob")}));
    assert_eq!(reply["status"], "ok");
    let got = t.take(b);
    assert_eq!(got[0].event(), "presence_state");
    let state = got[0].payload();
    let alice = metas(state, "alice");
    assert_eq!(alice.len(), 1);
    assert_eq!(alice[0]["online_at"], "now");
    assert!(alice[0]["phx_ref"].is_string());
    t.join(c, "r", json!({"presence": {"enabled": false}}));
    assert!(t.take(c).is_empty(), "no presence_state when disabled");
}

#[test]
fn track_sends_a_diff_to_every_member_with_presence_including_the_tracker() {
    let mut t = TestEngine::new();
    let (a, b, c) = (t.connect(Vsn::V2), t.connect(Vsn::V1), t.connect(Vsn::V2));
    t.join(a, "r", presence_config("alice"));
    t.join(b, "r", presence_config(""));
    t.join(c, "r", json!({}));
    for conn in [a, b, c] {
        t.take(conn);
    }
    track(&mut t, a, "r", json!({"a": 1}));
    for conn in [a, b] {
        let got = diffs(&mut t, conn);
        assert_eq!(got.len(), 1, "one diff for {conn:?}");
        assert_eq!(got[0]["leaves"], json!({}));
        let joined = metas(&got[0]["joins"], "alice");
        assert_eq!(joined[0]["a"], 1);
    }
    // c did not enable presence: no presence work for it, until it tracks itself.
    assert!(diffs(&mut t, c).is_empty());
    track(&mut t, c, "r", json!({"c": 1}));
    track(&mut t, a, "r", json!({"a": 2}));
    assert_eq!(
        diffs(&mut t, c).len(),
        2,
        "its own track and alice's update"
    );
}

#[test]
fn generated_keys_differ_and_explicit_keys_are_verbatim() {
    let mut t = TestEngine::new();
    let (a, b, observer) = (t.connect(Vsn::V2), t.connect(Vsn::V2), t.connect(Vsn::V2));
    t.join(observer, "r", presence_config("watcher"));
    t.join(a, "r", presence_config(""));
    t.join(b, "r", presence_config(""));
    track(&mut t, a, "r", json!({}));
    track(&mut t, b, "r", json!({}));
    t.take(observer);
    t.join_with(observer, "r", json!({"config": presence_config("watcher")}));
    let state = t
        .take(observer)
        .into_iter()
        .find(|r| r.event() == "presence_state")
        .unwrap();
    let keys: Vec<&String> = state.payload().as_object().unwrap().keys().collect();
    assert_eq!(keys.len(), 2);
    for key in keys {
        assert_eq!(key.len(), 36, "a UUID: {key}");
    }
}

#[test]
fn retrack_updates_with_phx_ref_prev_and_identical_retrack_is_silent() {
    let mut t = TestEngine::new();
    let a = t.connect(Vsn::V2);
    t.join(a, "r", presence_config("k"));
    track(&mut t, a, "r", json!({"s": "online"}));
    let first = diffs(&mut t, a);
    let r1 = metas(&first[0]["joins"], "k")[0]["phx_ref"].clone();
    assert_eq!(
        track(&mut t, a, "r", json!({"s": "online"}))["status"],
        "ok"
    );
    assert!(diffs(&mut t, a).is_empty(), "identical payload: no diff");
    track(&mut t, a, "r", json!({"s": "away"}));
    let update = diffs(&mut t, a);
    assert_eq!(update.len(), 1, "one diff with both sides");
    let joined = metas(&update[0]["joins"], "k");
    let left = metas(&update[0]["leaves"], "k");
    assert_eq!(joined.len(), 1);
    assert_eq!(joined[0]["s"], "away");
    assert_eq!(joined[0]["phx_ref_prev"], r1);
    assert_ne!(joined[0]["phx_ref"], r1);
    assert_eq!(left, vec![json!({"s": "online", "phx_ref": r1})]);
}

#[test]
fn untrack_leaves_and_untrack_without_track_is_a_silent_ok() {
    let mut t = TestEngine::new();
    let (a, b) = (t.connect(Vsn::V2), t.connect(Vsn::V2));
    t.join(a, "r", presence_config("a"));
    t.join(b, "r", presence_config("b"));
    assert_eq!(untrack(&mut t, a, "r")["status"], "ok");
    assert!(diffs(&mut t, b).is_empty());
    track(&mut t, a, "r", json!({"x": 1}));
    t.take(b);
    untrack(&mut t, a, "r");
    let got = diffs(&mut t, b);
    assert_eq!(got[0]["joins"], json!({}));
    assert_eq!(metas(&got[0]["leaves"], "a")[0]["x"], 1);
}

#[test]
fn two_channels_under_one_key_keep_two_metas_and_leave_one_at_a_time() {
    let mut t = TestEngine::new();
    let (a, b, observer) = (t.connect(Vsn::V2), t.connect(Vsn::V2), t.connect(Vsn::V2));
    t.join(a, "r", presence_config("same"));
    t.join(b, "r", presence_config("same"));
    track(&mut t, a, "r", json!({"device": "phone"}));
    track(&mut t, b, "r", json!({"device": "laptop"}));
    t.join(observer, "r", presence_config("o"));
    let state = t.take(observer)[0].payload().clone();
    assert_eq!(metas(&state, "same").len(), 2);
    t.push(a, "r", "phx_leave", json!({}));
    let got = diffs(&mut t, observer);
    assert_eq!(
        metas(&got[0]["leaves"], "same"),
        vec![metas(&state, "same")[0].clone()]
    );
}

#[test]
fn disconnect_and_timeout_remove_metas_without_client_action() {
    let mut t = TestEngine::new();
    let (a, b, c) = (t.connect(Vsn::V2), t.connect(Vsn::V2), t.connect(Vsn::V2));
    for (conn, key) in [(a, "a"), (b, "b"), (c, "c")] {
        t.join(conn, "r", presence_config(key));
        track(&mut t, conn, "r", json!({"k": key}));
    }
    t.take(c);
    t.handle(Input::Closed { conn: a });
    let got = diffs(&mut t, c);
    assert_eq!(got.len(), 1);
    assert_eq!(metas(&got[0]["leaves"], "a")[0]["k"], "a");
    // b stops talking; c keeps heartbeating.
    for i in 0..3 {
        t.advance(25_000);
        t.send(
            c,
            None,
            &format!("hb{i}"),
            "phoenix",
            "heartbeat",
            json!({}),
        );
    }
    assert!(t.closed.contains_key(&b));
    let got = diffs(&mut t, c);
    assert_eq!(metas(&got[0]["leaves"], "b")[0]["k"], "b");
    let late = t.connect(Vsn::V2);
    t.join(late, "r", presence_config("late"));
    let state = t.take(late)[0].payload().clone();
    assert_eq!(
        state.as_object().unwrap().keys().collect::<Vec<_>>(),
        vec!["c"]
    );
}

#[test]
fn non_object_track_payload_is_an_error_and_the_channel_stays() {
    let mut t = TestEngine::new();
    let a = t.connect(Vsn::V2);
    t.join(a, "r", presence_config("k"));
    let reply = track(&mut t, a, "r", json!([1, 2]));
    assert_eq!(
        reply,
        json!({"status": "error", "response": {"reason": "Presence track payload must be a map"}})
    );
    assert_eq!(track(&mut t, a, "r", json!({"ok": true}))["status"], "ok");
    let ref_ = t.push(a, "r", "presence", json!({"event": "update"}));
    assert_eq!(
        reply_to(&mut t, a, &ref_),
        json!({"status": "error", "response": {}})
    );
}

#[test]
fn a_room_presence_state_stays_within_its_limit() {
    let mut config = test_config();
    config.presence_state_bytes_max = 3_000;
    let mut t = TestEngine::with_config(config);
    let conns: Vec<ConnId> = (0..3).map(|_| t.connect(Vsn::V2)).collect();
    for (i, conn) in conns.iter().enumerate() {
        t.join(*conn, "big", presence_config(&format!("k{i}")));
    }
    let blob = "x".repeat(1_200);
    assert_eq!(
        track(&mut t, conns[0], "big", json!({ "blob": blob }))["status"],
        "ok"
    );
    assert_eq!(
        track(&mut t, conns[1], "big", json!({ "blob": blob }))["status"],
        "ok"
    );
    let refused = track(&mut t, conns[2], "big", json!({ "blob": blob }));
    assert_eq!(
        refused,
        json!({"status": "error", "response": {"reason": "PresenceStateTooLarge: The presence state of this channel would exceed 3000 bytes"}})
    );
    // A small meta still fits, and so does replacing a big one with another.
    assert_eq!(
        track(&mut t, conns[2], "big", json!({ "n": 1 }))["status"],
        "ok"
    );
    assert_eq!(
        track(&mut t, conns[1], "big", json!({ "blob": blob, "v": 2 }))["status"],
        "ok"
    );
    // Leaving frees its share.
    untrack(&mut t, conns[0], "big");
    assert_eq!(
        track(&mut t, conns[2], "big", json!({ "blob": blob }))["status"],
        "ok"
    );
    let joiner = t.connect(Vsn::V2);
    t.join(joiner, "big", presence_config("j"));
    let state = t
        .take(joiner)
        .into_iter()
        .find(|r| r.event() == "presence_state")
        .expect("presence_state");
    assert!(state.payload().to_string().len() <= 3_000);
    assert_eq!(metas(state.payload(), "k1").len(), 1);
    assert_eq!(metas(state.payload(), "k2").len(), 1);
}

#[test]
fn sixth_presence_push_in_thirty_seconds_closes_the_channel() {
    let mut t = TestEngine::new();
    let a = t.connect(Vsn::V2);
    t.join(a, "r", presence_config("k"));
    for i in 0..5 {
        assert_eq!(track(&mut t, a, "r", json!({"i": i}))["status"], "ok");
    }
    t.take(a);
    t.push(
        a,
        "r",
        "presence",
        json!({"event": "track", "payload": {"i": 5}}),
    );
    let got = t.take(a);
    let system = got
        .iter()
        .find(|r| r.event() == "system")
        .expect("system error");
    assert_eq!(
        system.payload()["message"],
        "Client presence rate limit exceeded"
    );
    assert!(got.iter().any(|r| r.event() == "phx_close"));
}

#[test]
fn phx_refs_are_unique_in_a_room() {
    let mut t = TestEngine::new();
    let mut refs = BTreeSet::new();
    let observer = t.connect(Vsn::V2);
    t.join(observer, "r", presence_config("o"));
    for i in 0..20 {
        let conn = t.connect(Vsn::V2);
        t.join(conn, "r", presence_config(""));
        track(&mut t, conn, "r", json!({"i": i}));
        track(&mut t, conn, "r", json!({"i": i + 100}));
    }
    for diff in diffs(&mut t, observer) {
        for (_, value) in diff["joins"].as_object().unwrap() {
            for meta in value["metas"].as_array().unwrap() {
                assert!(
                    refs.insert(meta["phx_ref"].as_str().unwrap().to_owned()),
                    "duplicate ref"
                );
            }
        }
    }
    assert_eq!(refs.len(), 40);
}

/// Moves every peer message from `from` meant for `to` to it.
fn relay(from: &mut TestEngine, to: &mut TestEngine, sender: NodeId) {
    let me = to.engine.node();
    for (addressee, msg) in std::mem::take(&mut from.to_peers) {
        if addressee.is_none_or(|a| a == me) {
            to.handle(Input::Peer { from: sender, msg });
        }
    }
}

#[test]
fn presence_replicates_between_replicas_and_a_downed_replica_leaves() {
    let (n1, n2) = (NodeId(1), NodeId(2));
    let mut one = TestEngine::node(test_config(), n1);
    let mut two = TestEngine::node(test_config(), n2);
    one.handle(Input::PeerUp(n2));
    two.handle(Input::PeerUp(n1));
    relay(&mut one, &mut two, n1);
    relay(&mut two, &mut one, n2);
    let (a, b) = (one.connect(Vsn::V2), two.connect(Vsn::V2));
    one.join(a, "r", presence_config("on-one"));
    two.join(b, "r", presence_config("on-two"));
    track(&mut one, a, "r", json!({"node": 1}));
    track(&mut one, a, "r", json!({"node": 1, "v": 2}));
    relay(&mut one, &mut two, n1);
    let got = diffs(&mut two, b);
    assert_eq!(metas(&got.last().unwrap()["joins"], "on-one")[0]["v"], 2);
    // Broadcasts cross too.
    one.broadcast(a, "r", "hello", json!({}));
    relay(&mut one, &mut two, n1);
    assert_eq!(two.broadcasts(b), vec![("hello".to_owned(), json!({}))]);
    // A lost delta is repaired by the heartbeat and a snapshot.
    let c = one.connect(Vsn::V2);
    one.join(c, "r", presence_config("lost"));
    track(&mut one, c, "r", json!({}));
    one.to_peers.clear();
    one.advance(1_500);
    relay(&mut one, &mut two, n1);
    relay(&mut two, &mut one, n2);
    relay(&mut one, &mut two, n1);
    let late = two.connect(Vsn::V2);
    two.join(late, "r", presence_config("late"));
    let state = two.take(late)[0].payload().clone();
    assert_eq!(
        state.as_object().unwrap().keys().collect::<Vec<_>>(),
        vec!["lost", "on-one"]
    );
    // Replica one goes down: one diff with all of its metas leaving.
    two.take(b);
    two.handle(Input::PeerDown(vec![n1]));
    let got = diffs(&mut two, b);
    assert_eq!(got.len(), 1);
    let leaves = got[0]["leaves"].as_object().unwrap();
    assert_eq!(leaves.keys().collect::<Vec<_>>(), vec!["lost", "on-one"]);
    // Late messages from the downed replica do not resurrect it.
    track(&mut one, a, "r", json!({"v": 3}));
    relay(&mut one, &mut two, n1);
    assert!(diffs(&mut two, b).is_empty());
}

#[test]
fn snapshots_go_only_to_the_replica_that_needs_one() {
    let nodes = [NodeId(1), NodeId(2), NodeId(3)];
    let mut one = TestEngine::node(test_config(), nodes[0]);
    let conn = one.connect(Vsn::V2);
    one.join(conn, "r", presence_config("k"));
    track(&mut one, conn, "r", json!({}));
    one.to_peers.clear();
    one.handle(Input::PeerUp(nodes[1]));
    one.handle(Input::PeerUp(nodes[2]));
    let snapshots: Vec<Option<NodeId>> = one
        .to_peers
        .iter()
        .filter(|(_, m)| matches!(m, crate::PeerMsg::PresenceSnapshot(_)))
        .map(|(to, _)| *to)
        .collect();
    assert_eq!(
        snapshots,
        [Some(nodes[1]), Some(nodes[2])],
        "one each, addressed"
    );
    // A replica that asks after a gap is answered alone.
    one.to_peers.clear();
    one.handle(Input::Peer {
        from: nodes[2],
        msg: crate::PeerMsg::PresenceRequest { owner: nodes[0] },
    });
    assert!(matches!(
        &one.to_peers[..],
        [(Some(to), crate::PeerMsg::PresenceSnapshot(_))] if *to == nodes[2]
    ));
}

#[test]
fn phx_refs_carry_the_whole_replica_id() {
    // Two shards of one process: ids that differ only above the low 16 bits, the same seed.
    let (a, b) = (
        NodeId::replica(7, crate::ShardId(0)),
        NodeId::replica(7, crate::ShardId(1)),
    );
    let (x, y) = (NodeId(a.0 << 8), NodeId(b.0 << 8));
    let mut refs = BTreeSet::new();
    for node in [a, b, x, y] {
        let mut t = TestEngine::node(test_config(), node);
        // The same seed for every engine: only the replica id tells them apart.
        t.engine = crate::Engine::new(test_config(), node, 1);
        let conn = t.connect(Vsn::V2);
        t.join(conn, "r", presence_config("k"));
        track(&mut t, conn, "r", json!({}));
        let diff = diffs(&mut t, conn).pop().expect("a diff");
        let phx_ref = metas(&diff["joins"], "k")[0]["phx_ref"].clone();
        assert!(refs.insert(phx_ref.to_string()), "{node:?} repeated a ref");
    }
}

#[test]
fn presence_entries_are_counted_as_owned_and_replicated() {
    let (n1, n2) = (NodeId(1), NodeId(2));
    let mut one = TestEngine::node(test_config(), n1);
    let mut two = TestEngine::node(test_config(), n2);
    one.handle(Input::PeerUp(n2));
    two.handle(Input::PeerUp(n1));
    relay(&mut one, &mut two, n1);
    relay(&mut two, &mut one, n2);
    let counts = |t: &TestEngine| {
        let stats = t.engine.stats();
        (stats.presence_entries, stats.presence_entries_replicated)
    };
    let (a, b, c) = (
        one.connect(Vsn::V2),
        one.connect(Vsn::V2),
        two.connect(Vsn::V2),
    );
    one.join(a, "r", presence_config("a"));
    one.join(b, "s", presence_config("b"));
    two.join(c, "r", presence_config("c"));
    track(&mut one, a, "r", json!({}));
    track(&mut one, b, "s", json!({}));
    // An update replaces the meta: still one entry.
    track(&mut one, b, "s", json!({"v": 2}));
    track(&mut two, c, "r", json!({}));
    relay(&mut one, &mut two, n1);
    relay(&mut two, &mut one, n2);
    assert_eq!(counts(&one), (2, 1));
    assert_eq!(counts(&two), (1, 2));
    untrack(&mut one, a, "r");
    relay(&mut one, &mut two, n1);
    assert_eq!(counts(&one), (1, 1));
    assert_eq!(counts(&two), (1, 1));
    // A disconnect removes the meta; a replica going down takes its copies away.
    one.handle(Input::Closed { conn: b });
    assert_eq!(counts(&one), (0, 1));
    two.handle(Input::PeerDown(vec![n1]));
    assert_eq!(counts(&two), (1, 0));
}
