//! The source addresses of `policies/pools.yaml`, as far as the alignment
//! check needs them: the `ip` of every source. Pools, routing and warmup
//! are not applied yet, so every other field of the file is ignored here.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Deserialize;

#[derive(Debug, Clone, Default, Deserialize)]
pub struct PoolsFile {
    #[serde(default)]
    pub pools: BTreeMap<String, Pool>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Pool {
    #[serde(default)]
    pub sources: Vec<Source>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Source {
    pub ip: IpAddr,
    /// EHLO name the source greets with; its PTR name should match it.
    #[serde(default)]
    pub ehlo: Option<String>,
}

impl PoolsFile {
    pub fn parse(text: &str) -> anyhow::Result<PoolsFile> {
        if text.trim().is_empty() {
            return Ok(PoolsFile::default());
        }
        Ok(serde_norway::from_str(text)?)
    }

    /// Returns every source, in pool order, without duplicate IPs.
    pub fn sources(&self) -> Vec<Source> {
        let mut seen = std::collections::HashSet::new();
        self.pools
            .values()
            .flat_map(|pool| pool.sources.iter())
            .filter(|source| seen.insert(source.ip))
            .cloned()
            .collect()
    }

    /// Returns every source IP of every pool, without duplicates.
    // NOTE: until routing to pools exists, a message may leave from any
    // pool's source, so SPF is checked for all of them.
    pub fn source_ips(&self) -> Vec<IpAddr> {
        let mut ips: Vec<IpAddr> = self
            .pools
            .values()
            .flat_map(|pool| pool.sources.iter().map(|source| source.ip))
            .collect();
        ips.sort();
        ips.dedup();
        ips
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_ips_collected() {
        let text = r#"
pools:
  transactional:
    sources:
      - { name: t1, ip: 192.0.2.10, ehlo: t1.mta.example.com }
  marketing:
    overflow: true
    sources:
      - { name: m1, ip: 192.0.2.20, ehlo: m1.mta.example.com, weight: 2 }
      - { name: m2, ip: "2001:db8::1", ehlo: m2.mta.example.com }
routing:
  - { pool: transactional }
"#;
        let pools = PoolsFile::parse(text).unwrap();
        let ips: Vec<String> = pools.source_ips().iter().map(|ip| ip.to_string()).collect();
        assert_eq!(ips, vec!["192.0.2.10", "192.0.2.20", "2001:db8::1"]);
    }
}
