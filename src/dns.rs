//! The one DNS resolver every stage shares, with hickory's cache.

use std::time::Duration;

use anyhow::Context;
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;

use crate::config::DnsConfig;

pub type Resolver = TokioResolver;

/// Builds the resolver: the configured name servers, or the system's.
pub fn build(config: &DnsConfig) -> anyhow::Result<Resolver> {
    let provider = TokioRuntimeProvider::default();
    let mut builder = if config.nameservers.is_empty() {
        TokioResolver::builder(provider)
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
        TokioResolver::builder_with_config(ResolverConfig::from_name_servers(servers), provider)
    };
    let options: &mut ResolverOpts = builder.options_mut();
    options.timeout = Duration::from_secs(5);
    options.attempts = 2;
    // Queries carry fully qualified names; search domains must not apply.
    options.ndots = 0;
    Ok(builder.build()?)
}
