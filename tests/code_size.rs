//! Every file of `src/` and `tests/` can be held in one read, and every
//! function of `src/` in one screen or two: no file over [`FILE_LINES`]
//! lines, no function of `src/` over [`FN_LINES`] (signature to closing
//! brace, its comments included). The failure lists every offender,
//! largest first.
//!
//! The function limit is for `src/` only: an integration test is one
//! scenario told start to finish (start the services, break one, check
//! the outbox), and about ten of them run past 120 lines; cutting one
//! into helpers would hide the story the test tells, not shorten it.
use std::fs;
use std::path::PathBuf;

use crate::common::rust_files;

const FILE_LINES: usize = 600;
const FN_LINES: usize = 120;

/// The code with comments, strings and character literals blanked (each
/// byte replaced by a space, newlines kept), so braces and `fn` inside
/// them are not seen and line numbers stay true.
fn blank(code: &str) -> String {
    let b = code.as_bytes();
    let mut out = b.to_vec();
    let mut i = 0;
    let wipe = |out: &mut Vec<u8>, from: usize, to: usize| {
        for x in &mut out[from..to.min(b.len())] {
            if *x != b'\n' {
                *x = b' ';
            }
        }
    };
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                let end = code[i..].find('\n').map_or(b.len(), |n| i + n);
                wipe(&mut out, i, end);
                i = end;
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let end = code[i + 2..].find("*/").map_or(b.len(), |n| i + 2 + n + 2);
                wipe(&mut out, i, end);
                i = end;
            }
            b'r' if (b.get(i + 1) == Some(&b'"') || b.get(i + 1) == Some(&b'#'))
                && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')) =>
            {
                let hashes = code[i + 1..].bytes().take_while(|c| *c == b'#').count();
                if b.get(i + 1 + hashes) != Some(&b'"') {
                    i += 1;
                    continue;
                }
                let close = format!("\"{}", "#".repeat(hashes));
                let start = i + 2 + hashes;
                let end = code[start..].find(&close).map_or(b.len(), |n| start + n + close.len());
                wipe(&mut out, i, end);
                i = end;
            }
            b'"' => {
                let mut j = i + 1;
                while j < b.len() && b[j] != b'"' {
                    j += if b[j] == b'\\' { 2 } else { 1 };
                }
                wipe(&mut out, i, j + 1);
                i = j + 1;
            }
            b'\'' => {
                // A character literal ('x', '\n', '\u{..}'), not a lifetime.
                let rest = &code[i + 1..];
                let len = if let Some(escaped) = rest.strip_prefix('\\') {
                    escaped.find('\'').map(|n| n + 2)
                } else {
                    rest.chars()
                        .next()
                        .filter(|_| rest.chars().nth(1) == Some('\''))
                        .map(|c| c.len_utf8() + 1)
                };
                match len {
                    Some(n) => {
                        wipe(&mut out, i, i + 1 + n);
                        i += 1 + n;
                    }
                    None => i += 1,
                }
            }
            _ => i += 1,
        }
    }
    String::from_utf8(out).expect("ascii blanks keep utf-8")
}

/// Every function with a body: (name, first line, lines).
fn functions(code: &str) -> Vec<(String, usize, usize)> {
    let code = blank(code);
    let b = code.as_bytes();
    let line_of = |at: usize| code[..at].bytes().filter(|c| *c == b'\n').count() + 1;
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(k) = code[at..].find("fn ") {
        let start = at + k;
        at = start + 3;
        if start > 0 && (b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_') {
            continue;
        }
        let name: String = code[at..]
            .trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if name.is_empty() {
            continue; // `fn(…)`, a pointer type
        }
        // The body opens at the first `{` outside the parameters and
        // generics; a `;` first means a declaration without a body.
        let mut depth = 0i32;
        let mut open = None;
        for (j, c) in code[at..].bytes().enumerate() {
            match c {
                b'(' | b'[' => depth += 1,
                b')' | b']' => depth -= 1,
                b'{' if depth == 0 => {
                    open = Some(at + j);
                    break;
                }
                b';' if depth == 0 => break,
                _ => {}
            }
        }
        let Some(open) = open else { continue };
        let mut braces = 0i32;
        let mut close = b.len() - 1;
        for (j, c) in code[open..].bytes().enumerate() {
            match c {
                b'{' => braces += 1,
                b'}' => {
                    braces -= 1;
                    if braces == 0 {
                        close = open + j;
                        break;
                    }
                }
                _ => {}
            }
        }
        let first = line_of(start);
        out.push((name, first, line_of(close) - first + 1));
    }
    out
}

#[test]
fn no_file_or_function_over_the_limits() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    let sources = files.len();
    rust_files(&root.join("tests"), &mut files);
    let mut over: Vec<(usize, String)> = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let text = fs::read_to_string(f).expect("read source");
        let rel = f.strip_prefix(&root).expect("under root").display().to_string();
        let lines = text.lines().count();
        if lines > FILE_LINES {
            over.push((lines, format!("{rel}: {lines} lines (file limit {FILE_LINES})")));
        }
        if i >= sources {
            continue; // the function limit is for src/ (see the module doc)
        }
        for (name, line, n) in functions(&text) {
            if n > FN_LINES {
                over.push((
                    n,
                    format!("{rel}:{line}: fn {name}: {n} lines (function limit {FN_LINES})"),
                ));
            }
        }
    }
    over.sort_by_key(|o| std::cmp::Reverse(o.0));
    let list: Vec<&str> = over.iter().map(|(_, s)| s.as_str()).collect();
    assert!(list.is_empty(), "over the size limits:\n{}", list.join("\n"));
}

#[test]
fn the_scanner_measures_bodies_not_strings_or_patterns() {
    let code = "fn a(\n    X { y, z }: X,\n) -> R<()> {\n    let s = \"}\";\n    let c = '{';\n    // }\n    g(r#\"{\"#);\n}\n\ntrait T {\n    fn decl(&self);\n}\nfn b<'a>(x: &'a str) -> impl Fn(u8) -> u8 { |v| v }\n";
    let found = functions(code);
    assert_eq!(found, vec![("a".to_string(), 1, 8), ("b".to_string(), 13, 1)], "{code}");
}
