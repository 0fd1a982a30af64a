//! What `bench` reports: the figures of a drain-and-latency run (the
//! console's page times and refreshes included) and of the scaling matrix,
//! as JSON (`--json`) or as the Markdown tables that docs/BENCHMARKS.md and
//! docs/SCALING.md hold.

use serde::Serialize;

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
    /// Seeded with `run_at` 1 ms apart (`--spread-run-at`) instead of one
    /// `run_at` for every row.
    pub spread_run_at: bool,
    pub jobs: i64,
    pub batch_size: u32,
    /// The yardstick: `DELETE … WHERE id IN (SELECT … FOR UPDATE SKIP
    /// LOCKED LIMIT batch)` on 1 connection, then on 2 at once.
    pub floor_rows_per_sec: f64,
    pub floor2_rows_per_sec: f64,
    /// The relay's own claim statement (`ctid = ANY(…)`) alone, 1 connection.
    pub floor_ctid_rows_per_sec: f64,
    pub drain_rows_per_sec: f64,
    pub drain_seconds: f64,
    /// Rows/s in each tenth of the drain, first to last.
    pub drain_deciles: Vec<f64>,
    pub ratio_to_floor: f64,
    pub ratio_to_floor2: f64,
    pub last_to_first_decile: f64,
    pub relay_cpu_seconds: f64,
    pub relay_peak_rss_mib: f64,
    pub latency_idle: Latency,
    pub latency_during_backlog: Option<Latency>,
    /// How fast the backlog drained while the latency rows arrived (live
    /// traffic: at most `sweep.live_concurrency` drain ticks at once).
    pub backlog_drain_rows_per_sec: Option<f64>,
    pub cores: usize,
    /// `--console`: each page's time with the seeded rows in place.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub console_pages: Option<Vec<PageTime>>,
    /// `--console`: the overview fetched once a second during the drain.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub console_refreshes: Option<Refreshes>,
}

/// One page's time with the table full.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PageTime {
    pub path: String,
    pub status: u16,
    /// The slowest of three fetches.
    pub ms: f64,
}

/// The overview fetched once a second during the drain (from its first
/// answer: the relay binds the console as it starts).
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct Refreshes {
    pub fetched: usize,
    /// Answers other than 200, or none within 10 s.
    pub failed: usize,
    /// What the failures were: a status, or "no answer".
    pub failures: Vec<String>,
    pub p50_ms: f64,
    pub max_ms: f64,
}

pub(super) fn print_scaling(r: &ScalingReport) {
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

pub(super) fn print_report(r: &BenchReport) {
    println!("| measure | value |");
    println!("| --- | --- |");
    println!("| machine | {} cores, Postgres and Redis on the same host |", r.cores);
    println!("| rows / jobs / batch | {} / {} / {} |", r.rows, r.jobs, r.batch_size);
    println!(
        "| run_at of the seeded rows | {} |",
        if r.spread_run_at {
            "1 ms apart (--spread-run-at)"
        } else {
            "all the same"
        }
    );
    println!(
        "| floor (Postgres alone, 1 connection) | {:.0} rows/s |",
        r.floor_rows_per_sec
    );
    println!(
        "| floor (Postgres alone, 2 connections) | {:.0} rows/s |",
        r.floor2_rows_per_sec
    );
    println!(
        "| the relay's ctid claim alone, 1 connection | {:.0} rows/s |",
        r.floor_ctid_rows_per_sec
    );
    println!(
        "| drain | {:.0} rows/s ({:.1} s) |",
        r.drain_rows_per_sec, r.drain_seconds
    );
    println!("| drain / floor | {:.2} |", r.ratio_to_floor);
    println!("| drain / 2-connection floor | {:.2} |", r.ratio_to_floor2);
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
    for p in r.console_pages.iter().flatten() {
        println!(
            "| console `{}` with {} rows in task_outbox | {} in {:.1} ms (slowest of 3) |",
            p.path, r.rows, p.status, p.ms
        );
    }
    if r.console_pages.is_some() && r.console_refreshes.is_none() {
        println!("| console overview during the drain | not fetched (--console-idle: the control arm) |");
    }
    if let Some(c) = &r.console_refreshes {
        println!(
            "| console overview once a second during the drain | {} fetched, {} failed, p50 {:.1} ms, max {:.1} ms |",
            c.fetched, c.failed, c.p50_ms, c.max_ms
        );
    }
}
