//! Messages between replicas (shards of one process, or cluster nodes).
//!
//! The engine only produces and consumes them; the runtime's peer bus carries them
//! (in-process channels between shards, NATS between nodes, a simulated bus in `sim`).

use serde::{Deserialize, Serialize};

use crate::broadcast::BroadcastBody;
use crate::presence::crdt::{Delta, Snapshot};
use crate::room::RoomKey;
use crate::{Engine, NodeId};

/// A message for peer replicas.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum PeerMsg {
    /// A broadcast accepted by the sending replica, for its peers' local members.
    Broadcast {
        /// The room it was sent to.
        room: RoomKey,
        /// The message, as it arrived.
        body: BroadcastBody,
    },
    /// An owner's presence changes since its previous delta.
    PresenceDelta(Delta),
    /// An owner's whole presence state: to a replica that came up, and to one that asked
    /// after a gap.
    PresenceSnapshot(Snapshot),
    /// Periodic: the owner's presence clock, so peers notice missed deltas.
    PresenceHeartbeat {
        /// The sending replica.
        owner: NodeId,
        /// Its presence clock.
        clock: u64,
    },
    /// Asks `owner` (its addressee) for a snapshot after a gap.
    PresenceRequest {
        /// Whose snapshot is needed.
        owner: NodeId,
    },
}

impl Engine {
    pub(crate) fn peer_message(&mut self, from: NodeId, msg: PeerMsg) {
        match msg {
            // The sender is never among a peer's members, so nobody is excluded.
            PeerMsg::Broadcast { room, body } => self.fan_out(&room, &body, None),
            presence => self.peer_presence(from, presence),
        }
    }
}
