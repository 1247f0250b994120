//! PowerToolProcessing end to end: the operator's processing controller against a real
//! kube-apiserver reads runs (recorded captures placed in a file:// store in the agents' layout),
//! writes the report and status, and the report server serves it; bad specs get a clear status
//! error; and the HTML report opens in real headless Chromium with its flamegraph searchable.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, SystemTime},
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use toe_common::api::{PowerTool, PowerToolProcessing, PowerToolProcessingStatus};
use toe_tests::{
    TestProcess,
    apiserver::{ApiServer, OPERATOR_TOKEN},
    bin,
    cluster::{Operator, create_namespace, free_port, install_crds, operator_identity, repo},
    s3::S3Server,
};
use url::Url;

fn now_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// Copies recorded capture `fixture` to `<store>/<dir>/`, as if its run started `ago` before now.
fn place(store: &Path, fixture: &str, dir: &str, ago: Duration) {
    let from = repo().join("toe-report/fixtures").join(fixture);
    let to = store.join(dir);
    std::fs::create_dir_all(&to).unwrap();
    for entry in std::fs::read_dir(&from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
    let path = to.join("summary.json");
    let mut summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    summary["started_unix_ms"] = (now_ms() - u64::try_from(ago.as_millis()).unwrap()).into();
    std::fs::write(path, serde_json::to_vec(&summary).unwrap()).unwrap();
}

async fn apply<
    T: serde::Serialize
        + kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
>(
    api: &Api<T>,
    name: &str,
    object: &serde_json::Value,
) -> Result<T, kube::Error> {
    api.patch(name, &PatchParams::apply("toe-test"), &Patch::Apply(object))
        .await
}

fn powertool(name: &str, labels: &serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "toe.run/v1alpha1", "kind": "PowerTool",
        "metadata": {"name": name, "labels": labels},
        "spec": {"tool": {"name": "cpu-profile", "duration": "10s"}}
    })
}

/// PowerTools of `shop`, each labelled `team`, as the recorded runs name them.
async fn label_powertools(admin: &kube::Client, teams: &[(&str, &str)]) {
    let tools: Api<PowerTool> = Api::namespaced(admin.clone(), "shop");
    for (name, team) in teams {
        apply(
            &tools,
            name,
            &powertool(name, &serde_json::json!({"team": team})),
        )
        .await
        .unwrap();
    }
}

fn processing(name: &str, spec: &serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "toe.run/v1alpha1", "kind": "PowerToolProcessing",
        "metadata": {"name": name}, "spec": spec
    })
}

/// Polls the processing's status until `done` holds (a minute at most).
async fn wait_status(
    api: &Api<PowerToolProcessing>,
    name: &str,
    what: &str,
    done: impl Fn(&PowerToolProcessingStatus) -> bool,
) -> PowerToolProcessingStatus {
    for _ in 0..600 {
        if let Some(s) = api.get(name).await.unwrap().status
            && done(&s)
        {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "{name}: {what} never happened; status {:?}",
        api.get(name).await.unwrap().status
    );
}

fn condition<'a>(s: &'a PowerToolProcessingStatus, type_: &str) -> Option<&'a Condition> {
    s.conditions.iter().find(|c| c.type_ == type_)
}

/// Recorded captures in the agents' layout: two runs of checkout-cpu in the window and one
/// before it, one run of checkout-stop, and one of a PowerTool the processing does not select.
fn record_runs(store: &Path) {
    let minute = Duration::from_mins(1);
    place(
        store,
        "cpu",
        "shop/checkout-cpu/g1-aaaaaaaa/web-0/app",
        2 * minute,
    );
    place(
        store,
        "contend",
        "shop/checkout-cpu/g1-aaaaaaaa/web-1/app",
        2 * minute,
    );
    place(
        store,
        "contend",
        "shop/checkout-cpu/g2-dddddddd/web-0/app",
        30 * minute,
    );
    // Outside the window.
    place(
        store,
        "cpu",
        "shop/checkout-cpu/g1-00000000/web-0/app",
        72 * 60 * minute,
    );
    place(
        store,
        "term-hung",
        "shop/checkout-stop/g2-bbbbbbbb/web-0/app",
        minute,
    );
    // Not selected.
    place(store, "oom", "shop/other-cpu/g1-cccccccc/web-0/app", minute);
}

