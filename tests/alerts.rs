//! The shipped alert rules (`deploy/prometheus/outbox-relay.rules.yml`)
//! and dashboard (`dashboards/outbox-relay.json`).
//!
//! Checked by `promtool`: the rules are valid, each one is unit-tested
//! (fires when it should, stays quiet when it should not) in
//! `outbox-relay.rules.test.yml`, each links a runbook section that exists
//! in docs/operations.md, and each queries only metrics the relay exports.
//!
//! Checked by a real Prometheus (Debian's `prometheus` server) scraping
//! running relays and evaluating the rules: `up` is 1, the delivered-rows
//! counter equals the rows delivered, every series has `app` and
//! `environment`, every dashboard query evaluates and shows the outbox
//! once under the shipped replicas, and alerts fire on what the relays
//! really did.
use crate::common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

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

/// `rows` due rows of a new job whose schedule key holds a string: Redis
/// refuses them (WRONGTYPE), so with `max_attempts = 1` each is
/// dead-lettered at its first attempt.
async fn poisoned_rows(db: &TestDb, redis_url: &str, prefix: &str, rows: i64) {
    let poisoned = uuid::Uuid::new_v4();
    let mut conn = redis_conn(redis_url).await;
    let _: () = redis::AsyncCommands::set(&mut conn, format!("{prefix}sched:{poisoned}"), "x")
        .await
        .expect("SET");
    db.client()
        .await
        .execute(
            "INSERT INTO task_outbox (task_id, job_id, page_id, host, path, priority, source_type, run_at)
             SELECT gen_random_uuid(), $1::uuid, i, 'h', '/p/' || i, 1, 's', now() FROM generate_series(1, $2::int8) i",
            &[&poisoned, &rows],
        )
        .await
        .expect("poisoned rows");
}

/// The shipped Deployment's `replicas`.
fn shipped_replicas() -> usize {
    let manifest = include_str!("../deploy/kubernetes/deployment.yaml");
    manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix("replicas:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("deploy/kubernetes/deployment.yaml sets replicas")
}

/// Every query of the shipped dashboard, by panel title, with Grafana's
/// variables filled in for one `app` and `environment`.
fn dashboard_queries(app: &str, environment: &str) -> Vec<(String, String)> {
    let dashboard: serde_json::Value =
        serde_json::from_str(include_str!("../dashboards/outbox-relay.json")).expect("dashboard JSON");
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        let title = panel["title"].as_str().unwrap_or("").to_string();
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                let expr = expr
                    .replace("$app", app)
                    .replace("$environment", environment)
                    .replace("$__rate_interval", "1m");
                out.push((title.clone(), expr));
            }
        }
    }
    out
}

