//! MX lookup: the hosts that take a domain's mail (RFC 5321 section 5.1).
//!
//! MX hosts are sorted by preference, equal preferences shuffled. A domain
//! without MX records is its own mail host (the implicit MX). A single MX of
//! `.` is a null MX (RFC 7505): the domain accepts no mail, which is a
//! permanent failure at once. NXDOMAIN is permanent; any other DNS failure
//! is temporary, so the recipient is retried, never bounced on a guess.

use std::net::{IpAddr, SocketAddr};

use hickory_resolver::proto::rr::{RData, RecordType};
use rand::seq::SliceRandom;

use std::time::Instant;

use crate::dns::Resolver;
use crate::metrics::Metrics;
use crate::reply::Reply;

/// One address to try, with the MX name it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub mx: String,
    pub address: SocketAddr,
}

/// Reason no target could be found.
#[derive(Debug, Clone)]
pub enum RouteError {
    /// Retry later (SERVFAIL, timeout, no addresses yet).
    Temporary(Reply),
    /// Bounce now (null MX, NXDOMAIN).
    Permanent(Reply),
}

/// A fixed next hop from `delivery.routes`: a host name or IP, and a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub host: String,
    pub port: Option<u16>,
}

/// Parses `host`, `host:port`, `[v6]` or `[v6]:port`.
pub fn parse_route(text: &str) -> anyhow::Result<Route> {
    let text = text.trim();
    if let Ok(address) = text.parse::<SocketAddr>() {
        return Ok(Route {
            host: address.ip().to_string(),
            port: Some(address.port()),
        });
    }
    if let Ok(ip) = text.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
        return Ok(Route {
            host: ip.to_string(),
            port: None,
        });
    }
    let (host, port) = match text.rsplit_once(':') {
        Some((host, port)) => (host, Some(port.parse::<u16>()?)),
        None => (text, None),
    };
    if host.is_empty() || host.contains(char::is_whitespace) {
        anyhow::bail!("empty or invalid host");
    }
    Ok(Route {
        host: host.to_string(),
        port,
    })
}

/// Resolves the delivery targets for `domain`, in the order to try them.
pub async fn resolve(
    resolver: &Resolver,
    metrics: &Metrics,
    domain: &str,
    default_port: u16,
    route: Option<&Route>,
) -> Result<Vec<Target>, RouteError> {
    if let Some(route) = route {
        let port = route.port.unwrap_or(default_port);
        return addresses(resolver, metrics, &route.host, port).await;
    }

    let fqdn = format!("{}.", domain.trim_end_matches('.'));
    let mut implicit = false;
    let started = Instant::now();
    let mx_lookup = resolver.lookup(fqdn.as_str(), RecordType::MX).await;
    record_lookup(metrics, "MX", started, &mx_lookup);
    let hosts = match mx_lookup {
        Ok(lookup) => {
            let mut records: Vec<(u16, String)> = lookup
                .answers()
                .iter()
                .filter_map(|record| match &record.data {
                    RData::MX(mx) => Some((mx.preference, mx.exchange.to_ascii())),
                    _ => None,
                })
                .collect();
            if records.len() == 1 && (records[0].1 == "." || records[0].1.is_empty()) {
                return Err(RouteError::Permanent(Reply::new(
                    556,
                    "5.1.10",
                    format!("Domain {domain} has a null MX and accepts no mail (RFC 7505)"),
                )));
            }
            records.retain(|(_, host)| host != "." && !host.is_empty());
            order_by_preference(records)
        }
        Err(error) if error.is_nx_domain() => {
            return Err(RouteError::Permanent(Reply::new(
                550,
                "5.1.2",
                format!("Domain {domain} does not exist (NXDOMAIN)"),
            )));
        }
        Err(error) if error.is_no_records_found() => {
            implicit = true;
            vec![fqdn.clone()]
        }
        Err(error) => {
            return Err(RouteError::Temporary(Reply::new(
                451,
                "4.4.3",
                format!("MX lookup for {domain} failed: {error}"),
            )));
        }
    };

    let mut targets = Vec::new();
    let mut last_error = None;
    for host in hosts {
        match addresses(resolver, metrics, &host, default_port).await {
            Ok(found) => targets.extend(found),
            Err(error) => last_error = Some(error),
        }
    }
    if targets.is_empty() {
        // A domain without MX and without addresses takes no mail; MX hosts
        // without addresses are more likely a DNS mistake being fixed.
        return Err(match last_error {
            Some(RouteError::Permanent(_)) if implicit => RouteError::Permanent(Reply::new(
                550,
                "5.1.2",
                format!("Domain {domain} has no MX, A or AAAA record"),
            )),
            Some(RouteError::Temporary(reply)) => RouteError::Temporary(reply),
            _ => RouteError::Temporary(Reply::new(
                451,
                "4.4.4",
                format!("No MX host of {domain} has an A or AAAA record"),
            )),
        });
    }
    Ok(targets)
}

