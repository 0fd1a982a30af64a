//! The module layering of `src/` (ARCHITECTURE.md), checked from the code.
//!
//! Reads every `crate::…` path (grouped imports and `super::super::…` that
//! climb to the crate root included, comments excluded) and turns them into
//! edges between top-level modules. Each module has a layer; an edge may
//! only point to a lower layer, so there is no cycle and no import between
//! modules of one layer (`db` and `redis` never import each other). A new
//! top-level module fails the test until it is given a layer here.
//!
//! The same edges are the diagram in ARCHITECTURE.md: the test fails when
//! the diagram is out of date; `scripts/module-graph` rewrites it. Circles
//! between the files inside one module are `files`'s concern.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use crate::common::rust_files;

mod files;

/// Layers, highest first. Read: a module imports only modules of lower layers.
const LAYERS: &[(&str, &[&str])] = &[
    ("commands", &["cli"]),
    ("run loop", &["app"]),
    ("console", &["console"]),
    ("actors and tools", &["actors", "cancel", "http", "verify"]),
    ("stores", &["db", "redis"]),
    ("domain", &["domain"]),
    ("telemetry", &["telemetry"]),
    ("configuration", &["config"]),
    (
        "foundations",
        &["deadline", "fault", "netaddr", "pool", "redact", "tls", "users"],
    ),
];

const BEGIN: &str = "<!-- module-graph:begin (scripts/module-graph writes this block) -->";
const END: &str = "<!-- module-graph:end -->";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The module path of a file: `src/db/outbox.rs` → [db, outbox];
/// `src/db/mod.rs` → [db]; `src/lib.rs` → [].
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).expect("under src");
    let mut parts: Vec<String> = rel.iter().map(|c| c.to_string_lossy().into_owned()).collect();
    let last = parts.pop().expect("file name");
    let stem = last.trim_end_matches(".rs");
    if !matches!(stem, "mod" | "lib" | "main") {
        parts.push(stem.to_string());
    }
    parts
}

/// The code without `//` comments (doc comments included), so an
/// intra-doc link is not mistaken for an import.
fn strip_comments(text: &str) -> String {
    text.lines()
        .map(|l| {
            // `//` inside a string literal is rare in this code base and
            // would only hide a path, never invent one.
            match l.find("//") {
                Some(i) => &l[..i],
                None => l,
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn ident_at(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// First segments of every crate-rooted path in `code`, for a file at `me`.
fn crate_paths(code: &str, me: &[String]) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let bytes = code.as_bytes();
    // `crate::x` and `crate::{x, y::z}` (`$crate::` in macros too).
    let mut at = 0;
    while let Some(i) = code[at..].find("crate::") {
        let start = at + i;
        at = start + "crate::".len();
        if start > 0 {
            let before = bytes[start - 1] as char;
            if before.is_ascii_alphanumeric() || before == '_' {
                continue; // `outbox_relay::…`-like identifiers ending in "crate"
            }
        }
        let rest = &code[at..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut item_start = true;
            for (k, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => item_start = true,
                    c if c.is_whitespace() => {}
                    _ if depth == 1 && item_start => {
                        item_start = false;
                        let id = ident_at(&group[k..]);
                        if !id.is_empty() && id != "self" {
                            found.insert(id.to_string());
                        }
                    }
                    _ => {}
                }
            }
        } else {
            let id = ident_at(rest);
            if !id.is_empty() {
                found.insert(id.to_string());
            }
        }
    }
    // `super::super::x` that climbs out to the crate root.
    let mut at = 0;
    while let Some(i) = code[at..].find("super::") {
        let start = at + i;
        if start > 0 {
            let before = bytes[start - 1] as char;
            if before.is_ascii_alphanumeric() || before == '_' || before == ':' {
                at = start + 7;
                continue;
            }
        }
        let mut depth = 0;
        let mut rest = &code[start..];
        while let Some(r) = rest.strip_prefix("super::") {
            depth += 1;
            rest = r;
        }
        at = code.len() - rest.len();
        if depth >= me.len() {
            let id = ident_at(rest);
            if !id.is_empty() {
                found.insert(id.to_string());
            }
        }
    }
    found
}

struct Graph {
    modules: BTreeSet<String>,
    edges: BTreeMap<String, BTreeSet<String>>,
}

fn graph() -> Graph {
    let src = root().join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<String> = files
        .iter()
        .filter_map(|f| module_path(&src, f).first().cloned())
        .collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let me = module_path(&src, f);
        let Some(top) = me.first() else { continue }; // lib.rs, main.rs
        let code = strip_comments(&fs::read_to_string(f).expect("read source"));
        for used in crate_paths(&code, &me) {
            if &used != top && modules.contains(&used) {
                edges.entry(top.clone()).or_default().insert(used);
            }
        }
    }
    Graph { modules, edges }
}

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|(_, ms)| ms.contains(&module))
}

