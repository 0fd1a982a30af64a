//! What `bench` runs: the Postgres-only floor, the drain with latency runs
//! (idle and while a backlog drains), and the scaling matrix.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio_postgres::types::Type;

use super::args::BenchArgs;
use super::console::{time_pages, Refresher};
use super::error::{pg, rd, BenchError};
use super::measure::{
    describe_settings, free_port, latency_job, proc_usage, spawn_relay, summarize, wait_scheduled, watch_vacuum,
    KeyspaceWatch, LatencyRun, RelayChild,
};
use super::report::{BenchReport, Latency, Refreshes, ScalingReport, ScalingRun};
use super::scratch::{delete_prefix, open_scratch};
use crate::config::{Config, RedisMode};
use crate::redact::redact_url;
use crate::redis::{DirectConn, Redis};

pub(super) const SEED_SQL: &str =
    "INSERT INTO task_outbox (task_id, job_id, page_id, host, path, priority, retry_count,
                                    source_type, source_url, run_at, task_type)
     SELECT gen_random_uuid(),
            ('00000000-0000-4000-8000-' || lpad((i % $2)::text, 12, '0'))::uuid,
            i::int, 'shop' || (i % $2) || '.example.com', '/products/' || i, (i % 100) / 10.0, 0,
            'sitemap', 'https://example.com/sitemap.xml',
            now() - interval '1 minute' - ($1::int8 - i) * $3::int8 * interval '1 millisecond', 'crawl'
       FROM generate_series(1, $1::int8) AS i";

/// Seed `rows` due rows over `jobs` jobs: all with the same `run_at` (a
/// minute ago: every schedule member gets the same score, the worst case
/// for Redis's sorted sets), or with `spread` one millisecond apart (as
/// rows committed over time get: distinct scores).
pub(super) async fn seed(
    client: &tokio_postgres::Client,
    rows: i64,
    jobs: i64,
    spread: bool,
) -> Result<(), BenchError> {
    let step_ms = i64::from(spread);
    client
        .execute_typed(
            SEED_SQL,
            &[(&rows, Type::INT8), (&jobs, Type::INT8), (&step_ms, Type::INT8)],
        )
        .await
        .map_err(pg)?;
    client.batch_execute("VACUUM ANALYZE task_outbox").await.map_err(pg)?;
    Ok(())
}

/// How a floor claims and deletes a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FloorStatement {
    /// `DELETE … WHERE id IN (SELECT id … FOR UPDATE SKIP LOCKED)`: the
    /// yardstick of every recorded run (docs/BENCHMARKS.md).
    IdIn,
    /// `DELETE … WHERE ctid = ANY(ARRAY(SELECT ctid …))`: the relay's own
    /// delete claim, without the relay (no index lookup per row).
    Ctid,
}

impl FloorStatement {
    fn sql(self) -> &'static str {
        match self {
            FloorStatement::IdIn => {
                "DELETE FROM task_outbox WHERE id IN (
                     SELECT id FROM task_outbox WHERE run_at <= now() ORDER BY run_at LIMIT $1 FOR UPDATE SKIP LOCKED)
                 RETURNING id, task_id::text, job_id::text, page_id, host, path, priority, retry_count,
                           source_type, source_url, task_type, lighthouse_run_id"
            }
            FloorStatement::Ctid => {
                "DELETE FROM task_outbox WHERE ctid = ANY(ARRAY(
                     SELECT ctid FROM task_outbox WHERE run_at <= now() ORDER BY run_at LIMIT $1 FOR UPDATE SKIP LOCKED))
                 RETURNING id, task_id::text, job_id::text, page_id, host, path, priority, retry_count,
                           source_type, source_url, task_type, lighthouse_run_id"
            }
        }
    }
}

