//! A simulated database: a commit log standing in for the WAL, a replication slot per
//! node that advances only as far as the node confirms, and a simple RLS model answering
//! visibility queries: a role sees a row when the row's `owner` is its `sub`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use switchboard_engine::changes::{Change, ChangeBatch, ChangeKind, Column, Table, Verdict};
use switchboard_engine::{Input, Output};
use switchboard_tokio::EngineHandle;
use tokio::sync::mpsc;

use crate::oracle::Ms;

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
}

#[derive(Default)]
struct State {
    log: Vec<Commit>,
    /// Per node host: the WAL position it confirmed (its replication slot).
    slots: BTreeMap<usize, u64>,
}

/// Shared by the writer and every node.
#[derive(Clone, Default)]
pub struct Db {
    state: Arc<Mutex<State>>,
}

impl Db {
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
        });
    }

    /// Everything committed.
    pub fn log(&self) -> Vec<Commit> {
        self.state.lock().expect("db lock").log.clone()
    }

    /// A node's replication: the publication, then batches from its slot, confirming what
    /// the engine reports handed out and answering visibility queries. Runs on the node's
    /// host until it crashes; a restarted node resumes from its slot.
    pub async fn replicate(
        self,
        host: usize,
        engine: EngineHandle,
        mut outputs: mpsc::UnboundedReceiver<Output>,
    ) {
        engine.input(Input::Publication(vec![table()]));
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
                        state.log.iter().skip(cursor as usize).take(50).cloned().collect()
                    };
                    if let Some(last) = batch.last() {
                        cursor = last.lsn;
                        let changes = batch.iter().map(change).collect();
                        engine.input(Input::Changes(ChangeBatch { changes, lsn: cursor }));
                    }
                }
                output = outputs.recv() => match output {
                    Some(Output::Visibility(query)) => {
                        let sub = query.claims.get("sub").and_then(Value::as_str).unwrap_or_default().to_owned();
                        let verdicts = query
                            .checks
                            .iter()
                            .map(|check| {
                                let id = check.key.first().and_then(|(_, _, v)| v.as_u64()).unwrap_or(0);
                                let owner = self.owner_of(id);
                                if owner.as_deref() == Some(sub.as_str()) { Verdict::Visible } else { Verdict::Hidden }
                            })
                            .collect();
                        engine.input(Input::Visibility { id: query.id, verdicts: Some(verdicts) });
                    }
                    Some(Output::WalProgress { lsn }) => {
                        let mut state = self.state.lock().expect("db lock");
                        let slot = state.slots.entry(host).or_default();
                        *slot = (*slot).max(lsn);
                    }
                    Some(_) => {}
                    None => return,
                },
            }
        }
    }

    /// The row's owner now: ids are never reused, so it is the owner at commit.
    fn owner_of(&self, id: u64) -> Option<String> {
        self.state
            .lock()
            .expect("db lock")
            .log
            .iter()
            .find(|c| c.id == id)
            .map(|c| c.owner.clone())
    }
}

fn change(commit: &Commit) -> Change {
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
    }
}
