//! The schedule member: byte-compatible with the existing consumers.
//!
//! 11 fields joined by `|`:
//! `task_id|job_id|page_id|host|path|priority|retry_count|source_type|source_url|task_type|lighthouse_run_id`
//! with the priority printed with exactly four decimals, an empty `task_type`
//! written as `crawl` and a NULL `lighthouse_run_id` as `0`. A field that
//! contains `|` cannot be encoded without corrupting every field after it, so
//! it is an [`EncodeError`] that names the field; the sweep dead-letters such
//! a row at once instead of writing it.

use std::fmt::Write;

use super::outcome::{RowOutcome, ScheduleEntry};
use super::row::OutboxRow;

/// Why a row cannot become a schedule member. These are the row's fault:
/// retrying cannot help, so the row is dead-lettered immediately.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EncodeError {
    #[error("field {field} contains the separator '|' and cannot be encoded")]
    SeparatorInField { field: &'static str },
    #[error("field priority is not a finite number ({value})")]
    NonFinitePriority { value: f64 },
    #[error("field run_at is -infinity, which is no time to schedule at (a score would be {run_at_ms})")]
    RunAtNotATime { run_at_ms: i64 },
}

/// The earliest finite time Postgres stores (4713-11-24 BC, julian day 0),
/// in unix milliseconds. A claimed `run_at` below it is `-infinity`.
pub const EARLIEST_RUN_AT_MS: i64 = -210_866_803_200_000;

/// The sorted-set key of a job's schedule: `{prefix}sched:{job_id}`.
pub fn schedule_key(prefix: &str, job_id: &str) -> String {
    let mut key = String::with_capacity(prefix.len() + 6 + job_id.len());
    key.push_str(prefix);
    key.push_str("sched:");
    key.push_str(job_id);
    key
}

/// The part of `key` Redis Cluster hashes: the content of its first
/// `{…}` when that is non-empty, else the whole key.
pub fn hash_tag(key: &str) -> &str {
    if let Some(open) = key.find('{') {
        if let Some(len) = key[open + 1..].find('}') {
            if len > 0 {
                return &key[open + 1..open + 1 + len];
            }
        }
    }
    key
}

