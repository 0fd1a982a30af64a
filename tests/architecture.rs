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
//! the diagram is out of date; `scripts/module-graph` rewrites it.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use crate::common::rust_files;

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

// ---- Files inside a module -------------------------------------------------
//
// The layering above is between top-level modules. Inside one, files import
// each other too (`super::…`, `self::…`, a child's name, `crate::a::b::…`):
// those edges must not form a circle either, or no file of the circle can
// be read without the others. Shared types go to a leaf file that both use.

/// `a::b::{c, d::e}` at the start of `s`: every full path it names.
fn expand_paths(s: &str) -> Vec<Vec<String>> {
    fn walk(s: &str, prefix: Vec<String>, out: &mut Vec<Vec<String>>) -> usize {
        let mut path = prefix;
        let mut at = 0;
        loop {
            let rest = &s[at..];
            let trimmed = rest.trim_start();
            at += rest.len() - trimmed.len();
            if let Some(group) = trimmed.strip_prefix('{') {
                at += 1;
                let mut inner = group;
                loop {
                    let t = inner.trim_start();
                    at += inner.len() - t.len();
                    if let Some(r) = t.strip_prefix('}') {
                        at += 1;
                        let _ = r;
                        return at;
                    }
                    if t.is_empty() {
                        return at;
                    }
                    let used = walk(t, path.clone(), out);
                    at += used.max(1);
                    inner = &s[at..];
                    let t2 = inner.trim_start();
                    at += inner.len() - t2.len();
                    if let Some(r) = t2.strip_prefix(',') {
                        at += 1;
                        inner = r;
                    } else {
                        inner = &s[at..];
                    }
                }
            }
            if trimmed.starts_with('*') {
                out.push(path);
                return at + 1;
            }
            let id = ident_at(trimmed);
            if id.is_empty() {
                out.push(path);
                return at;
            }
            path.push(id.to_string());
            at += id.len();
            if s[at..].starts_with("::") {
                at += 2;
            } else {
                out.push(path);
                return at;
            }
        }
    }
    let mut out = Vec::new();
    walk(s, Vec::new(), &mut out);
    out
}

/// Inline `mod name {` blocks open at each byte of `code`: the module path
/// suffix in force there (a file's `mod tests { use super::*; }` means the
/// file itself, not its parent).
fn inline_modules(code: &str) -> Vec<(usize, Vec<String>)> {
    let mut marks = vec![(0, Vec::new())];
    let mut stack: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let bytes = code.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'{' => depth += 1,
            b'}' => {
                depth = depth.saturating_sub(1);
                if stack.last().is_some_and(|(_, d)| *d == depth) {
                    stack.pop();
                    marks.push((i, stack.iter().map(|(n, _)| n.clone()).collect()));
                }
            }
            b'm' if code[i..].starts_with("mod ")
                && (i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_')) =>
            {
                let rest = code[i + 4..].trim_start();
                let name = ident_at(rest);
                let after = rest[name.len()..].trim_start();
                if !name.is_empty() && after.starts_with('{') {
                    stack.push((name.to_string(), depth));
                    let open = code.len() - after.len();
                    depth += 1;
                    marks.push((open, stack.iter().map(|(n, _)| n.clone()).collect()));
                    i = open + 1;
                    continue;
                }
            }
            _ => {}
        }
        i += 1;
    }
    marks
}

/// The files (as module paths) that the file at `me` imports, resolved to
/// the longest prefix that is a file of `nodes`.
fn file_imports(code: &str, me: &[String], nodes: &BTreeSet<Vec<String>>) -> BTreeSet<Vec<String>> {
    let marks = inline_modules(code);
    let scope_at = |pos: usize| -> Vec<String> {
        let extra = marks
            .iter()
            .rev()
            .find(|(p, _)| *p <= pos)
            .map(|(_, s)| s.clone())
            .unwrap_or_default();
        me.iter().cloned().chain(extra).collect()
    };
    let bytes = code.as_bytes();
    let mut out = BTreeSet::new();
    let mut i = 0;
    while i < code.len() {
        let boundary = i == 0
            || !(bytes[i - 1].is_ascii_alphanumeric()
                || bytes[i - 1] == b'_'
                || bytes[i - 1] == b':'
                || bytes[i - 1] == b'$');
        if !boundary || !(bytes[i].is_ascii_alphabetic() || bytes[i] == b'_') {
            i += 1;
            continue;
        }
        let id = ident_at(&code[i..]);
        let after = i + id.len();
        if !code[after..].starts_with("::") {
            i = after.max(i + 1);
            continue;
        }
        let scope = scope_at(i);
        let (base, rest_at): (Vec<String>, usize) = match id {
            "crate" => (Vec::new(), after + 2),
            "self" => (scope.clone(), after + 2),
            "super" => {
                let mut depth = 1;
                let mut at = after + 2;
                while code[at..].starts_with("super::") {
                    depth += 1;
                    at += 7;
                }
                (scope[..scope.len().saturating_sub(depth)].to_vec(), at)
            }
            child => {
                let mut p = scope.clone();
                p.push(child.to_string());
                if !nodes.contains(&p) {
                    i = after;
                    continue;
                }
                (scope.clone(), i)
            }
        };
        for tail in expand_paths(&code[rest_at..]) {
            let full: Vec<String> = base.iter().cloned().chain(tail).collect();
            let target = (0..=full.len())
                .rev()
                .map(|n| full[..n].to_vec())
                .find(|p| nodes.contains(p));
            if let Some(t) = target {
                if t != me && !t.is_empty() {
                    out.insert(t);
                }
            }
        }
        i = after;
    }
    out
}

