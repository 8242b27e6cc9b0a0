//! SMTP intake: listeners, the per-connection session and the DATA reader.
//!
//! Intake turns client connections into [`crate::gateway::Submission`]s and
//! hands them to the gateway; it never writes to the spool itself.

pub mod address;
pub mod auth;
pub mod data;
pub mod session;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::gateway::Gateway;

/// State that every listener and session shares.
pub struct Shared {
    /// Permits for `smtp.max_sessions`, counted over all listeners.
    sessions: Arc<Semaphore>,
    /// Present when `smtp.auth.users_file` is set.
    pub authenticator: Option<Arc<auth::Authenticator>>,
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
}

/// Binds every `smtp.listen` and `smtp.implicit_tls_listen` address, so a
/// port in use fails the start, and reads the users file when AUTH is
/// configured.
pub async fn bind(gateway: &Gateway) -> anyhow::Result<Vec<Listener>> {
    let smtp = &gateway.config.smtp;
    let shared = Arc::new(Shared {
        sessions: Arc::new(Semaphore::new(smtp.max_sessions)),
        authenticator: auth::Authenticator::new(smtp)?.map(Arc::new),
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
