//! Two shards of one process are peers: clients the kernel put on different shards see each
//! other's broadcasts, acks, presence and REST broadcasts, and postgres changes with RLS
//! reach subscribers on either shard.

use std::time::Duration;

use serde_json::json;

use crate::pg::TempPostgres;
use crate::support::{connect, http, meta_ref, recv, send, token, until, Server, Ws, SECRET};
use crate::wal::wait_streaming;

/// The shard of the replica that made `phx_ref`: refs are the replica id in hex, then 12 hex
/// digits of a counter; the replica id's low 16 bits are the shard.
fn shard_of(phx_ref: &str) -> u16 {
    let node = &phx_ref[..phx_ref.len() - 12];
    (u64::from_str_radix(node, 16).expect("a hex replica id") & 0xffff) as u16
}

/// Sockets, one on each of `shards` shards: each tracks itself in a probe channel, and the
/// ref of its meta names the shard that holds it. Connections go on until every shard has
/// one (the kernel spreads them by a hash of the addresses, so a few do).
async fn one_per_shard(server: &Server, shards: u16) -> Vec<Ws> {
    let mut placed: Vec<Option<Ws>> = (0..shards).map(|_| None).collect();
    for i in 0..64 {
        let mut ws = connect(server, "2.0.0").await;
        let key = format!("probe{i}");
        crate::support::join(&mut ws, "probe", json!({"presence": {"key": key}})).await;
        send(
            &mut ws,
            json!(["1", "2", "realtime:probe", "presence", {"type": "presence", "event": "track", "payload": {}}]),
        )
        .await;
        let shard = shard_of(&until(&mut ws, |f| meta_ref(f, &key)).await);
        send(
            &mut ws,
            json!(["1", "3", "realtime:probe", "phx_leave", {}]),
        )
        .await;
        // Everything of the probe is read once its channel closes: the next frame on this
        // socket is the caller's.
        until(&mut ws, |f| (f[3] == "phx_close").then_some(())).await;
        let slot = &mut placed[usize::from(shard)];
        if slot.is_none() {
            *slot = Some(ws);
        }
        if placed.iter().all(Option::is_some) {
            return placed.into_iter().flatten().collect();
        }
    }
    panic!("64 connections never reached all {shards} shards");
}

#[tokio::test]
async fn clients_on_different_shards_share_broadcast_presence_and_rest() {
    let server = Server::start(&["--shards", "2"]);
    let [mut a, mut b]: [Ws; 2] = one_per_shard(&server, 2).await.try_into().ok().unwrap();
    // Presence enabled, as realtime-js asks when it listens: the join's presence_state holds
    // what the other shard tracked if its delta came first, a diff brings it if it comes later.
    let config =
        |key: &str| json!({"presence": {"key": key, "enabled": true}, "broadcast": {"ack": true}});
    crate::support::join(&mut a, "room", config("a")).await;
    send(
        &mut a,
        json!(["1", "2", "realtime:room", "presence", {"type": "presence", "event": "track", "payload": {"on": 0}}]),
    )
    .await;
    // A join on shard 1 sees what was tracked on shard 0, once the delta crossed over.
    crate::support::join(&mut b, "room", config("b")).await;
    let seen = until(&mut b, |f| meta_ref(f, "a")).await;
    assert_eq!(shard_of(&seen), 0);
    send(
        &mut b,
        json!(["1", "2", "realtime:room", "presence", {"type": "presence", "event": "track", "payload": {"on": 1}}]),
    )
    .await;
    let seen = until(&mut a, |f| meta_ref(f, "b")).await;
    assert_eq!(shard_of(&seen), 1);

    // A broadcast with ack: acknowledged to its sender, delivered across.
    send(
        &mut a,
        json!(["1", "9", "realtime:room", "broadcast", {"type": "broadcast", "event": "e", "payload": {"n": 1}}]),
    )
    .await;
    let ack = until(&mut a, |f| (f[1] == "9").then(|| f[4]["status"].clone())).await;
    assert_eq!(ack, "ok");
    let got = until(&mut b, |f| {
        (f[3] == "broadcast").then(|| f[4]["payload"].clone())
    })
    .await;
    assert_eq!(got, json!({"n": 1}));

    // REST lands on one shard; members on both get it.
    let body = json!({"messages": [{"topic": "room", "event": "rest", "payload": {"n": 2}}]});
    let (status, _, _) = http(
        &server.addr,
        "POST",
        "/api/broadcast",
        &[
            ("apikey", &token("service_role", 3600)),
            ("content-type", "application/json"),
        ],
        body.to_string().as_bytes(),
    )
    .await;
    assert_eq!(status, 202);
    for ws in [&mut a, &mut b] {
        let got = until(ws, |f| {
            (f[4]["event"] == "rest").then(|| f[4]["payload"].clone())
        })
        .await;
        assert_eq!(got, json!({"n": 2}));
    }

    // A socket that goes away on shard 1 leaves shard 0's view.
    drop(b);
    let left = until(&mut a, |f| {
        (f[3] == "presence_diff" && f[4]["leaves"].get("b").is_some()).then_some(())
    })
    .await;
    assert_eq!(left, ());
}

