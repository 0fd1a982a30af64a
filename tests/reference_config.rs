//! docs/configuration.md's table of every configuration key, generated from
//! the code, so the table, the structs and `config/default.toml` cannot
//! drift apart (#39). No service needed.
//!
//! One row per key: the sections in the order of `Config`'s fields
//! (src/config/root.rs), each section's keys in the order of its struct's
//! fields (src/config/<section>.rs, found by the struct's name). A row is
//! `| key | type | default | meaning |`: the type from the field's Rust type
//! ([`user_type`]), the default from `Config::default()` serialized as the
//! relay reads it (durations as `5s`), the meaning the field's `///` doc
//! comment joined into one line. `//` comments under it are notes for
//! developers and stay out of the table. A field without a doc comment,
//! a serde attribute the parser does not know, or a Rust type without a
//! user-facing name fails here, saying which.
//!
//! The test fails with the rows that differ; `OUTBOX_WRITE_DOCS=1`
//! (`scripts/write-docs`) rewrites the block instead. Also checked: every
//! key is in `config/default.toml` (commented out or not) and nothing else
//! is; the README's short table names real keys with their real defaults;
//! a key the code never reads says so.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use outbox_relay::config::Config;

const BEGIN: &str = "<!-- config-table:begin (tests/reference_config.rs writes this block) -->";
const END: &str = "<!-- config-table:end -->";
const DOC: &str = "docs/configuration.md";

/// Keys that are accepted and do nothing (kept so that configs setting
/// them still load). Their meaning must begin with [`INERT_MEANING`] and
/// their comment in `config/default.toml` must say "ignored".
const INERT: &[&str] = &["database.pgbouncer_compat"];
const INERT_MEANING: &str = "accepted and ignored";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

/// One field of a config struct, as its source declares it.
#[derive(Debug, PartialEq)]
struct Field {
    /// The key as serde names it (a `rename` applied).
    key: String,
    /// The Rust type as written, e.g. `Vec<String>`.
    rust_type: String,
    /// The `///` lines, without the `///` and one space.
    doc: Vec<String>,
}

/// The key a `#[serde(...)]` attribute on a field or variant gives (`rename`),
/// `Some(None)` for `skip`, `None` for no serde attribute at all.
fn serde_attr(line: &str, at: &str) -> Option<Option<String>> {
    let inner = line.strip_prefix("#[serde(")?.strip_suffix(")]")?.trim();
    if inner == "skip" {
        return Some(None);
    }
    if let Some(name) = inner.strip_prefix("rename = \"").and_then(|r| r.strip_suffix('"')) {
        return Some(Some(name.to_string()));
    }
    panic!("{at}: #[serde({inner})] is not understood by tests/reference_config.rs (flatten, rename_all, …): teach it");
}

/// The fields of a struct body (the lines between `{` and `}`), keys
/// renamed and skipped fields left out as serde does.
fn fields(body: &str, at: &str) -> Vec<Field> {
    let (mut out, mut doc, mut rename, mut skip) = (Vec::new(), Vec::new(), None, false);
    for line in body.lines().map(str::trim) {
        if let Some(text) = line.strip_prefix("///") {
            doc.push(text.strip_prefix(' ').unwrap_or(text).to_string());
        } else if line.is_empty() || line.starts_with("//") {
            // A developer note (or a blank): not part of the meaning.
        } else if line.starts_with("#[") {
            match serde_attr(line, at) {
                Some(Some(name)) => rename = Some(name),
                Some(None) => skip = true,
                None => {}
            }
        } else {
            // `pub`, `pub(crate)` … then `name: Type,`.
            let decl = match line.strip_prefix("pub") {
                Some(rest) if rest.starts_with('(') => rest.split_once(") ").map_or(line, |(_, d)| d),
                Some(rest) => rest.trim_start(),
                None => line,
            };
            let (name, ty) = decl
                .strip_suffix(',')
                .and_then(|d| d.split_once(": "))
                .unwrap_or_else(|| {
                    panic!("{at}: cannot read the field declaration {line:?} (one per line, `pub name: Type,`)")
                });
            if !std::mem::take(&mut skip) {
                out.push(Field {
                    key: rename.take().unwrap_or_else(|| name.to_string()),
                    rust_type: ty.trim().to_string(),
                    doc: std::mem::take(&mut doc),
                });
            }
            doc.clear();
            rename = None;
        }
    }
    out
}

