//! The SMTP client that hands mail to an MX host (RFC 5321), with
//! opportunistic STARTTLS (RFC 3207) and PIPELINING (RFC 2920).
//!
//! Message bytes are dot-stuffed only here, on the way to the wire; the
//! spool keeps them unstuffed. The client writes only CRLF line ends.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::timeout;

use crate::intake::session::Io;
use crate::reply::Reply;

/// Longest reply line accepted from a server, and most lines per reply.
const MAX_REPLY_LINE: usize = 4096;
const MAX_REPLY_LINES: usize = 200;

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub command: Duration,
    pub data: Duration,
}

/// Extensions the server advertised in its EHLO reply.
#[derive(Debug, Clone, Default)]
pub struct Extensions {
    pub pipelining: bool,
    pub eight_bit_mime: bool,
    pub smtputf8: bool,
    pub starttls: bool,
    /// Declared SIZE limit; 0 means none declared.
    pub size: Option<usize>,
}

/// A failure that is not a reply from the server.
#[derive(Debug, Clone)]
pub enum Failure {
    /// The server replied with an error where the session cannot go on.
    Rejected(Reply),
    /// Connect, read or write failed, or timed out.
    Network(String),
    /// The TLS handshake failed; the caller may retry without STARTTLS.
    Tls(String),
    /// The source address could not be bound (not configured on this
    /// host); nothing was sent.
    Unbindable(String),
}

impl Failure {
    /// Returns the reply that stands for this failure in outcomes and DSNs.
    /// Network and TLS failures are temporary.
    pub fn to_reply(&self) -> Reply {
        match self {
            Failure::Rejected(reply) => reply.clone(),
            Failure::Network(text) => Reply::new(451, "4.4.2", text.clone()),
            Failure::Tls(text) => Reply::new(451, "4.7.5", text.clone()),
            Failure::Unbindable(text) => Reply::new(451, "4.4.0", text.clone()),
        }
    }
}

/// Replies of the server in one mail transaction.
#[derive(Debug, Clone)]
pub struct TransactionReplies {
    pub mail: Reply,
    /// One reply per recipient, in order; empty when MAIL failed.
    pub recipients: Vec<Reply>,
    /// Reply to DATA when it was not 354, else the reply after the data.
    /// `None` when no recipient was accepted.
    pub data: Option<Reply>,
}

/// An envelope to send: the reverse path and the forward paths.
pub struct Envelope<'a> {
    pub sender: &'a str,
    pub recipients: &'a [&'a str],
    pub eight_bit: bool,
    pub smtputf8: bool,
}

pub struct Client {
    reader: BufReader<Box<dyn Io>>,
    pub extensions: Extensions,
    pub mx: String,
    pub address: SocketAddr,
    pub tls: bool,
    timeouts: Timeouts,
    /// Transactions completed on this connection.
    pub transactions: usize,
    /// False after an error that leaves the session state unknown.
    pub reusable: bool,
    /// Message data of the current transaction has been written, so a
    /// failure now may come after the server took the message.
    pub data_sent: bool,
}

