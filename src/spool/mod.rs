//! The spool: every accepted message and the state of each of its recipients,
//! kept in one sled tree so that a message and its records commit atomically.
//!
//! The spool acknowledges nothing it has not flushed: [`Spool::store`] returns
//! only after an fsync that started after the message was written. Concurrent
//! stores share one flush (group commit, see [`commit`]), so N sessions cost
//! one disk sync, not N.
//!
//! # Format
//! One sled tree, `queue`, with three kinds of keys (`<id>` is a [`QueueId`]):
//! - `m/<id>`: where the message bytes are, a [`bodies::BodyRef`]. The
//!   bytes, as they will be sent (Received header and any signatures
//!   included, CRLF line ends, no dot-stuffing), are in the body files
//!   described in [`bodies`].
//! - `e/<id>`: the envelope, an [`EnvelopeRecord`] as JSON.
//! - `r/<id>/<nnnn>`: recipient number `nnnn` (decimal, zero-padded), a
//!   [`RecipientRecord`] as JSON.
//!
//! A second tree, `warmup`, keeps each warming source's counters per site
//! under `<source>/<site>`, as JSON. A third, `webhooks`, queues events for
//! each webhook under `<name>\0<id>` until the endpoint took them.
//!
//! A message is removed, all three kinds at once, when no recipient is still
//! queued or deferred. "In flight" is not stored: after a crash a recipient
//! that was being delivered is still queued and is tried again, so a message
//! in flight at the crash may arrive twice, but none is lost.
//!
//! # Write failures
//! After a failed write (typically ENOSPC) sled 0.34 keeps returning that
//! error for every later write, until the database is opened again. So a
//! failed write or flush reopens the database in the background, retrying
//! until it succeeds (see [`recovery`]). Meanwhile the spool returns errors
//! and intake replies `452`. Everything flushed before the failure is kept.
//! Updates not yet flushed may be lost, so a message delivered in that
//! window is delivered again. Messages whose store failed are removed after
//! the reopen, because their clients got a 452 and will send them again.

pub mod bodies;
mod commit;
pub mod record;
mod recovery;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, RwLock};

use anyhow::Context;

use crate::policy::warmup::Counters;
use bodies::{Bodies, BodyRef};

pub use record::{EnvelopeRecord, QueueId, RcptState, RecipientRecord};

/// A message ready to be stored: envelope, recipients and final bytes.
pub struct NewMessage {
    pub id: QueueId,
    pub envelope: EnvelopeRecord,
    pub recipients: Vec<RecipientRecord>,
    pub data: Vec<u8>,
}

/// One queued message as read back from the spool.
#[derive(Debug, Clone)]
pub struct QueuedMessage {
    pub id: QueueId,
    pub envelope: EnvelopeRecord,
    pub recipients: Vec<(u32, RecipientRecord)>,
}

#[derive(Clone)]
pub struct Spool {
    shared: Arc<Shared>,
}

struct Shared {
    folder: PathBuf,
    cache_size: u64,
    bodies: Arc<Bodies>,
    /// The open database; `None` while it is reopened after a write failure.
    current: RwLock<Option<Database>>,
    /// Set while a task reopens the database.
    recovering: AtomicBool,
    /// Messages whose store failed. A failed batch may still reach the disk,
    /// so these are removed after the database is reopened.
    abandoned: Mutex<Vec<QueueId>>,
}

/// Handles on one opening of the database.
#[derive(Clone)]
struct Database {
    db: sled::Db,
    tree: sled::Tree,
    committer: Arc<commit::Committer>,
    /// Counts the openings, so a failure reopens only the database it hit.
    generation: u64,
}

impl Database {
    /// Opens the database in `folder`, creating it if needed.
    fn open(folder: &Path, cache_size: u64, generation: u64, bodies: Arc<Bodies>) -> anyhow::Result<Database> {
        Self::with_db(Self::open_db(folder, cache_size)?, generation, bodies)
    }

    fn with_db(db: sled::Db, generation: u64, bodies: Arc<Bodies>) -> anyhow::Result<Database> {
        let tree = db.open_tree("queue")?;
        let committer = Arc::new(commit::Committer::start(db.clone(), bodies));
        Ok(Database {
            db,
            tree,
            committer,
            generation,
        })
    }

