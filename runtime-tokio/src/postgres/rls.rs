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
//! One transaction answers the questions of one role queued together (the claims groups of
//! a batch), in three round trips in the common case: the settings, the visibility wait and
//! the policies in one pipeline; then, in a second, each question's claims followed by its
//! evaluation per table; then the rollback. A batch seen by a hundred users costs three
//! round trips, not three hundred. A question that fails on its own (a policy that raises
//! for some claims) aborts the shared transaction, so the questions are then answered one
//! transaction each, where such a failure is judged per table.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use serde_json::Value;
use switchboard_engine::changes::{owner_key, RowCheck, Rule, TableRule, Verdict, VisibilityQuery};
use switchboard_engine::Input;
use tokio::time::Instant;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row, Statement};
use tracing::{debug, warn};

use super::pool::Answerer;
use super::{catalog, check, text};

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
    claims: Statement,
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
    /// The column of the table's one policy `col = auth.uid()`: a row passes exactly when
    /// it holds the subscriber's `sub` ([`owner_column`]).
    owner: Option<String>,
}

/// The role and claims of a question, transaction-local as Supabase's helpers read them.
const SETTINGS: &str = "select set_config('role', $1, true), \
    set_config('request.jwt.claims', $2, true), \
    set_config('request.jwt.claim.sub', $3, true), \
    set_config('request.jwt.claim.role', $1, true), \
    set_config('statement_timeout', $4, true)";

/// One question's claims, within a transaction of its role.
const CLAIMS: &str = "select set_config('request.jwt.claims', $1, true), \
    set_config('request.jwt.claim.sub', $2, true)";

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
/// privileges of). A policy without `USING` adds nothing to a `SELECT`. Then its uuid
/// columns and the source of `auth.uid()`, for [`owner_column`].
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
              order by p.polname),
        array(select a.attname::text from pg_catalog.pg_attribute a
              where a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
                and a.atttypid = 'pg_catalog.uuid'::pg_catalog.regtype),
        (select p.prosrc from pg_catalog.pg_proc p where p.oid = to_regprocedure('auth.uid()'))
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
    // Each question is one claims group of a batch; a batch seen by many users queues
    // many at once, and those of one role share a transaction.
    const BATCH_MAX: usize = 64;

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
        let mut answers: Vec<Option<Answer>> = vec![None; batch.len()];
        for members in same_role(batch) {
            let together = match members.len() {
                1 => None,
                _ => self
                    .together(batch, &members)
                    .await
                    .map_err(|Unanswered(e)| e)?,
            };
            match together {
                Some((verdicts, rules)) => {
                    for (&i, verdicts) in members.iter().zip(verdicts) {
                        answers[i] = Some((verdicts, rules.clone()));
                    }
                }
                None => {
                    for &i in &members {
                        let answer = self.verdicts(&batch[i]).await.map_err(|Unanswered(e)| e)?;
                        answers[i] = Some(answer);
                    }
                }
            }
        }
        Ok(batch
            .iter()
            .zip(answers)
            .map(|(query, answer)| {
                let (verdicts, rules) = answer.unzip();
                Input::Visibility {
                    id: query.id,
                    verdicts,
                    rules: rules.unwrap_or_default(),
                }
            })
            .collect())
    }

    fn unanswered(query: &VisibilityQuery) -> Input {
        Input::Visibility {
            id: query.id,
            verdicts: None,
            rules: Vec::new(),
        }
    }
}

impl Checker {
    async fn open(url: &str) -> Result<Checker, tokio_postgres::Error> {
        let client = catalog::connect(url).await?;
        let (settings, claims, wait, policies) = tokio::try_join!(
            client.prepare(SETTINGS),
            client.prepare(CLAIMS),
            client.prepare(WAIT),
            client.prepare(POLICIES)
        )?;
        Ok(Checker {
            client,
            settings,
            claims,
            wait,
            policies,
            prepared: HashMap::new(),
        })
    }