/// The report server lists the processed report and serves it byte for byte.
async fn serves_the_report(server: &ApiServer, admin: &kube::Client, artifacts: &Url, html: &str) {
    // The server authenticates readers as the operator does in a cluster: as the operator's own
    // identity, with its ClusterRole.
    let operator = server.client_as(OPERATOR_TOKEN).await;
    let app = toe_operator::reports::router(
        toe_operator::reports::Reports::new(
            artifacts,
            toe_operator::reports::Access::Kubernetes(operator),
        )
        .unwrap(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let http = reqwest::Client::new();
    let get = |path: &str, token: Option<&str>| {
        let mut req = http.get(format!("http://{addr}{path}"));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send()
    };
    let report = "/reports/shop/weekly/latest/report.html";
    // Nobody unauthenticated reads anything; alice, with no rights in shop, sees nothing of it.
    assert_eq!(get("/reports/", None).await.unwrap().status(), 401);
    assert_eq!(get(report, None).await.unwrap().status(), 401);
    assert_eq!(
        get(report, Some("not-a-token")).await.unwrap().status(),
        401
    );
    let alice = Some(toe_tests::apiserver::ALICE_TOKEN);
    let index = get("/reports/", alice).await.unwrap().text().await.unwrap();
    assert!(!index.contains("<td>shop</td>"), "{index}");
    assert_eq!(get(report, alice).await.unwrap().status(), 403);
    // Once RBAC lets her read PowerToolProcessings in shop, she reads shop's reports.
    let role: k8s_openapi::api::rbac::v1::Role = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "report-reader"},
        "rules": [{"apiGroups": ["toe.run"], "resources": ["powertoolprocessings"],
                   "verbs": ["get"]}],
    }))
    .unwrap();
    let binding: k8s_openapi::api::rbac::v1::RoleBinding =
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "report-reader-alice"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                        "name": "report-reader"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User",
                          "name": "alice"}],
        }))
        .unwrap();
    let pp = kube::api::PostParams::default();
    Api::<k8s_openapi::api::rbac::v1::Role>::namespaced(admin.clone(), "shop")
        .create(&pp, &role)
        .await
        .unwrap();
    Api::<k8s_openapi::api::rbac::v1::RoleBinding>::namespaced(admin.clone(), "shop")
        .create(&pp, &binding)
        .await
        .unwrap();
    let index = get("/reports/", alice).await.unwrap();
    assert_eq!(index.status(), 200);
    let index = index.text().await.unwrap();
    assert!(index.contains("<td>shop</td><td>weekly</td>"), "{index}");
    let served = get(report, alice).await.unwrap();
    assert_eq!(served.status(), 200);
    let csp = served.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(csp.contains("script-src 'sha256-"), "{csp}");
    assert!(!csp.contains("script-src 'unsafe-inline'"), "{csp}");
    assert!(
        served.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html"),
        "{:?}",
        served.headers()
    );
    assert_eq!(served.text().await.unwrap(), html);
    let missing = get("/reports/shop/weekly/latest/nothing.html", alice)
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
}

#[tokio::test]
async fn processing_reads_the_window_of_selected_runs_and_serves_the_report() {
    let Some(server) = ApiServer::start("processing_reads_the_window_of_selected_runs") else {
        return;
    };
    let admin = server.client().await;
    install_crds(&admin).await;
    create_namespace(&admin, "shop", &serde_json::json!({})).await;
    let store = tempfile::tempdir().unwrap();
    record_runs(store.path());
    label_powertools(
        &admin,
        &[
            ("checkout-cpu", "checkout"),
            ("checkout-stop", "none"),
            ("other-cpu", "other"),
        ],
    )
    .await;
    let artifacts = Url::from_directory_path(store.path()).unwrap();
    let operator = Operator::start_with(&server, &admin, Some(artifacts.clone())).await;
    let api: Api<PowerToolProcessing> = Api::namespaced(admin.clone(), "shop");
    apply(
        &api,
        "weekly",
        &processing(
            "weekly",
            &serde_json::json!({
                "selector": {"matchLabels": {"team": "checkout"}},
                "names": ["checkout-stop"],
                "schedule": "1h", "window": "24h", "retention": "48h",
                "outputs": ["mergedFlamegraph", "differentialFlamegraph", "mergedPprof", "htmlReport"]
            }),
        ),
    )
    .await
    .unwrap();
    let status = wait_status(&api, "weekly", "a report", |s| s.report.is_some()).await;
    let ready = condition(&status, "Ready").unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("True", "Processed"),
        "{ready:?}"
    );
    assert_eq!(
        (status.captures, status.runs),
        (Some(4), Some(3)),
        "{status:?}"
    );
    let findings = status.findings.join("\n");
    for rule in [
        "rule dominant-function",
        "rule lock-contention",
        "rule sigterm-unhandled",
    ] {
        assert!(findings.contains(rule), "{rule} missing from {findings}");
    }
    assert!(
        !findings.contains("oom-kill"),
        "an unselected PowerTool was read: {findings}"
    );
    let (last, next) = (status.last_run.unwrap().0, status.next_run.unwrap().0);
    assert_eq!(next.duration_since(last).as_secs(), 3600);
    for file in ["cpu.svg", "cpu.diff.svg", "cpu.pb.gz", "findings.json"] {
        assert!(
            status
                .outputs
                .iter()
                .any(|u| u.ends_with(&format!("/{file}"))),
            "{file} not in {:?}",
            status.outputs
        );
    }
    let report = Url::parse(status.report.as_ref().unwrap())
        .unwrap()
        .to_file_path()
        .unwrap();
    assert!(
        report.starts_with(store.path().join("_reports/shop/weekly")),
        "{}",
        report.display()
    );
    let html = std::fs::read_to_string(&report).unwrap();
    assert!(
        html.contains("checkout-stop/g2-bbbbbbbb"),
        "the run is named in the report"
    );

    serves_the_report(&server, &admin, &artifacts, &html).await;
    operator.stop().await;
}

