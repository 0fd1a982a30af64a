//! What the pages and the API show, loaded: the overview with Redis's
//! memory, the per-minute points, the jobs with their schedule sizes, one
//! schedule page, the dead letters matching a filter, the rows set aside.
//! Each load runs under `console.statement_timeout` (`Console::read`) or
//! the same bound on Redis.
//!
//! The dead-letter filter is read here once and canonicalised once
//! ([`FilterForm::filter`]): the count, the list, the confirmation and
//! the action all see the same job id.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::data::{self, Overview};
use super::error::ConsoleError;
use super::state::Console;
use crate::db::dead_letter::{self as dl, Filter};
use crate::db::fleet;
use crate::telemetry::metrics::LAG_BUCKETS;

/// Schedule entries per page.
pub const SCHEDULE_PAGE: isize = 50;

#[derive(Serialize)]
pub(crate) struct OverviewData {
    pub overview: Overview,
    /// used_memory / maxmemory (the fullest master in a cluster); None
    /// without a limit or when Redis did not answer.
    pub redis_memory_ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_error: Option<String>,
    pub relays_live: usize,
    pub relays_stale: usize,
    /// The relays themselves, for the page (the API has `/api/v1/fleet`).
    #[serde(skip)]
    pub fleet: data::Fleet,
}

pub(crate) async fn load_overview(st: &Console) -> Result<OverviewData, ConsoleError> {
    let stale_after = st.stale_after;
    let (overview, fleet) = st
        .read(async |c| {
            let fleet = data::fleet(c, stale_after).await?;
            // A relay's probe of a big outbox rests up to a minute between
            // counts (`probe_spacing`): still the freshest exact figures,
            // and the page names their age.
            let probe_max_age = stale_after + crate::telemetry::metrics::PROBE_SPACING_MAX;
            let overview = match data::overview_from_fleet(c, &fleet, probe_max_age).await? {
                Some(o) => o,
                None => data::overview(c).await?,
            };
            Ok((overview, fleet))
        })
        .await?;
    let (redis_memory_ratio, redis_error) = match redis_memory(st).await {
        Ok(r) => (r, None),
        Err(e) => (None, Some(e.to_string())),
    };
    Ok(OverviewData {
        overview,
        redis_memory_ratio,
        redis_error,
        relays_live: fleet.live.len(),
        relays_stale: fleet.stale.len(),
        fleet,
    })
}

