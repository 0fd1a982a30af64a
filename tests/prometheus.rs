//! A real Prometheus (Debian's `prometheus` server) scrapes a running relay
//! and evaluates the shipped alert rules: `up` is 1, the delivered-rows
//! counter equals the rows delivered, every series has `app` and
//! `environment`, and an alert of `deploy/prometheus/outbox-relay.rules.yml`
//! fires on what the relay really did.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

struct Prometheus {
    child: Child,
    port: u16,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Start a Prometheus scraping `target` every second, with the shipped
    /// rules evaluated every second.
    fn start(target: &str) -> Prometheus {
        let dir = scratch_dir("prometheus");
        let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus/outbox-relay.rules.yml");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files: [\"{rules}\"]\n\
             scrape_configs:\n  - job_name: outbox-relay\n    static_configs: [{{ targets: [\"{target}\"] }}]\n"
        );
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, config).expect("write prometheus.yml");
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (scripts/services.sh installs Debian's prometheus package)");
        Prometheus { child, port }
    }

    /// GET `path` (HTTP/1.0: no chunked body); the JSON body, or None.
    async fn get(&self, path: &str) -> Option<serde_json::Value> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf);
        serde_json::from_str(text.split_once("\r\n\r\n")?.1).ok()
    }

    /// The instant vector of `query`: (labels, value) per series.
    async fn query(&self, query: &str) -> Vec<(serde_json::Value, f64)> {
        let q: String = url::form_urlencoded::byte_serialize(query.as_bytes()).collect();
        let Some(v) = self.get(&format!("/api/v1/query?query={q}")).await else {
            return Vec::new();
        };
        v["data"]["result"]
            .as_array()
            .map(|rs| {
                rs.iter()
                    .filter_map(|r| {
                        let value = r["value"][1].as_str()?.parse().ok()?;
                        Some((r["metric"].clone(), value))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    async fn value(&self, query: &str) -> Option<f64> {
        self.query(query).await.first().map(|(_, v)| *v)
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

    // One job's key holds a string: its rows are refused (WRONGTYPE) and,
    // with max_attempts 1, dead-lettered at once.
    let poisoned = uuid::Uuid::new_v4();
    let mut conn = redis_conn(&redis_url).await;
    let _: () = redis::AsyncCommands::set(&mut conn, format!("{}sched:{poisoned}", &*prefix), "x")
        .await
        .expect("SET");
    seed(&db, 2_000, 5).await;
    db.client()
        .await
        .execute(
            "INSERT INTO task_outbox (task_id, job_id, page_id, host, path, priority, source_type, run_at)
             SELECT gen_random_uuid(), $1::uuid, i, 'h', '/p/' || i, 1, 's', now() FROM generate_series(1, 100) i",
            &[&poisoned],
        )
        .await
        .expect("poisoned rows");
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
        "OutboxRelayRowsSetAside",
        "OutboxRelayRestartStorm",
    ];
    for r in all.iter().filter(|r| quiet.iter().any(|q| r["name"] == *q)) {
        assert_eq!(r["state"], "inactive", "{r}");
    }
    relay.stop().await;
}
