//! The intake parser: SMTP command lines as the session parses them
//! (`smtp_proto::Request::parse`, then `parse_address` for each recipient),
//! and the DATA reader that removes dot-stuffing and finds `CRLF.CRLF`.

use std::hint::black_box;

use baton::intake::address::parse_address;
use baton::intake::data::{DataReader, Progress};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use smtp_proto::Request;

/// The command lines of one transaction, with the MAIL parameters that
/// ESMTP clients commonly add.
const TRANSACTION: &[&[u8]] = &[
    b"EHLO client.bench.example\r\n",
    b"MAIL FROM:<sender@bench.example> SIZE=4096 BODY=8BITMIME\r\n",
    b"RCPT TO:<1rcpt@dest.example>\r\n",
    b"DATA\r\n",
    b"QUIT\r\n",
];

fn commands(c: &mut Criterion) {
    let mut group = c.benchmark_group("smtp_command");
    for line in TRANSACTION {
        let name = String::from_utf8_lossy(&line[..4]).to_string();
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(BenchmarkId::new("parse", name), line, |b, line| {
            b.iter(|| Request::parse(&mut black_box(*line).iter()).map(|r| r.into_owned()))
        });
    }
    group.throughput(Throughput::Elements(1));
    group.bench_function("transaction", |b| {
        b.iter(|| {
            for line in TRANSACTION {
                let request = Request::parse(&mut black_box(*line).iter())
                    .expect("valid command")
                    .into_owned();
                if let Request::Rcpt { to } = request {
                    let _ = black_box(parse_address(&to.address, false));
                }
            }
        })
    });
    group.finish();
}

/// Dot-stuffed DATA content of about `size` bytes, ending in `CRLF.CRLF`,
/// with a stuffed dot every 20 lines.
fn data(size: usize) -> Vec<u8> {
    let mut data = b"From: sender@bench.example\r\nTo: rcpt@dest.example\r\nSubject: x\r\n\r\n".to_vec();
    let mut line = 0;
    while data.len() + 80 < size {
        if line % 20 == 0 {
            data.extend_from_slice(b"..");
        }
        data.extend_from_slice(&[b'x'; 74]);
        data.extend_from_slice(b"\r\n");
        line += 1;
    }
    data.extend_from_slice(b".\r\n");
    data
}

fn data_reader(c: &mut Criterion) {
    let mut group = c.benchmark_group("data_reader");
    for (label, size) in [("4k", 4096), ("50k", 51200)] {
        let input = data(size);
        group.throughput(Throughput::Bytes(input.len() as u64));
        // Fed in 16 KiB pieces, the size of the session's read buffer.
        group.bench_with_input(BenchmarkId::new("feed", label), &input, |b, input| {
            b.iter(|| {
                let mut reader = DataReader::new(25 * 1024 * 1024);
                for chunk in input.chunks(16 * 1024) {
                    if let Progress::Done { .. } = reader.feed(black_box(chunk)) {
                        break;
                    }
                }
                reader.into_message()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, commands, data_reader);
criterion_main!(benches);