    /// One verdict per check, in order, and the rules of the tables asked about.
    async fn verdicts(&mut self, query: &VisibilityQuery) -> Result<Answer, Unanswered> {
        let tables = tables(&query.checks);
        let xids: Vec<i64> = query.xids.iter().map(|&x| i64::from(x)).collect();
        let names: Vec<(&str, &str)> = tables
            .iter()
            .map(|t| &query.checks[t[0]])
            .map(|check| (check.schema.as_str(), check.table.as_str()))
            .collect();
        let opened = self.begin(query, &xids, &names).await?;
        let outcome = match opened {
            Ok(Some(policies)) => {
                let verdicts = self.judge(query, &tables, &policies).await;
                verdicts.map(|verdicts| (verdicts, rules(&names, Some(&policies))))
            }
            Ok(None) => Ok((
                vec![Verdict::Unauthorized; query.checks.len()],
                rules(&names, None),
            )),
            Err(error) => Err(error),
        };
        // Nothing to keep: rolling back also restores the role and the settings.
        self.client.batch_execute("rollback").await?;
        outcome
    }

    /// Verdicts for `members` of `batch`, questions of one role, in one transaction; `None`
    /// when one of them failed on its own, so each must be answered alone.
    async fn together(
        &mut self,
        batch: &[VisibilityQuery],
        members: &[usize],
    ) -> Result<Option<(Vec<Vec<Verdict>>, Vec<TableRule>)>, Unanswered> {
        let mut xids: Vec<i64> = members
            .iter()
            .flat_map(|&i| batch[i].xids.iter().map(|&x| i64::from(x)))
            .collect();
        xids.sort_unstable();
        xids.dedup();
        // Every table any member asks about, once.
        let mut names: Vec<(&str, &str)> = Vec::new();
        for &i in members {
            for check in &batch[i].checks {
                let name = (check.schema.as_str(), check.table.as_str());
                if !names.contains(&name) {
                    names.push(name);
                }
            }
        }
        // The first member's claims open the transaction; each member sets its own.
        let opened = self.begin(&batch[members[0]], &xids, &names).await?;
        let outcome = match opened {
            Ok(Some(policies)) => {
                let verdicts = self.judge_together(batch, members, &names, &policies).await;
                verdicts.map(|v| v.map(|v| (v, rules(&names, Some(&policies)))))
            }
            Ok(None) => Ok(Some((
                members
                    .iter()
                    .map(|&i| vec![Verdict::Unauthorized; batch[i].checks.len()])
                    .collect(),
                rules(&names, None),
            ))),
            Err(error) => Err(error),
        };
        self.client.batch_execute("rollback").await?;
        outcome
    }

    /// Begins a transaction under `query`'s role and claims, asking in the same pipeline
    /// whether the writing transactions `xids` are visible and what the policies of the
    /// tables `names` are, then waits until they are visible. The outer error is the
    /// `begin`'s: there is no transaction to roll back. Inside, `None` is a role Postgres
    /// refused (it does not exist, say: nothing under it can be read).
    async fn begin(
        &self,
        query: &VisibilityQuery,
        xids: &[i64],
        names: &[(&str, &str)],
    ) -> Result<Result<Option<Vec<Policies>>, Unanswered>, Unanswered> {
        let (claims, sub) = (claims_text(query), sub_of(query));
        let schemas: Vec<&str> = names.iter().map(|n| n.0).collect();
        let tables: Vec<&str> = names.iter().map(|n| n.1).collect();
        let client = &self.client;
        let settings: [&(dyn ToSql + Sync); 4] = [&query.role, &claims, &sub, &STATEMENT_TIMEOUT];
        let wait: [&(dyn ToSql + Sync); 1] = [&xids];
        let tables_of: [&(dyn ToSql + Sync); 2] = [&schemas, &tables];
        // One pipeline: every statement is sent before the first answer is read.
        let (begun, settings, visible, policies) = tokio::join!(
            client.batch_execute("begin isolation level read committed"),
            client.execute(&self.settings, &settings),
            client.query_one(&self.wait, &wait),
            client.query(&self.policies, &tables_of),
        );
        begun?;
        Ok(match settings {
            Err(error) if !transient(&error) => {
                debug!(role = %query.role, %error, "visibility settings refused");
                Ok(None)
            }
            Err(error) => Err(error.into()),
            Ok(_) => {
                async {
                    self.wait_visible(visible?.get(0), xids).await?;
                    Ok(Some(policies?.iter().map(Policies::from_row).collect()))
                }
                .await
            }
        })
    }

