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
//! Files: `scenarios` and `sustained` (what runs), `console` (the console
//! timed), `measure` (how it is measured), `report` (what is printed), and
//! the leaves they share: `args` (the command line), `error`, `scratch`
//! (the scratch database and prefix). Speed goals live here, never in
//! tests.

mod args;
mod console;
mod error;
mod journal;
mod measure;
mod report;
mod scenarios;
mod scratch;
mod sustained;

pub use args::BenchArgs;
pub use error::BenchError;

use crate::config::{Config, RedisMode};
use crate::db;
use crate::deadline::STARTUP_TIMEOUT;
use error::pg;
use report::{print_report, print_scaling, BenchReport, ScalingReport};
use scenarios::{drain_and_latency, scaling};
use scratch::{delete_prefix, scratch_url};

/// Run the benchmark and print its report.
pub async fn run(cfg: &Config, args: BenchArgs) -> Result<(), BenchError> {
    if usize::from(args.sustained.is_some()) + usize::from(args.scaling) + usize::from(args.journal_cost) > 1 {
        return Err(BenchError::Usage(
            "bench: --sustained, --scaling and --journal-cost are separate runs".into(),
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
    } else if args.journal_cost {
        journal::journal_cost(cfg, &args, &url, &prefix)
            .await
            .map(Report::Journal)
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
        Report::Journal(r) if args.json => println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default()),
        Report::Journal(r) => journal::print(&r),
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
    Journal(journal::JournalCost),
}