/// Every file of src/config/, (path, text).
fn config_sources() -> Vec<(String, String)> {
    let mut files: Vec<_> = fs::read_dir(root().join("src/config"))
        .expect("read src/config")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| {
            let rel = p.strip_prefix(root()).unwrap_or(p).display().to_string();
            (rel, fs::read_to_string(p).expect("read a config file"))
        })
        .collect()
}

/// The body of `pub {kind} {name} {` … `}` (the closing brace at the start
/// of a line) and the lines just above it, in whichever file declares it.
fn item<'a>(sources: &'a [(String, String)], kind: &str, name: &str) -> Option<(&'a str, &'a str, Vec<&'a str>)> {
    let head = format!("pub {kind} {name} {{\n");
    sources.iter().find_map(|(path, text)| {
        let start = text.find(&head)?;
        let body = &text[start + head.len()..];
        let body = &body[..body.find("\n}").expect("closing brace")];
        let above = text[..start]
            .lines()
            .rev()
            .take_while(|l| l.starts_with("#["))
            .collect();
        Some((path.as_str(), body, above))
    })
}

/// `Standalone` → `standalone` under a container's `rename_all`.
fn rename_all(rule: Option<&str>, variant: &str) -> String {
    let words = |sep: &str| {
        let mut s = String::new();
        for (i, c) in variant.chars().enumerate() {
            if c.is_uppercase() && i > 0 {
                s.push_str(sep);
            }
            s.extend(c.to_lowercase());
        }
        s
    };
    match rule {
        None => variant.to_string(),
        Some("lowercase") => variant.to_lowercase(),
        Some("snake_case") => words("_"),
        Some("kebab-case") => words("-"),
        Some(other) => panic!("rename_all = {other:?} is not understood by tests/reference_config.rs: teach it"),
    }
}

/// The type column: what an operator writes, not the Rust type.
fn user_type(rust: &str, sources: &[(String, String)], at: &str) -> String {
    let last = rust.rsplit("::").next().unwrap_or(rust);
    let named = match last {
        "String" => "string",
        "bool" => "boolean",
        "u8" | "u16" | "u32" | "u64" | "usize" | "i32" | "i64" => "integer",
        "f32" | "f64" => "number",
        "Dur" => "duration",
        "OptDur" => "duration or `\"\"`",
        "Vec<String>" => "list of strings",
        _ => "",
    };
    if !named.is_empty() {
        return named.to_string();
    }
    let Some((path, body, above)) = item(sources, "enum", last) else {
        panic!("{at}: the type {rust} has no user-facing name in tests/reference_config.rs::user_type: give it one");
    };
    let rule = above.iter().find_map(|l| {
        l.strip_prefix("#[serde(rename_all = \"")
            .and_then(|r| r.split_once('"'))
            .map(|(r, _)| r)
    });
    let mut values = Vec::new();
    let mut rename = None;
    for line in body.lines().map(str::trim) {
        if line.starts_with("#[") {
            if let Some(r) = serde_attr(line, path) {
                rename = Some(r.unwrap_or_else(|| panic!("{path}: a skipped variant of {last}")));
            }
        } else if let Some(v) = line.strip_suffix(',').filter(|v| v.chars().all(char::is_alphanumeric)) {
            values.push(format!("`{}`", rename.take().unwrap_or_else(|| rename_all(rule, v))));
        } else if !line.is_empty() && !line.starts_with("//") {
            panic!("{path}: cannot read the variant {line:?} of {last} (unit variants, one per line)");
        }
    }
    match values.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => panic!("{path}: {last} has fewer than two variants"),
    }
}

