//! What the console's pages and `/api/v1/` show, read from Postgres and
//! Redis, and the actions they take.
//!
//! No query scans `task_outbox`. The overview's backlog comes from the
//! freshest live relay's heartbeat, which carries the outbox probe that
//! relay runs anyway (`metrics.probe_interval`): exact, a few seconds old,
//! and free for the drain (a console refreshed every second costs it one
//! read of the fleet table). With no live relay reporting, counts walk the
//! claim index (`run_at, id`) and stop at [`CAP`] (shown as "more than
//! 10,000"). The total is the planner's estimate (labelled so), and per-job
//! figures are counted in the next [`CAP`] due (and delayed) rows in claim
//! order. Every statement runs on the console's own pool, under its
//! deadline.

use serde::Serialize;
use tokio_postgres::types::Type;
use tokio_postgres::Client;

use crate::db::dead_letter::{Extent, EXTENT_COLUMNS};
use crate::db::{column, fleet, ColumnError, QueryError};

/// Counts stop here; per-job figures are taken in this many rows.
pub const CAP: i64 = 10_000;

/// A count that may have stopped at [`CAP`].
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Default)]
pub struct Capped {
    pub count: i64,
    /// The true count is larger than `count`.
    pub more: bool,
}

impl Capped {
    /// A count that went all the way.
    pub fn exact(n: i64) -> Self {
        Capped { count: n, more: false }
    }

    fn of(n: i64) -> Self {
        Capped {
            count: n.min(CAP),
            more: n > CAP,
        }
    }

    /// "1,234" or "more than 10,000".
    pub fn text(&self) -> String {
        if self.more {
            format!("more than {}", thousands(self.count))
        } else {
            thousands(self.count)
        }
    }
}

/// A duration for a page: `ms`, `s`, `min` or `h`, one decimal.
pub fn seconds(s: f64) -> String {
    if s >= 3600.0 {
        format!("{:.1} h", s / 3600.0)
    } else if s >= 60.0 {
        format!("{:.1} min", s / 60.0)
    } else if s >= 1.0 {
        format!("{s:.1} s")
    } else {
        format!("{:.0} ms", s * 1000.0)
    }
}

/// 1234567 → "1,234,567".
pub fn thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

/// The overview's figures.
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct Overview {
    /// Rows due now.
    pub due: Capped,
    /// Rows due later (retries in backoff, delayed tasks).
    pub delayed: Capped,
    /// Rows set aside (`run_at = infinity`).
    pub set_aside: Capped,
    /// Seconds the first due row (in claim order) has been due.
    pub oldest_due_seconds: Option<f64>,
    /// The planner's estimate of `task_outbox`'s rows (`pg_class.reltuples`).
    pub outbox_rows_estimate: i64,
    pub dead_letters: Capped,
    /// Everything is paused (`outbox-relay pause`).
    pub paused_all: bool,
    /// Jobs paused one by one.
    pub paused_jobs: i64,
    /// Where the backlog figures come from.
    pub source: Source,
}

/// Who counted the overview's backlog.
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Source {
    /// The console, along the claim index, up to [`CAP`].
    #[default]
    Console,
    /// A relay's outbox probe, exact, carried by its heartbeat.
    Relay {
        instance_id: String,
        host: String,
        /// How old the figures are: the heartbeat's age plus the probe's
        /// age when the heartbeat was written.
        age_seconds: f64,
    },
}

/// The freshest outbox probe a live relay's heartbeat carries, if it is
/// younger than `max_age` (a relay whose probe fails carries none).
fn freshest_probe(fleet: &Fleet, max_age: std::time::Duration) -> Option<(&fleet::Member, &serde_json::Value, f64)> {
    fleet
        .live
        .iter()
        .filter_map(|m| {
            let p = m.counters.get("outbox").filter(|p| p.is_object())?;
            let age = m.seen_seconds_ago + p.get("probed_seconds_ago")?.as_f64()?;
            Some((m, p, age))
        })
        .filter(|(_, _, age)| *age <= max_age.as_secs_f64())
        .min_by(|a, b| a.2.total_cmp(&b.2))
}

