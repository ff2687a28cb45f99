//! How the engine is reached, read as the docker CLI reads it: the address
//! (`--engine`, `DOCKER_HOST`) and, over TCP, TLS (`--tls`, `--tlsverify`,
//! `--tlscacert`, `--tlscert`, `--tlskey`, `DOCKER_TLS`, `DOCKER_TLS_VERIFY`,
//! `DOCKER_CERT_PATH`); the rustls client (ring, like the registry client)
//! built from the certificate files; bollard's transport and the raw
//! client's stream over it; TLS failures as [`TlsError`]s that say which
//! file or which side; and whether registry credentials may cross the
//! connection (never in clear text to another host, unless allowed).
//!
//! bollard's own `connect_with_ssl` (feature `ssl`) is not used: it trusts
//! the host's CA store beside the given CA (the docker CLI trusts only the
//! given one), cannot skip verification (`--tls` without `--tlsverify`),
//! needs a process-wide rustls provider, and reads the key at each handshake,
//! so an unreadable key becomes the engine's refusal instead of an error
//! naming the file.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bollard::{BollardRequest, Docker};
use hyper_rustls::ConfigBuilderExt as _;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::ClientConfig;
use rustls::client::danger::ServerCertVerified;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::tls_check::{CertCheck, Checked};

/// The engine's address when nothing names one: the local socket, or with
/// TLS the docker CLI's `tcp://localhost:2376`.
const DEFAULT_ADDRESS: &str = "unix:///var/run/docker.sock";
/// Podman's rootful socket (`podman.socket`); the rootless one is
/// `$XDG_RUNTIME_DIR/podman/podman.sock`.
const PODMAN_SOCKET: &str = "/run/podman/podman.sock";
const DEFAULT_TLS_ADDRESS: &str = "tcp://localhost:2376";
/// The docker CLI's port for `tcp://HOST` without one; `https://HOST` gets
/// the TLS port.
const DEFAULT_PORT: u16 = 2375;
const DEFAULT_TLS_PORT: u16 = 2376;
/// Idle TLS connections are kept this long: a handshake per call would
/// double the round trips of a reconcile's many small calls.
const POOL_IDLE: Duration = Duration::from_secs(30);

/// The command line's say on how to reach the engine. `None` leaves a
/// setting to the environment, as the docker CLI does.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// `--engine`: else `DOCKER_HOST`, else the local socket
    /// (`tcp://localhost:2376` when TLS is on).
    pub address: Option<String>,
    /// `--tls[=BOOL]`: TLS to a `tcp://` engine, without verifying it unless
    /// `--tlsverify`; else `DOCKER_TLS` non-empty.
    pub tls: Option<bool>,
    /// `--tlsverify[=BOOL]`: given at all, TLS is on; `true` verifies the
    /// engine's certificate. Else `DOCKER_TLS_VERIFY` non-empty (any value,
    /// `0` included, verifies: the docker CLI reads it so).
    pub tls_verify: Option<bool>,
    /// `--tlscacert`: else `ca.pem` in the certificate folder. An empty
    /// path: the host's CA store.
    pub ca_cert: Option<PathBuf>,
    /// `--tlscert`/`--tlskey`: the client certificate and its key; else
    /// `cert.pem` and `key.pem` in the certificate folder when they exist.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// `--allow-plaintext-credentials`: registry credentials may go to a
    /// `tcp://` engine on another host without TLS.
    pub allow_plaintext_credentials: bool,
}

/// The docker CLI's environment, read once.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct DockerEnv {
    /// `DOCKER_HOST`, when not empty.
    pub host: Option<String>,
    /// `DOCKER_TLS` is not empty.
    pub tls: bool,
    /// `DOCKER_TLS_VERIFY` is not empty.
    pub tls_verify: bool,
    /// `DOCKER_CERT_PATH`, else the docker config folder (`DOCKER_CONFIG`,
    /// else `~/.docker`).
    pub cert_dir: Option<PathBuf>,
    /// The local socket when nothing names an address (see
    /// [`local_socket`]); `None`: Docker's.
    pub local_socket: Option<String>,
}

