//! How a setting's value is shown (`check-config`, reload answers): secrets masked, database
//! URLs without their passwords.

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use super::Environment;

/// The JWT secret, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{MASK}\"")
    }
}

/// What a secret's value is shown as.
pub(super) const MASK: &str = "********";

/// A setting's value as `check-config` prints it. A setting whose value must be shown some
/// other way (masked, redacted, a word for "unset") says so in the table with `show:`.
pub(super) trait Shown {
    fn shown(&self) -> String;
}

macro_rules! shown_as_display {
    ($($t:ty),*) => {
        $(impl Shown for $t {
            fn shown(&self) -> String {
                self.to_string()
            }
        })*
    };
}

shown_as_display!(u16, u32, u64, usize, i32, bool, IpAddr, String);

impl Shown for Environment {
    fn shown(&self) -> String {
        self.as_str().to_string()
    }
}

/// Whole seconds (the variables holding durations are named `..._SECONDS`).
impl Shown for Duration {
    fn shown(&self) -> String {
        self.as_secs().to_string()
    }
}

impl Shown for Secret {
    fn shown(&self) -> String {
        MASK.to_string()
    }
}

impl<T: Shown> Shown for Option<T> {
    fn shown(&self) -> String {
        self.as_ref()
            .map_or_else(|| "(unset)".to_string(), Shown::shown)
    }
}

/// A list, comma-separated as it may be written.
impl<T: fmt::Display> Shown for Vec<T> {
    fn shown(&self) -> String {
        self.iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Whether a value that is never shown (a key) is given.
pub(super) fn set_or_unset<T>(value: &Option<T>) -> String {
    match value {
        Some(_) => "(set)".to_string(),
        None => "(unset)".to_string(),
    }
}

/// A database URL with its password replaced, for messages and logs.
/// Both places a PostgreSQL URL may carry a password are masked: the user info and the
/// `password` query parameter. A URL that does not parse still names its host.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut url) => {
            if url.password().is_some() {
                let _ = url.set_password(Some("****"));
            }
            if url.query_pairs().any(|(k, _)| k == "password") {
                let pairs: Vec<(String, String)> = url
                    .query_pairs()
                    .map(|(k, v)| {
                        let v = if k == "password" { "****".into() } else { v };
                        (k.into_owned(), v.into_owned())
                    })
                    .collect();
                url.query_pairs_mut().clear().extend_pairs(pairs);
            }
            url.to_string()
        }
        Err(_) => {
            // Keep the scheme, user and host so the operator sees which server was meant.
            let Some((scheme, rest)) = raw.split_once("://") else {
                return "(unparseable URL)".to_string();
            };
            let (userinfo, host) = match rest.rsplit_once('@') {
                Some((u, h)) => (Some(u), h),
                None => (None, rest),
            };
            let host = host.split(['?', '/']).next().unwrap_or("");
            match userinfo.map(|u| u.split_once(':').map_or(u, |(user, _)| user)) {
                Some(user) => format!("{scheme}://{user}:****@{host}/... (unparseable URL)"),
                None => format!("{scheme}://{host}/... (unparseable URL)"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(
            redact_url("postgres://u:secret@db:5432/x"),
            "postgres://u:****@db:5432/x"
        );
        let q = redact_url("postgres://u@db/x?sslmode=disable&password=secret");
        assert!(
            !q.contains("secret") && q.contains("sslmode=disable"),
            "{q}"
        );
        let bad = redact_url("postgres://u:secret@db:notaport/x");
        assert!(
            !bad.contains("secret") && bad.contains("u:****@db:notaport"),
            "{bad}"
        );
        assert!(!redact_url("postgres://u:sec@ret@db:x/y").contains("sec"));
    }

    #[test]
    fn a_secret_never_prints() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "\"********\"");
        assert_eq!(Some(s).shown(), "********");
        assert_eq!(None::<Secret>.shown(), "(unset)");
    }
}
