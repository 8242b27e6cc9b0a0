//! One SMTP session with a client (RFC 5321), from greeting to close.
//!
//! The session never sends `250` for message data before the gateway has
//! stored the message durably; that reply comes from [`Gateway::receive`].
//! Replies to pipelined commands (RFC 2920) are collected and written when
//! the client has no more input waiting, so a pipelined batch costs one write.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use smtp_proto::{Error as ParseError, Request};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::time::{Instant, timeout};

use super::Shared;
use super::address::{Recipient, parse_address};
use super::auth::{self, SaslError};
use super::data::{self, DataError, DataReader, Progress};
use crate::gateway::{Gateway, Submission};
use crate::metrics::RejectReason;
use crate::reply::Reply;

/// A byte stream the session can run over: plain TCP or TLS.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + Sync {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync> Io for T {}

/// Reason the session ends.
enum Close {
    /// The client quit, or the session replied and chose to close.
    Done,
    /// The connection failed or timed out.
    Lost,
}

struct Transaction {
    sender: String,
    recipients: Vec<Recipient>,
    smtputf8: bool,
    eight_bit: bool,
    /// Content received so far with BDAT (RFC 3030).
    chunks: Option<Vec<u8>>,
    /// Total BDAT bytes announced, counting bytes dropped for size.
    chunk_total: usize,
    /// Set when a BDAT chunk failed; later chunks are read and discarded.
    chunk_error: Option<Reply>,
}

pub struct Session {
    gateway: Arc<Gateway>,
    shared: Arc<Shared>,
    reader: BufReader<Box<dyn Io>>,
    output: Vec<u8>,
    peer: SocketAddr,
    helo: Option<String>,
    esmtp: bool,
    tls_active: bool,
    transaction: Option<Transaction>,
    errors: u32,
    /// The client is in `smtp.relay_networks`.
    relay_network: bool,
    /// User name after a successful AUTH.
    authenticated: Option<String>,
    deadline: Instant,
}

impl Session {
    /// Creates the session for a connection; `tls_active` is set for an
    /// implicit TLS connection, whose handshake is already done.
    pub fn new(
        gateway: Arc<Gateway>,
        shared: Arc<Shared>,
        stream: Box<dyn Io>,
        peer: SocketAddr,
        tls_active: bool,
    ) -> Session {
        let relay_network = gateway
            .config
            .smtp
            .relay_networks
            .iter()
            .any(|network| network.contains(&peer.ip()));
        let deadline = Instant::now() + gateway.config.smtp.session_timeout;
        Session {
            gateway,
            shared,
            reader: BufReader::with_capacity(16 * 1024, stream),
            output: Vec::with_capacity(1024),
            peer,
            helo: None,
            esmtp: false,
            tls_active,
            transaction: None,
            errors: 0,
            relay_network,
            authenticated: None,
            deadline,
        }
    }

    pub async fn run(mut self) {
        let greeting = format!("220 {} ESMTP Baton\r\n", self.gateway.config.hostname);
        self.output.extend_from_slice(greeting.as_bytes());
        let mut line = Vec::with_capacity(256);
        loop {
            if self.reader.buffer().is_empty() && self.flush().await.is_err() {
                return;
            }
            let command_timeout = self.gateway.config.smtp.command_timeout;
            match self.read_line(&mut line, command_timeout).await {
                LineRead::Line => {}
                LineRead::Eof => return,
                LineRead::TimedOut => {
                    self.push(&Reply::new(421, "4.4.2", "Timeout waiting for a command; closing"));
                    let _ = self.flush().await;
                    return;
                }
                LineRead::ShuttingDown => {
                    self.push(&shutting_down());
                    let _ = self.flush().await;
                    return;
                }
                LineRead::TooLong => {
                    self.push_error(Reply::new(
                        500,
                        "5.5.2",
                        format!(
                            "Command line longer than {} bytes",
                            self.gateway.config.smtp.max_command_line
                        ),
                    ));
                    if self.too_many_errors().await {
                        return;
                    }
                    continue;
                }
            }
            if !line.ends_with(b"\r\n") {
                self.push_error(Reply::new(
                    500,
                    "5.5.2",
                    "Command line ends in a bare LF; end every line with CRLF",
                ));
                if self.too_many_errors().await {
                    return;
                }
                continue;
            }
            match self.handle_line(&line).await {
                Ok(()) => {}
                Err(Close::Done) => {
                    let _ = self.flush().await;
                    let _ = self.reader.get_mut().shutdown().await;
                    return;
                }
                Err(Close::Lost) => return,
            }
            if self.too_many_errors().await {
                return;
            }
        }
    }

