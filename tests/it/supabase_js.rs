//! The real `@supabase/supabase-js` client, run by node against the real binary.
//! `scripts/test` installs the node packages (`npm ci` in tests/js) first.

use std::path::Path;
use std::process::Command;

use crate::pg::TempPostgres;
use crate::support::{token, Server, SECRET};

/// Runs `node --test` on `files` of tests/js against `server`, with extra environment.
pub fn node_tests(
    server: &Server,
    files: &[&str],
    heartbeat_timeout_ms: u64,
    env: &[(&str, String)],
) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js");
    assert!(
        dir.join("node_modules/@supabase/supabase-js").exists(),
        "run `npm ci` in tests/js (scripts/test does)"
    );
    let output = Command::new("node")
        .arg("--test")
        .arg("--test-concurrency=1")
        .args(files)
        .current_dir(&dir)
        .env("SWITCHBOARD_URL", format!("http://{}", server.addr))
        .env("SWITCHBOARD_ANON_KEY", token("anon", 3600))
        .env("SWITCHBOARD_SERVICE_KEY", token("service_role", 3600))
        .env("SWITCHBOARD_JWT_SECRET", SECRET)
        .env(
            "SWITCHBOARD_HEARTBEAT_TIMEOUT_MS",
            heartbeat_timeout_ms.to_string(),
        )
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    // Through the test harness's capture: shown in full under the failing test's name.
    print!("{stdout}");
    eprint!("{}", String::from_utf8_lossy(&output.stderr));
    assert!(
        output.status.success(),
        "supabase-js tests failed: {files:?}\n{}",
        failures(&stdout)
    );
}

/// The `not ok` entries of node's TAP report with their YAML blocks (what was expected,
/// what came, where): the panic message carries them, so a failure in a long, interleaved
/// log still says what went wrong.
fn failures(tap: &str) -> String {
    let mut out = String::new();
    let mut inside = false;
    for line in tap.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("not ok ") {
            inside = true;
        } else if inside && (trimmed.starts_with("ok ") || trimmed.starts_with("# Subtest")) {
            inside = false;
        }
        if inside {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[test]
fn failures_keep_each_not_ok_entry_with_its_details() {
    let tap = "# Subtest: a\nok 1 - a\n  ---\n  duration_ms: 1\n  ...\n\
               # Subtest: b\nnot ok 2 - b\n  ---\n  error: 'Expected 1, got 2'\n  ...\n\
               # Subtest: c\nok 3 - c\n";
    assert_eq!(
        failures(tap),
        "not ok 2 - b\n  ---\n  error: 'Expected 1, got 2'\n  ...\n"
    );
}

#[test]
fn supabase_js_broadcast() {
    let server = Server::start(&[]);
    node_tests(&server, &["broadcast.test.mjs"], 60_000, &[]);
}

#[test]
fn supabase_js_presence() {
    let server = Server::start(&["--heartbeat-timeout-ms", "5000"]);
    node_tests(&server, &["presence.test.mjs"], 5_000, &[]);
}

/// The schema changes.test.mjs expects, created before the server reads the publication.
const CHANGES_SQL: &str = r#"
create table public.todos (id bigserial primary key, owner uuid, task text, done bool not null default false, n int);
create table public.notes (id bigserial primary key, owner uuid, body text);
create table public.hidden (id bigserial primary key);
alter table public.notes enable row level security;
create policy "own notes" on public.notes for select to authenticated using (owner = auth.uid());
grant all on public.todos, public.notes, public.hidden to anon, authenticated, service_role;
alter publication supabase_realtime add table public.todos, public.notes;
"#;

#[test]
fn supabase_js_postgres_changes() {
    let pg = TempPostgres::start();
    pg.psql(CHANGES_SQL);
    let server = Server::start(&["--database-url", &pg.url()]);
    node_tests(
        &server,
        &["changes.test.mjs"],
        60_000,
        &[("DATABASE_URL", pg.url())],
    );
}

#[test]
fn supabase_js_private_channels_and_broadcast_from_the_database() {
    let pg = TempPostgres::start();
    let server = Server::start(&["--database-url", &pg.url()]);
    node_tests(
        &server,
        &["private.test.mjs"],
        60_000,
        &[("DATABASE_URL", pg.url())],
    );
}

/// ES256 and RS256 tokens, their keys in a JWKS file or at a JWKS URL the test serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supabase_js_asymmetric_tokens_from_a_jwks_file_and_url() {
    use crate::jwks::{jwks_of, signed, JwksServer};
    use jsonwebtoken::Algorithm;
    let keys = jwks_of(&[(Algorithm::ES256, "es"), (Algorithm::RS256, "rs")]);
    let tokens = vec![
        (
            "SWITCHBOARD_ES256_TOKEN",
            signed(Algorithm::ES256, "es", "authenticated"),
        ),
        (
            "SWITCHBOARD_RS256_TOKEN",
            signed(Algorithm::RS256, "rs", "authenticated"),
        ),
    ];
    let file =
        std::env::temp_dir().join(format!("switchboard-js-jwks-{}.json", std::process::id()));
    std::fs::write(&file, &keys).expect("writing the JWKS");
    let served = JwksServer::start(keys).await;
    for flag in [
        ["--jwt-jwks", file.to_str().expect("a UTF-8 path")],
        ["--jwt-jwks-url", served.url.as_str()],
    ] {
        let flag: Vec<String> = flag.iter().map(|s| s.to_string()).collect();
        let tokens = tokens.clone();
        tokio::task::spawn_blocking(move || {
            let flag: Vec<&str> = flag.iter().map(String::as_str).collect();
            let server = Server::start(&flag);
            let env: Vec<(&str, String)> = tokens.iter().map(|(k, v)| (*k, v.clone())).collect();
            node_tests(&server, &["jwks.test.mjs"], 60_000, &env);
        })
        .await
        .expect("the node tests ran");
    }
    let _ = std::fs::remove_file(file);
}

/// The server killed with SIGKILL while rows are sent from SQL; supabase-js reconnects.
#[test]
fn supabase_js_messages_from_sql_survive_a_server_kill() {
    let pg = TempPostgres::start();
    let server = Server::start(&["--database-url", &pg.url()]);
    let restart = serde_json::to_string(&server.restart_argv()).expect("JSON");
    node_tests(
        &server,
        &["restart.test.mjs"],
        60_000,
        &[
            ("DATABASE_URL", pg.url()),
            ("SWITCHBOARD_PID", server.pid().to_string()),
            ("SWITCHBOARD_RESTART", restart),
        ],
    );
}

#[test]
fn supabase_js_across_two_cluster_nodes() {
    let nats = crate::nats::Nats::start();
    let url = nats.url();
    let cluster = [
        "--cluster-nats",
        &url,
        "--cluster-heartbeat-ms",
        "200",
        "--cluster-down-ms",
        "2000",
    ];
    let (first, second) = (Server::start(&cluster), Server::start(&cluster));
    crate::cluster::wait_formed(&[&first, &second]);
    // Clients of the failover test reach the second node through it, the first once the
    // second is gone.
    let port = |server: &Server| server.addr.rsplit(':').next().unwrap().parse().unwrap();
    let balancer = crate::nats::Proxy::balance(&[port(&second), port(&first)]);
    node_tests(
        &first,
        &["cluster.test.mjs"],
        60_000,
        &[
            ("SWITCHBOARD_URL_2", format!("http://{}", second.addr)),
            ("SWITCHBOARD_URL_BALANCED", balancer.http_url()),
            ("SWITCHBOARD_PID_2", second.pid().to_string()),
        ],
    );
}
