//! Crash safety: `kill -9` at random moments under load loses no message
//! that got a `250`; duplicates are allowed only for deliveries in flight.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::dns::TestDns;
use common::gateway::{Gateway, Options};
use common::loopback;
use common::receiver::{Receiver, Script, free_port_on};
use rand::Rng;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const ZONE: &str = "dest.example. MX 10 mx.dest.example.\nmx.dest.example. A 127.0.0.2\n";
const MESSAGES: usize = 2000;
const CLIENTS: usize = 8;

/// Sends one message in its own session; returns the final reply, or an
/// error when the connection failed (the gateway may have been killed).
async fn try_send(address: SocketAddr, number: usize) -> std::io::Result<String> {
    let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(address)).await??;
    let mut reader = BufReader::new(stream);
    let read_reply = async |reader: &mut BufReader<TcpStream>| -> std::io::Result<String> {
        let mut reply = String::new();
        loop {
            let mut line = String::new();
            let read = tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line)).await??;
            if read == 0 {
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed"));
            }
            reply.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                return Ok(reply);
            }
        }
    };
    read_reply(&mut reader).await?;
    let message = format!(
        "EHLO load.test.example\r\nMAIL FROM:<load@src.example>\r\nRCPT TO:<user@dest.example>\r\nDATA\r\n"
    );
    reader.get_mut().write_all(message.as_bytes()).await?;
    for _ in 0..4 {
        let reply = read_reply(&mut reader).await?;
        if !(reply.starts_with('2') || reply.starts_with('3')) {
            return Ok(reply);
        }
    }
    let line = format!("{}\r\n", "x".repeat(76));
    let body = format!("Message-ID: <{number}@load.test.example>\r\nSubject: load {number}\r\n\r\n{}.\r\n", line.repeat(26));
    reader.get_mut().write_all(body.as_bytes()).await?;
    let reply = read_reply(&mut reader).await?;
    let _ = reader.get_mut().write_all(b"QUIT\r\n").await;
    Ok(reply)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_nine_loses_no_acknowledged_message() {
    let dns = TestDns::start(ZONE).await;
    let port = free_port_on(&[loopback(2)]);
    let receiver = Receiver::start(loopback(2), port, Script::new()).await.unwrap();
    let folder = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(folder.path().join("policies")).unwrap();
    std::fs::write(
        folder.path().join("policies/shaping.yaml"),
        "default:\n  max_connections: 20\n  max_message_rate: 10000/s\n  max_connection_rate: 10000/s\n",
    )
    .unwrap();
    let mut options = Options::new(dns.addr, port);
    options.folder = Some(folder);
    let mut gateway = Gateway::start(options).await;
    let address = gateway.smtp;

    let acknowledged = Arc::new(Mutex::new(HashSet::new()));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let acknowledged = acknowledged.clone();
        let next = next.clone();
        clients.push(tokio::spawn(async move {
            loop {
                let number = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if number >= MESSAGES {
                    return;
                }
                // Retry until the gateway takes the message: a connection
                // that fails during a kill leaves it unacknowledged.
                loop {
                    match try_send(address, number).await {
                        Ok(reply) if reply.starts_with("250") => {
                            acknowledged.lock().unwrap().insert(number);
                            break;
                        }
                        Ok(reply) => panic!("message {number} rejected: {reply}"),
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
            }
        }));
    }

    // Kill the gateway at random moments while the load runs.
    let mut kills = 0;
    while kills < 4 {
        let pause = rand::rng().random_range(200..900);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        gateway.kill();
        kills += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
        gateway.launch().await;
    }
    for client in clients {
        client.await.unwrap();
    }
    let acknowledged: HashSet<usize> = acknowledged.lock().unwrap().clone();
    assert_eq!(acknowledged.len(), MESSAGES, "every message was eventually acknowledged");

    // Every acknowledged message arrives, after the restarts.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let (arrived, duplicates) = loop {
        let messages = receiver.messages();
        let mut seen = HashSet::new();
        let mut duplicates = 0;
        for message in &messages {
            let text = message.data_str();
            let number = text
                .lines()
                .find_map(|line| line.strip_prefix("Message-ID: <"))
                .and_then(|rest| rest.split('@').next())
                .and_then(|n| n.parse::<usize>().ok())
                .expect("every message carries its number");
            if !seen.insert(number) {
                duplicates += 1;
            }
        }
        if acknowledged.is_subset(&seen) || tokio::time::Instant::now() > deadline {
            break (seen, duplicates);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let missing: Vec<_> = acknowledged.difference(&arrived).take(20).collect();
    assert!(missing.is_empty(), "{} acknowledged messages never arrived, such as {missing:?}", acknowledged.difference(&arrived).count());
    eprintln!("{kills} kills, {} messages, {duplicates} duplicates", acknowledged.len());
}
