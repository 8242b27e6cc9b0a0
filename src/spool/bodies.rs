//! Message bodies, appended to log files beside the queue database.
//!
//! sled 0.34 rewrites a whole tree node when it consolidates one, so a node
//! of sixteen 50 KB messages went to disk again and again. It also writes a
//! node larger than a quarter of a segment (128 KiB by default) to a blob
//! file. It never fsyncs that file (`write_blob` in sled's `blob_io.rs`),
//! so a large message could vanish in a power cut after its `250`. Bodies
//! therefore live here, and the database keeps a small [`BodyRef`] per
//! message.
//!
//! # Format
//! `bodies/<n>.log`, where `n` is a 16-digit hexadecimal sequence number.
//! Each body is appended as is, without framing; its reference holds the
//! file, offset, length and a CRC-32 of the bytes. A new file starts when
//! the current one passes [`ROLL_SIZE`], and on every opening of the spool,
//! so no file is ever appended to after a crash.
//!
//! # Durability and removal
//! [`Bodies::sync`] fdatasyncs every file written since the last call, and
//! the folder when a file was created. The group commit runs it before the
//! database flush, so a durable reference always points at durable bytes.
//!
//! Each file counts the live references into it. When a count reaches zero
//! on a file no longer appended to, the file is deleted, but only after the
//! next database flush: until then, a crash could bring back the removed
//! references.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::Context;

/// A file takes no more bodies once it is this large.
pub const ROLL_SIZE: u64 = 16 * 1024 * 1024;

/// Files kept open at most, apart from the ones not yet synced. A queue of
/// 50 GB spans about 3,000 files, more than the usual limit of 1,024 open
/// files per process.
const MAX_OPEN_FILES: usize = 64;

/// Location of one body: file, offset, length and CRC-32, encoded in
/// [`BodyRef::ENCODED_LEN`] bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyRef {
    pub file: u64,
    pub offset: u64,
    pub len: u32,
    pub crc: u32,
}

impl BodyRef {
    const MAGIC: &'static [u8; 2] = b"B1";
    pub const ENCODED_LEN: usize = 26;

    pub fn encode(&self) -> [u8; Self::ENCODED_LEN] {
        let mut bytes = [0u8; Self::ENCODED_LEN];
        bytes[..2].copy_from_slice(Self::MAGIC);
        bytes[2..10].copy_from_slice(&self.file.to_be_bytes());
        bytes[10..18].copy_from_slice(&self.offset.to_be_bytes());
        bytes[18..22].copy_from_slice(&self.len.to_be_bytes());
        bytes[22..26].copy_from_slice(&self.crc.to_be_bytes());
        bytes
    }

    /// Decodes a stored reference, or returns `None` when `bytes` is not one.
    pub fn decode(bytes: &[u8]) -> Option<BodyRef> {
        if bytes.len() != Self::ENCODED_LEN || &bytes[..2] != Self::MAGIC {
            return None;
        }
        let u64_at = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let u32_at = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        Some(BodyRef {
            file: u64_at(2),
            offset: u64_at(10),
            len: u32_at(18),
            crc: u32_at(22),
        })
    }
}

pub struct Bodies {
    folder: PathBuf,
    /// [`ROLL_SIZE`], smaller in tests.
    roll_size: u64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// File that new bodies go to, created by the first append.
    active: Option<Active>,
    /// The number the next new file gets.
    next_file: u64,
    /// Open files, for reading and syncing: the active file, the ones not
    /// yet synced, and up to [`MAX_OPEN_FILES`] read recently.
    open: HashMap<u64, Arc<File>>,
    /// Live references per file.
    live: HashMap<u64, u64>,
    /// Files written since the last sync.
    dirty: HashSet<u64>,
    /// Whether a file was created since the last sync.
    folder_dirty: bool,
    /// Files with no live reference, deleted after the next database flush.
    unused: Vec<u64>,
    /// Bytes in all files.
    size: u64,
}

impl State {
    /// Adds an open file, first closing one that is neither active nor
    /// waiting for a sync when [`MAX_OPEN_FILES`] are open.
    fn keep_open(&mut self, number: u64, file: Arc<File>) {
        if self.open.len() >= MAX_OPEN_FILES {
            let active = self.active.as_ref().map(|active| active.number);
            let closable = self
                .open
                .keys()
                .copied()
                .find(|open| Some(*open) != active && !self.dirty.contains(open));
            if let Some(closable) = closable {
                self.open.remove(&closable);
            }
        }
        self.open.insert(number, file);
    }
}

