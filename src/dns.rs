//! The one DNS resolver every stage shares, with hickory's cache. It lives
//! inside mail-auth's authenticator, so SPF, DKIM and DMARC checks and the
//! MX lookups of delivery share one cache.

use std::time::Duration;

use anyhow::Context;
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts};
use mail_auth::MessageAuthenticator;

use crate::config::DnsConfig;

pub type Resolver = TokioResolver;

/// Builds the authenticator: the configured name servers, or the system's.
pub fn build_authenticator(config: &DnsConfig) -> anyhow::Result<MessageAuthenticator> {
    let (resolver_config, mut options) = if config.nameservers.is_empty() {
        hickory_resolver::system_conf::read_system_conf()
            .context("cannot read the system resolver configuration; set dns.nameservers")?
    } else {
        let servers = config
            .nameservers
            .iter()
            .map(|address| {
                let mut udp = ConnectionConfig::udp();
                udp.port = address.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = address.port();
                NameServerConfig::new(address.ip(), true, vec![udp, tcp])
            })
            .collect();
        (ResolverConfig::from_name_servers(servers), ResolverOpts::default())
    };
    options.timeout = Duration::from_secs(5);
    options.attempts = 2;
    // Queries carry fully qualified names; search domains must not apply.
    options.ndots = 0;
    Ok(MessageAuthenticator::new(resolver_config, options)?)
}

/// Builds a resolver for commands that need only lookups.
pub fn build(config: &DnsConfig) -> anyhow::Result<Resolver> {
    Ok(build_authenticator(config)?.resolver().clone())
}
