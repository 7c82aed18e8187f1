//! Requests to the API server, as the agent sees them: count by verb and HTTP status (or
//! `error` when no answer came), time to the response headers by verb, and the time of
//! the last answer — so an operator can tell "the API server is unreachable from this
//! node" from everything else. Installed once per process with [`register`]; every client
//! this crate builds afterwards is observed.

use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

type Labels = Vec<(String, String)>;

#[derive(Debug, Clone)]
pub(crate) struct ApiMetrics {
    requests: Family<Labels, Counter>,
    duration: Family<Labels, Histogram>,
    last_answer: Gauge<f64, std::sync::atomic::AtomicU64>,
}

static METRICS: OnceLock<ApiMetrics> = OnceLock::new();

fn latency() -> Histogram {
    Histogram::new([
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ])
}

/// Register the API server families in `registry` and observe every client built from
/// now on. A second call registers nothing.
pub fn register(registry: &mut Registry) {
    let m = ApiMetrics {
        requests: Family::default(),
        duration: Family::new_with_constructor(latency as fn() -> Histogram),
        last_answer: Gauge::default(),
    };
    if METRICS.set(m.clone()).is_err() {
        return;
    }
    registry.register(
        "apiserver_requests",
        "Requests to the Kubernetes API server, by verb and HTTP status code (`error`: no answer: connection refused, TLS, timeout)",
        m.requests,
    );
    registry.register_with_unit(
        "apiserver_request_duration",
        "Time from request to response headers, by verb (a watch counts until it starts streaming)",
        Unit::Seconds,
        m.duration,
    );
    registry.register_with_unit(
        "apiserver_last_answer_timestamp",
        "Unix time of the API server's last answer of any status (0: none yet)",
        Unit::Seconds,
        m.last_answer,
    );
}

pub(crate) fn installed() -> Option<ApiMetrics> {
    METRICS.get().cloned()
}

fn verb<B>(req: &http::Request<B>) -> &'static str {
    let watch = req
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
    match *req.method() {
        http::Method::GET if watch => "watch",
        http::Method::GET => "get",
        http::Method::POST => "create",
        http::Method::PUT => "update",
        http::Method::PATCH => "patch",
        http::Method::DELETE => "delete",
        _ => "other",
    }
}

/// The tower layer that observes each request.
#[derive(Debug, Clone)]
pub(crate) struct ObserveLayer(pub(crate) ApiMetrics);

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = Observe<S>;
    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            metrics: self.0.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Observe<S> {
    inner: S,
    metrics: ApiMetrics,
}

impl<S, ReqB, ResB> tower::Service<http::Request<ReqB>> for Observe<S>
where
    S: tower::Service<http::Request<ReqB>, Response = http::Response<ResB>>,
    S::Future: Send + 'static,
    S::Error: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqB>) -> Self::Future {
        let verb = verb(&req);
        let started = Instant::now();
        let future = self.inner.call(req);
        let m = self.metrics.clone();
        Box::pin(async move {
            let result = future.await;
            let code = match &result {
                Ok(response) => {
                    let now = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map_or(0.0, |d| d.as_secs_f64());
                    m.last_answer.set(now);
                    response.status().as_u16().to_string()
                }
                Err(_) => "error".to_string(),
            };
            m.requests
                .get_or_create(&vec![
                    ("verb".to_string(), verb.to_string()),
                    ("code".to_string(), code),
                ])
                .inc();
            m.duration
                .get_or_create(&vec![("verb".to_string(), verb.to_string())])
                .observe(started.elapsed().as_secs_f64());
            result
        })
    }
}
