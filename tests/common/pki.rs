//! Certificates for TLS tests, generated per test with rcgen and written to a temporary
//! folder: a CA, server and client leaves signed by it (optionally expired), and a blocking
//! rustls client to talk to a wss listener.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// A CA in a temporary folder (removed on drop).
pub struct Pki {
    pub dir: PathBuf,
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

/// A leaf certificate's files.
#[derive(Clone, Debug)]
pub struct Leaf {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Pki {
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("wsedge-pki-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, format!("{tag} CA"));
        let ca = p.self_signed(&ca_key).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        Self { dir, ca, ca_key }
    }

    /// The CA certificate file.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A leaf named `cn` for the DNS/IP names `sans`, written as `<file>.pem` / `<file>.key`
    /// (overwriting: used to rotate a certificate in place).
    pub fn leaf(&self, file: &str, cn: &str, sans: &[&str]) -> Leaf {
        self.leaf_with(file, cn, sans, false)
    }

    /// As [`Pki::leaf`]; `expired` makes it valid only in 2020.
    pub fn leaf_with(&self, file: &str, cn: &str, sans: &[&str], expired: bool) -> Leaf {
        let key = rcgen::KeyPair::generate().unwrap();
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut p = rcgen::CertificateParams::new(sans).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        if expired {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2020, 12, 31);
        }
        let cert = p.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        let leaf = Leaf {
            cert: self.dir.join(format!("{file}.pem")),
            key: self.dir.join(format!("{file}.key")),
        };
        // Write to a temporary name and rename, so a reload never sees half a file.
        for (path, text) in [(&leaf.cert, cert.pem()), (&leaf.key, key.serialize_pem())] {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, path).unwrap();
        }
        leaf
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TLS connection as the tests' blocking client uses it.
pub type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// Connect to `addr` over TLS as `server_name`, trusting `ca`, presenting `client` if given;
/// the handshake is completed here, so a refused certificate is this function's error.
pub fn tls_connect(
    addr: SocketAddr,
    server_name: &str,
    ca: &Path,
    client: Option<&Leaf>,
) -> Result<TlsStream, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match client {
        Some(l) => {
            let chain = CertificateDer::pem_file_iter(&l.cert)
                .unwrap()
                .map(|c| c.unwrap())
                .collect();
            let key = PrivateKeyDer::from_pem_file(&l.key).unwrap();
            b.with_client_auth_cert(chain, key).unwrap()
        }
        None => b.with_no_client_auth(),
    };
    let name = ServerName::try_from(server_name.to_string()).unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut tcp = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(super::READ_TIMEOUT)).unwrap();
    tcp.set_nodelay(true).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).map_err(|e| e.to_string())?;
    }
    // (TLS 1.3: a server that refuses the client's certificate says so after the client
    // finished; the alert surfaces at the first read, i.e. the upgrade.)
    Ok(rustls::StreamOwned::new(conn, tcp))
}

/// The subject common name of the certificate the server presented.
pub fn server_cn(s: &TlsStream) -> String {
    let der = &s.conn.peer_certificates().unwrap()[0];
    wsedge::tls::PeerIdentity::from_der(der)
        .unwrap()
        .common_name
        .unwrap()
}
