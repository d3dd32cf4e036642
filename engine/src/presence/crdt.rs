//! The replicated presence state: a map from replica to that replica's own entries,
//! versioned by the replica's clock.
//!
//! In the spirit of Phoenix.Tracker every entry has exactly one owner, the replica hosting
//! its channel, and only the owner adds, updates or removes it. Each owner's part of the
//! state is therefore a single-writer register versioned by the owner's clock, and the
//! whole state is a join-semilattice: merging two states keeps, per owner, the part with
//! the higher clock (equal clocks mean equal parts, since one writer produced both).
//! Removals are observed by absence at a higher clock, so an add and a remove never
//! conflict.
//!
//! Peers exchange δ-mutations: the net effect of an owner's changes between two clocks.
//! A delta applies to any state whose clock for that owner lies in `[from, to)`; a later
//! state ignores it (idempotence) and an earlier one has a gap and asks the owner for a
//! full [`Snapshot`], which is merged by the same max-clock rule.

use std::collections::BTreeMap;
use std::sync::Arc;

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::room::RoomKey;
use crate::NodeId;

/// One tracked presence: a channel's meta under its presence key in a room.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// The room the channel joined.
    pub room: RoomKey,
    /// The presence key (`config.presence.key` or a generated UUID).
    pub key: Arc<str>,
    /// What clients see.
    pub meta: Arc<Meta>,
}

/// A presence meta: the tracked payload plus its refs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    /// Unique across the room, so clients can match leaves to joins.
    pub phx_ref: String,
    /// The ref this meta replaced, on updates.
    pub phx_ref_prev: Option<String>,
    /// The tracked payload.
    pub payload: Map<String, Value>,
    /// Bytes this meta adds to a `presence_state` frame (its JSON and its key's share),
    /// counted once when it is made: a room's state is bounded by the sum.
    pub bytes: usize,
}

impl Meta {
    /// A meta under presence key `key`, with its size counted.
    pub fn new(
        key: &str,
        phx_ref: String,
        phx_ref_prev: Option<String>,
        payload: Map<String, Value>,
    ) -> Meta {
        let mut meta = Meta {
            phx_ref,
            phx_ref_prev,
            payload,
            bytes: 0,
        };
        // `"key":{"metas":[…]}` around it, at most.
        meta.bytes = meta.to_json().to_string().len() + key.len() + 16;
        meta
    }

    /// The meta as clients see it: the payload with `phx_ref` (and `phx_ref_prev`).
    pub fn to_json(&self) -> Value {
        let mut object = self.payload.clone();
        object.insert("phx_ref".to_owned(), Value::from(self.phx_ref.as_str()));
        if let Some(prev) = &self.phx_ref_prev {
            object.insert("phx_ref_prev".to_owned(), Value::from(prev.as_str()));
        }
        Value::Object(object)
    }
}

/// An entry's identity: its owner replica and the owner's channel instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct EntryId {
    /// The replica hosting the channel.
    pub owner: NodeId,
    /// The channel instance on that replica.
    pub instance: u64,
}

/// The net effect of an owner's changes between clocks `from` and `to`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Delta {
    /// The replica whose entries changed.
    pub owner: NodeId,
    /// The owner's clock before these changes.
    pub from: u64,
    /// The owner's clock after them.
    pub to: u64,
    /// Entries present at `to`, by instance.
    pub puts: Vec<(u64, Entry)>,
    /// Instances absent at `to`.
    pub removes: Vec<u64>,
}

/// An owner's whole part of the state at a clock.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The replica whose entries these are.
    pub owner: NodeId,
    /// The owner's clock.
    pub clock: u64,
    /// Every entry the owner holds, by instance.
    pub entries: Vec<(u64, Entry)>,
}

/// Whether a meta appeared or went away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// In `joins`.
    Join,
    /// In `leaves`.
    Leave,
}

/// One visible change, for `presence_diff`.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    /// Where it happened.
    pub room: RoomKey,
    /// Under which presence key.
    pub key: Arc<str>,
    /// The meta that joined or left.
    pub meta: Arc<Meta>,
    /// Join or leave.
    pub side: Side,
}

/// A delta could not be applied: changes between our clock and its `from` are missing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gap {
    /// Whose snapshot is needed.
    pub owner: NodeId,
}

#[derive(Clone, Debug, Default, PartialEq)]
struct Part {
    clock: u64,
    entries: BTreeMap<u64, Entry>,
}

/// The entries of one room, and their total size.
#[derive(Clone, Debug, Default)]
struct RoomEntries {
    ids: BTreeMap<EntryId, ()>,
    /// Sum of the entries' [`Meta::bytes`].
    bytes: usize,
}