/// Counts a lookup by type and result, and observes its time.
fn record_lookup<T>(metrics: &Metrics, record_type: &str, started: Instant, result: &Result<T, hickory_resolver::net::NetError>) {
    let label = match result {
        Ok(_) => "ok",
        Err(error) if error.is_nx_domain() => "nxdomain",
        Err(error) if error.is_no_records_found() => "nodata",
        Err(_) => "error",
    };
    metrics.dns_lookups.with_label_values(&[record_type, label]).inc();
    metrics
        .dns_lookup_seconds
        .with_label_values(&[record_type])
        .observe(started.elapsed().as_secs_f64());
}

/// Sorts MX hosts by preference and shuffles hosts of equal preference, so
/// load spreads over them (RFC 5321 section 5.1).
fn order_by_preference(mut records: Vec<(u16, String)>) -> Vec<String> {
    let mut rng = rand::rng();
    records.shuffle(&mut rng);
    records.sort_by_key(|(preference, _)| *preference);
    records.into_iter().map(|(_, host)| host).collect()
}

/// Looks up the A and AAAA records of `host`; an IP literal is used as is.
async fn addresses(resolver: &Resolver, metrics: &Metrics, host: &str, port: u16) -> Result<Vec<Target>, RouteError> {
    let name = host.trim_end_matches('.');
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(vec![Target {
            mx: name.to_string(),
            address: SocketAddr::new(ip, port),
        }]);
    }
    let fqdn = format!("{name}.");
    let started = Instant::now();
    let ip_lookup = resolver.lookup_ip(fqdn.as_str()).await;
    record_lookup(metrics, "A/AAAA", started, &ip_lookup);
    match ip_lookup {
        Ok(lookup) => {
            let targets: Vec<Target> = lookup
                .iter()
                .map(|ip| Target {
                    mx: name.to_string(),
                    address: SocketAddr::new(ip, port),
                })
                .collect();
            if targets.is_empty() {
                return Err(RouteError::Temporary(Reply::new(
                    451,
                    "4.4.4",
                    format!("Host {name} has no A or AAAA record"),
                )));
            }
            Ok(targets)
        }
        Err(error) if error.is_nx_domain() || error.is_no_records_found() => {
            Err(RouteError::Permanent(Reply::new(
                550,
                "5.4.4",
                format!("Mail host {name} has no A or AAAA record"),
            )))
        }
        Err(error) => Err(RouteError::Temporary(Reply::new(
            451,
            "4.4.3",
            format!("Address lookup for {name} failed: {error}"),
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parse() {
        assert_eq!(
            parse_route("127.0.0.1:2626").unwrap(),
            Route { host: "127.0.0.1".into(), port: Some(2626) }
        );
        assert_eq!(
            parse_route("[::1]:25").unwrap(),
            Route { host: "::1".into(), port: Some(25) }
        );
        assert_eq!(
            parse_route("relay.example.net").unwrap(),
            Route { host: "relay.example.net".into(), port: None }
        );
        assert!(parse_route("relay.example.net:http").is_err());
        assert!(parse_route("").is_err());
    }

    #[test]
    fn preference_order_kept() {
        let hosts = order_by_preference(vec![(20, "b".into()), (10, "a".into()), (30, "c".into())]);
        assert_eq!(hosts, vec!["a", "b", "c"]);
    }
}
