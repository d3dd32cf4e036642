//! The real `@supabase/supabase-js` client, run by node against the real binary.
//! `scripts/test` installs the node packages (`npm ci` in tests/js) first.

use std::path::Path;
use std::process::Command;

use crate::support::{token, Server, SECRET};

/// Runs `node --test` on the files of tests/js matching `pattern` against `server`.
fn node_tests(server: &Server, files: &[&str], heartbeat_timeout_ms: u64) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js");
    assert!(
        dir.join("node_modules/@supabase/supabase-js").exists(),
        "run `npm ci` in tests/js (scripts/test does)"
    );
    let status = Command::new("node")
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
        .status()
        .expect("node runs");
    assert!(status.success(), "supabase-js tests failed: {files:?}");
}

#[test]
fn supabase_js_broadcast() {
    let server = Server::start(&[]);
    node_tests(&server, &["broadcast.test.mjs"], 60_000);
}

#[test]
fn supabase_js_presence() {
    let server = Server::start(&["--heartbeat-timeout-ms", "5000"]);
    node_tests(&server, &["presence.test.mjs"], 5_000);
}
