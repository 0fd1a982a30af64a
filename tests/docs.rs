//! References in the docs that must stay true of the code, checked without
//! any service.
//!
//! docs/RELIABILITY.md's fault matrix (#38): every dependency × stopped,
//! hung, refusing, slow, each cell naming the test that injects it
//! (`file::test_name`, `file::prefix_*`, `file::*`) or saying why the case
//! is another cell's. A cell left empty, or a test renamed or removed
//! while the matrix still names it, fails here.

use std::path::Path;

fn read(path: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// The lines of the section headed `## {title}…`, up to the next `## `.
fn section<'a>(text: &'a str, title: &str) -> Vec<&'a str> {
    let mut lines = text.lines().skip_while(|l| !l.starts_with(&format!("## {title}")));
    let mut out = vec![lines.next().unwrap_or_else(|| panic!("no section \"## {title}\""))];
    out.extend(lines.take_while(|l| !l.starts_with("## ")));
    out
}

/// `file::name` references in backticks: (file, name).
fn test_refs(line: &str) -> Vec<(String, String)> {
    line.split('`')
        .skip(1)
        .step_by(2)
        .filter_map(|code| {
            let (file, name) = code.split_once("::")?;
            let ok = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '*');
            (ok(file) && ok(name) && !file.contains('*')).then(|| (file.to_string(), name.to_string()))
        })
        .collect()
}

#[test]
fn the_fault_matrix_has_no_empty_cell_and_names_real_tests() {
    let doc = read("docs/RELIABILITY.md");
    let lines = section(&doc, "Fault matrix");
    let header = lines
        .iter()
        .find(|l| l.starts_with("| dependency |"))
        .expect("the matrix's header row");
    assert_eq!(
        *header, "| dependency | stopped | hung | refusing | slow |",
        "the matrix's columns"
    );
    let rows: Vec<&str> = lines
        .iter()
        .copied()
        .skip_while(|l| !l.starts_with("| dependency |"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .collect();
    let dependencies: Vec<String> = rows
        .iter()
        .map(|r| r.split('|').nth(1).unwrap_or_default().trim().to_string())
        .collect();
    for want in [
        "Postgres primary",
        "Postgres standby",
        "pgbouncer",
        "the dead table",
        "the LISTEN session",
        "Redis master",
        "Redis replica",
        "Sentinel",
        "each Redis Cluster master",
    ] {
        assert!(
            dependencies.iter().any(|d| d.starts_with(want)),
            "the matrix has no row for {want}: {dependencies:?}"
        );
    }
    let mut named = 0;
    for row in &rows {
        let cells: Vec<&str> = row.trim_matches('|').split(" | ").map(str::trim).collect();
        assert_eq!(cells.len(), 5, "a row of five cells: {row}");
        for (cell, mode) in cells[1..].iter().zip(["stopped", "hung", "refusing", "slow"]) {
            assert!(cell.len() > 10, "{} × {mode} is empty: {row}", cells[0]);
        }
        for (file, name) in test_refs(row) {
            let source = read(&format!("tests/{file}.rs"));
            let found = if name == "*" {
                true
            } else if let Some(prefix) = name.strip_suffix('*') {
                source.contains(&format!("fn {prefix}"))
            } else {
                source.contains(&format!("fn {name}("))
            };
            assert!(
                found,
                "docs/RELIABILITY.md names {file}::{name}, which tests/{file}.rs does not have"
            );
            named += 1;
        }
    }
    assert!(named >= 30, "the matrix names its tests ({named} found)");
}

/// README is a front door, not the reference (#39): at most this many lines.
const README_LINES: usize = 250;

#[test]
fn the_readme_stays_a_front_door_with_the_test_command_ci_runs() {
    let readme = read("README.md");
    let lines = readme.lines().count();
    assert!(
        lines <= README_LINES,
        "README.md has {lines} lines (at most {README_LINES}): reference belongs in docs/"
    );
    // `.ci/run` runs the test command the README gives, on a line of its
    // own (not in a comment).
    let commands: Vec<&str> = section(&readme, "The two commands")
        .into_iter()
        .skip_while(|l| !l.starts_with("```sh"))
        .skip(1)
        .take_while(|l| !l.starts_with("```"))
        .collect();
    assert_eq!(commands.len(), 2, "README's two commands: {commands:?}");
    let test_command = commands[1].split('#').next().unwrap_or_default().trim();
    assert!(
        test_command.starts_with("scripts/"),
        "README's test command: {test_command}"
    );
    let ci = read(".ci/run");
    assert!(
        ci.lines().any(|l| l.trim() == test_command),
        ".ci/run does not run README's test command `{test_command}`"
    );
    // Every page of docs/ is on the index.
    let index = read("docs/README.md");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for entry in std::fs::read_dir(root.join("docs")).expect("docs/").flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".md") && name != "README.md" {
            assert!(
                index.contains(&format!("({name}")),
                "docs/README.md does not list {name}"
            );
        }
    }
}

