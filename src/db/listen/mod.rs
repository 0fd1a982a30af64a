//! LISTEN/NOTIFY wake-ups: the commit-to-schedule latency becomes a round
//! trip instead of half a polling interval.
//!
//! Migration 2 adds a statement-level trigger that sends `NOTIFY
//! outbox_relay` on every INSERT into `task_outbox`. [`listen`] holds one
//! connection (`database.listen_url`: by default `"auto"`, `database.url`'s
//! server) and calls `wake` when notifications arrived: a burst of them (a
//! storm of single-row commits) is one call, so nothing here grows with the
//! notification rate. Polling every `sweep.interval` stays on as the
//! fallback: a lost notification or a broken listen connection only costs
//! latency.
//!
//! A listener can be deaf without any error: behind pgbouncer in
//! transaction pooling, `LISTEN` runs on whichever server connection the
//! statement got and the notifications never come back to this client. So
//! after every (re)connect the listener checks itself end to end: it sends a
//! NOTIFY of its own through `database.url` (the way producers' commits
//! notify) and must hear it within [`PROBE_WAIT`]. A deaf listener says so
//! once, sets `outbox_relay_listen_active` to 0 and checks again every
//! [`DEAF_RECHECK`]; polling carries the relay meanwhile.

use std::sync::Arc;
use std::time::Duration;

use slog::{debug, info, warn, Logger};

use super::error::pg_error_text;
use crate::redact::redact_url;

mod channel;
mod heard;
mod session;

pub use channel::{BACKLOG_PAYLOAD, CHANNEL, PROBE_PREFIX};
pub use heard::{Announced, Heard, Role, Snapshot};
use session::Session;
pub use session::{LEAD_LOCK, PROBE_WAIT};

/// How often a listening connection must answer a query. A server that
/// hangs (every process frozen, a paused VM) keeps the connection open and
/// answers TCP keepalives from its kernel, so the connection never fails
/// by itself: without this the listener stayed on a hung old primary for
/// good after a failover, and kept the listen lead there.
pub const LIVENESS_EVERY: Duration = Duration::from_secs(10);

/// How often a deaf listener checks again (a pgbouncer swapped for a direct
/// URL by a DNS change, a check that lost a race with a slow server).
pub const DEAF_RECHECK: Duration = Duration::from_secs(60);

/// The one line an operator needs when the listener hears nothing.
pub const DEAF_FIX: &str = "set database.listen_url to a direct Postgres URL (not through pgbouncer in transaction \
                            pooling, where LISTEN receives nothing); until then new rows wait for the next poll";

/// Where to listen and where the check's NOTIFY goes.
#[derive(Debug, Clone)]
pub struct ListenTarget {
    /// The connection that LISTENs (`database.listen_url`, resolved).
    pub listen_url: String,
    /// Where producers commit (`database.url`): the check's NOTIFY is sent
    /// there, on a connection of its own.
    pub notify_url: String,
}

impl ListenTarget {
    /// Listening on `listen` (`DatabaseConfig::listen_target`: `None`
    /// when the relay only polls), checked through `notify_url`
    /// (`database.url`).
    pub fn new(listen: Option<&str>, notify_url: &str) -> Option<ListenTarget> {
        listen.map(|url| ListenTarget {
            listen_url: url.to_string(),
            notify_url: notify_url.to_string(),
        })
    }
}

/// What the end-to-end check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hearing {
    /// `database.listen_url` is `"off"` (or `""`): polling only.
    Off,
    /// The listener heard its own NOTIFY.
    Active,
    /// LISTEN succeeded but the NOTIFY did not arrive within [`PROBE_WAIT`].
    Deaf,
    /// Connecting, LISTEN or the NOTIFY failed.
    Failed(String),
}

impl Hearing {
    /// One line for `check-config` and `status`.
    pub fn describe(&self) -> String {
        match self {
            Hearing::Off => {
                "off (database.listen_url = \"off\"): new rows wait for the next poll (sweep.interval)".into()
            }
            Hearing::Active => "active: a NOTIFY sent through database.url arrived on the listener".into(),
            Hearing::Deaf => format!(
                "deaf: a NOTIFY sent through database.url did not arrive within {}s; {DEAF_FIX}",
                PROBE_WAIT.as_secs()
            ),
            Hearing::Failed(e) => format!("failed: {e}; new rows wait for the next poll (sweep.interval)"),
        }
    }