fn file_graph() -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let src = root().join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let nodes: BTreeSet<Vec<String>> = files.iter().map(|f| module_path(&src, f)).collect();
    files
        .iter()
        .map(|f| {
            let me = module_path(&src, f);
            let code = strip_comments(&fs::read_to_string(f).expect("read source"));
            let imports = file_imports(&code, &me, &nodes);
            (me, imports)
        })
        .collect()
}

/// Every circle of the graph (strongly connected parts of two or more).
fn circles(g: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>) -> Vec<Vec<Vec<String>>> {
    // Tarjan's algorithm, iterative enough for this size.
    struct T<'a> {
        g: &'a BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        index: BTreeMap<&'a Vec<String>, usize>,
        low: BTreeMap<&'a Vec<String>, usize>,
        stack: Vec<&'a Vec<String>>,
        on: BTreeSet<&'a Vec<String>>,
        next: usize,
        out: Vec<Vec<Vec<String>>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a Vec<String>) {
        t.index.insert(v, t.next);
        t.low.insert(v, t.next);
        t.next += 1;
        t.stack.push(v);
        t.on.insert(v);
        let g = t.g;
        for w in g.get(v).into_iter().flatten() {
            let Some((w, _)) = g.get_key_value(w) else { continue };
            if !t.index.contains_key(w) {
                visit(t, w);
                let lw = t.low[w];
                let lv = t.low[v];
                t.low.insert(v, lv.min(lw));
            } else if t.on.contains(w) {
                let iw = t.index[w];
                let lv = t.low[v];
                t.low.insert(v, lv.min(iw));
            }
        }
        if t.low[v] == t.index[v] {
            let mut part = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on.remove(w);
                part.push(w.clone());
                if w == v {
                    break;
                }
            }
            if part.len() > 1 {
                part.sort();
                t.out.push(part);
            }
        }
    }
    let mut t = T {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in g.keys() {
        if !t.index.contains_key(v) {
            visit(&mut t, v);
        }
    }
    t.out
}

#[test]
fn no_circle_of_imports_between_the_files_of_a_module() {
    let g = file_graph();
    let found = circles(&g);
    let name = |p: &Vec<String>| {
        if p.is_empty() {
            "crate".to_string()
        } else {
            p.join("::")
        }
    };
    let text: Vec<String> = found
        .iter()
        .map(|part| {
            let edges: Vec<String> = part
                .iter()
                .flat_map(|a| {
                    g[a].iter()
                        .filter(|b| part.contains(b))
                        .map(move |b| format!("    {} -> {}", name(a), name(b)))
                })
                .collect();
            format!("circle of {} files:\n{}", part.len(), edges.join("\n"))
        })
        .collect();
    assert!(text.is_empty(), "import circles between files:\n{}", text.join("\n"));
}

#[test]
fn the_file_scanner_resolves_super_self_children_and_inline_tests() {
    let nodes: BTreeSet<Vec<String>> = [
        vec![],
        vec!["a".to_string()],
        vec!["a".to_string(), "b".to_string()],
        vec!["a".to_string(), "c".to_string()],
        vec!["d".to_string()],
    ]
    .into_iter()
    .collect();
    let p = |s: &str| s.split("::").map(String::from).collect::<Vec<_>>();
    let b = p("a::b");
    // A child's glob import of its parent, a sibling through super, a
    // grouped crate path.
    let found = file_imports(
        "use super::*;\nuse super::c::X;\nuse crate::{d::Y, a::{c}};",
        &b,
        &nodes,
    );
    assert_eq!(found, BTreeSet::from([p("a"), p("a::c"), p("d")]));
    // A parent naming its child, and a file's own inline tests module.
    let found = file_imports("pub use b::Z;\nfn f() { self::c::g(); }", &p("a"), &nodes);
    assert_eq!(found, BTreeSet::from([p("a::b"), p("a::c")]));
    let found = file_imports(
        "fn f() {}\n#[cfg(test)]\nmod tests {\n    use super::*;\n}\n",
        &b,
        &nodes,
    );
    assert!(found.is_empty(), "{found:?}");
    // A circle is found, a chain is not.
    let g: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::from([
        (p("a"), BTreeSet::from([p("a::b")])),
        (p("a::b"), BTreeSet::from([p("a")])),
        (p("a::c"), BTreeSet::from([p("a")])),
    ]);
    assert_eq!(circles(&g), vec![vec![p("a"), p("a::b")]]);
}
