//! The Registry's answers as the orchestrator reads them: the droplet directory (a JSON
//! array, `{"droplets": [...]}` or a UDC envelope around either) and its public key. Pure
//! parsing, bounded like a registration; no I/O.

use std::collections::HashSet;

use serde_json::{Map, Value};

use crate::services::droplets::{MAX_CAPABILITIES, MAX_CAPABILITY_CHARS};

/// One droplet of the Registry's directory, as far as it could be read.
#[derive(Debug, Clone, PartialEq)]
pub struct DirectoryEntry {
    pub droplet_id: i32,
    pub name: Option<String>,
    pub steward: Option<String>,
    /// Only a usable http(s) URL; anything else is left out.
    pub endpoint: Option<String>,
    pub capabilities: Option<Vec<String>>,
    pub raw: Value,
}

/// The directory's entries: a JSON array, `{"droplets": [...]}`, or a UDC envelope whose
/// payload is either. Entries without a usable id are counted as skipped.
pub fn parse_directory(body: &Value) -> Result<(Vec<DirectoryEntry>, usize), String> {
    fn list_of(body: &Value, depth: u8) -> Option<&Vec<Value>> {
        match body {
            Value::Array(a) => Some(a),
            Value::Object(m) => match m.get("droplets") {
                Some(Value::Array(a)) => Some(a),
                _ if depth == 0 => m.get("payload").and_then(|p| list_of(p, 1)),
                _ => None,
            },
            _ => None,
        }
    }
    let list = list_of(body, 0).ok_or_else(|| {
        "unexpected directory shape: expected a JSON array, {\"droplets\": [...]} or a UDC envelope around either".to_string()
    })?;
    let mut entries: Vec<DirectoryEntry> = Vec::with_capacity(list.len());
    let mut skipped = 0;
    for item in list {
        match item.as_object().and_then(entry_of) {
            Some(e) => entries.push(e),
            None => skipped += 1,
        }
    }
    // The same id twice: the later entry wins, where it stands (one row per droplet).
    let mut seen = HashSet::new();
    entries.reverse();
    entries.retain(|e| seen.insert(e.droplet_id));
    entries.reverse();
    Ok((entries, skipped))
}

fn id_of(value: &Value) -> Option<i32> {
    let n = match value {
        Value::Number(n) => n.as_i64()?,
        Value::String(s) => s.trim().trim_start_matches("droplet-").parse().ok()?,
        _ => return None,
    };
    i32::try_from(n).ok().filter(|n| *n >= 1)
}

fn text(m: &Map<String, Value>, key: &str, max: usize) -> Option<String> {
    let s = m.get(key)?.as_str()?.trim();
    (!s.is_empty()).then(|| s.chars().take(max).collect())
}

fn entry_of(m: &Map<String, Value>) -> Option<DirectoryEntry> {
    let droplet_id = m
        .get("droplet_id")
        .and_then(id_of)
        .or_else(|| m.get("id").and_then(id_of))?;
    let endpoint = text(m, "endpoint", 1000)
        .or_else(|| text(m, "url", 1000))
        .filter(|e| {
            e.chars().count() <= 255
                && url::Url::parse(e).is_ok_and(|u| matches!(u.scheme(), "http" | "https"))
        });
    let capabilities = m
        .get("capabilities")
        .and_then(Value::as_array)
        .map(|a| capabilities_of(a));
    Some(DirectoryEntry {
        droplet_id,
        name: text(m, "name", 100),
        steward: text(m, "steward", 100),
        endpoint,
        capabilities,
        raw: Value::Object(m.clone()),
    })
}

/// A directory entry's capabilities under the bounds a registration has: each once, in the
/// order listed, at most [`MAX_CAPABILITIES`] of them; names that are empty or longer than
/// [`MAX_CAPABILITY_CHARS`] are left out. A directory listing thousands costs no more than
/// reading up to the limit.
fn capabilities_of(listed: &[Value]) -> Vec<String> {
    let mut seen = HashSet::new();
    let mut caps = Vec::new();
    for c in listed {
        if caps.len() == MAX_CAPABILITIES {
            break;
        }
        // A capability is a name, or an object that has one.
        let name = c
            .as_str()
            .or_else(|| c.get("name").and_then(Value::as_str))
            .map(str::trim)
            .filter(|n| !n.is_empty() && n.chars().count() <= MAX_CAPABILITY_CHARS);
        if let Some(n) = name {
            if seen.insert(n) {
                caps.push(n.to_string());
            }
        }
    }
    caps
}