/// A default as the table shows it: strings bare in backticks (`""` when
/// empty), everything else as TOML writes it.
fn default_cell(v: &toml::Value, key: &str) -> String {
    match v {
        toml::Value::String(s) if s.is_empty() => "`\"\"`".into(),
        toml::Value::String(s) => format!("`{s}`"),
        toml::Value::Table(_) => panic!("{key}: a nested table has no row; flatten it into keys"),
        other => format!("`{other}`"),
    }
}

/// One row of the table.
struct Row {
    key: String,
    ty: String,
    default: String,
    meaning: String,
}

impl Row {
    fn line(&self) -> String {
        format!("| `{}` | {} | {} | {} |", self.key, self.ty, self.default, self.meaning)
    }
}

/// The rows, from the code.
fn rows() -> Vec<Row> {
    let sources = config_sources();
    let defaults = toml::Value::try_from(Config::default()).expect("the defaults serialize");
    let (root_path, root_body, _) = item(&sources, "struct", "Config").expect("pub struct Config in src/config");
    let mut out = Vec::new();
    for section in fields(root_body, root_path) {
        let Some((path, body, above)) = item(&sources, "struct", &section.rust_type) else {
            panic!("no `pub struct {} {{` in src/config", section.rust_type);
        };
        if let Some(attr) = above.iter().find(|l| l.contains("rename_all")) {
            panic!("{path}: {attr} on a section is not understood by tests/reference_config.rs: teach it");
        }
        let table = defaults
            .get(&section.key)
            .and_then(toml::Value::as_table)
            .unwrap_or_else(|| panic!("the defaults have no table [{}]", section.key));
        let fields = fields(body, path);
        let parsed: BTreeSet<&str> = fields.iter().map(|f| f.key.as_str()).collect();
        let serialized: BTreeSet<&str> = table.keys().map(String::as_str).collect();
        assert_eq!(
            parsed, serialized,
            "{path}: the fields read from the source differ from the keys serde writes for [{}]",
            section.key
        );
        for f in fields {
            let key = format!("{}.{}", section.key, f.key);
            assert!(
                !f.doc.is_empty(),
                "{path}: `{key}` has no /// doc comment (its meaning in {DOC})"
            );
            out.push(Row {
                ty: user_type(&f.rust_type, &sources, path),
                default: default_cell(&table[&f.key], &key),
                meaning: f.doc.join(" ").replace('|', "\\|"),
                key,
            });
        }
    }
    out
}

fn block(rows: &[Row]) -> String {
    let mut out = format!("{BEGIN}\n| key | type | default | meaning |\n| --- | --- | --- | --- |\n");
    for r in rows {
        out.push_str(&r.line());
        out.push('\n');
    }
    out.push_str(END);
    out
}

/// The key of a table row (`| `a.b` | …`).
fn row_key(line: &str) -> Option<&str> {
    line.strip_prefix("| `")?.split_once('`').map(|(k, _)| k)
}

/// The rows of `doc` that differ from `code`, one line each, for the failure.
fn row_diff(doc: &str, code: &str) -> String {
    let rows = |text: &str| -> BTreeMap<String, String> {
        text.lines()
            .filter_map(|l| row_key(l).map(|k| (k.to_string(), l.to_string())))
            .collect()
    };
    let (old, new) = (rows(doc), rows(code));
    let mut out = String::new();
    for (key, line) in &new {
        match old.get(key) {
            None => out.push_str(&format!("missing row {key}:\n  + {line}\n")),
            Some(was) if was != line => out.push_str(&format!("row {key} differs:\n  - {was}\n  + {line}\n")),
            Some(_) => {}
        }
    }
    for (key, line) in old.iter().filter(|(k, _)| !new.contains_key(*k)) {
        out.push_str(&format!("row {key} names no key of the code:\n  - {line}\n"));
    }
    if out.is_empty() {
        out.push_str("the rows are the same but their order (or the header) differs\n");
    }
    out
}

