//! Postgres changes: subscription checks, payload shape, filters, batched RLS, order.

use serde_json::{json, Map, Value};

use super::{test_config, Received, TestEngine};
use crate::changes::{Change, ChangeBatch, ChangeKind, Column, Table, Verdict, VisibilityQuery};
use crate::protocol::Vsn;
use crate::{ConnId, Input, Output};

fn columns() -> Vec<Column> {
    [
        ("id", "int8"),
        ("owner", "text"),
        ("title", "text"),
        ("done", "bool"),
    ]
    .iter()
    .map(|(name, type_name)| Column {
        name: (*name).into(),
        type_name: (*type_name).into(),
    })
    .collect()
}

fn table(name: &str, rls: bool) -> Table {
    Table {
        schema: "public".into(),
        name: name.into(),
        columns: columns(),
        primary_key: vec!["id".into()],
        rls,
    }
}

pub(crate) fn engine() -> TestEngine {
    let mut config = test_config();
    config.database = true;
    let mut t = TestEngine::with_config(config);
    t.handle(Input::Publication(vec![
        table("todos", false),
        table("secrets", true),
    ]));
    t
}

fn row(value: Value) -> Option<Map<String, Value>> {
    value.as_object().cloned()
}

fn change(table: &str, kind: ChangeKind, record: Value, old: Value) -> Change {
    Change {
        schema: "public".into(),
        table: table.into(),
        kind,
        commit_timestamp: "2026-01-01T12:00:00.123Z".into(),
        columns: columns(),
        record: row(record),
        old_record: row(old),
        lsn: 0,
        xid: 7,
    }
}

fn insert(table: &str, id: i64, owner: &str) -> Change {
    change(
        table,
        ChangeKind::Insert,
        json!({"id": id, "owner": owner, "title": "t", "done": false}),
        Value::Null,
    )
}

/// A batch of one transaction committed at `lsn`.
fn stamped(lsn: u64, mut changes: Vec<Change>) -> ChangeBatch {
    for change in &mut changes {
        change.lsn = lsn;
    }
    ChangeBatch { changes, lsn }
}

pub(crate) fn batch(t: &mut TestEngine, lsn: u64, changes: Vec<Change>) {
    t.handle(Input::Changes(std::sync::Arc::new(stamped(lsn, changes))));
}

