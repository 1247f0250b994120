//! `toe-operator`: admits PowerTools, selects their targets, reports status, processes runs into
//! reports on schedule, and serves the validating admission webhook, the reports and Prometheus
//! metrics.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use axum::{Router, routing::get};
use axum_server::tls_rustls::RustlsConfig;
use clap::Parser;
use toe_operator::{
    certs, controller, lease::Elector, metrics::Metrics, processing, reports, shutdown::Signal,
    webhook,
};

#[derive(Parser)]
#[command(name = "toe-operator", version, about = "TOE's Kubernetes operator")]
struct Cli {
    /// Serve the validating admission webhook here (HTTPS: needs --tls-cert and --tls-key, or
    /// --webhook-self-signed).
    #[arg(long)]
    webhook_addr: Option<SocketAddr>,
    /// PEM certificate chain for the webhook (e.g. mounted from cert-manager's Secret).
    #[arg(long, requires_all = ["tls_key", "webhook_addr"], conflicts_with = "webhook_self_signed")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for the webhook.
    #[arg(long, requires_all = ["tls_cert", "webhook_addr"])]
    tls_key: Option<PathBuf>,
    /// Generate the webhook's CA and certificate, keep them in --webhook-secret (in the
    /// operator's namespace, shared by every replica, renewed 30 days before they expire) and
    /// write the CA into --webhook-configuration.
    #[arg(long, requires = "webhook_addr")]
    webhook_self_signed: bool,
    /// The Service in front of the webhook (its in-cluster DNS names go into the certificate).
    #[arg(long, default_value = "toe-webhook")]
    webhook_service: String,
    /// More names or IP addresses for the self-signed certificate (repeatable).
    #[arg(long)]
    webhook_host: Vec<String>,
    #[arg(long, default_value = toe_operator::rbac::WEBHOOK_SECRET)]
    webhook_secret: String,
    #[arg(long, default_value = toe_operator::rbac::WEBHOOK_CONFIGURATION)]
    webhook_configuration: String,
    /// Serve /metrics (Prometheus) and /healthz here over plain HTTP.
    #[arg(long, default_value = "0.0.0.0:9090")]
    metrics_addr: SocketAddr,
    /// Reconcile only while holding this Lease (in --lease-namespace), so that one of several
    /// replicas acts at a time. Empty: no election (a single replica).
    #[arg(long, default_value = "toe-operator")]
    lease_name: String,
    /// The operator's own namespace: its Lease and its webhook Secret live here, and faults
    /// reach it (like kube-system) only where a PowerToolConfig names it.
    #[arg(long, env = "POD_NAMESPACE", default_value = "toe-system")]
    lease_namespace: String,
    /// This replica's identity in the Lease.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Stores besides --artifacts that PowerTools and PowerToolProcessings may name as their
    /// output (comma-separated URL prefixes); the agents get the same list.
    #[arg(long, env = "TOE_ALLOWED_OUTPUTS", default_value = "")]
    allowed_outputs: String,
    /// Model endpoints PowerToolProcessings may send their summaries and keys to (comma-separated
    /// URL prefixes). Empty: the model step is off everywhere.
    #[arg(long, env = "TOE_MODEL_ENDPOINTS", default_value = "")]
    model_endpoints: String,
    /// The object store the node agents write to (their --output): PowerToolProcessings read
    /// runs from it and write reports to `<artifacts>/_reports/` unless they name another URL.
    #[arg(
        long,
        env = "TOE_OUTPUT",
        default_value = toe_artifacts::layout::DEFAULT_NODE_STORE
    )]
    artifacts: url::Url,
    /// Serve the processed reports (index at /reports/) here over plain HTTP; empty: off.
    #[arg(long, default_value = "0.0.0.0:8080")]
    report_addr: String,
    /// Who may read reports: `kubernetes` (a bearer token, and per namespace what RBAC lets the
    /// reader get of PowerToolProcessings) or `open` (anyone who reaches the server: a
    /// single-tenant cluster only).
    #[arg(
        long,
        env = "TOE_REPORT_AUTH",
        value_enum,
        default_value = "kubernetes"
    )]
    report_auth: ReportAuth,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum ReportAuth {
    Kubernetes,
    Open,
}

/// Serves `app` on `addr` (plain HTTP) until `stop` fires; `flag` names the address in errors.
async fn serve(addr: SocketAddr, app: Router, flag: &str, stop: Signal) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("{flag} {addr}"))?;
    axum::serve(listener, app)
        .with_graceful_shutdown(stop.fired())
        .await?;
    Ok(())
}

