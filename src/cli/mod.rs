//! The command line: one function per subcommand, called by `main.rs`.
//!
//! Exit codes: 0 success, 1 a service or operation failed, 2 the
//! configuration (or the command line) is wrong. Errors are one line on
//! stderr that names the key or the service; never a panic or a backtrace.

use std::future::Future;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use slog::{info, Logger};

pub mod bench;
pub mod dead_letter;
pub mod jobs;
pub mod reconcile;

use crate::app::RunOptions;
use crate::config::{Config, CONFIG_PATH_ENV, DEFAULT_CONFIG_PATH};
use crate::db;
use crate::deadline::STARTUP_TIMEOUT;
use crate::telemetry::logging;

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
    // The help names the variable but never shows its value: the same
    // text wherever it is read (docs/cli.md is that text).
    #[arg(long, short, global = true, env = CONFIG_PATH_ENV, hide_env_values = true, value_name = "FILE")]
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
    /// Create or update the outbox tables (idempotent; run before `run`). On a
    /// database with tables of its own (the Go sweeper's), adds only what is
    /// missing: a table or index that exists (an index by its definition, not
    /// its name) is skipped and said so; no column or constraint is changed.
    Migrate {
        /// Print what each statement would do (run, or skip and why); change nothing, take no lock.
        #[arg(long)]
        dry_run: bool,
        /// Then grant the relay's and the triage roles what they need
        /// (deploy/postgres/roles.sql, built in), as the tables' owner.
        #[arg(long, conflicts_with = "dry_run")]
        grant: bool,
    },
    /// Validate the configuration, print it with passwords redacted and
    /// check that Postgres and Redis answer.
    CheckConfig {
        /// Only validate and print; do not contact Postgres or Redis.
        #[arg(long)]
        no_connect: bool,
    },
    /// Cancel a job: mark it cancelled, delete its outbox rows, then clear its Redis keys.
    CancelJob {
        /// The job's id (a UUID, or any text where jobs.id is TEXT as on the Go sweeper's database).
        job_id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Pause delivery: every relay on the database stops claiming rows (of
    /// one job with --job) from its next tick; ticks in flight finish. Rows
    /// wait with their attempts untouched; relays stay healthy and say so.
    Pause {
        /// Pause only this job's rows.
        #[arg(long, value_name = "JOB_ID")]
        job: Option<String>,
        /// Why (shown by `status`, the health lines' readers, and the next operator).
        #[arg(long, default_value = "")]
        reason: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Resume what `pause` paused (everything, or one job with --job).
    Resume {
        /// Resume only this job (a pause of everything stays).
        #[arg(long, value_name = "JOB_ID")]
        job: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write schedule entries Redis lost again, from the delivery journal
    /// (journal.keep): each journaled entry whose member is missing from its
    /// schedule, unless its job is cancelled or journal.still_pending leaves it
    /// out, through the same fenced write as the relay. Idempotent; paced by
    /// journal.reconcile_rate. Consumers may see an entry twice (at-least-once).
    Reconcile {
        /// Only entries journaled in this last stretch (`10m`, `2h`); default: all the journal holds.
        #[arg(long, value_name = "DURATION")]
        since: Option<String>,
        /// Only this job's entries.
        #[arg(long, value_name = "JOB_ID")]
        job: Option<String>,
        /// Count what would be written; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Backlog, oldest due age, future-dated rows, dead letters, pauses and the deepest schedules.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check the outbox invariant over a ledger of produced rows: each one is
    /// in its job's schedule (exact member), in task_outbox_dead, or still pending.
    Verify {
        /// Table with task_outbox's columns that the producer filled alongside
        /// the outbox (e.g. `CREATE TABLE produced (LIKE task_outbox)`).
        #[arg(long, value_name = "TABLE")]
        ledger: String,
        /// Only rows created since then: a duration ago (`1h`, `7d`) or a timestamp.
        #[arg(long, value_name = "DURATION|TIMESTAMP")]
        since: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Measure drain throughput (vs a Postgres-only floor) and commit-to-schedule
    /// latency on a scratch database and key prefix; see docs/BENCHMARKS.md.
    ///
    /// With redis.mode = "cluster" only --scaling runs: the latency runs time
    /// keyspace notifications, which are per node.
    Bench(bench::BenchArgs),
    /// Triage task_outbox_dead: list, requeue, purge.
    #[command(subcommand)]
    DeadLetter(dead_letter::DeadLetterCommand),
    /// Serve only the browser console and its /api/v1/ (no sweeping): one
    /// console for a fleet of relays, on console.listen (default
    /// 127.0.0.1:9465), until SIGTERM or SIGINT. See docs/console.md.
    Console {
        #[command(subcommand)]
        command: Option<ConsoleCommand>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConsoleCommand {
    /// Read a password from standard input (one line) and print its argon2id
    /// hash, for a `name:role:hash` line of console.users_file.
    HashPassword,
}

/// Anything that makes a command fail (the exit code follows the kind).
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Database(#[from] db::DbSetupError),
    #[error(transparent)]
    Redis(#[from] crate::redis::RedisSetupError),
    #[error(transparent)]
    Migrate(#[from] db::migrate::MigrateError),
    #[error(transparent)]
    Run(#[from] crate::app::RunError),
    #[error(transparent)]
    Triage(#[from] dead_letter::TriageError),
    #[error(transparent)]
    Jobs(#[from] jobs::JobsError),
    #[error(transparent)]
    Verify(#[from] crate::verify::VerifyError),
    #[error(transparent)]
    Reconcile(#[from] reconcile::ReconcileCmdError),
    #[error(transparent)]
    Bench(#[from] bench::BenchError),
    #[error("invariant violated: {0}")]
    Invariant(String),
}

fn fail(code: u8, message: impl std::fmt::Display) -> ExitCode {
    for line in crate::redact::scrub(&message.to_string()).lines() {
        eprintln!("outbox-relay: error: {line}");
    }
    ExitCode::from(code)
}

fn block_on<F: Future>(fut: F) -> F::Output {
    actix_rt::System::new().block_on(fut)
}

/// Run the parsed command line; the process exit code is the result.
pub fn execute(cli: Cli) -> ExitCode {
    // Whatever panics, the message goes out without a secret in it.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("outbox-relay: panic: {}", crate::redact::scrub(&info.to_string()));
    }));
    if let Command::Console {
        command: Some(ConsoleCommand::HashPassword),
    } = &cli.command
    {
        return hash_password();
    }
    let cfg = match load_config(cli.config.as_deref()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let (log, guard) = logging::init(&cfg.log);
    let result = dispatch(cli, cfg, &log);
    // Flush the log tail before the process exits.
    drop(log);
    drop(guard);
    exit_code(result)
}

/// The configuration from `--config` (which must exist) or the default
/// path (which may not), its secrets remembered for redaction and its
/// Postgres TLS roots installed; the exit code 2 when it is wrong.
fn load_config(config: Option<&str>) -> Result<Config, ExitCode> {
    let (path, must_exist) = match config {
        Some(p) => (p.to_string(), true),
        None => (DEFAULT_CONFIG_PATH.to_string(), false),
    };
    let cfg = match Config::load(&path, must_exist) {
        Ok(c) => c,
        Err(e) => return Err(fail(2, e)),
    };
    crate::redact::remember(cfg.secrets());
    if let Err(e) = db::tls::configure(&cfg.database.tls_ca_file) {
        return Err(fail(2, format!("invalid config: database.tls_ca_file: {e}")));
    }
    Ok(cfg)
}

/// Run the subcommand.
fn dispatch(cli: Cli, cfg: Config, log: &Logger) -> Result<(), RelayError> {
    match cli.command {
        Command::Run { progress } => {
            block_on(crate::app::run(cfg, log.clone(), RunOptions { progress })).map_err(RelayError::Run)
        }
        Command::Migrate { dry_run, grant } => block_on(migrate_cmd(&cfg, dry_run, grant, log)),
        Command::CancelJob { job_id, json } => block_on(jobs::cancel_job(&cfg, job_id, json)).map_err(RelayError::Jobs),
        Command::Status { json } => block_on(jobs::status(&cfg, json)).map_err(RelayError::Jobs),
        Command::Reconcile {
            since,
            job,
            dry_run,
            json,
        } => block_on(reconcile::run(&cfg, since, job, dry_run, json)).map_err(RelayError::Reconcile),
        Command::Pause { job, reason, json } => {
            block_on(jobs::pause(&cfg, job, &reason, json)).map_err(RelayError::Jobs)
        }
        Command::Resume { job, json } => block_on(jobs::resume(&cfg, job, json)).map_err(RelayError::Jobs),
        Command::Verify { ledger, since, json } => block_on(verify_cmd(&cfg, &ledger, since, json)),
        Command::Bench(mut args) => {
            args.config = cli.config.clone();
            block_on(bench::run(&cfg, args)).map_err(RelayError::Bench)
        }
        Command::DeadLetter(cmd) => block_on(dead_letter::run(&cfg, cmd)).map_err(RelayError::Triage),
        Command::Console { .. } => block_on(crate::app::console_only(cfg, log.clone())).map_err(RelayError::Run),
        Command::CheckConfig { no_connect } => {
            print!("{}", crate::redact::scrub(&cfg.to_redacted_toml()));
            if no_connect {
                Ok(())
            } else {
                block_on(check_services(&cfg))
            }
        }
    }
}

/// The exit code of a command's result: 2 for a wrong configuration or
/// command line, 1 for any other failure (the error printed).
fn exit_code(result: Result<(), RelayError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(RelayError::Config(e)) => fail(2, e),
        Err(e @ RelayError::Bench(bench::BenchError::Usage(_))) => fail(2, e),
        Err(e @ RelayError::Run(crate::app::RunError::Usage(_))) => fail(2, e),
        Err(e @ RelayError::Reconcile(reconcile::ReconcileCmdError::Usage(_))) => fail(2, e),
        Err(e) => fail(1, e),
    }
}

/// `outbox-relay migrate [--dry-run] [--grant]`: apply (or show) the
/// migrations, then grant the roles' privileges.
async fn migrate_cmd(cfg: &Config, dry_run: bool, grant: bool, log: &Logger) -> Result<(), RelayError> {
    let report = db::migrate::apply(&cfg.database.url, STARTUP_TIMEOUT, dry_run, log).await?;
    if grant {
        db::migrate::grant(&cfg.database.url, STARTUP_TIMEOUT).await?;
        info!(
            log,
            "granted deploy/postgres/roles.sql to outbox_relay and outbox_triage"
        );
    }
    if dry_run {
        for v in &report.already_applied {
            println!("migration {v}: already applied");
        }
        for step in &report.steps {
            println!("{step}");
        }
        println!(
            "dry run: {} migrations would be applied ({} statements run, {} skipped); nothing changed",
            report.applied.len(),
            report.steps.iter().filter(|s| s.skipped.is_none()).count(),
            report.steps.iter().filter(|s| s.skipped.is_some()).count()
        );
    } else {
        info!(log, "migrations up to date";
            "applied" => format!("{:?}", report.applied),
            "already_applied" => format!("{:?}", report.already_applied));
    }
    Ok(())
}

/// `outbox-relay check-config` without `--no-connect`: whether Postgres
/// and Redis answer, and what the relay's role and user may do there.
async fn check_services(cfg: &Config) -> Result<(), RelayError> {
    let schema = db::check_ready(&cfg.database.url, STARTUP_TIMEOUT).await?;
    println!("# postgres: reachable, outbox schema present: {}", schema.describe());
    let optional = db::check_privileges(&cfg.database.url, db::privileges::RUN, STARTUP_TIMEOUT).await?;
    for m in &optional {
        println!("# postgres: warning: {m}");
    }
    if optional.is_empty() {
        println!("# postgres: the role holds every privilege `run` needs");
    } else {
        println!("# postgres: the role holds every privilege `run` requires");
    }
    if cfg.journal.on() {
        db::check_journal(&cfg.database.url, STARTUP_TIMEOUT).await?;
        println!("# postgres: the delivery journal is there and the role may write, read and empty it");
    }
    let hearing = db::listen::check(db::listen::ListenTarget::new(
        cfg.database.listen_target(),
        &cfg.database.url,
    ))
    .await;
    println!("# postgres: listen: {}", hearing.describe());
    let rtt = crate::redis::ping(&cfg.redis, STARTUP_TIMEOUT).await?;
    println!("# redis: reachable (PING {}µs)", rtt.as_micros());
    let optional = crate::redis::check_permissions(&cfg.redis, STARTUP_TIMEOUT).await?;
    for m in &optional {
        println!("# redis: warning: {m}");
    }
    if optional.is_empty() {
        println!("# redis: the user may run every command `run` sends");
    } else {
        println!("# redis: the user may run every command `run` requires");
    }
    Ok(())
}

/// `outbox-relay console hash-password`: one line in, one hash out. The
/// password is never echoed or logged.
fn hash_password() -> ExitCode {
    let mut line = String::new();
    if let Err(e) = std::io::stdin().read_line(&mut line) {
        return fail(1, format!("cannot read the password from standard input: {e}"));
    }
    let password = line.trim_end_matches(['\n', '\r']);
    if password.is_empty() {
        return fail(2, "no password on standard input (type it, then Enter; or pipe it in)");
    }
    match crate::console::auth::hash_password(password) {
        Ok(h) => {
            println!("{h}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(1, format!("cannot hash the password: {e}")),
    }
}

/// `outbox-relay verify`: exit 0 when the invariant holds and nothing due is
/// left, 1 otherwise (the report says what is wrong).
async fn verify_cmd(cfg: &Config, ledger: &str, since: Option<String>, json: bool) -> Result<(), RelayError> {
    use crate::verify::{ledger_rows, verify, Since};
    let since = since.map(|s| match crate::config::parse_duration(&s) {
        Ok(d) => Since::Ago(d.as_millis().min(i64::MAX as u128) as i64),
        Err(_) => Since::At(s),
    });
    let (client, _) = db::connect_ready(&cfg.database.url, STARTUP_TIMEOUT).await?;
    let mut conn = crate::redis::connect_config(&cfg.redis, STARTUP_TIMEOUT).await?;
    let produced = ledger_rows(&client, ledger, since.as_ref()).await?;
    let report = verify(&client, &mut conn, &cfg.redis.key_prefix, &produced).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
    } else {
        println!(
            "produced {}: delivered {}, dead-lettered {}, pending due {}, pending later {}, lost {}, corrupted {}, wrong score {}",
            report.produced,
            report.delivered,
            report.dead_lettered,
            report.pending_due,
            report.pending_future,
            report.lost.len(),
            report.corrupted.len(),
            report.wrong_score.len()
        );
        for t in report.lost.iter().take(20) {
            println!("lost: {t}");
        }
        for (t, m) in report.corrupted.iter().take(20) {
            println!("corrupted: {t}: {m}");
        }
    }
    if !report.holds() {
        return Err(RelayError::Invariant(format!(
            "{} lost, {} corrupted, {} with a wrong score",
            report.lost.len(),
            report.corrupted.len(),
            report.wrong_score.len()
        )));
    }
    if report.pending_due > 0 {
        return Err(RelayError::Invariant(format!(
            "{} rows are still due in task_outbox (is the relay running?)",
            report.pending_due
        )));
    }
    Ok(())
}