/// Joins with `bindings`; returns the binding ids and checks the system message.
fn subscribe(
    t: &mut TestEngine,
    conn: ConnId,
    sub: &str,
    bindings: Value,
    token: Option<String>,
) -> Vec<u64> {
    let mut payload = json!({"config": {"postgres_changes": bindings}});
    if let Some(token) = token {
        payload["access_token"] = json!(token);
    }
    let reply = t.join_with(conn, sub, payload);
    assert_eq!(reply["status"], "ok");
    let system = t.take(conn);
    assert_eq!(
        system[0].payload(),
        &json!({"extension": "postgres_changes", "status": "ok", "message": "Subscribed to PostgreSQL", "channel": sub}),
    );
    reply["response"]["postgres_changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_u64().unwrap())
        .collect()
}

fn changes_for(t: &mut TestEngine, conn: ConnId) -> Vec<Value> {
    t.take(conn)
        .into_iter()
        .filter(|r| r.event() == "postgres_changes")
        .map(|r| r.payload().clone())
        .collect()
}

fn queries(t: &mut TestEngine) -> Vec<VisibilityQuery> {
    let mut out = std::mem::take(&mut t.visibility);
    // Tests that call the engine directly leave outputs undrained.
    while let Some(output) = t.engine.poll_output() {
        if let Output::Visibility(q) = output {
            out.push(q);
        }
    }
    out
}

#[test]
fn insert_arrives_with_ids_and_the_upstream_shape() {
    let mut t = engine();
    let conn = t.connect(Vsn::V2);
    let ids = subscribe(
        &mut t,
        conn,
        "room1",
        json!([{"event": "*", "schema": "public", "table": "todos"}]),
        None,
    );
    batch(&mut t, 10, vec![insert("todos", 7, "ann")]);
    let got = changes_for(&mut t, conn);
    assert_eq!(
        got,
        vec![json!({"ids": ids, "data": {
            "schema": "public", "table": "todos", "commit_timestamp": "2026-01-01T12:00:00.123Z", "type": "INSERT",
            "columns": [{"name": "id", "type": "int8"}, {"name": "owner", "type": "text"}, {"name": "title", "type": "text"}, {"name": "done", "type": "bool"}],
            "record": {"id": 7, "owner": "ann", "title": "t", "done": false}, "errors": null}})]
    );
}

#[test]
fn update_and_delete_carry_old_record_and_no_record_on_delete() {
    let mut t = engine();
    let conn = t.connect(Vsn::V1);
    subscribe(
        &mut t,
        conn,
        "r",
        json!([{"event": "*", "schema": "public"}]),
        None,
    );
    batch(
        &mut t,
        5,
        vec![
            change(
                "todos",
                ChangeKind::Update,
                json!({"id": 1, "done": true}),
                Value::Null,
            ),
            change("todos", ChangeKind::Delete, Value::Null, json!({"id": 1})),
        ],
    );
    let got = changes_for(&mut t, conn);
    assert_eq!(
        got[0]["data"]["old_record"],
        json!({}),
        "UPDATE always has old_record"
    );
    assert_eq!(got[0]["data"]["record"]["done"], true);
    assert_eq!(got[1]["data"]["old_record"], json!({"id": 1}));
    assert!(got[1]["data"].get("record").is_none());
    assert!(got.iter().all(|c| c["data"]["errors"].is_null()));
}

#[test]
fn event_filters_and_two_bindings_in_one_frame() {
    let mut t = engine();
    let (inserts, all) = (t.connect(Vsn::V2), t.connect(Vsn::V2));
    subscribe(
        &mut t,
        inserts,
        "a",
        json!([{"event": "INSERT", "schema": "public", "table": "todos"}]),
        None,
    );
    let ids = subscribe(
        &mut t,
        all,
        "b",
        json!([{"event": "*", "schema": "public", "table": "todos"}, {"event": "UPDATE", "schema": "public", "table": "todos"}]),
        None,
    );
    batch(
        &mut t,
        1,
        vec![
            insert("todos", 1, "x"),
            change("todos", ChangeKind::Update, json!({"id": 1}), Value::Null),
            change("todos", ChangeKind::Delete, Value::Null, json!({"id": 1})),
        ],
    );
    assert_eq!(changes_for(&mut t, inserts).len(), 1);
    let got = changes_for(&mut t, all);
    assert_eq!(got.len(), 3);
    assert_eq!(
        got[1]["ids"],
        json!(ids),
        "the update matches both bindings: one frame, both ids"
    );
    assert_eq!(got[2]["ids"], json!([ids[0]]));
    assert_eq!(t.engine.stats().changes_delivered, 4, "one per recipient");
}

#[test]
fn delivered_changes_count_each_recipient_of_a_shared_frame_and_not_hidden_rows() {
    let mut t = engine();
    let (a, b, c) = (t.connect(Vsn::V2), t.connect(Vsn::V2), t.connect(Vsn::V2));
    let bindings = json!([{"event": "*", "schema": "public", "table": "secrets"}]);
    for conn in [a, b, c] {
        let token = t.token("authenticated", 60);
        subscribe(&mut t, conn, "r", bindings.clone(), Some(token));
    }
    t.engine.handle(
        t.now,
        Input::Changes(std::sync::Arc::new(stamped(
            1,
            vec![insert("secrets", 1, "x"), insert("secrets", 2, "y")],
        ))),
    );
    let asked = queries(&mut t);
    assert_eq!(asked.len(), 1, "one claims group");
    t.handle(Input::Visibility {
        id: asked[0].id,
        verdicts: Some(vec![Verdict::Visible, Verdict::Hidden]),
        rules: Vec::new(),
    });
    let shared = t.sends.iter().filter(|(to, _)| to.iter().count() == 3);
    assert_eq!(
        shared.count(),
        1,
        "the visible row: one frame for all three"
    );
    assert_eq!(t.engine.stats().changes_delivered, 3);
}

#[test]
fn filters_select_rows_and_deletes_need_identity_columns() {
    let mut t = engine();
    let conn = t.connect(Vsn::V2);
    subscribe(
        &mut t,
        conn,
        "r",
        json!([{"event": "*", "schema": "public", "table": "todos", "filter": "owner=eq.ann"}]),
        None,
    );
    batch(
        &mut t,
        1,
        vec![
            insert("todos", 1, "ann"),
            insert("todos", 2, "bob"),
            change("todos", ChangeKind::Delete, Value::Null, json!({"id": 1})),
        ],
    );
    let got = changes_for(&mut t, conn);
    assert_eq!(
        got.len(),
        1,
        "bob's row and the key-only delete are filtered out"
    );
    assert_eq!(got[0]["data"]["record"]["owner"], "ann");
}

/// Upstream compares a filter's value with the column as the column's type: a uuid
/// filter matches however the uuid is spelled, and one that is no uuid is refused as
/// Postgres refuses the cast.
#[test]
fn uuid_filters_match_every_spelling_postgres_accepts() {
    let mut t = engine();
    let notes = Table {
        schema: "public".into(),
        name: "notes".into(),
        columns: vec![
            Column {
                name: "id".into(),
                type_name: "int8".into(),
            },
            Column {
                name: "owner".into(),
                type_name: "uuid".into(),
            },
        ],
        primary_key: vec!["id".into()],
        rls: false,
    };
    t.handle(Input::Publication(vec![notes.clone()]));
    let ann = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";
    let bob = "b0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";
    let filters = [
        "owner=eq.A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
        "owner=eq.{a0eebc999c0b4ef8bb6d6bb9bd380a11}",
        "owner=in.(A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11,c0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11)",
        "owner=neq.B0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
    ];
    let conns: Vec<ConnId> = filters
        .iter()
        .enumerate()
        .map(|(i, filter)| {
            let conn = t.connect(Vsn::V2);
            let binding = json!([{"event": "INSERT", "schema": "public", "table": "notes", "filter": filter}]);
            subscribe(&mut t, conn, &format!("r{i}"), binding, None);
            conn
        })
        .collect();
    let note = |id: i64, owner: &str| Change {
        table: "notes".into(),
        columns: notes.columns.clone(),
        record: row(json!({"id": id, "owner": owner})),
        ..insert("notes", id, owner)
    };
    batch(&mut t, 1, vec![note(1, ann), note(2, bob)]);
    for (conn, filter) in conns.into_iter().zip(filters) {
        let got = changes_for(&mut t, conn);
        let owners: Vec<&Value> = got.iter().map(|c| &c["data"]["record"]["owner"]).collect();
        assert_eq!(owners, [ann], "{filter}");
    }

    let conn = t.connect(Vsn::V2);
    let reply = t.join_with(
        conn,
        "bad",
        json!({"config": {"postgres_changes": [{"event": "INSERT", "schema": "public", "table": "notes", "filter": "owner=eq.ann"}]}}),
    );
    assert_eq!(reply["status"], "ok");
    assert!(
        t.take(conn).is_empty(),
        "the publication is read again first"
    );
    t.handle(Input::Publication(vec![notes]));
    let system = t.take(conn);
    assert_eq!(system[0].payload()["status"], "error");
    let message = system[0].payload()["message"].as_str().unwrap();
    assert!(
        message.ends_with(r#"Exception: ERROR 22P02 (invalid_text_representation) invalid input syntax for type uuid: "ann""#),
        "{message}"
    );
}

#[test]
fn unpublished_tables_bad_filters_and_empty_params_get_upstream_errors() {
    let mut t = engine();
    let conn = t.connect(Vsn::V2);
    let cases = [
        (json!({"event": "INSERT", "schema": "public", "table": "nope"}), "Unable to subscribe to changes with given parameters. Please check Realtime is enabled for the given connect parameters: [event: INSERT, schema: public, table: nope, filters: [], select: nil]"),
        (json!({"event": "*", "schema": "public", "table": "todos", "filter": "x=foo.1"}), "Error parsing `filter` params: [\"foo\", \"1\"]"),
        (json!({"event": "*", "schema": "public", "table": "todos", "filter": "id=in.1,2"}), "Error parsing `filter` params: `in` filter value must be wrapped by parentheses"),
        (json!({"event": "*", "schema": "public", "table": "todos", "filter": "nope=eq.1"}), "Unable to subscribe to changes with given parameters. An exception happened so please check your connect parameters: [event: *, schema: public, table: todos, filters: [{\"nope\", \"eq\", \"1\"}], select: nil]. Exception: ERROR P0001 (raise_exception) invalid column for filter nope"),
        (json!({"event": "*"}), "No subscription params provided. Please provide at least a `schema` or `table` to subscribe to: [event: *, schema: nil, table: nil, filters: [], select: nil]"),
    ];
    for (i, (binding, message)) in cases.into_iter().enumerate() {
        let sub = format!("e{i}");
        let reply = t.join_with(
            conn,
            &sub,
            json!({"config": {"postgres_changes": [binding]}}),
        );
        assert_eq!(reply["status"], "ok", "errors never fail the join");
        let mut got = t.take(conn);
        if message.starts_with("Unable to subscribe") {
            // The table or column may be new: the publication is read again first.
            assert!(got.is_empty(), "{message}");
            assert_eq!(t.refreshes, 1);
            t.refreshes = 0;
            t.handle(Input::Publication(vec![
                table("todos", false),
                table("secrets", true),
            ]));
            got = t.take(conn);
        }
        assert_eq!(got[0].payload()["status"], "error");
        assert_eq!(got[0].payload()["message"], message);
    }
    batch(&mut t, 1, vec![insert("todos", 1, "x")]);
    assert!(changes_for(&mut t, conn).is_empty());
}

#[test]
fn rls_is_one_query_per_claims_group_per_batch_and_hidden_rows_are_not_delivered() {
    let mut t = engine();
    let users: Vec<(ConnId, String)> = (0..10)
        .map(|i| {
            (
                t.connect(Vsn::V2),
                if i % 2 == 0 { "ann" } else { "bob" }.to_owned(),
            )
        })
        .collect();
    for (i, (conn, user)) in users.iter().enumerate() {
        let token = crate::auth::sign(
            super::SECRET,
            &json!({"role": "authenticated", "sub": user, "exp": 4_000_000_000u64}),
        );
        subscribe(
            &mut t,
            *conn,
            &format!("s{i}"),
            json!([{"event": "*", "schema": "public", "table": "secrets"}]),
            Some(token),
        );
    }
    t.engine.handle(
        t.now,
        Input::Changes(std::sync::Arc::new(stamped(
            99,
            vec![insert("secrets", 1, "ann"), insert("secrets", 2, "bob")],
        ))),
    );
    let asked = queries(&mut t);
    assert_eq!(asked.len(), 2, "two claims groups, one query each");
    assert!(asked
        .iter()
        .all(|q| q.role == "authenticated" && q.checks.len() == 2));
    for (conn, _) in &users {
        assert!(
            changes_for(&mut t, *conn).is_empty(),
            "held until verdicts arrive"
        );
    }
    for q in &asked {
        let sub = q.claims["sub"].as_str().unwrap();
        let verdicts = q
            .checks
            .iter()
            .map(|c| {
                if (c.row["id"] == json!(1)) == (sub == "ann") {
                    Verdict::Visible
                } else {
                    Verdict::Hidden
                }
            })
            .collect();
        t.handle(Input::Visibility {
            id: q.id,
            verdicts: Some(verdicts),
            rules: Vec::new(),
        });
    }
    for (conn, user) in &users {
        let got = changes_for(&mut t, *conn);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0]["data"]["record"]["owner"], user.as_str());
    }
}

