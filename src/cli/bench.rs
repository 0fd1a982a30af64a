//! `outbox-relay bench`: how fast the relay moves rows, measured on this
//! machine against the configured Postgres and Redis.
//!
//! On a scratch database (created next to `database.url`'s database and
//! dropped at the end) and a scratch key prefix it measures:
//! 1. **floor**: what Postgres alone does on the same data and batch size —
//!    a bare `DELETE … WHERE id IN (SELECT … FOR UPDATE SKIP LOCKED LIMIT n)
//!    RETURNING …` loop on one connection;
//! 2. **drain**: N rows seeded in one statement, drained by the real relay
//!    (this binary, `run`, as a subprocess with LISTEN/NOTIFY on): rows/s
//!    overall and per tenth of the drain, relay CPU seconds and peak RSS;
//! 3. **latency**: single rows committed at a steady rate, time from commit
//!    to the member being visible in Redis (Redis keyspace notifications,
//!    one job per row), with the relay idle and while a backlog drains.
//!
//! Speed goals live here, never in tests.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use futures_util::StreamExt;
use serde::Serialize;
use tokio_postgres::types::Type;
use uuid::Uuid;

use crate::cli::jobs::{keys_matching, per_key};
use crate::config::{Config, RedisMode, CONFIG_PATH_ENV};
use crate::db::{self, pg_error_text};
use crate::redact::redact_url;
use crate::redis::{DirectConn, Redis};
use crate::STARTUP_TIMEOUT;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Rows to seed for the drain (and the floor).
    #[arg(long, default_value_t = 1_000_000)]
    pub rows: i64,
    /// Jobs the rows are spread over (one schedule key each).
    #[arg(long, default_value_t = 50)]
    pub jobs: i64,
    /// Single-row commits per second in the latency runs.
    #[arg(long, default_value_t = 200)]
    pub latency_rate: u32,
    /// Duration of the idle latency run, in seconds.
    #[arg(long, default_value_t = 20)]
    pub latency_seconds: u64,
    /// Backlog drained during the second latency run (0 skips it).
    #[arg(long, default_value_t = 100_000)]
    pub backlog_rows: i64,
    /// How many times the backlog run is repeated (its samples pooled: one
    /// drain of 100,000 rows lasts about a second, ~200 samples at 200/s).
    #[arg(long, default_value_t = 5)]
    pub backlog_runs: u32,
    /// Instead of the drain and latency runs: drain `--scaling-rows` rows
    /// with 1, 2 and 3 relay processes × `sweep.concurrency` 1, 2 and 4,
    /// each against the floor measured in the same run (docs/SCALING.md).
    #[arg(long)]
    pub scaling: bool,
    /// Rows per drain of the scaling matrix.
    #[arg(long, default_value_t = 200_000)]
    pub scaling_rows: i64,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Append the relay's own log lines, at debug level (one `sweep tick
    /// settled` line per tick with its lane and stage timings), to FILE:
    /// for finding where a slow run spends its time.
    #[arg(long, value_name = "FILE")]
    pub relay_log: Option<std::path::PathBuf>,
    /// The configuration file the bench was started with, handed on to the
    /// relay subprocesses so they talk to the same Redis with the same
    /// settings (set by the CLI from `--config`).
    #[arg(skip)]
    pub config: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Setup(#[from] db::DbSetupError),
    #[error(transparent)]
    Migrate(#[from] db::migrate::MigrateError),
    #[error("postgres: {0}")]
    Postgres(String),
    #[error("redis: {0}")]
    Redis(String),
    #[error("relay subprocess: {0}")]
    Relay(String),
    #[error("{0}")]
    Usage(String),
}

fn pg(e: tokio_postgres::Error) -> BenchError {
    BenchError::Postgres(pg_error_text(&e))
}

fn rd(e: ::redis::RedisError) -> BenchError {
    BenchError::Redis(e.to_string())
}

#[derive(Debug, Serialize, Default)]
pub struct Latency {
    pub rows: usize,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Share of the run (sampled every 100 ms) during which a VACUUM was in
    /// progress in the scratch database: Postgres's own maintenance after a
    /// big drain, competing with the relay for the same cores.
    pub vacuum_share: f64,
}

/// One drain of the scaling matrix.
#[derive(Debug, Serialize, Default)]
pub struct ScalingRun {
    pub relays: u32,
    pub concurrency: u32,
    pub rows_per_sec: f64,
    pub ratio_to_floor: f64,
    /// CPU seconds of all relay processes together.
    pub relay_cpu_seconds: f64,
}

#[derive(Debug, Serialize, Default)]
pub struct ScalingReport {
    /// `standalone` or `cluster`: where the schedules went.
    pub redis_mode: String,
    pub rows: i64,
    pub jobs: i64,
    pub batch_size: u32,
    pub floor_rows_per_sec: f64,
    pub runs: Vec<ScalingRun>,
    pub cores: usize,
}

#[derive(Debug, Serialize, Default)]
pub struct BenchReport {
    pub rows: i64,
    pub jobs: i64,
    pub batch_size: u32,
    pub floor_rows_per_sec: f64,
    pub drain_rows_per_sec: f64,
    pub drain_seconds: f64,
    /// Rows/s in each tenth of the drain, first to last.
    pub drain_deciles: Vec<f64>,
    pub ratio_to_floor: f64,
    pub last_to_first_decile: f64,
    pub relay_cpu_seconds: f64,
    pub relay_peak_rss_mib: f64,
    pub latency_idle: Latency,
    pub latency_during_backlog: Option<Latency>,
    /// How fast the backlog drained while the latency rows arrived (live
    /// traffic: at most `sweep.live_concurrency` drain ticks at once).
    pub backlog_drain_rows_per_sec: Option<f64>,
    pub cores: usize,
}

/// Run the benchmark and print its report.
pub async fn run(cfg: &Config, args: BenchArgs) -> Result<(), BenchError> {
    if cfg.redis.mode == RedisMode::Cluster && !args.scaling {
        // Keyspace notifications, which time the latency runs, are per node.
        return Err(BenchError::Usage(
            "bench: with redis.mode = \"cluster\" only the scaling matrix runs (bench --scaling); \
             the latency runs need a standalone Redis"
                .into(),
        ));
    }
    let name = format!("outbox_bench_{}", std::process::id());
    let admin = db::connect(&cfg.database.url, STARTUP_TIMEOUT).await?;
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await
        .map_err(pg)?;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .map_err(pg)?;
    let url = scratch_url(&cfg.database.url, &name);
    let prefix = format!("bench{}:", std::process::id());
    let result = if args.scaling {
        scaling(cfg, &args, &url, &prefix).await.map(Report::Scaling)
    } else {
        bench(cfg, &args, &url, &prefix).await.map(Report::Drain)
    };
    // Clean up whatever happened.
    let _ = admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await;
    if let Ok(mut conn) = crate::redis::connect_config(&cfg.redis, STARTUP_TIMEOUT).await {
        let _ = delete_prefix(&mut conn, &prefix).await;
    }
    match result? {
        Report::Drain(r) if args.json => println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default()),
        Report::Scaling(r) if args.json => println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default()),
        Report::Drain(r) => print_report(&r),
        Report::Scaling(r) => print_scaling(&r),
    }
    Ok(())
}

