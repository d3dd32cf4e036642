//! JWT verification against the injected clock (PROTOCOL.md §9).
//!
//! jsonwebtoken checks the signature; `exp` is checked here against the engine's `now`,
//! never the system clock, so simulated time and tests stay deterministic.

use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rustc_hash::FxHashMap;
use serde_json::{Map, Value};

/// Verified claims of a token, kept for RLS and private channels.
#[derive(Clone, Debug, PartialEq)]
pub struct Claims {
    /// The Postgres role (`anon`, `authenticated`, `service_role`, …).
    pub role: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Every claim, as Postgres will see them in `request.jwt.claims`.
    pub all: Arc<Map<String, Value>>,
}

impl Claims {
    /// Whether this role bypasses Row Level Security.
    pub fn is_service_role(&self) -> bool {
        self.role == "service_role"
    }
}

/// Why a token was refused. Display texts are the upstream wire texts.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// No token at all.
    #[error("API key is missing")]
    Missing,
    /// `exp` is not in the future; `secs_ago` is `now - exp`.
    #[error("Token has expired {secs_ago} seconds ago")]
    Expired {
        /// How long ago the token expired.
        secs_ago: u64,
    },
    /// `role` or `exp` is absent.
    #[error("Fields `role` and `exp` are required in JWT")]
    MissingClaims,
    /// Not a compact JWS.
    #[error("The token provided is not a valid JWT")]
    Malformed,
    /// `nbf` is later than now, beyond the clock-skew leeway.
    #[error("Token is not valid yet")]
    NotYetValid,
    /// `iat` is present but not a number.
    #[error("Token claim `iat` must be a number")]
    InvalidIssuedAt,
    /// The signature does not match the secret.
    #[error("Failed to validate JWT signature")]
    BadSignature,
    /// The algorithm is not one we can verify.
    #[error("Failed to generate JWT signer, check your JWT secret or JWKS configuration")]
    Signer,
}

impl TokenError {
    /// The error text of a refused WebSocket upgrade (no age on expiry).
    pub fn connect_message(&self) -> String {
        match self {
            TokenError::Expired { .. } => "Token has expired".to_owned(),
            other => other.to_string(),
        }
    }

    /// The `Code: message` reason of a refused join.
    pub fn join_reason(&self) -> String {
        let code = match self {
            TokenError::Missing | TokenError::Malformed => "MalformedJWT",
            TokenError::Expired { .. }
            | TokenError::MissingClaims
            | TokenError::NotYetValid
            | TokenError::InvalidIssuedAt => "InvalidJWTToken",
            TokenError::BadSignature => "JwtSignatureError",
            TokenError::Signer => "JwtSignerError",
        };
        let message = match self {
            TokenError::Missing => TokenError::Malformed.to_string(),
            other => other.to_string(),
        };
        format!("{code}: {message}")
    }
}

/// How far in the future a token's `nbf` may be and still be accepted: the clock skew
/// between the issuer and this server that is tolerated.
pub const NBF_LEEWAY_SECS: u64 = 30;

/// Verifies tokens with the project secret. Built once; verification allocates only the
/// claims map.
pub struct Verifier {
    key: DecodingKey,
}

impl Verifier {
    /// A verifier for HS256/384/512 tokens signed with `secret`.
    pub fn new(secret: &str) -> Self {
        Verifier {
            key: DecodingKey::from_secret(secret.as_bytes()),
        }
    }

