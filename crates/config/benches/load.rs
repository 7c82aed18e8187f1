//! `cargo bench -p hybridlet-config --bench load`: parse, merge and validate a realistic
//! configuration (NodeConfig with IAM Roles Anywhere plus an AgentConfig), as
//! `hybridlet check --config-only` does at every `systemctl reload` (and `run` at start).
//! A plain timing loop (no bench framework dependency); results go to docs/benchmarks.md.

use std::hint::black_box;
use std::path::Path;
use std::time::Instant;

fn main() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/config/good/iam-ra-with-agent.yaml");
    let text = std::fs::read_to_string(&path).expect("fixture");
    // Warm up, then take the best of several rounds to reduce scheduler noise.
    for _ in 0..200 {
        black_box(hybridlet_config::parse_str(black_box(&text), &path).expect("valid"));
    }
    let iterations = 2_000;
    let mut best = f64::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        for _ in 0..iterations {
            black_box(hybridlet_config::parse_str(black_box(&text), &path).expect("valid"));
        }
        best = best.min(start.elapsed().as_secs_f64() / f64::from(iterations));
    }
    println!(
        "config parse+validate ({} bytes): {:.1} µs per load (best of 5 x {iterations})",
        text.len(),
        best * 1e6
    );
}