enum Report {
    Drain(BenchReport),
    Scaling(ScalingReport),
}

/// `database.url` with its database replaced by `name`.
fn scratch_url(url: &str, name: &str) -> String {
    match url.parse::<tokio_postgres::Config>() {
        Ok(mut c) => {
            c.dbname(name);
            // Rebuild a URL the subprocess can take: user, host, port, db.
            let user = c.get_user().unwrap_or("postgres");
            let host = c
                .get_hosts()
                .first()
                .map(|h| match h {
                    tokio_postgres::config::Host::Tcp(h) => h.clone(),
                    #[cfg(unix)]
                    tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                })
                .unwrap_or_else(|| "127.0.0.1".into());
            let port = c.get_ports().first().copied().unwrap_or(5432);
            let password = c
                .get_password()
                .map(|p| format!(":{}", String::from_utf8_lossy(p)))
                .unwrap_or_default();
            format!("postgres://{user}{password}@{host}:{port}/{name}")
        }
        Err(_) => url.to_string(),
    }
}

/// Delete every key under `prefix` (on every master of a cluster).
async fn delete_prefix(conn: &mut DirectConn, prefix: &str) -> Result<(), ::redis::RedisError> {
    let keys = keys_matching(conn, &format!("{prefix}*")).await?;
    match conn {
        DirectConn::Standalone(c) => {
            for chunk in keys.chunks(1000) {
                let _: i64 = ::redis::cmd("DEL").arg(chunk).query_async(c).await?;
            }
        }
        // Keys on different slots cannot share a DEL.
        DirectConn::Cluster(_) => {
            for chunk in keys.chunks(1000) {
                for deleted in per_key::<i64>(conn, "DEL", chunk).await {
                    deleted?;
                }
            }
        }
    }
    Ok(())
}