impl Client {
    /// Connects from `bind` (or an address the system chooses), reads the
    /// greeting, sends EHLO and starts TLS when offered and `tls` is given.
    pub async fn connect(
        mx: &str,
        address: SocketAddr,
        bind: Option<IpAddr>,
        hostname: &str,
        tls: Option<&tokio_rustls::TlsConnector>,
        timeouts: Timeouts,
    ) -> Result<Client, Failure> {
        let socket = match bind {
            Some(ip) => Some(
                bound_socket(ip).map_err(|error| Failure::Unbindable(format!("cannot bind source address {ip}: {error}")))?,
            ),
            None => None,
        };
        let connecting = async move {
            match socket {
                Some(socket) => socket.connect(address).await,
                None => TcpStream::connect(address).await,
            }
        };
        let stream = match timeout(timeouts.connect, connecting).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => {
                return Err(Failure::Network(format!("connect to {mx}[{address}] failed: {error}")));
            }
            Err(_) => {
                return Err(Failure::Network(format!("connect to {mx}[{address}] timed out")));
            }
        };
        let _ = stream.set_nodelay(true);
        let mut client = Client {
            reader: BufReader::with_capacity(8 * 1024, Box::new(stream)),
            extensions: Extensions::default(),
            mx: mx.to_string(),
            address,
            tls: false,
            timeouts,
            transactions: 0,
            reusable: true,
            data_sent: false,
        };
        let greeting = client.read_reply(timeouts.command).await?;
        if !greeting.is_positive() {
            return Err(Failure::Rejected(greeting));
        }
        client.hello(hostname).await?;
        if let Some(connector) = tls
            && client.extensions.starttls
        {
            client.start_tls(connector, hostname).await?;
        }
        Ok(client)
    }

    async fn hello(&mut self, hostname: &str) -> Result<(), Failure> {
        self.write(format!("EHLO {hostname}\r\n").as_bytes()).await?;
        let reply = self.read_reply(self.timeouts.command).await?;
        if reply.is_positive() {
            self.extensions = parse_extensions(&reply);
            return Ok(());
        }
        if reply.code >= 500 {
            // A server that does not know EHLO still speaks SMTP (RFC 5321 3.2).
            self.write(format!("HELO {hostname}\r\n").as_bytes()).await?;
            let reply = self.read_reply(self.timeouts.command).await?;
            if reply.is_positive() {
                self.extensions = Extensions::default();
                return Ok(());
            }
            return Err(Failure::Rejected(reply));
        }
        Err(Failure::Rejected(reply))
    }

    async fn start_tls(
        &mut self,
        connector: &tokio_rustls::TlsConnector,
        hostname: &str,
    ) -> Result<(), Failure> {
        self.write(b"STARTTLS\r\n").await?;
        let reply = self.read_reply(self.timeouts.command).await?;
        if reply.code != 220 {
            // Refused STARTTLS: go on in clear text, as opportunistic TLS does.
            return Ok(());
        }
        // Whatever the server sent after its 220 and before the handshake
        // was not protected and is dropped with the buffer (a reply injected
        // there must not be believed).
        let placeholder: Box<dyn Io> = Box::new(tokio::io::join(tokio::io::empty(), tokio::io::sink()));
        let reader = std::mem::replace(&mut self.reader, BufReader::new(placeholder));
        if !reader.buffer().is_empty() {
            tracing::warn!(mx = %self.mx, ip = %self.address.ip(), bytes = reader.buffer().len(), "server sent data after its 220 reply to STARTTLS; discarded");
        }
        let stream = reader.into_inner();
        let server_name = rustls::pki_types::ServerName::try_from(self.mx.trim_end_matches('.').to_string())
            .unwrap_or_else(|_| rustls::pki_types::ServerName::IpAddress(self.address.ip().into()));
        match timeout(self.timeouts.command, connector.connect(server_name, stream)).await {
            Ok(Ok(tls_stream)) => {
                self.reader = BufReader::with_capacity(8 * 1024, Box::new(tls_stream));
                self.tls = true;
            }
            Ok(Err(error)) => {
                self.reusable = false;
                return Err(Failure::Tls(format!("TLS handshake with {}[{}] failed: {error}", self.mx, self.address)));
            }
            Err(_) => {
                self.reusable = false;
                return Err(Failure::Tls(format!("TLS handshake with {}[{}] timed out", self.mx, self.address)));
            }
        }
        // RFC 3207 section 4.2: discard what was learnt before TLS.
        self.hello(hostname).await
    }

    /// Runs one mail transaction. Replies from the server are returned, not
    /// turned into errors; an `Err` means the connection failed.
    pub async fn send(&mut self, envelope: &Envelope<'_>, data: &[u8]) -> Result<TransactionReplies, Failure> {
        let mut mail = format!("MAIL FROM:<{}>", envelope.sender);
        if envelope.eight_bit && self.extensions.eight_bit_mime {
            mail.push_str(" BODY=8BITMIME");
        }
        if envelope.smtputf8 && self.extensions.smtputf8 {
            mail.push_str(" SMTPUTF8");
        }
        if self.extensions.size.is_some() {
            mail.push_str(&format!(" SIZE={}", data.len()));
        }
        mail.push_str("\r\n");
        let rcpts: Vec<String> = envelope
            .recipients
            .iter()
            .map(|address| format!("RCPT TO:<{address}>\r\n"))
            .collect();

        self.reusable = false;
        self.data_sent = false;
        let replies = if self.extensions.pipelining {
            self.send_pipelined(&mail, &rcpts, data).await?
        } else {
            self.send_in_turn(&mail, &rcpts, data).await?
        };
        // 421 means the server is closing the session (RFC 5321 3.8).
        let closing = std::iter::once(&replies.mail)
            .chain(&replies.recipients)
            .chain(&replies.data)
            .any(|reply| reply.code == 421);
        self.reusable = !closing;
        let completed = replies.data.as_ref().is_some_and(|r| r.code < 400);
        if !completed && self.reusable {
            // Leave the server in a clean state for the next transaction.
            self.write(b"RSET\r\n").await?;
            let reset = self.read_reply(self.timeouts.command).await?;
            self.reusable = reset.is_positive();
        }
        self.transactions += 1;
        Ok(replies)
    }

    async fn send_pipelined(
        &mut self,
        mail: &str,
        rcpts: &[String],
        data: &[u8],
    ) -> Result<TransactionReplies, Failure> {
        let mut batch = String::with_capacity(mail.len() + rcpts.len() * 64 + 6);
        batch.push_str(mail);
        for rcpt in rcpts {
            batch.push_str(rcpt);
        }
        batch.push_str("DATA\r\n");
        self.write(batch.as_bytes()).await?;

        let mail_reply = self.read_reply(self.timeouts.command).await?;
        let mut recipient_replies = Vec::with_capacity(rcpts.len());
        for _ in rcpts {
            recipient_replies.push(self.read_reply(self.timeouts.command).await?);
        }
        let data_reply = self.read_reply(self.timeouts.command).await?;
        let accepted = mail_reply.is_positive() && recipient_replies.iter().any(Reply::is_positive);
        if data_reply.code != 354 {
            return Ok(TransactionReplies {
                mail: mail_reply,
                recipients: recipient_replies,
                data: accepted.then_some(data_reply),
            });
        }
        if !accepted {
            // The server took DATA with no valid recipient (RFC 2920 3.1):
            // end the data at once; nothing can be delivered.
            self.write(b".\r\n").await?;
            let _ = self.read_reply(self.timeouts.data).await?;
            return Ok(TransactionReplies {
                mail: mail_reply,
                recipients: recipient_replies,
                data: None,
            });
        }
        self.write_data(data).await?;
        let final_reply = self.read_reply(self.timeouts.data).await?;
        Ok(TransactionReplies {
            mail: mail_reply,
            recipients: recipient_replies,
            data: Some(final_reply),
        })
    }

    async fn send_in_turn(
        &mut self,
        mail: &str,
        rcpts: &[String],
        data: &[u8],
    ) -> Result<TransactionReplies, Failure> {
        self.write(mail.as_bytes()).await?;
        let mail_reply = self.read_reply(self.timeouts.command).await?;
        if !mail_reply.is_positive() {
            return Ok(TransactionReplies {
                mail: mail_reply,
                recipients: Vec::new(),
                data: None,
            });
        }
        let mut recipient_replies = Vec::with_capacity(rcpts.len());
        for rcpt in rcpts {
            self.write(rcpt.as_bytes()).await?;
            recipient_replies.push(self.read_reply(self.timeouts.command).await?);
        }
        if !recipient_replies.iter().any(Reply::is_positive) {
            return Ok(TransactionReplies {
                mail: mail_reply,
                recipients: recipient_replies,
                data: None,
            });
        }
        self.write(b"DATA\r\n").await?;
        let data_reply = self.read_reply(self.timeouts.command).await?;
        if data_reply.code != 354 {
            return Ok(TransactionReplies {
                mail: mail_reply,
                recipients: recipient_replies,
                data: Some(data_reply),
            });
        }
        self.write_data(data).await?;
        let final_reply = self.read_reply(self.timeouts.data).await?;
        Ok(TransactionReplies {
            mail: mail_reply,
            recipients: recipient_replies,
            data: Some(final_reply),
        })
    }

    /// Writes the message dot-stuffed (RFC 5321 section 4.5.2), then the
    /// end-of-data line.
    async fn write_data(&mut self, data: &[u8]) -> Result<(), Failure> {
        let stuffed = dot_stuff(data);
        self.data_sent = true;
        self.write(&stuffed).await
    }

    pub async fn quit(mut self) {
        if self.write(b"QUIT\r\n").await.is_ok() {
            let _ = self.read_reply(Duration::from_secs(5)).await;
        }
        let _ = self.reader.get_mut().shutdown().await;
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), Failure> {
        let stream = self.reader.get_mut();
        let result = timeout(self.timeouts.command, async {
            stream.write_all(bytes).await?;
            stream.flush().await
        })
        .await;
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(self.network(format!("write failed: {error}"))),
            Err(_) => Err(self.network("write timed out".to_string())),
        }
    }

    fn network(&mut self, what: String) -> Failure {
        self.reusable = false;
        Failure::Network(format!("{}[{}]: {what}", self.mx, self.address))
    }

    /// Reads one reply, all of its lines.
    async fn read_reply(&mut self, wait: Duration) -> Result<Reply, Failure> {
        let mut lines = Vec::new();
        let mut line = Vec::with_capacity(128);
        loop {
            line.clear();
            let read = timeout(wait, read_limited_line(&mut self.reader, &mut line)).await;
            match read {
                Ok(Ok(0)) => return Err(self.network("connection closed by server".to_string())),
                Ok(Ok(_)) => {}
                Ok(Err(error)) => return Err(self.network(format!("read failed: {error}"))),
                Err(_) => return Err(self.network("timed out waiting for a reply".to_string())),
            }
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end_matches(['\r', '\n']).to_string();
            let last = text.len() <= 3 || text.as_bytes()[3] != b'-';
            lines.push(text);
            if last {
                break;
            }
            if lines.len() >= MAX_REPLY_LINES {
                return Err(self.network(format!("reply longer than {MAX_REPLY_LINES} lines")));
            }
        }
        match Reply::parse_lines(&lines) {
            Some(reply) => Ok(reply),
            None => Err(self.network(format!("invalid reply {:?}", lines.join(" | ")))),
        }
    }
}

