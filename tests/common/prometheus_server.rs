//! A real Prometheus (Debian's `prometheus` server) scraping relays with
//! the shipped rules (`deploy/prometheus/outbox-relay.rules.yml`), and its
//! query API.

use super::*;

pub struct Prometheus {
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
    pub fn start(target: &str) -> Prometheus {
        Prometheus::start_all(&[target.to_string()])
    }

    /// The same, scraping every one of `targets`.
    pub fn start_all(targets: &[String]) -> Prometheus {
        let targets = targets
            .iter()
            .map(|t| format!("\"{t}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let dir = scratch_dir("prometheus");
        let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus/outbox-relay.rules.yml");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files: [\"{rules}\"]\n\
             scrape_configs:\n  - job_name: outbox-relay\n    static_configs: [{{ targets: [{targets}] }}]\n"
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
    pub async fn get(&self, path: &str) -> Option<serde_json::Value> {
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
    pub async fn query(&self, query: &str) -> Vec<(serde_json::Value, f64)> {
        self.answer(query).await["data"]["result"]
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

    pub async fn value(&self, query: &str) -> Option<f64> {
        self.query(query).await.first().map(|(_, v)| *v)
    }

    /// The query API's whole answer for `query` (its `status`, and `error`
    /// when Prometheus refused it).
    pub async fn answer(&self, query: &str) -> serde_json::Value {
        let q: String = url::form_urlencoded::byte_serialize(query.as_bytes()).collect();
        self.get(&format!("/api/v1/query?query={q}"))
            .await
            .unwrap_or(serde_json::Value::Null)
    }
}
