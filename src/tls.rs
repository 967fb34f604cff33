//! TLS with rustls: configurations built from PEM files, for terminating TLS on a listener
//! (certificate chain and key, more chosen by SNI, optional or required client certificates)
//! and for connecting to `wss://` upstreams (system roots or a CA file, client certificate,
//! SNI), plus the record-layer glue the shard runtime uses on every connection: feed
//! ciphertext in, take plaintext out, encrypt plaintext. Runtime-free like [`crate::proto`]:
//! no sockets here; `shard::stream` does the I/O with owned buffers.
//!
//! Why rustls' buffered API and not a runtime TLS crate: see `docs/design/004-tls.md`.

use std::collections::HashMap;
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::BytesMut;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// ALPN protocol offered and accepted: WebSocket upgrades are HTTP/1.1.
const ALPN_HTTP11: &[u8] = b"http/1.1";
/// TLS sessions remembered by a server for resumption (stateful; TLS 1.3 tickets are
/// stateless on top of it).
const SESSION_CACHE: usize = 4096;

/// The crypto provider (ring) used everywhere.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Whether a listener asks for client certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// No client certificate is requested.
    None,
    /// A client certificate is requested and verified if sent; clients without one connect.
    Optional,
    /// A client certificate verified against `client_ca` is required (mTLS).
    Required,
}

/// Lowest TLS version a listener or upstream accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MinVersion {
    /// TLS 1.2 and 1.3.
    Tls12,
    /// TLS 1.3 only.
    Tls13,
}

static TLS13_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

impl MinVersion {
    fn versions(self) -> &'static [&'static rustls::SupportedProtocolVersion] {
        match self {
            MinVersion::Tls12 => rustls::ALL_VERSIONS,
            MinVersion::Tls13 => TLS13_ONLY,
        }
    }
}

/// One certificate chain and its key, as files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// PEM file with the chain, leaf first.
    pub cert: PathBuf,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// A certificate chosen when the client's SNI names one of `names`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SniCert {
    /// Server names (lower case); `*.example.com` matches one label.
    pub names: Vec<String>,
    /// The chain and key.
    pub files: CertFiles,
}

/// TLS termination of one listener: what the files are, and the rustls configuration built
/// from them (rebuilt by [`ServerTls::reload`]).
#[derive(Clone)]
pub struct ServerTls {
    /// Default certificate: for clients without SNI or with a name no `sni` entry has.
    pub default: CertFiles,
    /// Further certificates by server name.
    pub sni: Vec<SniCert>,
    /// Client certificates.
    pub client_auth: ClientAuth,
    /// PEM file of the CA(s) client certificates must chain to.
    pub client_ca: Option<PathBuf>,
    /// Lowest accepted version.
    pub min_version: MinVersion,
    /// The configuration new handshakes use.
    pub config: Arc<ServerConfig>,
    /// The client CA certificates `config` verifies against (empty without client auth):
    /// a reload keeps the session state only while they stay the same.
    client_roots: Vec<CertificateDer<'static>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("default", &self.default)
            .field("sni", &self.sni)
            .field("client_auth", &self.client_auth)
            .field("client_ca", &self.client_ca)
            .field("min_version", &self.min_version)
            .finish_non_exhaustive()
    }
}

impl PartialEq for ServerTls {
    fn eq(&self, other: &Self) -> bool {
        // The built configuration follows from the rest.
        self.default == other.default
            && self.sni == other.sni
            && self.client_auth == other.client_auth
            && self.client_ca == other.client_ca
            && self.min_version == other.min_version
    }
}

impl Eq for ServerTls {}

impl ServerTls {
    /// Load the files and build the configuration.
    ///
    /// # Errors
    /// A message naming the file and what is wrong with it (missing, no certificate, no key,
    /// key does not match the certificate, an SNI name the certificate is not valid for).
    pub fn new(
        default: CertFiles,
        sni: Vec<SniCert>,
        client_auth: ClientAuth,
        client_ca: Option<PathBuf>,
        min_version: MinVersion,
    ) -> Result<Self, String> {
        let (config, client_roots) = build(
            &default,
            &sni,
            client_auth,
            client_ca.as_deref(),
            min_version,
            None,
        )?;
        Ok(Self {
            default,
            sni,
            client_auth,
            client_ca,
            min_version,
            config,
            client_roots,
        })
    }