    async fn handle_line(&mut self, line: &[u8]) -> Result<(), Close> {
        let request = match Request::parse(&mut line.iter()) {
            Ok(request) => request.into_owned(),
            Err(error) => {
                let reply = parse_error_reply(&error, line);
                self.push_error(reply);
                return Ok(());
            }
        };
        match request {
            Request::Ehlo { host } => self.hello(host, true),
            Request::Helo { host } => self.hello(host, false),
            Request::Mail { from } => self.mail(from),
            Request::Rcpt { to } => self.rcpt(to),
            Request::Data => return self.data().await,
            Request::Bdat {
                chunk_size,
                is_last,
            } => return self.bdat(chunk_size, is_last).await,
            Request::Rset => {
                self.transaction = None;
                self.push(&Reply::new(250, "2.0.0", "Ok"));
            }
            Request::Noop { .. } => self.push(&Reply::new(250, "2.0.0", "Ok")),
            Request::Vrfy { .. } => self.push(&Reply::new(
                252,
                "2.5.0",
                "Cannot VRFY user, but will accept the message and attempt delivery",
            )),
            Request::Quit => {
                self.push(&Reply::new(221, "2.0.0", "Bye"));
                return Err(Close::Done);
            }
            Request::StartTls => return self.starttls().await,
            Request::Auth {
                mechanism,
                initial_response,
            } => return self.auth(mechanism, initial_response).await,
            Request::Lhlo { .. } => self.push_error(Reply::new(
                500,
                "5.5.1",
                "LHLO is for LMTP; this is an SMTP server, send EHLO",
            )),
            other => self.push_error(Reply::new(
                502,
                "5.5.1",
                format!("{} is not implemented", other.name()),
            )),
        }
        Ok(())
    }

    fn hello(&mut self, host: String, esmtp: bool) {
        self.transaction = None;
        self.helo = Some(host);
        self.esmtp = esmtp;
        let hostname = &self.gateway.config.hostname;
        if !esmtp {
            let reply = Reply::new(250, "", hostname.clone());
            self.output.extend_from_slice(reply.to_string().as_bytes());
            return;
        }
        let mut lines = vec![
            hostname.clone(),
            "PIPELINING".to_string(),
            format!("SIZE {}", self.gateway.config.smtp.max_message_size),
            "8BITMIME".to_string(),
            "SMTPUTF8".to_string(),
            "ENHANCEDSTATUSCODES".to_string(),
            "CHUNKING".to_string(),
        ];
        if self.gateway.tls_acceptor.is_some() && !self.tls_active {
            lines.push("STARTTLS".to_string());
        }
        if self.auth_offered() {
            lines.push("AUTH PLAIN LOGIN".to_string());
        }
        let reply = Reply {
            code: 250,
            enhanced: String::new(),
            lines,
        };
        self.output.extend_from_slice(reply.to_string().as_bytes());
    }