#[test]
fn batches_stay_in_commit_order_while_verdicts_are_pending_and_progress_follows_delivery() {
    let mut t = engine();
    let conn = t.connect(Vsn::V2);
    let token = crate::auth::sign(
        super::SECRET,
        &json!({"role": "authenticated", "sub": "ann", "exp": 4_000_000_000u64}),
    );
    subscribe(
        &mut t,
        conn,
        "r",
        json!([{"event": "*", "schema": "public"}]),
        Some(token),
    );
    t.engine.handle(
        t.now,
        Input::Changes(std::sync::Arc::new(stamped(
            10,
            vec![insert("secrets", 1, "ann")],
        ))),
    );
    let asked = queries(&mut t);
    t.engine.handle(
        t.now,
        Input::Changes(std::sync::Arc::new(stamped(
            20,
            vec![insert("todos", 2, "ann")],
        ))),
    );
    let mut progress = Vec::new();
    while let Some(o) = t.engine.poll_output() {
        assert!(
            !matches!(o, Output::Send { .. }),
            "the second batch waits behind the first"
        );
        if let Output::WalProgress { lsn, .. } = o {
            progress.push(lsn);
        }
    }
    assert!(progress.is_empty());
    t.engine.handle(
        t.now,
        Input::Visibility {
            id: asked[0].id,
            verdicts: Some(vec![Verdict::Visible]),
            rules: Vec::new(),
        },
    );
    let mut order = Vec::new();
    while let Some(o) = t.engine.poll_output() {
        match o {
            Output::Send { msg, .. } => {
                let Received::Text { payload, .. } = super::decode_server_frame(Vsn::V2, &msg)
                else {
                    panic!()
                };
                order.push(format!("change {}", payload["data"]["record"]["id"]));
            }
            Output::WalProgress { lsn, .. } => order.push(format!("progress {lsn}")),
            _ => {}
        }
    }
    assert_eq!(
        order,
        ["change 1", "progress 10", "change 2", "progress 20"]
    );
}

