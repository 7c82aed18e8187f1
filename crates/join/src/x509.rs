//! Just enough X.509 to check an IAM Roles Anywhere node certificate before joining: its
//! subject CN (the role session name must equal it, or every credential request is
//! refused) and its validity window, read with RustCrypto's `x509-cert` from the PEM's
//! first certificate; nothing here verifies signatures (Roles Anywhere does that against
//! the trust anchor).

use std::time::{Duration, SystemTime};

/// What the check needs from a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFacts {
    /// The subject's common name, if it has one.
    pub common_name: Option<String>,
    /// Valid from.
    pub not_before: SystemTime,
    /// Valid until.
    pub not_after: SystemTime,
}

/// The facts of the first certificate in `pem`.
pub fn parse_pem(pem: &str) -> Result<CertFacts, String> {
    use x509_cert::der::DecodePem as _;
    let begin = "-----BEGIN CERTIFICATE-----";
    let start = pem.find(begin).ok_or("no PEM CERTIFICATE block")?;
    let end = pem[start..]
        .find("-----END CERTIFICATE-----")
        .ok_or("unterminated PEM CERTIFICATE block")?
        + start
        + "-----END CERTIFICATE-----".len();
    let cert = x509_cert::Certificate::from_pem(&pem[start..end]).map_err(|e| e.to_string())?;
    facts(&cert)
}

fn facts(cert: &x509_cert::Certificate) -> Result<CertFacts, String> {
    let tbs = &cert.tbs_certificate;
    let common_name = tbs
        .subject
        .0
        .iter()
        .flat_map(|rdn| rdn.0.iter())
        .filter(|atv| atv.oid == x509_cert::der::oid::db::rfc4519::CN)
        .filter_map(|atv| directory_string(&atv.value))
        .next_back();
    Ok(CertFacts {
        common_name,
        not_before: tbs.validity.not_before.to_system_time(),
        not_after: tbs.validity.not_after.to_system_time(),
    })
}

/// The text of a name attribute (UTF8String, PrintableString, IA5String).
fn directory_string(value: &x509_cert::der::Any) -> Option<String> {
    use x509_cert::der::asn1::{Ia5StringRef, PrintableStringRef, Utf8StringRef};
    use x509_cert::der::{Tag, Tagged as _};
    match value.tag() {
        Tag::Utf8String => value
            .decode_as::<Utf8StringRef<'_>>()
            .ok()
            .map(|s| s.to_string()),
        Tag::PrintableString => value
            .decode_as::<PrintableStringRef<'_>>()
            .ok()
            .map(|s| s.to_string()),
        Tag::Ia5String => value
            .decode_as::<Ia5StringRef<'_>>()
            .ok()
            .map(|s| s.to_string()),
        _ => None,
    }
}

/// `YYYY-MM-DD HH:MM:SS UTC` for messages.
pub fn show(t: SystemTime) -> String {
    match x509_cert::der::DateTime::from_system_time(t) {
        Ok(d) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
            d.year(),
            d.month(),
            d.day(),
            d.hour(),
            d.minutes(),
            d.seconds()
        ),
        Err(_) => format!("{t:?}"),
    }
}

/// Problems with an IAM Roles Anywhere node certificate for `node_name` at `now`:
/// `Err` for what makes every credential request fail, `Ok(Some)` for a warning.
pub fn check_node_certificate(
    facts: &CertFacts,
    node_name: &str,
    now: SystemTime,
) -> Result<Option<String>, String> {
    match facts.common_name.as_deref() {
        Some(cn) if cn == node_name => {}
        Some(cn) => {
            return Err(format!(
                "the certificate's CN is {cn:?} but nodeName is {node_name:?}: the Roles Anywhere trust policy requires the role session name (the node name) to equal the CN, so every credential request would be refused. Set nodeName to {cn:?}, or issue the node a certificate with CN={node_name}"
            ));
        }
        None => {
            return Err(format!(
                "the certificate has no CN; the Roles Anywhere trust policy compares the role session name ({node_name:?}) with it. Issue the node a certificate with CN={node_name}"
            ));
        }
    }
    if now < facts.not_before {
        return Err(format!(
            "the certificate is not valid before {} (now {}): is this host's clock right?",
            show(facts.not_before),
            show(now)
        ));
    }
    if now > facts.not_after {
        return Err(format!(
            "the certificate expired at {}: renew it",
            show(facts.not_after)
        ));
    }
    let left = facts.not_after.duration_since(now).unwrap_or_default();
    Ok((left < Duration::from_secs(30 * 86_400)).then(|| {
        format!(
            "the certificate expires at {} (in {} days): renew it before then",
            show(facts.not_after),
            left.as_secs() / 86_400
        )
    }))
}

/// An IAM Roles Anywhere node certificate that will work: until when, and a warning
/// (close to expiry) if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCertificate {
    /// Valid until.
    pub not_after: SystemTime,
    /// Worth telling the operator (renew soon).
    pub warning: Option<String>,
}

/// Why the node certificate will not work: the field that points at the fix, the
/// message, and whether the fix is in the configuration or its files (78) or the host
/// (1: a clock off, an expired certificate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateProblem {
    /// The configuration field to look at.
    pub field: &'static str,
    /// What is wrong and the fix.
    pub message: String,
    /// A configuration problem (exit 78), rather than the host's.
    pub in_configuration: bool,
}

