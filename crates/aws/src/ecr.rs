//! Amazon ECR for the pod sandbox image: which registry holds EKS's images for a region
//! (the release manifest's region data first, else AWS's table, FIPS aware), and
//! `GetAuthorizationToken` in ECR's JSON 1.1 protocol
//! (`AmazonEC2ContainerRegistry_V20150921.<Operation>`, signing name `ecr`).
//!
//! The table and the fallbacks are facts from aws/eks-hybrid `internal/aws/ecr/ecr.go` and
//! `internal/aws/partition.go`.

use std::time::Duration;

use aws_credential_types::Credentials;
use base64::Engine as _;
use serde_json::{Value, json};

use crate::json_protocol::{CallError, JsonClient};

/// Errors of the ECR call.
pub type EcrError = CallError;

/// What the release manifest says of a region (`region_config.<region>`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegionData {
    /// `aws`, `aws-cn`, `aws-us-gov`, `aws-iso`, ...
    pub partition: Option<String>,
    /// The account of EKS's registry in that region.
    pub ecr_account_id: Option<String>,
}

/// The DNS suffix of a partition (unknown partitions: the commercial one).
pub fn partition_dns_suffix(partition: &str) -> &'static str {
    match partition {
        "aws-cn" => "amazonaws.com.cn",
        "aws-iso" => "c2s.ic.gov",
        "aws-iso-b" => "sc2s.sgov.gov",
        "aws-iso-e" => "cloud.adc-e.uk",
        "aws-iso-f" => "csp.hci.ic.gov",
        _ => "amazonaws.com",
    }
}

/// The partition a region name belongs to, by its prefix.
fn partition_of_region(region: &str) -> &'static str {
    // `us-isob-` before `us-iso-` is not needed (the dash differs) but keeps it readable.
    [
        ("cn-", "aws-cn"),
        ("us-gov-", "aws-us-gov"),
        ("us-isob-", "aws-iso-b"),
        ("us-iso-", "aws-iso"),
        ("eu-isoe-", "aws-iso-e"),
        ("us-isof-", "aws-iso-f"),
    ]
    .iter()
    .find(|(prefix, _)| region.starts_with(prefix))
    .map_or("aws", |(_, p)| p)
}

/// EKS's registry accounts in regions that have their own.
const ACCOUNTS: &[(&str, &str)] = &[
    ("cn-north-1", "918309763551"),
    ("cn-northwest-1", "961992271922"),
    ("eu-isoe-west-1", "249663109785"),
    ("us-gov-east-1", "151742754352"),
    ("us-gov-west-1", "013241004608"),
    ("us-iso-east-1", "725322719131"),
    ("us-iso-west-1", "608367168043"),
    ("us-isob-east-1", "187977181151"),
    ("us-isof-south-1", "676585237158"),
];

/// Where no region-specific registry is known: the partition's main one.
const FALLBACKS: &[(&str, &str, &str)] = &[
    ("us-gov-", "013241004608", "us-gov-west-1"),
    ("cn-", "961992271922", "cn-northwest-1"),
    ("us-iso-", "725322719131", "us-iso-east-1"),
    ("us-isob-", "187977181151", "us-isob-east-1"),
    ("us-isof-", "676585237158", "us-isof-south-1"),
];

/// The account and region of EKS's commercial registry, used for every other region.
pub const DEFAULT_ACCOUNT: (&str, &str) = ("602401143452", "us-west-2");

/// EKS's image registry for a node's region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EksRegistry {
    /// `602401143452.dkr.ecr.us-west-2.amazonaws.com`.
    pub host: String,
    /// The registry's account.
    pub account: String,
    /// The registry's region (may differ from the node's).
    pub region: String,
    /// Where the account came from: `manifest`, `table` or `default`.
    pub source: &'static str,
}

impl EksRegistry {
    /// The pod sandbox image EKS publishes there.
    pub fn sandbox_image(&self) -> String {
        format!("{}/eks/pause:3.5", self.host)
    }
}

/// EKS's registry for `region`: the manifest's account when it has one (in that region),
/// else the table, else the partition's main registry; the `ecr-fips` host when `fips`.
pub fn eks_registry(region: &str, manifest: Option<&RegionData>, fips: bool) -> EksRegistry {
    let suffix = partition_dns_suffix(
        manifest
            .and_then(|m| m.partition.as_deref())
            .unwrap_or_else(|| partition_of_region(region)),
    );
    let (account, registry_region, source) =
        match manifest.and_then(|m| m.ecr_account_id.as_deref()) {
            Some(account) if !account.is_empty() => (account, region, "manifest"),
            _ => match ACCOUNTS.iter().find(|(r, _)| *r == region) {
                Some((_, account)) => (*account, region, "table"),
                None => FALLBACKS
                    .iter()
                    .find(|(prefix, _, _)| region.starts_with(prefix))
                    .map_or(
                        (DEFAULT_ACCOUNT.0, DEFAULT_ACCOUNT.1, "default"),
                        |(_, a, r)| (*a, *r, "table"),
                    ),
            },
        };
    let ecr = if fips { "ecr-fips" } else { "ecr" };
    EksRegistry {
        host: format!("{account}.dkr.{ecr}.{registry_region}.{suffix}"),
        account: account.to_string(),
        region: registry_region.to_string(),
        source,
    }
}

/// The ECR API endpoint of a region (`api.ecr.…`, or `ecr-fips.…`).
pub fn ecr_endpoint(region: &str, fips: bool) -> String {
    let suffix = partition_dns_suffix(partition_of_region(region));
    if fips {
        format!("https://ecr-fips.{region}.{suffix}")
    } else {
        format!("https://api.ecr.{region}.{suffix}")
    }
}

