//! The `filter` of a postgres_changes binding: `<column>=[not.]<op>.<value>`, conditions
//! joined by `,` (PROTOCOL.md §5.2), and its evaluation against a row.

use serde_json::{Map, Value};

use super::types::{canonical_uuid, Column};

/// A comparison operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Eq,
    Neq,
    Lt,
    Lte,
    Gt,
    Gte,
    In,
    Like,
    Ilike,
    Is,
    IsDistinct,
}

impl Op {
    fn parse(op: &str) -> Option<Op> {
        Some(match op {
            "eq" => Op::Eq,
            "neq" => Op::Neq,
            "lt" => Op::Lt,
            "lte" => Op::Lte,
            "gt" => Op::Gt,
            "gte" => Op::Gte,
            "in" => Op::In,
            "like" => Op::Like,
            "ilike" => Op::Ilike,
            "is" => Op::Is,
            "isdistinct" => Op::IsDistinct,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Op::Eq => "eq",
            Op::Neq => "neq",
            Op::Lt => "lt",
            Op::Lte => "lte",
            Op::Gt => "gt",
            Op::Gte => "gte",
            Op::In => "in",
            Op::Like => "like",
            Op::Ilike => "ilike",
            Op::Is => "is",
            Op::IsDistinct => "isdistinct",
        }
    }
}

/// One condition of a filter.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Condition {
    pub(crate) column: String,
    op: Op,
    negated: bool,
    /// One value, or the list of an `in`.
    values: Vec<String>,
}

/// Why a filter does not parse. Display is the detail after ``Error parsing `filter`
/// params: ``.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FilterError {
    #[error("{0}")]
    Shape(String),
    #[error("`in` filter value must be wrapped by parentheses")]
    InWithoutParentheses,
    #[error("filter must not contain empty segments (check for extra commas)")]
    EmptySegment,
}

/// An Elixir-inspected list of strings: `["foo", "1"]`.
fn inspect(parts: &[&str]) -> String {
    let quoted: Vec<String> = parts.iter().map(|p| format!("{p:?}")).collect();
    format!("[{}]", quoted.join(", "))
}

/// Parses a filter; an empty or blank filter has no conditions.
pub(crate) fn parse(filter: &str) -> Result<Vec<Condition>, FilterError> {
    if filter.trim().is_empty() {
        return Ok(Vec::new());
    }
    split_top_level(filter)
        .into_iter()
        .map(|segment| parse_condition(segment.trim()))
        .collect()
}

fn parse_condition(segment: &str) -> Result<Condition, FilterError> {
    if segment.is_empty() {
        return Err(FilterError::EmptySegment);
    }
    let Some((column, rest)) = segment.split_once('=') else {
        return Err(FilterError::Shape(inspect(&[segment])));
    };
    let (negated, rest) = match rest.strip_prefix("not.") {
        Some(rest) => (true, rest),
        None => (false, rest),
    };
    let Some((op_text, value)) = rest.split_once('.') else {
        return Err(FilterError::Shape(inspect(&[rest])));
    };
    let Some(op) = Op::parse(op_text) else {
        return Err(FilterError::Shape(inspect(&[op_text, value])));
    };
    let values = if op == Op::In {
        let inner = value
            .strip_prefix('(')
            .and_then(|v| v.strip_suffix(')'))
            .ok_or(FilterError::InWithoutParentheses)?;
        split_top_level(inner)
            .into_iter()
            .map(|v| unquote(v.trim()))
            .collect()
    } else {
        vec![unquote(value)]
    };
    if op == Op::Is
        && !matches!(
            values[0].to_ascii_lowercase().as_str(),
            "null" | "true" | "false" | "unknown"
        )
    {
        return Err(FilterError::Shape(inspect(&[op_text, value])));
    }
    Ok(Condition {
        column: column.trim().to_owned(),
        op,
        negated,
        values,
    })
}

/// Splits on commas outside parentheses and double quotes.
fn split_top_level(text: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut quoted, mut escaped, mut start) =
        (Vec::new(), 0i32, false, false, 0);
    for (i, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted => depth -= 1,
            ',' if !quoted && depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

/// Removes PostgREST-style double quotes and their backslash escapes.
fn unquote(value: &str) -> String {
    match value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        Some(inner) => {
            let mut out = String::with_capacity(inner.len());
            let mut chars = inner.chars();
            while let Some(c) = chars.next() {
                out.push(if c == '\\' {
                    chars.next().unwrap_or('\\')
                } else {
                    c
                });
            }
            out
        }
        None => value.to_owned(),
    }
}

impl Condition {
    /// `{"col", "op", "value"}`, as upstream prints filters in error messages.
    pub(crate) fn describe(&self) -> String {
        let value = if self.op == Op::In {
            format!("({})", self.values.join(","))
        } else {
            self.values[0].clone()
        };
        let op = if self.negated {
            format!("not.{}", self.op.name())
        } else {
            self.op.name().to_owned()
        };
        format!("{{{:?}, {:?}, {:?}}}", self.column, op, value)
    }

