//! The delivery journal (`journal.keep`, #40): `records` holds what a tick
//! keeps of its deliveries and how the journal stays its size; `losses`
//! what happens when Redis loses data (a restart, a failover, a marker key
//! gone): the relay notices and writes the lost entries again, and
//! `outbox-relay reconcile` does it on demand. A cancelled job stays
//! cancelled; `journal.still_pending` keeps entries a consumer already
//! finished from coming back; `faults` what a reconcile does when Redis or
//! Postgres is frozen, stopped or refusing under it. This file holds what
//! they share.

use crate::common;

use std::collections::HashMap;
use std::time::Duration;

use redis::AsyncCommands;

use common::*;

mod faults;
mod losses;
mod records;

/// The journal on for an hour, watched at the shipped interval (5 s):
/// the promise of a repair within 30 s is tested as it ships.
pub const JOURNAL: &[(&str, &str)] = &[("OUTBOX_RELAY_JOURNAL__KEEP", "1h")];

pub fn with(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
    JOURNAL.iter().chain(extra).copied().collect()
}

pub async fn journal_rows(db: &TestDb) -> i64 {
    db.count("SELECT coalesce(sum(cardinality(outbox_ids)), 0)::int8 FROM outbox_relay_journal")
        .await
}

/// `outbox-relay reconcile ARGS --json`, its report.
pub fn reconcile(env: &[(String, String)], args: &[&str]) -> serde_json::Value {
    let mut all = vec!["reconcile", "--json"];
    all.extend_from_slice(args);
    let out = relay_command(&all, env).output().expect("reconcile");
    assert!(
        out.status.success(),
        "reconcile {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// Seed `rows` over `jobs` jobs, run a relay with the journal until they
/// are delivered and journaled, and return it with what Redis then holds.
pub async fn delivered(
    db: &TestDb,
    redis_url: &str,
    prefix: &str,
    rows: i64,
    extra: &[(&'static str, &'static str)],
) -> (RelayProcess, HashMap<String, f64>) {
    delivered_by(
        db,
        &relay_env(db, redis_url, prefix, &with(extra)),
        redis_url,
        prefix,
        rows,
    )
    .await
}

/// [`delivered`] by a relay started with `env` (another role, say).
pub async fn delivered_by(
    db: &TestDb,
    env: &[(String, String)],
    redis_url: &str,
    prefix: &str,
    rows: i64,
) -> (RelayProcess, HashMap<String, f64>) {
    seed(db, rows, 20).await;
    let mut relay = RelayProcess::spawn(env);
    relay.wait_started().await;
    wait_drained_by(db, Duration::from_secs(120), &relay).await;
    wait_until("every delivery journaled", Duration::from_secs(30), || async {
        journal_rows(db).await == rows
    })
    .await;
    let members = schedule_members(redis_url, prefix).await;
    assert_eq!(members.len() as i64, rows);
    (relay, members)
}

/// Until the watch has looked once and written its marker key.
pub async fn wait_for_marker(url: &str, prefix: &str) {
    wait_until("the marker key", Duration::from_secs(30), || async {
        let mut conn = redis_conn(url).await;
        conn.exists::<_, bool>(format!("{prefix}journal:marker"))
            .await
            .unwrap_or(false)
    })
    .await;
}
