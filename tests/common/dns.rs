//! Authoritative DNS server for test zones, on UDP and TCP at 127.0.0.1.
//!
//! Zone text has one record per line: `NAME TYPE DATA`. Types: A, AAAA, MX,
//! TXT, CNAME, PTR, and the pseudo-type SERVFAIL (every query for that name gets
//! SERVFAIL). An optional `IN` class token after the name is skipped. All
//! records have TTL 60. Names are case-insensitive; a missing final dot is
//! added. Blank lines and `#` comments are ignored.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_resolver::proto::rr::rdata::{A, AAAA, CNAME, MX, PTR, SOA, TXT};
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::{JoinHandle, JoinSet};

const TTL: u32 = 60;
const MAX_CNAME_HOPS: usize = 8;

/// Parsed test zone.
#[derive(Debug, Default)]
pub struct Zone {
    /// Records by lowercase FQDN (with final dot).
    records: HashMap<String, Vec<RData>>,
    /// Lowercase FQDNs whose queries get SERVFAIL.
    servfail: HashSet<String>,
}

impl Zone {
    /// Parses zone text. Panics with the line number on a syntax error.
    pub fn parse(text: &str) -> Zone {
        let mut zone = Zone::default();
        for (i, raw) in text.lines().enumerate() {
            let line = strip_comment(raw).trim();
            if line.is_empty() {
                continue;
            }
            let fail = |msg: &str| -> ! { panic!("zone line {}: {msg}: {raw:?}", i + 1) };
            let mut parts = line.split_whitespace();
            let name = parts.next().unwrap_or_else(|| fail("missing name"));
            let mut rtype = parts.next().unwrap_or_else(|| fail("missing type"));
            if rtype.eq_ignore_ascii_case("IN") {
                rtype = parts.next().unwrap_or_else(|| fail("missing type"));
            }
            let key = fqdn_key(name);
            let args: Vec<&str> = parts.collect();
            let rdata = match rtype.to_ascii_uppercase().as_str() {
                "SERVFAIL" => {
                    zone.servfail.insert(key);
                    continue;
                }
                "A" => {
                    let [ip] = args[..] else {
                        fail("A needs one address")
                    };
                    RData::A(A(ip.parse().unwrap_or_else(|_| fail("bad IPv4 address"))))
                }
                "AAAA" => {
                    let [ip] = args[..] else {
                        fail("AAAA needs one address")
                    };
                    RData::AAAA(AAAA(
                        ip.parse().unwrap_or_else(|_| fail("bad IPv6 address")),
                    ))
                }
                "MX" => {
                    let [pref, host] = args[..] else {
                        fail("MX needs preference and host")
                    };
                    let pref = pref.parse().unwrap_or_else(|_| fail("bad MX preference"));
                    RData::MX(MX::new(
                        pref,
                        parse_name(host).unwrap_or_else(|| fail("bad MX host")),
                    ))
                }
                "CNAME" => {
                    let [target] = args[..] else {
                        fail("CNAME needs one target")
                    };
                    RData::CNAME(CNAME(
                        parse_name(target).unwrap_or_else(|| fail("bad CNAME target")),
                    ))
                }
                "PTR" => {
                    let [target] = args[..] else {
                        fail("PTR needs one target")
                    };
                    RData::PTR(PTR(
                        parse_name(target).unwrap_or_else(|| fail("bad PTR target")),
                    ))
                }
                "TXT" => {
                    let rest = line_after_type(line, rtype);
                    let strings = parse_txt(rest).unwrap_or_else(|e| fail(e));
                    RData::TXT(TXT::from_bytes(
                        strings.iter().map(|s| s.as_slice()).collect(),
                    ))
                }
                other => fail(&format!("unsupported type {other}")),
            };
            zone.records.entry(key).or_default().push(rdata);
        }
        zone
    }

    /// Returns true if `key` owns records, is marked SERVFAIL, or is a parent of such a name.
    fn name_exists(&self, key: &str) -> bool {
        let is_at_or_below = |n: &String| n == key || key == "." || n.ends_with(&format!(".{key}"));
        self.records.keys().any(is_at_or_below) || self.servfail.iter().any(is_at_or_below)
    }