    fn mail(&mut self, from: smtp_proto::MailFrom<String>) {
        if self.helo.is_none() {
            self.push_error(Reply::new(503, "5.5.1", "Send EHLO or HELO first"));
            return;
        }
        if self.transaction.is_some() {
            self.push_error(Reply::new(
                503,
                "5.5.1",
                "Nested MAIL command; send RSET to start over",
            ));
            return;
        }
        if !self.relay_allowed() && self.shared.authenticator.is_some() {
            self.gateway.metrics.reject(RejectReason::AuthRequired);
            let text = if self.auth_offered() {
                format!("Authentication required: client {} is not in smtp.relay_networks; send AUTH", self.peer.ip())
            } else {
                format!(
                    "Authentication required: client {} is not in smtp.relay_networks; send STARTTLS, then AUTH",
                    self.peer.ip()
                )
            };
            self.push_error(Reply::new(530, "5.7.0", text));
            return;
        }
        let max_size = self.gateway.config.smtp.max_message_size;
        if from.size > max_size {
            self.gateway.metrics.reject(RejectReason::Size);
            self.push_error(Reply::new(
                552,
                "5.3.4",
                format!(
                    "Declared size {} exceeds the limit of {max_size} bytes",
                    from.size
                ),
            ));
            return;
        }
        if from.flags & smtp_proto::MAIL_BODY_BINARYMIME != 0 {
            self.push_error(Reply::new(
                555,
                "5.5.4",
                "BODY=BINARYMIME is not supported; use 8BITMIME",
            ));
            return;
        }
        let smtputf8 = from.flags & smtp_proto::MAIL_SMTPUTF8 != 0;
        let sender = if from.address.is_empty() {
            String::new()
        } else {
            match parse_address(&from.address, smtputf8) {
                Ok(parsed) => parsed.address,
                Err(reply) => {
                    self.gateway.metrics.reject(RejectReason::Syntax);
                    self.push_error(reply);
                    return;
                }
            }
        };
        self.transaction = Some(Transaction {
            sender,
            recipients: Vec::new(),
            smtputf8,
            eight_bit: from.flags & smtp_proto::MAIL_BODY_8BITMIME != 0,
            chunks: None,
            chunk_total: 0,
            chunk_error: None,
        });
        self.push(&Reply::new(250, "2.1.0", "Ok"));
    }

    fn rcpt(&mut self, to: smtp_proto::RcptTo<String>) {
        let max_recipients = self.gateway.config.smtp.max_recipients;
        let Some(transaction) = self.transaction.as_mut() else {
            self.push_error(Reply::new(503, "5.5.1", "Send MAIL first"));
            return;
        };
        if !(self.relay_network || self.authenticated.is_some()) {
            self.gateway.metrics.reject(RejectReason::RelayDenied);
            let reply = Reply::new(
                550,
                "5.7.1",
                format!(
                    "Relay access denied: client {} is not in smtp.relay_networks",
                    self.peer.ip()
                ),
            );
            self.push_error(reply);
            return;
        }
        if transaction.recipients.len() >= max_recipients {
            let reply = Reply::new(
                452,
                "4.5.3",
                format!("Too many recipients; at most {max_recipients} per message, send the rest in another message"),
            );
            self.push(&reply);
            return;
        }
        if to.address.is_empty() {
            self.push_error(Reply::new(
                550,
                "5.1.1",
                "<postmaster> without a domain is not deliverable through this relay",
            ));
            return;
        }
        match parse_address(&to.address, transaction.smtputf8) {
            Ok(recipient) => {
                transaction.recipients.push(recipient);
                self.push(&Reply::new(250, "2.1.5", "Ok"));
            }
            Err(reply) => {
                self.gateway.metrics.reject(RejectReason::Syntax);
                self.push_error(reply);
            }
        }
    }

    /// Checks that a transaction with recipients is open before DATA or BDAT.
    fn ready_for_data(&self) -> Result<(), Reply> {
        match &self.transaction {
            None => Err(Reply::new(503, "5.5.1", "Send MAIL and RCPT first")),
            Some(transaction) if transaction.recipients.is_empty() => {
                Err(Reply::new(554, "5.5.1", "No valid recipients"))
            }
            Some(_) => Ok(()),
        }
    }

