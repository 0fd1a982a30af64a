//! `bench --sustained RATE [--hold-snapshot SECS]`: production at a steady
//! rate in multi-row transactions, with the relay at the shipped defaults.
//!
//! Every transaction carries one latency row (a job of its own, timed from
//! commit to its schedule key's keyspace notification); a sampler computes
//! the backlog every 100 ms (rows committed minus rows the relays report
//! delivered); the relay's own
//! `outbox_relay_claim_duration_seconds` is scraped at each phase boundary.
//! With `--hold-snapshot`, the run has three phases: before, while another
//! session holds a REPEATABLE READ snapshot (vacuum can then remove none of
//! the rows the relay deletes), and after it ends.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_postgres::types::Type;

use super::args::BenchArgs;
use super::error::{pg, BenchError};
use super::measure::{
    describe_settings, histogram, latency_job, metric_sum, scrape, spawn_relay, summarize, AbortOnDrop, KeyspaceWatch,
    RelayChild,
};
use super::report::Latency;
use super::scratch::open_scratch;
use crate::config::Config;
use crate::redact::redact_url;
use crate::redis::Redis;

#[derive(Debug, Serialize, Default)]
pub struct SustainedReport {
    /// Rows per second asked for, and per transaction.
    pub rate: u32,
    pub rows_per_txn: u32,
    /// Rows committed, and the rate reached (the producer's own pace).
    pub produced_rows: i64,
    pub produced_rate: f64,
    /// `outbox_relay_listen_active` when production started.
    pub listen_active: bool,
    /// Relay processes (`--relays`).
    pub relays: u32,
    pub phases: Vec<Phase>,
    pub cores: usize,
}

#[derive(Debug, Serialize, Default)]
pub struct Phase {
    /// `steady`, or `before` / `snapshot held` / `after`.
    pub name: String,
    pub seconds: f64,
    /// Commit→visible of the one latency row per transaction.
    pub latency: Latency,
    /// The most rows committed but not yet delivered at a 100 ms sample
    /// (rows committed before the sample minus the relays'
    /// `outbox_relay_sweep_rows_total{outcome="dispatched"}`), and that in
    /// seconds of production.
    pub max_backlog_rows: i64,
    pub max_backlog_seconds: f64,
    /// The relay's claims in the phase (every lane, found rows or not):
    /// how many, mean and p99 (the upper bound of the bucket it falls in).
    pub claims: f64,
    pub claim_mean_ms: f64,
    pub claim_p99_ms: f64,
    /// Claims that found nothing, per row delivered (every relay), and
    /// of those the fresh lane's (claims for a notification; the rest are
    /// drain lanes' polls).
    pub empty_claims_per_row: f64,
    pub empty_fresh_claims_per_row: f64,
    /// `n_dead_tup` of task_outbox at the end of the phase.
    pub dead_tuples: i64,
}

/// The relays' claim histograms (summed) at one moment.
#[derive(Default)]
struct ClaimSnapshot {
    count: f64,
    sum: f64,
    buckets: Vec<(f64, f64)>,
    /// Claims that found nothing, and rows delivered.
    empty: f64,
    empty_fresh: f64,
    delivered: f64,
}

const CLAIM_METRIC: &str = "outbox_relay_claim_duration_seconds";

async fn claims_now(ports: &[u16]) -> ClaimSnapshot {
    let mut all = ClaimSnapshot::default();
    for port in ports {
        let text = scrape(*port).await.unwrap_or_default();
        all.count += metric_sum(&text, &format!("{CLAIM_METRIC}_count"), "");
        all.sum += metric_sum(&text, &format!("{CLAIM_METRIC}_sum"), "");
        all.empty += metric_sum(&text, &format!("{CLAIM_METRIC}_count"), "found=\"none\"");
        all.empty_fresh += metric_sum(&text, &format!("{CLAIM_METRIC}_count"), "found=\"none\",lane=\"fresh\"");
        all.delivered += metric_sum(&text, "outbox_relay_sweep_rows_total", "outcome=\"dispatched\"");
        for (le, n) in histogram(&text, CLAIM_METRIC) {
            match all.buckets.iter_mut().find(|(b, _)| *b == le) {
                Some(slot) => slot.1 += n,
                None => all.buckets.push((le, n)),
            }
        }
    }
    all
}

