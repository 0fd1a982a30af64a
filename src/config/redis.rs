//! `[redis]`: the Redis holding the schedules (standalone, cluster or
//! sentinel), its key prefix and safety limits, with their check.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::duration::Dur;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// Redis with the schedules
    // `REDIS_URL` overrides it. Sentinel mode reaches the master with its
    // user, password, database and TLS (at the address the sentinels name);
    // cluster mode does not use it.
    pub url: String,
    /// connections in the dispatch pool (1–1000); counter sync and the metrics probe hold
    /// one Redis connection each
    // The console (`ConsoleConfig::redis`) connects with one connection of its own.
    pub pool_size: u32,
    /// prefix of every key; a `{` or `}` only as a complete `{hash tag}`
    // `hover:` matches existing consumers.
    pub key_prefix: String,
    /// N > 0: a batch is deleted only once N replicas acknowledged it (`WAIT N <half the
    /// time left>`); otherwise its rows stay and are re-sent (see
    /// [Durability](redis.md#durability-wait_replicas))
    pub wait_replicas: u32,
    /// `standalone` (`redis.url`), `cluster` (Redis Cluster through `redis.cluster_urls`)
    /// or `sentinel` (the master `redis.sentinel_urls` name; see [Redis
    /// Sentinel](redis.md#redis-sentinel))
    pub mode: RedisMode,
    /// cluster seed nodes, e.g. `["redis://10.0.0.1:6379", "redis://10.0.0.2:6379"]`;
    /// environment: comma-separated
    // Any reachable subset of the nodes will do; cluster mode only.
    pub cluster_urls: Vec<String>,
    /// sentinel mode: the sentinels, each with its own password and TLS, e.g.
    /// `["redis://10.0.0.1:26379"]`; environment: comma-separated
    // Any one sentinel that answers will do.
    pub sentinel_urls: Vec<String>,
    /// sentinel mode: the name the sentinels monitor the master under (`mymaster`)
    // As in the sentinels' `sentinel monitor NAME …`.
    pub sentinel_master: String,
    /// PEM file of the CA(s) that signed the Redis servers' certificates, for `rediss://`
    /// URLs with a private CA; `""` = the system's roots (see [TLS to
    /// Redis](redis.md#tls-to-redis))
    pub tls_ca_file: String,
    /// how long `cancel-job`'s fence refuses the job's schedule writes (≥ 1m); must
    /// outlive any Redis stall or partition that Redis can resume from with old writes
    /// still queued
    // The fence is `{prefix}cancelled:{…}`: a ZADD of the job that a
    // stalled Redis executes within this time is refused.
    pub cancel_fence_ttl: Dur,
    /// back-pressure: when Redis has a `maxmemory` and `used_memory` reaches this share
    /// of it (above 0.1, at most 1), the relay stops writing (rows wait in the outbox, no
    /// attempt counted, one warning) until it is 0.05 below; checked with `INFO memory`
    /// every 250 ms beside the batches, and before every batch once within 0.1 of the
    /// mark or after writing half the room the last reading left; in a cluster on every
    /// master, the fullest deciding; a Redis that refuses `INFO` turns it off with one
    /// warning
    // Instead of driving Redis into OOM refusals; 1 = only when full.
    pub max_memory_ratio: f64,
}

/// How the relay talks to Redis.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum RedisMode {
    #[default]
    Standalone,
    Cluster,
    Sentinel,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379/0".into(),
            pool_size: 4,
            key_prefix: "hover:".into(),
            wait_replicas: 0,
            mode: RedisMode::Standalone,
            cluster_urls: Vec::new(),
            sentinel_urls: Vec::new(),
            sentinel_master: String::new(),
            tls_ca_file: String::new(),
            cancel_fence_ttl: Dur::secs(7 * 86_400),
            max_memory_ratio: 0.9,
        }
    }
}

/// Every `{` of `prefix` opens a non-empty `{tag}` closed within it, and no
/// `}` stands alone: then a key's hash tag is either the prefix's (the same
/// for every key of the relay) or comes after the prefix.
fn braces_balanced(prefix: &str) -> bool {
    let mut open = false;
    let mut len = 0;
    for c in prefix.chars() {
        match (c, open) {
            ('{', false) => {
                open = true;
                len = 0;
            }
            ('}', true) if len > 0 => open = false,
            ('{' | '}', _) => return false,
            (_, true) => len += 1,
            _ => {}
        }
    }
    !open
}