    /// The verdicts of [`Checker::together`] once the role is set and the policies read:
    /// each member's claims and then its evaluations, every statement in one pipeline.
    async fn judge_together(
        &mut self,
        batch: &[VisibilityQuery],
        members: &[usize],
        names: &[(&str, &str)],
        policies: &[Policies],
    ) -> Result<Option<Vec<Vec<Verdict>>>, Unanswered> {
        let policy_of = |check: &RowCheck| {
            let at = names
                .iter()
                .position(|&(schema, table)| schema == check.schema && table == check.table)
                .expect("every table of every member was asked about");
            &policies[at]
        };
        // Verdicts the catalog decides alone; the rest wait for their evaluation, which
        // needs its statement prepared before the pipeline.
        let mut verdicts: Vec<Vec<Verdict>> = Vec::with_capacity(members.len());
        // (member's position, the checks' indices, statement, the rows as JSON)
        let mut evaluations: Vec<(usize, Vec<usize>, Statement, String)> = Vec::new();
        let mut claims: Vec<(String, String)> = Vec::with_capacity(members.len());
        for (m, &i) in members.iter().enumerate() {
            let query = &batch[i];
            let sub = claimed_sub(query);
            let mut own = vec![Verdict::Hidden; query.checks.len()];
            for group in tables(&query.checks) {
                let policy = policy_of(&query.checks[group[0]]);
                match policy.decide(&query.checks, &group, sub.as_deref()) {
                    Some(decided) => {
                        for (&c, verdict) in group.iter().zip(decided) {
                            own[c] = verdict;
                        }
                    }
                    None => {
                        let first = &query.checks[group[0]];
                        let statement = self.statement(&first.schema, &first.table, policy).await?;
                        let rows = rows_text(&query.checks, &group);
                        evaluations.push((m, group, statement, rows));
                    }
                }
            }
            verdicts.push(own);
            claims.push((claims_text(query), sub.unwrap_or_default()));
        }
        // In order: member 0's claims, its evaluations, member 1's claims, and so on.
        let (client, set_claims) = (&self.client, &self.claims);
        let mut steps: Vec<Step<'_>> = Vec::new();
        let mut evaluated = evaluations.iter().peekable();
        for (m, (claims, sub)) in claims.iter().enumerate() {
            if evaluated.peek().is_none_or(|e| e.0 != m) {
                // Nothing of this member's needs Postgres.
                continue;
            }
            steps.push(Box::pin(async move {
                let params: [&(dyn ToSql + Sync); 2] = [claims, sub];
                client
                    .execute(set_claims, &params)
                    .await
                    .map(|_| Vec::new())
            }));
            while let Some((_, _, statement, rows)) = evaluated.next_if(|e| e.0 == m) {
                steps.push(Box::pin(async move {
                    let params: [&(dyn ToSql + Sync); 1] = [rows];
                    client.query(statement, &params).await
                }));
            }
        }
        let results = in_order(steps).await;
        let mut answers = Vec::with_capacity(evaluations.len());
        for result in results {
            match result {
                Ok(rows) => answers.push(rows),
                Err(error) if transient(&error) => return Err(error.into()),
                // A policy failed for some member's claims: the transaction is aborted.
                Err(_) => return Ok(None),
            }
        }
        // Each member's claims step (no rows), then its evaluations, in order.
        let mut answers = answers.into_iter();
        for (m, own) in verdicts.iter_mut().enumerate() {
            if !evaluations.iter().any(|e| e.0 == m) {
                continue;
            }
            answers.next().expect("the member's claims step");
            for (_, group, _, _) in evaluations.iter().filter(|e| e.0 == m) {
                let rows = answers.next().expect("one answer per evaluation");
                for n in passed(&rows, group.len()) {
                    own[group[n]] = Verdict::Visible;
                }
            }
        }
        Ok(Some(verdicts))
    }