    /// Verifies `token` at `now_unix_ms`: signature, then the `role` and `exp` claims.
    pub fn verify(&self, token: &str, now_unix_ms: u64) -> Result<Claims, TokenError> {
        let cleaned: String;
        let token = if token.chars().any(char::is_whitespace) {
            cleaned = token.chars().filter(|c| !c.is_whitespace()).collect();
            &cleaned
        } else {
            token
        };
        if token.is_empty() {
            return Err(TokenError::Missing);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        if !matches!(
            header.alg,
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
        ) {
            return Err(TokenError::Signer);
        }
        let mut validation = Validation::new(header.alg);
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &self.key, &validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::InvalidSignature => TokenError::BadSignature,
                jsonwebtoken::errors::ErrorKind::InvalidAlgorithm
                | jsonwebtoken::errors::ErrorKind::InvalidKeyFormat => TokenError::Signer,
                _ => TokenError::Malformed,
            })?;
        let claims = data.claims;
        let role = claims.get("role").and_then(Value::as_str);
        let exp = claims.get("exp").and_then(Value::as_f64);
        let (Some(role), Some(exp)) = (role, exp) else {
            return Err(TokenError::MissingClaims);
        };
        let exp = exp.round().max(0.0) as u64;
        let now_secs = now_unix_ms / 1000;
        if exp <= now_secs {
            return Err(TokenError::Expired {
                secs_ago: now_secs - exp,
            });
        }
        // As upstream: `iat` must be a number if present, and is not compared with the
        // clock (issuers' clocks drift; `exp` bounds a token's life).
        if claims.get("iat").is_some_and(|iat| !iat.is_number()) {
            return Err(TokenError::InvalidIssuedAt);
        }
        // Not before: honoured, with a leeway for issuers whose clocks run ahead.
        let nbf = claims.get("nbf").and_then(Value::as_f64);
        if nbf.is_some_and(|nbf| nbf > (now_secs + NBF_LEEWAY_SECS) as f64) {
            return Err(TokenError::NotYetValid);
        }
        Ok(Claims {
            role: role.to_owned(),
            exp,
            all: Arc::new(claims),
        })
    }
}

/// Tokens verified and still held by a connection or channel. The thousands of sockets that
/// present one key (every browser of a site shares its anon key) then share one copy of the
/// token and its claims, about a kilobyte each, and a token seen before skips the HMAC and
/// the JSON parse. A signature's validity depends only on the token and the secret, so the
/// only check a known token still needs is its expiry.
pub(crate) struct Tokens {
    verifier: Verifier,
    known: FxHashMap<Arc<str>, Arc<Claims>>,
    /// When `known` reaches this size, entries nobody holds any more are swept out, and the
    /// next sweep waits until it doubles: amortised O(1), at most twice the live tokens.
    sweep_at: usize,
}

impl Tokens {
    pub(crate) fn new(secret: &str) -> Self {
        Tokens {
            verifier: Verifier::new(secret),
            known: FxHashMap::default(),
            sweep_at: 64,
        }
    }

    /// Verifies `token` at `now_unix_ms` as [`Verifier::verify`] does, and returns the
    /// shared copy of the token with its claims.
    pub(crate) fn verify(
        &mut self,
        token: &str,
        now_unix_ms: u64,
    ) -> Result<(Arc<str>, Arc<Claims>), TokenError> {
        if let Some((known, claims)) = self.known.get_key_value(token) {
            let now_secs = now_unix_ms / 1000;
            if claims.exp <= now_secs {
                return Err(TokenError::Expired {
                    secs_ago: now_secs - claims.exp,
                });
            }
            return Ok((known.clone(), claims.clone()));
        }
        let claims = Arc::new(self.verifier.verify(token, now_unix_ms)?);
        if self.known.len() >= self.sweep_at {
            self.known.retain(|_, claims| Arc::strong_count(claims) > 1);
            self.sweep_at = (self.known.len() * 2).max(64);
        }
        let token: Arc<str> = Arc::from(token);
        self.known.insert(token.clone(), claims.clone());
        Ok((token, claims))
    }
}

