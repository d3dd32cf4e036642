//! Visibility questions answered by a real PostgreSQL under Row Level Security policies that
//! read the claims through `auth.uid()`, as Supabase projects write them. The policies are
//! judged against the rows the changes wrote, combined as Postgres combines them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use switchboard_engine::changes::{QueryId, RowCheck, Rule, TableRule, Verdict, VisibilityQuery};
use switchboard_engine::{Input, Output, ShardId};
use switchboard_tokio::postgres::PostgresConfig;

use crate::pg::TempPostgres;
use crate::wal::Engine;

const ALICE: &str = "11111111-1111-1111-1111-111111111111";
const BOB: &str = "22222222-2222-2222-2222-222222222222";

fn check(table: &str, row: Value) -> RowCheck {
    RowCheck {
        schema: "public".into(),
        table: table.into(),
        row: Arc::new(row.as_object().expect("an object").clone()),
    }
}

fn query(n: u64, role: &str, sub: &str, checks: Vec<RowCheck>, xids: Vec<u32>) -> VisibilityQuery {
    let claims = json!({"role": role, "sub": sub});
    VisibilityQuery {
        id: QueryId {
            shard: ShardId(0),
            n,
        },
        role: role.into(),
        claims: Arc::new(claims.as_object().expect("an object").clone()),
        checks,
        xids,
    }
}

/// A question of `role` carrying exactly `claims`, about `checks`.
fn claimed(n: u64, role: &str, claims: Value, checks: Vec<RowCheck>) -> VisibilityQuery {
    VisibilityQuery {
        claims: Arc::new(claims.as_object().expect("an object").clone()),
        ..query(n, role, "", checks, vec![])
    }
}

/// The rules an answer reports when it asked about `public.<table>` alone.
fn ruled(table: &str, rule: Option<Rule>) -> Vec<TableRule> {
    vec![TableRule {
        schema: "public".into(),
        table: table.into(),
        rule,
    }]
}

async fn ask(engine: &mut Engine, question: VisibilityQuery) -> Option<Vec<Verdict>> {
    answer(engine, question).await.0
}

/// The verdicts, and the rules the answer found for the tables asked about.
async fn answer(
    engine: &mut Engine,
    question: VisibilityQuery,
) -> (Option<Vec<Verdict>>, Vec<TableRule>) {
    let asked = question.id;
    engine.send(Output::Visibility(question));
    loop {
        if let Input::Visibility {
            id,
            verdicts,
            rules,
        } = engine.next().await
        {
            assert_eq!(id, asked);
            return (verdicts, rules);
        }
    }
}

const SCHEMA: &str = "
create table public.notes (id int8 primary key, owner uuid, body text, shared bool,
    tags text[], n numeric);