    fn open_db(folder: &Path, cache_size: u64) -> anyhow::Result<sled::Db> {
        sled::Config::new()
            .path(folder.join("queue"))
            .cache_capacity(cache_size)
            .mode(sled::Mode::HighThroughput)
            .open()
            .with_context(|| {
                format!(
                    "cannot open the queue database in {}; is another baton process using this spool?",
                    folder.display()
                )
            })
    }
}

/// Returns every body reference stored in `tree`.
fn body_references(tree: &sled::Tree) -> impl Iterator<Item = BodyRef> + '_ {
    tree.scan_prefix(b"m/")
        .values()
        .filter_map(|value| value.ok().and_then(|value| BodyRef::decode(&value)))
}

impl Spool {
    /// Opens (or creates) the spool in `folder`.
    pub fn open(folder: &Path, cache_size: u64) -> anyhow::Result<Spool> {
        std::fs::create_dir_all(folder)
            .with_context(|| format!("cannot create spool folder {}", folder.display()))?;
        let db = Database::open_db(folder, cache_size)?;
        let bodies = Arc::new(Bodies::open(folder, body_references(&db.open_tree("queue")?))?);
        let database = Database::with_db(db, 0, Arc::clone(&bodies))?;
        Ok(Spool {
            shared: Arc::new(Shared {
                folder: folder.to_path_buf(),
                cache_size,
                bodies,
                current: RwLock::new(Some(database)),
                recovering: AtomicBool::new(false),
                abandoned: Mutex::new(Vec::new()),
            }),
        })
    }

    /// Returns the open database, or an error while it is being reopened.
    fn database(&self) -> anyhow::Result<Database> {
        let current = self.shared.current.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        current
            .clone()
            .ok_or_else(|| anyhow::anyhow!("the spool is being reopened after a write failure"))
    }

    fn tree(&self) -> anyhow::Result<sled::Tree> {
        Ok(self.database()?.tree)
    }

    /// Records that a write to `database` failed, and starts reopening it.
    fn write_failed(&self, database: &Database) {
        recovery::start(&self.shared, database.generation);
    }

    /// Stores a new message and returns once it is durable on disk.
    pub async fn store(&self, message: &NewMessage) -> anyhow::Result<()> {
        let database = self.database()?;
        let (batch, body) = match self.insert_batch(message) {
            Ok(stored) => stored,
            Err(error) => {
                // Nothing reached the database, but the disk is likely full:
                // take the same path as a failed database write, so intake
                // replies 452 until the reopen finds space again.
                self.write_failed(&database);
                return Err(error);
            }
        };
        let result = match database.tree.apply_batch(batch) {
            Ok(()) => database.committer.commit().await,
            Err(error) => {
                self.shared.bodies.release(body);
                Err(error.into())
            }
        };
        if result.is_err() {
            self.shared
                .abandoned
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .push(message.id.clone());
            self.write_failed(&database);
        }
        result
    }

    /// Appends the message body and returns the batch that stores the rest.
    fn insert_batch(&self, message: &NewMessage) -> anyhow::Result<(sled::Batch, BodyRef)> {
        let id = &message.id;
        let body = self.shared.bodies.append(&message.data)?;
        let mut batch = sled::Batch::default();
        batch.insert(message_key(id), &body.encode()[..]);
        batch.insert(envelope_key(id), serde_json::to_vec(&message.envelope)?);
        for (index, recipient) in message.recipients.iter().enumerate() {
            batch.insert(
                recipient_key(id, index as u32),
                serde_json::to_vec(recipient)?,
            );
        }
        Ok((batch, body))
    }

    /// Records new recipient states, and stores `also_store` (a DSN) in the
    /// same atomic batch, so a bounce is never recorded without its DSN.
    /// Durable at the next flush; see [`Spool::flush`].
    pub fn update(
        &self,
        id: &QueueId,
        updates: &[(u32, RecipientRecord)],
        also_store: Option<&NewMessage>,
    ) -> anyhow::Result<()> {
        let (mut batch, body) = match also_store {
            Some(message) => {
                let (batch, body) = self.insert_batch(message)?;
                (batch, Some(body))
            }
            None => (sled::Batch::default(), None),
        };
        for (index, recipient) in updates {
            batch.insert(recipient_key(id, *index), serde_json::to_vec(recipient)?);
        }
        let result = self.apply(batch);
        if let (Err(_), Some(body)) = (&result, body) {
            self.shared.bodies.release(body);
        }
        result
    }

