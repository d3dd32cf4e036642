//! Visibility questions answered by a real PostgreSQL under Row Level Security policies that
//! read the claims through `auth.uid()`, as Supabase projects write them.

use std::sync::Arc;

use serde_json::{json, Value};
use switchboard_engine::changes::{RowCheck, Verdict, VisibilityQuery};
use switchboard_engine::{Input, Output};
use switchboard_tokio::postgres::PostgresConfig;

use crate::pg::TempPostgres;
use crate::wal::Engine;

const ALICE: &str = "11111111-1111-1111-1111-111111111111";
const BOB: &str = "22222222-2222-2222-2222-222222222222";

fn check(table: &str, key: &[(&str, &str, Value)]) -> RowCheck {
    RowCheck {
        schema: "public".into(),
        table: table.into(),
        key: key
            .iter()
            .map(|(column, type_name, value)| {
                (column.to_string(), type_name.to_string(), value.clone())
            })
            .collect(),
    }
}

fn query(id: u64, role: &str, sub: &str, checks: Vec<RowCheck>) -> VisibilityQuery {
    let claims = json!({"role": role, "sub": sub});
    VisibilityQuery {
        id,
        role: role.into(),
        claims: Arc::new(claims.as_object().expect("an object").clone()),
        checks,
    }
}

async fn ask(engine: &mut Engine, question: VisibilityQuery) -> Option<Vec<Verdict>> {
    let asked = question.id;
    engine.send(Output::Visibility(question));
    loop {
        if let Input::Visibility { id, verdicts } = engine.next().await {
            assert_eq!(id, asked);
            return verdicts;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_decide_what_each_subscriber_sees() {
    let pg = TempPostgres::start();
    pg.psql(&format!(
        "create table public.notes (id int8 primary key, owner uuid, body text);
         alter table public.notes enable row level security;
         create policy own on public.notes for select to authenticated
           using (owner = auth.uid());
         insert into public.notes values (1, '{ALICE}', 'a'), (2, '{BOB}', 'b');
         create table public.pairs (a int4, b text, primary key (a, b));
         alter table public.pairs enable row level security;
         create policy everyone on public.pairs for select using (true);
         insert into public.pairs values (1, 'x y');
         create table public.secret (id int8 primary key);
         revoke all on public.secret from anon, authenticated;
         insert into public.secret values (1);"
    ));
    let config = PostgresConfig::new(pg.url());
    let counted = config.visibility_queries.clone();
    let mut engine = Engine::start(config);
    let note = |id: i64| check("notes", &[("id", "int8", json!(id))]);
    let pair =
        |a: i64, b: &str| check("pairs", &[("a", "int4", json!(a)), ("b", "text", json!(b))]);

    let alice = query(
        1,
        "authenticated",
        ALICE,
        vec![
            note(1),
            note(2),
            note(3),
            check("secret", &[("id", "int8", json!(1))]),
            pair(1, "x y"),
            pair(1, "x"),
        ],
    );
    use Verdict::{Hidden, Unauthorized, Visible};
    assert_eq!(
        ask(&mut engine, alice).await,
        Some(vec![Visible, Hidden, Hidden, Unauthorized, Visible, Hidden])
    );
    let bob = query(2, "authenticated", BOB, vec![note(1), note(2)]);
    assert_eq!(ask(&mut engine, bob).await, Some(vec![Hidden, Visible]));
    // No policy lets anon read notes.
    let anon = query(3, "anon", "", vec![note(1), pair(1, "x y")]);
    assert_eq!(ask(&mut engine, anon).await, Some(vec![Hidden, Visible]));
    // A role that does not exist fails the question rather than showing anything.
    let nobody = query(4, "nobody", ALICE, vec![note(1)]);
    assert_eq!(ask(&mut engine, nobody).await, None);
    assert_eq!(counted.get(), 4);
}