/// The overview from the freshest live relay's probe (see the module's
/// notes), reading only the planner's estimate and the pause table here;
/// None when no live relay carries one younger than `max_age`.
pub async fn overview_from_fleet(
    c: &Client,
    fleet: &Fleet,
    max_age: std::time::Duration,
) -> Result<Option<Overview>, QueryError> {
    let Some((m, p, age)) = freshest_probe(fleet, max_age) else {
        return Ok(None);
    };
    let n = |k: &str| p.get(k).and_then(|v| v.as_i64());
    let (Some(due), Some(delayed), Some(set_aside), Some(dead)) =
        (n("due"), n("delayed"), n("set_aside"), n("dead_letters"))
    else {
        return Ok(None);
    };
    let r = c
        .query_typed_one(
            "SELECT (SELECT greatest(reltuples, 0)::int8 FROM pg_class WHERE oid = 'task_outbox'::regclass),
                    (SELECT count(*) FILTER (WHERE scope = '*') > 0 FROM outbox_relay_pause),
                    (SELECT count(*) FILTER (WHERE scope <> '*') FROM outbox_relay_pause)",
            &[],
        )
        .await?;
    const T: &str = "outbox_relay_pause";
    Ok(Some(Overview {
        due: Capped::exact(due),
        delayed: Capped::exact(delayed),
        set_aside: Capped::exact(set_aside),
        oldest_due_seconds: p.get("oldest_due_seconds").and_then(|v| v.as_f64()),
        outbox_rows_estimate: column::<Option<i64>>(&r, T, 0)?.unwrap_or(0),
        dead_letters: Capped::exact(dead),
        paused_all: column(&r, T, 1)?,
        paused_jobs: column(&r, T, 2)?,
        source: Source::Relay {
            instance_id: m.instance_id.clone(),
            host: m.host.clone(),
            age_seconds: age,
        },
    }))
}

pub async fn overview(c: &Client) -> Result<Overview, QueryError> {
    let cap = CAP + 1;
    let r = c
        .query_typed_one(
            "SELECT (SELECT count(*) FROM (SELECT 1 FROM task_outbox WHERE run_at <= now() LIMIT $1) s),
                    (SELECT count(*) FROM (SELECT 1 FROM task_outbox
                                            WHERE run_at > now() AND run_at < 'infinity' LIMIT $1) s),
                    (SELECT count(*) FROM (SELECT 1 FROM task_outbox WHERE run_at = 'infinity' LIMIT $1) s),
                    (SELECT extract(epoch FROM now() - run_at)::float8 FROM task_outbox
                      WHERE run_at > '-infinity' AND run_at <= now() ORDER BY run_at, id LIMIT 1),
                    (SELECT greatest(reltuples, 0)::int8 FROM pg_class WHERE oid = 'task_outbox'::regclass),
                    (SELECT count(*) FROM (SELECT 1 FROM task_outbox_dead LIMIT $1) s),
                    (SELECT count(*) FILTER (WHERE scope = '*') > 0 FROM outbox_relay_pause),
                    (SELECT count(*) FILTER (WHERE scope <> '*') FROM outbox_relay_pause)",
            &[(&cap, Type::INT8)],
        )
        .await?;
    const T: &str = "task_outbox";
    Ok(Overview {
        due: Capped::of(column(&r, T, 0)?),
        delayed: Capped::of(column(&r, T, 1)?),
        set_aside: Capped::of(column(&r, T, 2)?),
        oldest_due_seconds: column::<Option<f64>>(&r, T, 3)?.map(|s| s.max(0.0)),
        outbox_rows_estimate: column::<Option<i64>>(&r, T, 4)?.unwrap_or(0),
        dead_letters: Capped::of(column(&r, T, 5)?),
        paused_all: column(&r, T, 6)?,
        paused_jobs: column(&r, T, 7)?,
        source: Source::Console,
    })
}

