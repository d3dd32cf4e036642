//! JWT verification against the injected clock (PROTOCOL.md §9).
//!
//! jsonwebtoken checks the signature; `exp` is checked here against the engine's `now`,
//! never the system clock, so simulated time and tests stay deterministic.
//!
//! Keys are chosen as upstream chooses them (`RealtimeWeb.JwtVerification`): an HS token
//! is checked with the `oct` key of its `kid` if the JWKS has one, else with the project
//! secret; an RS, ES or EdDSA token needs a `kid` naming a key of the matching type in the
//! JWKS. No other algorithm is accepted, and a public key never verifies an HS token.

use std::sync::Arc;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
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
    /// No key of the token's type has its `kid` (upstream shows the kid as Elixir's
    /// `inspect` does: quoted).
    #[error(
        "Failed to generate JWT signer for key ID (kid) {}, check your JWT secret or JWKS configuration",
        serde_json::to_string(.0).unwrap_or_default()
    )]
    UnknownKid(String),
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
            TokenError::Signer | TokenError::UnknownKid(_) => "JwtSignerError",
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

/// The kinds of JWKS key upstream matches a token's algorithm against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KeyType {
    /// `kty: oct`: a shared secret, for HS tokens.
    Oct,
    /// `kty: RSA`, for RS tokens.
    Rsa,
    /// `kty: EC`, for ES tokens.
    Ec,
    /// `kty: OKP` on an Edwards curve, for EdDSA tokens.
    Okp,
}

impl KeyType {
    /// The key type a token signed with `alg` needs; `None` for algorithms upstream does
    /// not accept (PS*, and anything new).
    fn of(alg: Algorithm) -> Option<KeyType> {
        match alg {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => Some(KeyType::Oct),
            Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 => Some(KeyType::Rsa),
            Algorithm::ES256 | Algorithm::ES384 => Some(KeyType::Ec),
            Algorithm::EdDSA => Some(KeyType::Okp),
            _ => None,
        }
    }
}

/// A JWKS that cannot be used, said at start.
#[derive(Debug, thiserror::Error)]
pub enum BadJwks {
    /// Not a JWKS document.
    #[error("the JWKS is not a JSON object with a `keys` array: {0}")]
    NotJwks(String),
    /// A key the JWKS offers for tokens cannot be made into a verifying key.
    #[error("JWKS key {index} (kid {kid:?}): {reason}")]
    BadKey {
        /// Its position in `keys`.
        index: usize,
        /// Its `kid`.
        kid: String,
        /// What jsonwebtoken said of it.
        reason: String,
    },
}

/// A JWKS whose keys were checked: every key a token could choose makes a verifying key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Jwks(JwkSet);

impl Jwks {
    /// Parses and checks a JWKS document (`{"keys": [...]}`).
    pub fn parse(json: &str) -> Result<Jwks, BadJwks> {
        let set: JwkSet =
            serde_json::from_str(json).map_err(|e| BadJwks::NotJwks(e.to_string()))?;
        let jwks = Jwks(set);
        jwks.prepared()?;
        Ok(jwks)
    }

    /// `self`'s keys and `other`'s; on a `kid` both have, `other`'s wins.
    pub fn merged(&self, other: &Jwks) -> Jwks {
        let mut set = self.0.clone();
        set.keys.extend(other.0.keys.iter().cloned());
        Jwks(set)
    }

    /// The keys tokens may choose, by `kid`. Keys without a `kid` can never be chosen, and
    /// keys of other types (X25519, say) are never picked by upstream: both are left out.
    fn prepared(&self) -> Result<FxHashMap<String, (KeyType, DecodingKey)>, BadJwks> {
        let mut keys = FxHashMap::default();
        for (index, jwk) in self.0.keys.iter().enumerate() {
            let Some(kid) = jwk.common.key_id.clone() else {
                continue;
            };
            let kind = match &jwk.algorithm {
                AlgorithmParameters::OctetKey(_) => KeyType::Oct,
                AlgorithmParameters::RSA(_) => KeyType::Rsa,
                AlgorithmParameters::EllipticCurve(_) => KeyType::Ec,
                AlgorithmParameters::OctetKeyPair(params)
                    if params.curve == EllipticCurve::Ed25519 =>
                {
                    KeyType::Okp
                }
                _ => continue,
            };
            let key = DecodingKey::from_jwk(jwk).map_err(|e| BadJwks::BadKey {
                index,
                kid: kid.clone(),
                reason: e.to_string(),
            })?;
            keys.insert(kid, (kind, key));
        }
        Ok(keys)
    }
}

