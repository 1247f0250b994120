//! `cargo xtask cluster up | down | status | import`: a real single-node Kubernetes 1.20 cluster
//! on this machine, for the tests that need a kubelet: etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler, kubelet and kube-proxy (built once from Debian's
//! source package, see [`crate::apiserver`]), containerd 1.6 with runc and the CNI bridge
//! plugins (Debian packages; containerd 1.6's CRI still serves v1alpha2, what kubelet 1.20
//! speaks). Pods are real runc containers in real cgroups, with `containerd://` ids.
//!
//! No registry is used: the pause and busybox images are built here with buildah and imported
//! into containerd, like the release images (`import`). Nothing leaves this machine: kubelet's
//! cloud credential provider is switched off, pods cannot forward past the node, and ClusterIPs
//! that kube-proxy has not redirected go to a link that drops them.
//!
//! Everything lives under the state directory ([`state_dir`]), except what kubelet, containerd
//! and libcni hard-code; `up` records which of those it created (paths, iptables tables,
//! sysctls it changes) and `down` removes or restores exactly those, plus the processes it
//! started, the containerd shims of its socket, mounts under the state directory, the links,
//! the iptables rules and chains of kubelet and kube-proxy, and the `kubepods` cgroups.

use std::{
    fmt::Write as _,
    fs,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{apiserver, bootstrap, is_root, run};

/// The pods' address range: one node, so one host-local range is the whole pod network.
const POD_CIDR: &str = "10.244.0.0/24";
/// ClusterIPs; the first is the API server's `kubernetes` Service.
const SVC_CIDR: &str = "10.96.0.0/24";
const SVC_APISERVER_IP: &str = "10.96.0.1";
/// The pods' bridge and the link that swallows ClusterIP traffic kube-proxy did not redirect;
/// named after TOE so nobody else's (cni0, podman's) is touched.
const BRIDGE: &str = "toe-cni0";
const SVC_LINK: &str = "toe-svc0";
/// The FORWARD rule that keeps pods from reaching anything off this node.
const NO_EGRESS: &str = "toe-cluster-no-egress";
/// The OUTPUT rule that keeps the node's own processes from the cloud metadata address.
const NO_METADATA: &str = "toe-cluster-no-metadata";
/// Where cloud SDKs (kubelet's credential provider, an S3 client without credentials) look for
/// instance credentials.
const METADATA_IP: &str = "169.254.169.254";
/// Not etcd's usual 2379/2380: a system etcd (or the API server tests') may hold those.
const ETCD_PORT: u16 = 12379;
const ETCD_PEER_PORT: u16 = 12380;
const API_PORT: u16 = 6443;
/// Every port a component listens on; `up` refuses to start when one is taken.
const PORTS: &[u16] = &[
    API_PORT,
    ETCD_PORT,
    ETCD_PEER_PORT,
    10248,
    10249,
    10250,
    10256,
    10257,
    10259,
];
/// 1.20 serves `pods/ephemeralcontainers` only behind this gate.
const FEATURES: &str = "EphemeralContainers=true";
/// Names under `localhost/` are never pulled: every image is built here.
const PAUSE_IMAGE: &str = "localhost/pause:3.4";
const BUSYBOX_IMAGE: &str = "localhost/busybox:1.35";
/// An image-based tool for the suite: busybox whose entrypoint says what it was given (its
/// arguments and TOE's environment), so a test sees that the ephemeral container ran as asked.
const PROBE_IMAGE: &str = "localhost/toe-probe:1";
/// The images' archives under [`images_dir`], all imported by `up`.
const ARCHIVES: [&str; 3] = ["pause.oci.tar", "busybox.oci.tar", "toe-probe.oci.tar"];
/// The components, in start order; `down` stops them in the order that lets kubelet tear its
/// pods down first.
const COMPONENTS: &[&str] = &[
    "containerd",
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
];
/// Host paths kubelet, containerd and libcni create whatever their flags say.
const HARD_CODED_PATHS: &[&str] = &[
    "/var/log/pods",
    "/var/log/containers",
    "/var/lib/kubelet",
    "/run/containerd",
    "/var/lib/cni",
];
/// Sysctls kubelet, kube-proxy and the bridge plugin set, with the value each sets: `down`
/// restores one only while it still has that value (someone else may have changed it since).
const SYSCTLS: &[(&str, &str)] = &[
    ("vm.overcommit_memory", "1"),
    ("vm.panic_on_oom", "0"),
    ("kernel.panic", "10"),
    ("kernel.panic_on_oops", "1"),
    ("kernel.keys.root_maxkeys", "1000000"),
    ("kernel.keys.root_maxbytes", "25000000"),
    ("net.ipv4.ip_forward", "1"),
    ("net.ipv4.conf.all.route_localnet", "1"),
    ("net.bridge.bridge-nf-call-iptables", "1"),
];
const PACKAGES: &[&str] = &[
    "containerd",
    "runc",
    "containernetworking-plugins",
    "iptables",
    "conntrack",
    "etcd-server",
    "openssl",
    "busybox-static",
    "gcc",
    "libc6-dev",
    "buildah",
];

/// Where the cluster keeps its state (`TOE_CLUSTER_DIR`, default `/var/tmp/toe-cluster`).
#[must_use]
pub fn state_dir() -> PathBuf {
    std::env::var_os("TOE_CLUSTER_DIR")
        .map_or_else(|| PathBuf::from("/var/tmp/toe-cluster"), PathBuf::from)
}

/// The administrator's kubeconfig while the cluster is up.
#[must_use]
pub fn kubeconfig() -> PathBuf {
    state_dir().join("admin.kubeconfig")
}

/// kubectl 1.20, which matches the server (a newer kubectl's `debug` fails against 1.20).
#[must_use]
pub fn kubectl() -> PathBuf {
    apiserver::bin_dir().join("kubectl")
}

fn images_dir() -> PathBuf {
    bootstrap::cache_dir().join("kube/images")
}

fn containerd_socket() -> PathBuf {
    state_dir().join("containerd/containerd.sock")
}

fn pid_of(name: &str) -> Option<i32> {
    fs::read_to_string(state_dir().join("pids").join(name))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn alive(name: &str) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists.
    pid_of(name).is_some_and(|pid| unsafe { libc::kill(pid, 0) } == 0)
}

/// `cmd` with its output discarded, true when it succeeded.
fn quietly(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn output_of(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn kubectl_cmd() -> Command {
    let mut c = Command::new(kubectl());
    c.env("KUBECONFIG", kubeconfig());
    c
}

fn ctr() -> Command {
    let mut c = Command::new("ctr");
    c.arg("-a").arg(containerd_socket()).args(["-n", "k8s.io"]);
    c
}

/// Polls `ready` every 200 ms for up to `limit`.
fn wait_for(limit: Duration, what: &str, mut ready: impl FnMut() -> bool) -> Result<()> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if ready() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!(
        "{what} was not ready after {}s (logs in {})",
        limit.as_secs(),
        state_dir().join("logs").display()
    )
}

/// Starts a component in a session of its own (it outlives this command), its output in
/// `logs/<name>.log` and its pid in `pids/<name>`.
fn start(name: &str, cmd: &mut Command) -> Result<()> {
    let s = state_dir();
    let log = fs::File::create(s.join("logs").join(format!("{name}.log")))?;
    // SAFETY: setsid is async-signal-safe and touches no memory of this process.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd
        .current_dir(&s)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    fs::write(s.join("pids").join(name), child.id().to_string())?;
    Ok(())
}

/// Whether something listens on TCP `port` (any address), from the kernel's socket tables.
fn port_taken(port: u16) -> bool {
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|f| {
        fs::read_to_string(f).is_ok_and(|t| {
            t.lines().skip(1).any(|l| {
                let mut fields = l.split_whitespace();
                let local = fields.nth(1).unwrap_or_default();
                let state = fields.nth(1).unwrap_or_default();
                state == "0A"
                    && local
                        .rsplit_once(':')
                        .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
                        == Some(port)
            })
        })
    })
}

/// The node's address: the first global IPv4 of the default-route interface, else of any.
/// kubelet refuses a loopback node address, and pods must reach the API server at it.
fn node_ip() -> Result<String> {
    let dev =
        output_of(Command::new("ip").args(["-4", "route", "show", "default"])).and_then(|o| {
            let mut w = o.split_whitespace();
            w.position(|x| x == "dev")?;
            w.next().map(str::to_owned)
        });
    let mut tries = Vec::new();
    if let Some(dev) = &dev {
        tries.push(vec![
            "-4", "-o", "addr", "show", "dev", dev, "scope", "global",
        ]);
    }
    tries.push(vec!["-4", "-o", "addr", "show", "scope", "global"]);
    for args in tries {
        if let Some(ip) = output_of(Command::new("ip").args(&args)).and_then(|o| {
            let l = o.lines().next()?.to_owned();
            let w: Vec<&str> = l.split_whitespace().collect();
            let i = w.iter().position(|x| *x == "inet")?;
            Some(w.get(i + 1)?.split('/').next()?.to_owned())
        }) {
            return Ok(ip);
        }
    }
    bail!("this machine has no global IPv4 address for the node")
}

fn node_name() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map_or_else(|_| "toe-node".into(), |h| h.trim().to_lowercase())
}

