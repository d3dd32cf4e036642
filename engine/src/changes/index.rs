//! Which channels may want a change, without looking at every subscription.
//!
//! Subscriptions to one table with an `eq` filter on a scalar column are found by a hash
//! lookup of the row's value; so are those of subscribers whose table's policies show them
//! only the rows they own ([`super::Rule::Owner`]), by their owner key, except for deletes,
//! which reach every subscriber of the table. Other subscriptions to the table are scanned,
//! and wildcard subscriptions are scanned for every change. Candidates are then checked in
//! full, so the index only has to never miss a channel that may see the change.

use std::collections::BTreeSet;

use rustc_hash::FxHashMap;
use serde_json::Value;

use super::types::{Change, ChangeKind};
use super::ChannelKey;

/// Column types whose `eq` filters are indexed: their values compare as canonical text.
fn indexable(type_name: &str) -> bool {
    matches!(
        type_name,
        "int2"
            | "int4"
            | "int8"
            | "oid"
            | "float4"
            | "float8"
            | "numeric"
            | "bool"
            | "text"
            | "varchar"
            | "uuid"
    )
}

fn number_text(f: f64) -> String {
    // 0.0 and -0.0 are equal in SQL; make them one key.
    if f == 0.0 {
        "0".to_owned()
    } else {
        f.to_string()
    }
}

/// The canonical text of a filter literal for a column of `type_name`, if indexable.
pub(super) fn literal_key(type_name: &str, literal: &str) -> Option<String> {
    if !indexable(type_name) {
        return None;
    }
    Some(match type_name {
        "bool" => super::filter::bool_value(literal)?.to_string(),
        "text" | "varchar" | "uuid" => literal.replace(' ', "T"),
        _ => number_text(literal.trim().parse::<f64>().ok()?),
    })
}

/// The canonical text of a row value, matching [`literal_key`] whenever `eq` would match.
fn value_key(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.replace(' ', "T")),
        Value::Number(n) => Some(number_text(n.as_f64()?)),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Where one subscription is filed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Slot {
    /// Every change is a candidate.
    Wildcard,
    /// Changes to one table are candidates.
    Table { schema: String, table: String },
    /// Changes to one table whose `column` has canonical value `key` are candidates.
    Eq {
        schema: String,
        table: String,
        column: String,
        key: String,
    },
    /// Inserts and updates of one table whose owner `column` has canonical value `key` are
    /// candidates, and every delete: what a subscriber of `role` may see under the table's
    /// owner rule.
    Owner {
        schema: String,
        table: String,
        column: String,
        key: String,
        role: String,
    },
}

/// Channel sets by column and canonical value.
type ByValue = FxHashMap<String, FxHashMap<String, BTreeSet<ChannelKey>>>;

#[derive(Debug, Default)]
struct TableIndex {
    scan: BTreeSet<ChannelKey>,
    eq: ByValue,
    owned: ByValue,
    /// Subscriptions filed by owner, by role: the roles whose owner rule a change of the
    /// table relies on.
    owner_roles: FxHashMap<String, usize>,
}

impl TableIndex {
    fn is_empty(&self) -> bool {
        self.scan.is_empty() && self.eq.is_empty() && self.owned.is_empty()
    }
}

fn file(values: &mut ByValue, column: &str, key: &str, channel: ChannelKey) {
    values
        .entry(column.to_owned())
        .or_default()
        .entry(key.to_owned())
        .or_default()
        .insert(channel);
}

fn unfile(values: &mut ByValue, column: &str, key: &str, channel: ChannelKey) {
    if let Some(by_key) = values.get_mut(column) {
        if let Some(set) = by_key.get_mut(key) {
            set.remove(&channel);
            if set.is_empty() {
                by_key.remove(key);
            }
        }
        if by_key.is_empty() {
            values.remove(column);
        }
    }
}

