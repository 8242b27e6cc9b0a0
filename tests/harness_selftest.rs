//! Tests of the integration-test harness (tests/common) over real loopback sockets.

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use common::dns::TestDns;
use common::loopback;
use common::receiver::{DISCONNECT, Receiver, Script, free_port_on};
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::{Message, Query, ResponseCode};
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, UdpSocket};

const ZONE: &str = r#"
# test zone
dest.example.        MX 10 mx1.dest.example.
dest.example.        MX 20 mx2.dest.example.
mx1.dest.example.    A 127.0.0.2
mx2.dest.example.    AAAA ::1
nullmx.example.      MX 0 .
noMX.example.        A 127.0.0.3
txt.example.         TXT "v=spf1 ip4:127.0.0.1 -all"
multi.example.       TXT "first part" "second \"quoted\" part"   # two strings
alias.example.       CNAME mx1.dest.example.
broken.example.      SERVFAIL
"#;

const T: Duration = Duration::from_secs(5);

fn name(s: &str) -> Name {
    Name::from_ascii(s).unwrap()
}

fn mx_of(lookup: &hickory_resolver::lookup::Lookup) -> Vec<(u16, String)> {
    let mut v: Vec<(u16, String)> = lookup
        .answers()
        .iter()
        .filter_map(|r| match &r.data {
            RData::MX(mx) => Some((mx.preference, mx.exchange.to_ascii())),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn dns_mx_a_aaaa_txt() {
    let dns = TestDns::start(ZONE).await;
    let r = dns.resolver();

    // Without the final dot the name is still asked as is (ndots 0, no search list).
    let mx = r.mx_lookup("dest.example").await.unwrap();
    assert_eq!(mx_of(&mx).len(), 2);
    let mx = r.mx_lookup("dest.example.").await.unwrap();
    assert_eq!(
        mx_of(&mx),
        vec![
            (10, "mx1.dest.example.".to_string()),
            (20, "mx2.dest.example.".to_string())
        ]
    );

    let nullmx = r.mx_lookup("nullmx.example.").await.unwrap();
    let recs = mx_of(&nullmx);
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].0, 0);
    assert!(
        matches!(&nullmx.answers()[0].data, RData::MX(m) if m.exchange.is_root()),
        "null MX exchange must be the root"
    );

    let a = r.ipv4_lookup("mx1.dest.example.").await.unwrap();
    let ips: Vec<_> = a.answers().iter().map(|r| r.data.clone()).collect();
    assert_eq!(ips, vec![RData::A(Ipv4Addr::new(127, 0, 0, 2).into())]);

    let ip = r.lookup_ip("mx2.dest.example.").await.unwrap();
    assert_eq!(
        ip.iter().collect::<Vec<_>>(),
        vec![IpAddr::V6(Ipv6Addr::LOCALHOST)]
    );

    // Case-insensitive names.
    let a = r.ipv4_lookup("NOmx.EXAMPLE.").await.unwrap();
    assert_eq!(a.answers().len(), 1);

    let txt = r.txt_lookup("txt.example.").await.unwrap();
    let RData::TXT(t) = &txt.answers()[0].data else {
        panic!("not TXT")
    };
    assert_eq!(t.txt_data.len(), 1);
    assert_eq!(&*t.txt_data[0], b"v=spf1 ip4:127.0.0.1 -all");

    let txt = r.txt_lookup("multi.example.").await.unwrap();
    let RData::TXT(t) = &txt.answers()[0].data else {
        panic!("not TXT")
    };
    let parts: Vec<&[u8]> = t.txt_data.iter().map(|s| &**s).collect();
    assert_eq!(
        parts,
        vec![&b"first part"[..], &b"second \"quoted\" part"[..]]
    );

    assert!(dns.query_count() >= 7, "query_count {}", dns.query_count());
}

#[tokio::test]
async fn dns_cname_is_followed() {
    let dns = TestDns::start(ZONE).await;
    let r = dns.resolver();
    let ip = r.lookup_ip("alias.example.").await.unwrap();
    assert_eq!(
        ip.iter().collect::<Vec<_>>(),
        vec![IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))]
    );
    // The CNAME target has no MX, so the answer is NODATA.
    let mx = r.mx_lookup("alias.example.").await;
    let e = mx.unwrap_err();
    assert!(e.is_no_records_found(), "expected NODATA, got {e:?}");
    assert!(!e.is_nx_domain(), "expected NODATA, got {e:?}");
}

