//! The EKS bearer token the kubelet authenticates with: `k8s-aws-v1.` followed by the
//! unpadded base64url of an STS `GetCallerIdentity` URL presigned with SigV4, where the
//! signed headers include `x-k8s-aws-id: <cluster name>`. The API server replays the URL
//! to STS to learn the caller's ARN; the URL is accepted for 15 minutes after its
//! `X-Amz-Date`, so clients treat a token as expiring after 14.

use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    SignableBody, SignableRequest, SignatureLocation, SigningSettings, sign,
};
use aws_sigv4::sign::v4;
use base64::Engine as _;

/// How long a client may use a token (the server accepts it for 15 minutes).
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(14 * 60);

/// A token and when to stop using it.
#[derive(Clone, PartialEq, Eq)]
pub struct EksToken {
    /// `k8s-aws-v1.…` (a bearer credential: never log it).
    pub token: String,
    /// When the client should fetch a new one.
    pub expiration: SystemTime,
}

impl std::fmt::Debug for EksToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EksToken")
            .field("token", &"<redacted>")
            .field("expiration", &self.expiration)
            .finish()
    }
}

/// Why a token could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// SigV4 signing failed.
    #[error("signing the STS GetCallerIdentity request: {0}")]
    Sign(String),
}

/// The regional STS host for `region` (China partition included).
pub fn sts_host(region: &str) -> String {
    crate::regional_host("sts", region)
}

/// Presign the token for `cluster` with `credentials` at time `now`.
pub fn eks_token(
    credentials: &Credentials,
    region: &str,
    cluster: &str,
    now: SystemTime,
) -> Result<EksToken, TokenError> {
    let host = sts_host(region);
    let url = format!("https://{host}/?Action=GetCallerIdentity&Version=2011-06-15");
    let identity = credentials.clone().into();
    let mut settings = SigningSettings::default();
    settings.signature_location = SignatureLocation::QueryParams;
    // STS ignores it, the authenticator requires it to be at most 900; 60 is what every
    // client sends.
    settings.expires_in = Some(Duration::from_secs(60));
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name("sts")
        .time(now)
        .settings(settings)
        .build()
        .map_err(|e| TokenError::Sign(e.to_string()))?
        .into();
    let headers = [("host", host.as_str()), ("x-k8s-aws-id", cluster)];
    let signable = SignableRequest::new(
        "GET",
        url.as_str(),
        headers.into_iter(),
        SignableBody::Bytes(&[]),
    )
    .map_err(|e| TokenError::Sign(e.to_string()))?;
    let (instructions, _signature) = sign(signable, &params)
        .map_err(|e| TokenError::Sign(e.to_string()))?
        .into_parts();
    let mut request = http::Request::builder()
        .method("GET")
        .uri(url.as_str())
        .body(())
        .map_err(|e| TokenError::Sign(e.to_string()))?;
    instructions.apply_to_request_http1x(&mut request);
    let presigned = request.uri().to_string();
    Ok(EksToken {
        token: format!(
            "k8s-aws-v1.{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(presigned)
        ),
        expiration: now + TOKEN_LIFETIME,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(token: &str) -> String {
        let b64 = token.strip_prefix("k8s-aws-v1.").expect("prefix");
        String::from_utf8(
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(b64)
                .expect("base64url"),
        )
        .expect("utf-8")
    }

    #[test]
    fn token_is_a_presigned_get_caller_identity() {
        let creds = Credentials::new(
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            Some("SESSION/TOKEN+1".into()),
            None,
            "test",
        );
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_600_000); // 2026-11-24
        let t = eks_token(&creds, "eu-west-1", "prod-hybrid", now).unwrap();
        assert!(!t.token.contains('=') && !t.token.contains('+') && !t.token.contains('/'));
        assert!(
            t.token.len() < 4096,
            "the authenticator refuses tokens over 4 KiB"
        );
        assert_eq!(t.expiration, now + Duration::from_secs(840));
        let url = decode(&t.token);
        let (base, query) = url.split_once('?').unwrap();
        assert_eq!(base, "https://sts.eu-west-1.amazonaws.com/");
        let q: std::collections::BTreeMap<String, String> = query
            .split('&')
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap();
                (k.to_string(), v.to_string())
            })
            .collect();
        assert_eq!(q["Action"], "GetCallerIdentity");
        assert_eq!(q["Version"], "2011-06-15");
        assert_eq!(q["X-Amz-Algorithm"], "AWS4-HMAC-SHA256");
        assert!(
            q["X-Amz-Credential"].starts_with("AKIDEXAMPLE%2F2026"),
            "{}",
            q["X-Amz-Credential"]
        );
        assert!(
            q["X-Amz-Credential"].ends_with("%2Feu-west-1%2Fsts%2Faws4_request"),
            "{}",
            q["X-Amz-Credential"]
        );
        assert_eq!(q["X-Amz-Expires"], "60");
        assert_eq!(q["X-Amz-SignedHeaders"], "host%3Bx-k8s-aws-id");
        assert_eq!(q["X-Amz-Security-Token"], "SESSION%2FTOKEN%2B1");
        assert_eq!(q["X-Amz-Signature"].len(), 64);
        assert!(q["X-Amz-Signature"].chars().all(|c| c.is_ascii_hexdigit()));

        // Deterministic for the same inputs; bound to the cluster name.
        assert_eq!(
            eks_token(&creds, "eu-west-1", "prod-hybrid", now).unwrap(),
            t
        );
        let other = eks_token(&creds, "eu-west-1", "other", now).unwrap();
        assert_ne!(decode(&other.token), url);
        assert!(!format!("{t:?}").contains("k8s-aws-v1."));
    }

    #[test]
    fn china_partition_host() {
        assert_eq!(sts_host("cn-north-1"), "sts.cn-north-1.amazonaws.com.cn");
        assert_eq!(sts_host("us-gov-west-1"), "sts.us-gov-west-1.amazonaws.com");
    }
}
