//! Asymmetric tokens on the real binary: keys from a JWKS given inline or as a file,
//! chosen by `kid`, with upstream's refusals for unknown keys and unsigned tokens.

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{http, join, Server, UPGRADE};

/// The test keys, shared with the engine's unit tests.
fn private(alg: Algorithm) -> EncodingKey {
    let pem = |name: &str| {
        let path = format!("{}/tests/keys/{name}.pem", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(path).expect("a test key")
    };
    match alg {
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem("es256")),
        Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem("rs256")),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem("ed25519")),
        other => panic!("no test key for {other:?}"),
    }
    .expect("a PEM key")
}

/// The public half of the test keys, under kids `es`, `rs` and `ed`.
fn jwks() -> String {
    jwks_of(&[
        (Algorithm::ES256, "es"),
        (Algorithm::RS256, "rs"),
        (Algorithm::EdDSA, "ed"),
    ])
}

/// A JWKS of the public halves of `keys`, each under its kid.
pub fn jwks_of(keys: &[(Algorithm, &str)]) -> String {
    let keys: Vec<Value> = keys
        .iter()
        .map(|&(alg, kid)| {
            let mut jwk = Jwk::from_encoding_key(&private(alg), alg).expect("a JWK");
            jwk.common.key_id = Some(kid.to_owned());
            serde_json::to_value(jwk).expect("JSON")
        })
        .collect();
    json!({ "keys": keys }).to_string()
}

/// A JWKS endpoint for a test: serves what `body` holds (503 while it is `None`) and
/// counts the requests.
pub struct JwksServer {
    pub url: String,
    pub body: Arc<Mutex<Option<String>>>,
    pub requests: Arc<AtomicUsize>,
}

impl JwksServer {
    pub async fn start(body: String) -> JwksServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!(
            "http://{}/auth/v1/.well-known/jwks.json",
            listener.local_addr().expect("addr")
        );
        let body = Arc::new(Mutex::new(Some(body)));
        let requests = Arc::new(AtomicUsize::new(0));
        let (serving, counting) = (body.clone(), requests.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let (serving, counting) = (serving.clone(), counting.clone());
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    counting.fetch_add(1, Ordering::SeqCst);
                    let body = serving.lock().unwrap().clone();
                    let response = match body {
                        Some(body) => format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        ),
                        None => "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_owned(),
                    };
                    let _ = stream.write_all(response.as_bytes()).await;
                });
            }
        });
        JwksServer {
            url,
            body,
            requests,
        }
    }
}

pub fn signed(alg: Algorithm, kid: &str, role: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let mut header = Header::new(alg);
    header.kid = Some(kid.to_owned());
    let claims = json!({"role": role, "exp": exp, "sub": "user-1"});
    jsonwebtoken::encode(&header, &claims, &private(alg)).expect("signing")
}

/// Joins a channel with `key` as the socket's and the channel's token.
async fn joins_with(server: &Server, key: &str) {
    let (mut ws, _) = tokio_tungstenite::connect_async(server.url("2.0.0", key))
        .await
        .expect("upgrade");
    join(&mut ws, "jwks", json!({})).await;
}