    async fn data(&mut self) -> Result<(), Close> {
        if let Err(reply) = self.ready_for_data() {
            self.push_error(reply);
            return Ok(());
        }
        if self.transaction.as_ref().is_some_and(|t| t.chunks.is_some()) {
            self.push_error(Reply::new(503, "5.5.1", "DATA is not allowed after BDAT; send RSET"));
            return Ok(());
        }
        self.push(&Reply::new(354, "", "End data with <CR><LF>.<CR><LF>"));
        self.flush().await.map_err(|_| Close::Lost)?;

        let max_size = self.gateway.config.smtp.max_message_size;
        let mut reader = DataReader::new(max_size);
        loop {
            let wait = self.wait(self.gateway.config.smtp.data_timeout);
            let buffer = match timeout(wait, self.reader.fill_buf()).await {
                Ok(Ok(buffer)) if !buffer.is_empty() => buffer,
                Ok(_) => return Err(Close::Lost),
                Err(_) => {
                    self.push(&Reply::new(421, "4.4.2", "Timeout waiting for message data; closing"));
                    return Err(Close::Done);
                }
            };
            let length = buffer.len();
            match reader.feed(buffer) {
                Progress::NeedMore => self.reader.consume(length),
                Progress::Done { consumed } => {
                    self.reader.consume(consumed);
                    break;
                }
                Progress::Failed(error) => {
                    self.gateway.metrics.reject(RejectReason::BareLf);
                    self.transaction = None;
                    self.push(&line_ending_reply(521, error, true));
                    return Err(Close::Done);
                }
            }
        }

        let too_large = reader.too_large();
        let total_size = reader.total_size();
        let longest_line = reader.longest_line();
        let content = reader.into_message();
        let transaction = self.transaction.take().expect("checked by ready_for_data");
        if too_large {
            self.gateway.metrics.reject(RejectReason::Size);
            self.push_error(size_reply(total_size, max_size));
            return Ok(());
        }
        if longest_line > data::MAX_LINE_LENGTH {
            self.gateway.metrics.reject(RejectReason::LineLength);
            self.push_error(line_length_reply(longest_line));
            return Ok(());
        }
        if let Err(reply) = self.check_headers(&content) {
            self.push_error(reply);
            return Ok(());
        }
        self.submit(transaction, content).await;
        Ok(())
    }

    async fn bdat(&mut self, chunk_size: usize, is_last: bool) -> Result<(), Close> {
        // The chunk is read even when it will be rejected: its bytes are
        // data, and must never be parsed as commands (RFC 3030 section 2).
        let refusal = self.ready_for_data().err();
        let max_size = self.gateway.config.smtp.max_message_size;
        let mut kept = Vec::new();
        let keep = refusal.is_none()
            && self.transaction.as_ref().is_some_and(|t| t.chunk_total + chunk_size <= max_size);
        let mut remaining = chunk_size;
        while remaining > 0 {
            let wait = self.wait(self.gateway.config.smtp.data_timeout);
            let buffer = match timeout(wait, self.reader.fill_buf()).await {
                Ok(Ok(buffer)) if !buffer.is_empty() => buffer,
                Ok(_) => return Err(Close::Lost),
                Err(_) => {
                    self.push(&Reply::new(421, "4.4.2", "Timeout waiting for BDAT data; closing"));
                    return Err(Close::Done);
                }
            };
            let take = buffer.len().min(remaining);
            if keep {
                kept.extend_from_slice(&buffer[..take]);
            }
            self.reader.consume(take);
            remaining -= take;
        }

        if let Some(reply) = refusal {
            self.push_error(reply);
            return Ok(());
        }
        let transaction = self.transaction.as_mut().expect("checked by ready_for_data");
        transaction.chunk_total += chunk_size;
        let chunks = transaction.chunks.get_or_insert_with(Vec::new);
        if keep {
            chunks.extend_from_slice(&kept);
        } else if transaction.chunk_error.is_none() {
            transaction.chunk_error = Some(size_reply(transaction.chunk_total, max_size));
        }
        if !is_last {
            match transaction.chunk_error.clone() {
                Some(reply) => self.push_error(reply),
                None => self.push(&Reply::new(250, "2.0.0", format!("{chunk_size} octets received"))),
            }
            return Ok(());
        }

        let mut transaction = self.transaction.take().expect("checked by ready_for_data");
        if let Some(reply) = transaction.chunk_error.take() {
            self.gateway.metrics.reject(RejectReason::Size);
            self.push_error(reply);
            return Ok(());
        }
        let mut content = transaction.chunks.take().unwrap_or_default();
        match data::check_line_endings(&content) {
            Err(error) => {
                self.gateway.metrics.reject(RejectReason::BareLf);
                self.push_error(line_ending_reply(550, error, false));
                return Ok(());
            }
            Ok(longest) if longest > data::MAX_LINE_LENGTH => {
                self.gateway.metrics.reject(RejectReason::LineLength);
                self.push_error(line_length_reply(longest));
                return Ok(());
            }
            Ok(_) => {}
        }
        if !content.is_empty() && !content.ends_with(b"\r\n") {
            content.extend_from_slice(b"\r\n");
        }
        if let Err(reply) = self.check_headers(&content) {
            self.push_error(reply);
            return Ok(());
        }
        self.submit(transaction, content).await;
        Ok(())
    }