/// The operator binary itself, its store a real S3 server (credentials from its environment, as
/// the chart's `envFrom` gives them): it reads the recorded captures from the bucket, writes the
/// report there, and its report server serves it from there.
#[tokio::test]
async fn the_operator_processes_captures_in_s3_and_serves_the_report_from_it() {
    let test = "the_operator_processes_captures_in_s3_and_serves_the_report_from_it";
    let Some(server) = ApiServer::start(test) else {
        return;
    };
    let Some(s3) = S3Server::start(test) else {
        return;
    };
    let admin = server.client().await;
    install_crds(&admin).await;
    create_namespace(&admin, "shop", &serde_json::json!({})).await;
    record_runs(&s3.path("store"));
    // A report from three days ago, past the 24 h retention: processing deletes it from the bucket.
    let expired = s3.path(&format!(
        "store/_reports/shop/weekly/{}/report.html",
        toe_artifacts::store::stamp(SystemTime::now() - Duration::from_hours(72))
    ));
    std::fs::create_dir_all(expired.parent().unwrap()).unwrap();
    std::fs::write(&expired, "an old report").unwrap();
    label_powertools(
        &admin,
        &[("checkout-cpu", "checkout"), ("checkout-stop", "none")],
    )
    .await;
    // The bindings the chart gives the operator's ServiceAccount.
    let _ = operator_identity(&server, &admin).await;
    let reports = free_port();
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut operator = TestProcess(
        Command::new(bin("toe-operator"))
            .args(["--artifacts", s3.url("store/").as_str()])
            .arg(format!("--metrics-addr=127.0.0.1:{}", free_port()))
            .arg(format!("--report-addr=127.0.0.1:{reports}"))
            .args(["--report-auth", "open", "--lease-namespace", "toe-system"])
            .env("KUBECONFIG", server.kubeconfig_as(OPERATOR_TOKEN))
            .envs(s3.env())
            .env("TOE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .expect("toe-operator"),
    );
    let api: Api<PowerToolProcessing> = Api::namespaced(admin.clone(), "shop");
    apply(
        &api,
        "weekly",
        &processing(
            "weekly",
            &serde_json::json!({
                "selector": {"matchLabels": {"team": "checkout"}},
                "names": ["checkout-stop"],
                "schedule": "1h", "window": "24h", "retention": "24h",
                "outputs": ["mergedPprof", "htmlReport"]
            }),
        ),
    )
    .await
    .unwrap();
    let status = wait_status(&api, "weekly", "a report", |s| s.report.is_some()).await;
    let ready = condition(&status, "Ready").unwrap();
    assert_eq!(
        (
            ready.status.as_str(),
            ready.reason.as_str(),
            status.captures
        ),
        ("True", "Processed", Some(4)),
        "{ready:?}; the operator's log: {}",
        std::fs::read_to_string(log.path()).unwrap_or_default()
    );
    let report = status.report.unwrap();
    let key = report
        .strip_prefix(s3.url("").as_str())
        .unwrap_or_else(|| panic!("the report {report} is not in the bucket"));
    assert!(key.starts_with("store/_reports/shop/weekly/"), "{key}");
    let stored = String::from_utf8(s3.read(Path::new(key))).unwrap();
    assert!(stored.contains("checkout-stop/g2-bbbbbbbb"));
    let served = reqwest::get(format!(
        "http://127.0.0.1:{reports}/reports/shop/weekly/latest/report.html"
    ))
    .await
    .unwrap();
    assert_eq!(served.status(), 200);
    assert_eq!(served.text().await.unwrap(), stored);
    assert!(
        !expired.exists(),
        "the expired report is still in the bucket"
    );
    // Only this processing's report (and its record) remains.
    let report_dir = Path::new(key).parent().unwrap();
    let kept = |o: &PathBuf| o.starts_with(report_dir) || o.ends_with("processing.json");
    assert!(s3.objects("store/_reports/shop/weekly").iter().all(kept));
    assert_eq!(
        s3.metadata_knocks(),
        0,
        "something asked the metadata address"
    );
    let pid = nix::unistd::Pid::from_raw(i32::try_from(operator.pid()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let _ = operator.0.wait();
}

/// An API server with the CRDs and namespace `shop`, the operator's controllers over a fresh
/// store, and the processings of `shop`.
struct Processing {
    server: ApiServer,
    admin: kube::Client,
    store: tempfile::TempDir,
    operator: Operator,
    api: Api<PowerToolProcessing>,
}

impl Processing {
    async fn start(test: &str) -> Option<Self> {
        let server = ApiServer::start(test)?;
        let admin = server.client().await;
        install_crds(&admin).await;
        create_namespace(&admin, "shop", &serde_json::json!({})).await;
        let store = tempfile::tempdir().unwrap();
        let artifacts = Url::from_directory_path(store.path()).unwrap();
        let operator = Operator::start_with(&server, &admin, Some(artifacts)).await;
        let api = Api::namespaced(admin.clone(), "shop");
        Some(Self {
            server,
            admin,
            store,
            operator,
            api,
        })
    }
}

#[tokio::test]
async fn bad_processing_specs_get_a_clear_status_error() {
    let Some(Processing {
        server: _server,
        admin: _,
        store: _store,
        operator,
        api,
    }) = Processing::start("bad_processing_specs_get_a_clear_status_error").await
    else {
        return;
    };

    apply(
        &api,
        "bad-schedule",
        &processing(
            "bad-schedule",
            &serde_json::json!({"names": ["x"], "schedule": "every tuesday", "outputs": ["htmlReport"]}),
        ),
    )
    .await
    .unwrap();
    let s = wait_status(&api, "bad-schedule", "a Ready condition", |s| {
        condition(s, "Ready").is_some()
    })
    .await;
    let ready = condition(&s, "Ready").unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "InvalidSpec")
    );
    assert!(
        ready
            .message
            .contains("\"every tuesday\" is not a cron expression"),
        "{ready:?}"
    );
    assert!(s.last_run.is_none() && s.next_run.is_none(), "{s:?}");

    // An unknown output kind never gets past the CRD's schema.
    let err = apply(
        &api,
        "bad-output",
        &processing(
            "bad-output",
            &serde_json::json!({"names": ["x"], "schedule": "1h", "outputs": ["pdfReport"]}),
        ),
    )
    .await
    .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("pdfReport") && text.contains("htmlReport"),
        "{text}"
    );

    // A missing Secret: the model step is skipped with the reason; the rules still report.
    apply(
        &api,
        "no-secret",
        &processing(
            "no-secret",
            &serde_json::json!({
                "names": ["gone"], "schedule": "0 * * * *", "outputs": ["htmlReport"],
                "model": {"url": "http://127.0.0.1:9/v1", "model": "m", "secretName": "llm-key"}
            }),
        ),
    )
    .await
    .unwrap();
    let s = wait_status(&api, "no-secret", "a report", |s| s.report.is_some()).await;
    let model = condition(&s, "ModelAvailable").unwrap();
    assert_eq!(
        (model.status.as_str(), model.reason.as_str()),
        ("False", "SecretNotFound")
    );
    assert!(
        model.message.contains("Secret shop/llm-key not found"),
        "{model:?}"
    );
    let ready = condition(&s, "Ready").unwrap();
    assert_eq!(ready.status, "True");
    assert!(
        ready.message.contains("PowerTool shop/gone not found"),
        "{ready:?}"
    );

    operator.stop().await;
}

