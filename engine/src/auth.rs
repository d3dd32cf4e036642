//! JWT verification against the injected clock (PROTOCOL.md §9).
//!
//! jsonwebtoken checks the signature; `exp` is checked here against the engine's `now`,
//! never the system clock, so simulated time and tests stay deterministic.

use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
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
            TokenError::Expired { .. } | TokenError::MissingClaims => "InvalidJWTToken",
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
        Ok(Claims {
            role: role.to_owned(),
            exp,
            all: Arc::new(claims),
        })
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
    fn whitespace_inside_a_token_is_stripped() {
        let token = sign("secret", &json!({"role": "anon", "exp": 1_800_000_000u64}));
        let (a, b) = token.split_at(10);
        assert!(verify(&format!(" {a}\n{b} ")).is_ok());
    }
}
