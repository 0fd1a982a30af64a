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

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use slog::{debug, info, warn, Logger};
use tokio::sync::Notify;
use tokio_postgres::AsyncMessage;

use super::{pg_config, pg_error_text};
use crate::redact::redact_url;

/// The channel the trigger notifies.
pub const CHANNEL: &str = "outbox_relay";

/// Payloads of the listeners' own check notifications start with this;
/// listeners never wake the sweep for one (another relay's check is no
/// new row).
pub const PROBE_PREFIX: &str = "outbox-relay-probe:";

/// The payload of the lead's notification that a backlog is arriving (a
/// claim for new rows found a full batch): the other relays, which do not
/// answer new-row notifications, start their drain lanes for it instead of
/// at their next poll.
pub const BACKLOG_PAYLOAD: &str = "outbox-relay-backlog";

/// How long connecting and `LISTEN` may take. Once listening, the
/// connection only waits for notifications; a peer that vanished is found
/// by TCP keepalive ([`crate::pool::tcp`]), and polling covers the meantime.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a listening connection must answer a query. A server that
/// hangs (every process frozen, a paused VM) keeps the connection open and
/// answers TCP keepalives from its kernel, so the connection never fails
/// by itself: without this the listener stayed on a hung old primary for
/// good after a failover, and kept the listen lead there.
pub const LIVENESS_EVERY: Duration = Duration::from_secs(10);

/// The listen session's server-side keepalives (libpq's names; per
/// session, no privilege needed): a dead peer is found in 10 + 3 × 5 s,
/// and unacknowledged data gives up after 25 s.
const SERVER_KEEPALIVES: [&str; 2] = [
    "SELECT set_config('tcp_keepalives_idle', '10', false), \
     set_config('tcp_keepalives_interval', '5', false), set_config('tcp_keepalives_count', '3', false)",
    // Postgres 12 and later only: apart, so the keepalives hold without it.
    "SELECT set_config('tcp_user_timeout', '25000', false)",
];

/// How long the listener waits to hear its own NOTIFY once it is committed.
/// A notification is delivered at commit, within a millisecond on a
/// healthy server.
pub const PROBE_WAIT: Duration = Duration::from_secs(1);

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

/// What this relay's listener does now, as the sweep sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Not listening, or not hearing (off, deaf, reconnecting): the sweep
    /// polls every `sweep.interval`.
    Deaf,
    /// Hearing, while another relay answers new-row notifications.
    Follower,
    /// Hearing and answering new-row notifications.
    Lead,
}

/// What notifications announced since the sweep last looked.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Announced {
    /// The committing transactions' ids (migration 6's payload).
    pub xids: Vec<u64>,
    /// A notification without a transaction id came (a producer on an
    /// older trigger, a NOTIFY by hand, the lead taken over), or too many
    /// to keep: only a claim can tell.
    pub unknown: bool,
    /// The lead said a backlog is arriving ([`BACKLOG_PAYLOAD`]).
    pub backlog: bool,
}

/// Transaction ids kept for the sweep at most; more become `unknown`.
const MAX_ANNOUNCED: usize = 4096;

impl Announced {
    /// Whether a claim for new rows is needed: something announced was not
    /// yet visible to `seen`, the snapshot of the last claim for new rows
    /// that took every row it could see (`None`: no such claim).
    pub fn needs_claim(&self, seen: Option<&Snapshot>) -> bool {
        self.unknown || self.xids.iter().any(|x| !seen.is_some_and(|s| s.sees(*x)))
    }
}

/// A transaction snapshot as `txid_current_snapshot()` prints it
/// (`xmin:xmax:xip,…`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    xmin: u64,
    xmax: u64,
    running: Vec<u64>,
}

impl Snapshot {
    pub fn parse(text: &str) -> Option<Snapshot> {
        let mut parts = text.split(':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let running = match parts.next()? {
            "" => Vec::new(),
            list => list.split(',').map(|x| x.parse().ok()).collect::<Option<Vec<u64>>>()?,
        };
        if parts.next().is_some() || xmax < xmin {
            return None;
        }
        Some(Snapshot { xmin, xmax, running })
    }

