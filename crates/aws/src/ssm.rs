//! The two Systems Manager calls an uninstall needs: is this managed instance (`mi-…`)
//! still registered (`DescribeInstanceInformation`), and deregister it
//! (`DeregisterManagedInstance`), in SSM's JSON 1.1 protocol (`AmazonSSM.<Operation>`,
//! signing name `ssm`): the SDK crate for SSM carries several hundred operations and would
//! roughly double the build time of this adapter for two calls.

use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use bytes::Bytes;
use http_body_util::Full;
use serde_json::{Value, json};

use crate::json_protocol::{CallError, JsonClient};

/// Errors of the SSM calls, naming the operation.
pub type SsmError = CallError;

/// What SSM knows about a managed instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedInstance {
    /// `mi-…`.
    pub id: String,
    /// `Online`, `ConnectionLost`, `Inactive`.
    pub ping_status: String,
    /// Agent version, when reported.
    pub agent_version: Option<String>,
}

/// The regional SSM endpoint (China partition included).
pub fn ssm_endpoint(region: &str) -> String {
    format!("https://{}", crate::regional_host("ssm", region))
}

/// A signed JSON-protocol client for SSM.
#[derive(Debug)]
pub struct SsmClient {
    client: JsonClient,
}

impl SsmClient {
    /// A client for `region`, at `endpoint` (else the regional endpoint), signing with
    /// `credentials`; each call bounded by `timeout`.
    pub fn new(
        region: &str,
        endpoint: Option<&str>,
        credentials: Credentials,
        timeout: Duration,
    ) -> Result<Self, SsmError> {
        let url = endpoint
            .map(str::to_string)
            .unwrap_or_else(|| ssm_endpoint(region));
        Ok(Self {
            client: JsonClient::new("ssm", "AmazonSSM", region, &url, credentials, timeout)?,
        })
    }

    /// The endpoint called.
    pub fn endpoint(&self) -> String {
        self.client.endpoint()
    }

    /// The instance, or `None` when SSM no longer knows it (deregistered, or never was).
    pub async fn instance_information(
        &self,
        instance_id: &str,
    ) -> Result<Option<ManagedInstance>, SsmError> {
        let body = json!({"Filters": [{"Key": "InstanceIds", "Values": [instance_id]}]});
        let answer = match self.client.call("DescribeInstanceInformation", &body).await {
            // Asking for an ID the account no longer has is an error, not an empty list.
            Err(e) if e.code() == Some("InvalidInstanceId") => return Ok(None),
            other => other?,
        };
        let list = answer
            .get("InstanceInformationList")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        Ok(list
            .iter()
            .find(|i| i.get("InstanceId").and_then(Value::as_str) == Some(instance_id))
            .map(|i| ManagedInstance {
                id: instance_id.to_string(),
                ping_status: i
                    .get("PingStatus")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                agent_version: i
                    .get("AgentVersion")
                    .and_then(Value::as_str)
                    .map(str::to_string),
            }))
    }

