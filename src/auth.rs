//! Bearer JWTs: verification (HS256 with our secret, RS256 with the Registry's key),
//! the caller extractor, permissions, and the tokens the orchestrator signs.

use std::sync::RwLock;

use axum::extract::FromRequestParts;
use axum::http::{header, request::Parts};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Deserializer, Serialize};

use crate::config::Config;
use crate::error::ApiError;
use crate::state::AppState;
use crate::udc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Permission {
    Read,
    Write,
    Admin,
}

impl Permission {
    pub fn as_str(self) -> &'static str {
        match self {
            Permission::Read => "read",
            Permission::Write => "write",
            Permission::Admin => "admin",
        }
    }

    pub fn parse(raw: &str) -> Option<Permission> {
        match raw.trim().to_ascii_lowercase().as_str() {
            "read" => Some(Permission::Read),
            "write" => Some(Permission::Write),
            "admin" => Some(Permission::Admin),
            _ => None,
        }
    }
}

/// The claims of every token: `{"droplet_id":5,"steward":"Name","permissions":["read"],"iat":..,"exp":..}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Claims {
    #[serde(deserialize_with = "int_or_numeric_string")]
    pub droplet_id: i32,
    #[serde(default)]
    pub steward: Option<String>,
    #[serde(default)]
    pub permissions: Vec<String>,
    #[serde(default)]
    pub iat: Option<i64>,
    pub exp: i64,
}

fn int_or_numeric_string<'de, D: Deserializer<'de>>(d: D) -> Result<i32, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(i64),
        Str(String),
    }
    let n = match Raw::deserialize(d)? {
        Raw::Int(n) => n,
        Raw::Str(s) => s
            .trim_start_matches("droplet-")
            .parse()
            .map_err(serde::de::Error::custom)?,
    };
    i32::try_from(n).map_err(serde::de::Error::custom)
}

/// Who is calling: the token's droplet and what it may do.
#[derive(Debug, Clone, PartialEq)]
pub struct Caller {
    pub droplet_id: i32,
    pub steward: Option<String>,
    pub permissions: Vec<Permission>,
}

impl Caller {
    pub fn from_claims(claims: &Claims) -> Caller {
        let mut permissions: Vec<Permission> = claims
            .permissions
            .iter()
            .filter_map(|p| Permission::parse(p))
            .collect();
        permissions.sort();
        permissions.dedup();
        Caller {
            droplet_id: claims.droplet_id,
            steward: claims.steward.clone(),
            permissions,
        }
    }

    pub fn is_admin(&self) -> bool {
        self.permissions.contains(&Permission::Admin)
    }

    /// Admin may do everything; write includes read.
    pub fn has(&self, needed: Permission) -> bool {
        self.is_admin()
            || self.permissions.contains(&needed)
            || (needed == Permission::Read && self.permissions.contains(&Permission::Write))
    }

    pub fn require(&self, needed: Permission) -> Result<(), ApiError> {
        if self.has(needed) {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "Missing permission: {} (token has: {})",
                needed.as_str(),
                if self.permissions.is_empty() {
                    "none".to_string()
                } else {
                    self.permissions
                        .iter()
                        .map(|p| p.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            )))
        }
    }

    /// Non-admin tokens act only as their own droplet.
    pub fn require_self_or_admin(&self, droplet_id: i32) -> Result<(), ApiError> {
        if self.is_admin() || self.droplet_id == droplet_id {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "Token of droplet {} cannot act as droplet {droplet_id}",
                self.droplet_id
            )))
        }
    }

    /// How history rows name this caller: `admin-1` or `droplet-8`.
    pub fn actor_name(&self) -> String {
        if self.is_admin() {
            format!("admin-{}", self.droplet_id)
        } else {
            format!("droplet-{}", self.droplet_id)
        }
    }
}

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
    rs_decode: RwLock<Option<DecodingKey>>,
    rs_encode: Option<EncodingKey>,
    hs_validation: Validation,
    rs_validation: Validation,
    expiration_seconds: u64,
    orchestrator_id: i32,
    orchestrator_steward: String,
}

