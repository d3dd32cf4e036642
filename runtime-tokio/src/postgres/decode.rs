//! pgoutput tuples to engine [`Change`]s: text-format column values become typed JSON, the
//! way Postgres's `to_jsonb` would print them, so clients see numbers, booleans and nested
//! JSON rather than strings.

use std::sync::Arc;

use pg_walstream::{ColumnData, TupleData};
use serde_json::{Map, Number, Value};
use switchboard_engine::changes::{Change, ChangeKind, Column};

/// A relation as the last pgoutput `Relation` message described it, with its column types
/// resolved to `pg_type.typname`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Relation {
    /// Schema name.
    pub schema: String,
    /// Table name.
    pub table: String,
    /// Replicated columns in tuple order; shared by every change of the relation.
    pub columns: Arc<[Column]>,
    /// Per column: part of the replica identity key, so present in a key-only old tuple.
    pub key: Arc<[bool]>,
}

/// The old tuple of an update or delete, as the WAL logged it.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Old<'a> {
    /// None logged: an update that left the key alone, under the default replica identity.
    Absent,
    /// Only the replica identity key (`K`); the other columns are meaningless nulls.
    Key(&'a TupleData),
    /// Every column (`O`, `REPLICA IDENTITY FULL`).
    Full(&'a TupleData),
}

/// Builds one change of transaction `xid`. `record` comes from `new` (insert, update),
/// `old_record` from `old` (update with an old identity, delete). Unchanged TOAST values in
/// `new` are taken from `old` when it has them, otherwise left out: the WAL does not carry
/// them. Its `lsn` is the transaction's commit position, known only at the commit, which
/// stamps it.
pub(crate) fn change(
    relation: &Relation,
    kind: ChangeKind,
    new: Option<&TupleData>,
    old: Old<'_>,
    commit_timestamp: &str,
    xid: u32,
) -> Change {
    let old_record = match old {
        Old::Absent => None,
        Old::Key(tuple) => Some(record(relation, tuple, None, true)),
        Old::Full(tuple) => Some(record(relation, tuple, None, false)),
    };
    let record = new.map(|tuple| record(relation, tuple, old_record.as_ref(), false));
    Change {
        schema: relation.schema.clone(),
        table: relation.table.clone(),
        kind,
        commit_timestamp: commit_timestamp.to_owned(),
        columns: relation.columns.to_vec(),
        record,
        old_record,
        lsn: 0,
        xid,
    }
}

/// Formats a pgoutput commit time (microseconds since 2000-01-01 UTC) as the wire's
/// `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub(crate) fn commit_timestamp(micros: i64) -> String {
    pg_walstream::postgres_timestamp_to_chrono(micros)
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string()
}

fn record(
    relation: &Relation,
    tuple: &TupleData,
    old: Option<&Map<String, Value>>,
    key_only: bool,
) -> Map<String, Value> {
    let mut row = Map::with_capacity(relation.columns.len());
    let columns = relation.columns.iter().zip(relation.key.iter());
    for ((column, &key), data) in columns.zip(tuple.columns.iter()) {
        if key_only && !key {
            continue;
        }
        let value = match data.data_type {
            b'u' => match old.and_then(|old| old.get(&column.name)) {
                Some(value) => value.clone(),
                None => continue,
            },
            b'n' => Value::Null,
            _ => value(&column.type_name, &text(data)),
        };
        row.insert(column.name.clone(), value);
    }
    row
}

/// The column's text. Both backends force `client_encoding=UTF8`, so the lossy path only
/// guards against a server that ignores it.
fn text(data: &ColumnData) -> String {
    String::from_utf8_lossy(data.as_bytes()).into_owned()
}

