//! Answers the engine's visibility questions: under a subscriber's role and claims, would
//! the table's Row Level Security policies let it select the rows these changes wrote?
//!
//! The policies are judged against the row values from the WAL, not against the table as
//! it is when the question arrives. Looking the row up in the table raced with the commit
//! (a transaction streamed over replication is not yet visible to new snapshots for a few
//! milliseconds under load, so its rows looked "not visible"), judged a row by a later
//! version of it (an insert deleted or given to another owner since would reach nobody, or
//! the wrong user), and cost an index probe per row. Instead each question reads the
//! policies that apply to the role from `pg_policy` and evaluates them, combined as
//! Postgres combines them (any permissive one, and every restrictive one), over the WAL
//! rows turned back into the table's row type with `jsonb_populate_record`. Policies that
//! read other tables still see the database as it is, as upstream's check does; the answer
//! first waits until the writing transactions are visible to its snapshot, so such a
//! policy sees what they committed.
//!
//! One transaction per question, two round trips in the common case: the settings, the
//! visibility wait and the policies in one pipeline, then one query per table.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;
use switchboard_engine::changes::{RowCheck, Verdict, VisibilityQuery};
use switchboard_engine::Input;
use tokio::time::Instant;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Statement};
use tracing::{debug, warn};

use super::pool::Answerer;
use super::{catalog, text};

/// Longest one visibility statement may run. A stuck query fails its question, which the
/// engine asks again later: it holds back its batch, never drops it.
const STATEMENT_TIMEOUT: &str = "5s";
/// How long an answer waits for the writing transactions to become visible to its
/// snapshot before judging anyway. They normally are within milliseconds of the commit
/// arriving; the rows themselves come from the WAL, so only policies that read other rows
/// of the same transaction could judge differently after this.
const VISIBLE_WAIT: Duration = Duration::from_secs(5);
/// Evaluation statements kept prepared per connection (one per table and set of policies).
const PREPARED_MAX: usize = 256;

/// One connection of the pool, with its prepared statements.
pub(crate) struct Checker {
    client: Client,
    settings: Statement,
    wait: Statement,
    policies: Statement,
    /// Evaluation statements by their text.
    prepared: HashMap<String, Statement>,
}

/// What the catalog says about one table of a question, for the question's role.
struct Policies {
    /// The table still exists.
    exists: bool,
    /// Row Level Security applies to the role (not the owner, no `BYPASSRLS`).
    active: bool,
    /// The role may select the primary key columns.
    readable: bool,
    /// `USING` expressions of the permissive `SELECT` / `ALL` policies for the role.
    permissive: Vec<String>,
    /// Likewise for the restrictive ones.
    restrictive: Vec<String>,
}

/// The role and claims of a question, transaction-local as Supabase's helpers read them.
const SETTINGS: &str = "select set_config('role', $1, true), \
    set_config('request.jwt.claims', $2, true), \
    set_config('request.jwt.claim.sub', $3, true), \
    set_config('request.jwt.claim.role', $1, true), \
    set_config('statement_timeout', $4, true)";

/// Whether every transaction of `$1` (32-bit xids, as pgoutput sends them) is visible to
/// this statement's snapshot. Their epoch is the snapshot's: each committed before it.
const WAIT: &str = "select coalesce(bool_and(pg_visible_in_snapshot(
        (case when b.base + x >= b.xmax and b.base >= 4294967296
              then b.base + x - 4294967296 else b.base + x end)::text::xid8, b.snap)), true)
    from (select snap, xmax, xmax - xmax % 4294967296 as base
          from (select s as snap, pg_snapshot_xmax(s)::text::int8 as xmax
                from pg_current_snapshot() s) a) b,
         unnest($1::int8[]) x";

