//! Users who may authenticate with SMTP AUTH: the users file, and the
//! `baton user` commands that manage it.
//!
//! The file has one user per line, `name:hash`, where the hash is an argon2
//! PHC string (`$argon2id$v=19$m=19456,t=2,p=1$salt$hash`). Blank lines are
//! ignored; `baton user` rewrites the whole file, so it keeps no comments.
//! Like a DKIM key, the file must not be readable by group or others: with a
//! hash anyone can try passwords offline.

use std::collections::BTreeMap;
use std::io::{BufRead, IsTerminal, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, RwLock};
use std::time::SystemTime;

use anyhow::{Context, bail};
use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use rand::RngCore;

use crate::config::Config;

/// Maximum user name length in bytes. With [`MAX_PASSWORD_LENGTH`] it keeps an
/// `AUTH PLAIN` command with its base64 initial response within 512 bytes,
/// the smallest allowed `smtp.max_command_line`.
pub const MAX_NAME_LENGTH: usize = 100;
/// Maximum password length in bytes.
pub const MAX_PASSWORD_LENGTH: usize = 256;

/// The users of one users file: names and their argon2 PHC strings.
#[derive(Debug, Default)]
pub struct Users {
    hashes: BTreeMap<String, String>,
}

impl Users {
    /// Reads the users file, rejecting it when group or others may read it.
    pub fn read(path: &Path) -> anyhow::Result<Users> {
        check_permissions(path)?;
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read users file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("invalid users file {}", path.display()))
    }

    /// Reads the users file, or returns no users when it does not exist.
    fn read_or_empty(path: &Path) -> anyhow::Result<Users> {
        match std::fs::metadata(path) {
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(Users::default()),
            _ => Self::read(path),
        }
    }

    fn parse(text: &str) -> anyhow::Result<Users> {
        let mut hashes = BTreeMap::new();
        for (index, line) in text.lines().enumerate() {
            let number = index + 1;
            if line.trim().is_empty() {
                continue;
            }
            let Some((name, hash)) = line.split_once(':') else {
                bail!("line {number}: expected name:hash, found no ':'");
            };
            validate_name(name).with_context(|| format!("line {number}"))?;
            PasswordHash::new(hash)
                .map_err(|error| anyhow::anyhow!("line {number}: user {name:?} has an invalid password hash ({error})"))?;
            if hashes.insert(name.to_string(), hash.to_string()).is_some() {
                bail!("line {number}: user {name:?} is listed twice");
            }
        }
        Ok(Users { hashes })
    }

    /// Writes the users to `path` with mode 0600, replacing the file in one
    /// rename so a reader never sees half a file.
    fn write(&self, path: &Path) -> anyhow::Result<()> {
        let mut text = String::new();
        for (name, hash) in &self.hashes {
            text.push_str(name);
            text.push(':');
            text.push_str(hash);
            text.push('\n');
        }
        let mut temporary = path.as_os_str().to_owned();
        temporary.push(".tmp");
        let temporary = PathBuf::from(temporary);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temporary)
            .with_context(|| format!("cannot write {}", temporary.display()))?;
        // A left-over temporary file keeps its old mode through open().
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot set mode 0600 on {}", temporary.display()))?;
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .with_context(|| format!("cannot write {}", temporary.display()))?;
        std::fs::rename(&temporary, path)
            .with_context(|| format!("cannot replace users file {}", path.display()))?;
        Ok(())
    }

    /// Returns the user names in sorted order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.hashes.keys().map(String::as_str)
    }

    /// Checks `password` for user `name`. An unknown user costs as much
    /// time as a wrong password, so timing does not tell which names exist.
    pub fn verify(&self, name: &str, password: &[u8]) -> bool {
        match self.hashes.get(name) {
            Some(hash) => verify_password(hash, password),
            None => {
                verify_password(&UNKNOWN_USER_HASH, password);
                false
            }
        }
    }
}

