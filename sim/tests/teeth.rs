//! The oracle has teeth: each planted engine bug is found within a bounded number of seeds.

use switchboard_engine::PlantedBug;
use switchboard_sim::{PrintSeedOnPanic, Scenario};

/// The first seed (of `max`) whose run reports a violation naming `invariant`.
fn first_catch(bug: PlantedBug, invariant: &str, max: u64) -> Option<u64> {
    (0..max).find(|&seed| {
        let _replay = PrintSeedOnPanic(seed, "teeth");
        let report = Scenario::from_seed(seed).plant(bug).run();
        report.violations.iter().any(|v| v.starts_with(invariant))
    })
}

#[test]
fn dropping_one_broadcast_in_fifty_is_caught() {
    let seed = first_catch(PlantedBug::DropBroadcastOneIn(50), "invariant 1", 10);
    assert!(
        seed.is_some(),
        "a dropped broadcast went unnoticed for 10 seeds"
    );
}

#[test]
fn delivering_to_the_sender_without_self_is_caught() {
    let seed = first_catch(PlantedBug::DeliverToSelf, "invariant 4", 10);
    assert!(seed.is_some(), "self-delivery went unnoticed for 10 seeds");
}

#[test]
fn forgetting_presence_removal_on_close_is_caught() {
    let seed = first_catch(PlantedBug::KeepPresenceOnClose, "invariant 5", 20);
    assert!(
        seed.is_some(),
        "a presence leak went unnoticed for 20 seeds"
    );
}

#[test]
fn delivering_rows_rls_hides_is_caught() {
    let seed = first_catch(PlantedBug::IgnoreRlsVerdicts, "invariant 6", 10);
    assert!(seed.is_some(), "an RLS leak went unnoticed for 10 seeds");
}

#[test]
fn dropping_frames_of_slow_consumers_is_caught() {
    let seed = first_catch(PlantedBug::DropFramesOfSlowConsumers, "invariant 1", 20);
    assert!(
        seed.is_some(),
        "frames dropped for a slow consumer went unnoticed for 20 seeds"
    );
}

#[test]
fn never_timing_out_silent_sockets_is_caught() {
    let seed = first_catch(PlantedBug::IgnoreHeartbeatTimeout, "invariant 5", 20);
    assert!(
        seed.is_some(),
        "a vanished client's presence went unnoticed for 20 seeds"
    );
}

#[test]
fn hiding_rows_whose_check_failed_is_caught() {
    let seed = first_catch(PlantedBug::HideRowsOfFailedChecks, "invariant 6", 20);
    assert!(
        seed.is_some(),
        "rows withheld after a failed check went unnoticed for 20 seeds"
    );
}

#[test]
fn confirming_the_most_advanced_shard_is_caught() {
    let seed = first_catch(PlantedBug::ConfirmMaxProgress, "invariant 6", 20);
    assert!(
        seed.is_some(),
        "a slot confirmed past a slow shard went unnoticed for 20 seeds"
    );
}

#[test]
fn admitting_joins_the_read_policy_refuses_is_caught() {
    let seed = first_catch(PlantedBug::IgnoreReadPolicy, "invariant 8", 10);
    assert!(
        seed.is_some(),
        "a private join its policy refuses went unnoticed for 10 seeds"
    );
}

#[test]
fn broadcasting_what_the_write_policy_refuses_is_caught() {
    let seed = first_catch(PlantedBug::IgnoreWritePolicy, "invariant 8", 10);
    assert!(
        seed.is_some(),
        "a broadcast its policy refuses went unnoticed for 10 seeds"
    );
}

#[test]
fn dropping_messages_sent_from_sql_is_caught() {
    let seed = first_catch(PlantedBug::DropBroadcastOneIn(20), "invariant 9", 10);
    assert!(
        seed.is_some(),
        "a dropped message from SQL went unnoticed for 10 seeds"
    );
}