impl DockerEnv {
    pub(super) fn from_process() -> DockerEnv {
        let runtime_dir = std::env::var("XDG_RUNTIME_DIR").ok();
        DockerEnv {
            local_socket: Some(local_socket(runtime_dir.as_deref(), |p| {
                std::path::Path::new(p).exists()
            })),
            ..DockerEnv::from_vars(|name| std::env::var(name).ok())
        }
    }

    /// Set means not empty, whatever the value: `DOCKER_TLS_VERIFY=0`
    /// verifies, as it does for the docker CLI.
    fn from_vars(var: impl Fn(&str) -> Option<String>) -> DockerEnv {
        let var = |name| var(name).filter(|v| !v.is_empty());
        DockerEnv {
            host: var("DOCKER_HOST").filter(|v| !v.trim().is_empty()),
            tls: var("DOCKER_TLS").is_some(),
            tls_verify: var("DOCKER_TLS_VERIFY").is_some(),
            cert_dir: var("DOCKER_CERT_PATH")
                .map(PathBuf::from)
                .or_else(crate::credentials::docker_config_dir),
            local_socket: None,
        }
    }
}

/// The local socket when no address is given: Docker's, else (when it
/// does not exist) Podman's rootful then rootless one, else Docker's (for
/// the message).
fn local_socket(runtime_dir: Option<&str>, exists: impl Fn(&str) -> bool) -> String {
    let docker = DEFAULT_ADDRESS.trim_start_matches("unix://");
    let rootless = runtime_dir.map(|d| format!("{}/podman/podman.sock", d.trim_end_matches('/')));
    [
        Some(docker.to_owned()),
        Some(PODMAN_SOCKET.to_owned()),
        rootless,
    ]
    .into_iter()
    .flatten()
    .find(|p| exists(p))
    .map_or_else(|| DEFAULT_ADDRESS.to_owned(), |p| format!("unix://{p}"))
}

/// Where the engine listens and how, resolved from options and environment.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Target {
    Unix(String),
    /// `host:port`, plain text.
    Tcp(String),
    /// `host:port` over TLS.
    Tls(String, TlsFiles),
}

/// The TLS settings of a [`Target::Tls`], before any file is read.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct TlsFiles {
    /// Whether the engine's certificate is verified (`--tlsverify`).
    pub verify: bool,
    /// The CA to verify against, alone; `None`: the host's CA store.
    pub ca: Option<PathBuf>,
    /// The client certificate and key. A path given on the command line
    /// must be readable; a default one is used only when it exists.
    pub cert: Option<Given>,
    pub key: Option<Given>,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Given {
    /// Named on the command line.
    Flag(PathBuf),
    /// In the certificate folder, used when present.
    Default(PathBuf),
}