/// The channels of `values` whose value is the row's.
fn lookup<'a>(
    values: &'a ByValue,
    row: &'a serde_json::Map<String, Value>,
) -> impl Iterator<Item = ChannelKey> + 'a {
    values.iter().flat_map(move |(column, by_key)| {
        row.get(column)
            .and_then(value_key)
            .and_then(|key| by_key.get(&key))
            .into_iter()
            .flatten()
            .copied()
    })
}

/// The candidate index over every registered channel.
#[derive(Debug, Default)]
pub(super) struct Index {
    wildcard: BTreeSet<ChannelKey>,
    tables: FxHashMap<String, FxHashMap<String, TableIndex>>,
}

impl Index {
    pub(super) fn insert(&mut self, channel: ChannelKey, slot: &Slot) {
        match slot {
            Slot::Wildcard => {
                self.wildcard.insert(channel);
            }
            Slot::Table { schema, table } => {
                self.table_mut(schema, table).scan.insert(channel);
            }
            Slot::Eq {
                schema,
                table,
                column,
                key,
            } => file(&mut self.table_mut(schema, table).eq, column, key, channel),
            Slot::Owner {
                schema,
                table,
                column,
                key,
                role,
            } => {
                let index = self.table_mut(schema, table);
                file(&mut index.owned, column, key, channel);
                *index.owner_roles.entry(role.clone()).or_default() += 1;
            }
        }
    }

    pub(super) fn remove(&mut self, channel: ChannelKey, slot: &Slot) {
        let (schema, table) = match slot {
            Slot::Wildcard => {
                self.wildcard.remove(&channel);
                return;
            }
            Slot::Table { schema, table }
            | Slot::Eq { schema, table, .. }
            | Slot::Owner { schema, table, .. } => (schema, table),
        };
        let Some(tables) = self.tables.get_mut(schema) else {
            return;
        };
        let Some(index) = tables.get_mut(table) else {
            return;
        };
        match slot {
            Slot::Eq { column, key, .. } => unfile(&mut index.eq, column, key, channel),
            Slot::Owner {
                column, key, role, ..
            } => {
                unfile(&mut index.owned, column, key, channel);
                if let Some(count) = index.owner_roles.get_mut(role) {
                    *count -= 1;
                    if *count == 0 {
                        index.owner_roles.remove(role);
                    }
                }
            }
            _ => {
                index.scan.remove(&channel);
            }
        }
        if index.is_empty() {
            tables.remove(table);
            if tables.is_empty() {
                self.tables.remove(schema);
            }
        }
    }

    fn table_mut(&mut self, schema: &str, table: &str) -> &mut TableIndex {
        self.tables
            .entry(schema.to_owned())
            .or_default()
            .entry(table.to_owned())
            .or_default()
    }

    /// Every channel that may want `change`, in a deterministic order.
    pub(super) fn candidates(&self, change: &Change) -> BTreeSet<ChannelKey> {
        let mut out = self.wildcard.clone();
        let Some(index) = self
            .tables
            .get(&change.schema)
            .and_then(|t| t.get(&change.table))
        else {
            return out;
        };
        out.extend(index.scan.iter().copied());
        let row = match change.kind {
            ChangeKind::Delete => change.old_record.as_ref(),
            _ => change.record.as_ref(),
        };
        if change.kind == ChangeKind::Delete {
            // A delete reaches every subscriber of the table, its row reduced to the key.
            let owned = index.owned.values().flat_map(FxHashMap::values).flatten();
            out.extend(owned.copied());
        }
        let Some(row) = row else { return out };
        out.extend(lookup(&index.eq, row));
        if change.kind != ChangeKind::Delete {
            out.extend(lookup(&index.owned, row));
        }
        out
    }

    /// The roles with channels filed by owner on `schema.table`: a change of it relies on
    /// their owner rules.
    pub(super) fn owner_roles(&self, schema: &str, table: &str) -> impl Iterator<Item = &str> {
        self.tables
            .get(schema)
            .and_then(|t| t.get(table))
            .into_iter()
            .flat_map(|index| index.owner_roles.keys().map(String::as_str))
    }
}