const SEED_SQL: &str = "INSERT INTO task_outbox (task_id, job_id, page_id, host, path, priority, retry_count,
                                    source_type, source_url, run_at, task_type)
     SELECT gen_random_uuid(),
            ('00000000-0000-4000-8000-' || lpad((i % $2)::text, 12, '0'))::uuid,
            i::int, 'shop' || (i % $2) || '.example.com', '/products/' || i, (i % 100) / 10.0, 0,
            'sitemap', 'https://example.com/sitemap.xml', now() - interval '1 minute', 'crawl'
       FROM generate_series(1, $1::int8) AS i";

async fn seed(client: &tokio_postgres::Client, rows: i64, jobs: i64) -> Result<(), BenchError> {
    client
        .execute_typed(SEED_SQL, &[(&rows, Type::INT8), (&jobs, Type::INT8)])
        .await
        .map_err(pg)?;
    client.batch_execute("VACUUM ANALYZE task_outbox").await.map_err(pg)?;
    Ok(())
}

/// The yardstick: Postgres alone deleting the same rows in the same batches.
async fn floor(client: &tokio_postgres::Client, batch: i64) -> Result<f64, BenchError> {
    let started = Instant::now();
    let mut total = 0u64;
    loop {
        let rows = client
            .query_typed(
                "DELETE FROM task_outbox WHERE id IN (
                     SELECT id FROM task_outbox WHERE run_at <= now() ORDER BY run_at LIMIT $1 FOR UPDATE SKIP LOCKED)
                 RETURNING id, task_id::text, job_id::text, page_id, host, path, priority, retry_count,
                           source_type, source_url, task_type, lighthouse_run_id",
                &[(&batch, Type::INT8)],
            )
            .await
            .map_err(pg)?;
        if rows.is_empty() {
            break;
        }
        total += rows.len() as u64;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

struct RelayChild(Child);

impl Drop for RelayChild {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
    }
}

/// This binary as `outbox-relay run` on the scratch database and prefix;
/// `env` adds settings (the rest comes from the benchmark's own environment).
fn spawn_relay(
    config: Option<&str>,
    url: &str,
    prefix: &str,
    env: &[(&str, String)],
    log: Option<&std::path::Path>,
) -> Result<RelayChild, BenchError> {
    let exe = std::env::current_exe().map_err(|e| BenchError::Relay(e.to_string()))?;
    let (level, stdout) = match log {
        None => ("warning", Stdio::null()),
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| BenchError::Relay(format!("cannot open {}: {e}", path.display())))?;
            ("debug", Stdio::from(file))
        }
    };
    let mut cmd = Command::new(exe);
    if let Some(path) = config {
        cmd.env(CONFIG_PATH_ENV, path);
    }
    cmd.arg("run")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("OUTBOX_RELAY_DATABASE__URL", url)
        .env("OUTBOX_RELAY_DATABASE__LISTEN_URL", url)
        .env("OUTBOX_RELAY_REDIS__KEY_PREFIX", prefix)
        .env("OUTBOX_RELAY_HTTP__LISTEN", "127.0.0.1:0")
        .env("OUTBOX_RELAY_LOG__LEVEL", level)
        .stdout(stdout)
        .stdin(Stdio::null())
        .spawn()
        .map(RelayChild)
        .map_err(|e| BenchError::Relay(e.to_string()))
}

