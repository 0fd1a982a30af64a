//! The relay under the memory limit the Deployment ships (64 MiB, read
//! from `deploy/kubernetes/deployment.yaml`), in a memory cgroup of its
//! own, on a backlog of rows with 50 KB paths at the shipped batch and
//! concurrency. It drains everything without being OOM-killed: the tick's
//! byte budget (`sweep.max_batch_bytes`) claims fewer large rows at a time.
//! Before the budget, the same drain peaked at about 600 MB.

use crate::common;

use std::time::Duration;

use common::*;

/// The container's memory limit in bytes, from the Deployment.
fn deployment_memory_limit() -> u64 {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/kubernetes/deployment.yaml"
    ))
    .expect("deployment.yaml");
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).expect("deployment yaml");
    let limit = doc["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
        .as_str()
        .expect("a memory limit");
    let mib: u64 = limit
        .strip_suffix("Mi")
        .and_then(|n| n.parse().ok())
        .expect("a limit in Mi");
    mib * 1024 * 1024
}

/// A cgroup (v1 memory controller) with `limit` bytes, removed on drop.
struct MemoryCgroup(std::path::PathBuf);

impl MemoryCgroup {
    fn new(limit: u64) -> MemoryCgroup {
        let dir = std::path::PathBuf::from(format!(
            "/sys/fs/cgroup/memory/outbox-test-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir(&dir)
            .unwrap_or_else(|e| panic!("create memory cgroup {}: {e} (needs root)", dir.display()));
        std::fs::write(dir.join("memory.limit_in_bytes"), limit.to_string()).expect("memory.limit_in_bytes");
        // No swap to hide in: the limit is the limit.
        let _ = std::fs::write(dir.join("memory.memsw.limit_in_bytes"), limit.to_string());
        MemoryCgroup(dir)
    }

    fn add(&self, pid: u32) {
        std::fs::write(self.0.join("cgroup.procs"), pid.to_string()).expect("move into the cgroup");
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.0.join(file)).unwrap_or_default()
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[tokio::test]
async fn large_rows_drain_inside_the_deployments_memory_limit() {
    let limit = deployment_memory_limit();
    let cgroup = MemoryCgroup::new(limit);
    let db = TestDb::new().await;
    let redis = RedisServer::start().await;
    let mut relay = RelayProcess::spawn(&shipped_env(&db.url, &redis.url(), "hover:"));
    cgroup.add(relay.pid());
    relay.wait_started().await;

    // 6,000 rows of 51,200-byte paths over 10 jobs: 300 MB of paths.
    db.client()
        .await
        .batch_execute(
            "INSERT INTO task_outbox (task_id, job_id, page_id, host, path, priority, source_type, run_at)
             SELECT gen_random_uuid(), ('00000000-0000-0000-0000-00000000000' || (i % 10))::uuid, i, 'h',
                    repeat(md5(i::text), 1600), 1, 's', now()
               FROM generate_series(1, 6000) i",
        )
        .await
        .expect("large rows");
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    while db.count("SELECT count(*) FROM task_outbox").await > 0 {
        assert!(
            relay.is_running(),
            "the relay died under {limit} bytes: {}; {:#?}",
            cgroup.read("memory.oom_control"),
            relay.lines()
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the large rows did not drain in 180 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut conn = redis_conn(&redis.url()).await;
    let mut delivered = 0i64;
    for j in 0..10 {
        let key = format!("hover:sched:00000000-0000-0000-0000-00000000000{j}");
        delivered += redis::cmd("ZCARD")
            .arg(&key)
            .query_async::<i64>(&mut conn)
            .await
            .expect("ZCARD");
    }
    assert_eq!(delivered, 6_000);
    assert_eq!(db.count("SELECT count(*) FROM task_outbox_dead").await, 0);
    let oom = cgroup.read("memory.oom_control");
    assert!(
        oom.lines().any(|l| l == "oom_kill 0") || !oom.contains("oom_kill"),
        "{oom}"
    );
    let peak: u64 = cgroup.read("memory.max_usage_in_bytes").trim().parse().unwrap_or(0);
    eprintln!("peak memory in the cgroup: {} MiB of {} MiB", peak >> 20, limit >> 20);
    relay.stop().await;
}
