//! The oracle: a log of everything clients sent and saw, and the invariants of
//! DESIGN.md checked against it.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use switchboard_engine::changes::ChangeKind;

use crate::db::Commit;

/// Milliseconds of simulated time.
pub type Ms = u64;

/// Something a client did or saw.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Event {
    /// A join was acknowledged (`self` is the join's `broadcast.self`).
    Joined {
        client: usize,
        room: String,
        self_broadcast: bool,
        at: Ms,
    },
    /// The channel ended (`phx_close` received).
    Left { client: usize, room: String, at: Ms },
    /// A broadcast push was written.
    Sent {
        client: usize,
        room: String,
        seq: u64,
        at: Ms,
    },
    /// The server acknowledged that push.
    Acked {
        client: usize,
        room: String,
        seq: u64,
    },
    /// A broadcast arrived.
    Delivered {
        client: usize,
        room: String,
        from: usize,
        seq: u64,
        at: Ms,
    },
    /// The client's connection ended abruptly, or its node crashed.
    Disconnected { client: usize, at: Ms },
    /// The client's last successful track in a room (`None` after untrack).
    Tracking {
        client: usize,
        room: String,
        value: Option<u64>,
    },
    /// The client's presence view of a room at the end: key → tracked values.
    View {
        client: usize,
        room: String,
        view: BTreeMap<String, Vec<u64>>,
    },
    /// The channel's postgres_changes subscription is live (`Subscribed to PostgreSQL`).
    Subscribed {
        client: usize,
        room: String,
        at: Ms,
        service: bool,
        filter_owner: Option<String>,
    },
    /// A postgres change arrived.
    ChangeSeen {
        client: usize,
        room: String,
        id: u64,
    },
    /// Something the client itself found wrong.
    Broken { client: usize, what: String },
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

/// Membership of one client in one room over time.
#[derive(Default, Debug)]
struct Membership {
    /// (joined at, left at) intervals; the last may be open.
    spans: Vec<(Ms, Option<Ms>)>,
    self_broadcast: bool,
}

/// A subscription's life: from `Subscribed` to the channel's end.
struct Subscription {
    client: usize,
    room: String,
    at: Ms,
    service: bool,
    filter_owner: Option<String>,
    seen: Vec<u64>,
    open: bool,
}

impl Subscription {
    /// Whether filters and the RLS model let this subscriber see `commit`.
    fn allows(&self, commit: &Commit) -> bool {
        let filter = self
            .filter_owner
            .as_ref()
            .is_none_or(|owner| *owner == commit.owner);
        let rls = commit.kind == ChangeKind::Delete
            || self.service
            || commit.owner == format!("c{}", self.client);
        filter && rls
    }
}

/// Invariant 6: each live subscriber gets exactly the changes its filter and RLS allow that
/// were committed after it subscribed, in commit order, none twice; never a forbidden one.
fn check_changes(events: &[Event], commits: &[Commit], violations: &mut Vec<String>) {
    let mut subscriptions: Vec<Subscription> = Vec::new();
    let mut disconnected = BTreeSet::new();
    for event in events {
        match event {
            Event::Subscribed {
                client,
                room,
                at,
                service,
                filter_owner,
            } => {
                for s in subscriptions
                    .iter_mut()
                    .filter(|s| s.client == *client && s.room == *room)
                {
                    s.open = false;
                }
                subscriptions.push(Subscription {
                    client: *client,
                    room: room.clone(),
                    at: *at,
                    service: *service,
                    filter_owner: filter_owner.clone(),
                    seen: Vec::new(),
                    open: true,
                });
            }
            Event::ChangeSeen { client, room, id } => {
                match subscriptions.iter_mut().rev().find(|s| s.client == *client && s.room == *room && s.open) {
                    Some(s) => s.seen.push(*id),
                    None => violations.push(format!("invariant 6: client {client} got change {id} in {room} without a subscription")),
                }
            }
            Event::Left { client, room, .. } => {
                for s in subscriptions
                    .iter_mut()
                    .filter(|s| s.client == *client && s.room == *room)
                {
                    s.open = false;
                }
            }
            Event::Disconnected { client, .. } => {
                disconnected.insert(*client);
            }
            _ => {}
        }
    }
    let by_id: BTreeMap<u64, &Commit> = commits.iter().map(|c| (c.id, c)).collect();
    for s in &subscriptions {
        if s.seen.windows(2).any(|w| w[0] >= w[1]) {
            violations.push(format!(
                "invariant 6: client {} got changes out of order or twice: {:?}",
                s.client, s.seen
            ));
        }
        for id in &s.seen {
            if by_id.get(id).is_none_or(|c| !s.allows(c)) {
                violations.push(format!(
                    "invariant 6: client {} got change {id} its filter or RLS forbid",
                    s.client
                ));
            }
        }
        if s.open && !disconnected.contains(&s.client) {
            for commit in commits.iter().filter(|c| c.at > s.at && s.allows(c)) {
                if !s.seen.contains(&commit.id) {
                    violations.push(format!(
                        "invariant 6: client {} subscribed at {} missed change {} committed at {}",
                        s.client, s.at, commit.id, commit.at
                    ));
                }
            }
        }
    }
}

