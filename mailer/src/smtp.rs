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

const TIMEOUT: Duration = Duration::from_secs(30);
/// A connection idle this long is checked (NOOP) before it carries a message:
/// servers close idle sessions, and a message must not fail for that.
const IDLE_CHECK: Duration = Duration::from_secs(10);

/// Why a message was not sent; `permanent` (a 5xx reply) is not retried.
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
    /// there is none. Any error closes the connection: the next message
    /// starts on a new one.
    pub fn send(&mut self, message: &Message) -> Result<Response, Failure> {
        let mut conn = match self.conn.take() {
            Some((mut c, last)) => {
                let alive = last.elapsed() < IDLE_CHECK || self.rt.block_on(c.test_connected());
                if alive && !c.has_broken() {
                    c
                } else {
                    self.open()?
                }
            }
            None => self.open()?,
        };
        let bytes = message.formatted();
        let sent = self.rt.block_on(async {
            match tokio::time::timeout(TIMEOUT, conn.send(message.envelope(), &bytes)).await {
                Ok(r) => r.map_err(Failure::from),
                Err(_) => Err(transient("the SMTP server did not answer within 30 s")),
            }
        });
        if sent.is_ok() && !conn.has_broken() {
            self.conn = Some((conn, Instant::now()));
        }
        sent
    }

    fn open(&self) -> Result<AsyncSmtpConnection, Failure> {
        self.rt.block_on(async {
            let hello = ClientId::default();
            let mut conn = match self.tls {
                Tls::Wrapper => {
                    let params = TlsParameters::new(self.host.clone())?;
                    AsyncSmtpConnection::connect_tokio1(
                        (self.host.as_str(), self.port),
                        Some(TIMEOUT),
                        &hello,
                        Some(params),
                        None,
                    )
                    .await?
                }
                Tls::None | Tls::StartTls => {
                    let tcp = tokio::time::timeout(
                        TIMEOUT,
                        tokio::net::TcpStream::connect((self.host.as_str(), self.port)),
                    )
                    .await
                    .map_err(|_| transient("connecting to the SMTP server timed out"))?
                    .map_err(|e| transient(format!("connecting to the SMTP server: {e}")))?;
                    tcp.set_nodelay(true)
                        .map_err(|e| transient(format!("TCP_NODELAY: {e}")))?;
                    let mut conn =
                        AsyncSmtpConnection::connect_with_transport(Box::new(tcp), &hello).await?;
                    if self.tls == Tls::StartTls {
                        conn.starttls(TlsParameters::new(self.host.clone())?, &hello)
                            .await?;
                    }
                    conn
                }
            };
            if let Some(c) = &self.credentials {
                conn.auth(&[Mechanism::Plain, Mechanism::Login], c).await?;
            }
            Ok(conn)
        })
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
