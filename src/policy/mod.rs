//! Policies read from the `policies` and `keys` folders, as one snapshot
//! that stages read without locking for long. A reload (SIGHUP or a change
//! in either folder) builds a new snapshot and swaps it in; a snapshot that
//! fails to load leaves the last good one in place and logs why.

pub mod pools;
pub mod senders;
pub mod shaping;
pub mod warmup;

use std::path::PathBuf;

use anyhow::Context;
use std::sync::{Arc, RwLock};

use crate::pipeline::dkim::DkimPolicy;

/// Everything the pipeline reads from policy files, loaded together.
pub struct Policy {
    pub dkim: DkimPolicy,
    /// Outbound pools and routing from `pools.yaml`.
    pub pools: pools::Pools,
    /// Warmup schedules from `warmup.yaml`.
    pub warmup: warmup::Schedules,
    /// Event webhooks from `events.yaml`.
    pub webhooks: crate::webhooks::Webhooks,
    /// Delivery limits per site and throttling response rules.
    pub shaping: shaping::Shaping,
}

/// Loads every policy file and key as `baton serve` would, and prints a
/// summary; the error names the file, line and field.
pub fn check(policies: &std::path::Path, keys: &std::path::Path) -> anyhow::Result<()> {
    // `serve` runs on built-in defaults without the folder, but a check of
    // a folder that is not there most likely names the wrong one.
    anyhow::ensure!(
        policies.is_dir(),
        "policies folder {} not found; set `policies:` in the config file or run from the folder that holds policies/",
        policies.display()
    );
    let policy = PolicyStore::read(policies, keys)?;
    let (domains, selectors) = policy.dkim.summary();
    println!(
        "{}: ok ({domains} signing domains with {selectors} selectors, {} pools with {} sources, {} warmup schedules, {} shaping response rules, {} webhooks)",
        policies.display(),
        policy.pools.pools.len(),
        policy.pools.sources().count(),
        policy.warmup.len(),
        policy.shaping.rules.len(),
        policy.webhooks.hooks.len()
    );
    Ok(())
}

/// Loads `pools.yaml` and the `warmup.yaml` schedules its sources name;
/// either file may be absent.
pub fn load_pools(policies: &std::path::Path) -> anyhow::Result<(pools::Pools, warmup::Schedules)> {
    let warmup = match read_optional(&policies.join("warmup.yaml"))? {
        Some((path, text)) => warmup::Schedules::parse(&text).with_context(|| format!("invalid {}", path.display()))?,
        None => warmup::Schedules::default(),
    };
    let pools = match read_optional(&policies.join("pools.yaml"))? {
        Some((path, text)) => pools::Pools::parse(&text, &warmup).with_context(|| format!("invalid {}", path.display()))?,
        None => pools::Pools::default(),
    };
    Ok((pools, warmup))
}

/// Reads a policy file that may be absent.
fn read_optional(path: &std::path::Path) -> anyhow::Result<Option<(PathBuf, String)>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some((path.to_path_buf(), text))),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error).with_context(|| format!("cannot read {}", path.display())),
    }
}

pub struct PolicyStore {
    policies: PathBuf,
    keys: PathBuf,
    current: RwLock<Arc<Policy>>,
}

impl PolicyStore {
    /// Loads the policies; an error here stops the start.
    pub fn load(policies: PathBuf, keys: PathBuf) -> anyhow::Result<PolicyStore> {
        let policy = Self::read(&policies, &keys)?;
        Ok(PolicyStore {
            policies,
            keys,
            current: RwLock::new(Arc::new(policy)),
        })
    }

    fn read(policies: &std::path::Path, keys: &std::path::Path) -> anyhow::Result<Policy> {
        let dkim = DkimPolicy::load(policies, keys)?;
        let (domains, selectors) = dkim.summary();
        tracing::info!(domains, selectors, "DKIM policy loaded");
        let (pools, warmup) = load_pools(policies)?;
        let webhooks = match read_optional(&policies.join("events.yaml"))? {
            Some((path, text)) => crate::webhooks::Webhooks::parse(&text).with_context(|| format!("invalid {}", path.display()))?,
            None => crate::webhooks::Webhooks::default(),
        };
        let shaping = shaping::Shaping::load(policies)?;
        Ok(Policy {
            dkim,
            pools,
            warmup,
            webhooks,
            shaping,
        })
    }

    pub fn current(&self) -> Arc<Policy> {
        self.current.read().expect("policy lock").clone()
    }

    /// Reloads from disk; keeps the current policy when the new one fails.
    pub fn reload(&self) -> bool {
        match Self::read(&self.policies, &self.keys) {
            Ok(policy) => {
                *self.current.write().expect("policy lock") = Arc::new(policy);
                tracing::info!("policies reloaded");
                true
            }
            Err(error) => {
                tracing::error!(error = %format!("{error:#}"), "policy reload failed; keeping the previous policies");
                false
            }
        }
    }

    /// Reloads on SIGHUP and when a file in the policy or key folders
    /// changes.
    pub async fn watch(self: Arc<Self>) {
        let folders = vec![
            (self.policies.clone(), notify::RecursiveMode::Recursive),
            (self.keys.clone(), notify::RecursiveMode::Recursive),
        ];
        crate::watch::reload_on_change("policies", folders, |_| true, || {
            self.reload();
        })
        .await;
    }
}
