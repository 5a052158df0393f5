//! The task a creator gives (`POST /tasks`, `/message`'s `create_task`): its rules, and the
//! defaults it is stored with.

use serde::Deserialize;
use serde_json::Value;

use crate::protocol;
use crate::services::fair_share;
use crate::validation::{length, range, FieldError, Validate};

/// A task's priority when its creator gives none (the spec's default).
pub const DEFAULT_PRIORITY: i64 = 5;
/// A task's retries when its creator gives none (the spec's default).
pub const DEFAULT_MAX_RETRIES: i64 = 3;

/// The payload of `POST /tasks` (and of `/message`'s `create_task`).
///
/// Each field is named as its column of `tasks`; the shared creation insert
/// (`tasks::insert_rows`) takes the settled task ([`NewTask::settled`]) one array per column.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
pub struct NewTask {
    pub task_type: String,
    pub title: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub required_capability: Option<String>,
    #[serde(default)]
    pub priority: Option<i64>,
    #[serde(default)]
    pub max_retries: Option<i64>,
    #[serde(default)]
    pub deadline: Option<String>,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub payload: Option<Value>,
    /// The key the router shares fairly by and an admin's limits apply to (1 to 100
    /// characters, not starting `creator:`); the creator's own key when absent.
    #[serde(default)]
    pub concurrency_key: Option<String>,
}

impl Validate for NewTask {
    fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        length("task_type", &self.task_type, 1, 50, &mut errors);
        length("title", &self.title, 1, 255, &mut errors);
        if let Some(c) = &self.required_capability {
            length("required_capability", c, 0, 100, &mut errors);
        }
        if let Some(k) = &self.concurrency_key {
            length("concurrency_key", k, 1, 100, &mut errors);
            if k.starts_with(fair_share::CREATOR_PREFIX) {
                errors.push(FieldError::new(
                    &["concurrency_key"],
                    "A concurrency_key must not start with 'creator:' (creators' own keys)",
                    "value_error",
                ));
            }
        }
        range("priority", self.priority, 1, 10, &mut errors);
        range("max_retries", self.max_retries, 0, 100, &mut errors);
        if let Some(d) = &self.deadline {
            if protocol::parse_time(d).is_none() {
                errors.push(FieldError::new(
                    &["deadline"],
                    "Input should be a valid datetime (ISO-8601)",
                    "datetime_parsing",
                ));
            }
        }
        if let Some(p) = &self.payload {
            if !p.is_object() && !p.is_null() {
                errors.push(FieldError::new(
                    &["payload"],
                    "Input should be a valid dictionary",
                    "dict_type",
                ));
            }
        }
        errors
    }
}

impl NewTask {
    /// The task as it is stored, once valid: priority 5 and 3 retries when not given, the
    /// payload an object (`{}` for none or null), the deadline in UTC written to the
    /// microsecond as PostgreSQL reads a `timestamp`, and no empty capability.
    pub fn settled(mut self) -> NewTask {
        self.priority = Some(self.priority.unwrap_or(DEFAULT_PRIORITY));
        self.max_retries = Some(self.max_retries.unwrap_or(DEFAULT_MAX_RETRIES));
        self.payload = Some(match self.payload {
            Some(Value::Object(m)) => Value::Object(m),
            _ => Value::Object(Default::default()),
        });
        self.deadline = self
            .deadline
            .as_deref()
            .and_then(protocol::parse_time)
            .map(|d| d.naive_utc().format("%Y-%m-%dT%H:%M:%S%.6f").to_string());
        self.required_capability = self.required_capability.filter(|c| !c.is_empty());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(extra: Value) -> NewTask {
        let mut v = serde_json::json!({"task_type": "t", "title": "a"});
        if let (Value::Object(m), Value::Object(e)) = (&mut v, extra) {
            m.extend(e);
        }
        serde_json::from_value(v).expect("a task")
    }

    /// What the insert binds: the defaults, an object payload, no empty capability, and the
    /// deadline in UTC to the microsecond (cut, as a bound `NaiveDateTime` was).
    #[test]
    fn a_settled_task_is_written_as_it_is_stored() {
        let s = task(serde_json::json!({
            "deadline": "2025-01-18T12:00:00.1234567+02:00",
            "required_capability": "",
            "payload": null,
        }))
        .settled();
        assert_eq!(s.deadline.as_deref(), Some("2025-01-18T10:00:00.123456"));
        assert_eq!((s.priority, s.max_retries), (Some(5), Some(3)));
        assert_eq!(s.payload, Some(serde_json::json!({})));
        assert_eq!(s.required_capability, None);
        let kept = task(serde_json::json!({"priority": 2, "max_retries": 0, "payload": {"x": 1}}))
            .settled();
        assert_eq!((kept.priority, kept.max_retries), (Some(2), Some(0)));
        assert_eq!(kept.payload, Some(serde_json::json!({"x": 1})));
    }
}
