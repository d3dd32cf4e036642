//! The oracle: a log of everything clients sent and saw, and the invariants of
//! DESIGN.md checked against it.
//!
//! A client reconnects after crashes, timeouts and server closes, so the oracle's unit is
//! one connection of one client: a [`Who`]. Every rule speaks of connections, as the server
//! does; only presence keys (`c<client>`) are shared by a client's connections.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use switchboard_engine::changes::ChangeKind;

use crate::db::{self, Commit, Policy};
use crate::TICK_MS;

/// Milliseconds of simulated time.
pub type Ms = u64;

/// From when, until when if it ended.
type Span = (Ms, Option<Ms>);

/// One connection of one client: its `life`-th, counting from 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Who {
    /// The simulated client.
    pub client: usize,
    /// Which of its connections.
    pub life: u32,
}

impl std::fmt::Display for Who {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.client, self.life)
    }
}

/// Why a connection ended, as its client saw it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Ending {
    /// The client's process was killed: its socket dropped without a close frame.
    Killed,
    /// The client stopped waiting for heartbeat replies and dropped the socket.
    HeartbeatTimeout,
    /// The server sent a close frame with this code.
    ServerClosed(u16),
    /// The socket broke or ended without a close frame (a node crash, a reset).
    Broken,
    /// The client closed it at the end of the run.
    Finished,
}

/// Something a client did or saw.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Event {
    /// A WebSocket connection was established.
    Connected { who: Who, node: usize, at: Ms },
    /// A join was acknowledged (`self` is the join's `broadcast.self`).
    Joined {
        who: Who,
        room: String,
        self_broadcast: bool,
        at: Ms,
    },
    /// The channel ended (`phx_close` received).
    Left { who: Who, room: String, at: Ms },
    /// A broadcast push was written. `seq` counts a client's broadcasts over all its lives.
    Sent {
        who: Who,
        room: String,
        seq: u64,
        at: Ms,
    },
    /// The server acknowledged that push.
    Acked {
        who: Who,
        room: String,
        seq: u64,
        at: Ms,
    },
    /// The link between two nodes was severed: they declared each other down, and what
    /// one sent the other was lost.
    Severed { a: usize, b: usize, at: Ms },
    /// A severed link mended: the nodes see each other up again.
    Mended { a: usize, b: usize, at: Ms },
    /// A broadcast arrived.
    Delivered {
        who: Who,
        room: String,
        from: Who,
        seq: u64,
        at: Ms,
    },
    /// The connection ended; nothing more is read from it.
    Disconnected { who: Who, at: Ms, why: Ending },
    /// The connection's last successful track in a room (`None` after untrack).
    Tracking {
        who: Who,
        room: String,
        value: Option<u64>,
    },
    /// The connection's presence view of a room at the end: key → tracked values.
    View {
        who: Who,
        room: String,
        view: BTreeMap<String, Vec<u64>>,
    },
    /// The channel's postgres_changes subscription is live (`Subscribed to PostgreSQL`).
    Subscribed {
        who: Who,
        room: String,
        at: Ms,
        service: bool,
        filter_owner: Option<String>,
    },
    /// A postgres change arrived.
    ChangeSeen { who: Who, room: String, id: u64 },
    /// A message sent from SQL arrived.
    SqlSeen {
        who: Who,
        room: String,
        id: u64,
        at: Ms,
    },
    /// Who a client is, for the private room's policies: a service_role client bypasses them.
    Identity { client: usize, service: bool },
    /// Something the client itself found wrong.
    Broken { who: Who, what: String },
}

/// Shared by every simulated client.
#[derive(Clone, Default)]
pub struct Oracle {
    events: Arc<Mutex<Vec<Event>>>,
}

impl Oracle {
    /// Records an event.
    pub fn record(&self, event: Event) {
        self.events.lock().expect("oracle lock").push(event);
    }

