//! WAL progress of a process's shards: what may be confirmed to Postgres.
//!
//! Every shard gets every batch and reports, in [`crate::Output::WalProgress`], how far it
//! has handed changes out. The replication slot may be confirmed only up to the **lowest**
//! of those positions: a slow shard (a batch waiting for verdicts) holds the slot back, so
//! a crash never skips a change that shard had not delivered. The WAL reader of a process
//! and the simulator's database both confirm what this says.

/// The positions every shard reported, and the confirmable minimum.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Per shard, the highest position it reported.
    shards: Vec<u64>,
    /// What was last returned as confirmable.
    confirmed: u64,
    #[cfg(feature = "planted-bugs")]
    confirm_max: bool,
}

impl Progress {
    /// Progress for `shards` shards, none of which has reported.
    pub fn new(shards: usize) -> Progress {
        Progress {
            shards: vec![0; shards.max(1)],
            confirmed: 0,
            #[cfg(feature = "planted-bugs")]
            confirm_max: false,
        }
    }

    /// Plants [`crate::PlantedBug::ConfirmMaxProgress`] when `bug` asks for it.
    #[cfg(feature = "planted-bugs")]
    pub fn planted(mut self, bug: Option<crate::PlantedBug>) -> Progress {
        self.confirm_max = bug == Some(crate::PlantedBug::ConfirmMaxProgress);
        self
    }

    /// Records that `shard` handed out everything up to `lsn`; returns the new position to
    /// confirm when the minimum over every shard moved forward.
    pub fn report(&mut self, shard: usize, lsn: u64) -> Option<u64> {
        let slot = self.shards.get_mut(shard)?;
        *slot = (*slot).max(lsn);
        let lowest = self.shards.iter().copied().min().unwrap_or(0);
        #[cfg(feature = "planted-bugs")]
        let lowest = if self.confirm_max {
            self.shards.iter().copied().max().unwrap_or(0)
        } else {
            lowest
        };
        (lowest > self.confirmed).then(|| {
            self.confirmed = lowest;
            lowest
        })
    }

    /// The highest position handed out by every shard.
    pub fn confirmed(&self) -> u64 {
        self.confirmed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slowest_shard_holds_the_slot_back() {
        let mut progress = Progress::new(3);
        assert_eq!(progress.report(0, 30), None);
        assert_eq!(progress.report(1, 20), None);
        assert_eq!(progress.report(2, 10), Some(10));
        assert_eq!(progress.report(2, 40), Some(20));
        assert_eq!(progress.report(1, 40), Some(30));
        assert_eq!(progress.report(1, 35), None, "never backwards");
        assert_eq!(progress.confirmed(), 30);
        assert_eq!(
            progress.report(9, 99),
            None,
            "an unknown shard changes nothing"
        );
    }

    #[test]
    fn one_shard_confirms_what_it_reports() {
        let mut progress = Progress::new(1);
        assert_eq!(progress.report(0, 5), Some(5));
        assert_eq!(progress.report(0, 5), None);
    }
}