/// Serves the reports on `--report-addr` in a task of its own; an address that does not parse is
/// an error here, one that cannot be bound is logged by the task.
fn spawn_report_server(cli: &Cli, client: kube::Client, stop: Signal) -> Result<()> {
    let addr: SocketAddr = cli
        .report_addr
        .parse()
        .with_context(|| format!("--report-addr {}", cli.report_addr))?;
    let access = match cli.report_auth {
        ReportAuth::Kubernetes => reports::Access::Kubernetes(client.clone()),
        ReportAuth::Open => reports::Access::Open,
    };
    let artifacts = cli.artifacts.clone();
    tokio::spawn(async move {
        let served = async {
            let app = reports::router(
                reports::Reports::new(&artifacts, access)?.with_processings(client),
            );
            serve(addr, app, "--report-addr", stop).await
        };
        if let Err(e) = served.await {
            tracing::error!(error = %format!("{e:#}"), "report server stopped");
        }
    });
    Ok(())
}

async fn serve_metrics(addr: SocketAddr, metrics: Arc<Metrics>, stop: Signal) -> Result<()> {
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move { m.encode() }
            }),
        )
        .route("/healthz", get(|| async { "ok" }));
    serve(addr, app, "--metrics-addr", stop).await
}

/// The webhook's TLS: from files, or self-generated and kept in step with the cluster.
async fn webhook_tls(cli: &Cli, client: &kube::Client) -> Result<RustlsConfig> {
    if cli.webhook_self_signed {
        let setup = certs::SelfSigned {
            namespace: cli.lease_namespace.clone(),
            secret: cli.webhook_secret.clone(),
            configuration: cli.webhook_configuration.clone(),
            names: certs::service_names(
                &cli.webhook_service,
                &cli.lease_namespace,
                &cli.webhook_host,
            ),
        };
        return certs::serve_config(setup, client.clone())
            .await
            .context("--webhook-self-signed");
    }
    let (Some(cert), Some(key)) = (&cli.tls_cert, &cli.tls_key) else {
        anyhow::bail!("--webhook-addr needs --tls-cert and --tls-key, or --webhook-self-signed");
    };
    // cert-manager renews into the mounted Secret; each renewal is served without a restart.
    certs::serve_files(cert.clone(), key.clone(), certs::RECHECK)
        .await
        .with_context(|| {
            format!(
                "reading --tls-cert {} / --tls-key {}",
                cert.display(),
                key.display()
            )
        })
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
        // One signal for every part, listened for before anything starts.
        let stop = Signal::from_os().context("listening for SIGTERM")?;
        let client = kube::Client::try_default()
            .await
            .context("connecting to the Kubernetes API (in-cluster or KUBECONFIG)")?;
        let metrics = Arc::new(Metrics::default());
        tokio::spawn(serve_metrics(
            cli.metrics_addr,
            metrics.clone(),
            stop.clone(),
        ));
        // Every replica answers the webhook; only the leader reconciles.
        let webhook = match cli.webhook_addr {
            Some(addr) => {
                let tls = webhook_tls(&cli, &client).await?;
                Some(tokio::spawn(webhook::serve(
                    client.clone(),
                    metrics.clone(),
                    controller::protected_namespaces(&cli.lease_namespace),
                    addr,
                    tls,
                    stop.fired(),
                )))
            }
            None => None,
        };
        // Every replica serves reports; only the leader reconciles and processes.
        if !cli.report_addr.is_empty() {
            spawn_report_server(&cli, client.clone(), stop.clone())?;
        }
        let opts = processing::ProcessingOptions {
            artifacts: cli.artifacts.clone(),
            model_endpoints: toe_artifacts::layout::allowed_outputs(&cli.model_endpoints)
                .context("--model-endpoints")?,
            allowed_outputs: toe_artifacts::layout::allowed_outputs(&cli.allowed_outputs)
                .context("--allowed-outputs")?,
            sweep_every: processing::SWEEP_EVERY,
        };
        let controller_opts = controller::Options {
            artifacts: cli.artifacts.clone(),
            release_namespace: cli.lease_namespace.clone(),
            allowed_outputs: opts.allowed_outputs.clone(),
        };
        let run = {
            let (client, metrics, stop) = (client.clone(), metrics.clone(), stop.clone());
            async move {
                futures::join!(
                    controller::run(
                        client.clone(),
                        metrics.clone(),
                        controller_opts,
                        stop.fired(),
                    ),
                    processing::run(client, opts, metrics, stop.fired()),
                );
            }
        };
        if cli.lease_name.is_empty() {
            run.await;
        } else {
            let identity = cli
                .identity
                .clone()
                .unwrap_or_else(|| format!("toe-operator-{}", std::process::id()));
            Elector::new(
                client,
                &cli.lease_namespace,
                &cli.lease_name,
                &identity,
                Duration::from_secs(15),
            )
            .lead(run, &stop)
            .await;
        }
        if let Some(w) = webhook {
            w.await.context("webhook task")??;
        }
        Ok(())
    })
}
