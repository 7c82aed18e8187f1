//! AWS's JSON 1.1 protocol, spoken directly: a POST of a JSON body to `/`, the operation
//! in `X-Amz-Target: <prefix>.<Operation>`, SigV4 for the service's signing name. Used for
//! the few calls of services whose SDK crates would each add hundreds of operations to
//! the build (SSM's two, ECR's one).

use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

/// Errors of a JSON-protocol call, naming the service and the operation.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The endpoint or request could not be built.
    #[error("{service}:{operation}: {message}")]
    Request {
        /// The service (`ssm`, `ecr`).
        service: &'static str,
        /// The operation.
        operation: &'static str,
        /// What was wrong.
        message: String,
    },
    /// No answer (DNS, TCP, TLS, proxy) or no answer in time.
    #[error("{service}:{operation}: {endpoint} did not answer: {message}")]
    Unreachable {
        /// The service.
        service: &'static str,
        /// The operation.
        operation: &'static str,
        /// The endpoint called.
        endpoint: String,
        /// Why.
        message: String,
    },
    /// The service answered with an error.
    #[error("{service}:{operation}: {code} (HTTP {status}): {message}")]
    Service {
        /// The service.
        service: &'static str,
        /// The operation.
        operation: &'static str,
        /// HTTP status.
        status: u16,
        /// The error type, e.g. `InvalidInstanceId`, `AccessDeniedException`.
        code: String,
        /// The service's message.
        message: String,
    },
}

impl CallError {
    /// Worth another try: no answer, throttling, or a server-side failure.
    pub fn is_transient(&self) -> bool {
        match self {
            CallError::Unreachable { .. } => true,
            CallError::Service { status, code, .. } => {
                *status >= 500 || code.contains("Throttl") || code == "TooManyUpdates"
            }
            CallError::Request { .. } => false,
        }
    }

