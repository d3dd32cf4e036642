//! The binary's small commands: `switchboard token`.

use std::process::{Command, Output};

use base64::Engine as _;
use serde_json::{json, Value};

use crate::support::{Server, SECRET};

fn switchboard(args: &[&str], secret: Option<&str>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_switchboard"));
    command.args(args).env_remove("SWITCHBOARD_JWT_SECRET");
    if let Some(secret) = secret {
        command.env("SWITCHBOARD_JWT_SECRET", secret);
    }
    command.output().expect("the binary runs")
}

/// A token's claims, unverified.
fn claims_of(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("a JWT");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64url");
    serde_json::from_slice(&bytes).expect("JSON claims")
}

#[tokio::test]
async fn token_mints_a_key_the_server_accepts_with_the_claims_asked_for() {
    let output = switchboard(
        &[
            "token",
            "--role",
            "authenticated",
            "--sub",
            "user-1",
            "--exp",
            "2m",
        ],
        Some(SECRET),
    );
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8(output.stdout).expect("UTF-8");
    let token = stdout
        .lines()
        .last()
        .expect("a last line")
        .trim()
        .to_owned();
    let claims = claims_of(&token);
    assert_eq!(claims["role"], "authenticated");
    assert_eq!(claims["sub"], "user-1");
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
        120
    );

    // The server takes it: connect with it and join.
    let server = Server::start(&[]);
    let url = format!(
        "ws://{}/realtime/v1/websocket?apikey={token}&vsn=2.0.0",
        server.addr
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("upgrade");
    crate::support::join(&mut ws, "room", json!({})).await;

    // The default lifetime is an hour; no sub unless asked.
    let output = switchboard(&["token", "--role", "anon"], Some(SECRET));
    let token = String::from_utf8(output.stdout).unwrap();
    let claims = claims_of(token.lines().last().unwrap());
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
        3_600
    );
    assert!(claims.get("sub").is_none());
}

#[test]
fn token_refuses_a_bad_lifetime_or_no_secret_with_a_clear_error() {
    for (exp, said) in [
        ("2w", "unknown unit"),
        ("0s", "not a lifetime"),
        ("h", "not a lifetime"),
    ] {
        let output = switchboard(&["token", "--role", "anon", "--exp", exp], Some(SECRET));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{exp}: {stderr}");
        assert!(stderr.contains(said), "{exp}: {stderr}");
    }
    let output = switchboard(&["token", "--role", "anon"], None);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--jwt-secret"), "{stderr}");
}
