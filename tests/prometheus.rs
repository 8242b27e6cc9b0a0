//! The dashboards and alert rules against a real Prometheus server that
//! scrapes a gateway after real traffic: every PromQL expression in
//! `dashboards/*.json` and `dashboards/alerts.yaml` must parse, and the
//! panels fed by that traffic must return data.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::dns::TestDns;
use common::gateway::{Client, Gateway, Options, send_message};
use common::keys::{keygen, prepare, write_senders};
use common::loopback;
use common::prometheus::{PROMTOOL, Prometheus, require_binaries};
use common::receiver::{Receiver, Script, free_port_on};

const WAIT: Duration = Duration::from_secs(20);
const ZONE: &str = "dest.example. MX 10 mx.dest.example.\nmx.dest.example. A 127.0.0.2\n";
/// The scrape job name that `dashboards/alerts.yaml` expects.
const JOB: &str = "baton";
/// Grafana's variables and what the test puts in their place: the dashboard
/// variables as "All" (`.*`), the time ranges as fixed durations.
const VARIABLES: &[(&str, &str)] = &[
    ("pool", ".*"),
    ("source", ".*"),
    ("site", ".*"),
    ("__rate_interval", "1m"),
    ("__interval", "1m"),
    ("__range", "1h"),
];

/// Panels (dashboard file, title) that the traffic in this test feeds: each
/// of their queries must return at least one series.
const CORE: &[(&str, &str)] = &[
    ("overview.json", "Received"),
    ("overview.json", "Delivered"),
    ("overview.json", "Queued messages"),
    ("overview.json", "Oldest queued message"),
    ("overview.json", "Messages in and out"),
    ("overview.json", "Queue depth by site"),
    ("overview.json", "Oldest queued message by site"),
    ("overview.json", "Recipient outcomes"),
    ("overview.json", "Outcomes in the time range"),
    ("overview.json", "Acceptance latency"),
    ("overview.json", "Rejections by reason"),
    ("overview.json", "Intake sessions and connections"),
    ("overview.json", "Spool size"),
    ("deliverability.json", "Deferral rate by site"),
    ("deliverability.json", "Bounce rate by site"),
    ("deliverability.json", "Top enhanced status codes"),
    ("deliverability.json", "Replies by class"),
    ("deliverability.json", "Alignment failures by sending domain"),
    ("deliverability.json", "TLS share by site"),
    ("deliverability.json", "DNS lookup errors"),
    ("deliverability.json", "DNS lookup latency"),
    ("deliverability.json", "Transaction time by site"),
    ("deliverability.json", "DSNs queued"),
    ("shaping.json", "Throttle waits"),
    ("shaping.json", "Sites throttled"),
    ("shaping.json", "Outbound connections"),
    ("shaping.json", "Delivery attempts"),
    ("shaping.json", "Warmup day"),
    ("shaping.json", "Warmup progress today"),
    ("shaping.json", "Warmup sent and cap"),
];

/// Panels whose queries must parse but may return nothing here: no
/// response rule matches in this test, and no warmup day is held back.
const NO_DATA_EXPECTED: &[(&str, &str)] = &[
    ("shaping.json", "Response rule transitions"),
    ("shaping.json", "Transitions in the time range"),
    ("shaping.json", "Warmup holds"),
];

/// Label values that a core panel's result must contain: (file, title,
/// label, value). They show that the series come from this test's traffic.
const EXPECTED_LABELS: &[(&str, &str, &str, &str)] = &[
    ("overview.json", "Recipient outcomes", "result", "delivered"),
    ("overview.json", "Recipient outcomes", "result", "deferred"),
    ("overview.json", "Recipient outcomes", "result", "bounced"),
    ("overview.json", "Rejections by reason", "reason", "syntax"),
    ("deliverability.json", "Deferral rate by site", "site", "dest.example"),
    ("deliverability.json", "Top enhanced status codes", "code", "5.1.1"),
    ("deliverability.json", "Top enhanced status codes", "code", "4.2.1"),
    ("deliverability.json", "Alignment failures by sending domain", "domain", "nokey.example"),
    ("deliverability.json", "DNS lookup errors", "result", "nxdomain"),
    ("deliverability.json", "TLS share by site", "site", "dest.example"),
    ("shaping.json", "Warmup day", "source", "w1"),
];

/// One PromQL expression found in a dashboard or rule file.
#[derive(Debug)]
struct Query {
    /// File name under `dashboards/`.
    file: String,
    /// Panel title, `variable NAME` or `alert NAME`.
    owner: String,
    /// The expression as written, with Grafana variables.
    written: String,
    /// The label whose values a `label_values(...)` variable lists.
    label_values_of: Option<String>,
}