    /// The literal of a plain (not negated) `eq`, which the candidate index can use.
    pub(crate) fn eq_literal(&self) -> Option<&str> {
        (self.op == Op::Eq && !self.negated).then(|| self.values[0].as_str())
    }

    /// Checks the condition against the table's columns: the database's errors for an
    /// unknown column or a value its type cannot hold.
    pub(crate) fn validate(&self, columns: &[Column]) -> Result<(), String> {
        let Some(column) = columns.iter().find(|c| c.name == self.column) else {
            return Err(format!(
                "ERROR P0001 (raise_exception) invalid column for filter {}",
                self.column
            ));
        };
        if matches!(self.op, Op::Is | Op::Like | Op::Ilike) {
            return Ok(());
        }
        let sql_type = match column.type_name.as_str() {
            "int2" => "smallint",
            "int4" => "integer",
            "int8" => "bigint",
            "float4" => "real",
            "float8" => "double precision",
            "numeric" => "numeric",
            "bool" => "boolean",
            "uuid" => "uuid",
            _ => return Ok(()),
        };
        for value in &self.values {
            let ok = match sql_type {
                "boolean" => bool_value(value).is_some(),
                "uuid" => canonical_uuid(value).is_some(),
                "smallint" | "integer" | "bigint" => value.trim().parse::<i64>().is_ok(),
                _ => value.trim().parse::<f64>().is_ok(),
            };
            if !ok {
                return Err(format!(
                    "ERROR 22P02 (invalid_text_representation) invalid input syntax for type {sql_type}: {value:?}"
                ));
            }
        }
        Ok(())
    }

    /// Spells the values as Postgres prints a uuid, for a column that is a uuid in every
    /// table the binding covers: the row values from the WAL are spelled so, and upstream
    /// compares the two as uuids. Call after [`Condition::validate`], which refuses values
    /// that are no uuid; patterns (`like`, `ilike`) and `is` are left as they are.
    pub(crate) fn spell_as_uuids(&mut self) {
        if matches!(self.op, Op::Is | Op::Like | Op::Ilike) {
            return;
        }
        for value in &mut self.values {
            if let Some(canonical) = canonical_uuid(value) {
                *value = canonical;
            }
        }
    }

    /// Whether `row` passes: the column must be present; NULL only matches `is` and
    /// `isdistinct`, as in SQL.
    pub(crate) fn matches(&self, row: &Map<String, Value>) -> bool {
        let Some(value) = row.get(&self.column) else {
            return false;
        };
        let result = match self.op {
            Op::Is => is(value, &self.values[0]),
            Op::IsDistinct => !equal(value, &self.values[0]).unwrap_or(false),
            _ if value.is_null() => return false,
            Op::Eq => equal(value, &self.values[0]).unwrap_or(false),
            Op::Neq => !equal(value, &self.values[0]).unwrap_or(true),
            Op::In => self.values.iter().any(|v| equal(value, v).unwrap_or(false)),
            Op::Lt => order(value, &self.values[0]).is_some_and(|o| o.is_lt()),
            Op::Lte => order(value, &self.values[0]).is_some_and(|o| o.is_le()),
            Op::Gt => order(value, &self.values[0]).is_some_and(|o| o.is_gt()),
            Op::Gte => order(value, &self.values[0]).is_some_and(|o| o.is_ge()),
            Op::Like => like(&text_of(value), &self.values[0], false),
            Op::Ilike => like(&text_of(value), &self.values[0], true),
        };
        result != self.negated
    }
}

pub(crate) fn bool_value(text: &str) -> Option<bool> {
    match text.trim().to_ascii_lowercase().as_str() {
        "true" | "t" | "yes" | "y" | "on" | "1" => Some(true),
        "false" | "f" | "no" | "n" | "off" | "0" => Some(false),
        _ => None,
    }
}

fn text_of(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Timestamps print with `T` in changes but users filter with a space: compare with the
/// two treated as one character, without allocating.
fn normalised(text: &str) -> impl Iterator<Item = u8> + '_ {
    text.bytes().map(|b| if b == b' ' { b'T' } else { b })
}

/// SQL equality of a row value and a filter literal; `None` when NULL is involved.
fn equal(value: &Value, literal: &str) -> Option<bool> {
    match value {
        Value::Null => None,
        Value::Number(n) => Some(literal.trim().parse::<f64>().ok()? == n.as_f64()?),
        Value::Bool(b) => Some(bool_value(literal)? == *b),
        Value::String(s) => Some(*s == literal || normalised(s).eq(normalised(literal))),
        other => Some(serde_json::from_str::<Value>(literal).is_ok_and(|v| v == *other)),
    }
}