/// (CPU seconds, peak RSS in KiB) of a process, from /proc.
fn proc_usage(pid: u32) -> (f64, u64) {
    let cpu = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let after = s.rsplit_once(')')?.1.split_whitespace().collect::<Vec<_>>();
            let utime: f64 = after.get(11)?.parse().ok()?;
            let stime: f64 = after.get(12)?.parse().ok()?;
            Some((utime + stime) / 100.0)
        })
        .unwrap_or(0.0);
    let hwm = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0);
    (cpu, hwm)
}

/// Members in the seeded jobs' schedules, all together.
async fn scheduled(conn: &mut DirectConn, prefix: &str, jobs: i64) -> Result<i64, BenchError> {
    let keys: Vec<String> = (0..jobs)
        .map(|j| format!("{prefix}sched:00000000-0000-4000-8000-{j:012}"))
        .collect();
    let counts: Vec<i64> = match conn {
        DirectConn::Standalone(c) => {
            let mut pipe = ::redis::pipe();
            for k in &keys {
                pipe.zcard(k);
            }
            pipe.query_async(c).await.map_err(rd)?
        }
        DirectConn::Cluster(_) => per_key::<i64>(conn, "ZCARD", &keys)
            .await
            .into_iter()
            .collect::<Result<_, _>>()
            .map_err(rd)?,
    };
    Ok(counts.iter().sum())
}

async fn bench(cfg: &Config, args: &BenchArgs, url: &str, prefix: &str) -> Result<BenchReport, BenchError> {
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

    eprintln!("bench: floor (Postgres alone)…");
    seed(&client, args.rows, args.jobs).await?;
    let floor_rps = floor(&client, batch).await?;
    client.batch_execute("TRUNCATE task_outbox").await.map_err(pg)?;

    eprintln!("bench: drain…");
    seed(&client, args.rows, args.jobs).await?;
    let mut relay = [spawn_relay(
        args.config.as_deref(),
        url,
        prefix,
        &[],
        args.relay_log.as_deref(),
    )?];
    let pid = relay[0].0.id();
    let (cpu_before, _) = proc_usage(pid);
    let mut marks = Vec::with_capacity(10);
    let mut next = 1;
    let drain_secs = wait_scheduled(&mut relay, &mut conn, prefix, args.jobs, args.rows, |done, at| {
        while next <= 10 && done * 10 >= args.rows * next {
            marks.push(at);
            next += 1;
        }
    })
    .await?;
    let (cpu_after, _) = proc_usage(pid);
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

    // One latency run: rows for `duration`, or until a `backlog` drained.
    let measure = |duration, backlog| latency(cfg, &client, url, prefix, args.latency_rate, duration, backlog);
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
            seed(&client, args.backlog_rows, args.jobs).await?;
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
    let (_, peak_kib) = proc_usage(pid);
    drop(relay);

    let drain_rps = args.rows as f64 / drain_secs;
    Ok(BenchReport {
        rows: args.rows,
        jobs: args.jobs,
        batch_size: cfg.sweep.batch_size,
        floor_rows_per_sec: floor_rps,
        drain_rows_per_sec: drain_rps,
        drain_seconds: drain_secs,
        last_to_first_decile: match (deciles.first(), deciles.last()) {
            (Some(f), Some(l)) if *f > 0.0 => l / f,
            _ => 0.0,
        },
        drain_deciles: deciles,
        ratio_to_floor: drain_rps / floor_rps.max(1e-9),
        relay_cpu_seconds: cpu_after - cpu_before,
        relay_peak_rss_mib: peak_kib as f64 / 1024.0,
        latency_idle: idle,
        latency_during_backlog: during,
        backlog_drain_rows_per_sec: (backlog_secs > 0.0)
            .then(|| (args.backlog_rows * i64::from(args.backlog_runs.max(1))) as f64 / backlog_secs),
        cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
    })
}

