//! TLS (rustls, with the ring provider) in front of the HTTP drain.
//!
//! A certificate goes live by upgrade: the successor loads it before
//! `ready()` with [`tls_acceptor`], and a certificate that does not load
//! makes the successor fail, so the old generation serves on with the old
//! one.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hyper::body::{Body, Incoming};
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::serve::{BoxError, ConnectionError, Protocol, log_end};
use super::tickets::{TicketKeys, VERSION as TICKET_KEYS_VERSION};
use super::{ConnectionGuard, Drain};

/// Why [`tls_acceptor`] could not make a TLS configuration; says which file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
#[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
pub enum TlsError {
    /// The certificate chain file could not be read, or holds a bad PEM
    /// section.
    #[error("reading the certificate chain {}: {source}", path.display())]
    Certificate {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// The certificate chain file holds no certificate.
    #[error("reading the certificate chain {}: no CERTIFICATE section in it", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// The private key file could not be read, or holds no private key.
    #[error("reading the private key {}: {source}", path.display())]
    Key {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// rustls refused the pair (a key that does not match the certificate,
    /// a key type it does not support).
    #[error("certificate {} with key {}: {source}", certificate.display(), key.display())]
    Config {
        /// The certificate chain file.
        certificate: PathBuf,
        /// The private key file.
        key: PathBuf,
        /// rustls's reason.
        #[source]
        source: rustls::Error,
    },
    /// The bytes given to [`TicketKeys::from_bytes`] are not ticket keys in
    /// its encoding (another version wrote them, another state, a handoff
    /// cut short).
    #[error("the TLS ticket keys handed over do not decode: {len} bytes, version byte {version:?} (expected {expected})", expected = TICKET_KEYS_VERSION)]
    TicketKeys {
        /// How many bytes there were.
        len: usize,
        /// Their first byte, the encoding's version.
        version: Option<u8>,
    },
    /// The system's random source failed while making ticket keys.
    #[error("the system's random source failed while making TLS ticket keys")]
    Random,
}

/// A TLS acceptor for the certificate chain and private key in these PEM
/// files, offering HTTP/2 and HTTP/1.1 by ALPN (`h2` first), TLS 1.2 and
/// 1.3, with rustls's ring provider. Load it before
/// [`Upgrader::ready`](crate::Upgrader::ready): an error then makes the
/// upgrade fail and the old generation serve on.
///
/// Sessions resume within this generation only: see
/// [`tls_acceptor_with_tickets`] to resume them across upgrades.
///
/// # Errors
/// [`TlsError::Certificate`] if the certificate file cannot be read or
/// holds a bad PEM section, [`TlsError::NoCertificate`] if it holds no
/// certificate, [`TlsError::Key`] if the key file cannot be read or holds no
/// private key, [`TlsError::Config`] if rustls refuses the pair. Each names
/// the file.
#[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
pub fn tls_acceptor(
    certificate: impl AsRef<Path>,
    key: impl AsRef<Path>,
) -> Result<TlsAcceptor, TlsError> {
    Ok(TlsAcceptor::from(Arc::new(server_config(
        certificate.as_ref(),
        key.as_ref(),
    )?)))
}

/// [`tls_acceptor`] whose session tickets are sealed with `tickets`: hand
/// the keys to each successor in the state handoff, and clients that come
/// back after an upgrade resume their sessions (an abbreviated handshake)
/// instead of making a full one with the new generation.
///
/// # Errors
/// As [`tls_acceptor`].
#[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
pub fn tls_acceptor_with_tickets(
    certificate: impl AsRef<Path>,
    key: impl AsRef<Path>,
    tickets: &TicketKeys,
) -> Result<TlsAcceptor, TlsError> {
    let mut config = server_config(certificate.as_ref(), key.as_ref())?;
    tickets.install(&mut config);
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn server_config(certificate: &Path, key: &Path) -> Result<ServerConfig, TlsError> {
    let chain = CertificateDer::pem_file_iter(certificate)
        .and_then(|sections| sections.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Certificate {
            path: certificate.to_path_buf(),
            source,
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: certificate.to_path_buf(),
        });
    }
    let private_key = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::Key {
        path: key.to_path_buf(),
        source,
    })?;
    let config_error = |source| TlsError::Config {
        certificate: certificate.to_path_buf(),
        key: key.to_path_buf(),
        source,
    };
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(config_error)?
            .with_no_client_auth()
            .with_single_cert(chain, private_key)
            .map_err(config_error)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

impl Drain {
    /// Serves one connection over TLS: the handshake, then HTTP/2 or
    /// HTTP/1.1 as ALPN chose (by the first bytes if the client offered
    /// none), drained as by [`serve_http`](Self::serve_http). A connection
    /// closed by the server sends TLS close_notify first.
    ///
    /// The connection counts as open from this call; a handshake still
    /// under way when the drain starts is finished (up to the deadline) and
    /// the connection then served as draining.
    ///
    /// # Errors
    /// The future resolves to [`ConnectionError::Handshake`] if the TLS
    /// handshake failed, [`ConnectionError::Preface`] if reading the first
    /// bytes failed (no ALPN), [`ConnectionError::Http`] for hyper's error on
    /// the connection.
    ///
    /// # Panics
    /// As [`serve_http`](Self::serve_http): the future needs a tokio runtime
    /// with time enabled.
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    pub fn serve_https<I, S, B>(
        &self,
        io: I,
        acceptor: TlsAcceptor,
        service: S,
    ) -> impl Future<Output = Result<(), ConnectionError>> + Send + 'static
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let open = self.track();
        self.clone()
            .tls_connection(open, io, None, acceptor, service)
    }

    /// [`serve`](Self::serve) over TLS: accepts on `listener` until `exit`
    /// resolves, serving each connection with
    /// [`serve_https`](Self::serve_https).
    ///
    /// # Panics
    /// As [`serve`](Self::serve): outside a tokio runtime with time enabled.
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    pub async fn serve_tls<S, B, F>(
        &self,
        listener: TcpListener,
        acceptor: TlsAcceptor,
        service: S,
        exit: F,
    ) -> F::Output
    where
        S: tower_service::Service<Request<Incoming>, Response = Response<B>>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
        F: Future,
    {
        self.accept_loop(listener, exit, |drain, open, stream, remote| {
            let service = TowerToHyperService::new(service.clone());
            tokio::spawn(log_end(
                remote,
                drain.tls_connection(open, stream, Some(remote), acceptor.clone(), service),
            ));
        })
        .await
    }

    async fn tls_connection<I, S, B>(
        self,
        open: ConnectionGuard,
        io: I,
        remote: Option<std::net::SocketAddr>,
        acceptor: TlsAcceptor,
        service: S,
    ) -> Result<(), ConnectionError>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let stream = tokio::select! {
            stream = acceptor.accept(io) => stream.map_err(ConnectionError::Handshake)?,
            () = self.deadline_passed() => return Ok(()),
        };
        let protocol = match stream.get_ref().1.alpn_protocol() {
            Some(b"h2") => Some(Protocol::Http2),
            Some(b"http/1.1") => Some(Protocol::Http1),
            _ => None,
        };
        self.connection(open, stream, remote, protocol, service)
            .await
    }
}
