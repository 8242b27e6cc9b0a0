//! Receiving SMTP server (RFC 5321) with scripted replies, for tests.
//!
//! Listens on a loopback address, records every accepted message, every
//! command line and the connection count. Replies are taken from a [`Script`].

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener as StdTcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

/// A reply equal to this closes the connection without sending anything.
pub const DISCONNECT: &str = "<disconnect>";
/// A reply equal to this sends nothing and reads input until the client closes.
pub const HANG: &str = "<hang>";

/// Reply chosen from an address (MAIL sender or RCPT recipient); `None` = default.
pub type AddrReply = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;
/// Reply after the end of DATA: gets the number of earlier DATA transfers on
/// this receiver (0 for the first, rejected ones included) and the message.
/// `None` = default.
pub type DataReply = Arc<dyn Fn(usize, &Received) -> Option<String> + Send + Sync>;

/// Scripted replies of the receiver. Replies are full lines such as
/// `"550 5.1.1 no such user"`; a reply with `\n` is sent as several lines
/// (the caller writes the `250-` continuation markers).
#[derive(Clone)]
pub struct Script {
    /// Host name used in the greeting, the EHLO reply and the certificate.
    pub name: String,
    /// Reply on connect; default `220 <name> ESMTP test`. A non-2xx greeting
    /// is sent and then the connection is closed.
    pub greeting: Option<String>,
    /// Replaces the whole EHLO reply (for example `502 5.5.1 no EHLO`).
    pub ehlo: Option<String>,
    /// Reply to MAIL by sender address (empty string for `<>`); default `250 2.1.0 ok`.
    pub mail: Option<AddrReply>,
    /// Per-recipient RCPT replies, keys in lowercase; checked before `rcpt`.
    pub rcpt_replies: HashMap<String, String>,
    /// Reply to RCPT by recipient address; default `250 2.1.5 ok`.
    pub rcpt: Option<AddrReply>,
    /// Reply after the end of DATA; default `250 2.0.0 queued`.
    pub data: Option<DataReply>,
    /// Replaces the `220 2.0.0 ready` reply to STARTTLS; a reply other than 220 keeps the session in plaintext.
    pub starttls: Option<String>,
    /// Offer STARTTLS with a self-signed certificate for `name` and `localhost`.
    pub tls: bool,
    /// Offer STARTTLS with this configuration instead of a self-signed one.
    pub tls_config: Option<Arc<ServerConfig>>,
    /// Leave PIPELINING out of the EHLO reply.
    pub no_pipelining: bool,
    /// Wait this long before replying after DATA, to hold connections open.
    pub data_delay: Duration,
    /// Advertised SIZE and the limit enforced on MAIL SIZE= and on DATA.
    pub max_size: usize,
}

impl Default for Script {
    fn default() -> Self {
        Script {
            name: "mx.test".to_string(),
            greeting: None,
            ehlo: None,
            mail: None,
            rcpt_replies: HashMap::new(),
            rcpt: None,
            data: None,
            starttls: None,
            tls: false,
            tls_config: None,
            no_pipelining: false,
            data_delay: Duration::ZERO,
            max_size: 10 * 1024 * 1024,
        }
    }
}

impl Script {
    pub fn new() -> Script {
        Script::default()
    }

    pub fn name(mut self, name: &str) -> Script {
        self.name = name.to_string();
        self
    }

    pub fn greeting(mut self, reply: &str) -> Script {
        self.greeting = Some(reply.to_string());
        self
    }

    pub fn ehlo_reply(mut self, reply: &str) -> Script {
        self.ehlo = Some(reply.to_string());
        self
    }

    pub fn mail(mut self, f: impl Fn(&str) -> Option<String> + Send + Sync + 'static) -> Script {
        self.mail = Some(Arc::new(f));
        self
    }

    /// Fixed RCPT reply for one recipient address (case-insensitive).
    pub fn rcpt_reply(mut self, addr: &str, reply: &str) -> Script {
        self.rcpt_replies
            .insert(addr.to_ascii_lowercase(), reply.to_string());
        self
    }

    pub fn rcpt(mut self, f: impl Fn(&str) -> Option<String> + Send + Sync + 'static) -> Script {
        self.rcpt = Some(Arc::new(f));
        self
    }

    pub fn data(
        mut self,
        f: impl Fn(usize, &Received) -> Option<String> + Send + Sync + 'static,
    ) -> Script {
        self.data = Some(Arc::new(f));
        self
    }

