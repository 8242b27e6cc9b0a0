//! `baton serve`: builds the gateway, resumes the queue from the spool and
//! runs the SMTP and HTTP listeners until SIGINT or SIGTERM.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context;

use crate::config::Config;
use crate::gateway::Gateway;
use crate::spool::Spool;

pub async fn run(config: Config) -> anyhow::Result<()> {
    let spool = Spool::open(&config.spool.path, config.spool.cache_size)?;
    let authenticator = crate::dns::build_authenticator(&config.dns)?;
    let resolver = authenticator.resolver().clone();
    let tls_acceptor = match &config.smtp.tls {
        Some(tls) => Some(crate::tls::server_acceptor(&tls.certificate, &tls.key).context("smtp.tls")?),
        None => None,
    };
    let policy = Arc::new(
        crate::policy::PolicyStore::load(config.policies.clone(), config.keys.clone())
            .context("cannot load policies")?,
    );
    tokio::spawn(policy.clone().watch());
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let webhooks = crate::webhooks::Dispatcher::new(spool.clone(), policy.clone(), metrics.clone())?;
    webhooks.resume().context("cannot read the queued webhook events")?;
    let events = crate::events::EventLog::open(&config.spool.path, Some(webhooks))?;
    let verified = crate::tls::verified_client_config(config.delivery.tls_ca_file.as_deref()).context("delivery.tls_ca_file")?;
    let mta_sts = crate::delivery::mta_sts::MtaSts::new(verified.clone(), resolver.clone(), config.delivery.mta_sts_port)?;
    let gateway = Arc::new(Gateway {
        tls_verified: tokio_rustls::TlsConnector::from(verified),
        mta_sts,
        scheduler: crate::scheduler::Scheduler::new(config.delivery.max_connections),
        pipeline: crate::pipeline::Pipeline::new(config.hostname.clone(), policy.clone(), authenticator),
        policy,
        metrics,
        tls_connector: crate::tls::opportunistic_connector(),
        tls_acceptor,
        resolver,
        events,
        spool,
        config,
    });

    let smtp_listeners = crate::intake::bind(&gateway).await?;
    let http_address = gateway.config.http.listen;
    let http_listener = tokio::net::TcpListener::bind(http_address)
        .await
        .with_context(|| format!("cannot listen for HTTP on {http_address} (http.listen)"))?;

    tokio::spawn(crate::scheduler::Scheduler::run_timer(gateway.clone()));
    // The queue resumes in the background, so intake opens and the first
    // deliveries start without waiting for a large spool to be read.
    let resume = gateway.clone();
    tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        match resume_queue(&resume) {
            Ok(count) => tracing::info!(messages = count, seconds = started.elapsed().as_secs_f64(), "queue resumed from the spool"),
            Err(error) => tracing::error!(error = %format!("{error:#}"), "resuming the queue failed; messages not yet read stay in the spool until the next start"),
        }
    });
    let tidying = gateway.clone();
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(std::time::Duration::from_secs(10));
        loop {
            interval.tick().await;
            if let Err(error) = tidying.spool.tidy().await {
                tracing::warn!(error = %format!("{error:#}"), "cannot delete unused body files yet");
            }
        }
    });
    let sessions = smtp_listeners.first().map(|listener| listener.open_sessions());
    let open_sessions = || sessions.as_ref().map_or(0, |sessions| sessions.count());
    let mut intake = Vec::new();
    for listener in smtp_listeners {
        tracing::info!(address = %listener.local_addr()?, "SMTP intake listening");
        intake.push(tokio::spawn(crate::intake::serve(gateway.clone(), listener)));
    }
    tracing::info!(address = %http_address, "HTTP listening");
    let router = crate::http::router(gateway.clone());
    tokio::spawn(async move {
        if let Err(error) = axum::serve(http_listener, router).await {
            tracing::error!(%error, "HTTP server stopped");
        }
    });
    tracing::info!(
        hostname = %gateway.config.hostname,
        spool = %gateway.config.spool.path.display(),
        "baton started"
    );

    wait_for_shutdown().await;
    // Closing the listeners refuses new clients. Sessions waiting for a
    // command get a 421 when draining starts. A message being received may
    // finish within the grace time, and anything that got a 250 is on disk.
    for task in intake {
        task.abort();
    }
    gateway.scheduler.drain();
    let grace = gateway.config.delivery.shutdown_grace;
    tracing::info!(in_flight = gateway.scheduler.open_connections(), sessions = open_sessions(), grace = %humantime::format_duration(grace), "shutting down: intake closed, waiting for deliveries and sessions in flight");
    let deadline = tokio::time::Instant::now() + grace;
    while (gateway.scheduler.open_connections() > 0 || open_sessions() > 0) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let cut = gateway.scheduler.open_connections();
    if cut > 0 {
        tracing::warn!(connections = cut, "grace time over; the messages these connections were sending stay queued and are retried after the restart");
    }
    // Everything acknowledged is already on disk; this flush only saves
    // recent state changes so fewer deliveries repeat after the restart.
    if let Err(error) = gateway.spool.flush().await {
        tracing::error!(error = %format!("{error:#}"), "final spool flush failed");
    }
    Ok(())
}

/// Schedules every pending recipient found in the spool. Returns the
/// number of messages resumed.
fn resume_queue(gateway: &Arc<Gateway>) -> anyhow::Result<usize> {
    // Queue ids sort by arrival, and messages that arrive while the scan
    // runs are queued by intake: the scan stops before them.
    let boundary = crate::spool::QueueId::generate();
    let mut count = 0;
    for message in gateway.spool.scan() {
        let message = message.context("cannot read the spool to resume the queue")?;
        if message.id >= boundary {
            break;
        }
        let mut due_by_domain: HashMap<&str, u64> = HashMap::new();
        for (_, recipient) in &message.recipients {
            if recipient.state.is_pending() {
                let due = due_by_domain.entry(&recipient.domain).or_insert(u64::MAX);
                *due = (*due).min(recipient.next_attempt);
            }
        }
        if due_by_domain.is_empty() {
            // Every recipient is final but removal did not happen before
            // the stop; finish it now.
            gateway.spool.remove_if_complete(&message.id)?;
            continue;
        }
        for (domain, due) in due_by_domain {
            gateway
                .scheduler
                .schedule(gateway, message.id.clone(), domain.to_string(), message.envelope.pool.clone(), due);
        }
        count += 1;
        gateway.metrics.queued_messages.inc();
    }
    Ok(count)
}

async fn wait_for_shutdown() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler can be installed");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}
