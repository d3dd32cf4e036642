//! The binary's small commands (`switchboard token`) and where `serve` takes its settings
//! from: flags, environment, a config file, defaults.

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

/// Starts `serve` with `args` and `env`, reads what it prints until it listens, stops it;
/// returns the address it bound and its log lines up to then.
fn serve_once(args: &[&str], env: &[(&str, &str)]) -> (String, Vec<String>) {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("serve")
        .args(["--jwt-secret", SECRET])
        .args(args)
        .env_remove("SWITCHBOARD_BIND")
        .env_remove("SWITCHBOARD_LOG_FORMAT")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the binary runs");
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let addr = stdout
        .lines()
        .map_while(Result::ok)
        .find_map(|l| {
            Some(
                l.strip_prefix("switchboard listening on http://")?
                    .to_owned(),
            )
        })
        .expect("it listens");
    // The "listening" log line follows the printed address.
    let mut logs = Vec::new();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    while let Some(Ok(line)) = stderr.next() {
        let done = line.contains("listening");
        logs.push(line);
        if done {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    (addr, logs)
}

#[test]
fn settings_come_from_flags_then_environment_then_the_config_file_then_defaults() {
    let ports: Vec<u16> = (0..3).map(|_| crate::pg::free_port()).collect();
    let dir = std::env::temp_dir().join(format!("switchboard-config-{}", ports[0]));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("switchboard.toml");
    std::fs::write(
        &file,
        format!(
            "bind = \"127.0.0.1:{}\"\nlog-format = \"json\"\nlog_level = \"info\"\n",
            ports[0]
        ),
    )
    .unwrap();
    let config = file.to_str().unwrap();
    let at = |port: u16| format!("127.0.0.1:{port}");
    let env_bind = at(ports[1]);

    // The file over the defaults: its address, and JSON log lines.
    let (addr, logs) = serve_once(&["--config", config], &[]);
    assert_eq!(addr, at(ports[0]));
    let listening: Value = serde_json::from_str(logs.last().unwrap()).expect("a JSON log line");
    assert_eq!(listening["fields"]["message"], "listening");
    assert_eq!(listening["fields"]["config"], config);

    // The environment over the file; the file through its variable.
    let (addr, _) = serve_once(
        &[],
        &[
            ("SWITCHBOARD_CONFIG", config),
            ("SWITCHBOARD_BIND", &env_bind),
        ],
    );
    assert_eq!(addr, env_bind);

    // A flag over both; text logs on a pipe carry no colour codes.
    let (addr, logs) = serve_once(
        &[
            "--config",
            config,
            "--bind",
            &at(ports[2]),
            "--log-format",
            "text",
        ],
        &[("SWITCHBOARD_BIND", &env_bind)],
    );
    assert_eq!(addr, at(ports[2]));
    let line = logs.last().unwrap();
    assert!(line.contains("INFO") && !line.contains('\u{1b}'), "{line}");

    // A typo is an error naming the file and the key, not a setting silently dropped.
    std::fs::write(&file, "max_concurent_users = 5\n").unwrap();
    let output = switchboard(&["serve", "--config", config], Some(SECRET));
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("`max_concurent_users` is not a setting of `switchboard serve`"),
        "{stderr}"
    );
}