    /// Builds the answer for one question.
    fn answer(&self, qname: &Name, qtype: RecordType, resp: &mut Message) {
        let mut key = fqdn_key(&qname.to_ascii());
        let mut owner = qname.clone();
        for _ in 0..=MAX_CNAME_HOPS {
            if self.servfail.contains(&key) {
                resp.answers.clear();
                resp.metadata.response_code = ResponseCode::ServFail;
                return;
            }
            let Some(rdatas) = self.records.get(&key) else {
                if resp.answers.is_empty() {
                    let code = if self.name_exists(&key) {
                        ResponseCode::NoError
                    } else {
                        ResponseCode::NXDomain
                    };
                    resp.metadata.response_code = code;
                    resp.authorities.push(soa_for(&owner));
                }
                // A CNAME pointing outside the zone ends the chain with NOERROR.
                return;
            };
            let matching: Vec<&RData> = rdatas
                .iter()
                .filter(|r| qtype == RecordType::ANY || r.record_type() == qtype)
                .collect();
            if !matching.is_empty() {
                for r in matching {
                    resp.answers
                        .push(Record::from_rdata(owner.clone(), TTL, r.clone()));
                }
                return;
            }
            let cname = rdatas.iter().find_map(|r| match r {
                RData::CNAME(c) => Some(c.0.clone()),
                _ => None,
            });
            match cname {
                Some(target) => {
                    resp.answers.push(Record::from_rdata(
                        owner,
                        TTL,
                        RData::CNAME(CNAME(target.clone())),
                    ));
                    key = fqdn_key(&target.to_ascii());
                    owner = target;
                }
                None => {
                    // NODATA: the name exists without records of this type.
                    resp.authorities.push(soa_for(&owner));
                    return;
                }
            }
        }
        // CNAME loop or chain too long.
        resp.answers.clear();
        resp.metadata.response_code = ResponseCode::ServFail;
    }

    /// Builds the response to one wire-format query, or `None` if it has no parsable header.
    fn respond(&self, query: &[u8], udp: bool) -> Option<Vec<u8>> {
        let req = match Message::from_vec(query) {
            Ok(m) => m,
            Err(_) => {
                if query.len() < 2 {
                    return None;
                }
                let id = u16::from_be_bytes([query[0], query[1]]);
                let resp = Message::error_msg(id, OpCode::Query, ResponseCode::FormErr);
                return resp.to_vec().ok();
            }
        };
        if req.metadata.message_type != MessageType::Query {
            return None;
        }

        let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
        resp.metadata.recursion_desired = req.metadata.recursion_desired;
        resp.metadata.recursion_available = true;
        resp.metadata.authoritative = true;
        resp.queries = req.queries.clone();
        if req.edns.is_some() {
            let mut edns = Edns::new();
            edns.set_max_payload(1232);
            resp.set_edns(edns);
        }

        if req.metadata.op_code != OpCode::Query {
            resp.metadata.response_code = ResponseCode::NotImp;
        } else if req.queries.len() != 1 {
            resp.metadata.response_code = ResponseCode::FormErr;
        } else {
            let q = &req.queries[0];
            self.answer(&q.name, q.query_type, &mut resp);
        }

        let bytes = resp.to_vec().ok()?;
        let limit = match &req.edns {
            Some(e) => usize::from(e.max_payload().clamp(512, 1232)),
            None => 512,
        };
        if udp && bytes.len() > limit {
            return resp.truncate().to_vec().ok();
        }
        Some(bytes)
    }
}

/// A running test DNS server. Stops when dropped.
pub struct TestDns {
    pub addr: SocketAddr,
    queries: Arc<AtomicUsize>,
    tasks: Vec<JoinHandle<()>>,
}

impl TestDns {
    /// Starts a server for `zone` on 127.0.0.1, UDP and TCP on the same port.
    pub async fn start(zone: &str) -> TestDns {
        let zone = Arc::new(Zone::parse(zone));
        let (udp, tcp) = bind_pair().await;
        let addr = udp.local_addr().expect("udp local_addr");
        let queries = Arc::new(AtomicUsize::new(0));
        let udp_task = tokio::spawn(serve_udp(udp, zone.clone(), queries.clone()));
        let tcp_task = tokio::spawn(serve_tcp(tcp, zone, queries.clone()));
        TestDns {
            addr,
            queries,
            tasks: vec![udp_task, tcp_task],
        }
    }

    /// Number of queries answered so far (UDP and TCP).
    pub fn query_count(&self) -> usize {
        self.queries.load(Ordering::SeqCst)
    }

    /// Builds a resolver that queries only this server (UDP, then TCP on
    /// truncation), without cache, hosts file or search domains. Timeout 2 s, 1 attempt.
    pub fn resolver(&self) -> TokioResolver {
        resolver_for(self.addr)
    }
}

impl Drop for TestDns {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Builds a resolver that queries only the DNS server at `addr` (see [`TestDns::resolver`]).
pub fn resolver_for(addr: SocketAddr) -> TokioResolver {
    let mut udp = ConnectionConfig::udp();
    udp.port = addr.port();
    let mut tcp = ConnectionConfig::tcp();
    tcp.port = addr.port();
    let ns = NameServerConfig::new(addr.ip(), true, vec![udp, tcp]);
    let config = ResolverConfig::from_name_servers(vec![ns]);
    let mut builder = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default());
    let opts: &mut ResolverOpts = builder.options_mut();
    opts.cache_size = 0;
    opts.use_hosts_file = ResolveHosts::Never;
    opts.ndots = 0;
    opts.timeout = Duration::from_secs(2);
    opts.attempts = 1;
    builder.build().expect("build test resolver")
}

