//! Answers the engine's authorization questions for private channels, exactly as upstream
//! evaluates the policies users write on `realtime.messages`
//! (`lib/realtime/tenants/authorization.ex`):
//!
//! - **Read.** Probe rows, one per topic and extension asked, are inserted as the owner.
//!   Then, under the question's `role`, `request.jwt.claims`, `request.jwt.claim.sub`,
//!   `request.jwt.claim.role` and `realtime.topic`, they are selected back: the extensions
//!   whose probe comes back may be read. A policy that fails to evaluate denies.
//! - **Write.** One insert per extension under the same settings: `insufficient_privilege`
//!   denies.
//! - **Replay.** The topic's stored private broadcasts since `since`, newest `limit` of
//!   them, read as the owner, returned oldest first.
//!
//! Everything is rolled back. Many questions arriving together (a join storm) are answered
//! in one transaction of two round trips: identical questions (same role, claims, topic
//! and asks) once, one probe row per topic and extension for all of them, and each claims
//! group's statements in a savepoint of its own, so one failing policy spoils nothing else.

use std::collections::HashMap;

use futures_util::future::join_all;
use serde_json::Value;
use switchboard_engine::authz::{
    Asked, AuthzAnswer, AuthzQuery, Permissions, Replay, Stored, XidSnapshot,
};
use switchboard_engine::Input;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row, Statement};
use tracing::{debug, warn};

use super::pool::Answerer;
use super::{catalog, text, transient};

/// The probe rows of a batch, one per topic and extension, inserted as the owner.
const PROBE: &str = "insert into realtime.messages (topic, extension) \
    select * from unnest($1::text[], $2::text[]) returning id::text, topic, extension";

/// The question's role and claims, transaction-local, as upstream's `set_conn_config`.
const SETTINGS: &str = "select set_config('role', $1, true), \
    set_config('realtime.topic', $2, true), \
    set_config('request.jwt.claims', $3, true), \
    set_config('request.jwt.claim.sub', $4, true), \
    set_config('request.jwt.claim.role', $1, true), \
    set_config('statement_timeout', '5s', true)";

/// Which probes the current role may select.
const SELECT: &str = "select extension from realtime.messages where id = any($1::text[]::uuid[])";

/// A write probe under the current role.
const WRITE: &str = "insert into realtime.messages (topic, extension) values ($1, $2)";

/// Upstream's replay query (`Realtime.Messages.replay`: partitions more than a minute in
/// the future are not searched), with the snapshot it ran on: the messages it could see are
/// the replay's to send or leave out, the others follow it live. Always one row at least.
const REPLAY: &str = "select pg_current_snapshot()::text, m.id::text, m.event, m.payload::text \
    from (select 1) as one left join lateral ( \
      select id, event, payload, inserted_at from realtime.messages \
      where topic = $1 and private is true and extension = 'broadcast' \
        and inserted_at >= to_timestamp($2::float8 / 1000)::timestamp \
        and inserted_at < (now() + interval '1 minute')::timestamp \
      order by inserted_at desc limit $3) as m on true \
    order by m.inserted_at desc";

/// Questions answered in one transaction at most.
const BATCH: usize = 256;

/// One connection of the pool, with its prepared statements.
pub(crate) struct Authorizer {
    client: Client,
    begin: Statement,
    probe: Statement,
    savepoint: Statement,
    settings: Statement,
    select: Statement,
    write: Statement,
    back: Statement,
    owner: Statement,
    replay: Statement,
    rollback: Statement,
}

/// One distinct question of a batch.
struct Group<'a> {
    query: &'a AuthzQuery,
    claims: String,
    sub: String,
}

/// What each pipelined statement is, to read its result.
enum Step {
    /// Statements whose result does not matter on its own (begin, savepoints, rollback).
    Plain,
    /// The settings of group `g`: failing, its reads and writes are denied.
    Settings(usize),
    /// The read probes group `g` may select.
    Select(usize),
    /// The write probe of group `g`, for broadcast or presence.
    Write(usize, bool),
    /// The replay of group `g`.
    Replay(usize),
}

