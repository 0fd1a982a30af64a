//! The benchmark command end to end, at a small scale: every phase runs and
//! every figure the report promises is there and plausible. Speeds are not
//! asserted (they live in docs/BENCHMARKS.md, measured on a release build).

use crate::common;

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
    let (scratch, out) = run_bench(&args, &env).await;
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
    // The relay's CPU during the drain alone: no more than the drain's
    // wall time on every core (one clock tick of slack), so a figure
    // counted from the process's start, or another process's, shows.
    let cpu = num("relay_cpu_seconds");
    let most = num("drain_seconds") * num("cores") + 0.011;
    assert!(
        (0.0..=most).contains(&cpu),
        "relay CPU {cpu} s for a drain allowing {most} s: {r}"
    );
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

#[tokio::test]
async fn scaling_matrix_runs_against_a_redis_cluster_named_in_the_config_file() {
    let cluster = common::cluster::RedisCluster::start(3, 0).await;
    let db = TestDb::new().await;
    // The cluster is named only in the file: the relays the bench starts
    // reach it only if the bench hands its `--config` on to them (the
    // environment's `redis.url` points nowhere).
    let dir = scratch_dir("outbox-bench-config");
    let config = dir.join("cluster.toml");
    let seeds: Vec<String> = cluster.seed_urls().split(',').map(|u| format!("{u:?}")).collect();
    std::fs::write(
        &config,
        format!("[redis]\nmode = \"cluster\"\ncluster_urls = [{}]\n", seeds.join(", ")),
    )
    .expect("write config");
    let mut env = relay_env(&db, "redis://127.0.0.1:1/0", "unused:", &[]);
    env.retain(|(k, _)| k != "OUTBOX_RELAY_REDIS__URL");
    let config = config.display().to_string();

    // Only the scaling matrix runs in cluster mode; asking for more is a
    // command-line error, said in one line.
    let out = relay_command(&["--config", &config, "bench", "--rows", "10"], &env)
        .output()
        .expect("run outbox-relay bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("bench --scaling"), "{stderr}");

    let args = [
        "--config",
        &config,
        "bench",
        "--scaling",
        "--scaling-rows",
        "3000",
        "--jobs",
        "30",
        "--json",
    ];
    let out = relay_command(&args, &env)
        .output()
        .expect("run outbox-relay bench --scaling");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench --scaling failed: {}\n{stderr}", out.status);
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bench --json prints JSON");
    assert!(
        r["redis_mode"].as_str().is_some_and(|m| m.starts_with("cluster")),
        "{r}"
    );
    assert!(r["floor_rows_per_sec"].as_f64().is_some_and(|v| v > 0.0), "{r}");
    let runs = r["runs"].as_array().expect("runs");
    let cells: Vec<(u64, u64)> = runs
        .iter()
        .map(|run| {
            assert!(run["rows_per_sec"].as_f64().is_some_and(|v| v > 0.0), "{run}");
            (
                run["relays"].as_u64().unwrap_or(0),
                run["concurrency"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    let want: Vec<(u64, u64)> = (1..=3).flat_map(|n| [1, 2, 4].map(|c| (n, c))).collect();
    assert_eq!(cells, want);

    // The bench's schedules are gone from every master again.
    let masters = cluster.masters().expect("cluster topology");
    for m in &masters {
        let left = common::cluster::RedisCluster::keys_on(m.port, "bench*");
        assert!(left.is_empty(), "master {} kept {left:?}", m.port);
    }
}

/// `bench --sustained` at a small scale with the shipped defaults: three
/// phases around a held snapshot, every figure present, nothing left behind,
/// and the settings line says bench tuned nothing.
#[tokio::test]
async fn sustained_with_a_held_snapshot_reports_every_phase() {
    let redis = RedisServer::start().await;
    let db = TestDb::new().await;
    let env = shipped_env(&db.url, &redis.url(), "unused:");
    let args = [
        "bench",
        "--sustained",
        "400",
        "--rows-per-txn",
        "20",
        "--hold-snapshot",
        "2",
        "--phase-seconds",
        "2",
        "--relays",
        "2",
        "--jobs",
        "5",
        "--json",
    ];
    let (_, out) = run_bench(&args, &env).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed: {}\n{stderr}", out.status);
    assert!(
        stderr.contains("relay settings: the shipped defaults, then this environment's OUTBOX_RELAY_REDIS__URL (a service address);")
            && stderr.contains("overridden by this scenario: nothing"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("never arrived") && !stderr.contains("still in the outbox"),
        "{stderr}"
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bench --json prints JSON");
    assert_eq!(r["listen_active"], true, "{r}");
    assert_eq!(r["relays"], 2);
    let phases = r["phases"].as_array().expect("phases");
    let names: Vec<&str> = phases.iter().filter_map(|p| p["name"].as_str()).collect();
    assert_eq!(names, ["before", "snapshot held", "after"]);
    for p in phases {
        // 400 rows/s in 20-row transactions: 20 timed rows a second.
        assert!(p["latency"]["rows"].as_u64().is_some_and(|n| n >= 20), "{p}");
        assert!(p["latency"]["p50_ms"].as_f64().is_some_and(|v| v > 0.0), "{p}");
        assert!(p["claims"].as_f64().is_some_and(|n| n > 0.0), "{p}");
        assert!(p["claim_mean_ms"].as_f64().is_some_and(|v| v > 0.0), "{p}");
        assert!(p["empty_claims_per_row"].as_f64().is_some_and(|v| v >= 0.0), "{p}");
    }
    assert!(r["produced_rows"].as_i64().is_some_and(|n| n >= 400 * 5), "{r}");
}

/// Run `outbox-relay` with `args` to the end: the bench's scratch database
/// name (it is named after the process id) and the output.
async fn run_bench(args: &[&str], env: &[(String, String)]) -> (String, std::process::Output) {
    let child = relay_command(args, env)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run outbox-relay bench");
    let scratch = format!("outbox_bench_{}", child.id());
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("bench thread")
        .expect("outbox-relay bench output");
    (scratch, out)
}