#[test]
fn configuration_md_has_the_generated_table() {
    let path = root().join(DOC);
    let text = read(DOC);
    let (Some(b), Some(e)) = (text.find(BEGIN), text.find(END)) else {
        panic!("{DOC} lacks the config-table block markers ({BEGIN} … {END})");
    };
    let current = &text[b..e + END.len()];
    let fresh = block(&rows());
    if current == fresh {
        return;
    }
    if std::env::var_os("OUTBOX_WRITE_DOCS").is_some() {
        let updated = format!("{}{}{}", &text[..b], fresh, &text[e + END.len()..]);
        fs::write(&path, updated).expect("write docs/configuration.md");
        return;
    }
    panic!(
        "{DOC}'s configuration table differs from the code (the doc comments of src/config/*.rs and \
         Config::default()); fix the code and run scripts/write-docs:\n{}",
        row_diff(current, &fresh)
    );
}

/// The keys `config/default.toml` sets or shows commented out
/// (`# key = …`), each with the comment lines just above it.
fn default_toml_keys() -> BTreeMap<String, String> {
    let (mut out, mut section, mut comment) = (BTreeMap::new(), String::new(), String::new());
    for line in read("config/default.toml").lines() {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            comment.clear();
            continue;
        }
        let setting = line.trim_start_matches('#').trim_start();
        let key = setting.split_once('=').map(|(k, _)| k.trim()).filter(|k| {
            k.starts_with(|c: char| c.is_ascii_lowercase())
                && k.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        });
        match key {
            Some(key) if !section.is_empty() => {
                out.insert(format!("{section}.{key}"), std::mem::take(&mut comment));
            }
            _ if line.starts_with('#') => {
                comment.push_str(setting);
                comment.push(' ');
            }
            _ => comment.clear(),
        }
    }
    out
}

#[test]
fn default_toml_shows_every_key_and_no_other() {
    let table: BTreeSet<String> = rows().into_iter().map(|r| r.key).collect();
    let shipped: BTreeSet<String> = default_toml_keys().into_keys().collect();
    let missing: Vec<_> = table.difference(&shipped).collect();
    let unknown: Vec<_> = shipped.difference(&table).collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "config/default.toml lacks {missing:?} (set them, or show them commented out) \
         and names keys the code does not have: {unknown:?}"
    );
}

#[test]
fn a_key_the_relay_does_not_read_says_so() {
    let rows = rows();
    let shipped = default_toml_keys();
    for key in INERT {
        let row = rows
            .iter()
            .find(|r| r.key == *key)
            .unwrap_or_else(|| panic!("INERT names {key}, no key"));
        assert!(
            row.meaning.starts_with(INERT_MEANING),
            "{key} does nothing; its doc comment must begin with {INERT_MEANING:?}: {}",
            row.meaning
        );
        assert!(
            shipped[*key].contains("ignored"),
            "{key} does nothing; its comment in config/default.toml must say it is ignored"
        );
    }
    // The other way round, as far as a text search can tell: a field whose
    // name (`.name`) appears nowhere in src/ outside src/config/ and its
    // section's own methods is read by nothing. Common names (`url`) always
    // appear; a unique one that does not is a setting that does nothing.
    let mut code = String::new();
    collect_code(&root().join("src"), &mut code);
    for row in &rows {
        let field = row.key.split_once('.').map_or("", |(_, f)| f);
        let read = code.match_indices(&format!(".{field}")).any(|(i, m)| {
            let next = code[i + m.len()..].chars().next();
            !next.is_some_and(|c| c.is_alphanumeric() || c == '_')
        });
        if INERT.contains(&row.key.as_str()) {
            assert!(
                !read,
                "{} is read now: take it out of INERT and document what it does",
                row.key
            );
        } else {
            assert!(
                read,
                "nothing in src/ reads {}: make it do something, or list it in INERT and document it as ignored",
                row.key
            );
        }
    }
}

