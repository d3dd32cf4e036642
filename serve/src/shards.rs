//! The shards of one process as peers: in-process links between their engines, and the
//! routing of database inputs to them. The same [`PeerLink`] seam carries the simulator's
//! bus and the cluster broker: to an engine a shard and a node are both peers.

use switchboard_engine::{Input, NodeId, Replica, RoomKey, ShardId};
use tokio::sync::mpsc;

use crate::engine_task::{EngineHandle, PeerEvent, PeerLink, PeerOut};
use crate::Options;

/// What a process's shards hand to its cluster link (a broker client on another task).
#[derive(Debug)]
pub enum ToCluster {
    /// A message for replicas of other processes: for every one (`out.to` is `None`) or
    /// for its addressee.
    Message {
        /// The sending shard's replica.
        from: NodeId,
        /// The message.
        out: PeerOut,
    },
    /// A shard's room gained its first member or lost its last one.
    Interest {
        /// The room.
        room: RoomKey,
        /// Whether the shard has members there now.
        members: bool,
    },
}

/// A process's shards, ready to serve, and where a cluster link reports peers to them.
pub struct ShardSet {
    /// Each shard's options, in shard order.
    pub options: Vec<Options>,
    /// Each shard's queue of peer events, in shard order: a cluster link reports remote
    /// replicas up and down and hands their messages here.
    pub inboxes: Vec<mpsc::UnboundedSender<PeerEvent>>,
}

impl Options {
    /// The options of each of `shards` shards of process `process` (48 bits, unique among
    /// the processes that will ever be peers): replica ids from both, and in-process links
    /// making every shard a peer of the others ([`Options::replicas`]). With `cluster`,
    /// what concerns other processes goes there too.
    pub fn shards(
        self,
        process: u64,
        shards: u16,
        cluster: Option<mpsc::UnboundedSender<ToCluster>>,
    ) -> ShardSet {
        let nodes: Vec<NodeId> = (0..shards.max(1))
            .map(|shard| NodeId::replica(process, ShardId(shard)))
            .collect();
        if nodes.len() == 1 && cluster.is_none() {
            let (inbox, _) = mpsc::unbounded_channel();
            return ShardSet {
                options: self.replicas(nodes.into_iter().zip([None])),
                inboxes: vec![inbox],
            };
        }
        let (links, inboxes) = peer_links(&nodes, cluster);
        ShardSet {
            options: self.replicas(nodes.into_iter().zip(links.into_iter().map(Some))),
            inboxes,
        }
    }

    /// The options of each replica of one process, given its id and its peer link, shard
    /// ids in order: seeds apart, and the same limits, metrics, budget and database.
    /// `self.peers` must be unset: each replica brings its own link.
    pub fn replicas(
        self,
        replicas: impl IntoIterator<Item = (NodeId, Option<PeerLink>)>,
    ) -> Vec<Options> {
        assert!(self.peers.is_none(), "replicas bring their own peer links");
        replicas
            .into_iter()
            .enumerate()
            .map(|(shard, (node, peers))| Options {
                config: self.config.clone(),
                replica: Replica {
                    node,
                    shard: ShardId(shard as u16),
                    limits: self.replica.limits.clone(),
                },
                shared: self.shared.clone(),
                seed: self.seed ^ node.0,
                send_queue: self.send_queue,
                send_queue_bytes: self.send_queue_bytes,
                clock: self.clock.clone(),
                peers,
                database: self.database.clone(),
                jwks_refresh: self.jwks_refresh.clone(),
                drain_timeout: self.drain_timeout,
            })
            .collect()
    }
}

/// One link per replica in `nodes` (the shards of one process), each peer of all the
/// others, and each link's queue of events: a message goes straight into its addressees'
/// queues, with no task in between. Every link starts with the others reported up; shards
/// of one process never go down alone. With `cluster`, messages for other processes and
/// the rooms' interest go there.
pub fn peer_links(
    nodes: &[NodeId],
    cluster: Option<mpsc::UnboundedSender<ToCluster>>,
) -> (Vec<PeerLink>, Vec<mpsc::UnboundedSender<PeerEvent>>) {
    let (inboxes, incomings): (Vec<_>, Vec<_>) =
        nodes.iter().map(|_| mpsc::unbounded_channel()).unzip();
    for (inbox, me) in inboxes.iter().zip(nodes) {
        for node in nodes.iter().filter(|n| *n != me) {
            let _ = inbox.send(PeerEvent::Up(*node));
        }
    }
    let links = incomings
        .into_iter()
        .zip(nodes)
        .map(|(incoming, &me)| {
            let others: Vec<(NodeId, mpsc::UnboundedSender<PeerEvent>)> = nodes
                .iter()
                .copied()
                .zip(inboxes.iter().cloned())
                .filter(|(node, _)| *node != me)
                .collect();
            let remote = cluster.clone();
            let outgoing = move |out: PeerOut| {
                for (node, inbox) in &others {
                    if out.to.is_none_or(|to| to == *node) {
                        let _ = inbox.send(PeerEvent::Message(me, out.msg.clone()));
                    }
                }
                if let Some(cluster) = &remote {
                    if out.to.is_none_or(|to| to.process() != me.process()) {
                        let _ = cluster.send(ToCluster::Message { from: me, out });
                    }
                }
            };
            let interest = cluster.clone().map(|cluster| {
                Box::new(move |room: RoomKey, members: bool| {
                    let _ = cluster.send(ToCluster::Interest { room, members });
                }) as Box<dyn Fn(RoomKey, bool) + Send + Sync>
            });
            PeerLink {
                outgoing: Box::new(outgoing),
                interest,
                incoming,
            }
        })
        .collect();
    (links, inboxes)
}

/// Hands a database input to the shards it concerns: a visibility or authorization answer
/// to the shard that asked, anything else (change batches, the publication) to every shard. `shards`
/// is indexed by shard id.
pub fn to_shards(shards: &[EngineHandle], input: Input) {
    let asker = match &input {
        Input::Visibility { id, .. } => Some(id.shard),
        Input::Authorized { id, .. } => Some(id.shard),
        _ => None,
    };
    if let Some(shard) = asker {
        if let Some(shard) = shards.get(usize::from(shard.0)) {
            shard.input(input);
        }
        return;
    }
    if let Some((last, others)) = shards.split_last() {
        for shard in others {
            shard.input(input.clone());
        }
        last.input(input);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_engine::PeerMsg;

    fn drain(link: &mut PeerLink) -> Vec<String> {
        std::iter::from_fn(|| link.incoming.try_recv().ok())
            .map(|event| format!("{event:?}"))
            .collect()
    }

    #[test]
    fn shards_see_each_other_up_and_messages_reach_their_addressees() {
        let nodes = [NodeId(10), NodeId(11), NodeId(12)];
        let (mut links, _) = peer_links(&nodes, None);
        for (link, me) in links.iter_mut().zip(nodes) {
            let ups = drain(link);
            assert_eq!(ups.len(), 2);
            assert!(!ups.iter().any(|u| u.contains(&format!("({})", me.0))));
        }
        let heartbeat = PeerMsg::PresenceHeartbeat {
            owner: nodes[0],
            clock: 1,
        };
        (links[0].outgoing)(PeerOut {
            to: None,
            msg: heartbeat.clone(),
        });
        (links[0].outgoing)(PeerOut {
            to: Some(nodes[2]),
            msg: heartbeat,
        });
        assert_eq!(drain(&mut links[0]).len(), 0, "never to itself");
        assert_eq!(drain(&mut links[1]).len(), 1, "only the message to all");
        assert_eq!(drain(&mut links[2]).len(), 2);
    }
}
