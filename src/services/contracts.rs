//! Capability contracts: a droplet may declare, per capability, a JSON Schema (draft 2020-12)
//! for the task payloads it accepts. A task whose payload no declared contract accepts is
//! refused at creation (422, one entry per violated rule) and never routed to a droplet whose
//! contract refuses it.
//!
//! A contract costs bounded time. Its regular expressions (`pattern`, `patternProperties`,
//! wherever they sit, `propertyNames` and `additionalProperties` included) compile to Rust's
//! linear-time `regex` dialect: a pattern it cannot run (a backreference, look-around) or whose
//! compiled form is too large refuses the schema at registration, with the JSON pointer of the
//! keyword. A schema has caps on its size, its patterns and its nesting. Evaluations run off
//! the async workers (callers use `spawn_blocking`) under a time budget ([`BUDGET`]), through a
//! [`Memo`] that evaluates one contract once per payload: droplets sharing one schema text
//! share one compiled [`Contract`] (the cache is keyed by the text), hence one evaluation.
//!
//! A directory of the capable droplets' contracts (issue 26) can keep the [`Contract`]s
//! [`Contracts::compile`] hands out: the same text gives the same `Arc`, which is what a
//! [`Memo`] keys on.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::IntCounterVec;
use serde_json::Value;

/// Largest schema one capability may declare, as JSON text.
pub const MAX_SCHEMA_BYTES: usize = 64 * 1024;
/// Regular expressions one schema may hold (`pattern` values and `patternProperties` keys).
pub const MAX_PATTERNS: usize = 32;
/// Deepest nesting of objects and arrays in one schema.
pub const MAX_SCHEMA_DEPTH: usize = 32;
/// Largest compiled form of one regular expression, in bytes.
pub const MAX_REGEX_BYTES: usize = 256 * 1024;
/// Time one creation, one routing pass or one explanation may spend evaluating contracts; a
/// contract not evaluated in time counts as refusing.
pub const BUDGET: Duration = Duration::from_secs(1);
/// Compiled schemas kept at most (distinct texts); the cache starts over past it.
const CACHE_LIMIT: usize = 10_000;

pub type Contract = Arc<jsonschema::Validator>;

/// One violated rule: where in the payload (JSON pointer segments) and what is wrong.
#[derive(Debug, Clone, PartialEq)]
pub struct Violation {
    pub path: Vec<String>,
    pub message: String,
}

/// Why a schema is refused: where in the schema (a JSON pointer, when known) and why.
#[derive(Debug, Clone, PartialEq)]
pub struct SchemaError {
    pub pointer: Option<String>,
    pub message: String,
}

impl std::fmt::Display for SchemaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.pointer {
            Some(p) => write!(f, "at {p:?}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl SchemaError {
    fn whole(message: impl Into<String>) -> SchemaError {
        SchemaError {
            pointer: None,
            message: message.into(),
        }
    }
}

/// Who evaluates: the label of `orchestrator_contract_evaluations_total`.
#[derive(Debug, Clone, Copy)]
pub enum Site {
    Creation,
    Routing,
    Explain,
}

impl Site {
    fn label(self) -> &'static str {
        match self {
            Site::Creation => "creation",
            Site::Routing => "routing",
            Site::Explain => "explain",
        }
    }
}

pub struct Contracts {
    /// By schema text: its contract, or why it is refused (a schema stored before a rule that
    /// now refuses it is not compiled again each pass).
    compiled: Mutex<HashMap<String, Result<Contract, SchemaError>>>,
    /// Evaluations of a contract against a payload, by site.
    evaluations: IntCounterVec,
}

impl Contracts {
    pub fn new(evaluations: IntCounterVec) -> Contracts {
        Contracts {
            compiled: Mutex::new(HashMap::new()),
            evaluations,
        }
    }

    /// The compiled contract of a schema, or why it is refused. Remote `$ref`s are never
    /// fetched (the crate is built without resolvers): such a schema does not compile.
    /// Compiling may take milliseconds: call it off the async workers.
    pub fn compile(&self, schema: &Value) -> Result<Contract, SchemaError> {
        let text = schema.to_string();
        if text.len() > MAX_SCHEMA_BYTES {
            return Err(SchemaError::whole(format!(
                "the schema is larger than {MAX_SCHEMA_BYTES} bytes"
            )));
        }
        if let Some(found) = self
            .compiled
            .lock()
            .ok()
            .and_then(|m| m.get(&text).cloned())
        {
            return found;
        }
        let compiled = check_shape(schema).and_then(|()| {
            jsonschema::options()
                .with_draft(jsonschema::Draft::Draft202012)
                .should_validate_formats(true)
                .with_pattern_options(
                    jsonschema::PatternOptions::regex().size_limit(MAX_REGEX_BYTES),
                )
                .build(schema)
                .map(Arc::new)
                .map_err(|e| describe(schema, &e))
        });
        if let Ok(mut map) = self.compiled.lock() {
            if map.len() >= CACHE_LIMIT {
                map.clear();
            }
            map.insert(text, compiled.clone());
        }
        compiled
    }