/// A processing's author names the model URL and the Secret; the operator sends the key only to
/// endpoints an admin listed, and only from Secrets labelled for it.
#[tokio::test]
async fn the_model_step_sends_no_key_where_no_admin_allowed() {
    let Some(Processing {
        server: _server,
        admin,
        store: _store,
        operator,
        api,
    }) = Processing::start("the_model_step_sends_no_key_where_no_admin_allowed").await
    else {
        return;
    };
    // The confused deputy: a Secret's key is never read for an endpoint no admin allowed, and
    // nothing is sent there; an allowed endpoint gets only a Secret labelled for it.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let recorder = format!("http://{}/v1", listener.local_addr().unwrap());
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(admin.clone(), "shop");
    for (name, labels) in [
        (
            "labelled",
            serde_json::json!({toe_operator::processing::MODEL_KEY_LABEL: "true"}),
        ),
        ("unlabelled", serde_json::json!({})),
    ] {
        let secret: k8s_openapi::api::core::v1::Secret =
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "labels": labels},
                "stringData": {"apiKey": "sk-must-not-leak"},
            }))
            .unwrap();
        secrets
            .create(&kube::api::PostParams::default(), &secret)
            .await
            .unwrap();
    }
    for (name, url, secret, reason) in [
        (
            "exfiltrate",
            recorder.as_str(),
            "labelled",
            "ModelNotAllowed",
        ),
        (
            "borrowed-key",
            "http://127.0.0.1:9/v1",
            "unlabelled",
            "SecretNotOptedIn",
        ),
    ] {
        apply(
            &api,
            name,
            &processing(
                name,
                &serde_json::json!({
                    "names": ["gone"], "schedule": "0 * * * *", "outputs": ["htmlReport"],
                    "model": {"url": url, "model": "m", "secretName": secret}
                }),
            ),
        )
        .await
        .unwrap();
        let s = wait_status(&api, name, "a report", |s| s.report.is_some()).await;
        let model = condition(&s, "ModelAvailable").unwrap();
        assert_eq!(
            (model.status.as_str(), model.reason.as_str()),
            ("False", reason),
            "{name}"
        );
        assert!(!model.message.contains("sk-must-not-leak"), "{model:?}");
    }
    assert!(
        listener.accept().is_err(),
        "the operator connected to an endpoint no admin allowed"
    );
    operator.stop().await;
}

