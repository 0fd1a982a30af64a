//! A real Redis Cluster on loopback for the tests: `redis-server
//! --cluster-enabled yes` on free ports, joined with `redis-cli --cluster
//! create … --cluster-replicas N --cluster-yes`. Each test gets its own.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{free_cluster_port, wait_until};

/// One node process.
pub struct ClusterNode {
    pub port: u16,
    child: Option<Child>,
}

pub struct RedisCluster {
    pub nodes: Vec<ClusterNode>,
    dir: PathBuf,
    /// `cluster-require-full-coverage yes`, Redis's default: the whole
    /// cluster refuses commands while any slot has no master.
    full_coverage: bool,
}

/// A master as the cluster sees it: its port and the slot ranges it owns.
#[derive(Debug, Clone)]
pub struct Master {
    pub port: u16,
    pub ranges: Vec<(u16, u16)>,
    pub replicas: Vec<u16>,
}

impl Master {
    pub fn owns(&self, slot: u16) -> bool {
        self.ranges.iter().any(|&(a, b)| (a..=b).contains(&slot))
    }
}

impl RedisCluster {
    /// `masters` masters with `replicas` replicas each. Node timeout 1s so a
    /// killed master fails over within seconds; full coverage is not
    /// required, so the healthy masters keep serving while one is down.
    pub async fn start(masters: usize, replicas: usize) -> RedisCluster {
        Self::start_with(masters, replicas, false).await
    }

    /// As [`RedisCluster::start`], with Redis's default
    /// `cluster-require-full-coverage yes`.
    pub async fn start_stock(masters: usize, replicas: usize) -> RedisCluster {
        Self::start_with(masters, replicas, true).await
    }

    async fn start_with(masters: usize, replicas: usize, full_coverage: bool) -> RedisCluster {
        let dir = super::scratch_dir("outbox-cluster");
        let mut cluster = RedisCluster {
            nodes: Vec::new(),
            dir,
            full_coverage,
        };
        for _ in 0..masters * (1 + replicas) {
            let port = free_cluster_port();
            let mut node = ClusterNode { port, child: None };
            cluster.spawn(&mut node);
            cluster.nodes.push(node);
        }
        for node in &cluster.nodes {
            wait_until("cluster node answers PING", Duration::from_secs(20), || async {
                cli(node.port, &["PING"]).map(|o| o.trim() == "PONG").unwrap_or(false)
            })
            .await;
        }
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for node in &cluster.nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        create
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let status = create.status().expect("run redis-cli --cluster create");
        assert!(status.success(), "redis-cli --cluster create failed");
        cluster.wait_healthy(masters, replicas).await;
        cluster
    }

    fn node_dir(&self, port: u16) -> PathBuf {
        let dir = self.dir.join(format!("node-{port}"));
        std::fs::create_dir_all(&dir).expect("cluster node dir");
        dir
    }