#[test]
fn service_role_bypasses_rls_and_deletes_are_never_checked_but_keep_only_the_key() {
    let mut t = engine();
    let (service, user) = (t.connect(Vsn::V2), t.connect(Vsn::V2));
    let service_token = t.token("service_role", 3600);
    let user_token = t.token("authenticated", 3600);
    subscribe(
        &mut t,
        service,
        "a",
        json!([{"event": "*", "schema": "public", "table": "secrets"}]),
        Some(service_token),
    );
    subscribe(
        &mut t,
        user,
        "b",
        json!([{"event": "DELETE", "schema": "public", "table": "secrets"}]),
        Some(user_token),
    );
    t.engine.handle(
        t.now,
        Input::Changes(std::sync::Arc::new(stamped(
            3,
            vec![
                insert("secrets", 1, "ann"),
                change(
                    "secrets",
                    ChangeKind::Delete,
                    Value::Null,
                    json!({"id": 1, "owner": "ann", "title": "t"}),
                ),
            ],
        ))),
    );
    let mut sends = 0;
    while let Some(o) = t.engine.poll_output() {
        assert!(!matches!(o, Output::Visibility(_)), "no query needed");
        if let Output::Send { to, msg } = o {
            sends += 1;
            for conn in to.iter() {
                t.requeue(conn, super::decode_server_frame(Vsn::V2, &msg));
            }
        }
    }
    assert_eq!(sends, 3);
    assert_eq!(changes_for(&mut t, service).len(), 2);
    let got = changes_for(&mut t, user);
    assert_eq!(
        got[0]["data"]["old_record"],
        json!({"id": 1}),
        "RLS table: key only"
    );
}

#[test]
fn unauthorized_verdict_sends_the_error_without_row_data() {
    let mut t = engine();
    let conn = t.connect(Vsn::V2);
    subscribe(
        &mut t,
        conn,
        "r",
        json!([{"event": "*", "schema": "public", "table": "secrets"}]),
        None,
    );
    t.engine.handle(
        t.now,
        Input::Changes(std::sync::Arc::new(stamped(
            1,
            vec![insert("secrets", 1, "x")],
        ))),
    );
    let asked = queries(&mut t);
    t.handle(Input::Visibility {
        id: asked[0].id,
        verdicts: Some(vec![Verdict::Unauthorized]),
        rules: Vec::new(),
    });
    let got = changes_for(&mut t, conn);
    let data = &got[0]["data"];
    assert_eq!(data["errors"], json!(["Error 401: Unauthorized"]));
    assert_eq!(
        (data["record"].clone(), data["columns"].clone()),
        (json!({}), json!([]))
    );
    assert!(data["commit_timestamp"].is_null());
}