    /// Checks the header section against `smtp.max_header_size` and
    /// `smtp.max_header_fields`.
    fn check_headers(&self, content: &[u8]) -> Result<(), Reply> {
        let smtp = &self.gateway.config.smtp;
        let section = data::header_section(content);
        if section.size > smtp.max_header_size {
            self.gateway.metrics.reject(RejectReason::HeaderLimit);
            return Err(Reply::new(
                552,
                "5.3.4",
                format!(
                    "Message header section is {} bytes; the limit is {} bytes",
                    section.size, smtp.max_header_size
                ),
            ));
        }
        if section.fields > smtp.max_header_fields {
            self.gateway.metrics.reject(RejectReason::HeaderLimit);
            return Err(Reply::new(
                554,
                "5.6.0",
                format!(
                    "Message has {} header fields; the limit is {} fields",
                    section.fields, smtp.max_header_fields
                ),
            ));
        }
        Ok(())
    }

    async fn submit(&mut self, transaction: Transaction, content: Vec<u8>) {
        let submission = Submission {
            sender: transaction.sender,
            recipients: transaction.recipients,
            client_ip: self.peer.ip(),
            helo: self.helo.clone().unwrap_or_default(),
            esmtp: self.esmtp,
            tls: self.tls_active,
            smtputf8: transaction.smtputf8,
            eight_bit: transaction.eight_bit,
            auth_user: self.authenticated.clone(),
            content,
        };
        let reply = match self.gateway.receive(submission).await {
            Ok(id) => Reply::new(250, "2.0.0", format!("Ok: queued as {id}")),
            Err(reply) => reply,
        };
        if reply.is_positive() {
            self.push(&reply);
        } else {
            self.push_error(reply);
        }
    }

    async fn starttls(&mut self) -> Result<(), Close> {
        let Some(acceptor) = self.gateway.tls_acceptor.clone() else {
            self.push_error(Reply::new(454, "4.7.0", "TLS not available: no certificate is configured"));
            return Ok(());
        };
        if self.tls_active {
            self.push_error(Reply::new(503, "5.5.1", "TLS is already active"));
            return Ok(());
        }
        self.push(&Reply::new(220, "2.0.0", "Ready to start TLS"));
        self.flush().await.map_err(|_| Close::Lost)?;
        // Bytes the client sent after STARTTLS and before the handshake are
        // dropped with the buffer: they were not protected by TLS and must
        // not be taken as commands (the STARTTLS injection attack).
        let placeholder: Box<dyn Io> = Box::new(tokio::io::join(tokio::io::empty(), tokio::io::sink()));
        let reader = std::mem::replace(&mut self.reader, BufReader::new(placeholder));
        if !reader.buffer().is_empty() {
            tracing::info!(peer = %self.peer, bytes = reader.buffer().len(), "client sent data after STARTTLS before the TLS handshake; discarded");
        }
        let stream = reader.into_inner();
        let handshake = acceptor.accept(stream);
        let wait = self.wait(self.gateway.config.smtp.command_timeout);
        match timeout(wait, handshake).await {
            Ok(Ok(tls_stream)) => {
                self.reader = BufReader::with_capacity(16 * 1024, Box::new(tls_stream));
                self.tls_active = true;
                // RFC 3207 section 4.2: forget everything learnt before TLS.
                self.helo = None;
                self.esmtp = false;
                self.transaction = None;
                self.authenticated = None;
                Ok(())
            }
            Ok(Err(error)) => {
                tracing::info!(peer = %self.peer, %error, "TLS handshake failed");
                Err(Close::Lost)
            }
            Err(_) => Err(Close::Lost),
        }
    }

    /// Tells whether relaying is allowed: from `smtp.relay_networks`, or
    /// after a successful AUTH.
    fn relay_allowed(&self) -> bool {
        self.relay_network || self.authenticated.is_some()
    }