    /// The short word for JSON and metrics readers.
    pub fn word(&self) -> &'static str {
        match self {
            Hearing::Off => "off",
            Hearing::Active => "active",
            Hearing::Deaf => "deaf",
            Hearing::Failed(_) => "failed",
        }
    }
}

/// Check a configuration's listener end to end, as `run` does at start
/// (for `check-config` and `status`): LISTEN on `target`, NOTIFY through
/// its `notify_url`, wait [`PROBE_WAIT`].
pub async fn check(target: Option<ListenTarget>) -> Hearing {
    let Some(target) = target else {
        return Hearing::Off;
    };
    let session = match Session::open(&target.listen_url, Arc::default()).await {
        Ok(s) => s,
        Err(e) => return Hearing::Failed(format!("LISTEN on {}: {e}", redact_url(&target.listen_url))),
    };
    match session.probe(&target.notify_url).await {
        Ok(true) => Hearing::Active,
        Ok(false) => Hearing::Deaf,
        Err(e) => Hearing::Failed(e),
    }
}

/// Tell the other relays a backlog is arriving ([`BACKLOG_PAYLOAD`]), on
/// a pooled connection, within `deadline`.
pub async fn notify_backlog(pg: &super::pool::Pg, deadline: crate::deadline::Deadline) -> Result<(), String> {
    let mut conn = pg.checkout(deadline).await.map_err(|e| e.to_string())?;
    let sql = format!("NOTIFY {CHANNEL}, '{BACKLOG_PAYLOAD}'");
    match deadline.run("postgres notify", conn.batch_execute(&sql)).await {
        Ok(done) => done.map_err(|e| pg_error_text(&e)),
        Err(e) => {
            // Its state is unknown: never hand it to the next user.
            conn.discard();
            Err(e.to_string())
        }
    }
}

/// The gauges the listener keeps.
#[derive(Clone)]
pub struct ListenGauges {
    /// 1 while the listener is up and heard its own NOTIFY.
    pub active: prometheus::IntGauge,
    /// 1 while this relay answers new-row notifications (the lead).
    pub leader: prometheus::IntGauge,
}

/// How often a relay without the lead tries to take it.
pub const LEAD_RETRY: Duration = Duration::from_secs(1);