/// (claims, mean ms, p99 ms) between two snapshots.
fn claims_between(a: &ClaimSnapshot, b: &ClaimSnapshot) -> (f64, f64, f64) {
    let n = b.count - a.count;
    if n <= 0.0 {
        return (0.0, 0.0, 0.0);
    }
    let mean = (b.sum - a.sum) / n * 1000.0;
    let want = n * 0.99;
    let p99 = b
        .buckets
        .iter()
        .find(|(le, cum)| {
            let before = a.buckets.iter().find(|(l, _)| l == le).map_or(0.0, |(_, c)| *c);
            cum - before >= want
        })
        .map_or(f64::INFINITY, |(le, _)| le * 1000.0);
    (n, mean, p99)
}

/// The sustained run (see the module's doc).
pub(super) async fn sustained(
    cfg: &Config,
    args: &BenchArgs,
    rate: u32,
    url: &str,
    prefix: &str,
) -> Result<SustainedReport, BenchError> {
    let (client, _conn) = open_scratch(cfg, url).await?;
    let plan = plan(args, rate);
    eprintln!(
        "bench: sustained {rate} rows/s in {}-row transactions over {} jobs, database {}, redis {}, phases {}",
        plan.per_txn,
        args.jobs,
        redact_url(url),
        Redis::describe(&cfg.redis),
        plan.phases
            .iter()
            .map(|(n, d)| format!("{n} {}s", d.as_secs()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    eprintln!("{}", describe_settings(args.config.as_deref(), prefix, &[]));
    let relays = start_relays(args, url, prefix)?;
    let ports: Vec<u16> = relays.iter().map(|r| r.1).collect();
    let listen_active = wait_ready(ports[0]).await?;

    let watch = KeyspaceWatch::start(cfg, prefix).await?;
    let sampler = BacklogSampler::start(&ports).await;
    let production = produce(&client, url, args, &plan, &ports, &sampler.committed_rows).await?;
    let end_claims = claims_now(&ports).await;
    watch.wait_all(&production.committed, Duration::from_secs(30)).await;
    drop(sampler.task);
    let times = watch.finish(&production.committed).await;
    let missing = times.iter().filter(|t| t.is_none()).count();
    if missing > 0 {
        eprintln!(
            "bench: {missing} of {} latency rows never arrived",
            production.committed.len()
        );
    }
    let samples = sampler.samples.lock().map(|s| s.clone()).unwrap_or_default();
    let report_phases = phase_reports(&plan.phases, &production, &end_claims, &times, &samples, rate);
    let left: i64 = client
        .query_typed_one("SELECT count(*) FROM task_outbox", &[])
        .await
        .map_err(pg)?
        .get(0);
    drop(relays);
    if left > 0 {
        eprintln!("bench: warning: {left} rows still in the outbox at the end");
    }
    Ok(SustainedReport {
        rate,
        rows_per_txn: plan.per_txn,
        produced_rows: production.produced,
        produced_rate: production.produced as f64 / production.seconds.max(1e-9),
        listen_active,
        relays: args.relays.max(1),
        phases: report_phases,
        cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
    })
}

/// What the run produces: `per_txn` rows in a transaction every `every`,
/// through `phases` (name, length) one after another.
struct Plan {
    per_txn: u32,
    every: Duration,
    phases: Vec<(&'static str, Duration)>,
}

/// The plan of a run at `rate` rows/s: one `steady` phase, or `before`,
/// `snapshot held` and `after` with `--hold-snapshot`.
fn plan(args: &BenchArgs, rate: u32) -> Plan {
    let per_txn = args.rows_per_txn.clamp(1, rate.max(1));
    let every = Duration::from_secs_f64(f64::from(per_txn) / f64::from(rate.max(1)));
    let phases: Vec<(&str, Duration)> = match args.hold_snapshot {
        Some(held) => vec![
            ("before", Duration::from_secs(args.phase_seconds)),
            ("snapshot held", Duration::from_secs(held)),
            ("after", Duration::from_secs(args.phase_seconds)),
        ],
        None => vec![("steady", Duration::from_secs(args.sustained_seconds))],
    };
    Plan { per_txn, every, phases }
}

/// The `--relays` relay processes (at least one) on the scratch database.
fn start_relays(args: &BenchArgs, url: &str, prefix: &str) -> Result<Vec<RelayChild>, BenchError> {
    let mut relays = Vec::new();
    for _ in 0..args.relays.max(1) {
        relays.push(spawn_relay(
            args.config.as_deref(),
            url,
            prefix,
            &[],
            args.relay_log.as_deref(),
        )?);
    }
    Ok(relays)
}

/// Wait until the relay's `/metrics` on `port` answers and its listener has
/// been checked: whether it listens (a warning when it polls instead).
async fn wait_ready(port: u16) -> Result<bool, BenchError> {
    // Ready: the scrape answers and the listener has been checked.
    let started = Instant::now();
    let listen_active = loop {
        if let Some(text) = scrape(port).await {
            let active = metric_sum(&text, "outbox_relay_listen_active", "") > 0.0;
            if active || started.elapsed() > Duration::from_secs(5) {
                break active;
            }
        }
        if started.elapsed() > Duration::from_secs(60) {
            return Err(BenchError::Relay(
                "the relay's /metrics did not answer within 60s".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    if !listen_active {
        eprintln!("bench: warning: outbox_relay_listen_active is 0: the relay polls (see its log)");
    }
    Ok(listen_active)
}

/// The backlog every 100 ms: rows committed minus rows the relays
/// delivered (their own counter). Not `count(*)` of the outbox: that
/// scans every dead tuple too, and the scan would grow with them and
/// take the cores the relay is measured on.
struct BacklogSampler {
    /// (when, backlog rows) of each sample.
    samples: Arc<Mutex<Vec<(Instant, i64)>>>,
    /// Rows committed so far, kept up to date by the producer.
    committed_rows: Arc<AtomicI64>,
    /// The sampling task, stopped when dropped.
    task: AbortOnDrop,
}

impl BacklogSampler {
    /// Start sampling the relays at `ports`, from what they have delivered now.
    async fn start(ports: &[u16]) -> BacklogSampler {
        let samples: Arc<Mutex<Vec<(Instant, i64)>>> = Arc::new(Mutex::new(Vec::new()));
        let committed_rows = Arc::new(AtomicI64::new(0));
        let task = {
            let (sink, produced, ports) = (samples.clone(), committed_rows.clone(), ports.to_vec());
            let delivered_at_start = claims_now(&ports).await.delivered;
            AbortOnDrop::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                loop {
                    tick.tick().await;
                    let before = produced.load(Ordering::SeqCst);
                    let delivered = claims_now(&ports).await.delivered - delivered_at_start;
                    if let Ok(mut s) = sink.lock() {
                        s.push((Instant::now(), (before as f64 - delivered).max(0.0) as i64));
                    }
                }
            })
        };
        BacklogSampler {
            samples,
            committed_rows,
            task,
        }
    }
}

/// What the producer did.
struct Production {
    /// Each transaction's latency job and commit time.
    committed: Vec<(String, Instant)>,
    /// Each phase's start, end, the claims at its start, and the dead
    /// tuples at its end.
    bounds: Vec<(Instant, Instant, ClaimSnapshot, i64)>,
    /// Rows committed, and the seconds production took.
    produced: i64,
    seconds: f64,
}

/// Produce through the plan's phases (holding a snapshot in another session
/// during `snapshot held`), counting committed rows in `committed_rows`.
async fn produce(
    client: &tokio_postgres::Client,
    url: &str,
    args: &BenchArgs,
    plan: &Plan,
    ports: &[u16],
    committed_rows: &AtomicI64,
) -> Result<Production, BenchError> {
    let insert = "INSERT INTO task_outbox (task_id, job_id, page_id, host, path, priority, source_type, run_at)
         SELECT gen_random_uuid(),
                CASE WHEN i = 1 THEN $1
                     ELSE ('00000000-0000-4000-8000-' || lpad((i % $3)::text, 12, '0'))::uuid END,
                i::int, 'sustained.example.com', '/s/' || i, 1, 'bench', now()
           FROM generate_series(1, $2::int8) AS i";
    let mut committed: Vec<(String, Instant)> = Vec::new();
    let mut bounds: Vec<(Instant, Instant, ClaimSnapshot, i64)> = Vec::new();
    let mut produced = 0i64;
    let mut holder: Option<tokio_postgres::Client> = None;
    let mut ticker = tokio::time::interval(plan.every);
    let production_started = Instant::now();
    for (name, length) in &plan.phases {
        if *name == "snapshot held" {
            let c = crate::db::connect(url, crate::deadline::STARTUP_TIMEOUT).await?;
            c.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM task_outbox")
                .await
                .map_err(pg)?;
            holder = Some(c);
        } else if let Some(c) = holder.take() {
            c.batch_execute("COMMIT").await.map_err(pg)?;
        }
        let phase_start = Instant::now();
        let before = claims_now(ports).await;
        while phase_start.elapsed() < *length {
            ticker.tick().await;
            let job = latency_job(committed.len() as u64);
            let rows = i64::from(plan.per_txn);
            client
                .execute_typed(
                    insert,
                    &[(&job, Type::UUID), (&rows, Type::INT8), (&args.jobs.max(1), Type::INT8)],
                )
                .await
                .map_err(pg)?;
            committed.push((job.to_string(), Instant::now()));
            produced += rows;
            committed_rows.store(produced, Ordering::SeqCst);
        }
        let dead: i64 = client
            .query_typed_one(
                "SELECT COALESCE(n_dead_tup, 0) FROM pg_stat_user_tables WHERE relname = 'task_outbox'",
                &[],
            )
            .await
            .map(|r| r.get(0))
            .unwrap_or(-1);
        eprintln!("bench: phase {name} done ({produced} rows so far)");
        bounds.push((phase_start, Instant::now(), before, dead));
    }
    let seconds = production_started.elapsed().as_secs_f64();
    if let Some(c) = holder.take() {
        let _ = c.batch_execute("COMMIT").await;
    }
    Ok(Production {
        committed,
        bounds,
        produced,
        seconds,
    })
}

/// Each phase's figures: its latency rows, the most backlog sampled in it,
/// and the claims between its start and the next phase's (or `end_claims`).
fn phase_reports(
    phases: &[(&str, Duration)],
    production: &Production,
    end_claims: &ClaimSnapshot,
    times: &[Option<f64>],
    samples: &[(Instant, i64)],
    rate: u32,
) -> Vec<Phase> {
    let (committed, bounds) = (&production.committed, &production.bounds);
    let mut report_phases = Vec::new();
    for (i, (name, _)) in phases.iter().enumerate() {
        let (from, to, ref before, dead) = bounds[i];
        let after = bounds.get(i + 1).map_or(end_claims, |b| &b.2);
        let ms: Vec<f64> = committed
            .iter()
            .zip(times)
            .filter(|((_, at), _)| *at >= from && *at <= to)
            .filter_map(|(_, t)| *t)
            .collect();
        let max_backlog = samples
            .iter()
            .filter(|(at, _)| *at >= from && *at <= to)
            .map(|(_, n)| *n)
            .max()
            .unwrap_or(0);
        let (claims, mean, p99) = claims_between(before, after);
        report_phases.push(Phase {
            name: name.to_string(),
            seconds: (to - from).as_secs_f64(),
            latency: summarize(ms, 0.0),
            max_backlog_rows: max_backlog,
            max_backlog_seconds: max_backlog as f64 / f64::from(rate.max(1)),
            claims,
            claim_mean_ms: mean,
            claim_p99_ms: p99,
            empty_claims_per_row: (after.empty - before.empty) / (after.delivered - before.delivered).max(1.0),
            empty_fresh_claims_per_row: (after.empty_fresh - before.empty_fresh)
                / (after.delivered - before.delivered).max(1.0),
            dead_tuples: dead,
        });
    }
    report_phases
}

pub(super) fn print_sustained(r: &SustainedReport) {
    println!(
        "sustained {} rows/s asked, {:.0} reached, {}-row transactions, {} rows, {} relay(s), {} cores, listen active: {}",
        r.rate, r.produced_rate, r.rows_per_txn, r.produced_rows, r.relays, r.cores, r.listen_active
    );
    println!();
    println!(
        "| phase | s | latency rows | p50 ms | p99 ms | max ms | max backlog rows (s of production) | claims | claim mean ms | claim p99 ms (bucket) | empty claims per row (fresh lane's) | dead tuples at end |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for p in &r.phases {
        println!(
            "| {} | {:.0} | {} | {:.2} | {:.2} | {:.2} | {} ({:.2}) | {:.0} | {:.3} | ≤ {} | {:.4} ({:.4}) | {} |",
            p.name,
            p.seconds,
            p.latency.rows,
            p.latency.p50_ms,
            p.latency.p99_ms,
            p.latency.max_ms,
            p.max_backlog_rows,
            p.max_backlog_seconds,
            p.claims,
            p.claim_mean_ms,
            p.claim_p99_ms,
            p.empty_claims_per_row,
            p.empty_fresh_claims_per_row,
            p.dead_tuples
        );
    }
}
