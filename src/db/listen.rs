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

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
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

/// How long connecting and `LISTEN` may take. Once listening, the
/// connection only waits for notifications; a peer that vanished is found
/// by TCP keepalive ([`crate::pool::tcp`]), and polling covers the meantime.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

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
    let session = match Session::open(&target.listen_url).await {
        Ok(s) => s,
        Err(e) => return Hearing::Failed(format!("LISTEN on {}: {e}", redact_url(&target.listen_url))),
    };
    match session.probe(&target.notify_url).await {
        Ok(true) => Hearing::Active,
        Ok(false) => Hearing::Deaf,
        Err(e) => Hearing::Failed(e),
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
pub async fn listen<F: Fn() + Send + 'static>(target: ListenTarget, gauges: ListenGauges, wake: F, log: Logger) {
    let mut backoff = Duration::from_millis(200);
    let mut warned_deaf = false;
    loop {
        let ended = listen_once(&target, &gauges, &wake, &log, &mut warned_deaf).await;
        gauges.active.set(0);
        gauges.leader.set(0);
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
async fn listen_once<F: Fn()>(
    target: &ListenTarget,
    gauges: &ListenGauges,
    wake: &F,
    log: &Logger,
    warned_deaf: &mut bool,
) -> Result<(), String> {
    let mut session = Session::open(&target.listen_url).await?;
    let mut heard = session.probe(&target.notify_url).await?;
    let mut leader = false;
    // Whether a relay without the lead said so since it last changed.
    let mut said_follower = false;
    loop {
        let next = if heard {
            gauges.active.set(1);
            info!(log, "listening for new outbox rows; checked end to end";
                "channel" => CHANNEL, "url" => redact_url(&target.listen_url));
            *warned_deaf = false;
            tokio::time::Instant::now()
        } else {
            gauges.active.set(0);
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
        heard = loop {
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
                        wake();
                    }
                }
                () = tokio::time::sleep_until(due.unwrap_or(far)), if due.is_some() => {
                    if !heard {
                        break session.probe(&target.notify_url).await?;
                    }
                    leader = session.try_lead().await?;
                    if leader {
                        gauges.leader.set(1);
                        info!(log, "this relay answers new-row notifications (the listen lead)";
                            "lock" => format!("pg_advisory_lock({}, {})", LEAD_LOCK.0, LEAD_LOCK.1));
                        // Rows committed while nobody answered: polling
                        // would find them, a tick now finds them sooner.
                        wake();
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
    async fn open(url: &str) -> Result<Session, String> {
        let cfg = pg_config(url, CONNECT_TIMEOUT).map_err(|e| e.to_string())?;
        // Bounded as a whole (TCP, TLS, authentication): a frozen server
        // accepts the TCP connection in its kernel and then answers nothing.
        let (client, mut connection) = tokio::time::timeout(CONNECT_TIMEOUT, cfg.connect(super::tls::connector()))
            .await
            .map_err(|_| format!("no answer within {}s", CONNECT_TIMEOUT.as_secs()))?
            .map_err(|e| pg_error_text(&e))?;
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
                        None => rows.notify_one(),
                    },
                    Ok(_) => {}
                    Err(e) => return Err(pg_error_text(&e)),
                }
            }
            Ok(())
        });
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