/// One replica's view of the presence state.
#[derive(Debug)]
pub struct Replica {
    me: NodeId,
    parts: BTreeMap<NodeId, Part>,
    by_room: FxHashMap<RoomKey, RoomEntries>,
    /// Local instances changed since the last delta, and the clock that delta starts at.
    touched: BTreeMap<u64, ()>,
    delta_from: u64,
}

impl Replica {
    /// An empty state for replica `me`.
    pub fn new(me: NodeId) -> Self {
        let mut parts = BTreeMap::new();
        parts.insert(me, Part::default());
        Replica {
            me,
            parts,
            by_room: FxHashMap::default(),
            touched: BTreeMap::new(),
            delta_from: 0,
        }
    }

    /// This replica's id.
    pub fn me(&self) -> NodeId {
        self.me
    }

    /// Our clock for `owner`: how much of its history we have merged.
    pub fn clock_of(&self, owner: NodeId) -> u64 {
        self.parts.get(&owner).map_or(0, |p| p.clock)
    }

    /// Our own clock, carried by heartbeats so peers notice missed deltas.
    pub fn clock(&self) -> u64 {
        self.clock_of(self.me)
    }

    /// Whether a peer's heartbeat clock shows changes we never merged.
    pub fn behind(&self, owner: NodeId, clock: u64) -> bool {
        owner != self.me && clock > self.clock_of(owner)
    }

    /// A local entry.
    pub fn local(&self, instance: u64) -> Option<&Entry> {
        self.parts[&self.me].entries.get(&instance)
    }

    /// How many entries this replica holds: its own, and its copies of other replicas'.
    pub fn entry_counts(&self) -> (usize, usize) {
        let own = self.parts[&self.me].entries.len();
        let all: usize = self.parts.values().map(|part| part.entries.len()).sum();
        (own, all - own)
    }

    /// The size of `room`'s `presence_state`: the sum of its metas' [`Meta::bytes`].
    pub fn room_bytes(&self, room: &RoomKey) -> usize {
        self.by_room.get(room).map_or(0, |r| r.bytes)
    }

