//! `hybridlet token`: the kubelet's exec credential plugin. Prints
//! `{"kind":"ExecCredential","apiVersion":"client.authentication.k8s.io/v1beta1",...}` with
//! an EKS bearer token signed natively (no aws-iam-authenticator binary needed).

use std::time::{SystemTime, UNIX_EPOCH};

use hybridlet_aws::{AwsSettings, eks_token, resolve_credentials, sdk_config};

use crate::Error;
use crate::{Context, TokenArgs};

/// RFC 3339 UTC with second precision, from Unix time (civil-from-days arithmetic).
fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

pub fn token(ctx: &Context, args: &TokenArgs) -> Result<(), Error> {
    // Flags win; otherwise the NodeConfig names the cluster. Only load the configuration
    // when needed, so that the plugin works with flags alone.
    let (cluster, region) = match (&args.cluster_id, &args.region) {
        (Some(c), Some(r)) => (c.clone(), r.clone()),
        _ => {
            let loaded = &ctx.loaded;
            let node = loaded.config.node.as_ref();
            let cluster = args
                .cluster_id
                .clone()
                .or_else(|| node.map(|n| n.spec.cluster.name.clone()))
                .ok_or_else(|| {
                    Error::Usage(
                        "no cluster: pass --cluster-id or configure spec.cluster.name".into(),
                    )
                })?;
            let region = args
                .region
                .clone()
                .or_else(|| node.map(|n| n.spec.cluster.region.clone()))
                .ok_or_else(|| {
                    Error::Usage("no region: pass --region or configure spec.cluster.region".into())
                })?;
            (cluster, region)
        }
    };
    let credentials = ctx.block_on(async {
        let config = sdk_config(&AwsSettings {
            region: region.clone(),
            ..AwsSettings::default()
        })
        .await;
        resolve_credentials(&config).await
    });
    let credentials = credentials.map_err(|e| {
        Error::Failed(format!(
            "no AWS credentials for the EKS token: {e}. With SSM, the agent writes /root/.aws/credentials after registration; with IAM Roles Anywhere, AWS_CONFIG_FILE must point at the credential_process profile"
        ))
    })?;
    let now = SystemTime::now();
    let token = eks_token(&credentials, &region, &cluster, now).map_err(crate::fail)?;
    let out = serde_json::json!({
        "kind": "ExecCredential",
        "apiVersion": "client.authentication.k8s.io/v1beta1",
        "spec": {},
        "status": {
            "expirationTimestamp": rfc3339(token.expiration),
            "token": token.token,
        }
    });
    outln!("{out}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_795_647_599)),
            "2026-11-25T22:59:59Z"
        );
    }
}