/// The node is Ready and pods in `default` can get their service account token.
fn ready() -> bool {
    let node = node_name();
    output_of(kubectl_cmd().args([
        "get",
        "node",
        &node,
        "-o",
        "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
    ]))
    .is_some_and(|s| s.trim() == "True")
        && output_of(kubectl_cmd().args([
            "-n",
            "default",
            "get",
            "sa",
            "default",
            "-o",
            "jsonpath={.secrets[0].name}",
        ]))
        .is_some_and(|s| !s.trim().is_empty())
}

/// Installs the packages and builds the binaries and images the cluster needs (idempotent).
pub fn prepare() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| !bootstrap::installed(p))
        .collect();
    if !missing.is_empty() {
        bootstrap::apt_install(&missing)?;
    }
    apiserver::ensure()?;
    build_images()
}

/// The pause image (Kubernetes' own pause.c, static), a busybox image (Debian's static
/// busybox and one link per applet) and the probe tool on busybox, built from scratch with
/// buildah and kept as OCI archives that `ctr images import` reads.
fn build_images() -> Result<()> {
    let dir = images_dir();
    if ARCHIVES.iter().all(|a| dir.join(a).exists()) {
        return Ok(());
    }
    let [pause, busybox, probe] = ARCHIVES.map(|a| dir.join(a));
    fs::create_dir_all(&dir)?;
    let work = dir.join("work");
    let _ = fs::remove_dir_all(&work);
    let (pause_root, bb_root) = (work.join("pause"), work.join("busybox"));
    fs::create_dir_all(&pause_root)?;
    fs::create_dir_all(bb_root.join("bin"))?;
    fs::create_dir_all(bb_root.join("tmp"))?;
    run(Command::new("gcc")
        .args(["-Os", "-static", "-DVERSION=v3.4-toe", "-o"])
        .arg(pause_root.join("pause"))
        .arg(apiserver::pause_source()))
    .context("compiling pause.c")?;
    fs::copy("/bin/busybox", bb_root.join("bin/busybox")).context("busybox-static")?;
    let applets = output_of(Command::new("/bin/busybox").arg("--list")).unwrap_or_default();
    for a in applets.lines().filter(|a| *a != "busybox" && !a.is_empty()) {
        std::os::unix::fs::symlink("busybox", bb_root.join("bin").join(a))?;
    }
    image(
        &pause_root,
        PAUSE_IMAGE,
        &["--entrypoint", "[\"/pause\"]", "--user", "65535:65535"],
        &pause,
    )?;
    image(
        &bb_root,
        BUSYBOX_IMAGE,
        &["--env", "PATH=/bin", "--cmd", "sh"],
        &busybox,
    )?;
    image(
        &bb_root,
        PROBE_IMAGE,
        &[
            "--env",
            "PATH=/bin",
            "--entrypoint",
            r#"["/bin/sh", "-c", "echo \"toe-probe: $* output=$TOE_OUTPUT_URL\"; sleep 1", "toe-probe"]"#,
        ],
        &probe,
    )?;
    let _ = fs::remove_dir_all(&work);
    Ok(())
}