/// The address as shown, and where it leads. Sockets carry no TLS (the
/// docker CLI ignores its TLS settings for them too).
pub(super) fn resolve(
    options: &ConnectOptions,
    env: &DockerEnv,
) -> Result<(String, Target), String> {
    // `--tlsverify` given at all (true or false), or DOCKER_TLS_VERIFY set,
    // turns TLS on; `--tls` or DOCKER_TLS alone turns it on unverified.
    let verify_said = options.tls_verify.is_some() || env.tls_verify;
    let verify = options.tls_verify.unwrap_or(env.tls_verify);
    let tls_said = options.tls.unwrap_or(env.tls);
    let tls = tls_said || verify_said;
    let address = options
        .address
        .clone()
        .filter(|a| !a.trim().is_empty())
        .or_else(|| env.host.clone())
        .unwrap_or_else(|| {
            if tls {
                DEFAULT_TLS_ADDRESS.to_owned()
            } else {
                env.local_socket
                    .clone()
                    .unwrap_or_else(|| DEFAULT_ADDRESS.to_owned())
            }
        });
    let address = address.trim().to_owned();
    let files = |verify: bool| tls_files(options, env, verify);

    let target = if let Some(path) = address
        .strip_prefix("unix://")
        .or_else(|| address.starts_with('/').then_some(address.as_str()))
    {
        Target::Unix(path.to_owned())
    } else if let Some(rest) = address.strip_prefix("tcp://") {
        let port = DEFAULT_PORT;
        let host = host_port(rest, port)?;
        if tls {
            Target::Tls(host, files(verify))
        } else {
            Target::Tcp(host)
        }
    } else if let Some(rest) = address.strip_prefix("https://") {
        // TLS by its scheme: verified unless `--tls` (or DOCKER_TLS) alone
        // asked for TLS without verification.
        let verify = if verify_said { verify } else { !tls_said };
        Target::Tls(host_port(rest, DEFAULT_TLS_PORT)?, files(verify))
    } else if let Some(rest) = address.strip_prefix("http://") {
        if tls {
            return Err(format!(
                "{address} is plain HTTP, but TLS is asked for (--tls, --tlsverify, \
                 DOCKER_TLS or DOCKER_TLS_VERIFY): use tcp://HOST:PORT or https://HOST:PORT"
            ));
        }
        Target::Tcp(host_port(rest, DEFAULT_PORT)?)
    } else {
        return Err(
            "unsupported address (use unix:///PATH, tcp://HOST:PORT, https://HOST:PORT or \
             http://HOST:PORT)"
                .to_owned(),
        );
    };
    Ok((address, target))
}

/// `host:port` from what follows the scheme: a path or trailing `/` cut
/// off, the port added when missing, an empty host as `localhost`.
fn host_port(rest: &str, default_port: u16) -> Result<String, String> {
    let hostport = rest.split('/').next().unwrap_or_default();
    let (host, port) = match hostport.rsplit_once(':') {
        // `[::1]` alone: the colon is inside the brackets.
        Some((h, p)) if !p.contains(']') => (h, Some(p)),
        _ => (hostport, None),
    };
    let port = match port {
        Some(p) => p
            .parse::<u16>()
            .map_err(|_| format!("{p:?} is not a port number"))?,
        None => default_port,
    };
    let host = if host.is_empty() { "localhost" } else { host };
    Ok(format!("{host}:{port}"))
}

fn tls_files(options: &ConnectOptions, env: &DockerEnv, verify: bool) -> TlsFiles {
    let in_dir = |name: &str| env.cert_dir.as_ref().map(|d| d.join(name));
    let given = |flag: &Option<PathBuf>, name: &str| match flag {
        Some(p) if p.as_os_str().is_empty() => None,
        Some(p) => Some(Given::Flag(p.clone())),
        None => in_dir(name).map(Given::Default),
    };
    let ca = match &options.ca_cert {
        Some(p) if p.as_os_str().is_empty() => None,
        Some(p) => Some(p.clone()),
        None => in_dir("ca.pem"),
    };
    TlsFiles {
        verify,
        // Without verification no CA is read (the docker CLI still insists
        // that ca.pem exists; nothing would use it).
        ca: ca.filter(|_| verify),
        cert: given(&options.cert, "cert.pem"),
        key: given(&options.key, "key.pem"),
    }
}

