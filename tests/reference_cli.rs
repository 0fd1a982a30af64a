//! References generated from the code (#39 item 4): docs/metrics.md's
//! table of metrics from the metrics catalogue, docs/cli.md from clap, and
//! docs/redis.md's `ACL SETUSER` lines from the Redis commands the code
//! sends. Each lives between `<!-- NAME:begin (tests/reference_cli.rs
//! writes this block) -->` and `<!-- NAME:end -->`; a test fails when the
//! block is not what the code makes of it, and rewrites it instead with
//! `OUTBOX_WRITE_DOCS=1` (`OUTBOX_WRITE_DOCS=1 cargo test --test it
//! reference_cli::`). Prose around a block is the docs' own.
//!
//! Before, each was written by hand and drifted: the usage in the docs
//! lacked `migrate --grant`, `-c/--config`, `--version`, `bench
//! --spread-run-at` and `--skip-floors`; the metrics table lacked
//! `outbox_relay_console_login_delays_total`; the ACL lines lacked `+role`,
//! which every connection in Sentinel mode sends.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use crate::common::rust_files;

use clap::CommandFactory;
use outbox_relay::telemetry::catalogue::{MetricDef, CATALOGUE, CONSOLE_CATALOGUE};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// Check (or with `OUTBOX_WRITE_DOCS=1` rewrite) the block `name` of the
/// file at `path`: the lines between its markers must be `fresh`.
fn check_block(path: &str, name: &str, fresh: &str) {
    let begin = format!("<!-- {name}:begin (tests/reference_cli.rs writes this block) -->\n");
    let end = format!("<!-- {name}:end -->");
    let text = read(path);
    let b = text
        .find(&begin)
        .unwrap_or_else(|| panic!("{path} has no line {}", begin.trim_end()))
        + begin.len();
    let e = b + text[b..]
        .find(&end)
        .unwrap_or_else(|| panic!("{path} has no line {end} after its begin"));
    let current = &text[b..e];
    if current == fresh {
        return;
    }
    if std::env::var_os("OUTBOX_WRITE_DOCS").is_some() {
        let updated = format!("{}{fresh}{}", &text[..b], &text[e..]);
        std::fs::write(root().join(path), updated).unwrap_or_else(|e| panic!("write {path}: {e}"));
        return;
    }
    let old: BTreeSet<&str> = current.lines().collect();
    let new: BTreeSet<&str> = fresh.lines().collect();
    let gone: Vec<&&str> = old.difference(&new).collect();
    let added: Vec<&&str> = new.difference(&old).collect();
    panic!(
        "{path}'s block {name} differs from the code; rewrite it with \
         `OUTBOX_WRITE_DOCS=1 cargo test --test it reference_cli::`\n\
         lines only in the doc: {gone:#?}\nlines only in the code's version: {added:#?}"
    );
}

// ---- Metrics ---------------------------------------------------------------

/// A table cell: `|` escaped, nothing else touched.
fn cell(s: &str) -> String {
    s.replace('|', "\\|")
}

/// A table row of `cells`.
fn row(cells: &[String]) -> String {
    format!("| {} |\n", cells.join(" | "))
}

fn metric_row(d: &MetricDef, console: bool) -> String {
    let labels: Vec<String> = d.labels.iter().map(|l| format!("`{l}`")).collect();
    let help = if console {
        format!("(console) {}", d.help)
    } else {
        d.help.to_string()
    };
    row(&[
        format!("`{}`", d.name),
        d.kind.as_str().to_string(),
        labels.join(", "),
        cell(&help),
    ])
}

/// The `# HELP` and `# TYPE` of each metric family in a scrape, by name.
fn families(scrape: &str) -> BTreeMap<String, (String, String)> {
    let mut out: BTreeMap<String, (String, String)> = BTreeMap::new();
    for line in scrape.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            out.entry(name.to_string()).or_default().0 = help.to_string();
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            out.entry(name.to_string()).or_default().1 = kind.to_string();
        }
    }
    out
}

