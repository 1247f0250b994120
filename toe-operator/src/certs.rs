//! The admission webhook's self-generated certificates: a CA and a serving certificate for the
//! webhook Service's DNS names, kept in one Secret so that every replica serves the same one, and
//! the CA written into the ValidatingWebhookConfiguration so the API server trusts it.
//!
//! The alternative, cert-manager, renews its certificate into a Secret the chart mounts
//! (`--tls-cert`/`--tls-key`); [`serve_files`] serves each renewal as the kubelet updates the
//! mounted files, so a long-running operator never outlives the certificate it started with.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::{
    ByteString,
    api::{admissionregistration::v1::ValidatingWebhookConfiguration, core::v1::Secret},
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// How long a generated certificate is valid.
pub const VALIDITY: Duration = Duration::from_hours(365 * 24);
/// A certificate with less than this left is replaced.
pub const RENEW_BEFORE: Duration = Duration::from_hours(30 * 24);

const NOT_AFTER: &str = "toe.run/not-after";
const NAMES: &str = "toe.run/names";
const CA_KEY: &str = "ca.crt";
const CERT_KEY: &str = "tls.crt";
const PRIVATE_KEY: &str = "tls.key";

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("generating the webhook certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{what}: {source}")]
    Kube {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("loading the webhook certificate: {0}")]
    Tls(#[source] std::io::Error),
    #[error("Secret {0} kept changing while it was being written; another replica may be looping")]
    Contended(String),
}

fn kube_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> CertError {
    let what = what.into();
    move |source| CertError::Kube { what, source }
}

/// PEM texts of the CA, the serving certificate and its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookTls {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    /// Unix seconds after which the serving certificate is no longer valid.
    pub not_after: i64,
}

/// Where the certificate lives and which names it must carry.
#[derive(Clone, Debug)]
pub struct SelfSigned {
    pub namespace: String,
    pub secret: String,
    pub configuration: String,
    /// DNS names (the Service's in-cluster names) and IP addresses the certificate is for.
    pub names: Vec<String>,
}

/// The names the API server may use to reach Service `service` in `namespace`, then `extra`.
#[must_use]
pub fn service_names(service: &str, namespace: &str, extra: &[String]) -> Vec<String> {
    let mut names = vec![
        service.to_owned(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ];
    names.extend(extra.iter().cloned());
    names
}

/// A fresh CA and a serving certificate for `names`, valid from `now` (Unix seconds) for
/// [`VALIDITY`].
pub fn generate(names: &[String], now: i64) -> Result<WebhookTls, CertError> {
    let validity = i64::try_from(VALIDITY.as_secs()).expect("a year fits");
    let at = |secs: i64| {
        time::OffsetDateTime::from_unix_timestamp(secs).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
    };
    // A minute of slack for clocks that are a little behind the operator's.
    let (not_before, not_after) = (at(now - 60), at(now + validity));

    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name
        .push(DnType::CommonName, "toe webhook CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = not_before;
    ca.not_after = not_after;
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;

    let mut leaf = CertificateParams::new(names.to_vec())?;
    leaf.distinguished_name.push(
        DnType::CommonName,
        names.first().map_or("toe-webhook", String::as_str),
    );
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.not_before = not_before;
    leaf.not_after = not_after;
    let key = KeyPair::generate()?;
    let cert = leaf.signed_by(&key, &ca)?;
    Ok(WebhookTls {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        not_after: now + validity,
    })
}

/// The certificate kept in `secret`, when it is for exactly `names` and valid for longer than
/// [`RENEW_BEFORE`] after `now`.
fn usable(secret: &Secret, names: &[String], now: i64) -> Option<WebhookTls> {
    let annotations = secret.metadata.annotations.as_ref()?;
    if annotations.get(NAMES)? != &names.join(",") {
        return None;
    }
    let not_after: i64 = annotations.get(NOT_AFTER)?.parse().ok()?;
    let renew = i64::try_from(RENEW_BEFORE.as_secs()).expect("fits");
    if not_after - now < renew {
        return None;
    }
    let data = secret.data.as_ref()?;
    let text = |k: &str| {
        data.get(k)
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
    };
    Some(WebhookTls {
        ca_pem: text(CA_KEY)?,
        cert_pem: text(CERT_KEY)?,
        key_pem: text(PRIVATE_KEY)?,
        not_after,
    })
}

fn secret_of(
    name: &str,
    tls: &WebhookTls,
    names: &[String],
    resource_version: Option<String>,
) -> Secret {
    let data = [
        (CA_KEY, &tls.ca_pem),
        (CERT_KEY, &tls.cert_pem),
        (PRIVATE_KEY, &tls.key_pem),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), ByteString(v.clone().into_bytes())))
    .collect();
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            annotations: Some(BTreeMap::from([
                (NOT_AFTER.to_owned(), tls.not_after.to_string()),
                (NAMES.to_owned(), names.join(",")),
            ])),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/name".to_owned(),
                "toe".to_owned(),
            )])),
            resource_version,
            ..ObjectMeta::default()
        },
        type_: Some("kubernetes.io/tls".to_owned()),
        data: Some(data),
        ..Secret::default()
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

