//! Query strings and paths, with 422s that name the parameter.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use serde_json::json;

use super::body::serde_error_entry;
use crate::error::{ApiError, FieldError};
use crate::validation::Validate;

/// Query parameters; a bad one is a 422 at `["query", name]`.
#[derive(Debug, Clone)]
pub struct QueryParams<T>(pub T);

impl<S, T> FromRequestParts<S> for QueryParams<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Validate,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or("");
        let de = serde_urlencoded::Deserializer::new(form_urlencoded_parse(query));
        let value: T = serde_path_to_error::deserialize(de).map_err(|err| {
            let mut loc = vec![json!("query")];
            let path = err.path().to_string();
            if path != "." {
                loc.push(json!(path));
            }
            ApiError::Validation(vec![serde_error_entry(loc, &err.inner().to_string())])
        })?;
        let problems = value.validate();
        if !problems.is_empty() {
            return Err(ApiError::Validation(
                problems
                    .into_iter()
                    .map(|mut p| {
                        p.loc.insert(0, json!("query"));
                        p
                    })
                    .collect(),
            ));
        }
        Ok(QueryParams(value))
    }
}

fn form_urlencoded_parse(query: &str) -> url::form_urlencoded::Parse<'_> {
    url::form_urlencoded::parse(query.as_bytes())
}

/// A path parameter; a bad one is a 422 at `["path", name]`.
#[derive(Debug, Clone, Copy)]
pub struct PathParam<T>(pub T);

impl<S, T> FromRequestParts<S> for PathParam<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Send,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        use axum::extract::path::ErrorKind;
        use axum::extract::rejection::PathRejection;
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(PathParam(v)),
            Err(PathRejection::FailedToDeserializePathParams(e)) => {
                // A single value's error carries no key: name the route's own parameter
                // (`task_id`, `droplet_id`), as FastAPI does.
                let route_key = axum::extract::RawPathParams::from_request_parts(parts, state)
                    .await
                    .ok()
                    .and_then(|raw| raw.iter().next().map(|(k, _)| k.to_string()))
                    .unwrap_or_else(|| "id".to_string());
                let (key, msg) = match e.kind() {
                    ErrorKind::ParseErrorAtKey {
                        key,
                        value,
                        expected_type,
                    } => (
                        key.clone(),
                        format!(
                            "Input should be a valid {}, got {value:?}",
                            type_word(expected_type)
                        ),
                    ),
                    ErrorKind::ParseError {
                        value,
                        expected_type,
                    } => (
                        route_key,
                        format!(
                            "Input should be a valid {}, got {value:?}",
                            type_word(expected_type)
                        ),
                    ),
                    other => (route_key, other.to_string()),
                };
                Err(ApiError::Validation(vec![FieldError {
                    loc: vec![json!("path"), json!(key)],
                    msg,
                    kind: "int_parsing".into(),
                }]))
            }
            Err(other) => Err(ApiError::invalid(
                &["path"],
                other.body_text(),
                "value_error",
            )),
        }
    }
}

/// FastAPI's word for a Rust type in a message: `integer` for `i32`, not the Rust name.
fn type_word(rust_type: &str) -> &str {
    let numeric = rust_type
        .get(1..)
        .is_some_and(|bits| !bits.is_empty() && bits.chars().all(|c| c.is_ascii_digit()));
    match rust_type.chars().next() {
        Some('i' | 'u') if numeric => "integer",
        Some('f') if numeric => "number",
        _ => rust_type,
    }
}
