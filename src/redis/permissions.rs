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

/// When a need applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    Always,
    /// `redis.wait_replicas` > 0.
    WaitReplicas,
    /// `redis.mode = "cluster"`.
    Cluster,
    /// Both.
    ClusterWaitReplicas,
}

/// One command (or script) `run` sends, and how it is probed.
#[derive(Debug, Clone, Copy)]
pub struct Need {
    /// What to grant, in ACL terms (`+eval +exists`).
    pub grant: &'static str,
    /// What needs it.
    pub for_what: &'static str,
    /// Without it the relay cannot work; otherwise one feature is off.
    pub required: bool,
    pub when: When,
    probe: Probe,
}

/// The command that probes a need, changing nothing.
#[derive(Debug, Clone, Copy)]
enum Probe {
    FenceExists,
    ScheduleZadd,
    RunningHgetall,
    InfoMemory,
    MarkerSet,
    ScheduleZscore,
    Wait,
    ClusterSlots,
    ClusterMyid,
}

/// Everything `run` sends besides what every connection sends first
/// (`PING`, and `ROLE` with Sentinel: without them no probe gets this
/// far), in the order it is probed. docs/redis.md's
/// `ACL SETUSER outbox-relay` line is generated from it
/// (`tests/reference_cli.rs`).
pub const NEEDS: &[Need] = &[
    Need {
        grant: "+eval +exists",
        for_what: "the schedule writes (the cancel fence check)",
        required: true,
        when: When::Always,
        probe: Probe::FenceExists,
    },
    Need {
        grant: "+eval +zadd",
        for_what: "the schedule writes",
        required: true,
        when: When::Always,
        probe: Probe::ScheduleZadd,
    },
    Need {
        grant: "+hgetall",
        for_what: "counter sync",
        required: true,
        when: When::Always,
        probe: Probe::RunningHgetall,
    },
    Need {
        grant: "+info",
        for_what: "memory back-pressure",
        required: false,
        when: When::Always,
        probe: Probe::InfoMemory,
    },
    Need {
        grant: "+info +exists +set",
        for_what: "the loss watch (INFO server replication, its marker key)",
        required: false,
        when: When::Always,
        probe: Probe::MarkerSet,
    },
    Need {
        grant: "+zscore",
        for_what: "writing lost entries again from the journal",
        required: false,
        when: When::Always,
        probe: Probe::ScheduleZscore,
    },
    Need {
        grant: "+wait",
        for_what: "redis.wait_replicas",
        required: true,
        when: When::WaitReplicas,
        probe: Probe::Wait,
    },
    Need {
        grant: "+cluster|slots",
        for_what: "the cluster's topology",
        required: true,
        when: When::Cluster,
        probe: Probe::ClusterSlots,
    },
    Need {
        grant: "+cluster|myid",
        for_what: "redis.wait_replicas in a cluster",
        required: true,
        when: When::ClusterWaitReplicas,
        probe: Probe::ClusterMyid,
    },
];

/// Every ACL grant of [`NEEDS`], one command each, first mention first
/// (`+eval`, `+exists`, `+zadd`, …).
pub fn grants() -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    for g in NEEDS.iter().flat_map(|n| n.grant.split_whitespace()) {
        if !out.contains(&g) {
            out.push(g);
        }
    }
    out
}

/// Probe every command `run` sends with `cfg`; the ones the user may not
/// run, required or not. Errors other than a refusal (a key of the wrong
/// type, say) are not this check's business.
pub async fn missing(conn: &mut DirectConn, cfg: &RedisConfig) -> Vec<Missing> {
    let prefix = &cfg.key_prefix;
    let sched = schedule_key(prefix, "outbox-relay-permission-check");
    let fence = cancel_fence_key(prefix, &sched);
    let running = format!("{prefix}running");
    let cluster = matches!(conn, DirectConn::Cluster(_));
    let wait = cfg.wait_replicas > 0;
    let mut out = Vec::new();
    for need in NEEDS {
        let applies = match need.when {
            When::Always => true,
            When::WaitReplicas => wait,
            When::Cluster => cluster,
            When::ClusterWaitReplicas => cluster && wait,
        };
        if !applies {
            continue;
        }
        let cmd = match need.probe {
            Probe::FenceExists => script("return redis.call('EXISTS', KEYS[1])", &fence),
            Probe::ScheduleZadd => script("return redis.call('ZADD', KEYS[1], 'XX', 0, 'x')", &sched),
            Probe::RunningHgetall => ::redis::cmd("HGETALL").arg(&running).to_owned(),
            Probe::InfoMemory => ::redis::cmd("INFO").arg("memory").to_owned(),
            // XX on a key that is never there: the permission, no write.
            Probe::MarkerSet => ::redis::cmd("SET")
                .arg(format!("{}-probe", super::node::marker_key(prefix)))
                .arg("x")
                .arg("XX")
                .to_owned(),
            Probe::ScheduleZscore => ::redis::cmd("ZSCORE").arg(&sched).arg("x").to_owned(),
            Probe::Wait => ::redis::cmd("WAIT").arg(0).arg(0).to_owned(),
            Probe::ClusterSlots => ::redis::cmd("CLUSTER").arg("SLOTS").to_owned(),
            Probe::ClusterMyid => ::redis::cmd("CLUSTER").arg("MYID").to_owned(),
        };
        if let Err(e) = cmd.query_async::<Value>(conn).await {
            if refused(&e.to_string()) {
                out.push(Missing {
                    grant: need.grant,
                    for_what: need.for_what,
                    required: need.required,
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

    #[test]
    fn grants_name_each_command_once_in_probe_order() {
        assert_eq!(
            grants(),
            [
                "+eval",
                "+exists",
                "+zadd",
                "+hgetall",
                "+info",
                "+set",
                "+zscore",
                "+wait",
                "+cluster|slots",
                "+cluster|myid"
            ]
        );
    }
}
