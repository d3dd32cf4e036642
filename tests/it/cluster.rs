//! Several switchboard processes on loopback joined through a real `nats-server`: members
//! on different nodes share broadcasts, REST broadcasts and presence; a node that dies, or
//! is cut from NATS, has its presence leave everywhere else; NATS restarting repairs it.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};

use crate::nats::{Nats, Proxy};
use crate::support::{connect, http, metric, send, token, until, Server, Ws};

/// Fast heartbeats, so a silent node is down within 2 s.
const DOWN_MS: u64 = 2_000;

/// A node of the cluster behind `nats_url`.
fn node(nats_url: &str, name: &str) -> Server {
    node_down_after(nats_url, name, DOWN_MS)
}

/// A node of the cluster behind `nats_url` that counts another as down after `down_ms`.
fn node_down_after(nats_url: &str, name: &str, down_ms: u64) -> Server {
    Server::start(&[
        "--cluster-nats",
        nats_url,
        "--cluster-node-name",
        name,
        "--cluster-heartbeat-ms",
        "200",
        "--cluster-down-ms",
        &down_ms.to_string(),
    ])
}

/// [`formed`], for tests without a runtime of their own.
pub fn wait_formed(nodes: &[&Server]) {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(formed(nodes));
}

/// Waits until every node sees all the others up.
async fn formed(nodes: &[&Server]) {
    let others = (nodes.len() - 1).to_string();
    for _ in 0..200 {
        let mut seen = Vec::new();
        for node in nodes {
            seen.push(metric(node, "switchboard_cluster_nodes").await);
        }
        if seen.iter().all(|s| *s == others) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the cluster did not form");
}

/// A socket on `server` joined to `room` with presence key `key` and `self`/`ack` on.
async fn member(server: &Server, room: &str, key: &str) -> Ws {
    let mut ws = connect(server, "2.0.0").await;
    let config = json!({"broadcast": {"self": false, "ack": true}, "presence": {"key": key, "enabled": true}});
    crate::support::join(&mut ws, room, config).await;
    ws
}

async fn track(ws: &mut Ws, room: &str, payload: Value) {
    let frame = json!(["1", "t", format!("realtime:{room}"), "presence",
        {"type": "presence", "event": "track", "payload": payload}]);
    send(ws, frame).await;
}

/// Applies presence frames to `roster` (metas per key) until its keys are `expected`, each
/// with one meta: a resync that duplicated an entry never matches.
async fn roster_becomes(ws: &mut Ws, roster: &mut BTreeMap<String, usize>, expected: &[&str]) {
    let done = |roster: &BTreeMap<String, usize>| {
        roster
            .keys()
            .map(String::as_str)
            .eq(expected.iter().copied())
            && roster.values().all(|metas| *metas == 1)
    };
    if done(roster) {
        return;
    }
    until(ws, |frame| {
        let count = |side: &Value| -> Vec<(String, usize)> {
            side.as_object()
                .map(|o| {
                    o.iter()
                        .map(|(k, v)| (k.clone(), v["metas"].as_array().map_or(0, Vec::len)))
                        .collect()
                })
                .unwrap_or_default()
        };
        match frame[3].as_str() {
            Some("presence_state") => {
                roster.clear();
                roster.extend(count(&frame[4]));
            }
            Some("presence_diff") => {
                for (key, n) in count(&frame[4]["joins"]) {
                    *roster.entry(key).or_default() += n;
                }
                for (key, n) in count(&frame[4]["leaves"]) {
                    let left = roster.entry(key.clone()).or_default();
                    *left = left.saturating_sub(n);
                    if *left == 0 {
                        roster.remove(&key);
                    }
                }
            }
            _ => return None,
        }
        done(roster).then_some(())
    })
    .await;
}

/// The payload of the next broadcast `ws` receives.
async fn next_broadcast(ws: &mut Ws) -> Value {
    until(ws, |frame| {
        (frame[3] == "broadcast").then(|| frame[4]["payload"].clone())
    })
    .await
}

async fn broadcast(ws: &mut Ws, room: &str, n: u64) {
    let frame = json!(["1", format!("b{n}"), format!("realtime:{room}"), "broadcast",
        {"type": "broadcast", "event": "e", "payload": {"n": n}}]);
    send(ws, frame).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_share_broadcasts_rest_and_presence_with_interest_routing() {
    let nats = Nats::start();
    let (a, b, c) = (
        node(&nats.url(), "a"),
        node(&nats.url(), "b"),
        node(&nats.url(), "c"),
    );
    formed(&[&a, &b, &c]).await;
    let mut wa = member(&a, "lobby", "ka").await;
    let mut wb = member(&b, "lobby", "kb").await;
    let mut wc = member(&c, "lobby", "kc").await;
    for (ws, key) in [(&mut wa, "ka"), (&mut wb, "kb"), (&mut wc, "kc")] {
        track(ws, "lobby", json!({"who": key})).await;
    }
    for ws in [&mut wa, &mut wb, &mut wc] {
        roster_becomes(ws, &mut BTreeMap::new(), &["ka", "kb", "kc"]).await;
    }
    let (status, _, body) = http(&a.addr, "GET", "/readyz", &[], b"").await;
    let body: Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!((status, &body["cluster_nodes"]), (200, &json!(2)), "{body}");

    // A broadcast with ack on node a reaches b and c, once each.
    broadcast(&mut wa, "lobby", 1).await;
    until(&mut wa, |f| {
        (f[1] == "b1" && f[4]["status"] == "ok").then_some(())
    })
    .await;
    broadcast(&mut wa, "lobby", 2).await;
    for ws in [&mut wb, &mut wc] {
        assert_eq!(next_broadcast(ws).await["n"], 1);
        assert_eq!(next_broadcast(ws).await["n"], 2, "each broadcast once");
    }

    // REST broadcast on node b reaches members on a and c, and on b itself.
    let service = token("service_role", 3600);
    let body = json!({"messages": [{"topic": "lobby", "event": "e", "payload": {"n": 3}}]});
    let (status, _, _) = http(
        &b.addr,
        "POST",
        "/realtime/v1/api/broadcast",
        &[
            ("apikey", service.as_str()),
            ("content-type", "application/json"),
        ],
        body.to_string().as_bytes(),
    )
    .await;
    assert_eq!(status, 202);
    for ws in [&mut wa, &mut wb, &mut wc] {
        assert_eq!(next_broadcast(ws).await["n"], 3);
    }

    // Interest routing: broadcasts in a room with no member on c never reach c.
    let mut pa = member(&a, "pair", "pa").await;
    let mut pb = member(&b, "pair", "pb").await;
    let before: u64 = metric(&c, "switchboard_cluster_messages_received_total")
        .await
        .parse()
        .unwrap();
    for n in 0..100 {
        broadcast(&mut pa, "pair", n).await;
    }
    for n in 0..100 {
        assert_eq!(next_broadcast(&mut pb).await["n"], n);
    }
    let after: u64 = metric(&c, "switchboard_cluster_messages_received_total")
        .await
        .parse()
        .unwrap();
    assert!(
        after - before < 50,
        "c received {} messages while a sent 100 broadcasts to a room c has no members in",
        after - before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_sent_right_after_a_join_reply_reaches_the_joiner_on_another_node() {
    let nats = Nats::start();
    let (a, b) = (node(&nats.url(), "a"), node(&nats.url(), "b"));
    formed(&[&a, &b]).await;
    let (mut sender, mut joiner) = (connect(&a, "2.0.0").await, connect(&b, "2.0.0").await);
    // Each room is new on b: b subscribes to it as the joiner joins, and the sender on a
    // broadcasts the moment the join is answered.
    for n in 0..50u64 {
        let room = format!("race-{n}");
        crate::support::join(&mut sender, &room, json!({})).await;
        crate::support::join(&mut joiner, &room, json!({})).await;
        broadcast(&mut sender, &room, n).await;
        assert_eq!(next_broadcast(&mut joiner).await["n"], n, "in {room}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_presence_leaves_and_its_clients_rejoin_elsewhere() {
    let nats = Nats::start();
    let a = node(&nats.url(), "a");
    let b = node(&nats.url(), "b");
    formed(&[&a, &b]).await;
    let mut watcher = member(&a, "room", "watcher").await;
    let mut victim = member(&b, "room", "victim").await;
    let mut other = member(&b, "room", "other").await;
    track(&mut watcher, "room", json!({})).await;
    track(&mut victim, "room", json!({})).await;
    track(&mut other, "room", json!({})).await;
    let mut roster = BTreeMap::new();
    roster_becomes(&mut watcher, &mut roster, &["other", "victim", "watcher"]).await;

    drop(b); // SIGKILL
    drop((victim, other));
    // Every entry of the dead node leaves in one diff.
    let leaves = until(&mut watcher, |f| {
        (f[3] == "presence_diff").then(|| f[4].clone())
    })
    .await;
    let left: Vec<&String> = leaves["leaves"]
        .as_object()
        .expect("leaves")
        .keys()
        .collect();
    assert_eq!(left, ["other", "victim"], "one diff: {leaves}");
    roster.remove("other");
    roster.remove("victim");

    // The victim's client reconnects to the node still up and tracks again.
    let mut back = member(&a, "room", "victim").await;
    track(&mut back, "room", json!({})).await;
    roster_becomes(&mut watcher, &mut roster, &["victim", "watcher"]).await;
    roster_becomes(&mut back, &mut BTreeMap::new(), &["victim", "watcher"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stopped_gracefully_tells_the_others_at_once() {
    let nats = Nats::start();
    // Nobody would be declared down within the test's patience.
    let a = node_down_after(&nats.url(), "a", 600_000);
    let mut b = node_down_after(&nats.url(), "b", 600_000);
    formed(&[&a, &b]).await;
    let mut watcher = member(&a, "room", "watcher").await;
    let mut leaving = member(&b, "room", "leaving").await;
    track(&mut watcher, "room", json!({})).await;
    track(&mut leaving, "room", json!({})).await;
    let mut roster = BTreeMap::new();
    roster_becomes(&mut watcher, &mut roster, &["leaving", "watcher"]).await;
    let reader = tokio::spawn(async move {
        // The client answers the drain's close frame.
        use futures_util::StreamExt;
        while let Some(Ok(_)) = leaving.next().await {}
    });
    assert!(b.terminate(), "b stops cleanly");
    roster_becomes(&mut watcher, &mut roster, &["watcher"]).await;
    reader.await.expect("reader");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_started_while_nats_is_down_serve_alone_then_join() {
    let mut nats = Nats::start();
    nats.stop();
    let a = node(&nats.url(), "a");
    let b = node(&nats.url(), "b");
    // Each serves its own clients meanwhile.
    let mut wa = member(&a, "room", "ka").await;
    let mut wa2 = member(&a, "room", "ka2").await;
    broadcast(&mut wa, "room", 1).await;
    assert_eq!(next_broadcast(&mut wa2).await["n"], 1);
    nats.restart();
    formed(&[&a, &b]).await;
    let mut wb = member(&b, "room", "kb").await;
    broadcast(&mut wb, "room", 2).await;
    assert_eq!(next_broadcast(&mut wa).await["n"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_is_repaired_after_nats_restarts() {
    let mut nats = Nats::start();
    let a = node(&nats.url(), "a");
    let b = node(&nats.url(), "b");
    formed(&[&a, &b]).await;
    let mut wa = member(&a, "room", "ka").await;
    let mut wb = member(&b, "room", "kb").await;
    track(&mut wa, "room", json!({})).await;
    track(&mut wb, "room", json!({})).await;
    let (mut ra, mut rb) = (BTreeMap::new(), BTreeMap::new());
    roster_becomes(&mut wa, &mut ra, &["ka", "kb"]).await;
    roster_becomes(&mut wb, &mut rb, &["ka", "kb"]).await;

    nats.stop();
    roster_becomes(&mut wa, &mut ra, &["ka"]).await;
    roster_becomes(&mut wb, &mut rb, &["kb"]).await;
    nats.restart();
    roster_becomes(&mut wa, &mut ra, &["ka", "kb"]).await;
    roster_becomes(&mut wb, &mut rb, &["ka", "kb"]).await;

    // Broadcasts flow again once presence is back.
    broadcast(&mut wb, "room", 7).await;
    assert_eq!(next_broadcast(&mut wa).await["n"], 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_from_nats_while_up_loses_and_regains_the_others_presence() {
    let nats = Nats::start();
    let proxy = Proxy::start(nats.port);
    let a = node(&nats.url(), "a");
    let b = node(&proxy.url(), "b");
    formed(&[&a, &b]).await;
    let mut wa = member(&a, "room", "ka").await;
    let mut wb = member(&b, "room", "kb").await;
    track(&mut wa, "room", json!({})).await;
    track(&mut wb, "room", json!({})).await;
    let (mut ra, mut rb) = (BTreeMap::new(), BTreeMap::new());
    roster_becomes(&mut wa, &mut ra, &["ka", "kb"]).await;
    roster_becomes(&mut wb, &mut rb, &["ka", "kb"]).await;

    proxy.pause();
    roster_becomes(&mut wa, &mut ra, &["ka"]).await;
    roster_becomes(&mut wb, &mut rb, &["kb"]).await;
    // Meanwhile b's own members still hear each other.
    let mut wb2 = member(&b, "room", "kb2").await;
    track(&mut wb2, "room", json!({})).await;
    roster_becomes(&mut wb, &mut rb, &["kb", "kb2"]).await;

    proxy.resume();
    roster_becomes(&mut wa, &mut ra, &["ka", "kb", "kb2"]).await;
    roster_becomes(&mut wb, &mut rb, &["ka", "kb", "kb2"]).await;
}

/// The table the failover test inserts into, published.
const ITEMS: &str = "
create table public.items (id bigserial primary key, n int not null);
grant all on public.items to anon, authenticated, service_role;
alter publication supabase_realtime add table public.items;
";

/// A node of the cluster behind `nats_url` that reads changes from `database_url`.
fn database_node(nats_url: &str, name: &str, database_url: &str) -> Server {
    Server::start(&[
        "--cluster-nats",
        nats_url,
        "--cluster-node-name",
        name,
        "--cluster-heartbeat-ms",
        "200",
        "--cluster-down-ms",
        &DOWN_MS.to_string(),
        "--database-url",
        database_url,
    ])
}

/// Which of `nodes` holds the replication slot, once exactly one does.
async fn holder(nodes: &[&Server]) -> usize {
    for _ in 0..400 {
        let mut held = Vec::new();
        for (index, node) in nodes.iter().enumerate() {
            if metric(node, "switchboard_replication_slot_held").await == "1" {
                held.push(index);
            }
        }
        if let [one] = held[..] {
            return one;
        }
        assert!(held.len() < 2, "two nodes hold the slot: {held:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no node took the replication slot");
}

/// The `n` of the next inserted row `ws` hears of.
async fn next_n(ws: &mut Ws) -> i64 {
    until(ws, |f| {
        (f[3] == "postgres_changes").then(|| f[4]["data"]["record"]["n"].clone())
    })
    .await
    .as_i64()
    .expect("n")
}

/// A socket on `server` subscribed to inserts into public.items.
async fn items_subscriber(server: &Server) -> Ws {
    let mut ws = connect(server, "2.0.0").await;
    send(
        &mut ws,
        json!(["1", "1", "realtime:items", "phx_join", {
            "config": {"postgres_changes": [{"event": "INSERT", "schema": "public", "table": "items"}]},
        }]),
    )
    .await;
    let status = until(&mut ws, |f| {
        (f[3] == "system" && f[4]["extension"] == "postgres_changes")
            .then(|| f[4]["status"].clone())
    })
    .await;
    assert_eq!(status, "ok");
    ws
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_reach_every_node_and_survive_the_slot_holders_death_in_order() {
    let pg = crate::pg::TempPostgres::start();
    pg.psql(ITEMS);
    let nats = Nats::start();
    let mut nodes = vec![
        database_node(&nats.url(), "a", &pg.url()),
        database_node(&nats.url(), "b", &pg.url()),
    ];
    formed(&[&nodes[0], &nodes[1]]).await;
    let held = holder(&[&nodes[0], &nodes[1]]).await;
    crate::wal::wait_streaming(&pg.client().await).await;
    let survivor = 1 - held;
    let mut on_survivor = items_subscriber(&nodes[survivor]).await;
    let mut on_holder = items_subscriber(&nodes[held]).await;
    // Broadcasts from the database ride the same batches.
    let mut ticks = connect(&nodes[survivor], "2.0.0").await;
    crate::support::join(&mut ticks, "ticks", json!({})).await;

    // Inserts go on, one transaction each, while the holder is killed midway.
    const ROWS: i64 = 300;
    let client = pg.client().await;
    let inserts = tokio::spawn(async move {
        for n in 0..ROWS {
            client
                .batch_execute(&format!(
                    "begin; insert into public.items (n) values ({n});
                     select realtime.send('{{\"n\": {n}}}', 'tick', 'ticks', false); commit;"
                ))
                .await
                .expect("insert");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    // Both nodes deliver while the holder lives.
    for expected in 0..50 {
        assert_eq!(next_n(&mut on_holder).await, expected);
    }
    let killed = nodes.remove(held);
    drop(killed); // SIGKILL
    drop(on_holder);
    let mut got = Vec::new();
    while got.len() < ROWS as usize {
        got.push(next_n(&mut on_survivor).await);
    }
    inserts.await.expect("inserts");
    assert_eq!(
        got,
        (0..ROWS).collect::<Vec<_>>(),
        "every row once, in commit order"
    );
    let mut sent = Vec::new();
    while sent.len() < ROWS as usize {
        let n = until(&mut ticks, |f| {
            (f[3] == "broadcast").then(|| f[4]["payload"]["n"].clone())
        })
        .await;
        sent.push(n.as_i64().expect("n"));
    }
    assert_eq!(
        sent,
        (0..ROWS).collect::<Vec<_>>(),
        "every realtime.send once, in order"
    );
    assert_eq!(holder(&[&nodes[0]]).await, 0, "the survivor took the slot");
    // Nothing more: no row came twice.
    let extra = tokio::time::timeout(Duration::from_millis(500), next_n(&mut on_survivor)).await;
    assert!(extra.is_err(), "a row came twice: {extra:?}");
    let extra =
        tokio::time::timeout(Duration::from_millis(200), crate::support::recv(&mut ticks)).await;
    assert!(extra.is_err(), "a message came twice: {extra:?}");
}