    /// Applies `batch`; a failure starts reopening the database.
    fn apply(&self, batch: sled::Batch) -> anyhow::Result<()> {
        let database = self.database()?;
        if let Err(error) = database.tree.apply_batch(batch) {
            self.write_failed(&database);
            return Err(error.into());
        }
        Ok(())
    }

    /// Waits until everything written so far is on disk.
    pub async fn flush(&self) -> anyhow::Result<()> {
        let database = self.database()?;
        let result = database.committer.commit().await;
        if result.is_err() {
            self.write_failed(&database);
        }
        result
    }

    /// Returns the message bytes, or `None` when the message is gone.
    pub fn message_data(&self, id: &QueueId) -> anyhow::Result<Option<Vec<u8>>> {
        let Some(value) = self.tree()?.get(message_key(id))? else {
            return Ok(None);
        };
        match BodyRef::decode(&value) {
            Some(body) => Ok(Some(self.shared.bodies.read(body).with_context(|| format!("message {id}"))?)),
            // Spools written before the body files kept the bytes inline.
            None => Ok(Some(value.to_vec())),
        }
    }

    pub fn envelope(&self, id: &QueueId) -> anyhow::Result<Option<EnvelopeRecord>> {
        match self.tree()?.get(envelope_key(id))? {
            Some(bytes) => Ok(Some(serde_json::from_slice(&bytes)?)),
            None => Ok(None),
        }
    }

    pub fn recipients(&self, id: &QueueId) -> anyhow::Result<Vec<(u32, RecipientRecord)>> {
        let prefix = format!("r/{id}/");
        let mut recipients = Vec::new();
        for entry in self.tree()?.scan_prefix(prefix.as_bytes()) {
            let (key, value) = entry?;
            let index = parse_recipient_index(&key)
                .with_context(|| format!("corrupt recipient key {:?}", String::from_utf8_lossy(&key)))?;
            recipients.push((index, serde_json::from_slice(&value)?));
        }
        Ok(recipients)
    }

    /// Loads one message's envelope and recipients.
    pub fn load(&self, id: &QueueId) -> anyhow::Result<Option<QueuedMessage>> {
        let Some(envelope) = self.envelope(id)? else {
            return Ok(None);
        };
        Ok(Some(QueuedMessage {
            id: id.clone(),
            envelope,
            recipients: self.recipients(id)?,
        }))
    }

    /// Removes the message when none of its recipients is still pending.
    /// Returns whether it was removed.
    pub fn remove_if_complete(&self, id: &QueueId) -> anyhow::Result<bool> {
        let recipients = self.recipients(id)?;
        if recipients.iter().any(|(_, r)| r.state.is_pending()) {
            return Ok(false);
        }
        let tree = self.tree()?;
        let body = tree.get(message_key(id))?.and_then(|value| BodyRef::decode(&value));
        let mut batch = sled::Batch::default();
        batch.remove(message_key(id));
        batch.remove(envelope_key(id));
        for (index, _) in recipients {
            batch.remove(recipient_key(id, index));
        }
        self.apply(batch)?;
        if let Some(body) = body {
            self.shared.bodies.release(body);
        }
        Ok(true)
    }