async fn redis_memory(st: &Console) -> Result<Option<f64>, ConsoleError> {
    use crate::redis::memory::{info_on_masters, Memory};
    let conn = st.redis().await?;
    let deadline = crate::deadline::Deadline::after(st.timeout);
    let texts: Vec<String> = match &conn {
        crate::redis::DirectConn::Standalone(c) => {
            let mut c = c.clone();
            let cmd = ::redis::cmd("INFO").arg("memory").to_owned();
            let reply: Result<String, _> = match deadline.run("redis INFO", cmd.query_async(&mut c)).await {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match reply {
                Ok(t) => vec![t],
                Err(e) => {
                    st.redis_failed().await;
                    return Err(ConsoleError::Redis(e));
                }
            }
        }
        crate::redis::DirectConn::Cluster(c) => match info_on_masters(c, "memory", deadline).await {
            Ok(all) => all.into_iter().filter_map(|(_, t)| t.ok()).collect(),
            Err(e) => {
                st.redis_failed().await;
                return Err(ConsoleError::Redis(e.to_string()));
            }
        },
    };
    Ok(texts
        .iter()
        .filter_map(|t| Memory::parse(t)?.ratio())
        .fold(None, |m: Option<f64>, r| Some(m.map_or(r, |m| m.max(r)))))
}

/// The fleet's minutes of the last `span` minutes, folded into points of
/// `step` minutes (a day: 10-minute points).
#[derive(Serialize)]
pub(crate) struct Point {
    pub minute: i64,
    pub delivered: i64,
    pub retried: i64,
    pub dead_lettered: i64,
    pub lag_p50_seconds: Option<f64>,
    pub lag_p99_seconds: Option<f64>,
}

pub(crate) fn points(minutes: &[fleet::Minute], now_minute: i64, span: i64, step: i64) -> Vec<Point> {
    let start = now_minute - (span - 1) * 60;
    let n = (span / step) as usize;
    let mut sums: Vec<(i64, i64, i64, Vec<i64>)> = vec![(0, 0, 0, vec![0; LAG_BUCKETS.len() + 1]); n];
    let mut seen = vec![false; n];
    for m in minutes {
        if m.minute < start || m.minute > now_minute {
            continue;
        }
        let i = (((m.minute - start) / 60) / step) as usize;
        if let Some(s) = sums.get_mut(i) {
            seen[i] = true;
            s.0 += m.delivered;
            s.1 += m.retried;
            s.2 += m.dead_lettered;
            for (a, b) in s.3.iter_mut().zip(&m.lag_buckets) {
                *a += b;
            }
        }
    }
    sums.into_iter()
        .enumerate()
        .map(|(i, (d, r, x, lag))| Point {
            minute: start + i as i64 * step * 60,
            delivered: d,
            retried: r,
            dead_lettered: x,
            lag_p50_seconds: if seen[i] {
                fleet::quantile(&lag, LAG_BUCKETS, 0.5)
            } else {
                None
            },
            lag_p99_seconds: if seen[i] {
                fleet::quantile(&lag, LAG_BUCKETS, 0.99)
            } else {
                None
            },
        })
        .collect()
}

#[derive(Serialize)]
pub(crate) struct Minutes {
    pub hour: Vec<Point>,
    pub day: Vec<Point>,
}

pub(crate) async fn load_minutes(st: &Console) -> Result<Minutes, ConsoleError> {
    let (minutes, now) = st
        .read(async |c| {
            let now: i64 = c
                .query_one("SELECT extract(epoch FROM date_trunc('minute', now()))::int8", &[])
                .await
                .map_err(|e| ConsoleError::Postgres(crate::db::pg_error_text(&e)))?
                .get(0);
            Ok((fleet::minutes(c, 24 * 60).await?, now))
        })
        .await?;
    Ok(Minutes {
        hour: points(&minutes, now, 60, 1),
        day: points(&minutes, now, 24 * 60, 10),
    })
}

pub(crate) async fn load_jobs(st: &Console) -> Result<(Vec<data::Job>, Option<String>), ConsoleError> {
    let mut jobs = st.read(async |c| Ok(data::jobs(c).await?)).await?;
    let keys: Vec<String> = jobs
        .iter()
        .map(|j| crate::domain::schedule_key(&st.redis_cfg.key_prefix, &j.job_id))
        .collect();
    let mut redis_error = None;
    match st.redis().await {
        Ok(conn) => {
            let sizes =
                tokio::time::timeout(st.timeout, crate::redis::keys::per_key::<i64>(&conn, "ZCARD", &keys)).await;
            match sizes {
                Ok(sizes) => {
                    for (j, s) in jobs.iter_mut().zip(sizes) {
                        match s {
                            Ok(n) => j.schedule_size = Some(n),
                            Err(e) => redis_error = Some(e.to_string()),
                        }
                    }
                }
                Err(_) => redis_error = Some(format!("ZCARD took longer than {:?}", st.timeout)),
            }
        }
        Err(e) => redis_error = Some(e.to_string()),
    }
    if redis_error.is_some() {
        st.redis_failed().await;
    }
    Ok((jobs, redis_error))
}

/// `?job=…&offset=…` of a schedule page.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ScheduleQuery {
    pub job: String,
    #[serde(default)]
    pub offset: isize,
}

/// `?offset=…` of the API's schedule (the job is in its path).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PageQuery {
    #[serde(default)]
    pub offset: isize,
}

