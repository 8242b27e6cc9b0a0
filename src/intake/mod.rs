//! SMTP intake: listeners, the per-connection session and the DATA reader.
//!
//! Intake turns client connections into [`crate::gateway::Submission`]s and
//! hands them to the gateway; it never writes to the spool itself.

pub mod address;
pub mod data;
pub mod session;

use std::sync::Arc;

use anyhow::Context;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::gateway::Gateway;

/// Binds every `smtp.listen` address, so a port in use fails the start.
pub async fn bind(gateway: &Gateway) -> anyhow::Result<Vec<TcpListener>> {
    let mut listeners = Vec::new();
    for address in &gateway.config.smtp.listen {
        let listener = TcpListener::bind(address)
            .await
            .with_context(|| format!("cannot listen for SMTP on {address} (smtp.listen)"))?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// Accepts connections until the task is dropped.
pub async fn serve(gateway: Arc<Gateway>, listener: TcpListener) {
    let sessions = Arc::new(Semaphore::new(gateway.config.smtp.max_sessions));
    loop {
        let (mut stream, peer) = match listener.accept().await {
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
        let Ok(permit) = sessions.clone().try_acquire_owned() else {
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
        tokio::spawn(async move {
            gateway.metrics.intake_sessions.inc();
            session::Session::new(gateway.clone(), Box::new(stream), peer)
                .run()
                .await;
            gateway.metrics.intake_sessions.dec();
            drop(permit);
        });
    }
}