fn metrics_table() -> String {
    let metrics = outbox_relay::telemetry::metrics::Metrics::new(&Default::default()).expect("metrics");
    let scrape = metrics.render();
    let scraped = families(&scrape);
    // What the scrape shows (a labelled metric shows once it has a child)
    // is what the catalogue says.
    for d in CATALOGUE {
        if let Some((help, kind)) = scraped.get(d.name) {
            assert_eq!((help.as_str(), kind.as_str()), (d.help, d.kind.as_str()), "{}", d.name);
        }
    }
    let mut out = String::from("| metric | type | labels | meaning |\n| --- | --- | --- | --- |\n");
    for d in CATALOGUE {
        out.push_str(&metric_row(d, false));
    }
    for d in CONSOLE_CATALOGUE {
        out.push_str(&metric_row(d, true));
    }
    let process: Vec<_> = scraped.iter().filter(|(n, _)| n.starts_with("process_")).collect();
    assert!(!process.is_empty(), "no process_* metric in the scrape:\n{scrape}");
    for (name, (help, kind)) in process {
        out.push_str(&row(&[
            format!("`{name}`"),
            kind.clone(),
            String::new(),
            format!("(the process) {}", cell(help)),
        ]));
    }
    out
}

/// docs/metrics.md's table: every metric of the catalogue (and the
/// console's, and the process collector's), with its type, labels and
/// help text.
#[test]
fn metrics_md_lists_every_metric_of_the_catalogue() {
    check_block("docs/metrics.md", "metrics", &metrics_table());
}

// ---- The command line ------------------------------------------------------

/// The width the help is wrapped at. clap without its `wrap_help` feature
/// (ours) wraps nothing, whatever the terminal; the width is set all the
/// same so that turning the feature on keeps the page stable.
const WIDTH: usize = 100;

/// `cmd`'s `--help`, without trailing blanks.
fn help_text(cmd: &clap::Command) -> String {
    let text = cmd.clone().term_width(WIDTH).render_long_help().to_string();
    let lines: Vec<&str> = text.lines().map(str::trim_end).collect();
    format!("{}\n", lines.join("\n").trim_end())
}

/// Every command under `cmd`, depth first: (its words after
/// `outbox-relay`, the command).
fn commands(cmd: &clap::Command, path: Vec<String>, out: &mut Vec<(Vec<String>, clap::Command)>) {
    out.push((path.clone(), cmd.clone()));
    for sub in cmd.get_subcommands() {
        if sub.is_hide_set() || sub.get_name() == "help" {
            continue;
        }
        let mut p = path.clone();
        p.push(sub.get_name().to_string());
        commands(sub, p, out);
    }
}

fn cli_reference() -> String {
    let mut cli = outbox_relay::cli::Cli::command().term_width(WIDTH);
    cli.build();
    let mut all = Vec::new();
    commands(&cli, Vec::new(), &mut all);
    let title = |path: &[String]| {
        let mut words = vec!["outbox-relay".to_string()];
        words.extend(path.iter().cloned());
        words.join(" ")
    };
    let anchor = |t: &str| t.replace(' ', "-");
    let mut out = String::from("| command | what it does |\n| --- | --- |\n");
    for (path, cmd) in all.iter().skip(1) {
        let t = title(path);
        let about = cmd.get_about().map(|a| a.to_string()).unwrap_or_default();
        out.push_str(&format!("| [`{t}`](#{}) | {} |\n", anchor(&t), cell(&about)));
    }
    for (path, cmd) in &all {
        let t = title(path);
        out.push_str(&format!("\n## `{t}`\n\n```text\n$ {t} --help\n{}```\n", help_text(cmd)));
    }
    out
}

/// docs/cli.md: every command's `--help`, as the binary prints it.
#[test]
fn cli_md_is_every_commands_help() {
    check_block("docs/cli.md", "cli", &cli_reference());
}