/// One job as the jobs page lists it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Job {
    pub job_id: String,
    /// Of the next [`CAP`] due rows, this job's.
    pub due_in_sample: i64,
    /// Of the next [`CAP`] delayed rows, this job's.
    pub delayed_in_sample: i64,
    pub dead_letters: i64,
    pub paused: bool,
    /// ZCARD of its schedule; None when Redis could not say.
    pub schedule_size: Option<i64>,
}

/// Jobs with due or delayed rows (in the next [`CAP`] of each), dead
/// letters, a pause, or an active status in `jobs`; at most 200, most due
/// first.
pub async fn jobs(c: &Client) -> Result<Vec<Job>, QueryError> {
    let rows = c
        .query_typed(
            "WITH due AS (SELECT job_id::text AS j, count(*) AS n
                            FROM (SELECT job_id FROM task_outbox WHERE run_at <= now()
                                   ORDER BY run_at, id LIMIT $1) s GROUP BY 1),
                  later AS (SELECT job_id::text AS j, count(*) AS n
                              FROM (SELECT job_id FROM task_outbox
                                     WHERE run_at > now() AND run_at < 'infinity'
                                     ORDER BY run_at, id LIMIT $1) s GROUP BY 1),
                  dead AS (SELECT job_id::text AS j, count(*) AS n FROM task_outbox_dead GROUP BY 1),
                  paused AS (SELECT scope AS j FROM outbox_relay_pause WHERE scope <> '*'),
                  active AS (SELECT id::text AS j FROM jobs
                              WHERE status IN ('pending', 'initialising', 'running', 'paused')
                              ORDER BY id LIMIT 200),
                  every_job AS (SELECT j FROM due UNION SELECT j FROM later UNION SELECT j FROM dead
                                UNION SELECT j FROM paused UNION SELECT j FROM active)
             SELECT e.j, coalesce(due.n, 0), coalesce(later.n, 0), coalesce(dead.n, 0), paused.j IS NOT NULL
               FROM every_job e
               LEFT JOIN due USING (j) LEFT JOIN later USING (j)
               LEFT JOIN dead USING (j) LEFT JOIN paused USING (j)
              ORDER BY 2 DESC, 3 DESC, 4 DESC, 1
              LIMIT 200",
            &[(&CAP, Type::INT8)],
        )
        .await?;
    const T: &str = "task_outbox";
    rows.iter()
        .map(|r| {
            Ok(Job {
                job_id: column(r, T, 0)?,
                due_in_sample: column(r, T, 1)?,
                delayed_in_sample: column(r, T, 2)?,
                dead_letters: column(r, T, 3)?,
                paused: column(r, T, 4)?,
                schedule_size: None,
            })
        })
        .collect::<Result<_, ColumnError>>()
        .map_err(QueryError::from)
}

/// A job's counts for the cancel confirmation, without scanning the
/// outbox: its rows among the next [`CAP`] due and delayed rows, and its
/// dead letters (by their `job_id` index). The cancel's result line gives
/// the exact number of rows it deleted.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct JobCounts {
    pub due_in_sample: i64,
    pub delayed_in_sample: i64,
    pub dead_letters: Capped,
}

pub async fn job_counts(c: &Client, job: &str) -> Result<JobCounts, QueryError> {
    let cap = CAP + 1;
    let r = c
        .query_typed_one(
            "SELECT (SELECT count(*) FILTER (WHERE job_id::text = $1)
                       FROM (SELECT job_id FROM task_outbox WHERE run_at <= now() ORDER BY run_at, id LIMIT $3) s),
                    (SELECT count(*) FILTER (WHERE job_id::text = $1)
                       FROM (SELECT job_id FROM task_outbox WHERE run_at > now() AND run_at < 'infinity'
                              ORDER BY run_at, id LIMIT $3) s),
                    (SELECT count(*) FROM (SELECT 1 FROM task_outbox_dead WHERE job_id::text = $1 LIMIT $2) s)",
            &[(&job, Type::TEXT), (&cap, Type::INT8), (&CAP, Type::INT8)],
        )
        .await?;
    Ok(JobCounts {
        due_in_sample: column(&r, "task_outbox", 0)?,
        delayed_in_sample: column(&r, "task_outbox", 1)?,
        dead_letters: Capped::of(column(&r, "task_outbox_dead", 2)?),
    })
}