/// Reads up to LF, at most [`MAX_REPLY_LINE`] bytes; returns bytes read.
async fn read_limited_line(reader: &mut BufReader<Box<dyn Io>>, line: &mut Vec<u8>) -> std::io::Result<usize> {
    loop {
        let buffer = reader.fill_buf().await?;
        if buffer.is_empty() {
            return Ok(line.len());
        }
        let (take, done) = match buffer.iter().position(|&b| b == b'\n') {
            Some(end) => (end + 1, true),
            None => (buffer.len(), false),
        };
        line.extend_from_slice(&buffer[..take]);
        reader.consume(take);
        if done {
            return Ok(line.len());
        }
        if line.len() > MAX_REPLY_LINE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("reply line longer than {MAX_REPLY_LINE} bytes"),
            ));
        }
    }
}

fn parse_extensions(reply: &Reply) -> Extensions {
    let mut extensions = Extensions::default();
    // The first line is the server's name, not an extension.
    for line in reply.lines.iter().skip(1) {
        let mut words = line.split_ascii_whitespace();
        let keyword = words.next().unwrap_or("").to_ascii_uppercase();
        match keyword.as_str() {
            "PIPELINING" => extensions.pipelining = true,
            "8BITMIME" => extensions.eight_bit_mime = true,
            "SMTPUTF8" => extensions.smtputf8 = true,
            "STARTTLS" => extensions.starttls = true,
            "SIZE" => {
                extensions.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0));
            }
            _ => {}
        }
    }
    extensions
}