/// GitHub's anchor for a heading: lower case, spaces to `-`, punctuation
/// other than `-` and `_` dropped.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The anchors of a markdown file's headings (outside code blocks).
fn anchors(text: &str) -> Vec<String> {
    let mut fenced = false;
    let mut out = Vec::new();
    for l in text.lines() {
        if l.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced && l.starts_with('#') {
            out.push(anchor(l.trim_start_matches('#')));
        }
    }
    out
}

/// Relative links `](target)` of a markdown text (outside code blocks).
fn links(text: &str) -> Vec<String> {
    let mut fenced = false;
    let mut out = Vec::new();
    for l in text.lines() {
        if l.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        let mut rest = l;
        while let Some(i) = rest.find("](") {
            let after = &rest[i + 2..];
            let Some(end) = after.find(')') else { break };
            let target = &after[..end];
            if !target.contains("://") && !target.starts_with("mailto:") {
                out.push(target.to_string());
            }
            rest = &after[end..];
        }
    }
    out
}

#[test]
fn every_relative_link_of_the_docs_resolves() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut pages = vec![
        "README.md".to_string(),
        "ARCHITECTURE.md".to_string(),
        "SECURITY.md".to_string(),
    ];
    for entry in std::fs::read_dir(root.join("docs")).expect("docs/").flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".md") {
            pages.push(format!("docs/{name}"));
        }
    }
    let mut broken = Vec::new();
    let mut checked = 0;
    for page in pages.iter().filter(|p| root.join(p).exists()) {
        let text = read(page);
        let dir = Path::new(page).parent().unwrap_or(Path::new(""));
        for link in links(&text) {
            checked += 1;
            let (file, frag) = link.split_once('#').unwrap_or((link.as_str(), ""));
            let target = if file.is_empty() {
                Path::new(page).to_path_buf()
            } else {
                dir.join(file)
            };
            if !root.join(&target).exists() {
                broken.push(format!("{page}: {link} (no file {})", target.display()));
                continue;
            }
            if !frag.is_empty() && target.extension().is_some_and(|e| e == "md") {
                let heads = anchors(&read(&target.to_string_lossy()));
                if !heads.iter().any(|h| h == frag) {
                    broken.push(format!("{page}: {link} (no heading #{frag} in {})", target.display()));
                }
            }
        }
    }
    assert!(checked >= 50, "links found: {checked}");
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn anchors_follow_githubs_rules() {
    assert_eq!(anchor(" Durability: `wait_replicas`"), "durability-wait_replicas");
    assert_eq!(anchor("OutboxRelayRedisDown"), "outboxrelayredisdown");
    assert_eq!(
        links("see [x](docs/a.md#b) and [y](https://e.org)\n```\n[z](no.md)\n```"),
        vec!["docs/a.md#b"]
    );
}