    /// Every event so far.
    pub fn events(&self) -> Vec<Event> {
        self.events.lock().expect("oracle lock").clone()
    }

    /// A hash of the whole trace: equal for equal runs.
    pub fn trace_hash(&self) -> u64 {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.events.lock().expect("oracle lock").hash(&mut hasher);
        hasher.finish()
    }
}

/// Membership of one connection in one room over time.
#[derive(Default, Debug)]
struct Membership {
    /// (joined at, left at) intervals; the last may be open.
    spans: Vec<(Ms, Option<Ms>)>,
    self_broadcast: bool,
}

impl Membership {
    /// The open span's start, if the connection is a member now.
    fn joined_since(&self) -> Option<Ms> {
        self.spans
            .last()
            .and_then(|(joined, left)| left.is_none().then_some(*joined))
    }
}

/// A subscription's life: from `Subscribed` to the channel's end.
struct Subscription {
    who: Who,
    room: String,
    at: Ms,
    service: bool,
    filter_owner: Option<String>,
    seen: Vec<u64>,
    open: bool,
}

impl Subscription {
    /// Whether filters and the RLS model, under `policy`, let this subscriber see `commit`.
    fn allows(&self, commit: &Commit, policy: Policy) -> bool {
        let filter = self
            .filter_owner
            .as_ref()
            .is_none_or(|owner| *owner == commit.owner);
        let rls = commit.kind == ChangeKind::Delete
            || self.service
            || policy.visible(Some(&commit.owner), &format!("c{}", self.who.client));
        filter && rls
    }
}

/// Invariant 6: each live subscriber gets exactly the changes its filter and RLS allow that
/// were committed after it subscribed, in commit order, none twice; never a forbidden one.
fn check_changes(
    events: &[Event],
    commits: &[Commit],
    policy: Policy,
    disconnected: &BTreeMap<Who, Ms>,
    violations: &mut Vec<String>,
) {
    let mut subscriptions: Vec<Subscription> = Vec::new();
    for event in events {
        match event {
            Event::Subscribed {
                who,
                room,
                at,
                service,
                filter_owner,
            } => {
                for s in subscriptions
                    .iter_mut()
                    .filter(|s| s.who == *who && s.room == *room)
                {
                    s.open = false;
                }
                subscriptions.push(Subscription {
                    who: *who,
                    room: room.clone(),
                    at: *at,
                    service: *service,
                    filter_owner: filter_owner.clone(),
                    seen: Vec::new(),
                    open: true,
                });
            }
            Event::ChangeSeen { who, room, id } => {
                match subscriptions
                    .iter_mut()
                    .rev()
                    .find(|s| s.who == *who && s.room == *room && s.open)
                {
                    Some(s) => s.seen.push(*id),
                    None => violations.push(format!(
                        "invariant 6: {who} got change {id} in {room} without a subscription"
                    )),
                }
            }
            Event::Left { who, room, .. } => {
                for s in subscriptions
                    .iter_mut()
                    .filter(|s| s.who == *who && s.room == *room)
                {
                    s.open = false;
                }
            }
            _ => {}
        }
    }
    let commits: Vec<&Commit> = commits.iter().filter(|c| c.sent.is_none()).collect();
    let by_id: BTreeMap<u64, &Commit> = commits.iter().map(|c| (c.id, *c)).collect();
    for s in &subscriptions {
        if s.seen.windows(2).any(|w| w[0] >= w[1]) {
            violations.push(format!(
                "invariant 6: {} got changes out of order or twice: {:?}",
                s.who, s.seen
            ));
        }
        for id in &s.seen {
            if by_id.get(id).is_none_or(|c| !s.allows(c, policy)) {
                violations.push(format!(
                    "invariant 6: {} got change {id} its filter or RLS forbid",
                    s.who
                ));
            }
        }
        if s.open && !disconnected.contains_key(&s.who) {
            let owed = |c: &&Commit| c.at > s.at + TICK_MS && s.allows(c, policy);
            for commit in commits.iter().copied().filter(owed) {
                if !s.seen.contains(&commit.id) {
                    violations.push(format!(
                        "invariant 6: {} subscribed at {} missed change {} committed at {}",
                        s.who, s.at, commit.id, commit.at
                    ));
                }
            }
        }
    }
}

