//! A real kube-apiserver (1.20, built by `cargo xtask bootstrap --tests`) over a real etcd, both
//! started for one test in a private directory and stopped on drop. The test authenticates with
//! a static admin token; certificates come from the openssl command line tool (a CA, a serving
//! certificate for 127.0.0.1, the service-account key pair), which Debian always ships.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

/// A port for etcd or the API server. Taken below the kernel's ephemeral range (32768 and up by
/// default), which bind(:0) and outgoing connections draw from: a port chosen there could be
/// handed to someone else between choosing it and the server binding it. Each test process gets
/// its own block (tests of one binary share it through the counter; binaries run one at a time),
/// and a port something already holds is skipped.
pub(crate) fn free_port() -> u16 {
    const BLOCK: u32 = 120;
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let base = 20_000 + (std::process::id() % 100) * BLOCK;
    loop {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        assert!(n < BLOCK, "more than {BLOCK} test ports in one process");
        let port = u16::try_from(base + n).expect("below 32000");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a serving certificate for 127.0.0.1 signed by it, and the service-account key pair.
fn certificates(d: &Path) {
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=toe-test-ca",
        ],
    );
    std::fs::write(
        d.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    sign(d, "server");
    openssl(d, &["genrsa", "-out", "sa.key", "2048"]);
    openssl(d, &["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"]);
}

/// `<name>.key` and `<name>.crt`, a certificate for 127.0.0.1 signed by the CA in `d`.
fn sign(d: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (key, csr, crt) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.crt"),
    );
    openssl(
        d,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &crt,
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ],
    );
    (d.join(crt), d.join(key))
}

pub struct ApiServer {
    dir: tempfile::TempDir,
    etcd: Child,
    apiserver: Child,
    pub url: String,
}

pub const ADMIN_TOKEN: &str = "toe-test-admin-token";
/// A plain user (`alice`, group `shop-devs`) with no permissions until a test grants some.
pub const ALICE_TOKEN: &str = "toe-test-alice-token";
/// The operator's service account, with no permissions until a test binds its role.
pub const OPERATOR_TOKEN: &str = "toe-test-operator-token";
pub const OPERATOR_USER: &str = "system:serviceaccount:toe-system:toe-operator";
/// The node agent's service account, with no permissions until a test binds its role.
pub const AGENT_TOKEN: &str = "toe-test-agent-token";
pub const AGENT_USER: &str = "system:serviceaccount:toe-system:toe-agent";

