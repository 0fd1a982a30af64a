//! Soak: a steady insert rate for `SOAK_MINUTES` (default 10) with random
//! Redis pauses; the relay's RSS must stay flat and the invariant must hold.
//! Not part of the normal test run: `scripts/soak` runs it (release build)
//! and prints the figures recorded in docs/RELIABILITY.md.

use crate::common;

use std::time::{Duration, Instant};

use common::*;

#[tokio::test]
#[ignore = "long-running soak; run it with scripts/soak"]
async fn soak_steady_load_with_redis_pauses() {
    let minutes: u64 = std::env::var("SOAK_MINUTES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(10);
    let db = TestDb::new().await;
    create_ledger(&db).await;
    let prefix = key_prefix();
    let redis = RedisServer::start().await;
    let jobs: Vec<uuid::Uuid> = (0..50).map(|_| uuid::Uuid::new_v4()).collect();
    let producer = Producer::start(db.url.clone(), jobs, 100, Duration::from_millis(100));
    let env = relay_env(
        &db,
        &redis.url(),
        &prefix,
        &[
            ("OUTBOX_RELAY_LOG__LEVEL", "info"),
            ("OUTBOX_RELAY_SWEEP__TICK_TIMEOUT", "2s"),
            ("OUTBOX_RELAY_SUPERVISOR__MAX_RESTARTS", "20"),
        ],
    );
    let mut relay = RelayProcess::spawn(&env);
    relay.wait_started().await;

    let started = Instant::now();
    let total = Duration::from_secs(minutes * 60);
    let mut samples: Vec<(f64, u64)> = Vec::new();
    let mut pauses = 0;
    let mut next_pause = Duration::from_secs(jitter(20..60) as u64);
    while started.elapsed() < total {
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(
            relay.is_running(),
            "relay died during the soak: {:#?}",
            relay.lines().iter().rev().take(20).collect::<Vec<_>>()
        );
        if let Some(rss) = rss_kib(relay.pid()) {
            samples.push((started.elapsed().as_secs_f64(), rss));
        }
        if started.elapsed() >= next_pause && started.elapsed() + Duration::from_secs(30) < total {
            let hold = Duration::from_millis(jitter(1_000..8_000) as u64);
            redis.pause();
            tokio::time::sleep(hold).await;
            redis.unpause();
            pauses += 1;
            next_pause = started.elapsed() + Duration::from_secs(jitter(20..60) as u64);
        }
    }
    let produced = producer.stop().await;
    wait_until("the soak backlog drains", Duration::from_secs(300), || async {
        db.count("SELECT count(*) FROM task_outbox WHERE run_at <= now()").await == 0
    })
    .await;
    wait_drained(&db, Duration::from_secs(600)).await;
    let report = verify_ledger(&db, &redis.url(), &prefix).await;
    let restarts: u64 = [
        "SweepActor",
        "DispatchActor",
        "CounterSyncActor",
        "MetricsActor",
        "DeadLetterActor",
    ]
    .iter()
    .map(|a| {
        relay
            .health_lines(a)
            .iter()
            .filter_map(|l| l["restarts"].as_u64())
            .max()
            .unwrap_or(0)
    })
    .sum();

    // RSS after a one-minute warm-up: first third vs last third of the run.
    let warm: Vec<u64> = samples.iter().filter(|(t, _)| *t >= 60.0).map(|(_, r)| *r).collect();
    let third = (warm.len() / 3).max(1);
    let avg = |s: &[u64]| s.iter().sum::<u64>() as f64 / s.len().max(1) as f64;
    let (early, late) = (
        avg(&warm[..third.min(warm.len())]),
        avg(&warm[warm.len().saturating_sub(third)..]),
    );
    let (start_rss, end_rss) = (samples.first().map_or(0, |s| s.1), samples.last().map_or(0, |s| s.1));
    let max_rss = samples.iter().map(|s| s.1).max().unwrap_or(0);

    println!("| figure | value |");
    println!("| --- | --- |");
    println!("| duration | {minutes} min |");
    println!("| rows produced | {produced} |");
    println!("| delivered | {} |", report.delivered);
    println!("| dead letters | {} |", report.dead_lettered);
    println!("| lost | {} |", report.lost.len());
    println!(
        "| duplicates with a different member (corrupted) | {} |",
        report.corrupted.len()
    );
    println!("| Redis pauses | {pauses} |");
    println!("| actor restarts | {restarts} |");
    println!(
        "| RSS start / end / max | {} / {} / {} KiB |",
        start_rss, end_rss, max_rss
    );
    println!("| RSS average, first vs last third after warm-up | {early:.0} / {late:.0} KiB |");

    assert!(report.holds(), "{report:#?}");
    assert_eq!(report.produced as u64, produced);
    assert_eq!(report.dead_lettered, 0, "pauses are not the rows' fault");
    assert!(
        late <= early * 1.15 + 2048.0,
        "RSS grows: {early:.0} KiB → {late:.0} KiB"
    );
    relay.stop().await;
}
