//! Files inside a module. The layering (`super`, this module's tests) is
//! between top-level modules. Inside one, files import each other too
//! (`super::…`, `self::…`, a child's name, `crate::a::b::…`): those edges
//! must not form a circle either, or no file of the circle can be read
//! without the others. Shared types go to a leaf file that both use.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;

use super::{ident_at, module_path, root, strip_comments};
use crate::common::rust_files;

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