    /// Read the files again, build a new configuration, make it the current one and return
    /// it. It keeps the session cache and ticket keys of the previous one (so clients can
    /// still resume sessions) unless the client CA certificates changed: a resumed session
    /// is not verified again, so one that began under the old CA must not skip the new one.
    /// Nothing changes if anything fails.
    ///
    /// # Errors
    /// As [`ServerTls::new`].
    pub fn reload(&mut self) -> Result<Arc<ServerConfig>, String> {
        let (config, client_roots) = build(
            &self.default,
            &self.sni,
            self.client_auth,
            self.client_ca.as_deref(),
            self.min_version,
            Some((&self.config, &self.client_roots)),
        )?;
        self.config = config.clone();
        self.client_roots = client_roots;
        Ok(config)
    }
}

/// A built configuration and the client CA certificates it verifies against.
type Built = (Arc<ServerConfig>, Vec<CertificateDer<'static>>);

/// Build a listener's rustls configuration from its files; with `previous` (a configuration
/// and its client CAs), keep its session state if the client CAs are the same.
fn build(
    default: &CertFiles,
    sni: &[SniCert],
    client_auth: ClientAuth,
    client_ca: Option<&Path>,
    min_version: MinVersion,
    previous: Option<(&ServerConfig, &[CertificateDer<'static>])>,
) -> Result<Built, String> {
    {
        let provider = provider();
        let mut resolver = SniResolver {
            default: Some(Arc::new(certified_key(default, &provider)?)),
            by_name: HashMap::new(),
            wildcards: HashMap::new(),
        };
        for entry in sni {
            let key = Arc::new(certified_key(&entry.files, &provider)?);
            for name in &entry.names {
                let name = name.to_ascii_lowercase();
                match name.strip_prefix("*.") {
                    Some(parent) => resolver.wildcards.insert(parent.to_string(), key.clone()),
                    None => resolver.by_name.insert(name, key.clone()),
                };
            }
        }
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(min_version.versions())
            .map_err(|e| format!("TLS versions: {e}"))?;
        let mut client_roots = Vec::new();
        let builder = match (client_auth, client_ca) {
            (ClientAuth::None, _) => builder.with_no_client_auth(),
            (_, None) => return Err("client_auth needs client_ca (the CA file)".into()),
            (auth, Some(ca)) => {
                let mut roots = RootCertStore::empty();
                client_roots = load_certs(ca)?;
                for c in &client_roots {
                    roots
                        .add(c.clone())
                        .map_err(|e| format!("{}: not a usable CA: {e}", ca.display()))?;
                }
                let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
                let v = if auth == ClientAuth::Optional {
                    v.allow_unauthenticated()
                } else {
                    v
                };
                builder.with_client_cert_verifier(
                    v.build()
                        .map_err(|e| format!("{}: client CA: {e}", ca.display()))?,
                )
            }
        };
        let mut config = builder.with_cert_resolver(Arc::new(resolver));
        config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
        match previous {
            Some((p, roots)) if roots == client_roots.as_slice() => {
                config.session_storage = p.session_storage.clone();
                config.ticketer = p.ticketer.clone();
            }
            _ => {
                config.session_storage =
                    rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE);
                config.ticketer = rustls::crypto::ring::Ticketer::new()
                    .map_err(|e| format!("TLS session tickets: {e}"))?;
            }
        }
        Ok((Arc::new(config), client_roots))
    }
}

/// Picks the certificate by SNI: exact name, then `*.parent`, then the default.
#[derive(Debug)]
struct SniResolver {
    default: Option<Arc<CertifiedKey>>,
    by_name: HashMap<String, Arc<CertifiedKey>>,
    /// By the parent of a wildcard (`example.com` for `*.example.com`).
    wildcards: HashMap<String, Arc<CertifiedKey>>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if let Some(name) = hello.server_name() {
            // rustls hands the name over lower-cased and validated as a DNS name.
            if let Some(k) = self.by_name.get(name) {
                return Some(k.clone());
            }
            if let Some((_, parent)) = name.split_once('.') {
                if let Some(k) = self.wildcards.get(parent) {
                    return Some(k.clone());
                }
            }
        }
        self.default.clone()
    }
}

fn certified_key(files: &CertFiles, provider: &CryptoProvider) -> Result<CertifiedKey, String> {
    let chain = load_certs(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| format!("{}: no usable private key: {e}", files.key.display()))?;
    CertifiedKey::from_der(chain, key, provider).map_err(|e| {
        format!(
            "{} / {}: key and certificate do not go together: {e}",
            files.cert.display(),
            files.key.display()
        )
    })
}

/// Every certificate in a PEM file; at least one.
///
/// # Errors
/// The file cannot be read, or holds no certificate.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in the file", path.display()));
    }
    Ok(certs)
}