/// Converts one value from Postgres text output to JSON by its type name.
pub(crate) fn value(type_name: &str, text: &str) -> Value {
    match type_name {
        "int2" | "int4" | "int8" | "oid" => text
            .parse::<i64>()
            .map_or_else(|_| Value::String(text.to_owned()), Value::from),
        "float4" | "float8" => float(text),
        "numeric" => match text.parse::<i64>() {
            Ok(integer) => Value::from(integer),
            Err(_) => float(text),
        },
        "bool" => match text {
            "t" => Value::Bool(true),
            "f" => Value::Bool(false),
            _ => Value::String(text.to_owned()),
        },
        "json" | "jsonb" => {
            serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
        }
        "timestamp" => Value::String(text.replacen(' ', "T", 1)),
        "timestamptz" => Value::String(timestamptz(text)),
        _ => match type_name.strip_prefix('_') {
            Some(element) => match array(text) {
                Some(elements) => Value::Array(
                    elements
                        .into_iter()
                        .map(|e| e.map_or(Value::Null, |e| value(element, &e)))
                        .collect(),
                ),
                None => Value::String(text.to_owned()),
            },
            None => Value::String(text.to_owned()),
        },
    }
}

/// A finite float as a JSON number; `NaN` and the infinities have none, so they stay the
/// strings Postgres printed.
fn float(text: &str) -> Value {
    text.parse::<f64>()
        .ok()
        .and_then(Number::from_f64)
        .map_or_else(|| Value::String(text.to_owned()), Value::Number)
}

/// `2026-01-01 12:00:00+00` → `2026-01-01T12:00:00+00:00`, the form `to_jsonb` prints.
/// Anything else (`infinity`, BC dates) is returned as Postgres printed it.
fn timestamptz(text: &str) -> String {
    let Some(space) = text.find(' ') else {
        return text.to_owned();
    };
    let mut out = String::with_capacity(text.len() + 3);
    out.push_str(&text[..space]);
    out.push('T');
    let rest = &text[space + 1..];
    out.push_str(rest);
    // The zone starts at the last sign after the time; `+05` lacks the minutes.
    if let Some(sign) = rest.rfind(['+', '-']) {
        let zone = &rest[sign + 1..];
        if zone.len() == 2 && zone.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(":00");
        }
    }
    out
}

