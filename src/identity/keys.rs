//! The keys that verify incoming tokens (HS256 with our secret, RS256 with the Registry's
//! key) and sign the orchestrator's own.

use std::sync::RwLock;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::verified::Verified;
use super::{Claims, Permission, TokenError};
use crate::config::Config;

/// Reads a PEM value that is either the PEM text itself or a path to it.
pub fn read_pem(value: &str) -> Result<Vec<u8>, String> {
    if value.contains("-----BEGIN") {
        Ok(value.replace("\\n", "\n").into_bytes())
    } else {
        std::fs::read(value).map_err(|e| format!("cannot read {value}: {e}"))
    }
}

/// The keys that verify incoming tokens and sign outgoing ones.
pub struct Keys {
    hs_decode: DecodingKey,
    hs_encode: EncodingKey,
    rs_decode: RwLock<Option<RegistryKey>>,
    rs_encode: Option<EncodingKey>,
    hs_validation: Validation,
    rs_validation: Validation,
    expiration_seconds: u64,
    orchestrator_id: i32,
    orchestrator_steward: String,
    outbound_seconds: u64,
    outbound_iss: Option<String>,
    outbound_aud: Option<String>,
    /// A token the Registry issued to the orchestrator, and when it expires.
    registry_token: RwLock<Option<(String, i64)>>,
    /// Tokens accepted lately, to verify each once (`verified.rs`).
    verified: Verified,
}

/// The Registry's public key and the fingerprint of its PEM, to tell a change of key from
/// the same key fetched again.
struct RegistryKey {
    decode: DecodingKey,
    fingerprint: String,
}

/// What installing the Registry's key did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyChange {
    /// There was no key before.
    Installed,
    /// The same key as the one held (a sync fetches it each time).
    Unchanged,
    /// Another key replaced the one held.
    Changed,
}

/// A short fingerprint of a PEM: `SHA256:` and the first 8 bytes of the digest of its text
/// (surrounding whitespace aside), in hex.
pub fn key_fingerprint(pem: &[u8]) -> String {
    let digest = Sha256::digest(String::from_utf8_lossy(pem).trim().as_bytes());
    format!("SHA256:{}", hex::encode(&digest[..8]))
}

/// What the orchestrator's own tokens are marked with (`token_use`).
pub const OUTBOUND: &str = "outbound";

/// The credentials of one request the orchestrator makes: its bearer token, and the
/// envelope's `signature` when the orchestrator holds a token issued by the Registry.
#[derive(Debug, Clone)]
pub struct Outbound {
    pub bearer: String,
    pub signature: Option<String>,
}

impl Keys {
    pub fn from_config(config: &Config) -> Result<Keys, String> {
        let secret = config.jwt_secret_key.expose().as_bytes();
        let rs_decode = match &config.registry_public_key {
            Some(v) => {
                let pem = read_pem(v)?;
                Some(RegistryKey {
                    decode: DecodingKey::from_rsa_pem(&pem)
                        .map_err(|e| format!("REGISTRY_PUBLIC_KEY: not an RSA public key: {e}"))?,
                    fingerprint: key_fingerprint(&pem),
                })
            }
            None => None,
        };
        let rs_encode =
            match &config.orchestrator_private_key {
                Some(v) => Some(EncodingKey::from_rsa_pem(&read_pem(v)?).map_err(|e| {
                    format!("ORCHESTRATOR_PRIVATE_KEY: not an RSA private key: {e}")
                })?),
                None => None,
            };
        Ok(Keys {
            hs_decode: DecodingKey::from_secret(secret),
            hs_encode: EncodingKey::from_secret(secret),
            rs_decode: RwLock::new(rs_decode),
            rs_encode,
            hs_validation: pinned_validation(Algorithm::HS256),
            rs_validation: pinned_validation(Algorithm::RS256),
            expiration_seconds: config.jwt_expiration_seconds,
            orchestrator_id: config.droplet_id,
            orchestrator_steward: config.droplet_steward.clone(),
            outbound_seconds: config.outbound_token_seconds,
            outbound_iss: config.registry_issuer.clone(),
            outbound_aud: config.registry_audience.clone(),
            registry_token: RwLock::new(
                config
                    .registry_token
                    .as_ref()
                    .map(|t| (t.expose().to_string(), unverified_exp(t.expose()))),
            ),
            verified: Verified::default(),
        })
    }