#[test]
fn refresh_resubscribes_and_publication_may_arrive_after_the_join() {
    let mut config = test_config();
    config.database = true;
    let mut t = TestEngine::with_config(config);
    let conn = t.connect(Vsn::V2);
    let reply = t.join_with(conn, "r", json!({"config": {"postgres_changes": [{"event": "*", "schema": "public", "table": "todos"}]}}));
    assert_eq!(reply["status"], "ok");
    assert!(t.take(conn).is_empty(), "waiting for the publication");
    t.handle(Input::Publication(vec![table("todos", false)]));
    assert_eq!(
        t.take(conn)[0].payload()["message"],
        "Subscribed to PostgreSQL"
    );
    let fresh = t.token("authenticated", 7200);
    t.push(conn, "r", "access_token", json!({"access_token": fresh}));
    assert_eq!(
        t.take(conn)[0].payload()["message"],
        "Subscribed to PostgreSQL"
    );
    t.push(conn, "r", "phx_leave", json!({}));
    t.take(conn);
    batch(&mut t, 1, vec![insert("todos", 1, "x")]);
    assert!(changes_for(&mut t, conn).is_empty(), "nothing after leave");
}

#[test]
fn a_table_published_since_the_last_read_is_read_again_before_refusing() {
    let mut t = engine();
    let (a, b) = (t.connect(Vsn::V2), t.connect(Vsn::V2));
    for (conn, sub) in [(a, "a"), (b, "b")] {
        let binding = json!({"event": "*", "schema": "public", "table": "later"});
        let reply = t.join_with(
            conn,
            sub,
            json!({"config": {"postgres_changes": [binding]}}),
        );
        assert_eq!(reply["status"], "ok");
        assert!(t.take(conn).is_empty(), "no verdict before the re-read");
    }
    assert_eq!(t.refreshes, 1, "one re-read for every channel waiting");
    t.handle(Input::Publication(vec![
        table("todos", false),
        table("later", false),
    ]));
    for conn in [a, b] {
        assert_eq!(
            t.take(conn)[0].payload()["message"],
            "Subscribed to PostgreSQL"
        );
    }
    batch(&mut t, 1, vec![insert("later", 1, "x")]);
    assert_eq!(changes_for(&mut t, a).len(), 1);
}

#[test]
fn a_failed_visibility_check_is_asked_again_until_it_is_answered() {
    let mut t = engine();
    let conn = t.connect(Vsn::V2);
    let token = t.token("authenticated", 3600);
    subscribe(
        &mut t,
        conn,
        "r",
        json!([{"event": "*", "schema": "public", "table": "secrets"}]),
        Some(token),
    );
    batch(&mut t, 5, vec![insert("secrets", 1, "ann")]);
    let asked = queries(&mut t);
    assert_eq!(asked[0].xids, [7], "the writing transaction, to wait for");
    assert_eq!(asked[0].checks[0].row["owner"], "ann", "the row as written");
    for failures in 0..4 {
        t.handle(Input::Visibility {
            id: asked[0].id,
            verdicts: None,
            rules: Vec::new(),
        });
        assert!(
            changes_for(&mut t, conn).is_empty(),
            "a failure is no verdict"
        );
        assert!(t.progress.is_empty(), "nothing confirmed while unanswered");
        t.advance((100 << failures) - 1);
        assert!(queries(&mut t).is_empty(), "backing off");
        t.advance(1);
        let again = queries(&mut t);
        assert_eq!(again, asked, "the same question, asked again");
    }
    t.handle(Input::Visibility {
        id: asked[0].id,
        verdicts: Some(vec![Verdict::Visible]),
        rules: Vec::new(),
    });
    assert_eq!(changes_for(&mut t, conn).len(), 1);
    assert_eq!(t.progress, [5]);
    assert_eq!(t.engine.stats().visibility_retries, 4);
}

#[test]
fn an_answer_to_one_question_asks_the_ones_backing_off_again_at_once() {
    let mut t = engine();
    let (a, b) = (t.connect(Vsn::V2), t.connect(Vsn::V2));
    for (conn, sub) in [(a, "ann"), (b, "bob")] {
        let token = crate::auth::sign(
            super::SECRET,
            &json!({"role": "authenticated", "sub": sub, "exp": 4_000_000_000u64}),
        );
        subscribe(
            &mut t,
            conn,
            sub,
            json!([{"event": "*", "schema": "public", "table": "secrets"}]),
            Some(token),
        );
    }
    batch(&mut t, 5, vec![insert("secrets", 1, "ann")]);
    let asked = queries(&mut t);
    assert_eq!(asked.len(), 2);
    for _ in 0..5 {
        t.handle(Input::Visibility {
            id: asked[0].id,
            verdicts: None,
            rules: Vec::new(),
        });
        t.advance(5_000);
        assert_eq!(queries(&mut t).len(), 1);
    }
    t.handle(Input::Visibility {
        id: asked[0].id,
        verdicts: None,
        rules: Vec::new(),
    });
    // The database answers the other question: the first is asked again now, not in 5 s.
    t.handle(Input::Visibility {
        id: asked[1].id,
        verdicts: Some(vec![Verdict::Hidden]),
        rules: Vec::new(),
    });
    assert_eq!(queries(&mut t), [asked[0].clone()]);
    // Its old backoff timer no longer asks it.
    t.advance(5_000);
    assert!(queries(&mut t).is_empty());
}