/// Every column of one dead letter, as text (NULL as None), in table order.
pub async fn dead_letter(c: &Client, id: i64) -> Result<Option<Vec<(String, Option<String>)>>, QueryError> {
    let rows = c
        .query_typed(
            "SELECT a.attname::text, (to_jsonb(d) ->> a.attname::text)
               FROM task_outbox_dead d
               JOIN pg_attribute a ON a.attrelid = 'task_outbox_dead'::regclass AND a.attnum > 0 AND NOT a.attisdropped
              WHERE d.id = $1
              ORDER BY a.attnum",
            &[(&id, Type::INT8)],
        )
        .await?;
    if rows.is_empty() {
        return Ok(None);
    }
    rows.iter()
        .map(|r| Ok((column(r, "task_outbox_dead", 0)?, column(r, "task_outbox_dead", 1)?)))
        .collect::<Result<Vec<_>, ColumnError>>()
        .map(Some)
        .map_err(QueryError::from)
}

/// Dead letters matching `filter`, counted up to [`CAP`].
pub async fn dead_letters_matching(c: &Client, f: &crate::db::dead_letter::Filter) -> Result<Capped, QueryError> {
    let cap = CAP + 1;
    let since = f.since.map(|d| d.as_millis().min(i64::MAX as u128) as i64);
    let r = c
        .query_typed_one(
            "SELECT count(*) FROM (SELECT 1 FROM task_outbox_dead
                                    WHERE ($1::text IS NULL OR job_id::text = $1)
                                      AND ($2::int8 IS NULL OR dead_lettered_at >= now() - $2 * interval '1 millisecond')
                                      AND ($3::text IS NULL OR strpos(last_error, $3) > 0)
                                    LIMIT $4) s",
            &[
                (&f.job, Type::TEXT),
                (&since, Type::INT8),
                (&f.error, Type::TEXT),
                (&cap, Type::INT8),
            ],
        )
        .await?;
    Ok(Capped::of(column(&r, "task_outbox_dead", 0)?))
}

/// A row set aside (`run_at = infinity`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SetAside {
    pub id: i64,
    pub task_id: String,
    pub job_id: String,
    pub attempts: i32,
    pub created_at: String,
}

/// The first 200 rows set aside (of `job`, or all), oldest id first (by
/// the claim index).
pub async fn set_aside(c: &Client, job: Option<&str>) -> Result<Vec<SetAside>, QueryError> {
    let rows = c
        .query_typed(
            "SELECT id, task_id::text, job_id::text, attempts,
                    to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')
               FROM task_outbox WHERE run_at = 'infinity' AND ($1::text IS NULL OR job_id::text = $1)
              ORDER BY run_at, id LIMIT 200",
            &[(&job, Type::TEXT)],
        )
        .await?;
    const T: &str = "task_outbox";
    rows.iter()
        .map(|r| {
            Ok(SetAside {
                id: column(r, T, 0)?,
                task_id: column(r, T, 1)?,
                job_id: column(r, T, 2)?,
                attempts: column(r, T, 3)?,
                created_at: column(r, T, 4)?,
            })
        })
        .collect::<Result<_, ColumnError>>()
        .map_err(QueryError::from)
}

/// The [`Extent`] of the rows set aside (of `job`, or all): what the
/// requeue form carries.
pub async fn set_aside_extent(c: &Client, job: Option<&str>) -> Result<Extent, QueryError> {
    let r = c
        .query_typed_one(
            &format!(
                "SELECT {EXTENT_COLUMNS} FROM task_outbox
                  WHERE run_at = 'infinity' AND ($1::text IS NULL OR job_id::text = $1)"
            ),
            &[(&job, Type::TEXT)],
        )
        .await?;
    Ok(Extent::from_row(&r, "task_outbox")?)
}

