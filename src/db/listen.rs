//! LISTEN/NOTIFY wake-ups: the commit-to-schedule latency becomes a round
//! trip instead of half a polling interval.
//!
//! Migration 2 adds a statement-level trigger that sends `NOTIFY
//! outbox_relay` on every INSERT into `task_outbox`. [`listen`] holds one
//! direct connection (`database.listen_url`; LISTEN cannot work through
//! pgbouncer in transaction pooling mode) and calls `wake` when
//! notifications arrived: a burst of them (a storm of single-row commits)
//! is one call, so nothing here grows with the notification rate. Polling every `sweep.interval` stays on as the fallback:
//! a lost notification or a broken listen connection only costs latency.

use std::time::Duration;

use futures_util::StreamExt;
use slog::{info, warn, Logger};
use tokio_postgres::AsyncMessage;

use super::{pg_config, pg_error_text};
use crate::redact::redact_url;

/// The channel the trigger notifies.
pub const CHANNEL: &str = "outbox_relay";

/// How long connecting and `LISTEN` may take. Once listening, the
/// connection only waits for notifications; a peer that vanished is found
/// by TCP keepalive ([`crate::pool::tcp`]), and polling covers the meantime.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Listen forever (until the task is aborted), reconnecting with backoff.
pub async fn listen<F: Fn() + Send + 'static>(url: String, wake: F, log: Logger) {
    let mut backoff = Duration::from_millis(200);
    loop {
        match listen_once(&url, &wake, &log).await {
            Ok(()) => backoff = Duration::from_millis(200),
            Err(e) => {
                warn!(log, "LISTEN connection failed; polling continues, reconnecting";
                    "url" => redact_url(&url), "error" => e, "retry_in_ms" => backoff.as_millis() as u64);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// One connection's life: LISTEN, then wake for each notification until the
/// connection ends (`Ok`) or fails (`Err`).
async fn listen_once<F: Fn()>(url: &str, wake: &F, log: &Logger) -> Result<(), String> {
    let cfg = pg_config(url, CONNECT_TIMEOUT).map_err(|e| e.to_string())?;
    // Bounded as a whole (TCP, TLS, authentication): a frozen server
    // accepts the TCP connection in its kernel and then answers nothing.
    let (client, mut connection) = tokio::time::timeout(CONNECT_TIMEOUT, cfg.connect(super::tls::connector()))
        .await
        .map_err(|_| format!("no answer within {}s", CONNECT_TIMEOUT.as_secs()))?
        .map_err(|e| pg_error_text(&e))?;
    // At most one pending permit: notifications that arrive before `wake`
    // ran fold into the one it is about to handle.
    let arrived = std::sync::Arc::new(tokio::sync::Notify::new());
    let notify = arrived.clone();
    // The connection must be polled for notifications to arrive.
    let mut driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(m) = messages.next().await {
            match m {
                Ok(AsyncMessage::Notification(_)) => notify.notify_one(),
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
    info!(log, "listening for new outbox rows"; "channel" => CHANNEL);
    loop {
        tokio::select! {
            ended = &mut driver => {
                return match ended {
                    Ok(r) => r,
                    Err(e) => Err(e.to_string()),
                };
            }
            () = arrived.notified() => wake(),
        }
    }
}