fn dashboards_folder() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards")
}

/// Collects the target expressions of `panels`, recursing into rows.
fn panel_queries(file: &str, panels: &[serde_json::Value], out: &mut Vec<Query>) {
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or("").to_string();
        if let Some(nested) = panel["panels"].as_array() {
            panel_queries(file, nested, out);
        }
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("{file}: panel {title:?} has a target without expr: {target}"));
            out.push(Query {
                file: file.to_string(),
                owner: title.clone(),
                written: expr.to_string(),
                label_values_of: None,
            });
        }
    }
}

/// Collects the query of each Prometheus query variable. `label_values(S, L)`
/// becomes the selector `S`, whose result must carry label `L`.
fn variable_queries(file: &str, dashboard: &serde_json::Value, out: &mut Vec<Query>) {
    for variable in dashboard["templating"]["list"].as_array().into_iter().flatten() {
        if variable["type"] != "query" {
            continue;
        }
        let name = variable["name"].as_str().unwrap_or("");
        let query = match &variable["query"] {
            serde_json::Value::String(text) => text.clone(),
            object => object["query"].as_str().unwrap_or("").to_string(),
        };
        let (written, label) = match query.trim().strip_prefix("label_values(").and_then(|rest| rest.strip_suffix(')')) {
            Some(arguments) => {
                let (selector, label) = arguments
                    .rsplit_once(',')
                    .unwrap_or_else(|| panic!("{file}: variable {name}: label_values needs a selector and a label: {query}"));
                (selector.trim().to_string(), Some(label.trim().to_string()))
            }
            None => (query.clone(), None),
        };
        out.push(Query {
            file: file.to_string(),
            owner: format!("variable {name}"),
            written,
            label_values_of: label,
        });
    }
}

/// Reads every dashboard in `dashboards/` and returns its queries.
fn dashboard_queries() -> Vec<Query> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dashboards_folder())
        .expect("read dashboards/")
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|extension| extension == "json"))
        .collect();
    files.sort();
    let mut queries = Vec::new();
    for path in files {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        let dashboard: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|error| panic!("{file} is not valid JSON: {error}"));
        let panels = dashboard["panels"].as_array().unwrap_or_else(|| panic!("{file} has no panels"));
        panel_queries(&file, panels, &mut queries);
        variable_queries(&file, &dashboard, &mut queries);
    }
    queries
}

/// Reads the `expr` of every rule in `dashboards/alerts.yaml`.
fn alert_queries() -> Vec<Query> {
    let text = std::fs::read_to_string(dashboards_folder().join("alerts.yaml")).expect("read dashboards/alerts.yaml");
    let rules: serde_json::Value = serde_norway::from_str(&text).expect("alerts.yaml is YAML");
    let mut queries = Vec::new();
    for group in rules["groups"].as_array().expect("alerts.yaml has groups") {
        for rule in group["rules"].as_array().expect("each group has rules") {
            let name = rule["alert"].as_str().or(rule["record"].as_str()).unwrap_or("?");
            queries.push(Query {
                file: "alerts.yaml".to_string(),
                owner: format!("alert {name}"),
                written: rule["expr"].as_str().expect("each rule has an expr").to_string(),
                label_values_of: None,
            });
        }
    }
    queries
}

/// Replaces Grafana variables (`$name`, `${name}`, `${name:format}`) with the
/// values in [`VARIABLES`]. Panics on an unknown variable, and on a dashboard
/// variable used outside a `=~` matcher, where the "All" value `.*` would be
/// compared literally.
fn substitute(query: &Query) -> String {
    let pattern = regex::Regex::new(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))").unwrap();
    let mut result = String::new();
    let mut last = 0;
    for captures in pattern.captures_iter(&query.written) {
        let whole = captures.get(0).unwrap();
        let name = captures.get(1).or(captures.get(2)).unwrap().as_str();
        let value = VARIABLES
            .iter()
            .find(|(variable, _)| *variable == name)
            .map(|(_, value)| *value)
            .unwrap_or_else(|| panic!("{} {}: unknown variable ${name} in {}", query.file, query.owner, query.written));
        let before = &query.written[..whole.start()];
        if !name.starts_with("__") {
            assert!(
                before.ends_with("=~\""),
                "{} {}: ${name} must be used as label=~\"${name}\" so that All (.*) matches: {}",
                query.file,
                query.owner,
                query.written
            );
        }
        result.push_str(&query.written[last..whole.start()]);
        result.push_str(value);
        last = whole.end();
    }
    result.push_str(&query.written[last..]);
    result
}