/// Returns a TCP socket bound to `ip` with a port the system chooses.
fn bound_socket(ip: IpAddr) -> std::io::Result<TcpSocket> {
    let socket = if ip.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.bind(SocketAddr::new(ip, 0))?;
    Ok(socket)
}

/// Returns `data` dot-stuffed and ended with `.CRLF`. Data that does not end
/// in CRLF gets one first, so the end marker is always on its own line.
pub fn dot_stuff(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 64 + 5);
    let mut rest = data;
    // Each pass starts at the beginning of a line.
    while !rest.is_empty() {
        if rest[0] == b'.' {
            out.push(b'.');
        }
        let line_end = memchr::memchr(b'\n', rest).map_or(rest.len(), |newline| newline + 1);
        out.extend_from_slice(&rest[..line_end]);
        rest = &rest[line_end..];
    }
    if !data.is_empty() && !data.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_stuffing() {
        assert_eq!(dot_stuff(b".a\r\nb\r\n..\r\n"), b"..a\r\nb\r\n...\r\n.\r\n");
        assert_eq!(dot_stuff(b""), b".\r\n");
        assert_eq!(dot_stuff(b"no end"), b"no end\r\n.\r\n");
    }

    #[test]
    fn extensions_parsed() {
        let reply = Reply::parse_lines(&[
            "250-mx.example".to_string(),
            "250-PIPELINING".to_string(),
            "250-SIZE 1000".to_string(),
            "250-8BITMIME".to_string(),
            "250 STARTTLS".to_string(),
        ])
        .unwrap();
        let extensions = parse_extensions(&reply);
        assert!(extensions.pipelining);
        assert!(extensions.eight_bit_mime);
        assert!(extensions.starttls);
        assert!(!extensions.smtputf8);
        assert_eq!(extensions.size, Some(1000));
    }
}
