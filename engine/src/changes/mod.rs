//! Postgres changes: subscriptions from join configs, filters, batched RLS visibility and
//! delivery in commit order (PROTOCOL.md §5).
//!
//! A batch of changes is matched against the subscriptions registered when it arrives.
//! Inserts and updates of tables with RLS need the database's verdict: one
//! [`VisibilityQuery`] per claims group per batch, never one per subscriber or row.
//! Batches are delivered strictly in arrival order, so a batch waiting for verdicts holds
//! back the ones behind it and every subscriber sees changes in commit order. WAL progress
//! is reported only for delivered batches.
//!
//! A question the database could not answer (connection lost, timeout, database down) is
//! asked again after a backoff, for as long as it takes: a failure is never a verdict, so
//! no change is withheld from a subscriber its policies allow. Changes at or below the
//! highest WAL position already accepted are resends and are skipped, so a stream that
//! reconnects (or a new slot holder in a cluster) repeats nothing within one engine.

mod filter;
mod index;
mod progress;
mod types;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use rustc_hash::FxHashMap;
use serde_json::{json, Map, Value};

pub use progress::Progress;
pub use types::{
    canonical_uuid, owner_key, Change, ChangeBatch, ChangeKind, Column, QueryId, RowCheck, Rule,
    Table, TableRule, Verdict, VisibilityQuery,
};

use crate::auth::Claims;
use crate::channel::{system_payload, Binding};
use crate::protocol::{self, Vsn};
use crate::timers::Timer;
use crate::{BroadcastBody, ConnId, Engine, Output, RoomKey, To};
use filter::Condition;
use index::{Index, Slot};

/// What makes two postgres_changes frames identical: topic, ids, serializer, and whether
/// the row was withheld as unauthorized.
type FrameKey = (Arc<str>, Vec<u32>, Vsn, bool);

/// A channel instance: subscriptions are registered and removed per channel.
type ChannelKey = (ConnId, u64);

/// Subscribers that share role and claims share visibility verdicts.
#[derive(Debug)]
struct ClaimsGroup {
    /// The claims as canonical JSON: the group's identity.
    key: String,
    role: String,
    claims: Arc<Map<String, Value>>,
}

impl ClaimsGroup {
    /// The group's owner key for `column` of `table` ([`owner_key`]): its `sub` claim as
    /// the column's type prints it; `None` when it has no string `sub` or the column is gone.
    fn owner_key(&self, table: &Table, column: &str) -> Option<String> {
        let type_name = &table.columns.iter().find(|c| c.name == column)?.type_name;
        owner_key(type_name, self.claims.get("sub")?.as_str()?)
    }
}

/// One validated binding of a channel.
#[derive(Debug)]
struct Subscription {
    id: u32,
    event: Option<ChangeKind>,
    /// `None` is every schema.
    schema: Option<String>,
    /// `None` is every table of the schema.
    table: Option<String>,
    conditions: Vec<Condition>,
    /// Where its filters would have the candidate index file it.
    base: Slot,
    /// Where the index files it: `base`, or by owner when an owner rule applies ([`slot`]).
    slot: Slot,
}

impl Subscription {
    fn matches(&self, change: &Change) -> bool {
        if self.event.is_some_and(|e| e != change.kind)
            || self.schema.as_ref().is_some_and(|s| *s != change.schema)
            || self.table.as_ref().is_some_and(|t| *t != change.table)
        {
            return false;
        }
        // Deletes are judged on the old identity, so a filter on a non-identity column
        // never passes for them (PROTOCOL.md C59).
        let row = match change.kind {
            ChangeKind::Delete => change.old_record.as_ref(),
            _ => change.record.as_ref(),
        };
        match row {
            Some(row) => self.conditions.iter().all(|c| c.matches(row)),
            None => self.conditions.is_empty(),
        }
    }
}

#[derive(Debug)]
struct ChannelSubscriptions {
    group: Arc<ClaimsGroup>,
    subscriptions: Vec<Subscription>,
}

/// Who gets one change: a channel, the ids of its matching bindings, and, when a verdict
/// is needed, its claims group's place among the batch's questions.
#[derive(Debug)]
struct Delivery {
    channel: ChannelKey,
    ids: Vec<u32>,
    group: Option<u32>,
}

#[derive(Debug)]
struct PendingBatch {
    /// Shared with the process's other shards, which get the same batch.
    batch: Arc<ChangeBatch>,
    deliveries: Vec<Vec<Delivery>>,
    /// Verdicts by claims group (its place among the batch's questions) and change index.
    verdicts: FxHashMap<(u32, usize), Verdict>,
    awaiting: BTreeSet<u64>,
    /// Messages sent from SQL (`realtime.send`), by change index: broadcast in their place.
    sent: FxHashMap<usize, Sent>,
    /// Changes at or below this WAL position were resends when the batch arrived.
    skip_to: u64,
    /// The rules the deliveries were planned with, each with the first change that relied
    /// on it: the batch is planned again if one of its answers finds another rule.
    assumed: Vec<(Assumption, usize)>,
}

