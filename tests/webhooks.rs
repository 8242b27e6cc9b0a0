//! Event webhooks against a real HTTP endpoint on loopback: events wait in
//! the spool while the endpoint is down and across a gateway restart, then
//! arrive in batches, filtered by event type.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use common::dns::TestDns;
use common::gateway::{Client, Gateway, Options};
use common::loopback;
use common::receiver::{Receiver, Script, free_port_on};

const ZONE: &str = r#"
dest.example.        MX 10 mx.dest.example.
mx.dest.example.     A 127.0.0.2
"#;

/// What the endpoint recorded: each batch with its path and headers.
#[derive(Default)]
struct Recorded {
    batches: Vec<(String, Vec<serde_json::Value>)>,
    authorization: Vec<String>,
    /// Number of coming requests to reject with 503.
    fail_next: usize,
}

type Shared = Arc<Mutex<Recorded>>;

async fn record(path: &'static str, state: Shared, headers: HeaderMap, body: String) -> StatusCode {
    let mut recorded = state.lock().unwrap();
    if recorded.fail_next > 0 {
        recorded.fail_next -= 1;
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let events: Vec<serde_json::Value> = serde_json::from_str(&body).expect("batch is a JSON array");
    let authorization = headers.get("authorization").map(|v| v.to_str().unwrap().to_string());
    recorded.authorization.extend(authorization);
    recorded.batches.push((path.to_string(), events));
    StatusCode::NO_CONTENT
}

/// Starts the endpoint on `port`, serving `/all` and `/bounces`.
async fn start_endpoint(port: u16, state: Shared) {
    let app = axum::Router::new()
        .route(
            "/all",
            post(|State(state): State<Shared>, headers: HeaderMap, body: String| record("/all", state, headers, body)),
        )
        .route(
            "/bounces",
            post(|State(state): State<Shared>, headers: HeaderMap, body: String| record("/bounces", state, headers, body)),
        )
        .with_state(state);
    let listener = tokio::net::TcpListener::bind((loopback(1), port)).await.unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
}

/// Returns the events posted to `path`.
fn events_at(state: &Shared, path: &str) -> Vec<serde_json::Value> {
    let recorded = state.lock().unwrap();
    recorded
        .batches
        .iter()
        .filter(|(p, _)| p == path)
        .flat_map(|(_, events)| events.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_survive_outage_and_restart() {
    let dns = TestDns::start(ZONE).await;
    let port = free_port_on(&[loopback(2)]);
    let script = Script::new().rcpt_reply("gone@dest.example", "550 5.1.1 no such user");
    let receiver = Receiver::start(loopback(2), port, script).await.unwrap();

    let endpoint_port = free_port_on(&[loopback(1)]);
    let folder = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(folder.path().join("policies")).unwrap();
    let events_yaml = format!(
        "webhooks:\n  - name: all\n    url: http://127.0.0.1:{endpoint_port}/all\n    batch_size: 5\n    headers:\n      Authorization: Bearer test-token\n  - name: bounces\n    url: http://127.0.0.1:{endpoint_port}/bounces\n    events: [bounced]\n"
    );
    std::fs::write(folder.path().join("policies/events.yaml"), events_yaml).unwrap();
    let mut options = Options::new(dns.addr, port);
    options.folder = Some(folder);
    let mut gateway = Gateway::start(options).await;

    // Ten messages while the endpoint is down: ten received and ten
    // delivered events, plus one bounce, its DSN and the DSN's delivery.
    let (mut client, _) = Client::connect(gateway.smtp).await;
    for index in 0..10 {
        let content = format!("From: <app@src.example>\r\nSubject: n{index}\r\n\r\nbody\r\n");
        let reply = client.send("app@src.example", &["user@dest.example"], content.as_bytes()).await;
        assert!(reply.starts_with("250"), "{reply}");
        client.command("RSET").await;
    }
    let content = b"From: <app@src.example>\r\nSubject: bounce\r\n\r\nbody\r\n";
    let reply = client.send("app@src.example", &["gone@dest.example"], content).await;
    assert!(reply.starts_with("250"), "{reply}");
    receiver.wait_for_messages(10, Duration::from_secs(30)).await;
    gateway.wait_for_event("bounced", "gone@dest.example", Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(gateway.log().contains("webhook post failed"), "{}", gateway.log());
    let expected: HashSet<(String, String)> = gateway
        .events()
        .iter()
        .map(|event| (event["event"].as_str().unwrap().to_string(), event["queue_id"].as_str().unwrap().to_string()))
        .collect();
    assert!(expected.len() >= 22, "{expected:?}");

    // Restart with the endpoint still down, then bring it up, failing its
    // first request.
    gateway.terminate();
    gateway.launch().await;
    let state = Shared::default();
    state.lock().unwrap().fail_next = 1;
    start_endpoint(endpoint_port, state.clone()).await;

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let seen: HashSet<(String, String)> = events_at(&state, "/all")
            .iter()
            .map(|event| (event["event"].as_str().unwrap().to_string(), event["queue_id"].as_str().unwrap().to_string()))
            .collect();
        if expected.is_subset(&seen) && !events_at(&state, "/bounces").is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "missing events: {:?}", expected.difference(&seen).collect::<Vec<_>>());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let recorded = state.lock().unwrap();
    for (path, batch) in &recorded.batches {
        if path == "/all" {
            assert!(batch.len() <= 5, "batch of {} events", batch.len());
        }
    }
    assert!(recorded.authorization.iter().all(|value| value == "Bearer test-token"));
    assert!(!recorded.authorization.is_empty());
    drop(recorded);
    let ids: Vec<u64> = events_at(&state, "/all").iter().map(|event| event["id"].as_u64().unwrap()).collect();
    assert!(ids.windows(2).all(|pair| pair[0] < pair[1]), "ids out of order: {ids:?}");

    // The bounce-only webhook got the bounces and nothing else: the
    // recipient's, and the DSN's own (src.example does not exist).
    let bounces = events_at(&state, "/bounces");
    assert_eq!(bounces.len(), 2, "{bounces:?}");
    assert!(bounces.iter().all(|event| event["event"] == "bounced"), "{bounces:?}");
    assert!(bounces.iter().any(|event| event["recipients"][0] == "gone@dest.example"), "{bounces:?}");

    let (_, metrics) = gateway.http_get("/metrics").await;
    assert!(metrics.contains("baton_webhook_post_failures_total{webhook=\"all\"}"), "{metrics}");
}
