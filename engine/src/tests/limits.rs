//! Each limit with Supabase's error text.

use bytes::Bytes;
use serde_json::json;

use super::{test_config, TestEngine};
use crate::protocol::Vsn;
use crate::rest::{RestAuth, RestRequest};

#[test]
fn the_101st_channel_is_refused_and_leaving_frees_a_slot() {
    let mut t = TestEngine::new();
    let conn = t.connect(Vsn::V2);
    for i in 0..100 {
        t.join(conn, &format!("r{i}"), json!({}));
    }
    let reply = t.join_with(conn, "r100", json!({"config": {}}));
    assert_eq!(
        reply["response"]["reason"],
        "ChannelRateLimitReached: Too many channels"
    );
    assert_eq!(t.refused(), [("too_many_channels", 1)]);
    t.push(conn, "r0", "phx_leave", json!({}));
    t.join(conn, "r100", json!({}));
}

#[test]
fn concurrent_users_limit_refuses_the_third_socket() {
    let mut config = test_config();
    config.concurrent_users_max = 2;
    let mut t = TestEngine::with_config(config);
    let (a, b, c) = (t.connect(Vsn::V2), t.connect(Vsn::V2), t.connect(Vsn::V2));
    t.join(a, "r", json!({}));
    t.join(b, "r", json!({}));
    let reply = t.join_with(c, "r", json!({"config": {}}));
    assert_eq!(
        reply["response"]["reason"],
        "ConnectionRateLimitReached: Too many connected users"
    );
    assert_eq!(t.refused(), [("too_many_users", 1)]);
    t.join(a, "second", json!({}));
    let token = t.token("anon", 60);
    let d = t.try_connect(Some("2.0.0"), Some(token));
    assert_eq!(
        t.rejected[&d],
        (429, json!({"error": "Too many connected users"}))
    );
}

#[test]
fn join_rate_limit_refuses_then_closes_the_socket() {
    let mut config = test_config();
    config.joins_per_sec_max = 1;
    config.rate_window_secs = 3;
    let mut t = TestEngine::with_config(config);
    let conn = t.connect(Vsn::V2);
    for i in 0..3 {
        t.join(conn, &format!("r{i}"), json!({}));
    }
    let reply = t.join_with(conn, "r3", json!({"config": {}}));
    assert_eq!(
        reply["response"]["reason"],
        "ClientJoinRateLimitReached: Too many joins per second"
    );
    assert_eq!(t.closed[&conn].0, 1001);
    assert_eq!(t.refused(), [("join_rate_limit", 1)]);
    let token = t.token("anon", 60);
    let again = t.try_connect(Some("2.0.0"), Some(token));
    assert_eq!(
        t.rejected[&again],
        (429, json!({"error": "Too many joins per second"}))
    );
    t.advance(1_000);
    let conn = t.connect(Vsn::V2);
    t.join(conn, "later", json!({}));
}

#[test]
fn sustained_events_over_the_limit_shut_down_receiving_channels_only() {
    let mut config = test_config();
    config.events_per_sec_max = 10;
    config.rate_window_secs = 1;
    let mut t = TestEngine::with_config(config);
    let (a, b) = (t.connect(Vsn::V2), t.connect(Vsn::V2));
    t.join(a, "r", json!({}));
    t.join(b, "r", json!({}));
    t.join(b, "quiet", json!({}));
    // Below the limit: 4 pushes and 4 deliveries a second never trip it.
    for _ in 0..20 {
        for _ in 0..4 {
            t.broadcast(a, "r", "e", json!({}));
        }
        t.advance(1_000);
        t.send(a, None, "hb", "phoenix", "heartbeat", json!({}));
        t.send(b, None, "hb", "phoenix", "heartbeat", json!({}));
    }
    assert_eq!(t.broadcasts(b).len(), 80);
    t.take(a);
    // Above it: the receiving channel is shut down with the upstream text.
    for _ in 0..10 {
        t.broadcast(a, "r", "e", json!({}));
    }
    let got = t.take(b);
    let system = got
        .iter()
        .find(|m| m.event() == "system")
        .expect("system error");
    assert_eq!(
        system.payload(),
        &json!({"extension": "system", "status": "error", "message": "Too many messages per second", "channel": "r"})
    );
    assert!(got.iter().any(|m| m.event() == "phx_close"));
    assert!(t.closed.is_empty(), "sockets stay open");
    t.advance(2_000);
    t.send(b, None, "hb2", "phoenix", "heartbeat", json!({}));
    assert_eq!(t.take(b).len(), 1, "the socket still answers heartbeats");
    let (status, _) = t.rest(RestRequest::Broadcast {
        auth: RestAuth {
            authorization: None,
            apikey: Some(t.token("anon", 60)),
        },
        body: Bytes::from(
            json!({"messages": [{"topic": "quiet", "event": "e", "payload": {}}]}).to_string(),
        ),
    });
    assert_eq!(status, 202);
    assert_eq!(t.broadcasts(b).len(), 1, "other channels keep working");
}