/// REST requests a client makes one after another reach every member in that order, on
/// whichever shard the kernel puts each request's connection: each goes through one shard,
/// the one every REST request goes through, so a later one never overtakes an earlier one
/// still crossing to the members' shard.
#[tokio::test]
async fn rest_broadcasts_made_one_after_another_arrive_in_order_on_every_shard() {
    let server = Server::start(&["--shards", "2"]);
    let mut members = one_per_shard(&server, 2).await;
    for ws in &mut members {
        crate::support::join(ws, "ordered", json!({})).await;
    }
    const SENT: u64 = 300;
    let key = token("service_role", 3600);
    for n in 0..SENT {
        // A fresh connection each: the kernel spreads them over both shards.
        let (status, _, _) = http(
            &server.addr,
            "POST",
            "/api/broadcast",
            &[("apikey", &key), ("content-type", "application/json")],
            json!({"messages": [{"topic": "ordered", "event": "n", "payload": {"n": n}}]})
                .to_string()
                .as_bytes(),
        )
        .await;
        assert_eq!(status, 202);
    }
    for (shard, ws) in members.iter_mut().enumerate() {
        let mut got = Vec::new();
        while got.len() < SENT as usize {
            let frame = recv(ws).await;
            if frame[4]["event"] == "n" {
                got.push(frame[4]["payload"]["n"].as_u64().expect("n"));
            }
        }
        let sent: Vec<u64> = (0..SENT).collect();
        assert_eq!(got, sent, "the member on shard {shard}");
    }
}

const RLS_SCHEMA: &str = "
create table public.r (id bigserial primary key, owner uuid not null, n int8 not null);
alter table public.r enable row level security;
create policy own on public.r for select to authenticated using (owner = auth.uid());
grant all on public.r to authenticated;
alter publication supabase_realtime add table public.r;";

const USERS: [&str; 2] = [
    "aaaaaaaa-aaaa-aaaa-aaaa-aaaaaaaaaaaa",
    "bbbbbbbb-bbbb-bbbb-bbbb-bbbbbbbbbbbb",
];

#[tokio::test]
async fn postgres_changes_with_rls_reach_subscribers_on_both_shards() {
    let pg = TempPostgres::start();
    pg.psql(RLS_SCHEMA);
    let server = Server::start(&["--shards", "2", "--database-url", &pg.url()]);
    wait_streaming(&pg.client().await).await;
    let sockets = one_per_shard(&server, 2).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut subscribers = Vec::new();
    for (mut ws, user) in sockets.into_iter().zip(USERS) {
        let user_token = switchboard_engine::auth::sign(
            SECRET,
            &json!({"role": "authenticated", "sub": user, "exp": now + 3600}),
        );
        send(
            &mut ws,
            json!(["5", "5", "realtime:rows", "phx_join", {
                "config": {"postgres_changes": [{"event": "INSERT", "schema": "public", "table": "r"}]},
                "access_token": user_token,
            }]),
        )
        .await;
        let status = until(&mut ws, |f| {
            (f[3] == "system" && f[4]["extension"] == "postgres_changes")
                .then(|| f[4]["status"].clone())
        })
        .await;
        assert_eq!(status, "ok");
        subscribers.push(ws);
    }
    // Rows alternate owners; each shard's subscriber gets exactly its own, in order.
    let mut sql = String::new();
    for n in 0..20 {
        sql.push_str(&format!(
            "insert into public.r (owner, n) values ('{}', {n});\n",
            USERS[n % 2]
        ));
    }
    pg.psql(&sql);
    for (index, ws) in subscribers.iter_mut().enumerate() {
        let mut got = Vec::new();
        while got.len() < 10 {
            let frame = until(ws, |f| {
                (f[3] == "postgres_changes").then(|| f[4]["data"]["record"].clone())
            })
            .await;
            assert_eq!(frame["owner"], USERS[index], "only rows its policy allows");
            got.push(frame["n"].as_i64().expect("n"));
        }
        let expected: Vec<i64> = (0..20).filter(|n| n % 2 == index as i64).collect();
        assert_eq!(got, expected, "every allowed row, in commit order");
        // Nothing more arrives: the other owner's rows were withheld.
        let extra = tokio::time::timeout(Duration::from_millis(500), recv(ws)).await;
        assert!(
            extra.as_ref().is_err() || extra.as_ref().is_ok_and(|f| f[3] != "postgres_changes"),
            "unexpected {extra:?}"
        );
    }
}
