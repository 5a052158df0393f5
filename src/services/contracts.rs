//! Capability contracts: a droplet may declare, per capability, a JSON Schema (draft 2020-12)
//! for the task payloads it accepts. A task whose payload no declared contract accepts is
//! refused at creation (422, one entry per violated rule) and never routed to a droplet whose
//! contract refuses it. Schemas are compiled once per distinct text and kept.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::Value;

/// Largest schema one capability may declare, as JSON text.
pub const MAX_SCHEMA_BYTES: usize = 64 * 1024;
/// Compiled schemas kept at most (distinct texts); the cache starts over past it.
const CACHE_LIMIT: usize = 10_000;

pub type Contract = Arc<jsonschema::Validator>;

/// One violated rule: where in the payload (JSON pointer segments) and what is wrong.
#[derive(Debug, Clone, PartialEq)]
pub struct Violation {
    pub path: Vec<String>,
    pub message: String,
}

#[derive(Default)]
pub struct Contracts {
    compiled: Mutex<HashMap<String, Contract>>,
}

impl Contracts {
    pub fn new() -> Contracts {
        Contracts::default()
    }

    /// The compiled contract of a schema, or why it does not compile. Remote `$ref`s are
    /// never fetched (the crate is built without resolvers): such a schema does not compile.
    pub fn compile(&self, schema: &Value) -> Result<Contract, String> {
        let text = schema.to_string();
        if text.len() > MAX_SCHEMA_BYTES {
            return Err(format!(
                "the schema is larger than {MAX_SCHEMA_BYTES} bytes"
            ));
        }
        if let Some(found) = self
            .compiled
            .lock()
            .ok()
            .and_then(|m| m.get(&text).cloned())
        {
            return Ok(found);
        }
        let validator = jsonschema::options()
            .with_draft(jsonschema::Draft::Draft202012)
            .should_validate_formats(true)
            .build(schema)
            .map_err(|e| e.to_string())?;
        let validator = Arc::new(validator);
        if let Ok(mut map) = self.compiled.lock() {
            if map.len() >= CACHE_LIMIT {
                map.clear();
            }
            map.insert(text, validator.clone());
        }
        Ok(validator)
    }

    /// A contract for a stored schema; a schema that no longer compiles accepts nothing.
    pub fn accepts(&self, schema: &Value, payload: &Value) -> bool {
        self.compile(schema)
            .map(|c| c.is_valid(payload))
            .unwrap_or(false)
    }
}

/// Every rule the payload violates.
pub fn violations(contract: &Contract, payload: &Value) -> Vec<Violation> {
    contract
        .iter_errors(payload)
        .map(|e| Violation {
            path: pointer_segments(e.instance_path().as_str()),
            message: e.to_string(),
        })
        .collect()
}

/// `/a/b~1c/0` as `["a", "b/c", "0"]`.
pub fn pointer_segments(pointer: &str) -> Vec<String> {
    pointer
        .split('/')
        .skip(1)
        .map(|s| s.replace("~1", "/").replace("~0", "~"))
        .collect()
}

/// The schemas of every registered droplet that has the capability, one entry per droplet:
/// `None` for a droplet without a contract for it (it accepts any payload).
pub fn verdict<'a>(
    contracts: &Contracts,
    schemas: impl IntoIterator<Item = Option<&'a Value>>,
    payload: &Value,
) -> Result<(), Vec<Violation>> {
    let mut best: Option<Vec<Violation>> = None;
    let mut any = false;
    for schema in schemas {
        any = true;
        let Some(schema) = schema else {
            return Ok(());
        };
        let found = match contracts.compile(schema) {
            Ok(c) => violations(&c, payload),
            Err(e) => vec![Violation {
                path: Vec::new(),
                message: format!("a droplet's contract does not compile: {e}"),
            }],
        };
        if found.is_empty() {
            return Ok(());
        }
        if best.as_ref().is_none_or(|b| found.len() < b.len()) {
            best = Some(found);
        }
    }
    match best {
        Some(v) if any => Err(v),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn verify_schema() -> Value {
        json!({"type": "object", "required": ["code_url"],
               "properties": {"code_url": {"type": "string", "format": "uri"}}})
    }

    #[test]
    fn a_payload_is_checked_against_the_contract_with_pointers() {
        let c = Contracts::new();
        let contract = c.compile(&verify_schema()).unwrap();
        assert!(violations(&contract, &json!({"code_url": "https://x.example/a"})).is_empty());
        let v = violations(&contract, &json!({"code_url": 5}));
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].path, vec!["code_url".to_string()]);
        let v = violations(&contract, &json!({"code_url": "not a uri"}));
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(violations(&contract, &json!({})).len(), 1);
    }

    #[test]
    fn a_bad_schema_does_not_compile() {
        let c = Contracts::new();
        assert!(c.compile(&json!({"type": 12})).is_err());
        assert!(c
            .compile(&json!({"$ref": "https://example.com/schema.json"}))
            .is_err());
    }

    #[test]
    fn one_accepting_droplet_or_one_without_a_contract_is_enough() {
        let c = Contracts::new();
        let strict = verify_schema();
        let loose = json!({"type": "object"});
        let payload = json!({"x": 1});
        assert!(verdict(&c, [Some(&strict)], &payload).is_err());
        assert!(verdict(&c, [Some(&strict), Some(&loose)], &payload).is_ok());
        assert!(verdict(&c, [Some(&strict), None], &payload).is_ok());
        assert!(verdict(&c, Vec::<Option<&Value>>::new(), &payload).is_ok());
    }
}