    /// The service's error type, if it answered.
    pub fn code(&self) -> Option<&str> {
        match self {
            CallError::Service { code, .. } => Some(code),
            _ => None,
        }
    }
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A signed JSON-protocol client for one service.
pub struct JsonClient {
    service: &'static str,
    target_prefix: &'static str,
    endpoint: http::Uri,
    region: String,
    credentials: Credentials,
    timeout: Duration,
    http: HttpsClient,
}

impl std::fmt::Debug for JsonClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsonClient")
            .field("service", &self.service)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl JsonClient {
    /// A client for `service` (its SigV4 signing name) whose operations are named
    /// `<target_prefix>.<Operation>`, at `endpoint_url`, signing for `region` with
    /// `credentials`; each call bounded by `timeout`.
    pub fn new(
        service: &'static str,
        target_prefix: &'static str,
        region: &str,
        endpoint_url: &str,
        credentials: Credentials,
        timeout: Duration,
    ) -> Result<Self, CallError> {
        let bad = |message: String| CallError::Request {
            service,
            operation: "(client)",
            message,
        };
        let url = endpoint_url.trim_end_matches('/');
        let endpoint: http::Uri = url
            .parse()
            .map_err(|e| bad(format!("endpoint {url:?}: {e}")))?;
        if endpoint.host().is_none() {
            return Err(bad(format!("endpoint {url:?} has no host")));
        }
        let builder = match hyper_rustls::HttpsConnectorBuilder::new().with_native_roots() {
            Ok(b) => b,
            Err(e) => {
                return Err(bad(format!(
                    "the system has no usable root certificates ({e}); install ca-certificates"
                )));
            }
        };
        let https = builder.https_or_http().enable_http1().build();
        Ok(Self {
            service,
            target_prefix,
            endpoint,
            region: region.to_string(),
            credentials,
            timeout,
            http: Client::builder(TokioExecutor::new()).build(https),
        })
    }

    /// The endpoint called.
    pub fn endpoint(&self) -> String {
        self.endpoint.to_string()
    }

    /// Call `operation` with `body`; the answer's JSON, or the service's error.
    pub async fn call(&self, operation: &'static str, body: &Value) -> Result<Value, CallError> {
        let request = self.signed(operation, body, SystemTime::now())?;
        let unreachable = |message: String| CallError::Unreachable {
            service: self.service,
            operation,
            endpoint: self.endpoint.to_string(),
            message,
        };
        let exchange = async {
            let response = self
                .http
                .request(request)
                .await
                .map_err(|e| unreachable(hybridlet_runtime::error_chain(&e)))?;
            let status = response.status().as_u16();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| unreachable(e.to_string()))?
                .to_bytes();
            Ok::<_, CallError>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| unreachable(format!("no answer within {:?}", self.timeout)))??;
        let value: Value = if bytes.is_empty() {
            json!({})
        } else {
            serde_json::from_slice(&bytes).map_err(|e| CallError::Service {
                service: self.service,
                operation,
                status,
                code: "UnreadableResponse".into(),
                message: format!(
                    "{e}: {}",
                    String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
                ),
            })?
        };
        if (200..300).contains(&status) {
            return Ok(value);
        }
        // `__type` may carry the shape's namespace: `com.amazonaws.ssm#InvalidInstanceId`.
        let code = value
            .get("__type")
            .and_then(Value::as_str)
            .map(|t| t.rsplit('#').next().unwrap_or(t).to_string())
            .unwrap_or_else(|| format!("HTTP{status}"));
        let message = value
            .get("message")
            .or_else(|| value.get("Message"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        Err(CallError::Service {
            service: self.service,
            operation,
            status,
            code,
            message,
        })
    }

    /// The SigV4-signed request for `operation` at time `now`.
    pub fn signed(
        &self,
        operation: &'static str,
        body: &Value,
        now: SystemTime,
    ) -> Result<http::Request<Full<Bytes>>, CallError> {
        let fail = |message: String| CallError::Request {
            service: self.service,
            operation,
            message,
        };
        let payload = serde_json::to_vec(body).map_err(|e| fail(e.to_string()))?;
        let host = match (self.endpoint.host(), self.endpoint.port_u16()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_string(),
            (None, _) => return Err(fail("endpoint has no host".into())),
        };
        let url = format!(
            "{}://{host}/",
            self.endpoint.scheme_str().unwrap_or("https")
        );
        let target = format!("{}.{operation}", self.target_prefix);
        let headers = [
            ("host", host.as_str()),
            ("content-type", "application/x-amz-json-1.1"),
            ("x-amz-target", target.as_str()),
        ];
        let identity = self.credentials.clone().into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name(self.service)
            .time(now)
            .settings(SigningSettings::default())
            .build()
            .map_err(|e| fail(e.to_string()))?
            .into();
        let signable = SignableRequest::new(
            "POST",
            url.as_str(),
            headers.iter().copied(),
            SignableBody::Bytes(&payload),
        )
        .map_err(|e| fail(e.to_string()))?;
        let (instructions, _) = sign(signable, &params)
            .map_err(|e| fail(e.to_string()))?
            .into_parts();
        let mut builder = http::Request::builder().method("POST").uri(url.as_str());
        for (name, value) in headers {
            builder = builder.header(name, value);
        }
        let mut request = builder
            .body(Full::new(Bytes::from(payload)))
            .map_err(|e| fail(e.to_string()))?;
        instructions.apply_to_request_http1x(&mut request);
        Ok(request)
    }
}

/// `AWS_ENDPOINT_URL_<SERVICE>`, else `AWS_ENDPOINT_URL`: the SDKs' standard overrides,
/// honoured for the calls this crate makes itself.
pub fn endpoint_from_env(service_env: &str) -> Option<String> {
    std::env::var(format!("AWS_ENDPOINT_URL_{service_env}"))
        .ok()
        .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
        .filter(|v| !v.trim().is_empty())
}