/// An owner rule a batch relied on for one table and role, instead of asking.
#[derive(Debug, PartialEq)]
struct Assumption {
    schema: String,
    table: String,
    role: String,
    rule: Rule,
}

/// Questions sent and not yet answered: which group, which changes, and the query itself
/// to ask again if the database fails to answer.
#[derive(Debug)]
struct Question {
    /// The claims group's place among its batch's questions.
    group: u32,
    changes: Vec<usize>,
    query: VisibilityQuery,
    /// Failed answers in a row: the next retry waits `RETRY_FIRST_MS × 2^failures`.
    failures: u32,
    /// Waiting for a retry timer: the question is not with the database.
    backing_off: bool,
}

/// The first retry of a failed visibility question waits this long, each later one twice as
/// long, up to `RETRY_MAX_MS`.
const RETRY_FIRST_MS: u64 = 100;
const RETRY_MAX_MS: u64 = 5_000;

/// The engine's postgres_changes state.
#[derive(Debug, Default)]
pub(crate) struct State {
    /// Tables of the publication by (schema, name); `None` until the runtime reads them.
    publication: Option<BTreeMap<(String, String), Table>>,
    channels: BTreeMap<ChannelKey, ChannelSubscriptions>,
    index: Index,
    /// Channels waiting for the publication before they can subscribe.
    waiting: Vec<ChannelKey>,
    groups: FxHashMap<String, Arc<ClaimsGroup>>,
    batches: VecDeque<PendingBatch>,
    questions: BTreeMap<u64, Question>,
    next_query: u64,
    /// Questions waiting for a retry timer.
    backing_off: usize,
    /// The highest commit LSN accepted into `batches`: anything at or below it is a resend.
    accepted_lsn: u64,
    /// Channels whose bindings named a table or column the publication lacked, waiting for
    /// the publication to be read again before they are refused.
    refreshing: Vec<ChannelKey>,
    /// The last rule the database reported per table and role (absent: evaluated there).
    rules: FxHashMap<(String, String), BTreeMap<String, Rule>>,
}

/// Where a subscription with filter slot `base` of a channel in `group` is filed: by its
/// owner key when its table's rule for the group's role is an owner rule and its `sub`
/// has a key, so only changes of rows it owns find it; else by its filters.
fn slot(
    base: &Slot,
    group: &ClaimsGroup,
    rules: &FxHashMap<(String, String), BTreeMap<String, Rule>>,
    tables: Option<&BTreeMap<(String, String), Table>>,
) -> Slot {
    let Slot::Table { schema, table } = base else {
        return base.clone();
    };
    let owner = || {
        let name = (schema.clone(), table.clone());
        let Rule::Owner { column } = rules.get(&name)?.get(&group.role)? else {
            return None;
        };
        Some(Slot::Owner {
            schema: schema.clone(),
            table: table.clone(),
            column: column.clone(),
            key: group.owner_key(tables?.get(&name)?, column)?,
            role: group.role.clone(),
        })
    };
    match group.role.as_str() {
        // Sees every row whatever the policies: never asked, never filed by owner.
        "service_role" => base.clone(),
        _ => owner().unwrap_or_else(|| base.clone()),
    }
}

/// The verdict `rule` gives `change` for `group`, or `None` when only the database can
/// tell (the group's `sub` has no owner key, the column is gone).
fn judged(rule: &Rule, group: &ClaimsGroup, change: &Change, table: &Table) -> Option<Verdict> {
    match rule {
        Rule::All => Some(Verdict::Visible),
        Rule::Owner { column } => {
            let key = group.owner_key(table, column)?;
            Some(rule.verdict(change.record.as_ref(), &key))
        }
    }
}

/// `[event: INSERT, schema: public, table: todos, filters: [], select: nil]`, as upstream
/// prints subscription parameters.
fn describe(params: &Map<String, Value>, conditions: &[Condition]) -> String {
    let text = |key: &str| {
        params
            .get(key)
            .and_then(Value::as_str)
            .map_or("nil".to_owned(), str::to_owned)
    };
    let filters: Vec<String> = conditions.iter().map(Condition::describe).collect();
    let select = params
        .get("select")
        .map_or("nil".to_owned(), Value::to_string);
    format!(
        "[event: {}, schema: {}, table: {}, filters: [{}], select: {}]",
        text("event"),
        text("schema"),
        text("table"),
        filters.join(", "),
        select
    )
}

