//! Rooms: the members of one topic on this replica, and fan-out to them.

use std::sync::Arc;

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

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
    members: FxHashMap<ConnId, Vsn>,
    /// Member lists per serializer version, rebuilt lazily after a join or leave, so a
    /// broadcast to thousands allocates nothing per member.
    cache: [Option<Arc<[ConnId]>>; 2],
}

impl Room {
    pub(crate) fn new(topic: Arc<str>) -> Self {
        Room {
            topic,
            members: FxHashMap::default(),
            cache: [None, None],
        }
    }

    pub(crate) fn add(&mut self, conn: ConnId, vsn: Vsn) {
        self.members.insert(conn, vsn);
        self.cache[vsn as usize] = None;
    }

    pub(crate) fn remove(&mut self, conn: ConnId) {
        if let Some(vsn) = self.members.remove(&conn) {
            self.cache[vsn as usize] = None;
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    pub(crate) fn len(&self) -> usize {
        self.members.len()
    }

    /// Members with serializer `vsn`, in a deterministic order.
    pub(crate) fn members(&mut self, vsn: Vsn) -> Arc<[ConnId]> {
        let members = &self.members;
        self.cache[vsn as usize]
            .get_or_insert_with(|| {
                let mut list: Vec<ConnId> = members
                    .iter()
                    .filter(|(_, v)| **v == vsn)
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
            room.len() - usize::from(except.is_some_and(|c| room.members.contains_key(&c)));
        if recipients == 0 {
            return;
        }
        if self.limits.events.tripped(self.now.mono) {
            let topic = room.topic.clone();
            let mut victims: Vec<ConnId> = room
                .members
                .keys()
                .copied()
                .filter(|c| Some(*c) != except)
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
            let list = room.members(vsn);
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
