//! DKIM signing of one message through `DkimPolicy::sign`, the code intake
//! runs before it sends `250`: RSA-2048 and Ed25519, on the two message
//! sizes of the end-to-end benchmark (4 KiB and 50 KiB).
//!
//! Keys are made with `baton dkim keygen` in a temporary folder, so each
//! run signs with fresh keys of the same kind production uses.

use std::hint::black_box;
use std::path::Path;

use baton::config::Config;
use baton::dkim_cmd::{Algorithm, keygen};
use baton::pipeline::dkim::{DkimPolicy, Signing};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

const DOMAIN: &str = "bench.example";

/// Builds a message of about `size` bytes with the header fields that
/// `senders.yaml` signs by default, and 76-character body lines.
fn message(size: usize) -> Vec<u8> {
    let mut message = format!(
        "From: Sender <sender@{DOMAIN}>\r\n\
         To: rcpt@dest.example\r\n\
         Subject: benchmark message\r\n\
         Date: Mon, 02 Nov 2026 10:00:00 +0000\r\n\
         Message-ID: <bench-1@{DOMAIN}>\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=us-ascii\r\n\
         \r\n"
    )
    .into_bytes();
    let line = [b'x'; 76];
    while message.len() + 78 <= size {
        message.extend_from_slice(&line);
        message.extend_from_slice(b"\r\n");
    }
    message
}

/// Loads a signing policy with one selector of `algorithm` for `DOMAIN`.
fn policy(folder: &Path, selector: &str, algorithm: Algorithm) -> DkimPolicy {
    let keys = folder.join("keys");
    let policies = folder.join("policies");
    std::fs::create_dir_all(&policies).expect("create policies folder");
    let config = Config::parse(&format!("keys: {}\n", keys.display())).expect("valid config");
    keygen(&config, DOMAIN, selector, algorithm).expect("keygen");
    let senders = format!("domains:\n  {DOMAIN}:\n    selectors: [{selector}]\n");
    std::fs::write(policies.join("senders.yaml"), senders).expect("write senders.yaml");
    DkimPolicy::load(&policies, &keys).expect("load signing policy")
}

fn sign(c: &mut Criterion) {
    let mut group = c.benchmark_group("dkim_sign");
    group.throughput(Throughput::Elements(1));
    let algorithms = [("rsa-2048", Algorithm::Rsa2048), ("ed25519", Algorithm::Ed25519)];
    for (name, algorithm) in algorithms {
        let folder = tempfile::tempdir().expect("temporary folder");
        let policy = policy(folder.path(), name, algorithm);
        for (label, size) in [("4k", 4096), ("50k", 51200)] {
            let message = message(size);
            // A signing error would make the numbers meaningless, so check once.
            match policy.sign(&message, Some(DOMAIN)) {
                Ok(Signing::Signed { headers, .. }) => assert_eq!(headers.len(), 1),
                other => panic!("expected one signature, got {other:?}"),
            }
            group.bench_with_input(BenchmarkId::new(name, label), &message, |b, message| {
                b.iter(|| policy.sign(black_box(message), Some(DOMAIN)))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, sign);
criterion_main!(benches);
