//! Engine micro-benchmarks: broadcast fan-out, codec, presence merge and postgres_changes
//! filter matching. No IO: these are the engine's own costs.
//!
//! `cargo bench -p switchboard-benches --bench engine`

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use serde_json::{json, Map};
use switchboard_benches::{broadcast_frame, config, connect, deliveries, drive, room, token, NOW};
use switchboard_engine::changes::{Change, ChangeBatch, ChangeKind, Column, Table};
use switchboard_engine::presence::crdt::{Entry, Meta, Replica};
use switchboard_engine::protocol::{self, decode, UserBroadcastPush, Vsn};
use switchboard_engine::{ConnId, Encoding, Engine, Input, NodeId, RoomKey, WsMessage};

/// Counts allocations so a benchmark can report allocations per operation.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn fan_out(c: &mut Criterion) {
    let mut group = c.benchmark_group("fan_out");
    for members in [10u64, 1_000, 100_000] {
        let (mut engine, sender) = room(members);
        let mut n = 0;
        // Warm the member-list cache, then count what one broadcast allocates.
        engine.handle(
            NOW,
            Input::Frame {
                conn: sender,
                msg: broadcast_frame(0),
            },
        );
        let delivered = deliveries(&mut engine);
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        engine.handle(
            NOW,
            Input::Frame {
                conn: sender,
                msg: broadcast_frame(1),
            },
        );
        deliveries(&mut engine);
        let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
        eprintln!(
            "fan_out/{members}: {delivered} deliveries, {allocations} allocations per broadcast"
        );
        group.throughput(Throughput::Elements(delivered as u64));
        group.sample_size(if members >= 100_000 { 20 } else { 100 });
        group.bench_function(BenchmarkId::from_parameter(members), |b| {
            b.iter(|| {
                n += 1;
                engine.handle(
                    NOW,
                    Input::Frame {
                        conn: sender,
                        msg: broadcast_frame(n),
                    },
                );
                black_box(deliveries(&mut engine))
            })
        });
    }
    group.finish();
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec");
    group.throughput(Throughput::Elements(1));
    let payload =
        json!({"type": "broadcast", "event": "cursor", "payload": {"x": 1, "y": 2, "name": "ann"}});
    let v2 = WsMessage::Text(Bytes::from(
        json!(["1", "2", "realtime:room", "broadcast", payload]).to_string(),
    ));
    let v1 = WsMessage::Text(Bytes::from(
        json!({"topic": "realtime:room", "event": "broadcast", "payload": payload, "ref": "2", "join_ref": "1"}).to_string(),
    ));
    let push = UserBroadcastPush {
        event: "cursor".into(),
        metadata: None,
        encoding: Encoding::Json,
        payload: Bytes::from_static(br#"{"x":1,"y":2,"name":"ann"}"#),
    };
    let binary = WsMessage::Binary(
        protocol::encode_user_broadcast_push(Some("1"), Some("2"), "realtime:room", &push).unwrap(),
    );
    group.bench_function("decode_v1", |b| {
        b.iter(|| black_box(decode(Vsn::V1, &v1).is_ok()))
    });
    group.bench_function("decode_v2", |b| {
        b.iter(|| black_box(decode(Vsn::V2, &v2).is_ok()))
    });
    group.bench_function("decode_v2_binary", |b| {
        b.iter(|| black_box(decode(Vsn::V2, &binary).is_ok()))
    });
    let text = payload.to_string();
    group.bench_function("encode_v1", |b| {
        b.iter(|| {
            black_box(protocol::encode_text(
                Vsn::V1,
                None,
                None,
                "realtime:room",
                "broadcast",
                &text,
            ))
        })
    });
    group.bench_function("encode_v2", |b| {
        b.iter(|| {
            black_box(protocol::encode_text(
                Vsn::V2,
                None,
                None,
                "realtime:room",
                "broadcast",
                &text,
            ))
        })
    });
    group.bench_function("encode_v2_binary", |b| {
        b.iter(|| {
            black_box(protocol::encode_user_broadcast(
                "realtime:room",
                "cursor",
                None,
                Encoding::Json,
                &push.payload,
            ))
        })
    });
    group.finish();
}