/// A registry login from `GetAuthorizationToken`: user `AWS` and a 12-hour password. The
/// password is shown nowhere (`Debug` redacts it).
#[derive(Clone, PartialEq)]
pub struct EcrToken {
    /// `base64(user:password)`, as the registry's basic auth and CRI's `auth` take it.
    pub auth: String,
    /// The user name (`AWS`).
    pub username: String,
    /// The password.
    pub password: String,
    /// When it expires (seconds since the epoch), when ECR says.
    pub expires_at: Option<f64>,
}

impl std::fmt::Debug for EcrToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EcrToken")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// A signed ECR client (one operation).
#[derive(Debug)]
pub struct EcrClient {
    client: JsonClient,
}

impl EcrClient {
    /// A client for `region`, at `endpoint` (else the regional or FIPS endpoint), signing
    /// with `credentials`; the call bounded by `timeout`.
    pub fn new(
        region: &str,
        endpoint: Option<&str>,
        fips: bool,
        credentials: Credentials,
        timeout: Duration,
    ) -> Result<Self, EcrError> {
        let url = endpoint
            .map(str::to_string)
            .unwrap_or_else(|| ecr_endpoint(region, fips));
        Ok(Self {
            client: JsonClient::new(
                "ecr",
                "AmazonEC2ContainerRegistry_V20150921",
                region,
                &url,
                credentials,
                timeout,
            )?,
        })
    }

    /// The endpoint called.
    pub fn endpoint(&self) -> String {
        self.client.endpoint()
    }

    /// `GetAuthorizationToken`: a login valid for every registry the credentials may read.
    pub async fn authorization_token(&self) -> Result<EcrToken, EcrError> {
        const OP: &str = "GetAuthorizationToken";
        let answer = self.client.call(OP, &json!({})).await?;
        let bad = |message: &str| CallError::Request {
            service: "ecr",
            operation: OP,
            message: message.to_string(),
        };
        let data = answer
            .get("authorizationData")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .ok_or_else(|| bad("the answer has no authorizationData"))?;
        let auth = data
            .get("authorizationToken")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("the answer has no authorizationToken"))?;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| bad("authorizationToken is not base64 text"))?;
        let (username, password) = decoded
            .split_once(':')
            .ok_or_else(|| bad("authorizationToken is not user:password"))?;
        Ok(EcrToken {
            auth: auth.to_string(),
            username: username.to_string(),
            password: password.to_string(),
            expires_at: data.get("expiresAt").and_then(Value::as_f64),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn host(region: &str) -> String {
        eks_registry(region, None, false).host
    }

    #[test]
    fn registries_follow_aws_table_and_fallbacks() {
        assert_eq!(
            host("eu-central-1"),
            "602401143452.dkr.ecr.us-west-2.amazonaws.com"
        );
        assert_eq!(
            host("cn-north-1"),
            "918309763551.dkr.ecr.cn-north-1.amazonaws.com.cn"
        );
        assert_eq!(
            host("us-gov-east-1"),
            "151742754352.dkr.ecr.us-gov-east-1.amazonaws.com"
        );
        // An unknown GovCloud region: the partition's main registry.
        assert_eq!(
            host("us-gov-south-9"),
            "013241004608.dkr.ecr.us-gov-west-1.amazonaws.com"
        );
        assert_eq!(
            host("us-isob-east-1"),
            "187977181151.dkr.ecr.us-isob-east-1.sc2s.sgov.gov"
        );
        assert_eq!(
            host("eu-isoe-west-1"),
            "249663109785.dkr.ecr.eu-isoe-west-1.cloud.adc-e.uk"
        );
        assert_eq!(
            eks_registry("us-east-1", None, true).sandbox_image(),
            "602401143452.dkr.ecr-fips.us-west-2.amazonaws.com/eks/pause:3.5"
        );
        assert_eq!(eks_registry("eu-central-1", None, false).source, "default");
    }

    #[test]
    fn the_manifest_account_wins_in_the_node_region() {
        let data = RegionData {
            partition: Some("aws".into()),
            ecr_account_id: Some("900889452093".into()),
        };
        let r = eks_registry("ap-southeast-7", Some(&data), false);
        assert_eq!(r.host, "900889452093.dkr.ecr.ap-southeast-7.amazonaws.com");
        assert_eq!(r.source, "manifest");
        // A manifest partition sets the suffix even for a region name we do not know.
        let data = RegionData {
            partition: Some("aws-iso-f".into()),
            ecr_account_id: Some("111122223333".into()),
        };
        assert_eq!(
            eks_registry("us-isof-east-9", Some(&data), false).host,
            "111122223333.dkr.ecr.us-isof-east-9.csp.hci.ic.gov"
        );
    }

    #[test]
    fn endpoints_and_a_redacted_token() {
        assert_eq!(
            ecr_endpoint("eu-west-1", false),
            "https://api.ecr.eu-west-1.amazonaws.com"
        );
        assert_eq!(
            ecr_endpoint("us-gov-west-1", true),
            "https://ecr-fips.us-gov-west-1.amazonaws.com"
        );
        assert_eq!(
            ecr_endpoint("cn-north-1", false),
            "https://api.ecr.cn-north-1.amazonaws.com.cn"
        );
        let token = EcrToken {
            auth: "QVdTOnMzY3IzdA==".into(),
            username: "AWS".into(),
            password: "s3cr3t".into(),
            expires_at: None,
        };
        assert!(!format!("{token:?}").contains("s3cr3t"));
    }
}
