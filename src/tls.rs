//! TLS (SPEC §8): the listener's certificate, which a reload can replace
//! while the gateway serves, and the client side for `https://` instances.
//!
//! The listener resolves its certificate per handshake through a
//! [`CertificateResolver`], so a reload swaps the certificate for new
//! handshakes while open connections keep the one they negotiated.

use std::any::Any;
use std::fmt;
use std::sync::{Arc, RwLock};

use actix_web::rt::net::TcpStream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::settings::{TlsSettings, UpstreamSettings};

/// A TLS connection as actix-web's rustls listener hands it to `on_connect`.
pub type TlsConnection = actix_tls::accept::rustls_0_23::TlsStream<TcpStream>;

/// The TCP socket under a connection of either listener, and whether it
/// carries TLS.
pub fn tcp_of(connection: &dyn Any) -> Option<(&TcpStream, bool)> {
    if let Some(tcp) = connection.downcast_ref::<TcpStream>() {
        return Some((tcp, false));
    }
    connection
        .downcast_ref::<TlsConnection>()
        .map(|tls| (tls.get_ref().0, true))
}

/// Whether the connection negotiated HTTP/2 (ALPN `h2`).
pub fn is_http2(connection: &dyn Any) -> bool {
    connection
        .downcast_ref::<TlsConnection>()
        .is_some_and(|tls| tls.get_ref().1.alpn_protocol() == Some(b"h2"))
}

/// Marks a connection that arrived on the TLS listener (`on_connect`).
#[derive(Debug, Clone, Copy)]
pub struct OverTls;

/// Reads the listener's certificate chain and key, and checks they belong
/// together; every problem names its key.
pub fn load_certified_key(tls: &TlsSettings) -> Result<Arc<CertifiedKey>, Vec<String>> {
    let certs = read_certificates(&tls.cert_file).map_err(|reason| format!("server.tls.cert_file: {reason}"));
    let key = PrivateKeyDer::from_pem_file(&tls.key_file)
        .map_err(|err| format!("server.tls.key_file: {:?}: {}", tls.key_file, pem_error(err)));
    let (certs, key) = match (certs, key) {
        (Ok(certs), Ok(key)) => (certs, key),
        (certs, key) => return Err(certs.err().into_iter().chain(key.err()).collect()),
    };
    let provider = rustls::crypto::ring::default_provider();
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|err| vec![format!("server.tls.key_file: {:?}: unusable key: {err}", tls.key_file)])?;
    let certified = CertifiedKey::new(certs, signing_key);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(Arc::new(certified)),
        Err(err) => Err(vec![format!(
            "server.tls.key_file: {:?} does not match the certificate in server.tls.cert_file ({err})",
            tls.key_file
        )]),
    }
}

fn read_certificates(path: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|err| format!("{path:?}: {}", pem_error(err)))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| format!("{path:?}: {}", pem_error(err)))?;
    if certs.is_empty() {
        return Err(format!("{path:?}: no certificate (BEGIN CERTIFICATE) in the file"));
    }
    Ok(certs)
}

fn pem_error(err: rustls::pki_types::pem::Error) -> String {
    match err {
        rustls::pki_types::pem::Error::Io(err) => format!("cannot read: {err}"),
        rustls::pki_types::pem::Error::NoItemsFound => "no PEM item of the expected kind in the file".to_owned(),
        other => format!("not valid PEM: {other:?}"),
    }
}

/// The listener's certificate, replaceable while serving.
pub struct CertificateResolver {
    current: RwLock<Arc<CertifiedKey>>,
}

impl fmt::Debug for CertificateResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateResolver").finish_non_exhaustive()
    }
}

impl CertificateResolver {
    pub fn new(key: Arc<CertifiedKey>) -> Self {
        Self {
            current: RwLock::new(key),
        }
    }

    /// New handshakes get `key` from now on.
    pub fn replace(&self, key: Arc<CertifiedKey>) {
        *self.current.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = key;
    }
}

impl ResolvesServerCert for CertificateResolver {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clone(),
        )
    }
}

/// The listener's TLS configuration: TLS 1.2 and 1.3 only, the certificate
/// from `resolver`. actix-web adds the ALPN protocols (`h2`, `http/1.1`).
pub fn server_config(resolver: Arc<CertificateResolver>) -> rustls::ServerConfig {
    rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("ring supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(resolver)
}

/// The client side for `https://` instances and their probes: the public
/// web roots plus `upstream.ca_file`, HTTP/1.1. The same object while the
/// CA file's path and contents stay the same, so a reload that leaves them
/// keeps every upstream client (and its pooled connections).
pub fn upstream_client_config(upstream: &UpstreamSettings) -> Result<Arc<rustls::ClientConfig>, String> {
    type Built = (String, Option<Vec<u8>>, Arc<rustls::ClientConfig>);
    static LAST_BUILT: std::sync::Mutex<Option<Built>> = std::sync::Mutex::new(None);

    let contents = (!upstream.ca_file.is_empty())
        .then(|| std::fs::read(&upstream.ca_file).ok())
        .flatten();
    let mut last = LAST_BUILT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((path, built_from, config)) = last.as_ref() {
        if *path == upstream.ca_file && *built_from == contents {
            return Ok(config.clone());
        }
    }
    let config = build_upstream_client_config(upstream)?;
    *last = Some((upstream.ca_file.clone(), contents, config.clone()));
    Ok(config)
}

/// The trust anchors for `rediss://` (SPEC §12, verification as in §8): with
/// no `upstream.ca_file`, `None`, and the Redis client uses the public web
/// roots it was built with; with one, the public web roots and the file's
/// certificates as one PEM bundle, since the Redis client takes its roots
/// only as PEM and a bundle given replaces its own.
pub fn redis_root_certificates(upstream: &UpstreamSettings) -> Result<Option<Vec<u8>>, String> {
    use base64::Engine as _;

    if upstream.ca_file.is_empty() {
        return Ok(None);
    }
    let extra = read_certificates(&upstream.ca_file).map_err(|reason| format!("upstream.ca_file: {reason}"))?;
    let mut bundle = Vec::new();
    for cert in webpki_root_certs::TLS_SERVER_ROOT_CERTS.iter().chain(&extra) {
        bundle.extend_from_slice(b"-----BEGIN CERTIFICATE-----\n");
        let encoded = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
        for line in encoded.as_bytes().chunks(64) {
            bundle.extend_from_slice(line);
            bundle.push(b'\n');
        }
        bundle.extend_from_slice(b"-----END CERTIFICATE-----\n");
    }
    Ok(Some(bundle))
}

fn build_upstream_client_config(upstream: &UpstreamSettings) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if !upstream.ca_file.is_empty() {
        let certs = read_certificates(&upstream.ca_file).map_err(|reason| format!("upstream.ca_file: {reason}"))?;
        for cert in certs {
            roots.add(cert).map_err(|err| {
                format!(
                    "upstream.ca_file: {:?}: not a usable CA certificate: {err}",
                    upstream.ca_file
                )
            })?;
        }
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("ring supports TLS 1.2 and 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