impl ApiServer {
    /// Starts etcd and the API server; `None` (with the reason) when the server is not built and
    /// skipping is allowed. In CI (`TOE_REQUIRE_ROOT_TESTS`) a missing server is a failure.
    #[must_use]
    pub fn start(test: &str) -> Option<Self> {
        let bin = crate::bootstrapped_tool(test, "TOE_KUBE_APISERVER", "kube/bin/kube-apiserver")?;
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path();
        certificates(d);
        std::fs::write(
            d.join("tokens.csv"),
            format!(
                "{ADMIN_TOKEN},admin,admin,system:masters\n{ALICE_TOKEN},alice,alice,shop-devs\n\
                 {OPERATOR_TOKEN},{OPERATOR_USER},operator,system:serviceaccounts\n\
                 {AGENT_TOKEN},{AGENT_USER},agent,system:serviceaccounts\n"
            ),
        )
        .unwrap();
        let (client, peer, secure) = (free_port(), free_port(), free_port());
        let etcd = Command::new("etcd")
            .current_dir(d)
            .args(["--name", "toe-test", "--data-dir", "etcd"])
            .arg(format!("--listen-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--advertise-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{peer}"
            ))
            .arg(format!(
                "--initial-cluster=toe-test=http://127.0.0.1:{peer}"
            ))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("etcd.log")).unwrap())
            .spawn()
            .expect("etcd (Debian etcd-server; `cargo xtask bootstrap --tests`)");
        let apiserver = Command::new(&bin)
            .current_dir(d)
            .arg(format!("--etcd-servers=http://127.0.0.1:{client}"))
            .arg(format!("--secure-port={secure}"))
            .args([
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                "--tls-cert-file=server.crt",
                "--tls-private-key-file=server.key",
                "--client-ca-file=ca.crt",
                "--token-auth-file=tokens.csv",
                "--service-account-key-file=sa.pub",
                "--service-account-signing-key-file=sa.key",
                "--service-account-issuer=https://kubernetes.default.svc",
                "--authorization-mode=RBAC",
                "--disable-admission-plugins=ServiceAccount",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--cert-dir=certs",
                // 1.20 serves ephemeral containers only behind this (alpha) gate.
                "--feature-gates=EphemeralContainers=true",
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("apiserver.log")).unwrap())
            .spawn()
            .expect("kube-apiserver");
        let server = Self {
            dir,
            etcd,
            apiserver,
            url: format!("https://127.0.0.1:{secure}"),
        };
        server.write_kubeconfig();
        Some(server)
    }

    #[must_use]
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// A kubeconfig file for the identity of `token` (for a process such as `toe agent`).
    #[must_use]
    pub fn kubeconfig_as(&self, token: &str) -> PathBuf {
        let path = self.dir.path().join(format!("kubeconfig-{token}"));
        let text = std::fs::read_to_string(self.kubeconfig())
            .expect("kubeconfig")
            .replace(ADMIN_TOKEN, token);
        std::fs::write(&path, text).expect("writing a kubeconfig");
        path
    }

    fn write_kubeconfig(&self) {
        let ca = self.dir.path().join("ca.crt");
        std::fs::write(
            self.kubeconfig(),
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: admin\n  user:\n    token: {ADMIN_TOKEN}\ncontexts:\n- name: test\n  context: {{cluster: test, user: admin}}\ncurrent-context: test\n",
                self.url,
                ca.display()
            ),
        )
        .unwrap();
    }

    /// A certificate for 127.0.0.1 signed by the server's CA (for a webhook it calls), as
    /// (certificate, key) PEM paths.
    #[must_use]
    pub fn issue_cert(&self, name: &str) -> (PathBuf, PathBuf) {
        sign(self.dir.path(), name)
    }

    /// The CA certificate (PEM), e.g. for a webhook's caBundle.
    #[must_use]
    pub fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(self.dir.path().join("ca.crt")).expect("ca.crt")
    }

    /// A client for the admin user, once the server answers (up to 60 s after start).
    pub async fn client(&self) -> kube::Client {
        self.client_as(ADMIN_TOKEN).await
    }

    /// A client authenticating with `token`, once the server answers.
    pub async fn client_as(&self, token: &str) -> kube::Client {
        // Another test of this binary may have installed it already.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let text = std::fs::read_to_string(self.kubeconfig())
            .expect("kubeconfig")
            .replace(ADMIN_TOKEN, token);
        let kc = kube::config::Kubeconfig::from_yaml(&text).expect("kubeconfig");
        let config =
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .expect("client config");
        let client = kube::Client::try_from(config).expect("client");
        for _ in 0..600 {
            if client.apiserver_version().await.is_ok() && ready(&client).await {
                return client;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "kube-apiserver not ready within 60 s; its log:\n{}",
            std::fs::read_to_string(self.dir.path().join("apiserver.log")).unwrap_or_default()
        );
    }
}

/// Whether `/readyz` answers `ok`: the server's start-up hooks have run, among them the one
/// that creates the default RBAC roles. `/version` answers before that, and until then a
/// SelfSubjectAccessReview (which every authenticated user may create once the roles exist) is
/// refused.
async fn ready(client: &kube::Client) -> bool {
    let Ok(request) = http::Request::get("/readyz").body(Vec::new()) else {
        return false;
    };
    client
        .request_text(request)
        .await
        .is_ok_and(|text| text.trim() == "ok")
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        for c in [&mut self.apiserver, &mut self.etcd] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