struct Active {
    number: u64,
    len: u64,
}

impl Bodies {
    /// Opens the `bodies` folder under `spool`. `references` yields every
    /// reference stored in the database; files no reference points into
    /// are deleted.
    pub fn open(spool: &Path, references: impl Iterator<Item = BodyRef>) -> anyhow::Result<Bodies> {
        let folder = spool.join("bodies");
        std::fs::create_dir_all(&folder).with_context(|| format!("cannot create {}", folder.display()))?;
        let bodies = Bodies {
            folder,
            roll_size: ROLL_SIZE,
            state: Mutex::new(State::default()),
        };
        let mut state = bodies.lock();
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&bodies.folder).with_context(|| format!("cannot read {}", bodies.folder.display()))? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(number) = name.to_str().and_then(parse_file_name) else {
                continue;
            };
            files.push((number, entry.metadata()?.len()));
        }
        state.next_file = files.iter().map(|(number, _)| number + 1).max().unwrap_or(0);
        for reference in references {
            *state.live.entry(reference.file).or_default() += 1;
        }
        for (number, len) in files {
            if state.live.contains_key(&number) {
                state.size += len;
            } else {
                let path = bodies.path(number);
                std::fs::remove_file(&path).with_context(|| format!("cannot remove unused {}", path.display()))?;
            }
        }
        drop(state);
        Ok(bodies)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn path(&self, number: u64) -> PathBuf {
        self.folder.join(format!("{number:016x}.log"))
    }

    /// Appends `data` and counts the reference as live. The bytes are
    /// durable after the next [`Bodies::sync`].
    pub fn append(&self, data: &[u8]) -> anyhow::Result<BodyRef> {
        let len = u32::try_from(data.len()).context("message larger than 4 GiB")?;
        let mut state = self.lock();
        let full = state.active.as_ref().is_none_or(|active| active.len >= self.roll_size);
        if full {
            self.start_file(&mut state)?;
        }
        let active = state.active.as_ref().expect("a file was just started");
        let (number, offset) = (active.number, active.len);
        let file = Arc::clone(&state.open[&number]);
        if let Err(error) = file.write_all_at(data, offset) {
            // The tail of this file is now unknown, so the next body starts
            // a new file.
            self.retire_active(&mut state);
            return Err(anyhow::Error::new(error).context(format!("cannot write to {}", self.path(number).display())));
        }
        if let Some(active) = state.active.as_mut() {
            active.len += u64::from(len);
        }
        state.size += u64::from(len);
        state.dirty.insert(number);
        *state.live.entry(number).or_default() += 1;
        Ok(BodyRef {
            file: number,
            offset,
            len,
            crc: crc32fast::hash(data),
        })
    }

    /// Retires the current file, if any, and creates the next one.
    fn start_file(&self, state: &mut State) -> anyhow::Result<()> {
        self.retire_active(state);
        let number = state.next_file;
        state.next_file += 1;
        let path = self.path(number);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        state.keep_open(number, Arc::new(file));
        state.folder_dirty = true;
        state.active = Some(Active { number, len: 0 });
        Ok(())
    }

    /// Stops appending to the current file; it is deleted once unused.
    fn retire_active(&self, state: &mut State) {
        if let Some(active) = state.active.take()
            && state.live.get(&active.number).copied().unwrap_or(0) == 0
        {
            state.unused.push(active.number);
        }
    }

    /// Reads a body and checks its CRC.
    pub fn read(&self, reference: BodyRef) -> anyhow::Result<Vec<u8>> {
        let file = {
            let mut state = self.lock();
            match state.open.get(&reference.file) {
                Some(file) => Arc::clone(file),
                None => {
                    let path = self.path(reference.file);
                    let file = Arc::new(File::open(&path).with_context(|| format!("cannot open {}", path.display()))?);
                    state.keep_open(reference.file, Arc::clone(&file));
                    file
                }
            }
        };
        let mut data = vec![0u8; reference.len as usize];
        file.read_exact_at(&mut data, reference.offset).with_context(|| {
            format!(
                "cannot read {} bytes at offset {} of {}",
                reference.len,
                reference.offset,
                self.path(reference.file).display()
            )
        })?;
        anyhow::ensure!(
            crc32fast::hash(&data) == reference.crc,
            "message body at offset {} of {} fails its checksum",
            reference.offset,
            self.path(reference.file).display()
        );
        Ok(data)
    }

    /// Counts one reference into `reference.file` as gone. Call it after
    /// the database change that removes the reference is applied.
    pub fn release(&self, reference: BodyRef) {
        let mut state = self.lock();
        let Some(count) = state.live.get_mut(&reference.file) else {
            return;
        };
        *count = count.saturating_sub(1);
        let unused = *count == 0;
        let active = state.active.as_ref().is_some_and(|active| active.number == reference.file);
        if unused && !active {
            state.unused.push(reference.file);
        }
    }

    /// Makes every appended body durable. Returns the files that were
    /// unused when the sync began: delete them with
    /// [`Bodies::delete_unused`] once the database flush that follows
    /// has succeeded.
    pub fn sync(&self) -> anyhow::Result<Vec<u64>> {
        let (files, folder_dirty, unused) = {
            let mut guard = self.lock();
            let state = &mut *guard;
            let open = &state.open;
            let files: Vec<(u64, Arc<File>)> = state
                .dirty
                .drain()
                .filter_map(|number| open.get(&number).map(|file| (number, Arc::clone(file))))
                .collect();
            let folder_dirty = std::mem::take(&mut state.folder_dirty);
            (files, folder_dirty, std::mem::take(&mut state.unused))
        };
        let result = (|| -> anyhow::Result<()> {
            for (number, file) in &files {
                file.sync_data().with_context(|| format!("cannot sync {}", self.path(*number).display()))?;
            }
            if folder_dirty {
                File::open(&self.folder)
                    .and_then(|folder| folder.sync_all())
                    .with_context(|| format!("cannot sync folder {}", self.folder.display()))?;
            }
            Ok(())
        })();
        if let Err(error) = result {
            // What reached the disk is unknown: sync these again next time,
            // and append to a new file.
            let mut state = self.lock();
            state.dirty.extend(files.iter().map(|(number, _)| *number));
            state.folder_dirty |= folder_dirty;
            state.unused.extend(unused);
            self.retire_active(&mut state);
            return Err(error);
        }
        Ok(unused)
    }

    /// Takes back files [`Bodies::sync`] returned when the database flush
    /// failed, to delete them after a later one.
    pub fn keep_unused(&self, files: Vec<u64>) {
        self.lock().unused.extend(files);
    }

    /// Deletes files [`Bodies::sync`] returned, unless a reference into
    /// one appeared since.
    pub fn delete_unused(&self, files: Vec<u64>) {
        for number in files {
            let mut state = self.lock();
            let in_use = state.live.get(&number).copied().unwrap_or(0) > 0
                || state.active.as_ref().is_some_and(|active| active.number == number);
            if in_use {
                continue;
            }
            state.live.remove(&number);
            state.open.remove(&number);
            state.dirty.remove(&number);
            let path = self.path(number);
            let len = std::fs::metadata(&path).map(|metadata| metadata.len()).unwrap_or(0);
            state.size = state.size.saturating_sub(len);
            drop(state);
            if let Err(error) = std::fs::remove_file(&path)
                && error.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(file = %path.display(), %error, "cannot delete an unused body file");
            }
        }
    }

    /// Recounts the live references after the database was reopened, from
    /// `references`, every reference it now holds. A file waiting for
    /// deletion stays when the reopened database points into it again.
    pub fn recount(&self, references: impl Iterator<Item = BodyRef>) {
        let mut state = self.lock();
        let mut known: HashSet<u64> = state.live.keys().chain(state.open.keys()).copied().collect();
        known.extend(state.unused.drain(..));
        state.live.clear();
        for reference in references {
            *state.live.entry(reference.file).or_default() += 1;
        }
        let active = state.active.as_ref().map(|active| active.number);
        state.unused = known
            .into_iter()
            .filter(|number| !state.live.contains_key(number) && Some(*number) != active)
            .collect();
    }

    /// Stops appending to the active file when no live reference points
    /// into it, so that it can be deleted too. Returns whether any file
    /// waits for deletion at the next flush.
    pub fn tidy(&self) -> bool {
        let mut state = self.lock();
        let active_unused = state
            .active
            .as_ref()
            .is_some_and(|active| active.len > 0 && state.live.get(&active.number).copied().unwrap_or(0) == 0);
        if active_unused {
            self.retire_active(&mut state);
        }
        !state.unused.is_empty()
    }

    /// Bytes in all body files.
    pub fn size(&self) -> u64 {
        self.lock().size
    }
}

