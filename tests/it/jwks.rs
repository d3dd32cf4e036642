//! Asymmetric tokens on the real binary: keys from a JWKS given inline or as a file,
//! chosen by `kid`, with upstream's refusals for unknown keys and unsigned tokens.

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

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
    let keys: Vec<Value> = [
        (Algorithm::ES256, "es"),
        (Algorithm::RS256, "rs"),
        (Algorithm::EdDSA, "ed"),
    ]
    .into_iter()
    .map(|(alg, kid)| {
        let mut jwk = Jwk::from_encoding_key(&private(alg), alg).expect("a JWK");
        jwk.common.key_id = Some(kid.to_owned());
        serde_json::to_value(jwk).expect("JSON")
    })
    .collect();
    json!({ "keys": keys }).to_string()
}

fn signed(alg: Algorithm, kid: &str, role: &str) -> String {
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

/// The status and body of an upgrade with `key`.
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
