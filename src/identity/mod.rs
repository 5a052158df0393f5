//! Who is who: the claims of the mesh's bearer JWTs (HS256 with our secret, RS256 with the
//! Registry's key), the principal a token names and what it may do, and the keys that
//! verify incoming tokens and sign the orchestrator's own. No HTTP here: the edge's
//! extractor (`auth.rs`) turns these into answers.
//!
//! - `claims.rs`: what a token says, as the mesh's issuers write it.
//! - `principal.rs`: who is acting and what they may do (permissions).
//! - `keys.rs`: verifying, signing, the Registry's key and the orchestrator's own tokens.
//! - `verified.rs`: the tokens accepted lately, verified once while they live.

mod claims;
mod keys;
mod principal;
mod verified;

pub use claims::{parse_droplet_id, Claims};
pub use keys::{key_fingerprint, read_pem, KeyChange, Keys, Outbound, OUTBOUND};
pub use principal::{Permission, Principal};

/// A token that cannot be used, or one we could not sign.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Which check failed, in words that carry nothing of the token or the keys.
    #[error("Could not validate credentials: {0}")]
    Invalid(&'static str),
    #[error("signing a token: {0}")]
    Signing(String),
}
