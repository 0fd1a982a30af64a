//! The benchmark command end to end, at a small scale: every phase runs and
//! every figure the report promises is there and plausible. Speeds are not
//! asserted (they live in docs/BENCHMARKS.md, measured on a release build).

mod common;

use common::*;

#[tokio::test]
async fn bench_runs_every_phase_and_reports_every_figure() {
    let redis = RedisServer::start().await;
    let db = TestDb::new().await;
    let env = relay_env(&db, &redis.url(), "unused:", &[]);
    let args = [
        "bench",
        "--rows",
        "4000",
        "--jobs",
        "5",
        "--latency-rate",
        "100",
        "--latency-seconds",
        "2",
        "--backlog-rows",
        "3000",
        "--backlog-runs",
        "1",
        "--json",
    ];
    let child = relay_command(&args, &env)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run outbox-relay bench");
    // The bench names its scratch database after its process id.
    let scratch = format!("outbox_bench_{}", child.id());
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("bench thread")
        .expect("outbox-relay bench output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed: {}\n{stderr}", out.status);
    // Progress goes to stderr, one line per phase.
    for phase in ["floor", "drain", "latency, relay idle", "backlog drains"] {
        assert!(stderr.contains(phase), "no progress line for {phase}: {stderr}");
    }

    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bench --json prints JSON");
    let num = |k: &str| {
        r[k].as_f64()
            .unwrap_or_else(|| panic!("{k} missing or not a number: {r}"))
    };
    assert_eq!(r["rows"], 4000);
    assert!(num("floor_rows_per_sec") > 0.0);
    assert!(num("drain_rows_per_sec") > 0.0);
    assert!(num("ratio_to_floor") > 0.0);
    assert!(num("last_to_first_decile") > 0.0);
    assert!(num("relay_peak_rss_mib") > 1.0, "peak RSS is the relay's, in MiB");
    assert!(num("relay_cpu_seconds") >= 0.0);
    assert_eq!(r["drain_deciles"].as_array().map(Vec::len), Some(10));

    let idle = &r["latency_idle"];
    // 100 rows/s for 2 s, every one of them seen arriving.
    assert!(idle["rows"].as_u64().is_some_and(|n| n >= 150), "idle samples: {idle}");
    let p = |l: &serde_json::Value, k: &str| l[k].as_f64().unwrap_or(-1.0);
    assert!(
        p(idle, "p50_ms") > 0.0 && p(idle, "p50_ms") <= p(idle, "p99_ms") && p(idle, "p99_ms") <= p(idle, "max_ms")
    );
    assert!((0.0..=1.0).contains(&p(idle, "vacuum_share")));

    let backlog = &r["latency_during_backlog"];
    assert!(
        backlog["rows"].as_u64().is_some_and(|n| n > 0),
        "backlog samples: {backlog}"
    );
    assert!(num("backlog_drain_rows_per_sec") > 0.0);

    // Its scratch database is gone again.
    let left = db
        .count(&format!("SELECT count(*) FROM pg_database WHERE datname = '{scratch}'"))
        .await;
    assert_eq!(left, 0, "bench left a scratch database behind");
}
