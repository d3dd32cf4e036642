//! Answers the engine's visibility questions: under a subscriber's role and claims, which of
//! these rows may it select? One transaction per question and one query per table, so a
//! batch costs the database a handful of index lookups, not one round trip per row.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use serde_json::Value;
use switchboard_engine::changes::{RowCheck, Verdict, VisibilityQuery};
use switchboard_engine::Input;
use tokio::sync::{mpsc, Mutex};
use tokio::time::Instant;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Transaction};
use tracing::{debug, warn};

use super::{catalog, Backoff, Sink};

/// Longest one visibility statement may run: a stuck query holds back its batch, and with it
/// every later change, only briefly; its rows then count as not visible.
const STATEMENT_TIMEOUT: &str = "5s";
/// Bound on the whole transaction, for a connection that stops answering altogether.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs one worker of the pool: takes the next question from the shared queue, answers it
/// on this worker's own connection, and reconnects after the connection fails.
pub(crate) async fn worker(
    url: Arc<str>,
    queue: Arc<Mutex<mpsc::UnboundedReceiver<VisibilityQuery>>>,
    sink: Sink,
    queries: Counter,
) {
    let mut client: Option<Client> = None;
    let mut backoff = Backoff::new();
    // While the database is unreachable, questions are answered at once rather than each
    // waiting for a connect attempt.
    let mut retry_at = Instant::now();
    loop {
        let Some(query) = queue.lock().await.recv().await else {
            return;
        };
        if client.as_ref().is_none_or(Client::is_closed) && Instant::now() >= retry_at {
            match catalog::connect(&url).await {
                Ok(connected) => {
                    client = Some(connected);
                    backoff = Backoff::new();
                }
                Err(error) => {
                    warn!(%error, "visibility connection failed");
                    client = None;
                    retry_at = Instant::now() + backoff.next_delay();
                }
            }
        }
        let verdicts = match client.as_mut() {
            Some(connection) if !connection.is_closed() => {
                queries.inc();
                match tokio::time::timeout(ANSWER_TIMEOUT, answer(connection, &query)).await {
                    Ok(Ok(verdicts)) => Some(verdicts),
                    Ok(Err(error)) => {
                        warn!(%error, id = query.id, "visibility query failed");
                        None
                    }
                    Err(_) => {
                        // The connection is mid-query: start the next question on a new one.
                        warn!(id = query.id, "visibility query timed out");
                        client = None;
                        None
                    }
                }
            }
            _ => None,
        };
        sink(Input::Visibility {
            id: query.id,
            verdicts,
        });
    }
}

/// One verdict per check, in order. A table the role may not read answers `Unauthorized`
/// for its checks; any other failure fails the whole question.
async fn answer(
    client: &mut Client,
    query: &VisibilityQuery,
) -> Result<Vec<Verdict>, tokio_postgres::Error> {
    let mut transaction = client.transaction().await?;
    let claims = serde_json::to_string(&*query.claims).expect("a JSON map serialises");
    let sub = query.claims.get("sub").map(text).unwrap_or_default();
    transaction
        .execute(
            "select set_config('role', $1, true), set_config('request.jwt.claims', $2, true),
                set_config('request.jwt.claim.sub', $3, true),
                set_config('request.jwt.claim.role', $1, true),
                set_config('statement_timeout', $4, true)",
            &[&query.role, &claims, &sub, &STATEMENT_TIMEOUT],
        )
        .await?;
    let mut verdicts = vec![Verdict::Hidden; query.checks.len()];
    let groups = tables(&query.checks);
    for (n, group) in groups.iter().enumerate() {
        // A failed statement aborts the transaction: a savepoint keeps the tables after it
        // answerable, and the last table needs none.
        let last = n + 1 == groups.len();
        let outcome = if last {
            visible(&transaction, &query.checks, group).await
        } else {
            let savepoint = transaction.savepoint("visibility").await?;
            let outcome = visible(&savepoint, &query.checks, group).await;
            match &outcome {
                Ok(_) => savepoint.commit().await?,
                Err(error) if unauthorized(error) => savepoint.rollback().await?,
                Err(_) => {}
            }
            outcome
        };
        match outcome {
            Ok(visible) => {
                for index in visible {
                    verdicts[index] = Verdict::Visible;
                }
            }
            Err(error) if unauthorized(&error) => {
                debug!(role = %query.role, %error, "table not readable");
                for &index in group {
                    verdicts[index] = Verdict::Unauthorized;
                }
            }
            Err(error) => return Err(error),
        }
    }
    // Nothing to keep: rolling back also restores the role and the settings.
    transaction.rollback().await?;
    Ok(verdicts)
}

