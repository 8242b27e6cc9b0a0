//! `policies/pools.yaml`: outbound pools of source IPs and the routing
//! rules that pick a message's pool.
//!
//! Without the file every message uses one pool, `default`, whose single
//! source lets the system choose the address and greets with `hostname`.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;

use anyhow::bail;
use serde::Deserialize;

use super::warmup::Schedules;
use crate::reply::Reply;

/// Name of the pool used without `pools.yaml`.
pub const DEFAULT_POOL: &str = "default";

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolsFile {
    #[serde(default)]
    pools: BTreeMap<String, PoolSpec>,
    #[serde(default)]
    routing: Vec<RouteRule>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolSpec {
    /// The surplus of a cold source goes to the warm sources of the pool.
    #[serde(default)]
    overflow: bool,
    #[serde(default)]
    sources: Vec<SourceSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceSpec {
    /// Defaults to the address as text.
    #[serde(default)]
    name: Option<String>,
    ip: IpAddr,
    #[serde(default)]
    ehlo: Option<String>,
    #[serde(default = "one")]
    weight: u32,
    #[serde(default)]
    warmup: Option<WarmupSpec>,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct WarmupSpec {
    schedule: String,
    /// First day of the schedule, `YYYY-MM-DD` (UTC).
    started: String,
}

/// One routing rule; the first that matches picks the pool.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteRule {
    /// Header whose presence (or value, with `equals`) the rule tests.
    #[serde(default)]
    pub header: Option<String>,
    /// The header's value names the pool.
    #[serde(default)]
    pub pool_from_value: bool,
    /// The header's value must equal this, ignoring case.
    #[serde(default)]
    pub equals: Option<String>,
    /// The envelope sender's or the From header's domain must equal this.
    #[serde(default)]
    pub sender_domain: Option<String>,
    #[serde(default)]
    pub pool: Option<String>,
}

/// A source IP of a pool.
#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    /// Unique across all pools; warmup counters and metrics use it.
    pub name: String,
    /// Address connections bind to; `None` lets the system choose.
    pub ip: Option<IpAddr>,
    /// EHLO name; `None` means the gateway's `hostname`.
    pub ehlo: Option<String>,
    pub weight: u32,
    /// Warmup schedule name and first day (days since the Unix epoch).
    pub warmup: Option<(String, i64)>,
}

#[derive(Debug, Clone)]
pub struct Pool {
    pub name: String,
    pub overflow: bool,
    pub sources: Vec<Source>,
}

/// The loaded pools and routing rules.
#[derive(Debug, Clone)]
pub struct Pools {
    pub pools: BTreeMap<String, Pool>,
    pub routing: Vec<RouteRule>,
    /// Pool of messages stored before pools existed, and of DSNs: the pool
    /// of the last rule without conditions, else the first pool.
    pub fallback: String,
}

/// Message data that routing reads.
pub struct RouteInput<'a> {
    /// Header fields as (name, unfolded value).
    pub headers: &'a [(String, String)],
    pub sender_domain: Option<&'a str>,
    pub from_domain: Option<&'a str>,
}

impl Default for Pools {
    fn default() -> Pools {
        let source = Source {
            name: DEFAULT_POOL.to_string(),
            ip: None,
            ehlo: None,
            weight: 1,
            warmup: None,
        };
        let pool = Pool {
            name: DEFAULT_POOL.to_string(),
            overflow: false,
            sources: vec![source],
        };
        Pools {
            pools: BTreeMap::from([(DEFAULT_POOL.to_string(), pool)]),
            routing: Vec::new(),
            fallback: DEFAULT_POOL.to_string(),
        }
    }
}

/// Parses a `YYYY-MM-DD` date as days since the Unix epoch.
pub fn parse_date(text: &str) -> Option<i64> {
    let mut parts = text.trim().splitn(3, '-');
    let year: i32 = parts.next()?.parse().ok()?;
    let month: u8 = parts.next()?.parse().ok()?;
    let day: u8 = parts.next()?.parse().ok()?;
    let date = time::Date::from_calendar_date(year, time::Month::try_from(month).ok()?, day).ok()?;
    Some((date - time::Date::from_calendar_date(1970, time::Month::January, 1).ok()?).whole_days())
}

