//! Who is acting: a token's droplet and what it may do.

use super::Claims;

/// What a token may do: `read`, `write` (includes read) or `admin` (everything).
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

/// Who is acting: a token's droplet and what it may do (the HTTP edge's `Caller` wraps it;
/// services see only this).
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    pub droplet_id: i32,
    pub steward: Option<String>,
    pub permissions: Vec<Permission>,
    /// False when the token had no `permissions` claim at all (as the Registry issues them).
    pub permissions_claimed: bool,
    /// When the token expires (epoch seconds); WebSockets close then.
    pub expires_at: i64,
}

impl Principal {
    pub fn from_claims(claims: &Claims) -> Principal {
        let mut permissions: Vec<Permission> = claims
            .permissions
            .iter()
            .flatten()
            .filter_map(|p| Permission::parse(p))
            .collect();
        permissions.sort();
        permissions.dedup();
        Principal {
            droplet_id: claims.droplet_id,
            steward: claims.steward.clone(),
            permissions,
            permissions_claimed: claims.permissions.is_some(),
            expires_at: claims.exp,
        }
    }

    /// Registering and heartbeating one's own droplet: `write`, or a token with no
    /// `permissions` claim at all (the Registry vouches for the droplet's identity). A token
    /// whose permissions lack `write` (a read-only dashboard token) may not.
    pub fn may_write_own_droplet(&self) -> bool {
        !self.permissions_claimed || self.has(Permission::Write)
    }

    /// Non-admin tokens act only as their own droplet.
    pub fn may_act_as(&self, droplet_id: i32) -> bool {
        self.is_admin() || self.droplet_id == droplet_id
    }

    /// The refusal of acting as another droplet, in the contract's words.
    pub fn not_as(&self, droplet_id: i32) -> String {
        format!(
            "Token of droplet {} cannot act as droplet {droplet_id}",
            self.droplet_id
        )
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

    /// How history rows name this caller: `admin-1` or `droplet-8`.
    pub fn actor_name(&self) -> String {
        if self.is_admin() {
            format!("admin-{}", self.droplet_id)
        } else {
            format!("droplet-{}", self.droplet_id)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(perms: &[Permission]) -> Principal {
        Principal {
            droplet_id: 5,
            steward: None,
            permissions: perms.to_vec(),
            permissions_claimed: true,
            expires_at: i64::MAX,
        }
    }

    #[test]
    fn admin_has_everything_and_write_includes_read() {
        assert!(principal(&[Permission::Admin]).has(Permission::Write));
        assert!(principal(&[Permission::Write]).has(Permission::Read));
        assert!(!principal(&[Permission::Read]).has(Permission::Write));
        assert!(!principal(&[Permission::Write]).has(Permission::Admin));
    }
}
