//! The command line of `bench`: what to measure, how much, and how to
//! report it.

use clap::Args;

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
    /// With `--scaling`: rows per drain of the scaling matrix.
    #[arg(long, default_value_t = 200_000, requires = "scaling")]
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
    /// With `--sustained`: rows per transaction.
    #[arg(long, default_value_t = 500, requires = "sustained")]
    pub rows_per_txn: u32,
    /// With `--sustained`: length of the run without `--hold-snapshot`, in seconds.
    #[arg(long, default_value_t = 120, requires = "sustained")]
    pub sustained_seconds: u64,
    /// With `--sustained`: another session holds a REPEATABLE READ snapshot
    /// open for SECS (vacuum can remove none of the deleted rows), between a
    /// phase before and one after of `--phase-seconds` each.
    #[arg(long, value_name = "SECS", requires = "sustained")]
    pub hold_snapshot: Option<u64>,
    /// With `--sustained`: relay processes (each listening: how many claim
    /// per notification and find nothing is in the report).
    #[arg(long, default_value_t = 1, requires = "sustained")]
    pub relays: u32,
    /// With `--hold-snapshot`: length of the phases before and after the
    /// held snapshot, in seconds.
    #[arg(long, default_value_t = 30, requires = "hold_snapshot")]
    pub phase_seconds: u64,
    /// Measure what the delivery journal costs (#40): `--rows` drained with
    /// `journal.keep = "0s"`, then with `--journal-keep`, alternating, three
    /// times each, and the ratio of the on rate to the off rate. Replaces
    /// the floors, the drain and the latency runs.
    #[arg(long)]
    pub journal_cost: bool,
    /// With `--journal-cost`: the `journal.keep` of the runs with it on.
    #[arg(long, default_value = "1h", requires = "journal_cost")]
    pub journal_keep: String,
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
