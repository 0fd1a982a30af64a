//! The fleet (migration 7): every relay's heartbeat and its per-minute
//! aggregates, written by [`beat`] once per `health.interval` and read by
//! the console.
//!
//! One statement per relay per interval: it upserts the relay's row in
//! `outbox_relay_instances`, adds what the relay did since its last beat to
//! the current minute in `outbox_relay_minutes`, and forgets relays unseen
//! for a day and minutes older than a day (both by index). Times are the
//! database's clock, so relays on hosts with skewed clocks still line up.

use serde::Serialize;
use tokio_postgres::types::Type;
use tokio_postgres::GenericClient;

use super::error::{column, QueryError};

/// How long the fleet remembers a relay, and a minute of aggregates.
pub const RETENTION: &str = "1 day";

/// What a relay is: fixed for its lifetime.
#[derive(Debug, Clone)]
pub struct Instance {
    /// A random id per process start.
    pub id: String,
    pub host: String,
    pub version: String,
    /// Process start, unix seconds.
    pub started_at: f64,
    /// The settings that matter to an operator, as a JSON object.
    pub settings: String,
}

/// One heartbeat: the relay's state now and what it did since the last one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Beat {
    /// Counters since start, health and pause state, as a JSON object.
    pub counters: String,
    pub health: String,
    /// Rows delivered, retried and dead-lettered since the last beat.
    pub delivered: i64,
    pub retried: i64,
    pub dead_lettered: i64,
    /// Delivery lag observations since the last beat, per bucket of
    /// `telemetry::metrics::LAG_BUCKETS` (and one more for +Inf).
    pub lag_buckets: Vec<i64>,
}

/// Write one heartbeat (one statement).
pub async fn beat(client: &impl GenericClient, me: &Instance, b: &Beat) -> Result<(), QueryError> {
    client
        .execute_typed(
            "WITH instance AS (
                 INSERT INTO outbox_relay_instances
                        (instance_id, host, version, started_at, last_seen, settings, counters, health)
                 VALUES ($1, $2, $3, to_timestamp($4), now(), $5::text::jsonb, $6::text::jsonb, $7::text::jsonb)
                 ON CONFLICT (instance_id) DO UPDATE
                    SET last_seen = now(), settings = EXCLUDED.settings,
                        counters = EXCLUDED.counters, health = EXCLUDED.health),
             minute AS (
                 INSERT INTO outbox_relay_minutes AS m
                        (minute, instance_id, delivered, retried, dead_lettered, lag_buckets)
                 VALUES (date_trunc('minute', now()), $1, $8, $9, $10, $11)
                 ON CONFLICT (minute, instance_id) DO UPDATE
                    SET delivered = m.delivered + EXCLUDED.delivered,
                        retried = m.retried + EXCLUDED.retried,
                        dead_lettered = m.dead_lettered + EXCLUDED.dead_lettered,
                        lag_buckets = ARRAY(SELECT coalesce(a, 0) + coalesce(b, 0)
                                              FROM unnest(m.lag_buckets, EXCLUDED.lag_buckets) AS u(a, b))),
             forget_instances AS (
                 DELETE FROM outbox_relay_instances WHERE last_seen < now() - interval '1 day'),
             forget_minutes AS (
                 DELETE FROM outbox_relay_minutes WHERE minute < now() - interval '1 day')
             SELECT 1",
            &[
                (&me.id, Type::TEXT),
                (&me.host, Type::TEXT),
                (&me.version, Type::TEXT),
                (&me.started_at, Type::FLOAT8),
                (&me.settings, Type::TEXT),
                (&b.counters, Type::TEXT),
                (&b.health, Type::TEXT),
                (&b.delivered, Type::INT8),
                (&b.retried, Type::INT8),
                (&b.dead_lettered, Type::INT8),
                (&b.lag_buckets, Type::INT8_ARRAY),
            ],
        )
        .await?;
    Ok(())
}

/// A relay as the fleet table has it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Member {
    pub instance_id: String,
    pub host: String,
    pub version: String,
    /// RFC 3339, the database's clock.
    pub started_at: String,
    pub last_seen: String,
    /// Seconds since its last heartbeat, by the database's clock.
    pub seen_seconds_ago: f64,
    pub settings: serde_json::Value,
    pub counters: serde_json::Value,
    pub health: serde_json::Value,
}

