//! Cancel a job everywhere: in Postgres first (status, `completed_at`, its
//! outbox rows, in one transaction: [`crate::db::jobs::cancel`]), then its
//! cancel fence, schedule key and running-counter field in Redis. Used by
//! `outbox-relay cancel-job` and by the console.

use ::redis::AsyncCommands;
use serde::Serialize;

use crate::db::jobs::{self, CancelError};
use crate::db::{self, DbSetupError};
use crate::deadline::STARTUP_TIMEOUT;
use crate::domain::{cancel_fence_key, schedule_key};

#[derive(Debug, thiserror::Error)]
pub enum CancelJobError {
    #[error(transparent)]
    Setup(#[from] DbSetupError),
    #[error(transparent)]
    Cancel(#[from] CancelError),
    #[error("job {job} is cancelled in Postgres, but removing its Redis keys failed ({reason}); run cancel-job again to retry")]
    RedisCleanup { job: String, reason: String },
}

/// How long a cancel waits for `redis.wait_replicas` replicas to hold its
/// fence.
const REPLICA_WAIT: std::time::Duration = STARTUP_TIMEOUT;

/// `WAIT` for `n` replicas of the node that holds `key` (the fence and the
/// schedule share its slot): the replies and how long Redis was told to
/// wait. In a cluster it goes to the slot's master only (redis-rs would
/// send a key-less WAIT to every master and take the smallest count), and
/// waits less than the cluster connection's own reply timeout.
async fn wait_replicas(
    conn: &mut crate::redis::DirectConn,
    n: u32,
    key: &str,
) -> Result<(i64, std::time::Duration), String> {
    use ::redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
    let mut wait = ::redis::cmd("WAIT");
    match conn {
        crate::redis::DirectConn::Cluster(c) => {
            let waited = CLUSTER_REPLICA_WAIT;
            wait.arg(n).arg(waited.as_millis() as u64);
            let to = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::new(
                crate::domain::hash_slot(key),
                SlotAddr::Master,
            )));
            match c.route_command(wait, to).await.map_err(|e| e.to_string())? {
                ::redis::Value::Int(acked) => Ok((acked, waited)),
                other => Err(format!("unexpected WAIT reply {other:?}")),
            }
        }
        crate::redis::DirectConn::Standalone(c) => {
            c.set_response_timeout(REPLICA_WAIT + std::time::Duration::from_secs(1));
            wait.arg(n).arg(REPLICA_WAIT.as_millis() as u64);
            let acked: i64 = wait.query_async(c).await.map_err(|e| e.to_string())?;
            Ok((acked, REPLICA_WAIT))
        }
    }
}

/// A cluster connection's replies are bounded by a quarter of its
/// connect budget ([`STARTUP_TIMEOUT`]): its WAIT asks for less.
const CLUSTER_REPLICA_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// What `cancel-job` (or the console's cancel) did.
#[derive(Debug, Serialize, Clone, PartialEq)]
pub struct CancelOutput {
    pub job_id: String,
    pub already_cancelled: bool,
    pub outbox_rows_deleted: u64,
    pub schedule_key: String,
    pub schedule_entries_removed: bool,
}

/// Cancel `job`: Postgres first (over `db_url`), then its Redis keys.
pub async fn cancel_everywhere(
    db_url: &str,
    redis: &crate::config::RedisConfig,
    job: String,
) -> Result<CancelOutput, CancelJobError> {
    let (mut client, schema) = db::connect_ready(db_url, STARTUP_TIMEOUT).await?;
    let done = jobs::cancel(&mut client, &schema, &job).await?;
    // The schedule key names the job as task_outbox.job_id holds it (the
    // canonical UUID form where that column is a UUID).
    let job = schema.outbox_job_id.stored_form(&job).unwrap_or(job);
    let key = schedule_key(&redis.key_prefix, &job);
    let fence = cancel_fence_key(&redis.key_prefix, &key);
    let cleanup = async {
        let mut conn = crate::redis::connect_config(redis, STARTUP_TIMEOUT)
            .await
            .map_err(|e| e.to_string())?;
        // The fence first, then the schedule, in this order on one
        // connection (both keys share a slot, so one node): a ZADD of the
        // job that Redis runs between the two, or at any time after, finds
        // the fence and is refused (see `redis::pipeline::FENCED_ZADD`).
        let (_, removed): ((), i64) = ::redis::pipe()
            .cmd("SET")
            .arg(&fence)
            .arg(1)
            .arg("EX")
            .arg(redis.cancel_fence_ttl.0.as_secs().max(1))
            .cmd("DEL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        let _: i64 = conn
            .hdel(format!("{}running", redis.key_prefix), &job)
            .await
            .map_err(|e| e.to_string())?;
        // As the relay's own writes: a failover must not promote a replica
        // that has the schedule but not the fence.
        if redis.wait_replicas > 0 {
            let (acked, waited) = wait_replicas(&mut conn, redis.wait_replicas, &fence).await?;
            if acked < i64::from(redis.wait_replicas) {
                return Err(format!(
                    "the fence and the removal reached {acked} of {} replicas within {}ms (redis.wait_replicas); \
                     a failover now could bring the schedule back without its fence",
                    redis.wait_replicas,
                    waited.as_millis()
                ));
            }
        }
        Ok::<_, String>(removed > 0)
    };
    let removed = cleanup.await.map_err(|reason| CancelJobError::RedisCleanup {
        job: job.clone(),
        reason,
    })?;
    Ok(CancelOutput {
        job_id: job,
        already_cancelled: done.already,
        outbox_rows_deleted: done.outbox_rows_deleted,
        schedule_key: key,
        schedule_entries_removed: removed,
    })
}
