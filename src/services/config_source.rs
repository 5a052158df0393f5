//! Where the settings are read from on a reload: the process environment with `.env`, or
//! a fixed set of variables (tests).

use std::collections::HashMap;
use std::sync::Mutex;

use crate::config::{Config, ConfigError};

/// Where a reload reads its settings: the process environment with `.env`, or a fixed set
/// of variables (tests, which cannot change a shared process environment safely).
pub struct ConfigSource {
    fixed: Mutex<Option<HashMap<String, String>>>,
    /// What `.env` said at the last load, to tell which of its values were edited since.
    dotenv: Mutex<HashMap<String, String>>,
}

impl Default for ConfigSource {
    fn default() -> Self {
        ConfigSource::new()
    }
}

impl ConfigSource {
    pub fn new() -> Self {
        ConfigSource {
            fixed: Mutex::new(None),
            dotenv: Mutex::new(read_dotenv()),
        }
    }

    /// Reload from these variables instead of the environment (`None`: the environment again).
    pub fn set_fixed(&self, vars: Option<HashMap<String, String>>) {
        *lock(&self.fixed) = vars;
    }

    pub fn describe(&self) -> &'static str {
        if lock(&self.fixed).is_some() {
            "fixed variables"
        } else {
            "environment and .env"
        }
    }

    /// Reads and checks the settings.
    ///
    /// The process environment cannot change from outside a running process, and at start-up
    /// `.env` only filled in what the environment did not set; so a value edited in `.env`
    /// since the last load wins, a value removed from it falls back to its default, and
    /// everything else reads as the environment holds it.
    pub fn load(&self) -> Result<Config, ConfigError> {
        if let Some(vars) = lock(&self.fixed).clone() {
            return Config::from_lookup(&move |k| vars.get(k).cloned());
        }
        let fresh = read_dotenv();
        let before = lock(&self.dotenv).clone();
        let config =
            Config::from_lookup(&|k| layered(fresh.get(k), before.get(k), std::env::var(k).ok()))?;
        *lock(&self.dotenv) = fresh;
        Ok(config)
    }
}

/// One variable's value on reload: `.env` now, `.env` at the last load, the environment.
fn layered(now: Option<&String>, then: Option<&String>, env: Option<String>) -> Option<String> {
    match (now, then) {
        // Edited or added in `.env` since the last load.
        (Some(now), then) if then != Some(now) => Some(now.clone()),
        // Removed from `.env`, and the environment holds only what `.env` had put there.
        (None, Some(then)) if env.as_ref() == Some(then) => None,
        _ => env,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// `.env` (found as dotenvy finds it) as a map; none or an unreadable one is empty.
fn read_dotenv() -> HashMap<String, String> {
    match dotenvy::dotenv_iter() {
        Ok(iter) => iter.filter_map(Result::ok).collect(),
        Err(_) => HashMap::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_edit_to_dotenv_wins_and_the_environment_keeps_the_rest() {
        let s = |v: &str| Some(v.to_string());
        let (a, b) = ("1".to_string(), "2".to_string());
        // Edited in .env: the new value, although the environment holds the old one.
        assert_eq!(layered(Some(&b), Some(&a), s("1")), s("2"));
        // Added to .env.
        assert_eq!(layered(Some(&b), None, None), s("2"));
        // Unchanged in .env: whatever won at start-up (the environment's own value).
        assert_eq!(layered(Some(&a), Some(&a), s("9")), s("9"));
        // Removed from .env: back to the default, unless the environment set its own.
        assert_eq!(layered(None, Some(&a), s("1")), None);
        assert_eq!(layered(None, Some(&a), s("9")), s("9"));
        // Never in .env.
        assert_eq!(layered(None, None, s("9")), s("9"));
    }
}