/// Options that only mean something with another one say so to clap: the
/// command line is refused, instead of the option being ignored.
#[test]
fn bench_options_of_one_scenario_require_it() {
    use clap::Parser;
    let parse = |args: &[&str]| {
        let mut argv = vec!["outbox-relay", "bench"];
        argv.extend_from_slice(args);
        outbox_relay::cli::Cli::try_parse_from(argv).map(|_| ())
    };
    for (alone, with) in [
        (&["--relays", "2"][..], &["--sustained", "100"][..]),
        (&["--rows-per-txn", "5"], &["--sustained", "100"]),
        (&["--sustained-seconds", "5"], &["--sustained", "100"]),
        (
            &["--phase-seconds", "5"],
            &["--sustained", "100", "--hold-snapshot", "5"],
        ),
        (&["--scaling-rows", "5"], &["--scaling"]),
        (&["--console-idle"], &["--console"]),
    ] {
        let err = parse(alone).expect_err("refused alone");
        assert_eq!(
            err.kind(),
            clap::error::ErrorKind::MissingRequiredArgument,
            "{alone:?}: {err}"
        );
        let both: Vec<&str> = alone.iter().chain(with).copied().collect();
        parse(&both).unwrap_or_else(|e| panic!("{both:?}: {e}"));
    }
    // Without a hold there are no phases before and after it.
    assert!(parse(&["--sustained", "100", "--phase-seconds", "5"]).is_err());
    // Defaults alone require nothing.
    parse(&[]).expect("bench alone");
}

