//! `bench --journal-cost`: what the delivery journal costs the drain.
//! The same `--rows` drained by a relay with `journal.keep = "0s"` and by
//! one with `--journal-keep`, alternating (off, on, off, on, …) so drift
//! in the machine falls on both, and the ratio of the mean rates. The
//! shipped default follows it (docs/BENCHMARKS.md): on when the drain keeps
//! at least 0.9 of its rate.

use serde::Serialize;

use super::args::BenchArgs;
use super::error::{pg, BenchError};
use super::measure::{spawn_relay, wait_scheduled};
use super::scenarios::seed;
use super::scratch::{delete_prefix, open_scratch};
use crate::config::Config;

/// Drains of each kind.
const ROUNDS: usize = 3;

#[derive(Debug, Serialize)]
pub struct JournalCost {
    pub rows: i64,
    pub journal_keep: String,
    /// Rows/s of each drain with the journal off, in order.
    pub off_rows_per_sec: Vec<f64>,
    /// Rows/s of each drain with it on.
    pub on_rows_per_sec: Vec<f64>,
    /// Mean on ÷ mean off.
    pub ratio: f64,
    /// The journal's size after one drain with it on, bytes.
    pub journal_bytes: i64,
    pub cores: usize,
}

pub(super) async fn journal_cost(
    cfg: &Config,
    args: &BenchArgs,
    url: &str,
    prefix: &str,
) -> Result<JournalCost, BenchError> {
    crate::config::parse_duration(&args.journal_keep)
        .map_err(|e| BenchError::Usage(format!("bench: --journal-keep: {e}")))?;
    let (client, mut conn) = open_scratch(cfg, url).await?;
    eprintln!(
        "bench: journal cost: {} rows over {} jobs, drained {ROUNDS} times with journal.keep = \"0s\" and {ROUNDS} times with \"{}\", alternating",
        args.rows, args.jobs, args.journal_keep
    );
    let mut report = JournalCost {
        rows: args.rows,
        journal_keep: args.journal_keep.clone(),
        off_rows_per_sec: Vec::new(),
        on_rows_per_sec: Vec::new(),
        ratio: 0.0,
        journal_bytes: 0,
        cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
    };
    for round in 0..ROUNDS * 2 {
        let on = round % 2 == 1;
        let keep = if on {
            args.journal_keep.clone()
        } else {
            "0s".to_string()
        };
        seed(&client, args.rows, args.jobs, args.spread_run_at).await?;
        let env = [("OUTBOX_RELAY_JOURNAL__KEEP", keep.clone())];
        let mut relay = [spawn_relay(
            args.config.as_deref(),
            url,
            prefix,
            &env,
            args.relay_log.as_deref(),
        )?];
        let secs = wait_scheduled(&mut relay, &mut conn, prefix, args.jobs, args.rows, |_, _| {}).await?;
        drop(relay);
        let rps = args.rows as f64 / secs;
        eprintln!("bench: journal.keep = \"{keep}\": {rps:.0} rows/s ({secs:.1}s)");
        if on {
            report.journal_bytes = client
                .query_typed_one(
                    "SELECT coalesce(sum(pg_total_relation_size(inhrelid)), 0)::int8
                       FROM pg_inherits WHERE inhparent = 'outbox_relay_journal'::regclass",
                    &[],
                )
                .await
                .map_err(pg)?
                .get(0);
            report.on_rows_per_sec.push(rps);
        } else {
            report.off_rows_per_sec.push(rps);
        }
        // The next drain starts as this one did: empty schedules, an empty
        // journal, a vacuumed outbox.
        delete_prefix(&mut conn, prefix)
            .await
            .map_err(|e| BenchError::Redis(e.to_string()))?;
        client
            .batch_execute("TRUNCATE outbox_relay_journal; TRUNCATE task_outbox")
            .await
            .map_err(pg)?;
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    report.ratio = mean(&report.on_rows_per_sec) / mean(&report.off_rows_per_sec).max(1e-9);
    Ok(report)
}

pub(super) fn print(r: &JournalCost) {
    let list = |v: &[f64]| v.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(", ");
    println!("journal cost ({} rows, {} cores)", r.rows, r.cores);
    println!("  journal off:              {} rows/s", list(&r.off_rows_per_sec));
    println!(
        "  journal.keep = \"{}\": {} rows/s",
        r.journal_keep,
        list(&r.on_rows_per_sec)
    );
    println!("  on ÷ off:                 {:.3}", r.ratio);
    println!(
        "  journal after one drain:  {:.1} MiB ({:.0} bytes a row)",
        r.journal_bytes as f64 / 1_048_576.0,
        r.journal_bytes as f64 / r.rows.max(1) as f64
    );
}