alter table public.notes enable row level security;
create policy own on public.notes for select to authenticated using (owner = auth.uid());
create policy shared on public.notes for select using (shared and 'pub' = any(tags));
create policy not_blocked on public.notes as restrictive for select using (body <> 'blocked');
create policy writers on public.notes for insert to authenticated with check (true);
create table public.pairs (a int4, b text, primary key (a, b));
alter table public.pairs enable row level security;
create policy everyone on public.pairs for select using (true);
create table public.secret (id int8 primary key);
revoke all on public.secret from anon, authenticated;
create table public.open (id int8 primary key);
create table public.closed (id int8 primary key);
alter table public.closed enable row level security;
create table public.broken (id int8 primary key);
alter table public.broken enable row level security;
create policy divide on public.broken for select using (1 / (id - id) = 1);
create table public.members (room text, member uuid);
create table public.messages (id int8 primary key, room text);
alter table public.messages enable row level security;
create policy members_read on public.messages for select to authenticated using (
    exists (select 1 from public.members m where m.room = messages.room and m.member = auth.uid()));
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_decide_what_each_subscriber_sees_from_the_rows_written() {
    let pg = TempPostgres::start();
    pg.psql(SCHEMA);
    let config = PostgresConfig::new(pg.url());
    let counted = config.visibility_queries.clone();
    let mut engine = Engine::start(config);
    // The table is empty: every verdict comes from the rows the changes wrote.
    let note = |id: i64, owner: &str, body: &str, shared: bool, tags: Value| {
        check(
            "notes",
            json!({"id": id, "owner": owner, "body": body, "shared": shared, "tags": tags, "n": 1.5}),
        )
    };
    use Verdict::{Hidden, Unauthorized, Visible};
    let alice = query(
        1,
        "authenticated",
        ALICE,
        vec![
            note(1, ALICE, "a", false, json!([])),
            note(2, BOB, "b", false, json!([])),
            // Another's row, but shared: the permissive policies are or-ed.
            note(3, BOB, "c", true, json!(["pub", "x"])),
            // Her own, but the restrictive policy vetoes it.
            note(4, ALICE, "blocked", false, json!([])),
            check("secret", json!({"id": 1})),
            check("pairs", json!({"a": 1, "b": "x y"})),
            check("open", json!({"id": 1})),
            check("closed", json!({"id": 1})),
        ],
        vec![],
    );
    assert_eq!(
        ask(&mut engine, alice).await,
        Some(vec![
            Visible,
            Hidden,
            Visible,
            Hidden,
            Unauthorized,
            Visible,
            Visible,
            Hidden
        ])
    );
    let bob = query(
        2,
        "authenticated",
        BOB,
        vec![
            note(1, ALICE, "a", false, json!([])),
            note(2, BOB, "b", false, json!([])),
        ],
        vec![],
    );
    assert_eq!(ask(&mut engine, bob).await, Some(vec![Hidden, Visible]));
    // Only the shared policy applies to anon.
    let anon = query(
        3,
        "anon",
        "",
        vec![
            note(1, ALICE, "a", false, json!([])),
            note(3, BOB, "c", true, json!(["pub"])),
        ],
        vec![],
    );
    assert_eq!(ask(&mut engine, anon).await, Some(vec![Hidden, Visible]));
    // BYPASSRLS sees everything it may select.
    let service = query(
        4,
        "service_role",
        "",
        vec![
            note(4, ALICE, "blocked", false, json!([])),
            check("closed", json!({"id": 1})),
        ],
        vec![],
    );
    assert_eq!(
        ask(&mut engine, service).await,
        Some(vec![Visible, Visible])
    );
    // A role that does not exist, and a policy that raises: the subscriber is told it may
    // not see the change, the question is answered, and the other table's verdict stands.
    let nobody = query(
        5,
        "nobody",
        ALICE,
        vec![note(1, ALICE, "a", false, json!([]))],
        vec![],
    );
    assert_eq!(ask(&mut engine, nobody).await, Some(vec![Unauthorized]));
    let broken = query(
        6,
        "authenticated",
        ALICE,
        vec![
            check("broken", json!({"id": 1})),
            note(1, ALICE, "a", false, json!([])),
        ],
        vec![],
    );
    assert_eq!(
        ask(&mut engine, broken).await,
        Some(vec![Unauthorized, Visible])
    );
    assert_eq!(counted.get(), 6);
}

/// Begins a transaction on `writer` that puts Alice in the lobby and leaves it open;
/// returns its xid as pgoutput sends it (32 bits).
async fn alice_joins_the_lobby_uncommitted(writer: &tokio_postgres::Client) -> u32 {
    writer.batch_execute("begin").await.expect("begin");
    writer
        .execute(
            &format!("insert into public.members values ('lobby', '{ALICE}')"),
            &[],
        )
        .await
        .expect("joining the room");
    let xid: String = writer
        .query_one("select pg_current_xact_id()::text", &[])
        .await
        .expect("the xid")
        .get(0);
    (xid.parse::<u64>().expect("a number") & 0xffff_ffff) as u32
}

/// A policy that reads another table judges what the writing transaction committed there:
/// the answer waits until that transaction is visible to the checker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_answer_waits_for_the_writing_transaction() {
    let pg = TempPostgres::start();
    pg.psql(SCHEMA);
    let mut engine = Engine::start(PostgresConfig::new(pg.url()));
    let writer = pg.client().await;
    let xid = alice_joins_the_lobby_uncommitted(&writer).await;
    let committer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        writer.batch_execute("commit").await.expect("commit");
        (writer, Instant::now())
    });
    let message = check("messages", json!({"id": 1, "room": "lobby"}));
    let answer = ask(
        &mut engine,
        query(1, "authenticated", ALICE, vec![message], vec![xid]),
    )
    .await;
    let answered = Instant::now();
    let (_writer, committed) = committer.await.expect("committing");
    assert_eq!(answer, Some(vec![Verdict::Visible]));
    assert!(
        answered >= committed,
        "answered before the commit was visible"
    );
}