/// Checks the invariants over the log of client events and the database's commits.
pub fn check(events: &[Event], commits: &[Commit]) -> Vec<String> {
    let mut violations = Vec::new();
    let mut membership: BTreeMap<(usize, String), Membership> = BTreeMap::new();
    let mut disconnected: BTreeMap<usize, Ms> = BTreeMap::new();
    let mut sent: BTreeMap<(usize, String, u64), Ms> = BTreeMap::new();
    let mut acked: BTreeSet<(usize, String, u64)> = BTreeSet::new();
    let mut delivered: BTreeMap<(usize, String, usize, u64), usize> = BTreeMap::new();
    let mut last_seq: BTreeMap<(usize, String, usize), u64> = BTreeMap::new();
    let mut tracking: BTreeMap<(usize, String), Option<u64>> = BTreeMap::new();
    let mut views = Vec::new();
    for event in events {
        match event {
            Event::Joined {
                client,
                room,
                self_broadcast,
                at,
            } => {
                let m = membership.entry((*client, room.clone())).or_default();
                m.spans.push((*at, None));
                m.self_broadcast = *self_broadcast;
                // A new channel starts with nothing tracked.
                tracking.insert((*client, room.clone()), None);
            }
            Event::Left { client, room, at } => {
                if let Some(span) = membership
                    .get_mut(&(*client, room.clone()))
                    .and_then(|m| m.spans.last_mut())
                {
                    span.1.get_or_insert(*at);
                }
            }
            Event::Sent {
                client,
                room,
                seq,
                at,
            } => {
                sent.insert((*client, room.clone(), *seq), *at);
            }
            Event::Acked { client, room, seq } => {
                acked.insert((*client, room.clone(), *seq));
            }
            Event::Delivered {
                client,
                room,
                from,
                seq,
                at,
            } => {
                *delivered
                    .entry((*client, room.clone(), *from, *seq))
                    .or_default() += 1;
                // 3: only members receive, and nothing after their channel ended.
                let member = membership.get(&(*client, room.clone())).is_some_and(|m| {
                    m.spans
                        .last()
                        .is_some_and(|(joined, left)| *joined <= *at && left.is_none())
                });
                if !member {
                    violations.push(format!("invariant 3: client {client} got {from}#{seq} in {room} while not a member"));
                }
                // 4: no self-delivery without `self`.
                let self_ok = membership
                    .get(&(*client, room.clone()))
                    .is_some_and(|m| m.self_broadcast);
                if from == client && !self_ok {
                    violations.push(format!(
                        "invariant 4: client {client} got its own {seq} in {room} without self"
                    ));
                }
                // 2: per-sender order.
                let key = (*client, room.clone(), *from);
                if let Some(previous) = last_seq.get(&key) {
                    if seq <= previous {
                        violations.push(format!("invariant 2: client {client} got {from}#{seq} after #{previous} in {room}"));
                    }
                }
                last_seq.insert(key, *seq);
            }
            Event::Disconnected { client, at } => {
                disconnected.entry(*client).or_insert(*at);
            }
            Event::Tracking {
                client,
                room,
                value,
            } => {
                tracking.insert((*client, room.clone()), *value);
            }
            Event::View { client, room, view } => views.push((*client, room.clone(), view.clone())),
            Event::Subscribed { .. } | Event::ChangeSeen { .. } => {}
            Event::Broken { client, what } => {
                violations.push(format!("invariant 7: client {client}: {what}"))
            }
        }
    }
    // 1: an acknowledged broadcast reaches every stable member exactly once.
    for (client, room, seq) in &acked {
        let at = sent[&(*client, room.clone(), *seq)];
        for ((member, member_room), m) in &membership {
            if member_room != room || (member == client && !m.self_broadcast) {
                continue;
            }
            let stable = m
                .spans
                .last()
                .is_some_and(|(joined, left)| *joined < at && left.is_none())
                && !disconnected.contains_key(member);
            let count = delivered
                .get(&(*member, room.clone(), *client, *seq))
                .copied()
                .unwrap_or(0);
            if (stable && count != 1) || count > 1 {
                violations.push(format!(
                    "invariant 1: {client}#{seq} in {room} reached stable member {member} {count} times"
                ));
            }
        }
    }
    // 5: after healing, every live member's presence view is the set of live trackers.
    for (viewer, room, view) in views {
        let truth: BTreeMap<String, Vec<u64>> = tracking
            .iter()
            .filter(|((client, r), value)| {
                *r == room
                    && value.is_some()
                    && !disconnected.contains_key(client)
                    && membership
                        .get(&(*client, room.clone()))
                        .is_some_and(|m| m.spans.last().is_some_and(|(_, left)| left.is_none()))
            })
            .map(|((client, _), value)| (format!("c{client}"), vec![value.expect("filtered")]))
            .collect();
        if view != truth {
            violations.push(format!(
                "invariant 5: client {viewer} sees {view:?} in {room}, truth is {truth:?}"
            ));
        }
    }
    check_changes(events, commits, &mut violations);
    violations
}