/// The parameters of one statement, owned for as long as the pipeline runs.
type Params = Vec<Box<dyn ToSql + Sync + Send>>;

impl Answerer for Authorizer {
    type Question = AuthzQuery;
    const WHAT: &'static str = "authorization";
    const BATCH_MAX: usize = BATCH;

    async fn connect(url: &str) -> Result<Authorizer, tokio_postgres::Error> {
        let client = catalog::connect(url).await?;
        let statements = join_all(
            [
                "begin isolation level read committed",
                PROBE,
                "savepoint switchboard_authz",
                SETTINGS,
                SELECT,
                WRITE,
                "rollback to savepoint switchboard_authz",
                "select set_config('role', 'none', true)",
                REPLAY,
                "rollback",
            ]
            .map(|sql| client.prepare(sql)),
        )
        .await;
        let mut statements = statements.into_iter();
        let mut next = || statements.next().expect("ten statements");
        Ok(Authorizer {
            begin: next()?,
            probe: next()?,
            savepoint: next()?,
            settings: next()?,
            select: next()?,
            write: next()?,
            back: next()?,
            owner: next()?,
            replay: next()?,
            rollback: next()?,
            client,
        })
    }

    fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    async fn answer(&mut self, batch: &[AuthzQuery]) -> Result<Vec<Input>, tokio_postgres::Error> {
        // Identical questions are asked once.
        let mut groups: Vec<Group<'_>> = Vec::new();
        let mut of_query = Vec::with_capacity(batch.len());
        let mut seen: HashMap<(String, String, &str, Asked, Option<Replay>), usize> =
            HashMap::new();
        for query in batch {
            let claims = serde_json::to_string(&*query.claims).expect("a JSON map serialises");
            let key = (
                query.role.clone(),
                claims.clone(),
                &*query.topic,
                query.asked,
                query.replay,
            );
            let index = *seen.entry(key).or_insert_with(|| {
                let sub = query.claims.get("sub").map(text).unwrap_or_default();
                groups.push(Group { query, claims, sub });
                groups.len() - 1
            });
            of_query.push(index);
        }
        // Reads rarely fail: first without a savepoint per group (half the statements),
        // and only if one did, once more with them.
        let answers = match self.answer_groups(&groups, false).await? {
            Some(answers) => answers,
            None => self
                .answer_groups(&groups, true)
                .await?
                .expect("a guarded batch is never spoiled"),
        };
        Ok(batch
            .iter()
            .zip(of_query)
            .map(|(query, group)| Input::Authorized {
                id: query.id,
                answer: answers[group].clone(),
            })
            .collect())
    }

    fn unanswered(query: &AuthzQuery) -> Input {
        Input::Authorized {
            id: query.id,
            answer: None,
        }
    }
}

