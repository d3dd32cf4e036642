//! The simulated peer bus between replicas: the same [`PeerLink`] seam that shards and
//! NATS use, with partitions between hosts (messages held until healed), severed links as
//! the NATS link sees them (each side declares the other's replicas down, messages in
//! between are lost, and both come up again when the link mends) and host crashes (every
//! shard of the host is declared down everywhere) under the simulation's control. The
//! shards of one host are peers on it too, never partitioned from each other.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use switchboard_engine::{NodeId, PeerMsg};
use switchboard_tokio::{PeerEvent, PeerLink, PeerOut};
use tokio::sync::mpsc;

struct Node {
    id: NodeId,
    inbox: mpsc::UnboundedSender<PeerEvent>,
}

/// A replica's place: its host index and its shard there.
type Member = (usize, u16);

#[derive(Default)]
struct State {
    /// Live replicas.
    nodes: BTreeMap<Member, Node>,
    /// Host index pairs (low, high) whose traffic is held.
    held: BTreeSet<(usize, usize)>,
    /// Held messages in send order: from, to, message.
    queued: Vec<(Member, Member, NodeId, PeerMsg)>,
    /// Host index pairs (low, high) whose link is severed.
    severed: BTreeSet<(usize, usize)>,
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

impl State {
    /// Tells every replica of host `a` that every replica of host `b` is up, or down (all
    /// at once, as the NATS link does), and back.
    fn announce(&self, a: usize, b: usize, up: bool) {
        for (x, y) in [(a, b), (b, a)] {
            let about: Vec<NodeId> = self
                .nodes
                .range((y, 0)..=(y, u16::MAX))
                .map(|(_, n)| n.id)
                .collect();
            for (_, to) in self.nodes.range((x, 0)..=(x, u16::MAX)) {
                if up {
                    for id in &about {
                        let _ = to.inbox.send(PeerEvent::Up(*id));
                    }
                } else {
                    let _ = to.inbox.send(PeerEvent::Down(about.clone()));
                }
            }
        }
    }
}

impl Bus {
    /// Registers a (re)started shard `shard` of the node at host index `host`: a fresh
    /// replica id and a link for its engine.
    pub fn join(&self, host: usize, shard: u16) -> (NodeId, PeerLink) {
        let (to_engine, incoming) = mpsc::unbounded_channel();
        let me = (host, shard);
        let id = {
            let mut state = self.state.lock().expect("bus lock");
            state.incarnations += 1;
            // A restarted node is a new replica: its old metas must not come back.
            let id = NodeId(state.incarnations * 100 + host as u64);
            for (member, node) in &state.nodes {
                if state.severed.contains(&pair(host, member.0)) {
                    continue;
                }
                let _ = node.inbox.send(PeerEvent::Up(id));
                let _ = to_engine.send(PeerEvent::Up(node.id));
            }
            state.nodes.insert(
                me,
                Node {
                    id,
                    inbox: to_engine,
                },
            );
            id
        };
        let bus = self.clone();
        let outgoing = move |out: PeerOut| bus.send(me, id, out);
        (
            id,
            PeerLink {
                outgoing: Box::new(outgoing),
                // The simulated bus carries every message to every replica.
                interest: None,
                incoming,
            },
        )
    }

    fn send(&self, from: Member, id: NodeId, out: PeerOut) {
        let mut state = self.state.lock().expect("bus lock");
        if state.nodes.get(&from).is_none_or(|n| n.id != id) {
            return; // a crashed incarnation's late message
        }
        let PeerOut { to: addressee, msg } = out;
        let targets: Vec<Member> = state
            .nodes
            .iter()
            .filter(|(m, n)| **m != from && addressee.is_none_or(|a| a == n.id))
            .map(|(m, _)| *m)
            .collect();
        for to in targets {
            if state.severed.contains(&pair(from.0, to.0)) {
                continue; // lost, as NATS drops what a cut link publishes
            }
            if state.held.contains(&pair(from.0, to.0)) {
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
            if pair(from.0, to.0) == pair(a, b) {
                if let Some(node) = state.nodes.get(&to) {
                    let _ = node.inbox.send(PeerEvent::Message(id, msg));
                }
            } else {
                state.queued.push((from, to, id, msg));
            }
        }
    }

    /// Severs the link between two hosts: each declares the other's replicas down, and
    /// messages between them are lost until [`Bus::mend`].
    pub fn sever(&self, a: usize, b: usize) {
        let mut state = self.state.lock().expect("bus lock");
        if a == b || !state.severed.insert(pair(a, b)) {
            return;
        }
        state.announce(a, b, false);
    }

    /// Mends a severed link: both sides see each other up again.
    pub fn mend(&self, a: usize, b: usize) {
        let mut state = self.state.lock().expect("bus lock");
        if state.severed.remove(&pair(a, b)) {
            state.announce(a, b, true);
        }
    }

    /// The severed links, to mend at the end of the chaos.
    pub fn severed(&self) -> Vec<(usize, usize)> {
        let state = self.state.lock().expect("bus lock");
        state.severed.iter().copied().collect()
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

    /// A node crashed: peers declare each of its shards down; messages to them are lost.
    pub fn crash(&self, host: usize) {
        let mut state = self.state.lock().expect("bus lock");
        let gone: Vec<Member> = state
            .nodes
            .range((host, 0)..=(host, u16::MAX))
            .map(|(m, _)| *m)
            .collect();
        let ids: Vec<NodeId> = gone
            .iter()
            .filter_map(|member| state.nodes.remove(member))
            .map(|node| node.id)
            .collect();
        for other in state.nodes.values() {
            let _ = other.inbox.send(PeerEvent::Down(ids.clone()));
        }
        state.queued.retain(|(_, to, _, _)| to.0 != host);
    }
}
