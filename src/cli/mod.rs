//! The command line: one function per subcommand, called by `main.rs`.
//!
//! Exit codes: 0 success, 1 a service or operation failed, 2 the
//! configuration (or the command line) is wrong. Errors are one line on
//! stderr that names the key or the service; never a panic or a backtrace.

use std::future::Future;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use slog::info;

pub mod dead_letter;
pub mod jobs;

use crate::config::{Config, CONFIG_PATH_ENV, DEFAULT_CONFIG_PATH};
use crate::telemetry::logging;
use crate::{db, RelayError, RunOptions, STARTUP_TIMEOUT};

#[derive(Debug, Parser)]
#[command(
    name = "outbox-relay",
    version,
    about = "Moves committed rows from a Postgres transactional outbox (task_outbox) into Redis schedules.",
    long_about = "Moves committed rows from a Postgres transactional outbox (task_outbox) into Redis \
sorted sets ({prefix}sched:{job_id}), deleting each row once its ZADD succeeded, retrying failed \
rows with exponential backoff and moving rows that can never be delivered to task_outbox_dead.\n\n\
Configuration: a TOML file (--config, default config/default.toml) under environment overrides \
OUTBOX_RELAY_<SECTION>__<KEY>; DATABASE_URL and REDIS_URL are honoured."
)]
pub struct Cli {
    /// Configuration file (TOML). Without it, config/default.toml is used when present,
    /// else the built-in defaults.
    #[arg(long, short, global = true, env = CONFIG_PATH_ENV, value_name = "FILE")]
    pub config: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the relay until SIGTERM or SIGINT (finishes the tick in flight, exits 0).
    Run {
        /// Log a progress line every second: rows left, rows/s, dead letters.
        #[arg(long)]
        progress: bool,
    },
    /// Create or update the outbox tables (idempotent; run before `run`).
    Migrate,
    /// Validate the configuration, print it with passwords redacted and
    /// check that Postgres and Redis answer.
    CheckConfig {
        /// Only validate and print; do not contact Postgres or Redis.
        #[arg(long)]
        no_connect: bool,
    },
    /// Cancel a job: mark it cancelled, delete its outbox rows, then clear its Redis keys.
    CancelJob {
        /// The job's id (UUID).
        job_id: uuid::Uuid,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Backlog, oldest due age, future-dated rows, dead letters and the deepest schedules.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Triage task_outbox_dead: list, requeue, purge.
    #[command(subcommand)]
    DeadLetter(dead_letter::DeadLetterCommand),
}

fn fail(code: u8, message: impl std::fmt::Display) -> ExitCode {
    for line in message.to_string().lines() {
        eprintln!("outbox-relay: error: {line}");
    }
    ExitCode::from(code)
}

fn block_on<F: Future>(fut: F) -> F::Output {
    actix_rt::System::new().block_on(fut)
}

/// Run the parsed command line; the process exit code is the result.
pub fn execute(cli: Cli) -> ExitCode {
    let (path, must_exist) = match &cli.config {
        Some(p) => (p.clone(), true),
        None => (DEFAULT_CONFIG_PATH.to_string(), false),
    };
    let cfg = match Config::load(&path, must_exist) {
        Ok(c) => c,
        Err(e) => return fail(2, e),
    };
    let (log, guard) = logging::init(&cfg.log);
    let result: Result<(), RelayError> = match cli.command {
        Command::Run { progress } => block_on(crate::run(cfg, log.clone(), RunOptions { progress })),
        Command::Migrate => block_on(async {
            let report = db::migrate::migrate(&cfg.database.url, STARTUP_TIMEOUT, &log).await?;
            info!(log, "migrations up to date";
                "applied" => format!("{:?}", report.applied),
                "already_applied" => format!("{:?}", report.already_applied));
            Ok(())
        }),
        Command::CancelJob { job_id, json } => block_on(jobs::cancel_job(&cfg, job_id, json)).map_err(RelayError::Jobs),
        Command::Status { json } => block_on(jobs::status(&cfg, json)).map_err(RelayError::Jobs),
        Command::DeadLetter(cmd) => block_on(dead_letter::run(&cfg, cmd)).map_err(RelayError::Triage),
        Command::CheckConfig { no_connect } => {
            print!("{}", cfg.to_redacted_toml());
            if no_connect {
                Ok(())
            } else {
                block_on(async {
                    db::check_ready(&cfg.database.url, STARTUP_TIMEOUT).await?;
                    println!("# postgres: reachable, outbox schema present");
                    let rtt = crate::redis::ping(&cfg.redis.url, STARTUP_TIMEOUT).await?;
                    println!("# redis: reachable (PING {}µs)", rtt.as_micros());
                    Ok(())
                })
            }
        }
    };
    // Flush the log tail before the process exits.
    drop(log);
    drop(guard);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(RelayError::Config(e)) => fail(2, e),
        Err(e) => fail(1, e),
    }
}