/// How wsedge connects to one `wss://` upstream.
#[derive(Clone)]
pub struct ClientTls {
    /// PEM file of the CA(s) to trust instead of the system roots.
    pub ca: Option<PathBuf>,
    /// Client certificate presented to the upstream (mTLS).
    pub client_cert: Option<CertFiles>,
    /// Name sent in SNI and checked against the upstream's certificate.
    pub server_name: ServerName<'static>,
    /// Accept any certificate (testing only; warned about at startup).
    pub insecure_skip_verify: bool,
    /// The configuration connections use.
    pub config: Arc<ClientConfig>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("ca", &self.ca)
            .field("client_cert", &self.client_cert)
            .field("server_name", &self.server_name)
            .field("insecure_skip_verify", &self.insecure_skip_verify)
            .finish_non_exhaustive()
    }
}

impl PartialEq for ClientTls {
    fn eq(&self, other: &Self) -> bool {
        self.ca == other.ca
            && self.client_cert == other.client_cert
            && self.server_name == other.server_name
            && self.insecure_skip_verify == other.insecure_skip_verify
    }
}

impl Eq for ClientTls {}

impl ClientTls {
    /// Build the configuration: trust `ca` (or the system's roots), present `client_cert`.
    ///
    /// # Errors
    /// A message naming the file or the problem (no system roots found, bad name, ...).
    pub fn new(
        server_name: &str,
        ca: Option<PathBuf>,
        client_cert: Option<CertFiles>,
        insecure_skip_verify: bool,
    ) -> Result<Self, String> {
        let server_name = ServerName::try_from(server_name.to_string())
            .map_err(|_| format!("`{server_name}` is not a valid TLS server name"))?;
        let provider = provider();
        let mut roots = RootCertStore::empty();
        match &ca {
            Some(path) => {
                for c in load_certs(path)? {
                    roots
                        .add(c)
                        .map_err(|e| format!("{}: not a usable CA: {e}", path.display()))?;
                }
            }
            None if !insecure_skip_verify => {
                let found = rustls_native_certs::load_native_certs();
                for c in found.certs {
                    // A system bundle may hold a certificate rustls cannot use; skip it.
                    let _ = roots.add(c);
                }
                if roots.is_empty() {
                    return Err(
                        "no system root certificates found (install ca-certificates, or set \
                         tls_ca)"
                            .into(),
                    );
                }
            }
            None => {}
        }
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS versions: {e}"))?;
        let builder = if insecure_skip_verify {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerify(provider.clone())))
        } else {
            builder.with_root_certificates(roots)
        };
        let mut config = match &client_cert {
            Some(files) => {
                let chain = load_certs(&files.cert)?;
                let key = PrivateKeyDer::from_pem_file(&files.key)
                    .map_err(|e| format!("{}: no usable private key: {e}", files.key.display()))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("{}: {e}", files.cert.display()))?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
        Ok(Self {
            ca,
            client_cert,
            server_name,
            insecure_skip_verify,
            config: Arc::new(config),
        })
    }
}

impl ClientTls {
    /// The same settings without session resumption: every connection runs a full
    /// handshake (load tests measure that cost; by default sessions resume, as browsers do).
    pub fn without_resumption(mut self) -> Self {
        let mut c = (*self.config).clone();
        c.resumption = rustls::client::Resumption::disabled();
        self.config = Arc::new(c);
        self
    }
}

/// `insecure_skip_verify`: any certificate is accepted; handshake signatures are still
/// checked (so the peer holds the key of the certificate it sent, whatever that is).
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Who a verified client certificate names: its subject common name and its DNS and URI
/// subject alternative names. Routes with `client_cert_names` match against all of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    /// Subject CN, if any.
    pub common_name: Option<String>,
    /// DNS names and URIs from the subject alternative names.
    pub alt_names: Vec<String>,
}