/// Questions queued together share a transaction per role, each judged under its own
/// claims, and get the verdicts each gets alone. One whose policy fails for its claims sends
/// the others of its role back to a transaction each, with the same verdicts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn questions_queued_together_get_the_verdicts_each_gets_alone() {
    use Verdict::{Hidden, Unauthorized, Visible};
    let pg = TempPostgres::start();
    pg.psql(SCHEMA);
    let mut config = PostgresConfig::new(pg.url());
    config.visibility_connections = 1;
    let counted = config.visibility_queries.clone();
    let mut engine = Engine::start(config);
    let notes = || {
        let note = |id: i64, owner: &str, shared: bool| {
            check(
                "notes",
                json!({"id": id, "owner": owner, "body": "x", "shared": shared, "tags": ["pub"], "n": 1}),
            )
        };
        vec![
            note(1, ALICE, false),
            note(2, BOB, false),
            note(3, BOB, true),
        ]
    };
    let writer = pg.client().await;
    let mut n = 0;
    for failing in [false, true] {
        // Hold the one connection on a question that waits for an open transaction, so
        // the others queue behind it and are taken together.
        let xid = alice_joins_the_lobby_uncommitted(&writer).await;
        let message = check("messages", json!({"id": 1, "room": "lobby"}));
        n += 1;
        let mut expected = vec![(n, vec![Visible])];
        engine.send(Output::Visibility(query(
            n,
            "authenticated",
            ALICE,
            vec![message],
            vec![xid],
        )));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut asked = vec![
            (
                query(0, "authenticated", ALICE, notes(), vec![]),
                vec![Visible, Hidden, Visible],
            ),
            (
                query(0, "anon", "", notes(), vec![]),
                vec![Hidden, Hidden, Visible],
            ),
            (
                query(0, "authenticated", BOB, notes(), vec![]),
                vec![Hidden, Visible, Visible],
            ),
            (
                query(0, "nobody", ALICE, notes(), vec![]),
                vec![Unauthorized; 3],
            ),
            (
                query(0, "service_role", "", notes(), vec![]),
                vec![Visible; 3],
            ),
        ];
        if failing {
            let broken = vec![check("broken", json!({"id": 1})), notes().remove(0)];
            let query = query(0, "authenticated", ALICE, broken, vec![]);
            asked.push((query, vec![Unauthorized, Visible]));
        }
        for (mut question, verdicts) in asked {
            n += 1;
            question.id.n = n;
            expected.push((n, verdicts));
            engine.send(Output::Visibility(question));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        writer.batch_execute("commit").await.expect("commit");
        let mut answered = Vec::new();
        while answered.len() < expected.len() {
            if let Input::Visibility { id, verdicts, .. } = engine.next().await {
                answered.push((id.n, verdicts.expect("answered")));
            }
        }
        answered.sort_by_key(|(n, _)| *n);
        assert_eq!(answered, expected, "failing policy: {failing}");
    }
    // Per round: the question held, then every other one in one batch.
    assert_eq!(counted.get(), 4);
}

