//! Laws of the presence CRDT: merge is commutative, associative and idempotent; any
//! delivery order and duplication of deltas converges; a downed replica leaves nothing.

use std::collections::BTreeMap;

use proptest::prelude::*;
use serde_json::json;

use super::*;

fn entry(room: u8, value: u8, serial: u64) -> Entry {
    let mut payload = Map::new();
    payload.insert("v".to_owned(), json!(value));
    Entry {
        room: RoomKey {
            private: false,
            sub: Arc::from(format!("room{room}")),
        },
        key: Arc::from(format!("key{}", value % 2)),
        meta: Arc::new(Meta::new("key", format!("ref{serial}"), None, payload)),
    }
}

/// Every part of `other` merged into `into`, as a full state transfer does.
fn merge(into: &mut Replica, other: &Replica) {
    for (owner, part) in &other.parts {
        let entries = part.entries.iter().map(|(i, e)| (*i, e.clone())).collect();
        into.apply_snapshot(&Snapshot {
            owner: *owner,
            clock: part.clock,
            entries,
        });
    }
}

fn view_of(replica: &Replica) -> BTreeMap<EntryId, Entry> {
    replica
        .view()
        .into_iter()
        .map(|(id, e)| (id, e.clone()))
        .collect()
}

#[derive(Clone, Debug)]
enum Op {
    Put {
        replica: usize,
        instance: u64,
        room: u8,
        value: u8,
    },
    Remove {
        replica: usize,
        instance: u64,
    },
    Flush {
        replica: usize,
    },
    Deliver {
        message: usize,
        to: usize,
        keep: bool,
    },
}

fn op(replicas: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..replicas, 0..4u64, 0..2u8, 0..4u8).prop_map(|(replica, instance, room, value)| Op::Put { replica, instance, room, value }),
        2 => (0..replicas, 0..4u64).prop_map(|(replica, instance)| Op::Remove { replica, instance }),
        2 => (0..replicas).prop_map(|replica| Op::Flush { replica }),
        4 => (any::<usize>(), 0..replicas, any::<bool>()).prop_map(|(message, to, keep)| Op::Deliver { message, to, keep }),
    ]
}

fn scenario() -> impl Strategy<Value = (usize, Vec<Op>, Vec<usize>)> {
    (2..=5usize).prop_flat_map(|n| {
        (
            Just(n),
            prop::collection::vec(op(n), 0..60),
            prop::collection::vec(any::<usize>(), 0..200),
        )
    })
}