/// Sets up a gateway with one receiving site, sends traffic that is
/// delivered, deferred, bounced, rejected and fails alignment, and waits for
/// every outcome in the delivery log.
async fn gateway_with_traffic() -> (Gateway, Receiver, TestDns) {
    let prepared = prepare(ZONE, &[("src.example", "ed1", "ed25519")]);
    // nokey.example signs with a key that is not published, so the
    // alignment check fails (accepted in warn mode).
    let _unpublished = keygen(prepared.folder.path(), "nokey.example", "nk1", "ed25519");
    write_senders(
        prepared.folder.path(),
        "defaults:\n  alignment: warn\ndomains:\n  src.example:\n    selectors: [ed1]\n  nokey.example:\n    selectors: [nk1]\n",
    );
    std::fs::write(
        prepared.folder.path().join("policies/shaping.yaml"),
        "domains:\n  dest.example:\n    max_message_rate: 100/s\n",
    )
    .unwrap();
    // One warming source, so the warmup panels have data.
    std::fs::write(
        prepared.folder.path().join("policies/warmup.yaml"),
        "schedules:\n  ramp:\n    daily: [100000]\n",
    )
    .unwrap();
    std::fs::write(
        prepared.folder.path().join("policies/pools.yaml"),
        "pools:\n  main:\n    sources:\n      - { name: w1, ip: 127.0.0.1, warmup: { schedule: ramp, started: 2026-01-01 } }\n",
    )
    .unwrap();
    let dns = TestDns::start(&prepared.zone).await;
    let port = free_port_on(&[loopback(2)]);
    let script = Script::new()
        .tls()
        .rcpt_reply("gone@dest.example", "550 5.1.1 no such user")
        .rcpt_reply("later@dest.example", "451 4.2.1 try later");
    let receiver = Receiver::start(loopback(2), port, script).await.unwrap();
    let mut options = Options::new(dns.addr, port);
    options.folder = Some(prepared.folder);
    // The deferred message stays queued for the whole test, so the queue
    // gauges keep a series.
    options.retry = "[10m]";
    let gateway = Gateway::start(options).await;

    let content = b"From: <app@src.example>\r\nSubject: m\r\n\r\nbody\r\n";
    // nowhere.example is not in the zone: NXDOMAIN, a bounce without a reply.
    for recipient in ["ok@dest.example", "gone@dest.example", "later@dest.example", "x@nowhere.example"] {
        let reply = send_message(gateway.smtp, "app@src.example", &[recipient], content).await;
        assert!(reply.starts_with("250"), "{recipient}: {reply}");
    }
    let unaligned = b"From: <app@nokey.example>\r\nSubject: m\r\n\r\nbody\r\n";
    let reply = send_message(gateway.smtp, "app@nokey.example", &["ok2@dest.example"], unaligned).await;
    assert!(reply.starts_with("250"), "nokey.example: {reply}");
    // A rejected recipient: a domain that is not a valid host name.
    let (mut client, _) = Client::connect(gateway.smtp).await;
    client.command("EHLO client.test.example").await;
    client.command("MAIL FROM:<app@src.example>").await;
    let rejected = client.command("RCPT TO:<x@bad_domain.example>").await;
    assert!(rejected.starts_with("501"), "{rejected}");
    client.command("QUIT").await;

    gateway.wait_for_event("delivered", "ok@dest.example", WAIT).await;
    gateway.wait_for_event("delivered", "ok2@dest.example", WAIT).await;
    gateway.wait_for_event("bounced", "gone@dest.example", WAIT).await;
    gateway.wait_for_event("deferred", "later@dest.example", WAIT).await;
    gateway.wait_for_event("bounced", "x@nowhere.example", WAIT).await;
    let received = gateway.wait_for_event("received", "ok2@dest.example", WAIT).await;
    assert_eq!(received["alignment"]["result"], "fail", "{received}");
    (gateway, receiver, dns)
}

/// Returns the value of the first sample of an instant vector result.
fn first_value(response: &serde_json::Value) -> Option<f64> {
    let sample = response["data"]["result"].as_array()?.first()?;
    sample["value"][1].as_str()?.parse().ok()
}