/// The shipped dashboard against the shipped replica count: every relay of
/// a Deployment probes the same outbox table, so a panel that added their
/// gauges showed the backlog once per replica (the Backlog panels summed
/// them: 2 × the real backlog with the shipped `replicas: 2`). Every
/// panel's query must evaluate, and the panels that read the table must
/// show it once.
#[tokio::test]
async fn the_dashboard_and_the_alerts_show_the_outbox_once_under_the_shipped_replicas() {
    let replicas = shipped_replicas();
    assert!(replicas >= 2, "the test is about more than one relay");
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    let app = format!("dash{}", uuid::Uuid::new_v4().simple());
    let env = relay_env(
        &db,
        &redis_url,
        &prefix,
        &[
            ("OUTBOX_RELAY_SWEEP__MAX_ATTEMPTS", "1"),
            ("OUTBOX_RELAY_METRICS__APP", &app),
            ("OUTBOX_RELAY_METRICS__ENVIRONMENT", "ci"),
        ],
    );
    let mut relays = Vec::new();
    for _ in 0..replicas {
        let mut relay = RelayProcess::spawn(&env);
        relay.wait_started().await;
        relays.push(relay);
    }

    // 40 dead letters (a string-keyed schedule, max_attempts 1), then 1,500
    // rows due while delivery is paused, one of them set aside: figures
    // that stay put.
    poisoned_rows(&db, &redis_url, &prefix, 40).await;
    wait_drained(&db, Duration::from_secs(60)).await;
    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 40);
    common::cli(&db, &["pause", "--reason", "dashboard test"]);
    seed(&db, 1_500, 5).await;
    db.set_first_row("run_at = 'infinity'").await;

    let targets: Vec<String> = relays.iter().map(|r| format!("127.0.0.1:{}", r.http_port)).collect();
    let prom = Prometheus::start_all(&targets);
    let every_relay = format!(
        "count(outbox_relay_backlog_rows{{app=\"{app}\"}} == 1499 and on (instance) outbox_relay_dead_letter_rows == 40)"
    );
    wait_until(
        "Prometheus holds every relay's probe of the paused backlog",
        Duration::from_secs(90),
        || async { prom.value(&every_relay).await == Some(replicas as f64) },
    )
    .await;

    let queries = dashboard_queries(&app, "ci");
    assert!(queries.len() > 20, "{queries:?}");
    for (title, expr) in &queries {
        let answer = prom.answer(expr).await;
        assert_eq!(answer["status"], "success", "panel {title:?}: {expr}: {answer}");
    }
    let panel = |title: &str| {
        queries
            .iter()
            .find(|(t, _)| t == title)
            .map(|(_, e)| e.clone())
            .unwrap_or_else(|| panic!("no panel {title:?} in the dashboard"))
    };
    for (title, want) in [
        ("Backlog (due rows)", 1_499.0),
        ("Dead letters", 40.0),
        ("Rows set aside", 1.0),
    ] {
        let got = prom.value(&panel(title)).await;
        assert_eq!(
            got,
            Some(want),
            "panel {title:?} with {replicas} relays: {}",
            panel(title)
        );
    }

    // The shipped rules on what is in the table fire once per outbox, not
    // once per replica (before: one OutboxRelayRowsSetAside per relay).
    let firing = format!("ALERTS{{alertname=\"OutboxRelayRowsSetAside\",alertstate=\"firing\",app=\"{app}\"}}");
    wait_until("OutboxRelayRowsSetAside fires", Duration::from_secs(60), || async {
        !prom.query(&firing).await.is_empty()
    })
    .await;
    // Prometheus held every relay's set-aside row before the rule's first
    // evaluation that fired: a rule per replica fires for each in that
    // same evaluation.
    let alerts = prom.query(&firing).await;
    assert_eq!(alerts.len(), 1, "one alert for one outbox: {alerts:?}");
    assert!(alerts[0].0.get("instance").is_none(), "{alerts:?}");
    for relay in relays {
        relay.stop().await;
    }
}