    /// Deregister the instance; `Ok(false)` when SSM did not know it any more.
    pub async fn deregister(&self, instance_id: &str) -> Result<bool, SsmError> {
        match self
            .client
            .call(
                "DeregisterManagedInstance",
                &json!({"InstanceId": instance_id}),
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.code() == Some("InvalidInstanceId") => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The SigV4-signed request for `operation` at time `now`.
    pub fn signed(
        &self,
        operation: &'static str,
        body: &Value,
        now: SystemTime,
    ) -> Result<http::Request<Full<Bytes>>, SsmError> {
        self.client.signed(operation, body, now)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use hybridlet_fixtures::ssm::FakeSsm;

    fn creds() -> Credentials {
        Credentials::new("AKIDTEST", "secret", Some("session".into()), None, "test")
    }

    fn client(fake: &FakeSsm) -> SsmClient {
        SsmClient::new(
            "eu-west-1",
            Some(&fake.endpoint),
            creds(),
            Duration::from_secs(5),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn describes_and_deregisters_a_managed_instance() {
        let fake = FakeSsm::start();
        fake.add_instance("mi-0123456789abcdef0", "Online");
        let ssm = client(&fake);
        let found = ssm
            .instance_information("mi-0123456789abcdef0")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(found.ping_status, "Online");
        assert_eq!(found.agent_version.as_deref(), Some("3.3.0.0"));
        assert!(ssm.deregister("mi-0123456789abcdef0").await.unwrap());
        assert!(!fake.knows("mi-0123456789abcdef0"));
        // Both calls are safe to repeat: the instance is simply gone.
        assert_eq!(
            ssm.instance_information("mi-0123456789abcdef0")
                .await
                .unwrap(),
            None
        );
        assert!(!ssm.deregister("mi-0123456789abcdef0").await.unwrap());
        let ops: Vec<String> = fake
            .requests()
            .iter()
            .map(|r| r.operation().to_string())
            .collect();
        assert_eq!(
            ops,
            [
                "DescribeInstanceInformation",
                "DeregisterManagedInstance",
                "DescribeInstanceInformation",
                "DeregisterManagedInstance"
            ]
        );
    }

    /// The fake only checks the header's shape; here the signature itself is recomputed
    /// from what went over the wire, with the same key and time.
    #[tokio::test]
    async fn requests_carry_a_valid_sigv4_signature() {
        let fake = FakeSsm::start();
        fake.add_instance("mi-0123456789abcdef0", "ConnectionLost");
        client(&fake)
            .instance_information("mi-0123456789abcdef0")
            .await
            .unwrap();
        let sent = fake.requests().pop().unwrap();
        let auth = &sent.headers["authorization"];
        assert!(
            auth.contains("/eu-west-1/ssm/aws4_request"),
            "credential scope: {auth}"
        );
        assert!(
            auth.contains(
                "SignedHeaders=content-type;host;x-amz-date;x-amz-security-token;x-amz-target"
            ),
            "{auth}"
        );
        assert_eq!(sent.headers["x-amz-security-token"], "session");
        let date = &sent.headers["x-amz-date"];
        let when = chrono_free_parse(date);
        let body: Value = serde_json::from_slice(&sent.body).unwrap();
        let again = client(&fake)
            .signed("DescribeInstanceInformation", &body, when)
            .unwrap();
        assert_eq!(again.headers()["authorization"].to_str().unwrap(), auth);
        // A different body gives a different signature: the payload is signed.
        let other = client(&fake)
            .signed("DescribeInstanceInformation", &json!({"Filters": []}), when)
            .unwrap();
        assert_ne!(other.headers()["authorization"].to_str().unwrap(), auth);
    }

    /// `20261126T062400Z` → a SystemTime (UTC), without a date crate.
    fn chrono_free_parse(s: &str) -> SystemTime {
        let n = |a: usize, b: usize| s[a..b].parse::<i64>().unwrap();
        let (y, m, d) = (n(0, 4), n(4, 6), n(6, 8));
        let (hh, mm, ss) = (n(9, 11), n(11, 13), n(13, 15));
        // Days from civil (Howard Hinnant's algorithm).
        let y2 = if m <= 2 { y - 1 } else { y };
        let era = y2.div_euclid(400);
        let yoe = y2 - era * 400;
        let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        let days = era * 146_097 + doe - 719_468;
        SystemTime::UNIX_EPOCH
            + Duration::from_secs((days * 86_400 + hh * 3600 + mm * 60 + ss) as u64)
    }

    #[tokio::test]
    async fn errors_name_the_operation_and_tell_transient_from_final() {
        let fake = FakeSsm::start();
        fake.add_instance("mi-0123456789abcdef0", "Online");
        fake.fail_next(&[
            (400, "ThrottlingException"),
            (500, "InternalServerError"),
            (400, "AccessDeniedException"),
        ]);
        let ssm = client(&fake);
        let e = ssm.deregister("mi-0123456789abcdef0").await.unwrap_err();
        assert!(e.is_transient(), "{e}");
        assert_eq!(e.code(), Some("ThrottlingException"));
        let e = ssm.deregister("mi-0123456789abcdef0").await.unwrap_err();
        assert!(e.is_transient(), "{e}");
        let e = ssm.deregister("mi-0123456789abcdef0").await.unwrap_err();
        assert!(!e.is_transient(), "{e}");
        assert!(
            e.to_string()
                .starts_with("ssm:DeregisterManagedInstance: AccessDeniedException (HTTP 400)"),
            "{e}"
        );
        assert!(fake.knows("mi-0123456789abcdef0"));
        // Nobody listening: unreachable, transient, and it names the endpoint.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        let e = SsmClient::new("eu-west-1", Some(&url), creds(), Duration::from_secs(5))
            .unwrap()
            .deregister("mi-0123456789abcdef0")
            .await
            .unwrap_err();
        assert!(e.is_transient() && e.to_string().contains(&url), "{e}");
    }

    #[test]
    fn regional_endpoints() {
        assert_eq!(
            ssm_endpoint("eu-west-1"),
            "https://ssm.eu-west-1.amazonaws.com"
        );
        assert_eq!(
            ssm_endpoint("cn-north-1"),
            "https://ssm.cn-north-1.amazonaws.com.cn"
        );
    }
}
