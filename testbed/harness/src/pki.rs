//! Throwaway PKI for one control plane: a CA, the API server's serving certificate,
//! client certificates, and the service-account signing key.

use std::net::IpAddr;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("failed to generate the {what}")]
    Generate {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
}

/// A PEM certificate and its PEM (PKCS#8) private key.
#[derive(Debug, Clone)]
pub struct CertAndKey {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Everything the control plane needs, as PEM text.
#[derive(Debug, Clone)]
pub struct Pki {
    pub ca_pem: String,
    pub serving: CertAndKey,
    pub admin: CertAndKey,
    pub controller_manager: CertAndKey,
    /// PKCS#8 private key that signs service-account tokens.
    pub service_account_key_pem: String,
    /// Its public key (SPKI), for verifying tokens.
    pub service_account_public_pem: String,
}

impl Pki {
    /// A fresh CA and certificates; the serving certificate is valid for `localhost`,
    /// the in-cluster names of the `kubernetes` Service and every address in `ips`.
    pub fn generate(ips: &[IpAddr]) -> Result<Self, PkiError> {
        let gen_err = |what| move |source| PkiError::Generate { what, source };

        let ca_key = KeyPair::generate().map_err(gen_err("CA key"))?;
        let mut ca_params = CertificateParams::default();
        ca_params.distinguished_name = name("pgrs-testbed-ca", None);
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(ca_params, ca_key).map_err(gen_err("CA"))?;

        let mut serving_params = CertificateParams::new(vec![
            "localhost".to_owned(),
            "kubernetes".to_owned(),
            "kubernetes.default".to_owned(),
            "kubernetes.default.svc".to_owned(),
            "kubernetes.default.svc.cluster.local".to_owned(),
        ])
        .map_err(gen_err("serving certificate names"))?;
        serving_params
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        serving_params.distinguished_name = name("kube-apiserver", None);
        serving_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let serving = issue(serving_params, &ca).map_err(gen_err("serving certificate"))?;

        let admin = client_cert("admin", "system:masters", &ca)
            .map_err(gen_err("admin client certificate"))?;
        let controller_manager =
            client_cert("system:kube-controller-manager", "system:masters", &ca)
                .map_err(gen_err("controller-manager client certificate"))?;

        let sa_key = KeyPair::generate().map_err(gen_err("service-account key"))?;
        Ok(Self {
            ca_pem: ca.pem(),
            serving,
            admin,
            controller_manager,
            service_account_key_pem: sa_key.serialize_pem(),
            service_account_public_pem: sa_key.public_key_pem(),
        })
    }
}

fn name(common_name: &str, organization: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    if let Some(org) = organization {
        dn.push(DnType::OrganizationName, org);
    }
    dn
}

/// A client certificate: the API server maps CN to the user and O to its group.
fn client_cert(
    user: &str,
    group: &str,
    ca: &CertifiedIssuer<'_, KeyPair>,
) -> Result<CertAndKey, rcgen::Error> {
    let mut params = CertificateParams::default();
    params.distinguished_name = name(user, Some(group));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    issue(params, ca)
}

fn issue(
    mut params: CertificateParams,
    ca: &CertifiedIssuer<'_, KeyPair>,
) -> Result<CertAndKey, rcgen::Error> {
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, ca)?;
    Ok(CertAndKey {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}