    /// Tells whether AUTH is advertised and accepted on this connection.
    fn auth_offered(&self) -> bool {
        self.shared
            .authenticator
            .as_ref()
            .is_some_and(|authenticator| authenticator.offered(self.peer.ip(), self.tls_active))
    }

    /// Runs an AUTH exchange (RFC 4954 section 4).
    async fn auth(&mut self, mechanism: u64, initial_response: String) -> Result<(), Close> {
        let Some(authenticator) = self.shared.authenticator.clone() else {
            self.push_error(Reply::new(502, "5.5.1", "AUTH is not available on this server"));
            return Ok(());
        };
        if !self.esmtp {
            self.push_error(Reply::new(503, "5.5.1", "Send EHLO first"));
            return Ok(());
        }
        if self.authenticated.is_some() {
            self.push_error(Reply::new(503, "5.5.1", "Already authenticated"));
            return Ok(());
        }
        if self.transaction.is_some() {
            self.push_error(Reply::new(503, "5.5.1", "AUTH is not allowed during a mail transaction; send RSET"));
            return Ok(());
        }
        let client = self.peer.ip();
        if !authenticator.offered(client, self.tls_active) {
            self.push_error(Reply::new(
                538,
                "5.7.11",
                "Encryption required for requested authentication mechanism; send STARTTLS first",
            ));
            return Ok(());
        }
        let mechanism_name = match mechanism {
            smtp_proto::AUTH_PLAIN => "PLAIN",
            smtp_proto::AUTH_LOGIN => "LOGIN",
            _ => {
                self.push_error(Reply::new(504, "5.5.4", "Unrecognized authentication type; use PLAIN or LOGIN"));
                return Ok(());
            }
        };
        if let Some(wait) = authenticator.locked_for(client) {
            tracing::debug!(client_ip = %client, "AUTH rejected: client IP address is locked after failed attempts");
            self.push(&Reply::new(
                454,
                "4.7.0",
                format!(
                    "Too many failed AUTH attempts from {client}; try again in {} seconds",
                    wait.as_secs().max(1)
                ),
            ));
            return Ok(());
        }

        let credentials = if mechanism == smtp_proto::AUTH_PLAIN {
            self.plain_credentials(&initial_response).await
        } else {
            self.login_credentials(&initial_response).await
        };
        let (name, password) = match credentials {
            Ok(credentials) => credentials,
            Err(AuthStop::Close(close)) => return Err(close),
            Err(AuthStop::Reply(reply)) => {
                self.push_error(reply);
                return Ok(());
            }
            Err(AuthStop::OtherIdentity(name)) => {
                tracing::warn!(user = ?name, client_ip = %client, mechanism = mechanism_name, "AUTH failed: the authorization identity names another user");
                self.auth_failed(&authenticator, mechanism_name);
                return Ok(());
            }
        };
        if authenticator.verify(&name, password).await {
            tracing::info!(user = ?name, client_ip = %client, mechanism = mechanism_name, tls = self.tls_active, "AUTH succeeded");
            self.authenticated = Some(name);
            self.push(&Reply::new(235, "2.7.0", "Authentication successful"));
        } else {
            tracing::warn!(user = ?name, client_ip = %client, mechanism = mechanism_name, "AUTH failed: unknown user or wrong password");
            self.auth_failed(&authenticator, mechanism_name);
        }
        Ok(())
    }

    /// Counts a failed AUTH towards the client's lockout and replies 535.
    fn auth_failed(&mut self, authenticator: &auth::Authenticator, mechanism: &str) {
        let client = self.peer.ip();
        if let Some(lockout) = authenticator.record_failure(client) {
            tracing::warn!(client_ip = %client, mechanism, lockout_seconds = lockout.as_secs().max(1), "AUTH locked for the client after too many failed attempts");
        }
        self.push_error(Reply::new(535, "5.7.8", "Authentication credentials invalid"));
    }