    /// Whether a transaction that has committed (a notification came for
    /// it) is visible in this snapshot: it ended before the snapshot was
    /// taken.
    pub fn sees(&self, xid: u64) -> bool {
        xid < self.xmin || (xid < self.xmax && !self.running.contains(&xid))
    }
}

/// What the listener shares with the sweep: its [`Role`], and the
/// notifications that came since the sweep last took them.
#[derive(Debug)]
pub struct Heard {
    role: AtomicU8,
    announced: Mutex<Announced>,
}

impl Default for Heard {
    fn default() -> Self {
        Heard {
            role: AtomicU8::new(0),
            announced: Mutex::new(Announced::default()),
        }
    }
}

impl Heard {
    pub fn role(&self) -> Role {
        match self.role.load(Ordering::Acquire) {
            2 => Role::Lead,
            1 => Role::Follower,
            _ => Role::Deaf,
        }
    }

    fn set_role(&self, role: Role) {
        let v = match role {
            Role::Deaf => 0,
            Role::Follower => 1,
            Role::Lead => 2,
        };
        self.role.store(v, Ordering::Release);
    }

    fn with<T>(&self, f: impl FnOnce(&mut Announced) -> T) -> T {
        // A panic while holding this lock cannot leave it half-written.
        let mut guard = self.announced.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut guard)
    }

    /// Record one notification's payload (not a check's).
    pub fn note(&self, payload: &str) {
        self.with(|a| {
            if payload == BACKLOG_PAYLOAD {
                a.backlog = true;
            } else if let (Ok(xid), true) = (payload.parse::<u64>(), a.xids.len() < MAX_ANNOUNCED) {
                a.xids.push(xid);
            } else {
                a.unknown = true;
                a.xids.clear();
            }
        });
    }

    /// Something may be due that no claim saw (a lead taken over).
    pub fn note_unknown(&self) {
        self.with(|a| a.unknown = true);
    }

    /// Whether something besides a backlog notice came (that notice is
    /// dropped: it is for the relays that do not lead).
    pub fn has_news(&self) -> bool {
        self.with(|a| {
            a.backlog = false;
            a.unknown || !a.xids.is_empty()
        })
    }

    /// What came since the last call.
    pub fn take(&self) -> Announced {
        self.with(std::mem::take)
    }
}

