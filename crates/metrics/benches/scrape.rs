//! `cargo bench -p hybridlet-metrics --bench scrape`: encode the agent registry as a scrape
//! does, with 16 subsystems registered. A plain timing loop; results in docs/benchmarks.md.

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
}