/// The yardstick: Postgres alone deleting `rows` freshly seeded rows in
/// the same batches, on `connections` connections at once (each a loop of
/// one autocommitted statement until the table is empty). Leaves the table
/// empty.
pub(super) async fn floor(
    url: &str,
    seeder: &tokio_postgres::Client,
    (rows, jobs, spread): (i64, i64, bool),
    batch: i64,
    connections: usize,
    statement: FloorStatement,
) -> Result<f64, BenchError> {
    seed(seeder, rows, jobs, spread).await?;
    let mut clients = Vec::with_capacity(connections);
    for _ in 0..connections.max(1) {
        clients.push(crate::db::connect(url, crate::deadline::STARTUP_TIMEOUT).await?);
    }
    let started = Instant::now();
    let loops = clients.iter().map(|client| async move {
        let mut total = 0u64;
        loop {
            let rows = client
                .query_typed(statement.sql(), &[(&batch, Type::INT8)])
                .await
                .map_err(pg)?;
            if rows.is_empty() {
                return Ok::<u64, BenchError>(total);
            }
            total += rows.len() as u64;
        }
    });
    let mut total = 0u64;
    for done in futures_util::future::join_all(loops).await {
        total += done?;
    }
    let rps = total as f64 / started.elapsed().as_secs_f64();
    seeder.batch_execute("TRUNCATE task_outbox").await.map_err(pg)?;
    Ok(rps)
}

/// The drain of `--rows` against the floor, then the latency runs (idle,
/// and while `--backlog-rows` drain).
pub(super) async fn drain_and_latency(
    cfg: &Config,
    args: &BenchArgs,
    url: &str,
    prefix: &str,
) -> Result<BenchReport, BenchError> {
    let (client, mut conn) = open_scratch(cfg, url).await?;
    let batch = i64::from(cfg.sweep.batch_size);
    eprintln!(
        "bench: database {}, redis {}, {} rows over {} jobs, batch {}",
        redact_url(url),
        Redis::describe(&cfg.redis),
        args.rows,
        args.jobs,
        batch
    );
    let (floor_rps, floor2_rps, floor_ctid_rps) = floors(url, &client, args, batch).await?;
    let console_port = if args.console { Some(free_port()?) } else { None };
    let overrides: Vec<(&str, String)> = console_port
        .map(|p| vec![("OUTBOX_RELAY_CONSOLE__LISTEN", format!("127.0.0.1:{p}"))])
        .unwrap_or_default();
    eprintln!("{}", describe_settings(args.config.as_deref(), prefix, &overrides));
    seed(&client, args.rows, args.jobs, args.spread_run_at).await?;
    let console_pages = if args.console {
        eprintln!("bench: console pages with {} rows in task_outbox…", args.rows);
        Some(time_pages(args.config.as_deref(), url, prefix).await?)
    } else {
        None
    };
    let drained = drain(args, url, prefix, &client, &mut conn, console_port, &overrides).await?;
    let (idle, during, backlog_secs) = latency_runs(cfg, &client, url, prefix, args).await?;
    let (_, peak_kib) = proc_usage(drained.pid);
    drop(drained.relay);

    let drain_rps = args.rows as f64 / drained.secs;
    Ok(BenchReport {
        rows: args.rows,
        spread_run_at: args.spread_run_at,
        jobs: args.jobs,
        batch_size: cfg.sweep.batch_size,
        floor_rows_per_sec: floor_rps,
        floor2_rows_per_sec: floor2_rps,
        floor_ctid_rows_per_sec: floor_ctid_rps,
        drain_rows_per_sec: drain_rps,
        drain_seconds: drained.secs,
        last_to_first_decile: match (drained.deciles.first(), drained.deciles.last()) {
            (Some(f), Some(l)) if *f > 0.0 => l / f,
            _ => 0.0,
        },
        drain_deciles: drained.deciles,
        ratio_to_floor: ratio(drain_rps, floor_rps),
        ratio_to_floor2: ratio(drain_rps, floor2_rps),
        relay_cpu_seconds: drained.cpu_after - drained.cpu_before,
        relay_peak_rss_mib: peak_kib as f64 / 1024.0,
        console_pages,
        console_refreshes: drained.console_refreshes,
        latency_idle: idle,
        latency_during_backlog: during,
        backlog_drain_rows_per_sec: (backlog_secs > 0.0)
            .then(|| (args.backlog_rows * i64::from(args.backlog_runs.max(1))) as f64 / backlog_secs),
        cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
    })
}

