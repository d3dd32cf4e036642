//! One seed run twice gives one trace, even while other simulations run beside it on other
//! threads (tokio numbers tasks process-wide, so anything that depended on task ids, like
//! the order a crashed node's sockets drop in, would show here).

use switchboard_sim::{Report, Scenario};

/// Seeds that crash a node, kill and cut clients: the faults that make clients reconnect.
fn busy_seeds() -> Vec<u64> {
    (0..)
        .filter(|&seed| {
            let faults = Scenario::from_seed(seed).faults;
            faults.node_crash && faults.client_crash > 0.0 && faults.client_partitions > 0
        })
        .take(3)
        .collect()
}

#[test]
fn a_seed_replays_to_the_same_trace() {
    let seeds = busy_seeds();
    let run = |seeds: Vec<u64>| -> Vec<Report> {
        seeds
            .into_iter()
            .map(|seed| Scenario::from_seed(seed).run())
            .collect()
    };
    let (mut first, mut second) = std::thread::scope(|scope| {
        let forward = scope.spawn(|| run(seeds.clone()));
        let backward = scope.spawn(|| run(seeds.iter().rev().copied().collect()));
        (
            forward.join().expect("forward"),
            backward.join().expect("backward"),
        )
    });
    first.sort_by_key(|r| r.seed);
    second.sort_by_key(|r| r.seed);
    for (a, b) in first.iter().zip(&second) {
        assert!(
            a.deliveries > 0 && a.changes > 0 && a.reconnects > 0,
            "seed {} exercised too little: {a:?}",
            a.seed
        );
        assert!(
            a.violations.is_empty(),
            "seed {}: {:#?}",
            a.seed,
            a.violations
        );
        assert_eq!(
            a.trace_hash, b.trace_hash,
            "seed {} is not deterministic",
            a.seed
        );
    }
}