    /// Installs the Registry's public key fetched at run time (only with
    /// `REGISTRY_FETCH_PUBLIC_KEY=true`, over https). Each sync fetches it again: the same
    /// key is left as it is and not logged; a first key is logged, a change of key warned
    /// with both fingerprints.
    pub fn set_registry_key(&self, pem: &[u8]) -> Result<KeyChange, String> {
        let fingerprint = key_fingerprint(pem);
        let mut slot = match self.rs_decode.write() {
            Ok(slot) => slot,
            Err(poisoned) => poisoned.into_inner(),
        };
        let old = slot.as_ref().map(|k| k.fingerprint.clone());
        if old.as_deref() == Some(fingerprint.as_str()) {
            return Ok(KeyChange::Unchanged);
        }
        let decode = DecodingKey::from_rsa_pem(pem).map_err(|e| e.to_string())?;
        let change = match old {
            Some(old) => {
                tracing::warn!(
                    old_fingerprint = %old,
                    new_fingerprint = %fingerprint,
                    "the Registry's public key changed; tokens signed with the old key are now refused"
                );
                KeyChange::Changed
            }
            None => {
                tracing::info!(fingerprint = %fingerprint, "installed the Registry's public key");
                KeyChange::Installed
            }
        };
        *slot = Some(RegistryKey {
            decode,
            fingerprint,
        });
        // Tokens the old key verified are refused from now on.
        self.verified.forget_all();
        Ok(change)
    }

    /// Installs a token the Registry issued to the orchestrator.
    pub fn set_registry_token(&self, token: String) {
        let exp = unverified_exp(&token);
        if let Ok(mut slot) = self.registry_token.write() {
            *slot = Some((token, exp));
        }
    }

    /// Seconds until the Registry's token expires (None: the orchestrator holds none).
    pub fn registry_token_remaining(&self) -> Option<i64> {
        let slot = self.registry_token.read().ok()?;
        slot.as_ref()
            .map(|(_, exp)| exp - chrono::Utc::now().timestamp())
    }

    /// The credentials of a request to a droplet: the Registry's token as bearer and
    /// signature while the orchestrator holds a live one, else our own outbound token.
    pub fn outbound(&self) -> Result<Outbound, TokenError> {
        if let Ok(slot) = self.registry_token.read() {
            if let Some((token, exp)) = slot.as_ref() {
                if *exp > chrono::Utc::now().timestamp() + 30 {
                    return Ok(Outbound {
                        bearer: token.clone(),
                        signature: Some(token.clone()),
                    });
                }
            }
        }
        Ok(Outbound {
            bearer: self.orchestrator_token()?,
            signature: None,
        })
    }

    pub fn has_registry_key(&self) -> bool {
        self.rs_decode.read().map(|k| k.is_some()).unwrap_or(false)
    }