/// Runs `ops` with a lossy, reordering, duplicating network; then heals: every replica
/// flushes, messages are delivered in the shuffled `order` until none is left (gaps
/// answered with the owner's snapshot), and a round of heartbeats repairs lost deltas.
fn run(n: usize, ops: &[Op], order: &[usize]) -> Vec<Replica> {
    let mut replicas: Vec<Replica> = (0..n).map(|i| Replica::new(NodeId(i as u64 + 1))).collect();
    let mut network: Vec<Delta> = Vec::new();
    let mut serial = 0;
    let deliver = |replicas: &mut Vec<Replica>, to: usize, delta: &Delta| {
        if replicas[to].apply_delta(delta).is_err() {
            let owner = delta.owner.0 as usize - 1;
            let snapshot = replicas[owner].snapshot();
            replicas[to].apply_snapshot(&snapshot);
        }
    };
    for op in ops {
        match *op {
            Op::Put {
                replica,
                instance,
                room,
                value,
            } => {
                serial += 1;
                replicas[replica].put(instance, entry(room, value, serial));
            }
            Op::Remove { replica, instance } => {
                replicas[replica].remove(instance);
            }
            Op::Flush { replica } => network.extend(replicas[replica].take_delta()),
            Op::Deliver { message, to, keep } => {
                if network.is_empty() {
                    continue;
                }
                let index = message % network.len();
                let delta = if keep {
                    network[index].clone()
                } else {
                    network.swap_remove(index)
                };
                deliver(&mut replicas, to, &delta);
            }
        }
    }
    for replica in replicas.iter_mut() {
        network.extend(replica.take_delta());
    }
    let mut pending: Vec<(usize, Delta)> = network
        .iter()
        .flat_map(|d| (0..n).map(move |to| (to, d.clone())))
        .collect();
    let mut picks = order.iter().cycle();
    while !pending.is_empty() {
        let index = picks.next().map_or(0, |p| p % pending.len());
        let (to, delta) = pending.swap_remove(index);
        deliver(&mut replicas, to, &delta);
    }
    for owner in 0..n {
        let (clock, snapshot) = (replicas[owner].clock(), replicas[owner].snapshot());
        for replica in replicas.iter_mut() {
            if replica.behind(snapshot.owner, clock) {
                replica.apply_snapshot(&snapshot);
            }
        }
    }
    replicas
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn any_delivery_order_and_duplication_converges((n, ops, order) in scenario()) {
        let replicas = run(n, &ops, &order);
        let first = view_of(&replicas[0]);
        for replica in &replicas[1..] {
            prop_assert_eq!(&view_of(replica), &first);
        }
        for replica in &replicas {
            // Every replica's own entries are in the converged view: nothing lost.
            for (instance, entry) in &replica.parts[&replica.me].entries {
                let id = EntryId { owner: replica.me, instance: *instance };
                prop_assert_eq!(first.get(&id), Some(entry));
            }
        }
    }

    #[test]
    fn merge_is_commutative_associative_and_idempotent((n, ops, order) in scenario(), split in any::<usize>()) {
        // Three states that saw different parts of the same histories.
        let full = run(n, &ops, &order);
        let partial = run(n, &ops[..split % (ops.len() + 1)], &[]);
        let fresh: Vec<Replica> = (0..n).map(|i| Replica::new(NodeId(i as u64 + 100))).collect();
        let states = [&full[0], &partial[n - 1], &fresh[0]];
        let merged = |order: &[usize]| {
            let mut into = Replica::new(NodeId(999));
            for &i in order {
                merge(&mut into, states[i]);
            }
            view_of(&into)
        };
        let ab = merged(&[0, 1]);
        prop_assert_eq!(&ab, &merged(&[1, 0]));
        prop_assert_eq!(&merged(&[0, 1, 2]), &merged(&[2, 1, 0]));
        prop_assert_eq!(&merged(&[0, 0, 1, 1]), &ab);
        // (a ⊔ b) ⊔ c == a ⊔ (b ⊔ c), with the inner merge materialised as a replica.
        let mut bc = Replica::new(NodeId(998));
        merge(&mut bc, states[1]);
        merge(&mut bc, states[2]);
        let mut left = Replica::new(NodeId(997));
        merge(&mut left, states[0]);
        merge(&mut left, &bc);
        prop_assert_eq!(view_of(&left), merged(&[0, 1, 2]));
    }

    #[test]
    fn a_replica_marked_down_leaves_nothing_anywhere((n, ops, order) in scenario(), victim in 0..5usize) {
        let mut replicas = run(n, &ops, &order);
        let victim = NodeId((victim % n) as u64 + 1);
        for replica in replicas.iter_mut() {
            let before = replica.view().keys().filter(|id| id.owner == victim).count();
            let changes = replica.drop_owner(victim);
            if replica.me() != victim {
                prop_assert_eq!(changes.len(), before, "one leave per dropped entry");
                prop_assert!(changes.iter().all(|c| c.side == Side::Leave));
                prop_assert!(replica.view().keys().all(|id| id.owner != victim));
            }
        }
    }
}

#[test]
fn update_yields_a_leave_and_a_join_and_identical_put_yields_nothing() {
    let mut replica = Replica::new(NodeId(1));
    let first = entry(0, 1, 1);
    assert_eq!(replica.put(7, first.clone()).len(), 1);
    assert!(replica.put(7, first.clone()).is_empty());
    let changes = replica.put(7, entry(0, 3, 2));
    assert_eq!(
        changes.iter().map(|c| c.side).collect::<Vec<_>>(),
        vec![Side::Leave, Side::Join]
    );
    assert_eq!(changes[0].meta, first.meta);
    assert_eq!(replica.room(&first.room).count(), 1);
}

#[test]
fn a_gap_asks_for_a_snapshot() {
    let (mut a, mut b) = (Replica::new(NodeId(1)), Replica::new(NodeId(2)));
    a.put(1, entry(0, 1, 1));
    let lost = a.take_delta().unwrap();
    a.put(2, entry(0, 2, 2));
    let next = a.take_delta().unwrap();
    assert_eq!(b.apply_delta(&next), Err(Gap { owner: NodeId(1) }));
    assert_eq!(b.apply_snapshot(&a.snapshot()).len(), 2);
    assert_eq!(
        b.apply_delta(&lost),
        Ok(Vec::new()),
        "stale deltas change nothing"
    );
}