    /// Reads the PLAIN response: the initial response, or the response to
    /// an empty challenge.
    async fn plain_credentials(&mut self, initial_response: &str) -> Result<(String, Vec<u8>), AuthStop> {
        let response = if initial_response.is_empty() {
            self.sasl_response("").await?
        } else {
            decode_sasl(initial_response)?
        };
        match auth::split_plain(&response) {
            Ok(credentials) => Ok(credentials),
            Err(SaslError::OtherIdentity) => {
                let name = response.split(|&byte| byte == 0).nth(1).unwrap_or_default();
                Err(AuthStop::OtherIdentity(String::from_utf8_lossy(name).into_owned()))
            }
            Err(_) => Err(AuthStop::Reply(Reply::new(
                501,
                "5.5.2",
                "Invalid PLAIN response; send base64 of authzid NUL user NUL password",
            ))),
        }
    }

    /// Reads the LOGIN user name (or takes it from the initial response)
    /// and password.
    async fn login_credentials(&mut self, initial_response: &str) -> Result<(String, Vec<u8>), AuthStop> {
        let name = if initial_response.is_empty() {
            self.sasl_response("VXNlcm5hbWU6").await?
        } else {
            decode_sasl(initial_response)?
        };
        let name = String::from_utf8(name)
            .ok()
            .filter(|name| !name.is_empty())
            .ok_or_else(|| AuthStop::Reply(Reply::new(501, "5.5.2", "Invalid LOGIN user name; send it as UTF-8 in base64")))?;
        let password = self.sasl_response("UGFzc3dvcmQ6").await?;
        Ok((name, password))
    }

    /// Sends a `334` challenge (base64 text) and returns the client's
    /// decoded response.
    async fn sasl_response(&mut self, challenge: &str) -> Result<Vec<u8>, AuthStop> {
        self.push(&Reply::new(334, "", challenge));
        self.flush().await.map_err(|_| AuthStop::Close(Close::Lost))?;
        let mut line = Vec::with_capacity(256);
        let command_timeout = self.gateway.config.smtp.command_timeout;
        match self.read_line(&mut line, command_timeout).await {
            LineRead::Line => {}
            LineRead::Eof => return Err(AuthStop::Close(Close::Lost)),
            LineRead::TimedOut => {
                self.push(&Reply::new(421, "4.4.2", "Timeout waiting for the AUTH response; closing"));
                return Err(AuthStop::Close(Close::Done));
            }
            LineRead::TooLong => {
                return Err(AuthStop::Reply(Reply::new(500, "5.5.6", "Authentication exchange line is too long")));
            }
            LineRead::ShuttingDown => {
                self.push(&shutting_down());
                return Err(AuthStop::Close(Close::Done));
            }
        }
        let Some(text) = line.strip_suffix(b"\r\n") else {
            return Err(AuthStop::Reply(Reply::new(
                500,
                "5.5.2",
                "AUTH response ends in a bare LF; end every line with CRLF",
            )));
        };
        let text = String::from_utf8_lossy(text);
        if text == "*" {
            return Err(AuthStop::Reply(Reply::new(501, "5.0.0", "Authentication cancelled")));
        }
        decode_sasl(&text)
    }

    /// Reads one line, up to and including LF, into `line`.
    async fn read_line(&mut self, line: &mut Vec<u8>, idle: Duration) -> LineRead {
        line.clear();
        let max = self.gateway.config.smtp.max_command_line;
        let mut too_long = false;
        loop {
            let wait = self.wait(idle);
            let gateway = Arc::clone(&self.gateway);
            let read = tokio::select! {
                biased;
                read = timeout(wait, self.reader.fill_buf()) => read,
                // Only between commands: a line already begun is read.
                _ = gateway.scheduler.drained(), if line.is_empty() => return LineRead::ShuttingDown,
            };
            let buffer = match read {
                Ok(Ok(buffer)) => buffer,
                Ok(Err(_)) => return LineRead::Eof,
                Err(_) => return LineRead::TimedOut,
            };
            if buffer.is_empty() {
                return LineRead::Eof;
            }
            let (chunk, complete) = match buffer.iter().position(|&b| b == b'\n') {
                Some(end) => (&buffer[..=end], true),
                None => (buffer, false),
            };
            let length = chunk.len();
            if !too_long {
                line.extend_from_slice(chunk);
                if line.len() > max {
                    too_long = true;
                    line.clear();
                }
            }
            self.reader.consume(length);
            if complete {
                return if too_long { LineRead::TooLong } else { LineRead::Line };
            }
        }
    }