fn order(value: &Value, literal: &str) -> Option<std::cmp::Ordering> {
    match value {
        Value::Number(n) => n
            .as_f64()?
            .partial_cmp(&literal.trim().parse::<f64>().ok()?),
        Value::String(s) => Some(normalised(s).cmp(normalised(literal))),
        Value::Bool(b) => Some(b.cmp(&bool_value(literal)?)),
        _ => None,
    }
}

fn is(value: &Value, literal: &str) -> bool {
    match literal.to_ascii_lowercase().as_str() {
        "null" | "unknown" => value.is_null(),
        "true" => value == &Value::Bool(true),
        "false" => value == &Value::Bool(false),
        _ => false,
    }
}

/// SQL `LIKE`: `%` any run, `_` any one character.
fn like(text: &str, pattern: &str, fold: bool) -> bool {
    let (text, pattern) = if fold {
        (text.to_lowercase(), pattern.to_lowercase())
    } else {
        (text.to_owned(), pattern.to_owned())
    };
    let (t, p): (Vec<char>, Vec<char>) = (text.chars().collect(), pattern.chars().collect());
    // Classic two-pointer glob match with backtracking to the last `%`.
    let (mut ti, mut pi, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '_' || p[pi] == t[ti]) {
            ti += 1;
            pi += 1;
        } else if pi < p.len() && p[pi] == '%' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '%')
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn row(value: Value) -> Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    fn check(filter: &str, value: Value) -> bool {
        let conditions = parse(filter).unwrap();
        conditions.iter().all(|c| c.matches(&row(value.clone())))
    }

    #[test]
    fn parse_errors_match_upstream_details() {
        let detail = |f: &str| parse(f).unwrap_err().to_string();
        assert_eq!(detail("x=foo.1"), r#"["foo", "1"]"#);
        assert_eq!(detail("undefined"), r#"["undefined"]"#);
        assert_eq!(
            detail("id=in.1,2"),
            "`in` filter value must be wrapped by parentheses"
        );
        assert_eq!(
            detail("a=eq.1,,b=eq.2"),
            "filter must not contain empty segments (check for extra commas)"
        );
        assert!(parse("  ").unwrap().is_empty());
    }

    #[test]
    fn core_operators_select_what_postgres_would() {
        let r = json!({"id": 5, "name": "bob", "price": 9.5, "done": false, "gone": null});
        assert!(check("id=eq.5", r.clone()));
        assert!(!check("id=eq.6", r.clone()));
        assert!(check("name=neq.alice", r.clone()));
        assert!(check("price=lt.10", r.clone()) && check("price=lte.9.5", r.clone()));
        assert!(
            check("id=gt.4", r.clone())
                && check("id=gte.5", r.clone())
                && !check("id=gt.5", r.clone())
        );
        assert!(check("id=in.(1,5,7)", r.clone()) && !check("id=in.(1,2)", r.clone()));
        assert!(check("name=in.(\"bob\",alice)", r.clone()));
        assert!(check("done=eq.false", r.clone()));
        assert!(
            !check("gone=eq.1", r.clone()) && !check("gone=neq.1", r.clone()),
            "NULL compares false"
        );
        assert!(
            !check("missing=eq.1", r.clone()),
            "absent columns never match"
        );
    }

    #[test]
    fn extended_operators_negation_and_and() {
        let r = json!({"id": 5, "name": "Bobby", "gone": null, "flag": true});
        assert!(check("name=like.Bo%", r.clone()) && !check("name=like.bo%", r.clone()));
        assert!(check("name=ilike.bo_by", r.clone()));
        assert!(check("gone=is.null", r.clone()) && check("flag=is.true", r.clone()));
        assert!(check("gone=not.is.null", json!({"gone": 1})));
        assert!(check("id=not.in.(1,2)", r.clone()));
        assert!(check("name=isdistinct.bob", r.clone()) && check("gone=isdistinct.x", r.clone()));
        assert!(
            check("id=eq.5,name=eq.Bobby", r.clone()) && !check("id=eq.5,name=eq.x", r.clone())
        );
        assert!(check("name=eq.\"a,b\"", json!({"name": "a,b"})));
    }

    #[test]
    fn validation_reports_unknown_columns_and_bad_literals() {
        let columns = vec![Column {
            name: "id".into(),
            type_name: "int8".into(),
        }];
        let c = &parse("nope=eq.1").unwrap()[0];
        assert_eq!(
            c.validate(&columns).unwrap_err(),
            "ERROR P0001 (raise_exception) invalid column for filter nope"
        );
        let c = &parse("id=eq.abc").unwrap()[0];
        assert!(c
            .validate(&columns)
            .unwrap_err()
            .contains("invalid input syntax for type bigint"));
        assert_eq!(
            parse("id=in.(1,2)").unwrap()[0].describe(),
            r#"{"id", "in", "(1,2)"}"#
        );
    }
}