    /// Verifies a token: the key that verifies it decides the algorithm, never the header alone.
    /// Tokens the orchestrator sent (marked outbound) and any token naming the orchestrator's
    /// own id are refused: no one acts as the orchestrator.
    /// A token accepted lately is not verified again while it lives (`verified.rs`).
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let now = chrono::Utc::now().timestamp();
        let leeway = self.hs_validation.leeway as i64;
        if let Some(claims) = self.verified.get(token, now, leeway) {
            return Ok(claims);
        }
        let generation = self.verified.generation();
        let claims = self.verify_signature(token)?;
        if claims.token_use.as_deref() == Some(OUTBOUND)
            || claims.droplet_id == self.orchestrator_id
        {
            return Err(TokenError::Invalid(
                "the token is the orchestrator's own; it is never accepted back",
            ));
        }
        self.verified.hold(token, &claims, now, generation);
        Ok(claims)
    }

    /// The orchestrator's own id, which no inbound token may carry.
    pub fn orchestrator_id(&self) -> i32 {
        self.orchestrator_id
    }

    fn verify_signature(&self, token: &str) -> Result<Claims, TokenError> {
        let hs = match jsonwebtoken::decode::<Claims>(token, &self.hs_decode, &self.hs_validation) {
            Ok(data) => return Ok(data.claims),
            Err(e) => e,
        };
        let rs = match self.rs_decode.read() {
            Ok(guard) => match guard.as_ref() {
                Some(key) => {
                    match jsonwebtoken::decode::<Claims>(token, &key.decode, &self.rs_validation) {
                        Ok(data) => return Ok(data.claims),
                        Err(e) => Some(e),
                    }
                }
                None => None,
            },
            Err(_) => None,
        };
        Err(TokenError::Invalid(why_refused(&hs, rs.as_ref())))
    }

    /// Signs a token with our HS256 secret.
    pub fn mint(
        &self,
        droplet_id: i32,
        steward: Option<String>,
        permissions: &[Permission],
        expires_in: u64,
    ) -> Result<String, TokenError> {
        let now = chrono::Utc::now().timestamp();
        let claims = Claims {
            droplet_id,
            sub: Some(format!("droplet-{droplet_id}")),
            steward,
            permissions: Some(permissions.iter().map(|p| p.as_str().to_string()).collect()),
            iat: Some(now),
            exp: now + expires_in.min(i64::MAX as u64 / 2) as i64,
            token_use: None,
            iss: None,
            aud: None,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.hs_encode)
            .map_err(|e| TokenError::Signing(e.to_string()))
    }

    pub fn default_expiration(&self) -> u64 {
        self.expiration_seconds
    }

    /// The token the orchestrator sends to droplets: RS256 with our private key when one
    /// is configured, else HS256. It carries `sub` (real droplets read the caller from it),
    /// lives minutes (`OUTBOUND_TOKEN_SECONDS`) and is marked outbound, so it is refused if
    /// sent back. HS256 tokens carry no `aud`: python-jose refuses an `aud` it was not told
    /// to expect; RS256 ones carry the Registry's `iss`/`aud` when configured.
    pub fn orchestrator_token(&self) -> Result<String, TokenError> {
        let now = chrono::Utc::now().timestamp();
        let rs256 = self.rs_encode.is_some();
        let claims = Claims {
            droplet_id: self.orchestrator_id,
            sub: Some(format!("droplet-{}", self.orchestrator_id)),
            steward: Some(self.orchestrator_steward.clone()),
            permissions: Some(vec!["read".into(), "write".into()]),
            iat: Some(now),
            exp: now + self.outbound_seconds as i64,
            token_use: Some(OUTBOUND.into()),
            iss: self.outbound_iss.clone().filter(|_| rs256),
            aud: self.outbound_aud.clone().filter(|_| rs256),
        };
        match &self.rs_encode {
            Some(key) => jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, key),
            None => jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.hs_encode),
        }
        .map_err(|e| TokenError::Signing(e.to_string()))
    }
}

/// Which check failed, from the errors of the keys tried (HS256 with our secret, then RS256
/// with the Registry's key when one is installed). A check after the signature's (expiry,
/// claims) means that key verified the signature, so it is the one reported.
fn why_refused(
    hs: &jsonwebtoken::errors::Error,
    rs: Option<&jsonwebtoken::errors::Error>,
) -> &'static str {
    use jsonwebtoken::errors::ErrorKind as K;
    let signature_stage = |e: &jsonwebtoken::errors::Error| {
        matches!(e.kind(), K::InvalidSignature | K::InvalidAlgorithm)
    };
    let decisive = [Some(hs), rs]
        .into_iter()
        .flatten()
        .find(|e| !signature_stage(e));
    match decisive.map(|e| e.kind()) {
        Some(K::InvalidToken | K::Base64(_) | K::Utf8(_) | K::MissingAlgorithm) => {
            "malformed token (three base64url parts of JSON expected)"
        }
        Some(K::ExpiredSignature) => "the token has expired",
        Some(K::ImmatureSignature) => "the token is not valid yet (nbf)",
        Some(K::MissingRequiredClaim(_)) => "the token has no exp claim",
        Some(K::InvalidAudience) => "audience not accepted",
        Some(K::InvalidIssuer) => "issuer not accepted",
        Some(K::Json(e)) => unknown_droplet_reason(&e.to_string()),
        Some(_) => "the token cannot be used",
        None if rs.is_none() && matches!(hs.kind(), K::InvalidAlgorithm) => {
            "algorithm not accepted (HS256 with the orchestrator's secret; RS256 only with a Registry public key)"
        }
        None => "signature does not verify",
    }
}

/// The claims' own check that failed (fixed words of [`Claims`], never the token's values).
fn unknown_droplet_reason(error: &str) -> &'static str {
    const REASONS: [&str; 4] = [
        "droplet_id is not a droplet id",
        "sub is not a droplet id",
        "the token names no droplet (droplet_id or sub)",
        "exp and iat must be numbers",
    ];
    REASONS
        .into_iter()
        .find(|r| error.starts_with(r))
        .unwrap_or("the token's claims are not usable (droplet_id or sub, and a numeric exp)")
}