/// Close codes the server may send: normal (heartbeat timeout), going away (join rate),
/// policy violation (slow consumer) and service restart (shutdown).
const CLOSE_CODES: [u16; 4] = [1000, 1001, 1008, 1012];

/// A broadcast: its sender connection, room and sequence number.
type Message = (Who, String, u64);

/// Checks the invariants over the log of client events and the database's commits, read
/// under `policy`.
pub fn check(events: &[Event], commits: &[Commit], policy: Policy) -> Vec<String> {
    let mut violations = Vec::new();
    let mut membership: BTreeMap<(Who, String), Membership> = BTreeMap::new();
    let mut disconnected: BTreeMap<Who, Ms> = BTreeMap::new();
    let mut sent: BTreeMap<Message, Ms> = BTreeMap::new();
    let mut acked: BTreeMap<Message, Ms> = BTreeMap::new();
    // Each connection's node, and when each pair of nodes was severed.
    let mut nodes: BTreeMap<Who, usize> = BTreeMap::new();
    let mut severed: BTreeMap<(usize, usize), Vec<Span>> = BTreeMap::new();
    let mut delivered: BTreeMap<(Who, Message), usize> = BTreeMap::new();
    // Per receiver, room and sender connection: the seqs received, and when.
    let mut received: BTreeMap<(Who, String, Who), Vec<(u64, Ms)>> = BTreeMap::new();
    let mut tracking: BTreeMap<(Who, String), Option<u64>> = BTreeMap::new();
    let mut views = Vec::new();
    for event in events {
        match event {
            Event::Joined {
                who,
                room,
                self_broadcast,
                at,
            } => {
                let m = membership.entry((*who, room.clone())).or_default();
                m.spans.push((*at, None));
                m.self_broadcast = *self_broadcast;
                // A new channel starts with nothing tracked.
                tracking.insert((*who, room.clone()), None);
            }
            Event::Left { who, room, at } => {
                if let Some(span) = membership
                    .get_mut(&(*who, room.clone()))
                    .and_then(|m| m.spans.last_mut())
                {
                    span.1.get_or_insert(*at);
                }
            }
            Event::Sent { who, room, seq, at } => {
                sent.insert((*who, room.clone(), *seq), *at);
            }
            Event::Acked { who, room, seq, at } => {
                acked.insert((*who, room.clone(), *seq), *at);
            }
            Event::Connected { who, node, .. } => {
                nodes.insert(*who, *node);
            }
            Event::Severed { a, b, at } => {
                severed
                    .entry(((*a).min(*b), (*a).max(*b)))
                    .or_default()
                    .push((*at, None));
            }
            Event::Mended { a, b, at } => {
                if let Some(span) = severed
                    .get_mut(&((*a).min(*b), (*a).max(*b)))
                    .and_then(|spans| spans.last_mut())
                {
                    span.1.get_or_insert(*at);
                }
            }
            Event::Delivered {
                who,
                room,
                from,
                seq,
                at,
            } => {
                *delivered
                    .entry((*who, (*from, room.clone(), *seq)))
                    .or_default() += 1;
                let m = membership.get(&(*who, room.clone()));
                // 3: only members receive, and nothing after their channel ended.
                let since = m.and_then(Membership::joined_since);
                if since.is_none_or(|joined| joined > *at) {
                    violations.push(format!(
                        "invariant 3: {who} got {from}#{seq} in {room} while not a member"
                    ));
                }
                // 4: no self-delivery without `self`.
                if from == who && !m.is_some_and(|m| m.self_broadcast) {
                    violations.push(format!(
                        "invariant 4: {who} got its own #{seq} in {room} without self"
                    ));
                }
                // 2: per-sender order: one sender connection's seqs only grow.
                let seqs = received.entry((*who, room.clone(), *from)).or_default();
                if let Some((previous, _)) = seqs.last() {
                    if seq <= previous {
                        violations.push(format!(
                            "invariant 2: {who} got {from}#{seq} after #{previous} in {room}"
                        ));
                    }
                }
                seqs.push((*seq, *at));
            }
            // The run's end is no fault: a finished connection was live to the end.
            Event::Disconnected {
                why: Ending::Finished,
                ..
            } => {}
            Event::Disconnected { who, at, why } => {
                // 7: a server close says why, in a code the clients know.
                if let Ending::ServerClosed(code) = why {
                    if !CLOSE_CODES.contains(code) {
                        violations.push(format!("invariant 7: {who} was closed with code {code}"));
                    }
                }
                disconnected.entry(*who).or_insert(*at);
            }
            Event::Tracking { who, room, value } => {
                tracking.insert((*who, room.clone()), *value);
            }
            Event::View { who, room, view } => views.push((*who, room.clone(), view.clone())),
            Event::Subscribed { .. }
            | Event::ChangeSeen { .. }
            | Event::SqlSeen { .. }
            | Event::Identity { .. } => {}
            Event::Broken { who, what } => violations.push(format!("invariant 7: {who}: {what}")),
        }
    }
    // 1: an acknowledged broadcast reaches every stable member exactly once, and no member
    // misses one between two broadcasts of the same sender it did receive.
    for (message @ (from, room, seq), &acked_at) in &acked {
        let at = sent[message];
        // Whether the link between the sender's node and `member`'s was severed while the
        // sender's node handled the push (between the send and its ack): lost, by design.
        let lost = |member: &Who| {
            let (Some(&a), Some(&b)) = (nodes.get(from), nodes.get(member)) else {
                return false;
            };
            severed.get(&(a.min(b), a.max(b))).is_some_and(|spans| {
                spans.iter().any(|(start, end)| {
                    *start <= acked_at + TICK_MS && end.is_none_or(|end| end + TICK_MS >= at)
                })
            })
        };
        for ((member, member_room), m) in &membership {
            if member_room != room || (member == from && !m.self_broadcast) {
                continue;
            }
            let count = delivered
                .get(&(*member, message.clone()))
                .copied()
                .unwrap_or(0);
            if count > 1 {
                violations.push(format!(
                    "invariant 1: {from}#{seq} in {room} reached {member} {count} times"
                ));
                continue;
            }
            // The span the member was surely in when the sender wrote the message, if any:
            // clocks of different hosts agree only to a step.
            let Some(&(joined, left)) = m.spans.iter().find(|(joined, left)| {
                joined + TICK_MS < at && left.is_none_or(|left| left > at + TICK_MS)
            }) else {
                continue;
            };
            let stable = left.is_none() && !disconnected.contains_key(member);
            // A later message of the same sender within the span proves this one was due.
            let later = received
                .get(&(*member, room.clone(), *from))
                .is_some_and(|seqs| {
                    seqs.iter().any(|(s, got)| {
                        *s > *seq && *got >= joined && left.is_none_or(|left| *got <= left)
                    })
                });
            if count == 0 && (stable || later) && !lost(member) {
                let why = if stable { "stable member" } else { "member" };
                violations.push(format!(
                    "invariant 1: {from}#{seq} in {room} never reached {why} {member}, joined at {joined}"
                ));
            }
        }
    }
    // 5: after healing, every live member's presence view is the set of live trackers.
    for (viewer, room, view) in views {
        let mut truth: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for ((who, r), value) in &tracking {
            let live = !disconnected.contains_key(who)
                && membership
                    .get(&(*who, room.clone()))
                    .is_some_and(|m| m.joined_since().is_some());
            if let (true, true, Some(value)) = (*r == room, live, value) {
                truth
                    .entry(format!("c{}", who.client))
                    .or_default()
                    .push(*value);
            }
        }
        truth.values_mut().for_each(|values| values.sort_unstable());
        if view != truth {
            violations.push(format!(
                "invariant 5: {viewer} sees {view:?} in {room}, truth is {truth:?}"
            ));
        }
    }
    check_changes(events, commits, policy, &disconnected, &mut violations);
    check_private(events, &mut violations);
    check_sent(events, commits, &membership, &disconnected, &mut violations);
    violations
}