/// A processing writes its reports only to a store an admin allows: not through /proc into the
/// node's filesystem.
#[tokio::test]
async fn a_processing_writes_only_where_an_admin_allows() {
    let Some(Processing {
        server: _server,
        admin: _,
        store: _store,
        operator,
        api,
    }) = Processing::start("a_processing_writes_only_where_an_admin_allows").await
    else {
        return;
    };
    let escape = format!("/proc/1/root/tmp/toe-report-escape-{}", std::process::id());
    apply(
        &api,
        "escape",
        &processing(
            "escape",
            &serde_json::json!({"names": ["x"], "schedule": "1h", "outputs": ["htmlReport"],
                                "output": {"url": format!("file://{escape}")}}),
        ),
    )
    .await
    .unwrap();
    let s = wait_status(&api, "escape", "a Ready condition", |s| {
        condition(s, "Ready").is_some()
    })
    .await;
    let ready = condition(&s, "Ready").unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "InvalidSpec")
    );
    assert!(
        ready.message.contains("not among the output locations")
            && !ready.message.contains("/proc"),
        "{ready:?}"
    );
    assert!(
        !Path::new(&escape).exists(),
        "a report was written through /proc"
    );
    operator.stop().await;
}

fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|b| which(b))
}

fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(bin))
        .find(|p| p.is_file())
}

fn headless(browser: &Path, args: &[&str]) -> std::process::Output {
    Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=10000",
        ])
        .args(args)
        .output()
        .expect("run chromium")
}

/// From the flamegraph `name`'s embedded tree (`{names, tree: [name, value, [children]]}`): how
/// many frames the page draws unzoomed, and the percentage of the total under the outermost frames
/// whose name contains `term` (the page's rules, in report.js).
fn expected_view(report: &str, name: &str, term: &str) -> (usize, f64) {
    fn drawn(node: &serde_json::Value, width: f64) -> usize {
        let value = node[1].as_f64().unwrap();
        1 + node[2]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| (c, width * c[1].as_f64().unwrap() / value))
            .filter(|(_, w)| *w >= 0.0005)
            .map(|(c, w)| drawn(c, w))
            .sum::<usize>()
    }
    fn matched(node: &serde_json::Value, names: &[serde_json::Value], term: &str) -> f64 {
        let name = names[usize::try_from(node[0].as_u64().unwrap()).unwrap()]
            .as_str()
            .unwrap();
        if name.to_lowercase().contains(term) {
            return node[1].as_f64().unwrap();
        }
        node[2]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| matched(c, names, term))
            .sum()
    }
    let json = report
        .split(&format!("id=\"flame-{name}\""))
        .nth(1)
        .and_then(|s| s.split("<script type=\"application/json\">").nth(1))
        .and_then(|s| s.split("</script>").next())
        .unwrap();
    let data: serde_json::Value = serde_json::from_str(json).unwrap();
    let names = data["names"].as_array().unwrap();
    let tree = &data["tree"];
    let share = 100.0 * matched(tree, names, term) / tree[1].as_f64().unwrap();
    (drawn(tree, 1.0), share)
}