#[tokio::test]
async fn dns_negative_answers() {
    let dns = TestDns::start(ZONE).await;
    let r = dns.resolver();

    let e = r.mx_lookup("nothere.example.").await.unwrap_err();
    assert!(e.is_nx_domain(), "expected NXDOMAIN, got {e:?}");
    assert!(
        matches!(&e, NetError::Dns(DnsError::NoRecordsFound(nr)) if nr.response_code == ResponseCode::NXDomain && nr.soa.is_some()),
        "{e:?}"
    );

    // Name exists with an A record only: NODATA.
    let e = r.mx_lookup("nomx.example.").await.unwrap_err();
    assert!(e.is_no_records_found(), "expected NODATA, got {e:?}");
    assert!(!e.is_nx_domain(), "expected NODATA, got {e:?}");
    assert!(
        matches!(&e, NetError::Dns(DnsError::NoRecordsFound(nr)) if nr.response_code == ResponseCode::NoError && nr.soa.is_some()),
        "{e:?}"
    );

    // Parent of a zone name (empty non-terminal): NODATA, not NXDOMAIN.
    let e = r.mx_lookup("example.").await.unwrap_err();
    assert!(e.is_no_records_found(), "expected NODATA, got {e:?}");
    assert!(!e.is_nx_domain(), "expected NODATA, got {e:?}");

    let e = r.mx_lookup("broken.example.").await.unwrap_err();
    assert!(
        matches!(
            &e,
            NetError::Dns(DnsError::ResponseCode(ResponseCode::ServFail))
        ),
        "expected SERVFAIL, got {e:?}"
    );
    assert!(!e.is_no_records_found());
}

