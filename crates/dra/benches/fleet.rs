//! `cargo bench -p hybridlet-dra --bench fleet`: what a fleet of N hybrid nodes costs the API
//! server, replaying the schedule one agent was measured to follow (the `api_cost` test in
//! `crates/hybridlet/tests` holds the agent to these figures) with the agent's own timers
//! and jitter (`WatchTiming::default()`, `hybridlet_runtime::Backoff` with full jitter):
//!
//! - steady state: each node keeps one slice watch, shared by its DRA drivers; it asks the
//!   server to end it after 3–6 hours (uniform) and is then resumed: one request. Nothing
//!   else while nothing changes (no list, no write, no Node read).
//! - a 10-minute outage: every watch is cut at once, before its lifetime: a failure, so
//!   each waits (10 s doubling to the cap, full jitter) before every attempt; the first
//!   attempt after the server is back succeeds. Away longer than the server keeps versions
//!   (5 minutes), the agent does not try to resume: a list and a watch, two requests per
//!   node. Shown too: what three would cost (a resume tried first and answered 410
//!   Expired, as after a shorter outage the server forgot).
//!
//! Reported per N, over five fleets (different jitter draws): the API server's peak
//! (1-second and 10-second bins) and mean request rate after the outage, how long until
//! every watch is back, the bytes of the lists (measured per node by `api_cost`: 8 GPUs +
//! 1,024 VFs), and the attempts that failed during the outage.
//! docs/fleet.md explains what is measured and what is extrapolated.

use std::time::Duration;

use hybridlet_dra::WatchTiming;
use hybridlet_runtime::Backoff;

/// Slice watches per node: one, shared by the DRA drivers (GPU, SR-IOV).
const WATCHES_PER_NODE: usize = 1;
/// Requests per watch after an outage longer than the server keeps versions: a list and
/// a watch.
const RELISTED: usize = 2;
/// ... and when a resume is tried first and refused (410 Expired, list, watch).
const RESUME_REFUSED: usize = 3;
/// Bytes of both drivers' lists on a node with 8 GPUs and 1,024 VFs (9 slices), as the
/// `api_cost` test measured them.
const LIST_BYTES_PER_NODE: usize = 623_837;
/// The outage.
const OUTAGE: Duration = Duration::from_secs(600);

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

struct Rates {
    peak_1s: usize,
    peak_10s: usize,
    mean: f64,
    span: f64,
}

fn rates(times: &[f64], per_event: usize, from: f64) -> Rates {
    let last = times.iter().copied().fold(from, f64::max);
    let span = (last - from).max(1.0);
    let bins = span.ceil() as usize + 1;
    let mut per_second = vec![0usize; bins];
    for t in times {
        per_second[((t - from).max(0.0)) as usize] += per_event;
    }
    let peak_10s = per_second
        .windows(10.min(bins))
        .map(|w| w.iter().sum::<usize>())
        .max()
        .unwrap_or(0);
    Rates {
        peak_1s: per_second.iter().copied().max().unwrap_or(0),
        peak_10s: peak_10s.div_ceil(10),
        mean: (times.len() * per_event) as f64 / span,
        span,
    }
}

/// When each of `watches` is back after the outage, and when the attempts that failed
/// during it were made.
fn reconnects(watches: usize, timing: &WatchTiming, seed: u64) -> (Vec<f64>, Vec<f64>) {
    let outage = OUTAGE.as_secs_f64();
    let mut back = Vec::with_capacity(watches);
    let mut failed = Vec::new();
    for i in 0..watches {
        let mut backoff = Backoff::with_seed(
            timing.retry_initial,
            timing.retry_max,
            splitmix(seed ^ ((i as u64) << 20)),
        )
        .full_jitter();
        let mut t = backoff.next_delay().as_secs_f64();
        while t < outage {
            failed.push(t);
            t += backoff.next_delay().as_secs_f64();
        }
        back.push(t);
    }
    (back, failed)
}

/// Watch renewals of `watches` over `hours`, each watch starting at a random phase.
fn renewals(watches: usize, timing: &WatchTiming, hours: f64, seed: u64) -> Vec<f64> {
    let (lo, hi) = (
        timing.lifetime.0.as_secs_f64(),
        timing.lifetime.1.as_secs_f64(),
    );
    let end = hours * 3600.0;
    let mut out = Vec::new();
    for i in 0..watches {
        let mut r = splitmix(seed ^ ((i as u64) << 1));
        let mut uniform = || {
            r = splitmix(r);
            (r >> 11) as f64 / (1u64 << 53) as f64
        };
        let mut t = -uniform() * hi;
        loop {
            t += lo + uniform() * (hi - lo);
            if t >= end {
                break;
            }
            if t >= 0.0 {
                out.push(t);
            }
        }
    }
    out
}

/// One fleet's figures after (and during) the outage.
struct Outage {
    relisted: Rates,
    refused: Rates,
    during: Rates,
    failed: usize,
}

/// `lo–hi` of a figure over the fleets (one decimal below 10).
fn range(runs: &[Outage], f: impl Fn(&Outage) -> f64) -> String {
    let (lo, hi) = runs
        .iter()
        .map(f)
        .fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(x), b.max(x)));
    let p = usize::from(hi < 10.0);
    if hi - lo < 0.05 {
        format!("{lo:.p$}")
    } else {
        format!("{lo:.p$}–{hi:.p$}")
    }
}

fn main() {
    let timing = WatchTiming::default();
    let outage = OUTAGE.as_secs_f64();
    println!(
        "agent timers: watch lifetime {:?}..{:?}, reconnect backoff {:?} doubling to {:?} (full jitter), resume within {:?}; outage {:?}",
        timing.lifetime.0,
        timing.lifetime.1,
        timing.retry_initial,
        timing.retry_max,
        timing.resume_within,
        OUTAGE
    );
    for n in [100usize, 1_000, 5_000] {
        let watches = n * WATCHES_PER_NODE;
        let steady = renewals(watches, &timing, 24.0, 7);
        let s = rates(&steady, 1, 0.0);
        let runs: Vec<Outage> = (11..16)
            .map(|seed| {
                let (back, failed) = reconnects(watches, &timing, seed);
                Outage {
                    relisted: rates(&back, RELISTED, outage),
                    refused: rates(&back, RESUME_REFUSED, outage),
                    during: rates(&failed, 1, 0.0),
                    failed: failed.len(),
                }
            })
            .collect();
        let list_mb = (n * LIST_BYTES_PER_NODE) as f64 / 1e6;
        println!("{n} nodes:");
        println!(
            "  steady state (24 h): mean {:.3} req/s, busiest second {} req",
            steady.len() as f64 / (24.0 * 3600.0),
            s.peak_1s
        );
        println!(
            "  after the outage (list + watch): peak {} req/s (1 s), {} req/s (10 s), mean {} req/s, all back within {} s; lists {list_mb:.0} MB in all",
            range(&runs, |r| r.relisted.peak_1s as f64),
            range(&runs, |r| r.relisted.peak_10s as f64),
            range(&runs, |r| r.relisted.mean),
            range(&runs, |r| r.relisted.span),
        );
        println!(
            "  (were a resume tried first: peak {} req/s (1 s), {} req/s (10 s))",
            range(&runs, |r| r.refused.peak_1s as f64),
            range(&runs, |r| r.refused.peak_10s as f64),
        );
        println!(
            "  during the outage: {} failed attempts, peak {} req/s (1 s), {} req/s (10 s)",
            range(&runs, |r| r.failed as f64),
            range(&runs, |r| r.during.peak_1s as f64),
            range(&runs, |r| r.during.peak_10s as f64),
        );
    }
}
