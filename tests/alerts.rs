//! The shipped alert rules (`deploy/prometheus/outbox-relay.rules.yml`)
//! are valid for the real `promtool`, each one is unit-tested (fires when it
//! should, stays quiet when it should not) in `outbox-relay.rules.test.yml`,
//! each links a runbook section that exists in docs/operations.md, and each queries
//! only metrics the relay exports.

use std::path::Path;
use std::process::Command;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus");
const RULES: &str = include_str!("../deploy/prometheus/outbox-relay.rules.yml");
const RULE_TESTS: &str = include_str!("../deploy/prometheus/outbox-relay.rules.test.yml");
const RUNBOOKS: &str = include_str!("../docs/operations.md");
const METRICS_SRC: &str = include_str!("../src/telemetry/metrics.rs");

fn promtool(args: &[&str]) -> (bool, String) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(Path::new(DIR))
        .output()
        .expect("promtool (scripts/services.sh installs Debian's prometheus package)");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn alert_names() -> Vec<&'static str> {
    RULES
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .map(str::trim)
        .collect()
}

#[test]
fn rules_are_valid_and_every_alert_is_unit_tested() {
    let (ok, out) = promtool(&["check", "rules", "outbox-relay.rules.yml"]);
    assert!(ok, "{out}");
    let (ok, out) = promtool(&["test", "rules", "outbox-relay.rules.test.yml"]);
    assert!(ok, "{out}");
    let names = alert_names();
    assert!(names.len() >= 8, "{names:?}");
    for name in names {
        assert!(
            RULE_TESTS.contains(&format!("alertname: {name}\n")),
            "{name} has no promtool unit test"
        );
    }
}

#[test]
fn every_alert_links_a_runbook_that_exists() {
    for name in alert_names() {
        let anchor = name.to_ascii_lowercase();
        assert!(
            RULES.contains(&format!("runbook_url: \"docs/operations.md#{anchor}\"")),
            "{name} links no runbook in docs/operations.md"
        );
        assert!(
            RUNBOOKS
                .lines()
                .any(|l| l.starts_with('#') && l.trim_start_matches('#').trim() == name),
            "docs/operations.md has no heading {name} (the runbook its alert links)"
        );
    }
}

#[test]
fn rules_query_only_exported_metrics() {
    let mut names: Vec<&str> = RULES
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("outbox_relay_"))
        .collect();
    names.sort();
    names.dedup();
    for name in names {
        // A histogram's series are its name with `_bucket`, `_sum`, `_count`.
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|b| METRICS_SRC.contains(&format!("\"{b}\"")))
            })
            .unwrap_or(name);
        assert!(METRICS_SRC.contains(&format!("\"{base}\"")), "{name} is not exported");
    }
}