    /// Every entry in `room`, in a deterministic order.
    pub fn room(&self, room: &RoomKey) -> impl Iterator<Item = &Entry> + '_ {
        self.by_room.get(room).into_iter().flat_map(move |room| {
            let ids = &room.ids;
            ids.keys()
                .filter_map(move |id| self.parts.get(&id.owner)?.entries.get(&id.instance))
        })
    }

    /// Sets a local entry (track or update).
    pub fn put(&mut self, instance: u64, entry: Entry) -> Vec<Change> {
        let me = self.me;
        let mut changes = Vec::new();
        self.set(me, instance, Some(entry), &mut changes);
        self.bump(instance);
        changes
    }

    /// Removes a local entry (untrack, leave, disconnect).
    pub fn remove(&mut self, instance: u64) -> Vec<Change> {
        let me = self.me;
        let mut changes = Vec::new();
        if self.parts[&me].entries.contains_key(&instance) {
            self.set(me, instance, None, &mut changes);
            self.bump(instance);
        }
        changes
    }

    /// Moves a local entry to an instance no channel will ever have, so it is never
    /// removed: the planted presence-leak bug.
    #[cfg(feature = "planted-bugs")]
    pub(crate) fn orphan(&mut self, instance: u64) {
        let me = self.me;
        let Some(entry) = self
            .parts
            .get_mut(&me)
            .and_then(|p| p.entries.remove(&instance))
        else {
            return;
        };
        let orphan = instance | (1 << 63);
        if let Some(room) = self.by_room.get_mut(&entry.room) {
            room.ids.remove(&EntryId {
                owner: me,
                instance,
            });
            room.ids.insert(
                EntryId {
                    owner: me,
                    instance: orphan,
                },
                (),
            );
        }
        self.parts
            .get_mut(&me)
            .expect("own part exists")
            .entries
            .insert(orphan, entry);
        self.bump(orphan);
        self.touched.insert(instance, ());
    }

    fn bump(&mut self, instance: u64) {
        self.parts.get_mut(&self.me).expect("own part exists").clock += 1;
        self.touched.insert(instance, ());
    }

    /// The local changes since the last call, for peers.
    pub fn take_delta(&mut self) -> Option<Delta> {
        if self.touched.is_empty() {
            return None;
        }
        let part = &self.parts[&self.me];
        let mut puts = Vec::new();
        let mut removes = Vec::new();
        for instance in std::mem::take(&mut self.touched).into_keys() {
            match part.entries.get(&instance) {
                Some(entry) => puts.push((instance, entry.clone())),
                None => removes.push(instance),
            }
        }
        let delta = Delta {
            owner: self.me,
            from: self.delta_from,
            to: part.clock,
            puts,
            removes,
        };
        self.delta_from = part.clock;
        Some(delta)
    }

    /// Our own part, for a peer that missed deltas or just appeared.
    pub fn snapshot(&self) -> Snapshot {
        let part = &self.parts[&self.me];
        let entries = part.entries.iter().map(|(i, e)| (*i, e.clone())).collect();
        Snapshot {
            owner: self.me,
            clock: part.clock,
            entries,
        }
    }

    /// Merges a peer's delta; duplicates and stale deltas change nothing.
    pub fn apply_delta(&mut self, delta: &Delta) -> Result<Vec<Change>, Gap> {
        if delta.owner == self.me {
            return Ok(Vec::new());
        }
        let known = self.clock_of(delta.owner);
        if delta.to <= known {
            return Ok(Vec::new());
        }
        if delta.from > known {
            return Err(Gap { owner: delta.owner });
        }
        let mut changes = Vec::new();
        for (instance, entry) in &delta.puts {
            self.set(delta.owner, *instance, Some(entry.clone()), &mut changes);
        }
        for instance in &delta.removes {
            self.set(delta.owner, *instance, None, &mut changes);
        }
        self.parts.entry(delta.owner).or_default().clock = delta.to;
        Ok(changes)
    }

    /// Merges a peer's snapshot: kept when newer than what we have.
    pub fn apply_snapshot(&mut self, snapshot: &Snapshot) -> Vec<Change> {
        if snapshot.owner == self.me || snapshot.clock <= self.clock_of(snapshot.owner) {
            return Vec::new();
        }
        let owner = snapshot.owner;
        let mut changes = Vec::new();
        let incoming: BTreeMap<u64, &Entry> =
            snapshot.entries.iter().map(|(i, e)| (*i, e)).collect();
        let stale: Vec<u64> = self
            .parts
            .get(&owner)
            .map(|p| {
                p.entries
                    .keys()
                    .filter(|i| !incoming.contains_key(i))
                    .copied()
                    .collect()
            })
            .unwrap_or_default();
        for instance in stale {
            self.set(owner, instance, None, &mut changes);
        }
        for (instance, entry) in incoming {
            self.set(owner, instance, Some(entry.clone()), &mut changes);
        }
        self.parts.entry(owner).or_default().clock = snapshot.clock;
        changes
    }

    /// Forgets every entry of a replica declared down.
    pub fn drop_owner(&mut self, owner: NodeId) -> Vec<Change> {
        if owner == self.me {
            return Vec::new();
        }
        let mut changes = Vec::new();
        let instances: Vec<u64> = self
            .parts
            .get(&owner)
            .map(|p| p.entries.keys().copied().collect())
            .unwrap_or_default();
        for instance in instances {
            self.set(owner, instance, None, &mut changes);
        }
        self.parts.remove(&owner);
        changes
    }

    /// Sets or clears one entry, recording the visible change.
    fn set(
        &mut self,
        owner: NodeId,
        instance: u64,
        entry: Option<Entry>,
        changes: &mut Vec<Change>,
    ) {
        let part = self.parts.entry(owner).or_default();
        let old = match &entry {
            Some(new) if part.entries.get(&instance) == Some(new) => return,
            Some(new) => part.entries.insert(instance, new.clone()),
            None => part.entries.remove(&instance),
        };
        let id = EntryId { owner, instance };
        if let Some(old) = old {
            if let Some(room) = self.by_room.get_mut(&old.room) {
                room.bytes -= old.meta.bytes;
                room.ids.remove(&id);
                if room.ids.is_empty() {
                    self.by_room.remove(&old.room);
                }
            }
            changes.push(Change {
                room: old.room,
                key: old.key,
                meta: old.meta,
                side: Side::Leave,
            });
        }
        if let Some(new) = entry {
            let room = self.by_room.entry(new.room.clone()).or_default();
            room.ids.insert(id, ());
            room.bytes += new.meta.bytes;
            changes.push(Change {
                room: new.room,
                key: new.key,
                meta: new.meta,
                side: Side::Join,
            });
        }
    }

    /// Every entry, by identity: what convergence is judged on.
    pub fn view(&self) -> BTreeMap<EntryId, &Entry> {
        self.parts
            .iter()
            .flat_map(|(owner, part)| {
                part.entries.iter().map(|(i, e)| {
                    (
                        EntryId {
                            owner: *owner,
                            instance: *i,
                        },
                        e,
                    )
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
