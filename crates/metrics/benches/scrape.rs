//! `cargo bench -p hybridlet-metrics --bench scrape`: encode the agent registry as a scrape
//! does, with 16 subsystems registered, in OpenMetrics (what Prometheus asks for) and then
//! rewritten in the 0.0.4 text format (what curl and older scrapers get). A plain timing
//! loop; results in docs/benchmarks.md.

use std::hint::black_box;
use std::time::Instant;

use hybridlet_metrics::{AgentMetrics, BuildInfo, new_registry};
use hybridlet_runtime::Readiness;

fn main() {
    let readiness = Readiness::new();
    let handles: Vec<_> = (0..16)
        .map(|i| readiness.register(&format!("subsystem-{i}")))
        .collect();
    for h in &handles {
        h.set_ready();
    }
    let mut registry = new_registry();
    let build = BuildInfo {
        version: "0.1.0".into(),
        commit: "bench".into(),
        date: "2026-12-04T00:00:00Z".into(),
    };
    let metrics = AgentMetrics::register(&mut registry, &build, "joined", readiness);
    metrics.config_reloaded("ok");
    for _ in 0..1_000 {
        black_box(hybridlet_metrics::encode(&registry).expect("encode"));
    }
    let iterations = 20_000;
    let mut best = f64::MAX;
    let mut size = 0;
    for _ in 0..5 {
        let start = Instant::now();
        for _ in 0..iterations {
            size = black_box(hybridlet_metrics::encode(&registry).expect("encode")).len();
        }
        best = best.min(start.elapsed().as_secs_f64() / f64::from(iterations));
    }
    println!(
        "agent registry encode ({size} bytes): {:.2} µs per scrape (best of 5 x {iterations})",
        best * 1e6
    );
    let mut best_text = f64::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        for _ in 0..iterations {
            let om = hybridlet_metrics::encode(&registry).expect("encode");
            size = black_box(hybridlet_metrics::format::to_text_0_0_4(&om)).len();
        }
        best_text = best_text.min(start.elapsed().as_secs_f64() / f64::from(iterations));
    }
    println!(
        "agent registry encode + 0.0.4 rewrite ({size} bytes): {:.2} µs per scrape (best of 5 x {iterations})",
        best_text * 1e6
    );
}