/// The text of every `.rs` file under `dir` that may read a setting: all
/// of src/ but the config files that only declare, default, check, layer
/// or print the settings (a section file's own methods, such as
/// `ConsoleConfig::redis`, do count: everything after its `check`).
fn collect_code(dir: &Path, out: &mut String) {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .expect("read src")
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            collect_code(&p, out);
            continue;
        }
        // Comments cut off (a `//` in a string only hides code after it).
        let text: String = fs::read_to_string(&p)
            .expect("read a source file")
            .lines()
            .map(|l| format!("{}\n", l.split("//").next().unwrap_or("")))
            .collect();
        let in_config = p.parent().is_some_and(|d| d.ends_with("src/config"));
        let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or("");
        if !in_config {
            out.push_str(&text);
        } else if !matches!(stem, "root" | "layers" | "validate" | "tests" | "load" | "mod") {
            out.push_str(&section_methods(&text));
        }
    }
}

/// The `impl` blocks of a section file other than `Default` and the
/// `check` functions: the methods that turn settings into behaviour.
fn section_methods(text: &str) -> String {
    let mut out = String::new();
    let mut keep = false;
    let mut in_check = false;
    for line in text.lines() {
        if line.starts_with("impl ") {
            keep = !line.starts_with("impl Default for");
        } else if line == "}" {
            keep = false;
        }
        if line.trim_start().starts_with("pub(super) fn check") || line.trim_start().starts_with("fn check_") {
            in_check = true;
        }
        if keep && !in_check {
            out.push_str(line);
            out.push('\n');
        }
        if in_check && line == "    }" {
            in_check = false;
        }
    }
    out
}

#[test]
fn the_readme_excerpt_names_real_keys_with_their_defaults() {
    let rows = rows();
    let readme = read("README.md");
    let excerpt: Vec<&str> = readme
        .lines()
        .skip_while(|l| !l.starts_with("## Settings everyone sets"))
        .skip(1)
        .take_while(|l| !l.starts_with("## "))
        .filter(|l| row_key(l).is_some())
        .collect();
    assert!(
        !excerpt.is_empty(),
        "README.md has no \"## Settings everyone sets\" table"
    );
    for line in excerpt {
        let cells: Vec<&str> = line.split(" | ").collect();
        let key = row_key(line).expect("a row");
        let row = rows
            .iter()
            .find(|r| r.key == key)
            .unwrap_or_else(|| panic!("README.md names {key}, which is no configuration key"));
        assert_eq!(
            cells.get(1).copied(),
            Some(row.default.as_str()),
            "README.md's default of {key} is not the code's"
        );
    }
}

#[test]
fn the_parser_reads_docs_notes_renames_and_skips() {
    let body = "    /// the meaning,\n    /// on two lines\n    // a developer note\n    pub a: u32,\n\
                \x20   #[serde(rename = \"b\")]\n    /// b's\n    pub(crate) bee: Vec<String>,\n\
                \x20   #[serde(skip)]\n    pub hidden: bool,\n    /// c's\n    c: Dur,\n";
    let got = fields(body, "sample");
    let want = |key: &str, ty: &str, doc: &[&str]| Field {
        key: key.into(),
        rust_type: ty.into(),
        doc: doc.iter().map(|d| d.to_string()).collect(),
    };
    assert_eq!(
        got,
        vec![
            want("a", "u32", &["the meaning,", "on two lines"]),
            want("b", "Vec<String>", &["b's"]),
            want("c", "Dur", &["c's"]),
        ]
    );
    assert_eq!(rename_all(Some("snake_case"), "ReadWrite"), "read_write");
    assert_eq!(rename_all(Some("lowercase"), "ReadWrite"), "readwrite");
}
