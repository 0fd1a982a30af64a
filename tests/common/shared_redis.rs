//! The shared Redis at `OUTBOX_TEST_REDIS`: a key prefix per test (its
//! keys deleted when dropped), connections patient enough for a loaded
//! machine, what the schedules hold, and memory filled as another tenant
//! would. (Private servers are in `redis_servers`.)

use super::*;

pub fn shared_redis_url() -> String {
    std::env::var("OUTBOX_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

/// The docs' `ACL SETUSER <user> …` line (docs/redis.md "Redis ACL", once
/// README's), exactly as written but for `password`, as command arguments.
pub fn readme_acl(user: &str, password: &str) -> Vec<String> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/redis.md")).expect("docs/redis.md");
    let line = doc
        .lines()
        .find(|l| l.starts_with(&format!("ACL SETUSER {user} ")))
        .unwrap_or_else(|| panic!("docs/redis.md has no `ACL SETUSER {user}` line"));
    line.split_whitespace()
        .skip(1)
        .map(|w| w.replace("PASSWORD", password))
        .collect()
}

/// A unique key prefix on the shared Redis, so tests never see each other's
/// keys; its keys are deleted when it is dropped.
pub struct Prefix(pub String);

impl std::ops::Deref for Prefix {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl Drop for Prefix {
    fn drop(&mut self) {
        let pattern = format!("{}*", self.0);
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            rt.block_on(async {
                let Ok(client) = redis::Client::open(shared_redis_url()) else {
                    return;
                };
                let Ok(mut conn) = client.get_multiplexed_async_connection_with_config(&patient()).await else {
                    return;
                };
                let keys: Vec<String> = conn.keys(&pattern).await.unwrap_or_default();
                if !keys.is_empty() {
                    let _: Result<i64, _> = conn.del(keys).await;
                }
            });
        })
        .join();
    }
}

pub fn key_prefix() -> Prefix {
    Prefix(format!("{}:", unique("t")))
}

/// A unique prefix with a hash tag, `{t…}:`: docs/redis.md's advice for Redis
/// Cluster (every key of the relay in one slot). Data tests that touch a
/// key's layout (the cancel fence) run under both kinds.
pub fn tagged_key_prefix() -> Prefix {
    Prefix(format!("{{{}}}:", unique("t")))
}

pub async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("redis url")
        .get_multiplexed_async_connection_with_config(&patient())
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"))
}

/// A test's own Redis connections wait as long as a loaded machine needs:
/// redis-rs answers "timed out" after 500 ms by default, which a ZRANGE of
/// 30,000 members decoded by a debug build while the machine builds or
/// runs other tests can exceed (a run of the console's browser test failed so).
pub fn patient() -> redis::AsyncConnectionConfig {
    redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(10)))
        .set_response_timeout(Some(Duration::from_secs(60)))
}

/// All members of every `{prefix}sched:*` key, member → score.
pub async fn schedule_members(url: &str, prefix: &str) -> HashMap<String, f64> {
    let mut conn = redis_conn(url).await;
    let keys: Vec<String> = conn.keys(format!("{prefix}sched:*")).await.expect("KEYS");
    let mut all = HashMap::new();
    for k in keys {
        let kind: String = redis::cmd("TYPE").arg(&k).query_async(&mut conn).await.expect("TYPE");
        if kind != "zset" {
            continue;
        }
        let pairs: Vec<(String, f64)> = conn.zrange_withscores(&k, 0, -1).await.expect("ZRANGE");
        all.extend(pairs);
    }
    all
}

/// `INFO memory`'s `used_memory` and `maxmemory` on `conn`'s server.
pub async fn redis_memory(conn: &mut redis::aio::MultiplexedConnection) -> (f64, f64) {
    let info: String = redis::cmd("INFO").arg("memory").query_async(conn).await.expect("INFO");
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.trim_end().strip_prefix(name)?.strip_prefix(':')?.parse::<f64>().ok())
            .expect("INFO field")
    };
    (field("used_memory"), field("maxmemory"))
}

/// Fill the server behind `conn` with strings of 256 KiB (a whole one
/// would count twice, in the query buffer too, and meet OOM) until
/// `used_memory` is `share` of its `maxmemory`, as another tenant of the
/// same Redis would; only keys `keep` accepts (a cluster node takes only
/// keys of its slots). Returns the keys written.
pub async fn fill_redis_to(
    conn: &mut redis::aio::MultiplexedConnection,
    share: f64,
    keep: impl Fn(&str) -> bool,
) -> Vec<String> {
    let mut keys = Vec::new();
    for i in 0.. {
        let (used, max) = redis_memory(conn).await;
        if used >= max * share {
            break;
        }
        let key = format!("filler:{i}");
        if !keep(&key) {
            continue;
        }
        let _: () = redis::cmd("SET")
            .arg(&key)
            .arg(vec![b'x'; 256 * 1024])
            .query_async(conn)
            .await
            .expect("SET filler");
        keys.push(key);
    }
    keys
}