impl Authorizer {
    /// Adds `step` to `plan` under group `g`'s settings, in a savepoint of its own: its
    /// failure, or its group's, spoils nothing after it, and its role ends with it.
    fn guarded<'s>(
        &'s self,
        plan: &mut Vec<(Step, &'s Statement, Params)>,
        g: usize,
        settings: Params,
        step: (Step, &'s Statement, Params),
    ) {
        plan.push((Step::Plain, &self.savepoint, Vec::new()));
        plan.push((Step::Settings(g), &self.settings, settings));
        plan.push(step);
        plan.push((Step::Plain, &self.back, Vec::new()));
    }

    /// One answer per group (`None` for a group the database could not judge). With
    /// `guard_reads` unset, reads run without savepoints, and a read that fails spoils
    /// the transaction: then `None`, to be asked again with them.
    async fn answer_groups(
        &self,
        groups: &[Group<'_>],
        guard_reads: bool,
    ) -> Result<Option<Vec<Option<AuthzAnswer>>>, tokio_postgres::Error> {
        // First round trip: begin, and the read probes as the owner.
        let mut probes: Vec<(String, &'static str)> = Vec::new();
        for group in groups {
            for (asked, extension) in reads(group.query.asked) {
                let probe = (group.query.topic.to_string(), extension);
                if asked && !probes.contains(&probe) {
                    probes.push(probe);
                }
            }
        }
        let topics: Vec<&str> = probes.iter().map(|(t, _)| t.as_str()).collect();
        let extensions: Vec<&str> = probes.iter().map(|(_, e)| *e).collect();
        let (begun, inserted) = tokio::join!(self.client.execute(&self.begin, &[]), async {
            if probes.is_empty() {
                Ok(Vec::new())
            } else {
                self.client
                    .query(&self.probe, &[&topics, &extensions])
                    .await
            }
        });
        begun?;
        let ids: HashMap<(String, String), String> = match inserted {
            Ok(rows) => rows
                .iter()
                .map(|row| ((row.get(1), row.get(2)), row.get(0)))
                .collect(),
            Err(error) if !transient(&error) => {
                // No realtime schema, or no partition for today: nothing can be judged.
                warn!(%error, "authorization probes could not be inserted");
                self.client.execute(&self.rollback, &[]).await?;
                return Ok(Some(vec![None; groups.len()]));
            }
            Err(error) => return Err(error),
        };

        // Second round trip: every group's reads, writes and replay, then the rollback.
        let mut plan: Vec<(Step, &Statement, Params)> = Vec::new();
        for (g, group) in groups.iter().enumerate() {
            let query = group.query;
            let settings = || -> Params {
                vec![
                    Box::new(query.role.clone()),
                    Box::new(query.topic.to_string()),
                    Box::new(group.claims.clone()),
                    Box::new(group.sub.clone()),
                ]
            };
            let probe_ids: Vec<String> = reads(query.asked)
                .into_iter()
                .filter(|(asked, _)| *asked)
                .filter_map(|(_, ext)| ids.get(&(query.topic.to_string(), ext.to_owned())).cloned())
                .collect();
            if !probe_ids.is_empty() {
                let step = (
                    Step::Select(g),
                    &self.select,
                    vec![Box::new(probe_ids) as _],
                );
                if guard_reads {
                    self.guarded(&mut plan, g, settings(), step);
                } else {
                    // The next group's settings replace this one's role.
                    plan.push((Step::Settings(g), &self.settings, settings()));
                    plan.push(step);
                }
            }
            for (asked, broadcast) in [
                (query.asked.broadcast_write, true),
                (query.asked.presence_write, false),
            ] {
                if asked {
                    let extension = if broadcast { "broadcast" } else { "presence" };
                    let params: Params =
                        vec![Box::new(query.topic.to_string()), Box::new(extension)];
                    let step = (Step::Write(g, broadcast), &self.write, params);
                    self.guarded(&mut plan, g, settings(), step);
                }
            }
            if let Some(replay) = query.replay {
                let params: Params = vec![
                    Box::new(query.topic.to_string()),
                    Box::new(replay.since_ms as f64),
                    Box::new(i64::from(replay.limit)),
                ];
                // As the owner, in a savepoint too: a failure must not abort the rest.
                plan.push((Step::Plain, &self.savepoint, Vec::new()));
                plan.push((Step::Plain, &self.owner, Vec::new()));
                plan.push((Step::Replay(g), &self.replay, params));
                plan.push((Step::Plain, &self.back, Vec::new()));
            }
        }
        plan.push((Step::Plain, &self.rollback, Vec::new()));
        let params: Vec<Vec<&(dyn ToSql + Sync)>> = plan
            .iter()
            .map(|(_, _, params)| params.iter().map(|p| &**p as &(dyn ToSql + Sync)).collect())
            .collect();
        // Every statement is sent before the first answer is read: one round trip.
        let results = join_all(
            plan.iter()
                .zip(&params)
                .map(|((_, statement, _), params)| self.client.query(*statement, params)),
        )
        .await;

        let mut answers: Vec<AuthzAnswer> = groups
            .iter()
            .map(|_| AuthzAnswer {
                permissions: Permissions::default(),
                replayed: None,
                snapshot: None,
            })
            .collect();
        let mut refused = vec![false; groups.len()];
        for ((step, _, _), result) in plan.iter().zip(results) {
            let result = match result {
                Err(error) if transient(&error) => return Err(error),
                result => result,
            };
            if !guard_reads
                && result.is_err()
                && matches!(step, Step::Settings(_) | Step::Select(_))
            {
                // Unguarded, the transaction is spoiled from here on.
                debug!("an unguarded read failed; asking again with savepoints");
                return Ok(None);
            }
            match *step {
                Step::Plain => {
                    result?;
                }
                Step::Settings(g) => {
                    if let Err(error) = result {
                        debug!(role = %groups[g].query.role, %error, "authorization settings refused");
                        refused[g] = true;
                    }
                }
                Step::Select(g) => {
                    let asked = groups[g].query.asked;
                    let readable: Vec<String> = match result {
                        Ok(rows) => rows.iter().map(|row| row.get(0)).collect(),
                        Err(error) => {
                            if !refused[g] {
                                warn!(topic = %groups[g].query.topic, %error, "a read policy failed; denied");
                            }
                            Vec::new()
                        }
                    };
                    let permissions = &mut answers[g].permissions;
                    let can = |extension: &str| readable.iter().any(|e| e == extension);
                    permissions.broadcast_read = asked.broadcast_read.then(|| can("broadcast"));
                    permissions.presence_read = asked.presence_read.then(|| can("presence"));
                }
                Step::Write(g, broadcast) => {
                    let allowed = match result {
                        Ok(_) => true,
                        Err(error) => {
                            if !refused[g]
                                && error.code() != Some(&SqlState::INSUFFICIENT_PRIVILEGE)
                            {
                                warn!(topic = %groups[g].query.topic, %error, "a write policy failed; denied");
                            }
                            false
                        }
                    };
                    let permissions = &mut answers[g].permissions;
                    if broadcast {
                        permissions.broadcast_write = Some(allowed);
                    } else {
                        permissions.presence_write = Some(allowed);
                    }
                }
                Step::Replay(g) => match result {
                    Ok(rows) => {
                        answers[g].snapshot =
                            rows.first().and_then(|row| XidSnapshot::parse(row.get(0)));
                        answers[g].replayed = Some(stored(&rows));
                    }
                    Err(error) => {
                        warn!(topic = %groups[g].query.topic, %error, "replay failed");
                    }
                },
            }
        }
        Ok(Some(
            answers
                .into_iter()
                .zip(groups)
                .map(|(mut answer, group)| {
                    // Replayed messages only for those who may read them.
                    if answer.permissions.broadcast_read != Some(true) {
                        answer.replayed = group.query.replay.map(|_| Vec::new());
                    }
                    Some(answer)
                })
                .collect(),
        ))
    }
}

/// The read asks of a question, as (asked, extension).
fn reads(asked: Asked) -> [(bool, &'static str); 2] {
    [
        (asked.broadcast_read, "broadcast"),
        (asked.presence_read, "presence"),
    ]
}

/// Replayed rows, newest first as selected, turned oldest first (the one row without a
/// message, when there are none, left out).
fn stored(rows: &[Row]) -> Vec<Stored> {
    rows.iter()
        .rev()
        .filter_map(|row| {
            Some(Stored {
                id: row.get::<_, Option<String>>(1)?,
                event: row
                    .get::<_, Option<String>>(2)
                    .map_or(Value::Null, Value::String),
                payload: row
                    .get::<_, Option<String>>(3)
                    .and_then(|p| serde_json::from_str(&p).ok())
                    .unwrap_or(Value::Null),
            })
        })
        .collect()
}
