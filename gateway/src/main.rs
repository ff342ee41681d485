//! nudge-gateway: the HTTP edge of pg_nudge (docs/gateway.md). Applications
//! send events and profiles in the Segment, Amplitude or Mixpanel formats
//! their SDKs already speak; email providers report deliveries, bounces and
//! complaints; recipients unsubscribe with one click. Every request is one
//! call of a pg_nudge function, as a role that holds nudge_writer and
//! nudge_mailer.

mod app;
mod config;
mod db;
mod ingest;
mod metrics;
mod pages;
mod webhooks;

use config::Config;
use std::sync::Arc;
use std::time::Duration;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cfg = Config::from_args(&args, |k| std::env::var(k).ok()).unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2)
    });
    if let Err(e) = serve(cfg).await {
        eprintln!("nudge-gateway: {e}");
        std::process::exit(1);
    }
}

async fn serve(cfg: Config) -> Result<(), String> {
    let mut pg: tokio_postgres::Config = cfg
        .database_url
        .parse()
        .map_err(|e| format!("--database-url: {e}"))?;
    // a stuck statement must not hold a connection of the pool for good
    let options = pg.get_options().unwrap_or_default().to_owned();
    if !options.contains("statement_timeout") {
        pg.options(format!("{options} -c statement_timeout=30s").trim());
    }
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(Duration::from_secs(5));
    }
    let manager = deadpool_postgres::Manager::from_config(
        pg,
        tokio_postgres::NoTls,
        deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        },
    );
    let pool = deadpool_postgres::Pool::builder(manager)
        .max_size(cfg.pool_size)
        // a request waits this long for a connection, then gets 503
        .wait_timeout(Some(Duration::from_secs(5)))
        .create_timeout(Some(Duration::from_secs(5)))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .map_err(|e| format!("database pool: {e}"))?;
    let sendgrid_key = cfg
        .sendgrid_public_key
        .as_deref()
        .map(webhooks::sendgrid::key)
        .transpose()?;
    let sns_certs = cfg
        .sns_certs
        .as_deref()
        .map(webhooks::ses::Certs::load)
        .transpose()?;
    if let Some(c) = &sns_certs {
        eprintln!(
            "nudge-gateway: {} SNS certificate(s) in the trust store",
            c.len()
        );
    }
    if cfg.write_keys.is_empty() {
        eprintln!("nudge-gateway: no --write-keys: event ingestion refuses every request");
    }
    let listener = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .map_err(|e| format!("--listen {}: {e}", cfg.listen))?;
    eprintln!("nudge-gateway: listening on {}", cfg.listen);
    let gateway = Arc::new(app::Gateway {
        cfg,
        pool,
        metrics: metrics::Metrics::new(),
        sendgrid_key,
        sns_certs,
    });
    axum::serve(listener, app::router(gateway))
        .with_graceful_shutdown(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        })
        .await
        .map_err(|e| e.to_string())
}