impl Pools {
    /// Parses `pools.yaml`; `schedules` are the warmup schedules sources
    /// may name. Errors name the pool, source or rule and the fix.
    pub fn parse(text: &str, schedules: &Schedules) -> anyhow::Result<Pools> {
        if text.trim().is_empty() {
            return Ok(Pools::default());
        }
        let file: PoolsFile = serde_norway::from_str(text)?;
        if file.pools.is_empty() {
            bail!("no pools defined; add at least one pool under `pools:`, or remove the file to use the default pool");
        }
        let mut names = HashSet::new();
        let mut pools = BTreeMap::new();
        for (pool_name, spec) in file.pools {
            if spec.sources.is_empty() {
                bail!("pool {pool_name:?} has no sources; list at least one under `sources:`");
            }
            let mut sources = Vec::new();
            for source in spec.sources {
                let name = source.name.clone().unwrap_or_else(|| source.ip.to_string());
                if !names.insert(name.clone()) {
                    bail!("source name {name:?} is used twice; give every source a unique name");
                }
                if source.weight == 0 {
                    bail!("source {name:?} has weight 0; use 1 or more, or remove the source");
                }
                if source.ip.is_unspecified() {
                    bail!("source {name:?} has the unspecified address {}; give the address to bind to", source.ip);
                }
                let warmup = match source.warmup {
                    None => None,
                    Some(warmup) => {
                        if !schedules.contains(&warmup.schedule) {
                            bail!(
                                "source {name:?} names warmup schedule {:?}, which policies/warmup.yaml does not define",
                                warmup.schedule
                            );
                        }
                        let Some(started) = parse_date(&warmup.started) else {
                            bail!("source {name:?} has invalid warmup start {:?}; write a date such as 2026-12-01", warmup.started);
                        };
                        Some((warmup.schedule, started))
                    }
                };
                sources.push(Source {
                    name,
                    ip: Some(source.ip),
                    ehlo: source.ehlo,
                    weight: source.weight,
                    warmup,
                });
            }
            pools.insert(
                pool_name.clone(),
                Pool {
                    name: pool_name,
                    overflow: spec.overflow,
                    sources,
                },
            );
        }
        for (index, rule) in file.routing.iter().enumerate() {
            let number = index + 1;
            match (&rule.pool, rule.pool_from_value) {
                (Some(pool), false) if !pools.contains_key(pool) => {
                    bail!("routing rule {number} names pool {pool:?}, which is not defined under `pools:`")
                }
                (None, false) => bail!("routing rule {number} has no `pool`; name the pool, or set `pool_from_value: true` with a header"),
                (Some(_), true) => bail!("routing rule {number} has both `pool` and `pool_from_value`; keep one"),
                (None, true) if rule.header.is_none() => bail!("routing rule {number} sets `pool_from_value` without a `header`"),
                _ => {}
            }
            if rule.equals.is_some() && rule.header.is_none() {
                bail!("routing rule {number} sets `equals` without a `header`");
            }
        }
        let fallback = file
            .routing
            .iter()
            .rev()
            .find(|rule| rule.header.is_none() && rule.sender_domain.is_none())
            .and_then(|rule| rule.pool.clone())
            .unwrap_or_else(|| pools.keys().next().expect("at least one pool").clone());
        Ok(Pools {
            pools,
            routing: file.routing,
            fallback,
        })
    }

    /// Returns the pool named `name`, or the fallback pool for an empty name.
    pub fn get(&self, name: &str) -> Option<&Pool> {
        if name.is_empty() {
            return self.pools.get(&self.fallback);
        }
        self.pools.get(name)
    }

    /// Returns every source of every pool.
    pub fn sources(&self) -> impl Iterator<Item = &Source> {
        self.pools.values().flat_map(|pool| pool.sources.iter())
    }

    /// Returns the source IPs of `pool`, sorted, without duplicates.
    pub fn source_ips(&self, pool: &str) -> Vec<IpAddr> {
        let mut ips: Vec<IpAddr> = self
            .get(pool)
            .map(|pool| pool.sources.iter().filter_map(|source| source.ip).collect())
            .unwrap_or_default();
        ips.sort();
        ips.dedup();
        ips
    }

    /// Picks the pool of a message by the first matching rule. Without
    /// rules, or when none matches, the fallback pool. A pool named by a
    /// header that does not exist rejects the message.
    pub fn route(&self, input: &RouteInput<'_>) -> Result<String, Reply> {
        for rule in &self.routing {
            let value = match &rule.header {
                Some(name) => match input.headers.iter().find(|(field, _)| field.eq_ignore_ascii_case(name)) {
                    Some((_, value)) => Some(value.trim()),
                    None => continue,
                },
                None => None,
            };
            if let (Some(expected), Some(value)) = (&rule.equals, value)
                && !expected.eq_ignore_ascii_case(value)
            {
                continue;
            }
            if let Some(domain) = &rule.sender_domain {
                let matches = |candidate: Option<&str>| candidate.is_some_and(|c| c.eq_ignore_ascii_case(domain));
                if !matches(input.sender_domain) && !matches(input.from_domain) {
                    continue;
                }
            }
            if rule.pool_from_value {
                let name = value.unwrap_or_default();
                if !self.pools.contains_key(name) {
                    let header = rule.header.as_deref().unwrap_or_default();
                    return Err(Reply::new(
                        550,
                        "5.7.0",
                        format!("Pool {name:?} named by {header} is not defined in policies/pools.yaml; use one of: {}", self.names()),
                    ));
                }
                return Ok(name.to_string());
            }
            return Ok(rule.pool.clone().expect("validated at load"));
        }
        Ok(self.fallback.clone())
    }

