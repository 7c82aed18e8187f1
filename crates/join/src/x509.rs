//! Just enough X.509 to check an IAM Roles Anywhere node certificate before joining: its
//! subject CN (the role session name must equal it, or every credential request is
//! refused) and its validity window. A small DER walk over the PEM's first certificate;
//! nothing here verifies signatures (Roles Anywhere does that against the trust anchor).

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

/// One DER element: tag, contents, and what follows it.
fn tlv(input: &[u8]) -> Result<(u8, &[u8], &[u8]), String> {
    let (&tag, rest) = input.split_first().ok_or("truncated DER")?;
    let (&first, rest) = rest.split_first().ok_or("truncated DER length")?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return Err("unsupported DER length".into());
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | *b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return Err("DER element runs past the end".into());
    }
    Ok((tag, &rest[..len], &rest[len..]))
}

fn expect<'a>(input: &'a [u8], tag: u8, what: &str) -> Result<(&'a [u8], &'a [u8]), String> {
    let (t, body, rest) = tlv(input)?;
    if t != tag {
        return Err(format!("{what}: expected tag {tag:#04x}, found {t:#04x}"));
    }
    Ok((body, rest))
}

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// UTCTime (`YYMMDDHHMMSSZ`, years 1950–2049) or GeneralizedTime (`YYYYMMDDHHMMSSZ`).
fn time(tag: u8, body: &[u8]) -> Result<SystemTime, String> {
    let text = std::str::from_utf8(body).map_err(|_| "time is not ASCII")?;
    let digits = text.strip_suffix('Z').ok_or("time is not in UTC")?;
    let (year, rest) = match (tag, digits.len()) {
        (0x17, 12) => {
            let yy: i64 = digits[..2].parse().map_err(|_| "bad year")?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &digits[2..])
        }
        (0x18, 14) => (digits[..4].parse().map_err(|_| "bad year")?, &digits[4..]),
        _ => return Err(format!("unsupported time {text:?}")),
    };
    let n = |i: usize| -> Result<i64, String> {
        rest[i..i + 2]
            .parse()
            .map_err(|_| format!("bad time {text:?}"))
    };
    let (mo, d, h, mi, s) = (n(0)?, n(2)?, n(4)?, n(6)?, n(8)?);
    let secs = days_from_civil(year, mo, d) * 86_400 + h * 3600 + mi * 60 + s;
    Ok(if secs >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_secs((-secs) as u64)
    })
}

/// The CN of a Name (the last one, as most tools show it).
fn common_name(name: &[u8]) -> Result<Option<String>, String> {
    const CN: &[u8] = &[0x55, 0x04, 0x03];
    let mut found = None;
    let mut rdns = name;
    while !rdns.is_empty() {
        let (set, rest) = expect(rdns, 0x31, "RelativeDistinguishedName")?;
        rdns = rest;
        let mut attrs = set;
        while !attrs.is_empty() {
            let (attr, rest) = expect(attrs, 0x30, "AttributeTypeAndValue")?;
            attrs = rest;
            let (oid, value) = expect(attr, 0x06, "attribute type")?;
            if oid == CN {
                let (_, v, _) = tlv(value)?;
                found = Some(String::from_utf8_lossy(v).into_owned());
            }
        }
    }
    Ok(found)
}

/// The facts of the first certificate in `pem`.
pub fn parse_pem(pem: &str) -> Result<CertFacts, String> {
    use base64::Engine as _;
    let begin = "-----BEGIN CERTIFICATE-----";
    let start = pem.find(begin).ok_or("no PEM CERTIFICATE block")? + begin.len();
    let end = pem[start..]
        .find("-----END CERTIFICATE-----")
        .ok_or("unterminated PEM CERTIFICATE block")?;
    let b64: String = pem[start..start + end]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| format!("PEM body is not base64: {e}"))?;
    parse_der(&der)
}

/// The facts of a DER certificate.
pub fn parse_der(der: &[u8]) -> Result<CertFacts, String> {
    let (cert, _) = expect(der, 0x30, "Certificate")?;
    let (tbs, _) = expect(cert, 0x30, "TBSCertificate")?;
    let mut rest = tbs;
    // [0] EXPLICIT version, optional.
    if rest.first() == Some(&0xa0) {
        rest = tlv(rest)?.2;
    }
    rest = expect(rest, 0x02, "serialNumber")?.1;
    rest = expect(rest, 0x30, "signature algorithm")?.1;
    rest = expect(rest, 0x30, "issuer")?.1;
    let (validity, after) = expect(rest, 0x30, "validity")?;
    let (t1, b1, more) = tlv(validity)?;
    let (t2, b2, _) = tlv(more)?;
    let (subject, _) = expect(after, 0x30, "subject")?;
    Ok(CertFacts {
        common_name: common_name(subject)?,
        not_before: time(t1, b1)?,
        not_after: time(t2, b2)?,
    })
}

/// `YYYY-MM-DD HH:MM:SS UTC` for messages.
pub fn show(t: SystemTime) -> String {
    let secs = match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    };
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil from days (the inverse of days_from_civil).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
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
        assert!(parse_der(&[0x30, 0x05, 0x30]).is_err());
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
            let t = SystemTime::UNIX_EPOCH
                + Duration::from_secs((days_from_civil(y, m, d) * 86_400) as u64);
            assert_eq!(show(t), format!("{y:04}-{m:02}-{d:02} 00:00:00 UTC"));
        }
    }
}