fn diagram(g: &Graph) -> String {
    let mut out = String::new();
    out.push_str(BEGIN);
    out.push_str("\n\n```mermaid\nflowchart TD\n    main --> cli\n");
    for (i, (name, members)) in LAYERS.iter().enumerate() {
        out.push_str(&format!("    subgraph L{i}[\"{name}\"]\n"));
        for m in *members {
            out.push_str(&format!("        {m}\n"));
        }
        out.push_str("    end\n");
    }
    for (from, tos) in &g.edges {
        for to in tos {
            out.push_str(&format!("    {from} --> {to}\n"));
        }
    }
    out.push_str("```\n\n");
    out.push_str("| module | imports |\n| --- | --- |\n");
    for (_, members) in LAYERS {
        for m in *members {
            let tos = g
                .edges
                .get(*m)
                .map(|t| t.iter().cloned().collect::<Vec<_>>().join(", "))
                .unwrap_or_default();
            out.push_str(&format!("| `{m}` | {} |\n", if tos.is_empty() { "—" } else { &tos }));
        }
    }
    out.push('\n');
    out.push_str(END);
    out
}

#[test]
fn every_import_points_to_a_lower_layer() {
    let g = graph();
    let unplaced: Vec<&String> = g.modules.iter().filter(|m| layer_of(m).is_none()).collect();
    assert!(
        unplaced.is_empty(),
        "top-level modules without a layer in tests/architecture.rs: {unplaced:?}"
    );
    let mut wrong = Vec::new();
    for (from, tos) in &g.edges {
        for to in tos {
            let (a, b) = (layer_of(from).unwrap_or(0), layer_of(to).unwrap_or(0));
            if a >= b {
                wrong.push(format!("{from} ({}) imports {to} ({})", LAYERS[a].0, LAYERS[b].0));
            }
        }
    }
    assert!(wrong.is_empty(), "imports against the layering:\n{}", wrong.join("\n"));
}

#[test]
fn main_only_calls_the_command_line() {
    let main = strip_comments(&fs::read_to_string(root().join("src/main.rs")).expect("main.rs"));
    let used: BTreeSet<&str> = main
        .match_indices("outbox_relay::")
        .map(|(i, p)| ident_at(&main[i + p.len()..]))
        .collect();
    assert_eq!(used, BTreeSet::from(["cli"]), "main.rs should only parse and call cli");
}

#[test]
fn the_scanner_sees_grouped_and_climbing_paths() {
    let me = vec!["db".to_string(), "outbox".to_string()];
    let found = crate_paths(
        "use crate::{config::X, domain, self};\nuse super::super::redis::Y;\nlet z = crate::tls::f();\nuse super::pg;",
        &me,
    );
    assert_eq!(
        found,
        BTreeSet::from(["config", "domain", "redis", "tls"].map(String::from))
    );
    assert!(
        crate_paths("// see crate::redis\n", &me).len() == 1,
        "the raw scanner sees comments"
    );
    assert!(crate_paths(&strip_comments("// see crate::redis\n"), &me).is_empty());
}

#[test]
fn architecture_md_shows_the_current_graph() {
    let path = root().join("ARCHITECTURE.md");
    let text = fs::read_to_string(&path).expect("ARCHITECTURE.md");
    let (Some(b), Some(e)) = (text.find(BEGIN), text.find(END)) else {
        panic!("ARCHITECTURE.md lacks the module-graph block markers");
    };
    let current = &text[b..e + END.len()];
    let fresh = diagram(&graph());
    if current == fresh {
        return;
    }
    if std::env::var_os("OUTBOX_WRITE_ARCHITECTURE").is_some() {
        let updated = format!("{}{}{}", &text[..b], fresh, &text[e + END.len()..]);
        fs::write(&path, updated).expect("write ARCHITECTURE.md");
        return;
    }
    panic!("ARCHITECTURE.md's module graph is out of date; run scripts/module-graph\n\nexpected:\n{fresh}");
}