/// The manifest's comment on the `fault-injection` feature names the
/// variables src/fault.rs reads, and no other.
#[test]
fn cargo_tomls_fault_variables_are_read_by_the_code() {
    let manifest = read("Cargo.toml");
    let fault = read("src/fault.rs");
    let named: BTreeSet<&str> = manifest
        .lines()
        .filter(|l| l.trim_start().starts_with('#'))
        .flat_map(|l| l.split(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')))
        .filter(|w| w.starts_with("OUTBOX_"))
        .collect();
    let read_by_code: BTreeSet<&str> = fault
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|w| w.starts_with("OUTBOX_"))
        .collect();
    assert!(!read_by_code.is_empty(), "src/fault.rs reads no OUTBOX_ variable?");
    assert_eq!(named, read_by_code, "Cargo.toml's comments vs src/fault.rs");
}

// ---- Redis ACL -------------------------------------------------------------

/// Files every connection's code lives in (PING checks, Sentinel's ROLE,
/// the cluster's CLUSTER SLOTS): their commands are every user's.
const CONNECTION: &[&str] = &[
    "src/redis/conn.rs",
    "src/redis/connect.rs",
    "src/redis/sentinel.rs",
    "src/redis/slots.rs",
];

/// Whose Redis commands each file sends (a directory: every file under it).
/// `redis/permissions.rs` only probes what `run` sends: it is checked
/// against the relay's files below, not counted among them.
const USERS: &[(&str, &[&str])] = &[
    (
        "outbox-relay",
        &[
            "src/actors/",
            "src/app.rs",
            "src/redis/durability.rs",
            "src/redis/memory.rs",
            "src/redis/mod.rs",
            "src/redis/node.rs",
            "src/redis/pipeline/",
            "src/redis/reply.rs",
        ],
    ),
    (
        "outbox-triage",
        &["src/cancel.rs", "src/cli/jobs.rs", "src/redis/keys.rs", "src/verify.rs"],
    ),
    // `keys::per_key` runs the command its caller names: the console's
    // `ZCARD` is read at the call in console/load.rs.
    // The console's reconcile action writes through the relay's fenced
    // write (`actors::journal::reconcile`, `redis::pipeline`).
    (
        "outbox-console",
        &[
            "src/console/",
            "src/cancel.rs",
            "src/actors/journal/reconcile.rs",
            "src/redis/pipeline/",
        ],
    ),
];

/// Files that send Redis commands as none of the documented users:
/// `bench` runs on a scratch prefix as whoever the operator is (it sets
/// `notify-keyspace-events` with CONFIG SET); the probe of `run`'s needs.
const NO_USER: &[&str] = &["src/cli/bench/", "src/redis/permissions.rs"];

/// Commands whose ACL name is `command|subcommand`.
const CONTAINERS: &[&str] = &[
    "ACL", "CLIENT", "CLUSTER", "COMMAND", "CONFIG", "MEMORY", "OBJECT", "SCRIPT",
];

/// `redis-rs` typed methods (`AsyncCommands`, a pipeline's own): the
/// command each sends.
const TYPED: &[(&str, &str)] = &[
    ("del", "DEL"),
    ("exists", "EXISTS"),
    ("expire", "EXPIRE"),
    ("hdel", "HDEL"),
    ("hget", "HGET"),
    ("hgetall", "HGETALL"),
    ("hset", "HSET"),
    ("incr", "INCR"),
    ("set_ex", "SET"),
    ("unlink", "UNLINK"),
    ("zadd", "ZADD"),
    ("zcard", "ZCARD"),
    ("zrange", "ZRANGE"),
    ("zrem", "ZREM"),
];

/// The first string literal at the start of `s` (after blanks), quoted
/// with `"` or `'`.
fn literal_at(s: &str) -> Option<&str> {
    let s = s.trim_start();
    let q = s.chars().next().filter(|c| *c == '"' || *c == '\'')?;
    let rest = &s[1..];
    rest.find(q).map(|e| &rest[..e])
}

/// The Redis commands the code in `text` sends, as ACL grants (`+zadd`,
/// `+cluster|slots`): `cmd("X")` (`redis::cmd`, a pipeline's `.cmd`),
/// `redis.call('X'` / `redis.pcall('X'` in a script, `per_key::<…>(conn,
/// "X", …)`, and the typed methods of files that import `AsyncCommands`.
/// A `cmd(` whose name is not a literal fails: the scan could not see it.
fn sent(file: &str, text: &str) -> BTreeSet<String> {
    let code: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .map(|l| format!("{l}\n"))
        .collect();
    let mut names: Vec<(String, Option<String>)> = Vec::new();
    for (i, _) in code.match_indices("cmd(") {
        let before = code[..i].chars().next_back();
        if !matches!(before, Some(':') | Some('.')) {
            continue;
        }
        let after = &code[i + 4..];
        let Some(name) = literal_at(after) else {
            // `keys::per_key` passes on its caller's command (scanned there).
            assert!(
                file.ends_with("src/redis/keys.rs") && after.starts_with("cmd)"),
                "{file}: a Redis command whose name is not a literal: {}",
                &after[..after.len().min(60)]
            );
            continue;
        };
        let rest = after.trim_start()[name.len() + 2..].trim_start();
        let rest = rest.strip_prefix(')').unwrap_or(rest).trim_start();
        let sub = rest.strip_prefix(".arg(").and_then(literal_at).map(str::to_string);
        names.push((name.to_string(), sub));
    }
    for call in ["redis.call(", "redis.pcall(", "per_key::<"] {
        for (i, _) in code.match_indices(call) {
            let after = &code[i + call.len()..];
            let after = if call == "per_key::<" {
                after.split_once(',').map_or("", |(_, a)| a)
            } else {
                after
            };
            let name = literal_at(after).unwrap_or_else(|| panic!("{file}: {call} without a literal command"));
            names.push((name.to_string(), None));
        }
    }
    if code.contains("AsyncCommands") {
        for (method, name) in TYPED {
            if code.contains(&format!(".{method}(")) {
                names.push((name.to_string(), None));
            }
        }
    }
    names
        .into_iter()
        .map(|(name, sub)| {
            let name = name.to_ascii_lowercase();
            match sub {
                Some(sub) if CONTAINERS.contains(&name.to_ascii_uppercase().as_str()) => {
                    format!("+{name}|{}", sub.to_ascii_lowercase())
                }
                _ => format!("+{name}"),
            }
        })
        .collect()
}

/// Every src file's commands, by its path from the crate root.
fn sent_by_file() -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    files
        .iter()
        .map(|f| {
            let rel = f.strip_prefix(root()).expect("under the root").display().to_string();
            let text = std::fs::read_to_string(f).expect("read");
            let sent = sent(&rel, &text);
            (rel, sent)
        })
        .filter(|(_, s)| !s.is_empty())
        .collect()
}