/// One image from `rootfs` with the given `buildah config` options, written to `archive`.
fn image(rootfs: &Path, reference: &str, config: &[&str], archive: &Path) -> Result<()> {
    let id = output_of(Command::new("buildah").args(["from", "scratch"]))
        .context("buildah from scratch")?
        .trim()
        .to_owned();
    let result: Result<()> = (|| {
        run(Command::new("buildah")
            .args(["copy", "--quiet", &id])
            .arg(format!("{}/", rootfs.display()))
            .arg("/"))?;
        run(Command::new("buildah").arg("config").args(config).arg(&id))?;
        run(Command::new("buildah").args(["commit", "--quiet", &id, reference]))?;
        let tmp = archive.with_extension("tmp");
        let _ = fs::remove_file(&tmp);
        run(Command::new("buildah")
            .args(["push", "--quiet", reference])
            .arg(format!("oci-archive:{}:{reference}", tmp.display())))?;
        fs::rename(&tmp, archive)?;
        Ok(())
    })();
    let _ = quietly(Command::new("buildah").args(["rm", &id]));
    result.with_context(|| format!("building image {reference}"))
}

/// Imports OCI archives into the cluster's containerd.
pub fn import(archives: &[PathBuf]) -> Result<()> {
    for a in archives {
        run(ctr().args(["images", "import"]).arg(a))
            .with_context(|| format!("importing {} into containerd", a.display()))?;
    }
    Ok(())
}

/// Starts the cluster and waits for the node to be Ready. A second call while it runs only
/// checks it; leftovers of a cluster that died are cleared first.
pub fn up() -> Result<()> {
    if !is_root() {
        bail!("the cluster needs root: `sudo -E cargo xtask cluster up`");
    }
    let s = state_dir();
    if s.exists() {
        if COMPONENTS.iter().all(|c| alive(c)) && ready() {
            eprintln!("cluster: already up; KUBECONFIG={}", kubeconfig().display());
            return Ok(());
        }
        eprintln!("cluster: clearing what a previous cluster left");
        down()?;
    }
    let t = Instant::now();
    prepare()?;
    if let Some(p) = PORTS.iter().find(|p| port_taken(**p)) {
        bail!("port {p} is taken: the cluster's components listen on {PORTS:?}");
    }
    let ip = node_ip()?;
    let node = node_name();
    for d in [
        "pki",
        "logs",
        "pids",
        "containerd",
        "runc",
        "cni/net.d",
        "cni/ipam",
        "kubelet",
        "etcd",
    ] {
        fs::create_dir_all(s.join(d))?;
    }
    fs::write(s.join("node-ip"), &ip)?;
    record_host_state(&s)?;
    let result = start_all(&s, &ip, &node);
    if let Err(e) = result {
        eprintln!("cluster: start failed; stopping what did start");
        let _ = down();
        return Err(e);
    }
    eprintln!(
        "cluster: node {node} Ready at {ip} in {}s; KUBECONFIG={}",
        t.elapsed().as_secs(),
        kubeconfig().display()
    );
    Ok(())
}

/// What `down` needs to leave the host as it was: hard-coded paths, iptables tables and
/// sysctls as they are before anything starts.
fn record_host_state(s: &Path) -> Result<()> {
    let created: Vec<&str> = HARD_CODED_PATHS
        .iter()
        .copied()
        .filter(|p| !Path::new(p).exists())
        .collect();
    fs::write(s.join("created-paths"), created.join("\n"))?;
    let saved = output_of(&mut Command::new("iptables-save")).unwrap_or_default();
    let tables: Vec<&str> = ["filter", "nat", "mangle", "raw"]
        .into_iter()
        .filter(|t| !saved.lines().any(|l| l == format!("*{t}")))
        .collect();
    fs::write(s.join("created-iptables-tables"), tables.join("\n"))?;
    let mut sysctls = String::new();
    for (k, _) in SYSCTLS {
        if let Some(v) = sysctl(k) {
            let _ = writeln!(sysctls, "{k}={v}");
        }
    }
    fs::write(s.join("sysctl.orig"), sysctls)?;
    Ok(())
}