/// Verifies tokens with the project secret and the keys of a JWKS. Built once;
/// verification allocates only the claims map.
pub struct Verifier {
    secret: DecodingKey,
    /// The JWKS's keys by `kid`; keys without one can never be chosen and are left out.
    keys: FxHashMap<String, (KeyType, DecodingKey)>,
}

impl Verifier {
    /// A verifier for HS256/384/512 tokens signed with `secret`.
    pub fn new(secret: &str) -> Self {
        Verifier::with_jwks(secret, None)
    }

    /// A verifier for HS tokens signed with `secret` or an `oct` key of `jwks`, and for
    /// RS, ES and EdDSA tokens whose `kid` names a key of `jwks`.
    pub fn with_jwks(secret: &str, jwks: Option<&Jwks>) -> Self {
        Verifier {
            secret: DecodingKey::from_secret(secret.as_bytes()),
            keys: jwks.map_or_else(FxHashMap::default, |jwks| {
                jwks.prepared()
                    .expect("a Jwks was checked when it was parsed")
            }),
        }
    }

    /// The key `header`'s token must verify with.
    fn key(&self, header: &Header) -> Result<&DecodingKey, TokenError> {
        let kind = KeyType::of(header.alg).ok_or(TokenError::Signer)?;
        let chosen = header
            .kid
            .as_ref()
            .and_then(|kid| self.keys.get(kid))
            .filter(|(found, _)| *found == kind)
            .map(|(_, key)| key);
        match (kind, chosen, &header.kid) {
            (_, Some(key), _) => Ok(key),
            // Supabase Auth's HS tokens carry a kid the JWKS does not publish.
            (KeyType::Oct, None, _) => Ok(&self.secret),
            (_, None, Some(kid)) => Err(TokenError::UnknownKid(kid.clone())),
            (_, None, None) => Err(TokenError::Signer),
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
        let header = jsonwebtoken::decode_header(token).map_err(|_| unreadable_header(token))?;
        let key = self.key(&header)?;
        let mut validation = Validation::new(header.alg);
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, key, &validation).map_err(
            |e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::InvalidSignature => TokenError::BadSignature,
                jsonwebtoken::errors::ErrorKind::InvalidAlgorithm
                | jsonwebtoken::errors::ErrorKind::InvalidKeyFormat => TokenError::Signer,
                _ => TokenError::Malformed,
            },
        )?;
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

/// Why a header jsonwebtoken cannot read was refused: one naming an algorithm nobody
/// verifies (`none`, say) gets upstream's signer error; anything else is not a JWT.
fn unreadable_header(token: &str) -> TokenError {
    use base64::Engine as _;
    let names_an_algorithm = token
        .split('.')
        .next()
        .and_then(|header| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(header)
                .ok()
        })
        .and_then(|json| serde_json::from_slice::<Map<String, Value>>(&json).ok())
        .is_some_and(|header| header.get("alg").is_some_and(Value::is_string));
    if names_an_algorithm {
        TokenError::Signer
    } else {
        TokenError::Malformed
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
    pub(crate) fn new(verifier: Verifier) -> Self {
        Tokens {
            verifier,
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

/// A token for `role` (and `sub`, the user id `auth.uid()` returns), issued at `now` (Unix
/// seconds) for `lifetime` seconds. `switchboard token`, the development keys and the
/// Inspector page mint the same claims.
pub fn mint(secret: &str, role: &str, sub: Option<&str>, now: u64, lifetime: u64) -> String {
    let mut claims = serde_json::json!({
        "role": role,
        "iss": "switchboard",
        "iat": now,
        "exp": now.saturating_add(lifetime),
    });
    if let Some(sub) = sub {
        claims["sub"] = Value::from(sub);
    }
    sign(secret, &claims)
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
        let mut tokens = Tokens::new(Verifier::new("secret"));
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
        let mut tokens = Tokens::new(Verifier::new("secret"));
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

    /// The test keys (`tests/keys/`), also used by the end-to-end tests.
    const ES256: &str = include_str!("../../tests/keys/es256.pem");
    const RS256: &str = include_str!("../../tests/keys/rs256.pem");
    const ED25519: &str = include_str!("../../tests/keys/ed25519.pem");

    fn private(alg: Algorithm) -> EncodingKey {
        match alg {
            Algorithm::ES256 => EncodingKey::from_ec_pem(ES256.as_bytes()),
            Algorithm::RS256 => EncodingKey::from_rsa_pem(RS256.as_bytes()),
            Algorithm::EdDSA => EncodingKey::from_ed_pem(ED25519.as_bytes()),
            other => panic!("no test key for {other:?}"),
        }
        .expect("a test key")
    }

    fn signed(alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, claims, &private(alg)).expect("signing")
    }

    fn public(alg: Algorithm, kid: &str) -> Value {
        let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&private(alg), alg).unwrap();
        jwk.common.key_id = Some(kid.to_owned());
        serde_json::to_value(jwk).unwrap()
    }

    /// A JWKS with the three public test keys and an `oct` key `hs-kid`.
    fn verifier() -> Verifier {
        let jwks = json!({"keys": [
            public(Algorithm::ES256, "es"),
            public(Algorithm::RS256, "rs"),
            public(Algorithm::EdDSA, "ed"),
            {"kty": "oct", "kid": "hs-kid", "k": "b2N0LXNlY3JldA"},
        ]});
        let jwks = Jwks::parse(&jwks.to_string()).expect("a valid JWKS");
        Verifier::with_jwks("secret", Some(&jwks))
    }

    fn claims() -> Value {
        json!({"role": "authenticated", "exp": 1_800_000_000u64, "sub": "u1"})
    }

    #[test]
    fn asymmetric_tokens_verify_with_the_jwks_key_their_kid_names() {
        let verifier = verifier();
        for (alg, kid) in [
            (Algorithm::ES256, "es"),
            (Algorithm::RS256, "rs"),
            (Algorithm::EdDSA, "ed"),
        ] {
            let token = signed(alg, Some(kid), &claims());
            let verified = verifier.verify(&token, NOW_MS);
            assert_eq!(
                verified.map(|c| c.role),
                Ok("authenticated".into()),
                "{alg:?}"
            );
        }
    }

    #[test]
    fn an_unknown_kid_asks_for_the_jwks_once_a_second_and_new_keys_admit_it() {
        use crate::tests::{TestEngine, EPOCH_MS};
        let mut t = TestEngine::new();
        let claims = json!({"role": "authenticated", "exp": EPOCH_MS / 1000 + 3600});
        let token = signed(Algorithm::ES256, Some("rotated"), &claims);
        let refused = t.try_connect(Some("2.0.0"), Some(token.clone()));
        assert_eq!(t.rejected[&refused].0, 401);
        t.try_connect(Some("2.0.0"), Some(token.clone()));
        assert_eq!(t.jwks_refreshes, 1, "at most once a second");
        t.advance(1_000);
        t.try_connect(Some("2.0.0"), Some(token.clone()));
        assert_eq!(t.jwks_refreshes, 2);
        let jwks = json!({"keys": [public(Algorithm::ES256, "rotated")]});
        let jwks = Jwks::parse(&jwks.to_string()).expect("a valid JWKS");
        t.handle(crate::Input::Jwks(Arc::new(jwks)));
        let admitted = t.try_connect(Some("2.0.0"), Some(token));
        assert!(!t.rejected.contains_key(&admitted));
        assert_eq!(t.jwks_refreshes, 2);
    }

    #[test]
    fn an_unknown_kid_or_a_key_of_another_type_names_the_kid() {
        let verifier = verifier();
        let unknown = signed(Algorithm::ES256, Some("gone"), &claims());
        let err = verifier.verify(&unknown, NOW_MS).unwrap_err();
        assert_eq!(err, TokenError::UnknownKid("gone".into()));
        assert_eq!(
            err.join_reason(),
            "JwtSignerError: Failed to generate JWT signer for key ID (kid) \"gone\", check your JWT secret or JWKS configuration"
        );
        // An ES token naming the RSA key: the key must be of the token's type.
        let crossed = signed(Algorithm::ES256, Some("rs"), &claims());
        assert_eq!(
            verifier.verify(&crossed, NOW_MS),
            Err(TokenError::UnknownKid("rs".into()))
        );
        // Without a kid an asymmetric token has no key at all.
        let no_kid = signed(Algorithm::RS256, None, &claims());
        assert_eq!(verifier.verify(&no_kid, NOW_MS), Err(TokenError::Signer));
    }

    #[test]
    fn a_token_signed_by_another_key_under_a_known_kid_is_refused() {
        // An EdDSA token naming the ES key's kid: no key of its type has that kid.
        let jwks = json!({"keys": [public(Algorithm::ES256, "es")]});
        let other = Verifier::with_jwks("secret", Some(&Jwks::parse(&jwks.to_string()).unwrap()));
        let token = signed(Algorithm::EdDSA, Some("es"), &claims());
        assert_eq!(
            other.verify(&token, NOW_MS),
            Err(TokenError::UnknownKid("es".into()))
        );
        let mut forged = signed(Algorithm::ES256, Some("es"), &claims());
        forged.truncate(forged.len() - 4);
        forged.push_str("AAAA");
        assert_eq!(
            verifier().verify(&forged, NOW_MS),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn hs_tokens_use_the_oct_key_of_their_kid_else_the_secret() {
        let verifier = verifier();
        let with_oct = |kid: &str, secret: &[u8]| {
            let mut header = Header::new(Algorithm::HS256);
            header.kid = Some(kid.to_owned());
            jsonwebtoken::encode(&header, &claims(), &EncodingKey::from_secret(secret)).unwrap()
        };
        assert!(verifier
            .verify(&with_oct("hs-kid", b"oct-secret"), NOW_MS)
            .is_ok());
        // Supabase Auth's HS tokens carry a kid the JWKS does not publish: the secret.
        assert!(verifier
            .verify(&with_oct("auth-kid", b"secret"), NOW_MS)
            .is_ok());
        assert_eq!(
            verifier.verify(&with_oct("hs-kid", b"secret"), NOW_MS),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn algorithm_confusion_is_refused() {
        // The classic attack: an HS256 token whose "secret" is the server's public key,
        // under the kid of that public key. HS tokens never verify with a public key.
        let public_pem = {
            let jwk: jsonwebtoken::jwk::Jwk =
                serde_json::from_value(public(Algorithm::RS256, "rs")).unwrap();
            serde_json::to_vec(&jwk).unwrap()
        };
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("rs".into());
        let token =
            jsonwebtoken::encode(&header, &claims(), &EncodingKey::from_secret(&public_pem))
                .unwrap();
        assert_eq!(
            verifier().verify(&token, NOW_MS),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn alg_none_and_unsupported_algorithms_get_the_signer_error() {
        use base64::Engine as _;
        let b64 =
            |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        let none = format!("{}.{}.", b64(&json!({"alg": "none"})), b64(&claims()));
        assert_eq!(verifier().verify(&none, NOW_MS), Err(TokenError::Signer));
        let unsigned_none = format!("{}.{}", b64(&json!({"alg": "none"})), b64(&claims()));
        assert_eq!(
            verifier().verify(&unsigned_none, NOW_MS),
            Err(TokenError::Signer)
        );
        // PS256 is a real algorithm upstream does not accept.
        let ps = format!(
            "{}.{}.sig",
            b64(&json!({"alg": "PS256", "kid": "rs"})),
            b64(&claims())
        );
        assert_eq!(verifier().verify(&ps, NOW_MS), Err(TokenError::Signer));
        assert_eq!(
            verifier().verify("not.a.jwt", NOW_MS),
            Err(TokenError::Malformed)
        );
    }

    #[test]
    fn a_jwks_that_cannot_verify_is_refused_at_parse() {
        assert!(matches!(Jwks::parse("{}"), Err(BadJwks::NotJwks(_))));
        assert!(matches!(Jwks::parse("[1]"), Err(BadJwks::NotJwks(_))));
        let bad_rsa = json!({"keys": [{"kty": "RSA", "kid": "k", "n": "!!", "e": "AQAB"}]});
        let err = Jwks::parse(&bad_rsa.to_string()).unwrap_err();
        assert!(matches!(err, BadJwks::BadKey { index: 0, .. }), "{err}");
        // Keys a token can never choose are fine: no kid, or a curve for key agreement.
        let unusable = json!({"keys": [
            {"kty": "OKP", "kid": "x", "crv": "X25519", "x": "AAAA"},
            public(Algorithm::ES256, "es").as_object().map(|o| {
                let mut o = o.clone();
                o.remove("kid");
                Value::Object(o)
            }).unwrap(),
        ]});
        assert!(Jwks::parse(&unusable.to_string()).is_ok());
    }
}