/// Why TLS to the engine could not be set up or was refused.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the {what} {}: {reason}", path.display())]
    Unreadable {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("no {what} in {} (PEM expected)", path.display())]
    NoPem { what: &'static str, path: PathBuf },
    #[error(
        "the client certificate {} has no key: {} {}",
        cert.display(), key.as_ref().map_or("none given".to_owned(), |k| k.display().to_string()),
        if key.is_some() { "is missing (--tlskey)" } else { "(--tlskey)" }
    )]
    MissingKey { cert: PathBuf, key: Option<PathBuf> },
    #[error(
        "the client key {} has no certificate: {} {}",
        key.display(), cert.as_ref().map_or("none given".to_owned(), |c| c.display().to_string()),
        if cert.is_some() { "is missing (--tlscert)" } else { "(--tlscert)" }
    )]
    MissingCert { key: PathBuf, cert: Option<PathBuf> },
    #[error("the client key {} does not go with {}: {reason}", key.display(), cert.display())]
    BadKey {
        key: PathBuf,
        cert: PathBuf,
        reason: String,
    },
    #[error(
        "no trusted CA certificates on this host to verify the engine against ({0}); name one with --tlscacert"
    )]
    NoSystemRoots(String),
    #[error("{0:?} is not a host name or address a certificate can be checked against")]
    BadName(String),
    #[error("the engine's certificate does not verify against {against}: {reason}")]
    ServerCertificate { against: String, reason: String },
    #[error("{}", client_refused(sent.as_deref(), alert))]
    ClientRefused {
        /// The client certificate sent, if any.
        sent: Option<PathBuf>,
        alert: String,
    },
    #[error(
        "the engine answers in plain HTTP, not TLS: use tcp:// without --tls/--tlsverify (and \
         DOCKER_TLS, DOCKER_TLS_VERIFY unset), or give its TLS address"
    )]
    NotTls,
    #[error(
        "the engine speaks only TLS here and refused plain HTTP: connect with --tlsverify and \
         its certificates (--tlscacert, --tlscert, --tlskey), or DOCKER_TLS_VERIFY=1 and \
         DOCKER_CERT_PATH"
    )]
    EngineWantsTls,
    #[error("TLS handshake failed: {0}")]
    Handshake(String),
}

fn client_refused(sent: Option<&Path>, alert: &str) -> String {
    match sent {
        None => format!(
            "the engine requires a client certificate and none was given (--tlscert and \
             --tlskey, or cert.pem and key.pem in DOCKER_CERT_PATH); it answered {alert}"
        ),
        Some(cert) => format!(
            "the engine refused the client certificate {} (it answered {alert})",
            cert.display()
        ),
    }
}

/// The TLS client of one engine address, and what its errors refer to.
#[derive(Debug, Clone)]
pub(super) struct TlsClient {
    pub config: Arc<ClientConfig>,
    /// The name the engine's certificate must carry.
    pub name: ServerName<'static>,
    /// What the engine's certificate is checked against, for messages.
    against: String,
    /// The client certificate sent, for messages.
    sent: Option<PathBuf>,
}