/// The Redis Cluster hash slot of `key`: CRC16 (XMODEM) of its
/// [`hash_tag`], mod 16384.
pub fn hash_slot(key: &str) -> u16 {
    let mut crc: u16 = 0;
    for &b in hash_tag(key).as_bytes() {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

/// The cancel fence of the job whose schedule is `schedule_key`: a key of
/// its own per job, in the schedule key's cluster slot. `cancel-job` writes
/// it; every schedule write checks it in the same script, so no ZADD sent
/// before the cancel (and executed after it) can recreate the schedule. A
/// script touching both keys needs them in one slot.
///
/// `config` refuses a prefix whose braces are not non-empty `{tags}`, so a
/// schedule key's hash tag is the prefix's, lies inside the job id, or is
/// absent (the whole key is hashed). Three forms follow, each naming the
/// job whole (a fence shared by two jobs would drop the other job's rows
/// unsent for the fence's lifetime):
///
/// 1. The schedule key has a tag: `{prefix}cancelled:j:{job_id}`. Only
///    brace-free text replaces `sched:`, so the first `{…}` is the same.
/// 2. No tag and no `}`: `{prefix}cancelled:{<schedule key>}`, the whole
///    schedule key as the tag (the form of every UUID job under an
///    untagged prefix, unchanged since the first release).
/// 3. No tag but a `}` (`job}1`): `{prefix}cancelled:{s<n>}:{schedule key}`
///    with the first `n` whose tag hashes to the schedule's slot (a few
///    thousand CRCs, for such ids only).
///
/// The forms cannot meet: 1 continues `cancelled:j`, 2 and 3 `cancelled:{`;
/// 2's tag holds no `}` while 3's text has `}:` where 2's has its schedule
/// key, and a brace-free prefix puts no `}` there.
pub fn cancel_fence_key(prefix: &str, schedule_key: &str) -> String {
    let tag = hash_tag(schedule_key);
    if tag.len() != schedule_key.len() {
        let job_id = schedule_key
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_prefix("sched:"))
            .unwrap_or(schedule_key);
        return format!("{prefix}cancelled:j:{job_id}");
    }
    if !schedule_key.contains('}') {
        return format!("{prefix}cancelled:{{{schedule_key}}}");
    }
    let slot = hash_slot(schedule_key);
    let n = (0u32..)
        .find(|n| hash_slot(&format!("{{s{n}}}")) == slot)
        .unwrap_or_default();
    format!("{prefix}cancelled:{{s{n}}}:{schedule_key}")
}

/// Encode `row` as its schedule member.
pub fn encode_member(row: &OutboxRow) -> Result<String, EncodeError> {
    let text_fields: [(&'static str, &str); 5] = [
        ("host", &row.host),
        ("path", &row.path),
        ("source_type", &row.source_type),
        ("source_url", &row.source_url),
        ("task_type", &row.task_type),
    ];
    for (field, value) in text_fields {
        if value.contains('|') {
            return Err(EncodeError::SeparatorInField { field });
        }
    }
    if !row.priority.is_finite() {
        return Err(EncodeError::NonFinitePriority { value: row.priority });
    }
    // `-infinity` is due forever, but its score (about -9.2e15) would put
    // the task before every other and make its age meaningless: it is
    // dead-lettered at once with this reason, like any row that cannot be
    // encoded.
    if row.run_at_ms < EARLIEST_RUN_AT_MS {
        return Err(EncodeError::RunAtNotATime {
            run_at_ms: row.run_at_ms,
        });
    }
    let task_type = if row.task_type.is_empty() {
        "crawl"
    } else {
        &row.task_type
    };
    let mut m =
        String::with_capacity(100 + row.host.len() + row.path.len() + row.source_url.len() + row.source_type.len());
    // Writing to a String cannot fail.
    let _ = write!(
        m,
        "{}|{}|{}|{}|{}|",
        row.task_id, row.job_id, row.page_id, row.host, row.path
    );
    write_priority(&mut m, row.priority);
    let _ = write!(
        m,
        "|{}|{}|{}|{}|{}",
        row.retry_count,
        row.source_type,
        row.source_url,
        task_type,
        row.lighthouse_run_id.unwrap_or(0)
    );
    Ok(m)
}

/// Append `{:.4}` of a finite `p`. The standard formatter takes its exact
/// (big-number) path for four decimals, measured at ~5% of the relay's CPU
/// while draining; for a priority that is not negative and below 10⁷, and
/// whose p·10⁴ is not within 10⁻⁴ of a rounding tie, rounding the
/// product gives the same digits (its error is below 2⁻¹⁷ < 10⁻⁴), so
/// those are printed from integers. Everything else goes to the formatter.
fn write_priority(m: &mut String, p: f64) {
    let x = p * 10_000.0;
    if p >= 0.0 && !p.is_sign_negative() && x < 1e11 {
        let frac = x - x.floor();
        if (frac - 0.5).abs() > 1e-4 {
            let n = x.round() as u64;
            let _ = write!(m, "{}.{:04}", n / 10_000, n % 10_000);
            return;
        }
    }
    let _ = write!(m, "{p:.4}");
}

/// Encode a claimed batch: the ZADDs to send, the row index of each, and an
/// outcome per row. Rows that cannot be encoded are `Poison`; the others
/// start as `Deferred` until Redis answers for them.
pub fn encode_rows(rows: &[OutboxRow], prefix: &str) -> (Vec<ScheduleEntry>, Vec<usize>, Vec<RowOutcome>) {
    let mut entries = Vec::with_capacity(rows.len());
    let mut entry_rows = Vec::with_capacity(rows.len());
    let mut outcomes = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        match encode_member(row) {
            Ok(member) => {
                entries.push(ScheduleEntry {
                    key: schedule_key(prefix, &row.job_id),
                    score: row.run_at_ms,
                    member,
                });
                entry_rows.push(i);
                outcomes.push(RowOutcome::Deferred);
            }
            Err(e) => outcomes.push(RowOutcome::Poison(e.to_string())),
        }
    }
    (entries, entry_rows, outcomes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> OutboxRow {
        OutboxRow {
            id: 1,
            task_id: "6f1c2a52-4a8e-4d8e-9a43-2b1f3c9d7e01".into(),
            job_id: "0b7e5e8a-1c2d-4e3f-8a9b-0c1d2e3f4a5b".into(),
            page_id: 42,
            host: "example.com".into(),
            path: "/a/b?c=d".into(),
            priority: 1.0,
            retry_count: 0,
            source_type: "sitemap".into(),
            source_url: "https://example.com/sitemap.xml".into(),
            task_type: "crawl".into(),
            lighthouse_run_id: None,
            attempts: 0,
            run_at_ms: 1_700_000_000_123,
            age_at_claim_ms: (0, 0),
        }
    }

    #[test]
    fn fixed_vector_matches_existing_consumers() {
        assert_eq!(
            encode_member(&row()).unwrap(),
            "6f1c2a52-4a8e-4d8e-9a43-2b1f3c9d7e01|0b7e5e8a-1c2d-4e3f-8a9b-0c1d2e3f4a5b|42|example.com|/a/b?c=d|1.0000|0|sitemap|https://example.com/sitemap.xml|crawl|0"
        );
    }

    #[test]
    fn priority_has_exactly_four_decimals() {
        let cases = [
            (1.0, "1.0000"),
            (0.5, "0.5000"),
            (0.123456, "0.1235"),
            (12.0, "12.0000"),
            (-0.25, "-0.2500"),
            (0.0, "0.0000"),
        ];
        for (p, want) in cases {
            let mut r = row();
            r.priority = p;
            let m = encode_member(&r).unwrap();
            assert_eq!(m.split('|').nth(5), Some(want), "priority {p}");
        }
    }

    #[test]
    fn the_fast_priority_path_prints_what_the_formatter_prints() {
        let mut cases = vec![
            0.0,
            -0.0,
            1.0,
            0.00005,
            0.00015,
            0.12345,
            1.00005,
            2.5,
            9.99995,
            999_999.999_95,
            1e7,
            1e7 + 0.00005,
            123_456_789.0,
            f64::MIN_POSITIVE,
            5e-324,
            -1.23456,
        ];
        // Pseudo-random values over many magnitudes (a fixed LCG: repeatable).
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..200_000 {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let mantissa = (state >> 11) as f64 / (1u64 << 53) as f64;
            let scale = 10f64.powi(((state >> 3) % 12) as i32 - 3);
            cases.push(mantissa * scale);
            // Values a hair from a tie, in both directions.
            let tie = ((state >> 20) % 1_000_000) as f64 / 10_000.0 + 0.00005;
            cases.extend([
                tie,
                f64::from_bits(tie.to_bits() + 1),
                f64::from_bits(tie.to_bits() - 1),
            ]);
        }
        for p in cases {
            let mut fast = String::new();
            write_priority(&mut fast, p);
            assert_eq!(fast, format!("{p:.4}"), "priority {p:e}");
        }
    }

    #[test]
    fn empty_task_type_is_crawl_and_lighthouse_id_is_kept() {
        let mut r = row();
        r.task_type = String::new();
        r.lighthouse_run_id = Some(987_654_321_012);
        r.retry_count = 3;
        let m = encode_member(&r).unwrap();
        let fields: Vec<&str> = m.split('|').collect();
        assert_eq!(fields.len(), 11);
        assert_eq!(fields[6], "3");
        assert_eq!(fields[9], "crawl");
        assert_eq!(fields[10], "987654321012");
    }

    #[test]
    fn empty_source_url_keeps_eleven_fields() {
        let mut r = row();
        r.source_url = String::new();
        r.task_type = "lighthouse".into();
        let m = encode_member(&r).unwrap();
        assert!(m.ends_with("|sitemap||lighthouse|0"), "{m}");
        assert_eq!(m.split('|').count(), 11);
    }

    #[test]
    fn separator_in_any_text_field_names_the_field() {
        for field in ["host", "path", "source_type", "source_url", "task_type"] {
            let mut r = row();
            let v = "a|b".to_string();
            match field {
                "host" => r.host = v,
                "path" => r.path = v,
                "source_type" => r.source_type = v,
                "source_url" => r.source_url = v,
                _ => r.task_type = v,
            }
            let err = encode_member(&r).unwrap_err();
            assert_eq!(err, EncodeError::SeparatorInField { field });
            assert!(err.to_string().contains(field));
        }
    }

    #[test]
    fn a_run_at_of_minus_infinity_is_refused() {
        // What a claim reads for '-infinity' (db::outbox::PgTime).
        let r = OutboxRow {
            run_at_ms: i64::MIN,
            ..row()
        };
        assert!(matches!(encode_member(&r), Err(EncodeError::RunAtNotATime { .. })));
        let earliest = OutboxRow {
            run_at_ms: EARLIEST_RUN_AT_MS,
            ..row()
        };
        assert!(encode_member(&earliest).is_ok());
    }

    #[test]
    fn non_finite_priorities_are_refused() {
        for p in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let mut r = row();
            r.priority = p;
            assert!(matches!(encode_member(&r), Err(EncodeError::NonFinitePriority { .. })));
        }
    }

    #[test]
    fn key_layout() {
        assert_eq!(schedule_key("hover:", "abc"), "hover:sched:abc");
    }
}