fn sysctl_path(key: &str) -> PathBuf {
    Path::new("/proc/sys").join(key.replace('.', "/"))
}

fn sysctl(key: &str) -> Option<String> {
    fs::read_to_string(sysctl_path(key))
        .ok()
        .map(|v| v.trim().to_owned())
}

fn openssl(args: &[&str], s: &Path) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(s)
        .output()
        .context("running openssl")?;
    if !out.status.success() {
        bail!(
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A certificate `pki/<name>.crt` (and key) signed by the cluster's CA.
fn sign(s: &Path, name: &str, subject: &str, san: Option<&str>) -> Result<()> {
    let (key, csr, crt, ext) = (
        format!("pki/{name}.key"),
        format!("pki/{name}.csr"),
        format!("pki/{name}.crt"),
        format!("pki/{name}.ext"),
    );
    openssl(
        &[
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj", subject,
        ],
        s,
    )?;
    fs::write(
        s.join(&ext),
        san.map(|x| format!("subjectAltName={x}\n"))
            .unwrap_or_default(),
    )?;
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "pki/ca.crt",
            "-CAkey",
            "pki/ca.key",
            "-CAcreateserial",
            "-out",
            &crt,
            "-days",
            "7",
            "-extfile",
            &ext,
        ],
        s,
    )
}

fn token() -> Result<String> {
    use std::io::Read as _;
    let mut b = [0u8; 16];
    fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b.iter().fold(String::new(), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    }))
}

/// Certificates, the static token of each component and their kubeconfigs.
fn credentials(s: &Path, ip: &str, node: &str) -> Result<()> {
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "pki/ca.key",
            "-out",
            "pki/ca.crt",
            "-days",
            "7",
            "-subj",
            "/CN=toe-cluster-ca",
        ],
        s,
    )?;
    // The API server is reached at the node's address (components, kubectl), 127.0.0.1, and
    // from pods at the `kubernetes` Service.
    sign(
        s,
        "apiserver",
        "/CN=kube-apiserver",
        Some(&format!(
            "IP:{ip},IP:127.0.0.1,IP:{SVC_APISERVER_IP},DNS:localhost,DNS:kubernetes,\
             DNS:kubernetes.default,DNS:kubernetes.default.svc,\
             DNS:kubernetes.default.svc.cluster.local"
        )),
    )?;
    // The API server's client certificate towards kubelet (exec, logs, attach).
    sign(
        s,
        "apiserver-kubelet-client",
        "/O=system:masters/CN=kube-apiserver-kubelet-client",
        None,
    )?;
    openssl(&["genrsa", "-out", "pki/sa.key", "2048"], s)?;
    openssl(
        &["rsa", "-in", "pki/sa.key", "-pubout", "-out", "pki/sa.pub"],
        s,
    )?;
    // Static bearer tokens (1.20 still has --token-auth-file), one identity per component,
    // with the names the default RBAC bindings and the Node authorizer expect.
    let users = [
        ("admin", "admin", "admin", Some("system:masters")),
        ("kcm", "system:kube-controller-manager", "kcm", None),
        ("scheduler", "system:kube-scheduler", "scheduler", None),
        (
            "kubelet",
            &*format!("system:node:{node}"),
            "kubelet",
            Some("system:nodes"),
        ),
        ("kube-proxy", "system:kube-proxy", "kube-proxy", None),
    ];
    let mut csv = String::new();
    for (file, user, uid, group) in users {
        let t = token()?;
        let _ = match group {
            Some(g) => writeln!(csv, "{t},{user},{uid},\"{g}\""),
            None => writeln!(csv, "{t},{user},{uid}"),
        };
        let config = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: toe\n  cluster: {{server: \
             \"https://{ip}:{API_PORT}\", certificate-authority: \"{ca}\"}}\nusers:\n- name: u\n  \
             user: {{token: \"{t}\"}}\ncontexts:\n- name: c\n  context: {{cluster: toe, user: u}}\n\
             current-context: c\n",
            ca = s.join("pki/ca.crt").display()
        );
        write_private(&s.join(format!("{file}.kubeconfig")), &config)?;
    }
    write_private(&s.join("pki/tokens.csv"), &csv)
}

/// Writes a file only root may read (bearer tokens).
fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

fn start_all(s: &Path, ip: &str, node: &str) -> Result<()> {
    credentials(s, ip, node)?;
    // Before anything that might try to leave: kubelet asks the metadata address at start.
    isolate(s)?;
    start_containerd(s)?;
    start_control_plane(s, ip)?;
    start_node(s, ip, node)?;
    wait_for(Duration::from_mins(2), &format!("node {node}"), ready)
}

