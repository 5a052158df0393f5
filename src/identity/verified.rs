//! Tokens verified lately, so that the same token shown thousands of times a second (a
//! droplet's, on each of its requests) is verified once, not at each request: the claims
//! of each accepted token, keyed by the token itself, held until the token expires.
//!
//! Only accepted tokens are held, and a held one is used only while it would still verify:
//! its signature verified once and does not change, a token valid once stays past its
//! `nbf`, and its `exp` is checked at each use (with less leeway than the full check, so a
//! token at its end goes through the full check, which decides). A change of the Registry's
//! key forgets every token ([`Verified::forget_all`]): one signed with the old key is then
//! refused, as without this cache. Bounded: a token longer than [`MAX_TOKEN_BYTES`] is not
//! held, and at [`MAX_TOKENS`] the expired ones are dropped, or all when none is.

use std::collections::HashMap;
use std::sync::Mutex;

use super::Claims;

/// Most tokens held.
pub const MAX_TOKENS: usize = 4096;
/// Longer tokens are verified each time (a droplet's token is a few hundred bytes).
pub const MAX_TOKEN_BYTES: usize = 2048;

#[derive(Default)]
pub struct Verified {
    held: Mutex<Held>,
}

#[derive(Default)]
struct Held {
    tokens: HashMap<Box<str>, Claims>,
    /// Counts [`Verified::forget_all`]: a token verified before a change of keys and held
    /// after it is not held.
    generation: u64,
}

impl Verified {
    /// The claims of `token` if it was accepted and is still usable at `now` (Unix seconds)
    /// with `leeway` seconds past its `exp`.
    pub fn get(&self, token: &str, now: i64, leeway: i64) -> Option<Claims> {
        let held = self.lock();
        let claims = held.tokens.get(token)?;
        // The full check accepts while `exp >= now - leeway`; a held token stops a second
        // before (and `exp` was rounded down when read), so the full check has the last word.
        (now < claims.exp.saturating_add(leeway)).then(|| claims.clone())
    }

    /// Where the keys stand: take it before verifying a token, give it to [`Verified::hold`].
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Holds an accepted token's claims, unless the keys changed since `generation`.
    pub fn hold(&self, token: &str, claims: &Claims, now: i64, generation: u64) {
        if token.len() > MAX_TOKEN_BYTES {
            return;
        }
        let mut held = self.lock();
        if held.generation != generation {
            return;
        }
        let tokens = &mut held.tokens;
        if tokens.len() >= MAX_TOKENS && !tokens.contains_key(token) {
            tokens.retain(|_, c| now < c.exp);
            if tokens.len() >= MAX_TOKENS {
                tokens.clear();
            }
        }
        tokens.insert(token.into(), claims.clone());
    }

    /// Forgets every token (the keys that verified them changed).
    pub fn forget_all(&self) {
        let mut held = self.lock();
        held.generation += 1;
        held.tokens.clear();
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().tokens.len()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.lock().tokens.is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        match self.held.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: i64) -> Claims {
        Claims {
            droplet_id: 5,
            sub: None,
            steward: None,
            permissions: Some(vec!["read".into()]),
            iat: None,
            exp,
            token_use: None,
            iss: None,
            aud: None,
        }
    }

    #[test]
    fn a_held_token_is_used_until_it_expires_then_checked_in_full() {
        let v = Verified::default();
        v.hold("t", &claims(1000), 900, 0);
        assert_eq!(v.get("t", 900, 30), Some(claims(1000)));
        assert_eq!(v.get("t", 1029, 30), Some(claims(1000)));
        assert_eq!(v.get("t", 1030, 30), None);
        assert_eq!(v.get("other", 900, 30), None);
    }

    #[test]
    fn it_stays_bounded() {
        let v = Verified::default();
        for i in 0..MAX_TOKENS {
            let exp = if i % 2 == 0 { 100 } else { 1000 };
            v.hold(&format!("t{i}"), &claims(exp), 50, 0);
        }
        assert_eq!(v.len(), MAX_TOKENS);
        // Full: the expired half goes.
        v.hold("new", &claims(1000), 500, 0);
        assert_eq!(v.len(), MAX_TOKENS / 2 + 1);
        assert!(v.get("t1", 500, 0).is_some());
        // Full of live tokens: all go.
        for i in 0..MAX_TOKENS {
            v.hold(&format!("u{i}"), &claims(1000), 500, 0);
        }
        assert!(v.len() <= MAX_TOKENS);
        v.hold(&"x".repeat(MAX_TOKEN_BYTES + 1), &claims(1000), 500, 0);
        assert!(v.get(&"x".repeat(MAX_TOKEN_BYTES + 1), 500, 0).is_none());
        v.forget_all();
        assert!(v.is_empty());
        // Verified before the keys changed, offered after: not held.
        v.hold("late", &claims(1000), 500, 0);
        assert!(v.get("late", 500, 0).is_none());
        v.hold("late", &claims(1000), 500, v.generation());
        assert!(v.get("late", 500, 0).is_some());
    }
}