/// Listen forever (until the task is aborted), reconnecting with backoff;
/// `gauges` follow whether new rows wake the sweep.
///
/// Every relay listens, but one answers: with several relays, each
/// claiming for each notification found nothing two times in three (three
/// relays at ~1,000 single-row commits/s: 0.64 empty claims per delivered
/// row, against 0.002 when polling). The relay holding [`LEAD_LOCK`] wakes
/// its sweep for new rows; the others poll and drain (a full batch keeps
/// every relay's drain lanes going), and try for the lead every
/// [`LEAD_RETRY`].
///
/// `delivering` says whether this relay delivers now (its sweep and
/// dispatch healthy): a relay that does not gives the lead up, and does not
/// try for it, so that one that does answers new rows.
pub async fn listen<F: Fn() + Send + 'static, D: Fn() -> bool + Send + 'static>(
    target: ListenTarget,
    (gauges, heard): (ListenGauges, Arc<Heard>),
    (wake, delivering): (F, D),
    log: Logger,
) {
    let mut backoff = Duration::from_millis(200);
    let mut warned_deaf = false;
    loop {
        let ended = listen_once(&target, (&gauges, &heard), (&wake, &delivering), &log, &mut warned_deaf).await;
        gauges.active.set(0);
        gauges.leader.set(0);
        heard.set_role(Role::Deaf);
        // Rows committed from now until the listener is back are announced
        // to nobody: the sweep polls every sweep.interval again (and looks
        // now, for what was committed while the connection went).
        heard.note_unknown();
        wake();
        match ended {
            Ok(()) => backoff = Duration::from_millis(200),
            Err(e) => {
                warn!(log, "LISTEN connection failed; polling continues, reconnecting";
                    "url" => redact_url(&target.listen_url), "error" => e, "retry_in_ms" => backoff.as_millis() as u64);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// One connection's life: LISTEN, the end-to-end check, the lead, then wake
/// for each notification until the connection ends (`Ok`) or fails (`Err`).
async fn listen_once<F: Fn(), D: Fn() -> bool>(
    target: &ListenTarget,
    (gauges, heard): (&ListenGauges, &Arc<Heard>),
    (wake, delivering): (&F, &D),
    log: &Logger,
    warned_deaf: &mut bool,
) -> Result<(), String> {
    let mut session = Session::open(&target.listen_url, heard.clone()).await?;
    let mut hears = session.probe(&target.notify_url).await?;
    let mut next_alive = tokio::time::Instant::now() + LIVENESS_EVERY;
    // Liveness checks in a row that found the lead not delivering.
    let mut not_delivering = 0u32;
    let mut leader = false;
    // Whether a relay without the lead said so since it last changed.
    let mut said_follower = false;
    loop {
        let next = if hears {
            // The line first: a scrape that sees the gauge at 1 can find it.
            info!(log, "listening for new outbox rows; checked end to end";
                "channel" => CHANNEL, "url" => redact_url(&target.listen_url));
            gauges.active.set(1);
            heard.set_role(Role::Follower);
            *warned_deaf = false;
            tokio::time::Instant::now()
        } else {
            gauges.active.set(0);
            heard.set_role(Role::Deaf);
            if *warned_deaf {
                debug!(log, "the listener still hears nothing"; "url" => redact_url(&target.listen_url));
            } else {
                warn!(log, "LISTEN hears nothing: the relay's own NOTIFY, sent through database.url, did not arrive; polling every sweep.interval";
                    "url" => redact_url(&target.listen_url),
                    "waited_ms" => PROBE_WAIT.as_millis() as u64,
                    "fix" => DEAF_FIX);
                *warned_deaf = true;
            }
            tokio::time::Instant::now() + DEAF_RECHECK
        };
        // Until the connection ends, or (deaf) the next check; a relay that
        // hears tries for the lead at once and then every LEAD_RETRY until
        // it has it.
        let mut due = Some(next);
        hears = loop {
            let far = tokio::time::Instant::now() + Duration::from_secs(86_400);
            tokio::select! {
                ended = &mut session.driver => {
                    return match ended {
                        Ok(r) => r,
                        Err(e) => Err(e.to_string()),
                    };
                }
                () = session.arrived.notified() => {
                    if leader {
                        // Not for its own backlog notice alone.
                        if heard.has_news() {
                            wake();
                        }
                    } else if heard.take().backlog {
                        // The lead found a backlog arriving: drain lanes
                        // start now rather than at their next poll.
                        heard.note_unknown();
                        wake();
                    }
                }
                () = tokio::time::sleep_until(next_alive) => {
                    session.answers().await?;
                    next_alive = tokio::time::Instant::now() + LIVENESS_EVERY;
                    not_delivering = if leader && !delivering() { not_delivering + 1 } else { 0 };
                    if not_delivering >= 2 {
                        // New rows announced to a relay that cannot send
                        // them wait for the others' quiet poll: hand over.
                        // At two checks in a row (10 s apart), not at one
                        // failed tick.
                        not_delivering = 0;
                        session.give_up_lead().await?;
                        leader = false;
                        gauges.leader.set(0);
                        heard.set_role(Role::Follower);
                        warn!(log, "this relay gives up the listen lead: it is not delivering (its sweep or dispatch is unhealthy); another relay answers new rows, and this one tries again once it delivers");
                        said_follower = false;
                        due = Some(tokio::time::Instant::now() + LEAD_RETRY);
                    }
                }
                () = tokio::time::sleep_until(due.unwrap_or(far)), if due.is_some() => {
                    if !hears {
                        break session.probe(&target.notify_url).await?;
                    }
                    leader = delivering() && session.try_lead().await?;
                    if leader {
                        heard.set_role(Role::Lead);
                        // Rows committed while nobody answered: polling
                        // would find them, a tick now finds them sooner.
                        heard.note_unknown();
                        wake();
                        // The line after the wake-up (a reader of the line
                        // finds it counted), the gauge after the line.
                        info!(log, "this relay answers new-row notifications (the listen lead)";
                            "lock" => format!("pg_advisory_lock({}, {})", LEAD_LOCK.0, LEAD_LOCK.1));
                        gauges.leader.set(1);
                        due = None;
                    } else {
                        gauges.leader.set(0);
                        if !said_follower {
                            info!(log, "another relay answers new-row notifications; this one polls and drains, and takes over when it goes";
                                "retry_ms" => LEAD_RETRY.as_millis() as u64);
                            said_follower = true;
                        }
                        due = Some(tokio::time::Instant::now() + LEAD_RETRY);
                    }
                }
            }
        };
    }
}