/// The role lacks `SELECT` on the table or its key columns.
fn unauthorized(error: &tokio_postgres::Error) -> bool {
    error.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE)
}

/// Indices of the checks, grouped by table and key columns, in first-seen order.
fn tables(checks: &[RowCheck]) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (index, check) in checks.iter().enumerate() {
        let same = |other: &RowCheck| {
            other.schema == check.schema
                && other.table == check.table
                && other.key.len() == check.key.len()
                && other
                    .key
                    .iter()
                    .zip(&check.key)
                    .all(|(a, b)| a.0 == b.0 && a.1 == b.1)
        };
        match groups.iter_mut().find(|g| same(&checks[g[0]])) {
            Some(group) => group.push(index),
            None => groups.push(vec![index]),
        }
    }
    groups
}

/// Which checks of `group` (one table) name a row the current role can select: the keys go
/// in as text arrays, one per key column, and come back as the indices that matched.
async fn visible(
    transaction: &Transaction<'_>,
    checks: &[RowCheck],
    group: &[usize],
) -> Result<Vec<usize>, tokio_postgres::Error> {
    let first = &checks[group[0]];
    let columns = &first.key;
    if columns.is_empty() {
        return Ok(Vec::new());
    }
    let mut arrays: Vec<Vec<Option<String>>> = vec![Vec::with_capacity(group.len()); columns.len()];
    for &index in group {
        for (array, (_, _, value)) in arrays.iter_mut().zip(&checks[index].key) {
            array.push(match value {
                Value::Null => None,
                value => Some(text(value)),
            });
        }
    }
    let positions: Vec<i64> = (0..group.len() as i64).collect();
    let unnest: Vec<String> = (1..=columns.len())
        .map(|n| format!("${}::text[]", n + 1))
        .collect();
    let names: Vec<String> = (0..columns.len()).map(|n| format!("k{n}")).collect();
    let conditions: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(n, (column, type_name, _))| {
            format!("r.{} = k.k{n}::{}", ident(column), ident(type_name))
        })
        .collect();
    let sql = format!(
        "select k.i from unnest($1::int8[], {}) as k(i, {}) \
         where exists (select 1 from {}.{} r where {})",
        unnest.join(", "),
        names.join(", "),
        ident(&first.schema),
        ident(&first.table),
        conditions.join(" and "),
    );
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&positions];
    params.extend(arrays.iter().map(|a| a as &(dyn ToSql + Sync)));
    let rows = transaction.query(&sql, &params).await?;
    Ok(rows
        .iter()
        .filter_map(|row| usize::try_from(row.get::<_, i64>(0)).ok())
        .filter_map(|position| group.get(position).copied())
        .collect())
}

/// A JSON key value as Postgres input text: strings bare, arrays as array literals.
fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Array(elements) => {
            let elements: Vec<String> = elements
                .iter()
                .map(|e| match e {
                    Value::Null => "NULL".to_owned(),
                    e => format!("\"{}\"", text(e).replace('\\', "\\\\").replace('"', "\\\"")),
                })
                .collect();
            format!("{{{}}}", elements.join(","))
        }
        other => other.to_string(),
    }
}

/// A quoted identifier: names come from the catalog, but quoting keeps odd ones intact.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(table: &str, key: &[(&str, &str)]) -> RowCheck {
        RowCheck {
            schema: "public".into(),
            table: table.into(),
            key: key
                .iter()
                .map(|(c, t)| (c.to_string(), t.to_string(), json!(1)))
                .collect(),
        }
    }

    #[test]
    fn checks_group_by_table_in_first_seen_order() {
        let checks = [
            check("b", &[("id", "int8")]),
            check("a", &[("id", "int8")]),
            check("b", &[("id", "int8")]),
        ];
        assert_eq!(tables(&checks), vec![vec![0, 2], vec![1]]);
    }

    #[test]
    fn key_values_become_postgres_input_text() {
        assert_eq!(text(&json!("a b")), "a b");
        assert_eq!(text(&json!(12)), "12");
        assert_eq!(text(&json!(true)), "true");
        assert_eq!(text(&json!([1, null, "x\"y"])), r#"{"1",NULL,"x\"y"}"#);
        assert_eq!(ident("we\"ird"), r#""we""ird""#);
    }
}