/// One schedule entry: its score as a time, and the member's fields.
#[derive(Serialize)]
pub(crate) struct Entry {
    pub score_ms: f64,
    pub at: String,
    pub member: String,
}

#[derive(Serialize)]
pub(crate) struct ScheduleData {
    pub job_id: String,
    pub key: String,
    pub size: i64,
    pub offset: isize,
    pub entries: Vec<Entry>,
}

/// RFC 3339 (UTC, milliseconds) of unix milliseconds.
fn rfc3339_ms(ms: f64) -> String {
    if !ms.is_finite() {
        return format!("{ms}");
    }
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0.0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

pub(crate) async fn load_schedule(st: &Console, job: &str, offset: isize) -> Result<ScheduleData, ConsoleError> {
    let key = crate::domain::schedule_key(&st.redis_cfg.key_prefix, job);
    // A sorted set holds at most 2^32 - 1 members: past that every page
    // is empty, and the arithmetic on the offset (here and in the pager)
    // cannot overflow, whatever a query string says.
    let offset = offset.clamp(0, u32::MAX as isize);
    let mut conn = st.redis().await?;
    let read = async {
        let size: i64 = ::redis::cmd("ZCARD").arg(&key).query_async(&mut conn).await?;
        let page: Vec<(String, f64)> = ::redis::cmd("ZRANGE")
            .arg(&key)
            .arg(offset)
            .arg(offset + SCHEDULE_PAGE - 1)
            .arg("WITHSCORES")
            .query_async(&mut conn)
            .await?;
        Ok::<_, ::redis::RedisError>((size, page))
    };
    let (size, page) = match tokio::time::timeout(st.timeout, read).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            st.redis_failed().await;
            return Err(ConsoleError::Redis(format!("{key}: {e}")));
        }
        Err(_) => {
            st.redis_failed().await;
            return Err(ConsoleError::Redis(format!("{key}: no answer within {:?}", st.timeout)));
        }
    };
    Ok(ScheduleData {
        job_id: job.to_string(),
        key,
        size,
        offset,
        entries: page
            .into_iter()
            .map(|(member, score)| Entry {
                score_ms: score,
                at: rfc3339_ms(score),
                member,
            })
            .collect(),
    })
}

/// The dead-letter filter as forms and query strings spell it; a
/// parameter it does not know is refused (`body::query`).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FilterForm {
    #[serde(default)]
    pub job: String,
    #[serde(default)]
    pub error: String,
    /// Dead-lettered within this long (`1h`, `7d`); empty: any age.
    #[serde(default)]
    pub within: String,
}

impl FilterForm {
    /// Whether it names no row in particular (every dead letter). A job
    /// id or error text is taken exactly as given, spaces included: a
    /// TEXT job id may begin or end with one, or be nothing else.
    pub fn is_empty(&self) -> bool {
        self.job.is_empty() && self.error.is_empty() && self.within.trim().is_empty()
    }

    /// The filter the queries run, its job id in the form
    /// `task_outbox_dead.job_id` stores (lower-case for a UUID column;
    /// an id the column cannot hold is kept and matches nothing). The one
    /// place a dead-letter job id is canonicalised.
    pub fn filter(&self, schema: &crate::db::schema::Schema) -> Result<Filter, ConsoleError> {
        let some = |s: &str| (!s.is_empty()).then(|| s.to_string());
        let within = self.within.trim();
        let since = match (!within.is_empty()).then_some(within) {
            Some(w) => Some(
                crate::config::parse_duration(w).map_err(|e| ConsoleError::BadRequest(format!("within {w:?}: {e}")))?,
            ),
            None => None,
        };
        Ok(Filter {
            job: some(&self.job).map(|j| schema.dead_job_id.stored_form(&j).unwrap_or(j)),
            since,
            error: some(&self.error),
        })
    }

