//! Shared integration-test harness: a test DNS server (`dns`), a scripted
//! receiving SMTP server (`receiver`) and a Prometheus server
//! (`prometheus`). Use with `mod common;`.
#![allow(dead_code)]

pub mod dns;
pub mod gateway;
pub mod keys;
pub mod prometheus;
pub mod receiver;
pub mod tls;

use std::net::{IpAddr, Ipv4Addr};

/// Returns the loopback address 127.0.0.`n`.
pub fn loopback(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))
}