#[tokio::test]
async fn the_report_opens_in_headless_chromium_with_a_searchable_flamegraph() {
    let Some(browser) = chromium() else {
        toe_tests::skip_unbootstrapped(
            "the_report_opens_in_headless_chromium_with_a_searchable_flamegraph",
            "chromium",
        );
        return;
    };
    let out = tempfile::tempdir().unwrap();
    let job = toe_report::store::Job {
        sources: vec![toe_report::store::Source {
            url: Url::from_directory_path(repo().join("toe-report/fixtures")).unwrap(),
            label: String::new(),
        }],
        window: None,
        now: SystemTime::now(),
        output: Url::from_directory_path(out.path()).unwrap(),
        retention: None,
        options: toe_report::process::Options {
            merged_flamegraph: true,
            html_report: true,
            title: "recorded captures".into(),
            ..toe_report::process::Options::default()
        },
    };
    let done = toe_report::store::run(&job).await.unwrap();
    let report = done
        .written
        .iter()
        .find(|u| u.ends_with("/report.html"))
        .unwrap();
    let page = format!("{report}#search=toe_demo::mix");
    let dom = headless(&browser, &["--dump-dom", &page]);
    let (html, log) = (
        String::from_utf8_lossy(&dom.stdout),
        String::from_utf8_lossy(&dom.stderr),
    );
    assert!(dom.status.success(), "chromium failed: {log}");
    let console: Vec<&str> = log.lines().filter(|l| l.contains("CONSOLE")).collect();
    assert!(console.is_empty(), "console messages: {console:#?}");
    assert!(
        html.contains("<body data-ready=\"1\">"),
        "the script did not finish: {log}"
    );
    assert!(
        !html.contains("data-js-errors"),
        "script errors in the page"
    );
    // What the page should show, computed here from the tree the report embeds: every frame at
    // least MIN_WIDTH (0.05%) of the view drawn, and the share under the outermost matches.
    let source =
        std::fs::read_to_string(Url::parse(report).unwrap().to_file_path().unwrap()).unwrap();
    let (want_frames, want_matched) = expected_view(&source, "cpu", "toe_demo::mix");
    let cpu = html
        .split("id=\"flame-cpu\"")
        .nth(1)
        .unwrap()
        .split("id=\"flame-")
        .next()
        .unwrap();
    let frames = cpu.matches("class=\"frame").count();
    assert_eq!(frames, want_frames, "frames drawn in the CPU flamegraph");
    assert!(
        cpu.contains("class=\"frame match\""),
        "search highlighted nothing"
    );
    let matched: f64 = cpu
        .split("data-matched=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (matched - want_matched).abs() < 0.051,
        "toe_demo::mix matched {matched}% of CPU samples, the data says {want_matched:.2}%"
    );
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("report-chromium.png");
    let _ = std::fs::remove_file(&shot);
    let run = headless(
        &browser,
        &[
            "--window-size=1400,2400",
            &format!("--screenshot={}", shot.display()),
            &page,
        ],
    );
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "screenshot of {} bytes",
        png.len()
    );
    eprintln!("screenshot: {}", shot.display());
}

/// Captures whose merge does not fit a small memory budget, in the agents' layout below `base`:
/// `captures` targets over two runs, each with `stacks` stacks (half shared, half its own) as
/// folded stacks, pprof and a summary. Returns the total of samples.
fn record_many(base: &Path, captures: u64, stacks: u64) -> u64 {
    use toe_artifacts::profile::{Frame, Profile, Stack, ValueType};
    let mut total = 0;
    for p in 0..captures {
        let dir = base.join(format!("g{}-aaaaaaaa/pod-{p}/app", 1 + p % 2));
        std::fs::create_dir_all(&dir).unwrap();
        let mut profile = Profile {
            sample_types: vec![ValueType::new("samples", "count")],
            ..Profile::default()
        };
        let mut frame = |name: String| {
            profile.frames.push(Frame::named(name, false));
            u32::try_from(profile.frames.len() - 1).unwrap()
        };
        let main = frame("main".into());
        let mut list = Vec::new();
        for n in 0..stacks {
            let own = if n % 2 == 0 { 0 } else { p + 1 };
            let frames = vec![
                main,
                frame(format!("app::service::handler_{}", n % 16)),
                frame(format!("app::storage::engine::lookup_{}_{own}", n % 97)),
                frame(format!("app::codec::decode_record_{n}_{own}")),
            ];
            let count = 1 + (n * 7 + p) % 50;
            total += count;
            list.push(Stack {
                pid: 1000 + u32::try_from(p).unwrap(),
                process: "app".into(),
                thread: "app".into(),
                frames,
                values: vec![count],
            });
        }
        profile.stacks = list;
        std::fs::write(
            dir.join("stacks.folded"),
            toe_artifacts::folded::encode(&profile, 0),
        )
        .unwrap();
        std::fs::write(
            dir.join("cpu.pb.gz"),
            toe_artifacts::pprof::encode(&profile),
        )
        .unwrap();
        let summary = serde_json::json!({
            "run": "big", "tool": "cpu-profile", "target": format!("pod-{p}/app"),
            "complete": true, "ended": "duration reached",
            "started_unix_ms": now_ms() - 60_000 + (p % 2) * 30_000,
            "sampled_duration_s": 10.0,
        });
        std::fs::write(dir.join("summary.json"), summary.to_string()).unwrap();
    }
    total
}

