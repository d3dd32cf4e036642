//! Messages between replicas (shards of one process, or cluster nodes).
//!
//! The engine only produces and consumes them; the runtime's peer bus carries them
//! (in-process channels between shards, NATS between nodes, a simulated bus in `sim`).

use serde::{Deserialize, Serialize};

use crate::broadcast::BroadcastBody;
use crate::room::RoomKey;
use crate::{Engine, NodeId};

/// A message for peer replicas.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerMsg {
    /// A broadcast accepted by the sending replica, for its peers' local members.
    Broadcast {
        /// The room it was sent to.
        room: RoomKey,
        /// The message, as it arrived.
        body: BroadcastBody,
    },
}

impl Engine {
    pub(crate) fn peer_message(&mut self, _from: NodeId, msg: PeerMsg) {
        match msg {
            // The sender is never among a peer's members, so nobody is excluded.
            PeerMsg::Broadcast { room, body } => self.fan_out(&room, &body, None),
        }
    }
}