fn parse_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".log")?;
    (digits.len() == 16).then(|| u64::from_str_radix(digits, 16).ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(folder: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(folder.join("bodies"))
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn reference_round_trips() {
        let reference = BodyRef {
            file: 7,
            offset: 1 << 40,
            len: 51_200,
            crc: 0xDEAD_BEEF,
        };
        assert_eq!(BodyRef::decode(&reference.encode()), Some(reference));
        assert_eq!(BodyRef::decode(b"Subject: a message stored inline"), None);
    }

    #[test]
    fn read_checks_the_checksum() {
        let folder = tempfile::tempdir().unwrap();
        let bodies = Bodies::open(folder.path(), std::iter::empty()).unwrap();
        let reference = bodies.append(b"Subject: one\r\n\r\nbody\r\n").unwrap();
        assert_eq!(bodies.read(reference).unwrap(), b"Subject: one\r\n\r\nbody\r\n");
        let corrupt = BodyRef {
            crc: reference.crc ^ 1,
            ..reference
        };
        let error = bodies.read(corrupt).unwrap_err();
        assert!(format!("{error:#}").contains("fails its checksum"), "{error:#}");
    }

    #[test]
    fn unused_file_deleted_only_after_the_next_sync() {
        let folder = tempfile::tempdir().unwrap();
        let bodies = Bodies::open(folder.path(), std::iter::empty()).unwrap();
        let big = vec![b'x'; ROLL_SIZE as usize];
        let first = bodies.append(&big).unwrap();
        let second = bodies.append(b"second").unwrap();
        assert_ne!(first.file, second.file, "a full file rolls over");
        assert_eq!(bodies.sync().unwrap(), Vec::<u64>::new());

        bodies.release(first);
        assert_eq!(files(folder.path()).len(), 2, "deleted before the database flush");
        let unused = bodies.sync().unwrap();
        assert_eq!(unused, vec![first.file]);
        bodies.delete_unused(unused);
        assert_eq!(files(folder.path()), vec![format!("{:016x}.log", second.file)]);
        assert_eq!(bodies.read(second).unwrap(), b"second");
        assert_eq!(bodies.size(), 6);
    }

    #[test]
    fn open_files_stay_bounded() {
        let folder = tempfile::tempdir().unwrap();
        let mut bodies = Bodies::open(folder.path(), std::iter::empty()).unwrap();
        bodies.roll_size = 1024;
        let big = vec![b'z'; 1024];
        let mut references = Vec::new();
        for _ in 0..MAX_OPEN_FILES + 10 {
            references.push(bodies.append(&big).unwrap());
            bodies.sync().unwrap();
        }
        for reference in &references {
            assert_eq!(bodies.read(*reference).unwrap().len(), big.len());
        }
        assert!(bodies.lock().open.len() <= MAX_OPEN_FILES, "{} files open", bodies.lock().open.len());
    }

    #[test]
    fn reopen_keeps_referenced_files() {
        let folder = tempfile::tempdir().unwrap();
        let (kept, dropped) = {
            let bodies = Bodies::open(folder.path(), std::iter::empty()).unwrap();
            let kept = bodies.append(b"kept").unwrap();
            let big = vec![b'y'; ROLL_SIZE as usize];
            let dropped = bodies.append(&big).unwrap();
            let dropped = (dropped, bodies.append(b"rolls over").unwrap());
            bodies.sync().unwrap();
            (kept, dropped)
        };
        assert_eq!(kept.file, dropped.0.file);
        // Only `kept` is still referenced: the second file goes.
        let bodies = Bodies::open(folder.path(), [kept].into_iter()).unwrap();
        assert_eq!(files(folder.path()), vec![format!("{:016x}.log", kept.file)]);
        assert_eq!(bodies.read(kept).unwrap(), b"kept");
        let next = bodies.append(b"after reopening").unwrap();
        assert!(next.file > dropped.1.file, "appended to an old file: {next:?}");
    }
}