fn covers(prefixes: &[&str], file: &str) -> bool {
    prefixes
        .iter()
        .any(|p| file == *p || (p.ends_with('/') && file.starts_with(p)))
}

/// What each documented user must be granted, in the order the line
/// lists it: `+ping`, the user's own commands (the relay's in the order
/// `redis::permissions` probes them), then what every connection sends.
fn acl_grants() -> Vec<(&'static str, Vec<String>)> {
    let by_file = sent_by_file();
    for file in by_file.keys() {
        let known =
            covers(CONNECTION, file) || covers(NO_USER, file) || USERS.iter().any(|(_, files)| covers(files, file));
        assert!(
            known,
            "{file} sends Redis commands ({:?}) as which user? Add it to USERS, CONNECTION or NO_USER",
            by_file[file]
        );
    }
    let union = |prefixes: &[&str]| -> BTreeSet<String> {
        by_file
            .iter()
            .filter(|(f, _)| covers(prefixes, f))
            .flat_map(|(_, s)| s.iter().cloned())
            .collect()
    };
    // SENTINEL goes to the sentinels, with their own passwords.
    let mut connection = union(CONNECTION);
    connection.remove("+sentinel");
    assert!(connection.contains("+ping"), "{connection:?}");
    let mut out = Vec::new();
    for (user, files) in USERS {
        let own = union(files);
        let mut line = vec!["+ping".to_string()];
        if *user == "outbox-relay" {
            let probed = outbox_relay::redis::permissions::grants();
            for g in &probed {
                assert!(
                    own.contains(*g) || connection.contains(*g),
                    "redis::permissions probes {g}, which `run` no longer sends"
                );
            }
            let unprobed: Vec<&String> = own
                .iter()
                .filter(|g| !probed.contains(&g.as_str()) && !connection.contains(*g))
                .collect();
            assert!(
                unprobed.is_empty(),
                "`run` sends {unprobed:?}, which redis::permissions::NEEDS does not probe"
            );
            line.extend(probed.iter().map(|g| g.to_string()));
        } else {
            line.extend(own.iter().cloned());
        }
        for g in &connection {
            if !line.contains(g) {
                line.push(g.clone());
            }
        }
        let mut seen = BTreeSet::new();
        line.retain(|g| seen.insert(g.clone()));
        out.push((*user, line));
    }
    out
}

fn acl_lines() -> String {
    let prefix = outbox_relay::config::RedisConfig::default().key_prefix;
    let mut out = String::from("```sh\n");
    for (user, grants) in acl_grants() {
        out.push_str(&format!(
            "ACL SETUSER {user} on >PASSWORD resetkeys ~{prefix}* resetchannels -@all {}\n",
            grants.join(" ")
        ));
    }
    out.push_str("```\n");
    out
}

/// docs/redis.md's `ACL SETUSER` lines grant each user exactly what its
/// code sends (`tests/redis_acl.rs` and `tests/console/privileges.rs` run
/// them against a real Redis).
#[test]
fn redis_md_acl_lines_grant_what_the_code_sends() {
    let fresh = acl_lines();
    let doc = read("docs/redis.md");
    for (user, want) in acl_grants() {
        let line = doc
            .lines()
            .find(|l| l.starts_with(&format!("ACL SETUSER {user} ")))
            .unwrap_or_else(|| panic!("docs/redis.md has no ACL SETUSER {user} line"));
        let has: BTreeSet<&str> = line.split_whitespace().filter(|w| w.starts_with('+')).collect();
        let want: BTreeSet<&str> = want.iter().map(String::as_str).collect();
        let missing: Vec<_> = want.difference(&has).collect();
        let extra: Vec<_> = has.difference(&want).collect();
        if std::env::var_os("OUTBOX_WRITE_DOCS").is_none() {
            assert!(
                missing.is_empty() && extra.is_empty(),
                "docs/redis.md's {user}: missing {missing:?}, extra {extra:?}; \
                 rewrite it with `OUTBOX_WRITE_DOCS=1 cargo test --test it reference_cli::`"
            );
        }
    }
    check_block("docs/redis.md", "redis-acl", &fresh);
}