/// The status of an upgrade with `key`: 101 when it is admitted.
async fn status_with(server: &Server, key: &str) -> u16 {
    use tokio_tungstenite::tungstenite::Error;
    match tokio_tungstenite::connect_async(server.url("2.0.0", key)).await {
        Ok(_) => 101,
        Err(Error::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("upgrade failed: {other}"),
    }
}

/// The status and body of a refused upgrade with `key`.
async fn upgrade_with(server: &Server, key: &str) -> (u16, String) {
    let path = format!("/realtime/v1/websocket?vsn=2.0.0&apikey={key}");
    let (status, _, body) = http(&server.addr, "GET", &path, &UPGRADE, b"").await;
    (status, String::from_utf8(body).expect("UTF-8"))
}

#[tokio::test]
async fn es256_rs256_and_eddsa_tokens_from_a_jwks_file_join() {
    let file = std::env::temp_dir().join(format!("switchboard-jwks-{}.json", std::process::id()));
    std::fs::write(&file, jwks()).expect("writing the JWKS");
    let server = Server::start(&["--jwt-jwks", file.to_str().expect("a UTF-8 path")]);
    for (alg, kid) in [
        (Algorithm::ES256, "es"),
        (Algorithm::RS256, "rs"),
        (Algorithm::EdDSA, "ed"),
    ] {
        joins_with(&server, &signed(alg, kid, "authenticated")).await;
    }
    // The project secret still verifies HS tokens.
    joins_with(&server, &crate::support::token("anon", 60)).await;
    let _ = std::fs::remove_file(file);
}

#[tokio::test]
async fn unknown_kids_unsigned_tokens_and_bad_jwks_are_refused_clearly() {
    let jwks = jwks();
    let server = Server::start(&["--jwt-jwks", &jwks]);
    joins_with(&server, &signed(Algorithm::ES256, "es", "anon")).await;
    assert_eq!(
        upgrade_with(&server, &signed(Algorithm::ES256, "gone", "anon")).await,
        (
            401,
            r#"{"error":"Failed to generate JWT signer for key ID (kid) \"gone\", check your JWT secret or JWKS configuration"}"#
                .to_owned()
        )
    );
    // alg none: a header and claims, no signature.
    let unsigned = {
        use base64::Engine as _;
        let b64 = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        format!(
            "{}.{}.",
            b64(json!({"alg": "none"})),
            b64(json!({"role": "service_role", "exp": 4_000_000_000u64}))
        )
    };
    assert_eq!(
        upgrade_with(&server, &unsigned).await,
        (
            401,
            r#"{"error":"Failed to generate JWT signer, check your JWT secret or JWKS configuration"}"#
                .to_owned()
        )
    );
    // A JWKS that cannot verify anything stops the server at start, saying why.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args([
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--jwt-jwks",
            r#"{"keys": [{"kty": "RSA", "kid": "k", "n": "!", "e": "AQAB"}]}"#,
        ])
        .output()
        .expect("the binary runs");
    let said = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{said}");
    assert!(
        said.contains("--jwt-jwks") && said.contains("JWKS key 0"),
        "{said}"
    );
}

// Multi-threaded: the JWKS endpoint answers while Server::start blocks its thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_from_a_jwks_url_are_fetched_at_start_again_for_a_new_kid_and_kept_when_it_is_down() {
    let served = JwksServer::start(jwks_of(&[(Algorithm::ES256, "es-1")])).await;
    let server = Server::start(&[
        "--jwt-jwks-url",
        &served.url,
        "--jwt-jwks-refresh-secs",
        "1",
    ]);
    assert_eq!(
        served.requests.load(Ordering::SeqCst),
        1,
        "fetched at start"
    );
    joins_with(&server, &signed(Algorithm::ES256, "es-1", "authenticated")).await;

    // The project rotates to an RS256 key: the first token naming it asks for the JWKS
    // again, and within the interval a retry is admitted.
    *served.body.lock().unwrap() = Some(jwks_of(&[
        (Algorithm::ES256, "es-1"),
        (Algorithm::RS256, "rs-2"),
    ]));
    let rotated = signed(Algorithm::RS256, "rs-2", "authenticated");
    let started = Instant::now();
    loop {
        let status = status_with(&server, &rotated).await;
        if status == 101 {
            break;
        }
        assert_eq!(status, 401);
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the new key never arrived"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    joins_with(&server, &rotated).await;

    // Unknown kids in a flood cost at most one fetch per interval.
    let before = served.requests.load(Ordering::SeqCst);
    let flood = Instant::now();
    for _ in 0..30 {
        let status = status_with(&server, &signed(Algorithm::ES256, "nope", "anon")).await;
        assert_eq!(status, 401);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fetches = served.requests.load(Ordering::SeqCst) - before;
    let allowed = flood.elapsed().as_secs() as usize + 1;
    assert!(
        fetches <= allowed,
        "{fetches} fetches in {:?}",
        flood.elapsed()
    );

    // The URL goes down: the keys fetched before still verify.
    *served.body.lock().unwrap() = None;
    status_with(&server, &signed(Algorithm::ES256, "nope", "anon")).await;
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    status_with(&server, &signed(Algorithm::ES256, "nope", "anon")).await;
    joins_with(&server, &signed(Algorithm::ES256, "es-1", "authenticated")).await;
    joins_with(&server, &rotated).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_url_down_at_start_is_fetched_once_it_is_up() {
    let served = JwksServer::start(jwks_of(&[(Algorithm::ES256, "es-1")])).await;
    *served.body.lock().unwrap() = None;
    let server = Server::start(&[
        "--jwt-jwks-url",
        &served.url,
        "--jwt-jwks-refresh-secs",
        "1",
    ]);
    let token = signed(Algorithm::ES256, "es-1", "authenticated");
    assert_eq!(status_with(&server, &token).await, 401);
    *served.body.lock().unwrap() = Some(jwks_of(&[(Algorithm::ES256, "es-1")]));
    let started = Instant::now();
    while status_with(&server, &token).await != 101 {
        assert!(started.elapsed() < Duration::from_secs(10), "never fetched");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
