//! A simulated database: a commit log standing in for the WAL, a replication slot per
//! node that advances only as far as the node confirms (the lowest position its shards
//! report), a simple RLS model answering visibility queries (as the seed draws it, a role
//! sees a row when the row's `owner` is its `sub`, or sees every row: [`Policy`]), and
//! policies on `realtime.messages` answering private channels' authorization questions
//! ([`may_read`], [`may_write`]). Some commits are messages sent from SQL
//! (`realtime.send`) to a public or a private room.
//!
//! Answers report the rule the model is, so engines judge rows themselves and ask once per
//! batch to confirm; some answers, as the seed says, report no rule instead, as if the
//! policies had been rewritten into an equivalent the engine cannot judge.
//!
//! The database misbehaves as the seed says: visibility answers are delayed, some fail,
//! and during an outage every one fails and the change stream stops, as when Postgres is
//! down. A correct engine asks failed questions again and loses nothing.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use serde_json::{json, Value};
use switchboard_engine::authz::{AuthzAnswer, AuthzQuery, Permissions};
use switchboard_engine::changes::{
    Change, ChangeBatch, ChangeKind, Column, Progress, Rule, Table, TableRule, Verdict,
};
use switchboard_engine::{Input, Output, PlantedBug};
use switchboard_tokio::{to_shards, EngineHandle};
use tokio::sync::mpsc;

use crate::oracle::Ms;

/// How the database misbehaves, drawn from the seed.
#[derive(Clone, Copy, Debug, Default)]
pub struct DbFaults {
    /// Chance that a visibility question fails (the connection broke, a timeout).
    pub fail: f64,
    /// Answers take up to this long.
    pub delay_ms_max: u64,
    /// Number of outages: every question fails and no change is streamed meanwhile.
    pub outages: u32,
    /// Chance that an answer finds the table's policies in a form only the database can
    /// evaluate (same verdicts, no rule): batches the engine planned by the rule are
    /// planned again.
    pub rule_flaps: f64,
}

/// The published table's read policy for `authenticated`, drawn from the seed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Policy {
    /// `owner = auth.uid()`: a row is visible to the `sub` in its `owner` column.
    #[default]
    Owner,
    /// `using (true)`: every row is visible.
    Everyone,
}

impl Policy {
    /// Whether the row of `owner` is visible to `sub`.
    pub fn visible(self, owner: Option<&str>, sub: &str) -> bool {
        self == Policy::Everyone || owner == Some(sub)
    }

    /// The rule the database reports for the policy.
    fn rule(self) -> Rule {
        match self {
            Policy::Owner => Rule::Owner {
                column: "owner".into(),
            },
            Policy::Everyone => Rule::All,
        }
    }
}

/// The private room clients use: its policies are [`may_read`] and [`may_write`].
pub const PRIVATE_ROOM: &str = "vault";

/// Whether client `c<client>` may read the private room (broadcast and presence alike):
/// two clients in three.
pub fn may_read(client: usize) -> bool {
    !client.is_multiple_of(3)
}

/// Whether client `c<client>` may broadcast in the private room (and track there, if it
/// may read): every other client.
pub fn may_write(client: usize) -> bool {
    client.is_multiple_of(2)
}

/// The client index of a `sub` claim `c<index>`.
fn client_of(sub: &str) -> Option<usize> {
    sub.strip_prefix('c')?.parse().ok()
}

/// The one published table.
pub fn table() -> Table {
    Table {
        schema: "public".into(),
        name: "todos".into(),
        columns: columns(),
        primary_key: vec!["id".into()],
        rls: true,
    }
}

fn columns() -> Vec<Column> {
    vec![
        Column {
            name: "id".into(),
            type_name: "int8".into(),
        },
        Column {
            name: "owner".into(),
            type_name: "text".into(),
        },
    ]
}

/// One committed change, as the oracle knows it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Commit {
    /// Its position in the log, from 1: also its WAL position.
    pub lsn: u64,
    /// Simulated commit time.
    pub at: Ms,
    /// The row's id.
    pub id: u64,
    /// Who owns the row (`c<index>`).
    pub owner: String,
    /// Insert, update or delete.
    pub kind: ChangeKind,
    /// A message sent from SQL instead of a row change: its room, and whether private.
    pub sent: Option<(String, bool)>,
}

#[derive(Default)]
struct State {
    log: Vec<Commit>,
    /// Per node host: the WAL position it confirmed (its replication slot).
    slots: BTreeMap<usize, u64>,
    /// The database is down: nothing is answered or streamed.
    down: bool,
    /// Slots confirmed past a change some shard had not handed out.
    violations: Vec<String>,
    /// Questions asked under a role alone, to confirm a rule engines judged rows by.
    confirmations: u64,
}