/// Check the node's IAM Roles Anywhere certificate and key as they are on disk under
/// `root` at `now`: both present, the certificate readable, its CN the node name, valid
/// now. `init` refuses on a problem; `check` reports it.
pub fn check_iam_ra_files(
    ra: &hybridlet_config::IamRolesAnywhereOptions,
    root: &hybridlet_sys::HostRoot,
    now: SystemTime,
) -> Result<NodeCertificate, CertificateProblem> {
    let problem = |field, message, in_configuration| CertificateProblem {
        field,
        message,
        in_configuration,
    };
    const CERT: &str = "spec.hybrid.iamRolesAnywhere.certificatePath";
    let pem = root
        .resolve(&ra.certificate_path)
        .map_err(|e| e.to_string())
        .and_then(|p| std::fs::read_to_string(p).map_err(|e| e.to_string()))
        .map_err(|e| {
            problem(
                CERT,
                format!(
                    "cannot read {} ({e}): place the node's PEM certificate there, issued by the trust anchor's CA with CN = {}",
                    ra.certificate_path, ra.node_name
                ),
                true,
            )
        })?;
    if !root
        .resolve(&ra.private_key_path)
        .is_ok_and(|p| p.is_file())
    {
        return Err(problem(
            "spec.hybrid.iamRolesAnywhere.privateKeyPath",
            format!(
                "no private key at {}: place the key of the node's certificate there",
                ra.private_key_path
            ),
            true,
        ));
    }
    let facts = parse_pem(&pem).map_err(|e| {
        problem(
            CERT,
            format!(
                "{} is not a PEM X.509 certificate: {e}",
                ra.certificate_path
            ),
            true,
        )
    })?;
    match check_node_certificate(&facts, &ra.node_name, now) {
        Ok(warning) => Ok(NodeCertificate {
            not_after: facts.not_after,
            warning: warning.map(|w| format!("{}: {w}", ra.certificate_path)),
        }),
        Err(e) if e.contains("nodeName") => Err(problem(
            "spec.hybrid.iamRolesAnywhere.nodeName",
            format!("{}: {e}", ra.certificate_path),
            true,
        )),
        Err(e) => Err(problem(
            CERT,
            format!("{}: {e}", ra.certificate_path),
            false,
        )),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn fixture(name: &str) -> String {
        std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../tests/fixtures/pki")
                .join(name),
        )
        .unwrap()
    }

    #[test]
    fn reads_the_cn_and_both_time_forms() {
        // openssl: CN=fra1-r12-n07, notBefore 2026 (UTCTime), notAfter 2126 (GeneralizedTime).
        let f = parse_pem(&fixture("fra1-r12-n07.pem")).unwrap();
        assert_eq!(f.common_name.as_deref(), Some("fra1-r12-n07"));
        assert!(
            show(f.not_before).starts_with("2026-11-26"),
            "{}",
            show(f.not_before)
        );
        assert!(
            show(f.not_after).starts_with("2126-11-02"),
            "{}",
            show(f.not_after)
        );
        // A second certificate, another CN.
        let other = parse_pem(&fixture("other-node.pem")).unwrap();
        assert_eq!(other.common_name.as_deref(), Some("other-node"));
        assert!(parse_pem("not a certificate").is_err());
        // A truncated certificate inside a well-formed PEM block.
        assert!(
            parse_pem("-----BEGIN CERTIFICATE-----\nMAUw\n-----END CERTIFICATE-----\n").is_err()
        );
    }

    #[test]
    fn node_name_must_equal_the_cn_within_the_validity_window() {
        let f = parse_pem(&fixture("fra1-r12-n07.pem")).unwrap();
        let inside = f.not_before + Duration::from_secs(86_400);
        assert_eq!(check_node_certificate(&f, "fra1-r12-n07", inside), Ok(None));
        let e = check_node_certificate(&f, "fra1-r12-n08", inside).unwrap_err();
        assert!(
            e.contains("CN is \"fra1-r12-n07\" but nodeName is \"fra1-r12-n08\""),
            "{e}"
        );
        let e =
            check_node_certificate(&f, "fra1-r12-n07", f.not_before - Duration::from_secs(3600))
                .unwrap_err();
        assert!(e.contains("not valid before") && e.contains("clock"), "{e}");
        let e = check_node_certificate(&f, "fra1-r12-n07", f.not_after + Duration::from_secs(1))
            .unwrap_err();
        assert!(e.contains("expired"), "{e}");
        let w = check_node_certificate(
            &f,
            "fra1-r12-n07",
            f.not_after - Duration::from_secs(86_400 * 3),
        )
        .unwrap()
        .unwrap();
        assert!(w.contains("in 3 days") || w.contains("in 2 days"), "{w}");
    }

    #[test]
    fn dates_round_trip() {
        for (y, m, d) in [(1970, 1, 1), (2000, 2, 29), (2049, 12, 31), (2126, 11, 2)] {
            let t = x509_cert::der::DateTime::new(y, m, d, 0, 0, 0)
                .unwrap()
                .to_system_time();
            assert_eq!(show(t), format!("{y:04}-{m:02}-{d:02} 00:00:00 UTC"));
        }
    }
}
