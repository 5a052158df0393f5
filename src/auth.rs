//! The HTTP edge of identity: the bearer token of a request, the `Caller` extractor (a
//! verified [`Principal`]) and the permission checks that answer 403. Tokens, claims and
//! keys are in `crate::identity`.

use std::ops::Deref;

use axum::extract::FromRequestParts;
use axum::http::{header, request::Parts};

pub use crate::identity::{
    parse_droplet_id, read_pem, Claims, Keys, Outbound, Permission, Principal, TokenError, OUTBOUND,
};

use crate::error::ApiError;
use crate::state::AppState;
use crate::udc;

/// Who is calling: a verified principal, with the checks that answer 403.
#[derive(Debug, Clone, PartialEq)]
pub struct Caller(pub Principal);

impl Deref for Caller {
    type Target = Principal;
    fn deref(&self) -> &Principal {
        &self.0
    }
}

impl Caller {
    pub fn from_claims(claims: &Claims) -> Caller {
        Caller(Principal::from_claims(claims))
    }

    /// Registering and heartbeating one's own droplet: see
    /// [`Principal::may_write_own_droplet`].
    pub fn require_droplet_write(&self) -> Result<(), ApiError> {
        if self.may_write_own_droplet() {
            Ok(())
        } else {
            self.require(Permission::Write)
        }
    }

    /// Reading tasks: `read`, or (a token with no `permissions` claim, as the Registry issues
    /// them) the tasks assigned to the caller's own droplet. `assigned_to` is the droplet the
    /// read is confined to: the listing's `assigned_droplet_id` filter, or the task's holder.
    pub fn require_task_read(&self, assigned_to: Option<i32>) -> Result<(), ApiError> {
        if self.has(Permission::Read)
            || (!self.permissions_claimed && assigned_to == Some(self.droplet_id))
        {
            return Ok(());
        }
        if self.permissions_claimed {
            return self.require(Permission::Read);
        }
        Err(ApiError::forbidden(format!(
            "Missing permission: read (token has: none); a token without permissions reads only \
             the tasks assigned to its own droplet (assigned_droplet_id={})",
            self.droplet_id
        )))
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
        if self.may_act_as(droplet_id) {
            Ok(())
        } else {
            Err(ApiError::forbidden(self.not_as(droplet_id)))
        }
    }
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
        Caller(Principal {
            droplet_id: 5,
            steward: None,
            permissions: perms.to_vec(),
            permissions_claimed: true,
            expires_at: i64::MAX,
        })
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
        assert!(caller(&[Permission::Read])
            .require(Permission::Write)
            .is_err());
    }
}