#[test]
fn changes_a_reconnected_stream_resends_are_delivered_once() {
    let mut t = engine();
    let conn = t.connect(Vsn::V2);
    subscribe(
        &mut t,
        conn,
        "r",
        json!([{"event": "*", "schema": "public", "table": "todos"}]),
        None,
    );
    batch(&mut t, 10, vec![insert("todos", 1, "x")]);
    let mut resent = stamped(10, vec![insert("todos", 1, "x")]);
    resent
        .changes
        .extend(stamped(20, vec![insert("todos", 2, "x")]).changes);
    resent.lsn = 20;
    t.handle(Input::Changes(std::sync::Arc::new(resent)));
    let ids: Vec<Value> = changes_for(&mut t, conn)
        .iter()
        .map(|c| c["data"]["record"]["id"].clone())
        .collect();
    assert_eq!(ids, [json!(1), json!(2)], "each change once");
    assert_eq!(t.progress, [10, 20]);
}

mod index {
    use proptest::prelude::*;

    use super::*;

    fn filter_strategy() -> impl Strategy<Value = Option<String>> {
        prop_oneof![
            Just(None),
            (0..5i64).prop_map(|k| Some(format!("id=eq.{k}"))),
            (0..5i64).prop_map(|k| Some(format!("id=gt.{k}"))),
            prop::sample::select(vec!["ann", "bob", "a b"])
                .prop_map(|n| Some(format!("owner=eq.{n}"))),
            (0..5i64, prop::sample::select(vec!["ann", "bob"]))
                .prop_map(|(k, n)| Some(format!("owner=eq.{n},id=eq.{k}"))),
        ]
    }

