//! `POST /token`: mints HS256 tokens; open in development, admin-only otherwise, and never
//! grants more than the caller has.

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::auth::{Caller, Permission};
use crate::error::{ApiError, ApiResult, FieldError};
use crate::state::AppState;
use crate::udc::{JsonBody, Validate};

pub fn router() -> Router<AppState> {
    Router::new().route("/token", post(mint))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct TokenRequest {
    pub droplet_id: i64,
    #[serde(default)]
    pub steward: Option<String>,
    #[serde(default = "default_permissions")]
    pub permissions: Vec<String>,
    #[serde(default)]
    pub expires_in: Option<u64>,
}

fn default_permissions() -> Vec<String> {
    vec!["read".into()]
}

impl Validate for TokenRequest {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if self.droplet_id < 1 || self.droplet_id > i64::from(i32::MAX) {
            errors.push(FieldError::new(
                &["droplet_id"],
                "Input should be a positive 32-bit integer",
                "greater_than_equal",
            ));
        }
        for (i, p) in self.permissions.iter().enumerate() {
            if Permission::parse(p).is_none() {
                errors.push(FieldError {
                    loc: vec![json!("permissions"), json!(i)],
                    msg: "Input should be 'read', 'write' or 'admin'".into(),
                    kind: "enum".into(),
                });
            }
        }
        if self
            .expires_in
            .is_some_and(|e| e == 0 || e > 10 * 365 * 86_400)
        {
            errors.push(FieldError::new(
                &["expires_in"],
                "Input should be between 1 and 315360000 seconds",
                "less_than_equal",
            ));
        }
        errors
    }
}

/// The caller when a bearer token is present (and valid); no token is fine here.
pub struct MaybeCaller(pub Option<Caller>);

impl FromRequestParts<AppState> for MaybeCaller {
    type Rejection = ApiError;
    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        if crate::auth::bearer(parts).is_none() {
            return Ok(MaybeCaller(None));
        }
        Caller::from_request_parts(parts, state)
            .await
            .map(|c| MaybeCaller(Some(c)))
    }
}

/// `POST /token`'s answer (bare JSON, as FastAPI's OAuth2 token answers).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TokenAnswer {
    pub access_token: String,
    /// Always `bearer`.
    pub token_type: &'static str,
    /// Seconds until it expires.
    pub expires_in: u64,
}

#[utoipa::path(post, path = "/token", tag = "auth", request_body = TokenRequest,
    responses((status = 200, description = "A bearer token", body = TokenAnswer), (status = 401, description = "Admin token required outside development"), (status = 403, description = "More than the caller has"), (status = 422, description = "Validation")))]
pub async fn mint(
    State(state): State<AppState>,
    MaybeCaller(caller): MaybeCaller,
    JsonBody(req): JsonBody<TokenRequest>,
) -> ApiResult<Json<TokenAnswer>> {
    let wanted: Vec<Permission> = req
        .permissions
        .iter()
        .filter_map(|p| Permission::parse(p))
        .collect();
    let open = state.config().token_endpoint_open();
    match &caller {
        None if !open => return Err(ApiError::Unauthenticated),
        Some(c) if !open && !c.is_admin() => {
            return Err(ApiError::forbidden(
                "Missing permission: admin (required to mint tokens)",
            ))
        }
        Some(c) => {
            // Never more than the caller has.
            if let Some(extra) = wanted.iter().find(|p| !c.has(**p)) {
                return Err(ApiError::forbidden(format!(
                    "Cannot grant permission {} that the calling token does not have",
                    extra.as_str()
                )));
            }
        }
        None => {}
    }
    if req.droplet_id == i64::from(state.keys.orchestrator_id()) {
        return Err(ApiError::invalid(
            &["body", "droplet_id"],
            format!(
                "droplet_id {} is the orchestrator's own; no token may act as it",
                req.droplet_id
            ),
            "value_error",
        ));
    }
    let expires_in = req.expires_in.unwrap_or(state.keys.default_expiration());
    let token = state.keys.mint(
        req.droplet_id as i32,
        req.steward.clone(),
        &wanted,
        expires_in,
    )?;
    Ok(Json(TokenAnswer {
        access_token: token,
        token_type: "bearer",
        expires_in,
    }))
}