/// The floors of the drain (see [`floor`]): Postgres alone on 1
/// connection, on 2, and the relay's ctid claim on 1; all 0 with
/// `--skip-floors`.
async fn floors(
    url: &str,
    client: &tokio_postgres::Client,
    args: &BenchArgs,
    batch: i64,
) -> Result<(f64, f64, f64), BenchError> {
    let size = (args.rows, args.jobs, args.spread_run_at);
    Ok(if args.skip_floors {
        eprintln!("bench: floors skipped (--skip-floors): the ratios to them are 0");
        (0.0, 0.0, 0.0)
    } else {
        eprintln!("bench: floor (Postgres alone, 1 connection)…");
        let one = floor(url, client, size, batch, 1, FloorStatement::IdIn).await?;
        eprintln!("bench: floor (Postgres alone, 2 connections)…");
        let two = floor(url, client, size, batch, 2, FloorStatement::IdIn).await?;
        eprintln!("bench: floor (Postgres alone, 1 connection, the relay's ctid claim)…");
        let ctid = floor(url, client, size, batch, 1, FloorStatement::Ctid).await?;
        (one, two, ctid)
    })
}

/// The drain of the seeded rows by one relay, which keeps running (idle)
/// for the latency runs after it.
struct Drain {
    relay: [RelayChild; 1],
    pid: u32,
    /// Seconds until every member arrived, and rows/s in each tenth.
    secs: f64,
    deciles: Vec<f64>,
    /// The relay's CPU seconds when the drain started and when it ended.
    cpu_before: f64,
    cpu_after: f64,
    /// `--console` without `--console-idle`: the overview's refreshes.
    console_refreshes: Option<Refreshes>,
}

/// Start the relay (serving the console on `console_port`, refreshed once
/// a second unless `--console-idle`) and time its drain of the seeded
/// `--rows`, tenth by tenth.
async fn drain(
    args: &BenchArgs,
    url: &str,
    prefix: &str,
    client: &tokio_postgres::Client,
    conn: &mut DirectConn,
    console_port: Option<u16>,
    overrides: &[(&str, String)],
) -> Result<Drain, BenchError> {
    eprintln!("bench: drain…");
    let mut relay = [spawn_relay(
        args.config.as_deref(),
        url,
        prefix,
        overrides,
        args.relay_log.as_deref(),
    )?];
    let refresher = console_port.filter(|_| !args.console_idle).map(Refresher::start);
    let pid = relay[0].0.id();
    let (cpu_before, _) = proc_usage(pid);
    let mut marks = Vec::with_capacity(10);
    let mut next = 1;
    let secs = wait_scheduled(&mut relay, conn, prefix, args.jobs, args.rows, |done, at| {
        while next <= 10 && done * 10 >= args.rows * next {
            marks.push(at);
            next += 1;
        }
    })
    .await?;
    let (cpu_after, _) = proc_usage(pid);
    let console_refreshes = refresher.map(Refresher::stop);
    let left: i64 = client
        .query_typed_one("SELECT count(*) FROM task_outbox", &[])
        .await
        .map_err(pg)?
        .get(0);
    if left != 0 {
        eprintln!("bench: warning: {left} rows still in the outbox after every member arrived");
    }
    let tenth = args.rows as f64 / 10.0;
    let mut deciles = Vec::new();
    let mut prev = 0.0;
    for m in &marks {
        deciles.push(tenth / (m - prev).max(1e-9));
        prev = *m;
    }
    Ok(Drain {
        relay,
        pid,
        secs,
        deciles,
        cpu_before,
        cpu_after,
        console_refreshes,
    })
}