/// Shared by the writer and every node.
#[derive(Clone, Default)]
pub struct Db {
    state: Arc<Mutex<State>>,
    faults: DbFaults,
    policy: Policy,
    seed: u64,
    /// A bug planted in the node side of replication ([`Progress::planted`]).
    planted: Option<PlantedBug>,
}

impl Db {
    /// A database whose table is read under `policy`, that misbehaves as `faults` say, its
    /// choices drawn from `seed`, fed by nodes that confirm with `planted` in them.
    pub fn new(faults: DbFaults, policy: Policy, seed: u64, planted: Option<PlantedBug>) -> Db {
        Db {
            state: Arc::default(),
            faults,
            policy,
            seed,
            planted,
        }
    }

    /// Starts or ends an outage.
    pub fn set_down(&self, down: bool) {
        self.state.lock().expect("db lock").down = down;
    }

    /// Commits a change to a fresh row at `at`.
    pub fn commit(&self, at: Ms, owner: String, kind: ChangeKind) {
        let mut state = self.state.lock().expect("db lock");
        let lsn = state.log.len() as u64 + 1;
        state.log.push(Commit {
            lsn,
            at,
            id: lsn,
            owner,
            kind,
            sent: None,
        });
    }

    /// Sends a message from SQL to `room` at `at`, as `realtime.send` would.
    pub fn send(&self, at: Ms, room: String, private: bool) {
        let mut state = self.state.lock().expect("db lock");
        let lsn = state.log.len() as u64 + 1;
        state.log.push(Commit {
            lsn,
            at,
            id: lsn,
            owner: String::new(),
            kind: ChangeKind::Insert,
            sent: Some((room, private)),
        });
    }

    /// Where the node side broke the slot's contract: each a confirmation past a change
    /// one of the node's shards had not yet handed out, which a crash would lose.
    pub fn violations(&self) -> Vec<String> {
        self.state.lock().expect("db lock").violations.clone()
    }

    /// Visibility questions asked under a role alone (every client has a `sub`): engines
    /// judged rows by the table's rule and asked only to confirm it.
    pub fn confirmations(&self) -> u64 {
        self.state.lock().expect("db lock").confirmations
    }

    /// Everything committed.
    pub fn log(&self) -> Vec<Commit> {
        self.state.lock().expect("db lock").log.clone()
    }

