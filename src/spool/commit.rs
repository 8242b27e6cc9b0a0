//! Group commit: one fsync serves every writer waiting when it starts.
//!
//! A writer applies its batch, then calls [`Committer::commit`] and waits.
//! The committer task takes all waiting requests, runs one `sled` flush, and
//! wakes them all. A request that arrives while a flush runs waits for the
//! next one, because its batch may have been applied after that flush began.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::bodies::Bodies;

type Waiter = oneshot::Sender<Result<(), String>>;

pub struct Committer {
    requests: mpsc::UnboundedSender<Waiter>,
}

impl Committer {
    pub fn start(db: sled::Db, bodies: Arc<Bodies>) -> Committer {
        let (requests, mut receiver) = mpsc::unbounded_channel::<Waiter>();
        tokio::spawn(async move {
            let mut waiters = Vec::new();
            while let Some(first) = receiver.recv().await {
                waiters.push(first);
                // Let the sessions that are ready to run reach their commit
                // too, so that one flush serves them all: every flush wakes
                // sled's seven I/O threads, which costs more CPU than the
                // wait. A few rounds at most, so that a steady stream of
                // new writers cannot hold the flush back.
                for _ in 0..4 {
                    let before = waiters.len();
                    tokio::task::yield_now().await;
                    while let Ok(next) = receiver.try_recv() {
                        waiters.push(next);
                    }
                    if waiters.len() == before {
                        break;
                    }
                }
                let flushing = db.clone();
                let bodies = Arc::clone(&bodies);
                let result = match tokio::task::spawn_blocking(move || flush(&flushing, &bodies)).await {
                    Ok(result) => result,
                    Err(error) => Err(format!("flush task failed: {error}")),
                };
                if let Err(error) = &result {
                    tracing::error!(%error, waiters = waiters.len(), "spool flush failed");
                }
                for waiter in waiters.drain(..) {
                    let _ = waiter.send(result.clone());
                }
            }
        });
        Committer { requests }
    }

    /// Waits for a flush that started after this call.
    pub async fn commit(&self) -> anyhow::Result<()> {
        let (sender, receiver) = oneshot::channel();
        self.requests
            .send(sender)
            .map_err(|_| anyhow::anyhow!("spool committer has stopped"))?;
        match receiver.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(anyhow::anyhow!("spool flush failed: {error}")),
            Err(_) => Err(anyhow::anyhow!("spool committer has stopped")),
        }
    }
}

/// Syncs the bodies, then flushes the database, so that a reference on disk
/// points only at bytes on disk. Then deletes the body files that were
/// already unused when the sync began.
fn flush(db: &sled::Db, bodies: &Bodies) -> Result<(), String> {
    let unused = bodies.sync().map_err(|error| format!("{error:#}"))?;
    if let Err(error) = db.flush() {
        bodies.keep_unused(unused);
        return Err(error.to_string());
    }
    bodies.delete_unused(unused);
    Ok(())
}