impl TlsClient {
    /// Reads the certificate files (every failure names its file) and
    /// builds the client for `host` (`host:port`).
    pub(super) fn new(host: &str, files: &TlsFiles) -> Result<TlsClient, TlsError> {
        let hostname = host_of(host);
        let name = ServerName::try_from(hostname.to_owned())
            .map_err(|_| TlsError::BadName(hostname.to_owned()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Handshake(e.to_string()))?;
        let (builder, against) = match (files.verify, &files.ca) {
            (false, _) => (
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(Checked::new(
                        AnyServerCert,
                        &provider,
                    ))),
                "nothing (not verified: --tls without --tlsverify)".to_owned(),
            ),
            (true, Some(ca)) => {
                let mut roots = rustls::RootCertStore::empty();
                let pem = read(ca, "CA certificate")?;
                let certs = CertificateDer::pem_slice_iter(&pem)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|_| no_pem("CA certificate", ca))?;
                let (added, _) = roots.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(no_pem("CA certificate", ca));
                }
                (
                    builder.with_root_certificates(roots),
                    ca.display().to_string(),
                )
            }
            (true, None) => (
                builder
                    .with_native_roots()
                    .map_err(|e| TlsError::NoSystemRoots(e.to_string()))?,
                "the host's CA certificates".to_owned(),
            ),
        };
        let (cert, key) = client_pair(files)?;
        let config = match (&cert, &key) {
            (Some(cert), Some(key)) => {
                let chain = CertificateDer::pem_slice_iter(&read(cert, "client certificate")?)
                    .collect::<Result<Vec<_>, _>>()
                    .ok()
                    .filter(|c| !c.is_empty())
                    .ok_or_else(|| no_pem("client certificate", cert))?;
                let der = PrivateKeyDer::from_pem_slice(&read(key, "client key")?)
                    .map_err(|_| no_pem("private key (unencrypted PKCS#8, PKCS#1 or SEC1)", key))?;
                builder
                    .with_client_auth_cert(chain, der)
                    .map_err(|e| TlsError::BadKey {
                        key: key.clone(),
                        cert: cert.clone(),
                        reason: e.to_string(),
                    })?
            }
            _ => builder.with_no_client_auth(),
        };
        Ok(TlsClient {
            config: Arc::new(config),
            name,
            against,
            sent: cert,
        })
    }

    /// The TLS failure inside `err`, told in words about this client's
    /// files; `None` when the failure was not TLS's.
    pub(super) fn explain(&self, err: &(dyn std::error::Error + 'static)) -> Option<TlsError> {
        use rustls::{AlertDescription as A, CertificateError as C, Error as E, InvalidMessage};
        Some(match find_rustls(err)? {
            E::InvalidCertificate(c) => TlsError::ServerCertificate {
                against: self.against.clone(),
                reason: match c {
                    C::UnknownIssuer => "it is signed by an unknown CA".to_owned(),
                    C::NotValidForName | C::NotValidForNameContext { .. } => {
                        format!("it is not valid for {}", self.name.to_str())
                    }
                    C::Expired | C::ExpiredContext { .. } => "it has expired".to_owned(),
                    C::NotValidYet | C::NotValidYetContext { .. } => {
                        "it is not valid yet".to_owned()
                    }
                    other => format!("{other:?}"),
                },
            },
            E::AlertReceived(
                alert @ (A::CertificateRequired
                | A::BadCertificate
                | A::UnknownCA
                | A::CertificateUnknown
                | A::CertificateExpired
                | A::CertificateRevoked
                | A::UnsupportedCertificate
                | A::AccessDenied),
            ) => TlsError::ClientRefused {
                sent: self.sent.clone(),
                alert: format!("{alert:?}"),
            },
            E::InvalidMessage(InvalidMessage::InvalidContentType)
            | E::InvalidMessage(InvalidMessage::UnknownProtocolVersion) => TlsError::NotTls,
            other => TlsError::Handshake(other.to_string()),
        })
    }

    /// bollard over this client: HTTP/1 on rustls, idle connections kept
    /// briefly. bollard's timeout bounds each answer's headers.
    pub(super) fn docker(
        &self,
        host: &str,
        timeout: Duration,
        version: &bollard::ClientVersion,
    ) -> Result<Docker, String> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*self.config).clone())
            .https_only()
            .with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(
                self.name.clone(),
            ))
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .build(https);
        Docker::connect_with_custom_transport(
            move |req: BollardRequest| {
                let answer = client.request(req);
                async move { answer.await.map_err(bollard::errors::Error::from) }
            },
            Some(format!("https://{host}")),
            timeout.as_secs(),
            version,
        )
        .map_err(|e| e.to_string())
    }

    /// A TLS stream to `host` for the raw client.
    pub(super) async fn stream(
        &self,
        host: &str,
    ) -> io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let tcp = tokio::net::TcpStream::connect(host).await?;
        tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(self.name.clone(), tcp)
            .await
    }
}