/// Parses a one-dimensional array literal (`{1,2,NULL}`, `{a,"b c","d\"e"}`) into its
/// elements, `None` for an unquoted `NULL`. Nested or bounded arrays return `None`, and the
/// caller keeps the literal as a string.
fn array(text: &str) -> Option<Vec<Option<String>>> {
    let inner = text.strip_prefix('{')?.strip_suffix('}')?;
    let mut elements = Vec::new();
    if inner.is_empty() {
        return Some(elements);
    }
    let mut chars = inner.chars().peekable();
    loop {
        let element = if chars.peek() == Some(&'"') {
            chars.next();
            let mut element = String::new();
            loop {
                match chars.next()? {
                    '"' => break,
                    '\\' => element.push(chars.next()?),
                    c => element.push(c),
                }
            }
            Some(element)
        } else {
            let mut element = String::new();
            while let Some(&c) = chars.peek() {
                match c {
                    ',' => break,
                    '{' | '}' | '"' => return None,
                    '\\' => {
                        chars.next();
                        element.push(chars.next()?);
                    }
                    c => {
                        element.push(c);
                        chars.next();
                    }
                }
            }
            let element = element.trim();
            (!element.eq_ignore_ascii_case("NULL")).then(|| element.to_owned())
        };
        elements.push(element);
        match chars.next() {
            None => return Some(elements),
            Some(',') => {}
            Some(_) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn integers_floats_and_numerics_become_numbers() {
        assert_eq!(value("int2", "-3"), json!(-3));
        assert_eq!(
            value("int8", "9007199254740993"),
            json!(9_007_199_254_740_993_i64)
        );
        assert_eq!(value("float4", "1.5"), json!(1.5));
        assert_eq!(value("float8", "-Infinity"), json!("-Infinity"));
        assert_eq!(value("numeric", "100"), json!(100));
        assert_eq!(value("numeric", "12.50"), json!(12.5));
        assert_eq!(value("numeric", "NaN"), json!("NaN"));
    }

    #[test]
    fn booleans_json_and_plain_strings() {
        assert_eq!(value("bool", "t"), json!(true));
        assert_eq!(value("bool", "f"), json!(false));
        assert_eq!(value("jsonb", r#"{"a": [1, 2]}"#), json!({"a": [1, 2]}));
        assert_eq!(
            value("uuid", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            json!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
        );
        assert_eq!(value("bytea", "\\x0102"), json!("\\x0102"));
    }

    #[test]
    fn timestamps_take_the_iso_form() {
        assert_eq!(
            value("timestamp", "2026-01-01 12:00:00.5"),
            json!("2026-01-01T12:00:00.5")
        );
        assert_eq!(
            value("timestamptz", "2026-01-01 12:00:00+00"),
            json!("2026-01-01T12:00:00+00:00")
        );
        assert_eq!(
            value("timestamptz", "2026-01-01 12:00:00.123-08"),
            json!("2026-01-01T12:00:00.123-08:00")
        );
        assert_eq!(
            value("timestamptz", "2026-01-01 12:00:00+05:30"),
            json!("2026-01-01T12:00:00+05:30")
        );
        assert_eq!(value("timestamptz", "infinity"), json!("infinity"));
    }

    #[test]
    fn arrays_convert_each_element() {
        assert_eq!(value("_int4", "{1,2,NULL}"), json!([1, 2, null]));
        assert_eq!(
            value("_text", r#"{a,"b c","NULL","d\"e\\f"}"#),
            json!(["a", "b c", "NULL", "d\"e\\f"])
        );
        assert_eq!(value("_bool", "{}"), json!([]));
        assert_eq!(value("_int4", "{{1,2},{3,4}}"), json!("{{1,2},{3,4}}"));
        assert_eq!(value("_int4", "[0:1]={1,2}"), json!("[0:1]={1,2}"));
    }

    #[test]
    fn commit_time_has_milliseconds_and_z() {
        // 2026-01-01T12:00:00.123456Z in microseconds since 2000-01-01.
        let micros = (1_767_268_800 - 946_684_800) * 1_000_000 + 123_456;
        assert_eq!(commit_timestamp(micros), "2026-01-01T12:00:00.123Z");
    }

    fn relation() -> Relation {
        Relation {
            schema: "public".into(),
            table: "t".into(),
            columns: [("id", "int8"), ("big", "text")]
                .map(|(name, type_name)| Column {
                    name: name.into(),
                    type_name: type_name.into(),
                })
                .into(),
            key: [true, false].into(),
        }
    }

    fn tuple(values: &[Option<&str>]) -> TupleData {
        TupleData::new(
            values
                .iter()
                .map(|v| v.map_or_else(ColumnData::unchanged, |v| ColumnData::text(v.into())))
                .collect(),
        )
    }

    #[test]
    fn unchanged_toast_comes_from_the_old_row_or_is_left_out() {
        let new = tuple(&[Some("1"), None]);
        let old = tuple(&[Some("1"), Some("xyz")]);
        let update = |old| change(&relation(), ChangeKind::Update, Some(&new), old, "t", 1);
        let full = update(Old::Full(&old));
        assert_eq!(
            full.record.map(Value::Object),
            Some(json!({"id": 1, "big": "xyz"}))
        );
        let absent = update(Old::Absent);
        assert_eq!(absent.record.map(Value::Object), Some(json!({"id": 1})));
        assert_eq!(absent.old_record, None);
    }

    #[test]
    fn a_key_only_old_tuple_keeps_only_the_key() {
        let old = tuple(&[Some("7"), Some("ignored")]);
        let delete = change(
            &relation(),
            ChangeKind::Delete,
            None,
            Old::Key(&old),
            "t",
            1,
        );
        assert_eq!(delete.old_record.map(Value::Object), Some(json!({"id": 7})));
        assert_eq!(delete.record, None);
    }
}
