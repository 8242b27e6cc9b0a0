//! Reload triggers shared by the policy files and the TLS certificate:
//! SIGHUP, and changes in watched folders. Changes are gathered for half a
//! second, so an editor's or a renewal tool's several writes cause one
//! reload.

use std::path::PathBuf;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};

/// Calls `reload` after each SIGHUP and after each burst of changes in
/// `folders` for which `relevant` returns true. `subject` names what is
/// reloaded, in log lines. Never returns.
pub async fn reload_on_change(
    subject: &'static str,
    folders: Vec<(PathBuf, RecursiveMode)>,
    relevant: impl Fn(&notify::Event) -> bool + Send + 'static,
    mut reload: impl FnMut(),
) {
    let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel::<()>();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event
            && !event.kind.is_access()
            && relevant(&event)
        {
            let _ = sender.send(());
        }
    });
    // The watcher stops when dropped, so it lives as long as this loop.
    let _watcher = match watcher {
        Ok(mut watcher) => {
            for (folder, mode) in &folders {
                if let Err(error) = watcher.watch(folder, *mode) {
                    tracing::warn!(folder = %folder.display(), %error, "cannot watch folder; reload the {subject} with SIGHUP after changes");
                }
            }
            Some(watcher)
        }
        Err(error) => {
            tracing::warn!(%error, "file watching unavailable; reload the {subject} with SIGHUP after changes");
            None
        }
    };
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(error) => {
            tracing::warn!(%error, "cannot handle SIGHUP; the {subject} reload only on file changes");
            None
        }
    };
    loop {
        tokio::select! {
            Some(()) = receiver.recv() => {
                tokio::time::sleep(Duration::from_millis(500)).await;
                while receiver.try_recv().is_ok() {}
            }
            Some(()) = async { match hangup.as_mut() { Some(signal) => signal.recv().await, None => std::future::pending().await } } => {
                tracing::info!("SIGHUP received: reloading the {subject}");
            }
        }
        reload();
    }
}