impl SelfSigned {
    /// The certificate every replica shares: the one in the Secret while it is usable, else a new
    /// one written there. Concurrent replicas race through the API server's optimistic
    /// concurrency (create conflicts, resourceVersion on replace): the loser reads the winner's.
    pub async fn ensure_secret(&self, client: &Client) -> Result<WebhookTls, CertError> {
        let api: Api<Secret> = Api::namespaced(client.clone(), &self.namespace);
        let what = format!("Secret {}/{}", self.namespace, self.secret);
        for _ in 0..5 {
            let now = unix_now();
            let current = api
                .get_opt(&self.secret)
                .await
                .map_err(kube_err(format!("reading {what}")))?;
            if let Some(tls) = current.as_ref().and_then(|s| usable(s, &self.names, now)) {
                return Ok(tls);
            }
            let tls = generate(&self.names, now)?;
            // Replacing with the version read makes a concurrent writer's change a conflict.
            let version = current
                .as_ref()
                .and_then(|s| s.metadata.resource_version.clone());
            let secret = secret_of(&self.secret, &tls, &self.names, version);
            let written = if current.is_some() {
                api.replace(&self.secret, &PostParams::default(), &secret)
                    .await
            } else {
                api.create(&PostParams::default(), &secret).await
            };
            match written {
                Ok(_) => {
                    tracing::info!(secret = %what, not_after = tls.not_after, "generated the webhook certificate");
                    return Ok(tls);
                }
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => return Err(kube_err(format!("writing {what}"))(e)),
            }
        }
        Err(CertError::Contended(what))
    }

    /// Puts `ca_pem` into every webhook of the configuration; true when something changed. A
    /// `helm upgrade` rewrites the configuration without it, so this runs again periodically.
    pub async fn inject_ca(&self, client: &Client, ca_pem: &str) -> Result<bool, CertError> {
        let api: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
        let what = format!("ValidatingWebhookConfiguration {}", self.configuration);
        for _ in 0..5 {
            let mut config = api
                .get(&self.configuration)
                .await
                .map_err(kube_err(format!("reading {what}")))?;
            let bundle = ByteString(ca_pem.as_bytes().to_vec());
            let mut changed = false;
            for hook in config.webhooks.iter_mut().flatten() {
                if hook.client_config.ca_bundle.as_ref() != Some(&bundle) {
                    hook.client_config.ca_bundle = Some(bundle.clone());
                    changed = true;
                }
            }
            if !changed {
                return Ok(false);
            }
            match api
                .replace(&self.configuration, &PostParams::default(), &config)
                .await
            {
                Ok(_) => return Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => return Err(kube_err(format!("updating {what}"))(e)),
            }
        }
        Err(CertError::Contended(what))
    }

    /// One pass of [`serve_config`]'s keeper: serve the Secret's certificate if it changed
    /// (renewed here or by another replica), and put the CA back into the configuration.
    async fn recheck(
        &self,
        client: &Client,
        tls: &axum_server::tls_rustls::RustlsConfig,
        current: &mut WebhookTls,
    ) -> Result<(), CertError> {
        let fresh = self.ensure_secret(client).await?;
        if fresh != *current {
            tls.reload_from_pem(
                fresh.cert_pem.clone().into_bytes(),
                fresh.key_pem.clone().into_bytes(),
            )
            .await
            .map_err(CertError::Tls)?;
            tracing::info!(
                not_after = fresh.not_after,
                "serving the renewed webhook certificate"
            );
            *current = fresh;
        }
        if self.inject_ca(client, &current.ca_pem).await? {
            tracing::info!(configuration = %self.configuration, "restored the webhook CA bundle");
        }
        Ok(())
    }
}

/// How often each replica re-checks the Secret (renewal, another replica's new certificate) and
/// the configuration's CA, or the mounted certificate files.
pub const RECHECK: Duration = Duration::from_mins(1);