/// Per table (`$1` schemas, `$2` names): whether it exists, whether RLS applies to the
/// current role, whether it may read the key, and the policies that apply to it for
/// `SELECT`, as `check_role_for_policy` picks them (`PUBLIC`, or a role it has the
/// privileges of). A policy without `USING` adds nothing to a `SELECT`.
const POLICIES: &str = "select c.oid is not null,
        coalesce(row_security_active(c.oid), false),
        coalesce(not exists (
            select 1 from pg_catalog.pg_index i
            join pg_catalog.pg_attribute a on a.attrelid = i.indrelid and a.attnum = any(i.indkey)
            where i.indrelid = c.oid and i.indisprimary
              and not has_column_privilege(c.oid, a.attnum, 'SELECT')), false),
        array(select pg_get_expr(p.polqual, p.polrelid) from pg_catalog.pg_policy p
              where p.polrelid = c.oid and p.polpermissive and p.polcmd in ('r', '*')
                and p.polqual is not null
                and (0 = any(p.polroles) or exists (select 1 from unnest(p.polroles) r
                     where r <> 0 and pg_has_role(current_user, r, 'USAGE')))
              order by p.polname),
        array(select pg_get_expr(p.polqual, p.polrelid) from pg_catalog.pg_policy p
              where p.polrelid = c.oid and not p.polpermissive and p.polcmd in ('r', '*')
                and p.polqual is not null
                and (0 = any(p.polroles) or exists (select 1 from unnest(p.polroles) r
                     where r <> 0 and pg_has_role(current_user, r, 'USAGE')))
              order by p.polname)
    from unnest($1::text[], $2::text[]) with ordinality as t(schema, name, i)
    left join pg_catalog.pg_namespace n on n.nspname = t.schema
    left join pg_catalog.pg_class c on c.relnamespace = n.oid and c.relname = t.name
    order by t.i";