impl PeerIdentity {
    /// Read the identity from a DER certificate; `None` if it does not parse.
    pub fn from_der(der: &[u8]) -> Option<Self> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_string);
        let mut alt_names = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for n in &san.value.general_names {
                match n {
                    GeneralName::DNSName(s) | GeneralName::URI(s) => alt_names.push(s.to_string()),
                    _ => {}
                }
            }
        }
        Some(Self {
            common_name,
            alt_names,
        })
    }

    /// Does any of the names equal one of `allowed`?
    pub fn is_any_of(&self, allowed: &[String]) -> bool {
        self.common_name
            .iter()
            .chain(&self.alt_names)
            .any(|n| allowed.iter().any(|a| a == n))
    }

    /// A short form for logs: the CN, else the first alternative name.
    pub fn display_name(&self) -> &str {
        self.common_name
            .as_deref()
            .or(self.alt_names.first().map(String::as_str))
            .unwrap_or("")
    }
}

/// What [`decrypt`] found besides plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inbound {
    /// The connection goes on.
    Open,
    /// The peer sent close_notify: no more plaintext will come.
    Closed,
}

/// Feed ciphertext to `conn` and append every byte of plaintext it yields to `plain`. Also
/// drives the handshake: before it completes there is no plaintext, and once it does, records
/// that followed it in the same read come out as plaintext.
///
/// # Errors
/// A TLS protocol error (`InvalidData`); the connection is finished, but alerts it queued can
/// still be sent with [`take_output`].
pub fn decrypt(
    conn: &mut rustls::Connection,
    mut cipher: &[u8],
    plain: &mut BytesMut,
) -> io::Result<Inbound> {
    let mut state = take_plaintext(conn, plain)?;
    while !cipher.is_empty() && state == Inbound::Open {
        // Buffers what fits (a record at a time at most); the loop feeds the rest.
        if conn.read_tls(&mut cipher)? == 0 {
            break;
        }
        conn.process_new_packets()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        state = take_plaintext(conn, plain)?;
    }
    Ok(state)
}