/// Why a binding cannot be subscribed. The texts are upstream's, sent in the channel's
/// `system` message.
#[derive(Debug)]
enum Refusal {
    /// Wrong whatever the catalog says: no schema or table given, or a filter that does not
    /// parse.
    Invalid(String),
    /// The table or a filtered column is not in the publication as last read; the user may
    /// have just added it, so it is read again before the binding is refused.
    Unpublished(String),
}

impl Refusal {
    fn message(self) -> String {
        match self {
            Refusal::Invalid(message) | Refusal::Unpublished(message) => message,
        }
    }
}

/// Validates one binding against the publication.
fn subscription(
    binding: &Binding,
    tables: &BTreeMap<(String, String), Table>,
) -> Result<Subscription, Refusal> {
    let params = &binding.params;
    let text = |key: &str| {
        params
            .get(key)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    let event = match text("event").map(str::to_ascii_uppercase).as_deref() {
        Some("INSERT") => Some(ChangeKind::Insert),
        Some("UPDATE") => Some(ChangeKind::Update),
        Some("DELETE") => Some(ChangeKind::Delete),
        _ => None,
    };
    let (schema, table) = match (text("schema"), text("table")) {
        (None, None) => {
            return Err(Refusal::Invalid(format!(
                "No subscription params provided. Please provide at least a `schema` or `table` to subscribe to: {}",
                describe(params, &[])
            )))
        }
        (schema, table) => (schema.unwrap_or("public"), table),
    };
    let mut conditions = filter::parse(text("filter").unwrap_or_default())
        .map_err(|e| Refusal::Invalid(format!("Error parsing `filter` params: {e}")))?;
    let wildcard = |s: &str| s == "*";
    let matching: Vec<&Table> = tables
        .values()
        .filter(|t| wildcard(schema) || t.schema == schema)
        .filter(|t| table.is_none_or(|name| wildcard(name) || t.name == name))
        .collect();
    if matching.is_empty() {
        return Err(Refusal::Unpublished(format!(
            "Unable to subscribe to changes with given parameters. Please check Realtime is enabled for the given connect parameters: {}",
            describe(params, &conditions)
        )));
    }
    for table in &matching {
        for condition in &conditions {
            condition.validate(&table.columns).map_err(|exception| {
                Refusal::Unpublished(format!(
                    "Unable to subscribe to changes with given parameters. An exception happened so please check your connect parameters: {}. Exception: {exception}",
                    describe(params, &conditions)
                ))
            })?;
        }
    }
    for condition in &mut conditions {
        let uuid = |t: &&Table| {
            t.columns
                .iter()
                .any(|c| c.name == condition.column && c.type_name == "uuid")
        };
        if matching.iter().all(uuid) {
            condition.spell_as_uuids();
        }
    }
    let schema = (!wildcard(schema)).then(|| schema.to_owned());
    let table = table.filter(|t| !wildcard(t)).map(str::to_owned);
    let slot = match (&schema, &table, matching.as_slice()) {
        (Some(schema), Some(table), [found]) => conditions
            .iter()
            .find_map(|c| {
                let literal = c.eq_literal()?;
                let column = found.columns.iter().find(|col| col.name == c.column)?;
                let key = index::literal_key(&column.type_name, literal)?;
                Some(Slot::Eq {
                    schema: schema.clone(),
                    table: table.clone(),
                    column: c.column.clone(),
                    key,
                })
            })
            .unwrap_or_else(|| Slot::Table {
                schema: schema.clone(),
                table: table.clone(),
            }),
        _ => Slot::Wildcard,
    };
    Ok(Subscription {
        id: binding.id,
        event,
        schema,
        table,
        conditions,
        base: slot.clone(),
        slot,
    })
}

/// A message sent from the database: its room, its broadcast and its row's id.
#[derive(Debug)]
struct Sent {
    room: RoomKey,
    body: BroadcastBody,
    id: Option<String>,
    /// The transaction that sent it.
    xid: u32,
}

/// A row `realtime.send` (or `broadcast_changes`) inserted into `realtime.messages`, as
/// the broadcast it asks for: to the topic's private or public room, with `meta.id`, as
/// upstream delivers it. `None` for any other change.
fn sent_message(change: &Change) -> Option<Sent> {
    if change.schema != "realtime" || change.table != "messages" {
        return None;
    }
    let row = change.record.as_ref()?;
    if change.kind != ChangeKind::Insert || row.get("extension")? != "broadcast" {
        return None;
    }
    let topic = row.get("topic")?.as_str()?;
    let body = json!({
        "type": "broadcast",
        "event": row.get("event").cloned().unwrap_or(Value::Null),
        "payload": row.get("payload").cloned().unwrap_or(Value::Null),
        "meta": {"id": row.get("id").cloned().unwrap_or(Value::Null)},
    });
    let room = RoomKey {
        private: row.get("private").and_then(Value::as_bool).unwrap_or(false),
        sub: Arc::from(topic),
    };
    Some(Sent {
        room,
        body: BroadcastBody::Json(body.to_string().into()),
        id: row.get("id").and_then(Value::as_str).map(str::to_owned),
        xid: change.xid,
    })
}

/// `data` of a postgres_changes frame: identical for every recipient of a change.
fn data(change: &Change, table: Option<&Table>, errors: Option<&str>) -> String {
    let mut data = Map::new();
    data.insert("schema".into(), json!(change.schema));
    data.insert("table".into(), json!(change.table));
    let unauthorized = errors == Some("Error 401: Unauthorized");
    data.insert(
        "commit_timestamp".into(),
        if unauthorized {
            Value::Null
        } else {
            json!(change.commit_timestamp)
        },
    );
    data.insert("type".into(), json!(change.kind.as_str()));
    let columns: Vec<Value> = if unauthorized {
        Vec::new()
    } else {
        change
            .columns
            .iter()
            .map(|c| json!({"name": c.name, "type": c.type_name}))
            .collect()
    };
    data.insert("columns".into(), Value::Array(columns));
    let row = |row: Option<&Map<String, Value>>| {
        if unauthorized {
            return json!({});
        }
        Value::Object(row.cloned().unwrap_or_default())
    };
    if change.kind != ChangeKind::Delete {
        data.insert("record".into(), row(change.record.as_ref()));
    }
    if change.kind != ChangeKind::Insert {
        let mut old = row(change.old_record.as_ref());
        // RLS hides deleted rows' contents: only the primary key survives.
        if let (ChangeKind::Delete, Some(table), Value::Object(map)) =
            (change.kind, table, &mut old)
        {
            if table.rls {
                map.retain(|column, _| table.primary_key.contains(column));
            }
        }
        data.insert("old_record".into(), old);
    }
    data.insert("errors".into(), errors.map_or(Value::Null, |e| json!([e])));
    Value::Object(data).to_string()
}

impl Engine {
    /// Registers the postgres_changes bindings of a channel (after its join or a token
    /// refresh) and tells the channel how that went.
    pub(crate) fn subscribe_changes(&mut self, conn: ConnId, instance: u64) {
        self.subscribe(conn, instance, false);
    }

    /// [`Engine::subscribe_changes`]; `fresh` when the publication was read since the
    /// channel asked, so a table it lacks is refused rather than read again.
    fn subscribe(&mut self, conn: ConnId, instance: u64, fresh: bool) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let Some(channel) = c.channels.iter().find(|ch| ch.instance == instance) else {
            return;
        };
        if channel.bindings.is_empty() {
            return;
        }
        let key = (conn, instance);
        let message = if !self.config.database {
            Err(Refusal::Invalid(
                "Realtime was unable to connect to the project database".to_owned(),
            ))
        } else if let Some(tables) = &self.changes.publication {
            channel
                .bindings
                .iter()
                .map(|b| subscription(b, tables))
                .collect::<Result<Vec<_>, _>>()
        } else {
            // Not read yet. A cluster node that came up after the slot holder read it asks;
            // a lone process's reader sends it as it starts, so the ask costs one re-read.
            if self.changes.waiting.is_empty() {
                self.emit(Output::RefreshPublication);
            }
            if !self.changes.waiting.contains(&key) {
                self.changes.waiting.push(key);
            }
            return;
        };
        let (vsn, join_ref, topic, sub) = (
            c.vsn,
            channel.join_ref.clone(),
            channel.topic.clone(),
            channel.room.sub.clone(),
        );
        let claims = channel.claims.clone();
        if let Err(Refusal::Unpublished(_)) = &message {
            if !fresh {
                // Read the publication again before refusing: the table may be new.
                if self.changes.refreshing.is_empty() {
                    self.emit(Output::RefreshPublication);
                }
                if !self.changes.refreshing.contains(&key) {
                    self.changes.refreshing.push(key);
                }
                return;
            }
        }
        let payload = match message {
            Ok(mut subscriptions) => {
                let group = self.claims_group(&claims);
                self.unsubscribe_changes(conn, instance);
                let tables = self.changes.publication.as_ref();
                for subscription in &mut subscriptions {
                    subscription.slot =
                        slot(&subscription.base, &group, &self.changes.rules, tables);
                    self.changes.index.insert(key, &subscription.slot);
                }
                self.changes.channels.insert(
                    key,
                    ChannelSubscriptions {
                        group,
                        subscriptions,
                    },
                );
                system_payload("postgres_changes", "ok", "Subscribed to PostgreSQL", &sub)
            }
            Err(refusal) => {
                self.unsubscribe_changes(conn, instance);
                self.stats.errors += 1;
                system_payload("postgres_changes", "error", &refusal.message(), &sub)
            }
        };
        let msg = protocol::encode_text(vsn, join_ref.as_deref(), None, &topic, "system", &payload);
        self.send_one(conn, msg);
    }

    /// Forgets a channel's subscriptions when it ends.
    pub(crate) fn unsubscribe_changes(&mut self, conn: ConnId, instance: u64) {
        if let Some(channel) = self.changes.channels.remove(&(conn, instance)) {
            for subscription in &channel.subscriptions {
                self.changes
                    .index
                    .remove((conn, instance), &subscription.slot);
            }
        }
        self.changes.waiting.retain(|k| *k != (conn, instance));
        self.changes.refreshing.retain(|k| *k != (conn, instance));
    }

    fn claims_group(&mut self, claims: &Claims) -> Arc<ClaimsGroup> {
        let key = serde_json::to_string(&*claims.all).expect("claims serialise");
        self.changes
            .groups
            .entry(key.clone())
            .or_insert_with(|| {
                Arc::new(ClaimsGroup {
                    key,
                    role: claims.role.clone(),
                    claims: claims.all.clone(),
                })
            })
            .clone()
    }

    pub(crate) fn publication(&mut self, tables: Vec<Table>) {
        let tables = tables
            .into_iter()
            .map(|t| ((t.schema.clone(), t.name.clone()), t))
            .collect();
        self.changes.publication = Some(tables);
        // Owner keys follow the columns' types.
        self.reslot(|_, _, _| true);
        let waiting = std::mem::take(&mut self.changes.waiting);
        let refreshing = std::mem::take(&mut self.changes.refreshing);
        for (conn, instance) in waiting.into_iter().chain(refreshing) {
            self.subscribe(conn, instance, true);
        }
        // Groups no channel uses any more are dropped here, off the hot path.
        let used: BTreeSet<&str> = self
            .changes
            .channels
            .values()
            .map(|c| c.group.key.as_str())
            .collect();
        let unused: Vec<String> = self
            .changes
            .groups
            .keys()
            .filter(|k| !used.contains(k.as_str()))
            .cloned()
            .collect();
        for key in unused {
            self.changes.groups.remove(&key);
        }
    }

    pub(crate) fn changes(&mut self, batch: Arc<ChangeBatch>) {
        let skip_to = self.changes.accepted_lsn;
        self.changes.accepted_lsn = skip_to.max(batch.lsn);
        let pending = self.plan(batch, skip_to);
        self.changes.batches.push_back(pending);
        self.deliver_ready();
    }

    /// Who gets each change of `batch` (skipping those at or below `skip_to`), and the
    /// visibility questions that decide it, sent now: one per claims group whose verdicts
    /// no rule gives, and one per rule relied on that no such question confirms.
    fn plan(&mut self, batch: Arc<ChangeBatch>, skip_to: u64) -> PendingBatch {
        let tables = self.changes.publication.as_ref();
        let mut deliveries = Vec::with_capacity(batch.changes.len());
        // Per claims group, the changes whose visibility it needs, in first-seen order. A
        // group is found by its address: channels share one `Arc` per group, and the
        // deliveries hold it while the batch lives. Comparing the claims themselves cost a
        // string copy and compare per subscriber per change.
        let mut asks: Vec<(Arc<ClaimsGroup>, Vec<usize>)> = Vec::new();
        let mut slots: FxHashMap<*const ClaimsGroup, u32> = FxHashMap::default();
        let mut sent = FxHashMap::default();
        let mut assumed: Vec<(Assumption, usize)> = Vec::new();
        // Called per candidate judged by a rule: compares before it copies anything.
        let mut assume = |change: &Change, role: &str, rule: &Rule, index: usize| {
            let known = assumed.iter().any(|(a, _)| {
                a.schema == change.schema
                    && a.table == change.table
                    && a.role == role
                    && a.rule == *rule
            });
            if !known {
                let assumption = Assumption {
                    schema: change.schema.clone(),
                    table: change.table.clone(),
                    role: role.to_owned(),
                    rule: rule.clone(),
                };
                assumed.push((assumption, index));
            }
        };
        for (index, change) in batch.changes.iter().enumerate() {
            if change.lsn <= skip_to {
                // A resend: handed out already.
                deliveries.push(Vec::new());
                continue;
            }
            if change.schema == "realtime" && change.table == "messages" {
                // Not a postgres_changes row: a broadcast, in its place in commit order.
                sent.extend(sent_message(change).map(|message| (index, message)));
                deliveries.push(Vec::new());
                continue;
            }
            let name = (change.schema.clone(), change.table.clone());
            let table = tables.and_then(|t| t.get(&name));
            let needs_verdict = table.is_some_and(|t| t.rls && !t.primary_key.is_empty())
                && change.kind != ChangeKind::Delete;
            let rules = needs_verdict
                .then(|| self.changes.rules.get(&name))
                .flatten();
            if let Some(rules) = rules {
                // Channels filed by owner that this change does not reach rely on the rule.
                let roles: BTreeSet<&str> = self
                    .changes
                    .index
                    .owner_roles(&change.schema, &change.table)
                    .collect();
                for role in roles {
                    if let Some(rule) = rules.get(role) {
                        assume(change, role, rule, index);
                    }
                }
            }
            let mut list = Vec::new();
            for key in self.changes.index.candidates(change) {
                let Some(channel) = self.changes.channels.get(&key) else {
                    continue;
                };
                let ids: Vec<u32> = channel
                    .subscriptions
                    .iter()
                    .filter(|s| s.matches(change))
                    .map(|s| s.id)
                    .collect();
                if ids.is_empty() {
                    continue;
                }
                let group = &channel.group;
                let mut asked = None;
                if needs_verdict && group.role != "service_role" {
                    let by_rule = rules
                        .and_then(|rules| rules.get(&group.role))
                        .zip(table)
                        .and_then(|(rule, table)| {
                            Some((rule, judged(rule, group, change, table)?))
                        });
                    match by_rule {
                        Some((rule, verdict)) => {
                            assume(change, &group.role, rule, index);
                            if verdict == Verdict::Hidden {
                                continue;
                            }
                        }
                        None => {
                            let slot = *slots.entry(Arc::as_ptr(group)).or_insert_with(|| {
                                asks.push((group.clone(), Vec::new()));
                                (asks.len() - 1) as u32
                            });
                            let ask = &mut asks[slot as usize].1;
                            if ask.last() != Some(&index) {
                                ask.push(index);
                            }
                            asked = Some(slot);
                        }
                    }
                }
                list.push(Delivery {
                    channel: key,
                    ids,
                    group: asked,
                });
            }
            deliveries.push(list);
        }
        // A rule no question of its role and table confirms gets a question of its own,
        // under the role alone: its verdict reaches nobody, the rule it reports decides.
        for (assumption, index) in &assumed {
            let confirmed = asks.iter().any(|(group, indices)| {
                group.role == assumption.role
                    && indices.iter().any(|&i| {
                        let change = &batch.changes[i];
                        change.schema == assumption.schema && change.table == assumption.table
                    })
            });
            if !confirmed {
                let role = assumption.role.clone();
                let claims = Map::from_iter([("role".to_owned(), json!(role))]);
                let group = ClaimsGroup {
                    key: String::new(),
                    role,
                    claims: Arc::new(claims),
                };
                asks.push((Arc::new(group), vec![*index]));
            }
        }
        let mut pending = PendingBatch {
            batch,
            deliveries,
            verdicts: FxHashMap::default(),
            awaiting: BTreeSet::new(),
            sent,
            skip_to,
            assumed,
        };
        // Each row checked is shared by every group that checks it.
        let mut rows: FxHashMap<usize, Arc<Map<String, Value>>> = FxHashMap::default();
        let mut queries = Vec::with_capacity(asks.len());
        for (slot, (group, indices)) in (0u32..).zip(asks) {
            let mut xids: Vec<u32> = Vec::new();
            let checks: Vec<RowCheck> = indices
                .iter()
                .map(|&i| {
                    let change = &pending.batch.changes[i];
                    if xids.last() != Some(&change.xid) {
                        xids.push(change.xid);
                    }
                    let row = rows
                        .entry(i)
                        .or_insert_with(|| Arc::new(change.record.clone().unwrap_or_default()));
                    RowCheck {
                        schema: change.schema.clone(),
                        table: change.table.clone(),
                        row: row.clone(),
                    }
                })
                .collect();
            xids.sort_unstable();
            xids.dedup();
            self.changes.next_query += 1;
            let id = self.changes.next_query;
            pending.awaiting.insert(id);
            let query = VisibilityQuery {
                id: QueryId {
                    shard: self.shard,
                    n: id,
                },
                role: group.role.clone(),
                claims: group.claims.clone(),
                checks,
                xids,
            };
            queries.push(query.clone());
            self.changes.questions.insert(
                id,
                Question {
                    group: slot,
                    changes: indices,
                    query,
                    failures: 0,
                    backing_off: false,
                },
            );
        }
        for query in queries {
            self.emit(Output::Visibility(query));
        }
        pending
    }

    /// Plans the batch at `position` again with the rules as now known, dropping its
    /// questions: an answer found a rule other than the one it relied on.
    fn replan(&mut self, position: usize) {
        let pending = &mut self.changes.batches[position];
        let (batch, skip_to) = (pending.batch.clone(), pending.skip_to);
        for id in std::mem::take(&mut pending.awaiting) {
            if let Some(question) = self.changes.questions.remove(&id) {
                if question.backing_off {
                    self.changes.backing_off -= 1;
                }
            }
        }
        self.stats.visibility_replans += 1;
        let planned = self.plan(batch, skip_to);
        self.changes.batches[position] = planned;
    }

    /// Records the rule an answer found for a table under `role`, and files that role's
    /// channels of the table again if it changed.
    fn learn(&mut self, role: &str, found: &TableRule) {
        let name = (found.schema.clone(), found.table.clone());
        let known = self.changes.rules.get(&name).and_then(|r| r.get(role));
        if known == found.rule.as_ref() {
            return;
        }
        match &found.rule {
            Some(rule) => {
                self.changes
                    .rules
                    .entry(name)
                    .or_default()
                    .insert(role.to_owned(), rule.clone());
            }
            None => {
                if let Some(rules) = self.changes.rules.get_mut(&name) {
                    rules.remove(role);
                    if rules.is_empty() {
                        self.changes.rules.remove(&name);
                    }
                }
            }
        }
        self.reslot(|schema, table, r| schema == found.schema && table == found.table && r == role);
    }

    /// Files again the subscriptions to a whole table of the channels `which` picks (by
    /// schema, table and role), where the rules now put them.
    fn reslot(&mut self, which: impl Fn(&str, &str, &str) -> bool) {
        let state = &mut self.changes;
        let tables = state.publication.as_ref();
        for (key, channel) in state.channels.iter_mut() {
            for subscription in &mut channel.subscriptions {
                let Slot::Table { schema, table } = &subscription.base else {
                    continue;
                };
                if !which(schema, table, &channel.group.role) {
                    continue;
                }
                let filed = slot(&subscription.base, &channel.group, &state.rules, tables);
                if filed != subscription.slot {
                    state.index.remove(*key, &subscription.slot);
                    state.index.insert(*key, &filed);
                    subscription.slot = filed;
                }
            }
        }
    }

    pub(crate) fn visibility(
        &mut self,
        id: QueryId,
        verdicts: Option<Vec<Verdict>>,
        rules: Vec<TableRule>,
    ) {
        if id.shard != self.shard {
            return;
        }
        let id = id.n;
        #[cfg(feature = "planted-bugs")]
        let verdicts = match verdicts {
            None if self.planted(crate::PlantedBug::HideRowsOfFailedChecks) => Some(Vec::new()),
            verdicts => verdicts,
        };
        let Some(verdicts) = verdicts else {
            // Unanswered is not "not visible": ask again after a backoff.
            let Some(question) = self.changes.questions.get_mut(&id) else {
                return;
            };
            let delay = RETRY_FIRST_MS
                .saturating_mul(1 << question.failures.min(16))
                .min(RETRY_MAX_MS);
            question.failures += 1;
            if !question.backing_off {
                question.backing_off = true;
                self.changes.backing_off += 1;
            }
            self.stats.visibility_retries += 1;
            let attempt = question.failures;
            self.timers.set(
                self.now.mono.plus_ms(delay),
                Timer::VisibilityRetry { id, attempt },
            );
            return;
        };
        // An answer means the database is back: questions backing off are asked now.
        if self.changes.backing_off > 0 {
            let waiting: Vec<u64> = self
                .changes
                .questions
                .iter()
                .filter(|(_, q)| q.backing_off)
                .map(|(id, _)| *id)
                .collect();
            for waiting in waiting {
                self.ask_again(waiting);
            }
        }
        let Some(question) = self.changes.questions.remove(&id) else {
            return;
        };
        let role = question.query.role.as_str();
        for found in &rules {
            self.learn(role, found);
        }
        let Some(position) = self
            .changes
            .batches
            .iter()
            .position(|b| b.awaiting.contains(&id))
        else {
            return;
        };
        let batch = &mut self.changes.batches[position];
        batch.awaiting.remove(&id);
        for (n, &index) in question.changes.iter().enumerate() {
            // An answer too short for its question leaves the rest hidden: the runtime
            // answers every check, so this only guards a runtime bug from leaking rows.
            let verdict = verdicts.get(n).copied().unwrap_or(Verdict::Hidden);
            batch.verdicts.insert((question.group, index), verdict);
        }
        // Each rule the batch relied on for a table this question asked about must be the
        // one its answer found; a table the answer left out counts as evaluated there.
        let asked = |schema: &str, table: &str| {
            question
                .query
                .checks
                .iter()
                .any(|c| c.schema == schema && c.table == table)
        };
        let found = |schema: &str, table: &str| {
            rules
                .iter()
                .find(|r| r.schema == schema && r.table == table)
                .and_then(|r| r.rule.as_ref())
        };
        let broken = batch.assumed.iter().any(|(a, _)| {
            a.role == role
                && asked(&a.schema, &a.table)
                && found(&a.schema, &a.table) != Some(&a.rule)
        });
        if broken {
            self.replan(position);
        }
        self.deliver_ready();
    }

    /// Asks a question again once its backoff for failure `attempt` has passed, unless it
    /// was asked again since.
    pub(crate) fn retry_visibility(&mut self, id: u64, attempt: u32) {
        let current = self
            .changes
            .questions
            .get(&id)
            .is_some_and(|q| q.backing_off && q.failures == attempt);
        if current {
            self.ask_again(id);
        }
    }

    fn ask_again(&mut self, id: u64) {
        if let Some(question) = self.changes.questions.get_mut(&id) {
            if question.backing_off {
                question.backing_off = false;
                self.changes.backing_off -= 1;
            }
            let query = question.query.clone();
            self.emit(Output::Visibility(query));
        }
    }

    /// Delivers complete batches from the head of the queue, in order.
    fn deliver_ready(&mut self) {
        while self
            .changes
            .batches
            .front()
            .is_some_and(|b| b.awaiting.is_empty())
        {
            let pending = self.changes.batches.pop_front().expect("front exists");
            for (index, change) in pending.batch.changes.iter().enumerate() {
                match pending.sent.get(&index) {
                    Some(sent) => {
                        self.fan_out_stored(&sent.room, &sent.body, sent.id.as_deref(), sent.xid)
                    }
                    None => self.deliver_change(&pending, index, change),
                }
            }
            self.emit(Output::WalProgress {
                shard: self.shard,
                lsn: pending.batch.lsn,
            });
        }
    }

    fn deliver_change(&mut self, pending: &PendingBatch, index: usize, change: &Change) {
        let deliveries = &pending.deliveries[index];
        if deliveries.is_empty() {
            return;
        }
        let table = self
            .changes
            .publication
            .as_ref()
            .and_then(|t| t.get(&(change.schema.clone(), change.table.clone())));
        let no_key =
            table.is_some_and(|t| t.primary_key.is_empty()) && change.kind != ChangeKind::Delete;
        let plain = data(
            change,
            table,
            no_key.then_some("Error 400: Bad Request, no primary key"),
        );
        let mut unauthorized: Option<String> = None;
        // Recipients sharing topic, ids, serializer and data share one encoded frame.
        let mut frames: BTreeMap<FrameKey, Vec<ConnId>> = BTreeMap::new();
        for delivery in deliveries {
            let verdict = match delivery.group {
                Some(slot) => pending
                    .verdicts
                    .get(&(slot, index))
                    .copied()
                    .unwrap_or(Verdict::Hidden),
                None => Verdict::Visible,
            };
            #[cfg(feature = "planted-bugs")]
            let verdict = if self.planted(crate::PlantedBug::IgnoreRlsVerdicts) {
                Verdict::Visible
            } else {
                verdict
            };
            if verdict == Verdict::Hidden {
                continue;
            }
            let (conn, instance) = delivery.channel;
            let Some(c) = self.conns.get(&conn) else {
                continue;
            };
            let Some(channel) = c.channels.iter().find(|ch| ch.instance == instance) else {
                continue;
            };
            let denied = verdict == Verdict::Unauthorized;
            frames
                .entry((channel.topic.clone(), delivery.ids.clone(), c.vsn, denied))
                .or_default()
                .push(conn);
        }
        let mut sends = Vec::with_capacity(frames.len());
        for ((topic, ids, vsn, denied), conns) in frames {
            let data: &str = if denied {
                unauthorized
                    .get_or_insert_with(|| data(change, table, Some("Error 401: Unauthorized")))
            } else {
                &plain
            };
            let payload = format!(r#"{{"ids":{},"data":{data}}}"#, json!(ids));
            let msg = protocol::encode_text(vsn, None, None, &topic, "postgres_changes", &payload);
            self.stats.changes_delivered += conns.len() as u64;
            let to = if conns.len() == 1 {
                To::One(conns[0])
            } else {
                To::Members {
                    list: conns.into(),
                    except: None,
                }
            };
            sends.push(Output::Send { to, msg });
        }
        for send in sends {
            self.emit(send);
        }
    }
}