fn start_containerd(s: &Path) -> Result<()> {
    let sd = s.display();
    // containerd: everything under the state directory, nothing pulled, the pods' network a
    // bridge with host-local addresses and no masquerade.
    fs::write(
        s.join("containerd/config.toml"),
        format!(
            r#"version = 2
root = "{sd}/containerd/root"
state = "{sd}/containerd/state"
[grpc]
  address = "{sock}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{sd}/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  netns_mounts_under_state_dir = true
  enable_selinux = false
  # Root here lacks CAP_SYS_RESOURCE, so nobody may lower an oom_score_adj below 0: the pause
  # container asks for -998 and runc dies ("can't get final child's PID from pipe"). This
  # clamps every request to containerd's own.
  restrict_oom_score_adj = true
  tolerate_missing_hugetlb_controller = true
  disable_hugetlb_controller = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "runc"
        Root = "{sd}/runc"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{sd}/cni/net.d"
"#,
            sock = containerd_socket().display()
        ),
    )?;
    fs::write(
        s.join("cni/net.d/10-toe.conflist"),
        format!(
            r#"{{"cniVersion": "0.4.0", "name": "toe-cluster", "plugins": [{{
  "type": "bridge", "bridge": "{BRIDGE}", "isGateway": true, "ipMasq": false, "hairpinMode": true,
  "ipam": {{"type": "host-local", "dataDir": "{sd}/cni/ipam",
            "ranges": [[{{"subnet": "{POD_CIDR}"}}]], "routes": [{{"dst": "0.0.0.0/0"}}]}}
}}]}}
"#
        ),
    )?;
    start(
        "containerd",
        Command::new("containerd")
            .arg("--config")
            .arg(s.join("containerd/config.toml")),
    )?;
    wait_for(Duration::from_secs(30), "containerd", || {
        quietly(ctr().arg("version"))
    })?;
    import(&ARCHIVES.map(|a| images_dir().join(a)))
}

fn start_control_plane(s: &Path, ip: &str) -> Result<()> {
    let sd = s.display();
    let etcd_url = format!("http://127.0.0.1:{ETCD_PORT}");
    let peer_url = format!("http://127.0.0.1:{ETCD_PEER_PORT}");
    start(
        "etcd",
        Command::new("etcd")
            .args(["--name", "toe-cluster", "--data-dir"])
            .arg(s.join("etcd"))
            .args([
                "--listen-client-urls",
                &etcd_url,
                "--advertise-client-urls",
                &etcd_url,
            ])
            .args([
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
            ])
            .arg(format!("--initial-cluster=toe-cluster={peer_url}"))
            // A throw-away cluster: no fsync.
            .arg("--unsafe-no-fsync"),
    )?;
    let bin = apiserver::bin_dir();
    start(
        "kube-apiserver",
        Command::new(bin.join("kube-apiserver")).args([
            format!("--etcd-servers={etcd_url}"),
            format!("--bind-address={ip}"),
            format!("--advertise-address={ip}"),
            format!("--secure-port={API_PORT}"),
            "--insecure-port=0".into(),
            "--tls-cert-file=pki/apiserver.crt".into(),
            "--tls-private-key-file=pki/apiserver.key".into(),
            "--client-ca-file=pki/ca.crt".into(),
            "--token-auth-file=pki/tokens.csv".into(),
            "--service-account-key-file=pki/sa.pub".into(),
            "--service-account-signing-key-file=pki/sa.key".into(),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            "--authorization-mode=Node,RBAC".into(),
            "--enable-admission-plugins=NodeRestriction".into(),
            format!("--service-cluster-ip-range={SVC_CIDR}"),
            "--kubelet-client-certificate=pki/apiserver-kubelet-client.crt".into(),
            "--kubelet-client-key=pki/apiserver-kubelet-client.key".into(),
            "--kubelet-preferred-address-types=InternalIP".into(),
            "--allow-privileged=true".into(),
            format!("--cert-dir={sd}/pki/apiserver-generated"),
            format!("--feature-gates={FEATURES}"),
        ]),
    )?;
    wait_for(Duration::from_mins(1), "kube-apiserver", || {
        quietly(kubectl_cmd().args(["get", "--raw", "/readyz"]))
    })?;
    // --use-service-account-credentials: each controller acts as its own service account with
    // its default role (the bare controller-manager user may not, e.g., lift the node's
    // not-ready taint, and nothing would schedule).
    start(
        "kube-controller-manager",
        Command::new(bin.join("kube-controller-manager")).args([
            "--kubeconfig=kcm.kubeconfig",
            "--authentication-kubeconfig=kcm.kubeconfig",
            "--authorization-kubeconfig=kcm.kubeconfig",
            "--service-account-private-key-file=pki/sa.key",
            "--root-ca-file=pki/ca.crt",
            "--use-service-account-credentials=true",
            "--leader-elect=false",
            "--port=0",
            "--bind-address=127.0.0.1",
            "--secure-port=10257",
            &format!("--cert-dir={sd}/pki/kcm"),
            &format!("--feature-gates={FEATURES}"),
        ]),
    )?;
    start(
        "kube-scheduler",
        Command::new(bin.join("kube-scheduler")).args([
            "--kubeconfig=scheduler.kubeconfig",
            "--authentication-kubeconfig=scheduler.kubeconfig",
            "--authorization-kubeconfig=scheduler.kubeconfig",
            "--leader-elect=false",
            "--port=0",
            "--bind-address=127.0.0.1",
            "--secure-port=10259",
            &format!("--cert-dir={sd}/pki/scheduler"),
            &format!("--feature-gates={FEATURES}"),
        ]),
    )
}