/// What a set-aside requeue did.
#[derive(Debug, Clone, PartialEq)]
pub enum SetAsideRequeue {
    /// These many rows are due again.
    Done(u64),
    /// The rows set aside are no longer the confirmed ones: nothing changed.
    Changed(Extent),
}

/// Make the rows set aside (of `job`, or all) due now with their attempts
/// reset, if they are exactly the `confirmed` ones; in one transaction
/// that locks them first, so no row set aside meanwhile is touched, and
/// none that was shown is missed. (Set-aside rows are never claimed: the
/// locks block no relay.)
pub async fn requeue_set_aside(
    c: &mut Client,
    job: Option<&str>,
    confirmed: &Extent,
) -> Result<SetAsideRequeue, QueryError> {
    let tx = c.transaction().await?;
    let r = tx
        .query_typed_one(
            &format!(
                "WITH locked AS (SELECT id FROM task_outbox
                                  WHERE run_at = 'infinity' AND ($1::text IS NULL OR job_id::text = $1)
                                  ORDER BY id FOR UPDATE)
                 SELECT {EXTENT_COLUMNS}, coalesce(array_agg(id), '{{}}') FROM locked"
            ),
            &[(&job, Type::TEXT)],
        )
        .await?;
    let now = Extent::from_row(&r, "task_outbox")?;
    if &now != confirmed {
        tx.rollback().await?;
        return Ok(SetAsideRequeue::Changed(now));
    }
    let ids: Vec<i64> = column(&r, "task_outbox", 3)?;
    let n = tx
        .execute_typed(
            "UPDATE task_outbox SET run_at = now(), attempts = 0 WHERE id = ANY($1) AND run_at = 'infinity'",
            &[(&ids, Type::INT8_ARRAY)],
        )
        .await?;
    tx.commit().await?;
    Ok(SetAsideRequeue::Done(n))
}

/// The fleet: relays seen within `stale_after` are live, others stale.
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct Fleet {
    pub live: Vec<fleet::Member>,
    pub stale: Vec<fleet::Member>,
}

pub async fn fleet(c: &Client, stale_after: std::time::Duration) -> Result<Fleet, QueryError> {
    let (live, stale) = fleet::members(c)
        .await?
        .into_iter()
        .partition(|m| m.seen_seconds_ago <= stale_after.as_secs_f64());
    Ok(Fleet { live, stale })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_read_with_separators_and_caps() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1234567), "1,234,567");
        assert_eq!(thousands(-1234), "-1,234");
        assert_eq!(Capped::of(12).text(), "12");
        assert_eq!(Capped::of(CAP).text(), "10,000");
        assert_eq!(Capped::of(CAP + 1).text(), "more than 10,000");
        assert_eq!(Capped::exact(30_000).text(), "30,000");
    }

    fn member(id: &str, seen: f64, counters: serde_json::Value) -> fleet::Member {
        fleet::Member {
            instance_id: id.into(),
            host: "h".into(),
            version: "v".into(),
            started_at: String::new(),
            last_seen: String::new(),
            seen_seconds_ago: seen,
            settings: serde_json::json!({}),
            counters,
            health: serde_json::json!({}),
        }
    }

    #[test]
    fn the_freshest_live_probe_is_taken_and_old_or_missing_ones_are_not() {
        use serde_json::json;
        let probe = |ago: f64| json!({"outbox": {"due": 1, "probed_seconds_ago": ago}});
        let max = std::time::Duration::from_secs(15);
        let fleet = Fleet {
            live: vec![
                member("old", 1.0, probe(20.0)),
                member("none", 0.0, json!({"outbox": null})),
                member("b", 3.0, probe(1.0)),
                member("a", 1.0, probe(2.5)),
            ],
            stale: vec![member("stale", 0.0, probe(0.0))],
        };
        let (m, _, age) = freshest_probe(&fleet, max).expect("a probe");
        assert_eq!((m.instance_id.as_str(), age), ("a", 3.5));
        let none = Fleet {
            live: vec![member("old", 1.0, probe(20.0)), member("none", 0.0, json!({}))],
            stale: vec![],
        };
        assert!(freshest_probe(&none, max).is_none());
    }
}