    /// Same reply after every DATA.
    pub fn data_reply(self, reply: &str) -> Script {
        let reply = reply.to_string();
        self.data(move |_, _| Some(reply.clone()))
    }

    pub fn starttls_reply(mut self, reply: &str) -> Script {
        self.starttls = Some(reply.to_string());
        self
    }

    /// Offers STARTTLS with `config` (a certificate from a test CA, say).
    pub fn tls_with(mut self, config: Arc<ServerConfig>) -> Script {
        self.tls_config = Some(config);
        self
    }

    pub fn tls(mut self) -> Script {
        self.tls = true;
        self
    }

    pub fn data_delay(mut self, delay: Duration) -> Script {
        self.data_delay = delay;
        self
    }

    pub fn no_pipelining(mut self) -> Script {
        self.no_pipelining = true;
        self
    }

    pub fn max_size(mut self, n: usize) -> Script {
        self.max_size = n;
        self
    }
}

/// One message accepted with a 2xx reply after DATA.
#[derive(Clone, Debug)]
pub struct Received {
    /// Sender address without brackets; empty for `<>`.
    pub mail_from: String,
    /// Accepted recipients, in order.
    pub rcpt_to: Vec<String>,
    /// Content after dot-unstuffing, line endings as received, without the final `.CRLF`.
    pub data: Vec<u8>,
    /// True if the content has an LF not preceded by CR (or the end was `.` LF).
    pub bare_lf: bool,
    /// True if the session was under TLS when the message was sent.
    pub tls: bool,
    /// Argument of the last EHLO or HELO.
    pub helo: String,
    pub peer: SocketAddr,
    /// When the end of the data arrived.
    pub at: std::time::Instant,
}