/// Migrate the scratch database; connect to it and to Redis.
async fn open_scratch(cfg: &Config, url: &str) -> Result<(tokio_postgres::Client, DirectConn), BenchError> {
    let log = crate::telemetry::logging::discard();
    db::migrate::migrate(url, STARTUP_TIMEOUT, &log).await?;
    let client = db::connect(url, STARTUP_TIMEOUT).await?;
    let conn = crate::redis::connect_config(&cfg.redis, STARTUP_TIMEOUT)
        .await
        .map_err(|e| BenchError::Redis(e.to_string()))?;
    Ok((client, conn))
}

/// No new member for this long means the drain is stuck (a relay that
/// writes elsewhere, a Redis that refuses): fail instead of waiting forever.
const STALL: Duration = Duration::from_secs(60);

/// Poll the schedules until `rows` members arrived, failing if a relay
/// exits or nothing arrives for [`STALL`]; `progress` sees each count.
/// Returns the seconds it took.
async fn wait_scheduled(
    children: &mut [RelayChild],
    conn: &mut DirectConn,
    prefix: &str,
    jobs: i64,
    rows: i64,
    mut progress: impl FnMut(i64, f64),
) -> Result<f64, BenchError> {
    let started = Instant::now();
    let mut last = (-1, Instant::now());
    loop {
        for c in children.iter_mut() {
            if let Ok(Some(status)) = c.0.try_wait() {
                return Err(BenchError::Relay(format!("exited during the drain with {status}")));
            }
        }
        let done = scheduled(conn, prefix, jobs).await?;
        if done != last.0 {
            last = (done, Instant::now());
        } else if last.1.elapsed() > STALL {
            return Err(BenchError::Relay(format!(
                "no member arrived for {}s ({done} of {rows} scheduled): is the relay writing to this Redis?",
                STALL.as_secs()
            )));
        }
        progress(done, started.elapsed().as_secs_f64());
        if done >= rows {
            return Ok(started.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The scaling matrix: the floor, then one drain per (relays, concurrency).
async fn scaling(cfg: &Config, args: &BenchArgs, url: &str, prefix: &str) -> Result<ScalingReport, BenchError> {
    let (client, mut conn) = open_scratch(cfg, url).await?;
    let batch = i64::from(cfg.sweep.batch_size);
    let rows = args.scaling_rows;
    eprintln!(
        "bench: scaling matrix, {rows} rows over {} jobs per drain, batch {batch}, redis {}",
        args.jobs,
        Redis::describe(&cfg.redis)
    );
    seed(&client, rows, args.jobs).await?;
    let floor_rps = floor(&client, batch).await?;
    client.batch_execute("TRUNCATE task_outbox").await.map_err(pg)?;
    let mut runs = Vec::new();
    for relays in 1..=3u32 {
        for concurrency in [1u32, 2, 4] {
            delete_prefix(&mut conn, prefix).await.map_err(rd)?;
            seed(&client, rows, args.jobs).await?;
            let env = [("OUTBOX_RELAY_SWEEP__CONCURRENCY", concurrency.to_string())];
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
        },
        rows,
        jobs: args.jobs,
        batch_size: cfg.sweep.batch_size,
        floor_rows_per_sec: floor_rps,
        runs,
        cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
    })
}

fn print_scaling(r: &ScalingReport) {
    println!(
        "{} rows over {} jobs per drain, batch {}, {} cores, redis {}; floor (Postgres alone, 1 connection) {:.0} rows/s",
        r.rows, r.jobs, r.batch_size, r.cores, r.redis_mode, r.floor_rows_per_sec
    );
    println!();
    println!("| relays | sweep.concurrency | rows/s | × floor | relay CPU s |");
    println!("| --- | --- | --- | --- | --- |");
    for run in &r.runs {
        println!(
            "| {} | {} | {:.0} | {:.2} | {:.1} |",
            run.relays, run.concurrency, run.rows_per_sec, run.ratio_to_floor, run.relay_cpu_seconds
        );
    }
}

/// One latency run: the commit→schedule times (ms), how long the rows were
/// produced for, and the share of that time a VACUUM ran in the database.
struct LatencyRun {
    ms: Vec<f64>,
    ran: Duration,
    vacuum_share: f64,
}

/// A background task that stops when this is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sample, every 100 ms while the returned guard lives, whether a VACUUM
/// (autovacuum included) is in progress in the database at `url`:
/// (samples, hits).
async fn watch_vacuum(url: &str) -> Result<(AbortOnDrop, Arc<[AtomicU64; 2]>), BenchError> {
    let client = db::connect(url, STARTUP_TIMEOUT).await?;
    let counts: Arc<[AtomicU64; 2]> = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let seen = counts.clone();
    let task = tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_millis(100));
        loop {
            every.tick().await;
            let q = "SELECT count(*) FROM pg_stat_progress_vacuum p JOIN pg_database d ON d.oid = p.datid \
                     WHERE d.datname = current_database()";
            if let Ok(row) = client.query_typed_one(q, &[]).await {
                seen[0].fetch_add(1, Ordering::Relaxed);
                if row.get::<_, i64>(0) > 0 {
                    seen[1].fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    });
    Ok((AbortOnDrop(task), counts))
}

/// Commit single rows at `rate`/s (each for a job of its own) and time each
/// one until its ZADD shows up as a keyspace notification. With a
/// `backlog`, the run lasts until that backlog has drained (at most
/// `duration`); otherwise it lasts `duration`.
async fn latency(
    cfg: &Config,
    client: &tokio_postgres::Client,
    url: &str,
    prefix: &str,
    rate: u32,
    duration: Duration,
    backlog: i64,
) -> Result<LatencyRun, BenchError> {
    let (vacuum_watch, vacuum_counts) = watch_vacuum(url).await?;
    let redis_client = crate::redis::standalone_client(&cfg.redis).map_err(|e| BenchError::Redis(e.to_string()))?;
    let mut admin = redis_client.get_multiplexed_async_connection().await.map_err(rd)?;
    let old: Vec<String> = ::redis::cmd("CONFIG")
        .arg("GET")
        .arg("notify-keyspace-events")
        .query_async(&mut admin)
        .await
        .map_err(rd)?;
    let _: () = ::redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg("Kz")
        .query_async(&mut admin)
        .await
        .map_err(rd)?;
    let mut pubsub = redis_client.get_async_pubsub().await.map_err(rd)?;
    pubsub
        .psubscribe(format!("__keyspace@*__:{prefix}sched:{LATENCY_JOB_PREFIX}*"))
        .await
        .map_err(rd)?;
    let seen: Arc<Mutex<HashMap<String, Instant>>> = Arc::new(Mutex::new(HashMap::new()));
    let sink = seen.clone();
    let listener = tokio::spawn(async move {
        let mut stream = pubsub.into_on_message();
        while let Some(msg) = stream.next().await {
            let now = Instant::now();
            let channel = msg.get_channel_name().to_string();
            if let Some(job) = channel.rsplit("sched:").next() {
                if let Ok(mut m) = sink.lock() {
                    m.entry(job.to_string()).or_insert(now);
                }
            }
        }
    });

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
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let all = seen
            .lock()
            .map(|m| committed.iter().all(|(j, _)| m.contains_key(j)))
            .unwrap_or(true);
        if all || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    listener.abort();
    let _: Result<(), _> = ::redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg(old.get(1).cloned().unwrap_or_default())
        .query_async(&mut admin)
        .await;
    let seen = seen.lock().map(|m| m.clone()).unwrap_or_default();
    let ms: Vec<f64> = committed
        .iter()
        .filter_map(|(j, t)| {
            seen.get(j)
                .map(|s| s.saturating_duration_since(*t).as_secs_f64() * 1000.0)
        })
        .collect();
    if ms.len() < committed.len() {
        eprintln!(
            "bench: {} of {} latency rows never arrived",
            committed.len() - ms.len(),
            committed.len()
        );
    }
    Ok(LatencyRun { ms, ran, vacuum_share })
}

/// Percentiles of latency samples (ms), with the share of the time a VACUUM ran.
fn summarize(mut ms: Vec<f64>, vacuum_share: f64) -> Latency {
    ms.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| -> f64 {
        if ms.is_empty() {
            return 0.0;
        }
        ms[((ms.len() as f64 * p).ceil() as usize).clamp(1, ms.len()) - 1]
    };
    Latency {
        rows: ms.len(),
        p50_ms: q(0.50),
        p95_ms: q(0.95),
        p99_ms: q(0.99),
        max_ms: ms.last().copied().unwrap_or(0.0),
        vacuum_share,
    }
}

/// Latency rows' job ids all start with this, so one pattern subscribes to them.
const LATENCY_JOB_PREFIX: &str = "1a7e0000-";

/// The job id of latency row `n`: `1a7e0000-0000-4000-8000-<n>`.
fn latency_job(n: u64) -> Uuid {
    Uuid::from_u128(0x1a7e_0000_0000_4000_8000_0000_0000_0000u128 | u128::from(n))
}

fn print_report(r: &BenchReport) {
    println!("| measure | value |");
    println!("| --- | --- |");
    println!("| machine | {} cores, Postgres and Redis on the same host |", r.cores);
    println!("| rows / jobs / batch | {} / {} / {} |", r.rows, r.jobs, r.batch_size);
    println!(
        "| floor (Postgres alone, 1 connection) | {:.0} rows/s |",
        r.floor_rows_per_sec
    );
    println!(
        "| drain | {:.0} rows/s ({:.1} s) |",
        r.drain_rows_per_sec, r.drain_seconds
    );
    println!("| drain / floor | {:.2} |", r.ratio_to_floor);
    println!(
        "| drain per tenth | {} rows/s |",
        r.drain_deciles
            .iter()
            .map(|d| format!("{d:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("| last tenth / first tenth | {:.2} |", r.last_to_first_decile);
    println!("| relay CPU during the drain | {:.1} s |", r.relay_cpu_seconds);
    println!("| relay peak RSS | {:.1} MiB |", r.relay_peak_rss_mib);
    let l = &r.latency_idle;
    println!(
        "| commit→schedule latency, idle ({} rows) | p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms, max {:.2} ms |",
        l.rows, l.p50_ms, l.p95_ms, l.p99_ms, l.max_ms
    );
    println!(
        "| VACUUM running in the database during the idle run | {:.0}% of the run |",
        l.vacuum_share * 100.0
    );
    if let Some(l) = &r.latency_during_backlog {
        println!(
            "| latency while a backlog drains ({} rows) | p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms, max {:.2} ms |",
            l.rows, l.p50_ms, l.p95_ms, l.p99_ms, l.max_ms
        );
        println!(
            "| VACUUM running during the backlog runs | {:.0}% of the time |",
            l.vacuum_share * 100.0
        );
    }
    if let Some(rps) = r.backlog_drain_rows_per_sec {
        println!("| backlog drain rate during that run (live traffic) | {rps:.0} rows/s |");
    }
}
