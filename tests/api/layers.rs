//! The layering of ARCHITECTURE.md, checked on the source: a file imports only its own layer
//! and those below, and no two files import each other in a circle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `src/` but unit tests kept beside their file (`<file>/tests.rs`,
/// which, as a `mod tests` that [`code`] leaves out, may use anything), by its path relative
/// to `src/`.
fn sources() -> BTreeMap<String, String> {
    let mut files = every_source();
    files.retain(|rel, _| !rel.ends_with("/tests.rs"));
    files
}

/// Every `.rs` file under `src/`, by its path relative to `src/`.
fn every_source() -> BTreeMap<String, String> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, root, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                out.insert(rel, std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = BTreeMap::new();
    walk(&root, &root, &mut out);
    out
}

/// The code of a file without its comments and unit tests (a test module may use anything).
fn code(text: &str) -> String {
    let text = text
        .find("#[cfg(test)]\nmod tests")
        .map_or(text, |i| &text[..i]);
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The `crate::a::b` paths a file names, as their segments.
fn crate_paths(text: &str) -> Vec<Vec<String>> {
    let mut paths = Vec::new();
    let code = code(text);
    let mut rest = code.as_str();
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        let end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(rest.len());
        let path: Vec<String> = rest[..end]
            .split("::")
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        // `crate::a::{b, c}`: each item its own path.
        if rest[end..].starts_with('{') {
            let close = rest[end..].find('}').map_or(rest.len(), |c| end + c);
            for item in rest[end + 1..close].split(',') {
                let item = item.trim().split([' ', ':']).next().unwrap_or("");
                if !item.is_empty() && item != "self" {
                    let mut p = path.clone();
                    p.push(item.to_string());
                    paths.push(p);
                }
            }
        }
        paths.push(path);
    }
    paths
}

/// The layer of a module path (`services::tasks` -> 1). Higher layers may import lower.
fn layer(first: &str) -> Option<u8> {
    Some(match first {
        "config" | "protocol" | "validation" | "identity" | "instruments" | "system"
        | "telemetry" | "db" => 0,
        "services" => 1,
        "state" | "jobs" | "cli" => 2,
        "error" | "auth" | "udc" | "api" => 3,
        _ => return None,
    })
}

fn layer_of_file(rel: &str) -> Option<u8> {
    let first = rel.trim_end_matches(".rs").split('/').next()?;
    match first {
        "lib" | "main" => Some(4),
        other => layer(other),
    }
}

#[test]
fn no_file_imports_a_layer_above_its_own() {
    let mut offences = Vec::new();
    for (rel, text) in sources() {
        let Some(own) = layer_of_file(&rel) else {
            panic!("{rel}: a file of no layer; add its module to tests/api/layers.rs and ARCHITECTURE.md");
        };
        for path in crate_paths(&text) {
            let Some(first) = path.first() else { continue };
            if let Some(theirs) = layer(first) {
                if theirs > own {
                    offences.push(format!("{rel} imports crate::{}", path.join("::")));
                }
            }
        }
        if own <= 1 && code(&text).contains("axum") {
            offences.push(format!("{rel} names axum"));
        }
    }
    assert!(
        offences.is_empty(),
        "imports above their layer:\n{}",
        offences.join("\n")
    );
}

/// The file a module path lives in: the longest prefix that is a file (or its `mod.rs`).
fn file_of(path: &[String], files: &BTreeSet<String>) -> Option<String> {
    (1..=path.len()).rev().find_map(|n| {
        let stem = path[..n].join("/");
        [format!("{stem}.rs"), format!("{stem}/mod.rs")]
            .into_iter()
            .find(|f| files.contains(f))
    })
}

