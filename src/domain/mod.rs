//! The domain: the nouns both stores share and the pure rules over them.
//!
//! - [`row`]: [`OutboxRow`], a claimed row;
//! - [`member`]: how a row becomes a schedule member and key (byte-compatible
//!   with the existing consumers);
//! - [`outcome`]: the ZADD a row becomes, what Redis said about it, and what
//!   that means for the row;
//! - [`mod@settle`]: the settlement rules of one tick (SPEC §3);
//! - [`limit`]: how many rows the next claim may take (`sweep.max_batch_bytes`);
//! - [`journal`]: the delivery journal's slots, and what two looks at a
//!   Redis node say was lost.
//!
//! No I/O and no knowledge of Postgres or Redis clients: `db` and `redis`
//! depend on this module, never on each other.

pub mod journal;
pub mod limit;
pub mod member;
pub mod outcome;
pub mod row;
pub mod settle;

pub use journal::{Loss, NodeMark, Observation, Window};
pub use limit::ClaimLimit;
pub use member::{cancel_fence_key, encode_member, encode_rows, hash_slot, hash_tag, schedule_key, EncodeError};
pub use outcome::{EntryOutcome, RowOutcome, ScheduleEntry};
pub use row::OutboxRow;
pub use settle::{settle, RetryPolicy, Settlement};