    /// Reads every queued message, oldest first (queue ids sort by time).
    /// Messages stream one at a time, so a large queue is never held in
    /// memory at once.
    pub fn scan(&self) -> impl Iterator<Item = anyhow::Result<QueuedMessage>> + '_ {
        let tree = match self.tree() {
            Ok(tree) => tree,
            Err(error) => {
                let failed: Box<dyn Iterator<Item = anyhow::Result<QueuedMessage>>> = Box::new(std::iter::once(Err(error)));
                return failed;
            }
        };
        Box::new(tree.scan_prefix(b"e/").map(move |entry| -> anyhow::Result<QueuedMessage> {
            let (key, value) = entry?;
            let id = QueueId::from_key_suffix(&key[2..]).context("corrupt envelope key")?;
            let envelope: EnvelopeRecord = serde_json::from_slice(&value)?;
            let recipients = self.recipients(&id)?;
            Ok(QueuedMessage {
                id,
                envelope,
                recipients,
            })
        }))
    }

    /// Deletes body files no message needs any more, with a flush when
    /// some are waiting. An idle gateway runs no other flush, so without
    /// this the files of a drained queue would stay on disk.
    pub async fn tidy(&self) -> anyhow::Result<()> {
        if self.shared.bodies.tidy() {
            self.flush().await?;
        }
        Ok(())
    }

    /// Returns the bytes the spool takes on disk, counting the database
    /// only while it is open.
    pub fn size_on_disk(&self) -> u64 {
        let database = self.database().ok().and_then(|database| database.db.size_on_disk().ok()).unwrap_or(0);
        database + self.shared.bodies.size()
    }

    /// Queues one event for webhook `name`, with a spool-wide `id` field
    /// that grows with every event, so receivers can drop duplicates.
    pub fn push_webhook_event(&self, name: &str, event: &serde_json::Value) -> anyhow::Result<()> {
        let tree = self.database()?.db.open_tree("webhooks")?;
        let id = self.database()?.db.generate_id()?;
        let mut event = event.clone();
        if let Some(object) = event.as_object_mut() {
            object.insert("id".to_string(), serde_json::Value::from(id));
        }
        tree.insert(webhook_key(name, id), serde_json::to_vec(&event)?)?;
        Ok(())
    }

    /// Returns up to `limit` queued events of webhook `name`, oldest first,
    /// with their keys.
    pub fn webhook_batch(&self, name: &str, limit: usize) -> anyhow::Result<Vec<(Vec<u8>, serde_json::Value)>> {
        let tree = self.database()?.db.open_tree("webhooks")?;
        let mut batch = Vec::new();
        for entry in tree.scan_prefix(webhook_prefix(name)).take(limit) {
            let (key, value) = entry?;
            batch.push((key.to_vec(), serde_json::from_slice(&value).context("invalid queued webhook event")?));
        }
        Ok(batch)
    }

    /// Removes posted webhook events.
    pub fn remove_webhook_events(&self, keys: impl Iterator<Item = Vec<u8>>) -> anyhow::Result<()> {
        let tree = self.database()?.db.open_tree("webhooks")?;
        let mut batch = sled::Batch::default();
        for key in keys {
            batch.remove(key);
        }
        tree.apply_batch(batch)?;
        Ok(())
    }

    /// Removes every queued event of webhook `name`; returns how many.
    pub fn clear_webhook_events(&self, name: &str) -> anyhow::Result<usize> {
        let tree = self.database()?.db.open_tree("webhooks")?;
        let mut batch = sled::Batch::default();
        let mut count = 0;
        for entry in tree.scan_prefix(webhook_prefix(name)) {
            batch.remove(entry?.0);
            count += 1;
        }
        tree.apply_batch(batch)?;
        Ok(count)
    }

    /// Returns the names of the webhooks that have queued events.
    pub fn webhook_names(&self) -> anyhow::Result<Vec<String>> {
        let tree = self.database()?.db.open_tree("webhooks")?;
        let mut names = Vec::new();
        let mut next = tree.first()?;
        while let Some((key, _)) = next {
            let end = key.iter().position(|b| *b == 0).unwrap_or(key.len());
            let name = String::from_utf8_lossy(&key[..end]).to_string();
            // Skip to the first key after this name's events.
            let mut after = key[..end].to_vec();
            after.push(1);
            next = tree.range(after..).next().transpose()?;
            names.push(name);
        }
        Ok(names)
    }

    /// Returns the stored warmup counters of `source` at `site`.
    pub fn warmup_counters(&self, source: &str, site: &str) -> anyhow::Result<Option<Counters>> {
        let tree = self.database()?.db.open_tree("warmup")?;
        match tree.get(format!("{source}/{site}"))? {
            Some(bytes) => Ok(Some(serde_json::from_slice(&bytes).context("invalid warmup counters")?)),
            None => Ok(None),
        }
    }

    /// Stores warmup counters. They reach the disk with the next flush:
    /// a crash may lose the latest counts, so the source sends less that
    /// day, never more than its cap plus what was in flight.
    pub fn save_warmup_counters(&self, source: &str, site: &str, counters: &Counters) -> anyhow::Result<()> {
        let tree = self.database()?.db.open_tree("warmup")?;
        tree.insert(format!("{source}/{site}"), serde_json::to_vec(counters)?)?;
        Ok(())
    }
}