/// Invariant 8: the private room admits only clients its read policy allows, and carries
/// only broadcasts from clients its write policy allows.
fn check_private(events: &[Event], violations: &mut Vec<String>) {
    let service: BTreeSet<usize> = events
        .iter()
        .filter_map(|e| match e {
            Event::Identity {
                client,
                service: true,
            } => Some(*client),
            _ => None,
        })
        .collect();
    let reads = |c: usize| service.contains(&c) || db::may_read(c);
    let writes = |c: usize| service.contains(&c) || db::may_write(c);
    for event in events {
        match event {
            Event::Joined { who, room, .. } if room == db::PRIVATE_ROOM && !reads(who.client) => {
                violations.push(format!(
                    "invariant 8: {who} joined {room}, which its read policy refuses"
                ));
            }
            Event::Delivered {
                who,
                room,
                from,
                seq,
                ..
            } if room == db::PRIVATE_ROOM && !writes(from.client) => {
                violations.push(format!(
                    "invariant 8: {who} got {from}#{seq} in {room}, which {from}'s write policy refuses"
                ));
            }
            _ => {}
        }
    }
}

/// Invariant 9: a message sent from SQL reaches only members of its room, at most once per
/// connection and in commit order, and every member stably joined when it was committed.
fn check_sent(
    events: &[Event],
    commits: &[Commit],
    membership: &BTreeMap<(Who, String), Membership>,
    disconnected: &BTreeMap<Who, Ms>,
    violations: &mut Vec<String>,
) {
    let sent: BTreeMap<u64, (&Commit, &str)> = commits
        .iter()
        .filter_map(|c| c.sent.as_ref().map(|(room, _)| (c.id, (c, room.as_str()))))
        .collect();
    let mut seen: BTreeMap<(Who, String), Vec<u64>> = BTreeMap::new();
    for event in events {
        let Event::SqlSeen { who, room, id, at } = event else {
            continue;
        };
        if sent.get(id).is_none_or(|(_, r)| r != room) {
            violations.push(format!(
                "invariant 9: {who} got SQL message {id} in {room}, sent elsewhere"
            ));
        }
        let member = membership.get(&(*who, room.clone())).is_some_and(|m| {
            m.spans
                .iter()
                .any(|(joined, left)| *joined <= *at && left.is_none_or(|left| *at <= left))
        });
        if !member {
            violations.push(format!(
                "invariant 9: {who} got SQL message {id} in {room} while not a member"
            ));
        }
        seen.entry((*who, room.clone())).or_default().push(*id);
    }
    for ((who, room), ids) in &seen {
        if ids.windows(2).any(|w| w[0] >= w[1]) {
            violations.push(format!(
                "invariant 9: {who} got SQL messages in {room} out of order or twice: {ids:?}"
            ));
        }
    }
    for ((who, room), m) in membership {
        let Some(&(joined, None)) = m.spans.last() else {
            continue;
        };
        if disconnected.contains_key(who) {
            continue;
        }
        let got = seen.get(&(*who, room.clone()));
        for (id, (commit, _)) in sent
            .iter()
            .filter(|(_, (c, r))| r == room && c.at > joined + TICK_MS)
        {
            if !got.is_some_and(|ids| ids.contains(id)) {
                violations.push(format!(
                    "invariant 9: {who} joined {room} at {joined} missed SQL message {id} sent at {}",
                    commit.at
                ));
            }
        }
    }
}