/// Sends one query over UDP and returns the parsed response.
async fn raw_query(addr: SocketAddr, qname: &str, qtype: RecordType) -> Message {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut msg = Message::query();
    msg.add_query(Query::query(name(qname), qtype));
    sock.send_to(&msg.to_vec().unwrap(), addr).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let (n, _) = tokio::time::timeout(T, sock.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let resp = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(resp.metadata.id, msg.metadata.id);
    resp
}

#[tokio::test]
async fn dns_raw_wire_answers() {
    let dns = TestDns::start(ZONE).await;

    let resp = raw_query(dns.addr, "Dest.Example.", RecordType::MX).await;
    assert_eq!(resp.metadata.response_code, ResponseCode::NoError);
    assert!(resp.metadata.authoritative);
    assert_eq!(resp.answers.len(), 2);
    assert_eq!(resp.queries[0].name().to_ascii(), "Dest.Example.");

    let resp = raw_query(dns.addr, "nomx.example.", RecordType::TXT).await;
    assert_eq!(resp.metadata.response_code, ResponseCode::NoError);
    assert!(resp.answers.is_empty());
    assert_eq!(resp.authorities.len(), 1);
    assert_eq!(resp.authorities[0].record_type(), RecordType::SOA);

    let resp = raw_query(dns.addr, "x.nothere.example.", RecordType::A).await;
    assert_eq!(resp.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(resp.authorities[0].record_type(), RecordType::SOA);

    let resp = raw_query(dns.addr, "BROKEN.example.", RecordType::A).await;
    assert_eq!(resp.metadata.response_code, ResponseCode::ServFail);

    let resp = raw_query(dns.addr, "alias.example.", RecordType::A).await;
    let types: Vec<_> = resp.answers.iter().map(|r| r.record_type()).collect();
    assert_eq!(types, vec![RecordType::CNAME, RecordType::A]);

    assert_eq!(dns.query_count(), 5);
}

#[tokio::test]
async fn dns_tcp_and_truncation() {
    // About 20 * 200 bytes of TXT: too big for UDP, so the resolver retries over TCP.
    let mut zone = String::new();
    for i in 0..20 {
        zone.push_str(&format!("big.example. TXT \"{i:02}{}\"\n", "x".repeat(198)));
    }
    let dns = TestDns::start(&zone).await;

    let resp = raw_query(dns.addr, "big.example.", RecordType::TXT).await;
    assert!(resp.metadata.truncation, "UDP answer should be truncated");
    assert!(resp.answers.is_empty());

    let txt = dns.resolver().txt_lookup("big.example.").await.unwrap();
    assert_eq!(txt.answers().len(), 20);

    // TCP only.
    let mut tcp = ConnectionConfig::tcp();
    tcp.port = dns.addr.port();
    let ns = NameServerConfig::new(dns.addr.ip(), true, vec![tcp]);
    let mut b = TokioResolver::builder_with_config(
        ResolverConfig::from_name_servers(vec![ns]),
        TokioRuntimeProvider::default(),
    );
    b.options_mut().use_hosts_file = ResolveHosts::Never;
    b.options_mut().cache_size = 0;
    let r = b.build().unwrap();
    let txt = r.txt_lookup("big.example.").await.unwrap();
    assert_eq!(txt.answers().len(), 20);
    let e = r.mx_lookup("nothere.example.").await.unwrap_err();
    assert!(e.is_nx_domain(), "{e:?}");
}

#[tokio::test]
async fn dns_stops_when_dropped() {
    let dns = TestDns::start(ZONE).await;
    let addr = dns.addr;
    assert_eq!(
        raw_query(addr, "dest.example.", RecordType::MX)
            .await
            .answers
            .len(),
        2
    );
    drop(dns);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "TCP still accepting after drop"
    );
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut msg = Message::query();
    msg.add_query(Query::query(name("dest.example."), RecordType::MX));
    sock.send_to(&msg.to_vec().unwrap(), addr).await.unwrap();
    let mut buf = [0u8; 512];
    let got = tokio::time::timeout(Duration::from_millis(300), sock.recv_from(&mut buf)).await;
    assert!(!matches!(got, Ok(Ok(_))), "UDP still answering after drop");
}

#[test]
#[should_panic(expected = "zone line 2")]
fn dns_zone_syntax_error_panics() {
    common::dns::Zone::parse("a.example. A 127.0.0.1\nb.example. A not-an-ip\n");
}

/// Minimal SMTP client over any stream.
struct Client<S> {
    io: BufReader<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    fn new(s: S) -> Self {
        Client {
            io: BufReader::new(s),
        }
    }

    /// Reads one (possibly multi-line) reply: code and the text lines.
    async fn reply(&mut self) -> (u16, Vec<String>) {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(T, self.io.read_line(&mut line))
                .await
                .unwrap()
                .unwrap();
            assert!(
                n > 0,
                "connection closed while reading reply; got {lines:?}"
            );
            assert!(line.ends_with("\r\n"), "reply line without CRLF: {line:?}");
            let line = line.trim_end().to_string();
            let code: u16 = line[..3].parse().unwrap();
            let last = line.as_bytes().get(3) != Some(&b'-');
            lines.push(line[4.min(line.len())..].to_string());
            if last {
                return (code, lines);
            }
        }
    }

    async fn send(&mut self, s: &str) {
        self.io.get_mut().write_all(s.as_bytes()).await.unwrap();
    }

    async fn cmd(&mut self, s: &str) -> (u16, Vec<String>) {
        self.send(&format!("{s}\r\n")).await;
        self.reply().await
    }

    async fn expect_eof(&mut self) {
        let mut rest = Vec::new();
        let n = tokio::time::timeout(T, self.io.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap_or(0);
        assert_eq!(
            n,
            0,
            "expected close, got {:?}",
            String::from_utf8_lossy(&rest)
        );
    }
}

async fn connect(addr: SocketAddr) -> Client<TcpStream> {
    Client::new(TcpStream::connect(addr).await.unwrap())
}

#[tokio::test]
async fn smtp_pipelined_delivery_with_rejected_rcpt() {
    let script = Script::new().rcpt_reply("Bad@Dest.Example", "550 5.1.1 no such user");
    let rx = Receiver::start(loopback(1), 0, script).await.unwrap();
    let mut c = connect(rx.addr()).await;

    let (code, lines) = c.reply().await;
    assert_eq!((code, lines[0].as_str()), (220, "mx.test ESMTP test"));
    let (code, caps) = c.cmd("EHLO client.test").await;
    assert_eq!(code, 250);
    for cap in ["PIPELINING", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"] {
        assert!(caps.iter().any(|l| l == cap), "{cap} missing from {caps:?}");
    }
    assert!(caps.iter().any(|l| l.starts_with("SIZE ")), "{caps:?}");
    assert!(!caps.iter().any(|l| l == "STARTTLS"), "{caps:?}");

    c.send(
        "MAIL FROM:<sender@src.example> BODY=8BITMIME\r\n\
         RCPT TO:<ok@dest.example>\r\n\
         RCPT TO:<bad@dest.example>\r\n\
         DATA\r\n",
    )
    .await;
    assert_eq!(c.reply().await.0, 250);
    assert_eq!(c.reply().await.0, 250);
    let (code, text) = c.reply().await;
    assert_eq!((code, text[0].as_str()), (550, "5.1.1 no such user"));
    assert_eq!(c.reply().await.0, 354);

    let body = "Subject: hi\r\n\r\n..leading dot\r\n..\r\nlast line\r\n.\r\n";
    let (code, _) = c.cmd(body.trim_end_matches("\r\n")).await;
    assert_eq!(code, 250);
    assert_eq!(c.cmd("QUIT").await.0, 221);
    c.expect_eof().await;

    let msgs = rx.wait_for_messages(1, T).await;
    assert_eq!(msgs.len(), 1);
    let m = &msgs[0];
    assert_eq!(m.mail_from, "sender@src.example");
    assert_eq!(m.rcpt_to, vec!["ok@dest.example"]);
    assert_eq!(
        m.data,
        b"Subject: hi\r\n\r\n.leading dot\r\n.\r\nlast line\r\n"
    );
    assert!(!m.tls);
    assert!(!m.bare_lf);
    assert_eq!(m.helo, "client.test");
    assert_eq!(m.peer.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
    assert_eq!(rx.connections(), 1);
    assert_eq!(
        rx.commands(),
        vec![
            "EHLO client.test",
            "MAIL FROM:<sender@src.example> BODY=8BITMIME",
            "RCPT TO:<ok@dest.example>",
            "RCPT TO:<bad@dest.example>",
            "DATA",
            "QUIT",
        ]
    );
}

#[tokio::test]
async fn smtp_data_reply_by_attempt_and_rset() {
    let script = Script::new().data(|n, _| (n == 0).then(|| "451 4.3.0 temporary".to_string()));
    let rx = Receiver::start(loopback(1), 0, script).await.unwrap();
    let mut c = connect(rx.addr()).await;
    c.reply().await;
    assert_eq!(c.cmd("HELO client.test").await.0, 250);
    for expected in [451, 250] {
        assert_eq!(c.cmd("MAIL FROM:<>").await.0, 250);
        assert_eq!(c.cmd("RCPT TO:<a@dest.example>").await.0, 250);
        assert_eq!(c.cmd("DATA").await.0, 354);
        assert_eq!(c.cmd("x\r\n.").await.0, expected);
    }
    assert_eq!(c.cmd("MAIL FROM:<a@b>").await.0, 250);
    assert_eq!(c.cmd("RSET").await.0, 250);
    assert_eq!(c.cmd("RCPT TO:<a@dest.example>").await.0, 503);
    assert_eq!(c.cmd("NOOP").await.0, 250);
    assert_eq!(c.cmd("BOGUS").await.0, 500);
    let msgs = rx.messages();
    assert_eq!(msgs.len(), 1, "only the second transfer is accepted");
    assert_eq!(msgs[0].mail_from, "");
    assert_eq!(msgs[0].data, b"x\r\n");
}

#[tokio::test]
async fn smtp_sequence_errors() {
    let rx = Receiver::start(
        loopback(1),
        0,
        Script::new().rcpt_reply("x@y", "450 4.2.1 later"),
    )
    .await
    .unwrap();
    let mut c = connect(rx.addr()).await;
    c.reply().await;
    assert_eq!(c.cmd("MAIL FROM:<a@b>").await.0, 503, "MAIL before EHLO");
    assert_eq!(c.cmd("EHLO c").await.0, 250);
    assert_eq!(c.cmd("DATA").await.0, 503, "DATA before MAIL");
    assert_eq!(c.cmd("MAIL FROM:a@b").await.0, 501, "missing brackets");
    assert_eq!(c.cmd("MAIL FROM:<a@b> SIZE=999999999").await.0, 552);
    assert_eq!(c.cmd("MAIL FROM:<a@b>").await.0, 250);
    assert_eq!(c.cmd("MAIL FROM:<a@b>").await.0, 503, "nested MAIL");
    assert_eq!(c.cmd("RCPT TO:<X@Y>").await.0, 450);
    assert_eq!(c.cmd("DATA").await.0, 554, "no valid recipients");
    assert_eq!(c.cmd("STARTTLS").await.0, 454, "TLS not configured");
    assert!(rx.messages().is_empty());
}

#[tokio::test]
async fn smtp_greeting_rejection_closes() {
    let rx = Receiver::start(loopback(1), 0, Script::new().greeting("421 4.3.2 busy"))
        .await
        .unwrap();
    let mut c = connect(rx.addr()).await;
    let (code, text) = c.reply().await;
    assert_eq!((code, text[0].as_str()), (421, "4.3.2 busy"));
    c.expect_eof().await;
    assert_eq!(rx.connections(), 1);
}

#[tokio::test]
async fn smtp_disconnect_reply_drops_connection() {
    let script = Script::new().rcpt(|_| Some(DISCONNECT.to_string()));
    let rx = Receiver::start(loopback(1), 0, script).await.unwrap();
    let mut c = connect(rx.addr()).await;
    c.reply().await;
    c.cmd("EHLO c").await;
    c.cmd("MAIL FROM:<a@b>").await;
    c.send("RCPT TO:<x@y>\r\n").await;
    c.expect_eof().await;
}

#[tokio::test]
async fn smtp_no_pipelining_and_bare_lf() {
    let rx = Receiver::start(loopback(1), 0, Script::new().no_pipelining())
        .await
        .unwrap();
    let mut c = connect(rx.addr()).await;
    c.reply().await;
    let (_, caps) = c.cmd("EHLO c").await;
    assert!(!caps.iter().any(|l| l == "PIPELINING"), "{caps:?}");
    c.cmd("MAIL FROM:<a@b>").await;
    c.cmd("RCPT TO:<x@y>").await;
    c.cmd("DATA").await;
    assert_eq!(c.cmd("a\nb\r\n.").await.0, 250);
    let m = &rx.wait_for_messages(1, T).await[0];
    assert!(m.bare_lf);
    assert_eq!(m.data, b"a\nb\r\n");
}

#[tokio::test]
#[should_panic(expected = "expected 1 message(s)")]
async fn smtp_wait_for_messages_times_out() {
    let rx = Receiver::start(loopback(1), 0, Script::new())
        .await
        .unwrap();
    rx.wait_for_messages(1, Duration::from_millis(100)).await;
}

#[tokio::test]
async fn smtp_same_port_on_several_ips() {
    let ips = [loopback(2), loopback(3)];
    let port = free_port_on(&ips);
    let a = Receiver::start(ips[0], port, Script::new().name("a.test"))
        .await
        .unwrap();
    let b = Receiver::start(ips[1], port, Script::new().name("b.test"))
        .await
        .unwrap();
    assert_eq!(a.addr(), SocketAddr::new(ips[0], port));
    assert_eq!(b.addr(), SocketAddr::new(ips[1], port));
    let (_, ga) = connect(a.addr()).await.reply().await;
    let (_, gb) = connect(b.addr()).await.reply().await;
    assert_eq!(ga[0], "a.test ESMTP test");
    assert_eq!(gb[0], "b.test ESMTP test");
    assert_eq!((a.connections(), b.connections()), (1, 1));
    let addr = a.addr();
    drop(a);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "receiver still accepting after drop"
    );
}

#[tokio::test]
async fn smtp_starttls_session() {
    let rx = Receiver::start(loopback(1), 0, Script::new().tls())
        .await
        .unwrap();
    let mut c = connect(rx.addr()).await;
    c.reply().await;
    let (_, caps) = c.cmd("EHLO plain.test").await;
    assert!(caps.iter().any(|l| l == "STARTTLS"), "{caps:?}");
    assert_eq!(c.cmd("STARTTLS").await.0, 220);

    let connector = baton::tls::opportunistic_connector();
    let tcp = c.io.into_inner();
    let tls = connector
        .connect(ServerName::try_from("mx.test").unwrap(), tcp)
        .await
        .expect("TLS handshake");
    let peer_cert = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_eq!(Some(peer_cert), rx.cert_der());

    let mut c = Client::new(tls);
    assert_eq!(
        c.cmd("MAIL FROM:<a@b>").await.0,
        503,
        "EHLO required again after TLS"
    );
    let (_, caps) = c.cmd("EHLO tls.test").await;
    assert!(!caps.iter().any(|l| l == "STARTTLS"), "{caps:?}");
    assert_eq!(c.cmd("STARTTLS").await.0, 503);
    c.send("MAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nDATA\r\n").await;
    for want in [250, 250, 354] {
        assert_eq!(c.reply().await.0, want);
    }
    assert_eq!(c.cmd("secret\r\n.").await.0, 250);
    assert_eq!(c.cmd("QUIT").await.0, 221);

    let m = &rx.wait_for_messages(1, T).await[0];
    assert!(m.tls);
    assert_eq!(m.helo, "tls.test");
    assert_eq!(m.data, b"secret\r\n");
}
