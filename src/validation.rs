//! Validation shared by the HTTP edge and the services: the FastAPI-shaped field error
//! droplets already parse, and the rules a payload checks after it deserialized.

use serde::Serialize;
use serde_json::{json, Map, Value};

/// One entry of a FastAPI-shaped 422: `{"loc":["body","trace_id"],"msg":"Field required","type":"missing"}`.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct FieldError {
    pub loc: Vec<serde_json::Value>,
    pub msg: String,
    #[serde(rename = "type")]
    pub kind: String,
}

impl FieldError {
    pub fn new(loc: &[&str], msg: impl Into<String>, kind: &str) -> Self {
        FieldError {
            loc: loc.iter().map(|s| json!(s)).collect(),
            msg: msg.into(),
            kind: kind.to_string(),
        }
    }

    pub fn missing(loc: &[&str]) -> Self {
        FieldError::new(loc, "Field required", "missing")
    }
}

/// Business rules a payload checks after it deserialized; locations are relative to the payload.
pub trait Validate {
    fn validate(&self) -> Vec<FieldError> {
        Vec::new()
    }
}

impl Validate for Value {}
impl Validate for Map<String, Value> {}

/// A string's length in characters within `min..=max`.
pub fn length(
    loc: &'static str,
    value: &str,
    min: usize,
    max: usize,
    errors: &mut Vec<FieldError>,
) {
    let n = value.chars().count();
    if n < min {
        errors.push(FieldError::new(
            &[loc],
            format!("String should have at least {min} character(s)"),
            "string_too_short",
        ));
    } else if n > max {
        errors.push(FieldError::new(
            &[loc],
            format!("String should have at most {max} characters"),
            "string_too_long",
        ));
    }
}

/// A number within `min..=max`, when given.
pub fn range(
    loc: &'static str,
    value: Option<i64>,
    min: i64,
    max: i64,
    errors: &mut Vec<FieldError>,
) {
    if let Some(v) = value {
        if v < min || v > max {
            errors.push(FieldError::new(
                &[loc],
                format!("Input should be between {min} and {max}, got {v}"),
                if v < min {
                    "greater_than_equal"
                } else {
                    "less_than_equal"
                },
            ));
        }
    }
}