impl Received {
    pub fn data_str(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

#[derive(Default)]
struct Shared {
    messages: Mutex<Vec<Received>>,
    commands: Mutex<Vec<String>>,
    connections: AtomicUsize,
    data_transfers: AtomicUsize,
    /// Connections open now, and the most open at once.
    open: AtomicUsize,
    max_open: AtomicUsize,
}

/// A running receiver. Stops when dropped.
pub struct Receiver {
    addr: SocketAddr,
    shared: Arc<Shared>,
    cert: Option<CertificateDer<'static>>,
    task: JoinHandle<()>,
}

impl Receiver {
    /// Listens on `ip:port` (port 0 = any free port). `ip` must be loopback.
    pub async fn start(ip: IpAddr, port: u16, script: Script) -> io::Result<Receiver> {
        assert!(
            ip.is_loopback(),
            "receiver must listen on loopback, got {ip}"
        );
        let listener = TcpListener::bind((ip, port)).await?;
        let addr = listener.local_addr()?;
        let (tls, cert) = if let Some(config) = &script.tls_config {
            (Some(TlsAcceptor::from(config.clone())), None)
        } else if script.tls {
            let (config, cert) = tls_config(&script.name)?;
            (Some(TlsAcceptor::from(config)), Some(cert))
        } else {
            (None, None)
        };
        let shared = Arc::new(Shared::default());
        let ctx = Arc::new(Ctx {
            script,
            tls,
            shared: shared.clone(),
        });
        let task = tokio::spawn(accept_loop(listener, ctx));
        Ok(Receiver {
            addr,
            shared,
            cert,
            task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Messages accepted so far, in order.
    pub fn messages(&self) -> Vec<Received> {
        self.shared.messages.lock().unwrap().clone()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Returns every command line received (without CRLF, DATA content excluded), in order.
    /// Returns the most connections that were open at once.
    pub fn max_concurrent(&self) -> usize {
        self.shared.max_open.load(Ordering::SeqCst)
    }

    pub fn commands(&self) -> Vec<String> {
        self.shared.commands.lock().unwrap().clone()
    }

    /// Returns the self-signed certificate, when the script has TLS.
    pub fn cert_der(&self) -> Option<CertificateDer<'static>> {
        self.cert.clone()
    }

    /// Waits until at least `n` messages were accepted; panics on timeout.
    pub async fn wait_for_messages(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let msgs = self.messages();
            if msgs.len() >= n {
                return msgs;
            }
            if Instant::now() >= deadline {
                panic!(
                    "receiver {}: expected {n} message(s) within {timeout:?}, got {} \
                     ({} connection(s)); commands: {:?}",
                    self.addr,
                    msgs.len(),
                    self.connections(),
                    self.commands()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until at least `n` connections were accepted; panics on timeout.
    pub async fn wait_for_connections(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.connections() < n {
            if Instant::now() >= deadline {
                panic!(
                    "receiver {}: expected {n} connection(s) within {timeout:?}, got {}",
                    self.addr,
                    self.connections()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Finds a TCP port that is free on every one of `ips` (all loopback).
/// NOTE: the port is only checked, not held, so another process may take it before the bind.
pub fn free_port_on(ips: &[IpAddr]) -> u16 {
    assert!(!ips.is_empty(), "free_port_on needs at least one address");
    for ip in ips {
        assert!(ip.is_loopback(), "free_port_on: {ip} is not loopback");
    }
    for _ in 0..100 {
        let first = StdTcpListener::bind((ips[0], 0)).expect("bind loopback port 0");
        let port = first.local_addr().expect("local_addr").port();
        let rest: Result<Vec<_>, _> = ips[1..]
            .iter()
            .map(|ip| StdTcpListener::bind((*ip, port)))
            .collect();
        if rest.is_ok() {
            return port;
        }
    }
    panic!("no TCP port free on all of {ips:?} after 100 tries");
}

struct Ctx {
    script: Script,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
}

fn tls_config(name: &str) -> io::Result<(Arc<ServerConfig>, CertificateDer<'static>)> {
    let names = vec![name.to_string(), "localhost".to_string()];
    let ck = rcgen::generate_simple_self_signed(names).map_err(io::Error::other)?;
    let cert = ck.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .map_err(io::Error::other)?;
    Ok((Arc::new(config), cert))
}

async fn accept_loop(listener: TcpListener, ctx: Arc<Ctx>) {
    // Dropping the JoinSet (when this task is aborted) aborts the sessions.
    let mut sessions = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((stream, peer)) = accepted {
                    ctx.shared.connections.fetch_add(1, Ordering::SeqCst);
                    let open = ctx.shared.open.fetch_add(1, Ordering::SeqCst) + 1;
                    ctx.shared.max_open.fetch_max(open, Ordering::SeqCst);
                    let ctx = ctx.clone();
                    sessions.spawn(async move {
                        session(stream, peer, ctx.clone()).await;
                        ctx.shared.open.fetch_sub(1, Ordering::SeqCst);
                    });
                }
            }
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
        }
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

type Conn = BufReader<Box<dyn Io>>;

/// What to do after sending a reply.
enum Next {
    Continue,
    Close,
}

/// Sends `reply` (or acts on DISCONNECT / HANG).
async fn send(conn: &mut Conn, reply: &str) -> io::Result<Next> {
    if reply == DISCONNECT {
        return Ok(Next::Close);
    }
    if reply == HANG {
        let mut sink = Vec::new();
        while conn.read_until(b'\n', &mut sink).await? > 0 {
            sink.clear();
        }
        return Ok(Next::Close);
    }
    let mut out = String::new();
    for line in reply.split('\n') {
        out.push_str(line.trim_end_matches('\r'));
        out.push_str("\r\n");
    }
    conn.write_all(out.as_bytes()).await?;
    conn.flush().await?;
    Ok(Next::Continue)
}

#[derive(Default)]
struct State {
    helo: Option<String>,
    tls: bool,
    mail_from: Option<String>,
    rcpts: Vec<String>,
}

impl State {
    fn reset(&mut self) {
        self.mail_from = None;
        self.rcpts.clear();
    }
}

async fn session(stream: TcpStream, peer: SocketAddr, ctx: Arc<Ctx>) {
    let boxed: Box<dyn Io> = Box::new(stream);
    let mut conn = BufReader::new(boxed);
    if let Err(e) = run_session(&mut conn, peer, &ctx).await {
        eprintln!("receiver: session with {peer} failed: {e}");
    }
    let _ = conn.get_mut().shutdown().await;
}

async fn run_session(conn: &mut Conn, peer: SocketAddr, ctx: &Ctx) -> io::Result<()> {
    let script = &ctx.script;
    let greeting = script
        .greeting
        .clone()
        .unwrap_or_else(|| format!("220 {} ESMTP test", script.name));
    if let Next::Close = send(conn, &greeting).await? {
        return Ok(());
    }
    if !greeting.starts_with('2') {
        return Ok(());
    }
    let mut st = State::default();
    let mut line = Vec::new();
    loop {
        line.clear();
        if conn.read_until(b'\n', &mut line).await? == 0 || !line.ends_with(b"\n") {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&line);
        let text = text
            .trim_end_matches('\n')
            .trim_end_matches('\r')
            .to_string();
        ctx.shared.commands.lock().unwrap().push(text.clone());
        let (verb, arg) = match text.split_once(' ') {
            Some((v, a)) => (v.to_ascii_uppercase(), a.trim().to_string()),
            None => (text.to_ascii_uppercase(), String::new()),
        };
        let reply = match verb.as_str() {
            "EHLO" | "HELO" if arg.is_empty() => "501 5.5.4 domain name required".to_string(),
            "EHLO" => {
                st.reset();
                let reply = match &script.ehlo {
                    Some(r) => r.clone(),
                    None => ehlo_reply(script, &arg, ctx.tls.is_some() && !st.tls),
                };
                if reply.starts_with('2') {
                    st.helo = Some(arg.clone());
                }
                reply
            }
            "HELO" => {
                st.reset();
                st.helo = Some(arg.clone());
                format!("250 {}", script.name)
            }
            "MAIL" => mail(script, &mut st, &arg),
            "RCPT" => rcpt(script, &mut st, &arg),
            "DATA" => {
                if !arg.is_empty() {
                    "501 5.5.4 no arguments allowed".to_string()
                } else if st.mail_from.is_none() {
                    "503 5.5.1 MAIL first".to_string()
                } else if st.rcpts.is_empty() {
                    "554 5.5.1 no valid recipients".to_string()
                } else {
                    if let Next::Close = send(conn, "354 end data with <CR><LF>.<CR><LF>").await? {
                        return Ok(());
                    }
                    let Some((data, bare_lf)) = read_data(conn).await? else {
                        return Ok(());
                    };
                    let rec = Received {
                        mail_from: st.mail_from.take().unwrap_or_default(),
                        rcpt_to: std::mem::take(&mut st.rcpts),
                        data,
                        bare_lf,
                        tls: st.tls,
                        helo: st.helo.clone().unwrap_or_default(),
                        peer,
                        at: std::time::Instant::now(),
                    };
                    let n = ctx.shared.data_transfers.fetch_add(1, Ordering::SeqCst);
                    let reply = if rec.data.len() > script.max_size {
                        "552 5.3.4 message too big".to_string()
                    } else {
                        script
                            .data
                            .as_ref()
                            .and_then(|f| f(n, &rec))
                            .unwrap_or_else(|| "250 2.0.0 queued".to_string())
                    };
                    if reply.starts_with('2') {
                        ctx.shared.messages.lock().unwrap().push(rec);
                    }
                    if !script.data_delay.is_zero() {
                        tokio::time::sleep(script.data_delay).await;
                    }
                    reply
                }
            }
            "RSET" => {
                st.reset();
                "250 2.0.0 ok".to_string()
            }
            "NOOP" => "250 2.0.0 ok".to_string(),
            "VRFY" => "252 2.5.2 cannot verify".to_string(),
            "QUIT" => {
                send(conn, "221 2.0.0 bye").await?;
                return Ok(());
            }
            "STARTTLS" if ctx.tls.is_none() => "454 4.7.0 TLS not available".to_string(),
            "STARTTLS" => {
                if st.tls {
                    "503 5.5.1 TLS already active".to_string()
                } else if !arg.is_empty() {
                    "501 5.5.4 no arguments allowed".to_string()
                } else {
                    let reply = script
                        .starttls
                        .clone()
                        .unwrap_or_else(|| "220 2.0.0 ready".to_string());
                    if let Next::Close = send(conn, &reply).await? {
                        return Ok(());
                    }
                    if !reply.starts_with("220") {
                        continue;
                    }
                    let acceptor = ctx.tls.as_ref().expect("checked above");
                    start_tls(conn, acceptor).await?;
                    st = State {
                        tls: true,
                        ..State::default()
                    };
                    continue;
                }
            }
            _ => "500 5.5.2 command not recognized".to_string(),
        };
        if let Next::Close = send(conn, &reply).await? {
            return Ok(());
        }
    }
}

/// Replaces the plain stream in `conn` with a TLS stream. Plaintext that was
/// pipelined after STARTTLS is discarded (RFC 3207 section 4.2).
async fn start_tls(conn: &mut Conn, acceptor: &TlsAcceptor) -> io::Result<()> {
    let placeholder: Box<dyn Io> = Box::new(tokio::io::duplex(1).0);
    let old = std::mem::replace(conn, BufReader::new(placeholder));
    let plain = old.into_inner();
    let tls = acceptor.accept(plain).await?;
    let boxed: Box<dyn Io> = Box::new(tls);
    *conn = BufReader::new(boxed);
    Ok(())
}

fn ehlo_reply(script: &Script, client: &str, offer_starttls: bool) -> String {
    let mut lines = vec![format!("{} hello {client}", script.name)];
    if !script.no_pipelining {
        lines.push("PIPELINING".to_string());
    }
    lines.push("8BITMIME".to_string());
    lines.push("SMTPUTF8".to_string());
    lines.push("ENHANCEDSTATUSCODES".to_string());
    lines.push(format!("SIZE {}", script.max_size));
    if offer_starttls {
        lines.push("STARTTLS".to_string());
    }
    let last = lines.len() - 1;
    lines
        .iter()
        .enumerate()
        .map(|(i, l)| format!("250{}{l}", if i == last { ' ' } else { '-' }))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Splits `FROM:<addr> PARAMS` (after the given prefix) into address and params.
fn parse_path<'a>(arg: &'a str, prefix: &str) -> Option<(String, Vec<&'a str>)> {
    if arg.len() < prefix.len() || !arg[..prefix.len()].eq_ignore_ascii_case(prefix) {
        return None;
    }
    let rest = arg[prefix.len()..].trim_start();
    let rest = rest.strip_prefix('<')?;
    let end = rest.find('>')?;
    let addr = rest[..end].to_string();
    let params = rest[end + 1..].split_whitespace().collect();
    Some((addr, params))
}

fn mail(script: &Script, st: &mut State, arg: &str) -> String {
    if st.helo.is_none() {
        return "503 5.5.1 send EHLO or HELO first".to_string();
    }
    if st.mail_from.is_some() {
        return "503 5.5.1 nested MAIL command".to_string();
    }
    let Some((addr, params)) = parse_path(arg, "FROM:") else {
        return "501 5.5.4 syntax: MAIL FROM:<address>".to_string();
    };
    for p in params {
        if let Some((k, v)) = p.split_once('=')
            && k.eq_ignore_ascii_case("SIZE")
            && v.parse::<usize>().is_ok_and(|n| n > script.max_size)
        {
            return "552 5.3.4 message too big".to_string();
        }
    }
    let reply = script
        .mail
        .as_ref()
        .and_then(|f| f(&addr))
        .unwrap_or_else(|| "250 2.1.0 ok".to_string());
    if reply.starts_with('2') {
        st.mail_from = Some(addr);
    }
    reply
}

fn rcpt(script: &Script, st: &mut State, arg: &str) -> String {
    if st.mail_from.is_none() {
        return "503 5.5.1 MAIL first".to_string();
    }
    let Some((addr, _params)) = parse_path(arg, "TO:") else {
        return "501 5.5.4 syntax: RCPT TO:<address>".to_string();
    };
    let reply = script
        .rcpt_replies
        .get(&addr.to_ascii_lowercase())
        .cloned()
        .or_else(|| script.rcpt.as_ref().and_then(|f| f(&addr)))
        .unwrap_or_else(|| "250 2.1.5 ok".to_string());
    if reply.starts_with('2') {
        st.rcpts.push(addr);
    }
    reply
}

/// Reads DATA content up to the `.` line. Returns the unstuffed content and
/// whether a bare LF was seen; `None` if the connection closed first.
async fn read_data(conn: &mut Conn) -> io::Result<Option<(Vec<u8>, bool)>> {
    let mut data = Vec::new();
    let mut bare_lf = false;
    let mut line = Vec::new();
    loop {
        line.clear();
        if conn.read_until(b'\n', &mut line).await? == 0 || !line.ends_with(b"\n") {
            return Ok(None);
        }
        if line == b".\r\n" {
            return Ok(Some((data, bare_lf)));
        }
        if line == b".\n" {
            return Ok(Some((data, true)));
        }
        if line.len() < 2 || line[line.len() - 2] != b'\r' {
            bare_lf = true;
        }
        let content = line.strip_prefix(b".").unwrap_or(&line);
        data.extend_from_slice(content);
    }
}