fn pinned_validation(alg: Algorithm) -> Validation {
    let mut v = Validation::new(alg);
    v.algorithms = vec![alg];
    v.set_required_spec_claims(&["exp"]);
    v.validate_exp = true;
    // A token not valid yet is refused (with the same leeway as `exp`).
    v.validate_nbf = true;
    // Registry tokens carry `aud: "fullpotential.droplets"`; the orchestrator is one of those
    // droplets, and the signature is what it trusts.
    v.validate_aud = false;
    v.leeway = 30;
    v
}

/// The `exp` of a token we hold (not one we are shown), without checking its signature;
/// 0 when it has none.
fn unverified_exp(token: &str) -> i64 {
    use base64::Engine;
    token
        .split('.')
        .nth(1)
        .and_then(|segment| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(segment.trim_end_matches('='))
                .ok()
        })
        .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
        .and_then(|claims| claims.get("exp").and_then(Value::as_f64))
        .map(|e| e as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two RSA public keys (2048 bits, made with `openssl genrsa | openssl rsa -pubout`).
    const KEY_A: &str = "-----BEGIN PUBLIC KEY-----\n\
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAulpukP7BWDYzcRwhEey7\n\
4cM21DflcU+Elfze2nq5KQLQ+9Owo1ZZeYz8DABKCNIr3f+M52oIRw9yjdoLotiv\n\
3s3Dj1ljTU7WJY8wjfaBA9/l9V63WQ8yVKphGW9LH0+A7xrIXKuFR0xqkrWi7Dui\n\
xI03d7KqSHTkLzh+2pefb+EEp9DtFZ5ySO0fujqqT2iQAKSzmpkWnjsU0lOvrY6K\n\
tsbvf2binHOewyfxj8eEHI5Cd59Cfvb3zqfPpqGBRPMg4Cs2zH5BAET4+3SA5QMe\n\
rWQTZ8NmdXi/6Du9aTK/dqbHVg19nfQsxPBNSX5zAUUiLEa7TddNUrPXqrbZRczi\n\
fQIDAQAB\n\
-----END PUBLIC KEY-----";
    const KEY_B: &str = "-----BEGIN PUBLIC KEY-----\n\
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAswuPOITLm4dKOEnOOd40\n\
2u6vsbQjJihyHFRUdP1VzEg7bx6Bc8TL/ajubgikMij9PbQdrmpm4ejGWu7i6YmW\n\
Fbo39T6WIkU3QGjXZUeMwShAUK0QPv7QHYJMdTb7pPOVPUfuanBGwieANPDxPsgb\n\
eNNPlm0IzUuwehRnGDdh0eHwVuHXp/sFue1yrvglvZE68B2lOD1Y2pi+adA2/Tuo\n\
6qemfsAc8WlqDfKD0OcE8AcIEeZXLEm45x46S91jFE/GfsjdtkhEmq20UzunyfNd\n\
t956L0FlYhTQ44sATQubwML9e1CiGUIW4q7YYizsy57/+Z33SrIjbUHECtJoo+D3\n\
wwIDAQAB\n\
-----END PUBLIC KEY-----";

    #[test]
    fn the_registry_key_is_installed_left_alone_when_the_same_and_replaced_when_changed() {
        let config = Config::from_lookup(&|_| None).unwrap();
        let keys = Keys::from_config(&config).unwrap();
        assert!(!keys.has_registry_key());
        assert_eq!(
            keys.set_registry_key(KEY_A.as_bytes()),
            Ok(KeyChange::Installed)
        );
        assert!(keys.has_registry_key());
        assert_eq!(
            keys.set_registry_key(KEY_A.as_bytes()),
            Ok(KeyChange::Unchanged)
        );
        // The same PEM with other surrounding whitespace is the same key.
        assert_eq!(
            keys.set_registry_key(format!("{KEY_A}\n\n").as_bytes()),
            Ok(KeyChange::Unchanged)
        );
        assert_eq!(
            keys.set_registry_key(KEY_B.as_bytes()),
            Ok(KeyChange::Changed)
        );
        assert_eq!(
            keys.set_registry_key(KEY_B.as_bytes()),
            Ok(KeyChange::Unchanged)
        );
        // Garbage changes nothing.
        assert!(keys
            .set_registry_key(b"-----BEGIN PUBLIC KEY-----\nx\n-----END PUBLIC KEY-----")
            .is_err());
        assert_eq!(
            keys.set_registry_key(KEY_B.as_bytes()),
            Ok(KeyChange::Unchanged)
        );
        assert_ne!(
            key_fingerprint(KEY_A.as_bytes()),
            key_fingerprint(KEY_B.as_bytes())
        );
        assert!(key_fingerprint(KEY_A.as_bytes()).starts_with("SHA256:"));
    }
}
