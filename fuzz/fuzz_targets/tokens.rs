//! Arbitrary tokens against a verifier with a secret and a JWKS: never a panic, and never
//! accepted unless signed (the fuzzer cannot forge HMAC or ECDSA signatures, so an `Ok`
//! means the verifier skipped the signature).
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard_engine::auth::{Jwks, Verifier};

const JWKS: &str = r#"{"keys": [
  {"kty": "oct", "kid": "hs", "k": "b2N0LXNlY3JldA"},
  {"kty": "EC", "kid": "es", "crv": "P-256",
   "x": "TizmSXSePcdFRkcFMt-r7d560_zikl-qFwUYUENVpu4", "y": "3QjhZjMS2g1o40q75oYqp29fgHD1jwynqe2zmglhqmc"}
]}"#;

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let jwks = Jwks::parse(JWKS).expect("the fuzz JWKS is valid");
    let verifier = Verifier::with_jwks("fuzz-secret", Some(&jwks));
    assert!(verifier.verify(token, 1_700_000_000_000).is_err(), "an unsigned token passed");
});