impl Keys {
    pub fn from_config(config: &Config) -> Result<Keys, String> {
        let secret = config.jwt_secret_key.expose().as_bytes();
        let rs_decode = match &config.registry_public_key {
            Some(v) => Some(
                DecodingKey::from_rsa_pem(&read_pem(v)?)
                    .map_err(|e| format!("REGISTRY_PUBLIC_KEY: not an RSA public key: {e}"))?,
            ),
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
        })
    }

    /// Installs the Registry's public key fetched at run time (when none was configured).
    pub fn set_registry_key(&self, pem: &[u8]) -> Result<(), String> {
        let key = DecodingKey::from_rsa_pem(pem).map_err(|e| e.to_string())?;
        if let Ok(mut slot) = self.rs_decode.write() {
            *slot = Some(key);
        }
        Ok(())
    }

    pub fn has_registry_key(&self) -> bool {
        self.rs_decode.read().map(|k| k.is_some()).unwrap_or(false)
    }

    /// Verifies a token: the key that verifies it decides the algorithm, never the header alone.
    pub fn verify(&self, token: &str) -> Result<Claims, ApiError> {
        if let Ok(data) =
            jsonwebtoken::decode::<Claims>(token, &self.hs_decode, &self.hs_validation)
        {
            return Ok(data.claims);
        }
        if let Ok(guard) = self.rs_decode.read() {
            if let Some(key) = guard.as_ref() {
                if let Ok(data) = jsonwebtoken::decode::<Claims>(token, key, &self.rs_validation) {
                    return Ok(data.claims);
                }
            }
        }
        Err(ApiError::InvalidCredentials)
    }

    /// Signs a token with our HS256 secret.
    pub fn mint(
        &self,
        droplet_id: i32,
        steward: Option<String>,
        permissions: &[Permission],
        expires_in: u64,
    ) -> Result<String, ApiError> {
        let now = chrono::Utc::now().timestamp();
        let claims = Claims {
            droplet_id,
            steward,
            permissions: permissions.iter().map(|p| p.as_str().to_string()).collect(),
            iat: Some(now),
            exp: now + expires_in.min(i64::MAX as u64 / 2) as i64,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.hs_encode)
            .map_err(ApiError::internal)
    }

    pub fn default_expiration(&self) -> u64 {
        self.expiration_seconds
    }

    /// The token the orchestrator sends to droplets: RS256 with our private key when one
    /// is configured, else HS256.
    pub fn orchestrator_token(&self) -> Result<String, ApiError> {
        let now = chrono::Utc::now().timestamp();
        let claims = Claims {
            droplet_id: self.orchestrator_id,
            steward: Some(self.orchestrator_steward.clone()),
            permissions: vec!["read".into(), "write".into()],
            iat: Some(now),
            exp: now + 3600,
        };
        match &self.rs_encode {
            Some(key) => jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, key),
            None => jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.hs_encode),
        }
        .map_err(ApiError::internal)
    }
}

fn pinned_validation(alg: Algorithm) -> Validation {
    let mut v = Validation::new(alg);
    v.algorithms = vec![alg];
    v.set_required_spec_claims(&["exp"]);
    v.validate_exp = true;
    v.leeway = 30;
    v
}

/// The bearer token of a request, if it has one.
pub fn bearer(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        if let Some(caller) = parts.extensions.get::<Caller>() {
            return Ok(caller.clone());
        }
        let token = bearer(parts).ok_or(ApiError::Unauthenticated)?;
        let claims = state.keys.verify(token)?;
        let caller = Caller::from_claims(&claims);
        udc::set_caller(caller.droplet_id);
        parts.extensions.insert(caller.clone());
        Ok(caller)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(perms: &[Permission]) -> Caller {
        Caller {
            droplet_id: 5,
            steward: None,
            permissions: perms.to_vec(),
        }
    }

    #[test]
    fn admin_has_everything_and_write_includes_read() {
        assert!(caller(&[Permission::Admin]).has(Permission::Write));
        assert!(caller(&[Permission::Write]).has(Permission::Read));
        assert!(!caller(&[Permission::Read]).has(Permission::Write));
        assert!(!caller(&[Permission::Write]).has(Permission::Admin));
    }

    #[test]
    fn droplets_act_only_as_themselves() {
        assert!(caller(&[Permission::Write])
            .require_self_or_admin(5)
            .is_ok());
        assert!(caller(&[Permission::Write])
            .require_self_or_admin(6)
            .is_err());
        assert!(caller(&[Permission::Admin])
            .require_self_or_admin(6)
            .is_ok());
    }

    #[test]
    fn numeric_string_droplet_ids_are_accepted() {
        let c: Claims = serde_json::from_str(r#"{"droplet_id":"droplet-7","exp":1}"#).unwrap();
        assert_eq!(c.droplet_id, 7);
    }
}