#[test]
fn rest_is_refused_with_429_while_the_event_rate_is_tripped() {
    let mut config = test_config();
    config.events_per_sec_max = 2;
    config.rate_window_secs = 1;
    let mut t = TestEngine::with_config(config);
    let key = t.token("anon", 60);
    let batch = |n: usize| RestRequest::Broadcast {
        auth: RestAuth {
            authorization: None,
            apikey: Some(key.clone()),
        },
        body: Bytes::from(
            json!({"messages": vec![json!({"topic": "r", "event": "e", "payload": {}}); n]})
                .to_string(),
        ),
    };
    let (status, body) = t.rest(batch(3));
    assert_eq!(status, 429);
    assert_eq!(
        &body[..],
        br#"{"message":"Too many messages to broadcast, please reduce the batch size"}"#
    );
    assert_eq!(t.rest(batch(2)).0, 202);
    let (status, body) = t.rest(batch(1));
    assert_eq!(
        (status, &body[..]),
        (
            429,
            &br#"{"message":"You have exceeded your rate limit"}"#[..]
        )
    );
}

#[test]
fn shards_share_the_project_limits_instead_of_multiplying_them() {
    use crate::{Engine, NodeId, Replica, ShardId, SharedLimits};
    let mut config = test_config();
    config.concurrent_users_max = 3;
    config.joins_per_sec_max = 2;
    config.rate_window_secs = 2;
    let limits = SharedLimits::new(&config);
    let shards: Vec<TestEngine> = (0..2)
        .map(|i| {
            let mut t = TestEngine::node(config.clone(), NodeId(i + 1));
            let replica = Replica {
                node: NodeId(i + 1),
                shard: ShardId(i as u16),
                limits: limits.clone(),
            };
            t.engine = Engine::with_replica(config.clone(), replica, 1);
            t
        })
        .collect();
    let [mut a, mut b] = <[TestEngine; 2]>::try_from(shards).ok().unwrap();
    // Four joins fill the shared burst of 2/s × 2 s, whichever shard takes them.
    let (a1, a2, b1, b2) = (
        a.connect(Vsn::V2),
        a.connect(Vsn::V2),
        b.connect(Vsn::V2),
        b.connect(Vsn::V2),
    );
    a.join(a1, "r", json!({}));
    b.join(b1, "r", json!({}));
    a.join(a2, "r", json!({}));
    // Three users in all: the fourth, on either shard, is one too many.
    let reply = b.join_with(b2, "r", json!({"config": {}}));
    assert_eq!(
        reply["response"]["reason"],
        "ConnectionRateLimitReached: Too many connected users"
    );
    assert_eq!(limits.users(), 3);
    // The refused join took no token; this one takes the last, whichever shard asks.
    a.join(a1, "second", json!({}));
    let reply = b.join_with(b1, "third", json!({"config": {}}));
    assert_eq!(
        reply["response"]["reason"],
        "ClientJoinRateLimitReached: Too many joins per second"
    );
    // Leaving on one shard frees a user for the other (b1's socket was closed for the
    // join rate, which freed its place too).
    a.push(a2, "r", "phx_leave", json!({}));
    assert_eq!(limits.users(), 1);
}
