//! One SMTP connection per worker thread, kept open between messages and
//! batches, with Nagle's algorithm off. lettre writes a message's body and
//! its closing "." in two writes; with Nagle on, the second waits for the
//! server's delayed ACK (about 40 ms), which capped a thread at ~25 messages
//! a second. lettre's blocking transport cannot set TCP_NODELAY, so this
//! opens the socket itself and hands it to lettre's tokio connection
//! (`connect_with_transport`), which then speaks SMTP (and STARTTLS) over it.
//! Implicit TLS (`--smtp-tls tls`) still goes through lettre's own socket.

use crate::config::{Config, Tls};
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::transport::smtp::response::Response;
use lettre::Message;
use std::time::{Duration, Instant};

/// Opening a connection (TCP, greeting, EHLO, STARTTLS, AUTH): a server that
/// stops answering must not hold a thread.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);
/// A connection idle this long is asked (NOOP) whether it is still there
/// before it carries a message; the answer must come within NOOP_TIMEOUT.
const IDLE_CHECK: Duration = Duration::from_secs(10);
const NOOP_TIMEOUT: Duration = Duration::from_secs(5);
/// One message, from MAIL FROM to the reply to its final ".".
const SEND_TIMEOUT: Duration = Duration::from_secs(120);

/// Why a message was not sent; `permanent` (a 5xx reply to it) is not retried.
#[derive(Debug)]
pub struct Failure {
    pub text: String,
    pub permanent: bool,
}

impl From<lettre::transport::smtp::Error> for Failure {
    fn from(e: lettre::transport::smtp::Error) -> Failure {
        Failure {
            permanent: e.is_permanent(),
            text: e.to_string(),
        }
    }
}

fn transient(text: impl Into<String>) -> Failure {
    Failure {
        text: text.into(),
        permanent: false,
    }
}

pub struct Smtp {
    rt: tokio::runtime::Runtime,
    host: String,
    port: u16,
    tls: Tls,
    credentials: Option<Credentials>,
    conn: Option<(AsyncSmtpConnection, Instant)>,
}

impl Smtp {
    pub fn new(cfg: &Config) -> Result<Smtp, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| format!("SMTP runtime: {e}"))?;
        Ok(Smtp {
            rt,
            host: cfg.smtp_host.clone(),
            port: cfg.smtp_port,
            tls: cfg.smtp_tls,
            credentials: match (&cfg.smtp_user, &cfg.smtp_password) {
                (Some(u), Some(p)) => Some(Credentials::new(u.clone(), p.clone())),
                _ => None,
            },
            conn: None,
        })
    }

    /// Sends one message on the open connection, opening one first when
    /// there is none. An error closes the connection: the next message
    /// starts on a new one.
    pub fn send(&mut self, message: &Message) -> Result<Response, Failure> {
        let bytes = message.formatted();
        let (mut conn, reused) = match self.conn.take() {
            Some((c, last)) => match self.still_open(c, last) {
                Some(c) => (c, true),
                None => (self.open()?, false),
            },
            None => (self.open()?, false),
        };
        let mut sent = self.transaction(&mut conn, message, &bytes);
        // A kept connection that the server closed since (an idle timeout, a
        // restart) fails before any reply: the message was not taken, so it
        // goes once more on a new connection instead of costing an attempt.
        if reused && matches!(&sent, Err((false, _))) {
            conn = self.open()?;
            sent = self.transaction(&mut conn, message, &bytes);
        }
        if sent.is_ok() && !conn.has_broken() {
            self.conn = Some((conn, Instant::now()));
        }
        sent.map_err(|(_, f)| f)
    }

    /// The kept connection, unless it broke or, idle for a while, does not
    /// answer a NOOP.
    fn still_open(&self, mut c: AsyncSmtpConnection, last: Instant) -> Option<AsyncSmtpConnection> {
        if c.has_broken() {
            return None;
        }
        if last.elapsed() < IDLE_CHECK {
            return Some(c);
        }
        let alive = self
            .rt
            .block_on(async { tokio::time::timeout(NOOP_TIMEOUT, c.test_connected()).await })
            .unwrap_or(false);
        alive.then_some(c)
    }

    /// One SMTP transaction; the error says whether the server replied.
    fn transaction(
        &self,
        conn: &mut AsyncSmtpConnection,
        message: &Message,
        bytes: &[u8],
    ) -> Result<Response, (bool, Failure)> {
        self.rt.block_on(async {
            match tokio::time::timeout(SEND_TIMEOUT, conn.send(message.envelope(), bytes)).await {
                Ok(Ok(r)) => Ok(r),
                Ok(Err(e)) => Err((e.is_response(), Failure::from(e))),
                // the server may have taken it: it is not sent again at once
                Err(_) => Err((
                    true,
                    transient("the SMTP server did not answer within 120 s"),
                )),
            }
        })
    }

    /// A failure to open is never the message's fault: a wrong password or
    /// a server refusing us (5xx) must not mark every message dead, so it is
    /// transient and the message is tried again later.
    fn open(&self) -> Result<AsyncSmtpConnection, Failure> {
        let opened = self
            .rt
            .block_on(async { tokio::time::timeout(OPEN_TIMEOUT, self.connect()).await });
        match opened {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(transient(format!("connecting to the SMTP server: {e}"))),
            Err(_) => Err(transient(
                "the SMTP server did not answer within 30 s while connecting",
            )),
        }
    }

    async fn connect(&self) -> Result<AsyncSmtpConnection, String> {
        let hello = ClientId::default();
        let err = |e: lettre::transport::smtp::Error| e.to_string();
        let mut conn = match self.tls {
            Tls::Wrapper => {
                let params = TlsParameters::new(self.host.clone()).map_err(err)?;
                let server = (self.host.as_str(), self.port);
                AsyncSmtpConnection::connect_tokio1(
                    server,
                    Some(OPEN_TIMEOUT),
                    &hello,
                    Some(params),
                    None,
                )
                .await
                .map_err(err)?
            }
            Tls::None | Tls::StartTls => {
                let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
                    .await
                    .map_err(|e| e.to_string())?;
                tcp.set_nodelay(true)
                    .map_err(|e| format!("TCP_NODELAY: {e}"))?;
                let mut conn = AsyncSmtpConnection::connect_with_transport(Box::new(tcp), &hello)
                    .await
                    .map_err(err)?;
                if self.tls == Tls::StartTls {
                    let params = TlsParameters::new(self.host.clone()).map_err(err)?;
                    conn.starttls(params, &hello).await.map_err(err)?;
                }
                conn
            }
        };
        if let Some(c) = &self.credentials {
            conn.auth(&[Mechanism::Plain, Mechanism::Login], c)
                .await
                .map_err(err)?;
        }
        Ok(conn)
    }
}

impl Drop for Smtp {
    fn drop(&mut self) {
        if let Some((mut c, _)) = self.conn.take() {
            let _ = self
                .rt
                .block_on(async { tokio::time::timeout(Duration::from_secs(2), c.quit()).await });
        }
    }
}
