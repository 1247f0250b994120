//! `toe-operator`: admits PowerTools, selects their targets, reports status, and serves the
//! validating admission webhook.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::{Context as _, Result};
use clap::Parser;

#[derive(Parser)]
#[command(name = "toe-operator", version, about = "TOE's Kubernetes operator")]
struct Cli {
    /// Serve the validating admission webhook here (HTTPS; needs --tls-cert and --tls-key).
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    webhook_addr: Option<SocketAddr>,
    /// PEM certificate chain for the webhook.
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// PEM private key for the webhook.
    #[arg(long)]
    tls_key: Option<PathBuf>,
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TOE_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .init();
    // kube leaves the TLS crypto provider to the application.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        let client = kube::Client::try_default()
            .await
            .context("connecting to the Kubernetes API (in-cluster or KUBECONFIG)")?;
        let webhook = match (cli.webhook_addr, &cli.tls_cert, &cli.tls_key) {
            (Some(addr), Some(cert), Some(key)) => {
                Some(tokio::spawn(toe_operator::webhook::serve(
                    client.clone(),
                    addr,
                    cert.clone(),
                    key.clone(),
                    shutdown_signal(),
                )))
            }
            _ => None,
        };
        toe_operator::controller::run(client, shutdown_signal()).await;
        if let Some(w) = webhook {
            w.await.context("webhook task")??;
        }
        Ok(())
    })
}
