//! What the listener heard, shared with the sweep: its role (deaf,
//! follower, lead) and the transactions announced since the last claim.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;

use super::channel::BACKLOG_PAYLOAD;

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
    /// The sweep holds its claims: Redis refused its last batches (it does
    /// not deliver, and must not lead).
    holding: std::sync::atomic::AtomicBool,
}

impl Default for Heard {
    fn default() -> Self {
        Heard {
            role: AtomicU8::new(0),
            holding: std::sync::atomic::AtomicBool::new(false),
            announced: Mutex::new(Announced::default()),
        }
    }
}

impl Heard {
    /// The sweep holds its claims (Redis refused them), or no longer.
    pub fn set_holding(&self, on: bool) {
        self.holding.store(on, Ordering::Release);
    }

    /// Whether the sweep holds its claims now.
    pub fn holding(&self) -> bool {
        self.holding.load(Ordering::Acquire)
    }

    pub fn role(&self) -> Role {
        match self.role.load(Ordering::Acquire) {
            2 => Role::Lead,
            1 => Role::Follower,
            _ => Role::Deaf,
        }
    }

    pub(super) fn set_role(&self, role: Role) {
        let v = match role {
            Role::Deaf => 0,
            Role::Follower => 1,
            Role::Lead => 2,
        };
        self.role.store(v, Ordering::Release);
    }

    pub(super) fn with<T>(&self, f: impl FnOnce(&mut Announced) -> T) -> T {
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