fn start_node(s: &Path, ip: &str, node: &str) -> Result<()> {
    let sd = s.display();
    let bin = apiserver::bin_dir();
    fs::write(
        s.join("kubelet/config.yaml"),
        format!(
            r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: "{ip}"
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
cgroupDriver: cgroupfs
cgroupsPerQOS: true
failSwapOn: false
featureGates: {{EphemeralContainers: true}}
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: false}}
  x509: {{clientCAFile: "{sd}/pki/ca.crt"}}
authorization: {{mode: AlwaysAllow}}
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
# A shared CI disk is often fuller than kubelet's defaults allow: evict only when it is truly
# full, and never garbage-collect the imported images (nothing could pull them back).
evictionHard: {{memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
runtimeRequestTimeout: 2m
"#
        ),
    )?;
    // AWS_EC2_METADATA_DISABLED: kubelet 1.20's in-tree ECR credential provider otherwise asks
    // the cloud metadata address for credentials at start, which is traffic off this machine.
    start(
        "kubelet",
        Command::new(bin.join("kubelet"))
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .args([
                "--config=kubelet/config.yaml".to_owned(),
                "--kubeconfig=kubelet.kubeconfig".into(),
                format!("--root-dir={sd}/kubelet/root"),
                format!("--cert-dir={sd}/kubelet/pki"),
                format!("--volume-plugin-dir={sd}/kubelet/volume-plugins"),
                "--container-runtime=remote".into(),
                format!(
                    "--container-runtime-endpoint=unix://{}",
                    containerd_socket().display()
                ),
                format!("--pod-infra-container-image={PAUSE_IMAGE}"),
                format!("--node-ip={ip}"),
                format!("--hostname-override={node}"),
                "--v=1".into(),
            ]),
    )?;
    fs::write(
        s.join("kube-proxy.yaml"),
        format!(
            r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clientConnection: {{kubeconfig: "{sd}/kube-proxy.kubeconfig"}}
hostnameOverride: "{node}"
clusterCIDR: "{POD_CIDR}"
bindAddress: "{ip}"
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
# 0: the host's conntrack table size and timeouts are left alone.
conntrack: {{maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}}
"#
        ),
    )?;
    start(
        "kube-proxy",
        Command::new(bin.join("kube-proxy")).arg("--config=kube-proxy.yaml"),
    )
}

fn isolate(s: &Path) -> Result<()> {
    // ClusterIPs are virtual: until kube-proxy has redirected one (or for one without
    // endpoints) a packet to it would follow the default route off this machine. A route to a
    // link that drops everything keeps it here. This kernel has no dummy links; an ifb link
    // drops whatever tc did not redirect to it, which is everything. (A blackhole route fails
    // connect() before kube-proxy's DNAT is reached.)
    run(Command::new("ip").args(["link", "add", SVC_LINK, "type", "ifb"]))?;
    run(Command::new("ip").args(["link", "set", SVC_LINK, "up"]))?;
    run(Command::new("ip").args(["route", "add", SVC_CIDR, "dev", SVC_LINK]))?;
    // The bridge plugin turns forwarding on; pods still must not reach past the node. Both
    // rules count what they drop, and the cluster suite requires both counts to stay zero: a
    // drop means something tried to leave.
    run(Command::new("iptables").args(no_egress_rule("-I")))?;
    run(Command::new("iptables").args(no_metadata_rule("-I")))?;
    // The suite reads which rules to check (chain, comment) from here.
    fs::write(
        s.join("guards"),
        format!("FORWARD {NO_EGRESS}\nOUTPUT {NO_METADATA}\n"),
    )?;
    Ok(())
}

fn no_egress_rule(op: &str) -> Vec<&str> {
    vec![
        "-w",
        op,
        "FORWARD",
        "-i",
        BRIDGE,
        "!",
        "-o",
        BRIDGE,
        "-m",
        "comment",
        "--comment",
        NO_EGRESS,
        "-j",
        "DROP",
    ]
}

fn no_metadata_rule(op: &str) -> Vec<&str> {
    vec![
        "-w",
        op,
        "OUTPUT",
        "-d",
        METADATA_IP,
        "-m",
        "comment",
        "--comment",
        NO_METADATA,
        "-j",
        "DROP",
    ]
}

/// Sends SIGTERM, waits up to 15 s, then SIGKILL; only the recorded pid.
fn stop(name: &str) {
    let Some(pid) = pid_of(name) else { return };
    // SAFETY: kill has no memory-safety preconditions.
    if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
        return;
    }
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(15) {
        // SAFETY: as above.
        if unsafe { libc::kill(pid, 0) } != 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(200));
}

fn lines_of(cmd: &mut Command) -> Vec<String> {
    output_of(cmd)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .filter(|l| !l.is_empty())
        .collect()
}