async fn bind_pair() -> (UdpSocket, TcpListener) {
    for _ in 0..100 {
        let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind UDP 127.0.0.1:0");
        let port = udp.local_addr().expect("udp local_addr").port();
        if let Ok(tcp) = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await {
            return (udp, tcp);
        }
    }
    panic!("no port free on 127.0.0.1 for both UDP and TCP after 100 tries");
}

async fn serve_udp(sock: UdpSocket, zone: Arc<Zone>, queries: Arc<AtomicUsize>) {
    let mut buf = vec![0u8; 65535];
    loop {
        let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
            continue;
        };
        if let Some(resp) = zone.respond(&buf[..n], true) {
            queries.fetch_add(1, Ordering::SeqCst);
            let _ = sock.send_to(&resp, peer).await;
        }
    }
}

async fn serve_tcp(listener: TcpListener, zone: Arc<Zone>, queries: Arc<AtomicUsize>) {
    // Dropping the JoinSet (when this task is aborted) aborts the connections.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    conns.spawn(serve_tcp_conn(stream, zone.clone(), queries.clone()));
                }
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn serve_tcp_conn(mut stream: TcpStream, zone: Arc<Zone>, queries: Arc<AtomicUsize>) {
    loop {
        let mut len = [0u8; 2];
        if stream.read_exact(&mut len).await.is_err() {
            return;
        }
        let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if stream.read_exact(&mut msg).await.is_err() {
            return;
        }
        let Some(resp) = zone.respond(&msg, false) else {
            return;
        };
        queries.fetch_add(1, Ordering::SeqCst);
        let Ok(resp_len) = u16::try_from(resp.len()) else {
            return;
        };
        let mut out = resp_len.to_be_bytes().to_vec();
        out.extend_from_slice(&resp);
        if stream.write_all(&out).await.is_err() {
            return;
        }
    }
}

/// Builds the SOA for negative responses, owned by the last two labels of `name`.
/// NOTE: the zone has no declared apex, so this owner is a guess that suits `x.example.` zones.
fn soa_for(name: &Name) -> Record {
    let labels = name.num_labels();
    let mut apex = name.clone();
    while apex.num_labels() > 2.min(labels) {
        apex = apex.base_name();
    }
    let soa = SOA::new(
        Name::from_ascii("ns.test.").expect("static name"),
        Name::from_ascii("hostmaster.test.").expect("static name"),
        1,
        3600,
        600,
        86400,
        TTL,
    );
    Record::from_rdata(apex, TTL, RData::SOA(soa))
}

fn fqdn_key(name: &str) -> String {
    let mut key = name.to_ascii_lowercase();
    if !key.ends_with('.') {
        key.push('.');
    }
    key
}

fn parse_name(s: &str) -> Option<Name> {
    let s = if s.ends_with('.') {
        s.to_string()
    } else {
        format!("{s}.")
    };
    Name::from_ascii(s).ok()
}

/// Removes a `#` comment that is not inside a quoted string.
fn strip_comment(line: &str) -> &str {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '#' if !quoted => return &line[..i],
            _ => {}
        }
    }
    line
}

/// Returns the text after the type token (its first occurrence after the name).
fn line_after_type<'a>(line: &'a str, rtype: &str) -> &'a str {
    let name_end = line.find(char::is_whitespace).unwrap_or(line.len());
    let rest = &line[name_end..];
    let pos = rest.find(rtype).expect("type token present");
    &rest[pos + rtype.len()..]
}

/// Parses TXT data: quoted strings (with `\"` and `\\` escapes) or bare words,
/// each one character-string.
fn parse_txt(s: &str) -> Result<Vec<Vec<u8>>, &'static str> {
    let mut out = Vec::new();
    let mut chars = s.trim().chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        let mut cur = String::new();
        if c == '"' {
            chars.next();
            let mut closed = false;
            while let Some(c) = chars.next() {
                match c {
                    '\\' => cur.push(chars.next().ok_or("dangling backslash")?),
                    '"' => {
                        closed = true;
                        break;
                    }
                    _ => cur.push(c),
                }
            }
            if !closed {
                return Err("unterminated quoted string");
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                cur.push(c);
                chars.next();
            }
        }
        if cur.len() > 255 {
            return Err("TXT character-string longer than 255 bytes");
        }
        out.push(cur.into_bytes());
    }
    if out.is_empty() {
        return Err("TXT needs at least one string");
    }
    Ok(out)
}