#[tokio::test]
async fn a_real_prometheus_scrapes_the_relay_and_evaluates_the_rules() {
    let db = TestDb::new().await;
    let prefix = key_prefix();
    let redis_url = shared_redis_url();
    let env = relay_env(
        &db,
        &redis_url,
        &prefix,
        &[
            ("OUTBOX_RELAY_SWEEP__MAX_ATTEMPTS", "1"),
            ("OUTBOX_RELAY_METRICS__APP", "relay-under-prometheus"),
            ("OUTBOX_RELAY_METRICS__ENVIRONMENT", "ci"),
        ],
    );
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;
    let prom = Prometheus::start(&format!("127.0.0.1:{}", relay.http_port));
    // Prometheus must see the counters at 0 before the rows arrive: an
    // increase is only visible against an earlier sample.
    wait_until(
        "Prometheus has scraped the idle relay",
        Duration::from_secs(60),
        || async {
            prom.value("up{job=\"outbox-relay\"}").await == Some(1.0)
                && prom
                    .value("outbox_relay_sweep_rows_total{outcome=\"dead_lettered\"}")
                    .await
                    == Some(0.0)
        },
    )
    .await;

    // 2,000 good rows, and 100 of a job whose key holds a string: refused
    // (WRONGTYPE) and, with max_attempts 1, dead-lettered at once.
    seed(&db, 2_000, 5).await;
    poisoned_rows(&db, &redis_url, &prefix, 100).await;
    wait_drained(&db, Duration::from_secs(60)).await;
    let dead = db.count("SELECT count(*) FROM task_outbox_dead").await;
    assert_eq!(dead, 100, "the string-keyed job's rows were dead-lettered");
    let delivered = 2_000;
    wait_until(
        "the delivered-rows counter equals the rows delivered",
        Duration::from_secs(30),
        || async {
            prom.value("outbox_relay_sweep_rows_total{outcome=\"dispatched\"}")
                .await
                == Some(delivered as f64)
        },
    )
    .await;
    for (labels, _) in prom
        .query("{job=\"outbox-relay\",__name__=~\"outbox_relay_.*|process_.*\"}")
        .await
    {
        assert_eq!(labels["app"], "relay-under-prometheus", "{labels}");
        assert_eq!(labels["environment"], "ci", "{labels}");
    }
    assert!(
        prom.value("count({job=\"outbox-relay\",__name__=~\"outbox_relay_.*\"})")
            .await
            .is_some_and(|n| n > 20.0),
        "the relay's series are stored"
    );

    // The shipped rules load and evaluate; the dead letters fire theirs.
    wait_until(
        "OutboxRelayDeadLettersIncreasing fires in Prometheus",
        Duration::from_secs(60),
        || async {
            prom.query("ALERTS{alertname=\"OutboxRelayDeadLettersIncreasing\",alertstate=\"firing\"}")
                .await
                .iter()
                .any(|(l, _)| l["app"] == "relay-under-prometheus" && l["severity"] == "warning")
        },
    )
    .await;
    let rules = prom.get("/api/v1/rules").await.expect("rules API");
    let all: Vec<&serde_json::Value> = rules["data"]["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .collect();
    assert!(all.len() >= 9, "{rules}");
    for r in &all {
        assert_eq!(r["health"], "ok", "rule {} does not evaluate: {r}", r["name"]);
    }
    let quiet = [
        "OutboxRelayRedisDown",
        "OutboxRelayRedisRefusingWrites",
        "OutboxRelayRowsSetAside",
        "OutboxRelayRestartStorm",
        "OutboxRelayBacklogUncounted",
    ];
    for r in all.iter().filter(|r| quiet.iter().any(|q| r["name"] == *q)) {
        assert_eq!(r["state"], "inactive", "{r}");
    }
    relay.stop().await;
}

/// #38's alerts on what real relays did, evaluated by a real Prometheus
/// with the shipped rules: one relay whose Redis refuses every write (a
/// proxy in its path answering `-ERR`), one whose dead table refuses (a
/// trigger that raises) the rows it must move there. Each alert's
/// expression holds for its own relay's `app`, so the alert is pending and
/// then fires after its `for` (10m: promtool's cases,
/// deploy/prometheus/outbox-relay.rules.test.yml, check that part).
#[tokio::test]
async fn the_refusal_alerts_hold_on_what_the_relays_really_did() {
    let server = RedisServer::start().await;
    let proxy = common::proxy::RespProxy::start(server.port).await;
    proxy.refuse(true);
    let refusing_redis = TestDb::new().await;
    let refusing_dead = TestDb::new().await;
    guard_dead_table(&refusing_dead).await;
    let (prefix_a, prefix_b) = (key_prefix(), key_prefix());
    let redis_url = shared_redis_url();
    let mut a = RelayProcess::spawn(&relay_env(
        &refusing_redis,
        &proxy.url(),
        &prefix_a,
        &[("OUTBOX_RELAY_METRICS__APP", "refusing-redis")],
    ));
    let mut b = RelayProcess::spawn(&relay_env(
        &refusing_dead,
        &redis_url,
        &prefix_b,
        &[
            ("OUTBOX_RELAY_METRICS__APP", "refusing-dead-table"),
            ("OUTBOX_RELAY_SWEEP__MAX_ATTEMPTS", "1"),
        ],
    ));
    a.wait_started().await;
    b.wait_started().await;
    let prom = Prometheus::start_all(&[
        format!("127.0.0.1:{}", a.http_port),
        format!("127.0.0.1:{}", b.http_port),
    ]);
    wait_until("Prometheus scrapes both relays", Duration::from_secs(60), || async {
        prom.value("count(up{job=\"outbox-relay\"} == 1)").await == Some(2.0)
    })
    .await;
    seed(&refusing_redis, 100, 2).await;
    poisoned_rows(&refusing_dead, &redis_url, &prefix_b, 20).await;
    for (alert, app, severity) in [
        ("OutboxRelayRedisRefusingWrites", "refusing-redis", "critical"),
        ("OutboxRelaySettleRefused", "refusing-dead-table", "warning"),
    ] {
        wait_until(
            &format!("{alert} is pending or firing for {app}"),
            Duration::from_secs(180),
            || async {
                prom.query(&format!("ALERTS{{alertname=\"{alert}\"}}"))
                    .await
                    .iter()
                    .any(|(l, _)| l["app"] == app && l["severity"] == severity)
            },
        )
        .await;
        let others = prom.query(&format!("ALERTS{{alertname=\"{alert}\"}}")).await;
        assert!(
            others.iter().all(|(l, _)| l["app"] == app),
            "{alert} holds for its own relay only: {others:?}"
        );
    }
    a.stop().await;
    b.stop().await;
}
