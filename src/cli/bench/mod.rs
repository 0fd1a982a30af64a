//! `outbox-relay bench`: how fast the relay moves rows, measured on this
//! machine against the configured Postgres and Redis.
//!
//! On a scratch database (created next to `database.url`'s database and
//! dropped at the end) and a scratch key prefix it measures:
//! 1. **floor**: what Postgres alone does on the same data and batch size —
//!    a bare `DELETE … WHERE id IN (SELECT … FOR UPDATE SKIP LOCKED LIMIT n)
//!    RETURNING …` loop on one connection;
//! 2. **drain**: N rows seeded in one statement, drained by the real relay
//!    (this binary, `run`, as a subprocess): rows/s
//!    overall and per tenth of the drain, relay CPU seconds and peak RSS;
//! 3. **latency**: single rows committed at a steady rate, time from commit
//!    to the member being visible in Redis (Redis keyspace notifications,
//!    one job per row), with the relay idle and while a backlog drains;
//! 4. with `--sustained RATE` instead: production in multi-row transactions
//!    for minutes, optionally while a snapshot is held (`sustained`).
//!
//! Every relay it starts runs with the shipped defaults (and whatever the
//! config file and environment set, printed at the start): `bench` sets
//! only where it runs (scratch database, key prefix, HTTP port) and its
//! log level, plus a scenario's own subject (the scaling matrix's lanes).
//!
//! Files: `scenarios` (what runs), `measure` (how it is measured),
//! `report` (what is printed). Speed goals live here, never in tests.

mod console;
mod measure;
mod report;
mod scenarios;
mod sustained;

use clap::Args;

use crate::config::{Config, RedisMode};
use crate::db::{self, pg_error_text};
use crate::deadline::STARTUP_TIMEOUT;
use crate::redis::keys::{keys_matching, per_key};
use crate::redis::DirectConn;
use report::{print_report, print_scaling, BenchReport, ScalingReport};
use scenarios::{drain_and_latency, scaling};

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
    /// Seed rows with `run_at` one millisecond apart (distinct schedule
    /// scores, as rows committed over time get) instead of all the same
    /// (the default, comparable with every recorded run, and the worst case
    /// for Redis: every sorted-set insert then compares members).
    #[arg(long)]
    pub spread_run_at: bool,
    /// Instead of the drain and latency runs: produce RATE rows/s in
    /// `--rows-per-txn`-row transactions for `--sustained-seconds` and
    /// report commit→visible latency (one timed row per transaction), the
    /// backlog and the relay's claim times.
    #[arg(long, value_name = "RATE")]
    pub sustained: Option<u32>,
    /// Rows per transaction of the sustained run.
    #[arg(long, default_value_t = 500)]
    pub rows_per_txn: u32,
    /// Length of the sustained run without `--hold-snapshot`, in seconds.
    #[arg(long, default_value_t = 120)]
    pub sustained_seconds: u64,
    /// With `--sustained`: another session holds a REPEATABLE READ snapshot
    /// open for SECS (vacuum can remove none of the deleted rows), between a
    /// phase before and one after of `--phase-seconds` each.
    #[arg(long, value_name = "SECS", requires = "sustained")]
    pub hold_snapshot: Option<u64>,
    /// Relay processes in the sustained run (each listening: how many claim
    /// per notification and find nothing is in the report).
    #[arg(long, default_value_t = 1)]
    pub relays: u32,
    /// Length of the phases before and after a held snapshot, in seconds.
    #[arg(long, default_value_t = 30)]
    pub phase_seconds: u64,
    /// Leave out the Postgres-only floors (the ratios are then 0): for a
    /// long drain whose last tenth ÷ first is the point (each floor drains
    /// `--rows` too: at 5,000,000 rows they take most of the run).
    #[arg(long)]
    pub skip_floors: bool,
    /// Also time the console (#30): with the seeded rows in `task_outbox`,
    /// every page from `outbox-relay console` (the slowest of three
    /// fetches each), then the relay serves it (`console.listen`, the one
    /// setting this overrides) and the overview is fetched once a second
    /// through the drain. Compare drain ÷ floor with a run without it.
    #[arg(long)]
    pub console: bool,
    /// With `--console`: everything it does except the refreshes during
    /// the drain (the control arm: the same pages timed first, the same
    /// relay serving the console, nobody looking), so a pair of runs
    /// differs only in the once-a-second overview.
    #[arg(long, requires = "console")]
    pub console_idle: bool,
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

/// Run the benchmark and print its report.
pub async fn run(cfg: &Config, args: BenchArgs) -> Result<(), BenchError> {
    if args.sustained.is_some() && args.scaling {
        return Err(BenchError::Usage(
            "bench: --sustained and --scaling are separate runs".into(),
        ));
    }
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
    let result = if let Some(rate) = args.sustained {
        sustained::sustained(cfg, &args, rate, &url, &prefix)
            .await
            .map(Report::Sustained)
    } else if args.scaling {
        scaling(cfg, &args, &url, &prefix).await.map(Report::Scaling)
    } else {
        drain_and_latency(cfg, &args, &url, &prefix)
            .await
            .map(|r| Report::Drain(Box::new(r)))
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
        Report::Sustained(r) if args.json => println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default()),
        Report::Sustained(r) => sustained::print_sustained(&r),
        Report::Drain(r) => print_report(&r),
        Report::Scaling(r) => print_scaling(&r),
    }
    Ok(())
}

enum Report {
    Drain(Box<BenchReport>),
    Sustained(sustained::SustainedReport),
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

/// Delete every key under `prefix` (on every master of a cluster), with
/// `UNLINK`: freeing sets of millions of members is Redis's background
/// work then, not a stall of the shared server (a `DEL` of a 5,000,000-row
/// run's schedules kept the next bench from connecting).
async fn delete_prefix(conn: &mut DirectConn, prefix: &str) -> Result<(), ::redis::RedisError> {
    let keys = keys_matching(conn, &format!("{prefix}*")).await?;
    match conn {
        DirectConn::Standalone(c) => {
            for chunk in keys.chunks(1000) {
                let _: i64 = ::redis::cmd("UNLINK").arg(chunk).query_async(c).await?;
            }
        }
        // Keys on different slots cannot share an UNLINK.
        DirectConn::Cluster(_) => {
            for chunk in keys.chunks(1000) {
                for deleted in per_key::<i64>(conn, "UNLINK", chunk).await {
                    deleted?;
                }
            }
        }
    }
    Ok(())
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
