//! A full spool disk: the gateway must reply `452 4.3.1` to messages it
//! could not store, keep running, accept again by itself once space is
//! free, and deliver every message it acknowledged with `250`.
//!
//! The spool lives on a small tmpfs mounted by the test, which needs root
//! (or CAP_SYS_ADMIN). Where mounting is impossible the test prints why and
//! passes without running.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::dns::TestDns;
use common::gateway::{Gateway, Options, send_message};
use common::loopback;
use common::receiver::{Receiver, Script, free_port_on};

const WAIT: Duration = Duration::from_secs(30);

const ZONE: &str = r#"
dest.example.            MX 10 mx1.dest.example.
mx1.dest.example.        A 127.0.0.2
"#;

/// Size of the tmpfs for the spool.
const SPOOL_SIZE: &str = "16m";

/// A tmpfs mounted on a temporary folder; unmounted when dropped.
struct Tmpfs {
    folder: Option<tempfile::TempDir>,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as `mount -o size=` takes it), or returns
    /// why that is impossible here.
    fn mount(size: &str) -> Result<Tmpfs, String> {
        let folder = tempfile::tempdir().map_err(|error| format!("cannot create a mount point: {error}"))?;
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(folder.path())
            .output()
            .map_err(|error| format!("cannot run mount: {error}"))?;
        if !output.status.success() {
            return Err(format!(
                "mount -t tmpfs failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        Ok(Tmpfs { folder: Some(folder) })
    }

    fn path(&self) -> &Path {
        self.folder.as_ref().expect("mounted").path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let Some(folder) = self.folder.take() else {
            return;
        };
        let unmounted = Command::new("umount").arg(folder.path()).status().is_ok_and(|status| status.success());
        if !unmounted {
            // Busy, for example when a process still has a file open: detach
            // it now and let the kernel finish when the last user goes.
            let lazy = Command::new("umount").arg("-l").arg(folder.path()).status();
            if !lazy.is_ok_and(|status| status.success()) {
                eprintln!("cannot unmount the test tmpfs at {}", folder.path().display());
                // Removing the folder would delete files on the tmpfs, not the mount.
                std::mem::forget(folder);
                return;
            }
        }
        drop(folder);
    }
}

/// Writes `path` until the file system is full; returns the bytes written.
fn fill(path: &Path) -> u64 {
    let mut file = std::fs::File::create(path).expect("create filler file");
    let block = vec![0x5a_u8; 64 * 1024];
    let mut written = 0;
    loop {
        match file.write(&block) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(error) if error.raw_os_error() == Some(28) => break,
            Err(error) => panic!("writing the filler file failed: {error}"),
        }
    }
    written
}

fn message(number: usize) -> Vec<u8> {
    let mut content = format!("From: <sender@dest.example>\r\nTo: <rcpt{number}@dest.example>\r\nSubject: message {number}\r\n\r\n");
    for line in 0..200 {
        content.push_str(&format!("line {line} of message {number}, padding to make the message bigger\r\n"));
    }
    content.into_bytes()
}

fn recipient(number: usize) -> String {
    format!("rcpt{number}@dest.example")
}

/// Sends message `number` over a new connection; returns the reply after
/// the data.
async fn submit(gateway: &Gateway, number: usize) -> String {
    let to = recipient(number);
    send_message(gateway.smtp, "sender@dest.example", &[to.as_str()], &message(number)).await
}

fn spool_link(gateway_folder: &Path, target: &Path) -> PathBuf {
    let link = gateway_folder.join("data");
    std::os::unix::fs::symlink(target, &link).expect("link the spool folder to the tmpfs");
    link
}

#[tokio::test]
async fn full_spool_disk_rejects_then_recovers() {
    let tmpfs = match Tmpfs::mount(SPOOL_SIZE) {
        Ok(tmpfs) => tmpfs,
        Err(reason) => {
            eprintln!("skipped: full_spool_disk_rejects_then_recovers needs a tmpfs mount: {reason}");
            return;
        }
    };
    let spool = tmpfs.path().join("spool");
    std::fs::create_dir(&spool).expect("create spool folder on the tmpfs");

    let dns = TestDns::start(ZONE).await;
    let port = free_port_on(&[loopback(2)]);
    let receiver = Receiver::start(loopback(2), port, Script::new()).await.unwrap();
    let folder = tempfile::tempdir().expect("temporary folder");
    spool_link(folder.path(), &spool);
    let mut options = Options::new(dns.addr, port);
    options.folder = Some(folder);
    let mut gateway = Gateway::start(options).await;

    // One message while there is space, to have the spool files in place.
    let mut number = 0;
    let reply = submit(&gateway, number).await;
    assert!(reply.starts_with("250 "), "first message: {reply}");
    let mut accepted = vec![number];
    gateway.wait_for_event("delivered", &recipient(number), WAIT).await;

    let filler = tmpfs.path().join("filler");
    let filled = fill(&filler);
    eprintln!("filler file: {filled} bytes");

    // Submit until the spool write fails, then for a few seconds more, so
    // the gateway also tries to recover while the disk is still full.
    let mut rejected = Vec::new();
    let mut full_until = None;
    while full_until.is_none_or(|until| Instant::now() < until) {
        number += 1;
        assert!(number < 500, "500 messages and the spool never filled; accepted {}", accepted.len());
        let reply = submit(&gateway, number).await;
        if reply.starts_with("250 ") {
            accepted.push(number);
        } else {
            assert!(reply.starts_with("452 4.3.1 "), "message {number}: expected 250 or 452 4.3.1, got {reply:?}");
            rejected.push(number);
            full_until.get_or_insert(Instant::now() + Duration::from_secs(3));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("with the disk full: {} accepted, {} rejected", accepted.len(), rejected.len());

    // Still running and talking SMTP.
    let (mut client, greeting) = common::gateway::Client::connect(gateway.smtp).await;
    assert!(greeting.starts_with("220 "), "greeting with the disk full: {greeting}");
    client.command("QUIT").await;

    // Free the space; the gateway must accept again without a restart.
    std::fs::remove_file(&filler).expect("remove filler file");
    let deadline = Instant::now() + WAIT;
    loop {
        number += 1;
        let reply = submit(&gateway, number).await;
        if reply.starts_with("250 ") {
            accepted.push(number);
            break;
        }
        assert!(reply.starts_with("452 4.3.1 "), "message {number} after freeing space: {reply:?}");
        assert!(
            Instant::now() < deadline,
            "still 452 {WAIT:?} after space was freed: {reply}\nlog:\n{}",
            gateway.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for _ in 0..3 {
        number += 1;
        let reply = submit(&gateway, number).await;
        assert!(reply.starts_with("250 "), "message {number} after recovery: {reply}");
        accepted.push(number);
    }

    // Every acknowledged message reaches the receiver; no rejected one does.
    let deadline = Instant::now() + WAIT;
    loop {
        let delivered: Vec<String> = receiver.messages().iter().flat_map(|message| message.rcpt_to.clone()).collect();
        let missing: Vec<usize> = accepted
            .iter()
            .copied()
            .filter(|n| !delivered.contains(&recipient(*n)))
            .collect();
        if missing.is_empty() {
            for n in &rejected {
                assert!(!delivered.contains(&recipient(*n)), "rejected message {n} was delivered");
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "acknowledged messages {missing:?} not delivered within {WAIT:?}\nlog:\n{}",
            gateway.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        gateway.log().contains("queue database reopened; accepting mail again"),
        "recovery is not logged"
    );

    // A message that got 452 may have reached the disk before the write
    // failed. It must not come back when the spool is read at start-up.
    gateway.kill();
    gateway.launch().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let delivered: Vec<String> = receiver.messages().iter().flat_map(|message| message.rcpt_to.clone()).collect();
    for n in &rejected {
        assert!(!delivered.contains(&recipient(*n)), "rejected message {n} was delivered after a restart");
    }

    drop(gateway);
    drop(tmpfs);
}