/// Move the plaintext `conn` holds into `plain`.
fn take_plaintext(conn: &mut rustls::Connection, plain: &mut BytesMut) -> io::Result<Inbound> {
    let mut reader = conn.reader();
    loop {
        match reader.fill_buf() {
            Ok([]) => return Ok(Inbound::Closed),
            Ok(chunk) => {
                let n = chunk.len();
                plain.extend_from_slice(chunk);
                reader.consume(n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Inbound::Open),
            // TCP EOF without close_notify surfaces at the socket read, not here.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Inbound::Closed),
            Err(e) => return Err(e),
        }
    }
}

/// Plaintext records carry at most this much; encrypting in such steps keeps rustls' own
/// plaintext buffer at one record whatever the size of the write.
const RECORD: usize = 16 * 1024;

/// Encrypt `plain` and append the records, and anything else `conn` has queued (session
/// tickets, alerts, key updates), to `out`.
///
/// # Errors
/// Only if rustls refuses the data (the connection is closed for writing).
pub fn encrypt(conn: &mut rustls::Connection, plain: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
    for chunk in plain.chunks(RECORD) {
        conn.writer().write_all(chunk)?;
        take_output(conn, out)?;
    }
    take_output(conn, out)
}

/// [`encrypt`] for several pieces written together (a batch of broadcast frames): small
/// pieces are gathered into full records first, so a batch of 100 small frames becomes one
/// or a few records, not 100 (each record costs a header, a tag and an AEAD call).
///
/// # Errors
/// As [`encrypt`].
pub fn encrypt_vectored(
    conn: &mut rustls::Connection,
    parts: &[&[u8]],
    out: &mut Vec<u8>,
) -> io::Result<()> {
    if let [one] = parts {
        return encrypt(conn, one, out);
    }
    let mut stage = Vec::new();
    for p in parts {
        if !stage.is_empty() && stage.len() + p.len() > RECORD {
            encrypt(conn, &stage, out)?;
            stage.clear();
        }
        if p.len() >= RECORD {
            encrypt(conn, p, out)?;
        } else {
            stage.extend_from_slice(p);
        }
    }
    if !stage.is_empty() {
        encrypt(conn, &stage, out)?;
    }
    Ok(())
}

/// Append everything `conn` wants to send to `out`.
///
/// # Errors
/// Never in practice (writing to a `Vec` does not fail); the signature follows rustls.
pub fn take_output(conn: &mut rustls::Connection, out: &mut Vec<u8>) -> io::Result<()> {
    while conn.wants_write() {
        conn.write_tls(out)?;
    }
    Ok(())
}

/// A fresh server-side connection for `config`.
///
/// # Errors
/// rustls refused the configuration (does not happen with the ones built here).
pub fn server_conn(config: &Arc<ServerConfig>) -> io::Result<rustls::Connection> {
    let c = rustls::ServerConnection::new(config.clone()).map_err(io::Error::other)?;
    Ok(rustls::Connection::Server(c))
}

/// A fresh client-side connection to `tls.server_name`.
///
/// # Errors
/// As [`server_conn`].
pub fn client_conn(tls: &ClientTls) -> io::Result<rustls::Connection> {
    let c = rustls::ClientConnection::new(tls.config.clone(), tls.server_name.clone())
        .map_err(io::Error::other)?;
    Ok(rustls::Connection::Client(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA and leaf certificates signed by it, written to a temporary folder.
    struct Pki {
        dir: PathBuf,
        ca: rcgen::Certificate,
        ca_key: rcgen::KeyPair,
    }

    impl Pki {
        fn new(tag: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("wsedge-tls-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let ca_key = rcgen::KeyPair::generate().unwrap();
            let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            p.distinguished_name
                .push(rcgen::DnType::CommonName, "test CA");
            let ca = p.self_signed(&ca_key).unwrap();
            std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
            Self { dir, ca, ca_key }
        }

        /// A leaf for `names` (SANs) with common name `cn`; returns its files.
        fn leaf(&self, file: &str, cn: &str, names: &[&str]) -> CertFiles {
            let key = rcgen::KeyPair::generate().unwrap();
            let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
            let mut p = rcgen::CertificateParams::new(names).unwrap();
            p.distinguished_name.push(rcgen::DnType::CommonName, cn);
            let cert = p.signed_by(&key, &self.ca, &self.ca_key).unwrap();
            let files = CertFiles {
                cert: self.dir.join(format!("{file}.pem")),
                key: self.dir.join(format!("{file}.key")),
            };
            std::fs::write(&files.cert, cert.pem()).unwrap();
            std::fs::write(&files.key, key.serialize_pem()).unwrap();
            files
        }

        fn ca(&self) -> PathBuf {
            self.dir.join("ca.pem")
        }
    }

    impl Drop for Pki {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// Run the handshake between two in-memory connections; the error of the side that
    /// failed, if any.
    fn handshake(c: &mut rustls::Connection, s: &mut rustls::Connection) -> io::Result<()> {
        let mut plain = BytesMut::new();
        for _ in 0..10 {
            let mut wire = Vec::new();
            take_output(c, &mut wire)?;
            decrypt(s, &wire, &mut plain)?;
            wire.clear();
            take_output(s, &mut wire)?;
            decrypt(c, &wire, &mut plain)?;
            if !c.is_handshaking() && !s.is_handshaking() {
                assert!(plain.is_empty());
                return Ok(());
            }
        }
        panic!("handshake did not finish");
    }

    fn server(pki: &Pki, auth: ClientAuth, sni: Vec<SniCert>) -> ServerTls {
        let leaf = pki.leaf("default", "default", &["localhost"]);
        ServerTls::new(leaf, sni, auth, Some(pki.ca()), MinVersion::Tls12).unwrap()
    }

    #[test]
    fn small_pieces_are_gathered_into_few_records() {
        let pki = Pki::new("vectored");
        let srv = server(&pki, ClientAuth::None, vec![]);
        let cli = ClientTls::new("localhost", Some(pki.ca()), None, false).unwrap();
        let (mut c, mut s) = (
            client_conn(&cli).unwrap(),
            server_conn(&srv.config).unwrap(),
        );
        handshake(&mut c, &mut s).unwrap();
        let mut wire = Vec::new();
        take_output(&mut s, &mut wire).unwrap(); // tickets
        let mut plain = BytesMut::new();
        decrypt(&mut c, &wire, &mut plain).unwrap();
        let small: Vec<Vec<u8>> = (0..100u8).map(|i| vec![i; 64]).collect();
        let big = vec![0xEEu8; 20_000];
        let mut parts: Vec<&[u8]> = small.iter().map(|v| &v[..]).collect();
        parts.insert(50, &big);
        let mut wire = Vec::new();
        encrypt_vectored(&mut s, &parts, &mut wire).unwrap();
        // Records: the 50 small pieces before the big one, the big one (two records), the
        // 50 after it. A record header is 5 bytes and starts with content type 23.
        let mut records = 0;
        let mut at = 0;
        while at < wire.len() {
            assert_eq!(wire[at], 23);
            records += 1;
            at += 5 + u16::from_be_bytes([wire[at + 3], wire[at + 4]]) as usize;
        }
        assert_eq!(records, 4, "{records} records");
        let mut plain = BytesMut::new();
        decrypt(&mut c, &wire, &mut plain).unwrap();
        assert_eq!(&plain[..], &parts.concat()[..]);
    }

    #[test]
    fn data_both_ways_then_close_notify() {
        let pki = Pki::new("data");
        let srv = server(&pki, ClientAuth::None, vec![]);
        let cli = ClientTls::new("localhost", Some(pki.ca()), None, false).unwrap();
        let (mut c, mut s) = (
            client_conn(&cli).unwrap(),
            server_conn(&srv.config).unwrap(),
        );
        handshake(&mut c, &mut s).unwrap();
        assert_eq!(s.alpn_protocol(), Some(ALPN_HTTP11));
        // 40 KiB: three records one way, in one encrypt call.
        let big = vec![7u8; 40 * 1024];
        let mut wire = Vec::new();
        encrypt(&mut c, &big, &mut wire).unwrap();
        let mut plain = BytesMut::new();
        // Fed in small pieces, as reads may deliver it.
        for piece in wire.chunks(1000) {
            assert_eq!(decrypt(&mut s, piece, &mut plain).unwrap(), Inbound::Open);
        }
        assert_eq!(&plain[..], &big[..]);
        let mut wire = Vec::new();
        encrypt(&mut s, b"back", &mut wire).unwrap();
        s.send_close_notify();
        take_output(&mut s, &mut wire).unwrap();
        let mut plain = BytesMut::new();
        assert_eq!(decrypt(&mut c, &wire, &mut plain).unwrap(), Inbound::Closed);
        assert_eq!(&plain[..], b"back");
    }

    #[test]
    fn sni_picks_the_certificate_exact_then_wildcard_then_default() {
        let pki = Pki::new("sni");
        let a = pki.leaf("a", "a", &["a.example"]);
        let w = pki.leaf("w", "w", &["*.wild.example"]);
        let srv = server(
            &pki,
            ClientAuth::None,
            vec![
                SniCert {
                    names: vec!["a.example".into()],
                    files: a,
                },
                SniCert {
                    names: vec!["*.wild.example".into()],
                    files: w,
                },
            ],
        );
        for (name, cn) in [
            ("a.example", "a"),
            ("x.wild.example", "w"),
            ("localhost", "default"),
        ] {
            let cli = ClientTls::new(name, Some(pki.ca()), None, false).unwrap();
            let (mut c, mut s) = (
                client_conn(&cli).unwrap(),
                server_conn(&srv.config).unwrap(),
            );
            handshake(&mut c, &mut s).unwrap();
            let certs = c.peer_certificates().unwrap();
            let id = PeerIdentity::from_der(&certs[0]).unwrap();
            assert_eq!(id.common_name.as_deref(), Some(cn), "for {name}");
        }
    }

    #[test]
    fn required_client_certificate_and_its_identity() {
        let pki = Pki::new("mtls");
        let srv = server(&pki, ClientAuth::Required, vec![]);
        // Without a certificate: the server refuses.
        let cli = ClientTls::new("localhost", Some(pki.ca()), None, false).unwrap();
        let (mut c, mut s) = (
            client_conn(&cli).unwrap(),
            server_conn(&srv.config).unwrap(),
        );
        let err = handshake(&mut c, &mut s).unwrap_err();
        assert!(err.to_string().contains("certificate"), "{err}");
        // With one.
        let mine = pki.leaf("client", "client-7", &["svc.internal"]);
        let cli = ClientTls::new("localhost", Some(pki.ca()), Some(mine), false).unwrap();
        let (mut c, mut s) = (
            client_conn(&cli).unwrap(),
            server_conn(&srv.config).unwrap(),
        );
        handshake(&mut c, &mut s).unwrap();
        let id = PeerIdentity::from_der(&s.peer_certificates().unwrap()[0]).unwrap();
        assert_eq!(id.common_name.as_deref(), Some("client-7"));
        assert_eq!(id.alt_names, ["svc.internal"]);
        assert!(id.is_any_of(&["svc.internal".into()]));
        assert!(!id.is_any_of(&["other".into()]));
    }

    #[test]
    fn wrong_ca_and_wrong_name_fail_verification() {
        let pki = Pki::new("verify");
        let other = Pki::new("verify-other");
        let srv = server(&pki, ClientAuth::None, vec![]);
        for (name, ca) in [("localhost", other.ca()), ("elsewhere", pki.ca())] {
            let cli = ClientTls::new(name, Some(ca), None, false).unwrap();
            let (mut c, mut s) = (
                client_conn(&cli).unwrap(),
                server_conn(&srv.config).unwrap(),
            );
            let err = handshake(&mut c, &mut s).unwrap_err();
            assert!(
                err.to_string().contains("invalid peer certificate"),
                "{err}"
            );
        }
        // insecure_skip_verify takes any certificate.
        let cli = ClientTls::new("elsewhere", None, None, true).unwrap();
        let (mut c, mut s) = (
            client_conn(&cli).unwrap(),
            server_conn(&srv.config).unwrap(),
        );
        handshake(&mut c, &mut s).unwrap();
    }

    #[test]
    fn bad_files_are_named_in_the_error() {
        let pki = Pki::new("files");
        let a = pki.leaf("a", "a", &["a"]);
        let b = pki.leaf("b", "b", &["b"]);
        let mixed = CertFiles {
            cert: a.cert.clone(),
            key: b.key.clone(),
        };
        let err =
            ServerTls::new(mixed, vec![], ClientAuth::None, None, MinVersion::Tls12).unwrap_err();
        assert!(err.contains("do not go together"), "{err}");
        let missing = CertFiles {
            cert: pki.dir.join("nope.pem"),
            key: a.key.clone(),
        };
        let err =
            ServerTls::new(missing, vec![], ClientAuth::None, None, MinVersion::Tls12).unwrap_err();
        assert!(err.contains("nope.pem"), "{err}");
        let err =
            ServerTls::new(a, vec![], ClientAuth::Required, None, MinVersion::Tls12).unwrap_err();
        assert!(err.contains("client_ca"), "{err}");
    }

    #[test]
    fn reload_keeps_session_state_and_takes_the_new_certificate() {
        let pki = Pki::new("reload");
        let mut srv = server(&pki, ClientAuth::None, vec![]);
        let before = srv.config.clone();
        // Replace the default certificate's files.
        let fresh = pki.leaf("default", "renewed", &["localhost"]);
        assert_eq!(fresh, srv.default);
        let new = srv.reload().unwrap();
        assert!(Arc::ptr_eq(&new.ticketer, &before.ticketer));
        assert!(Arc::ptr_eq(&new, &srv.config));
        let cli = ClientTls::new("localhost", Some(pki.ca()), None, false).unwrap();
        let (mut c, mut s) = (client_conn(&cli).unwrap(), server_conn(&new).unwrap());
        handshake(&mut c, &mut s).unwrap();
        let id = PeerIdentity::from_der(&c.peer_certificates().unwrap()[0]).unwrap();
        assert_eq!(id.common_name.as_deref(), Some("renewed"));
    }

    /// Give the client what the server sent after the handshake (TLS 1.3 session tickets).
    fn deliver_tickets(c: &mut rustls::Connection, s: &mut rustls::Connection) {
        let mut wire = Vec::new();
        take_output(s, &mut wire).unwrap();
        let mut plain = BytesMut::new();
        decrypt(c, &wire, &mut plain).unwrap();
    }

    #[test]
    fn sessions_resume_also_across_a_reload() {
        let pki = Pki::new("resume");
        let mut srv = server(&pki, ClientAuth::None, vec![]);
        let cli = ClientTls::new("localhost", Some(pki.ca()), None, false).unwrap();
        let (mut c, mut s) = (
            client_conn(&cli).unwrap(),
            server_conn(&srv.config).unwrap(),
        );
        handshake(&mut c, &mut s).unwrap();
        assert_eq!(c.handshake_kind(), Some(rustls::HandshakeKind::Full));
        deliver_tickets(&mut c, &mut s);
        // A new certificate is loaded; the ticket issued before still resumes.
        pki.leaf("default", "renewed", &["localhost"]);
        let reloaded = srv.reload().unwrap();
        let (mut c, mut s) = (client_conn(&cli).unwrap(), server_conn(&reloaded).unwrap());
        handshake(&mut c, &mut s).unwrap();
        assert_eq!(c.handshake_kind(), Some(rustls::HandshakeKind::Resumed));
        // Without resumption on the client, every handshake is full.
        let full = cli.clone().without_resumption();
        for _ in 0..2 {
            let (mut c, mut s) = (client_conn(&full).unwrap(), server_conn(&reloaded).unwrap());
            handshake(&mut c, &mut s).unwrap();
            deliver_tickets(&mut c, &mut s);
            assert_eq!(c.handshake_kind(), Some(rustls::HandshakeKind::Full));
        }
    }

    /// With client certificates required, a session resumes across a reload that keeps the
    /// client CA, and does not across one that changes it: a resumed session is not verified
    /// again, so a client whose certificate the new CA does not sign must be refused.
    #[test]
    fn a_changed_client_ca_ends_session_resumption() {
        let pki = Pki::new("resume-mtls");
        let mut srv = server(&pki, ClientAuth::Required, vec![]);
        let mine = pki.leaf("client", "client-1", &["svc.internal"]);
        let cli = ClientTls::new("localhost", Some(pki.ca()), Some(mine), false).unwrap();
        let connect = |config: &Arc<ServerConfig>| {
            let (mut c, mut s) = (client_conn(&cli).unwrap(), server_conn(config).unwrap());
            let r = handshake(&mut c, &mut s);
            if r.is_ok() {
                deliver_tickets(&mut c, &mut s);
            }
            r.map(|()| c.handshake_kind())
        };
        assert_eq!(
            connect(&srv.config).unwrap(),
            Some(rustls::HandshakeKind::Full)
        );
        // The same CA: sessions survive the reload.
        let same = srv.reload().unwrap();
        assert_eq!(
            connect(&same).unwrap(),
            Some(rustls::HandshakeKind::Resumed)
        );
        // Another CA in the same file: the old session must not let the client in.
        let other = Pki::new("resume-mtls-other");
        std::fs::copy(other.ca(), pki.ca()).unwrap();
        let changed = srv.reload().unwrap();
        assert!(!Arc::ptr_eq(&changed.ticketer, &same.ticketer));
        let err = connect(&changed).unwrap_err();
        assert!(err.to_string().contains("certificate"), "{err}");
    }

    #[test]
    fn min_version_1_3_refuses_a_tls_1_2_client() {
        let pki = Pki::new("version");
        let leaf = pki.leaf("default", "default", &["localhost"]);
        let srv = ServerTls::new(leaf, vec![], ClientAuth::None, None, MinVersion::Tls13).unwrap();
        let cli = ClientTls::new("localhost", Some(pki.ca()), None, false).unwrap();
        let roots = {
            let mut r = RootCertStore::empty();
            for c in load_certs(&pki.ca()).unwrap() {
                r.add(c).unwrap();
            }
            r
        };
        let cfg12 = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = ServerName::try_from("localhost").unwrap();
        let mut c = rustls::Connection::Client(
            rustls::ClientConnection::new(Arc::new(cfg12), name).unwrap(),
        );
        let mut s = server_conn(&srv.config).unwrap();
        let err = handshake(&mut c, &mut s).unwrap_err();
        assert!(err.to_string().contains("incompatible"), "{err}");
        // A default client negotiates TLS 1.3 with it.
        let (mut c, mut s) = (
            client_conn(&cli).unwrap(),
            server_conn(&srv.config).unwrap(),
        );
        handshake(&mut c, &mut s).unwrap();
        assert_eq!(c.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
    }
}
