//! What a tick does when Postgres refused a write of its settle: keep what
//! it can in a transaction of its own ([`Kept`]).

use std::time::Duration;

use super::dispatched::Journal;
use super::report::{Kept, TickError};
use super::settings::COMMIT_GRACE;
use crate::db::{journal, outbox};
use crate::deadline::Deadline;

/// After Postgres refused a write of a tick's settle (and the tick rolled
/// back): in a transaction of its own, delete the rows Redis accepted and
/// put the others off by `delay`, so nothing is re-sent every tick. A step
/// refused again is dropped from the next try: the delete alone, then the
/// put-off alone (then at least the batch waits `delay` before it is sent
/// again). With nothing delivered and every write refused, the rows are
/// left as they were, due ([`Kept::Due`]; the sweep then holds its claims).
/// Errors that are not refusals (a lost connection, a timeout) end the
/// tick as usual. With the journal on (`journal`: its slice width and
/// what was delivered), the delete journals what it deletes, behind a
/// savepoint: a journal that refuses too costs the journal, not the delete
/// (returned: the rows not journaled and why).
pub(super) async fn settle_refused(
    conn: &mut tokio_postgres::Client,
    (delete, put_off): (&[i64], &[i64]),
    journal: Option<(i64, &Journal<'_>)>,
    delay: Duration,
    deadline: Deadline,
) -> Result<(Kept, Option<(usize, String)>), TickError> {
    const STAGE: &str = "settle after a refused write";
    let delay_ms = delay.as_millis().min(i64::MAX as u128) as i64;
    let every: Vec<i64> = delete.iter().chain(put_off).copied().collect();
    // With nothing delivered, a settle that could write nothing leaves the
    // rows as they were before the claim: due, as `Kept::Due`.
    let nothing_delivered = delete.is_empty();
    let tries: [(&[i64], &[i64], Kept); 3] = [
        (delete, put_off, Kept::PutOff),
        (delete, &[], Kept::Due),
        (&[], &every, Kept::AllPutOff),
    ];
    let mut last = String::new();
    for (delete, put_off, kept) in tries {
        if delete.is_empty() && put_off.is_empty() {
            continue;
        }
        let tx = deadline
            .run("postgres begin", conn.transaction())
            .await?
            .map_err(TickError::db("postgres begin"))?;
        let t = deadline.pg_timeout();
        let set = format!(
            "SET LOCAL statement_timeout = '{t}'; SET LOCAL idle_in_transaction_session_timeout = '{t}';
             SET LOCAL synchronous_commit = off"
        );
        let writes = async {
            tx.batch_execute(&set).await?;
            outbox::delete(&tx, delete).await?;
            let mut refused = None;
            if let Some((width, j)) = journal.filter(|(_, j)| !delete.is_empty() && !j.rows.is_empty()) {
                tx.batch_execute("SAVEPOINT journal").await?;
                if let Err(e) = journal::record(&tx, width, &j.rows, j.node).await {
                    tx.batch_execute("ROLLBACK TO SAVEPOINT journal").await?;
                    refused = Some((j.rows.len(), crate::db::pg_error_text(&e)));
                }
            }
            outbox::postpone(&tx, put_off, delay_ms).await?;
            Ok::<_, tokio_postgres::Error>(refused)
        };
        match deadline.run(STAGE, writes).await?.map_err(TickError::db(STAGE)) {
            Ok(refused) => {
                tokio::time::timeout_at(deadline.instant() + COMMIT_GRACE, tx.commit())
                    .await
                    .map_err(|_| TickError::CommitUnknown("no answer from Postgres".into()))?
                    .map_err(TickError::db("postgres commit"))?;
                return Ok((kept, refused));
            }
            Err(TickError::Db { reason, .. }) => {
                last = reason;
                deadline
                    .run("postgres rollback", tx.rollback())
                    .await?
                    .map_err(TickError::db("postgres rollback"))?;
            }
            Err(e) => return Err(e),
        }
    }
    if nothing_delivered {
        return Ok((Kept::Due, None));
    }
    Err(TickError::Db {
        stage: STAGE,
        reason: format!("every write refused: {last}"),
    })
}
