//! Rooms: the members of one topic on this replica, and fan-out to them.

use std::sync::Arc;

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use crate::authz::{Covered, Hears};
use crate::broadcast::BroadcastBody;
use crate::protocol::Vsn;
use crate::{ConnId, Engine, Output, To};

/// A room: public and private channels of the same name are different rooms.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RoomKey {
    /// Joined with `config.private: true`.
    pub private: bool,
    /// The channel name without `realtime:`.
    pub sub: Arc<str>,
}

/// Members of one room on this replica.
#[derive(Debug)]
pub(crate) struct Room {
    /// `realtime:<sub>`: the topic every member joined.
    pub(crate) topic: Arc<str>,
    members: FxHashMap<ConnId, (Vsn, Hears)>,
    /// Member lists per serializer version and what they hear, rebuilt lazily after a
    /// join, a leave or a change of permissions, so a broadcast to thousands allocates
    /// nothing per member.
    cache: [Option<Arc<[ConnId]>>; 4],
    /// Members that joined with a replay, and the ids of the stored messages it sent
    /// them: the same messages arriving live are not sent to them twice.
    replayed: Vec<(ConnId, Covered)>,
    /// Members that hear broadcasts, kept so a fan-out counts them without a scan.
    hearing: usize,
}

/// Which of a room's messages a member list is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Broadcast = 0,
    Presence = 2,
}

impl Room {
    pub(crate) fn new(topic: Arc<str>) -> Self {
        Room {
            topic,
            members: FxHashMap::default(),
            cache: [None, None, None, None],
            replayed: Vec::new(),
            hearing: 0,
        }
    }

    pub(crate) fn add(&mut self, conn: ConnId, vsn: Vsn, hears: Hears) {
        self.remove(conn);
        self.members.insert(conn, (vsn, hears));
        self.hearing += usize::from(hears.broadcast);
        self.cache = [None, None, None, None];
    }

    pub(crate) fn remove(&mut self, conn: ConnId) {
        if let Some((_, hears)) = self.members.remove(&conn) {
            self.hearing -= usize::from(hears.broadcast);
            self.cache = [None, None, None, None];
            self.replayed.retain(|(c, _)| *c != conn);
        }
    }

    /// Whether `conn` is a member that hears broadcasts.
    fn hears_broadcast(&self, conn: ConnId) -> bool {
        self.members
            .get(&conn)
            .is_some_and(|(_, hears)| hears.broadcast)
    }

    /// Changes what `conn` hears, after its permissions changed.
    pub(crate) fn hears(&mut self, conn: ConnId, hears: Hears) {
        if let Some(member) = self.members.get_mut(&conn) {
            if member.1 != hears {
                self.hearing =
                    self.hearing + usize::from(hears.broadcast) - usize::from(member.1.broadcast);
                member.1 = hears;
                self.cache = [None, None, None, None];
            }
        }
    }

    /// Records what a member's replay covered on joining.
    pub(crate) fn replayed(&mut self, conn: ConnId, covered: Covered) {
        self.replayed.push((conn, covered));
    }

    /// Members whose replay covered stored message `id` of transaction `xid`.
    fn replayed_to(&self, id: Option<&str>, xid: u32) -> Vec<ConnId> {
        self.replayed
            .iter()
            .filter(|(_, covered)| covered.covers(id, xid))
            .map(|(conn, _)| *conn)
            .collect()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Members with serializer `vsn` that hear `kind`, in a deterministic order.
    pub(crate) fn members(&mut self, vsn: Vsn, kind: Kind) -> Arc<[ConnId]> {
        let members = &self.members;
        self.cache[vsn as usize + kind as usize]
            .get_or_insert_with(|| {
                let mut list: Vec<ConnId> = members
                    .iter()
                    .filter(|(_, (v, hears))| {
                        *v == vsn
                            && match kind {
                                Kind::Broadcast => hears.broadcast,
                                Kind::Presence => hears.presence,
                            }
                    })
                    .map(|(c, _)| *c)
                    .collect();
                list.sort_unstable();
                list.into()
            })
            .clone()
    }
}

impl Engine {
    /// Delivers `body` to every local member of `key` except `except`. When the project's
    /// event rate is over its limit, every would-be recipient channel is shut down instead,
    /// as upstream channels do on receiving a message while the limit is tripped.
    pub(crate) fn fan_out(&mut self, key: &RoomKey, body: &BroadcastBody, except: Option<ConnId>) {
        self.fan_out_except(key, body, except, &[]);
    }

    /// Delivers a stored message (sent from the database by transaction `xid`) with id
    /// `id`: members a replay already sent it to do not get it again.
    pub(crate) fn fan_out_stored(
        &mut self,
        key: &RoomKey,
        body: &BroadcastBody,
        id: Option<&str>,
        xid: u32,
    ) {
        self.keep_for_replays(key, body, id, xid);
        let skip = match self.rooms.get(key) {
            Some(room) if !room.replayed.is_empty() => room.replayed_to(id, xid),
            _ => Vec::new(),
        };
        self.fan_out_except(key, body, None, &skip);
    }

    fn fan_out_except(
        &mut self,
        key: &RoomKey,
        body: &BroadcastBody,
        except: Option<ConnId>,
        skip: &[ConnId],
    ) {
        #[cfg(feature = "planted-bugs")]
        if let Some(crate::PlantedBug::DropBroadcastOneIn(n)) = self.config.planted_bug {
            self.planted_count += 1;
            if self.planted_count.is_multiple_of(n.max(1)) {
                return;
            }
        }
        let Some(room) = self.rooms.get_mut(key) else {
            return;
        };
        let recipients =
            room.hearing - usize::from(except.is_some_and(|c| room.hears_broadcast(c)));
        if recipients == 0 {
            return;
        }
        if self.limits.events.tripped(self.now.mono) {
            let topic = room.topic.clone();
            let mut victims: Vec<ConnId> = room
                .members
                .iter()
                .filter(|(c, (_, hears))| hears.broadcast && Some(**c) != except)
                .map(|(c, _)| *c)
                .collect();
            victims.sort_unstable();
            for conn in victims {
                self.shutdown_channel(conn, &topic, "Too many messages per second");
            }
            return;
        }
        self.limits.events.charge(self.now.mono, recipients as u64);
        let topic = room.topic.clone();
        for vsn in Vsn::ALL {
            let Some(room) = self.rooms.get_mut(key) else {
                return;
            };
            let mut list = room.members(vsn, Kind::Broadcast);
            if !skip.is_empty() {
                list = list.iter().copied().filter(|c| !skip.contains(c)).collect();
            }
            if list.iter().all(|c| Some(*c) == except) {
                continue;
            }
            if let Some(msg) = body.encode(vsn, &topic) {
                self.emit(Output::Send {
                    to: To::Members { list, except },
                    msg,
                });
            }
        }
    }
}