    fn spawn(&self, node: &mut ClusterNode) {
        let port = node.port.to_string();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "1000"])
            .args([
                "--cluster-require-full-coverage",
                if self.full_coverage { "yes" } else { "no" },
            ])
            .arg("--cluster-config-file")
            .arg(self.dir.join(format!("nodes-{port}.conf")))
            .args(super::REDIS_REPLICATION_ARGS)
            // Each node its own data directory: a replica writes what it
            // receives there, and a node that restarts loads it.
            .arg("--dir")
            .arg(self.node_dir(node.port))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (is it installed?)");
        node.child = Some(child);
    }

    /// Wait until every live node reports `cluster_state:ok` and the slot map
    /// shows `masters` masters covering all 16384 slots, each with `replicas`
    /// replicas.
    pub async fn wait_healthy(&self, masters: usize, replicas: usize) {
        wait_until("redis cluster healthy", Duration::from_secs(60), || async {
            let live: Vec<u16> = self
                .nodes
                .iter()
                .filter(|n| n.child.is_some())
                .map(|n| n.port)
                .collect();
            let ok = live.iter().all(|&p| {
                cli(p, &["CLUSTER", "INFO"])
                    .map(|o| o.contains("cluster_state:ok"))
                    .unwrap_or(false)
            });
            if !ok {
                return false;
            }
            match self.masters() {
                Some(m) => {
                    let covered: u32 = m
                        .iter()
                        .flat_map(|m| m.ranges.iter())
                        .map(|&(a, b)| u32::from(b - a) + 1)
                        .sum();
                    m.len() == masters && covered == 16384 && m.iter().all(|m| m.replicas.len() == replicas)
                }
                None => false,
            }
        })
        .await;
    }

    /// Comma-separated seed URLs (all nodes), as `OUTBOX_RELAY_REDIS__CLUSTER_URLS` takes them.
    pub fn seed_urls(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The masters and their slots, as a live node reports them (CLUSTER SHARDS
    /// would do too; `CLUSTER NODES` is the most stable format).
    pub fn masters(&self) -> Option<Vec<Master>> {
        let port = self.nodes.iter().find(|n| n.child.is_some())?.port;
        let text = cli(port, &["CLUSTER", "NODES"])?;
        let mut by_id: HashMap<String, Master> = HashMap::new();
        let mut replicas: Vec<(String, u16)> = Vec::new();
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 {
                continue;
            }
            let port: u16 = f[1].split('@').next()?.rsplit(':').next()?.parse().ok()?;
            let flags = f[2];
            if flags.contains("fail") {
                continue;
            }
            if flags.contains("master") {
                let ranges = f[8..]
                    .iter()
                    .filter(|r| !r.starts_with('['))
                    .filter_map(|r| match r.split_once('-') {
                        Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                        None => r.parse().ok().map(|s| (s, s)),
                    })
                    .collect::<Vec<(u16, u16)>>();
                if !ranges.is_empty() {
                    by_id.insert(
                        f[0].to_string(),
                        Master {
                            port,
                            ranges,
                            replicas: Vec::new(),
                        },
                    );
                }
            } else if flags.contains("slave") {
                replicas.push((f[3].to_string(), port));
            }
        }
        for (master, port) in replicas {
            if let Some(m) = by_id.get_mut(&master) {
                m.replicas.push(port);
            }
        }
        let mut masters: Vec<Master> = by_id.into_values().collect();
        masters.sort_by_key(|m| m.port);
        Some(masters)
    }

    /// Kill one node (SIGKILL: no goodbye to the cluster).
    pub fn kill(&mut self, port: u16) {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port == port)
            .expect("node of the cluster");
        if let Some(mut c) = node.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP (`"STOP"`) or SIGCONT (`"CONT"`) one node: frozen, its
    /// sockets stay open and nothing answers.
    pub fn signal(&self, port: u16, sig: &str) {
        let node = self.nodes.iter().find(|n| n.port == port).expect("node of the cluster");
        let pid = node.child.as_ref().expect("node running").id();
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{sig} {pid}");
    }

    /// Start a killed node again on its port with its cluster config: it
    /// rejoins with the role and slots the cluster has for it now.
    pub async fn revive(&mut self, port: u16) {
        let idx = self
            .nodes
            .iter()
            .position(|n| n.port == port)
            .expect("node of the cluster");
        let mut node = ClusterNode { port, child: None };
        self.spawn(&mut node);
        self.nodes[idx] = node;
        wait_until("revived cluster node answers PING", Duration::from_secs(20), || async {
            cli(port, &["PING"]).map(|o| o.trim() == "PONG").unwrap_or(false)
        })
        .await;
    }

    /// Every key matching `pattern` on the node at `port` (a direct connection:
    /// what that node itself holds).
    pub fn keys_on(port: u16, pattern: &str) -> HashSet<String> {
        let out = cli(port, &["--scan", "--pattern", pattern]).unwrap_or_default();
        out.lines().map(str::to_string).filter(|l| !l.is_empty()).collect()
    }

    /// A cluster connection, as consumers would use.
    pub async fn connection(&self) -> redis::cluster_async::ClusterConnection {
        let urls: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect();
        redis::cluster::ClusterClient::new(urls)
            .expect("cluster client")
            .get_async_connection()
            .await
            .expect("connect to the cluster")
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut c) = node.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Run `redis-cli -p port args…`; its stdout, or None when it failed.
pub fn cli(port: u16, args: &[&str]) -> Option<String> {
    run_cli(Command::new("redis-cli"), port, args)
}

/// Run `redis_cli` (`redis-cli` with its connection options) against
/// 127.0.0.1:`port` with `args`; its stdout, or None when it failed.
fn run_cli(mut redis_cli: Command, port: u16, args: &[&str]) -> Option<String> {
    let out = redis_cli
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A Redis Cluster that speaks only TLS (`--port 0 --tls-port P
/// --tls-cluster yes`), with one certificate for 127.0.0.1 from a CA of its
/// own ([`TlsCluster::ca_file`]); masters only.
pub struct TlsCluster {
    pub ports: Vec<u16>,
    children: Vec<Child>,
    dir: PathBuf,
}

impl TlsCluster {
    pub async fn start(masters: usize) -> TlsCluster {
        let dir = super::scratch_dir("outbox-tls-cluster");
        let (key, crt) = (dir.join("server.key"), dir.join("server.crt"));
        super::server_cert(&dir, &key, &crt);
        let mut cluster = TlsCluster {
            ports: Vec::new(),
            children: Vec::new(),
            dir,
        };
        for _ in 0..masters {
            let port = free_cluster_port();
            let node_dir = cluster.dir.join(format!("node-{port}"));
            std::fs::create_dir_all(&node_dir).expect("cluster node dir");
            let child = Command::new("redis-server")
                .args(["--port", "0", "--tls-port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--tls-cluster", "yes", "--tls-auth-clients", "no"])
                .arg("--tls-cert-file")
                .arg(&crt)
                .arg("--tls-key-file")
                .arg(&key)
                .arg("--tls-ca-cert-file")
                .arg(cluster.ca_file())
                .args(["--save", "", "--appendonly", "no"])
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "1000"])
                .arg("--cluster-config-file")
                .arg(node_dir.join("nodes.conf"))
                .arg("--dir")
                .arg(&node_dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start redis-server (is it installed?)");
            cluster.ports.push(port);
            cluster.children.push(child);
        }
        for &port in &cluster.ports {
            wait_until("TLS cluster node answers PING", Duration::from_secs(20), || async {
                cluster.cli(port, &["PING"]).is_some_and(|o| o.trim() == "PONG")
            })
            .await;
        }
        let mut create = cluster.cli_command();
        create.arg("--cluster").arg("create");
        for port in &cluster.ports {
            create.arg(format!("127.0.0.1:{port}"));
        }
        let mut create = create
            .arg("--cluster-yes")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run redis-cli --cluster create");
        // It waits for the nodes to join over the TLS bus forever if they
        // cannot (a certificate they refuse): give up instead of hanging.
        let started = std::time::Instant::now();
        let status = loop {
            if let Some(status) = create.try_wait().expect("wait for redis-cli") {
                break status;
            }
            if started.elapsed() > Duration::from_secs(60) {
                let _ = create.kill();
                let _ = create.wait();
                panic!("redis-cli --tls --cluster create did not return within 60s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(status.success(), "redis-cli --tls --cluster create failed");
        wait_until("TLS cluster healthy", Duration::from_secs(60), || async {
            cluster.ports.iter().all(|&p| {
                cluster
                    .cli(p, &["CLUSTER", "INFO"])
                    .is_some_and(|o| o.contains("cluster_state:ok"))
            })
        })
        .await;
        cluster
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// Comma-separated `rediss://` seed URLs.
    pub fn seed_urls(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("rediss://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn cli_command(&self) -> Command {
        let mut c = Command::new("redis-cli");
        c.arg("--tls").arg("--cacert").arg(self.ca_file());
        c
    }

    /// `redis-cli --tls -p port args…`; its stdout, or None when it failed.
    pub fn cli(&self, port: u16, args: &[&str]) -> Option<String> {
        run_cli(self.cli_command(), port, args)
    }

    /// A cluster connection over TLS that trusts the cluster's CA.
    pub async fn connection(&self) -> redis::cluster_async::ClusterConnection {
        let pem = std::fs::read(self.ca_file()).expect("read the CA");
        redis::cluster::ClusterClient::builder(self.seed_urls().split(',').map(str::to_string))
            .certs(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem),
            })
            .build()
            .expect("TLS cluster client")
            .get_async_connection()
            .await
            .expect("connect to the TLS cluster")
    }
}

impl Drop for TlsCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
