//! One LISTEN connection: opened with its keepalives, checked end to end
//! with a NOTIFY of its own, asked to answer, and where the lead lock is
//! taken and given up.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio_postgres::AsyncMessage;

use super::channel::{CHANNEL, PROBE_PREFIX};
use super::heard::Heard;
use crate::db::error::pg_error_text;
use crate::db::url::pg_config;

/// How long connecting and `LISTEN` may take. Once listening, the
/// connection only waits for notifications; a peer that vanished is found
/// by TCP keepalive ([`crate::pool::tcp`]), and polling covers the meantime.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

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

/// The session advisory lock (two int4 keys: "orly", "lead") whose holder
/// answers new-row notifications. Taken on the listen connection, so it
/// goes with that connection: a relay that stops, crashes or loses its
/// listener hands the lead on.
pub const LEAD_LOCK: (i32, i32) = (0x6f72_6c79, 0x6c65_6164);

/// One LISTEN connection and what its notifications signal.
pub(super) struct Session {
    /// The LISTEN connection (also where the lead lock is held).
    pub(super) client: tokio_postgres::Client,
    /// Polls the connection; ends when it does.
    pub(super) driver: tokio::task::JoinHandle<Result<(), String>>,
    /// New rows: at most one pending permit, so notifications that arrive
    /// before `wake` ran fold into the one it is about to handle.
    pub(super) arrived: Arc<Notify>,
    /// The highest probe number heard, and a signal when it moves.
    pub(super) heard: Arc<(AtomicU64, Notify)>,
    /// Probes sent.
    pub(super) sent: AtomicU64,
    /// This session's probe payloads: [`PROBE_PREFIX`], this, `:`, number.
    pub(super) nonce: String,
}

impl Session {
    /// The connection answers a query within [`CONNECT_TIMEOUT`].
    pub(super) async fn answers(&self) -> Result<(), String> {
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

    pub(super) async fn open(url: &str, announce: Arc<Heard>) -> Result<Session, String> {
        let cfg = pg_config(url, CONNECT_TIMEOUT).map_err(|e| e.to_string())?;
        // Each host bounded as a whole (TCP, TLS, authentication): a frozen
        // server accepts the TCP connection in its kernel and then answers
        // nothing; the URL's next host is tried then.
        let (client, mut connection) =
            crate::db::hosts::connect(&cfg, crate::db::tls::connector(), CONNECT_TIMEOUT).await?;
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
    pub(super) async fn give_up_lead(&self) -> Result<(), String> {
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
    pub(super) async fn try_lead(&self) -> Result<bool, String> {
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
    pub(super) async fn probe(&self, notify_url: &str) -> Result<bool, String> {
        let number = self.sent.fetch_add(1, Ordering::SeqCst) + 1;
        let sender = crate::db::setup::connect(notify_url, CONNECT_TIMEOUT)
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