/// The root total an inferno SVG shows (`all (1,234 samples, 100%)`).
fn svg_total(svg: &[u8]) -> u64 {
    let text = String::from_utf8_lossy(svg);
    let at = text.find("<title>all (").expect("a root frame") + "<title>all (".len();
    text[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == ',')
        .filter(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap()
}

#[test]
fn a_processing_larger_than_its_memory_budget_spills_and_streams_its_outputs_through_s3() {
    let test =
        "a_processing_larger_than_its_memory_budget_spills_and_streams_its_outputs_through_s3";
    let Some(s3) = S3Server::start(test) else {
        return;
    };
    let (captures, stacks) = (24, 8000);
    let want = record_many(&s3.path("big"), captures, stacks);
    let out = Command::new(bin("toe"))
        .args(["report", s3.url("big/").as_str()])
        .args(["-o", s3.url("reports/").as_str()])
        .args([
            "--outputs",
            "mergedFlamegraph,differentialFlamegraph,mergedPprof,htmlReport",
        ])
        // 1 MiB: the merge spills sorted runs many times over.
        .args(["--merge-memory-mib", "1"])
        .envs(s3.env())
        .output()
        .expect("toe report");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("over {captures} capture(s) of 2 run(s)")),
        "{stderr}"
    );
    let objects = s3.objects("reports");
    let find = |name: &str| {
        let key = objects
            .iter()
            .find(|k| k.to_string_lossy().ends_with(&format!("/{name}")))
            .unwrap_or_else(|| panic!("{name} not in {objects:?}"));
        s3.read(key)
    };
    let folded = find("cpu.folded");
    // Larger than a part of a multipart upload (8 MiB): it was streamed, not put whole.
    assert!(folded.len() > 8 << 20, "{} bytes", folded.len());
    let merged =
        toe_artifacts::folded::Folded::parse(std::str::from_utf8(&folded).unwrap()).unwrap();
    assert_eq!(merged.total(), want);
    // Even stacks are shared by every capture, odd ones are each capture's own.
    assert_eq!(
        merged.stacks.len() as u64,
        stacks / 2 + captures * stacks / 2
    );
    let pprof = toe_artifacts::pprof::decode(&find("cpu.pb.gz")).unwrap();
    assert_eq!(
        u64::try_from(toe_artifacts::pprof::totals(&pprof)[0]).unwrap(),
        want
    );
    assert_eq!(
        svg_total(&find("cpu.svg")),
        want,
        "the pruned SVG keeps the total"
    );
    let later: u64 = merged.total() - {
        // The diff's width is the later run (g2: odd captures).
        let mut earlier = 0;
        for p in (0..captures).step_by(2) {
            earlier += (0..stacks).map(|n| 1 + (n * 7 + p) % 50).sum::<u64>();
        }
        earlier
    };
    assert_eq!(svg_total(&find("cpu.diff.svg")), later);
    assert!(String::from_utf8_lossy(&find("report.html")).contains("flame-cpu"));
    assert_eq!(
        s3.metadata_knocks(),
        0,
        "nothing asked the instance-metadata address"
    );
}

/// An API server with namespace `shop`, recorded runs in a file:// store (its URL) and the
/// PowerTool `checkout-cpu` labelled `team: checkout`; None where the test skips.
async fn checkout_shop(test: &str) -> Option<(ApiServer, kube::Client, tempfile::TempDir, Url)> {
    let server = ApiServer::start(test)?;
    let admin = server.client().await;
    install_crds(&admin).await;
    create_namespace(&admin, "shop", &serde_json::json!({})).await;
    let store = tempfile::tempdir().unwrap();
    record_runs(store.path());
    label_powertools(&admin, &[("checkout-cpu", "checkout")]).await;
    let artifacts = Url::from_directory_path(store.path()).unwrap();
    Some((server, admin, store, artifacts))
}