#[test]
fn no_two_files_import_each_other_in_a_circle() {
    let sources = sources();
    let files: BTreeSet<String> = sources.keys().cloned().collect();
    // Re-exports (`pub use self::core::Core;`) name the file that defines the item.
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (rel, text) in &sources {
        let entry = edges.entry(rel.clone()).or_default();
        for path in crate_paths(text) {
            let resolved = if path.len() == 2 && path[0] == "services" && path[1] == "Core" {
                Some("services/core.rs".to_string())
            } else {
                file_of(&path, &files)
            };
            if let Some(to) = resolved.filter(|to| to != rel && !to.ends_with("mod.rs")) {
                entry.insert(to);
            }
        }
    }
    // A circle is a file that reaches itself.
    for start in edges.keys() {
        let mut seen = BTreeSet::new();
        let mut stack: Vec<(String, Vec<String>)> = vec![(start.clone(), vec![start.clone()])];
        while let Some((at, trail)) = stack.pop() {
            for next in edges.get(&at).into_iter().flatten() {
                if next == start {
                    panic!("an import circle: {} -> {start}", trail.join(" -> "));
                }
                if seen.insert(next.clone()) {
                    let mut t = trail.clone();
                    t.push(next.clone());
                    stack.push((next.clone(), t));
                }
            }
        }
    }
}

/// The simulator is its own crate (`simulator/`), outside the service: it uses the service's
/// wire (`protocol`) and token signing (`identity`, with the `config` that loads its keys)
/// and nothing else, and the service's library never names it.
#[test]
fn the_simulator_uses_only_the_wire_and_identity_and_the_service_never_names_it() {
    let simulator = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("simulator/src");
    let mut files = BTreeMap::new();
    fn walk(dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                out.insert(path, text);
            }
        }
    }
    walk(&simulator, &mut files);
    assert!(files.len() > 5, "the simulator's sources: {files:?}");
    let mut offences = Vec::new();
    for (path, text) in &files {
        let code = code(text);
        for (i, _) in code.match_indices("orchestrator::") {
            let rest = &code[i + "orchestrator::".len()..];
            let module = rest
                .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                .next()
                .unwrap_or("");
            if !["protocol", "identity", "config"].contains(&module) {
                offences.push(format!("{} uses orchestrator::{module}", path.display()));
            }
        }
    }
    for (rel, text) in sources() {
        if text.contains("orchestrator_simulator") || text.contains("simulator::") {
            offences.push(format!("src/{rel} names the simulator"));
        }
    }
    assert!(offences.is_empty(), "{}", offences.join("\n"));
}

/// Whether a line of code names the type `Core` (not `CoreX` or `score`).
fn names_core(line: &str) -> bool {
    line.match_indices("Core").any(|(i, _)| {
        let before = line[..i].chars().next_back();
        let after = line[i + "Core".len()..].chars().next();
        let ident = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
        !ident(before) && !ident(after)
    })
}

/// A service asks for the parts it uses (a handle such as `transition::Changes` or
/// `registry_client::Registry`, or the parts themselves), never the whole `Core`: its
/// signatures say what it can touch. A service file names `Core` only to build its handle
/// from it (`impl Core { fn changes(&self) }`, `impl From<&Core> for Registry`); no
/// function, closure or field of a service takes or keeps one.
#[test]
fn services_take_their_parts_not_the_whole_core() {
    let mut offences = Vec::new();
    for (rel, text) in sources() {
        if !rel.starts_with("services/") || rel == "services/core.rs" || rel == "services/mod.rs" {
            continue;
        }
        for line in code(&text).lines() {
            let l = line.trim();
            let builds_a_handle = l.starts_with("use ")
                || l.starts_with("impl Core ")
                || (l.starts_with("impl")
                    && (l.contains("From<&'a Core>") || l.contains("From<&Core>")))
                || l.starts_with("fn from(");
            if names_core(l) && !builds_a_handle {
                offences.push(format!("services/{}: {l}", &rel["services/".len()..]));
            }
        }
    }
    assert!(
        offences.is_empty(),
        "services that take or keep the whole Core:\n{}",
        offences.join("\n")
    );
}

/// Most lines a source file may have: a file past it holds more than one thing to read
/// (issue 25). Unit tests count too; they may move beside their file (`<file>/tests.rs`).
const MOST_LINES: usize = 600;

#[test]
fn no_source_file_is_over_600_lines() {
    let long: Vec<(String, usize)> = every_source()
        .into_iter()
        .map(|(rel, text)| (rel, text.lines().count()))
        .filter(|&(_, n)| n > MOST_LINES)
        .collect();
    assert!(long.is_empty(), "over {MOST_LINES} lines: {long:?}");
}