/// The client certificate and key to send: both or neither. A default file
/// that does not exist is not sent (as the docker CLI does); one of the two
/// without the other is an error.
fn client_pair(files: &TlsFiles) -> Result<(Option<PathBuf>, Option<PathBuf>), TlsError> {
    let present = |g: &Option<Given>| match g {
        Some(Given::Flag(p)) => Some(p.clone()),
        Some(Given::Default(p)) if p.exists() => Some(p.clone()),
        _ => None,
    };
    let path = |g: &Option<Given>| match g {
        Some(Given::Flag(p) | Given::Default(p)) => Some(p.clone()),
        None => None,
    };
    match (present(&files.cert), present(&files.key)) {
        (Some(cert), None) => Err(TlsError::MissingKey {
            cert,
            key: path(&files.key),
        }),
        (None, Some(key)) => Err(TlsError::MissingCert {
            key,
            cert: path(&files.cert),
        }),
        pair => Ok(pair),
    }
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Unreadable {
        what,
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

fn no_pem(what: &'static str, path: &Path) -> TlsError {
    TlsError::NoPem {
        what,
        path: path.to_owned(),
    }
}

/// The rustls error somewhere in `err`'s chain. An `io::Error`'s `source()`
/// skips the error it wraps (hyper-rustls wraps one `io::Error` in another),
/// so the walk goes into it instead.
fn find_rustls<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(found) = e.downcast_ref::<rustls::Error>() {
            return Some(found);
        }
        next = match e.downcast_ref::<io::Error>().and_then(|io| io.get_ref()) {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    None
}

/// The host of `host:port`, without the brackets of an IPv6 address.
pub(super) fn host_of(hostport: &str) -> &str {
    let host = match hostport.rsplit_once(':') {
        Some((h, p)) if !p.contains(']') => h,
        _ => hostport,
    };
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// Whether `host:port` is this host's loopback: `localhost`, 127.0.0.0/8,
/// `::1` (IPv4-mapped too). Any other name counts as another host.
pub(super) fn is_loopback(hostport: &str) -> bool {
    crate::refs::is_loopback_host(host_of(hostport))
}

/// `--tls` without `--tlsverify`: the engine's certificate is taken as it
/// is (the docker CLI's `InsecureSkipVerify`); the handshake's signatures
/// are still checked, so the session is with whoever holds that key.
#[derive(Debug)]
struct AnyServerCert;

impl CertCheck for AnyServerCert {
    fn check(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn podman_sockets_serve_when_dockers_is_missing() {
        let only = |there: &'static [&'static str]| move |p: &str| there.contains(&p);
        let xdg = Some("/run/user/1000");
        assert_eq!(
            local_socket(
                xdg,
                only(&["/var/run/docker.sock", "/run/podman/podman.sock"])
            ),
            "unix:///var/run/docker.sock"
        );
        assert_eq!(
            local_socket(xdg, only(&["/run/podman/podman.sock"])),
            "unix:///run/podman/podman.sock"
        );
        assert_eq!(
            local_socket(xdg, only(&["/run/user/1000/podman/podman.sock"])),
            "unix:///run/user/1000/podman/podman.sock"
        );
        assert_eq!(local_socket(None, only(&[])), "unix:///var/run/docker.sock");
    }

    fn env() -> DockerEnv {
        DockerEnv {
            cert_dir: Some("/certs".into()),
            ..DockerEnv::default()
        }
    }

    fn at(address: &str) -> ConnectOptions {
        ConnectOptions {
            address: Some(address.to_owned()),
            ..ConnectOptions::default()
        }
    }

    fn target(options: &ConnectOptions, env: &DockerEnv) -> Target {
        resolve(options, env).unwrap().1
    }

    fn defaults(verify: bool) -> TlsFiles {
        TlsFiles {
            verify,
            ca: verify.then(|| "/certs/ca.pem".into()),
            cert: Some(Given::Default("/certs/cert.pem".into())),
            key: Some(Given::Default("/certs/key.pem".into())),
        }
    }

    #[test]
    fn plain_tcp_unless_tls_is_asked_for() {
        assert_eq!(
            target(&at("tcp://10.0.0.5:2375"), &env()),
            Target::Tcp("10.0.0.5:2375".into())
        );
        assert_eq!(
            target(&at("http://10.0.0.5:2375/"), &env()),
            Target::Tcp("10.0.0.5:2375".into())
        );
        assert_eq!(
            target(&at("unix:///run/docker.sock"), &env()),
            Target::Unix("/run/docker.sock".into())
        );
        assert_eq!(
            target(&at("/run/docker.sock"), &env()),
            Target::Unix("/run/docker.sock".into())
        );
    }

    #[test]
    fn docker_tls_verify_any_value_verifies_with_the_cert_path() {
        for value in ["1", "0", "false", "yes"] {
            let env = DockerEnv::from_vars(|name| match name {
                "DOCKER_TLS_VERIFY" => Some(value.to_owned()),
                "DOCKER_CERT_PATH" => Some("/certs".to_owned()),
                _ => None,
            });
            assert_eq!(
                target(&at("tcp://10.0.0.5:2376"), &env),
                Target::Tls("10.0.0.5:2376".into(), defaults(true)),
                "DOCKER_TLS_VERIFY={value}"
            );
        }
        let empty = DockerEnv::from_vars(|name| {
            (name == "DOCKER_TLS_VERIFY" || name == "DOCKER_TLS").then(String::new)
        });
        assert!(!empty.tls_verify && !empty.tls);
    }

    #[test]
    fn tls_alone_does_not_verify_and_reads_no_ca() {
        let env = DockerEnv { tls: true, ..env() };
        assert_eq!(
            target(&at("tcp://h:2376"), &env),
            Target::Tls("h:2376".into(), defaults(false))
        );
        let flag = ConnectOptions {
            tls: Some(true),
            ..at("tcp://h:2376")
        };
        assert_eq!(
            target(&flag, &self::env()),
            Target::Tls("h:2376".into(), defaults(false))
        );
    }

    #[test]
    fn tlsverify_given_at_all_turns_tls_on() {
        let off = ConnectOptions {
            tls_verify: Some(false),
            ..at("tcp://h:2376")
        };
        assert_eq!(
            target(&off, &env()),
            Target::Tls("h:2376".into(), defaults(false))
        );
        // `--tlsverify=false` beats DOCKER_TLS_VERIFY; `--tls=false` does
        // not turn off what DOCKER_TLS_VERIFY turned on.
        let env_verify = DockerEnv {
            tls_verify: true,
            ..env()
        };
        assert_eq!(
            target(&off, &env_verify),
            Target::Tls("h:2376".into(), defaults(false))
        );
        let tls_off = ConnectOptions {
            tls: Some(false),
            ..at("tcp://h:2376")
        };
        assert_eq!(
            target(&tls_off, &env_verify),
            Target::Tls("h:2376".into(), defaults(true))
        );
    }

    #[test]
    fn flags_name_the_files_and_an_empty_ca_means_the_host_store() {
        let options = ConnectOptions {
            tls_verify: Some(true),
            ca_cert: Some("/etc/ca.pem".into()),
            cert: Some("/etc/c.pem".into()),
            key: Some("/etc/k.pem".into()),
            ..at("tcp://h:1")
        };
        assert_eq!(
            target(&options, &env()),
            Target::Tls(
                "h:1".into(),
                TlsFiles {
                    verify: true,
                    ca: Some("/etc/ca.pem".into()),
                    cert: Some(Given::Flag("/etc/c.pem".into())),
                    key: Some(Given::Flag("/etc/k.pem".into())),
                }
            )
        );
        let system = ConnectOptions {
            tls_verify: Some(true),
            ca_cert: Some(PathBuf::new()),
            ..at("tcp://h:1")
        };
        let Target::Tls(_, files) = target(&system, &env()) else {
            panic!("not TLS")
        };
        assert_eq!(files.ca, None);
    }

    #[test]
    fn https_is_tls_and_verified_unless_tls_alone_says_otherwise() {
        assert_eq!(
            target(&at("https://h"), &env()),
            Target::Tls("h:2376".into(), defaults(true))
        );
        let tls = ConnectOptions {
            tls: Some(true),
            ..at("https://h:9")
        };
        assert_eq!(
            target(&tls, &env()),
            Target::Tls("h:9".into(), defaults(false))
        );
    }

    #[test]
    fn addresses_as_the_docker_cli_completes_them() {
        // DOCKER_HOST when no --engine; with TLS and neither, localhost:2376.
        let env_host = DockerEnv {
            host: Some("tcp://e:1".into()),
            ..env()
        };
        assert_eq!(
            resolve(&ConnectOptions::default(), &env_host).unwrap().0,
            "tcp://e:1"
        );
        assert_eq!(
            resolve(&ConnectOptions::default(), &env()).unwrap().0,
            "unix:///var/run/docker.sock"
        );
        let tls = ConnectOptions {
            tls_verify: Some(true),
            ..ConnectOptions::default()
        };
        assert_eq!(
            resolve(&tls, &env()).unwrap(),
            (
                "tcp://localhost:2376".to_owned(),
                Target::Tls("localhost:2376".into(), defaults(true))
            )
        );
        // A missing port is the docker CLI's 2375; IPv6 keeps its brackets.
        assert_eq!(target(&at("tcp://h"), &env()), Target::Tcp("h:2375".into()));
        assert_eq!(
            target(&at("tcp://[::1]"), &env()),
            Target::Tcp("[::1]:2375".into())
        );
        assert_eq!(
            target(&at("tcp://[::1]:7"), &env()),
            Target::Tcp("[::1]:7".into())
        );
        // Sockets ignore TLS.
        assert_eq!(
            target(
                &ConnectOptions {
                    tls_verify: Some(true),
                    ..at("unix:///s")
                },
                &env()
            ),
            Target::Unix("/s".into())
        );
    }

    #[test]
    fn contradictions_and_strange_schemes_are_refused() {
        let http_tls = ConnectOptions {
            tls_verify: Some(true),
            ..at("http://h:1")
        };
        assert!(
            resolve(&http_tls, &env())
                .unwrap_err()
                .contains("plain HTTP")
        );
        assert!(
            resolve(&at("ssh://h"), &env())
                .unwrap_err()
                .contains("unsupported address")
        );
        assert!(
            resolve(&at("tcp://h:x"), &env())
                .unwrap_err()
                .contains("port")
        );
    }

    #[test]
    fn loopback_is_localhost_127_8_and_v6_one() {
        for local in [
            "127.0.0.1:1",
            "127.9.8.7:1",
            "localhost:1",
            "LOCALHOST:1",
            "[::1]:1",
            "[::ffff:127.0.0.1]:1",
        ] {
            assert!(is_loopback(local), "{local}");
        }
        for remote in [
            "10.0.0.5:1",
            "engine.example:1",
            "[fe80::1]:1",
            "0.0.0.0:1",
            "localhost.example:1",
        ] {
            assert!(!is_loopback(remote), "{remote}");
        }
    }

    #[test]
    fn a_certificate_without_its_key_is_an_error_naming_both() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.pem");
        std::fs::write(&cert, "x").unwrap();
        let files = TlsFiles {
            verify: false,
            ca: None,
            cert: Some(Given::Default(cert.clone())),
            key: Some(Given::Default(dir.path().join("key.pem"))),
        };
        let err = TlsClient::new("h:1", &files).unwrap_err();
        assert!(matches!(err, TlsError::MissingKey { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            format!(
                "the client certificate {} has no key: {} is missing (--tlskey)",
                cert.display(),
                dir.path().join("key.pem").display()
            )
        );
        // Neither default file: no client certificate, no error.
        let none = TlsFiles {
            cert: Some(Given::Default(dir.path().join("nothing.pem"))),
            ..files
        };
        assert!(TlsClient::new("h:1", &none).unwrap().sent.is_none());
    }

    #[test]
    fn unreadable_and_empty_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("ca.pem");
        let files = TlsFiles {
            verify: true,
            ca: Some(missing.clone()),
            cert: None,
            key: None,
        };
        let err = TlsClient::new("h:1", &files).unwrap_err();
        assert!(
            err.to_string().starts_with(&format!(
                "cannot read the CA certificate {}: ",
                missing.display()
            )),
            "{err}"
        );
        std::fs::write(&missing, "not a certificate\n").unwrap();
        let err = TlsClient::new("h:1", &files).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("no CA certificate in {} (PEM expected)", missing.display())
        );
    }
}