/// Every relay seen in the last day, newest heartbeat first.
pub async fn members(client: &impl GenericClient) -> Result<Vec<Member>, QueryError> {
    let rows = client
        .query_typed(
            "SELECT instance_id, host, version,
                    to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                    to_char(last_seen AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                    extract(epoch FROM now() - last_seen)::float8,
                    settings::text, counters::text, health::text
               FROM outbox_relay_instances
              WHERE last_seen >= now() - interval '1 day'
              ORDER BY last_seen DESC, instance_id",
            &[],
        )
        .await?;
    const T: &str = "outbox_relay_instances";
    let json = |r, i| -> Result<serde_json::Value, QueryError> {
        let text: String = column(r, T, i)?;
        Ok(serde_json::from_str(&text).unwrap_or(serde_json::Value::Null))
    };
    rows.iter()
        .map(|r| {
            Ok(Member {
                instance_id: column(r, T, 0)?,
                host: column(r, T, 1)?,
                version: column(r, T, 2)?,
                started_at: column(r, T, 3)?,
                last_seen: column(r, T, 4)?,
                seen_seconds_ago: column(r, T, 5)?,
                settings: json(r, 6)?,
                counters: json(r, 7)?,
                health: json(r, 8)?,
            })
        })
        .collect()
}

/// One minute of the whole fleet.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Minute {
    /// Unix seconds of the minute's start.
    pub minute: i64,
    pub delivered: i64,
    pub retried: i64,
    pub dead_lettered: i64,
    /// Delivery lag observations per bucket, summed over the relays.
    pub lag_buckets: Vec<i64>,
}

/// The fleet's minutes of the last `minutes` minutes, oldest first (minutes
/// in which no relay beat are absent).
pub async fn minutes(client: &impl GenericClient, minutes: i32) -> Result<Vec<Minute>, QueryError> {
    let rows = client
        .query_typed(
            "SELECT extract(epoch FROM minute)::int8, sum(delivered)::int8, sum(retried)::int8,
                    sum(dead_lettered)::int8,
                    ARRAY(SELECT coalesce(sum(b), 0)::int8
                            FROM outbox_relay_minutes i, unnest(i.lag_buckets) WITH ORDINALITY AS u(b, n)
                           WHERE i.minute = o.minute
                           GROUP BY n ORDER BY n)
               FROM outbox_relay_minutes o
              WHERE minute >= date_trunc('minute', now()) - make_interval(mins => $1)
              GROUP BY minute
              ORDER BY minute",
            &[(&minutes, Type::INT4)],
        )
        .await?;
    const T: &str = "outbox_relay_minutes";
    rows.iter()
        .map(|r| {
            Ok(Minute {
                minute: column(r, T, 0)?,
                delivered: column(r, T, 1)?,
                retried: column(r, T, 2)?,
                dead_lettered: column(r, T, 3)?,
                lag_buckets: column(r, T, 4)?,
            })
        })
        .collect()
}

/// The `q` quantile (0..1) of a bucketed histogram, as the upper bound of
/// the bucket it falls in (`bounds[i]` for bucket `i`; the last bucket,
/// +Inf, reports the last bound). None without observations.
pub fn quantile(buckets: &[i64], bounds: &[f64], q: f64) -> Option<f64> {
    let total: i64 = buckets.iter().map(|b| (*b).max(0)).sum();
    if total == 0 {
        return None;
    }
    let rank = (q * total as f64).ceil().max(1.0) as i64;
    let mut seen = 0;
    for (i, b) in buckets.iter().enumerate() {
        seen += (*b).max(0);
        if seen >= rank {
            return Some(bounds.get(i).or(bounds.last()).copied().unwrap_or(0.0));
        }
    }
    bounds.last().copied()
}

#[cfg(test)]
mod tests {
    use super::quantile;

    #[test]
    fn quantile_is_the_bound_of_the_bucket_it_falls_in() {
        let bounds = [0.001, 0.01, 0.1];
        assert_eq!(quantile(&[0, 0, 0, 0], &bounds, 0.5), None);
        assert_eq!(quantile(&[98, 1, 1, 0], &bounds, 0.5), Some(0.001));
        assert_eq!(quantile(&[98, 1, 1, 0], &bounds, 0.99), Some(0.01));
        assert_eq!(quantile(&[98, 1, 0, 1], &bounds, 0.999), Some(0.1));
        assert_eq!(quantile(&[0, 0, 0, 5], &bounds, 0.5), Some(0.1));
    }
}