    /// Returns `idle`, cut short by the session deadline.
    fn wait(&self, idle: Duration) -> Duration {
        idle.min(self.deadline.saturating_duration_since(Instant::now()))
    }

    fn push(&mut self, reply: &Reply) {
        self.output.extend_from_slice(reply.to_string().as_bytes());
    }

    fn push_error(&mut self, reply: Reply) {
        if reply.code >= 500 {
            self.errors += 1;
        }
        self.push(&reply);
    }

    async fn too_many_errors(&mut self) -> bool {
        if self.errors < self.gateway.config.smtp.max_errors {
            return false;
        }
        self.push(&Reply::new(421, "4.7.0", "Too many errors in this session; closing"));
        let _ = self.flush().await;
        true
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if self.output.is_empty() {
            return Ok(());
        }
        let stream = self.reader.get_mut();
        let result = stream.write_all(&self.output).await;
        self.output.clear();
        result?;
        stream.flush().await
    }
}

/// Reason an AUTH exchange ended without credentials to check.
enum AuthStop {
    /// The session ends.
    Close(Close),
    /// The exchange failed with this reply; no password was checked.
    Reply(Reply),
    /// A PLAIN authorization identity named another user than this one.
    OtherIdentity(String),
}

fn decode_sasl(text: &str) -> Result<Vec<u8>, AuthStop> {
    auth::decode_response(text)
        .map_err(|_| AuthStop::Reply(Reply::new(501, "5.5.2", "Invalid base64 in the AUTH response")))
}

/// Reply to a session that waits for its next command when shutdown begins
/// (RFC 5321 section 3.8).
fn shutting_down() -> Reply {
    Reply::new(421, "4.3.2", "Service shutting down; try again later")
}

enum LineRead {
    Line,
    Eof,
    TimedOut,
    TooLong,
    /// The gateway began to shut down while the session waited.
    ShuttingDown,
}

fn parse_error_reply(error: &ParseError, line: &[u8]) -> Reply {
    let command = String::from_utf8_lossy(line.split(|&b| b == b' ').next().unwrap_or(b""))
        .trim()
        .to_ascii_uppercase();
    match error {
        ParseError::UnknownCommand => Reply::new(
            500,
            "5.5.2",
            format!("Command {command:?} not recognized"),
        ),
        ParseError::InvalidSenderAddress => Reply::new(501, "5.1.7", "Invalid sender address"),
        ParseError::InvalidRecipientAddress => {
            Reply::new(501, "5.1.3", "Invalid recipient address")
        }
        ParseError::SyntaxError { syntax } => {
            Reply::new(501, "5.5.4", format!("Syntax error; use: {syntax}"))
        }
        ParseError::InvalidParameter { param } => {
            Reply::new(501, "5.5.4", format!("Invalid value for parameter {param}"))
        }
        ParseError::UnsupportedParameter { param } => Reply::new(
            555,
            "5.5.4",
            format!("Parameter {param} is not supported"),
        ),
        ParseError::NeedsMoreData { .. } | ParseError::ResponseTooLong => {
            Reply::new(500, "5.5.2", "Incomplete command line")
        }
        ParseError::InvalidResponse { .. } => Reply::new(500, "5.5.2", "Syntax error"),
    }
}

fn line_ending_reply(code: u16, error: DataError, closing: bool) -> Reply {
    let (what, line) = match error {
        DataError::BareLf { line } => ("bare LF", line),
        DataError::BareCr { line } => ("bare CR", line),
    };
    let tail = if closing { "; closing" } else { "" };
    Reply::new(
        code,
        "5.5.2",
        format!("Message rejected: {what} on line {line}; end every line with CRLF (RFC 5321 section 2.3.8){tail}"),
    )
}

fn size_reply(size: usize, max: usize) -> Reply {
    Reply::new(
        552,
        "5.3.4",
        format!("Message size {size} exceeds the limit of {max} bytes"),
    )
}

fn line_length_reply(length: usize) -> Reply {
    Reply::new(
        550,
        "5.6.0",
        format!(
            "Message has a line of {length} bytes; lines must be at most {} bytes (RFC 5322 section 2.1.1), so fold headers and encode the body",
            data::MAX_LINE_LENGTH
        ),
    )
}
