//! The simulated peer bus between nodes: the same [`PeerLink`] seam that shards and NATS
//! use, with partitions (messages held until healed) and node crashes (the node's
//! presence is declared down everywhere) under the simulation's control.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use switchboard_engine::{NodeId, PeerMsg};
use switchboard_tokio::{PeerEvent, PeerLink};
use tokio::sync::mpsc;

struct Node {
    id: NodeId,
    inbox: mpsc::UnboundedSender<PeerEvent>,
}

#[derive(Default)]
struct State {
    /// Live nodes by host index.
    nodes: BTreeMap<usize, Node>,
    /// Host index pairs (low, high) whose traffic is held.
    held: BTreeSet<(usize, usize)>,
    /// Held messages in send order: from, to, message.
    queued: Vec<(usize, usize, NodeId, PeerMsg)>,
    incarnations: u64,
}

/// Shared by every node host of one simulation.
#[derive(Clone, Default)]
pub struct Bus {
    state: Arc<Mutex<State>>,
}

fn pair(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

impl Bus {
    /// Registers a (re)started node at host index `host`: a fresh replica id, a link for
    /// its engine, and a pump task that must run on the node's host.
    pub fn join(
        &self,
        host: usize,
    ) -> (
        NodeId,
        PeerLink,
        impl std::future::Future<Output = ()> + Send,
    ) {
        let (to_engine, incoming) = mpsc::unbounded_channel();
        let (outgoing, mut from_engine) = mpsc::unbounded_channel::<PeerMsg>();
        let id = {
            let mut state = self.state.lock().expect("bus lock");
            state.incarnations += 1;
            // A restarted node is a new replica: its old metas must not come back.
            let id = NodeId(state.incarnations * 100 + host as u64);
            for node in state.nodes.values() {
                let _ = node.inbox.send(PeerEvent::Up(id));
                let _ = to_engine.send(PeerEvent::Up(node.id));
            }
            state.nodes.insert(
                host,
                Node {
                    id,
                    inbox: to_engine,
                },
            );
            id
        };
        let bus = self.clone();
        let pump = async move {
            while let Some(msg) = from_engine.recv().await {
                bus.send(host, id, msg);
            }
        };
        (id, PeerLink { outgoing, incoming }, pump)
    }

    fn send(&self, from: usize, id: NodeId, msg: PeerMsg) {
        let mut state = self.state.lock().expect("bus lock");
        if state.nodes.get(&from).is_none_or(|n| n.id != id) {
            return; // a crashed incarnation's late message
        }
        let targets: Vec<usize> = state.nodes.keys().copied().filter(|h| *h != from).collect();
        for to in targets {
            if state.held.contains(&pair(from, to)) {
                state.queued.push((from, to, id, msg.clone()));
            } else if let Some(node) = state.nodes.get(&to) {
                let _ = node.inbox.send(PeerEvent::Message(id, msg.clone()));
            }
        }
    }

    /// Holds traffic between two nodes until [`Bus::heal`].
    pub fn partition(&self, a: usize, b: usize) {
        self.state.lock().expect("bus lock").held.insert(pair(a, b));
    }

    /// Releases held traffic between two nodes, in send order.
    pub fn heal(&self, a: usize, b: usize) {
        let mut state = self.state.lock().expect("bus lock");
        state.held.remove(&pair(a, b));
        let queued = std::mem::take(&mut state.queued);
        for (from, to, id, msg) in queued {
            if pair(from, to) == pair(a, b) {
                if let Some(node) = state.nodes.get(&to) {
                    let _ = node.inbox.send(PeerEvent::Message(id, msg));
                }
            } else {
                state.queued.push((from, to, id, msg));
            }
        }
    }

    /// Heals every partition.
    pub fn heal_all(&self) {
        let held: Vec<(usize, usize)> = self
            .state
            .lock()
            .expect("bus lock")
            .held
            .iter()
            .copied()
            .collect();
        for (a, b) in held {
            self.heal(a, b);
        }
    }

    /// A node crashed: peers declare its replica down; messages to it are lost.
    pub fn crash(&self, host: usize) {
        let mut state = self.state.lock().expect("bus lock");
        if let Some(node) = state.nodes.remove(&host) {
            for other in state.nodes.values() {
                let _ = other.inbox.send(PeerEvent::Down(node.id));
            }
        }
        state.queued.retain(|(_, to, _, _)| *to != host);
    }
}