    /// A node's replication: the publication, then batches from its slot, confirming what
    /// the engine reports handed out and answering visibility queries, late or not at all
    /// as the faults say. Runs on the node's host until it crashes; a restarted node
    /// resumes from its slot.
    pub async fn replicate(
        self,
        host: usize,
        shards: Vec<EngineHandle>,
        mut outputs: mpsc::UnboundedReceiver<Output>,
    ) {
        let engine = |input| to_shards(&shards, input);
        let mut progress = Progress::new(shards.len()).planted(self.planted);
        // Each shard's own report, to check what the slot is confirmed to against.
        let mut handed_out = vec![0u64; shards.len()];
        engine(Input::Publication(vec![table()]));
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ (host as u64) << 32);
        let mut cursor = self
            .state
            .lock()
            .expect("db lock")
            .slots
            .get(&host)
            .copied()
            .unwrap_or(0);
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            tokio::select! {
                // Biased: tokio's choice among ready branches is not seeded.
                biased;
                _ = tick.tick() => {
                    let batch: Vec<Commit> = {
                        let state = self.state.lock().expect("db lock");
                        if state.down {
                            continue;
                        }
                        state.log.iter().skip(cursor as usize).take(50).cloned().collect()
                    };
                    if let Some(last) = batch.last() {
                        cursor = last.lsn;
                        let changes = batch.iter().map(change).collect();
                        engine(Input::Changes(Arc::new(ChangeBatch { changes, lsn: cursor })));
                    }
                }
                output = outputs.recv() => match output {
                    Some(Output::Visibility(query)) => {
                        let sub = query.claims.get("sub").and_then(Value::as_str).unwrap_or_default().to_owned();
                        let down = {
                            let mut state = self.state.lock().expect("db lock");
                            state.confirmations += u64::from(!query.claims.contains_key("sub"));
                            state.down
                        };
                        let failed = down || (rng.next_u64() % 1000) as f64 / 1000.0 < self.faults.fail;
                        let verdicts = (!failed).then(|| {
                            query
                                .checks
                                .iter()
                                .map(|check| {
                                    let owner = check.row.get("owner").and_then(Value::as_str);
                                    if self.policy.visible(owner, &sub) { Verdict::Visible } else { Verdict::Hidden }
                                })
                                .collect()
                        });
                        let flapped = self.faults.rule_flaps > 0.0
                            && (rng.next_u64() % 1000) as f64 / 1000.0 < self.faults.rule_flaps;
                        let rule = (!flapped).then(|| self.policy.rule());
                        let table = table();
                        let rules = vec![TableRule { schema: table.schema, table: table.name, rule }];
                        let delay = match self.faults.delay_ms_max {
                            0 => 0,
                            max => rng.next_u64() % max,
                        };
                        let asker = shards[usize::from(query.id.shard.0)].clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_millis(delay)).await;
                            asker.input(Input::Visibility { id: query.id, verdicts, rules });
                        });
                    }
                    Some(Output::Authorize(query)) => {
                        let down = self.state.lock().expect("db lock").down;
                        let failed = down || (rng.next_u64() % 1000) as f64 / 1000.0 < self.faults.fail;
                        let answer = (!failed).then(|| authorize(&query));
                        let delay = match self.faults.delay_ms_max {
                            0 => 0,
                            max => rng.next_u64() % max,
                        };
                        let asker = shards[usize::from(query.id.shard.0)].clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_millis(delay)).await;
                            asker.input(Input::Authorized { id: query.id, answer });
                        });
                    }
                    Some(Output::RefreshPublication) => engine(Input::Publication(vec![table()])),
                    Some(Output::WalProgress { shard, lsn }) => {
                        let shard = usize::from(shard.0);
                        handed_out[shard] = handed_out[shard].max(lsn);
                        if let Some(confirmed) = progress.report(shard, lsn) {
                            let mut state = self.state.lock().expect("db lock");
                            let lowest = handed_out.iter().copied().min().unwrap_or(0);
                            if confirmed > lowest {
                                let shards = handed_out.clone();
                                state.violations.push(format!(
                                    "invariant 6: node{host}'s slot confirmed to {confirmed}, past changes its shards had not all handed out ({shards:?}); a crash would lose them"
                                ));
                            }
                            let slot = state.slots.entry(host).or_default();
                            *slot = (*slot).max(confirmed);
                        }
                    }
                    Some(_) => {}
                    None => return,
                },
            }
        }
    }
}

/// The policies' verdicts for what `query` asks: [`may_read`] and [`may_write`] on the
/// private room, nothing elsewhere; `service_role` bypasses them.
fn authorize(query: &AuthzQuery) -> AuthzAnswer {
    let sub = query
        .claims
        .get("sub")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let service = query.role == "service_role";
    let client = client_of(sub);
    let room = &*query.topic == PRIVATE_ROOM;
    let read = service || (room && client.is_some_and(may_read));
    let write = service || (room && client.is_some_and(may_write));
    let asked = query.asked;
    AuthzAnswer {
        permissions: Permissions {
            broadcast_read: asked.broadcast_read.then_some(read),
            presence_read: asked.presence_read.then_some(read),
            broadcast_write: asked.broadcast_write.then_some(write),
            presence_write: asked.presence_write.then_some(read),
        },
        replayed: query.replay.map(|_| Vec::new()),
        snapshot: None,
    }
}

fn change(commit: &Commit) -> Change {
    if let Some((room, private)) = &commit.sent {
        // The row realtime.send inserts into realtime.messages.
        let row = json!({"id": format!("m{}", commit.id), "topic": room, "event": "sql",
            "private": private, "extension": "broadcast", "payload": {"sql": commit.id}});
        return Change {
            schema: "realtime".into(),
            table: "messages".into(),
            kind: ChangeKind::Insert,
            commit_timestamp: "2026-01-01T00:00:00.000Z".into(),
            columns: Vec::new(),
            record: row.as_object().cloned(),
            old_record: None,
            lsn: commit.lsn,
            xid: commit.lsn as u32,
        };
    }
    let row = json!({"id": commit.id, "owner": commit.owner})
        .as_object()
        .cloned();
    Change {
        schema: "public".into(),
        table: "todos".into(),
        kind: commit.kind,
        commit_timestamp: "2026-01-01T00:00:00.000Z".into(),
        columns: columns(),
        record: (commit.kind != ChangeKind::Delete)
            .then(|| row.clone())
            .flatten(),
        // REPLICA IDENTITY FULL: the whole old row.
        old_record: (commit.kind != ChangeKind::Insert).then_some(row).flatten(),
        lsn: commit.lsn,
        xid: commit.lsn as u32,
    }
}
