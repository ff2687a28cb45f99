//! A rustls server verifier made of one certificate check: the handshake's
//! signatures are verified with the crypto provider's algorithms, as
//! rustls's own verifier does, and only the certificate is the caller's to
//! judge (the engine's `--tls` takes any; the registry client checks the
//! host's CA store, loaded when first needed).

use std::fmt::Debug;

use rustls::DigitallySignedStruct;
use rustls::SignatureScheme;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

/// What a [`Checked`] verifier asks of the server's certificate.
pub(crate) trait CertCheck: Debug + Send + Sync {
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error>;
}

/// `check` for the certificate, `provider`'s algorithms for the signatures.
#[derive(Debug)]
pub(crate) struct Checked<C> {
    check: C,
    algorithms: WebPkiSupportedAlgorithms,
}

impl<C: CertCheck> Checked<C> {
    pub(crate) fn new(check: C, provider: &CryptoProvider) -> Self {
        Checked {
            check,
            algorithms: provider.signature_verification_algorithms,
        }
    }
}

impl<C: CertCheck> ServerCertVerifier for Checked<C> {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check
            .check(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
