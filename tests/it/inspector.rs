//! The Inspector page at `/`: served from the binary, minting tokens only in development
//! mode for a browser on the server's machine, and driven in a real browser (chromium,
//! with playwright-core) by tests/js/inspector.test.mjs.

use serde_json::{json, Value};

use crate::pg::TempPostgres;
use crate::supabase_js::node_tests;
use crate::support::{http, join, Server};

async fn get_json(server: &Server, path: &str) -> Value {
    let (status, _, body) = http(&server.addr, "GET", path, &[], b"").await;
    assert_eq!(status, 200, "GET {path}");
    serde_json::from_slice(&body).expect("JSON")
}

async fn mint(server: &Server, host: &str, asked: Value) -> (u16, Value) {
    let headers = [("host", host), ("content-type", "application/json")];
    let body = asked.to_string();
    let (status, _, body) = http(
        &server.addr,
        "POST",
        "/inspector/token",
        &headers,
        body.as_bytes(),
    )
    .await;
    (status, serde_json::from_slice(&body).expect("JSON"))
}

#[tokio::test]
async fn the_page_is_served_at_the_root_and_a_secret_of_the_operators_is_never_used_to_mint() {
    let server = Server::start(&[]);
    let (status, head, body) = http(&server.addr, "GET", "/", &[], b"").await;
    assert_eq!(status, 200);
    assert!(
        head.contains("content-type: text/html; charset=utf-8"),
        "{head}"
    );
    let page = String::from_utf8(body).expect("UTF-8");
    assert!(page.contains("<title>switchboard inspector</title>"));

    let info = get_json(&server, "/inspector/info").await;
    assert_eq!(info["development"], false);
    assert_eq!(info["anon_key"], Value::Null);
    let (status, body) = mint(&server, &server.addr, json!({"role": "service_role"})).await;
    assert_eq!(status, 403);
    assert!(body["message"]
        .as_str()
        .unwrap()
        .contains("switchboard token"));
}

#[tokio::test]
async fn in_development_mode_the_page_gets_keys_the_server_accepts() {
    let server = Server::start_development(&[]);
    let info = get_json(&server, "/inspector/info").await;
    assert_eq!(info["development"], true);
    let anon = info["anon_key"].as_str().expect("an anon key").to_owned();

    let (status, body) = mint(
        &server,
        &server.addr,
        json!({"role": "authenticated", "sub": "user-1", "exp": 600}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let user = body["token"].as_str().unwrap().to_owned();

    for key in [anon, user] {
        let (mut ws, _) = tokio_tungstenite::connect_async(server.url("2.0.0", &key))
            .await
            .expect("the minted key opens a socket");
        join(&mut ws, "inspected", json!({})).await;
    }

    // A page of another site reaching the port through DNS rebinding, or a remote user
    // behind a proxy on this machine: no token.
    let (status, _) = mint(&server, "evil.example", json!({"role": "service_role"})).await;
    assert_eq!(status, 403);
    let info = {
        let headers = [("host", "realtime.example.com")];
        let (_, _, body) = http(&server.addr, "GET", "/inspector/info", &headers, b"").await;
        serde_json::from_slice::<Value>(&body).unwrap()
    };
    assert_eq!(info["anon_key"], Value::Null);
    let (status, _) = mint(&server, &server.addr, json!({"role": ""})).await;
    assert_eq!(status, 400);
}

/// The table tests/js/inspector.test.mjs inserts into.
const INSPECTOR_SQL: &str = "
create table public.todos (id bigserial primary key, task text);
grant all on public.todos to anon, authenticated, service_role;
grant usage on sequence public.todos_id_seq to anon, authenticated, service_role;
alter publication supabase_realtime add table public.todos;
";

#[test]
fn the_inspector_in_chromium_shows_broadcasts_presence_and_changes() {
    let pg = TempPostgres::start();
    pg.psql(INSPECTOR_SQL);
    let server = Server::start_development(&["--database-url", &pg.url()]);
    node_tests(
        &server,
        &["inspector.test.mjs"],
        60_000,
        &[("DATABASE_URL", pg.url())],
    );
}
