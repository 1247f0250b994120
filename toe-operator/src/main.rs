//! `toe-operator`: admits PowerTools, selects their targets, reports status.

use anyhow::{Context as _, Result};
use clap::Parser;

#[derive(Parser)]
#[command(name = "toe-operator", version, about = "TOE's Kubernetes operator")]
struct Cli {}

fn main() -> Result<()> {
    let Cli {} = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TOE_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .init();
    let _ = rustls_provider();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        let client = kube::Client::try_default()
            .await
            .context("connecting to the Kubernetes API (in-cluster or KUBECONFIG)")?;
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        toe_operator::controller::run(client, shutdown).await;
        Ok(())
    })
}

/// kube leaves the TLS crypto provider to the application.
fn rustls_provider() -> Result<(), std::sync::Arc<rustls::crypto::CryptoProvider>> {
    rustls::crypto::ring::default_provider().install_default()
}
