//! What `run` needs from Redis, checked up front: a user that lacks a
//! command (an ACL tighter than docs/redis.md's, a renamed command) is told so by
//! name at start and by `check-config`, instead of meeting it as a
//! dependency fault on every tick for good (counter sync without
//! `HGETALL` kept `/healthz` at 503 and the liveness probe restarting the
//! pod).
//!
//! Each need is probed with a command that changes nothing, on a key of
//! the kind the relay uses (ACL key patterns count too): the fence check
//! and the ZADD run inside `EVAL` as the schedule writes do (`ZADD XX` on
//! a key that does not exist writes nothing).

use ::redis::Value;

use super::conn::DirectConn;
use crate::config::RedisConfig;
use crate::domain::{cancel_fence_key, schedule_key};

/// A command `run` needs that the Redis user cannot run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    /// What to grant, in ACL terms (`+hgetall`).
    pub grant: &'static str,
    /// What needs it.
    pub for_what: &'static str,
    /// Without it the relay cannot work; otherwise one feature is off.
    pub required: bool,
    /// Redis's answer.
    pub error: String,
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the Redis user cannot run what {} needs (grant {}): {}",
            self.for_what, self.grant, self.error
        )
    }
}

/// Whether `e` is a refusal of the user's permissions (the command, or a
/// key it touches), directly or from inside a script.
fn refused(text: &str) -> bool {
    text.contains("NOPERM") || text.contains("no permissions") || text.contains("can't run this command")
}

/// Probe every command `run` sends with `cfg`; the ones the user may not
/// run, required or not. Errors other than a refusal (a key of the wrong
/// type, say) are not this check's business.
pub async fn missing(conn: &mut DirectConn, cfg: &RedisConfig) -> Vec<Missing> {
    let prefix = &cfg.key_prefix;
    let sched = schedule_key(prefix, "outbox-relay-permission-check");
    let fence = cancel_fence_key(prefix, &sched);
    let running = format!("{prefix}running");
    let mut probes: Vec<(&'static str, &'static str, bool, ::redis::Cmd)> = vec![
        (
            "+eval +exists",
            "the schedule writes (the cancel fence check)",
            true,
            script("return redis.call('EXISTS', KEYS[1])", &fence),
        ),
        (
            "+eval +zadd",
            "the schedule writes",
            true,
            script("return redis.call('ZADD', KEYS[1], 'XX', 0, 'x')", &sched),
        ),
        ("+hgetall", "counter sync", true, {
            let mut c = ::redis::cmd("HGETALL");
            c.arg(&running);
            c
        }),
        ("+info", "memory back-pressure", false, {
            let mut c = ::redis::cmd("INFO");
            c.arg("memory");
            c
        }),
    ];
    if cfg.wait_replicas > 0 {
        let mut c = ::redis::cmd("WAIT");
        c.arg(0).arg(0);
        probes.push(("+wait", "redis.wait_replicas", true, c));
    }
    if matches!(conn, DirectConn::Cluster(_)) {
        let mut c = ::redis::cmd("CLUSTER");
        c.arg("SLOTS");
        probes.push(("+cluster|slots", "the cluster's topology", true, c));
        if cfg.wait_replicas > 0 {
            let mut c = ::redis::cmd("CLUSTER");
            c.arg("MYID");
            probes.push(("+cluster|myid", "redis.wait_replicas in a cluster", true, c));
        }
    }
    let mut out = Vec::new();
    for (grant, for_what, required, cmd) in probes {
        if let Err(e) = cmd.query_async::<Value>(conn).await {
            if refused(&e.to_string()) {
                out.push(Missing {
                    grant,
                    for_what,
                    required,
                    error: e.to_string(),
                });
            }
        }
    }
    out
}

fn script(body: &str, key: &str) -> ::redis::Cmd {
    let mut c = ::redis::cmd("EVAL");
    c.arg(body).arg(1).arg(key);
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_told_from_other_errors() {
        assert!(refused(
            "NOPERM User relay has no permissions to run the 'hgetall' command"
        ));
        assert!(refused(
            "ERR The user executing the script can't run this command or subcommand script: ..."
        ));
        assert!(refused("NOPERM No permissions to access a key"));
        assert!(!refused(
            "WRONGTYPE Operation against a key holding the wrong kind of value"
        ));
    }
}