/// Why a question went unanswered. Only failures that may pass (the connection, the
/// database's state) are errors; a failure the question itself causes (a role that does not
/// exist, a policy that raises) is an answer: `Unauthorized`.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
struct Unanswered(#[from] tokio_postgres::Error);

impl Answerer for Checker {
    type Question = VisibilityQuery;
    const WHAT: &'static str = "visibility";
    // One question is one batch and claims group already.
    const BATCH_MAX: usize = 1;

    async fn connect(url: &str) -> Result<Checker, tokio_postgres::Error> {
        Checker::open(url).await
    }

    fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    async fn answer(
        &mut self,
        batch: &[VisibilityQuery],
    ) -> Result<Vec<Input>, tokio_postgres::Error> {
        let mut inputs = Vec::with_capacity(batch.len());
        for query in batch {
            let verdicts = self.verdicts(query).await.map_err(|Unanswered(e)| e)?;
            inputs.push(Input::Visibility {
                id: query.id,
                verdicts: Some(verdicts),
            });
        }
        Ok(inputs)
    }

    fn unanswered(query: &VisibilityQuery) -> Input {
        Input::Visibility {
            id: query.id,
            verdicts: None,
        }
    }
}

impl Checker {
    async fn open(url: &str) -> Result<Checker, tokio_postgres::Error> {
        let client = catalog::connect(url).await?;
        let (settings, wait, policies) = tokio::try_join!(
            client.prepare(SETTINGS),
            client.prepare(WAIT),
            client.prepare(POLICIES)
        )?;
        Ok(Checker {
            client,
            settings,
            wait,
            policies,
            prepared: HashMap::new(),
        })
    }

    /// One verdict per check, in order.
    async fn verdicts(&mut self, query: &VisibilityQuery) -> Result<Vec<Verdict>, Unanswered> {
        let tables = tables(&query.checks);
        let claims = serde_json::to_string(&*query.claims).expect("a JSON map serialises");
        let sub = query.claims.get("sub").map(text).unwrap_or_default();
        let xids: Vec<i64> = query.xids.iter().map(|&x| i64::from(x)).collect();
        let schemas: Vec<&str> = tables
            .iter()
            .map(|t| query.checks[t[0]].schema.as_str())
            .collect();
        let names: Vec<&str> = tables
            .iter()
            .map(|t| query.checks[t[0]].table.as_str())
            .collect();
        let client = &self.client;
        let settings: [&(dyn ToSql + Sync); 4] = [&query.role, &claims, &sub, &STATEMENT_TIMEOUT];
        let wait: [&(dyn ToSql + Sync); 1] = [&xids];
        let tables_of: [&(dyn ToSql + Sync); 2] = [&schemas, &names];
        // One pipeline: every statement is sent before the first answer is read.
        let (begun, settings, visible, policies) = tokio::join!(
            client.batch_execute("begin isolation level read committed"),
            client.execute(&self.settings, &settings),
            client.query_one(&self.wait, &wait),
            client.query(&self.policies, &tables_of),
        );
        begun?;
        let outcome = match settings {
            Err(error) if !transient(&error) => {
                // The role does not exist, say: nothing under it can be read.
                debug!(role = %query.role, %error, "visibility settings refused");
                Ok(vec![Verdict::Unauthorized; query.checks.len()])
            }
            Err(error) => Err(error.into()),
            Ok(_) => {
                let mut visible: bool = visible?.get(0);
                let started = Instant::now();
                while !visible && started.elapsed() < VISIBLE_WAIT {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    visible = client.query_one(&self.wait, &wait).await?.get(0);
                }
                if !visible {
                    warn!(xids = ?query.xids, "writing transactions still not visible; judging anyway");
                }
                let policies: Vec<Policies> = policies?
                    .iter()
                    .map(|row| Policies {
                        exists: row.get(0),
                        active: row.get(1),
                        readable: row.get(2),
                        permissive: row.get(3),
                        restrictive: row.get(4),
                    })
                    .collect();
                self.judge(query, &tables, &policies).await
            }
        };
        // Nothing to keep: rolling back also restores the role and the settings.
        self.client.batch_execute("rollback").await?;
        outcome
    }

    /// Verdicts for every table of the question, given what the catalog says of each.
    async fn judge(
        &mut self,
        query: &VisibilityQuery,
        tables: &[Vec<usize>],
        policies: &[Policies],
    ) -> Result<Vec<Verdict>, Unanswered> {
        let mut verdicts = vec![Verdict::Hidden; query.checks.len()];
        let several = tables.len() > 1;
        for (group, policy) in tables.iter().zip(policies) {
            let all = |verdict| group.iter().map(move |&i| (i, verdict));
            let judged: Vec<(usize, Verdict)> = if !policy.exists || !policy.readable {
                all(Verdict::Unauthorized).collect()
            } else if !policy.active {
                all(Verdict::Visible).collect()
            } else if policy.permissive.is_empty() {
                // No permissive policy: Postgres lets nothing through.
                all(Verdict::Hidden).collect()
            } else {
                // A failed statement aborts the transaction: a savepoint keeps the tables
                // after it answerable.
                if several {
                    self.client.batch_execute("savepoint visibility").await?;
                }
                match self.evaluate(&query.checks, group, policy).await {
                    Ok(visible) => {
                        if several {
                            self.client
                                .batch_execute("release savepoint visibility")
                                .await?;
                        }
                        group
                            .iter()
                            .enumerate()
                            .map(|(n, &i)| {
                                let verdict = if visible.contains(&n) {
                                    Verdict::Visible
                                } else {
                                    Verdict::Hidden
                                };
                                (i, verdict)
                            })
                            .collect()
                    }
                    Err(error) if !transient(&error) => {
                        // A policy that cannot be evaluated for this role (it raises, or
                        // reads a table the role may not): the subscriber learns a change
                        // happened, without its data, rather than nothing.
                        warn!(
                            role = %query.role,
                            table = %query.checks[group[0]].table,
                            %error,
                            "a policy failed for this role; delivering as unauthorized"
                        );
                        if several {
                            self.client
                                .batch_execute("rollback to savepoint visibility")
                                .await?;
                        }
                        all(Verdict::Unauthorized).collect()
                    }
                    Err(error) => return Err(error.into()),
                }
            };
            for (index, verdict) in judged {
                verdicts[index] = verdict;
            }
        }
        Ok(verdicts)
    }

    /// Positions in `group` of the rows the policies let through.
    async fn evaluate(
        &mut self,
        checks: &[RowCheck],
        group: &[usize],
        policies: &Policies,
    ) -> Result<Vec<usize>, tokio_postgres::Error> {
        let first = &checks[group[0]];
        let sql = evaluation(&first.schema, &first.table, policies);
        let statement = match self.prepared.get(&sql) {
            Some(statement) => statement.clone(),
            None => {
                let statement = self.client.prepare(&sql).await?;
                if self.prepared.len() >= PREPARED_MAX {
                    self.prepared.clear();
                }
                self.prepared.insert(sql, statement.clone());
                statement
            }
        };
        let rows: Vec<&serde_json::Map<String, Value>> =
            group.iter().map(|&i| &*checks[i].row).collect();
        let rows = serde_json::to_string(&rows).expect("rows serialise");
        let params: [&(dyn ToSql + Sync); 1] = [&rows];
        let answer = self.client.query(&statement, &params).await?;
        Ok(answer
            .iter()
            .filter_map(|row| usize::try_from(row.get::<_, i64>(0)).ok())
            .collect())
    }
}

/// The evaluation query for one table: the rows of `$1` (JSON array text) as the table's row
/// type, under the table's own name so policies that name it resolve, filtered by the
/// policies; it returns the zero-based positions of the rows that pass.
fn evaluation(schema: &str, table: &str, policies: &Policies) -> String {
    let permissive: Vec<String> = policies
        .permissive
        .iter()
        .map(|e| format!("({e})"))
        .collect();
    let mut condition = format!("({})", permissive.join(" or "));
    for restrictive in &policies.restrictive {
        condition.push_str(&format!(" and ({restrictive})"));
    }
    format!(
        "select (__switchboard_checks.__switchboard_index - 1)::int8 \
         from jsonb_array_elements($1::text::jsonb) with ordinality \
             as __switchboard_checks(__switchboard_row, __switchboard_index) \
         cross join lateral jsonb_populate_record(null::{schema}.{table}, \
             __switchboard_checks.__switchboard_row) as {alias} \
         where {condition}",
        schema = ident(schema),
        table = ident(table),
        alias = ident(table),
    )
}

/// Whether a failure may pass if the question is asked again: the connection or the
/// database failed ([`super::transient`]), a lock was not available, or the statement was
/// behind a failed one in a pipeline (the first failure decides). Anything else is about
/// the question (a missing role, a policy that raises or reads what the role may not) and
/// would fail the same way again.
fn transient(error: &tokio_postgres::Error) -> bool {
    super::transient(error)
        || error.code().is_some_and(|code| {
            code.code().starts_with("40")
                || *code == SqlState::LOCK_NOT_AVAILABLE
                || *code == SqlState::IN_FAILED_SQL_TRANSACTION
        })
}

/// Indices of the checks grouped by table, in first-seen order.
fn tables(checks: &[RowCheck]) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (index, check) in checks.iter().enumerate() {
        let same = |other: &RowCheck| other.schema == check.schema && other.table == check.table;
        match groups.iter_mut().find(|g| same(&checks[g[0]])) {
            Some(group) => group.push(index),
            None => groups.push(vec![index]),
        }
    }
    groups
}

/// A quoted identifier: names come from the catalog, but quoting keeps odd ones intact.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::Arc;

    fn check(table: &str) -> RowCheck {
        RowCheck {
            schema: "public".into(),
            table: table.into(),
            row: Arc::new(json!({"id": 1}).as_object().unwrap().clone()),
        }
    }

    #[test]
    fn checks_group_by_table_in_first_seen_order() {
        let checks = [check("b"), check("a"), check("b")];
        assert_eq!(tables(&checks), vec![vec![0, 2], vec![1]]);
    }

    #[test]
    fn policies_combine_as_postgres_combines_them() {
        let policies = Policies {
            exists: true,
            active: true,
            readable: true,
            permissive: vec!["a = 1".into(), "b".into()],
            restrictive: vec!["c".into(), "d".into()],
        };
        let sql = evaluation("public", "we\"ird", &policies);
        assert!(sql.contains("null::\"public\".\"we\"\"ird\""), "{sql}");
        assert!(
            sql.ends_with("where ((a = 1) or (b)) and (c) and (d)"),
            "{sql}"
        );
    }
}
