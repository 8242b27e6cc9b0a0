//! Spool writes with group commit: `concurrency` tasks call `Spool::store`
//! at once, as that many SMTP sessions would at the end of DATA, and each
//! call returns only after an fsync that started after its write. The time
//! per iteration is how long the whole group waited, so with group commit
//! it grows much slower than `concurrency`.
//!
//! The spool is on a temporary folder of the default temporary directory,
//! so the numbers depend on that disk's fsync latency.

use std::sync::Arc;
use std::time::{Duration, Instant};

use baton::spool::{EnvelopeRecord, NewMessage, QueueId, RecipientRecord, Spool};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

fn new_message(data: &Arc<Vec<u8>>) -> NewMessage {
    NewMessage {
        id: QueueId::generate(),
        envelope: EnvelopeRecord {
            sender: "sender@bench.example".into(),
            received_at: 1_793_000_000,
            client_ip: "127.0.0.1".into(),
            helo: "client.bench.example".into(),
            size: data.len() as u64,
            ..EnvelopeRecord::default()
        },
        recipients: vec![RecipientRecord::new("rcpt@dest.example".into(), "dest.example".into())],
        data: data.as_ref().clone(),
    }
}

fn store(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let folder = tempfile::tempdir().expect("temporary folder");
    // Spool::open starts the committer task, so it needs the runtime.
    let spool = {
        let _guard = runtime.enter();
        Spool::open(folder.path(), 128 * 1024 * 1024).expect("open spool")
    };
    for (name, size) in [("spool_store_4k", 4096), ("spool_store_50k", 50 * 1024)] {
        store_group(c, &runtime, &spool, name, size);
    }
}

fn store_group(c: &mut Criterion, runtime: &tokio::runtime::Runtime, spool: &Spool, name: &str, size: usize) {
    let data = Arc::new(vec![b'x'; size]);
    let mut group = c.benchmark_group(name);
    // Every iteration waits for at least one fsync, so keep the sample small.
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(8));
    for concurrency in [1usize, 20, 100] {
        group.throughput(Throughput::Elements(concurrency as u64));
        group.bench_function(BenchmarkId::new("concurrent", concurrency), |b| {
            b.iter_custom(|iterations| {
                runtime.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iterations {
                        let messages: Vec<NewMessage> = (0..concurrency).map(|_| new_message(&data)).collect();
                        let start = Instant::now();
                        let mut tasks = Vec::with_capacity(concurrency);
                        for message in messages {
                            let spool = spool.clone();
                            tasks.push(tokio::spawn(async move { spool.store(&message).await }));
                        }
                        for task in tasks {
                            task.await.expect("store task").expect("store");
                        }
                        total += start.elapsed();
                    }
                    total
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, store);
criterion_main!(benches);