/// Signs `claims` with HS256: development keys printed by the binary, and tests.
pub fn sign(secret: &str, claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::default(),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 signing of a JSON object cannot fail")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const NOW_MS: u64 = 1_700_000_000_000;

    fn verify(token: &str) -> Result<Claims, TokenError> {
        Verifier::new("secret").verify(token, NOW_MS)
    }

    #[test]
    fn valid_token_keeps_role_and_every_claim() {
        let token = sign(
            "secret",
            &json!({"role": "authenticated", "exp": 1_800_000_000u64, "sub": "u1"}),
        );
        let claims = verify(&token).unwrap();
        assert_eq!(claims.role, "authenticated");
        assert_eq!(claims.all["sub"], "u1");
    }

    #[test]
    fn expired_token_reports_its_age() {
        let token = sign("secret", &json!({"role": "anon", "exp": 1_699_999_990u64}));
        let err = verify(&token).unwrap_err();
        assert_eq!(err, TokenError::Expired { secs_ago: 10 });
        assert_eq!(err.to_string(), "Token has expired 10 seconds ago");
        assert_eq!(err.connect_message(), "Token has expired");
        assert_eq!(
            err.join_reason(),
            "InvalidJWTToken: Token has expired 10 seconds ago"
        );
    }

    #[test]
    fn wrong_secret_is_a_signature_error() {
        let token = sign("other", &json!({"role": "anon", "exp": 1_800_000_000u64}));
        assert_eq!(verify(&token).unwrap_err(), TokenError::BadSignature);
        assert_eq!(
            TokenError::BadSignature.join_reason(),
            "JwtSignatureError: Failed to validate JWT signature"
        );
    }

    #[test]
    fn missing_claims_and_garbage_are_refused_with_upstream_texts() {
        let token = sign("secret", &json!({"exp": 1_800_000_000u64}));
        assert_eq!(
            verify(&token).unwrap_err().to_string(),
            "Fields `role` and `exp` are required in JWT"
        );
        assert_eq!(verify("not-a-jwt").unwrap_err(), TokenError::Malformed);
        assert_eq!(
            TokenError::Malformed.join_reason(),
            "MalformedJWT: The token provided is not a valid JWT"
        );
        assert_eq!(
            verify("").unwrap_err().connect_message(),
            "API key is missing"
        );
    }

    #[test]
    fn nbf_in_the_future_is_refused_beyond_the_leeway() {
        let now = NOW_MS / 1000;
        let at = |nbf: u64| {
            sign(
                "secret",
                &json!({"role": "anon", "exp": 1_800_000_000u64, "nbf": nbf}),
            )
        };
        assert!(verify(&at(now - 10)).is_ok());
        assert!(
            verify(&at(now + NBF_LEEWAY_SECS)).is_ok(),
            "within the leeway"
        );
        let err = verify(&at(now + NBF_LEEWAY_SECS + 1)).unwrap_err();
        assert_eq!(err, TokenError::NotYetValid);
        assert_eq!(err.join_reason(), "InvalidJWTToken: Token is not valid yet");
    }

    #[test]
    fn iat_must_be_a_number_but_is_not_compared_with_the_clock() {
        let token = |iat: Value| {
            sign(
                "secret",
                &json!({"role": "anon", "exp": 1_800_000_000u64, "iat": iat}),
            )
        };
        assert!(
            verify(&token(json!(1_900_000_000u64))).is_ok(),
            "a future iat"
        );
        assert_eq!(
            verify(&token(json!("yesterday"))).unwrap_err(),
            TokenError::InvalidIssuedAt
        );
    }

    #[test]
    fn a_known_token_is_shared_and_still_expires() {
        let mut tokens = Tokens::new("secret");
        let token = sign("secret", &json!({"role": "anon", "exp": 1_700_000_100u64}));
        let (first, claims) = tokens.verify(&token, NOW_MS).unwrap();
        let (second, again) = tokens.verify(&token, NOW_MS).unwrap();
        assert!(Arc::ptr_eq(&first, &second) && Arc::ptr_eq(&claims, &again));
        assert_eq!(
            tokens.verify(&token, NOW_MS + 105_000).unwrap_err(),
            TokenError::Expired { secs_ago: 5 }
        );
        let forged = sign("other", &json!({"role": "anon", "exp": 1_800_000_000u64}));
        assert_eq!(
            tokens.verify(&forged, NOW_MS).unwrap_err(),
            TokenError::BadSignature
        );
    }

    #[test]
    fn tokens_nobody_holds_are_swept() {
        let mut tokens = Tokens::new("secret");
        let held = tokens
            .verify(
                &sign("secret", &json!({"role": "anon", "exp": 1_800_000_000u64})),
                NOW_MS,
            )
            .unwrap();
        for exp in 0..200u64 {
            let token = sign(
                "secret",
                &json!({"role": "anon", "exp": 1_800_000_001 + exp}),
            );
            tokens.verify(&token, NOW_MS).unwrap();
        }
        assert!(tokens.known.len() <= 128, "{} kept", tokens.known.len());
        assert!(tokens.known.contains_key(&held.0));
    }

    #[test]
    fn whitespace_inside_a_token_is_stripped() {
        let token = sign("secret", &json!({"role": "anon", "exp": 1_800_000_000u64}));
        let (a, b) = token.split_at(10);
        assert!(verify(&format!(" {a}\n{b} ")).is_ok());
    }
}