/// Stops everything `up` started and removes what it created; every step runs even when an
/// earlier one failed. Fine to run when nothing is up.
pub fn down() -> Result<()> {
    let s = state_dir();
    if !s.exists() {
        eprintln!(
            "cluster: nothing to take down ({} does not exist)",
            s.display()
        );
        return Ok(());
    }
    if !is_root() {
        bail!("taking the cluster down needs root: `sudo -E cargo xtask cluster down`");
    }
    // No new pods: the scheduler and the controllers go first; then kubelet tears its pods
    // down itself (network, volumes, sandboxes).
    stop("kube-scheduler");
    stop("kube-controller-manager");
    if alive("kubelet") && alive("kube-apiserver") {
        let _ = quietly(kubectl_cmd().args([
            "delete",
            "pods",
            "--all",
            "--all-namespaces",
            "--grace-period=0",
            "--force",
            "--wait=false",
        ]));
        let _ = wait_for(Duration::from_secs(30), "pods gone", || {
            lines_of(ctr().args(["tasks", "ls", "-q"])).is_empty()
        });
    }
    stop("kubelet");
    stop("kube-proxy");
    if alive("containerd") {
        for t in lines_of(ctr().args(["tasks", "ls", "-q"])) {
            let _ = quietly(ctr().args(["tasks", "kill", "-s", "SIGKILL", &t]));
        }
        std::thread::sleep(Duration::from_millis(500));
        for t in lines_of(ctr().args(["tasks", "ls", "-q"])) {
            let _ = quietly(ctr().args(["tasks", "delete", "-f", &t]));
        }
        for c in lines_of(ctr().args(["containers", "ls", "-q"])) {
            let _ = quietly(ctr().args(["containers", "delete", &c]));
        }
    }
    stop("containerd");
    stop("kube-apiserver");
    stop("etcd");
    kill_shims();
    unmount_under(&s);
    let _ = quietly(Command::new("ip").args(["link", "del", BRIDGE]));
    let _ = quietly(Command::new("ip").args(["link", "del", SVC_LINK]));
    remove_iptables(&s);
    remove_kubepods_cgroups();
    restore_sysctls(&s);
    remove_created_paths(&s);
    fs::remove_dir_all(&s).with_context(|| format!("removing {}", s.display()))?;
    eprintln!("cluster: down");
    Ok(())
}

