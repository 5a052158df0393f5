//! The claims of the mesh's bearer JWTs, as its issuers write them.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The claims of every token: `{"droplet_id":5,"steward":"Name","permissions":["read"],"iat":..,"exp":..}`.
/// A token names its droplet by `droplet_id`, else by `sub` (`"droplet-5"` or `"5"`), as the
/// mesh's other issuers write it. `permissions` absent (as the Registry issues tokens) is not
/// the same as an empty list: see [`Principal::may_write_own_droplet`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(try_from = "RawClaims")]
pub struct Claims {
    pub droplet_id: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steward: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub permissions: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    pub exp: i64,
    /// `"outbound"` on the tokens the orchestrator sends; such a token is never accepted back.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_use: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
}

/// The claims as they come: ids as integers or strings, times as integers or floats
/// (Python's `time.time() + 3600`).
#[derive(Deserialize)]
struct RawClaims {
    #[serde(default)]
    droplet_id: Option<Value>,
    #[serde(default)]
    sub: Option<Value>,
    #[serde(default)]
    steward: Option<String>,
    #[serde(default)]
    permissions: Option<Vec<String>>,
    #[serde(default)]
    iat: Option<f64>,
    exp: f64,
    #[serde(default)]
    token_use: Option<String>,
    #[serde(default)]
    iss: Option<String>,
    #[serde(default)]
    aud: Option<Value>,
}

/// `5`, `"5"` or `"droplet-5"` as a droplet id.
pub fn parse_droplet_id(value: &Value) -> Option<i32> {
    let n = match value {
        Value::Number(n) => n.as_i64()?,
        Value::String(s) => s.trim().trim_start_matches("droplet-").parse().ok()?,
        _ => return None,
    };
    i32::try_from(n).ok().filter(|n| *n > 0)
}

/// The Registry's documented `sub`, the droplet's host: `drop5.fullpotential.ai` is droplet 5.
fn droplet_of_host(sub: &str) -> Option<i32> {
    let (label, domain) = sub.trim().split_once('.')?;
    let digits = label.strip_prefix("drop")?;
    if domain.is_empty() || digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<i32>().ok().filter(|n| *n > 0)
}

impl TryFrom<RawClaims> for Claims {
    type Error = String;

    fn try_from(raw: RawClaims) -> Result<Claims, String> {
        let droplet_id = match (&raw.droplet_id, &raw.sub) {
            (Some(v), _) if !v.is_null() => {
                parse_droplet_id(v).ok_or("droplet_id is not a droplet id")?
            }
            (_, Some(v)) => parse_droplet_id(v)
                .or_else(|| v.as_str().and_then(droplet_of_host))
                .ok_or("sub is not a droplet id")?,
            _ => return Err("the token names no droplet (droplet_id or sub)".into()),
        };
        if !raw.exp.is_finite() || raw.iat.is_some_and(|i| !i.is_finite()) {
            return Err("exp and iat must be numbers".into());
        }
        Ok(Claims {
            droplet_id,
            sub: raw.sub.map(|v| match v {
                Value::String(s) => s,
                other => other.to_string(),
            }),
            steward: raw.steward,
            permissions: raw.permissions,
            iat: raw.iat.map(|i| i as i64),
            exp: raw.exp as i64,
            token_use: raw.token_use,
            iss: raw.iss,
            aud: raw.aud.map(|v| match v {
                Value::String(s) => s,
                other => other.to_string(),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registrys_host_form_of_sub_names_the_droplet() {
        assert_eq!(droplet_of_host("drop5.fullpotential.ai"), Some(5));
        for bad in [
            "drop5", "drop.x", "dropx5.a", "drop0.a", "drop-5.a", "xdrop5.a", "drop5.",
        ] {
            assert_eq!(droplet_of_host(bad), None, "{bad}");
        }
    }

    #[test]
    fn numeric_string_droplet_ids_are_accepted() {
        let c: Claims = serde_json::from_str(r#"{"droplet_id":"droplet-7","exp":1}"#).unwrap();
        assert_eq!(c.droplet_id, 7);
        let c: Claims = serde_json::from_str(r#"{"sub":"droplet-12","exp":1.5}"#).unwrap();
        assert_eq!((c.droplet_id, c.exp, c.permissions), (12, 1, None));
        let c: Claims = serde_json::from_str(r#"{"sub":"3","exp":1}"#).unwrap();
        assert_eq!(c.droplet_id, 3);
        assert!(serde_json::from_str::<Claims>(r#"{"exp":1}"#).is_err());
        assert!(serde_json::from_str::<Claims>(r#"{"sub":"bob","exp":1}"#).is_err());
    }
}