/// Tell the other relays a backlog is arriving ([`BACKLOG_PAYLOAD`]), on
/// a pooled connection, within `deadline`.
pub async fn notify_backlog(pg: &super::Pg, deadline: crate::deadline::Deadline) -> Result<(), String> {
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

/// The session advisory lock (two int4 keys: "orly", "lead") whose holder
/// answers new-row notifications. Taken on the listen connection, so it
/// goes with that connection: a relay that stops, crashes or loses its
/// listener hands the lead on.
pub const LEAD_LOCK: (i32, i32) = (0x6f72_6c79, 0x6c65_6164);

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
                    if leader && !delivering() {
                        // New rows announced to a relay that cannot send
                        // them wait for the others' quiet poll: hand over.
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

/// One LISTEN connection and what its notifications signal.
struct Session {
    /// The LISTEN connection (also where the lead lock is held).
    client: tokio_postgres::Client,
    /// Polls the connection; ends when it does.
    driver: tokio::task::JoinHandle<Result<(), String>>,
    /// New rows: at most one pending permit, so notifications that arrive
    /// before `wake` ran fold into the one it is about to handle.
    arrived: Arc<Notify>,
    /// The highest probe number heard, and a signal when it moves.
    heard: Arc<(AtomicU64, Notify)>,
    /// Probes sent.
    sent: AtomicU64,
    /// This session's probe payloads: [`PROBE_PREFIX`], this, `:`, number.
    nonce: String,
}

impl Session {
    /// The connection answers a query within [`CONNECT_TIMEOUT`].
    async fn answers(&self) -> Result<(), String> {
        tokio::time::timeout(CONNECT_TIMEOUT, self.client.simple_query("SELECT 1"))
            .await
            .map_err(|_| {
                format!(
                    "the listen connection stopped answering (no answer to SELECT 1 within {}s)",
                    CONNECT_TIMEOUT.as_secs()
                )
            })?
            .map(|_| ())
            .map_err(|e| pg_error_text(&e))
    }

    async fn open(url: &str, announce: Arc<Heard>) -> Result<Session, String> {
        let cfg = pg_config(url, CONNECT_TIMEOUT).map_err(|e| e.to_string())?;
        // Each host bounded as a whole (TCP, TLS, authentication): a frozen
        // server accepts the TCP connection in its kernel and then answers
        // nothing; the URL's next host is tried then.
        let (client, mut connection) = super::hosts::connect(&cfg, super::tls::connector(), CONNECT_TIMEOUT).await?;
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        let mine = format!("{PROBE_PREFIX}{nonce}:");
        let arrived = Arc::new(Notify::new());
        let heard = Arc::new((AtomicU64::new(0), Notify::new()));
        let (rows, probes) = (arrived.clone(), heard.clone());
        // The connection must be polled for notifications to arrive.
        let driver = tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(m) = messages.next().await {
                match m {
                    Ok(AsyncMessage::Notification(n)) => match n.payload().strip_prefix(&mine) {
                        Some(number) => {
                            probes.0.fetch_max(number.parse().unwrap_or(0), Ordering::SeqCst);
                            probes.1.notify_one();
                        }
                        // Another listener's check: no new row.
                        None if n.payload().starts_with(PROBE_PREFIX) => {}
                        None => {
                            announce.note(n.payload());
                            rows.notify_one();
                        }
                    },
                    Ok(_) => {}
                    Err(e) => return Err(pg_error_text(&e)),
                }
            }
            Ok(())
        });
        // The server finds a vanished relay (its host gone, a partition:
        // no FIN, no RST) within about half a minute instead of the
        // kernel's default two hours, and ends its session, which releases
        // the lead it held. Best effort: a server without tcp_user_timeout
        // (before 12) or on a socket path ignores or refuses it.
        for sql in SERVER_KEEPALIVES {
            let _ = tokio::time::timeout(CONNECT_TIMEOUT, client.batch_execute(sql)).await;
        }
        tokio::time::timeout(CONNECT_TIMEOUT, client.batch_execute(&format!("LISTEN {CHANNEL}")))
            .await
            .map_err(|_| format!("LISTEN: no answer within {}s", CONNECT_TIMEOUT.as_secs()))?
            .map_err(|e| pg_error_text(&e))?;
        Ok(Session {
            client,
            driver,
            arrived,
            heard,
            sent: AtomicU64::new(0),
            nonce,
        })
    }

    /// Release the lead lock (taken by [`Session::try_lead`]).
    async fn give_up_lead(&self) -> Result<(), String> {
        let sql = format!("SELECT pg_advisory_unlock({}, {})", LEAD_LOCK.0, LEAD_LOCK.1);
        tokio::time::timeout(CONNECT_TIMEOUT, self.client.simple_query(&sql))
            .await
            .map_err(|_| format!("the listen lead: no answer within {}s", CONNECT_TIMEOUT.as_secs()))?
            .map(|_| ())
            .map_err(|e| format!("the listen lead: {}", pg_error_text(&e)))
    }

    /// Try for [`LEAD_LOCK`] on this connection (the simple protocol:
    /// nothing prepared, pgbouncer-safe). `Ok(true)` when this session holds
    /// it (taking it again is harmless: a holder's count only grows).
    async fn try_lead(&self) -> Result<bool, String> {
        let sql = format!("SELECT pg_try_advisory_lock({}, {})", LEAD_LOCK.0, LEAD_LOCK.1);
        let rows = tokio::time::timeout(CONNECT_TIMEOUT, self.client.simple_query(&sql))
            .await
            .map_err(|_| format!("the listen lead: no answer within {}s", CONNECT_TIMEOUT.as_secs()))?
            .map_err(|e| format!("the listen lead: {}", pg_error_text(&e)))?;
        Ok(rows.iter().any(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0) == Some("t"),
            _ => false,
        }))
    }

    /// NOTIFY through `notify_url` (a connection of its own, as a
    /// producer's) and wait [`PROBE_WAIT`] to hear it: `Ok(false)` when it
    /// did not arrive, `Err` when it could not be sent.
    async fn probe(&self, notify_url: &str) -> Result<bool, String> {
        let number = self.sent.fetch_add(1, Ordering::SeqCst) + 1;
        let sender = super::connect(notify_url, CONNECT_TIMEOUT)
            .await
            .map_err(|e| format!("the check's NOTIFY: {e}"))?;
        // The payload is this process's own hex and digits: nothing to quote.
        let notify = format!("NOTIFY {CHANNEL}, '{PROBE_PREFIX}{}:{number}'", self.nonce);
        tokio::time::timeout(CONNECT_TIMEOUT, sender.batch_execute(&notify))
            .await
            .map_err(|_| format!("the check's NOTIFY: no answer within {}s", CONNECT_TIMEOUT.as_secs()))?
            .map_err(|e| format!("the check's NOTIFY: {}", pg_error_text(&e)))?;
        let (highest, moved) = &*self.heard;
        let until = tokio::time::Instant::now() + PROBE_WAIT;
        loop {
            let signal = moved.notified();
            if highest.load(Ordering::SeqCst) >= number {
                return Ok(true);
            }
            if tokio::time::timeout_at(until, signal).await.is_err() {
                return Ok(highest.load(Ordering::SeqCst) >= number);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_sees_what_ended_before_it() {
        let s = Snapshot::parse("100:110:103,107").expect("a snapshot");
        assert!(s.sees(99));
        assert!(s.sees(100), "not listed as running (txid_visible_in_snapshot's rule)");
        assert!(s.sees(105));
        assert!(!s.sees(103), "running when the snapshot was taken");
        assert!(!s.sees(107));
        assert!(!s.sees(110), "xmax and later started after it");
        assert!(!s.sees(200));
        let none_running = Snapshot::parse("42:42:").expect("a snapshot");
        assert!(none_running.sees(41));
        assert!(!none_running.sees(42));
        for bad in ["", "1", "1:2", "a:2:", "5:4:", "1:2:x", "1:2:3:4"] {
            assert_eq!(Snapshot::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn only_transactions_the_last_claim_did_not_see_need_a_claim() {
        let seen = Snapshot::parse("100:110:103").expect("a snapshot");
        let heard = Heard::default();
        assert!(!heard.take().needs_claim(Some(&seen)), "nothing announced");
        heard.note("101");
        heard.note("99");
        assert!(!heard.take().needs_claim(Some(&seen)));
        heard.note("101");
        heard.note("103");
        assert!(heard.take().needs_claim(Some(&seen)), "103 was running");
        heard.note("101");
        assert!(heard.take().needs_claim(None), "no complete claim yet");
        // A payload without a transaction id (an older trigger, a NOTIFY by
        // hand) can only be answered by a claim.
        heard.note("");
        assert!(heard.take().needs_claim(Some(&seen)));
        heard.note_unknown();
        assert!(heard.take().needs_claim(Some(&seen)));
        // The lead's backlog notice wakes followers, not the lead's claim.
        heard.note(BACKLOG_PAYLOAD);
        let a = heard.take();
        assert!(a.backlog);
        assert!(!a.needs_claim(Some(&seen)));
        // Too many to keep: unknown, and the list stays bounded.
        for x in 0..(MAX_ANNOUNCED as u64 + 10) {
            heard.note(&x.to_string());
        }
        let a = heard.take();
        assert!(a.unknown);
        assert!(a.xids.len() < MAX_ANNOUNCED);
    }
}