/// A hash no password matches, checked for unknown users.
static UNKNOWN_USER_HASH: LazyLock<String> = LazyLock::new(|| {
    let mut random = [0u8; 32];
    rand::rng().fill_bytes(&mut random);
    hash_password(&random).expect("argon2 hashes 32 bytes with the default parameters")
});

/// Rejects a users file that group or others may read, write or execute.
fn check_permissions(path: &Path) -> anyhow::Result<()> {
    let metadata =
        std::fs::metadata(path).with_context(|| format!("cannot read users file {}", path.display()))?;
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "users file {} has mode {mode:04o}, which lets group or others read it; run chmod 600 {}",
            path.display(),
            path.display()
        );
    }
    Ok(())
}

/// Checks that `name` can be stored in the users file and sent in AUTH.
pub fn validate_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty() {
        bail!("user name is empty");
    }
    if name.len() > MAX_NAME_LENGTH {
        bail!("user name is {} bytes long; the maximum is {MAX_NAME_LENGTH}", name.len());
    }
    if let Some(bad) = name.chars().find(|c| *c == ':' || c.is_whitespace() || c.is_control()) {
        bail!("user name {name:?} contains {bad:?}; use no ':', whitespace or control characters");
    }
    Ok(())
}

/// Hashes `password` with argon2id and the argon2 crate's default cost
/// (19 MiB of memory, 2 passes, 1 lane), and a random 16-byte salt.
pub fn hash_password(password: &[u8]) -> anyhow::Result<String> {
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    let salt = SaltString::encode_b64(&salt).map_err(|error| anyhow::anyhow!("cannot encode salt: {error}"))?;
    let hash = Argon2::default()
        .hash_password(password, &salt)
        .map_err(|error| anyhow::anyhow!("argon2 hashing failed: {error}"))?;
    Ok(hash.to_string())
}

/// Checks `password` against a PHC string, with the algorithm and cost
/// that the string names.
pub fn verify_password(hash: &str, password: &[u8]) -> bool {
    match PasswordHash::new(hash) {
        Ok(parsed) => Argon2::default().verify_password(password, &parsed).is_ok(),
        Err(_) => false,
    }
}

/// The users file as intake reads it: read again whenever the file's
/// modification time, size, inode or mode changes, so `baton user add`
/// takes effect without a restart.
pub struct UserStore {
    path: PathBuf,
    loaded: RwLock<Loaded>,
}

struct Loaded {
    stamp: Option<FileStamp>,
    users: Arc<Users>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    size: u64,
    inode: u64,
    mode: u32,
}

fn stamp(path: &Path) -> Option<FileStamp> {
    let metadata = std::fs::metadata(path).ok()?;
    Some(FileStamp {
        modified: metadata.modified().ok(),
        size: metadata.len(),
        inode: metadata.ino(),
        mode: metadata.mode(),
    })
}

impl UserStore {
    /// Reads the users file; an error here stops the start.
    pub fn open(path: &Path) -> anyhow::Result<UserStore> {
        let stamp = stamp(path);
        let users = Users::read(path).context("smtp.auth.users_file")?;
        tracing::info!(file = %path.display(), users = users.hashes.len(), "users file loaded");
        Ok(UserStore {
            path: path.to_path_buf(),
            loaded: RwLock::new(Loaded {
                stamp,
                users: Arc::new(users),
            }),
        })
    }

    /// Returns the current users, reading the file again when it changed.
    /// When that read fails, the error is logged once and the previous
    /// users stay in force.
    pub fn current(&self) -> Arc<Users> {
        let now = stamp(&self.path);
        {
            let loaded = self.loaded.read().expect("users lock");
            if loaded.stamp == now {
                return loaded.users.clone();
            }
        }
        let mut loaded = self.loaded.write().expect("users lock");
        if loaded.stamp != now {
            loaded.stamp = now;
            match Users::read(&self.path) {
                Ok(users) => {
                    tracing::info!(file = %self.path.display(), users = users.hashes.len(), "users file reloaded");
                    loaded.users = Arc::new(users);
                }
                Err(error) => {
                    tracing::error!(error = %format!("{error:#}"), "users file reload failed; keeping the previous users");
                }
            }
        }
        loaded.users.clone()
    }
}