/// Waits until every series of the families the core panels read has at
/// least three samples in the last minute, so `rate(...[1m])` has data.
async fn wait_for_scrapes(prometheus: &Prometheus) {
    let families = [
        "baton_messages_received_total",
        "baton_messages_rejected_total",
        "baton_delivery_recipients_total",
        "baton_delivery_replies_total",
        "baton_alignment_verdicts_total",
        "baton_dns_lookups_total",
        "baton_acceptance_seconds_bucket",
        "baton_queue_jobs",
    ];
    let deadline = Instant::now() + Duration::from_secs(60);
    for family in families {
        let expr = format!("min(count_over_time({family}[1m]))");
        loop {
            let (_, response) = prometheus.query(&expr).await;
            if first_value(&response).is_some_and(|count| count >= 3.0) {
                break;
            }
            assert!(Instant::now() < deadline, "{family} not scraped 3 times within 60s: {response}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

#[test]
fn promtool_checks_alert_rules() {
    require_binaries();
    let path = dashboards_folder().join("alerts.yaml");
    let output = Command::new(PROMTOOL).arg("check").arg("rules").arg(&path).output().expect("run promtool");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "promtool check rules {} failed:\n{stdout}\n{stderr}", path.display());
    assert!(stdout.contains("SUCCESS"), "{stdout}");

    // The unit tests in alerts_test.yaml fire alerts on synthetic series.
    let tests = dashboards_folder().join("alerts_test.yaml");
    let output = Command::new(PROMTOOL).arg("test").arg("rules").arg(&tests).output().expect("run promtool");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "promtool test rules {} failed:\n{stdout}\n{stderr}", tests.display());
}

#[tokio::test]
async fn dashboard_queries_against_prometheus() {
    require_binaries();
    let mut queries = dashboard_queries();
    queries.extend(alert_queries());

    // Every panel with queries is either core or known to have no data here.
    let mut panels: BTreeSet<(String, String)> = BTreeSet::new();
    for query in queries.iter().filter(|q| q.file != "alerts.yaml" && !q.owner.starts_with("variable ")) {
        panels.insert((query.file.clone(), query.owner.clone()));
    }
    let classified: BTreeSet<(String, String)> = CORE
        .iter()
        .chain(NO_DATA_EXPECTED)
        .map(|(file, title)| (file.to_string(), title.to_string()))
        .collect();
    for panel in &panels {
        assert!(classified.contains(panel), "panel {panel:?} is in neither CORE nor NO_DATA_EXPECTED");
    }
    for panel in &classified {
        assert!(panels.contains(panel), "panel {panel:?} is listed in the test but not found in dashboards/");
    }

    let (gateway, _receiver, _dns) = gateway_with_traffic().await;
    let rule_files = vec![dashboards_folder().join("alerts.yaml")];
    let prometheus = Prometheus::start(JOB, gateway.http, &rule_files).await;
    wait_for_scrapes(&prometheus).await;

    // The scraped values are this gateway's: 5 messages accepted.
    let (_, received) = prometheus.query(&format!("sum(baton_messages_received_total{{job=\"{JOB}\"}})")).await;
    assert_eq!(first_value(&received), Some(5.0), "{received}");

    let mut failures = Vec::new();
    for query in &queries {
        let expr = substitute(query);
        let (status, response) = prometheus.query(&expr).await;
        let label = format!("{} / {}: {expr}", query.file, query.owner);
        if response["status"] != "success" {
            failures.push(format!("{label}\n    {status}: {}", response["error"]));
            continue;
        }
        let series = response["data"]["result"].as_array().cloned().unwrap_or_default();
        let core = CORE.iter().any(|(file, title)| query.file == *file && query.owner == *title);
        if core && series.is_empty() {
            failures.push(format!("{label}\n    core panel returned no series"));
        }
        if let Some(name) = &query.label_values_of
            && !series.iter().any(|sample| sample["metric"][name.as_str()].is_string())
        {
            failures.push(format!("{label}\n    no series has label {name}"));
        }
        for (file, title, name, value) in EXPECTED_LABELS {
            if query.file == *file
                && query.owner == *title
                && !series.iter().any(|sample| sample["metric"][*name] == *value)
            {
                failures.push(format!("{label}\n    no series with {name}=\"{value}\": {series:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "{} of {} queries failed:\n{}", failures.len(), queries.len(), failures.join("\n"));

    // Prometheus loaded alerts.yaml and evaluates every rule without error.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, response) = prometheus.get("/api/v1/rules").await;
        let rules: Vec<serde_json::Value> = response["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|group| group["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        let expected = alert_queries().len();
        let evaluated = rules.iter().filter(|rule| rule["health"] == "ok").count();
        let broken: Vec<&serde_json::Value> = rules.iter().filter(|rule| rule["health"] == "err").collect();
        assert!(broken.is_empty(), "rules failed to evaluate: {broken:#?}");
        if rules.len() == expected && evaluated == expected {
            break;
        }
        assert!(Instant::now() < deadline, "expected {expected} rules evaluated, got {evaluated}: {response}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
