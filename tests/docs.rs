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
