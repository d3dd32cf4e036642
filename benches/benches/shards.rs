//! The scaling law of engines as peers: N engines on N threads, each with its own members
//! of one room, every broadcast reaching the members of every engine through peer
//! messages, as the shards of one process do. Reported per N = 1, 2, 4, 8: deliveries per
//! second in all. Above the machine's core count the threads share cores, so the figure
//! that carries over to bigger machines is the work per engine: wall time × N / cores.
//!
//! `cargo bench -p switchboard-benches --bench shards`

use std::sync::mpsc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use switchboard_benches::{broadcast_frame, config, join_room, NOW};
use switchboard_engine::{
    ConnId, Engine, Input, NodeId, Output, PeerMsg, Replica, ShardId, SharedLimits,
};

/// Members of the room on each engine.
const MEMBERS: u64 = 1_000;

/// Broadcasts each engine's sender makes per iteration.
const ROUNDS: u64 = 20;

/// `n` engines of one process, each a peer of the others, each with [`MEMBERS`] members.
fn shards(n: u16) -> Vec<(Engine, ConnId)> {
    let limits = SharedLimits::new(&config());
    let nodes: Vec<NodeId> = (0..n).map(|s| NodeId::replica(1, ShardId(s))).collect();
    nodes
        .iter()
        .enumerate()
        .map(|(shard, &node)| {
            let replica = Replica {
                node,
                shard: ShardId(shard as u16),
                limits: limits.clone(),
            };
            let mut engine = Engine::with_replica(config(), replica, shard as u64);
            for &peer in nodes.iter().filter(|p| **p != node) {
                engine.handle(NOW, Input::PeerUp(peer));
            }
            while engine.poll_output().is_some() {}
            join_room(engine, MEMBERS)
        })
        .collect()
}

/// Carries out `engine`'s outputs: counts deliveries, posts broadcasts to the peers.
fn drain(
    engine: &mut Engine,
    me: NodeId,
    peers: &[(NodeId, mpsc::Sender<(NodeId, PeerMsg)>)],
) -> usize {
    let mut delivered = 0;
    while let Some(output) = engine.poll_output() {
        match output {
            Output::Send { to, .. } => delivered += to.iter().count(),
            Output::ToPeers(msg @ PeerMsg::Broadcast { .. }) => {
                for (_, peer) in peers {
                    let _ = peer.send((me, msg.clone()));
                }
            }
            _ => {}
        }
    }
    delivered
}

/// Every engine on its own thread sends [`ROUNDS`] broadcasts and handles what its peers
/// send, until it has delivered every broadcast of every engine. Returns the deliveries.
fn exchange(engines: &mut [(Engine, ConnId)], start: u64) -> usize {
    let (senders, receivers): (Vec<_>, Vec<_>) = engines.iter().map(|_| mpsc::channel()).unzip();
    let nodes: Vec<NodeId> = engines.iter().map(|(e, _)| e.node()).collect();
    std::thread::scope(|scope| {
        let workers: Vec<_> = engines
            .iter_mut()
            .zip(receivers)
            .enumerate()
            .map(|(index, ((engine, sender), inbox))| {
                let me = nodes[index];
                let peers: Vec<_> = nodes
                    .iter()
                    .copied()
                    .zip(senders.iter().cloned())
                    .filter(|(node, _)| *node != me)
                    .collect();
                let expected = ROUNDS * (peers.len() as u64);
                scope.spawn(move || {
                    let mut delivered = 0;
                    let mut received = 0;
                    let handle = |engine: &mut Engine, (from, msg)| {
                        engine.handle(NOW, Input::Peer { from, msg });
                        drain(engine, me, &peers)
                    };
                    for n in 0..ROUNDS {
                        let msg = broadcast_frame(start + n);
                        engine.handle(NOW, Input::Frame { conn: *sender, msg });
                        delivered += drain(engine, me, &peers);
                        while let Ok(event) = inbox.try_recv() {
                            received += 1;
                            delivered += handle(engine, event);
                        }
                    }
                    while received < expected {
                        let event = inbox.recv().expect("peers outlive the exchange");
                        received += 1;
                        delivered += handle(engine, event);
                    }
                    delivered
                })
            })
            .collect();
        drop(senders);
        workers.into_iter().map(|w| w.join().expect("worker")).sum()
    })
}

fn scaling(c: &mut Criterion) {
    let mut group = c.benchmark_group("shards");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    for n in [1u16, 2, 4, 8] {
        let mut engines = shards(n);
        let mut start = 0;
        // Every broadcast reaches every member but its sender.
        let per_iteration = u64::from(n) * ROUNDS * (u64::from(n) * MEMBERS - 1);
        group.throughput(Throughput::Elements(per_iteration));
        group.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter_custom(|iterations| {
                let began = Instant::now();
                for _ in 0..iterations {
                    start += ROUNDS;
                    let delivered = exchange(&mut engines, start);
                    assert_eq!(delivered as u64, per_iteration);
                }
                began.elapsed()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, scaling);
criterion_main!(benches);
