//! SMTP AUTH (RFC 4954) with the PLAIN (RFC 4616) and LOGIN mechanisms:
//! who may authenticate over which connection, password checks, and the
//! limit on failed attempts per client IP address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use ipnet::IpNet;

use crate::config::SmtpConfig;
use crate::users::UserStore;

/// Client IP addresses tracked before stale entries are dropped.
const TRACKED_ADDRESSES: usize = 10_000;

type FailureLimiter = RateLimiter<IpAddr, DefaultKeyedStateStore<IpAddr>, DefaultClock, StateInformationMiddleware>;

/// The AUTH state shared by all sessions.
pub struct Authenticator {
    users: Arc<UserStore>,
    cleartext_networks: Vec<IpNet>,
    /// Failed attempts per client IP: a GCRA limiter with a burst of
    /// `smtp.auth.max_failures`.
    failures: FailureLimiter,
    replenish: Duration,
    /// Client IP addresses whose failures used up the burst, with the time
    /// until which AUTH is refused for them.
    lockouts: Mutex<HashMap<IpAddr, Instant>>,
    clock: DefaultClock,
}

impl Authenticator {
    /// Builds the authenticator when `smtp.auth.users_file` is set; reads
    /// the users file, so a missing or unsafe file stops the start.
    pub fn new(config: &SmtpConfig) -> anyhow::Result<Option<Authenticator>> {
        let Some(path) = &config.auth.users_file else {
            return Ok(None);
        };
        let users = Arc::new(UserStore::open(path)?);
        let burst = NonZeroU32::new(config.auth.max_failures).unwrap_or(NonZeroU32::MIN);
        let replenish = (config.auth.failure_window / burst.get()).max(Duration::from_millis(1));
        let quota = Quota::with_period(replenish)
            .expect("replenish period is at least 1 ms")
            .allow_burst(burst);
        Ok(Some(Authenticator {
            users,
            cleartext_networks: config.auth.cleartext_networks.clone(),
            failures: RateLimiter::keyed(quota).with_middleware::<StateInformationMiddleware>(),
            replenish,
            lockouts: Mutex::new(HashMap::new()),
            clock: DefaultClock::default(),
        }))
    }

    /// Tells whether AUTH is offered on a connection: under TLS, or in
    /// clear text from `smtp.auth.cleartext_networks`.
    pub fn offered(&self, client: IpAddr, tls: bool) -> bool {
        tls || self.cleartext_networks.iter().any(|network| network.contains(&client))
    }

    /// Returns how long AUTH stays refused for `client`, when it is locked.
    pub fn locked_for(&self, client: IpAddr) -> Option<Duration> {
        let mut lockouts = self.lockouts.lock().expect("lockout lock");
        let until = *lockouts.get(&client)?;
        let now = Instant::now();
        if until <= now {
            lockouts.remove(&client);
            return None;
        }
        Some(until - now)
    }

    /// Counts a failed attempt from `client`. Returns the lockout time when
    /// this failure used up the client's burst.
    pub fn record_failure(&self, client: IpAddr) -> Option<Duration> {
        let lockout = match self.failures.check_key(&client) {
            Ok(snapshot) if snapshot.remaining_burst_capacity() > 0 => return None,
            Ok(_) => self.replenish,
            Err(not_until) => not_until.wait_time_from(self.clock.now()),
        };
        let mut lockouts = self.lockouts.lock().expect("lockout lock");
        if lockouts.len() >= TRACKED_ADDRESSES {
            let now = Instant::now();
            lockouts.retain(|_, until| *until > now);
        }
        lockouts.insert(client, Instant::now() + lockout);
        if self.failures.len() >= TRACKED_ADDRESSES {
            self.failures.retain_recent();
        }
        Some(lockout)
    }

    /// Checks a user name and password. Argon2 takes tens of milliseconds
    /// of CPU, so it runs on the blocking thread pool.
    pub async fn verify(&self, name: &str, password: Vec<u8>) -> bool {
        let users = self.users.clone();
        let name = name.to_string();
        tokio::task::spawn_blocking(move || users.current().verify(&name, &password))
            .await
            .unwrap_or(false)
    }
}

/// Reason a SASL response was rejected before any password check.
#[derive(Debug, PartialEq, Eq)]
pub enum SaslError {
    /// Not valid base64.
    Base64,
    /// Not `[authzid] NUL authcid NUL passwd`, or a name that is not UTF-8.
    Malformed,
    /// The authorization identity names another user than the one
    /// authenticating; acting for another user is not supported.
    OtherIdentity,
}

/// Decodes one base64 SASL response line; `=` stands for an empty one.
pub fn decode_response(line: &str) -> Result<Vec<u8>, SaslError> {
    if line == "=" {
        return Ok(Vec::new());
    }
    base64::engine::general_purpose::STANDARD
        .decode(line)
        .map_err(|_| SaslError::Base64)
}

/// Splits a decoded PLAIN response into user name and password.
pub fn split_plain(response: &[u8]) -> Result<(String, Vec<u8>), SaslError> {
    let mut parts = response.splitn(3, |&byte| byte == 0);
    let (Some(authzid), Some(authcid), Some(password)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(SaslError::Malformed);
    };
    if authcid.is_empty() || password.contains(&0) {
        return Err(SaslError::Malformed);
    }
    let name = String::from_utf8(authcid.to_vec()).map_err(|_| SaslError::Malformed)?;
    if !authzid.is_empty() && authzid != authcid {
        return Err(SaslError::OtherIdentity);
    }
    Ok((name, password.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_response_split() {
        assert_eq!(split_plain(b"\0alice\0secret"), Ok(("alice".to_string(), b"secret".to_vec())));
        assert_eq!(split_plain(b"alice\0alice\0secret"), Ok(("alice".to_string(), b"secret".to_vec())));
        assert_eq!(split_plain(b"bob\0alice\0secret"), Err(SaslError::OtherIdentity));
        assert_eq!(split_plain(b"\0alice"), Err(SaslError::Malformed));
        assert_eq!(split_plain(b"\0\0secret"), Err(SaslError::Malformed));
        assert_eq!(split_plain(b"\0alice\0sec\0ret"), Err(SaslError::Malformed));
    }

    #[test]
    fn response_base64_checked() {
        assert_eq!(decode_response("="), Ok(Vec::new()));
        assert_eq!(decode_response("AGFsaWNlAHNlY3JldA=="), Ok(b"\0alice\0secret".to_vec()));
        assert_eq!(decode_response("not base64!"), Err(SaslError::Base64));
    }

    #[test]
    fn burst_of_failures_locks() {
        let mut config = SmtpConfig::default();
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("users");
        std::fs::write(&path, "").unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        config.auth.users_file = Some(path);
        config.auth.max_failures = 3;
        config.auth.failure_window = Duration::from_secs(300);
        let authenticator = Authenticator::new(&config).unwrap().unwrap();
        let client: IpAddr = "127.0.0.7".parse().unwrap();
        let other: IpAddr = "127.0.0.8".parse().unwrap();

        assert_eq!(authenticator.record_failure(client), None);
        assert_eq!(authenticator.record_failure(client), None);
        assert!(authenticator.locked_for(client).is_none());
        let lockout = authenticator.record_failure(client).expect("third failure locks");
        assert!(lockout <= Duration::from_secs(100), "{lockout:?}");
        assert!(authenticator.locked_for(client).is_some());
        assert!(authenticator.locked_for(other).is_none());
    }
}