/// The PEM inside a public-key answer: PEM text, or `{"public_key": PEM}` (maybe enveloped).
pub fn parse_public_key(body: &str) -> Option<String> {
    let from_json = serde_json::from_str::<Value>(body).ok().and_then(|v| {
        let key = |v: &Value| {
            v.get("public_key")
                .or_else(|| v.get("key"))
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        key(&v).or_else(|| v.get("payload").and_then(key))
    });
    let pem = from_json.unwrap_or_else(|| body.to_string());
    let pem = pem.replace("\\n", "\n");
    pem.contains("-----BEGIN").then(|| pem.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_accepted_shape_gives_the_same_entries() {
        let list = json!([
            {"id": 8, "name": "Verifier", "steward": "A", "endpoint": "http://v:1", "capabilities": ["verify"]},
            {"droplet_id": "droplet-9", "name": "Other", "url": "https://o", "capabilities": [{"name": "x"}]}
        ]);
        let shapes = [
            list.clone(),
            json!({"droplets": list}),
            json!({"trace_id": "t", "payload": list}),
            json!({"trace_id": "t", "payload": {"droplets": list}}),
        ];
        for shape in shapes {
            let (entries, skipped) = parse_directory(&shape).unwrap();
            assert_eq!(skipped, 0);
            assert_eq!(
                entries.iter().map(|e| e.droplet_id).collect::<Vec<_>>(),
                [8, 9]
            );
            assert_eq!(entries[1].endpoint.as_deref(), Some("https://o"));
            assert_eq!(entries[1].capabilities, Some(vec!["x".to_string()]));
        }
    }

    #[test]
    fn capabilities_are_bounded_and_each_kept_once_in_order() {
        let long = "c".repeat(MAX_CAPABILITY_CHARS + 1);
        let mut listed = vec![
            json!("b"),
            json!(long),
            json!({"name": "a"}),
            json!(""),
            json!("b"),
            json!(" a "),
            json!(5),
        ];
        listed.extend((0..80_000).map(|i| json!(format!("cap-{i}"))));
        let (entries, _) = parse_directory(&json!([{"id": 8, "capabilities": listed}])).unwrap();
        let caps = entries[0].capabilities.clone().unwrap();
        assert_eq!(caps.len(), MAX_CAPABILITIES);
        assert_eq!(caps[..4], ["b", "a", "cap-0", "cap-1"]);
        assert_eq!(caps.last().map(String::as_str), Some("cap-97"));
        assert!(caps
            .iter()
            .all(|c| c.chars().count() <= MAX_CAPABILITY_CHARS));
        let exactly = "d".repeat(MAX_CAPABILITY_CHARS);
        let (entries, _) =
            parse_directory(&json!([{"id": 8, "capabilities": [exactly, "d"]}])).unwrap();
        assert_eq!(entries[0].capabilities.as_ref().map(Vec::len), Some(2));
    }

    #[test]
    fn the_later_of_two_entries_for_one_id_wins_where_it_stands() {
        let (entries, _) = parse_directory(&json!([
            {"id": 8, "name": "first"}, {"id": 9}, {"id": 8, "name": "later"}, {"id": 7}
        ]))
        .unwrap();
        let ids: Vec<i32> = entries.iter().map(|e| e.droplet_id).collect();
        assert_eq!(ids, [9, 8, 7]);
        assert_eq!(entries[1].name.as_deref(), Some("later"));
    }

    #[test]
    fn garbage_shapes_and_entries_are_refused_or_skipped() {
        assert!(parse_directory(&json!({"items": []})).is_err());
        assert!(parse_directory(&json!("droplets")).is_err());
        let (entries, skipped) = parse_directory(&json!([
            {"name": "no id"}, 5, {"id": -3}, {"id": 4, "endpoint": "ftp://x"}
        ]))
        .unwrap();
        assert_eq!(skipped, 3);
        assert_eq!(entries[0].droplet_id, 4);
        assert_eq!(entries[0].endpoint, None);
    }

    #[test]
    fn public_keys_come_as_pem_or_json() {
        let pem = "-----BEGIN PUBLIC KEY-----\nabc\n-----END PUBLIC KEY-----";
        assert_eq!(parse_public_key(pem).as_deref(), Some(pem));
        assert_eq!(
            parse_public_key(&json!({"public_key": pem}).to_string()).as_deref(),
            Some(pem)
        );
        assert_eq!(parse_public_key("{\"public_key\": 5}"), None);
        assert_eq!(parse_public_key("<html>"), None);
    }
}
