//! Shared fixtures of the integration tests, one file per concern:
//! - `database`: a fresh, migrated database per test (`TestDb`), the Go
//!   sweeper's schema and the shipped roles;
//! - `postgres`: private Postgres servers a test may stop, freeze or fail over;
//! - `shared_redis`: a unique key prefix on the shared Redis, connections,
//!   the schedules' members;
//! - `redis_servers`, `cluster`, `proxy`: private `redis-server`s and
//!   Sentinels, a Redis Cluster, a proxy that misbehaves on demand;
//! - `relay`: the relay as a real subprocess (and its CLI), its log lines;
//! - `data`: rows, jobs, the ledger and the outbox invariant;
//! - `certs`: certificates for the TLS tests;
//! - `scrape`: reading `/metrics`; `prometheus_server`: a real Prometheus;
//! - here: `wait_until`, free ports, scratch directories.
//!
//! The console's HTTP client and browser are beside the console's tests
//! (`tests/console/`).
//!
//! Everything talks to real services: Postgres at `OUTBOX_TEST_PG`
//! (default `postgres://root@127.0.0.1:5432/test`) and Redis at
//! `OUTBOX_TEST_REDIS` (default `redis://127.0.0.1:6379/0`).
#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use tokio_postgres::NoTls;

mod certs;
pub mod cluster;
mod data;
mod database;
mod postgres;
mod prometheus_server;
pub mod proxy;
mod redis_servers;
mod relay;
mod scrape;
mod shared_redis;

// Each module of the test binary uses only part of them.
#[allow(unused_imports)]
pub use certs::*;
#[allow(unused_imports)]
pub use data::*;
#[allow(unused_imports)]
pub use database::*;
#[allow(unused_imports)]
pub use postgres::*;
#[allow(unused_imports)]
pub use prometheus_server::*;
#[allow(unused_imports)]
pub use redis_servers::*;
#[allow(unused_imports)]
pub use relay::*;
#[allow(unused_imports)]
pub use scrape::*;
#[allow(unused_imports)]
pub use shared_redis::*;

fn unique(tag: &str) -> String {
    format!("{tag}_{}", uuid::Uuid::new_v4().simple())
}

/// Poll `cond` every 20ms until it holds or `timeout` passes; panics with
/// `what` on timeout.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if cond().await {
            return;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Wait until `db`'s outbox is empty (every row delivered or dead-lettered).
pub async fn wait_drained(db: &TestDb, timeout: Duration) {
    wait_until("the outbox is empty", timeout, || async {
        db.count("SELECT count(*) FROM task_outbox").await == 0
    })
    .await;
}

/// [`wait_drained`], and on a timeout the relay's lines (health lines
/// left out) in the failure: what a drain that stalled was doing.
pub async fn wait_drained_by(db: &TestDb, timeout: Duration, relay: &RelayProcess) {
    let until = std::time::Instant::now() + timeout;
    loop {
        let left = db.count("SELECT count(*) FROM task_outbox").await;
        if left == 0 {
            return;
        }
        if std::time::Instant::now() >= until {
            let lines: Vec<String> = relay
                .lines()
                .into_iter()
                .filter(|l| !l.contains("\"actor health\""))
                .collect();
            let tail = &lines[lines.len().saturating_sub(80)..];
            panic!(
                "timed out after {}s waiting for the outbox to drain ({left} rows left); the relay's last lines:\n{}",
                timeout.as_secs(),
                tail.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A free TCP port on loopback.
/// A port nothing listens on now, never handed out before by this test
/// process: the kernel gives a port just released to the next bind(0)
/// again, so two tests starting servers at once could otherwise both be
/// told the same port, and one server would fail to start.
pub fn free_port() -> u16 {
    free_port_where(|_| true)
}

/// `OUTBOX_TEST_PORT_CLASS` (0 or 1): `scripts/test` runs two processes of
/// this binary at once, and the list of ports already handed out is per
/// process, so each takes only ports of its own class (bit 1 of the port:
/// `bind(0)` hands out odd ports, half of each class, and a cluster bus
/// port, +10,000, is of its node's class). Unset: any port.
fn of_this_process(port: u16) -> bool {
    match std::env::var("OUTBOX_TEST_PORT_CLASS").ok().as_deref() {
        Some("0") => (port >> 1) & 1 == 0,
        Some("1") => (port >> 1) & 1 == 1,
        _ => true,
    }
}

/// A port for a Redis Cluster node: it and its cluster bus port (+10000)
/// are free and neither was handed out before (a node whose bus port is
/// taken by another test's server exits at start).
pub fn free_cluster_port() -> u16 {
    free_port_where(|p| p <= 55_535 && bindable(p + 10_000))
}

fn bindable(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

fn free_port_where(ok: impl Fn(u16) -> bool) -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..1000 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        let bus = port.checked_add(10_000);
        if of_this_process(port) && !given.contains(&port) && bus.is_none_or(|b| !given.contains(&b)) && ok(port) {
            given.push(port);
            if let Some(b) = bus {
                // Kept out of later picks too: a cluster node may use it.
                given.push(b);
            }
            return port;
        }
    }
    panic!("no free port found in 1000 tries");
}

/// A new empty directory under the system temp dir, named `{stem}-{uuid}`.
pub fn scratch_dir(stem: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("{stem}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("scratch dir under the temp dir");
    dir
}

/// A cheap pseudo-random number in `range` (no extra dependency).
pub fn jitter(range: std::ops::Range<i64>) -> i64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as i64)
        .unwrap_or(0);
    range.start + nanos % (range.end - range.start)
}

/// Every `.rs` file under `dir`, depth first, in name order (the source
/// scanners of architecture, code_size and reference_cli).
pub fn rust_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}
