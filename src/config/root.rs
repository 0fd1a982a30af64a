//! The whole configuration, one field per section, and what is shown of
//! it: the secrets to hide and the redacted TOML.

use serde::{Deserialize, Serialize};

use super::console::ConsoleConfig;
use super::counter_sync::CounterSyncConfig;
use super::database::DatabaseConfig;
use super::dead_letter::DeadLetterConfig;
use super::health::HealthConfig;
use super::http::HttpConfig;
use super::journal::JournalConfig;
use super::log::LogConfig;
use super::metrics::MetricsConfig;
use super::redis::RedisConfig;
use super::supervisor::SupervisorConfig;
use super::sweep::SweepConfig;
use crate::redact::redact_url;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub database: DatabaseConfig,
    pub redis: RedisConfig,
    pub sweep: SweepConfig,
    pub counter_sync: CounterSyncConfig,
    pub dead_letter: DeadLetterConfig,
    pub journal: JournalConfig,
    pub supervisor: SupervisorConfig,
    pub health: HealthConfig,
    pub http: HttpConfig,
    pub console: ConsoleConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
}

impl Config {
    /// Every password in the connection strings, for `redact::remember`.
    pub fn secrets(&self) -> Vec<String> {
        [
            &self.database.url,
            &self.database.listen_url,
            &self.redis.url,
            &self.console.database_url,
            &self.console.redis_url,
        ]
        .into_iter()
        .chain(self.redis.cluster_urls.iter())
        .chain(self.redis.sentinel_urls.iter())
        .flat_map(|u| crate::redact::passwords(u))
        .collect()
    }

    /// The effective configuration as TOML, passwords replaced by `***`.
    pub fn to_redacted_toml(&self) -> String {
        let mut c = self.clone();
        c.database.url = redact_url(&c.database.url);
        if !c.database.listen_keyword() {
            c.database.listen_url = redact_url(&c.database.listen_url);
        }
        c.redis.url = redact_url(&c.redis.url);
        if !c.console.database_url.is_empty() {
            c.console.database_url = redact_url(&c.console.database_url);
        }
        if !c.console.redis_url.is_empty() {
            c.console.redis_url = redact_url(&c.console.redis_url);
        }
        c.redis.cluster_urls = c.redis.cluster_urls.iter().map(|u| redact_url(u)).collect();
        c.redis.sentinel_urls = c.redis.sentinel_urls.iter().map(|u| redact_url(u)).collect();
        toml::to_string(&c).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}