    /// Waits until the writing transactions are visible to this transaction's snapshots
    /// (`visible` is the first answer), or judges anyway after [`VISIBLE_WAIT`].
    async fn wait_visible(&self, mut visible: bool, xids: &[i64]) -> Result<(), Unanswered> {
        let wait: [&(dyn ToSql + Sync); 1] = [&xids];
        let started = Instant::now();
        while !visible && started.elapsed() < VISIBLE_WAIT {
            tokio::time::sleep(Duration::from_millis(1)).await;
            visible = self.client.query_one(&self.wait, &wait).await?.get(0);
        }
        if !visible {
            warn!(
                ?xids,
                "writing transactions still not visible; judging anyway"
            );
        }
        Ok(())
    }

    /// The prepared evaluation statement for `table` under `policies`.
    async fn statement(
        &mut self,
        schema: &str,
        table: &str,
        policies: &Policies,
    ) -> Result<Statement, tokio_postgres::Error> {
        let sql = evaluation(schema, table, policies);
        if let Some(statement) = self.prepared.get(&sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(&sql).await?;
        if self.prepared.len() >= PREPARED_MAX {
            self.prepared.clear();
        }
        self.prepared.insert(sql, statement.clone());
        Ok(statement)
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
        let sub = claimed_sub(query);
        for (group, policy) in tables.iter().zip(policies) {
            let all = |verdict| group.iter().map(move |&i| (i, verdict));
            let judged: Vec<(usize, Verdict)> =
                if let Some(decided) = policy.decide(&query.checks, group, sub.as_deref()) {
                    group.iter().copied().zip(decided).collect()
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
                            let mut judged: Vec<(usize, Verdict)> =
                                group.iter().map(|&i| (i, Verdict::Hidden)).collect();
                            for n in visible {
                                judged[n].1 = Verdict::Visible;
                            }
                            judged
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
        let statement = self
            .statement(&first.schema, &first.table, policies)
            .await?;
        let rows = rows_text(checks, group);
        let params: [&(dyn ToSql + Sync); 1] = [&rows];
        let answer = self.client.query(&statement, &params).await?;
        Ok(passed(&answer, group.len()).collect())
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

/// A question's verdicts, and the rules of the tables it named under its role.
type Answer = (Vec<Verdict>, Vec<TableRule>);

/// The rule of each table `names` under the role whose `policies` the catalog gave (`None`:
/// the role was refused, nothing is judged without Postgres).
fn rules(names: &[(&str, &str)], policies: Option<&[Policies]>) -> Vec<TableRule> {
    names
        .iter()
        .enumerate()
        .map(|(i, &(schema, table))| TableRule {
            schema: schema.to_owned(),
            table: table.to_owned(),
            rule: policies.and_then(|p| p[i].rule()),
        })
        .collect()
}

/// The question's claims as JSON, for `request.jwt.claims`.
fn claims_text(query: &VisibilityQuery) -> String {
    serde_json::to_string(&*query.claims).expect("a JSON map serialises")
}

/// The question's `sub` claim as text, for `request.jwt.claim.sub`: what `auth.uid()` reads.
fn sub_of(query: &VisibilityQuery) -> String {
    claimed_sub(query).unwrap_or_default()
}

/// The question's `sub` claim as text, `None` when it has none: `auth.uid()` is then null.
fn claimed_sub(query: &VisibilityQuery) -> Option<String> {
    query.claims.get("sub").filter(|v| !v.is_null()).map(text)
}

/// The rows at `group` of `checks` as one JSON array, what an evaluation reads.
fn rows_text(checks: &[RowCheck], group: &[usize]) -> String {
    let rows: Vec<&serde_json::Map<String, Value>> =
        group.iter().map(|&i| &*checks[i].row).collect();
    serde_json::to_string(&rows).expect("rows serialise")
}

/// The positions an evaluation let through, among `rows` rows asked about.
fn passed(answer: &[Row], rows: usize) -> impl Iterator<Item = usize> + '_ {
    answer.iter().filter_map(move |row| {
        usize::try_from(row.get::<_, i64>(0))
            .ok()
            .filter(|&n| n < rows)
    })
}

impl Policies {
    /// One row of [`POLICIES`].
    fn from_row(row: &tokio_postgres::Row) -> Policies {
        let permissive: Vec<String> = row.get(3);
        let restrictive: Vec<String> = row.get(4);
        let uuid_columns: Vec<String> = row.get(5);
        let uid: Option<String> = row.get(6);
        let owner = owner_column(&permissive, &restrictive, &uuid_columns, uid.as_deref());
        Policies {
            exists: row.get(0),
            active: row.get(1),
            readable: row.get(2),
            permissive,
            restrictive,
            owner,
        }
    }

    /// A permissive policy is `using (true)` and none is restrictive: every row passes.
    /// `pg_get_expr` prints the constant as `true`, however the policy spelled it.
    fn everyone(&self) -> bool {
        self.restrictive.is_empty() && self.permissive.iter().any(|e| e == "true")
    }

    /// The verdicts for the rows at `group` of `checks` that need no policy evaluated (the
    /// table is gone or unreadable, RLS does not apply, no permissive policy, a `using
    /// (true)` one, or an owner policy), or `None` when Postgres must evaluate them.
    fn decide(
        &self,
        checks: &[RowCheck],
        group: &[usize],
        sub: Option<&str>,
    ) -> Option<Vec<Verdict>> {
        let all = |verdict| Some(vec![verdict; group.len()]);
        if !self.exists || !self.readable {
            all(Verdict::Unauthorized)
        } else if !self.active {
            all(Verdict::Visible)
        } else if self.permissive.is_empty() {
            // No permissive policy: Postgres lets nothing through.
            all(Verdict::Hidden)
        } else if self.everyone() {
            all(Verdict::Visible)
        } else {
            self.by_owner(checks, group, sub)
        }
    }

    /// The rule the engine may judge this table's rows by for the role, without asking:
    /// `using (true)`, or an owner policy ([`Policies::by_owner`]), where it applies.
    fn rule(&self) -> Option<Rule> {
        let applies = self.exists && self.readable && self.active && !self.permissive.is_empty();
        if !applies {
            return None;
        }
        if self.everyone() {
            return Some(Rule::All);
        }
        let column = self.owner.clone()?;
        Some(Rule::Owner { column })
    }

    /// Verdicts for the rows at `group` of `checks` without asking Postgres, when the
    /// table's policy is `owner = auth.uid()` and `sub` is a uuid as Postgres prints one:
    /// the row passes exactly when its owner column holds `sub`. Most tables in Supabase
    /// projects are guarded so; it spares evaluating every row for every claims group,
    /// which is what bounds a batch seen by many users. Without a `sub`, `auth.uid()` is
    /// null and no row passes.
    fn by_owner(
        &self,
        checks: &[RowCheck],
        group: &[usize],
        sub: Option<&str>,
    ) -> Option<Vec<Verdict>> {
        let rule = self.rule()?;
        let Some(sub) = sub else {
            return Some(vec![Verdict::Hidden; group.len()]);
        };
        let key = owner_key("uuid", sub)?;
        Some(
            group
                .iter()
                .map(|&i| rule.verdict(Some(&checks[i].row), &key))
                .collect(),
        )
    }
}

/// One statement of a pipeline, answering rows (none for a `set_config`).
type Step<'a> = Pin<Box<dyn Future<Output = Result<Vec<Row>, tokio_postgres::Error>> + Send + 'a>>;

/// Runs `steps` to the end, each polled first in the order given, so each sends its
/// statement before the next does: one pipeline on the connection, in that order.
/// (`join_all` polls in order only up to 30 futures.)
async fn in_order<T>(mut steps: Vec<Pin<Box<dyn Future<Output = T> + Send + '_>>>) -> Vec<T> {
    let mut done: Vec<Option<T>> = steps.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (step, done) in steps.iter_mut().zip(done.iter_mut()) {
            if done.is_none() {
                match step.as_mut().poll(cx) {
                    Poll::Ready(answer) => *done = Some(answer),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    done.into_iter()
        .map(|answer| answer.expect("every step completed"))
        .collect()
}

/// `auth.uid()` as Supabase defined it before it also read `request.jwt.claims`; today's
/// body is [`check::auth_uid_body`]. Both are the claim `sub` as a uuid.
const LEGACY_UID: &str = "select nullif(current_setting('request.jwt.claim.sub', true), '')::uuid";

/// SQL without whitespace, in lower case and without a final `;`: how two bodies of a
/// function are compared.
fn squashed(sql: &str) -> String {
    let squashed: String = sql.chars().filter(|c| !c.is_whitespace()).collect();
    squashed.trim_end_matches(';').to_ascii_lowercase()
}

/// The column `col` when a table's policies for a role are exactly one permissive
/// `(col = auth.uid())` (or `(auth.uid() = col)`, as `pg_get_expr` prints them) and no
/// restrictive one, `col` is a plainly named uuid column, and `auth.uid()` is Supabase's.
/// `(select auth.uid())` in its place is the same rule: Supabase's performance advisor
/// tells projects to write it so, and Postgres evaluates it once per statement.
/// Anything else is left to Postgres.
fn owner_column(
    permissive: &[String],
    restrictive: &[String],
    uuid_columns: &[String],
    uid: Option<&str>,
) -> Option<String> {
    let [only] = permissive else {
        return None;
    };
    let source = squashed(uid?);
    let standard = [check::auth_uid_body(), LEGACY_UID]
        .iter()
        .any(|body| squashed(body) == source);
    if !restrictive.is_empty() || !standard {
        return None;
    }
    let (left, right) = only
        .strip_prefix('(')?
        .strip_suffix(')')?
        .split_once(" = ")?;
    let column = match (uid_call(left), uid_call(right)) {
        (false, true) => left,
        (true, false) => right,
        _ => return None,
    };
    (plain(column) && uuid_columns.iter().any(|c| c == column)).then(|| column.to_owned())
}

/// `auth.uid()`, or `(select auth.uid())` as `pg_get_expr` prints it: `( SELECT auth.uid()
/// AS uid)`, under whatever plain alias.
fn uid_call(expr: &str) -> bool {
    expr == "auth.uid()"
        || expr
            .strip_prefix("( SELECT auth.uid() AS ")
            .and_then(|rest| rest.strip_suffix(')'))
            .is_some_and(plain)
}

/// A name `pg_get_expr` prints without quotes.
fn plain(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Indices of `batch` grouped by role, in first-seen order: each group shares a
/// transaction.
fn same_role(batch: &[VisibilityQuery]) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (index, query) in batch.iter().enumerate() {
        match groups.iter_mut().find(|g| batch[g[0]].role == query.role) {
            Some(group) => group.push(index),
            None => groups.push(vec![index]),
        }
    }
    groups
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
    fn only_supabases_owner_policy_is_judged_without_postgres() {
        let uid = "select coalesce(\n    nullif(current_setting('request.jwt.claim.sub', true), ''),\n    \
                   (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')\n  )::uuid\n";
        let uuids = ["owner".to_owned(), "id".to_owned()];
        let one = |expr: &str| vec![expr.to_owned()];
        let owner = |permissive: &[String], restrictive: &[String], uid: Option<&str>| {
            owner_column(permissive, restrictive, &uuids, uid)
        };
        assert_eq!(
            owner(&one("(owner = auth.uid())"), &[], Some(uid)).as_deref(),
            Some("owner")
        );
        assert_eq!(
            owner(&one("(auth.uid() = id)"), &[], Some(uid)).as_deref(),
            Some("id")
        );
        // `(select auth.uid())`, as Supabase's advisor recommends, either side, any alias.
        assert_eq!(
            owner(
                &one("(( SELECT auth.uid() AS uid) = owner)"),
                &[],
                Some(uid)
            )
            .as_deref(),
            Some("owner")
        );
        assert_eq!(
            owner(&one("(owner = ( SELECT auth.uid() AS me))"), &[], Some(uid)).as_deref(),
            Some("owner")
        );
        let old_uid = "select nullif(current_setting('request.jwt.claim.sub', true), '')::uuid;";
        assert!(owner(&one("(owner = auth.uid())"), &[], Some(old_uid)).is_some());
        // A helper of the project's own, a restrictive policy, a second permissive one, a
        // column that is not a uuid, a quoted name, another expression: Postgres decides.
        let custom = "select (current_setting('request.jwt.claims', true)::jsonb ->> 'uid')::uuid";
        assert!(owner(&one("(owner = auth.uid())"), &[], Some(custom)).is_none());
        assert!(owner(&one("(owner = auth.uid())"), &[], None).is_none());
        assert!(owner(&one("(owner = auth.uid())"), &one("(x)"), Some(uid)).is_none());
        let two = ["(owner = auth.uid())".to_owned(), "shared".to_owned()];
        assert!(owner(&two, &[], Some(uid)).is_none());
        for other in [
            "(name = auth.uid())",
            "(\"Owner\" = auth.uid())",
            "((owner = auth.uid()) or true)",
            "(auth.uid() = auth.uid())",
            "(owner = ( SELECT auth.uid() AS uid LIMIT 1))",
            "(owner = ( SELECT auth.uid() AS \"Uid\"))",
            "(owner = ( SELECT auth.jwt() AS jwt))",
            "((owner = auth.uid()) AND (id = auth.uid()))",
        ] {
            assert!(owner(&one(other), &[], Some(uid)).is_none(), "{other}");
        }
    }

    #[test]
    fn owner_verdicts_need_a_sub_postgres_reads_as_a_uuid() {
        let alice = "1111aaaa-1111-1111-1111-111111111111";
        let canonical = |sub| owner_key("uuid", sub);
        assert_eq!(
            canonical("1111AAAA-1111-1111-1111-111111111111").as_deref(),
            Some(alice)
        );
        // Every spelling Postgres's uuid input accepts, as `auth.uid()` casts the `sub`.
        assert_eq!(
            canonical("{1111aaaa111111111111111111111111}").as_deref(),
            Some(alice)
        );
        assert!(canonical("").is_none());
        assert!(canonical("not-a-uuid").is_none());
        let policies = Policies {
            exists: true,
            active: true,
            readable: true,
            permissive: vec!["(owner = auth.uid())".into()],
            restrictive: vec![],
            owner: Some("owner".into()),
        };
        let row = |owner: Value| RowCheck {
            schema: "public".into(),
            table: "notes".into(),
            row: Arc::new(
                json!({"id": 1, "owner": owner})
                    .as_object()
                    .unwrap()
                    .clone(),
            ),
        };
        let checks = [
            row(json!(alice)),
            row(json!("2222bbbb-2222-2222-2222-222222222222")),
            row(Value::Null),
        ];
        assert_eq!(
            policies.by_owner(
                &checks,
                &[0, 1, 2],
                Some("1111AAAA-1111-1111-1111-111111111111")
            ),
            Some(vec![Verdict::Visible, Verdict::Hidden, Verdict::Hidden])
        );
        assert_eq!(policies.by_owner(&checks, &[0], Some("someone")), None);
        assert_eq!(
            policies.by_owner(&checks, &[0, 1], None),
            Some(vec![Verdict::Hidden; 2]),
            "no sub: auth.uid() is null"
        );
        assert_eq!(
            policies.rule(),
            Some(Rule::Owner {
                column: "owner".into()
            })
        );
    }

    #[test]
    fn policies_combine_as_postgres_combines_them() {
        let policies = Policies {
            exists: true,
            active: true,
            readable: true,
            permissive: vec!["a = 1".into(), "b".into()],
            restrictive: vec!["c".into(), "d".into()],
            owner: None,
        };
        let sql = evaluation("public", "we\"ird", &policies);
        assert!(sql.contains("null::\"public\".\"we\"\"ird\""), "{sql}");
        assert!(
            sql.ends_with("where ((a = 1) or (b)) and (c) and (d)"),
            "{sql}"
        );
    }
}