impl RedisConfig {
    /// `redis.*`: the URL, the pool, the key prefix, the memory ratio and
    /// the fence, then the mode's own keys, then the CA file.
    pub(super) fn check(&self, bad: &mut impl FnMut(&str, String)) {
        if let Err(e) = ::redis::Client::open(self.url.as_str()) {
            bad("redis.url", format!("not a Redis URL: {e}"));
        }
        if !(1..=1000).contains(&self.pool_size) {
            bad(
                "redis.pool_size",
                format!("must be between 1 and 1000 (got {})", self.pool_size),
            );
        }
        if self.key_prefix.chars().any(char::is_whitespace) {
            bad("redis.key_prefix", "must not contain whitespace".into());
        }
        if !braces_balanced(&self.key_prefix) {
            bad(
                "redis.key_prefix",
                format!(
                    "{:?} has a '{{' or '}}' that is not part of a {{hash tag}}: a job's cancel fence could not share its schedule's cluster slot",
                    self.key_prefix
                ),
            );
        }
        if !(self.max_memory_ratio > 0.1 && self.max_memory_ratio <= 1.0) {
            bad(
                "redis.max_memory_ratio",
                format!(
                    "{} is out of range: a share of Redis's maxmemory above 0.1 and at most 1 (0.9 = stop writing at 90%)",
                    self.max_memory_ratio
                ),
            );
        }
        if self.cancel_fence_ttl.0 < Duration::from_secs(60) {
            bad(
                "redis.cancel_fence_ttl",
                "must be at least 1m (it must outlive any Redis stall)".into(),
            );
        }
        self.check_mode(bad);
        if !self.tls_ca_file.is_empty() {
            let urls: Vec<&String> = match self.mode {
                RedisMode::Standalone => vec![&self.url],
                RedisMode::Cluster => self.cluster_urls.iter().collect(),
                RedisMode::Sentinel => self.sentinel_urls.iter().chain([&self.url]).collect(),
            };
            if let Err(e) = crate::tls::read_ca_file(&self.tls_ca_file) {
                bad("redis.tls_ca_file", e.to_string());
            } else if !urls.iter().any(|u| u.starts_with("rediss://")) {
                bad(
                    "redis.tls_ca_file",
                    "is set, but no Redis URL is rediss://: use rediss://, or the CA is never used".into(),
                );
            }
        }
    }

    /// The keys of cluster mode (`cluster_urls`) or sentinel mode
    /// (`sentinel_urls`, `sentinel_master`), whichever is configured.
    fn check_mode(&self, bad: &mut impl FnMut(&str, String)) {
        if self.mode == RedisMode::Cluster {
            if self.cluster_urls.is_empty() {
                bad(
                    "redis.cluster_urls",
                    "cluster mode needs at least one seed node (e.g. [\"redis://10.0.0.1:6379\"])".into(),
                );
            }
            let mut urls_ok = true;
            for (i, url) in self.cluster_urls.iter().enumerate() {
                if let Err(e) = ::redis::Client::open(url.as_str()) {
                    urls_ok = false;
                    bad(&format!("redis.cluster_urls[{i}]"), format!("not a Redis URL: {e}"));
                }
            }
            // Each URL is fine on its own; the set may still not be (e.g. mixed credentials).
            if urls_ok && !self.cluster_urls.is_empty() {
                if let Err(e) = ::redis::cluster::ClusterClient::new(self.cluster_urls.clone()) {
                    bad("redis.cluster_urls", format!("not usable as cluster seeds: {e}"));
                }
            }
        }
        if self.mode == RedisMode::Sentinel {
            if self.sentinel_urls.is_empty() {
                bad(
                    "redis.sentinel_urls",
                    "sentinel mode needs at least one sentinel (e.g. [\"redis://10.0.0.1:26379\"])".into(),
                );
            }
            for (i, url) in self.sentinel_urls.iter().enumerate() {
                if let Err(e) = ::redis::Client::open(url.as_str()) {
                    bad(&format!("redis.sentinel_urls[{i}]"), format!("not a Redis URL: {e}"));
                }
            }
            if self.sentinel_master.trim().is_empty() {
                bad(
                    "redis.sentinel_master",
                    "sentinel mode needs the name the sentinels monitor the master under (`sentinel monitor NAME …`, often mymaster)".into(),
                );
            }
        }
    }
}
