//! AWS adapter.
//!
//! Builds AWS SDK clients on hybridlet's one TLS stack: rustls with the *ring* provider,
//! the same provider the Kubernetes client uses and the binary installs as the process
//! default. The SDK's default features would bring a second, legacy stack (hyper 0.14 and
//! an older rustls) and the aws-lc provider; they are switched off in the workspace
//! manifest and the HTTP client is chosen here explicitly.
//!
//! Every client accepts an endpoint override so that tests talk to a local emulator on
//! loopback.
//!
//! What this crate must never do: read credentials itself, log them, or pick a region on
//! its own.

mod ecr;
mod eks;
mod json_protocol;
mod reach;
mod ssm;
mod token;

pub use aws_credential_types::Credentials;
pub use ecr::{
    EcrClient, EcrError, EcrToken, EksRegistry, RegionData, ecr_endpoint, eks_registry,
    partition_dns_suffix,
};
pub use eks::{ClusterInfo, EksError, describe_cluster};
pub use json_protocol::{CallError, JsonClient, endpoint_from_env};
pub use reach::{ReachStep, Reached, bypasses_proxy, reach, system_roots};
pub use ssm::{ManagedInstance, SsmClient, SsmError, ssm_endpoint};
pub use token::{EksToken, TOKEN_LIFETIME, TokenError, eks_token, sts_host};

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};

/// The regional host of `service` (`sts`, `ssm`, `rolesanywhere`, `eks`) in `region`,
/// China partition included.
pub fn regional_host(service: &str, region: &str) -> String {
    let suffix = if region.starts_with("cn-") {
        "amazonaws.com.cn"
    } else {
        "amazonaws.com"
    };
    format!("{service}.{region}.{suffix}")
}

/// Where and as whom to call AWS.
#[derive(Debug, Clone, Default)]
pub struct AwsSettings {
    /// The region (`spec.cluster.region`).
    pub region: String,
    /// An endpoint override for every service (emulators, VPC endpoints).
    pub endpoint_url: Option<String>,
    /// Static credentials instead of the default chain (tests and emulators).
    pub static_credentials: Option<Credentials>,
    /// An AWS config file read besides the default ones (IAM Roles Anywhere's
    /// `credential_process` profile, `/etc/aws/hybrid/config`), as `AWS_CONFIG_FILE` would.
    pub config_file: Option<std::path::PathBuf>,
    /// A shared credentials file read besides the default one (the SSM agent's
    /// `/root/.aws/credentials` under another root).
    pub credentials_file: Option<std::path::PathBuf>,
}

/// The SDK HTTP client: hyper 1 with rustls on *ring*.
pub fn http_client() -> aws_sdk_eks::config::SharedHttpClient {
    aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
        .build_https()
}

/// Load the shared SDK configuration: region, endpoint override (else the standard
/// `AWS_ENDPOINT_URL*` variables), credentials ([`on_premises_chain`] unless static ones are
/// given), on our HTTP client.
pub async fn sdk_config(settings: &AwsSettings) -> SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(settings.region.clone()))
        .http_client(http_client());
    if let Some(url) = &settings.endpoint_url {
        loader = loader.endpoint_url(url);
    }
    loader = match &settings.static_credentials {
        Some(creds) => loader.credentials_provider(creds.clone()),
        None => loader.credentials_provider(on_premises_chain_with(
            &settings.region,
            settings.config_file.as_deref(),
            settings.credentials_file.as_deref(),
        )),
    };
    loader.load().await
}

/// Resolve credentials from the configuration's provider chain (environment, shared
/// files, `credential_process`, ...).
pub async fn resolve_credentials(config: &SdkConfig) -> Result<Credentials, String> {
    use aws_credential_types::provider::ProvideCredentials as _;
    let provider = config
        .credentials_provider()
        .ok_or_else(|| "no AWS credentials provider is configured".to_string())?;
    provider
        .provide_credentials()
        .await
        .map_err(|e| hybridlet_runtime::error_chain(&e))
}

/// The credential chain for an on-premises node: environment variables, then the shared
/// config and credentials files (the SSM agent writes `/root/.aws/credentials`; IAM Roles
/// Anywhere uses a `credential_process` profile). Hybrid nodes are not EC2 instances, so
/// instance and container metadata are left out: probing them only adds delays and
/// confusing errors (and reaches for a link-local address the network may not route).
pub fn on_premises_chain(
    region: &str,
    config_file: Option<&std::path::Path>,
) -> aws_config::meta::credentials::CredentialsProviderChain {
    on_premises_chain_with(region, config_file, None)
}

/// [`on_premises_chain`] with an extra credentials file too.
pub fn on_premises_chain_with(
    region: &str,
    config_file: Option<&std::path::Path>,
    credentials_file: Option<&std::path::Path>,
) -> aws_config::meta::credentials::CredentialsProviderChain {
    // Profiles can chain to STS (role_arn); give them our HTTP client and the region.
    let provider_config = aws_config::provider_config::ProviderConfig::without_region()
        .with_region(Some(Region::new(region.to_string())))
        .with_http_client(http_client());
    aws_config::meta::credentials::CredentialsProviderChain::first_try(
        "Environment",
        aws_config::environment::credentials::EnvironmentVariableCredentialsProvider::new(),
    )
    .or_else("Profile", {
        let mut profile = aws_config::profile::ProfileFileCredentialsProvider::builder()
            .configure(&provider_config);
        if config_file.is_some() || credentials_file.is_some() {
            use aws_runtime::env_config::file::{EnvConfigFileKind, EnvConfigFiles};
            let mut files = EnvConfigFiles::builder()
                .include_default_config_file(true)
                .include_default_credentials_file(true);
            if let Some(file) = config_file {
                files = files.with_file(EnvConfigFileKind::Config, file);
            }
            if let Some(file) = credentials_file {
                files = files.with_file(EnvConfigFileKind::Credentials, file);
            }
            profile = profile.profile_files(files.build());
        }
        profile.build()
    })
}

/// Who the configured credentials are: STS GetCallerIdentity, within `timeout`. The error
/// names the step (no credentials, STS unreachable, refused).
pub async fn caller_identity(
    config: &SdkConfig,
    timeout: std::time::Duration,
) -> Result<String, String> {
    resolve_credentials(config).await?;
    let sts = aws_sdk_sts::Client::new(config);
    let call = sts.get_caller_identity().send();
    let answer = tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| format!("STS did not answer within {timeout:?}"))?
        .map_err(|e| {
            format!(
                "STS GetCallerIdentity: {}",
                hybridlet_runtime::error_chain(&e)
            )
        })?;
    Ok(answer.arn().unwrap_or("(no ARN)").to_string())
}

/// An EKS client from the shared configuration.
pub fn eks_client(config: &SdkConfig) -> aws_sdk_eks::Client {
    aws_sdk_eks::Client::new(config)
}