/// A table guarded by Supabase's usual `owner = auth.uid()` (or `(select auth.uid())`) is
/// judged from the row's owner and the claims' `sub`, as Postgres would judge it; a `sub`
/// that is no uuid, or an `auth.uid()` of the project's own, is still left to Postgres.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_policies_get_the_verdicts_postgres_gives() {
    use Verdict::{Hidden, Unauthorized, Visible};
    let pg = TempPostgres::start();
    pg.psql(
        "create table public.owned (id int8 primary key, owner uuid, body text);
         alter table public.owned enable row level security;
         create policy mine on public.owned for select to authenticated using (owner = auth.uid());
         grant select on public.owned to anon, authenticated;",
    );
    let mut engine = Engine::start(PostgresConfig::new(pg.url()));
    let rows = || {
        vec![
            check("owned", json!({"id": 1, "owner": ALICE, "body": "a"})),
            check("owned", json!({"id": 2, "owner": BOB, "body": "b"})),
            check("owned", json!({"id": 3, "owner": null, "body": "c"})),
        ]
    };
    let mut n = 0;
    let mut ask_as = |role: &str, claims: Value| {
        n += 1;
        claimed(n, role, claims, rows())
    };
    let upper = ALICE.to_uppercase();
    let braced = format!("{{{}}}", upper.replace('-', ""));
    let cases = [
        (
            ask_as("authenticated", json!({"sub": ALICE})),
            vec![Visible, Hidden, Hidden],
        ),
        (
            ask_as("authenticated", json!({"sub": upper})),
            vec![Visible, Hidden, Hidden],
        ),
        (
            ask_as("authenticated", json!({"sub": braced})),
            vec![Visible, Hidden, Hidden],
        ),
        (
            ask_as("authenticated", json!({"sub": BOB})),
            vec![Hidden, Visible, Hidden],
        ),
        // No policy for anon: nothing passes.
        (ask_as("anon", json!({"sub": ALICE})), vec![Hidden; 3]),
        // No sub: auth.uid() is null.
        (ask_as("authenticated", json!({})), vec![Hidden; 3]),
        // Not a uuid: auth.uid() raises in Postgres, and the subscriber is told so.
        (
            ask_as("authenticated", json!({"sub": "alice"})),
            vec![Unauthorized; 3],
        ),
    ];
    let owned = |column: Option<&str>| {
        let rule = column.map(|column| Rule::Owner {
            column: column.into(),
        });
        ruled("owned", rule)
    };
    for (question, expected) in cases {
        let (claims, role) = (question.claims.clone(), question.role.clone());
        let (verdicts, rules) = answer(&mut engine, question).await;
        assert_eq!(verdicts, Some(expected), "{claims:?}");
        // The rule is the role's: anon has no policy, so only Postgres can judge for it.
        let rule = (role == "authenticated").then_some("owner");
        assert_eq!(rules, owned(rule), "{claims:?}");
    }
    // The engine's spelling of a uuid is Postgres's, for what its input accepts and refuses.
    let client = pg.client().await;
    let canonical = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";
    let mut spellings = vec![
        canonical.to_owned(),
        canonical.to_uppercase(),
        format!("{{{canonical}}}"),
        canonical.replace('-', ""),
        "a0ee-bc99-9c0b-4ef8-bb6d-6bb9-bd38-0a11".to_owned(),
        "{a0eebc99-9c0b4ef8-bb6d6bb9-bd380a11}".to_owned(),
        format!("{{{canonical}"),
        format!("{canonical}}}"),
        format!("{canonical}-"),
        format!(" {canonical}"),
        "a0eeb-c99-9c0b-4ef8-bb6d-6bb9bd380a11".to_owned(),
        "a0ee--bc99-9c0b-4ef8-bb6d-6bb9bd380a11".to_owned(),
        canonical[..35].to_owned(),
        format!("{canonical}1"),
        "alice".to_owned(),
    ];
    // A hyphen after each pair of digits in turn: Postgres allows only every second.
    spellings.extend((2..32).step_by(2).map(|at| {
        let digits = canonical.replace('-', "");
        format!("{}-{}", &digits[..at], &digits[at..])
    }));
    for spelling in spellings {
        let postgres: Option<String> = client
            .query_one("select $1::text::uuid::text", &[&spelling])
            .await
            .ok()
            .map(|row| row.get(0));
        assert_eq!(
            switchboard_engine::changes::canonical_uuid(&spelling),
            postgres,
            "{spelling:?}"
        );
    }
    // Written as Supabase's performance advisor asks, `(select auth.uid())`, the policy is
    // the same rule.
    pg.psql(
        "drop policy mine on public.owned;
         create policy mine on public.owned for select to authenticated
           using ((select auth.uid()) = owner);",
    );
    for (sub, expected) in [
        (ALICE, [Visible, Hidden, Hidden]),
        (BOB, [Hidden, Visible, Hidden]),
    ] {
        let question = ask_as("authenticated", json!({ "sub": sub }));
        assert_eq!(
            answer(&mut engine, question).await,
            (Some(expected.to_vec()), owned(Some("owner"))),
            "(select auth.uid()) for {sub}"
        );
    }
    // A helper of the project's own reads another claim: Postgres decides by it.
    pg.psql(
        "create or replace function auth.uid() returns uuid language sql stable as $$
           select (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'uid')::uuid
         $$;",
    );
    let question = ask_as("authenticated", json!({"sub": ALICE, "uid": BOB}));
    assert_eq!(
        answer(&mut engine, question).await,
        (Some(vec![Hidden, Visible, Hidden]), owned(None)),
        "no rule the engine could judge by"
    );
}

/// The dashboard's "Enable read access for all users" template, `using (true)`, shows every
/// row: the engine judges it as [`Rule::All`], whatever other permissive policies say. A
/// restrictive policy beside it is left to Postgres.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_using_true_policy_is_every_row_visible_without_postgres() {
    use Verdict::{Hidden, Visible};
    let pg = TempPostgres::start();
    pg.psql(
        "create table public.open (id int8 primary key, owner uuid);
         alter table public.open enable row level security;
         create policy \"Enable read access for all users\" on public.open for select using (true);
         create policy mine on public.open for select to authenticated using (owner = auth.uid());
         grant select on public.open to anon, authenticated;",
    );
    let mut engine = Engine::start(PostgresConfig::new(pg.url()));
    let mut n = 0;
    let mut ask_as = |role: &str, claims: Value| {
        n += 1;
        let rows = vec![
            check("open", json!({"id": 1, "owner": ALICE})),
            check("open", json!({"id": 2, "owner": BOB})),
            check("open", json!({"id": 3, "owner": null})),
        ];
        claimed(n, role, claims, rows)
    };
    let open = |rule: Option<Rule>| ruled("open", rule);
    for (role, claims) in [
        ("anon", json!({})),
        ("authenticated", json!({"sub": ALICE})),
        ("authenticated", json!({})),
    ] {
        assert_eq!(
            answer(&mut engine, ask_as(role, claims.clone())).await,
            (Some(vec![Visible; 3]), open(Some(Rule::All))),
            "{role} {claims}"
        );
    }
    pg.psql("create policy early on public.open as restrictive for select using (id < 3);");
    assert_eq!(
        answer(&mut engine, ask_as("anon", json!({}))).await,
        (Some(vec![Visible, Visible, Hidden]), open(None)),
        "a restrictive policy: Postgres decides"
    );
}