    /// Verdicts for one unit of work (a creation, a routing pass, an explanation), within
    /// [`BUDGET`] from now.
    pub fn memo<K>(&self, site: Site) -> Memo<'_, K> {
        Memo {
            contracts: self,
            site,
            deadline: Instant::now() + BUDGET,
            accepted: HashMap::new(),
            violated: HashMap::new(),
            over_budget: false,
        }
    }

    fn count(&self, site: Site) {
        self.evaluations.with_label_values(&[site.label()]).inc();
    }
}

/// The verdicts of one unit of work: each contract is evaluated at most once per payload key
/// (contracts are told apart by identity, and one schema text has one [`Contract`]); past the
/// deadline nothing more is evaluated and an unevaluated contract refuses (logged once).
pub struct Memo<'a, K> {
    contracts: &'a Contracts,
    site: Site,
    deadline: Instant,
    accepted: HashMap<(usize, K), bool>,
    violated: HashMap<(usize, K), Vec<Violation>>,
    over_budget: bool,
}

impl<K: Hash + Eq + Copy> Memo<'_, K> {
    /// Whether the contract accepts the payload known by `key`.
    pub fn accepts(&mut self, contract: &Contract, key: K, payload: &Value) -> bool {
        let id = (Arc::as_ptr(contract) as usize, key);
        if let Some(v) = self.accepted.get(&id) {
            return *v;
        }
        if let Some(v) = self.violated.get(&id) {
            return v.is_empty();
        }
        let verdict = !self.spent() && {
            self.contracts.count(self.site);
            contract.is_valid(payload)
        };
        self.accepted.insert(id, verdict);
        verdict
    }

    /// Every rule the payload known by `key` violates (empty: accepted), or `None` when the
    /// budget ran out before it was evaluated.
    pub fn violations(
        &mut self,
        contract: &Contract,
        key: K,
        payload: &Value,
    ) -> Option<Vec<Violation>> {
        let id = (Arc::as_ptr(contract) as usize, key);
        if let Some(v) = self.violated.get(&id) {
            return Some(v.clone());
        }
        if self.spent() {
            return None;
        }
        self.contracts.count(self.site);
        let found = violations(contract, payload);
        self.violated.insert(id, found.clone());
        Some(found)
    }

    /// Whether some contract was left unevaluated for lack of time.
    pub fn over_budget(&self) -> bool {
        self.over_budget
    }

    fn spent(&mut self) -> bool {
        if self.over_budget {
            return true;
        }
        if Instant::now() < self.deadline {
            return false;
        }
        self.over_budget = true;
        tracing::warn!(
            site = self.site.label(),
            budget_ms = BUDGET.as_millis() as u64,
            "contract evaluation over its time budget: the contracts not yet evaluated refuse"
        );
        true
    }

    #[cfg(test)]
    fn expire(&mut self) {
        self.deadline = Instant::now();
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

fn escape_segment(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

/// The caps on patterns and nesting, checked before compiling.
fn check_shape(schema: &Value) -> Result<(), SchemaError> {
    fn walk(
        v: &Value,
        depth: usize,
        pointer: &mut String,
        patterns: &mut usize,
    ) -> Result<(), SchemaError> {
        if depth > MAX_SCHEMA_DEPTH {
            return Err(SchemaError {
                pointer: Some(pointer.clone()),
                message: format!("the schema nests deeper than {MAX_SCHEMA_DEPTH} levels"),
            });
        }
        let children: Box<dyn Iterator<Item = (String, &Value)>> = match v {
            Value::Object(m) => {
                for (k, x) in m {
                    *patterns += match (k.as_str(), x) {
                        ("pattern", Value::String(_)) => 1,
                        ("patternProperties", Value::Object(p)) => p.len(),
                        _ => 0,
                    };
                }
                if *patterns > MAX_PATTERNS {
                    return Err(SchemaError {
                        pointer: Some(pointer.clone()),
                        message: format!(
                            "the schema holds more than {MAX_PATTERNS} regular expressions"
                        ),
                    });
                }
                Box::new(m.iter().map(|(k, x)| (escape_segment(k), x)))
            }
            Value::Array(a) => Box::new(a.iter().enumerate().map(|(i, x)| (i.to_string(), x))),
            _ => return Ok(()),
        };
        for (segment, child) in children {
            let len = pointer.len();
            pointer.push('/');
            pointer.push_str(&segment);
            walk(child, depth + 1, pointer, patterns)?;
            pointer.truncate(len);
        }
        Ok(())
    }
    walk(schema, 0, &mut String::new(), &mut 0)
}

/// A build error as a pointer and a reason; a refused pattern says why the dialect refuses it.
fn describe(schema: &Value, e: &jsonschema::ValidationError) -> SchemaError {
    let mut pointer = e.schema_path().as_str().to_string();
    let pattern = match (e.kind(), e.instance().as_ref()) {
        (jsonschema::error::ValidationErrorKind::Format { format }, Value::String(p))
            if format == "regex" =>
        {
            Some(p.clone())
        }
        _ => None,
    };
    let Some(pattern) = pattern else {
        return SchemaError {
            pointer: Some(pointer).filter(|p| !p.is_empty()),
            message: e.to_string(),
        };
    };
    // `patternProperties` errors point at the keyword; the pattern is one of its keys.
    if let Some(Value::Object(m)) = schema.pointer(&pointer) {
        if m.contains_key(&pattern) {
            pointer.push('/');
            pointer.push_str(&escape_segment(&pattern));
        }
    }
    SchemaError {
        pointer: Some(pointer),
        message: format!(
            "the pattern {pattern:?} is refused: {} (patterns run on a linear-time engine: \
             no backreferences, no look-around)",
            why_refused(&pattern)
        ),
    }
}

/// Why the linear-time dialect refuses a pattern, in the engine's words.
fn why_refused(pattern: &str) -> String {
    let Ok(translated) = jsonschema_regex::to_rust_regex(pattern) else {
        return "it is not a valid ECMA-262 regular expression".to_string();
    };
    match regex::RegexBuilder::new(&translated)
        .size_limit(MAX_REGEX_BYTES)
        .build()
    {
        Ok(_) => "it does not compile".to_string(),
        Err(regex::Error::CompiledTooBig(_)) => {
            format!("its compiled form is larger than {MAX_REGEX_BYTES} bytes")
        }
        Err(e) => {
            let text = e.to_string();
            text.lines()
                .rev()
                .find_map(|l| l.trim().strip_prefix("error: "))
                .unwrap_or("it does not compile")
                .to_string()
        }
    }
}

/// The schemas of every registered droplet that has the capability, one entry per droplet:
/// `None` for a droplet without a contract for it (it accepts any payload). Evaluates each
/// distinct schema once, within the budget; run it off the async workers.
pub fn verdict(
    contracts: &Contracts,
    schemas: &[Option<Value>],
    payload: &Value,
) -> Result<(), Vec<Violation>> {
    if schemas.is_empty() || schemas.iter().any(Option::is_none) {
        return Ok(());
    }
    verdict_of(
        contracts,
        schemas.iter().flatten().map(|s| contracts.compile(s)),
        payload,
    )
}

/// [`verdict`] over contracts compiled already (the contract directory's), at least one,
/// every capable droplet having one: accepted when one of them accepts the payload, else the
/// violations of the one that comes closest. Run it off the async workers.
pub fn verdict_of(
    contracts: &Contracts,
    compiled: impl IntoIterator<Item = Result<Contract, SchemaError>>,
    payload: &Value,
) -> Result<(), Vec<Violation>> {
    let mut memo = contracts.memo::<()>(Site::Creation);
    let mut best: Option<Vec<Violation>> = None;
    for contract in compiled {
        let found = match contract {
            Ok(c) => match memo.violations(&c, (), payload) {
                Some(found) => found,
                None => continue,
            },
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
        Some(v) if !memo.over_budget() => Err(v),
        None if !memo.over_budget() => Ok(()),
        _ => Err(vec![over_budget()]),
    }
}

/// The answer for contracts not evaluated within the budget.
pub fn over_budget() -> Violation {
    Violation {
        path: Vec::new(),
        message: format!(
            "the capable droplets' contracts could not be checked within {} ms",
            BUDGET.as_millis()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn contracts() -> Contracts {
        Contracts::new(
            IntCounterVec::new(prometheus::Opts::new("e", "e"), &["site"]).expect("metric"),
        )
    }

    fn evaluations(c: &Contracts, site: Site) -> u64 {
        c.evaluations.with_label_values(&[site.label()]).get()
    }

    fn verify_schema() -> Value {
        json!({"type": "object", "required": ["code_url"],
               "properties": {"code_url": {"type": "string", "format": "uri"}}})
    }

    #[test]
    fn a_payload_is_checked_against_the_contract_with_pointers() {
        let c = contracts();
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
        let c = contracts();
        assert!(c.compile(&json!({"type": 12})).is_err());
        assert!(c
            .compile(&json!({"$ref": "https://example.com/schema.json"}))
            .is_err());
    }

    #[test]
    fn one_accepting_droplet_or_one_without_a_contract_is_enough() {
        let c = contracts();
        let strict = Some(verify_schema());
        let loose = Some(json!({"type": "object"}));
        let payload = json!({"x": 1});
        assert!(verdict(&c, std::slice::from_ref(&strict), &payload).is_err());
        assert!(verdict(&c, &[strict.clone(), loose], &payload).is_ok());
        assert!(verdict(&c, &[strict, None], &payload).is_ok());
        assert!(verdict(&c, &[], &payload).is_ok());
    }

    #[test]
    fn patterns_the_linear_engine_cannot_run_are_refused_with_their_pointer() {
        let c = contracts();
        let cases = [
            (
                json!({"properties": {"s": {"pattern": "(a*)*\\1b"}}}),
                "/properties/s/pattern",
                "backreferences",
            ),
            (
                json!({"patternProperties": {"^(?=x)": {}}}),
                "/patternProperties/^(?=x)",
                "look-around",
            ),
            (
                json!({"propertyNames": {"pattern": "(.)\\1"}}),
                "/propertyNames/pattern",
                "backreferences",
            ),
            (
                json!({"patternProperties": {"^a$": {}},
                       "additionalProperties": {"pattern": "(.*)*\\1#"}}),
                "/additionalProperties/pattern",
                "backreferences",
            ),
            (
                json!({"items": {"pattern": "[^a]{1000}[^b]{1000}"}}),
                "/items/pattern",
                "larger than",
            ),
        ];
        for (schema, pointer, why) in cases {
            let e = c
                .compile(&schema)
                .map(|_| ())
                .expect_err(&format!("{schema} is refused"));
            assert_eq!(e.pointer.as_deref(), Some(pointer), "{e}");
            assert!(e.message.contains(why), "{e}");
        }
        // What the dialect runs compiles: anchors, classes, ranges, ECMA escapes.
        c.compile(&json!({"pattern": "^[a-z0-9_-]{1,64}\\d*$",
                          "patternProperties": {"^x-": {"type": "string"}}}))
            .expect("compiles");
    }

    #[test]
    fn caps_on_patterns_and_nesting_refuse_the_schema() {
        let c = contracts();
        let many: serde_json::Map<String, Value> = (0..=MAX_PATTERNS)
            .map(|i| (format!("p{i}"), json!({"pattern": "^a"})))
            .collect();
        let e = c
            .compile(&json!({"properties": many}))
            .expect_err("too many");
        assert!(e.message.contains("regular expressions"), "{e}");
        let mut deep = json!({"type": "string"});
        for _ in 0..MAX_SCHEMA_DEPTH {
            deep = json!({ "items": deep });
        }
        let e = c.compile(&deep).expect_err("too deep");
        assert!(e.message.contains("nests deeper"), "{e}");
    }

    #[test]
    fn a_memo_evaluates_each_contract_once_per_payload_and_stops_at_its_deadline() {
        let c = contracts();
        let a = c.compile(&verify_schema()).unwrap();
        let same = c.compile(&verify_schema()).unwrap();
        let payload = json!({"code_url": "https://x.example/a"});
        let mut memo = c.memo::<i32>(Site::Routing);
        assert!(memo.accepts(&a, 1, &payload));
        assert!(memo.accepts(&same, 1, &payload));
        assert!(memo.accepts(&a, 2, &payload));
        assert_eq!(evaluations(&c, Site::Routing), 2);
        memo.expire();
        assert!(!memo.accepts(&a, 3, &payload), "over budget refuses");
        assert!(memo.accepts(&a, 1, &payload), "what was evaluated stands");
        assert!(memo.over_budget());
        assert_eq!(evaluations(&c, Site::Routing), 2);
    }
}