/// Key of a queued webhook event: the webhook name, a zero byte, and the
/// event id in big-endian order so keys sort by id.
fn webhook_key(name: &str, id: u64) -> Vec<u8> {
    let mut key = webhook_prefix(name);
    key.extend_from_slice(&id.to_be_bytes());
    key
}

fn webhook_prefix(name: &str) -> Vec<u8> {
    let mut key = name.as_bytes().to_vec();
    key.push(0);
    key
}

fn message_key(id: &QueueId) -> Vec<u8> {
    format!("m/{id}").into_bytes()
}

fn envelope_key(id: &QueueId) -> Vec<u8> {
    format!("e/{id}").into_bytes()
}

fn recipient_key(id: &QueueId, index: u32) -> Vec<u8> {
    format!("r/{id}/{index:04}").into_bytes()
}

fn parse_recipient_index(key: &[u8]) -> Option<u32> {
    let slash = key.iter().rposition(|&b| b == b'/')?;
    std::str::from_utf8(&key[slash + 1..]).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(id: QueueId) -> NewMessage {
        NewMessage {
            id,
            envelope: EnvelopeRecord {
                sender: "a@example.com".into(),
                ..EnvelopeRecord::default()
            },
            recipients: vec![
                RecipientRecord::new("x@one.example".into(), "one.example".into()),
                RecipientRecord::new("y@two.example".into(), "two.example".into()),
            ],
            data: b"Subject: t\r\n\r\nbody\r\n".to_vec(),
        }
    }

    #[tokio::test]
    async fn store_survives_reopen() {
        let folder = tempfile::tempdir().unwrap();
        let id = QueueId::generate();
        {
            let spool = Spool::open(folder.path(), 1 << 20).unwrap();
            spool.store(&sample(id.clone())).await.unwrap();
        }
        // The committer task releases its handle on the database after it
        // notices the closed channel, so give it the chance to run.
        let mut reopened = Spool::open(folder.path(), 1 << 20);
        for _ in 0..100 {
            if reopened.is_ok() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            reopened = Spool::open(folder.path(), 1 << 20);
        }
        let spool = reopened.unwrap();
        let messages: Vec<_> = spool.scan().collect::<Result<_, _>>().unwrap();
        assert_eq!(messages.len(), 1);
        assert_eq!(messages[0].id, id);
        assert_eq!(messages[0].recipients.len(), 2);
        let data = spool.message_data(&id).unwrap().unwrap();
        assert_eq!(&data[..], b"Subject: t\r\n\r\nbody\r\n");
    }

    #[tokio::test]
    async fn reopen_removes_abandoned_messages() {
        let folder = tempfile::tempdir().unwrap();
        let spool = Spool::open(folder.path(), 1 << 20).unwrap();
        let kept = QueueId::generate();
        spool.store(&sample(kept.clone())).await.unwrap();
        let abandoned = QueueId::generate();
        spool.store(&sample(abandoned.clone())).await.unwrap();
        spool.shared.abandoned.lock().unwrap().push(abandoned.clone());

        spool.write_failed(&spool.database().unwrap());
        let mut generation = None;
        for _ in 0..100 {
            generation = spool.database().ok().map(|database| database.generation);
            if generation == Some(1) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }

        assert_eq!(generation, Some(1), "the database was not reopened");
        assert!(spool.message_data(&kept).unwrap().is_some());
        assert!(spool.message_data(&abandoned).unwrap().is_none());
        assert!(spool.envelope(&abandoned).unwrap().is_none());
        assert!(spool.recipients(&abandoned).unwrap().is_empty());
        assert_eq!(spool.scan().count(), 1);
        assert!(spool.shared.abandoned.lock().unwrap().is_empty());
    }

    /// sled writes a value larger than a quarter of its 512 KiB segment,
    /// or a tree node holding such values, to a blob file it never syncs.
    /// Bodies must stay out of the database so none ends up there.
    #[tokio::test]
    async fn large_messages_stay_out_of_sled_blob_files() {
        let folder = tempfile::tempdir().unwrap();
        let spool = Spool::open(folder.path(), 1 << 20).unwrap();
        let mut ids = Vec::new();
        for size in std::iter::once(1 << 20).chain(std::iter::repeat_n(50 * 1024, 40)) {
            let mut message = sample(QueueId::generate());
            message.data = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
            spool.store(&message).await.unwrap();
            ids.push((message.id, message.data));
        }
        let blobs: Vec<_> = std::fs::read_dir(folder.path().join("queue").join("blobs"))
            .map(|entries| entries.map(|entry| entry.unwrap().path()).collect())
            .unwrap_or_default();
        assert!(blobs.is_empty(), "sled blob files: {blobs:?}");
        for (id, data) in ids {
            assert_eq!(spool.message_data(&id).unwrap().unwrap(), data);
        }
    }

    #[tokio::test]
    async fn body_file_deleted_after_its_messages_are_removed() {
        let folder = tempfile::tempdir().unwrap();
        let spool = Spool::open(folder.path(), 1 << 20).unwrap();
        let body_files = || std::fs::read_dir(folder.path().join("bodies")).unwrap().count();
        let mut first = sample(QueueId::generate());
        first.data = vec![b'x'; bodies::ROLL_SIZE as usize];
        spool.store(&first).await.unwrap();
        // This one starts the next file, so the first is no longer appended to.
        spool.store(&sample(QueueId::generate())).await.unwrap();
        assert_eq!(body_files(), 2);

        let mut done: Vec<(u32, RecipientRecord)> = spool.recipients(&first.id).unwrap();
        for (_, recipient) in &mut done {
            recipient.state = RcptState::Delivered;
        }
        spool.update(&first.id, &done, None).unwrap();
        assert!(spool.remove_if_complete(&first.id).unwrap());
        assert_eq!(body_files(), 2, "deleted before the removal was flushed");
        spool.flush().await.unwrap();
        spool.flush().await.unwrap();
        assert_eq!(body_files(), 1);
        assert_eq!(spool.scan().count(), 1);
    }

    #[tokio::test]
    async fn tidy_deletes_the_last_body_file() {
        let folder = tempfile::tempdir().unwrap();
        let spool = Spool::open(folder.path(), 1 << 20).unwrap();
        let body_files = || std::fs::read_dir(folder.path().join("bodies")).unwrap().count();
        let message = sample(QueueId::generate());
        spool.store(&message).await.unwrap();
        let mut done = spool.recipients(&message.id).unwrap();
        for (_, recipient) in &mut done {
            recipient.state = RcptState::Delivered;
        }
        spool.update(&message.id, &done, None).unwrap();
        assert!(spool.remove_if_complete(&message.id).unwrap());
        spool.flush().await.unwrap();
        assert_eq!(body_files(), 1, "the active file is kept until tidied");

        spool.tidy().await.unwrap();
        assert_eq!(body_files(), 0);
        assert_eq!(spool.size_on_disk() - spool.database().unwrap().db.size_on_disk().unwrap(), 0);
        let next = sample(QueueId::generate());
        spool.store(&next).await.unwrap();
        assert_eq!(spool.message_data(&next.id).unwrap().unwrap(), next.data);
    }

    #[tokio::test]
    async fn removed_only_when_no_recipient_pending() {
        let folder = tempfile::tempdir().unwrap();
        let spool = Spool::open(folder.path(), 1 << 20).unwrap();
        let id = QueueId::generate();
        spool.store(&sample(id.clone())).await.unwrap();

        let mut first = spool.recipients(&id).unwrap()[0].1.clone();
        first.state = RcptState::Delivered;
        spool.update(&id, &[(0, first)], None).unwrap();
        assert!(!spool.remove_if_complete(&id).unwrap());

        let mut second = spool.recipients(&id).unwrap()[1].1.clone();
        second.state = RcptState::Bounced;
        spool.update(&id, &[(1, second)], None).unwrap();
        assert!(spool.remove_if_complete(&id).unwrap());
        assert!(spool.message_data(&id).unwrap().is_none());
        assert_eq!(spool.scan().count(), 0);
    }
}