    fn names(&self) -> String {
        self.pools.keys().cloned().collect::<Vec<_>>().join(", ")
    }
}

/// Header fields that only steer routing; they are removed before signing.
pub const ROUTING_HEADERS: [&str; 2] = ["X-Baton-Pool", "X-Baton-Stream"];

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
pools:
  transactional:
    sources:
      - { name: t1, ip: 192.0.2.10, ehlo: t1.mta.example.com }
  marketing:
    overflow: true
    sources:
      - { name: m1, ip: 192.0.2.20, ehlo: m1.mta.example.com, weight: 2 }
      - { name: m2, ip: "2001:db8::1", ehlo: m2.mta.example.com, warmup: { schedule: standard, started: 2026-12-01 } }
routing:
  - { header: X-Baton-Pool, pool_from_value: true }
  - { header: X-Baton-Stream, equals: marketing, pool: marketing }
  - { sender_domain: news.example.com, pool: marketing }
  - { pool: transactional }
"#;

    fn schedules() -> Schedules {
        Schedules::parse("schedules:\n  standard:\n    daily: [50, 100]\n").unwrap()
    }

    fn headers(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect()
    }

    fn route(pools: &Pools, pairs: &[(&str, &str)], sender: Option<&str>) -> Result<String, Reply> {
        let headers = headers(pairs);
        pools.route(&RouteInput {
            headers: &headers,
            sender_domain: sender,
            from_domain: None,
        })
    }

    #[test]
    fn example_parses() {
        let pools = Pools::parse(EXAMPLE, &schedules()).unwrap();
        assert_eq!(pools.fallback, "transactional");
        let m2 = &pools.pools["marketing"].sources[1];
        assert_eq!(m2.warmup, Some(("standard".to_string(), parse_date("2026-12-01").unwrap())));
        let ips: Vec<String> = pools.source_ips("marketing").iter().map(|ip| ip.to_string()).collect();
        assert_eq!(ips, vec!["192.0.2.20", "2001:db8::1"]);
    }

    #[test]
    fn routing_rules_in_order() {
        let pools = Pools::parse(EXAMPLE, &schedules()).unwrap();
        assert_eq!(route(&pools, &[("x-baton-pool", " marketing ")], None).unwrap(), "marketing");
        assert_eq!(route(&pools, &[("X-Baton-Stream", "Marketing")], None).unwrap(), "marketing");
        assert_eq!(route(&pools, &[("X-Baton-Stream", "alerts")], None).unwrap(), "transactional");
        assert_eq!(route(&pools, &[], Some("news.example.com")).unwrap(), "marketing");
        assert_eq!(route(&pools, &[], Some("example.com")).unwrap(), "transactional");
    }

    #[test]
    fn unknown_pool_in_header_rejected() {
        let pools = Pools::parse(EXAMPLE, &schedules()).unwrap();
        let reply = route(&pools, &[("X-Baton-Pool", "bulk")], None).unwrap_err();
        assert_eq!(reply.code, 550);
        assert!(reply.text().contains("\"bulk\""), "{}", reply.text());
    }

    #[test]
    fn invalid_files_name_the_problem() {
        let cases = [
            ("pools:\n  a:\n    sources: []\n", "pool \"a\" has no sources"),
            (
                "pools:\n  a:\n    sources: [{ name: s, ip: 192.0.2.1 }, { name: s, ip: 192.0.2.2 }]\n",
                "source name \"s\" is used twice",
            ),
            ("pools:\n  a:\n    sources: [{ name: s, ip: 192.0.2.1 }]\nrouting:\n  - { pool: b }\n", "names pool \"b\""),
            (
                "pools:\n  a:\n    sources: [{ name: s, ip: 192.0.2.1, warmup: { schedule: fast, started: 2026-12-01 } }]\n",
                "warmup schedule \"fast\"",
            ),
            ("pools:\n  a:\n    sources: [{ name: s, ip: 192.0.2.1, colour: red }]\n", "unknown field `colour`"),
        ];
        for (text, expected) in cases {
            let error = format!("{:#}", Pools::parse(text, &schedules()).unwrap_err());
            assert!(error.contains(expected), "{expected:?} not in {error:?}");
        }
    }

    #[test]
    fn no_file_means_default_pool() {
        let pools = Pools::parse("", &schedules()).unwrap();
        assert_eq!(route(&pools, &[], None).unwrap(), DEFAULT_POOL);
        assert_eq!(pools.pools[DEFAULT_POOL].sources[0].ip, None);
    }
}