/// The latency runs with the drained relay idle: one of
/// `--latency-seconds`, then `--backlog-runs` while `--backlog-rows` drain
/// (their samples pooled; none with no backlog). Returns (idle, during the
/// backlog, seconds the backlog runs lasted).
async fn latency_runs(
    cfg: &Config,
    client: &tokio_postgres::Client,
    url: &str,
    prefix: &str,
    args: &BenchArgs,
) -> Result<(Latency, Option<Latency>, f64), BenchError> {
    // One latency run: rows for `duration`, or until a `backlog` drained.
    let measure = |duration, backlog| latency(cfg, client, url, prefix, args.latency_rate, duration, backlog);
    eprintln!("bench: latency, relay idle…");
    let run = measure(Duration::from_secs(args.latency_seconds), 0).await?;
    let idle = summarize(run.ms, run.vacuum_share);
    let mut backlog_secs = 0.0;
    let during = if args.backlog_rows > 0 {
        let mut samples = Vec::new();
        let mut vacuum_shares = Vec::new();
        for run in 1..=args.backlog_runs.max(1) {
            eprintln!(
                "bench: latency while a {}-row backlog drains ({run}/{})…",
                args.backlog_rows,
                args.backlog_runs.max(1)
            );
            seed(client, args.backlog_rows, args.jobs, args.spread_run_at).await?;
            let run = measure(Duration::from_secs(60), args.backlog_rows).await?;
            samples.extend(run.ms);
            vacuum_shares.push(run.vacuum_share);
            backlog_secs += run.ran.as_secs_f64();
        }
        let vacuum_share = vacuum_shares.iter().sum::<f64>() / vacuum_shares.len().max(1) as f64;
        Some(summarize(samples, vacuum_share))
    } else {
        None
    };
    Ok((idle, during, backlog_secs))
}

/// `rps ÷ floor`, 0 without a floor (`--skip-floors`).
fn ratio(rps: f64, floor: f64) -> f64 {
    if floor > 0.0 {
        rps / floor
    } else {
        0.0
    }
}

/// The scaling matrix: the floor, then one drain per (relays, concurrency).
pub(super) async fn scaling(
    cfg: &Config,
    args: &BenchArgs,
    url: &str,
    prefix: &str,
) -> Result<ScalingReport, BenchError> {
    let (client, mut conn) = open_scratch(cfg, url).await?;
    let batch = i64::from(cfg.sweep.batch_size);
    let rows = args.scaling_rows;
    eprintln!(
        "bench: scaling matrix, {rows} rows over {} jobs per drain, batch {batch}, redis {}",
        args.jobs,
        Redis::describe(&cfg.redis)
    );
    let floor_rps = floor(
        url,
        &client,
        (rows, args.jobs, args.spread_run_at),
        batch,
        1,
        FloorStatement::IdIn,
    )
    .await?;
    let mut runs = Vec::new();
    for relays in 1..=3u32 {
        for concurrency in [1u32, 2, 4] {
            delete_prefix(&mut conn, prefix).await.map_err(rd)?;
            seed(&client, rows, args.jobs, args.spread_run_at).await?;
            let env = [("OUTBOX_RELAY_SWEEP__CONCURRENCY", concurrency.to_string())];
            if relays == 1 {
                eprintln!("{}", describe_settings(args.config.as_deref(), prefix, &env));
            }
            let mut children = Vec::new();
            for _ in 0..relays {
                children.push(spawn_relay(
                    args.config.as_deref(),
                    url,
                    prefix,
                    &env,
                    args.relay_log.as_deref(),
                )?);
            }
            let cpu_before: f64 = children.iter().map(|c| proc_usage(c.0.id()).0).sum();
            let secs = wait_scheduled(&mut children, &mut conn, prefix, args.jobs, rows, |_, _| {}).await?;
            let cpu_after: f64 = children.iter().map(|c| proc_usage(c.0.id()).0).sum();
            drop(children);
            let rps = rows as f64 / secs;
            eprintln!("bench: {relays} relay(s) × concurrency {concurrency}: {rps:.0} rows/s");
            runs.push(ScalingRun {
                relays,
                concurrency,
                rows_per_sec: rps,
                ratio_to_floor: rps / floor_rps.max(1e-9),
                relay_cpu_seconds: cpu_after - cpu_before,
            });
            // Whatever is left (none, normally) must not leak into the next run.
            client.batch_execute("TRUNCATE task_outbox").await.map_err(pg)?;
        }
    }
    Ok(ScalingReport {
        redis_mode: match cfg.redis.mode {
            RedisMode::Standalone => "standalone".into(),
            RedisMode::Cluster => format!("cluster ({} seed nodes)", cfg.redis.cluster_urls.len()),
            RedisMode::Sentinel => format!("sentinel ({})", cfg.redis.sentinel_master),
        },
        rows,
        jobs: args.jobs,
        batch_size: cfg.sweep.batch_size,
        floor_rows_per_sec: floor_rps,
        runs,
        cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
    })
}

