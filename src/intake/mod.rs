//! SMTP intake: listeners, the per-connection session and the DATA reader.
//!
//! Intake turns client connections into [`crate::gateway::Submission`]s and
//! hands them to the gateway; it never writes to the spool itself.

pub mod address;
pub mod auth;
pub mod data;
pub mod session;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::gateway::Gateway;

/// State that every listener and session shares.
pub struct Shared {
    /// Permits for `smtp.max_sessions`, counted over all listeners.
    sessions: Arc<Semaphore>,
    max_sessions: usize,
    /// Present when `smtp.auth.users_file` is set.
    pub authenticator: Option<Arc<auth::Authenticator>>,
    /// Open sessions per client IP address, for `smtp.max_connections_per_ip`.
    connections_per_ip: Mutex<HashMap<IpAddr, usize>>,
    max_connections_per_ip: usize,
}

impl Shared {
    /// Counts a new session from `client`, or returns `None` when the client
    /// already has `smtp.max_connections_per_ip` sessions.
    fn claim_connection(self: &Arc<Self>, client: IpAddr) -> Option<ConnectionSlot> {
        let mut connections = self.connections_per_ip.lock().expect("connection count lock");
        let count = connections.entry(client).or_insert(0);
        if *count >= self.max_connections_per_ip {
            return None;
        }
        *count += 1;
        Some(ConnectionSlot {
            shared: self.clone(),
            client,
        })
    }
}

/// One session's place in the per-IP count; released on drop.
struct ConnectionSlot {
    shared: Arc<Shared>,
    client: IpAddr,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut connections = self.shared.connections_per_ip.lock().expect("connection count lock");
        if let Some(count) = connections.get_mut(&self.client) {
            *count -= 1;
            if *count == 0 {
                connections.remove(&self.client);
            }
        }
    }
}

/// A bound SMTP listener.
pub struct Listener {
    tcp: TcpListener,
    /// TLS starts with the first byte (`smtp.implicit_tls_listen`).
    implicit_tls: bool,
    shared: Arc<Shared>,
}

impl Listener {
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// Returns a counter of the sessions open on all listeners.
    pub fn open_sessions(&self) -> OpenSessions {
        OpenSessions(Arc::clone(&self.shared))
    }
}

/// Counter of the SMTP sessions open on all listeners.
pub struct OpenSessions(Arc<Shared>);

impl OpenSessions {
    pub fn count(&self) -> usize {
        self.0.max_sessions.saturating_sub(self.0.sessions.available_permits())
    }
}

/// Binds every `smtp.listen` and `smtp.implicit_tls_listen` address, so a
/// port in use fails the start, and reads the users file when AUTH is
/// configured.
pub async fn bind(gateway: &Gateway) -> anyhow::Result<Vec<Listener>> {
    let smtp = &gateway.config.smtp;
    let shared = Arc::new(Shared {
        sessions: Arc::new(Semaphore::new(smtp.max_sessions)),
        max_sessions: smtp.max_sessions,
        authenticator: auth::Authenticator::new(smtp)?.map(Arc::new),
        connections_per_ip: Mutex::new(HashMap::new()),
        max_connections_per_ip: smtp.max_connections_per_ip,
    });
    let mut listeners = Vec::new();
    for address in &smtp.listen {
        let tcp = TcpListener::bind(address)
            .await
            .with_context(|| format!("cannot listen for SMTP on {address} (smtp.listen)"))?;
        listeners.push(Listener {
            tcp,
            implicit_tls: false,
            shared: shared.clone(),
        });
    }
    for address in &smtp.implicit_tls_listen {
        let tcp = TcpListener::bind(address)
            .await
            .with_context(|| format!("cannot listen for SMTP over TLS on {address} (smtp.implicit_tls_listen)"))?;
        listeners.push(Listener {
            tcp,
            implicit_tls: true,
            shared: shared.clone(),
        });
    }
    Ok(listeners)
}

/// Accepts connections until the task is dropped.
pub async fn serve(gateway: Arc<Gateway>, listener: Listener) {
    let Listener {
        tcp,
        implicit_tls,
        shared,
    } = listener;
    loop {
        let (mut stream, peer) = match tcp.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Typically EMFILE: wait instead of spinning on the error.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        gateway.metrics.intake_connections.inc();
        let Some(slot) = shared.claim_connection(peer.ip()) else {
            tracing::debug!(client_ip = %peer.ip(), limit = shared.max_connections_per_ip, "connection rejected: too many connections from the client IP address");
            let busy = format!(
                "421 4.7.0 {} Too many connections from {}; at most {} at a time\r\n",
                gateway.config.hostname,
                peer.ip(),
                shared.max_connections_per_ip
            );
            tokio::spawn(async move {
                let _ = stream.write_all(busy.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
            continue;
        };
        let Ok(permit) = shared.sessions.clone().try_acquire_owned() else {
            let busy = format!(
                "421 4.3.2 {} Too many concurrent sessions; try again later\r\n",
                gateway.config.hostname
            );
            tokio::spawn(async move {
                let _ = stream.write_all(busy.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
            continue;
        };
        let gateway = gateway.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            gateway.metrics.intake_sessions.inc();
            let stream: Option<Box<dyn session::Io>> = if implicit_tls {
                accept_tls(&gateway, stream, peer).await
            } else {
                Some(Box::new(stream))
            };
            if let Some(stream) = stream {
                session::Session::new(gateway.clone(), shared, stream, peer, implicit_tls)
                    .run()
                    .await;
            }
            gateway.metrics.intake_sessions.dec();
            drop(permit);
            drop(slot);
        });
    }
}

/// Runs the TLS handshake of an implicit TLS connection, within
/// `smtp.command_timeout`. Returns `None` when it fails.
async fn accept_tls(gateway: &Gateway, stream: TcpStream, peer: SocketAddr) -> Option<Box<dyn session::Io>> {
    let Some(acceptor) = gateway.tls_acceptor.clone() else {
        tracing::error!(peer = %peer, "implicit TLS connection closed: no certificate is configured (smtp.tls)");
        return None;
    };
    match tokio::time::timeout(gateway.config.smtp.command_timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls_stream)) => Some(Box::new(tls_stream)),
        Ok(Err(error)) => {
            tracing::info!(peer = %peer, %error, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::info!(peer = %peer, "TLS handshake timed out");
            None
        }
    }
}
