//! Reopening the queue database after a failed write.
//!
//! sled 0.34 stores the first I/O error of a background write (such as
//! ENOSPC) and returns it from every later operation on that database, so
//! the spool could not accept mail again after the disk had space. Opening
//! the database again clears that state: sled's recovery reads the log up to
//! the last complete write, which includes everything flushed.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{Database, QueueId, Shared, body_references, envelope_key, message_key};

/// Maximum wait between two attempts to reopen.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(2);

/// Starts reopening the database of `generation` in the background, unless
/// a reopen is already running or that database was already replaced.
pub(super) fn start(shared: &Arc<Shared>, generation: u64) {
    if shared
        .recovering
        .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        // Only `baton serve` writes from a runtime; a command that fails a
        // write reports the error and exits.
        shared.recovering.store(false, Ordering::Release);
        return;
    };
    runtime.spawn(run(shared.clone(), generation));
}

async fn run(shared: Arc<Shared>, failed: u64) {
    {
        let mut current = shared.current.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        if !current.as_ref().is_some_and(|database| database.generation == failed) {
            shared.recovering.store(false, Ordering::Release);
            return;
        }
        // Operations still running keep their own handles; the file lock is
        // free when the last of them ends.
        *current = None;
    }
    tracing::error!(spool = %shared.folder.display(), "spool write failed; reopening the queue database");

    let mut delay = Duration::from_millis(100);
    let mut attempts: u32 = 0;
    loop {
        attempts += 1;
        let opening = shared.clone();
        let result = tokio::task::spawn_blocking(move || reopen(&opening, failed + 1)).await;
        match result {
            Ok(Ok(database)) => {
                *shared.current.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(database);
                tracing::info!(spool = %shared.folder.display(), attempts, "queue database reopened; accepting mail again");
                break;
            }
            Ok(Err(error)) => {
                // Log the first failure and then every 30th, about once a
                // minute at the longest delay.
                if attempts % 30 == 1 {
                    tracing::warn!(spool = %shared.folder.display(), attempts, error = %format!("{error:#}"), "cannot reopen the queue database yet; retrying");
                }
            }
            Err(error) => {
                tracing::error!(spool = %shared.folder.display(), attempts, %error, "reopening the queue database panicked; retrying");
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(MAX_RETRY_DELAY);
    }
    shared.recovering.store(false, Ordering::Release);
}

/// Opens the database again and removes the messages whose store failed.
fn reopen(shared: &Shared, generation: u64) -> anyhow::Result<Database> {
    let database = Database::open(&shared.folder, shared.cache_size, generation, Arc::clone(&shared.bodies))?;
    remove_abandoned(shared, &database)?;
    // The reopened database may hold references that the old one had
    // removed before a flush, so the body files count them again.
    shared.bodies.recount(body_references(&database.tree));
    Ok(database)
}

/// Removes the messages whose store failed from the reopened `database`.
fn remove_abandoned(shared: &Shared, database: &Database) -> anyhow::Result<()> {
    let abandoned: Vec<QueueId> = shared
        .abandoned
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone();
    if abandoned.is_empty() {
        return Ok(());
    }
    let mut batch = sled::Batch::default();
    for id in &abandoned {
        batch.remove(message_key(id));
        batch.remove(envelope_key(id));
        for entry in database.tree.scan_prefix(format!("r/{id}/").as_bytes()) {
            let (key, _) = entry?;
            batch.remove(key);
        }
    }
    database.tree.apply_batch(batch)?;
    database.db.flush()?;
    tracing::info!(messages = abandoned.len(), "removed messages whose store failed from the reopened spool");
    shared
        .abandoned
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .retain(|id| !abandoned.contains(id));
    Ok(())
}