fn users_file(config: &Config) -> anyhow::Result<&Path> {
    config
        .smtp
        .auth
        .users_file
        .as_deref()
        .context("smtp.auth.users_file is not set; add it to the config file (see docs/access.md)")
}

/// `baton user add`: adds a user, or sets a new password for one, with the
/// password read from standard input.
pub fn add(config: &Config, name: &str) -> anyhow::Result<()> {
    let path = users_file(config)?;
    validate_name(name)?;
    let mut users = Users::read_or_empty(path)?;
    let password = read_new_password()?;
    let hash = hash_password(password.as_bytes())?;
    let existed = users.hashes.insert(name.to_string(), hash).is_some();
    users.write(path)?;
    if existed {
        println!("changed the password of {name} in {}", path.display());
    } else {
        println!("added {name} to {}", path.display());
    }
    Ok(())
}

/// `baton user remove`: removes a user.
pub fn remove(config: &Config, name: &str) -> anyhow::Result<()> {
    let path = users_file(config)?;
    let mut users = Users::read_or_empty(path)?;
    if users.hashes.remove(name).is_none() {
        bail!("user {name:?} not found in {}", path.display());
    }
    users.write(path)?;
    println!("removed {name} from {}", path.display());
    Ok(())
}

/// `baton user list`: prints the user names, one per line.
pub fn list(config: &Config) -> anyhow::Result<()> {
    let path = users_file(config)?;
    let users = Users::read_or_empty(path)?;
    for name in users.names() {
        println!("{name}");
    }
    Ok(())
}

/// Reads a new password: from a prompt, typed twice, when standard input
/// is a terminal, otherwise from the first line of standard input. It is
/// never taken from the command line, where `ps` and shell history show it.
fn read_new_password() -> anyhow::Result<String> {
    let password = if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password("Password: ").context("cannot read the password")?;
        let second = rpassword::prompt_password("Repeat the password: ").context("cannot read the password")?;
        if first != second {
            bail!("the two passwords differ; nothing was changed");
        }
        first
    } else {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("cannot read the password from standard input")?;
        let trimmed = line.strip_suffix('\n').unwrap_or(&line);
        trimmed.strip_suffix('\r').unwrap_or(trimmed).to_string()
    };
    if password.is_empty() {
        bail!("the password is empty; give it on standard input or at the prompt");
    }
    if password.len() > MAX_PASSWORD_LENGTH {
        bail!("the password is {} bytes long; the maximum is {MAX_PASSWORD_LENGTH}", password.len());
    }
    if password.contains('\0') {
        bail!("the password contains a NUL byte, which AUTH PLAIN cannot carry");
    }
    Ok(password)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_verifies_only_its_password() {
        let hash = hash_password(b"correct horse").unwrap();
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        assert!(verify_password(&hash, b"correct horse"));
        assert!(!verify_password(&hash, b"correct horsf"));
    }

    #[test]
    fn unknown_user_fails() {
        let hash = hash_password(b"secret").unwrap();
        let users = Users::parse(&format!("alice:{hash}\n")).unwrap();
        assert!(users.verify("alice", b"secret"));
        assert!(!users.verify("bob", b"secret"));
        assert!(!users.verify("Alice", b"secret"));
    }

    #[test]
    fn malformed_lines_named() {
        let error = format!("{:#}", Users::parse("alice\n").unwrap_err());
        assert!(error.contains("line 1"), "{error}");
        let error = format!("{:#}", Users::parse("\nbob:plaintext\n").unwrap_err());
        assert!(error.contains("line 2"), "{error}");
        assert!(error.contains("invalid password hash"), "{error}");
    }

    #[test]
    fn names_with_separators_rejected() {
        assert!(validate_name("alice@example.com").is_ok());
        assert!(validate_name("a:b").is_err());
        assert!(validate_name("a b").is_err());
        assert!(validate_name("").is_err());
        assert!(validate_name(&"x".repeat(MAX_NAME_LENGTH + 1)).is_err());
    }
}