fn entry(room: &RoomKey, i: u64) -> Entry {
    let mut payload = Map::new();
    payload.insert("user".into(), json!(format!("user-{i}")));
    payload.insert("online_at".into(), json!("2026-01-01T00:00:00Z"));
    Entry {
        room: room.clone(),
        key: Arc::from(format!("key-{i}")),
        meta: Arc::new(Meta::new("key", format!("ref-{i}"), None, payload)),
    }
}

fn presence(c: &mut Criterion) {
    let mut group = c.benchmark_group("presence_merge");
    let room = RoomKey {
        private: false,
        sub: Arc::from("room"),
    };
    for size in [1_000u64, 10_000] {
        let mut owner = Replica::new(NodeId(1));
        for i in 0..size {
            owner.put(i, entry(&room, i));
        }
        let snapshot = owner.snapshot();
        group.throughput(Throughput::Elements(size));
        group.bench_with_input(
            BenchmarkId::new("snapshot", size),
            &snapshot,
            |b, snapshot| {
                b.iter_batched(
                    || Replica::new(NodeId(2)),
                    |mut replica| {
                        black_box(replica.apply_snapshot(snapshot).len());
                        replica
                    },
                    BatchSize::LargeInput,
                )
            },
        );
        // A delta of 100 updates merged into a replica that holds the large state.
        owner.take_delta();
        for i in 0..100 {
            owner.put(i, entry(&room, i + size));
        }
        let delta = owner.take_delta().unwrap();
        let mut base = Replica::new(NodeId(2));
        base.apply_snapshot(&snapshot);
        group.throughput(Throughput::Elements(100));
        group.bench_with_input(
            BenchmarkId::new("delta_100_into", size),
            &delta,
            |b, delta| {
                b.iter_batched(
                    || {
                        let mut replica = Replica::new(NodeId(2));
                        replica.apply_snapshot(&snapshot);
                        replica
                    },
                    // Returned, so dropping the large replica stays outside the timing.
                    |mut replica| {
                        black_box(replica.apply_delta(delta).map(|c| c.len()).ok());
                        replica
                    },
                    BatchSize::LargeInput,
                )
            },
        );
    }
    group.finish();
}

fn filters(c: &mut Criterion) {
    let mut group = c.benchmark_group("postgres_changes");
    let columns = vec![
        Column {
            name: "id".into(),
            type_name: "int8".into(),
        },
        Column {
            name: "owner".into(),
            type_name: "text".into(),
        },
    ];
    let table = Table {
        schema: "public".into(),
        name: "todos".into(),
        columns: columns.clone(),
        primary_key: vec!["id".into()],
        rls: false,
    };
    let mut engine = Engine::new(config(), NodeId(1), 1);
    drive(&mut engine, Input::Publication(vec![table]));
    let key = token("anon", "bench");
    let subscriptions = 10_000u64;
    for id in 1..=subscriptions {
        let conn = connect(&mut engine, id, "2.0.0", &key);
        let binding = json!({"event": "*", "schema": "public", "table": "todos", "filter": format!("owner=eq.user{}", id % 100)});
        let join = json!(["1", "1", format!("realtime:t{id}"), "phx_join", {"config": {"postgres_changes": [binding]}}]);
        drive(
            &mut engine,
            Input::Frame {
                conn: ConnId(id),
                msg: WsMessage::Text(Bytes::from(join.to_string())),
            },
        );
        let _ = conn;
    }
    let change = |n: u64| Change {
        schema: "public".into(),
        table: "todos".into(),
        kind: ChangeKind::Insert,
        commit_timestamp: "2026-01-01T00:00:00.000Z".into(),
        columns: columns.clone(),
        record: json!({"id": n, "owner": format!("user{}", n % 100)})
            .as_object()
            .cloned(),
        old_record: None,
        lsn: n,
        xid: n as u32,
    };
    let mut lsn = 0;
    group.throughput(Throughput::Elements(1));
    group.bench_function("match_10k_subscriptions", |b| {
        b.iter(|| {
            lsn += 1;
            engine.handle(
                NOW,
                Input::Changes(std::sync::Arc::new(ChangeBatch {
                    changes: vec![change(lsn)],
                    lsn,
                })),
            );
            black_box(deliveries(&mut engine))
        })
    });
    group.finish();
}

criterion_group!(benches, fan_out, codec, presence, filters);
criterion_main!(benches);