/// containerd's shims outlive it by design; this cluster's name its socket on their command
/// line (never matched by program name alone: other containerds may run).
fn kill_shims() {
    let sock = containerd_socket();
    let needle = format!("-address\0{}", sock.display());
    let Ok(dir) = fs::read_dir("/proc") else {
        return;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        if let Ok(cmd) = fs::read(e.path().join("cmdline"))
            && String::from_utf8_lossy(&cmd).contains("containerd-shim")
            && String::from_utf8_lossy(&cmd).contains(&needle)
        {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    std::thread::sleep(Duration::from_millis(300));
}

/// Unmounts everything mounted under `dir` (rootfs overlays, shm, secrets, netns, kubelet's
/// bind of its root), deepest first; nothing of the cluster is mounted anywhere else.
fn unmount_under(dir: &Path) {
    for _ in 0..3 {
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut under: Vec<String> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(|m| m.replace("\\040", " "))
            .filter(|m| Path::new(m).starts_with(dir))
            .collect();
        if under.is_empty() {
            return;
        }
        under.sort_unstable_by(|a, b| b.cmp(a));
        for m in under {
            if !quietly(Command::new("umount").arg(&m)) {
                let _ = quietly(Command::new("umount").arg("-l").arg(&m));
            }
        }
    }
}

/// The egress and metadata rules, then every rule that jumps to a `KUBE-*` chain, then those chains
/// (kubelet's and kube-proxy's). `CNI-*` chains are left alone: this cluster's bridge makes
/// none, podman's networks do. Tables iptables-nft created for the cluster go if empty.
fn remove_iptables(s: &Path) {
    let _ = quietly(Command::new("iptables").args(no_egress_rule("-D")));
    let _ = quietly(Command::new("iptables").args(no_metadata_rule("-D")));
    for ipt in ["iptables", "ip6tables"] {
        for table in ["filter", "nat", "mangle", "raw"] {
            let saved = lines_of(Command::new(format!("{ipt}-save")).args(["-t", table]));
            for rule in &saved {
                if let Some(r) = rule.strip_prefix("-A ")
                    && !r.starts_with("KUBE-")
                    && r.contains("-j KUBE-")
                {
                    let args = split_rule(r);
                    let _ = quietly(
                        Command::new(ipt)
                            .args(["-w", "-t", table, "-D"])
                            .args(&args),
                    );
                }
            }
            let chains: Vec<&str> = saved
                .iter()
                .filter_map(|l| l.strip_prefix(':'))
                .filter_map(|l| l.split(' ').next())
                .filter(|c| c.starts_with("KUBE-"))
                .collect();
            for op in ["-F", "-X"] {
                for c in &chains {
                    let _ = quietly(Command::new(ipt).args(["-w", "-t", table, op, c]));
                }
            }
        }
    }
    let created = fs::read_to_string(s.join("created-iptables-tables")).unwrap_or_default();
    for table in created.lines().filter(|t| !t.is_empty()) {
        let rules = lines_of(Command::new("iptables-save").args(["-t", table]));
        if !rules.iter().any(|r| r.starts_with("-A ")) {
            let _ = quietly(Command::new("nft").args(["delete", "table", "ip", table]));
        }
    }
}

/// Splits an `iptables-save` rule into arguments, keeping quoted comments whole.
fn split_rule(rule: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for ch in rule.chars() {
        match ch {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !cur.is_empty() {
                    args.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        args.push(cur);
    }
    args
}

/// The `kubepods` cgroups kubelet and runc made, in every hierarchy, deepest first.
fn remove_kubepods_cgroups() {
    let mut roots = vec![PathBuf::from("/sys/fs/cgroup/kubepods")];
    if let Ok(dir) = fs::read_dir("/sys/fs/cgroup") {
        roots.extend(dir.flatten().map(|e| e.path().join("kubepods")));
    }
    for root in roots.into_iter().filter(|r| r.is_dir()) {
        let mut dirs = Vec::new();
        let mut stack = vec![root];
        while let Some(d) = stack.pop() {
            if let Ok(rd) = fs::read_dir(&d) {
                stack.extend(
                    rd.flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path()),
                );
            }
            dirs.push(d);
        }
        for d in dirs.iter().rev() {
            let _ = fs::remove_dir(d);
        }
    }
}

/// Puts back each sysctl that still has the value a component set. ip_forward stays on while
/// another bridge (podman's, docker's) may need it.
fn restore_sysctls(s: &Path) {
    let orig = fs::read_to_string(s.join("sysctl.orig")).unwrap_or_default();
    let other_bridges = lines_of(Command::new("ip").args(["-o", "link", "show", "type", "bridge"]))
        .iter()
        .any(|l| !l.contains(&format!(": {BRIDGE}:")));
    for (key, was) in orig.lines().filter_map(|l| l.split_once('=')) {
        let Some(now) = sysctl(key) else { continue };
        let ours = SYSCTLS.iter().any(|(k, v)| *k == key && *v == now);
        if now == was || !ours {
            continue;
        }
        if key == "net.ipv4.ip_forward" && other_bridges {
            eprintln!("cluster: ip_forward left on: another bridge exists");
            continue;
        }
        let _ = fs::write(sysctl_path(key), was);
    }
}

/// The hard-coded host paths, each only if the cluster created it. Shared directories are
/// emptied of what is the cluster's only.
fn remove_created_paths(s: &Path) {
    let created = fs::read_to_string(s.join("created-paths")).unwrap_or_default();
    for p in created.lines().filter(|p| !p.is_empty()) {
        match p {
            "/var/lib/cni" => {
                if let Ok(dir) = fs::read_dir("/var/lib/cni/results") {
                    for e in dir.flatten() {
                        if e.file_name().to_string_lossy().starts_with("toe-cluster-") {
                            let _ = fs::remove_file(e.path());
                        }
                    }
                }
                let _ = fs::remove_dir("/var/lib/cni/results");
                let _ = fs::remove_dir("/var/lib/cni");
            }
            "/run/containerd" => {
                // Another containerd would keep its state here too.
                let other = fs::read_dir("/proc").is_ok_and(|d| {
                    d.flatten().any(|e| {
                        fs::read_link(e.path().join("exe"))
                            .is_ok_and(|x| x == Path::new("/usr/bin/containerd"))
                    })
                });
                if other {
                    remove_empty_dirs(Path::new(p));
                } else {
                    let _ = fs::remove_dir_all(p);
                }
            }
            _ => {
                let _ = fs::remove_dir_all(p);
            }
        }
    }
}

fn remove_empty_dirs(dir: &Path) {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_empty_dirs(&e.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

/// Starts the cluster, imports the release images of `dist` into it, runs `work`, and takes
/// the cluster down after, whatever the result.
pub fn with_release(dist: &Path, work: impl FnOnce() -> Result<()>) -> Result<()> {
    up()?;
    let result = (|| {
        let v = crate::dist::version();
        import(&[
            dist.join(format!("toe-operator-{v}.oci.tar")),
            dist.join(format!("toe-agent-{v}.oci.tar")),
        ])?;
        work()
    })();
    let down = down();
    result.and(down)
}

/// Runs the cluster suite (`tests/cluster.rs`, ignored in the ordinary run) on a cluster
/// started for it, with the release images and chart from `dist`; `filter` as cargo test's.
pub fn test(dist: &Path, helm: &Path, filter: &[String]) -> Result<()> {
    with_release(dist, || {
        run(Command::new("cargo")
            .current_dir(crate::root())
            .args([
                "test",
                "--release",
                "-p",
                "toe-tests",
                "--test",
                "cluster",
                "--",
                "--ignored",
                // One node, one chart: the tests share both, and one of them deletes the
                // agent's pod, so they run one at a time.
                "--test-threads=1",
            ])
            .args(filter)
            .env("TOE_CLUSTER_KUBECONFIG", kubeconfig())
            .env("TOE_KUBECTL", kubectl())
            .env("TOE_HELM", helm)
            .env("TOE_REQUIRE_ROOT_TESTS", "1"))
        .context("the cluster suite failed")
    })
}

/// Prints each component's state and the node's; fails unless all are up.
pub fn status() -> Result<()> {
    let s = state_dir();
    if !s.exists() {
        bail!("the cluster is down ({} does not exist)", s.display());
    }
    let mut all = true;
    for c in COMPONENTS {
        let up = alive(c);
        all &= up;
        println!(
            "{c:<24} {}",
            match (up, pid_of(c)) {
                (true, Some(pid)) => format!("running (pid {pid})"),
                _ => format!(
                    "not running (log: {})",
                    s.join("logs").join(format!("{c}.log")).display()
                ),
            }
        );
    }
    let node_ready = all && ready();
    println!(
        "{:<24} {}",
        format!("node {}", node_name()),
        if node_ready { "Ready" } else { "not Ready" }
    );
    println!("KUBECONFIG={}", kubeconfig().display());
    if !node_ready {
        bail!("the cluster is not fully up");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iptables_rules_split_like_a_shell() {
        assert_eq!(
            split_rule(
                r#"FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD"#
            ),
            [
                "FORWARD",
                "-m",
                "comment",
                "--comment",
                "kubernetes forwarding rules",
                "-j",
                "KUBE-FORWARD"
            ]
        );
    }
}
