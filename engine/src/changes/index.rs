//! Which channels may want a change, without looking at every subscription.
//!
//! Subscriptions to one table with an `eq` filter on a scalar column are found by a hash
//! lookup of the row's value; other subscriptions to the table are scanned, and wildcard
//! subscriptions are scanned for every change. Candidates are then checked in full, so the
//! index only has to never miss.

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
}

#[derive(Debug, Default)]
struct TableIndex {
    scan: BTreeSet<ChannelKey>,
    eq: FxHashMap<String, FxHashMap<String, BTreeSet<ChannelKey>>>,
}

impl TableIndex {
    fn is_empty(&self) -> bool {
        self.scan.is_empty() && self.eq.is_empty()
    }
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
            } => {
                let index = self.table_mut(schema, table);
                index
                    .eq
                    .entry(column.clone())
                    .or_default()
                    .entry(key.clone())
                    .or_default()
                    .insert(channel);
            }
        }
    }

    pub(super) fn remove(&mut self, channel: ChannelKey, slot: &Slot) {
        let (schema, table) = match slot {
            Slot::Wildcard => {
                self.wildcard.remove(&channel);
                return;
            }
            Slot::Table { schema, table } | Slot::Eq { schema, table, .. } => (schema, table),
        };
        let Some(tables) = self.tables.get_mut(schema) else {
            return;
        };
        let Some(index) = tables.get_mut(table) else {
            return;
        };
        match slot {
            Slot::Eq { column, key, .. } => {
                if let Some(values) = index.eq.get_mut(column) {
                    if let Some(set) = values.get_mut(key) {
                        set.remove(&channel);
                        if set.is_empty() {
                            values.remove(key);
                        }
                    }
                    if values.is_empty() {
                        index.eq.remove(column);
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
        let Some(row) = row else { return out };
        for (column, values) in &index.eq {
            if let Some(set) = row
                .get(column)
                .and_then(value_key)
                .and_then(|key| values.get(&key))
            {
                out.extend(set.iter().copied());
            }
        }
        out
    }
}
