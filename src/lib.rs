//! Baton, an outbound SMTP gateway: intake, DKIM signing, alignment check,
//! durable spool, shaped delivery from outbound pools. The `baton` binary
//! is a thin command line over these modules; the library exists so that
//! benchmarks can reach the hot paths.

pub mod config;
pub mod delivery;
pub mod dkim_cmd;
pub mod dns;
pub mod dns_cmd;
pub mod events;
pub mod explain;
pub mod gateway;
pub mod http;
pub mod intake;
pub mod metrics;
pub mod pipeline;
pub mod policy;
pub mod queue_cmd;
pub mod reply;
pub mod scheduler;
pub mod serve;
pub mod spool;
pub mod tls;
pub mod watch;
pub mod users;
pub mod webhooks;