#[tokio::test]
async fn a_processing_writing_to_its_own_store_has_its_reports_listed_and_served() {
    let test = "a_processing_writing_to_its_own_store_has_its_reports_listed_and_served";
    let Some((server, admin, _store, artifacts)) = checkout_shop(test).await else {
        return;
    };
    let own = tempfile::tempdir().unwrap();
    let own_url = Url::from_directory_path(own.path()).unwrap();
    let operator = Operator::start_allowing(
        &server,
        &admin,
        Some(artifacts.clone()),
        vec![own_url.clone()],
    )
    .await;
    let api: Api<PowerToolProcessing> = Api::namespaced(admin.clone(), "shop");
    apply(
        &api,
        "own",
        &processing(
            "own",
            &serde_json::json!({
                "selector": {"matchLabels": {"team": "checkout"}},
                "schedule": "1h", "outputs": ["mergedFlamegraph", "htmlReport"],
                "output": {"url": own_url.as_str()}
            }),
        ),
    )
    .await
    .unwrap();
    let status = wait_status(&api, "own", "a report", |s| s.report.is_some()).await;
    let dir = status.output_dir.clone().unwrap();
    assert!(dir.starts_with(own_url.as_str()), "{dir}");
    let report = Url::parse(status.report.as_ref().unwrap())
        .unwrap()
        .to_file_path()
        .unwrap();
    assert!(report.starts_with(own.path()), "{}", report.display());
    let html = std::fs::read_to_string(&report).unwrap();
    // The report server is given only the agents' store; it finds the processing's own from
    // the status the operator wrote.
    let operator_client = server.client_as(OPERATOR_TOKEN).await;
    let app = toe_operator::reports::router(
        toe_operator::reports::Reports::new(&artifacts, toe_operator::reports::Access::Open)
            .unwrap()
            .with_processings(operator_client),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let index = reqwest::get(format!("http://{addr}/reports/"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(index.contains("<td>shop</td><td>own</td>"), "{index}");
    assert!(index.contains("/reports/shop/own/"), "{index}");
    let served = reqwest::get(format!("http://{addr}/reports/shop/own/latest/report.html"))
        .await
        .unwrap();
    assert_eq!(served.status(), 200);
    assert_eq!(served.text().await.unwrap(), html);
    operator.stop().await;
}

/// The stamp directories below `dir` that hold files (what a processing wrote, one per pass; a
/// file:// store leaves a directory behind, empty, when its files are deleted).
fn passes(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| std::fs::read_dir(e.path()).is_ok_and(|mut files| files.next().is_some()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn a_deleted_processing_leaves_its_outputs_as_its_spec_said() {
    let test = "a_deleted_processing_leaves_its_outputs_as_its_spec_said";
    let Some((server, admin, store, artifacts)) = checkout_shop(test).await else {
        return;
    };
    let operator = Operator::start_with(&server, &admin, Some(artifacts)).await;
    let api: Api<PowerToolProcessing> = Api::namespaced(admin.clone(), "shop");
    for (name, on_delete) in [("now", Some("now")), ("kept", None)] {
        let mut spec = serde_json::json!({
            "selector": {"matchLabels": {"team": "checkout"}},
            "schedule": "1h", "retention": "48h", "outputs": ["htmlReport"],
        });
        if let Some(p) = on_delete {
            spec["outputsOnDelete"] = p.into();
        }
        apply(&api, name, &processing(name, &spec)).await.unwrap();
    }
    let now = wait_status(&api, "now", "a report", |s| s.report.is_some()).await;
    let kept = wait_status(&api, "kept", "a report", |s| s.report.is_some()).await;
    assert!(
        now.outputs_on_delete
            .as_deref()
            .unwrap()
            .contains("removed within a minute"),
        "{now:?}"
    );
    assert!(
        kept.outputs_on_delete
            .as_deref()
            .unwrap()
            .contains("older than 2days"),
        "{kept:?}"
    );
    let (now_dir, kept_dir) = (
        store.path().join("_reports/shop/now"),
        store.path().join("_reports/shop/kept"),
    );
    assert_eq!(passes(&now_dir).len(), 1);
    let fresh = passes(&kept_dir);
    assert_eq!(fresh.len(), 1);
    // A pass from three days ago, past the 48 h retention, left behind by an earlier operator.
    let old = toe_artifacts::store::stamp(SystemTime::now() - Duration::from_hours(72));
    std::fs::create_dir_all(kept_dir.join(&old)).unwrap();
    std::fs::write(kept_dir.join(&old).join("report.html"), "old").unwrap();
    for name in ["now", "kept"] {
        api.delete(name, &kube::api::DeleteParams::default())
            .await
            .unwrap();
    }
    // Bounded: the sweeper looks every second here.
    for _ in 0..300 {
        if passes(&now_dir).is_empty() && passes(&kept_dir).len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(passes(&now_dir).is_empty(), "{:?}", passes(&now_dir));
    assert!(
        !now_dir.join("processing.json").exists(),
        "its record goes with its outputs"
    );
    assert_eq!(
        passes(&kept_dir),
        fresh,
        "the expired pass goes, the fresh one stays"
    );
    assert!(kept_dir.join("processing.json").exists());
    operator.stop().await;
}