/// Sets up the certificate and the configuration's CA, returns the TLS config that serves it, and
/// keeps the three in step in the background for as long as the process runs.
pub async fn serve_config(
    setup: SelfSigned,
    client: Client,
) -> Result<axum_server::tls_rustls::RustlsConfig, CertError> {
    let current = setup.ensure_secret(&client).await?;
    setup.inject_ca(&client, &current.ca_pem).await?;
    let tls = axum_server::tls_rustls::RustlsConfig::from_pem(
        current.cert_pem.clone().into_bytes(),
        current.key_pem.clone().into_bytes(),
    )
    .await
    .map_err(CertError::Tls)?;
    let keeper = tls.clone();
    tokio::spawn(async move {
        let mut current = current;
        loop {
            tokio::time::sleep(RECHECK).await;
            if let Err(e) = setup.recheck(&client, &keeper, &mut current).await {
                tracing::warn!(error = %e, "webhook certificate check failed; retrying");
            }
        }
    });
    Ok(tls)
}

/// The PEM files a [`RustlsConfig`](axum_server::tls_rustls::RustlsConfig) was last loaded
/// from, as read then.
#[derive(Debug, PartialEq, Eq)]
struct LoadedFiles {
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl LoadedFiles {
    /// Reads `cert` and `key` (the pair to compare later ones with).
    fn read(cert: &std::path::Path, key: &std::path::Path) -> Result<Self, CertError> {
        Ok(Self {
            cert: std::fs::read(cert).map_err(CertError::Tls)?,
            key: std::fs::read(key).map_err(CertError::Tls)?,
        })
    }
}

/// Serves the files' certificate if they changed since `loaded`; true when it did. A pair that
/// does not load (the kubelet swaps a Secret's files at once, but a hand-edited pair may be half
/// written) keeps the old certificate in service and `loaded` as it was, so the next call tries
/// again.
async fn reload_if_changed(
    tls: &axum_server::tls_rustls::RustlsConfig,
    cert: &std::path::Path,
    key: &std::path::Path,
    loaded: &mut LoadedFiles,
) -> Result<bool, CertError> {
    let now = LoadedFiles::read(cert, key)?;
    if now == *loaded {
        return Ok(false);
    }
    tls.reload_from_pem(now.cert.clone(), now.key.clone())
        .await
        .map_err(CertError::Tls)?;
    *loaded = now;
    Ok(true)
}

/// A TLS config serving the certificate in the `cert` and `key` PEM files, kept in step with
/// them (checked every `every`) for as long as the process runs.
pub async fn serve_files(
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    every: Duration,
) -> Result<axum_server::tls_rustls::RustlsConfig, CertError> {
    let mut loaded = LoadedFiles::read(&cert, &key)?;
    let tls =
        axum_server::tls_rustls::RustlsConfig::from_pem(loaded.cert.clone(), loaded.key.clone())
            .await
            .map_err(CertError::Tls)?;
    let keeper = tls.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            match reload_if_changed(&keeper, &cert, &key, &mut loaded).await {
                Ok(true) => {
                    tracing::info!(cert = %cert.display(), "serving the renewed webhook certificate");
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, cert = %cert.display(), "the webhook certificate files do not load; still serving the previous one");
                }
            }
        }
    });
    Ok(tls)
}

#[cfg(test)]
mod tests {
    use rustls::{client::danger::ServerCertVerifier as _, pki_types::pem::PemObject as _};

    use super::*;

    fn names() -> Vec<String> {
        service_names("toe-webhook", "toe-system", &["127.0.0.1".to_owned()])
    }