    /// "job …, error contains …" for audit lines and confirmations.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.job.is_empty() {
            parts.push(format!("job {:?}", self.job));
        }
        if !self.error.is_empty() {
            parts.push(format!("error contains {:?}", self.error));
        }
        if !self.within.trim().is_empty() {
            parts.push(format!("dead-lettered within {}", self.within.trim()));
        }
        if parts.is_empty() {
            "every dead letter".into()
        } else {
            parts.join(", ")
        }
    }

    /// The list page of this filter.
    pub fn page(&self) -> String {
        super::paths::with_query(
            super::paths::DEAD_LETTERS,
            &[
                ("job", &self.job),
                ("error", &self.error),
                ("within", self.within.trim()),
            ],
        )
    }
}

#[derive(Serialize)]
pub(crate) struct DeadLettersData {
    pub matching: data::Capped,
    pub rows: Vec<dl::DeadRow>,
}

pub(crate) async fn load_dead_letters(st: &Console, f: &FilterForm) -> Result<DeadLettersData, ConsoleError> {
    let filter = f.filter(&st.schema)?;
    let schema = st.schema.clone();
    st.read(async |c| {
        Ok(DeadLettersData {
            matching: data::dead_letters_matching(c, &filter).await?,
            rows: dl::list(c, &schema, &filter, 100).await?,
        })
    })
    .await
}

/// What a bulk action's confirmation shows and its form carries: the rows
/// matching, counted exactly however many, the highest id among them, and
/// the fingerprint of their id set. The action refuses to run (409) unless
/// exactly those rows match when it starts, and never touches a row above
/// that id.
pub(crate) use crate::db::dead_letter::Extent;

pub(crate) async fn dead_letters_extent(st: &Console, f: &FilterForm) -> Result<Extent, ConsoleError> {
    let filter = f.filter(&st.schema)?;
    let schema = st.schema.clone();
    st.read(async |c| Ok(dl::extent(c, &schema, &filter).await?)).await
}

/// A set-aside filter: a job id, or every set-aside row.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SetAsideQuery {
    #[serde(default)]
    pub job: String,
}

impl SetAsideQuery {
    /// The job id in the form `task_outbox.job_id::text` gives back, or
    /// None for every job.
    pub fn job(&self, schema: &crate::db::schema::Schema) -> Option<String> {
        let j = &self.job;
        (!j.is_empty()).then(|| schema.outbox_job_id.stored_form(j).unwrap_or_else(|| j.to_string()))
    }
}

#[derive(Serialize)]
pub(crate) struct SetAsideData {
    pub extent: Extent,
    pub rows: Vec<data::SetAside>,
}

pub(crate) async fn load_set_aside(st: &Console, q: &SetAsideQuery) -> Result<SetAsideData, ConsoleError> {
    let job = q.job(&st.schema);
    st.read(async |c| {
        Ok(SetAsideData {
            extent: data::set_aside_extent(c, job.as_deref()).await?,
            rows: data::set_aside(c, job.as_deref()).await?,
        })
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minutes_fold_into_points_with_gaps() {
        let m = |minute, delivered| fleet::Minute {
            minute,
            delivered,
            retried: 0,
            dead_lettered: 0,
            lag_buckets: vec![delivered; LAG_BUCKETS.len() + 1],
        };
        let now = 600 * 60;
        let p = points(&[m(now - 120, 5), m(now, 7)], now, 60, 1);
        assert_eq!(p.len(), 60);
        assert_eq!(p[59].minute, now);
        assert_eq!(p[59].delivered, 7);
        assert_eq!(p[57].delivered, 5);
        assert_eq!(p[58].lag_p50_seconds, None, "no relay beat: a gap");
        assert!(p[59].lag_p50_seconds.is_some());
        let day = points(&[m(now - 120, 5), m(now, 7)], now, 24 * 60, 10);
        assert_eq!(day.len(), 144);
        assert_eq!(day[143].delivered, 12, "the last ten minutes hold both");
    }
}