    fn expected(filter: &Option<String>, id: f64, owner: &str) -> bool {
        let Some(filter) = filter else { return true };
        filter.split(',').all(|c| {
            let (column, rest) = c.split_once('=').unwrap();
            let (op, value) = rest.split_once('.').unwrap();
            match (column, op) {
                ("id", "eq") => id == value.parse::<f64>().unwrap(),
                ("id", "gt") => id > value.parse::<f64>().unwrap(),
                ("owner", "eq") => owner == value,
                _ => unreachable!(),
            }
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// The candidate index never hides a change a filter selects, nor adds one.
        #[test]
        fn indexed_matching_equals_brute_force(
            filters in prop::collection::vec(filter_strategy(), 1..12),
            rows in prop::collection::vec((0..6i64, any::<bool>(), prop::sample::select(vec!["ann", "bob", "a b", "cy"])), 1..10),
        ) {
            let mut t = engine();
            let conns: Vec<ConnId> = filters.iter().map(|_| t.connect(Vsn::V2)).collect();
            for (i, (conn, filter)) in conns.iter().zip(&filters).enumerate() {
                let mut binding = json!({"event": "*", "schema": "public", "table": "todos"});
                if let Some(f) = filter {
                    binding["filter"] = json!(f);
                }
                subscribe(&mut t, *conn, &format!("c{i}"), json!([binding]), None);
            }
            let changes: Vec<Change> = rows
                .iter()
                .map(|(id, float, owner)| {
                    let id_value = if *float { json!(*id as f64) } else { json!(id) };
                    change("todos", ChangeKind::Insert, json!({"id": id_value, "owner": owner}), Value::Null)
                })
                .collect();
            batch(&mut t, 1, changes);
            for (conn, filter) in conns.iter().zip(&filters) {
                let want = rows.iter().filter(|(id, _, owner)| expected(filter, *id as f64, owner)).count();
                prop_assert_eq!(changes_for(&mut t, *conn).len(), want, "filter {:?}", filter);
            }
        }

        /// Judged by a rule (filed by owner under an owner rule, by their filters when every
        /// row is visible), subscribers get exactly what the database's verdicts would give
        /// them: their own inserts and updates (or all of them) that pass their filters,
        /// every delete, and everything for `service_role`.
        #[test]
        fn judging_by_a_rule_equals_asking_every_group(
            subscribers in prop::collection::vec((prop::sample::select(vec!["ann", "bob", "cy", "service_role"]), filter_strategy()), 1..10),
            rows in prop::collection::vec((0..6i64, prop::sample::select(vec!["ann", "bob", "a b"]), 0..3u8), 1..10),
            everyone in any::<bool>(),
        ) {
            use crate::changes::{Rule, TableRule};
            let mut t = engine();
            let conns: Vec<ConnId> = subscribers.iter().map(|_| t.connect(Vsn::V2)).collect();
            for (i, (conn, (sub, filter))) in conns.iter().zip(&subscribers).enumerate() {
                let mut binding = json!({"event": "*", "schema": "public", "table": "secrets"});
                if let Some(f) = filter {
                    binding["filter"] = json!(f);
                }
                let role = if *sub == "service_role" { "service_role" } else { "authenticated" };
                let token = crate::auth::sign(
                    crate::tests::SECRET,
                    &json!({"role": role, "sub": sub, "exp": 4_000_000_000u64}),
                );
                subscribe(&mut t, *conn, &format!("c{i}"), json!([binding]), Some(token));
            }
            // Answers as the database would: by owner or all visible, and the rule that says so.
            let answer_all = |t: &mut TestEngine| {
                for q in queries(t) {
                    let sub = q.claims.get("sub").and_then(Value::as_str);
                    let verdicts = q.checks.iter().map(|c| {
                        if everyone || c.row.get("owner").and_then(Value::as_str) == sub { Verdict::Visible } else { Verdict::Hidden }
                    }).collect();
                    let rule = Some(if everyone { Rule::All } else { Rule::Owner { column: "owner".into() } });
                    let rules = vec![TableRule { schema: "public".into(), table: "secrets".into(), rule }];
                    t.handle(Input::Visibility { id: q.id, verdicts: Some(verdicts), rules });
                }
            };
            // Rows every filter passes, so every group is asked once and learns the rule.
            let learn = (0..6).flat_map(|id| ["ann", "bob", "a b"].map(|owner| insert("secrets", id, owner))).collect();
            batch(&mut t, 1, learn);
            answer_all(&mut t);
            for conn in &conns {
                changes_for(&mut t, *conn);
            }
            let changes: Vec<Change> = rows
                .iter()
                .map(|(id, owner, kind)| {
                    let row = json!({"id": id, "owner": owner});
                    match kind {
                        0 => change("secrets", ChangeKind::Insert, row, Value::Null),
                        1 => change("secrets", ChangeKind::Update, row, Value::Null),
                        _ => change("secrets", ChangeKind::Delete, Value::Null, row),
                    }
                })
                .collect();
            batch(&mut t, 2, changes);
            let asked = queries(&mut t);
            prop_assert!(asked.len() <= 1, "at most a confirmation: {:?}", asked);
            t.visibility = asked;
            answer_all(&mut t);
            for (conn, (sub, filter)) in conns.iter().zip(&subscribers) {
                let want = rows
                    .iter()
                    .filter(|(id, owner, kind)| {
                        expected(filter, *id as f64, owner)
                            && (*kind == 2 || *sub == "service_role" || everyone || owner == sub)
                    })
                    .count();
                prop_assert_eq!(changes_for(&mut t, *conn).len(), want, "{} {:?}", sub, filter);
            }
        }
    }
}

#[test]
fn an_rls_subscription_made_before_the_publication_is_known_gets_its_changes() {
    let mut config = test_config();
    config.database = true;
    let mut t = TestEngine::with_config(config);
    let conn = t.connect(Vsn::V2);
    let token = t.token("authenticated", 3600);
    let binding = json!([{"event": "*", "schema": "public", "table": "secrets"}]);
    let reply = t.join_with(
        conn,
        "r",
        json!({"config": {"postgres_changes": binding}, "access_token": token}),
    );
    assert_eq!(reply["status"], "ok");
    t.handle(Input::Publication(vec![table("secrets", true)]));
    assert_eq!(
        t.take(conn)[0].payload()["message"],
        "Subscribed to PostgreSQL"
    );
    batch(&mut t, 10, vec![insert("secrets", 1, "authenticated")]);
    let asked = queries(&mut t);
    assert_eq!(asked.len(), 1, "one visibility question for the subscriber");
    t.handle(Input::Visibility {
        id: asked[0].id,
        verdicts: Some(vec![Verdict::Visible]),
        rules: Vec::new(),
    });
    assert_eq!(changes_for(&mut t, conn).len(), 1);
}

/// A row `realtime.send` inserted, as the WAL reader hands it over.
pub(crate) fn sent(topic: &str, event: &str, private: bool, id: &str) -> Change {
    Change {
        schema: "realtime".into(),
        table: "messages".into(),
        ..change(
            "messages",
            ChangeKind::Insert,
            json!({"topic": topic, "event": event, "private": private, "extension": "broadcast",
                   "id": id, "payload": {"n": 1, "id": id}}),
            Value::Null,
        )
    }
}

#[test]
fn messages_sent_from_sql_are_broadcast_to_their_room_once_in_commit_order() {
    let mut t = engine();
    let (public, private) = (t.connect(Vsn::V2), t.connect(Vsn::V2));
    t.join(public, "room", json!({}));
    let service = t.token("service_role", 3600);
    let ref_ = t.next_ref();
    let payload = json!({"config": {"private": true}, "access_token": service});
    t.send(
        private,
        Some(&ref_),
        &ref_,
        "realtime:room",
        "phx_join",
        payload,
    );
    t.authorize(|_| Some(super::authz::everything()));
    assert_eq!(t.take(private)[0].payload()["status"], "ok");
    let todo = insert("todos", 1, "ann");
    batch(
        &mut t,
        10,
        vec![
            sent("room", "a", false, "m1"),
            todo,
            sent("room", "b", true, "m2"),
        ],
    );
    assert_eq!(
        t.broadcasts(public),
        vec![("a".to_owned(), json!({"n": 1, "id": "m1"}))]
    );
    assert_eq!(
        t.broadcasts(private),
        vec![("b".to_owned(), json!({"n": 1, "id": "m2"}))]
    );
    // A resend after a reconnect is not broadcast again.
    batch(&mut t, 10, vec![sent("room", "a", false, "m1")]);
    assert!(t.broadcasts(public).is_empty());
    // The batch counts as handed out like any other.
    assert_eq!(t.progress.last(), Some(&10));
}

#[test]
fn an_owner_rule_spares_questions_and_a_rule_that_stops_holding_replans_the_batch() {
    use crate::changes::{Rule, TableRule};
    let mut t = engine();
    let users = [
        ("ann", t.connect(Vsn::V2)),
        ("ann", t.connect(Vsn::V2)),
        ("bob", t.connect(Vsn::V2)),
    ];
    for (i, (user, conn)) in users.iter().enumerate() {
        let token = crate::auth::sign(
            super::SECRET,
            &json!({"role": "authenticated", "sub": user, "exp": 4_000_000_000u64}),
        );
        let bindings = json!([{"event": "*", "schema": "public", "table": "secrets"}]);
        subscribe(&mut t, *conn, &format!("s{i}"), bindings, Some(token));
    }
    let owner = |rule: bool| {
        vec![TableRule {
            schema: "public".into(),
            table: "secrets".into(),
            rule: rule.then(|| Rule::Owner {
                column: "owner".into(),
            }),
        }]
    };
    let answer = |t: &mut TestEngine, q: &VisibilityQuery, rule: bool, everyone: bool| {
        let sub = q.claims.get("sub").and_then(Value::as_str);
        let verdicts = q
            .checks
            .iter()
            .map(
                |c| match everyone || c.row.get("owner").and_then(Value::as_str) == sub {
                    true => Verdict::Visible,
                    false => Verdict::Hidden,
                },
            )
            .collect();
        t.handle(Input::Visibility {
            id: q.id,
            verdicts: Some(verdicts),
            rules: owner(rule),
        });
    };
    let none: [Vec<Value>; 3] = Default::default();
    let got = |t: &mut TestEngine| -> Vec<Vec<Value>> {
        users
            .iter()
            .map(|(_, conn)| {
                changes_for(t, *conn)
                    .iter()
                    .map(|c| c["data"]["record"]["id"].clone())
                    .collect()
            })
            .collect()
    };
    let send = |t: &mut TestEngine, lsn: u64, changes: Vec<Change>| {
        t.engine.handle(
            t.now,
            Input::Changes(std::sync::Arc::new(stamped(lsn, changes))),
        );
        queries(t)
    };

    // No rule known yet: each claims group is asked; the answers report the owner rule.
    let asked = send(&mut t, 1, vec![insert("secrets", 1, "ann")]);
    assert_eq!(asked.len(), 2, "ann's group and bob's");
    for q in &asked {
        answer(&mut t, q, true, false);
    }
    assert_eq!(got(&mut t), [vec![json!(1)], vec![json!(1)], vec![]]);

    // Known: the engine judges the rows itself and asks once, under the role alone, to
    // confirm the rule still holds. The delete reaches everyone, as without the rule.
    let delete = change("secrets", ChangeKind::Delete, Value::Null, json!({"id": 9}));
    let asked = send(
        &mut t,
        2,
        vec![
            insert("secrets", 2, "ann"),
            insert("secrets", 3, "carl"),
            delete,
        ],
    );
    assert_eq!(asked.len(), 1, "one confirmation, not a question per group");
    assert_eq!(asked[0].role, "authenticated");
    assert!(
        asked[0].claims.get("sub").is_none(),
        "no subscriber's claims"
    );
    assert_eq!(got(&mut t), none, "held until confirmed");
    answer(&mut t, &asked[0], true, false);
    assert_eq!(
        got(&mut t),
        [
            vec![json!(2), Value::Null],
            vec![json!(2), Value::Null],
            vec![Value::Null]
        ]
    );

    // The policy changed: the confirmation finds no owner rule, so the batch is planned
    // again and every group asked; the new policy shows ann's row to bob too.
    let asked = send(&mut t, 3, vec![insert("secrets", 4, "ann")]);
    assert_eq!(asked.len(), 1);
    answer(&mut t, &asked[0], false, true);
    assert_eq!(t.engine.stats().visibility_replans, 1);
    let asked = queries(&mut t);
    assert_eq!(asked.len(), 2, "asked again, per group");
    assert_eq!(got(&mut t), none);
    for q in &asked {
        answer(&mut t, q, false, true);
    }
    assert_eq!(
        got(&mut t),
        [vec![json!(4)], vec![json!(4)], vec![json!(4)]]
    );

    // And the rule is forgotten: the next batch asks every group from the start.
    let asked = send(&mut t, 4, vec![insert("secrets", 5, "bob")]);
    assert_eq!(asked.len(), 2);
}