    #[test]
    fn a_fresh_certificate_is_kept_and_an_expiring_or_renamed_one_is_not() {
        let now = 1_800_000_000;
        let tls = generate(&names(), now).unwrap();
        assert!(tls.ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(tls.key_pem.contains("PRIVATE KEY"));
        let secret = secret_of("s", &tls, &names(), None);
        assert_eq!(usable(&secret, &names(), now), Some(tls.clone()));
        let renew = i64::try_from(RENEW_BEFORE.as_secs()).unwrap();
        let late = tls.not_after - renew + 1;
        assert_eq!(
            usable(&secret, &names(), late),
            None,
            "inside the renewal window"
        );
        let other = service_names("toe-webhook", "elsewhere", &[]);
        assert_eq!(usable(&secret, &other, now), None, "other names");
        let mut broken = secret.clone();
        broken.data.as_mut().unwrap().remove(PRIVATE_KEY);
        assert_eq!(usable(&broken, &names(), now), None, "no key");
    }

    /// The leaf certificate a TLS server on 127.0.0.1:`port` presents (verification is not the
    /// point here: which certificate is served is).
    fn served_certificate(port: u16) -> Vec<u8> {
        #[derive(Debug)]
        struct AnyCert;
        impl rustls::client::danger::ServerCertVerifier for AnyCert {
            fn verify_server_cert(
                &self,
                _: &rustls::pki_types::CertificateDer<'_>,
                _: &[rustls::pki_types::CertificateDer<'_>],
                _: &rustls::pki_types::ServerName<'_>,
                _: &[u8],
                _: rustls::pki_types::UnixTime,
            ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
                Ok(rustls::client::danger::ServerCertVerified::assertion())
            }
            fn verify_tls12_signature(
                &self,
                _: &[u8],
                _: &rustls::pki_types::CertificateDer<'_>,
                _: &rustls::DigitallySignedStruct,
            ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error>
            {
                Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
            }
            fn verify_tls13_signature(
                &self,
                _: &[u8],
                _: &rustls::pki_types::CertificateDer<'_>,
                _: &rustls::DigitallySignedStruct,
            ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error>
            {
                Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
            }
            fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
                rustls::crypto::ring::default_provider()
                    .signature_verification_algorithms
                    .supported_schemes()
            }
        }
        let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(AnyCert))
        .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
        let mut sock = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        while conn.is_handshaking() {
            conn.complete_io(&mut sock).unwrap();
        }
        conn.peer_certificates().unwrap()[0].to_vec()
    }

    fn der(pem: &str) -> Vec<u8> {
        rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .to_vec()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn renewed_certificate_files_are_served_and_a_broken_pair_keeps_the_old_one() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = std::env::temp_dir().join(format!("toe-certs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
        let write = |tls: &WebhookTls| {
            std::fs::write(&cert, &tls.cert_pem).unwrap();
            std::fs::write(&key, &tls.key_pem).unwrap();
        };
        let first = generate(&names(), unix_now()).unwrap();
        write(&first);
        let tls = axum_server::tls_rustls::RustlsConfig::from_pem_file(&cert, &key)
            .await
            .unwrap();
        let mut loaded = LoadedFiles::read(&cert, &key).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = axum_server::from_tcp_rustls(listener, tls.clone())
            .unwrap()
            .serve(axum::Router::new().into_make_service());
        tokio::spawn(server);
        let served = || tokio::task::spawn_blocking(move || served_certificate(port));

        assert_eq!(served().await.unwrap(), der(&first.cert_pem));
        assert!(
            !reload_if_changed(&tls, &cert, &key, &mut loaded)
                .await
                .unwrap(),
            "unchanged files are not a renewal"
        );

        let renewed = generate(&names(), unix_now()).unwrap();
        write(&renewed);
        assert!(
            reload_if_changed(&tls, &cert, &key, &mut loaded)
                .await
                .unwrap()
        );
        assert_eq!(served().await.unwrap(), der(&renewed.cert_pem));

        // A key that does not load: refused, the renewed certificate stays in service, and the
        // next pass tries again rather than taking the broken pair as loaded.
        std::fs::write(&key, "not a key").unwrap();
        assert!(
            reload_if_changed(&tls, &cert, &key, &mut loaded)
                .await
                .is_err()
        );
        assert_eq!(served().await.unwrap(), der(&renewed.cert_pem));
        assert!(
            reload_if_changed(&tls, &cert, &key, &mut loaded)
                .await
                .is_err()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_serving_certificate_verifies_against_the_ca_for_each_name() {
        let tls = generate(&names(), unix_now()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        let ca = rustls::pki_types::CertificateDer::from_pem_slice(tls.ca_pem.as_bytes()).unwrap();
        roots.add(ca).unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots.into(), provider)
                .build()
                .unwrap();
        let leaf =
            rustls::pki_types::CertificateDer::from_pem_slice(tls.cert_pem.as_bytes()).unwrap();
        let now = rustls::pki_types::UnixTime::now();
        for name in ["toe-webhook.toe-system.svc", "127.0.0.1"] {
            let server = rustls::pki_types::ServerName::try_from(name).unwrap();
            verifier
                .verify_server_cert(&leaf, &[], &server, &[], now)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        let stranger = rustls::pki_types::ServerName::try_from("evil.example").unwrap();
        assert!(
            verifier
                .verify_server_cert(&leaf, &[], &stranger, &[], now)
                .is_err()
        );
    }
}