/// Commit single rows at `rate`/s (each for a job of its own) and time each
/// one until its ZADD shows up as a keyspace notification. With a
/// `backlog`, the run lasts until that backlog has drained (at most
/// `duration`); otherwise it lasts `duration`.
pub(super) async fn latency(
    cfg: &Config,
    client: &tokio_postgres::Client,
    url: &str,
    prefix: &str,
    rate: u32,
    duration: Duration,
    backlog: i64,
) -> Result<LatencyRun, BenchError> {
    let (vacuum_watch, vacuum_counts) = watch_vacuum(url).await?;
    let watch = KeyspaceWatch::start(cfg, prefix).await?;

    let mut committed: Vec<(String, Instant)> = Vec::new();
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate.max(1))));
    let started = Instant::now();
    let mut backlog_done = backlog == 0;
    let mut n = 0u64;
    while started.elapsed() < duration {
        ticker.tick().await;
        // One job (one key) per row, so each keyspace event names its row.
        let job = latency_job(n);
        n += 1;
        client
            .execute_typed(
                "INSERT INTO task_outbox (task_id, job_id, page_id, host, path, priority, source_type, run_at)
                 VALUES (gen_random_uuid(), $1, 1, 'latency.example.com', '/l', 1, 'bench', now())",
                &[(&job, Type::UUID)],
            )
            .await
            .map_err(pg)?;
        committed.push((job.to_string(), Instant::now()));
        if backlog > 0 && !backlog_done && n % u64::from(rate.max(1) / 10).max(1) == 0 {
            let left: i64 = client
                .query_typed_one(
                    "SELECT count(*) FROM task_outbox WHERE host <> 'latency.example.com'",
                    &[],
                )
                .await
                .map_err(pg)?
                .get(0);
            backlog_done = left == 0;
        }
        if backlog > 0 && backlog_done {
            break;
        }
    }
    // With a backlog: about how long it took to drain (checked every 100 ms).
    let ran = started.elapsed();
    drop(vacuum_watch);
    let [samples, hits] = &*vacuum_counts;
    let vacuum_share = hits.load(Ordering::Relaxed) as f64 / (samples.load(Ordering::Relaxed) as f64).max(1.0);
    // Let the last rows arrive.
    watch.wait_all(&committed, Duration::from_secs(10)).await;
    let ms: Vec<f64> = watch.finish(&committed).await.into_iter().flatten().collect();
    if ms.len() < committed.len() {
        eprintln!(
            "bench: {} of {} latency rows never arrived",
            committed.len() - ms.len(),
            committed.len()
        );
    }
    Ok(LatencyRun { ms, ran, vacuum_share })
}
